"""Instruction sequences the ready-made programs share."""

from __future__ import annotations

from typing import Literal

from sockmap import asm
from sockmap.abi import BPF_F_INGRESS, SK_BUFF, Helper
from sockmap.abi.internals import program_internals
from sockmap.asm import R0, R1, R2, R3, R4, R6, R10

__all__ = [
    "VerdictMode",
    "lookup_by_cookie",
    "message_length",
    "message_start",
    "redirect_tail",
    "segment_length",
    "strparser_view",
    "verdict_message_start",
]


def lookup_by_cookie(table: object) -> list[asm.Item]:
    """``r0 = &table[cookie of the socket in r1]`` (or 0); the cookie stays at r10-8.

    Expects the context in r1; clobbers r1-r5.
    """
    return [
        asm.call(Helper.get_socket_cookie),
        asm.stx(asm.DW, R10, R0, -8),
        asm.ld_map_fd(R1, table),
        asm.mov(R2, R10),
        asm.add(R2, -8),
        asm.call(Helper.map_lookup_elem),
    ]


def strparser_view() -> bool:
    """Whether programs can see the strparser's message offset and length on this kernel
    (the kfunc ``bpf_cast_to_kern_ctx``, Linux 6.3+, and readable BTF)."""
    return program_internals() is not None


def message_start(dst: asm.Reg) -> list[asm.Item]:
    """``dst = where the message starts in the skb``, for a stream parser: the strparser's
    ``offset``, read through ``bpf_cast_to_kern_ctx``. Expects the context in r1 and r6;
    clobbers r0-r5 and restores r1 from r6.

    The kernel shows a BPF parser the whole segment, and the message being framed may
    start anywhere in it; the userspace engine shows the message itself (offset 0).
    Where the kernel has no such kfunc, ``dst = 0``: only the first message of each
    segment is then framed right on that kernel (docs/semantics.md).
    """
    k = program_internals()
    if k is None:
        return [asm.mov(dst, 0)]
    return [
        asm.call_kfunc(k.kfunc_cast_to_kern_ctx),
        asm.ldx(asm.W, dst, R0, k.skb_strp_offset),
        asm.mov(R1, R6),
    ]


def segment_length(dst: asm.Reg) -> asm.Item:
    """``dst = skb->len`` of the context in r6."""
    return asm.ldx(asm.W, dst, R6, SK_BUFF.offset("len"))


VerdictMode = Literal["strparser", "verdict"]


def verdict_message_start(dst: asm.Reg, mode: VerdictMode) -> list[asm.Item]:
    """``dst = where the message starts in the skb`` a verdict sees (context in r1 and r6;
    clobbers r0-r5, restores r1).

    In strparser mode the kernel hands the verdict the segment the message ended in,
    the message starting at the strparser's ``offset``; with no parser (verdict-only
    mode) the message is the segment. Both engines' VMs start the message at 0.
    """
    if mode == "verdict":
        return [asm.mov(dst, 0)]
    return message_start(dst)


def message_length(dst: asm.Reg, mode: VerdictMode) -> list[asm.Item]:
    """``dst = length of the message`` a verdict decides on (context in r1 and r6; clobbers
    r0-r5, restores r1).

    Verdict-only mode: ``skb->len``. Strparser mode: the strparser's ``full_len``, read
    through ``bpf_cast_to_kern_ctx`` (``skb->len`` is the whole segment there); where
    the kernel has no such kfunc, ``skb->len``, right only for a message alone in its
    segment.
    """
    k = program_internals()
    if mode == "verdict" or k is None:
        return [asm.ldx(asm.W, dst, R6, SK_BUFF.offset("len"))]
    return [
        asm.call_kfunc(k.kfunc_cast_to_kern_ctx),
        asm.ldx(asm.W, dst, R0, k.skb_strp_full_len),
        asm.mov(R1, R6),
    ]


def redirect_tail(sockmap: object, key: asm.Reg, *, ingress: bool) -> list[asm.Item]:
    """``return bpf_sk_redirect_map(ctx in r6, sockmap, key, flags)``."""
    return [
        asm.mov(R3, key),
        asm.mov(R1, R6),
        asm.ld_map_fd(R2, sockmap),
        asm.mov(R4, BPF_F_INGRESS if ingress else 0),
        asm.call(Helper.sk_redirect_map),
        asm.exit_(),
    ]
