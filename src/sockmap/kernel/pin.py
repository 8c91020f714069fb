"""Pinning maps and programs on bpffs (``BPF_OBJ_PIN`` / ``BPF_OBJ_GET``).

A pinned object outlives the process: ``bpftool map show`` and ``bpftool prog show``
list it with its pin path, and another process can open it by path.

Whoever can write a pin's directory can replace what is pinned there, so ``pin`` and
``open_pinned`` refuse a path that is world-writable or owned by another (non-root)
user, or that lies under a directory that is world-writable without the sticky bit or
owned by another user (:func:`check_pin_location`). Pins are created 0600 and the
directories ``pin`` creates 0700, whatever the umask.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
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
    "check_pin_location",
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


def _foreign(st: os.stat_result) -> bool:
    return st.st_uid not in (0, os.geteuid())


def _owner(st: os.stat_result) -> str:
    import pwd  # noqa: PLC0415

    try:
        return pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        return f"uid {st.st_uid}"


def check_pin_location(path: str | os.PathLike[str], what: str = "pin at") -> None:
    """Refuse (PermissionDenied, EPERM) a pin path that someone else could replace: the
    path itself (when it exists) world-writable or owned by another non-root user, or any
    existing directory above it world-writable without the sticky bit or owned by another
    non-root user. A sticky world-writable directory owned by root (bpffs's default
    ``/sys/fs/bpf``, mode 1777) is accepted, as ``/tmp`` is for files."""
    p = Path(os.path.abspath(path))  # noqa: PTH100 - no symlink resolution: check each step
    try:
        st = p.lstat()
    except FileNotFoundError:
        pass
    else:
        if st.st_mode & stat.S_IWOTH:
            raise bpf_error(
                errno.EPERM,
                f"{what} {p}",
                f"{p} is world-writable: anyone could replace it; chmod o-w {p}",
            )
        if _foreign(st):
            raise bpf_error(
                errno.EPERM,
                f"{what} {p}",
                f"{p} belongs to {_owner(st)}, who could replace it; use a path of your own",
            )
    for d in p.parents:
        try:
            st = d.stat()
        except FileNotFoundError:
            continue  # pin() creates it, 0700
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise bpf_error(
                errno.EPERM,
                f"{what} {p}",
                f"{d} is world-writable without the sticky bit: anyone could replace what is "
                f"pinned under it; chmod o-w {d} (or +t), or pin under a directory only you "
                "can write",
            )
        if _foreign(st):
            raise bpf_error(
                errno.EPERM,
                f"{what} {p}",
                f"{d} belongs to {_owner(st)}, who could replace what is pinned under it; "
                "pin under a directory owned by you or root",
            )


def _make_dirs(d: Path) -> None:
    """Create ``d`` and its missing parents 0700 (chmod after mkdir: the umask does not
    decide)."""
    missing = []
    while not d.exists():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        try:
            m.mkdir(0o700)
        except FileExistsError:
            continue  # made meanwhile: check_pin_location saw only what existed before
        m.chmod(0o700)


def pin(obj: Map | Prog, path: str | os.PathLike[str]) -> Path:
    """Pin ``obj`` at ``path`` on bpffs, mode 0600 (missing parent directories are created
    0700). Refuses a location someone else could replace (:func:`check_pin_location`)."""
    p = Path(path)
    _check_under_bpffs(p)
    check_pin_location(p)
    _make_dirs(p.parent)
    check_pin_location(p)  # a directory made by someone else between the two checks
    pbuf = buffer(str(p).encode() + b"\0")
    bpf(Cmd.OBJ_PIN, "QII", address(pbuf), obj.fd, 0, what=f"pin {obj!r} at {p}")
    # bpffs creates the pin 0600 & ~umask (0400 under umask 0277, measured): set it
    # explicitly, so the owner, and only the owner, can open it read-write.
    p.chmod(0o600)
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
    """Open the map or program pinned at ``path`` in its typed handle; refuses a path
    someone else could have replaced (:func:`check_pin_location`)."""
    check_pin_location(path, "open pinned object")
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
