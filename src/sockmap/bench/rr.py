"""Workload (b): request/response round trips of a fixed size, one at a time per
connection: rate, latency percentiles, and CPU per round trip."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from sockmap.bench.common import run_over_path
from sockmap.bench.stream import Placement

__all__ = ["RrTrial", "run_rr_trial", "summarize_rr"]


@dataclass
class RrTrial:
    path: str
    placement: str
    conns: int
    size: int
    round_trips: int
    seconds: float
    p50_us: float
    p99_us: float
    p999_us: float
    busy_cpu: float

    @property
    def rate(self) -> float:
        return self.round_trips / self.seconds

    @property
    def cpu_us_per_rt(self) -> float:
        return self.busy_cpu / self.round_trips * 1e6


def run_rr_trial(
    path: str, placement: Placement, size: int, count: int, conns: int, timeout: float
) -> RrTrial:
    """``count`` round trips of ``size`` bytes on each of ``conns`` connections."""
    run = run_over_path(
        path,
        placement,
        conns,
        timeout,
        ("echo", 0, []),
        ("rr", 0, ["--block", str(size), "--count", str(count)]),
        wait_for="client",
    )
    c = run.client
    if c.get("round_trips") != count * conns:
        raise RuntimeError(f"{path}: {c.get('round_trips')} of {count * conns} round trips")
    return RrTrial(
        path,
        placement.name,
        conns,
        size,
        c["round_trips"],
        c["seconds"],
        c["p50_us"],
        c["p99_us"],
        c["p999_us"],
        run.cpu.busy,
    )


def summarize_rr(trials: list[RrTrial], baseline: str = "raw") -> list[dict[str, Any]]:
    groups: dict[tuple[str, int, int, str], list[RrTrial]] = {}
    for t in trials:
        groups.setdefault((t.placement, t.conns, t.size, t.path), []).append(t)
    rows: list[dict[str, Any]] = []
    for (placement, conns, size, path), ts in groups.items():
        rows.append(
            {
                "placement": placement,
                "conns": conns,
                "size": size,
                "path": path,
                "runs": len(ts),
                "rate": statistics.median(t.rate for t in ts),
                "rate_min": min(t.rate for t in ts),
                "rate_max": max(t.rate for t in ts),
                "p50_us": statistics.median(t.p50_us for t in ts),
                "p99_us": statistics.median(t.p99_us for t in ts),
                "p999_us": statistics.median(t.p999_us for t in ts),
                "cpu_us_per_rt": statistics.median(t.cpu_us_per_rt for t in ts),
            }
        )
    for row in rows:
        base = [
            r
            for r in rows
            if r["path"] == baseline
            and (r["placement"], r["conns"], r["size"])
            == (row["placement"], row["conns"], row["size"])
        ]
        if base:
            row["rate_vs_" + baseline] = float(row["rate"]) / float(base[0]["rate"])
    return rows
