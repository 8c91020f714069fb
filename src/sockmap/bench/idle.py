"""Workload (f): many idle connections through each path -- memory per connection, the
control plane's CPU while nothing moves, and how fast connections are set up.

A process may hold only so many descriptors (``ulimit -Hn``; raising the hard limit
needs CAP_SYS_RESOURCE). A proxied connection costs the proxy 2 (kernel paths) or 4
(the userspace engine keeps its own duplicate of each socket), and the load process
holds both ends of the direct path, 2 per connection. When one process cannot hold
them all, the connections are split into *shards*: each shard is a proxy process with
its own load process and its own share of the connections, like the workers of a
multi-process proxy. Every path of one connection count gets the same number of shards.

Memory is the host's, taken while the connections open: the kernel's slab objects in
use (sockets, files, epoll items, psocks: /proc/slabinfo) plus the resident memory of
every process of the trial (MemAvailable is kept beside it, but it misses slab pages
an earlier trial freed and this one reuses). Compare with the ``direct`` row of the
same run, which has the load's own sockets only. The proxy processes' own RSS growth
is reported too. Idle CPU is the proxy processes' (all shards together).

Run as ``python -m sockmap.bench.idle PATH CONNS LOAD_CPUS PROXY_CPUS``, a module is one
shard; it speaks a line protocol on stdin/stdout with the harness.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sockmap.bench.common import Proxy, endpoint, pinned, readline, start_path
from sockmap.bench.cpu import cpu_sample
from sockmap.bench.endpoint import allow_files
from sockmap.bench.stream import Placement

__all__ = ["FDS_PER_CONN", "IdleTrial", "hard_fd_limit", "run_idle", "shards_for"]

IDLE_SECONDS = 3.0
FDS_PER_CONN = {
    "direct": 0,
    "raw": 2,
    "kernel": 2,
    "bounded": 2,
    "userspace": 4,
    "asyncio": 2,
    "uvloop": 2,
    "splice": 6,  # a pipe per direction
    "socat": 0,  # a process per connection, 2 each
    "haproxy": 2,
}
"""Descriptors the proxy process holds per connection, on each path."""
LOAD_FDS_PER_CONN = 2
"""The load process holds the client and the backend end of every connection."""
FD_RESERVE = 512
"""Descriptors left for everything else in a process (maps, programs, pipes, libraries)."""


@dataclass
class IdleTrial:
    path: str
    conns: int
    setup_seconds: float
    host_bytes: int
    """Host memory the connections took: the kernel's slab objects in use (sockets,
    files, epoll items, psocks, skbs: /proc/slabinfo) plus the resident memory of every
    process of the trial, loads included; where /proc/slabinfo cannot be read (not
    root), MemAvailable before - after."""
    rss_bytes: int
    """Growth of the proxy processes' resident memory (their children's too: socat's)."""
    idle_proxy_cpu: float
    """CPU seconds per second the proxy processes used while every connection was idle."""
    idle_busy_cpu: float
    """Busy CPU seconds per second of the whole machine meanwhile."""
    shards: int = 1
    """Proxy processes the connections were split over (each with its own load process)."""
    memavail_bytes: int = 0
    """MemAvailable before - after: coarser (slab pages freed by an earlier trial are
    reused without showing here), kept for comparison."""

    @property
    def host_per_conn(self) -> float:
        return self.host_bytes / self.conns


def hard_fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def shards_for(paths: Iterable[str], conns: int, hard: int | None = None) -> int:
    """How many shards ``conns`` connections need so that no process of any of ``paths``
    goes over the hard descriptor limit."""
    budget = (hard if hard is not None else hard_fd_limit()) - FD_RESERVE
    if budget <= 0:
        raise OSError(24, f"the descriptor limit ({hard}) leaves no room for connections")
    per_conn = max([LOAD_FDS_PER_CONN, *(FDS_PER_CONN.get(p, 4) for p in paths)])
    return max(1, math.ceil(per_conn * conns / budget))


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _slab_bytes() -> int | None:
    """Bytes of kernel slab objects in use (active objects x object size), or None where
    /proc/slabinfo is not readable."""
    try:
        lines = Path("/proc/slabinfo").read_text().splitlines()[2:]
    except OSError:
        return None
    total = 0
    for line in lines:
        f = line.split()
        total += int(f[1]) * int(f[3])
    return total


def _host_now(pids: set[int]) -> tuple[int | None, int, int]:
    """(slab bytes in use, resident bytes of the trial's processes, MemAvailable)."""
    return _slab_bytes(), sum(rss for _, _, rss in _tree(pids, set())), _mem_available()


def _processes() -> dict[int, tuple[int, float, int]]:
    """Every process: pid -> (parent pid, CPU seconds so far, resident bytes)."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            f = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            # after the name: state ppid ... utime(12) stime(13) ... rss(22), 0-based here
            found[int(entry.name)] = (
                int(f[1]),
                (int(f[11]) + int(f[12])) / tick,
                int(f[21]) * page,
            )
    return found


def _tree(roots: set[int], skip: set[int]) -> list[tuple[int, float, int]]:
    """The processes of the trees under ``roots``, without the trees under ``skip``."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo, out = [r for r in roots if r in procs], []
    while todo:
        pid = todo.pop()
        if pid in skip:
            continue
        out.append(procs[pid])
        todo += children.get(pid, [])
    return out


def _tree_cpu(roots: set[int], skip: set[int]) -> float:
    """CPU seconds so far of the proxy processes: the shards and what they started (an
    external proxy and its children, socat forks one per connection), loads aside."""
    return sum(cpu for _, cpu, _ in _tree(roots, skip))


def _tree_rss(root: int, skip: set[int]) -> int:
    return sum(rss for _, _, rss in _tree({root}, skip))


def _split(conns: int, shards: int) -> list[int]:
    return [conns // shards + (1 if i < conns % shards else 0) for i in range(shards)]


def run_idle(
    path: str, placement: Placement, conns: int, timeout: float, shards: int = 1
) -> IdleTrial:
    """Open ``conns`` connections over ``path`` in ``shards`` proxy processes, check a byte
    crosses each, idle, measure."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for n in _split(conns, shards):
            cmd = [sys.executable, "-m", "sockmap.bench.idle", path, str(n), placement.load]
            cmd += [placement.proxy, "--timeout", str(timeout)]
            procs.append(
                subprocess.Popen(  # noqa: S603 - our own interpreter and module
                    cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
                )
            )
        for p in procs:
            _expect(p, "listening", timeout, path)
        pids = {p.pid for p in procs}
        host0 = _host_now(pids)  # every process and proxy up, no connection yet
        t0 = time.perf_counter()
        for p in procs:
            _say(p, "go")
        ready = [_expect(p, "ready", timeout, path) for p in procs]
        setup = time.perf_counter() - t0
        host1 = _host_now(pids)
        rss = sum(int(words[1]) for words in ready)
        loads = {int(words[2]) for words in ready}
        memavail = host0[2] - host1[2]
        if host0[0] is None or host1[0] is None:
            host = memavail
        else:
            host = host1[0] - host0[0] + host1[1] - host0[1]
        before, pcpu0 = cpu_sample(), _tree_cpu(pids, loads)
        time.sleep(IDLE_SECONDS)
        used, pcpu1 = cpu_sample() - before, _tree_cpu(pids, loads)
        for p in procs:
            _say(p, "quit")
        for p in procs:
            _expect(p, "done", timeout, path)
            p.wait(timeout)
        return IdleTrial(
            path,
            conns,
            setup,
            host,
            rss,
            (pcpu1 - pcpu0) / IDLE_SECONDS,
            used.busy / IDLE_SECONDS,
            shards,
            memavail,
        )
    finally:
        _stop_shards(procs)


def _stop_shards(procs: list[subprocess.Popen[str]]) -> None:
    """SIGTERM first: a shard then stops what it started (an external proxy, its load)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _say(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _expect(proc: subprocess.Popen[str], word: str, timeout: float, path: str) -> list[str]:
    """The shard's next line, which must start with ``word`` (else its error is raised)."""
    try:
        line = readline(proc, timeout).split()
    except TimeoutError as exc:
        raise TimeoutError(f"{path}: a shard did not say {word!r}: {exc}") from exc
    if not line or line[0] != word:
        raise RuntimeError(f"{path}: shard {proc.pid}: {' '.join(line) or 'ended'}")
    return line


# -- one shard (a child process) ------------------------------------------------------


def _tell(line: str) -> None:
    """A line of the protocol to the harness."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _shard(path: str, conns: int, load_cpus: str, proxy_cpus: str, timeout: float) -> None:
    allow_files(FDS_PER_CONN.get(path, 4) * conns + FD_RESERVE)
    load = endpoint("idle", 0, conns, load_cpus)
    closers: list[Callable[[], None]] = []
    proxy: Proxy | None = None
    try:
        assert load.stdout is not None
        backend_port = int(readline(load, timeout))
        with pinned(proxy_cpus):
            port, proxy, _ = start_path(path, backend_port, conns, proxy_cpus, closers)
            rss0 = _tree_rss(os.getpid(), {load.pid})
            _tell("listening")
            if sys.stdin.readline().strip() != "go":
                return
            _say(load, str(port))
            _wait_ready(load, proxy, timeout)
            _tell(f"ready {_tree_rss(os.getpid(), {load.pid}) - rss0} {load.pid}")
            sys.stdin.readline()
            _say(load, "quit")
            line = readline(load, timeout).strip()
        if '"bytes": ' + str(conns) not in line:
            raise RuntimeError(f"not every connection carried its byte: {line}")
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()
        load.kill()
        load.wait(5)
    _tell("done")  # everything this shard started is stopped


def _wait_ready(load: subprocess.Popen[str], proxy: Proxy | None, timeout: float) -> None:
    """Wait for the load's ``ready``; a proxy that failed (EMFILE, say) ends the wait at
    once with its error instead of leaving the load waiting for connections forever."""
    lines: queue.Queue[str] = queue.Queue()
    assert load.stdout is not None
    out = load.stdout
    threading.Thread(target=lambda: lines.put(out.readline()), daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        if proxy is not None and proxy.error is not None:
            err = proxy.error
            raise RuntimeError(f"the proxy failed: {type(err).__name__}: {err}") from err
        try:
            line = lines.get(timeout=0.2).strip()
        except queue.Empty:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the connections did not come up within {timeout:.0f} s"
                ) from None
            continue
        if line != "ready":
            raise RuntimeError(f"the connections did not come up: {line or 'the load ended'}")
        return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sockmap.bench.idle",
        description="One shard of the idle workload: a proxy process and its load process "
        "(a line protocol with `sockmap bench idle`, which starts the shards).",
    )
    p.add_argument("path", choices=sorted(FDS_PER_CONN))
    p.add_argument("conns", type=int)
    p.add_argument("load_cpus")
    p.add_argument("proxy_cpus")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    # SIGTERM from the harness unwinds the shard, so what it started is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        _shard(args.path, args.conns, args.load_cpus, args.proxy_cpus, args.timeout)
    except Exception as exc:  # noqa: BLE001 - said on the protocol, then the exit code
        _tell(f"error {type(exc).__name__}: {exc}".replace("\n", " "))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
