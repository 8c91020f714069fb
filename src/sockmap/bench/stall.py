"""Workload (g): a consumer that stops reading while the source offers ``--mib`` MiB.

The sink accepts, reads nothing for ``stall`` seconds, then drains. Meanwhile the
harness samples the host's ``MemAvailable`` every 20 ms: the peak drop is what the path
let pile up (the kernel's buffers count). Afterwards every byte must have arrived.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from sockmap.bench.common import run_over_path
from sockmap.bench.idle import _mem_available

__all__ = ["StallTrial", "run_stall"]


@dataclass
class StallTrial:
    path: str
    placement: str
    offered: int
    delivered: int
    peak_host_bytes: int
    """The largest drop of MemAvailable while the consumer stalled (and drained)."""
    seconds: float

    @property
    def intact(self) -> bool:
        return self.delivered == self.offered


def run_stall(
    path: str, placement: object, nbytes: int, stall: float, timeout: float
) -> StallTrial:
    base = _mem_available()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], base - _mem_available())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        run = run_over_path(
            path,
            placement,
            1,
            timeout,
            ("sink", nbytes, ["--stall", str(stall)]),
            ("source", nbytes, []),
        )
    finally:
        stop.set()
        sampler.join(2)
    return StallTrial(
        path,
        str(getattr(placement, "name", "")),
        nbytes,
        int(run.server.get("bytes", 0)),
        peak[0],
        time.monotonic() - t0,
    )
