"""``sockmap proxy`` in splice mode, on both engines: bytes both ways, half-closes, a
refused backend skipped, every backend refused, IPv6, and the command drained by SIGTERM."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from netutil import random_chunks, recv_to_eof, wait_until
from sockmap.proxy import ProxyConfig, SpliceProxy, load_config


class Backends:
    """Echo servers that reply with what they got, reversed per chunk? No: echo as is,
    then half-close after the client does."""

    def __init__(self, n: int, family: int = socket.AF_INET) -> None:
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.servers = [socket.create_server((host, 0), family=family) for _ in range(n)]
        self.seen = [0] * n
        self.threads = [
            threading.Thread(target=self._serve, args=(i,), daemon=True) for i in range(n)
        ]
        for t in self.threads:
            t.start()

    @property
    def addresses(self) -> list[str]:
        out = []
        for s in self.servers:
            host, port = s.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    def _serve(self, i: int) -> None:
        while True:
            try:
                conn, _ = self.servers[i].accept()
            except OSError:
                return
            self.seen[i] += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 20):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in self.servers:
            s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exchange(
    addr: tuple[str, int], data: list[bytes], family: int = socket.AF_INET
) -> tuple[int, str]:
    with socket.socket(family) as c:
        c.settimeout(20)
        c.connect(addr)
        t = threading.Thread(
            target=lambda: ([c.sendall(x) for x in data], c.shutdown(socket.SHUT_WR)), daemon=True
        )
        t.start()
        got = recv_to_eof(c)
        t.join(10)
        return got


def test_splice_both_ways_with_half_close(engine_name: str) -> None:
    backends = Backends(2)
    cfg = ProxyConfig(listen=["127.0.0.1:0"], backends=backends.addresses, engine=engine_name)  # type: ignore[arg-type]
    with SpliceProxy(cfg) as proxy:
        assert proxy.engine_name == engine_name
        addr = proxy.addresses[0]
        for seed in range(4):
            chunks = random_chunks(2 << 20, seed=seed)
            want = hashlib.sha256(b"".join(chunks)).hexdigest()
            assert exchange(addr, chunks) == (2 << 20, want)
        assert proxy.stats.spliced == 4
        assert backends.seen == [2, 2]  # each new client starts at the next backend
    backends.close()


def test_a_refused_backend_is_skipped_and_all_refused_resets(engine_name: str) -> None:
    backends = Backends(1)
    dead = f"127.0.0.1:{free_port()}"
    cfg = ProxyConfig(
        listen=["127.0.0.1:0"], backends=[dead, *backends.addresses], engine=engine_name
    )  # type: ignore[arg-type]
    with SpliceProxy(cfg) as proxy:
        addr = proxy.addresses[0]
        assert exchange(addr, [b"hello"]) == (5, hashlib.sha256(b"hello").hexdigest())
        assert proxy.stats.backend_failures == 1
    backends.close()
    cfg = ProxyConfig(listen=["127.0.0.1:0"], backends=[dead], engine=engine_name)  # type: ignore[arg-type]
    with SpliceProxy(cfg) as proxy, socket.create_connection(proxy.addresses[0]) as c:
        c.settimeout(10)
        with pytest.raises(ConnectionResetError):
            c.sendall(b"x")
            c.recv(10)
        assert proxy.stats.clients_refused == 1


def test_ipv6(engine_name: str) -> None:
    backends = Backends(1, socket.AF_INET6)
    cfg = ProxyConfig(listen=["[::1]:0"], backends=backends.addresses, engine=engine_name)  # type: ignore[arg-type]
    with SpliceProxy(cfg) as proxy:
        data = os.urandom(300_000)
        addr = proxy.addresses[0]
        assert exchange(addr, [data], socket.AF_INET6) == (
            len(data),
            hashlib.sha256(data).hexdigest(),
        )
    backends.close()


def test_world_writable_config_is_refused(tmp_path) -> None:
    cfg = tmp_path / "proxy.toml"
    cfg.write_text('backends = ["127.0.0.1:1"]\n')
    cfg.chmod(0o666)
    with pytest.raises(PermissionError, match="world-writable"):
        load_config(cfg)
    cfg.chmod(0o644)
    assert load_config(cfg).backends == ["127.0.0.1:1"]


def start_cli(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """``sockmap proxy ARGS`` in a subprocess, and the words of its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sockmap.cli.main", "proxy", "--log-level", "WARNING", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().split()


def test_the_command_drains_on_sigterm(tmp_path) -> None:
    backends = Backends(1)
    port = free_port()
    proc, ready = start_cli(
        "--listen",
        f"127.0.0.1:{port}",
        "--backend",
        backends.addresses[0],
        "--engine",
        "userspace",
        "--metrics",
        "127.0.0.1:0",
    )
    try:
        assert ready[:2] == ["ready", f"127.0.0.1:{port}"]
        assert ready[2] == "metrics"
        metrics_url = f"http://{ready[3]}/metrics"
        c = socket.create_connection(("127.0.0.1", port))
        c.settimeout(10)
        c.sendall(b"before the signal")
        assert c.recv(100) == b"before the signal"
        scraped = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        assert "sockmap_proxy_connections_accepted_total 1.0" in scraped
        assert "sockmap_proxy_connections_active 1.0" in scraped
        proc.send_signal(signal.SIGTERM)
        # accepted connections carry on while the proxy drains
        c.sendall(b" and after")
        assert c.recv(100) == b" and after"
        c.shutdown(socket.SHUT_WR)
        assert c.recv(100) == b""
        c.close()
        assert proc.wait(15) == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        proc.kill()
        proc.wait(5)
        backends.close()


def test_metrics_count_bytes_per_backend(engine_name: str) -> None:
    backends = Backends(1)
    cfg = ProxyConfig(
        listen=["127.0.0.1:0"],
        backends=backends.addresses,
        engine=engine_name,
        metrics="127.0.0.1:0",  # type: ignore[arg-type]
    )
    with SpliceProxy(cfg) as proxy:
        assert proxy.metrics_address is not None
        assert proxy.metrics_address[0] == "127.0.0.1"
        data = os.urandom(100_000)
        exchange(proxy.addresses[0], [data])
        assert wait_until(lambda: proxy.active == 0)
        url = "http://{}:{}/metrics".format(*proxy.metrics_address)
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    name = backends.addresses[0]
    assert f'sockmap_proxy_bytes_total{{backend="{name}",direction="up"}} 100000.0' in text
    assert f'sockmap_proxy_bytes_total{{backend="{name}",direction="down"}} 100000.0' in text
    assert f'sockmap_proxy_connections_total{{backend="{name}"}} 1.0' in text
    backends.close()


def test_sighup_reloads_backends_and_stats_shows_counters(tmp_path, capsys) -> None:
    first, second = Backends(1), Backends(1)
    port = free_port()
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(
        f'listen = ["127.0.0.1:{port}"]\nbackends = ["{first.addresses[0]}"]\n'
        'engine = "userspace"\nmetrics = "127.0.0.1:0"\n'
    )
    cfg.chmod(0o600)
    proc, ready = start_cli("--config", str(cfg))
    try:
        metrics = ready[3]

        def one_exchange() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.sendall(b"ping")
                assert c.recv(10) == b"ping"

        one_exchange()
        assert first.seen == [1]
        cfg.write_text(cfg.read_text().replace(first.addresses[0], second.addresses[0]))
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: (one_exchange(), second.seen == [1])[1], timeout=10)
        from sockmap.cli.main import main  # noqa: PLC0415

        capsys.readouterr()
        assert main(["stats", "--metrics", metrics]) == 0
        out = capsys.readouterr().out
        assert "connections_accepted_total" in out
        assert f"backend={second.addresses[0]}" in out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        finally:
            proc.kill()
        first.close()
        second.close()


def test_a_backend_that_half_closes_then_resets_resets_the_pair_at_once(
    engine_name: str,
) -> None:
    """The backend reads for a while, then half-closes and closes with bytes unread (its
    kernel resets), while the client streams 64 MiB and half-closes. What was still on
    its way can never arrive: the pair is closed at once (reset, when bytes were still
    due), not left to the FIN timeout (epoll shows the backend's FIN; the reset that
    follows it has no event of its own)."""
    server = socket.create_server(("127.0.0.1", 0))

    def backend() -> None:
        conn, _ = server.accept()
        t0 = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - t0 < 0.3:
                conn.recv(1 << 20)
        conn.shutdown(socket.SHUT_WR)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    threading.Thread(target=backend, daemon=True).start()
    host, port = server.getsockname()
    cfg = ProxyConfig(listen=["127.0.0.1:0"], backends=[f"{host}:{port}"], engine=engine_name)  # type: ignore[arg-type]
    with SpliceProxy(cfg) as proxy, socket.create_connection(proxy.addresses[0]) as c:
        c.settimeout(15)

        def stream() -> None:
            block = os.urandom(65536)
            with contextlib.suppress(OSError):
                for _ in range(1024):
                    c.sendall(block)
                c.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        assert wait_until(lambda: proxy.active == 1)
        t0 = time.monotonic()
        assert wait_until(lambda: proxy.active == 0, timeout=15)
        assert time.monotonic() - t0 < 5  # the FIN timeout is 10 s
        assert proxy.splicer.stats.fins_forced == 0
        sender.join(10)
    server.close()
