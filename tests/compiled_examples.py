"""Example programs for the compiler's golden files (tests/compiler/), each beside a
hand-written equivalent (same behaviour, written directly in the assembler) whose size it
is measured against; tests/unit/test_compiler.py runs them too."""

from __future__ import annotations

from sockmap import asm
from sockmap.abi import Helper
from sockmap.asm import R0, R1, R2, R3, R4, R6, R10
from sockmap.compiler import redirect, stream_parser, stream_verdict
from sockmap.programs._parts import message_start
from sockmap.userspace import maps as umaps

LIMIT = 65536
ROUTES = umaps.HashMap.new(64, key_size=8, value_size=4, name="routes")
COUNTS = umaps.ArrayMap.new(2, value_size=8, name="counts")
SOCKS = umaps.SockMap.new(8, name="socks")


@stream_parser
def length_prefixed(skb):
    if skb.len < 4:
        return 0
    n = skb.load(0, 4)
    if n > LIMIT:
        return -90
    return n + 4


def length_prefixed_by_hand() -> asm.Program:
    return asm.Program(
        [
            asm.mov(R6, R1),
            *message_start(R2),
            asm.ldx(asm.W, R4, R6, 0),  # skb->len
            asm.sub(R4, R2),
            asm.jlt(R4, 4, "more"),
            asm.mov(R3, R10),
            asm.add(R3, -8),
            asm.mov(R4, 4),
            asm.call(Helper.skb_load_bytes),
            asm.jne(R0, 0, "more"),
            asm.ldx(asm.W, R0, R10, -8),
            asm.to_be(R0, 32),
            asm.jgt(R0, LIMIT, "big"),
            asm.add(R0, 4),
            asm.exit_(),
            asm.label("more"),
            asm.mov(R0, 0),
            asm.exit_(),
            asm.label("big"),
            asm.mov(R0, -90),
            asm.exit_(),
        ]
    )


@stream_verdict(mode="verdict")
def field_route(skb):
    if skb.len < 2:
        return 0
    key = ROUTES[skb.load(0, 2)]
    return redirect(SOCKS, key if key else 7)


def field_route_by_hand() -> asm.Program:
    return asm.Program(
        [
            asm.mov(R6, R1),
            asm.ldx(asm.W, R2, R1, 0),
            asm.jlt(R2, 2, "drop"),
            asm.mov(R2, 0),
            asm.mov(R3, R10),
            asm.add(R3, -8),
            asm.mov(R4, 2),
            asm.call(Helper.skb_load_bytes),
            asm.jne(R0, 0, "drop"),
            asm.ldx(asm.H, R1, R10, -8),
            asm.to_be(R1, 16),
            asm.stx(asm.DW, R10, R1, -16),
            asm.ld_map_fd(R1, ROUTES),
            asm.mov(R2, R10),
            asm.add(R2, -16),
            asm.call(Helper.map_lookup_elem),
            asm.mov(R3, 7),
            asm.jeq(R0, 0, "go"),
            asm.ldx(asm.W, R3, R0, 0),
            asm.jne(R3, 0, "go"),
            asm.mov(R3, 7),
            asm.label("go"),
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, SOCKS),
            asm.mov(R4, 0),
            asm.call(Helper.sk_redirect_map),
            asm.exit_(),
            asm.label("drop"),
            asm.mov(R0, 0),
            asm.exit_(),
        ]
    )


@stream_verdict(mode="verdict")
def counter(skb):
    COUNTS[0] += 1
    COUNTS[1] += skb.len
    return 1


def counter_by_hand() -> asm.Program:
    items: list[asm.Item] = [asm.mov(R6, R1)]
    for index, what in ((0, None), (1, "len")):
        items += [
            asm.st(asm.W, R10, -4, index),
            asm.ld_map_fd(R1, COUNTS),
            asm.mov(R2, R10),
            asm.add(R2, -4),
            asm.call(Helper.map_lookup_elem),
            asm.jeq(R0, 0, f"skip{index}"),
            asm.mov(R1, 1) if what is None else asm.ldx(asm.W, R1, R6, 0),
            asm.atomic_add(asm.DW, R0, R1, 0),
            asm.label(f"skip{index}"),
        ]
    return asm.Program([*items, asm.mov(R0, 1), asm.exit_()])


EXAMPLES = {
    "length_prefixed": (length_prefixed, length_prefixed_by_hand),
    "field_route": (field_route, field_route_by_hand),
    "counter": (counter, counter_by_hand),
}
