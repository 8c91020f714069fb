"""Conformance corpus: small programs and the r0 (as u32) the kernel returns for them.

Shared by the kernel oracle test (run through BPF_PROG_TEST_RUN as SCHED_CLS) and,
later, by the userspace VM: whatever runs these must give these answers.
"""

from __future__ import annotations

from sockmap import asm
from sockmap.asm import DW, R0, R1, R2, R10, B, W

U32 = 0xFFFFFFFF


def _p(*items: asm.Item) -> list[asm.Item]:
    return [*items, asm.exit_()]


CORPUS: list[tuple[str, list[asm.Item], int]] = [
    ("mov32 -1 is u32 max", _p(asm.mov32(R0, -1)), U32),
    ("ld_imm64 high word", _p(asm.ld_imm64(R0, 0x1_0000_0005), asm.rsh(R0, 32)), 1),
    (
        "alu32 zero-extends",
        _p(asm.ld_imm64(R0, 0xFFFF_FFFF_FFFF_FFFF), asm.add32(R0, 1), asm.rsh(R0, 1)),
        0,
    ),
    ("add64 carries", _p(asm.mov32(R0, -1), asm.add(R0, 1), asm.rsh(R0, 32)), 1),
    ("div by zero gives 0", _p(asm.mov(R0, 10), asm.mov(R1, 0), asm.div(R0, R1)), 0),
    ("div32 by zero gives 0", _p(asm.mov(R0, 10), asm.mov(R1, 0), asm.div32(R0, R1)), 0),
    ("mod by zero keeps dividend", _p(asm.mov(R0, 10), asm.mov(R1, 0), asm.mod(R0, R1)), 10),
    ("mod32 by zero keeps dividend", _p(asm.mov(R0, 10), asm.mov(R1, 0), asm.mod32(R0, R1)), 10),
    ("sdiv rounds toward zero", _p(asm.mov(R0, -10), asm.sdiv(R0, 3)), (-3) & U32),
    ("smod takes dividend sign", _p(asm.mov(R0, -10), asm.smod(R0, 3)), (-1) & U32),
    ("sdiv32", _p(asm.mov32(R0, -9), asm.sdiv32(R0, 2)), (-4) & U32),
    ("unsigned div", _p(asm.mov32(R0, -10), asm.div32(R0, 3)), (U32 - 9) // 3),
    ("arsh keeps sign", _p(asm.mov(R0, -16), asm.arsh(R0, 2)), (-4) & U32),
    ("arsh32", _p(asm.mov32(R0, -16), asm.arsh32(R0, 1)), (-8) & U32),
    ("rsh is logical", _p(asm.mov32(R0, -16), asm.rsh32(R0, 28)), 0xF),
    ("lsh by register", _p(asm.mov(R0, 3), asm.mov(R1, 4), asm.lsh(R0, R1)), 48),
    ("neg", _p(asm.mov(R0, 5), asm.neg(R0)), (-5) & U32),
    ("neg32", _p(asm.mov32(R0, 1), asm.neg32(R0)), U32),
    ("mul32 wraps", _p(asm.mov32(R0, 0x10000), asm.mul32(R0, 0x10000)), 0),
    (
        "xor or and",
        _p(asm.mov(R0, 0xF0), asm.xor(R0, 0xFF), asm.or_(R0, 0x100), asm.and_(R0, 0x10F)),
        0x10F,
    ),
    ("bswap32", _p(asm.mov32(R0, 0x11223344), asm.bswap(R0, 32)), 0x44332211),
    ("bswap16 clears upper", _p(asm.mov32(R0, 0x11223344), asm.bswap(R0, 16)), 0x4433),
    ("to_be 16 (LE host)", _p(asm.mov(R0, 0x1234), asm.to_be(R0, 16)), 0x3412),
    ("to_le 16 truncates", _p(asm.mov32(R0, 0x11223344), asm.to_le(R0, 16)), 0x3344),
    ("bswap64 low word", _p(asm.ld_imm64(R0, 0x0102030405060708), asm.bswap(R0, 64)), 0x04030201),
    ("movsx8", _p(asm.mov(R1, 0x80), asm.movsx(R0, R1, 8)), (-128) & U32),
    ("movsx16", _p(asm.mov(R1, 0x8001), asm.movsx(R0, R1, 16)), (-32767) & U32),
    ("movsx32 32-bit", _p(asm.mov(R1, 0xFF), asm.movsx32(R0, R1, 8)), U32),
    (
        "ldxsx byte",
        _p(asm.st(B, R10, -1, 0xFF), asm.ldxsx(B, R0, R10, -1), asm.rsh(R0, 32)),
        U32,
    ),
    ("ldx byte zero-extends", _p(asm.st(B, R10, -1, 0xFF), asm.ldx(B, R0, R10, -1)), 0xFF),
    (
        "stx/ldx dw",
        _p(
            asm.ld_imm64(R1, 0xAABBCCDD_11223344), asm.stx(DW, R10, R1, -8), asm.ldx(W, R0, R10, -4)
        ),
        0xAABBCCDD,
    ),
    (
        "atomic fetch add",
        _p(
            asm.st(DW, R10, -8, 5),
            asm.mov(R1, 3),
            asm.atomic_add(DW, R10, R1, -8, fetch=True),
            asm.ldx(DW, R0, R10, -8),
            asm.lsh(R0, 8),
            asm.add(R0, R1),
        ),
        (8 << 8) + 5,
    ),
    (
        "atomic add no fetch",
        _p(
            asm.st(W, R10, -4, 40),
            asm.mov(R1, 2),
            asm.atomic_add(W, R10, R1, -4),
            asm.ldx(W, R0, R10, -4),
        ),
        42,
    ),
    (
        "atomic or/and/xor",
        _p(
            asm.st(DW, R10, -8, 0b1100),
            asm.mov(R1, 0b0011),
            asm.atomic_or(DW, R10, R1, -8),
            asm.mov(R1, 0b1010),
            asm.atomic_and(DW, R10, R1, -8),
            asm.mov(R1, 1),
            asm.atomic_xor(DW, R10, R1, -8),
            asm.ldx(DW, R0, R10, -8),
        ),
        0b1011,
    ),
    (
        "atomic xchg",
        _p(
            asm.st(W, R10, -4, 7),
            asm.mov(R1, 9),
            asm.atomic_xchg(W, R10, R1, -4),
            asm.ldx(W, R2, R10, -4),
            asm.lsh(R1, 8),
            asm.or_(R1, R2),
            asm.mov(R0, R1),
        ),
        (7 << 8) | 9,
    ),
    (
        "atomic cmpxchg hit",
        _p(
            asm.st(DW, R10, -8, 7),
            asm.mov(R0, 7),
            asm.mov(R1, 9),
            asm.atomic_cmpxchg(DW, R10, R1, -8),
            asm.ldx(DW, R2, R10, -8),
            asm.lsh(R0, 8),
            asm.or_(R0, R2),
        ),
        (7 << 8) | 9,
    ),
    (
        "atomic cmpxchg miss",
        _p(
            asm.st(DW, R10, -8, 7),
            asm.mov(R0, 6),
            asm.mov(R1, 9),
            asm.atomic_cmpxchg(DW, R10, R1, -8),
            asm.ldx(DW, R2, R10, -8),
            asm.lsh(R0, 8),
            asm.or_(R0, R2),
        ),
        (7 << 8) | 7,
    ),
    (
        "jeq32 ignores the high word",
        _p(
            asm.ld_imm64(R1, 0x1_0000_0000),
            asm.mov(R0, 1),
            asm.jeq32(R1, 0, "out"),
            asm.mov(R0, 0),
            asm.label("out"),
        ),
        1,
    ),
    (
        "jeq64 sees the high word",
        _p(
            asm.ld_imm64(R1, 0x1_0000_0000),
            asm.mov(R0, 1),
            asm.jeq(R1, 0, "out"),
            asm.mov(R0, 0),
            asm.label("out"),
        ),
        0,
    ),
    (
        "jsgt is signed, jgt is not",
        _p(
            asm.mov(R1, -1),
            asm.mov(R0, 0),
            asm.jsgt(R1, 0, "a"),
            asm.or_(R0, 1),
            asm.label("a"),
            asm.jgt(R1, 0, "b"),
            asm.or_(R0, 2),
            asm.label("b"),
        ),
        1,
    ),
    (
        "jset / jlt / jle / jge / jne",
        _p(
            asm.mov(R1, 6),
            asm.mov(R0, 0),
            asm.jset(R1, 2, "s"),
            asm.or_(R0, 1),
            asm.label("s"),
            asm.jlt(R1, 6, "l"),
            asm.or_(R0, 2),
            asm.label("l"),
            asm.jle(R1, 6, "le"),
            asm.or_(R0, 4),
            asm.label("le"),
            asm.jge(R1, 7, "ge"),
            asm.or_(R0, 8),
            asm.label("ge"),
            asm.jne(R1, R1, "ne"),
            asm.or_(R0, 16),
            asm.label("ne"),
        ),
        2 | 8 | 16,
    ),
    (
        "jslt32 / jsle32 / jsge32",
        _p(
            asm.mov32(R1, -5),
            asm.mov(R0, 0),
            asm.jslt32(R1, 0, "a"),
            asm.or_(R0, 1),
            asm.label("a"),
            asm.jsle32(R1, -6, "b"),
            asm.or_(R0, 2),
            asm.label("b"),
            asm.jsge32(R1, -5, "c"),
            asm.or_(R0, 4),
            asm.label("c"),
        ),
        2,
    ),
    (
        "ja and gotol",
        # The skipped instructions are reachable when len != 64: the verifier rejects dead code.
        _p(
            asm.mov(R0, 1),
            asm.ldx(W, R2, R1, 0),
            asm.jne(R2, 64, "mid"),
            asm.ja("x"),
            asm.label("mid"),
            asm.mov(R0, 2),
            asm.label("x"),
            asm.jne(R2, 64, "mid2"),
            asm.gotol("y"),
            asm.label("mid2"),
            asm.mov(R0, 3),
            asm.label("y"),
            asm.add(R0, 10),
        ),
        11,
    ),
    (
        "bounded loop",
        _p(
            asm.mov(R0, 0),
            asm.mov(R1, 10),
            asm.label("top"),
            asm.add(R0, R1),
            asm.sub(R1, 1),
            asm.jne(R1, 0, "top"),
        ),
        55,
    ),
    ("skb len from ctx", _p(asm.ldx(W, R0, R1, 0)), 64),
]
