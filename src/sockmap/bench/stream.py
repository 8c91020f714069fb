"""Workload (a): one-way streams of 64 KiB writes through each path, GB/s and CPU per GiB.

Paths:

- ``direct``: the source connects to the sink (the limit);
- ``raw``: a minimal kernel sockmap pair -- verdict-only redirect, nothing else (the
  speed limit of the kernel engine; no FIN, no bound);
- ``kernel``: :class:`~sockmap.datapath.splice.KernelSplicer` (raw plus lifecycle);
- ``bounded``: :class:`~sockmap.datapath.bounded.BoundedSplicer` (lifecycle plus a
  bound on kernel memory);
- ``userspace``: :class:`~sockmap.userspace.splice.UserspaceSplicer`.

Each trial starts a sink and a source process pinned to the load generator's CPUs,
the proxy (this process) pinned to the proxy's CPUs, and measures the whole
machine's busy CPU time from the moment the source starts writing to the moment the
sink has every byte.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sockmap.bench.common import Proxy, RawPair, endpoint, make_splicer, pinned, readline
from sockmap.bench.cpu import cpu_sample

__all__ = ["PATHS", "Placement", "Trial", "run_trial", "summarize"]

PATHS = ("direct", "raw", "kernel", "bounded", "userspace")
KERNEL_PATHS = frozenset({"raw", "kernel", "bounded"})


@dataclass(frozen=True)
class Placement:
    name: str
    load: str
    """CPUs of the source and sink processes (comma-separated)."""
    proxy: str
    """CPUs of the proxy (this process)."""


@dataclass
class Trial:
    path: str
    placement: str
    conns: int
    bytes: int
    seconds: float
    busy_cpu: float
    proxy_cpu: float
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def gib_per_s(self) -> float:
        return self.bytes / self.seconds / 2**30

    @property
    def cpu_per_gib(self) -> float:
        return self.busy_cpu / (self.bytes / 2**30)


def run_trial(path: str, placement: Placement, nbytes: int, conns: int, timeout: float) -> Trial:
    """One transfer of ``nbytes`` per connection over ``path``."""
    sink = endpoint("sink", nbytes, conns, placement.load)
    closers: list[Callable[[], None]] = []
    source: subprocess.Popen[str] | None = None
    extra: dict[str, int] = {}
    try:
        assert sink.stdout is not None
        sink_port = int(sink.stdout.readline())
        with pinned(placement.proxy):
            port = sink_port
            proxy = None
            splicer: Any = None
            if path == "raw":
                raw = RawPair(conns)
                closers.append(raw.close)
                proxy = Proxy(sink_port, conns, raw.join)
            elif path != "direct":
                splicer, close = make_splicer(path, conns)
                closers.append(close)
                proxy = Proxy(sink_port, conns, splicer.splice)
            if proxy is not None:
                closers.insert(0, proxy.close)
                port = proxy.port
            source = endpoint("source", nbytes, conns, placement.load, port)
            assert source.stdout is not None
            assert source.stdin is not None
            if source.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{path}: the source could not connect")
            if proxy is not None:
                proxy.thread.join(timeout)
                if proxy.error is not None:
                    raise RuntimeError(f"{path}: the proxy failed: {proxy.error}")
            before = cpu_sample()
            source.stdin.write("go\n")
            source.stdin.flush()
            line = readline(sink, timeout)
            after = cpu_sample()
            if splicer is not None:
                for name in ("holds", "user_bytes"):
                    if hasattr(splicer, name):
                        extra[name] = int(getattr(splicer, name))
        result = json.loads(line)
        if result["bytes"] != nbytes * conns:
            raise RuntimeError(f"{path}: the sink got {result['bytes']} of {nbytes * conns} bytes")
        used = after - before
        return Trial(
            path,
            placement.name,
            conns,
            result["bytes"],
            result["seconds"],
            used.busy,
            used.process,
            extra,
        )
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()
        for proc in (source, sink):
            if proc is not None:
                proc.kill()
                proc.wait(5)


def summarize(trials: list[Trial], baseline: str = "raw") -> list[dict[str, Any]]:
    """Medians per (placement, conns, path), with ratios against ``baseline`` of the same run."""
    groups: dict[tuple[str, int, str], list[Trial]] = {}
    for t in trials:
        groups.setdefault((t.placement, t.conns, t.path), []).append(t)
    rows: list[dict[str, Any]] = []
    for (placement, conns, path), ts in groups.items():
        rate = statistics.median(t.gib_per_s for t in ts)
        rows.append(
            {
                "placement": placement,
                "conns": conns,
                "path": path,
                "runs": len(ts),
                "gib_per_s": rate,
                "gib_per_s_min": min(t.gib_per_s for t in ts),
                "gib_per_s_max": max(t.gib_per_s for t in ts),
                "cpu_s_per_gib": statistics.median(t.cpu_per_gib for t in ts),
                "proxy_cpu_s_per_gib": statistics.median(
                    t.proxy_cpu / (t.bytes / 2**30) for t in ts
                ),
                **{k: int(statistics.median(t.extra.get(k, 0) for t in ts)) for k in ts[0].extra},
            }
        )
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["path"] == baseline
                and r["placement"] == row["placement"]
                and r["conns"] == row["conns"]
            ),
            None,
        )
        if base is not None:
            row["rate_vs_" + baseline] = row["gib_per_s"] / base["gib_per_s"]
            row["cpu_vs_" + baseline] = row["cpu_s_per_gib"] / base["cpu_s_per_gib"]
    return rows
