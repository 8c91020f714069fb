"""Stream parsers: each returns the length of the next message (>0), 0 for "need more",
or a negative errno that stops the stream (the socket then reports that error).

Every parser here frames the message the strparser is working on, wherever it starts
in the segment the kernel shows it (see :func:`~sockmap.programs._parts.message_start`),
so the same bytecode frames the same messages on both engines.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Literal

from sockmap import asm
from sockmap.abi import Helper
from sockmap.asm import R0, R1, R2, R3, R4, R6, R7, R10
from sockmap.programs._parts import message_start, segment_length

__all__ = [
    "PRESETS",
    "LengthField",
    "fixed_size",
    "length_prefixed",
    "preset",
    "whole_segment",
]

INT_MAX = (1 << 31) - 1


def whole_segment() -> asm.Program:
    """Parser: everything received so far is one message (``skb->len`` minus where the
    message starts)."""
    return asm.Program(
        [
            asm.mov(R6, R1),
            *message_start(R7),
            segment_length(R0),
            asm.sub(R0, R7),
            asm.exit_(),
        ],
        name="whole_segment",
    )


def fixed_size(size: int) -> asm.Program:
    """Parser: every message is ``size`` bytes."""
    if not 0 < size <= INT_MAX:
        raise ValueError(f"message size {size} must be between 1 and {INT_MAX} bytes")
    return asm.Program([asm.mov(R0, size), asm.exit_()], name=f"fixed_{size}")


@dataclass(frozen=True)
class LengthField:
    """Where a message's length is and how to turn it into the message's size in bytes:
    ``size = field + adjust``, the field being ``width`` bytes at ``offset`` in ``order``."""

    width: Literal[1, 2, 4, 8] = 4
    order: Literal["big", "little"] = "big"
    adjust: int = 0
    offset: int = 0
    max_size: int | None = None
    """Messages over this many bytes stop the stream with EMSGSIZE (None: only the
    engines' own limit, the receive buffer)."""

    def __post_init__(self) -> None:
        if self.width not in (1, 2, 4, 8):
            raise ValueError(f"length field width must be 1, 2, 4 or 8 bytes, not {self.width}")
        if self.order not in ("big", "little"):
            raise ValueError(f"byte order must be 'big' or 'little', not {self.order!r}")
        if not 0 <= self.offset < 1 << 15:
            raise ValueError(f"length field offset {self.offset} must be in 0..32767")
        if not -(1 << 30) < self.adjust < 1 << 30:
            raise ValueError(f"length adjustment {self.adjust} is out of range (|adjust| < 2**30)")
        if self.max_size is not None and not 0 < self.max_size <= INT_MAX:
            raise ValueError(f"max_size {self.max_size} must be between 1 and {INT_MAX}")

    @property
    def header(self) -> int:
        """Bytes up to the end of the length field: no message can be shorter."""
        return self.offset + self.width

    def size_of(self, data: bytes) -> int:
        """What the parser answers for a message starting with ``data`` (plain Python; the
        reference the conformance tests hold both engines to)."""
        if len(data) < self.header:
            return 0
        field = int.from_bytes(data[self.offset : self.header], self.order)
        if field > 1 << 40:
            return -errno.EMSGSIZE
        size = field + self.adjust
        if size < self.header:
            return -errno.EBADMSG
        if size > (self.max_size or INT_MAX):
            return -errno.EMSGSIZE
        return size


def length_prefixed(
    width: Literal[1, 2, 4, 8] = 4,
    order: Literal["big", "little"] = "big",
    adjust: int = 0,
    offset: int = 0,
    max_size: int | None = None,
) -> asm.Program:
    """Parser: the message size is a ``width``-byte field at ``offset`` plus ``adjust``.

    E.g. a 4-byte big-endian length of the body that follows: ``adjust=4``. While the
    field has not fully arrived the parser answers 0 (need more). A size shorter than
    the header itself stops the stream with EBADMSG; a size over ``max_size`` (or
    2**31 - 1) with EMSGSIZE. See :class:`LengthField`.
    """
    return _length_program(LengthField(width, order, adjust, offset, max_size))


def _length_program(f: LengthField, name: str = "length_prefixed") -> asm.Program:
    width = {1: asm.B, 2: asm.H, 4: asm.W, 8: asm.DW}[f.width]
    items: list[asm.Item] = [
        asm.mov(R6, R1),
        *message_start(R7),
        asm.mov(R2, R7),
        *([asm.add(R2, f.offset)] if f.offset else []),
        asm.mov(R3, R10),
        asm.add(R3, -8),
        asm.mov(R4, f.width),
        asm.call(Helper.skb_load_bytes),  # (ctx, offset, to, len): -EFAULT if not all in yet
        asm.jne(R0, 0, "need_more"),
        asm.ldx(width, R0, R10, -8),
    ]
    if f.order == "big" and f.width > 1:
        items.append(asm.to_be(R0, f.width * 8))
    if f.width == 8:  # keep field + adjust clear of overflow
        items += [asm.ld_imm64(R1, 1 << 40), asm.jgt(R0, R1, "too_big")]
    if f.adjust:
        items.append(asm.add(R0, f.adjust))
    limit = f.max_size or INT_MAX
    items.append(asm.jslt(R0, f.header, "malformed"))
    # A field too narrow to reach the limit needs no check (an unreachable error
    # block would be refused, by the kernel's verifier and ours).
    checked = f.width == 8 or (1 << (8 * f.width)) - 1 + f.adjust > limit
    if checked:
        items.append(asm.jsgt(R0, limit, "too_big"))
    items += [
        asm.exit_(),
        asm.label("need_more"),
        asm.mov(R0, 0),
        asm.exit_(),
        asm.label("malformed"),
        asm.mov(R0, -errno.EBADMSG),
        asm.exit_(),
    ]
    if checked:
        items += [asm.label("too_big"), asm.mov(R0, -errno.EMSGSIZE), asm.exit_()]
    return asm.Program(items, name=name)


PRESETS: dict[str, LengthField] = {
    # RFC 7766: a 2-byte big-endian length of the DNS message that follows.
    "dns": LengthField(2, "big", adjust=2),
    # PostgreSQL protocol 3 (after the startup packet): a type byte, then a 4-byte
    # big-endian length that counts itself but not the type byte.
    "postgres": LengthField(4, "big", adjust=1, offset=1),
    # Kafka, and Thrift's framed transport: a 4-byte big-endian length of what follows.
    "kafka": LengthField(4, "big", adjust=4),
    "thrift": LengthField(4, "big", adjust=4),
    # memcached binary protocol: a 24-byte header whose total body length is the
    # 4-byte big-endian field at offset 8.
    "memcached-binary": LengthField(4, "big", adjust=24, offset=8),
}
"""Length fields of common protocols, by preset name."""


def preset(name: str, max_size: int | None = None) -> asm.Program:
    """The parser of a :data:`PRESETS` protocol, optionally with a size limit."""
    try:
        f = PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise ValueError(f"no parser preset {name!r}; presets: {known}") from None
    if max_size is not None:
        f = LengthField(f.width, f.order, f.adjust, f.offset, max_size)
    return _length_program(f, name=name.replace("-", "_"))
