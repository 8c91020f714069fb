"""Whole-machine busy CPU time from /proc/stat (all cores, kernel included)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuSample", "cpu_sample"]

_HZ = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    busy: float
    """Seconds of CPU time spent not idle, summed over every core."""
    process: float
    """Seconds of CPU time of this process (user + system, all threads)."""

    def __sub__(self, other: CpuSample) -> CpuSample:
        return CpuSample(self.busy - other.busy, self.process - other.process)


def cpu_sample() -> CpuSample:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # guest time is already inside user
    t = os.times()
    return CpuSample(busy / _HZ, t.user + t.system)
