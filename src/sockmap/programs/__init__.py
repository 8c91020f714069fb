"""Ready-made SK_SKB programs, returned as assembler programs.

Parsers return the length of the next message (>0), 0 for "need more", <0 for an
error. Verdicts return SK_PASS/SK_DROP, after choosing a redirect target for SK_PASS
to mean "redirect".
"""

from __future__ import annotations

from typing import Literal

from sockmap import asm
from sockmap.abi import BPF_F_INGRESS, SK_BUFF, Helper, SkAction
from sockmap.asm import R0, R1, R2, R3, R4, R6, R10
from sockmap.programs._parts import lookup_by_cookie
from sockmap.programs.bounded import bounded_redirect

__all__ = [
    "bounded_redirect",
    "drop",
    "length_prefixed",
    "pass_",
    "redirect_key",
    "redirect_peer",
    "whole_segment",
]


def whole_segment() -> asm.Program:
    """Parser: every received segment is one message (``r0 = skb->len``)."""
    return asm.Program(
        [asm.ldx(asm.W, R0, R1, SK_BUFF.offset("len")), asm.exit_()],
        name="whole_segment",
    )


def length_prefixed(
    size: Literal[1, 2, 4] = 4,
    order: Literal["big", "little"] = "big",
    adjust: int = 0,
    offset: int = 0,
) -> asm.Program:
    """Parser: the message length is a ``size``-byte field at ``offset`` plus ``adjust``.

    E.g. a 4-byte big-endian length of the body that follows: ``adjust=4``. While the
    field has not fully arrived the parser answers 0 (need more).

    On the kernel engine this frames only the first message of each received segment:
    the kernel shows a BPF parser the segment from its start, not the message (see
    docs/semantics.md). The userspace engine frames every message.
    """
    if size not in (1, 2, 4):
        raise ValueError(f"length field size must be 1, 2 or 4 bytes, not {size}")
    if not 0 <= offset < 1 << 15:
        raise ValueError(f"length field offset {offset} is out of range")
    width = {1: asm.B, 2: asm.H, 4: asm.W}[size]
    items: list[asm.Item] = [
        asm.mov(R2, offset),
        asm.mov(R3, R10),
        asm.add(R3, -8),
        asm.mov(R4, size),
        asm.call(Helper.skb_load_bytes),  # (ctx, offset, to, len): -EFAULT if not all in yet
        asm.jne(R0, 0, "need_more"),
        asm.ldx(width, R0, R10, -8),
    ]
    if order == "big" and size > 1:
        items.append(asm.to_be(R0, size * 8))
    if adjust:
        items.append(asm.add(R0, adjust))
    items += [asm.exit_(), asm.label("need_more"), asm.mov(R0, 0), asm.exit_()]
    return asm.Program(items, name="length_prefixed")


def pass_() -> asm.Program:
    """Verdict: deliver every message to the socket's own receive queue."""
    return asm.Program([asm.mov(R0, SkAction.PASS), asm.exit_()], name="pass")


def drop() -> asm.Program:
    """Verdict: drop every message."""
    return asm.Program([asm.mov(R0, SkAction.DROP), asm.exit_()], name="drop")


def _flags(ingress: bool) -> int:
    return BPF_F_INGRESS if ingress else 0


def redirect_key(sockmap: object, key: int, *, ingress: bool = False) -> asm.Program:
    """Verdict: redirect every message to the socket at ``key`` of ``sockmap``."""
    return asm.Program(
        [
            asm.ld_map_fd(R2, sockmap),
            asm.mov(R3, key),
            asm.mov(R4, _flags(ingress)),
            asm.call(Helper.sk_redirect_map),
            asm.exit_(),
        ],
        name="redirect_key",
    )


def redirect_peer(sockmap: object, peers: object, *, ingress: bool = False) -> asm.Program:
    """Verdict: redirect to the key that ``peers`` (u64 socket cookie -> u32 key) names.

    A message from a socket with no entry in ``peers`` is dropped.
    """
    return asm.Program(
        [
            asm.mov(R6, R1),
            *lookup_by_cookie(peers),
            asm.jeq(R0, 0, "no_peer"),
            asm.ldx(asm.W, R3, R0, 0),
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, sockmap),
            asm.mov(R4, _flags(ingress)),
            asm.call(Helper.sk_redirect_map),
            asm.exit_(),
            asm.label("no_peer"),
            asm.mov(R0, SkAction.DROP),
            asm.exit_(),
        ],
        name="redirect_peer",
    )
