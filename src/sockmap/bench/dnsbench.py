"""Workload (d): DNS over TCP, dnsperf -> a load balancer -> two unbound, per path.

Paths: ``direct`` (dnsperf straight to one unbound: the limit), ``kernel`` and
``userspace`` (``sockmap proxy --mode balance --framing dns`` on each engine),
``asyncio`` and ``uvloop`` (:mod:`sockmap.bench.lb`, the 40-line LB a user would write),
and ``dnsdist``. Every path gets the same backends, placement and query mix; the
proxy's cost is the whole machine's busy CPU per query (all cores, kernel included,
from /proc/stat) minus the same figure for ``direct``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sockmap.bench.cpu import cpu_sample
from sockmap.bench.dns import QUERIES, answers, dnsperf
from sockmap.bench.procs import stop_process

__all__ = ["DNS_PATHS", "DnsTrial", "balancer", "run_dns_trial"]

DNS_PATHS = ("direct", "kernel", "userspace", "asyncio", "uvloop", "dnsdist")
MIX = {"NOERROR": 3, "NXDOMAIN": 1}
"""Answers per pass through :data:`~sockmap.bench.dns.QUERIES`."""


@dataclass
class DnsTrial:
    path: str
    placement: str
    sent: int
    completed: int
    lost: int
    qps: float
    latency_avg_us: float
    busy_cpu: float
    """Seconds of whole-machine busy CPU while dnsperf ran."""
    intact: bool
    """Every query answered, with the answer the zone gives."""
    rcodes: dict[str, int] = field(default_factory=dict)

    @property
    def cpu_us_per_query(self) -> float:
        return 1e6 * self.busy_cpu / self.completed if self.completed else float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if answers("127.0.0.1", port):
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def balancer(path: str, cpu: str, backends: list[str]) -> Iterator[int]:
    """Start the path's load balancer pinned to ``cpu``; yield the port it serves."""
    pin = ["taskset", "-c", cpu]
    tmp = tempfile.TemporaryDirectory(prefix="sockmap-dnsbench-")
    port = 0
    if path in ("kernel", "userspace"):
        cmd = [sys.executable, "-m", "sockmap", "proxy", "--mode", "balance", "--framing", "dns"]
        cmd += ["--engine", path, "--listen", "127.0.0.1:0", "--metrics", "off"]
        cmd += ["--log-level", "WARNING", "--idle-timeout", "0"]
        for b in backends:
            cmd += ["--backend", b]
    elif path in ("asyncio", "uvloop"):
        cmd = [sys.executable, "-m", "sockmap.bench.lb", "--listen", "127.0.0.1:0"]
        for b in backends:
            cmd += ["--backend", b]
        if path == "uvloop":
            cmd.append("--uvloop")
    elif path == "dnsdist":
        exe = shutil.which("dnsdist")
        if exe is None:
            raise FileNotFoundError("dnsdist is not installed (Debian package dnsdist)")
        port = _free_port()
        conf = Path(tmp.name, "dnsdist.conf")
        lines = [f'setLocal("127.0.0.1:{port}")', "setServerPolicy(roundrobin)"]
        lines += [f'newServer({{address="{b}", checkName="a.test."}})' for b in backends]
        conf.write_text("\n".join(lines) + "\n")
        cmd = [exe, "--supervised", "--disable-syslog", "-C", str(conf)]
    else:
        raise ValueError(f"unknown path {path!r}")
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter or the installed dnsdist
        [*pin, *cmd], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        if not port:
            assert proc.stdout is not None
            words = proc.stdout.readline().split()
            if not words or words[0] != "ready":
                raise RuntimeError(f"{path}: the load balancer did not start")
            port = int(words[1].rsplit(":", 1)[-1])
        if not _answers(port, time.monotonic() + 15):
            raise RuntimeError(f"{path}: no answer on port {port}")
        yield port
    finally:
        stop_process(proc, 10)
        if proc.stdout is not None:
            proc.stdout.close()
        tmp.cleanup()


def run_dns_trial(
    path: str,
    placement: object,
    backends: list[str],
    *,
    runs: int = 5000,
    clients: int = 4,
) -> DnsTrial:
    """One dnsperf run over ``path`` (``runs`` passes through the query file)."""
    load_cpu = int(str(getattr(placement, "load", "0")).split(",")[0])
    proxy_cpu = str(getattr(placement, "proxy", "0"))
    name = str(getattr(placement, "name", ""))
    ctx: contextlib.AbstractContextManager[int]
    if path == "direct":
        ctx = contextlib.nullcontext(int(backends[0].rsplit(":", 1)[1]))
    else:
        ctx = balancer(path, proxy_cpu, backends)
    with ctx as port:
        before = cpu_sample()
        res = dnsperf("127.0.0.1", port, runs=runs, clients=clients, cpu=load_cpu)
        used = cpu_sample() - before
    passes = runs
    expected = {k: v * passes for k, v in MIX.items()}
    intact = res.lost == 0 and res.completed == res.sent == 4 * passes and res.rcodes == expected
    return DnsTrial(
        path,
        name,
        res.sent,
        res.completed,
        res.lost,
        res.qps,
        res.latency_avg * 1e6,
        used.busy,
        intact,
        res.rcodes,
    )


assert QUERIES.count("\n") == sum(MIX.values())
