"""bpftool-like text for instructions: one line per instruction, prefixed with its pc.

The forms are the kernel's ``print_bpf_insn`` style (``r0 = *(u32 *)(r1 +0)``,
``if r0 == 0x0 goto pc+2``) so the output reads like verifier logs and bpftool dumps.
"""

from __future__ import annotations

from collections.abc import Iterable

from sockmap.abi.enums import Helper
from sockmap.asm.instruction import Instruction, Item
from sockmap.asm.opcodes import (
    FETCH,
    PSEUDO_CALL,
    PSEUDO_KFUNC_CALL,
    PSEUDO_MAP_FD,
    PSEUDO_MAP_VALUE,
    AluOp,
    AtomicOp,
    Class,
    JmpOp,
    Mode,
    Size,
    Source,
)
from sockmap.asm.program import Program, decode

__all__ = ["ALU_SYMBOLS", "ATOMIC_SYMBOLS", "JMP_SYMBOLS", "disassemble", "format_instruction"]

ALU_SYMBOLS: dict[AluOp, str] = {
    AluOp.ADD: "+=",
    AluOp.SUB: "-=",
    AluOp.MUL: "*=",
    AluOp.DIV: "/=",
    AluOp.OR: "|=",
    AluOp.AND: "&=",
    AluOp.LSH: "<<=",
    AluOp.RSH: ">>=",
    AluOp.MOD: "%=",
    AluOp.XOR: "^=",
    AluOp.MOV: "=",
    AluOp.ARSH: "s>>=",
}
JMP_SYMBOLS: dict[JmpOp, str] = {
    JmpOp.JEQ: "==",
    JmpOp.JGT: ">",
    JmpOp.JGE: ">=",
    JmpOp.JSET: "&",
    JmpOp.JNE: "!=",
    JmpOp.JSGT: "s>",
    JmpOp.JSGE: "s>=",
    JmpOp.JLT: "<",
    JmpOp.JLE: "<=",
    JmpOp.JSLT: "s<",
    JmpOp.JSLE: "s<=",
}
ATOMIC_SYMBOLS: dict[int, tuple[str, str]] = {
    AtomicOp.ADD: ("+=", "add"),
    AtomicOp.OR: ("|=", "or"),
    AtomicOp.AND: ("&=", "and"),
    AtomicOp.XOR: ("^=", "xor"),
}
_SIZE_BITS = {Size.B: 8, Size.H: 16, Size.W: 32, Size.DW: 64}
_HELPER_NAMES = {int(h): h.name for h in Helper}


def _raw(ins: Instruction) -> str:
    imm = ins.imm
    if isinstance(ins.map_ref, int):
        imm = (imm & ~0xFFFFFFFF) | (ins.map_ref & 0xFFFFFFFF)
    return (
        f".insn op=0x{ins.opcode:02x} dst={int(ins.dst)} src={int(ins.src)} off={ins.off} imm={imm}"
    )


def _pc(delta: int, label: str | None) -> str:
    text = f"pc{delta:+d}"
    return f"{text} <{label}>" if label else text


def _map_name(ref: object) -> str:
    name = getattr(ref, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(ref, int) and not isinstance(ref, bool):
        return f"fd:{ref}"
    fd = getattr(ref, "fd", None)
    if isinstance(fd, int) and not isinstance(fd, bool):
        return f"fd:{fd}"
    return type(ref).__name__


def _mem(size: Size, base: int, off: int, signed: bool = False) -> str:
    return f"*({'s' if signed else 'u'}{_SIZE_BITS[size]} *)(r{int(base)} {off:+d})"


def _alu(ins: Instruction) -> str:
    p = "r" if ins.cls == Class.ALU64 else "w"
    code, x = ins.opcode & 0xF0, bool(ins.opcode & Source.X)
    d = f"{p}{int(ins.dst)}"
    if code == AluOp.END:
        if ins.src or ins.off or ins.imm not in (16, 32, 64):
            return _raw(ins)
        if ins.cls == Class.ALU64 and x:
            return _raw(ins)
        kind = "bswap" if ins.cls == Class.ALU64 else "be" if x else "le"
        return f"r{int(ins.dst)} = {kind}{ins.imm} r{int(ins.dst)}"
    if code == AluOp.NEG:
        return _raw(ins) if x or ins.src or ins.off or ins.imm else f"{d} = -{d}"
    if code not in ALU_SYMBOLS:
        return _raw(ins)
    op = AluOp(code)
    sym = ALU_SYMBOLS[op]
    if ins.off:
        if op in (AluOp.DIV, AluOp.MOD) and ins.off == 1:
            sym = "s" + sym
        elif op == AluOp.MOV and x and ins.off in (8, 16, 32) and ins.imm == 0:
            return f"{d} = (s{ins.off}){p}{int(ins.src)}"
        else:
            return _raw(ins)
    if x:
        return f"{d} {sym} {p}{int(ins.src)}" if ins.imm == 0 else _raw(ins)
    return f"{d} {sym} {ins.imm}" if ins.src == 0 else _raw(ins)


def _jmp(ins: Instruction, label: str | None) -> str:
    p = "r" if ins.cls == Class.JMP else "w"
    code, x = ins.opcode & 0xF0, bool(ins.opcode & Source.X)
    if code == JmpOp.JA:
        if x or ins.dst or ins.src:
            return _raw(ins)
        if ins.cls == Class.JMP32:
            return f"gotol {_pc(ins.imm, label)}" if ins.off == 0 else _raw(ins)
        return f"goto {_pc(ins.off, label)}" if ins.imm == 0 else _raw(ins)
    if ins.cls == Class.JMP and not x and ins.dst == 0 and ins.off == 0:
        if code == JmpOp.EXIT and ins.src == 0 and ins.imm == 0:
            return "exit"
        if code == JmpOp.CALL:
            if ins.src == 0:
                return f"call {_HELPER_NAMES.get(ins.imm, 'unknown')}#{ins.imm}"
            if ins.src == PSEUDO_CALL:
                return f"call {_pc(ins.imm, label)}"
            if ins.src == PSEUDO_KFUNC_CALL:
                return f"call kfunc#{ins.imm}"
    if code not in JMP_SYMBOLS:
        return _raw(ins)
    sym = JMP_SYMBOLS[JmpOp(code)]
    if x:
        if ins.imm:
            return _raw(ins)
        rhs = f"{p}{int(ins.src)}"
    else:
        if ins.src:
            return _raw(ins)
        rhs = f"0x{ins.imm & 0xFFFFFFFF:x}"
    return f"if {p}{int(ins.dst)} {sym} {rhs} goto {_pc(ins.off, label)}"


def _ld(ins: Instruction) -> str:
    if not ins.is_ld_imm64 or ins.off:
        return _raw(ins)
    d = f"r{int(ins.dst)}"
    if ins.src == 0:
        return f"{d} = 0x{ins.imm & 0xFFFFFFFFFFFFFFFF:x} ll"
    if ins.src in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE):
        ref: object = ins.map_ref if ins.map_ref is not None else ins.imm & 0xFFFFFFFF
        text = f"{d} = map[{_map_name(ref)}]"
        if ins.src == PSEUDO_MAP_VALUE:
            return f"{text}[0]+{ins.map_offset}"
        return text if ins.map_offset == 0 else f"{text} ; next_imm=0x{ins.map_offset:x}"
    return f"{d} = ld_pseudo[src={int(ins.src)}] 0x{ins.imm & 0xFFFFFFFFFFFFFFFF:x} ll"


def _ldst(ins: Instruction) -> str:
    mode, size = ins.opcode & 0xE0, Size(ins.opcode & 0x18)
    cls = ins.cls
    if cls == Class.LDX and mode in (Mode.MEM, Mode.MEMSX):
        signed = mode == Mode.MEMSX
        if ins.imm or (signed and size == Size.DW):
            return _raw(ins)
        return f"r{int(ins.dst)} = {_mem(size, ins.src, ins.off, signed)}"
    if cls == Class.ST and mode == Mode.MEM and ins.src == 0:
        return f"{_mem(size, ins.dst, ins.off)} = {ins.imm}"
    if cls == Class.STX and mode == Mode.MEM and ins.imm == 0:
        return f"{_mem(size, ins.dst, ins.off)} = r{int(ins.src)}"
    if cls == Class.STX and mode == Mode.ATOMIC and size in (Size.W, Size.DW):
        p, bits = ("r", "64") if size == Size.DW else ("w", "")
        loc = f"(u{_SIZE_BITS[size]} *)(r{int(ins.dst)} {ins.off:+d})"
        s = f"{p}{int(ins.src)}"
        if ins.imm == AtomicOp.XCHG:
            return f"{s} = atomic{bits}_xchg({loc}, {s})"
        if ins.imm == AtomicOp.CMPXCHG:
            return f"{p}0 = atomic{bits}_cmpxchg({loc}, {p}0, {s})"
        base = ins.imm & ~FETCH
        if base in ATOMIC_SYMBOLS:
            sym, name = ATOMIC_SYMBOLS[base]
            if ins.imm & FETCH:
                return f"{s} = atomic{bits}_fetch_{name}({loc}, {s})"
            return f"lock *{loc} {sym} {s}"
    return _raw(ins)


def format_instruction(ins: Instruction, label: str | None = None) -> str:
    """One instruction as text (no pc); ``label`` is shown after a jump's offset."""
    cls = ins.cls
    if ins.dst > 10 or ins.src > 10:
        return _raw(ins)
    if cls in (Class.ALU, Class.ALU64):
        return _alu(ins)
    if cls in (Class.JMP, Class.JMP32):
        return _jmp(ins, label or ins.target)
    if cls == Class.LD:
        return _ld(ins)
    return _ldst(ins)


def disassemble(prog: Program | bytes | bytearray | memoryview | Iterable[Item]) -> str:
    """The program as text, one ``  pc: insn`` line per instruction (labels shown at jumps)."""
    if isinstance(prog, bytes | bytearray | memoryview):
        prog = Program(decode(bytes(prog)))
    elif not isinstance(prog, Program):
        prog = Program(prog)
    lines = []
    for orig, (pc, ins) in zip(prog.instructions, prog.layout(), strict=True):
        lines.append(f"{pc:4d}: {format_instruction(ins, orig.target)}")
    return "\n".join(lines)
