"""The one place that calls ``bpf(2)``.

Attributes are packed with :mod:`struct` into a zeroed ``union bpf_attr`` buffer;
pointers are addresses of ctypes buffers that the caller keeps alive for the call.
Tests may replace :data:`bpf_call` with a fake (aya's "one seam").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import struct
from collections.abc import Callable

from sockmap.abi import Cmd
from sockmap.errors import bpf_error

__all__ = ["ATTR_SIZE", "Buffer", "address", "bpf", "bpf_call", "buffer"]

ATTR_SIZE = 144
"""Bytes passed as ``union bpf_attr``: large enough for every command used here."""

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "armv7l": 386, "i686": 357}

Buffer = ctypes.Array[ctypes.c_char]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


def _raw_bpf(cmd: int, attr: Buffer) -> tuple[int, int]:
    """Issue the syscall; return (result, errno) with errno 0 on success."""
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None:
        return -1, errno.ENOSYS
    res = _libc.syscall(nr, cmd, ctypes.addressof(attr), len(attr))
    if res < 0:
        return -1, ctypes.get_errno()
    return int(res), 0


bpf_call: Callable[[int, Buffer], tuple[int, int]] = _raw_bpf
"""The seam: ``(cmd, attr) -> (result, errno)``. Replace it to fake the kernel."""


def buffer(data: bytes | int) -> Buffer:
    """A ctypes buffer holding ``data`` (or that many zero bytes)."""
    if isinstance(data, int):
        return ctypes.create_string_buffer(data)
    return ctypes.create_string_buffer(data, len(data))


def address(buf: Buffer | None) -> int:
    """The address of ``buf`` for a pointer field (0 for None)."""
    return 0 if buf is None else ctypes.addressof(buf)


def bpf(
    cmd: Cmd,
    fmt: str,
    *fields: int | bytes,
    what: str,
    hints: dict[int, str] | None = None,
) -> tuple[int, Buffer]:
    """Call ``bpf(cmd)`` with an attr packed as ``fmt``; return (result, attr buffer).

    Raises the typed :class:`~sockmap.errors.BpfError` for the errno, with
    ``what`` naming the operation in the message and ``hints`` (errno -> advice)
    overriding the general advice for this operation.
    """
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("<" + fmt, attr, 0, *fields)
    res, err = bpf_call(int(cmd), attr)
    if err:
        raise bpf_error(err, what, (hints or {}).get(err, ""))
    return res, attr


def close_fd(fd: int) -> None:
    """Close a kernel object's fd, ignoring EBADF (already closed)."""
    try:
        os.close(fd)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise


_FD_MAX = 0x7FFF_FFFF  # the kernel refuses fds above S32_MAX with EINVAL


def check_fd(fd: object, what: str) -> int:
    """Validate an fd-like argument for ``what``: an int fd or an object with ``fileno()``."""
    if isinstance(fd, bool):
        raise TypeError(f"{what}: expected a socket or an fd, got a bool")
    if isinstance(fd, int):
        value = fd
    else:
        fileno = getattr(fd, "fileno", None)
        if fileno is None:
            raise TypeError(f"{what}: expected a socket or an fd, got {type(fd).__name__}")
        value = int(fileno())
    if value < 0:
        raise bpf_error(
            errno.EBADF,
            f"{what}: fd {value}",
            "the socket is closed (a closed socket has fd -1)",
        )
    if value > _FD_MAX:
        raise bpf_error(errno.EINVAL, f"{what}: fd {value}", "an fd is at most 2**31 - 1")
    return value
