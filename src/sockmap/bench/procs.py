"""Helper processes of the benchmarks (servers, proxies, load balancers): is it listening
yet, and stopping it."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

__all__ = ["listening", "stop_process"]


def listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` (any address), from /proc/net/tcp{,6}:
    neither connecting (a test connection would reach the backend) nor binding (it could
    take the port from the server starting up)."""
    want = f":{port:04X}"
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[1].endswith(want) and fields[3] == "0A":  # 0A: LISTEN
                    return True
    return False


def stop_process(proc: subprocess.Popen[str] | subprocess.Popen[bytes], grace: float = 5) -> None:
    """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
