"""One error hierarchy for the whole package.

Every failure that comes from the kernel is a :class:`BpfError` — an ``OSError``
with ``errno`` set — so callers can match on the kind (``except KeyNotFound``) or on
the errno (``e.errno == errno.ENOENT``) and never on message text.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "AssemblyError",
    "BpfError",
    "KeyExists",
    "KeyNotFound",
    "MapFull",
    "PermissionDenied",
    "ProgramError",
    "SockmapError",
    "StreamError",
    "UnsupportedSocket",
    "VerifierError",
    "VmError",
    "bpf_error",
    "errno_name",
    "hint",
]


class SockmapError(Exception):
    """Base of every error this package raises on purpose."""


class BpfError(SockmapError, OSError):
    """A ``bpf()`` call (or the userspace engine's equivalent) failed with ``errno``."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        name = errno_name(self.errno or 0)
        return f"[{name}] {self.strerror}"


class KeyNotFound(BpfError, KeyError):  # noqa: N818 - mirrors KeyError, reads as a kind
    """ENOENT: no such key (or no next key)."""

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return BpfError.__str__(self)


class KeyExists(BpfError):  # noqa: N818
    """EEXIST: update with NOEXIST on a key that holds a value."""


class MapFull(BpfError):  # noqa: N818
    """E2BIG: the key is past max_entries, or a hash map has no free slot."""


class PermissionDenied(BpfError, PermissionError):  # noqa: N818
    """EPERM/EACCES: bpf() refused; the message names the missing capability."""


class UnsupportedSocket(BpfError):  # noqa: N818
    """EOPNOTSUPP: this socket (type, family or state) cannot go into a sockmap."""


class VerifierError(BpfError):
    """The kernel's verifier (or the VM's validator) rejected a program; ``log`` says why."""

    def __init__(self, err: int, message: str, log: str = "") -> None:
        super().__init__(err, message)
        self.log = log

    def __str__(self) -> str:
        base = super().__str__()
        if not self.log:
            return base
        tail = "\n".join(self.log.rstrip().splitlines()[-20:])
        return f"{base}\nverifier log (last lines):\n{tail}"


class ProgramError(SockmapError, ValueError):
    """A program object is malformed before it ever reaches a kernel or VM."""


class AssemblyError(ProgramError):
    """The assembler could not encode, decode or parse an instruction."""


class VmError(SockmapError, RuntimeError):
    """The userspace eBPF VM stopped a program (bad access, budget exhausted...)."""


class StreamError(SockmapError, OSError):
    """A socket in a map failed (e.g. EMSGSIZE from the parser, EPIPE on send)."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)


ENOTSUPP = 524
"""The kernel-internal "operation not supported" some bpf() commands leak to user space."""


def errno_name(err: int) -> str:
    """The kernel's name for ``err`` (EOPNOTSUPP rather than Python's ENOTSUP alias)."""
    if err == _errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    if err == ENOTSUPP:
        return "ENOTSUPP"
    return _errno.errorcode.get(err, f"errno {err}")


_BY_ERRNO: dict[int, type[BpfError]] = {
    _errno.ENOENT: KeyNotFound,
    _errno.EEXIST: KeyExists,
    _errno.E2BIG: MapFull,
    _errno.EPERM: PermissionDenied,
    _errno.EACCES: PermissionDenied,
}

_HINTS: dict[int, str] = {
    _errno.EPERM: (
        "bpf() needs CAP_BPF (plus CAP_NET_ADMIN for socket programs) or root; "
        "run as root, grant the capabilities, or use the userspace engine"
    ),
    _errno.EACCES: "the kernel refused access; check capabilities and the program type",
    _errno.EBADF: "the file descriptor is not open; pass a live socket or map",
    _errno.EOPNOTSUPP: "this kernel does not support the operation on this object",
    _errno.E2BIG: "the key is out of range or the map is full; raise max_entries",
    _errno.ENOSPC: (
        "a socket map with value_size 4 cannot be read back; create it with value_size=8 "
        "to get socket cookies"
    ),
    _errno.EBUSY: "another program of that kind is already attached; detach it first",
    _errno.ENOSYS: "this kernel has no bpf() syscall",
    ENOTSUPP: "this kernel does not support that for this program or map type",
    _errno.ENOTSOCK: "the fd is not a socket; pass a socket object or a socket's fd",
}


def hint(err: int) -> str:
    """What to do about ``err``, in a few words (empty when there is nothing general to say)."""
    return _HINTS.get(err, "")


SOCKET_INSERT_HINT = (
    "only established or listening TCP, bound UDP and connected unix sockets may be "
    "inserted (and only TCP where a stream parser is attached); check the socket's type "
    "and state"
)


def bpf_error(
    err: int,
    what: str,
    extra_hint: str = "",
    cls: type[BpfError] | None = None,
) -> BpfError:
    """Build the typed error for a failed operation: kind by errno, text says what and what next."""
    cls = cls or _BY_ERRNO.get(err, BpfError)
    reason = "Operation not supported (kernel ENOTSUPP)" if err == ENOTSUPP else os.strerror(err)
    text = f"{what}: {reason}"
    advice = extra_hint or hint(err)
    if advice:
        text = f"{text} ({advice})"
    return cls(err, text)
