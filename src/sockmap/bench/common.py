"""What the workloads share: the load generator's processes, pinning, and the paths'
proxies (all in this process)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockmap.bench.cpu import CpuSample, cpu_sample
from sockmap.bench.native import NATIVE_ROLES, fastend
from sockmap.bench.proxies import EXTERNAL, PROXY_PATHS, external_proxy
from sockmap.datapath.splice import cookie_of

__all__ = [
    "LocalAccel",
    "PathRun",
    "Proxy",
    "RawPair",
    "endpoint",
    "make_splicer",
    "pinned",
    "readline",
    "run_over_path",
]


def endpoint(
    role: str,
    nbytes: int,
    conns: int,
    cpus: str,
    port: int = 0,
    *extra: str,
    cgroup: Path | None = None,
) -> subprocess.Popen[str]:
    """The load generator's ``role`` end in its own process (inside ``cgroup`` if given:
    it moves itself there before it opens a socket)."""
    native = fastend() if role in NATIVE_ROLES else None
    head = [str(native)] if native is not None else [sys.executable, "-m", "sockmap.bench.endpoint"]
    cmd = [
        *head,
        role,
        "--bytes",
        str(nbytes),
        "--conns",
        str(conns),
        "--cpus",
        cpus,
        "--port",
        str(port),
        *extra,
    ]
    if cgroup is not None:
        cmd = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", *cmd]
    return subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed arguments
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )


@contextlib.contextmanager
def pinned(cpus: str) -> Iterator[None]:
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


class Proxy:
    """Accepts ``conns`` clients on loopback, connects each to the sink, joins them by ``join``."""

    def __init__(
        self, sink_port: int, conns: int, join: Callable[[socket.socket, socket.socket], None]
    ) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=conns)
        self.port = self.listener.getsockname()[1]
        self.error: BaseException | None = None

        def accept() -> None:
            try:
                for _ in range(conns):
                    client, _ = self.listener.accept()
                    backend = socket.create_connection(("127.0.0.1", sink_port))
                    join(client, backend)
            except BaseException as exc:  # noqa: BLE001 - reported by the trial
                self.error = exc

        self.thread = threading.Thread(target=accept, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


class LocalAccel:
    """The local-acceleration path: both ends run in a child cgroup whose sock_ops program
    puts each connection's two sockets in a SOCKHASH, and an SK_MSG verdict hands every
    send straight to the peer's receive queue (no proxy, no TCP for the data)."""

    def __init__(self) -> None:
        from sockmap import programs  # noqa: PLC0415
        from sockmap.kernel.cgroup import cgroup2_mount  # noqa: PLC0415
        from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415

        self.cgroup = cgroup2_mount() / f"sockmap-bench-{os.getpid()}-{id(self)}"
        self.cgroup.mkdir()
        self.engine = KernelEngine()
        try:
            self.map = self.engine.sockhash(4096, key_size=16)
            self.engine.attach(self.map, msg_verdict=programs.redirect_to_peer(self.map))
            self.engine.attach_cgroup(self.cgroup, programs.add_established(self.map))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Detach and release (the cgroup itself goes in :meth:`remove`, once empty)."""
        self.engine.close()

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.cgroup.rmdir()


class RawPair:
    """The minimal kernel path: a sockmap, a verdict redirecting by a cookie -> key table."""

    def __init__(self, conns: int) -> None:
        from sockmap import programs  # noqa: PLC0415
        from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415

        self.engine = KernelEngine()
        self.smap = self.engine.sockmap(2 * conns)
        self.peers = self.engine.hash(2 * conns, key_size=8, value_size=4)
        self.engine.attach(self.smap, verdict=programs.redirect_peer(self.smap, self.peers))
        self.socks: list[socket.socket] = []

    def join(self, client: socket.socket, backend: socket.socket) -> None:
        from sockmap.datapath.tcp import kick  # noqa: PLC0415

        key = len(self.socks)
        self.peers[cookie_of(client)] = (key + 1).to_bytes(4, "little")
        self.peers[cookie_of(backend)] = key.to_bytes(4, "little")  # answers go back
        self.smap[key + 1] = backend
        self.smap[key] = client
        self.socks += [client, backend]
        kick(client)
        kick(backend)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.engine.close()


def make_splicer(path: str, conns: int) -> tuple[Any, Callable[[], None]]:
    if path == "userspace":
        from sockmap.userspace.engine import UserspaceEngine  # noqa: PLC0415
        from sockmap.userspace.splice import UserspaceSplicer  # noqa: PLC0415

        ueng = UserspaceEngine()
        usp = UserspaceSplicer(ueng, conns, "verdict")

        def close_userspace() -> None:
            usp.close()
            ueng.close()

        return usp, close_userspace
    from sockmap.datapath.bounded import BoundedSplicer  # noqa: PLC0415
    from sockmap.datapath.splice import KernelSplicer  # noqa: PLC0415
    from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415

    keng = KernelEngine()
    cls = BoundedSplicer if path == "bounded" else KernelSplicer
    ksp = cls(keng, conns, "verdict")

    def close_kernel() -> None:
        ksp.close()
        keng.close()

    return ksp, close_kernel


def start_path(
    path: str, backend_port: int, conns: int, cpu: str, closers: list[Callable[[], None]]
) -> tuple[int, Proxy | None, Any]:
    """Put ``path`` between the load and ``backend_port``: the port to connect to, the
    in-process acceptor (None where the path has its own process, or none) and the
    splicer (None but for our engines). Undoing it is added to ``closers``."""
    proxy: Proxy | None = None
    splicer: Any = None
    if path == "raw":
        raw = RawPair(conns)
        closers.append(raw.close)
        proxy = Proxy(backend_port, conns, raw.join)
    elif path in PROXY_PATHS:
        return _start_proxy(path, backend_port, cpu, closers), None, None
    elif path not in ("direct", "accel"):
        splicer, close = make_splicer(path, conns)
        closers.append(close)
        proxy = Proxy(backend_port, conns, splicer.splice)
    if proxy is None:
        return backend_port, None, None
    closers.insert(0, proxy.close)
    return proxy.port, proxy, splicer


def _start_proxy(path: str, backend_port: int, cpu: str, closers: list[Callable[[], None]]) -> int:
    """Start one of :mod:`sockmap.bench.proxies`' proxies pinned to ``cpu``; its port.
    Stopping it is added to ``closers``."""
    if path in EXTERNAL:
        cm = external_proxy(path, backend_port, cpu)
        port = cm.__enter__()

        def leave() -> None:
            cm.__exit__(None, None, None)

        closers.insert(0, leave)
        return port
    cmd = ["taskset", "-c", cpu, sys.executable, "-m", "sockmap.bench.proxies", path]
    cmd += ["--backend", f"127.0.0.1:{backend_port}"]
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )

    def stop() -> None:
        proc.kill()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()

    closers.insert(0, stop)
    words = readline(proc, 15).split()
    if not words or words[0] != "ready":
        raise RuntimeError(f"{path}: the proxy did not start")
    return int(words[1])


def readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next stdout line of ``proc``, or TimeoutError after ``timeout`` seconds."""
    box: list[str] = []
    assert proc.stdout is not None
    out = proc.stdout
    t = threading.Thread(target=lambda: box.append(out.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not box or not box[0]:
        raise TimeoutError(f"no result within {timeout:.0f} s")
    return box[0]


@dataclass
class PathRun:
    """What one trial over a path gave: the two ends' JSON lines, CPU used meanwhile,
    and the splicer's counters."""

    server: dict[str, Any]
    client: dict[str, Any]
    cpu: CpuSample
    extra: dict[str, int]


def run_over_path(
    path: str,
    placement: Any,  # noqa: ANN401 - stream.Placement (defined there)
    conns: int,
    timeout: float,
    server: tuple[str, int, list[str]],
    client: tuple[str, int, list[str]],
    *,
    wait_for: str = "server",
    wait_accept: bool = True,
) -> PathRun:
    """Start the server end, the path's proxy (none for ``direct``) and the client end,
    measure CPU from the client's "go" until ``wait_for``'s end reports, and stop all."""
    s_role, s_bytes, s_args = server
    c_role, c_bytes, c_args = client
    accel = LocalAccel() if path == "accel" else None
    cgroup = accel.cgroup if accel is not None else None
    srv = endpoint(s_role, s_bytes, conns, placement.load, 0, *s_args, cgroup=cgroup)
    closers: list[Callable[[], None]] = [accel.close] if accel is not None else []
    cli: subprocess.Popen[str] | None = None
    extra: dict[str, int] = {}
    try:
        assert srv.stdout is not None
        srv_port = int(srv.stdout.readline())
        with pinned(placement.proxy):
            port, proxy, splicer = start_path(path, srv_port, conns, placement.proxy, closers)
            cli = endpoint(c_role, c_bytes, conns, placement.load, port, *c_args, cgroup=cgroup)
            assert cli.stdout is not None
            assert cli.stdin is not None
            if cli.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{path}: the client could not connect")
            if proxy is not None and wait_accept:
                proxy.thread.join(timeout)
                if proxy.error is not None:
                    raise RuntimeError(f"{path}: the proxy failed: {proxy.error}")
            before = cpu_sample()
            cli.stdin.write("go\n")
            cli.stdin.flush()
            first = readline(srv if wait_for == "server" else cli, timeout)
            after = cpu_sample()
            for name in ("holds", "user_bytes"):
                if hasattr(splicer, name):
                    extra[name] = int(getattr(splicer, name))
        other = srv if wait_for == "client" else cli
        results = {wait_for: json.loads(first)}
        if wait_for == "client":
            cli.stdin.close()
        with contextlib.suppress(TimeoutError, ValueError):
            results["client" if wait_for == "server" else "server"] = json.loads(readline(other, 5))
        bad = int(results.get("server", {}).get("corrupt_at", -1))
        if bad >= 0:
            raise RuntimeError(
                f"{path}: data corrupted: the sink's byte at offset {bad} of a connection is "
                "not what the source sent there (lost, repeated or reordered bytes)"
            )
        return PathRun(results.get("server", {}), results.get("client", {}), after - before, extra)
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()
        for proc in (cli, srv):
            if proc is not None:
                proc.kill()
                proc.wait(5)
        if accel is not None:
            accel.remove()
