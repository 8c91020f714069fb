"""Workload (e): connection churn. One connection after another through the path: connect,
a 64-byte round trip, half-close, the server's FIN back, close. Connections per second
and whole-machine CPU per connection; every echo checked."""

from __future__ import annotations

from dataclasses import dataclass

from sockmap.bench.common import run_over_path

__all__ = ["CHURN_PATHS", "ChurnTrial", "run_churn"]

CHURN_PATHS = (
    "direct",
    "kernel",
    "bounded",
    "userspace",
    "asyncio",
    "uvloop",
    "splice",
    "socat",
    "haproxy",
)
"""``raw`` and ``accel`` pass no FIN on, so a connection through them never ends."""


@dataclass
class ChurnTrial:
    path: str
    placement: str
    conns: int
    ok: int
    seconds: float
    busy_cpu: float

    @property
    def per_second(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_conn(self) -> float:
        return 1e6 * self.busy_cpu / self.ok if self.ok else float("nan")


def run_churn(path: str, placement: object, conns: int, timeout: float) -> ChurnTrial:
    run = run_over_path(
        path,
        placement,
        conns,
        timeout,
        ("echo", 0, []),
        ("churn", 0, []),
        wait_for="client",
        wait_accept=False,
    )
    c = run.client
    return ChurnTrial(
        path,
        str(getattr(placement, "name", "")),
        conns,
        int(c.get("conns", 0)),
        float(c.get("seconds", 0.0)),
        run.cpu.busy,
    )
