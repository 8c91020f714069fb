"""DNS over TCP for tests and benchmarks: unbound serving a local zone, and dnsperf.

Both are Debian packages (``unbound``, ``dnsperf``); nothing here needs the network:
unbound answers only its own ``test.`` zone.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sockmap.bench.procs import stop_process

__all__ = ["QUERIES", "DnsperfResult", "answers", "dnsperf", "unbound"]

QUERIES = "a.test A\nb.test A\nwho.test TXT\nnone.test A\n"
"""A dnsperf query file: answers from the local zone (``none.test`` is NXDOMAIN)."""

_CONFIG = """\
server:
  interface: {host}
  port: {port}
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{dir}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  do-ip6: {ip6}
  num-threads: 1
  incoming-num-tcp: 1024
  tcp-idle-timeout: 120000
  access-control: 127.0.0.0/8 allow
  access-control: ::1 allow
  module-config: "iterator"
  local-zone: "test." static
  local-data: "a.test. 60 IN A 10.0.0.1"
  local-data: "b.test. 60 IN A 10.0.0.2"
  local-data: "who.test. 60 IN TXT \\"{name}\\""
remote-control:
  control-enable: no
"""


def answers(host: str, port: int) -> bool:
    """True once a DNS server on ``host:port`` answers a query over TCP."""
    with (
        contextlib.suppress(OSError),
        socket.create_connection((host, port), 0.2) as s,
    ):
        # A query for who.test TXT over TCP: length, header, question.
        q = bytes.fromhex("abcd01000001000000000000") + b"\x03who\x04test\x00\x00\x10\x00\x01"
        s.sendall(len(q).to_bytes(2, "big") + q)
        return len(s.recv(2)) == 2
    return False


@contextlib.contextmanager
def unbound(
    port: int, name: str = "unbound", host: str = "127.0.0.1", cpu: int | None = None
) -> Iterator[str]:
    """Run unbound on ``host:port`` (TCP and UDP) until the block ends, pinned to ``cpu``
    if given; yields HOST:PORT.

    Raises FileNotFoundError when unbound is not installed.
    """
    exe = shutil.which("unbound") or "/usr/sbin/unbound"
    if not Path(exe).exists():
        raise FileNotFoundError("unbound is not installed (Debian package unbound)")
    with tempfile.TemporaryDirectory(prefix="sockmap-unbound-") as d:
        conf = Path(d, "unbound.conf")
        conf.write_text(
            _CONFIG.format(
                host=host, port=port, dir=d, name=name, ip6="yes" if ":" in host else "no"
            )
        )
        pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
        proc = subprocess.Popen(  # noqa: S603 - the installed unbound, our own config
            [*pin, exe, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 10
            while not answers(host, port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"unbound on {host}:{port} did not start: {err.strip()}")
                time.sleep(0.05)
            yield f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        finally:
            stop_process(proc)
            if proc.stderr:
                proc.stderr.close()


@dataclass(frozen=True)
class DnsperfResult:
    sent: int
    completed: int
    lost: int
    qps: float
    latency_avg: float
    """Seconds."""
    rcodes: dict[str, int]
    output: str


def dnsperf(
    host: str,
    port: int,
    *,
    runs: int = 1000,
    clients: int = 4,
    outstanding: int = 100,
    timeout: float = 5.0,
    cpu: int | None = None,
) -> DnsperfResult:
    """Run dnsperf over TCP through :data:`QUERIES` ``runs`` times; parse its report."""
    exe = shutil.which("dnsperf")
    if exe is None:
        raise FileNotFoundError("dnsperf is not installed (Debian package dnsperf)")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="sockmap-dnsperf-") as f:
        f.write(QUERIES)
        f.flush()
        cmd = [exe, "-s", host, "-p", str(port), "-m", "tcp", "-d", f.name, "-n", str(runs)]
        cmd += ["-c", str(clients), "-q", str(outstanding), "-t", str(timeout)]
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        run = subprocess.run(  # noqa: S603 - the installed dnsperf, fixed arguments
            cmd, capture_output=True, text=True, timeout=600, check=False
        )
    out = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"dnsperf failed ({run.returncode}): {out.strip()[-500:]}")

    def num(label: str) -> float:
        m = re.search(rf"{label}:\s+([0-9.]+)", out)
        if m is None:
            raise RuntimeError(f"dnsperf output has no {label!r}: {out.strip()[-500:]}")
        return float(m.group(1))

    codes = re.search(r"Response codes:\s+(.*)", out)
    rcodes = {}
    if codes:
        for name, n in re.findall(r"([A-Z]+) (\d+)", codes.group(1)):
            rcodes[name] = int(n)
    return DnsperfResult(
        sent=int(num("Queries sent")),
        completed=int(num("Queries completed")),
        lost=int(num("Queries lost")),
        qps=num("Queries per second"),
        latency_avg=num("Average Latency \\(s\\)"),
        rcodes=rcodes,
        output=out,
    )
