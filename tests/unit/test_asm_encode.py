"""Exact bytes of every instruction family, worked out by hand from the instruction-set spec.

Slot layout: opcode (op | source | class), regs (src << 4 | dst), off s16 LE, imm s32 LE.
"""

from __future__ import annotations

import pytest

from sockmap import asm
from sockmap.asm import DW, R0, R1, R2, R3, R9, R10, B, H, W
from sockmap.errors import AssemblyError


def slots(*hexes: str) -> str:
    """Several 8-byte slots written one by one (LD_IMM64 takes two)."""
    assert all(len(h) == 16 for h in hexes)
    return "".join(hexes)


# (builder result, expected hex of the encoded slot(s))
ALU = [
    # ALU64 reg (class 7 | X 8) and imm (class 7), ALU32 reg (4 | 8 = c) and imm (4)
    (asm.add(R1, R2), "0f21000000000000"),
    (asm.add(R1, 7), "0701000007000000"),
    (asm.add32(R1, R2), "0c21000000000000"),
    (asm.add32(R1, 7), "0401000007000000"),
    (asm.sub(R1, R2), "1f21000000000000"),
    (asm.sub(R1, 7), "1701000007000000"),
    (asm.sub32(R1, R2), "1c21000000000000"),
    (asm.sub32(R1, 7), "1401000007000000"),
    (asm.mul(R1, R2), "2f21000000000000"),
    (asm.mul(R1, 7), "2701000007000000"),
    (asm.mul32(R1, R2), "2c21000000000000"),
    (asm.mul32(R1, 7), "2401000007000000"),
    (asm.div(R1, R2), "3f21000000000000"),
    (asm.div(R1, 7), "3701000007000000"),
    (asm.div32(R1, R2), "3c21000000000000"),
    (asm.div32(R1, 7), "3401000007000000"),
    (asm.sdiv(R1, R2), "3f21010000000000"),
    (asm.sdiv(R1, 7), "3701010007000000"),
    (asm.sdiv32(R1, R2), "3c21010000000000"),
    (asm.sdiv32(R1, 7), "3401010007000000"),
    (asm.or_(R1, R2), "4f21000000000000"),
    (asm.or_(R1, 7), "4701000007000000"),
    (asm.or32(R1, R2), "4c21000000000000"),
    (asm.or32(R1, 7), "4401000007000000"),
    (asm.and_(R1, R2), "5f21000000000000"),
    (asm.and_(R1, 7), "5701000007000000"),
    (asm.and32(R1, R2), "5c21000000000000"),
    (asm.and32(R1, 7), "5401000007000000"),
    (asm.lsh(R1, R2), "6f21000000000000"),
    (asm.lsh(R1, 7), "6701000007000000"),
    (asm.lsh32(R1, R2), "6c21000000000000"),
    (asm.lsh32(R1, 7), "6401000007000000"),
    (asm.rsh(R1, R2), "7f21000000000000"),
    (asm.rsh(R1, 7), "7701000007000000"),
    (asm.rsh32(R1, R2), "7c21000000000000"),
    (asm.rsh32(R1, 7), "7401000007000000"),
    (asm.neg(R1), "8701000000000000"),
    (asm.neg32(R1), "8401000000000000"),
    (asm.mod(R1, R2), "9f21000000000000"),
    (asm.mod(R1, 7), "9701000007000000"),
    (asm.mod32(R1, R2), "9c21000000000000"),
    (asm.mod32(R1, 7), "9401000007000000"),
    (asm.smod(R1, R2), "9f21010000000000"),
    (asm.smod(R1, 7), "9701010007000000"),
    (asm.smod32(R1, R2), "9c21010000000000"),
    (asm.smod32(R1, 7), "9401010007000000"),
    (asm.xor(R1, R2), "af21000000000000"),
    (asm.xor(R1, 7), "a701000007000000"),
    (asm.xor32(R1, R2), "ac21000000000000"),
    (asm.xor32(R1, 7), "a401000007000000"),
    (asm.mov(R1, R2), "bf21000000000000"),
    (asm.mov(R1, 7), "b701000007000000"),
    (asm.mov32(R1, R2), "bc21000000000000"),
    (asm.mov32(R1, 7), "b401000007000000"),
    (asm.arsh(R1, R2), "cf21000000000000"),
    (asm.arsh(R1, 7), "c701000007000000"),
    (asm.arsh32(R1, R2), "cc21000000000000"),
    (asm.arsh32(R1, 7), "c401000007000000"),
    # register nibbles: src high, dst low; R10 = 0xa
    (asm.mov(R9, R10), "bfa9000000000000"),
    # negative and unsigned-spelled imm
    (asm.mov(R0, -1), "b7000000ffffffff"),
    (asm.mov32(R0, 0xFFFFFFFF), "b4000000ffffffff"),
    (asm.add(R3, -0x80000000), "0703000000000080"),
    (asm.and_(R1, 0x7FFFFFFF), "57010000ffffff7f"),
    # movsx: MOV | X with off = 8/16/32
    (asm.movsx(R1, R2, 8), "bf21080000000000"),
    (asm.movsx(R1, R2, 16), "bf21100000000000"),
    (asm.movsx(R1, R2, 32), "bf21200000000000"),
    (asm.movsx32(R1, R2, 8), "bc21080000000000"),
    (asm.movsx32(R1, R2, 16), "bc21100000000000"),
    # END: to_le ALU|K = d4, to_be ALU|X = dc, bswap ALU64|K = d7; imm = width
    (asm.to_le(R1, 16), "d401000010000000"),
    (asm.to_le(R1, 32), "d401000020000000"),
    (asm.to_le(R1, 64), "d401000040000000"),
    (asm.to_be(R1, 16), "dc01000010000000"),
    (asm.to_be(R1, 32), "dc01000020000000"),
    (asm.to_be(R1, 64), "dc01000040000000"),
    (asm.bswap(R1, 16), "d701000010000000"),
    (asm.bswap(R1, 32), "d701000020000000"),
    (asm.bswap(R1, 64), "d701000040000000"),
]

JMP = [
    (asm.ja(3), "0500030000000000"),
    (asm.ja(-1), "0500ffff00000000"),
    (asm.gotol(3), "0600000003000000"),
    (asm.gotol(-2), "06000000feffffff"),
    (asm.gotol(0x10000), "0600000000000100"),
    # JMP: reg = op | d, imm = op | 5 ; JMP32: reg = op | e, imm = op | 6
    (asm.jeq(R1, R2, 1), "1d21010000000000"),
    (asm.jeq(R1, 5, 1), "1501010005000000"),
    (asm.jeq32(R1, R2, 1), "1e21010000000000"),
    (asm.jeq32(R1, 5, 1), "1601010005000000"),
    (asm.jgt(R1, R2, 1), "2d21010000000000"),
    (asm.jgt(R1, 5, 1), "2501010005000000"),
    (asm.jgt32(R1, R2, 1), "2e21010000000000"),
    (asm.jgt32(R1, 5, 1), "2601010005000000"),
    (asm.jge(R1, R2, 1), "3d21010000000000"),
    (asm.jge(R1, 5, 1), "3501010005000000"),
    (asm.jge32(R1, R2, 1), "3e21010000000000"),
    (asm.jge32(R1, 5, 1), "3601010005000000"),
    (asm.jset(R1, R2, 1), "4d21010000000000"),
    (asm.jset(R1, 5, 1), "4501010005000000"),
    (asm.jset32(R1, R2, 1), "4e21010000000000"),
    (asm.jset32(R1, 5, 1), "4601010005000000"),
    (asm.jne(R1, R2, 1), "5d21010000000000"),
    (asm.jne(R1, 5, 1), "5501010005000000"),
    (asm.jne32(R1, R2, 1), "5e21010000000000"),
    (asm.jne32(R1, 5, 1), "5601010005000000"),
    (asm.jsgt(R1, R2, 1), "6d21010000000000"),
    (asm.jsgt(R1, 5, 1), "6501010005000000"),
    (asm.jsgt32(R1, R2, 1), "6e21010000000000"),
    (asm.jsgt32(R1, 5, 1), "6601010005000000"),
    (asm.jsge(R1, R2, 1), "7d21010000000000"),
    (asm.jsge(R1, 5, 1), "7501010005000000"),
    (asm.jsge32(R1, R2, 1), "7e21010000000000"),
    (asm.jsge32(R1, 5, 1), "7601010005000000"),
    (asm.jlt(R1, R2, 1), "ad21010000000000"),
    (asm.jlt(R1, 5, 1), "a501010005000000"),
    (asm.jlt32(R1, R2, 1), "ae21010000000000"),
    (asm.jlt32(R1, 5, 1), "a601010005000000"),
    (asm.jle(R1, R2, 1), "bd21010000000000"),
    (asm.jle(R1, 5, 1), "b501010005000000"),
    (asm.jle32(R1, R2, 1), "be21010000000000"),
    (asm.jle32(R1, 5, 1), "b601010005000000"),
    (asm.jslt(R1, R2, 1), "cd21010000000000"),
    (asm.jslt(R1, 5, 1), "c501010005000000"),
    (asm.jslt32(R1, R2, 1), "ce21010000000000"),
    (asm.jslt32(R1, 5, 1), "c601010005000000"),
    (asm.jsle(R1, R2, 1), "dd21010000000000"),
    (asm.jsle(R1, 5, 1), "d501010005000000"),
    (asm.jsle32(R1, R2, 1), "de21010000000000"),
    (asm.jsle32(R1, 5, 1), "d601010005000000"),
    (asm.jne(R1, 0, -5), "5501fbff00000000"),
    (asm.jeq(R1, -1, 0x7FFF), "1501ff7fffffffff"),
    (asm.call(asm.Helper.sk_redirect_map), "8500000034000000"),
    (asm.call(asm.Helper.msg_redirect_hash), "8500000047000000"),
    (asm.call(1), "8500000001000000"),
    (asm.call_local(2), "8510000002000000"),
    (asm.exit_(), "9500000000000000"),
]

LD = [
    (asm.ld_imm64(R3, 0x1122334455667788), slots("1803000088776655", "0000000044332211")),
    (asm.ld_imm64(R1, -1), slots("18010000ffffffff", "00000000ffffffff")),
    (asm.ld_imm64(R0, 0), slots("1800000000000000", "0000000000000000")),
    (asm.ld_map_fd(R1, 5), slots("1811000005000000", "0000000000000000")),
    (asm.ld_map_value(R2, 7, 16), slots("1822000007000000", "0000000010000000")),
]

MEM = [
    # LDX | MEM = 0x61 + size (W 0, H 8, B 0x10, DW 0x18)
    (asm.ldx(W, R0, R1, 0), "6110000000000000"),
    (asm.ldx(H, R0, R1, 2), "6910020000000000"),
    (asm.ldx(B, R0, R1, 3), "7110030000000000"),
    (asm.ldx(DW, R0, R1, 8), "7910080000000000"),
    (asm.ldx(W, R2, R10, -4), "61a2fcff00000000"),
    # LDX | MEMSX = 0x81 + size
    (asm.ldxsx(W, R0, R1, 4), "8110040000000000"),
    (asm.ldxsx(H, R0, R1, 4), "8910040000000000"),
    (asm.ldxsx(B, R0, R1, 4), "9110040000000000"),
    # STX | MEM = 0x63 + size; dst is the base
    (asm.stx(W, R10, R1, -4), "631afcff00000000"),
    (asm.stx(H, R10, R1, -2), "6b1afeff00000000"),
    (asm.stx(B, R10, R1, -1), "731affff00000000"),
    (asm.stx(DW, R10, R1, -8), "7b1af8ff00000000"),
    # ST | MEM = 0x62 + size
    (asm.st(W, R10, -4, 7), "620afcff07000000"),
    (asm.st(H, R10, -2, 7), "6a0afeff07000000"),
    (asm.st(B, R10, -1, 7), "720affff07000000"),
    (asm.st(DW, R10, -8, -1), "7a0af8ffffffffff"),
    (asm.ldx(DW, R0, R1, 0x7FFF), "7910ff7f00000000"),
    (asm.ldx(DW, R0, R1, -0x8000), "7910008000000000"),
]

ATOMIC = [
    # STX | ATOMIC = 0xc3 (W) / 0xdb (DW); imm = op (| FETCH 1)
    (asm.atomic_add(DW, R10, R1, -8), "db1af8ff00000000"),
    (asm.atomic_add(DW, R10, R1, -8, fetch=True), "db1af8ff01000000"),
    (asm.atomic_add(W, R10, R1, -4), "c31afcff00000000"),
    (asm.atomic_add(W, R10, R1, -4, fetch=True), "c31afcff01000000"),
    (asm.atomic_or(DW, R10, R1, -8), "db1af8ff40000000"),
    (asm.atomic_or(W, R10, R1, -4, fetch=True), "c31afcff41000000"),
    (asm.atomic_and(DW, R10, R1, -8), "db1af8ff50000000"),
    (asm.atomic_and(W, R10, R1, -4, fetch=True), "c31afcff51000000"),
    (asm.atomic_xor(DW, R10, R1, -8), "db1af8ffa0000000"),
    (asm.atomic_xor(W, R10, R1, -4, fetch=True), "c31afcffa1000000"),
    (asm.atomic_xchg(DW, R10, R1, -8), "db1af8ffe1000000"),
    (asm.atomic_xchg(W, R10, R1, -4), "c31afcffe1000000"),
    (asm.atomic_cmpxchg(DW, R10, R1, -8), "db1af8fff1000000"),
    (asm.atomic_cmpxchg(W, R10, R1, -4), "c31afcfff1000000"),
]

TABLE = ALU + JMP + LD + MEM + ATOMIC


@pytest.mark.parametrize(("insn", "expected"), TABLE, ids=lambda v: str(v)[:60])
def test_exact_bytes(insn: asm.Instruction, expected: str) -> None:
    assert insn.encode().hex() == expected
    assert asm.Program([insn]).encode().hex() == expected
    assert len(asm.Program([insn])) == len(expected) // 16


@pytest.mark.parametrize(("insn", "expected"), TABLE, ids=lambda v: str(v)[:60])
def test_decode_matches_table(insn: asm.Instruction, expected: str) -> None:
    (decoded,) = asm.decode(bytes.fromhex(expected))
    assert decoded.encode().hex() == expected
    if not (insn.imm > 0x7FFFFFFF and not insn.is_ld_imm64):
        assert decoded == insn


def test_ld_imm64_is_two_slots() -> None:
    prog = asm.Program([asm.ld_imm64(R1, 1), asm.exit_()])
    assert len(prog) == 3
    assert len(prog.encode()) == 24


def test_map_fd_resolved_by_callback() -> None:
    class Map:
        fd = 42

    ref = Map()
    raw = asm.Program([asm.ld_map_fd(R1, ref), asm.ld_map_value(R2, ref, 8)]).encode(
        map_fd=lambda r: r.fd  # type: ignore[attr-defined]
    )
    assert raw.hex() == "".join(
        ["181100002a000000", "0000000000000000", "182200002a000000", "0000000008000000"]
    )


def test_map_ref_without_resolver() -> None:
    with pytest.raises(AssemblyError, match="resolver"):
        asm.Program([asm.ld_map_fd(R1, object())]).encode()


def test_map_resolver_failure_is_assembly_error() -> None:
    def bad(_ref: object) -> int:
        raise RuntimeError("closed")

    with pytest.raises(AssemblyError, match="closed"):
        asm.Program([asm.ld_map_fd(R1, object())]).encode(map_fd=bad)


def test_map_fd_out_of_range() -> None:
    with pytest.raises(AssemblyError, match="out of range"):
        asm.Program([asm.ld_map_fd(R1, 1 << 31)]).encode()


BAD = [
    (lambda: asm.mov(R0, 1 << 31), "out of range"),  # 64-bit imm is sign-extended: s32 only
    (lambda: asm.mov32(R0, 1 << 32), "out of range"),
    (lambda: asm.add(R0, -(1 << 31) - 1), "out of range"),
    (lambda: asm.jeq(R0, 0xFFFFFFFF, 0), "out of range"),
    (lambda: asm.jeq(R0, 0, 1 << 15), "out of range"),
    (lambda: asm.ja(-(1 << 15) - 1), "out of range"),
    (lambda: asm.gotol(1 << 31), "out of range"),
    (lambda: asm.ldx(W, R0, R1, 1 << 15), "out of range"),
    (lambda: asm.st(DW, R10, 0, 1 << 31), "out of range"),
    (lambda: asm.st(W, R10, 0, 1 << 32), "out of range"),
    (lambda: asm.ld_imm64(R0, 1 << 64), "out of range"),
    (lambda: asm.ld_imm64(R0, -(1 << 63) - 1), "out of range"),
    (lambda: asm.ld_map_value(R0, 3, -1), "out of range"),
    (lambda: asm.mov(11, R0), "register"),  # type: ignore[arg-type]
    (lambda: asm.ldx(W, R0, 11, 0), "register"),  # type: ignore[arg-type]
    (lambda: asm.ldxsx(DW, R0, R1, 0), "size"),
    (lambda: asm.atomic_add(B, R10, R1, 0), "size"),
    (lambda: asm.atomic_xchg(H, R10, R1, 0), "size"),
    (lambda: asm.ldx(3, R0, R1, 0), "size"),  # type: ignore[arg-type]
    (lambda: asm.movsx(R0, R1, 64), "movsx"),
    (lambda: asm.movsx32(R0, R1, 32), "movsx32"),
    (lambda: asm.bswap(R0, 8), "16, 32 or 64"),
    (lambda: asm.to_be(R0, 24), "16, 32 or 64"),
    (lambda: asm.call(-1), "out of range"),
    (lambda: asm.jeq(R0, 0, "not a label"), "identifier"),
    (lambda: asm.label("1x"), "identifier"),
    (lambda: asm.mov(R0, True), "int"),
    (lambda: asm.Instruction(0x100), "opcode"),
    (lambda: asm.Instruction(0x07, off=1 << 15), "offset"),
    (lambda: asm.Instruction(0x07, imm=1 << 32), "imm"),
    (lambda: asm.Instruction(0x07, dst=16), "dst"),
    (lambda: asm.Instruction(0x07, map_ref=3), "map"),
    (lambda: asm.ld_map_fd(R1, None), "map reference"),
]


@pytest.mark.parametrize(("build", "message"), BAD)
def test_bad_operands(build: object, message: str) -> None:
    with pytest.raises(AssemblyError, match=message):
        build()  # type: ignore[operator]


def test_assembly_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="out of range"):
        asm.mov(R0, 1 << 40)


def test_opcode_constants() -> None:
    assert asm.LD_IMM64 == 0x18
    assert asm.AluOp.MOV | asm.Source.X | asm.Class.ALU64 == 0xBF
    assert asm.Mode.ATOMIC | asm.Size.DW | asm.Class.STX == 0xDB
    assert [s.nbytes for s in (B, H, W, DW)] == [1, 2, 4, 8]
    assert repr(R10) == "R10"
    assert str(R10) == "r10"
