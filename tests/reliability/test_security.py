"""What ``sockmap proxy`` defends against (docs/security.md), each point checked:

1. config files and pin locations that someone else could replace are refused;
2. pins are created 0600 (and the directories ``pin`` makes 0700), whatever the umask;
3. ``--drop-privileges`` leaves the running proxy no capability (measured: the
   datapath needs none), optionally as another user, and the kernel datapath still
   splices every byte; which capability each phase needs is measured here;
4. the metrics endpoint binds 127.0.0.1 unless told otherwise, and says so when told;
5. parser limits: a huge length prefix or a message that never ends resets its client,
   and the proxy's memory stays within a stated bound (both engines).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from report import record, size

from netutil import wait_until
from sockmap.errors import PermissionDenied
from sockmap.kernel.features import bpf_access
from sockmap.proxy import Proxy, ProxyConfig, load_config

FIGURES: dict[str, Any] = {}
NOBODY = 65534


def need_kernel() -> None:
    ok, why = bpf_access()
    if not ok:
        pytest.skip(f"kernel engine: bpf() refused: {why}")


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (chown to another user, setuid)")


class Echo:
    """Threaded echo servers (whatever arrives goes back; EOF answered with EOF)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self) -> str:
        return "{}:{}".format(*self.server.getsockname())

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.close()


# -- 1, 2: config files and pins --------------------------------------------------------


def test_world_writable_config_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "proxy.toml"
    cfg.write_text('backends = ["127.0.0.1:1"]\n')
    cfg.chmod(0o646)
    with pytest.raises(PermissionError, match=f"{cfg} is world-writable.*chmod o-w"):
        load_config(cfg)
    cfg.chmod(0o640)
    assert load_config(cfg).backends == ["127.0.0.1:1"]


@pytest.fixture
def pin_root() -> Iterator[Path]:
    """A directory of ours on bpffs (removed at the end); skips where bpf() is refused."""
    need_kernel()
    from sockmap.kernel.pin import ensure_bpffs  # noqa: PLC0415

    root = ensure_bpffs() / f"sockmap-security-{os.getpid()}"
    root.mkdir(0o700)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_pins_are_0600_and_their_directories_0700_whatever_the_umask(pin_root: Path) -> None:
    from sockmap.kernel.maps import HashMap  # noqa: PLC0415
    from sockmap.kernel.pin import open_pinned, pin  # noqa: PLC0415

    modes = {}
    for umask in (0o000, 0o022, 0o277):
        old = os.umask(umask)
        try:
            with HashMap.new(1) as m:
                p = pin(m, pin_root / f"u{umask:03o}" / "deeper" / "map")
        finally:
            os.umask(old)
        modes[f"{umask:03o}"] = {
            "pin": f"{p.stat().st_mode & 0o7777:04o}",
            "dirs": [f"{d.stat().st_mode & 0o7777:04o}" for d in (p.parent, p.parent.parent)],
        }
        assert p.stat().st_mode & 0o7777 == 0o600, modes
        assert all(d == "0700" for d in modes[f"{umask:03o}"]["dirs"]), modes
        again = open_pinned(p)  # the owner can open it (0400 would refuse writes)
        again.close()
    FIGURES["pin_modes_by_umask"] = modes


def test_a_pin_under_a_directory_others_may_write_is_refused(pin_root: Path) -> None:
    from sockmap.kernel.maps import HashMap  # noqa: PLC0415
    from sockmap.kernel.pin import open_pinned, pin  # noqa: PLC0415

    open_dir = pin_root / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # world-writable, no sticky bit
    with HashMap.new(1) as m:
        for target in (open_dir / "m", open_dir / "mine" / "m"):
            with pytest.raises(PermissionDenied) as exc:
                pin(m, target)
            assert exc.value.errno == errno.EPERM
            assert f"{open_dir} is world-writable without the sticky bit" in str(exc.value)
            assert str(target) in str(exc.value)
            assert "chmod o-w" in str(exc.value)
        assert not (open_dir / "mine").exists()  # refused before creating anything
        open_dir.chmod(0o1777)  # sticky, ours: names cannot be taken from us (as /tmp)
        p = pin(m, open_dir / "m")
        assert p.stat().st_mode & 0o7777 == 0o600
        # A pin someone made world-writable is refused on open.
        p.chmod(0o666)
        with pytest.raises(PermissionDenied, match=f"{p} is world-writable"):
            open_pinned(p)


def test_a_pin_location_owned_by_another_user_is_refused(pin_root: Path) -> None:
    need_root("chown")
    from sockmap.kernel.maps import HashMap  # noqa: PLC0415
    from sockmap.kernel.pin import open_pinned, pin  # noqa: PLC0415

    theirs = pin_root / "theirs"
    theirs.mkdir(0o755)
    os.chown(theirs, NOBODY, NOBODY)
    with HashMap.new(1) as m:
        with pytest.raises(PermissionDenied, match=f"{theirs} belongs to "):
            pin(m, theirs / "m")
        p = pin(m, pin_root / "m")
    os.chown(p, NOBODY, NOBODY)
    with pytest.raises(PermissionDenied, match=f"{p} belongs to "):
        open_pinned(p)


# -- 3: least privilege ---------------------------------------------------------------


PHASES = textwrap.dedent(
    """
    import json, socket, sys
    from sockmap import privileges, programs
    from sockmap.abi import AttachType, ProgType
    from sockmap.kernel.attach import attach, detach
    from sockmap.kernel.maps import ArrayMap, SockMap
    from sockmap.kernel.programs import load_program

    keep = [k for k in sys.argv[1].split(",") if k]
    smap, arr = SockMap.new(4), ArrayMap.new(1)
    prog = load_program(programs.pass_(), ProgType.SK_SKB)
    lst = socket.create_server(("127.0.0.1", 0))
    privileges.drop(keep)
    out = {}

    def phase(name, f):
        try:
            f()
            out[name] = "ok"
        except OSError as e:
            out[name] = f"errno {e.errno}"

    phase("create a sockmap", lambda: SockMap.new(4).close())
    phase("load an SK_SKB program", lambda: load_program(programs.pass_(), ProgType.SK_SKB).close())
    phase("attach to a held map", lambda: attach(smap, prog, AttachType.SK_SKB_VERDICT))
    c = socket.create_connection(lst.getsockname())
    a, _ = lst.accept()
    phase("insert a socket", lambda: smap.__setitem__(0, a))
    phase("read a counter", lambda: arr[0])
    phase("update a counter", lambda: arr.__setitem__(0, bytes(8)))
    phase("delete a socket", lambda: smap.__delitem__(0))
    phase("detach", lambda: detach(smap, prog, AttachType.SK_SKB_VERDICT))
    print(json.dumps(out))
    """
)


def test_which_capability_each_phase_needs() -> None:
    """Measured, each capability set in a fresh process (a drop cannot be undone)."""
    need_kernel()
    need_root("dropping to a measured capability set")
    import json  # noqa: PLC0415

    table: dict[str, dict[str, str]] = {}
    for keep in ("", "CAP_BPF", "CAP_NET_ADMIN", "CAP_BPF,CAP_NET_ADMIN", "CAP_SYS_ADMIN"):
        run = subprocess.run(
            [sys.executable, "-c", PHASES, keep],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        table[keep or "none"] = json.loads(run.stdout.splitlines()[-1])
    FIGURES["capabilities_by_phase"] = table
    runtime = (
        "attach to a held map",
        "insert a socket",
        "read a counter",
        "update a counter",
        "delete a socket",
        "detach",
    )
    # What the running datapath does needs no capability at all ...
    assert all(table["none"][p] == "ok" for p in runtime), table["none"]
    # ... while setup does (so the drop is real): CAP_BPF alone is not enough for the
    # sockmap and the SK_SKB program (networking types), CAP_BPF + CAP_NET_ADMIN is.
    assert table["none"]["create a sockmap"] == f"errno {errno.EPERM}"
    assert table["none"]["load an SK_SKB program"] == f"errno {errno.EPERM}"
    assert table["CAP_BPF,CAP_NET_ADMIN"]["create a sockmap"] == "ok"
    assert table["CAP_BPF,CAP_NET_ADMIN"]["load an SK_SKB program"] == "ok"
    from sockmap.privileges import RUNTIME_CAPS  # noqa: PLC0415

    assert RUNTIME_CAPS["kernel"] == frozenset()  # what the proxy keeps follows the table


def start_cli(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sockmap.cli.main", "proxy", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().split()


def stop_cli(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        proc.wait(20)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return err


def task_caps(pid: int) -> dict[str, dict[str, str]]:
    """Every thread's capability sets, uid and no_new_privs, from /proc."""
    out = {}
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        fields = {}
        with contextlib.suppress(FileNotFoundError):
            for line in (task / "status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.startswith("Cap") or key in ("Uid", "NoNewPrivs"):
                    fields[key] = value.split()[0] if key == "Uid" else value.strip()
        out[task.name] = fields
    return out


@pytest.mark.parametrize("user", ["", "nobody"])
def test_drop_privileges_keeps_nothing_and_still_splices(
    engine_name: str, user: str, echo: Echo
) -> None:
    if user:
        need_root("--user")
    extra = ["--user", user] if user else []
    proc, ready = start_cli(
        "--listen",
        "127.0.0.1:0",
        "--backend",
        echo.address,
        "--engine",
        engine_name,
        "--metrics",
        "127.0.0.1:0",
        "--drop-privileges",
        *extra,
    )
    err = ""
    try:
        assert ready[:1] == ["ready"], stop_cli(proc)
        host, port = ready[1].rsplit(":", 1)
        data = os.urandom(size(1 << 20, 16 << 20))
        with socket.create_connection((host, int(port)), timeout=20) as c:
            sender = threading.Thread(
                target=lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)), daemon=True
            )
            sender.start()
            got = bytearray()
            while chunk := c.recv(1 << 20):
                got += chunk
            sender.join(10)
        assert len(got) == len(data)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        caps = task_caps(proc.pid)
        metrics = urllib.request.urlopen(f"http://{ready[3]}/metrics", timeout=5).read().decode()
    finally:
        err = stop_cli(proc)
    assert proc.returncode == 0, err
    assert "privileges dropped" in err
    for task, fields in caps.items():
        for key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
            assert int(fields[key], 16) == 0, (task, fields)
        assert fields["NoNewPrivs"] == "1", (task, fields)
        assert fields["Uid"] == (str(NOBODY) if user else "0"), (task, fields)
    assert "sockmap_proxy_connections_relayed_total 0.0" in metrics
    if engine_name == "kernel":  # the kernel's verdict moved the bytes, not Python
        redirects = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("sockmap_program_outcomes_total") and 'outcome="redirect"' in line
        ]
        assert sum(redirects) > 0, metrics
    FIGURES.setdefault("drop_privileges", {})[f"{engine_name}/{user or 'root'}"] = {
        "bytes_echoed": len(got),
        "threads": len(caps),
        "CapEff": sorted({f["CapEff"] for f in caps.values()}),
        "uid": sorted({f["Uid"] for f in caps.values()}),
    }


def test_drop_privileges_to_an_unknown_user_is_a_clear_error(echo: Echo) -> None:
    proc, ready = start_cli(
        "--listen",
        "127.0.0.1:0",
        "--backend",
        echo.address,
        "--engine",
        "userspace",
        "--metrics",
        "off",
        "--drop-privileges",
        "--user",
        "no-such-user-sockmap",
    )
    err = stop_cli(proc)
    assert ready == []
    assert proc.returncode == 2
    assert "no user 'no-such-user-sockmap'" in err


def test_drop_refuses_while_other_threads_run() -> None:
    from sockmap.privileges import PrivilegeError, drop  # noqa: PLC0415

    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    try:
        with pytest.raises(PrivilegeError) as exc:
            drop()
    finally:
        stop.set()
        t.join(5)
    assert exc.value.errno == errno.EBUSY
    assert "capabilities are per thread" in str(exc.value)


def test_user_without_drop_privileges_is_refused() -> None:
    cfg = ProxyConfig(backends=["127.0.0.1:1"], user="nobody")
    with pytest.raises(ValueError, match="--drop-privileges --user"):
        cfg.validate()


# -- 4: the metrics endpoint ------------------------------------------------------------


def test_metrics_bind_localhost_by_default_and_warn_elsewhere(
    tmp_path: Path, echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    import argparse  # noqa: PLC0415

    from sockmap.cli import proxy as cli  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli._config(parser.parse_args(["--backend", echo.address])).metrics == (
        "127.0.0.1:9101"
    )
    toml = tmp_path / "proxy.toml"
    toml.write_text(f'backends = ["{echo.address}"]\n')
    toml.chmod(0o600)
    assert load_config(toml).metrics == "127.0.0.1:9101"
    for where, warns in (("127.0.0.1:0", False), ("[::1]:0", False), ("0.0.0.0:0", True)):
        caplog.clear()
        cfg = ProxyConfig(
            listen=["127.0.0.1:0"], backends=[echo.address], engine="userspace", metrics=where
        )
        with caplog.at_level(logging.WARNING, "sockmap.proxy"), Proxy(cfg) as proxy:
            assert proxy.metrics_address is not None
            assert proxy._metrics_server.socket.getsockname()[0] == proxy.metrics_address[0]
            host = proxy.metrics_address[0]
            text = urllib.request.urlopen(
                "http://{}:{}/metrics".format(
                    "127.0.0.1" if host == "0.0.0.0" else f"[{host}]" if ":" in host else host,
                    proxy.metrics_address[1],
                ),
                timeout=5,
            ).read()
            assert b"sockmap_proxy_connections_accepted_total" in text
        warned = [r.message for r in caplog.records if "reachable from other hosts" in r.message]
        assert bool(warned) == warns, (where, warned)


# -- 5: parser limits ---------------------------------------------------------------------


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def tcp_mem_pages() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            words = line.split()
            return int(words[words.index("mem") + 1])
    return 0


MAX_MESSAGE = 4096
MEMORY_BOUND_MIB = 16
"""The proxy process may grow by this much while attackers push 64 MiB of bytes with
no acceptable message boundary at it (a proxy that buffered them would grow by 64 MiB)."""


def attacker(addr: tuple[str, int], kind: str, flood: int) -> tuple[str, int]:
    """One misbehaving client; returns how the proxy ended it ("reset", "eof" or
    "timeout": still open after 20 s) and how many bytes it got to send."""
    sent = 0
    with socket.create_connection(addr, timeout=20) as c:
        try:
            if kind == "huge":  # a 2**31 length prefix, then bytes that never end it
                c.sendall(struct.pack("!I", 1 << 31))
                block = os.urandom(65536)
                while sent < flood:
                    c.sendall(block)
                    sent += len(block)
            else:  # "stall": half of an acceptable message, then nothing
                c.sendall(struct.pack("!I", MAX_MESSAGE - 8) + bytes(100))
                sent = 104
            while c.recv(65536):
                pass
            return "eof", sent
        except (ConnectionResetError, BrokenPipeError):
            return "reset", sent
        except TimeoutError:
            return "timeout", sent


def test_oversized_and_endless_messages_reset_the_client_within_a_memory_bound(
    engine_name: str, echo: Echo
) -> None:
    cfg = ProxyConfig(
        listen=["127.0.0.1:0"],
        backends=[echo.address],
        engine=engine_name,  # type: ignore[arg-type]
        mode="balance",
        framing="length:4:big:4",
        max_message=MAX_MESSAGE,
        message_timeout=1.0,
        idle_timeout=5.0,  # reclaims a group whose client's reset was missed (counted)
    )
    attackers = size(16, 64)
    flood = 1 << 20
    with Proxy(cfg) as proxy:
        addr = proxy.addresses[0]
        # A well-behaved client first: the framing works.
        body = b"fine" * 100
        with socket.create_connection(addr, timeout=10) as c:
            c.sendall(struct.pack("!I", len(body)) + body)
            want = 4 + len(body)
            got = b""
            while len(got) < want:
                got += c.recv(want - len(got))
            assert got == struct.pack("!I", len(body)) + body
        rss0, mem0 = rss_kib(), tcp_mem_pages()
        results: list[str] = []
        sent: list[int] = []
        t0 = time.monotonic()

        def run(i: int) -> None:
            outcome, n = attacker(addr, "huge" if i % 4 else "stall", flood)
            results.append(outcome)
            sent.append(n)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(attackers)]
        for t in threads:
            t.start()
        peak = rss0
        while any(t.is_alive() for t in threads) and time.monotonic() - t0 < 60:
            peak = max(peak, rss_kib())
            time.sleep(0.02)
        for t in threads:
            t.join(30)
        elapsed = time.monotonic() - t0
        assert wait_until(lambda: proxy.active == 0, timeout=20)
        rss1, mem1 = rss_kib(), tcp_mem_pages()
        bal = proxy.balancer
        assert bal is not None
        stats = {
            "parser_errors": bal.stats.parser_errors,
            "timeouts": bal.stats.message_timeouts,
            "idle_closed": bal.stats.idle_closed,
        }
    FIGURES.setdefault("parser_limits", {})[engine_name] = {
        "attackers": attackers,
        "bytes_offered_per_huge_attacker": flood,
        "bytes_sent_before_reset": {"max": max(sent), "total": sum(sent)},
        "outcomes": {k: results.count(k) for k in sorted(set(results))},
        "balancer": stats,
        "rss_kib_before": rss0,
        "rss_kib_peak": peak,
        "rss_kib_after": rss1,
        "tcp_mem_pages_before": mem0,
        "tcp_mem_pages_after": mem1,
        "seconds": round(elapsed, 2),
        "bound_mib": MEMORY_BOUND_MIB,
    }
    assert results.count("reset") == attackers, results
    assert peak - rss0 < MEMORY_BOUND_MIB * 1024, (rss0, peak)
    assert stats["idle_closed"] == 0, stats
    n_stall = len(range(0, attackers, 4))
    assert stats["parser_errors"] == attackers - n_stall, stats
    assert stats["timeouts"] == n_stall, stats


def test_zz_record() -> None:
    """Writes the figures the tests above gathered (runs last in file order)."""
    record("security", FIGURES)
