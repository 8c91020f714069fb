"""Resource hygiene of ``sockmap proxy`` over connection churn.

Thousands of short connections (connect, a few bytes echoed, close: most with a FIN,
some half-closed first, some reset) through the proxy, in splice and balance mode, on
both engines. Measured after a warm-up and again at the end, in this process (the
proxy runs in it): open fds, BPF objects (the proxy's own maps and programs, the bpf
fds this process holds, and the host's totals), threads, RSS and the kernel's TCP
socket counters. Nothing may grow but RSS (bounded) and the kernel's TIME_WAIT sockets
(the kernel's own, bounded by tcp_max_tw_buckets: reported, not asserted); after the
proxy stops, every BPF object it made is gone.

Normal mode: 1,000 connections per case; long mode (SOCKMAP_LONG=1): 10,000, and the
figures go to reliability/results/resources.json.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from report import LONG, record, size

from netutil import wait_until
from sockmap.abi import Cmd
from sockmap.errors import BpfError
from sockmap.kernel.features import bpf_access
from sockmap.kernel.info import iter_map_ids, iter_prog_ids, map_info, prog_info
from sockmap.kernel.maps import Map
from sockmap.kernel.syscall import bpf
from sockmap.proxy import Proxy, ProxyConfig

CONNS = size(1_000, 10_000)
WARMUP = 200
CLIENTS = 4
"""Client threads churning at once (each one connection at a time)."""
FD_SLACK = 4
"""Open fds at the end may exceed the start by this much (a lazily opened file, a
selector's epoll fd); a leak of one fd per connection is thousands."""
RSS_BOUND_MIB = 24
"""RSS may grow by this much over the churn (allocator arenas and caches settle in the
first thousands; a per-connection leak of 4 KiB is 40 MiB over 10,000)."""
SETTLE = 30.0
IDLE_TIMEOUT = 10.0
"""The proxy's idle_timeout here: a connection the proxy failed to close when its client
did is reclaimed by it within SETTLE (and counted: it must not happen)."""

FIGURES: dict[str, Any] = {}


class EchoBackends:
    """Echo servers on one selector thread: whatever arrives goes back; EOF is answered
    with close (a FIN) once everything is echoed; a reset closes the connection."""

    def __init__(self, n: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.listeners = [socket.create_server(("127.0.0.1", 0), backlog=1024) for _ in range(n)]
        for lst in self.listeners:
            lst.setblocking(False)
            self.sel.register(lst, selectors.EVENT_READ, None)
        self.pending: dict[socket.socket, bytearray] = {}
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.thread = threading.Thread(target=self._run, name="echo-backends", daemon=True)
        self.thread.start()

    @property
    def addresses(self) -> list[str]:
        return ["{}:{}".format(*s.getsockname()) for s in self.listeners]

    def _drop(self, conn: socket.socket) -> None:
        self.sel.unregister(conn)
        self.pending.pop(conn, None)
        conn.close()

    def _run(self) -> None:
        while not self._stop:
            for key, mask in self.sel.select(0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data == "wake":
                    return
                if sock in self.listeners:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = sock.accept()
                        conn.setblocking(False)
                        self.pending[conn] = bytearray()
                        self.sel.register(conn, selectors.EVENT_READ, "conn")
                    continue
                try:
                    if mask & selectors.EVENT_READ:
                        data = sock.recv(65536)
                        if not data:
                            out = self.pending[sock]
                            if out:
                                sock.setblocking(True)
                                sock.settimeout(5)
                                sock.sendall(out)
                            self._drop(sock)
                            continue
                        self.pending[sock] += data
                    out = self.pending[sock]
                    if out:
                        n = sock.send(out)
                        del out[:n]
                    want = selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0)
                    if key.events != want:
                        self.sel.modify(sock, want, "conn")
                except OSError:
                    self._drop(sock)

    def close(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self.thread.join(10)
        for conn in list(self.pending):
            conn.close()
        for s in (*self.listeners, self._wake_r, self._wake_w):
            s.close()
        self.sel.close()


# -- measurements -------------------------------------------------------------------


def fd_kinds() -> dict[str, int]:
    """This process's open fds by kind: socket, bpf-map, bpf-prog, bpf_link, file..."""
    out: dict[str, int] = {}
    for entry in Path("/proc/self/fd").iterdir():
        try:
            target = str(entry.readlink())
        except OSError:
            continue  # the fd listing the directory itself
        if target.startswith("socket:"):
            kind = "socket"
        elif target.startswith("anon_inode:"):
            kind = target.removeprefix("anon_inode:").strip("[]")
        elif target.startswith("pipe:"):
            kind = "pipe"
        else:
            kind = "file"
        out[kind] = out.get(kind, 0) + 1
    return out


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def sockstat() -> dict[str, int]:
    """/proc/net/sockstat's TCP line (this network namespace, every process in it)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            words = line.split()[1:]
            return {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}
    return {}


def host_bpf_counts() -> dict[str, int]:
    if not bpf_access()[0]:
        return {}
    links = 0
    start = 0
    while True:  # BPF_LINK_GET_NEXT_ID: info.py iterates maps and programs only
        try:
            _, attr = bpf(Cmd.LINK_GET_NEXT_ID, "II", start, 0, what="list link ids")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                break
            raise
        start = struct.unpack_from("<I", attr, 4)[0]
        links += 1
    return {
        "maps": sum(1 for _ in iter_map_ids()),
        "programs": sum(1 for _ in iter_prog_ids()),
        "links": links,
    }


def proxy_bpf_ids(proxy: Proxy) -> tuple[set[int], set[int]]:
    """(map ids, program ids) of what the proxy's engine made (none: userspace)."""
    owned = getattr(proxy.engine, "_owned", None)
    if owned is None:
        return set(), set()
    maps = {map_info(o.fd).id for o in owned if isinstance(o, Map) and not o.closed}
    progs = {prog_info(o.fd).id for o in owned if not isinstance(o, Map) and not o.closed}
    return maps, progs


def snapshot(proxy: Proxy | None) -> dict[str, Any]:
    kinds = fd_kinds()
    snap: dict[str, Any] = {
        "fds": sum(kinds.values()),
        "fd_kinds": kinds,
        "threads": threading.active_count(),
        "thread_names": sorted(t.name for t in threading.enumerate()),
        "tasks": len(list(Path("/proc/self/task").iterdir())),
        "rss_kib": status_kib("VmRSS"),
        "sockstat_tcp": sockstat(),
        "host_bpf": host_bpf_counts(),
    }
    if proxy is not None:
        maps, progs = proxy_bpf_ids(proxy)
        snap["proxy_maps"] = sorted(maps)
        snap["proxy_programs"] = sorted(progs)
        snap["active"] = proxy.active
    return snap


# -- churn --------------------------------------------------------------------------


@dataclass
class Churn:
    fin: int = 0
    half: int = 0
    rst: int = 0
    failures: int = 0
    first_failure: str = ""


def one_connection(addr: tuple[str, int], i: int, framed: bool, churn: Churn) -> None:
    body = (b"%08d" % i) * (1 + i % 6)
    payload = struct.pack("!H", len(body)) + body if framed else body
    kind = ("fin", "fin", "fin", "fin", "fin", "fin", "half", "half", "half", "rst")[i % 10]
    try:
        with socket.create_connection(addr, timeout=10) as c:
            c.sendall(payload)
            if kind == "half":
                c.shutdown(socket.SHUT_WR)
            got = b""
            while len(got) < len(payload):
                chunk = c.recv(65536)
                if not chunk:
                    break
                got += chunk
            if got != payload:
                raise AssertionError(f"connection {i} ({kind}): sent {payload!r}, got {got!r}")
            if kind == "half":
                rest = c.recv(65536)  # the backend's FIN, passed on
                if rest:
                    raise AssertionError(f"connection {i}: {rest!r} after the echo")
            elif kind == "rst":
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        setattr(churn, kind, getattr(churn, kind) + 1)
    except (OSError, AssertionError) as exc:
        churn.failures += 1
        churn.first_failure = churn.first_failure or f"{type(exc).__name__}: {exc}"


def churn(addr: tuple[str, int], start: int, count: int, framed: bool) -> Churn:
    result = Churn()

    def worker(k: int) -> None:
        for i in range(start + k, start + count, CLIENTS):
            one_connection(addr, i, framed, result)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return result


NATIVE_AT_START: dict[str, int] = {}
SETTLE_BLOCKER: dict[str, str] = {}


def native_threads() -> int:
    """Threads of this process that Python's threading module does not know of."""
    return len(list(Path("/proc/self/task").iterdir())) - threading.active_count()


def settle(proxy: Proxy, backends: EchoBackends, threads: int | None = None) -> bool:
    """Every connection closed (the backends' ends too: the proxy closed its side) and
    the proxy's helper threads gone (bounded wait)."""

    def quiet() -> bool:
        if proxy.active or backends.pending:
            SETTLE_BLOCKER["why"] = "connections open"
            return False
        busy = [t for t in threading.enumerate() if t.name in ("proxy-connect", "proxy-relay")]
        if busy or (threads is not None and threading.active_count() > threads):
            SETTLE_BLOCKER["why"] = f"threads {sorted(t.name for t in threading.enumerate())}"
            return False
        SETTLE_BLOCKER["why"] = (
            f"{native_threads()} threads unknown to Python, {NATIVE_AT_START.get('n', 0)} "
            "at the start"
        )
        # A thread Python has let go of may take a moment to leave /proc/self/task.
        # Threads Python does not know of (started by C code in an earlier test of the
        # same session) are counted as they were when the test began.
        return native_threads() <= NATIVE_AT_START.get("n", 0)

    return wait_until(quiet, timeout=SETTLE, step=0.05)


# -- the test -----------------------------------------------------------------------


@pytest.fixture
def backends() -> Iterator[EchoBackends]:
    b = EchoBackends(2)
    yield b
    b.close()


@pytest.mark.parametrize("mode", ["splice", "balance"])
def test_churn_leaves_nothing_behind(engine_name: str, mode: str, backends: EchoBackends) -> None:
    framed = mode == "balance"
    NATIVE_AT_START["n"] = max(native_threads(), 0)
    before_proxy = snapshot(None)
    cfg = ProxyConfig(
        listen=["127.0.0.1:0"],
        backends=backends.addresses,
        engine=engine_name,  # type: ignore[arg-type]
        mode=mode,  # type: ignore[arg-type]
        framing="dns" if framed else "none",
        max_pairs=256,
        drain_timeout=5,
        idle_timeout=IDLE_TIMEOUT,
    )
    proxy = Proxy(cfg).start()
    try:
        addr = proxy.addresses[0]
        warm = churn(addr, 0, WARMUP, framed)
        assert warm.failures == 0, warm.first_failure
        assert settle(proxy, backends), (
            f"{proxy.active} clients, {len(backends.pending)} backend connections open "
            f"after the warm-up; waiting for: {SETTLE_BLOCKER.get('why')}"
        )
        start = snapshot(proxy)
        main = churn(addr, WARMUP, CONNS, framed)
        assert settle(proxy, backends, start["threads"]), (
            f"{proxy.active} clients, {len(backends.pending)} backend connections open, threads "
            f"{[t.name for t in threading.enumerate()]} after the churn; waiting for: "
            f"{SETTLE_BLOCKER.get('why')}"
        )
        end = snapshot(proxy)
        made = (set(start.get("proxy_maps", ())), set(start.get("proxy_programs", ())))
        stats = {
            "accepted": proxy.stats.accepted,
            "spliced": proxy.stats.spliced,
            "relayed": proxy.stats.relayed,
            "clients_refused": proxy.stats.clients_refused,
            "over_limit": proxy.stats.over_limit,
            "idle_closed": proxy.splicer.stats.idle_closed,
        }
    finally:
        proxy.stop(drain=True)
    gone = wait_until(
        lambda: not (made[0] & set(iter_map_ids()) or made[1] & set(iter_prog_ids()))
        if engine_name == "kernel"
        else True,
        timeout=SETTLE,
        step=0.05,
    )
    after_stop = snapshot(None)
    case = f"{engine_name}/{mode}"
    FIGURES[case] = {
        "connections": CONNS,
        "warmup": WARMUP,
        "outcomes": {"fin": main.fin, "half_close": main.half, "reset": main.rst},
        "failures": main.failures,
        "proxy_stats": stats,
        "before_proxy": before_proxy,
        "start": start,
        "end": end,
        "after_stop": after_stop,
        "growth": {
            "fds": end["fds"] - start["fds"],
            "threads": end["threads"] - start["threads"],
            "rss_kib": end["rss_kib"] - start["rss_kib"],
            "tcp_inuse": end["sockstat_tcp"].get("inuse", 0)
            - start["sockstat_tcp"].get("inuse", 0),
            "tcp_mem_pages": end["sockstat_tcp"].get("mem", 0)
            - start["sockstat_tcp"].get("mem", 0),
            "tcp_tw": end["sockstat_tcp"].get("tw", 0) - start["sockstat_tcp"].get("tw", 0),
        },
        "bounds": {"fd_slack": FD_SLACK, "rss_mib": RSS_BOUND_MIB},
        "proxy_objects_gone_after_stop": gone,
    }
    record("resources", {"long": LONG, "cases": FIGURES})

    assert main.failures == 0, f"{main.failures} of {CONNS} failed; first: {main.first_failure}"
    assert main.fin + main.half + main.rst == CONNS
    assert stats["spliced"] + stats["relayed"] == WARMUP + CONNS, stats
    # fds: back to where they were, the proxy's own BPF fds exactly.
    assert end["fds"] <= start["fds"] + FD_SLACK, (start["fd_kinds"], end["fd_kinds"])
    assert end["fd_kinds"].get("socket", 0) <= start["fd_kinds"].get("socket", 0)
    for kind in ("bpf-map", "bpf-prog", "bpf_link"):
        assert end["fd_kinds"].get(kind, 0) == start["fd_kinds"].get(kind, 0), kind
    # BPF objects: the proxy made no new one and lost none.
    assert end.get("proxy_maps") == start.get("proxy_maps")
    assert end.get("proxy_programs") == start.get("proxy_programs")
    # threads: the same number (settle() waited for the transient ones).
    assert end["threads"] == start["threads"], (start["thread_names"], end["thread_names"])
    assert end["tasks"] == start["tasks"]
    # RSS: bounded growth.
    assert end["rss_kib"] - start["rss_kib"] < RSS_BOUND_MIB * 1024
    # After stop: every BPF object the proxy made is gone, and so are its fds.
    assert gone, f"maps {sorted(made[0])} / programs {sorted(made[1])} still exist after stop"
    for kind in ("bpf-map", "bpf-prog", "bpf_link", "socket"):
        assert after_stop["fd_kinds"].get(kind, 0) <= before_proxy["fd_kinds"].get(kind, 0), (
            kind,
            before_proxy["fd_kinds"],
            after_stop["fd_kinds"],
        )
    if engine_name == "kernel":
        assert made[0], "the proxy made no map to check"
        assert made[1], "the proxy made no program to check"
    # Every connection was closed because its client or backend closed, none by the idle
    # timeout (which reclaimed what the proxy missed, so the figures above still count).
    assert stats["idle_closed"] == 0, stats
