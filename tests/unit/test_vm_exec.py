"""VM execution: semantics, memory, budget, context rules and helpers, on both paths."""

from __future__ import annotations

import errno
import struct

import pytest

from sockmap import asm
from sockmap.abi import SK_BUFF, SK_MSG_MD, Helper, MapType, ProgType
from sockmap.asm import DW, R0, R1, R2, R3, R4, R5, R6, R7, R10, B, H, W
from sockmap.errors import VerifierError, VmError
from sockmap.vm import MsgContext, SkbContext, load
from sockmap.vm._bench import (
    ArrayMap,
    HashMap,
    RecordingEnv,
    SockMapStub,
    length_prefixed_parser,
    round_robin_verdict,
)

U64 = (1 << 64) - 1
INT64_MIN = 1 << 63


def prog(*items: asm.Item) -> asm.Program:
    return asm.Program([*items, asm.exit_()])


def both(program, ctx=None, env=None, pt=ProgType.SCHED_CLS, **kw) -> int:
    """r0 from the interpreter and the fast path, which must agree."""
    results = []
    for fast in (False, True):
        p = load(program, pt, fast=fast, **kw)
        c = ctx() if callable(ctx) else (ctx or SkbContext(data=bytes(64), len=64))
        results.append(p.run(c, env))
    assert results[0] == results[1]
    return results[0]


def both_raise(program, ctx=None, env=None, pt=ProgType.SCHED_CLS, match="", **kw) -> list[str]:
    msgs = []
    for fast in (False, True):
        p = load(program, pt, fast=fast, **kw)
        c = ctx() if callable(ctx) else (ctx or SkbContext(data=bytes(64), len=64))
        with pytest.raises(VmError, match=match) as info:
            p.run(c, env)
        msgs.append(str(info.value))
    return msgs


# ---------------------------------------------------------------------------- semantics

SEMANTICS = [
    ("sdiv64 INT_MIN / -1", prog(asm.ld_imm64(R0, INT64_MIN), asm.sdiv(R0, -1)), INT64_MIN),
    ("smod64 INT_MIN % -1", prog(asm.ld_imm64(R0, INT64_MIN), asm.smod(R0, -1)), 0),
    ("sdiv32 INT_MIN / -1", prog(asm.mov32(R0, 0x80000000), asm.sdiv32(R0, -1)), 0x80000000),
    ("smod32 INT_MIN % -1", prog(asm.mov32(R0, 0x80000000), asm.smod32(R0, -1)), 0),
    ("sdiv by zero", prog(asm.mov(R0, -7), asm.mov(R1, 0), asm.sdiv(R0, R1)), 0),
    ("smod by zero", prog(asm.mov(R0, -7), asm.mov(R1, 0), asm.smod(R0, R1)), (-7) & U64),
    (
        "smod32 by zero truncates",
        prog(asm.ld_imm64(R0, 0x1_0000_0007), asm.mov(R1, 0), asm.smod32(R0, R1)),
        7,
    ),
    (
        "mod32 by zero truncates",
        prog(asm.ld_imm64(R0, 0xF_0000_000A), asm.mov(R1, 0), asm.mod32(R0, R1)),
        10,
    ),
    ("mod imm zero", prog(asm.mov(R0, 9), asm.mod(R0, 0)), 9),
    ("div imm zero", prog(asm.mov(R0, 9), asm.div(R0, 0)), 0),
    ("div64 by imm -1 is unsigned", prog(asm.mov(R0, 10), asm.div(R0, -1)), 0),
    ("smod negative divisor", prog(asm.mov(R0, 7), asm.smod(R0, -3)), 1),
    ("lsh masks by 63", prog(asm.mov(R0, 1), asm.mov(R1, 65), asm.lsh(R0, R1)), 2),
    ("lsh32 masks by 31", prog(asm.mov(R0, 1), asm.mov(R1, 33), asm.lsh32(R0, R1)), 2),
    ("rsh32 masks by 31", prog(asm.mov32(R0, 8), asm.mov(R1, 35), asm.rsh32(R0, R1)), 1),
    ("arsh register", prog(asm.mov(R0, -64), asm.mov(R1, 3), asm.arsh(R0, R1)), (-8) & U64),
    ("arsh32 zero-extends", prog(asm.mov(R0, -64), asm.arsh32(R0, 4)), 0xFFFFFFFC),
    ("mov64 imm sign-extends", prog(asm.mov(R0, -1)), U64),
    ("mov32 reg truncates", prog(asm.ld_imm64(R1, U64), asm.mov32(R0, R1)), 0xFFFFFFFF),
    ("movsx32 16", prog(asm.mov(R1, 0x8000), asm.movsx32(R0, R1, 16)), 0xFFFF8000),
    ("movsx 32", prog(asm.mov32(R1, 0x80000000), asm.movsx(R0, R1, 32)), 0xFFFFFFFF80000000),
    ("to_be 64", prog(asm.ld_imm64(R0, 0x0102030405060708), asm.to_be(R0, 64)), 0x0807060504030201),
    ("to_be 32", prog(asm.ld_imm64(R0, 0xAA11223344), asm.to_be(R0, 32)), 0x44332211),
    ("to_le 32", prog(asm.ld_imm64(R0, 0xAA11223344), asm.to_le(R0, 32)), 0x11223344),
    ("to_le 64", prog(asm.ld_imm64(R0, 0xAA11223344), asm.to_le(R0, 64)), 0xAA11223344),
    ("bswap16 reg", prog(asm.ld_imm64(R0, 0xFFFF1234), asm.bswap(R0, 16)), 0x3412),
    ("neg32", prog(asm.ld_imm64(R0, 0x1_0000_0001), asm.neg32(R0)), 0xFFFFFFFF),
    ("mul64 wraps", prog(asm.ld_imm64(R0, 1 << 63), asm.mul(R0, 2)), 0),
    ("sub32 wraps", prog(asm.mov(R0, 0), asm.sub32(R0, 1)), 0xFFFFFFFF),
    ("xor32 zero-extends", prog(asm.mov(R0, -1), asm.xor32(R0, 0)), 0xFFFFFFFF),
    (
        "ldxsx H and W",
        prog(
            asm.st(W, R10, -4, 0x80008000),
            asm.ldxsx(H, R1, R10, -4),
            asm.ldxsx(W, R2, R10, -4),
            asm.mov(R0, R1),
            asm.xor(R0, R2),
        ),
        (((-0x8000) & U64) ^ ((-0x7FFF8000) & U64)),
    ),
    ("st DW sign-extends imm", prog(asm.st(DW, R10, -8, -2), asm.ldx(DW, R0, R10, -8)), U64 - 1),
    (
        "atomic32 fetch zero-extends",
        prog(
            asm.st(W, R10, -4, -1),
            asm.ld_imm64(R1, U64),
            asm.atomic_and(W, R10, R1, -4, fetch=True),
            asm.mov(R0, R1),
        ),
        0xFFFFFFFF,
    ),
    (
        "atomic fetch into r0",
        prog(
            asm.st(DW, R10, -8, 40),
            asm.mov(R0, 2),
            asm.atomic_add(DW, R10, R0, -8, fetch=True),
            asm.ldx(DW, R1, R10, -8),
            asm.lsh(R0, 8),
            asm.or_(R0, R1),
        ),
        (40 << 8) | 42,
    ),
    (
        "cmpxchg32",
        prog(
            asm.st(W, R10, -4, 5),
            asm.ld_imm64(R0, 0x1_0000_0005),
            asm.mov(R1, 6),
            asm.atomic_cmpxchg(W, R10, R1, -4),
            asm.ldx(W, R2, R10, -4),
            asm.lsh(R0, 8),
            asm.or_(R0, R2),
        ),
        (5 << 8) | 6,
    ),
    (
        "jmp32 signed vs unsigned",
        prog(
            asm.mov32(R1, 0xFFFFFFFE),
            asm.mov(R0, 0),
            asm.jsgt32(R1, 0, "a"),
            asm.or_(R0, 1),
            asm.label("a"),
            asm.jgt32(R1, 0, "b"),
            asm.or_(R0, 2),
            asm.label("b"),
            asm.jslt(R1, 0, "c"),
            asm.or_(R0, 4),
            asm.label("c"),
        ),
        1 | 4,
    ),
    (
        "jsle/jsge register",
        prog(
            asm.mov(R1, -3),
            asm.mov(R2, 2),
            asm.mov(R0, 0),
            asm.jsle(R1, R2, "a"),
            asm.or_(R0, 1),
            asm.label("a"),
            asm.jsge(R1, R2, "b"),
            asm.or_(R0, 2),
            asm.label("b"),
            asm.jset32(R1, R2, "c"),
            asm.or_(R0, 4),
            asm.label("c"),
        ),
        2 | 4,
    ),
]


@pytest.mark.parametrize(("name", "program", "expected"), SEMANTICS, ids=[s[0] for s in SEMANTICS])
def test_semantics(name: str, program: asm.Program, expected: int) -> None:
    assert both(program) == expected


def test_local_function_call() -> None:
    program = asm.Program(
        [
            asm.mov(R6, 100),
            asm.mov(R1, 3),
            asm.mov(R2, 4),
            asm.call_local("addmul"),
            asm.add(R0, R6),  # r6 survives the call
            asm.exit_(),
            asm.label("addmul"),
            asm.st(DW, R10, -8, 0),  # the callee has its own stack frame
            asm.add(R1, R2),
            asm.mov(R0, R1),
            asm.mul(R0, 2),
            asm.exit_(),
        ]
    )
    assert both(program) == 114


def test_callee_cannot_read_callers_r6() -> None:
    program = asm.Program(
        [
            asm.mov(R6, 1),
            asm.call_local("f"),
            asm.exit_(),
            asm.label("f"),
            asm.mov(R0, R6),
            asm.exit_(),
        ]
    )
    with pytest.raises(VerifierError, match="R6 !read_ok"):
        load(program, ProgType.SCHED_CLS)


# ---------------------------------------------------------------------------- memory


def test_stack_fault_at_run_time_names_pc_and_regions() -> None:
    program = prog(
        asm.ldx(W, R3, R1, SK_BUFF.offset("len")),  # 64: unknown to the validator
        asm.mov(R2, R10),
        asm.add(R2, R3),  # r10 + 64: above the stack
        asm.ldx(DW, R0, R2, -8),
    )
    for msg in both_raise(program, match="pc 3"):
        assert "stack" in msg
        assert "regions" in msg
        assert "8 bytes" in msg


def test_packet_read_past_data_end_faults() -> None:
    program = prog(
        asm.ldx(W, R2, R1, SK_BUFF.offset("data")),
        asm.ldx(W, R0, R2, 60),  # no bounds check: the kernel would refuse, the VM stops it
    )
    assert both(program, SkbContext(data=bytes(64), len=64)) == 0
    for msg in both_raise(program, SkbContext(data=bytes(8), len=64), match="packet"):
        assert "pc 1" in msg


def test_packet_pointer_comparison_and_read() -> None:
    program = length_prefixed_parser()
    msg = struct.pack(">I", 10) + bytes(10)
    assert both(program, SkbContext(data=msg, len=len(msg)), pt=ProgType.SK_SKB) == 14
    assert both(program, SkbContext(data=b"\x00\x01", len=2), pt=ProgType.SK_SKB) == 0
    assert load(program, ProgType.SK_SKB).max_packet_offset == 3


def test_forged_pointer_is_refused_at_run_time() -> None:
    # a scalar the validator cannot see through (loaded from memory) used as an address
    program = prog(
        asm.ld_imm64(R2, 0x1234_5678),
        asm.stx(DW, R10, R2, -8),
        asm.ldx(DW, R3, R10, -8),
        asm.ldx(B, R0, R3, 0),
    )
    both_raise(program, match="not a pointer into any region")


def test_pointer_spilled_and_reloaded_still_works() -> None:
    program = prog(
        asm.stx(DW, R10, R1, -8),
        asm.ldx(DW, R2, R10, -8),
        asm.ldx(W, R0, R2, SK_BUFF.offset("len")),
    )
    assert both(program) == 64


def test_context_rules_checked_at_run_time_through_unknown_pointer() -> None:
    program = prog(
        asm.stx(DW, R10, R1, -8),
        asm.ldx(DW, R2, R10, -8),
        asm.ldx(W, R0, R2, SK_BUFF.offset("mark")),  # SK_SKB may not read mark
    )
    both_raise(program, SkbContext(), pt=ProgType.SK_SKB, match="invalid bpf_context access")


def test_budget_exhausted() -> None:
    program = asm.Program([asm.mov(R0, 0), asm.label("spin"), asm.add(R0, 1), asm.ja("spin")])
    for msg in both_raise(program, match="budget of 1000 exhausted", budget=1000):
        assert "pc" in msg


def test_default_budget_stops_an_endless_loop() -> None:
    program = asm.Program([asm.mov(R0, 0), asm.label("spin"), asm.ja("spin")])
    for fast in (False, True):
        p = load(program, ProgType.SCHED_CLS, fast=fast)
        assert p.budget == 1_000_000
        with pytest.raises(VmError, match="budget"):
            p.run(SkbContext())


def test_budget_applies_to_straight_line_code() -> None:
    both_raise(prog(asm.mov(R0, 1), asm.mov(R0, 2), asm.mov(R0, 3)), budget=2, match="budget")
    assert both(prog(asm.mov(R0, 1), asm.mov(R0, 2)), budget=3) == 2


# ---------------------------------------------------------------------------- context


def test_skb_fields_visible_to_sk_skb() -> None:
    fields = {
        "family": 2,
        "remote_ip4": 0x0100007F,
        "local_ip4": 0x0200007F,
        "remote_port": 0x5000,
        "local_port": 8080,
        "hash": 77,
    }
    for name, value in fields.items():
        program = prog(asm.ldx(W, R0, R1, SK_BUFF.offset(name)))
        assert (
            both(program, lambda f=fields: SkbContext(data=b"x", **f), pt=ProgType.SK_SKB) == value
        )
    program = prog(asm.ldx(W, R0, R1, SK_BUFF.offset("remote_ip6", 2)))
    ctx = lambda: SkbContext(remote_ip6=(1, 2, 3, 4))  # noqa: E731
    assert both(program, ctx, pt=ProgType.SK_SKB) == 3


def test_narrow_reads() -> None:
    port = prog(asm.ldx(H, R0, R1, SK_BUFF.offset("local_port") + 2))
    assert both(port, lambda: SkbContext(local_port=0xABCD1234), pt=ProgType.SK_SKB) == 0xABCD
    byte = prog(asm.ldx(B, R0, R1, SK_BUFF.offset("len") + 1))
    assert both(byte, lambda: SkbContext(data=b"", len=0x1234), pt=ProgType.SK_SKB) == 0x12


def test_len_defaults_to_data_length() -> None:
    program = prog(asm.ldx(W, R0, R1, SK_BUFF.offset("len")))
    assert both(program, lambda: SkbContext(data=b"abc"), pt=ProgType.SK_SKB) == 3


@pytest.mark.parametrize(
    ("pt", "size", "off", "write"),
    [
        (ProgType.SK_SKB, W, SK_BUFF.offset("mark"), False),
        (ProgType.SK_SKB, W, SK_BUFF.offset("cb"), True),
        (ProgType.SK_SKB, W, SK_BUFF.offset("len"), True),
        (ProgType.SK_SKB, H, SK_BUFF.offset("remote_ip4"), False),
        (ProgType.SK_SKB, W, SK_BUFF.offset("tc_classid"), False),
        (ProgType.SK_SKB, DW, SK_BUFF.offset("sk"), False),
        (ProgType.SK_SKB, W, 2, False),
        (ProgType.SK_SKB, W, 4096, False),
        (ProgType.SCHED_CLS, W, SK_BUFF.offset("family"), False),
        (ProgType.SK_MSG, W, SK_MSG_MD.offset("family"), True),
        (ProgType.SK_MSG, W, SK_MSG_MD.offset("data"), False),
        (ProgType.SK_MSG, H, SK_MSG_MD.offset("size"), False),
    ],
)
def test_context_access_refused_at_load(
    pt: ProgType, size: asm.Size, off: int, write: bool
) -> None:
    ins = asm.stx(size, R1, R2, off) if write else asm.ldx(size, R0, R1, off)
    program = prog(asm.mov(R2, 0), asm.mov(R0, 0), ins)
    with pytest.raises(VerifierError) as info:
        load(program, pt)
    assert info.value.errno == errno.EACCES
    assert "pc 2" in str(info.value)
    assert "invalid bpf_context access" in str(info.value)
    assert info.value.log


def test_context_writes_allowed_by_type() -> None:
    program = prog(
        asm.mov(R2, 7),
        asm.stx(W, R1, R2, SK_BUFF.offset("priority")),
        asm.ldx(W, R0, R1, SK_BUFF.offset("priority")),
    )
    for fast in (False, True):
        ctx = SkbContext()
        assert load(program, ProgType.SK_SKB, fast=fast).run(ctx) == 7
        assert ctx.priority == 7
    cb = prog(
        asm.mov(R2, 9),
        asm.stx(W, R1, R2, SK_BUFF.offset("cb", 3)),
        asm.stx(B, R1, R2, SK_BUFF.offset("cb", 1) + 1),
        asm.ldx(DW, R0, R1, SK_BUFF.offset("cb", 2)),
        asm.stx(W, R1, R2, SK_BUFF.offset("mark")),
    )
    for fast in (False, True):
        ctx = SkbContext()
        assert load(cb, ProgType.SCHED_CLS, fast=fast).run(ctx) == 9 << 32
        assert ctx.cb == [0, 9 << 8, 0, 9, 0]
        assert ctx.mark == 9


def test_st_imm_into_ctx_allowed() -> None:
    """Linux 6.3+ accepts BPF_ST into the context like BPF_STX (found by the VM fuzzer)."""
    ctx = SkbContext()
    both(prog(asm.mov(R0, 0), asm.st(W, R1, SK_BUFF.offset("priority"), 7)), lambda: ctx,
         pt=ProgType.SK_SKB)  # fmt: skip
    assert ctx.priority == 7
    with pytest.raises(VerifierError, match="invalid bpf_context access"):
        load(prog(asm.mov(R0, 0), asm.st(W, R1, SK_BUFF.offset("len"), 1)), ProgType.SK_SKB)


def test_sk_msg_context() -> None:
    program = prog(
        asm.ldx(DW, R2, R1, SK_MSG_MD.offset("data")),
        asm.ldx(DW, R3, R1, SK_MSG_MD.offset("data_end")),
        asm.ldx(W, R0, R1, SK_MSG_MD.offset("size")),
        asm.mov(R4, R2),
        asm.add(R4, 1),
        asm.jgt(R4, R3, "out"),
        asm.ldx(B, R5, R2, 0),
        asm.lsh(R5, 16),
        asm.add(R0, R5),
        asm.label("out"),
    )
    ctx = lambda: MsgContext(data=b"\x05abc", size=1000)  # noqa: E731
    assert both(program, ctx, pt=ProgType.SK_MSG) == (5 << 16) + 1000
    with pytest.raises(VmError, match="MsgContext"):
        load(program, ProgType.SK_MSG).run(SkbContext())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- helpers


def test_round_robin_verdict() -> None:
    for fast in (False, True):
        counter, smap, env = ArrayMap(8, 1), SockMapStub(), RecordingEnv()
        p = load(round_robin_verdict(counter, smap), ProgType.SK_SKB, fast=fast)
        results = [p.run(SkbContext(data=b"hi"), env) for _ in range(4)]
        assert results == [1, 1, 1, 1]
        assert [k for _, k, _ in env.redirects] == [b"\0\0\0\0", b"\1\0\0\0"] * 2
        assert all(m is smap for m, _, _ in env.redirects)
        assert struct.unpack("<Q", counter.values[0]) == (4,)
        assert p.max_packet_offset == -1


def test_redirect_to_missing_socket_drops() -> None:
    smap = SockMapStub()
    program = prog(
        asm.ld_map_fd(R2, smap), asm.mov(R3, 5), asm.mov(R4, 1), asm.call(Helper.sk_redirect_map)
    )
    env = RecordingEnv(valid_keys=2)
    assert both(program, SkbContext(), env, pt=ProgType.SK_SKB) == 0
    assert env.redirects[-1][1:] == (b"\5\0\0\0", 1)


def test_sk_redirect_hash_reads_key_from_stack() -> None:
    shash = SockMapStub(map_type=MapType.SOCKHASH)
    program = prog(
        asm.st(W, R10, -4, 1),
        asm.mov(R3, R10),
        asm.add(R3, -4),
        asm.ld_map_fd(R2, shash),
        asm.mov(R4, 0),
        asm.call(Helper.sk_redirect_hash),
    )
    env = RecordingEnv()
    assert both(program, SkbContext(), env, pt=ProgType.SK_SKB) == 1
    assert env.redirects[-1][1] == b"\1\0\0\0"


def test_redirect_map_needs_a_sockmap() -> None:
    with pytest.raises(VerifierError, match="cannot pass map_type") as info:
        load(
            prog(
                asm.ld_map_fd(R2, ArrayMap(4, 1)),
                asm.mov(R3, 0),
                asm.mov(R4, 0),
                asm.call(Helper.sk_redirect_map),
            ),
            ProgType.SK_SKB,
        )
    assert info.value.errno == errno.EINVAL


def test_hash_map_update_lookup_delete() -> None:
    def program(h: HashMap) -> asm.Program:
        return prog(
            asm.st(W, R10, -4, 0xAB),  # key
            asm.st(DW, R10, -16, 41),  # value
            asm.ld_map_fd(R1, h),
            asm.mov(R2, R10),
            asm.add(R2, -4),
            asm.mov(R3, R10),
            asm.add(R3, -16),
            asm.mov(R4, 0),
            asm.call(Helper.map_update_elem),
            asm.mov(R7, R0),  # 0
            asm.ld_map_fd(R1, h),
            asm.mov(R2, R10),
            asm.add(R2, -4),
            asm.call(Helper.map_lookup_elem),
            asm.jeq(R0, 0, "miss"),
            asm.ldx(DW, R6, R0, 0),
            asm.add(R6, 1),
            asm.stx(DW, R0, R6, 0),  # writes through to the map
            asm.ld_map_fd(R1, h),
            asm.mov(R2, R10),
            asm.add(R2, -4),
            asm.call(Helper.map_delete_elem),
            asm.add(R0, R6),
            asm.add(R0, R7),
            asm.exit_(),
            asm.label("miss"),
            asm.mov(R0, 1000),
        )

    for fast in (False, True):
        h = HashMap(4, 8, 4)
        assert load(program(h), ProgType.SK_SKB, fast=fast).run(SkbContext()) == 42
        assert h.data == {}


def test_lookup_miss_and_null_check_required() -> None:
    h = HashMap(4, 8, 4)
    body = [
        asm.st(W, R10, -4, 1),
        asm.ld_map_fd(R1, h),
        asm.mov(R2, R10),
        asm.add(R2, -4),
        asm.call(Helper.map_lookup_elem),
    ]
    checked = prog(*body, asm.jne(R0, 0, "hit"), asm.mov(R0, 7), asm.exit_(), asm.label("hit"))
    assert both(checked, SkbContext(), pt=ProgType.SK_SKB) == 7
    with pytest.raises(VerifierError, match="map_value_or_null") as info:
        load(prog(*body, asm.ldx(W, R0, R0, 0)), ProgType.SK_SKB)
    assert info.value.errno == errno.EACCES


def test_map_value_bounds_checked() -> None:
    arr = ArrayMap(8, 2)
    program = prog(
        asm.st(W, R10, -4, 1),
        asm.ld_map_fd(R1, arr),
        asm.mov(R2, R10),
        asm.add(R2, -4),
        asm.call(Helper.map_lookup_elem),
        asm.jeq(R0, 0, "out"),
        asm.ldx(DW, R0, R0, 4),  # bytes 4..11 of an 8-byte value
        asm.label("out"),
    )
    both_raise(program, SkbContext(), pt=ProgType.SK_SKB, match="map#0 value")


def test_direct_map_value() -> None:
    arr = ArrayMap(16, 1)
    arr.values[0][8:12] = (123).to_bytes(4, "little")
    program = prog(asm.ld_map_value(R1, arr, 8), asm.ldx(W, R0, R1, 0))
    assert both(program, SkbContext(), pt=ProgType.SK_SKB) == 123


def test_skb_load_bytes() -> None:
    def program(off: int, n: int) -> asm.Program:
        return prog(
            asm.mov(R2, off),
            asm.mov(R3, R10),
            asm.add(R3, -8),
            asm.mov(R4, n),
            asm.call(Helper.skb_load_bytes),
            asm.mov(R6, R0),
            asm.ldx(W, R0, R10, -8),
            asm.lsh(R6, 32),
            asm.or_(R0, R6),
        )

    data = bytes(range(100, 120))
    ctx = lambda: SkbContext(data=data, len=len(data))  # noqa: E731
    assert both(program(2, 4), ctx, pt=ProgType.SK_SKB) == int.from_bytes(data[2:6], "little")
    efault = ((-errno.EFAULT) & 0xFFFFFFFF) << 32
    assert both(program(18, 4), ctx, pt=ProgType.SK_SKB) == efault  # zeroed destination
    assert load(program(2, 4), ProgType.SK_SKB).max_packet_offset == 5
    prefix = lambda: SkbContext(data=data[:4], len=len(data))  # noqa: E731
    both_raise(program(2, 4), prefix, pt=ProgType.SK_SKB, match="past the 4")


def test_scalar_helpers_and_msg_helpers() -> None:
    program = prog(
        asm.call(Helper.get_socket_cookie),
        asm.mov(R6, R0),
        asm.call(Helper.get_prandom_u32),
        asm.add(R6, R0),
        asm.call(Helper.ktime_get_ns),
        asm.add(R0, R6),
    )
    env = RecordingEnv(cookie=5)
    assert both(program, SkbContext(), env, pt=ProgType.SK_SKB) == 5 + 0xDEADBEEF + 1_000_000_007
    smap = SockMapStub()
    msg = prog(
        asm.mov(R6, R1),
        asm.mov(R2, 10),
        asm.call(Helper.msg_apply_bytes),
        asm.mov(R1, R6),
        asm.mov(R2, 20),
        asm.call(Helper.msg_cork_bytes),
        asm.mov(R1, R6),
        asm.ld_map_fd(R2, smap),
        asm.mov(R3, 1),
        asm.mov(R4, 1),
        asm.call(Helper.msg_redirect_map),
    )
    env = RecordingEnv()
    assert both(msg, lambda: MsgContext(data=b"x"), env, pt=ProgType.SK_MSG) == 1
    assert env.applied == [10, 10]
    assert env.corked == [20, 20]
    assert env.redirects[-1][1:] == (b"\1\0\0\0", 1)


def test_helper_without_env_is_a_vm_error() -> None:
    both_raise(prog(asm.call(Helper.ktime_get_ns)), SkbContext(), None, match="HelperEnv")


def test_run_signed() -> None:
    p = load(prog(asm.mov(R0, -90)), ProgType.SK_SKB)
    assert p.run(SkbContext()) == (-90) & U64
    assert p.run_signed(SkbContext()) == -90


def test_raw_bytes_with_map_resolver() -> None:
    arr = ArrayMap(8, 1)
    arr.values[0][0] = 99
    program = prog(
        asm.st(W, R10, -4, 0),
        asm.ld_map_fd(R1, 7),
        asm.mov(R2, R10),
        asm.add(R2, -4),
        asm.call(Helper.map_lookup_elem),
        asm.jeq(R0, 0, "out"),
        asm.ldx(B, R0, R0, 0),
        asm.label("out"),
    )
    raw = program.encode()
    assert both(raw, SkbContext(), pt=ProgType.SK_SKB, maps={7: arr}) == 99
    assert both(raw, SkbContext(), pt=ProgType.SK_SKB, maps=lambda fd: arr) == 99


def test_fast_path_runs_without_builtins() -> None:
    p = load(length_prefixed_parser(), ProgType.SK_SKB)
    assert p._fast is not None
    assert p._fast.__globals__["__builtins__"] == {}
    assert "import" not in (p.source or "")
