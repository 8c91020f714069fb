"""Stream verdicts: SK_PASS (to the socket itself), SK_DROP, or a redirect to a socket of
a sockmap (SK_PASS after ``bpf_sk_redirect_map``; a redirect to an empty key drops).

Every redirect verdict takes ``ingress``: False sends the message out of the target
socket (to its peer), True queues it on the target's receive side. Verdicts that read
the message take ``mode``: the kernel shows a strparser-mode verdict the segment the
message ended in, so they need to know where the message starts (see
:func:`~sockmap.programs._parts.verdict_message_start`).
"""

from __future__ import annotations

from typing import Literal

from sockmap import asm
from sockmap.abi import Helper, SkAction
from sockmap.asm import R0, R1, R2, R3, R4, R6, R7, R10
from sockmap.programs._parts import (
    VerdictMode,
    lookup_by_cookie,
    message_length,
    redirect_tail,
    verdict_message_start,
)

__all__ = [
    "FNV_BASIS",
    "drop",
    "field_route",
    "fnv1a",
    "hash_route",
    "pair",
    "pass_",
    "redirect_key",
    "redirect_peer",
    "round_robin",
]

FNV_BASIS = 2166136261
_FNV_PRIME = 16777619
_MAX_HASH_BYTES = 64


def fnv1a(data: bytes) -> int:
    """32-bit FNV-1a, the hash :func:`hash_route` computes in the program."""
    h = FNV_BASIS
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def pass_() -> asm.Program:
    """Verdict: deliver every message to the socket's own receive queue."""
    return asm.Program([asm.mov(R0, SkAction.PASS), asm.exit_()], name="pass")


def drop() -> asm.Program:
    """Verdict: drop every message."""
    return asm.Program([asm.mov(R0, SkAction.DROP), asm.exit_()], name="drop")


def _key(key: int, what: str = "key") -> int:
    if not 0 <= key < 1 << 31:
        raise ValueError(f"sockmap {what} {key} must be between 0 and 2**31 - 1")
    return key


def redirect_key(sockmap: object, key: int, *, ingress: bool = False) -> asm.Program:
    """Verdict: redirect every message to the socket at ``key`` of ``sockmap``."""
    return asm.Program(
        [asm.mov(R6, R1), asm.mov(R7, _key(key)), *redirect_tail(sockmap, R7, ingress=ingress)],
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
            asm.ldx(asm.W, R7, R0, 0),
            *redirect_tail(sockmap, R7, ingress=ingress),
            asm.label("no_peer"),
            asm.mov(R0, SkAction.DROP),
            asm.exit_(),
        ],
        name="redirect_peer",
    )


def pair(sockmap: object, keys: object, *, ingress: bool = False) -> asm.Program:
    """Verdict: redirect to the socket's partner, the key ``own key ^ 1`` (0<->1, 2<->3...).

    ``keys`` maps a socket's cookie (u64) to its own key (u32) -- a sockmap program
    cannot see the key it was inserted under. Sockets with no entry are dropped.
    """
    return asm.Program(
        [
            asm.mov(R6, R1),
            *lookup_by_cookie(keys),
            asm.jeq(R0, 0, "unknown"),
            asm.ldx(asm.W, R7, R0, 0),
            asm.xor(R7, 1),
            *redirect_tail(sockmap, R7, ingress=ingress),
            asm.label("unknown"),
            asm.mov(R0, SkAction.DROP),
            asm.exit_(),
        ],
        name="pair",
    )


def round_robin(
    sockmap: object, counter: object, n: int, *, first: int = 0, ingress: bool = False
) -> asm.Program:
    """Verdict: message ``i`` (counted across every socket sharing ``counter``) goes to key
    ``first + i % n``.

    ``counter`` is an ARRAY with at least one u64 value (index 0), incremented
    atomically.
    """
    if not 0 < n < 1 << 31:
        raise ValueError(f"round robin over {n} keys: n must be between 1 and 2**31 - 1")
    _key(first + n - 1, "key range end")
    return asm.Program(
        [
            asm.mov(R6, R1),
            *next_count(counter, "no_counter"),
            asm.mod(R7, n),
            asm.add(R7, _key(first, "first key")),
            *redirect_tail(sockmap, R7, ingress=ingress),
            asm.label("no_counter"),
            asm.mov(R0, SkAction.DROP),
            asm.exit_(),
        ],
        name="round_robin",
    )


def next_count(counter: object, miss: str) -> list[asm.Item]:
    """``r7 = counter[0]++`` (atomically; an ARRAY of u64), or jump to ``miss`` when the
    map has no index 0. Clobbers r0-r5."""
    return [
        asm.st(asm.W, R10, -4, 0),
        asm.ld_map_fd(R1, counter),
        asm.mov(R2, R10),
        asm.add(R2, -4),
        asm.call(Helper.map_lookup_elem),
        asm.jeq(R0, 0, miss),
        asm.mov(R7, 1),
        asm.atomic_add(asm.DW, R0, R7, 0, fetch=True),
    ]


def _load_message_bytes(start: int, length: int, mode: VerdictMode, slot: int) -> list[asm.Item]:
    """Copy ``length`` message bytes from ``start`` to the stack at r10+slot; r0 = 0 if the
    message holds them all (context in r1 and r6; clobbers r0-r5, r7).

    The kernel may show a verdict more than the message (the rest of the segment), so
    the message's own length is checked first.
    """
    return [
        *message_length(R7, mode),
        asm.mov(R0, 1),
        asm.jlt(R7, start + length, "loaded"),
        *verdict_message_start(R7, mode),
        asm.mov(R2, R7),
        asm.add(R2, start),
        asm.mov(R1, R6),
        asm.mov(R3, R10),
        asm.add(R3, slot),
        asm.mov(R4, length),
        asm.call(Helper.skb_load_bytes),
        asm.label("loaded"),
    ]


def _byte_range(start: int, length: int, limit: int) -> None:
    if not 0 <= start < 1 << 15:
        raise ValueError(f"byte range start {start} must be in 0..32767")
    if not 0 < length <= limit:
        raise ValueError(f"byte range length {length} must be between 1 and {limit}")


def hash_route(
    sockmap: object,
    start: int,
    length: int,
    n: int,
    *,
    first: int = 0,
    mode: VerdictMode = "verdict",
    ingress: bool = False,
) -> asm.Program:
    """Verdict: redirect to key ``first + fnv1a(message[start:start+length]) % n``.

    Messages with the same bytes there go to the same key. A message too short to hold
    the range hashes as if the range were empty (``FNV_BASIS``): it is still delivered.
    """
    if not 0 < n < 1 << 31:
        raise ValueError(f"hash over {n} keys: n must be between 1 and 2**31 - 1")
    _key(first + n - 1, "key range end")
    return asm.Program(
        [
            asm.mov(R6, R1),
            *fnv_of_range(start, length, mode),
            asm.mod32(R0, n),
            asm.mov(R7, R0),
            asm.add(R7, first),
            *redirect_tail(sockmap, R7, ingress=ingress),
        ],
        name="hash_route",
    )


def fnv_of_range(start: int, length: int, mode: VerdictMode) -> list[asm.Item]:
    """``r0 = fnv1a(message[start:start+length])``, or ``FNV_BASIS`` when the message is too
    short (context in r1 and r6; clobbers r0-r5, r7 and the stack at r10-64..r10-1)."""
    _byte_range(start, length, _MAX_HASH_BYTES)
    slot = -_MAX_HASH_BYTES
    items: list[asm.Item] = [
        *_load_message_bytes(start, length, mode, slot),
        asm.mov(R3, R0),
        asm.mov32(R0, FNV_BASIS),
        asm.jne(R3, 0, "hashed"),
    ]
    for i in range(length):
        items += [
            asm.ldx(asm.B, R1, R10, slot + i),
            asm.xor32(R0, R1),
            asm.mul32(R0, _FNV_PRIME),
        ]
    return [*items, asm.label("hashed")]


def field_route(
    sockmap: object,
    table: object,
    start: int,
    width: Literal[1, 2, 4, 8],
    *,
    order: Literal["big", "little"] = "big",
    default: int | None = None,
    mode: VerdictMode = "verdict",
    ingress: bool = False,
) -> asm.Program:
    """Verdict: read a ``width``-byte field at ``start`` of the message, look its value up in
    ``table`` (HASH, u64 value -> u32 key) and redirect to that key.

    A value not in ``table``, or a message too short to hold the field, goes to
    ``default`` (or is dropped when ``default`` is None).
    """
    items: list[asm.Item] = [
        asm.mov(R6, R1),
        *field_lookup(table, start, width, order, mode, "miss"),
        asm.ldx(asm.W, R7, R0, 0),
        *redirect_tail(sockmap, R7, ingress=ingress),
        asm.label("miss"),
    ]
    if default is None:
        items += [asm.mov(R0, SkAction.DROP), asm.exit_()]
    else:
        items += [
            asm.mov(R7, _key(default, "default key")),
            *redirect_tail(sockmap, R7, ingress=ingress),
        ]
    return asm.Program(items, name="field_route")


def field_lookup(
    table: object,
    start: int,
    width: Literal[1, 2, 4, 8],
    order: Literal["big", "little"],
    mode: VerdictMode,
    miss: str,
) -> list[asm.Item]:
    """``r0 = &table[field]`` for the ``width``-byte field at ``start`` of the message (a
    u64 key), or jump to ``miss`` when the message is too short or the value is not in
    ``table`` (context in r1 and r6; clobbers r0-r5, r7 and r10-16..r10-9)."""
    _byte_range(start, width, 8)
    if width not in (1, 2, 4, 8):
        raise ValueError(f"field width must be 1, 2, 4 or 8 bytes, not {width}")
    size = {1: asm.B, 2: asm.H, 4: asm.W, 8: asm.DW}[width]
    items: list[asm.Item] = [
        asm.st(asm.DW, R10, -16, 0),
        *_load_message_bytes(start, width, mode, -16),
        asm.jne(R0, 0, miss),
        asm.ldx(size, R1, R10, -16),
    ]
    if order == "big" and width > 1:
        items.append(asm.to_be(R1, width * 8))
    return [
        *items,
        asm.stx(asm.DW, R10, R1, -16),
        asm.ld_map_fd(R1, table),
        asm.mov(R2, R10),
        asm.add(R2, -16),
        asm.call(Helper.map_lookup_elem),
        asm.jeq(R0, 0, miss),
    ]
