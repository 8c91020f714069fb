"""Loading programs (``BPF_PROG_LOAD``) with the verifier log on failure.

Loading is quiet first. Only when the kernel refuses is the program loaded again
with the verifier log, whose buffer grows on ENOSPC; the error then carries it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import ClassVar, Protocol

from sockmap._closeable import FdHandle
from sockmap.abi import BPF_OBJ_NAME_LEN, AttachType, Cmd, ProgType
from sockmap.errors import BpfError, VerifierError, bpf_error
from sockmap.kernel.info import ProgInfo, prog_info
from sockmap.kernel.syscall import address, bpf, buffer

__all__ = ["Encodable", "Prog", "load_program"]

_LOG_START = 64 * 1024
_LOG_MAX = 64 * 1024 * 1024
_NOT_VERIFIER = {errno.EPERM, errno.EBADF, errno.ENOMEM, errno.E2BIG, errno.ENOSYS}


class Encodable(Protocol):
    """What the loader needs of a program: ``sockmap.asm.Program`` satisfies it."""

    name: str

    def encode(self, map_fd: Callable[[object], int] | None = None) -> bytes: ...


def _resolve_map_fd(ref: object) -> int:
    fd = getattr(ref, "fd", ref)
    if isinstance(fd, int) and not isinstance(fd, bool):
        return fd
    raise TypeError(f"cannot resolve map reference {ref!r} to an fd; pass a map or an fd")


class Prog(FdHandle):
    """A loaded program. Close it (or use ``with``) to drop our reference; an attached or
    pinned program lives on in the kernel."""

    kind: ClassVar[str] = "program"

    def __init__(
        self,
        fd: int,
        prog_type: ProgType,
        name: str,
        insn_count: int,
        expected_attach_type: AttachType | None = None,
    ) -> None:
        super().__init__(fd)
        self.prog_type = prog_type
        self.name = name
        self.insn_count = insn_count
        self.expected_attach_type = expected_attach_type

    def info(self) -> ProgInfo:
        """What the kernel reports for this program (id, tag, maps used)."""
        return prog_info(self.fd)

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<Prog {self.name!r} {self.prog_type.name} {state} insns={self.insn_count}>"


def _prog_load(
    ptype: ProgType,
    insns: bytes,
    name: str,
    license_: bytes,
    attach: AttachType | None,
    log_level: int,
    log_size: int,
    what: str,
) -> tuple[int, int, str]:
    """One BPF_PROG_LOAD; returns (fd or -1, errno, log text)."""
    ibuf, lbuf = buffer(insns), buffer(license_ + b"\0")
    logbuf = buffer(log_size) if log_level else None
    try:
        fd, _ = bpf(
            Cmd.PROG_LOAD,
            "IIQQIIQII16sII",
            int(ptype),
            len(insns) // 8,
            address(ibuf),
            address(lbuf),
            log_level,
            log_size if log_level else 0,
            address(logbuf),
            0,
            0,
            name.encode()[: BPF_OBJ_NAME_LEN - 1],
            0,
            int(attach) if attach is not None else 0,
            what=what,
        )
    except BpfError as e:
        log = logbuf.value.decode("utf-8", "replace") if logbuf is not None else ""
        return -1, e.errno or errno.EINVAL, log
    return fd, 0, ""


def load_program(
    program: Encodable | bytes,
    prog_type: ProgType,
    *,
    name: str | None = None,
    license: str = "GPL",  # noqa: A002 - the kernel's own word for it
    expected_attach_type: AttachType | None = None,
    map_fd: Callable[[object], int] | None = None,
) -> Prog:
    """Load ``program`` as ``prog_type``; raise :class:`VerifierError` with the log if refused.

    ``program`` is an assembler program (its map references become fds via
    ``map_fd``, by default the referenced object's ``.fd``) or raw bytecode.
    """
    if isinstance(program, bytes | bytearray):
        insns, pname = bytes(program), name or ""
    else:
        insns, pname = program.encode(map_fd=map_fd or _resolve_map_fd), name or program.name
    if not insns or len(insns) % 8:
        raise VerifierError(
            errno.EINVAL,
            f"program {pname!r} is {len(insns)} bytes: not a whole number of 8-byte instructions",
        )
    pname = "".join(c if c.isalnum() or c == "_" else "_" for c in pname)
    what = f"load {prog_type.name} program {pname!r} ({len(insns) // 8} insns)"
    lic = license.encode()
    fd, err, _ = _prog_load(prog_type, insns, pname, lic, expected_attach_type, 0, 0, what)
    if fd >= 0:
        return Prog(fd, prog_type, pname, len(insns) // 8, expected_attach_type)
    if err in _NOT_VERIFIER:
        raise bpf_error(err, what)
    size = _LOG_START
    while True:
        fd, err2, log = _prog_load(
            prog_type, insns, pname, lic, expected_attach_type, 1, size, what
        )
        if fd >= 0:  # accepted on the second try (e.g. a transient ENOMEM): keep it
            return Prog(fd, prog_type, pname, len(insns) // 8, expected_attach_type)
        if err2 == errno.ENOSPC and size < _LOG_MAX:
            size *= 4
            continue
        break
    raise VerifierError(err, f"{what}: the verifier refused it: {_reason(log)}", log)


_STATS_PREFIXES = ("processed ", "verification time", "stack depth", "mark_precise")


def _reason(log: str) -> str:
    """The line of a verifier log that says why (the last one that is not a statistic)."""
    for line in reversed(log.strip().splitlines()):
        if line.strip() and not line.startswith(_STATS_PREFIXES):
            return line.strip()
    return "no log"
