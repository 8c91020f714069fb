"""One eBPF instruction, labels, and the builder functions that make them.

Builders check their operands so a mistake fails where it is written; jump targets
may name a label, resolved to an offset when the :class:`~sockmap.asm.Program` is encoded.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from sockmap.abi.enums import Helper
from sockmap.asm.opcodes import (
    FETCH,
    LD_IMM64,
    PSEUDO_CALL,
    PSEUDO_KFUNC_CALL,
    PSEUDO_MAP_FD,
    PSEUDO_MAP_VALUE,
    AluOp,
    AtomicOp,
    Class,
    JmpOp,
    Mode,
    Reg,
    Size,
    Source,
)
from sockmap.errors import AssemblyError

MapFd = Callable[[object], int]
"""Resolver from a map reference (any object) to the fd to put in the instruction."""

S16 = (-(1 << 15), (1 << 15) - 1)
S32 = (-(1 << 31), (1 << 31) - 1)
_IMM32 = (-(1 << 31), (1 << 32) - 1)  # signed or unsigned spelling of 32 bits
_IMM64 = (-(1 << 63), (1 << 64) - 1)
_LABEL_RE = re.compile(r"[A-Za-z_.][A-Za-z0-9_.]*\Z")
_SLOT = struct.Struct("<BBhI")


def _check_range(what: str, value: int, bounds: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AssemblyError(f"{what} must be an int, not {type(value).__name__}")
    lo, hi = bounds
    if not lo <= value <= hi:
        raise AssemblyError(f"{what} {value} is out of range [{lo}, {hi}]")
    return value


@dataclass(frozen=True, slots=True)
class Instruction:
    """One instruction as the kernel sees it; LD_IMM64 is one object holding the 64-bit imm.

    ``target`` names a label whose offset goes into ``off`` (``imm`` for gotol and local
    calls) at encode time; ``map_ref`` of an LD_IMM64 map pseudo is turned into an fd
    by the encoder's resolver and put in the low 32 bits of ``imm``.
    """

    opcode: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    target: str | None = None
    map_ref: object | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        _check_range("opcode", self.opcode, (0, 0xFF))
        _check_range("dst register", self.dst, (0, 0xF))
        _check_range("src register", self.src, (0, 0xF))
        _check_range("offset", self.off, S16)
        _check_range("imm", self.imm, _IMM64 if self.is_ld_imm64 else _IMM32)
        if self.target is not None and not isinstance(self.target, str):
            raise AssemblyError(f"jump target must be a label name, not {self.target!r}")
        if self.map_ref is not None and not (
            self.is_ld_imm64 and self.src in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE)
        ):
            raise AssemblyError("a map reference needs an LD_IMM64 with a map pseudo src")

    @property
    def cls(self) -> Class:
        """Instruction class (low three opcode bits)."""
        return Class(self.opcode & 0x07)

    @property
    def is_ld_imm64(self) -> bool:
        """True for the two-slot 64-bit immediate load."""
        return self.opcode == LD_IMM64

    @property
    def slots(self) -> int:
        """How many 8-byte slots the instruction takes."""
        return 2 if self.is_ld_imm64 else 1

    @property
    def target_in_imm(self) -> bool:
        """True when the jump distance lives in ``imm`` (gotol, local call), else ``off``."""
        return self.opcode == Class.JMP32 | JmpOp.JA or (
            self.opcode == Class.JMP | JmpOp.CALL and self.src == PSEUDO_CALL
        )

    @property
    def map_offset(self) -> int:
        """The value offset (second imm) of an LD_IMM64 map-value pseudo."""
        return (self.imm >> 32) & 0xFFFFFFFF

    def encode(self, map_fd: MapFd | None = None) -> bytes:
        """The 8 (LD_IMM64: 16) little-endian bytes; the target must already be resolved."""
        if self.target is not None:
            raise AssemblyError(
                f"jump to label {self.target!r} is unresolved; encode it through a Program"
            )
        regs = (self.src << 4) | self.dst
        if not self.is_ld_imm64:
            return _SLOT.pack(self.opcode, regs, self.off, self.imm & 0xFFFFFFFF)
        value = self.imm & 0xFFFFFFFFFFFFFFFF
        if self.map_ref is not None:
            fd = resolve_map_fd(self.map_ref, map_fd)
            value = (value & ~0xFFFFFFFF) | (fd & 0xFFFFFFFF)
        return _SLOT.pack(self.opcode, regs, self.off, value & 0xFFFFFFFF) + _SLOT.pack(
            0, 0, 0, value >> 32
        )


def resolve_map_fd(ref: object, map_fd: MapFd | None) -> int:
    """The fd for ``ref``: from the resolver if given, else ``ref`` itself when it is an int."""
    if map_fd is not None:
        try:
            fd = map_fd(ref)
        except AssemblyError:
            raise
        except Exception as exc:
            raise AssemblyError(f"map fd resolver failed for {ref!r}: {exc}") from exc
    elif isinstance(ref, int) and not isinstance(ref, bool):
        fd = ref
    else:
        raise AssemblyError(f"map reference {ref!r} needs a resolver: pass map_fd= to encode()")
    return _check_range(f"fd of map {ref!r}", fd, S32)


@dataclass(frozen=True, slots=True)
class Label:
    """Pseudo-instruction: names the next real instruction; takes no slot."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _LABEL_RE.match(self.name):
            raise AssemblyError(
                f"label name {self.name!r} must be an identifier ([A-Za-z_.][A-Za-z0-9_.]*)"
            )


Item = Instruction | Label
"""What a program is made of."""
Operand = Reg | int
"""A register, or (any other int) an immediate."""
Target = str | int
"""A label name, or a relative offset in slots from the next instruction."""


def label(name: str) -> Label:
    """A label naming the instruction that follows it."""
    return Label(name)


# --------------------------------------------------------------------------- helpers


def _reg(what: str, value: int) -> Reg:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10:
        raise AssemblyError(f"{what} must be a register R0..R10, not {value!r}")
    return Reg(value)


def _size(value: int, allowed: tuple[Size, ...] = tuple(Size)) -> Size:
    if isinstance(value, Size) and value in allowed:
        return value
    names = "/".join(s.name for s in allowed)
    raise AssemblyError(f"size must be one of {names}, not {value!r}")


def _target(target: Target, *, wide: bool = False) -> tuple[int, str | None]:
    """Split a target into (offset, label)."""
    if isinstance(target, str):
        return 0, Label(target).name
    return _check_range("jump offset", target, S32 if wide else S16), None


# --------------------------------------------------------------------------- ALU


def _alu(op: AluOp, cls: Class, dst: Reg, src: Operand, off: int = 0) -> Instruction:
    d = _reg("dst", dst)
    if isinstance(src, Reg):
        return Instruction(op | Source.X | cls, d, src, off, 0)
    bounds = S32 if cls == Class.ALU64 else _IMM32
    imm = _check_range(f"{op.name.lower()} imm", src, bounds)
    return Instruction(op | Source.K | cls, d, 0, off, imm)


def _alu_builder(
    op: AluOp, cls: Class, off: int, doc: str
) -> Callable[[Reg, Operand], Instruction]:
    def build(dst: Reg, src: Operand) -> Instruction:
        return _alu(op, cls, dst, src, off)

    build.__doc__ = doc
    return build


_BITS = "32-bit (upper half zeroed)"
add = _alu_builder(AluOp.ADD, Class.ALU64, 0, "dst += src (64-bit).")
add32 = _alu_builder(AluOp.ADD, Class.ALU, 0, f"dst += src ({_BITS}).")
sub = _alu_builder(AluOp.SUB, Class.ALU64, 0, "dst -= src (64-bit).")
sub32 = _alu_builder(AluOp.SUB, Class.ALU, 0, f"dst -= src ({_BITS}).")
mul = _alu_builder(AluOp.MUL, Class.ALU64, 0, "dst *= src (64-bit).")
mul32 = _alu_builder(AluOp.MUL, Class.ALU, 0, f"dst *= src ({_BITS}).")
div = _alu_builder(AluOp.DIV, Class.ALU64, 0, "dst /= src, unsigned; 0 when src is 0 (64-bit).")
div32 = _alu_builder(AluOp.DIV, Class.ALU, 0, f"dst /= src, unsigned ({_BITS}).")
sdiv = _alu_builder(AluOp.DIV, Class.ALU64, 1, "dst s/= src, signed (64-bit, off=1).")
sdiv32 = _alu_builder(AluOp.DIV, Class.ALU, 1, f"dst s/= src, signed ({_BITS}, off=1).")
or_ = _alu_builder(AluOp.OR, Class.ALU64, 0, "dst |= src (64-bit).")
or32 = _alu_builder(AluOp.OR, Class.ALU, 0, f"dst |= src ({_BITS}).")
and_ = _alu_builder(AluOp.AND, Class.ALU64, 0, "dst &= src (64-bit).")
and32 = _alu_builder(AluOp.AND, Class.ALU, 0, f"dst &= src ({_BITS}).")
lsh = _alu_builder(AluOp.LSH, Class.ALU64, 0, "dst <<= src & 63 (64-bit).")
lsh32 = _alu_builder(AluOp.LSH, Class.ALU, 0, f"dst <<= src & 31 ({_BITS}).")
rsh = _alu_builder(AluOp.RSH, Class.ALU64, 0, "dst >>= src & 63, logical (64-bit).")
rsh32 = _alu_builder(AluOp.RSH, Class.ALU, 0, f"dst >>= src & 31, logical ({_BITS}).")
mod = _alu_builder(AluOp.MOD, Class.ALU64, 0, "dst %= src, unsigned; dst kept when src is 0.")
mod32 = _alu_builder(AluOp.MOD, Class.ALU, 0, f"dst %= src, unsigned ({_BITS}).")
smod = _alu_builder(AluOp.MOD, Class.ALU64, 1, "dst s%= src, signed, truncating (64-bit, off=1).")
smod32 = _alu_builder(AluOp.MOD, Class.ALU, 1, f"dst s%= src, signed ({_BITS}, off=1).")
xor = _alu_builder(AluOp.XOR, Class.ALU64, 0, "dst ^= src (64-bit).")
xor32 = _alu_builder(AluOp.XOR, Class.ALU, 0, f"dst ^= src ({_BITS}).")
mov = _alu_builder(AluOp.MOV, Class.ALU64, 0, "dst = src (64-bit; an imm is sign-extended).")
mov32 = _alu_builder(AluOp.MOV, Class.ALU, 0, f"dst = src ({_BITS}).")
arsh = _alu_builder(AluOp.ARSH, Class.ALU64, 0, "dst s>>= src & 63, sign-filling (64-bit).")
arsh32 = _alu_builder(AluOp.ARSH, Class.ALU, 0, f"dst s>>= src & 31, sign-filling ({_BITS}).")


def neg(dst: Reg) -> Instruction:
    """dst = -dst (64-bit)."""
    return Instruction(AluOp.NEG | Source.K | Class.ALU64, _reg("dst", dst))


def neg32(dst: Reg) -> Instruction:
    """dst = -dst (32-bit, upper half zeroed)."""
    return Instruction(AluOp.NEG | Source.K | Class.ALU, _reg("dst", dst))


def movsx(dst: Reg, src: Reg, bits: int) -> Instruction:
    """dst = (s8/s16/s32) src, sign-extended to 64 bits (MOV with off=bits)."""
    if bits not in (8, 16, 32):
        raise AssemblyError(f"movsx sign-extends from 8, 16 or 32 bits, not {bits!r}")
    return Instruction(AluOp.MOV | Source.X | Class.ALU64, _reg("dst", dst), _reg("src", src), bits)


def movsx32(dst: Reg, src: Reg, bits: int) -> Instruction:
    """dst = (s8/s16) src, sign-extended to 32 bits, upper half zeroed."""
    if bits not in (8, 16):
        raise AssemblyError(f"movsx32 sign-extends from 8 or 16 bits, not {bits!r}")
    return Instruction(AluOp.MOV | Source.X | Class.ALU, _reg("dst", dst), _reg("src", src), bits)


def _end(cls: Class, order: Source, dst: Reg, bits: int) -> Instruction:
    if bits not in (16, 32, 64):
        raise AssemblyError(f"byte swaps are 16, 32 or 64 bits wide, not {bits!r}")
    return Instruction(AluOp.END | order | cls, _reg("dst", dst), 0, 0, bits)


def to_le(dst: Reg, bits: int) -> Instruction:
    """dst = htole<bits>(dst): a no-op (plus truncation) on little-endian hosts."""
    return _end(Class.ALU, Source.TO_LE, dst, bits)


def to_be(dst: Reg, bits: int) -> Instruction:
    """dst = htobe<bits>(dst): network order from host order, truncated to bits."""
    return _end(Class.ALU, Source.TO_BE, dst, bits)


def bswap(dst: Reg, bits: int) -> Instruction:
    """dst = bswap<bits>(dst), whatever the host order (ALU64 END, cpu v4)."""
    return _end(Class.ALU64, Source.K, dst, bits)


# --------------------------------------------------------------------------- jumps


def _jump(op: JmpOp, cls: Class, dst: Reg, src: Operand, target: Target) -> Instruction:
    d = _reg("dst", dst)
    off, name = _target(target)
    if isinstance(src, Reg):
        return Instruction(op | Source.X | cls, d, src, off, 0, name)
    bounds = S32 if cls == Class.JMP else _IMM32
    imm = _check_range(f"{op.name.lower()} imm", src, bounds)
    return Instruction(op | Source.K | cls, d, 0, off, imm, name)


def _jump_builder(op: JmpOp, cls: Class, doc: str) -> Callable[[Reg, Operand, Target], Instruction]:
    def build(dst: Reg, src: Operand, target: Target) -> Instruction:
        return _jump(op, cls, dst, src, target)

    build.__doc__ = doc
    return build


jeq = _jump_builder(JmpOp.JEQ, Class.JMP, "goto target if dst == src (64-bit).")
jeq32 = _jump_builder(JmpOp.JEQ, Class.JMP32, "goto target if dst == src (low 32 bits).")
jne = _jump_builder(JmpOp.JNE, Class.JMP, "goto target if dst != src (64-bit).")
jne32 = _jump_builder(JmpOp.JNE, Class.JMP32, "goto target if dst != src (low 32 bits).")
jgt = _jump_builder(JmpOp.JGT, Class.JMP, "goto target if dst > src, unsigned (64-bit).")
jgt32 = _jump_builder(JmpOp.JGT, Class.JMP32, "goto target if dst > src, unsigned (32-bit).")
jge = _jump_builder(JmpOp.JGE, Class.JMP, "goto target if dst >= src, unsigned (64-bit).")
jge32 = _jump_builder(JmpOp.JGE, Class.JMP32, "goto target if dst >= src, unsigned (32-bit).")
jlt = _jump_builder(JmpOp.JLT, Class.JMP, "goto target if dst < src, unsigned (64-bit).")
jlt32 = _jump_builder(JmpOp.JLT, Class.JMP32, "goto target if dst < src, unsigned (32-bit).")
jle = _jump_builder(JmpOp.JLE, Class.JMP, "goto target if dst <= src, unsigned (64-bit).")
jle32 = _jump_builder(JmpOp.JLE, Class.JMP32, "goto target if dst <= src, unsigned (32-bit).")
jset = _jump_builder(JmpOp.JSET, Class.JMP, "goto target if dst & src (64-bit).")
jset32 = _jump_builder(JmpOp.JSET, Class.JMP32, "goto target if dst & src (low 32 bits).")
jsgt = _jump_builder(JmpOp.JSGT, Class.JMP, "goto target if dst > src, signed (64-bit).")
jsgt32 = _jump_builder(JmpOp.JSGT, Class.JMP32, "goto target if dst > src, signed (32-bit).")
jsge = _jump_builder(JmpOp.JSGE, Class.JMP, "goto target if dst >= src, signed (64-bit).")
jsge32 = _jump_builder(JmpOp.JSGE, Class.JMP32, "goto target if dst >= src, signed (32-bit).")
jslt = _jump_builder(JmpOp.JSLT, Class.JMP, "goto target if dst < src, signed (64-bit).")
jslt32 = _jump_builder(JmpOp.JSLT, Class.JMP32, "goto target if dst < src, signed (32-bit).")
jsle = _jump_builder(JmpOp.JSLE, Class.JMP, "goto target if dst <= src, signed (64-bit).")
jsle32 = _jump_builder(JmpOp.JSLE, Class.JMP32, "goto target if dst <= src, signed (32-bit).")


def ja(target: Target) -> Instruction:
    """goto target, unconditionally (16-bit offset)."""
    off, name = _target(target)
    return Instruction(JmpOp.JA | Source.K | Class.JMP, 0, 0, off, 0, name)


def gotol(target: Target) -> Instruction:
    """goto target, unconditionally, with a 32-bit offset in imm (JMP32 JA, cpu v4)."""
    imm, name = _target(target, wide=True)
    return Instruction(JmpOp.JA | Source.K | Class.JMP32, 0, 0, 0, imm, name)


def call(helper: Helper | int) -> Instruction:
    """Call a kernel helper by id; arguments in R1-R5, result in R0, R1-R5 clobbered."""
    hid = _check_range("helper id", helper, (0, S32[1]))
    return Instruction(JmpOp.CALL | Source.K | Class.JMP, 0, 0, 0, hid)


def call_kfunc(btf_id: int) -> Instruction:
    """Call a kernel function (kfunc) by its BTF id in vmlinux; arguments and result as for
    helpers."""
    kid = _check_range("kfunc BTF id", btf_id, (1, S32[1]))
    return Instruction(JmpOp.CALL | Source.K | Class.JMP, 0, PSEUDO_KFUNC_CALL, 0, kid)


def call_local(target: Target) -> Instruction:
    """Call a program-local (bpf-to-bpf) function at target; the offset goes in imm."""
    imm, name = _target(target, wide=True)
    return Instruction(JmpOp.CALL | Source.K | Class.JMP, 0, PSEUDO_CALL, 0, imm, name)


def exit_() -> Instruction:
    """Return R0 to the caller (the kernel, for the main program)."""
    return Instruction(JmpOp.EXIT | Source.K | Class.JMP)


# --------------------------------------------------------------------------- 64-bit loads


def ld_imm64(dst: Reg, value: int) -> Instruction:
    """dst = a full 64-bit constant (two slots); a negative value is kept as its u64 pattern."""
    imm = _check_range("imm64", value, _IMM64) & 0xFFFFFFFFFFFFFFFF
    return Instruction(LD_IMM64, _reg("dst", dst), 0, 0, imm)


def _check_ref(ref: object) -> object:
    if ref is None or isinstance(ref, bool):
        raise AssemblyError(f"map reference must be a map object or an fd, not {ref!r}")
    return ref


def ld_map_fd(dst: Reg, ref: object) -> Instruction:
    """dst = the map ``ref`` (LD_IMM64 map-fd pseudo); the fd is resolved at encode time."""
    return Instruction(LD_IMM64, _reg("dst", dst), PSEUDO_MAP_FD, 0, 0, None, _check_ref(ref))


def ld_map_value(dst: Reg, ref: object, offset: int = 0) -> Instruction:
    """dst = address of the value of map ``ref`` + offset (array maps; map-value pseudo)."""
    off = _check_range("map value offset", offset, (0, (1 << 32) - 1))
    return Instruction(
        LD_IMM64, _reg("dst", dst), PSEUDO_MAP_VALUE, 0, off << 32, None, _check_ref(ref)
    )


# --------------------------------------------------------------------------- memory


def ldx(size: Size, dst: Reg, src: Reg, off: int) -> Instruction:
    """dst = *(u<size> *)(src + off), zero-extended."""
    s = _size(size)
    o = _check_range("offset", off, S16)
    return Instruction(Class.LDX | Mode.MEM | s, _reg("dst", dst), _reg("src", src), o)


def ldxsx(size: Size, dst: Reg, src: Reg, off: int) -> Instruction:
    """dst = *(s<size> *)(src + off), sign-extended to 64 bits (MEMSX, B/H/W only)."""
    s = _size(size, (Size.B, Size.H, Size.W))
    o = _check_range("offset", off, S16)
    return Instruction(Class.LDX | Mode.MEMSX | s, _reg("dst", dst), _reg("src", src), o)


def stx(size: Size, dst: Reg, src: Reg, off: int) -> Instruction:
    """*(u<size> *)(dst + off) = src."""
    s = _size(size)
    o = _check_range("offset", off, S16)
    return Instruction(Class.STX | Mode.MEM | s, _reg("dst", dst), _reg("src", src), o)


def st(size: Size, dst: Reg, off: int, imm: int) -> Instruction:
    """*(u<size> *)(dst + off) = imm (sign-extended for DW)."""
    s = _size(size)
    o = _check_range("offset", off, S16)
    value = _check_range("store imm", imm, S32 if s == Size.DW else _IMM32)
    return Instruction(Class.ST | Mode.MEM | s, _reg("dst", dst), 0, o, value)


def _atomic(op: int, size: Size, dst: Reg, src: Reg, off: int) -> Instruction:
    s = _size(size, (Size.W, Size.DW))
    o = _check_range("offset", off, S16)
    return Instruction(Class.STX | Mode.ATOMIC | s, _reg("dst", dst), _reg("src", src), o, op)


def atomic_add(size: Size, dst: Reg, src: Reg, off: int, fetch: bool = False) -> Instruction:
    """lock *(dst + off) += src; with fetch, src also gets the old value."""
    return _atomic(AtomicOp.ADD | (FETCH if fetch else 0), size, dst, src, off)


def atomic_or(size: Size, dst: Reg, src: Reg, off: int, fetch: bool = False) -> Instruction:
    """lock *(dst + off) |= src; with fetch, src also gets the old value."""
    return _atomic(AtomicOp.OR | (FETCH if fetch else 0), size, dst, src, off)


def atomic_and(size: Size, dst: Reg, src: Reg, off: int, fetch: bool = False) -> Instruction:
    """lock *(dst + off) &= src; with fetch, src also gets the old value."""
    return _atomic(AtomicOp.AND | (FETCH if fetch else 0), size, dst, src, off)


def atomic_xor(size: Size, dst: Reg, src: Reg, off: int, fetch: bool = False) -> Instruction:
    """lock *(dst + off) ^= src; with fetch, src also gets the old value."""
    return _atomic(AtomicOp.XOR | (FETCH if fetch else 0), size, dst, src, off)


def atomic_xchg(size: Size, dst: Reg, src: Reg, off: int) -> Instruction:
    """Swap src and *(dst + off) atomically."""
    return _atomic(AtomicOp.XCHG, size, dst, src, off)


def atomic_cmpxchg(size: Size, dst: Reg, src: Reg, off: int) -> Instruction:
    """If *(dst + off) == R0 store src there; R0 gets the old value either way."""
    return _atomic(AtomicOp.CMPXCHG, size, dst, src, off)
