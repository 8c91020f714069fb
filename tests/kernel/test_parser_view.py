"""What a BPF stream parser sees on this kernel: the whole segment, from its first byte.

Two length-prefixed messages arriving in one segment: the parser is called once per
message, and every call sees the same ``skb->len`` and the same first bytes — the
start of the segment, not of the message being framed. ``__sk_buff`` does not expose
strparser's offset, so a BPF parser that reads a length header frames only the
first message of a segment correctly. (The userspace engine hands its parser the
message being framed; docs/semantics.md lists this difference.)
"""

from __future__ import annotations

import struct

import pytest

from netutil import Pairs, wait_until
from sockmap import asm, programs
from sockmap.abi import Helper
from sockmap.asm import R0, R1, R2, R3, R4, R6, R7, R8, R9, R10
from sockmap.kernel.engine import KernelEngine

pytestmark = pytest.mark.kernel


def lookup_slot(array: object, index: int) -> list[asm.Item]:
    """``r0 = &array[index]`` (or 0), using the stack word at r10-4."""
    return [
        asm.st(asm.W, R10, -4, index),
        asm.ld_map_fd(R1, array),
        asm.mov(R2, R10),
        asm.add(R2, -4),
        asm.call(Helper.map_lookup_elem),
    ]


def recording_parser(rec: object, count: object) -> asm.Program:
    """Records (skb->len << 32 | first 4 bytes, big-endian) per call, then frames by a
    4-byte big-endian body length."""
    return asm.Program(
        [
            asm.mov(R6, R1),
            *lookup_slot(count, 0),
            asm.jeq(R0, 0, "frame"),
            asm.ldx(asm.DW, R7, R0, 0),
            asm.mov(R1, 1),
            asm.atomic_add(asm.DW, R0, R1, 0),
            asm.and_(R7, 15),
            asm.stx(asm.W, R10, R7, -8),
            asm.st(asm.W, R10, -16, 0),
            asm.mov(R1, R6),
            asm.mov(R2, 0),
            asm.mov(R3, R10),
            asm.add(R3, -16),
            asm.mov(R4, 4),
            asm.call(Helper.skb_load_bytes),
            asm.ldx(asm.W, R8, R10, -16),
            asm.to_be(R8, 32),
            asm.ldx(asm.W, R9, R6, 0),
            asm.lsh(R9, 32),
            asm.or_(R9, R8),
            asm.stx(asm.DW, R10, R9, -24),
            asm.ld_map_fd(R1, rec),
            asm.mov(R2, R10),
            asm.add(R2, -8),
            asm.mov(R3, R10),
            asm.add(R3, -24),
            asm.mov(R4, 0),
            asm.call(Helper.map_update_elem),
            asm.label("frame"),
            asm.mov(R1, R6),
            *programs.length_prefixed(adjust=4).items,
        ],
        name="recording",
    )


def test_parser_sees_the_segment_not_the_message(engine: KernelEngine, pairs: Pairs):
    rec = engine.array(16, value_size=8)
    count = engine.array(1, value_size=8)
    smap = engine.sockmap(2)
    engine.attach(smap, parser=recording_parser(rec, count), verdict=programs.redirect_key(smap, 1))
    a, a_srv = pairs()
    b, b_srv = pairs()
    smap[0] = a_srv
    smap[1] = b_srv
    segment = struct.pack(">I", 6) + b"abcdef" + struct.pack(">I", 3) + b"xyz"
    a.sendall(segment)  # one send, one segment on loopback
    assert wait_until(lambda: count.lookup_int(0) >= 2)
    calls = [rec.lookup_int(i) for i in range(2)]
    assert [c >> 32 for c in calls] == [len(segment), len(segment)]
    assert [c & 0xFFFFFFFF for c in calls] == [6, 6]  # both read the first header
    # So the second "message" is framed as 10 bytes from the second header on.
    b.settimeout(5)
    got = b""
    while len(got) < 10:
        got += b.recv(100)
    assert got[:10] == segment[:10]


def length_summing_verdict(total: object) -> asm.Program:
    """Adds every call's ``skb->len`` into ``total[0]``, then passes."""
    return asm.Program(
        [
            asm.ldx(asm.W, R6, R1, 0),  # skb->len
            *lookup_slot(total, 0),
            asm.jeq(R0, 0, "out"),
            asm.atomic_add(asm.DW, R0, R6, 0),
            asm.label("out"),
            *programs.pass_().items,
        ],
        name="len_sum",
    )


def test_verdict_sees_the_segment_not_the_message(engine: KernelEngine, pairs: Pairs):
    """So a verdict cannot count the bytes it redirects in strparser mode."""
    total = engine.array(1, value_size=8)
    smap = engine.sockmap(1)
    fixed_100 = asm.Program([asm.mov(R0, 100), asm.exit_()], name="fixed_100")
    engine.attach(smap, parser=fixed_100, verdict=length_summing_verdict(total))
    a, a_srv = pairs()
    smap[0] = a_srv
    a.sendall(b"m" * 1000)  # ten 100-byte messages in one segment
    a_srv.settimeout(5)
    got = b""
    while len(got) < 1000:
        got += a_srv.recv(4096)
    assert got == b"m" * 1000  # framed and passed right ...
    assert total.lookup_int(0) == 10 * 1000  # ... but each verdict call saw all 1000 bytes
