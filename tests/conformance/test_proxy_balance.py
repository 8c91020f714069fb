"""``sockmap proxy --mode balance`` on both engines: messages spread over backends and
answered whole, per-backend metrics, a refused backend left out, field routing, and a
misbehaving client beside well-behaved ones."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from netutil import wait_until
from sockmap.bench.messages import TaggingServer, frame, random_bodies, read_message, send_chunked
from sockmap.proxy import Proxy, ProxyConfig


def converse(addr: tuple[str, int], bodies: list[bytes], seed: int) -> list[bytes]:
    with socket.create_connection(addr, timeout=20) as c:
        data = b"".join(frame(b) for b in bodies)
        t = threading.Thread(target=send_chunked, args=(c, data, seed), daemon=True)
        t.start()
        got = [read_message(c) for _ in bodies]
        t.join(10)
    assert all(g is not None for g in got)
    return got  # type: ignore[return-value]


def tags(answers: list[bytes], bodies: list[bytes]) -> dict[bytes, int]:
    assert sorted(a[1:] for a in answers) == sorted(bodies)  # each answered once, whole
    out: dict[bytes, int] = {}
    for a in answers:
        out[a[:1]] = out.get(a[:1], 0) + 1
    return out


def balance_config(engine_name: str, backends: list[str], **kw: object) -> ProxyConfig:
    return ProxyConfig(
        listen=["127.0.0.1:0"],
        backends=backends,
        mode="balance",
        framing="dns",
        engine=engine_name,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def test_clients_messages_are_balanced_with_metrics(
    engine_name: str, servers: list[TaggingServer]
) -> None:
    cfg = balance_config(engine_name, [s.address for s in servers], metrics="127.0.0.1:0")
    with Proxy(cfg) as proxy:
        results: dict[int, dict[bytes, int]] = {}

        def client(i: int) -> None:
            bodies = random_bodies(100, seed=i)
            results[i] = tags(converse(proxy.addresses[0], bodies, seed=i), bodies)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 4
        total = {k: sum(r.get(k, 0) for r in results.values()) for k in (b"A", b"B")}
        assert total[b"A"] + total[b"B"] == 400
        assert min(total.values()) >= 150
        assert proxy.engine_name == engine_name
        host, port = proxy.metrics_address or ("", 0)
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
        a = servers[0].address
        for direction in ("up", "down"):
            line = f'sockmap_proxy_messages_total{{backend="{a}",direction="{direction}"}}'
            assert f"{line} {total[b'A']}.0" in text
        assert "sockmap_proxy_parser_errors_total 0.0" in text
        assert wait_until(lambda: proxy.active == 0, timeout=10)


def test_a_refused_backend_is_left_out(engine_name: str, servers: list[TaggingServer]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
        cfg = balance_config(engine_name, [dead, servers[1].address])
        with Proxy(cfg) as proxy:
            bodies = random_bodies(50, seed=1)
            assert tags(converse(proxy.addresses[0], bodies, seed=1), bodies) == {b"B": 50}
            assert proxy.stats.backend_failures >= 1


def test_field_routing_sends_each_value_to_its_backend(
    engine_name: str, servers: list[TaggingServer]
) -> None:
    a, b = (s.address for s in servers)
    # The DNS length (2 bytes), then the field: body[0:2], i.e. message bytes 2..3.
    cfg = balance_config(engine_name, [a, b], policy="field:2:2", routes={"7": b, "0x9": a})
    with Proxy(cfg) as proxy:
        bodies = [struct.pack(">HH", (7, 9, 1)[i % 3], i) for i in range(90)]
        answers = converse(proxy.addresses[0], bodies, seed=3)
        tags(answers, bodies)
        for ans in answers:
            field = struct.unpack(">H", ans[1:3])[0]
            assert ans[:1] == {7: b"B", 9: b"A", 1: b"A"}[field]  # 1: unmatched -> first


def test_a_misbehaving_client_costs_the_others_nothing(
    engine_name: str, servers: list[TaggingServer]
) -> None:
    cfg = balance_config(engine_name, [s.address for s in servers], max_message=2000)
    with Proxy(cfg) as proxy:
        addr = proxy.addresses[0]
        good: dict[int, int] = {}

        def client(i: int) -> None:
            bodies = random_bodies(80, seed=10 + i, high=1500)
            good[i] = sum(tags(converse(addr, bodies, seed=i), bodies).values())

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for _ in range(3):  # oversized messages, one client after another
            with socket.create_connection(addr, timeout=10) as bad:
                bad.sendall(struct.pack(">H", 3000) + b"x" * 3000)
                with pytest.raises(ConnectionResetError):
                    while bad.recv(65536):
                        pass
        for t in threads:
            t.join(60)
        assert good == {0: 80, 1: 80, 2: 80}
        assert proxy.balancer is not None
        assert wait_until(lambda: proxy.balancer.stats.parser_errors == 3)  # type: ignore[union-attr]


def test_balance_mode_without_framing_is_refused() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "sockmap", "proxy", "--mode", "balance", "--backend", ":1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert "balance mode needs --framing" in run.stderr


def test_a_slow_partial_message_is_reset_and_idle_clients_closed(
    engine_name: str, servers: list[TaggingServer]
) -> None:
    cfg = balance_config(
        engine_name, [s.address for s in servers], message_timeout=0.5, idle_timeout=1.0
    )
    with Proxy(cfg) as proxy:
        addr = proxy.addresses[0]
        slow = socket.create_connection(addr, timeout=10)
        idle = socket.create_connection(addr, timeout=10)
        slow.sendall(frame(b"whole") + b"\x00")  # then half a length field, and nothing
        assert read_message(slow) == b"Awhole"
        bodies = random_bodies(60, seed=7)
        assert sum(tags(converse(addr, bodies, seed=7), bodies).values()) == 60
        with pytest.raises(ConnectionResetError):
            while slow.recv(100):
                pass
        assert idle.recv(100) == b""  # closed cleanly after a second without a byte
        bal = proxy.balancer
        assert bal is not None
        assert bal.stats.message_timeouts == 1
        assert bal.stats.idle_closed >= 1
        slow.close()
        idle.close()


def test_idle_spliced_connections_are_closed(
    engine_name: str, servers: list[TaggingServer]
) -> None:
    cfg = ProxyConfig(
        listen=["127.0.0.1:0"],
        backends=[servers[0].address],
        engine=engine_name,  # type: ignore[arg-type]
        idle_timeout=1.0,
    )
    with Proxy(cfg) as proxy, socket.create_connection(proxy.addresses[0], timeout=10) as c:
        c.sendall(frame(b"hi"))
        assert read_message(c) == b"Ahi"
        assert c.recv(100) == b""
        assert proxy.splicer.stats.idle_closed == 1


def _balance_maps() -> set[int]:
    """Ids of the kernel maps a balancing proxy names ``balance*`` (empty without bpf())."""
    from sockmap.kernel.features import bpf_access  # noqa: PLC0415
    from sockmap.kernel.info import iter_map_ids, map_fd_by_id, map_info  # noqa: PLC0415

    if not bpf_access()[0]:
        return set()
    out = set()
    for i in iter_map_ids():
        try:
            fd = map_fd_by_id(i)
        except OSError:
            continue
        try:
            if map_info(fd).name.startswith("balance"):
                out.add(i)
        finally:
            os.close(fd)
    return out


def test_the_command_reloads_on_sighup_and_drains_on_sigterm(
    tmp_path: Path, servers: list[TaggingServer]
) -> None:
    """Balance mode as run by a user: SIGHUP adds a backend for new clients; SIGTERM stops
    accepting, lets a connected client finish, exits 0 and leaves no map behind."""
    a, b = (s.address for s in servers)
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(
        f'listen = ["127.0.0.1:0"]\nbackends = ["{a}"]\nmode = "balance"\nframing = "dns"\n'
        'metrics = "off"\n'
    )
    cfg.chmod(0o600)
    before = _balance_maps()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sockmap", "proxy", "--config", str(cfg), "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == "ready", proc.stderr.read() if proc.stderr else ""
        host, port = ready[1].rsplit(":", 1)
        addr = (host, int(port))
        bodies = random_bodies(20, seed=1)
        assert tags(converse(addr, bodies, seed=1), bodies) == {b"A": 20}
        from sockmap.kernel.features import bpf_access  # noqa: PLC0415

        if bpf_access()[0]:  # auto picked the kernel engine: its maps exist while it runs
            assert len(_balance_maps() - before) >= 3
        cfg.write_text(cfg.read_text().replace(f'["{a}"]', f'["{a}", "{b}"]'))
        proc.send_signal(signal.SIGHUP)

        def both_answer() -> bool:
            return tags(converse(addr, bodies, seed=2), bodies).keys() == {b"A", b"B"}

        assert wait_until(both_answer, timeout=10)
        staying = socket.create_connection(addr, timeout=10)
        staying.sendall(frame(b"before"))  # accepted and balanced before the signal
        assert read_message(staying) in (b"Abefore", b"Bbefore")
        proc.send_signal(signal.SIGTERM)
        staying.sendall(frame(b"after"))  # the connected client carries on while draining
        assert read_message(staying) in (b"Aafter", b"Bafter")
        assert wait_until(lambda: _refused(addr), timeout=5)
        staying.close()
        assert proc.wait(15) == 0
        assert _balance_maps() <= before
    finally:
        proc.kill()
        proc.wait(5)


def _refused(addr: tuple[str, int]) -> bool:
    try:
        socket.create_connection(addr, timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("mode", ["splice", "balance"])
def test_clients_over_the_limit_are_reset_and_the_others_carry_on(
    engine_name: str, servers: list[TaggingServer], mode: str
) -> None:
    cfg = ProxyConfig(
        listen=["127.0.0.1:0"],
        backends=[s.address for s in servers],
        engine=engine_name,  # type: ignore[arg-type]
        mode=mode,  # type: ignore[arg-type]
        framing="dns" if mode == "balance" else "none",
        max_pairs=2,
    )
    with Proxy(cfg) as proxy:
        addr = proxy.addresses[0]
        first = [socket.create_connection(addr, timeout=10) for _ in range(2)]
        for c in first:
            c.sendall(frame(b"hello"))
            assert read_message(c) is not None
        with pytest.raises(ConnectionResetError):  # at connect, send or receive
            with socket.create_connection(addr, timeout=10) as third:
                third.sendall(frame(b"hello"))
                while third.recv(100):
                    pass
        assert wait_until(lambda: proxy.stats.over_limit == 1)
        for c in first:  # unaffected
            c.sendall(frame(b"again"))
            assert read_message(c) is not None
        first[0].close()
        assert wait_until(lambda: proxy.active == 1, timeout=10)
        bodies = random_bodies(10, seed=4)
        assert len(converse(addr, bodies, seed=4)) == 10  # a slot is free again
        first[1].close()
