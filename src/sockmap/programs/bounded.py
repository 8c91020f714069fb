"""A verdict that redirects with a bound on each target's redirect queue, holding
sources by SK_PASS instead of dropping or removing them.

The kernel's redirect queue has no backpressure; a passed message is charged to
the source's receive memory, so TCP flow control slows its sender (see
docs/semantics.md). This verdict is the kernel half of the bounded datapath
(docs/ARCHITECTURE.md); a control plane does the rest. It is meant for
verdict-only mode, where ``skb->len`` is the message: in strparser mode every
message's verdict sees the whole segment, so the counts would be wrong.

Maps, all indexed by sockmap key except ``routes``:

- ``routes``: HASH, u64 socket cookie -> :data:`ROUTE` (own key, target key).
- ``stats``: ARRAY of :data:`STATS`, written by the verdict: ``held`` (1 while the
  socket, as a source, passes everything), ``passed`` (bytes it passed to its own
  queue), ``inflow`` (bytes redirected into the socket, as a target).
- ``control``: ARRAY of :data:`CONTROL`, written by the control plane:
  ``release`` (hand a held source back to the kernel once ``passed`` equals
  ``release - 1``; 0: no release asked), ``written`` (bytes the kernel has put
  into the socket's send queue, as last published: ``bytes_acked + SIOCOUTQ``
  minus what the control plane wrote itself), ``paused`` (nonzero: hold every
  source whose next message would be redirected into this socket).

A message is redirected only when the source is not held, the target is not
paused, and ``inflow - written + len <= bound``; otherwise the source becomes
held and the message, like every later one, is passed. A held source is released
only at a message boundary where every byte it passed has been taken by the
control plane (``passed == release - 1``): the verdict runs serialised per
socket, so no passed byte can be overtaken by a redirected one.
"""

from __future__ import annotations

import struct

from sockmap import asm
from sockmap.abi import SK_BUFF, Helper, SkAction
from sockmap.asm import R0, R1, R2, R3, R4, R6, R7, R8, R9, R10
from sockmap.programs._parts import lookup_by_cookie

__all__ = ["CONTROL", "ROUTE", "STATS", "bounded_redirect"]

ROUTE = struct.Struct("<II")
"""routes value: (own key, target key)."""
STATS = struct.Struct("<QQQ")
"""stats value: (held, passed, inflow)."""
CONTROL = struct.Struct("<QQQ")
"""control value: (release, written, paused)."""

_HELD, _PASSED, _INFLOW = 0, 8, 16
_RELEASE, _WRITTEN, _PAUSED = 0, 8, 16


def _lookup(array: object, key_reg: asm.Reg, *, slot: int) -> list[asm.Item]:
    """``r0 = &array[key_reg]`` via the stack word at ``slot``; clobbers r1-r5."""
    return [
        asm.stx(asm.W, R10, key_reg, slot),
        asm.ld_map_fd(R1, array),
        asm.mov(R2, R10),
        asm.add(R2, slot),
        asm.call(Helper.map_lookup_elem),
    ]


def bounded_redirect(
    sockmap: object,
    routes: object,
    stats: object,
    control: object,
    *,
    bound: int = 1 << 20,
) -> asm.Program:
    """Verdict: redirect to the route's target while its queue stays within ``bound``.

    A socket with no route passes its messages to itself (nothing is dropped).
    """
    if not 0 < bound < 1 << 31:
        raise ValueError(f"queue bound {bound} must be between 1 and 2**31 - 1 bytes")
    # Registers: r6 ctx, r7 len, r8 &stats[own], r9 &control[own] then scratch.
    # Stack: -8 cookie, -12 own key, -16 target key, -24 &stats[target].
    return asm.Program(
        [
            asm.mov(R6, R1),
            asm.ldx(asm.W, R7, R1, SK_BUFF.offset("len")),
            *lookup_by_cookie(routes),
            asm.jeq(R0, 0, "pass_plain"),
            asm.ldx(asm.W, R1, R0, 0),
            asm.stx(asm.W, R10, R1, -12),
            asm.ldx(asm.W, R1, R0, 4),
            asm.stx(asm.W, R10, R1, -16),
            asm.ldx(asm.W, R3, R10, -12),
            *_lookup(stats, R3, slot=-12),
            asm.jeq(R0, 0, "pass_plain"),
            asm.mov(R8, R0),
            asm.ldx(asm.W, R3, R10, -12),
            *_lookup(control, R3, slot=-12),
            asm.jeq(R0, 0, "pass_plain"),
            asm.mov(R9, R0),
            # A held source stays held until the control plane has taken every passed byte.
            asm.ldx(asm.DW, R1, R8, _HELD),
            asm.jeq(R1, 0, "open"),
            asm.ldx(asm.DW, R2, R9, _RELEASE),
            asm.jeq(R2, 0, "pass"),
            asm.ldx(asm.DW, R3, R8, _PASSED),
            asm.add(R3, 1),
            asm.jne(R2, R3, "pass"),
            asm.st(asm.DW, R8, _HELD, 0),
            asm.label("open"),
            asm.ldx(asm.W, R3, R10, -16),
            *_lookup(stats, R3, slot=-16),
            asm.jeq(R0, 0, "hold"),
            asm.stx(asm.DW, R10, R0, -24),
            asm.ldx(asm.W, R3, R10, -16),
            *_lookup(control, R3, slot=-16),
            asm.jeq(R0, 0, "hold"),
            asm.ldx(asm.DW, R1, R0, _PAUSED),
            asm.jne(R1, 0, "hold"),
            asm.ldx(asm.DW, R1, R0, _WRITTEN),
            asm.ldx(asm.DW, R9, R10, -24),
            asm.ldx(asm.DW, R2, R9, _INFLOW),
            asm.sub(R2, R1),
            asm.add(R2, R7),
            asm.jsgt(R2, bound, "hold"),
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, sockmap),
            asm.ldx(asm.W, R3, R10, -16),
            asm.mov(R4, 0),
            asm.call(Helper.sk_redirect_map),
            asm.jne(R0, SkAction.PASS, "hold"),  # no socket at the target key: keep the bytes
            asm.ldx(asm.DW, R9, R10, -24),
            asm.atomic_add(asm.DW, R9, R7, _INFLOW),
            asm.exit_(),
            asm.label("hold"),
            asm.st(asm.DW, R8, _HELD, 1),
            asm.label("pass"),
            asm.atomic_add(asm.DW, R8, R7, _PASSED),
            asm.label("pass_plain"),
            asm.mov(R0, SkAction.PASS),
            asm.exit_(),
        ],
        name="bounded_redirect",
    )
