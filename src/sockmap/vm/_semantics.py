"""Instruction semantics on Python ints, shared by the interpreter and the validator.

Registers are u64 values (``0 <= v < 2**64``); 32-bit operations see and produce the
low half, zero-extended. Written from the kernel's instruction-set specification.
"""

from __future__ import annotations

from sockmap.asm.opcodes import AluOp, JmpOp

M64 = (1 << 64) - 1
M32 = 0xFFFFFFFF
SIGN64 = 1 << 63
SIGN32 = 1 << 31


def sext(value: int, bits: int) -> int:
    """``value``'s low ``bits`` as a signed Python int."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def imm64(imm: int) -> int:
    """A 32-bit immediate sign-extended to 64 bits, as u64."""
    return sext(imm, 32) & M64


def _sdiv(a: int, b: int, bits: int) -> int:
    mask = (1 << bits) - 1
    if not b & mask:
        return 0
    sa, sb = sext(a, bits), sext(b, bits)
    q = abs(sa) // abs(sb)
    if (sa < 0) != (sb < 0):
        q = -q
    return q & mask  # INT_MIN / -1 wraps back to INT_MIN


def _smod(a: int, b: int, bits: int) -> int:
    mask = (1 << bits) - 1
    if not b & mask:
        return a & mask
    sa, sb = sext(a, bits), sext(b, bits)
    r = abs(sa) % abs(sb)
    return (-r if sa < 0 else r) & mask  # INT_MIN % -1 is 0


def alu(op: int, a: int, b: int, off: int, bits: int) -> int:
    """Result of ALU ``op`` (an AluOp value, not END/NEG) on u64 operands, at ``bits`` width."""
    mask = M64 if bits == 64 else M32
    a &= mask
    b &= mask
    if op == AluOp.ADD:
        return (a + b) & mask
    if op == AluOp.SUB:
        return (a - b) & mask
    if op == AluOp.MUL:
        return (a * b) & mask
    if op == AluOp.DIV:
        if off == 1:
            return _sdiv(a, b, bits)
        return a // b if b else 0
    if op == AluOp.MOD:
        if off == 1:
            return _smod(a, b, bits)
        return a % b if b else a
    if op == AluOp.OR:
        return a | b
    if op == AluOp.AND:
        return a & b
    if op == AluOp.XOR:
        return a ^ b
    if op == AluOp.LSH:
        return (a << (b & (bits - 1))) & mask
    if op == AluOp.RSH:
        return a >> (b & (bits - 1))
    if op == AluOp.ARSH:
        return (sext(a, bits) >> (b & (bits - 1))) & mask
    if op == AluOp.MOV:
        if off:
            return sext(b, off) & mask  # movsx
        return b
    raise ValueError(f"not a two-operand ALU op: {op:#x}")


def bswap(value: int, bits: int) -> int:
    """Reverse the low ``bits`` of ``value`` byte-wise (the rest is dropped)."""
    n = bits // 8
    return int.from_bytes((value & ((1 << bits) - 1)).to_bytes(n, "little"), "big")


def end(to_be: bool, alu64: bool, value: int, bits: int) -> int:
    """Byte-order conversion on a little-endian host: to_le truncates, to_be/bswap swap."""
    if alu64 or to_be:
        return bswap(value, bits)
    return value & ((1 << bits) - 1)


def jmp(op: int, a: int, b: int, bits: int) -> bool:
    """Whether conditional jump ``op`` (a JmpOp value) is taken."""
    mask = M64 if bits == 64 else M32
    a &= mask
    b &= mask
    if op == JmpOp.JEQ:
        return a == b
    if op == JmpOp.JNE:
        return a != b
    if op == JmpOp.JGT:
        return a > b
    if op == JmpOp.JGE:
        return a >= b
    if op == JmpOp.JLT:
        return a < b
    if op == JmpOp.JLE:
        return a <= b
    if op == JmpOp.JSET:
        return bool(a & b)
    sa, sb = sext(a, bits), sext(b, bits)
    if op == JmpOp.JSGT:
        return sa > sb
    if op == JmpOp.JSGE:
        return sa >= sb
    if op == JmpOp.JSLT:
        return sa < sb
    if op == JmpOp.JSLE:
        return sa <= sb
    raise ValueError(f"not a conditional jump: {op:#x}")
