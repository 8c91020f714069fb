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

import statistics
from dataclasses import dataclass, field
from typing import Any

from sockmap.bench.common import run_over_path

__all__ = ["PATHS", "Placement", "Trial", "run_trial", "summarize"]

PATHS = (
    "direct",
    "raw",
    "kernel",
    "bounded",
    "userspace",
    "accel",
    "asyncio",
    "uvloop",
    "splice",
    "socat",
    "haproxy",
)
KERNEL_PATHS = frozenset({"raw", "kernel", "bounded", "accel"})
"""``accel``: no proxy; sock_ops + SK_MSG hand each send to the peer socket (local
acceleration), so it is compared with ``direct``."""


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
    run = run_over_path(
        path, placement, conns, timeout, ("sink", nbytes, []), ("source", nbytes, [])
    )
    got = run.server["bytes"]
    if got != nbytes * conns:
        raise RuntimeError(f"{path}: the sink got {got} of {nbytes * conns} bytes")
    return Trial(
        path,
        placement.name,
        conns,
        got,
        run.server["seconds"],
        run.cpu.busy,
        run.cpu.process,
        run.extra,
    )


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
        # A ratio needs a figure to divide by: a tiny run's CPU (10 ms ticks) may be 0.
        if base is not None and base["gib_per_s"] > 0:
            row["rate_vs_" + baseline] = row["gib_per_s"] / base["gib_per_s"]
        if base is not None and base["cpu_s_per_gib"] > 0:
            row["cpu_vs_" + baseline] = row["cpu_s_per_gib"] / base["cpu_s_per_gib"]
    return rows
