"""Attaching SK_SKB / SK_MSG programs to socket maps (``BPF_PROG_ATTACH``/``DETACH``/``QUERY``).

Programs are taken by a socket when it is inserted: attach first, then insert.
"""

from __future__ import annotations

import errno
import struct

from sockmap.abi import AttachType, Cmd
from sockmap.kernel.maps import Map
from sockmap.kernel.programs import Prog
from sockmap.kernel.syscall import address, bpf, buffer

__all__ = ["attach", "detach", "query"]

_ATTACH_HINTS = {
    AttachType.SK_SKB_STREAM_PARSER: "stream parser",
    AttachType.SK_SKB_STREAM_VERDICT: "stream verdict",
    AttachType.SK_SKB_VERDICT: "verdict (no strparser)",
    AttachType.SK_MSG_VERDICT: "sk_msg verdict",
}


_HINTS = {
    errno.EOPNOTSUPP: "programs attach only to a SOCKMAP or SOCKHASH",
    errno.EINVAL: "the program type does not fit the attach type (SK_SKB for parser and "
    "verdicts, SK_MSG for sk_msg verdicts)",
    errno.EBUSY: (
        "a stream verdict and a verdict-only program cannot both be attached; detach it first"
    ),
    errno.ENOENT: "that program is not attached there",
}


def _label(m: Map, prog: Prog, kind: AttachType, prep: str) -> str:
    mname = f" {m.name!r}" if m.name else ""
    return f"{_ATTACH_HINTS.get(kind, kind.name)} program {prog.name!r} {prep} {m.kind}{mname}"


def attach(m: Map, prog: Prog, kind: AttachType, flags: int = 0) -> None:
    """Attach ``prog`` to map ``m`` as ``kind`` (parser, verdict, sk_msg...)."""
    bpf(
        Cmd.PROG_ATTACH,
        "IIIII",
        m.fd,
        prog.fd,
        int(kind),
        flags,
        0,
        what=f"attach {_label(m, prog, kind, 'to')}",
        hints=_HINTS,
    )


def detach(m: Map, prog: Prog, kind: AttachType) -> None:
    """Detach ``prog`` from ``m``; today's kernel needs the program to name it."""
    bpf(
        Cmd.PROG_DETACH,
        "IIIII",
        m.fd,
        prog.fd,
        int(kind),
        0,
        0,
        what=f"detach {_label(m, prog, kind, 'from')}",
        hints=_HINTS,
    )


def query(m: Map, kind: AttachType, max_progs: int = 8) -> list[int]:
    """Ids of the programs attached to ``m`` as ``kind``."""
    ids = buffer(4 * max_progs)
    _, attr = bpf(
        Cmd.PROG_QUERY,
        "IIIIQI",
        m.fd,
        int(kind),
        0,
        0,
        address(ids),
        max_progs,
        what=f"query {kind.name} programs of {m.kind} {m.name!r}",
    )
    count = struct.unpack_from("<I", attr, 24)[0]
    return list(struct.unpack_from(f"<{min(count, max_progs)}I", ids.raw))
