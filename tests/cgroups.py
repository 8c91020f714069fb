"""Moving this test process into a cgroup v2 and back (for programs attached to one)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from sockmap.kernel.cgroup import cgroup2_mount


@contextlib.contextmanager
def inside(cg: Path) -> Iterator[None]:
    """Run this process inside ``cg`` for the block (its new sockets get the cgroup's
    programs), then move it back where it was."""
    home = cgroup2_mount() / Path(_own_cgroup()).relative_to("/")
    (cg / "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield
    finally:
        (home / "cgroup.procs").write_text(str(os.getpid()))


def _own_cgroup() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError("no cgroup v2 line in /proc/self/cgroup")


@contextlib.contextmanager
def fresh_cgroup(stem: str = "sockmap-test") -> Iterator[Path]:
    """A new child cgroup under the cgroup v2 mount (found, not assumed); removed at the
    end once its processes have left."""
    import time  # noqa: PLC0415

    cg = cgroup2_mount() / f"{stem}-{os.getpid()}"
    cg.mkdir()
    try:
        yield cg
    finally:
        deadline = time.monotonic() + 10
        while (cg / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        cg.rmdir()
