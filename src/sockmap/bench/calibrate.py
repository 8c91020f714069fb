"""The load generator checked against the tools users trust: on the direct path (no proxy),
our stream ends against ``iperf3`` and our request/response ends against ``sockperf
ping-pong``, same placement, same sizes. If ours reach what they measure, the load
generator is not what limits the other paths' figures."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from sockmap.bench.procs import listening, stop_process

__all__ = ["Calibration", "iperf3_gib_per_s", "sockperf_rtt"]


@dataclass
class Calibration:
    placement: str
    workload: str
    tool: str
    tool_value: float
    ours: float
    unit: str

    @property
    def ratio(self) -> float:
        return self.ours / self.tool_value if self.tool_value else float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exe(name: str) -> str:
    path = shutil.which(name, path="/usr/bin:/usr/sbin:/bin")
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (Debian package {name})")
    return path


@contextlib.contextmanager
def _server(cmd: list[str], port: int) -> Iterator[None]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    try:
        deadline = time.monotonic() + 10
        while not listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[3]} did not start listening on {port}")
            time.sleep(0.05)
        yield
    finally:
        stop_process(proc)


def iperf3_gib_per_s(cpu: str, nbytes: int) -> float:
    """iperf3's own figure for one TCP stream of ``nbytes`` on loopback, both ends on ``cpu``."""
    exe, port = _exe("iperf3"), _free_port()
    pin = ["taskset", "-c", cpu]
    with _server([*pin, exe, "-s", "-1", "-p", str(port)], port):
        res = subprocess.run(  # noqa: S603 - the installed iperf3, fixed arguments
            [*pin, exe, "-c", "127.0.0.1", "-p", str(port), "-n", str(nbytes), "-l", "64K", "-J"],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
    end = json.loads(res.stdout)["end"]
    return float(end["sum_received"]["bits_per_second"]) / 8 / 2**30


def sockperf_rtt(cpu: str, size: int, seconds: float) -> tuple[float, float]:
    """sockperf ping-pong over TCP: (round trips/s, median round trip µs), both ends on
    ``cpu``. sockperf reports half round trips; this doubles them."""
    exe, port = _exe("sockperf"), _free_port()
    pin = ["taskset", "-c", cpu]
    with _server([*pin, exe, "sr", "--tcp", "-i", "127.0.0.1", "-p", str(port)], port):
        res = subprocess.run(  # noqa: S603 - the installed sockperf, fixed arguments
            [
                *pin,
                exe,
                "pp",
                "--tcp",
                "-i",
                "127.0.0.1",
                "-p",
                str(port),
                "-m",
                str(size),
                "-t",
                str(seconds),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    out = res.stdout + res.stderr
    valid = re.search(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+)", out)
    p50 = re.search(r"percentile 50\.000 =\s+([\d.]+)", out)
    if valid is None or p50 is None:
        raise RuntimeError(f"sockperf output not understood: {out[-400:]}")
    return int(valid.group(2)) / float(valid.group(1)), 2 * float(p50.group(1))
