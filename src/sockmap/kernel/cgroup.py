"""Attaching programs to a cgroup v2 (SOCK_OPS): every TCP socket of the processes in that
cgroup, or below it, runs the program on its events (connection established, ...).

The cgroup v2 hierarchy is found from ``/proc/self/mountinfo`` (``/sys/fs/cgroup`` on
most systems, ``/sys/fs/cgroup/unified`` on hybrid ones), never assumed.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from sockmap._closeable import Closeable
from sockmap.abi import AttachType, Cmd
from sockmap.errors import bpf_error
from sockmap.kernel.programs import Prog
from sockmap.kernel.syscall import bpf

__all__ = ["CgroupAttachment", "attach_cgroup", "cgroup2_mount", "detach_cgroup"]

_HINTS = {
    errno.EINVAL: "the program type does not fit the attach type (SOCK_OPS for sock_ops)",
    errno.EBADF: "not a cgroup v2 directory: give a path under the cgroup2 mount",
    errno.ENOENT: "that program is not attached to this cgroup",
    errno.EPERM: "attaching to a cgroup needs CAP_NET_ADMIN (and CAP_BPF)",
}


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """Where the cgroup v2 hierarchy is mounted; ENOENT (with advice) when it is not."""
    with Path(mountinfo).open() as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype = right.split(" ", 1)[0]
            if fstype == "cgroup2":
                return Path(left.split()[4])
    raise bpf_error(
        errno.ENOENT,
        "find the cgroup v2 mount",
        "no cgroup2 file system is mounted: mount -t cgroup2 none /sys/fs/cgroup/unified",
    )


def _open_cgroup(path: str | Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise bpf_error(
            exc.errno or errno.ENOENT,
            f"open cgroup {path}",
            f"give a cgroup v2 directory (the hierarchy is at {cgroup2_mount()})",
        ) from None


def attach_cgroup(
    path: str | Path, prog: Prog, kind: AttachType = AttachType.CGROUP_SOCK_OPS, flags: int = 0
) -> None:
    """Attach ``prog`` to the cgroup at ``path`` (``BPF_PROG_ATTACH``, target = the cgroup)."""
    fd = _open_cgroup(path)
    try:
        bpf(
            Cmd.PROG_ATTACH,
            "IIIII",
            fd,
            prog.fd,
            int(kind),
            flags,
            0,
            what=f"attach {kind.name} program {prog.name!r} to cgroup {path}",
            hints=_HINTS,
        )
    finally:
        os.close(fd)


def detach_cgroup(
    path: str | Path, prog: Prog, kind: AttachType = AttachType.CGROUP_SOCK_OPS
) -> None:
    """Detach ``prog`` from the cgroup at ``path``."""
    fd = _open_cgroup(path)
    try:
        bpf(
            Cmd.PROG_DETACH,
            "IIIII",
            fd,
            prog.fd,
            int(kind),
            0,
            0,
            what=f"detach {kind.name} program {prog.name!r} from cgroup {path}",
            hints=_HINTS,
        )
    finally:
        os.close(fd)


class CgroupAttachment(Closeable):
    """A program attached to a cgroup; :meth:`detach` (or leaving a ``with``) undoes it."""

    def __init__(self, path: str | Path, prog: Prog, kind: AttachType) -> None:
        self.path = Path(path)
        self.prog = prog
        self.kind = kind
        self.attached = True

    def detach(self) -> None:
        if self.attached:
            self.attached = False
            detach_cgroup(self.path, self.prog, self.kind)

    def close(self) -> None:
        self.detach()
