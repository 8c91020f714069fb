"""Pinning maps and programs on bpffs (``BPF_OBJ_PIN`` / ``BPF_OBJ_GET``).

A pinned object outlives the process: ``bpftool map show`` and ``bpftool prog show``
list it with its pin path, and another process can open it by path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from sockmap.abi import Cmd, ProgType
from sockmap.errors import BpfError, bpf_error
from sockmap.kernel.info import prog_info
from sockmap.kernel.maps import Map, open_map_fd
from sockmap.kernel.programs import Prog
from sockmap.kernel.syscall import address, bpf, buffer, close_fd

__all__ = [
    "DEFAULT_BPFFS",
    "bpffs_mounted",
    "ensure_bpffs",
    "fd_kind",
    "open_pinned",
    "pin",
    "unpin",
]

DEFAULT_BPFFS = Path("/sys/fs/bpf")


def bpffs_mounted(path: Path = DEFAULT_BPFFS) -> bool:
    """True when a bpf filesystem is mounted at ``path``."""
    target = str(Path(path).resolve())
    with Path("/proc/self/mounts").open() as f:
        return any(
            len(parts) >= 3 and parts[1] == target and parts[2] == "bpf"
            for parts in (line.split() for line in f)
        )


def ensure_bpffs(path: Path = DEFAULT_BPFFS) -> Path:
    """Mount bpffs at ``path`` unless one is there already; return the path."""
    path = Path(path)
    if bpffs_mounted(path):
        return path
    path.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mount(b"bpf", str(path).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise bpf_error(
            err,
            f"mount bpffs at {path}",
            "mounting needs CAP_SYS_ADMIN; mount it yourself: mount -t bpf bpf /sys/fs/bpf",
        )
    return path


def _check_under_bpffs(path: Path) -> None:
    for parent in [path.parent, *path.parent.parents]:
        if bpffs_mounted(parent):
            return
    raise bpf_error(
        errno.EPERM,
        f"pin at {path}",
        f"{path.parent} is not on a bpf filesystem; pin under {DEFAULT_BPFFS} "
        "(ensure_bpffs() mounts it)",
    )


def pin(obj: Map | Prog, path: str | os.PathLike[str]) -> Path:
    """Pin ``obj`` at ``path`` on bpffs (parent directories are created)."""
    p = Path(path)
    _check_under_bpffs(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    pbuf = buffer(str(p).encode() + b"\0")
    bpf(Cmd.OBJ_PIN, "QII", address(pbuf), obj.fd, 0, what=f"pin {obj!r} at {p}")
    return p


def unpin(path: str | os.PathLike[str]) -> None:
    """Remove a pin; the object is freed once nothing else holds it."""
    try:
        Path(path).unlink()
    except FileNotFoundError:
        raise bpf_error(errno.ENOENT, f"unpin {path}", "nothing is pinned there") from None


def fd_kind(fd: int) -> str:
    """``"map"``, ``"prog"``, ``"link"``... for a bpf object fd (from its anon inode name)."""
    target = str(Path(f"/proc/self/fd/{fd}").readlink())
    return target.removeprefix("anon_inode:bpf-") if target.startswith("anon_inode:bpf-") else ""


def open_pinned(path: str | os.PathLike[str]) -> Map | Prog:
    """Open the map or program pinned at ``path`` in its typed handle."""
    pbuf = buffer(str(path).encode() + b"\0")
    fd, _ = bpf(Cmd.OBJ_GET, "QII", address(pbuf), 0, 0, what=f"open pinned object {path}")
    try:
        kind = fd_kind(fd)
        if kind == "map":
            return open_map_fd(fd)
        if kind == "prog":
            info = prog_info(fd)
            ptype = info.type if isinstance(info.type, ProgType) else ProgType.UNSPEC
            return Prog(fd, ptype, info.name, info.xlated_len // 8)
    except BaseException:
        close_fd(fd)
        raise
    close_fd(fd)
    raise BpfError(errno.EINVAL, f"{path} holds a bpf {kind or 'object'}, not a map or program")
