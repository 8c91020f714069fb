"""A verdict that redirects while each target's in-kernel backlog stays within a bound, and
holds sources by SK_PASS past it instead of dropping or removing them.

The kernel's redirect queue has no backpressure; a passed message is charged to
the source's receive memory, so TCP flow control slows its sender (see
docs/semantics.md). This verdict is the kernel half of the bounded datapath; the
control plane (:mod:`sockmap.datapath.bounded`) does the rest.

The verdict sees the target's backlog itself, without any polling: it looks the
target up in the sockmap, casts it with ``bpf_skc_to_tcp_sock`` and reads
``bytes_acked``. Everything redirected into the target plus everything the
control plane wrote into it, minus what the target's peer has acknowledged, is
exactly what the kernel still holds for that target (redirect queue + send
queue)::

    backlog(T) = inflow(T) + user_written(T) - bytes_acked(T)

A message is redirected only when ``backlog + len <= bound``. The ``tcp_sock``
offsets come from the running kernel's BTF (:mod:`sockmap.abi.internals`); the
program is built for the kernel it is loaded into, and needs CAP_PERFMON (or
root) to read a BTF pointer.

The message length is ``skb->len`` in verdict-only mode. In strparser mode the
kernel shows the verdict the whole segment, so the length is read from the
strparser's ``full_len`` through the kfunc ``bpf_cast_to_kern_ctx``.

Maps, all indexed by sockmap key except ``routes``:

- ``routes``: HASH, u64 socket cookie -> :data:`ROUTE` (own key, target key).
- ``stats``: ARRAY of :data:`STATS`, written only by the verdict: ``held`` (1 while
  the socket, as a source, passes everything), ``passed`` (bytes it passed to its
  own queue), ``inflow`` (bytes redirected into the socket, as a target),
  ``holds`` (messages held because this socket, as a target, was full or paused).
- ``control``: ARRAY of :data:`CONTROL`, written only by the control plane:
  ``release`` (hand a held source back to the kernel once ``passed`` equals
  ``release - 1``; 0: none asked), ``user_written`` (bytes the control plane wrote
  into the socket itself, published before they are written), ``pause``
  (nonzero: hold every message for this target), ``resumed`` (the ``holds``
  count the control plane has dealt with: the target also counts as paused
  while ``holds != resumed``).

Holding a source for target T pauses T for every source, so once T's redirect
queue is empty the control plane is T's only writer and can forward held bytes
without interleaving them with the kernel's. A held source is released only at
a message boundary where the control plane has taken every byte it passed
(``passed == release - 1``): the verdict runs serialised per socket, so no
passed byte can be overtaken by a redirected one. The verdict reserves a
message's bytes in ``inflow`` before it looks at ``pause`` (and gives them back
if it then holds), so a control plane that sets ``pause`` and then sees
``inflow`` equal to what has entered T knows no redirect is on its way.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from sockmap import asm
from sockmap.abi import Helper, SkAction
from sockmap.abi.internals import internals, program_internals
from sockmap.asm import R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10
from sockmap.errors import SockmapError
from sockmap.programs._parts import VerdictMode, lookup_by_cookie, message_length, strparser_view

__all__ = ["CONTROL", "ROUTE", "STATS", "Stats", "bounded_redirect", "zero_stats"]

ROUTE = struct.Struct("<II")
"""routes value: (own key, target key)."""
STATS = struct.Struct("<QQQQQQQQQQ")
"""stats value: (held, passed, inflow, holds, last_end, repeats, overlaps, skip_at,
skip_len, trims)."""


class Stats(NamedTuple):
    """One socket's ``stats`` entry (see the module docstring)."""

    held: int
    passed: int
    inflow: int
    holds: int
    last_end: int
    """``1 << 32 | end_seq`` of the last segment this socket's verdict saw (0: none yet)."""
    repeats: int
    """Segments the kernel handed the verdict a second time (dropped: see below)."""
    overlaps: int
    """Segments that partly repeated bytes already seen. The first one in a while is
    held and trimmed by the control plane (``skip_at``, ``skip_len``); one that comes
    while a trim is still pending makes the control plane reset the pair."""
    skip_at: int
    """Offset in this socket's passed bytes where ``skip_len`` repeated bytes start."""
    skip_len: int
    """Repeated bytes the control plane must drop at ``skip_at``."""
    trims: int
    """Trims asked for; one is pending while this differs from the control plane's
    ``trimmed``."""

    @classmethod
    def read(cls, stats: object, key: int) -> Stats:
        return cls._make(STATS.unpack(stats.lookup(key)))  # type: ignore[attr-defined]


def zero_stats() -> bytes:
    return STATS.pack(*([0] * 10))


CONTROL = struct.Struct("<QQQQQ")
"""control value: (release, user_written, pause, resumed, trimmed)."""

_HELD, _PASSED, _INFLOW, _HOLDS, _LAST_END, _REPEATS, _OVERLAPS = 0, 8, 16, 24, 32, 40, 48
_SKIP_AT, _SKIP_LEN, _TRIMS = 56, 64, 72
_RELEASE, _USER_WRITTEN, _PAUSE, _RESUMED, _TRIMMED = 0, 8, 16, 24, 32
# Stack: -8 cookie, -12 own key, -16 target key, -24 &stats[T], -32 &control[T], -40 acked.
_OWN, _TARGET, _TSTATS, _TCONTROL, _ACKED = -12, -16, -24, -32, -40

Mode = VerdictMode


def _lookup(array: object, slot: int) -> list[asm.Item]:
    """``r0 = &array[u32 at r10+slot]``; clobbers r1-r5."""
    return [
        asm.ld_map_fd(R1, array),
        asm.mov(R2, R10),
        asm.add(R2, slot),
        asm.call(Helper.map_lookup_elem),
    ]


def _skip_repeats() -> list[asm.Item]:
    """Drop a segment whose bytes this verdict has already seen (r6 ctx, r8 &stats[own],
    r9 &control[own]; clobbers r0-r5, restores r1).

    On Linux 6.18, when a verdict-only socket's verdict alternates between passing
    messages to the socket and redirecting them while the application reads the
    passed ones, the kernel now and then runs the verdict twice on one segment, and
    both copies are delivered (docs/semantics.md). The TCP sequence numbers in the
    segment's control block (read through ``bpf_cast_to_kern_ctx``) tell a repeat
    from new bytes: a segment ending at or before the last end seen is dropped and
    counted. One that starts inside seen bytes cannot be trimmed by a verdict, so it
    is passed (holding the source) and the control plane drops its repeated head
    when it moves the passed bytes (``skip_at``, ``skip_len``).
    """
    k = program_internals()
    if k is None:
        return []
    cb = k.skb_cb
    return [
        asm.mov(R1, R6),
        asm.call_kfunc(k.kfunc_cast_to_kern_ctx),
        asm.ldx(asm.W, R2, R0, cb + 4),  # end_seq
        asm.ldx(asm.W, R3, R0, cb),  # seq
        asm.mov(R1, R6),
        asm.ldx(asm.DW, R4, R8, _LAST_END),
        asm.jeq(R4, 0, "seq_new"),
        asm.mov32(R5, R2),
        asm.sub32(R5, R4),  # end_seq - last_end, as a signed 32-bit distance
        asm.lsh(R5, 32),
        asm.arsh(R5, 32),
        asm.jsgt(R5, 0, "seq_more"),
        asm.mov(R1, 1),
        asm.atomic_add(asm.DW, R8, R1, _REPEATS),
        asm.mov(R0, SkAction.DROP),
        asm.exit_(),
        asm.label("seq_more"),
        asm.mov32(R5, R3),
        asm.sub32(R5, R4),  # seq - last_end
        asm.lsh(R5, 32),
        asm.arsh(R5, 32),
        asm.jsge(R5, 0, "seq_new"),
        # Part of it was seen: pass it (holding the source) and have the control plane
        # drop the repeated head, unless a trim is already pending.
        asm.mov(R1, 1),
        asm.atomic_add(asm.DW, R8, R1, _OVERLAPS),
        asm.ldx(asm.DW, R1, R8, _TRIMS),
        asm.ldx(asm.DW, R5, R9, _TRIMMED),
        asm.jne(R1, R5, "seq_new"),  # a trim is pending: the control plane resets the pair
        asm.mov(R1, 1),
        asm.atomic_add(asm.DW, R8, R1, _TRIMS),
        asm.ldx(asm.DW, R1, R8, _PASSED),
        asm.stx(asm.DW, R8, R1, _SKIP_AT),
        asm.mov(R5, 0),
        asm.sub32(R5, R3),
        asm.add32(R5, R4),  # last_end - seq (32-bit)
        asm.stx(asm.DW, R8, R5, _SKIP_LEN),
        asm.mov(R4, 1),
        asm.lsh(R4, 32),
        asm.or_(R4, R2),
        asm.stx(asm.DW, R8, R4, _LAST_END),
        asm.mov(R1, R6),
        asm.ja("hold"),
        asm.label("seq_new"),
        asm.mov(R4, 1),
        asm.lsh(R4, 32),
        asm.or_(R4, R2),
        asm.stx(asm.DW, R8, R4, _LAST_END),
        asm.mov(R1, R6),
    ]


def bounded_redirect(
    sockmap: object,
    routes: object,
    stats: object,
    control: object,
    *,
    bound: int = 3 << 20,
    mode: Mode = "verdict",
) -> asm.Program:
    """Verdict: redirect to the route's target while its in-kernel backlog stays within
    ``bound`` bytes; otherwise hold the source (SK_PASS) until the control plane
    releases it.

    A socket with no route passes its messages to itself (nothing is dropped); an
    empty message (the FIN, in verdict-only mode: no data) is dropped.
    """
    if not 0 < bound < 1 << 31:
        raise ValueError(f"backlog bound {bound} must be between 1 and 2**31 - 1 bytes")
    acked_off = internals().tcp_sock_bytes_acked
    if mode == "strparser" and not strparser_view():
        raise SockmapError(
            "this kernel has no bpf_cast_to_kern_ctx kfunc (Linux 6.3+): a strparser-mode "
            "verdict cannot see the message length; use verdict-only mode",
        )
    # Registers: r6 ctx, r7 len, r8 &stats[own], r9 &control[own], later the target sk.
    return asm.Program(
        [
            asm.mov(R6, R1),
            *message_length(R7, mode),
            # Verdict-only mode hands the FIN over as an empty message. Redirected, it fails
            # with EPIPE on the target; passed, it fails with EPIPE on the source whenever
            # the source's psock still has redirected bytes to send (it then goes through
            # the psock's backlog, which takes a zero-length result for a broken pipe and
            # stops the socket's transmit side: the other direction's bytes are dropped).
            # It carries no data (TCP already saw the FIN), so drop it.
            asm.jeq(R7, 0, "drop_empty"),
            *lookup_by_cookie(routes),
            asm.jeq(R0, 0, "pass_plain"),
            asm.ldx(asm.W, R1, R0, 0),
            asm.stx(asm.W, R10, R1, _OWN),
            asm.ldx(asm.W, R1, R0, 4),
            asm.stx(asm.W, R10, R1, _TARGET),
            *_lookup(stats, _OWN),
            asm.jeq(R0, 0, "pass_plain"),
            asm.mov(R8, R0),
            *_lookup(control, _OWN),
            asm.jeq(R0, 0, "pass_plain"),
            asm.mov(R9, R0),
            *(_skip_repeats() if mode == "verdict" else []),
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
            *_lookup(stats, _TARGET),
            asm.jeq(R0, 0, "hold"),
            asm.stx(asm.DW, R10, R0, _TSTATS),
            *_lookup(control, _TARGET),
            asm.jeq(R0, 0, "hold"),
            asm.stx(asm.DW, R10, R0, _TCONTROL),
            # Paused target: by the control plane, or a hold it has not dealt with yet.
            asm.ldx(asm.DW, R1, R0, _PAUSE),
            asm.jne(R1, 0, "hold_for_target"),
            asm.ldx(asm.DW, R1, R0, _RESUMED),
            asm.ldx(asm.DW, R2, R10, _TSTATS),
            asm.ldx(asm.DW, R2, R2, _HOLDS),
            asm.jne(R1, R2, "hold_for_target"),
            # The target's bytes_acked, from its tcp_sock.
            *_lookup(sockmap, _TARGET),
            asm.jeq(R0, 0, "hold"),  # no socket at the target key: keep the bytes
            asm.mov(R9, R0),
            asm.mov(R1, R0),
            asm.call(Helper.skc_to_tcp_sock),
            asm.mov(R2, 0),
            asm.jeq(R0, 0, "release_sk"),
            asm.ldx(asm.DW, R2, R0, acked_off),
            asm.label("release_sk"),
            asm.stx(asm.DW, R10, R2, _ACKED),
            asm.mov(R1, R9),
            asm.call(Helper.sk_release),
            # backlog + len = inflow + user_written - acked + len
            asm.ldx(asm.DW, R1, R10, _TSTATS),
            asm.ldx(asm.DW, R2, R1, _INFLOW),
            asm.ldx(asm.DW, R1, R10, _TCONTROL),
            asm.ldx(asm.DW, R3, R1, _USER_WRITTEN),
            asm.add(R2, R3),
            asm.ldx(asm.DW, R3, R10, _ACKED),
            asm.sub(R2, R3),
            asm.add(R2, R7),
            asm.jsgt(R2, bound, "hold_for_target"),
            # Reserve the bytes, then look at pause again: see the module docstring.
            asm.ldx(asm.DW, R1, R10, _TSTATS),
            asm.atomic_add(asm.DW, R1, R7, _INFLOW),
            asm.ldx(asm.DW, R1, R10, _TCONTROL),
            asm.ldx(asm.DW, R1, R1, _PAUSE),
            asm.jne(R1, 0, "unreserve"),
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, sockmap),
            asm.ldx(asm.W, R3, R10, _TARGET),
            asm.mov(R4, 0),
            asm.call(Helper.sk_redirect_map),
            asm.jne(R0, SkAction.PASS, "unreserve"),
            asm.exit_(),
            asm.label("unreserve"),
            asm.mov(R2, 0),
            asm.sub(R2, R7),
            asm.ldx(asm.DW, R1, R10, _TSTATS),
            asm.atomic_add(asm.DW, R1, R2, _INFLOW),
            asm.label("hold_for_target"),
            asm.mov(R2, 1),
            asm.ldx(asm.DW, R1, R10, _TSTATS),
            asm.atomic_add(asm.DW, R1, R2, _HOLDS),
            asm.label("hold"),
            asm.st(asm.DW, R8, _HELD, 1),
            asm.label("pass"),
            asm.atomic_add(asm.DW, R8, R7, _PASSED),
            asm.label("pass_plain"),
            asm.mov(R0, SkAction.PASS),
            asm.exit_(),
            asm.label("drop_empty"),
            asm.mov(R0, SkAction.DROP),
            asm.exit_(),
        ],
        name="bounded_redirect",
    )
