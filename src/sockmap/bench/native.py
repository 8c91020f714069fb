"""The C load generator (``fastend.c``): built on first use, else the Python one.

The Python endpoint cannot keep up with the fastest paths (0.52x iperf3 on one
stream, 0.73-0.82x sockperf's round trips: docs/benchmarks.md), so the harness runs
the C one for the roles it has (sink, source, echo, rr), built once per source
version with the system's C compiler into ``~/.cache/sockmap``. Without a compiler,
or with ``SOCKMAP_BENCH_NATIVE=0``, it runs the Python endpoint and says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from functools import cache
from importlib import resources
from pathlib import Path

__all__ = ["NATIVE_ROLES", "fastend"]

log = logging.getLogger(__name__)
NATIVE_ROLES = frozenset({"sink", "source", "echo", "rr"})


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sockmap"


@cache
def fastend() -> Path | None:
    """The built C endpoint, or None (and why, logged once) when it cannot be used."""
    if os.environ.get("SOCKMAP_BENCH_NATIVE", "1") == "0":
        log.info("load generator: Python (SOCKMAP_BENCH_NATIVE=0)")
        return None
    source = resources.files("sockmap.bench").joinpath("fastend.c").read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    exe = _cache_dir() / f"fastend-{digest}"
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe
    compilers = (os.environ.get("CC"), "cc", "gcc", "clang")
    cc = next((c for c in compilers if c and shutil.which(c)), None)
    if cc is None:
        log.warning("load generator: no C compiler (cc, gcc, clang): using the Python one, "
                    "which caps the fastest paths (install gcc for exact figures)")
        return None
    exe.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    src = exe.with_suffix(".c")
    src.write_bytes(source)
    tmp = exe.with_name(exe.name + f".{os.getpid()}.tmp")
    res = subprocess.run(  # noqa: S603 - the system compiler on our own source
        [cc, "-O2", "-pthread", "-o", str(tmp), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        log.warning("load generator: %s failed to build fastend.c (%s): using the Python one",
                    cc, res.stderr.strip()[-300:])
        return None
    tmp.replace(exe)
    return exe
