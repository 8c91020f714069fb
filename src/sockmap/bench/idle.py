"""Workload (f): many idle connections through each path -- memory per connection, the
control plane's CPU while nothing moves, and how fast connections are set up.

The load process holds the clients and the backend; the proxy is this process.
Memory is the host's (``MemAvailable`` from /proc/meminfo: socket buffers, BPF maps
and the psocks count) plus this process's RSS growth; compare with the ``direct``
row of the same run, which has the load's own sockets only.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockmap.bench.common import Proxy, endpoint, make_splicer, pinned, readline
from sockmap.bench.cpu import cpu_sample
from sockmap.bench.endpoint import allow_files
from sockmap.bench.stream import Placement

__all__ = ["IdleTrial", "run_idle"]

IDLE_SECONDS = 3.0


@dataclass
class IdleTrial:
    path: str
    conns: int
    setup_seconds: float
    host_bytes: int
    """Host memory taken while the connections are open (MemAvailable before - after)."""
    rss_bytes: int
    """Growth of this (proxy) process's resident memory."""
    idle_proxy_cpu: float
    """CPU seconds per second this process used while every connection was idle."""
    idle_busy_cpu: float
    """Busy CPU seconds per second of the whole machine meanwhile."""

    @property
    def host_per_conn(self) -> float:
        return self.host_bytes / self.conns


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_idle(path: str, placement: Placement, conns: int, timeout: float) -> IdleTrial:
    """Open ``conns`` connections over ``path``, check a byte crosses each, idle, measure."""
    allow_files(2 * conns + 256)
    load = endpoint("idle", 0, conns, placement.load)
    closers: list[Callable[[], None]] = []
    try:
        assert load.stdout is not None
        assert load.stdin is not None
        backend_port = int(load.stdout.readline())
        mem0, rss0 = _mem_available(), _rss()
        with pinned(placement.proxy):
            port = backend_port
            splicer: Any = None
            if path != "direct":
                splicer, close = make_splicer(path, conns)
                closers.append(close)
                proxy = Proxy(backend_port, conns, splicer.splice)
                closers.insert(0, proxy.close)
                port = proxy.port
            t0 = time.perf_counter()
            load.stdin.write(f"{port}\n")
            load.stdin.flush()
            if _line(load, timeout) != "ready":
                raise RuntimeError(f"{path}: the connections did not come up")
            setup = time.perf_counter() - t0
            mem1, rss1 = _mem_available(), _rss()
            before = cpu_sample()
            time.sleep(IDLE_SECONDS)
            used = cpu_sample() - before
            load.stdin.write("quit\n")
            load.stdin.flush()
            line = _line(load, timeout)
        if '"bytes": ' + str(conns) not in line:
            raise RuntimeError(f"{path}: not every connection carried its byte: {line}")
        return IdleTrial(
            path,
            conns,
            setup,
            mem0 - mem1,
            rss1 - rss0,
            used.process / IDLE_SECONDS,
            used.busy / IDLE_SECONDS,
        )
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()
        load.kill()
        load.wait(5)


def _line(proc: subprocess.Popen[str], timeout: float) -> str:
    return readline(proc, timeout).strip()
