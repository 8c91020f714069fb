"""Numbers of the eBPF instruction encoding, from the kernel's instruction-set spec.

Every enum holds the value as it sits in the opcode byte (already shifted), so an
opcode is the plain ``|`` of its parts: ``AluOp.ADD | Source.X | Class.ALU64``.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "FETCH",
    "INSN_SIZE",
    "LD_IMM64",
    "PSEUDO_CALL",
    "PSEUDO_KFUNC_CALL",
    "PSEUDO_MAP_FD",
    "PSEUDO_MAP_VALUE",
    "AluOp",
    "AtomicOp",
    "Class",
    "JmpOp",
    "Mode",
    "Reg",
    "Size",
    "Source",
]

INSN_SIZE = 8
"""Bytes per instruction slot; LD_IMM64 takes two slots."""


class Reg(IntEnum):
    """The eleven registers: R0 return value, R1-R5 arguments, R6-R9 callee-saved, R10 frame."""

    R0 = 0
    R1 = 1
    R2 = 2
    R3 = 3
    R4 = 4
    R5 = 5
    R6 = 6
    R7 = 7
    R8 = 8
    R9 = 9
    R10 = 10

    def __repr__(self) -> str:
        return self.name

    def __str__(self) -> str:
        return f"r{self.value}"


class Class(IntEnum):
    """Instruction class: the low three bits of the opcode."""

    LD = 0x00
    LDX = 0x01
    ST = 0x02
    STX = 0x03
    ALU = 0x04
    JMP = 0x05
    JMP32 = 0x06
    ALU64 = 0x07


class Source(IntEnum):
    """Operand source bit of ALU/JMP opcodes (for ``END`` it picks the byte order)."""

    K = 0x00
    X = 0x08
    TO_LE = 0x00
    TO_BE = 0x08


class AluOp(IntEnum):
    """Operation code (high nibble) of ALU and ALU64 instructions."""

    ADD = 0x00
    SUB = 0x10
    MUL = 0x20
    DIV = 0x30
    OR = 0x40
    AND = 0x50
    LSH = 0x60
    RSH = 0x70
    NEG = 0x80
    MOD = 0x90
    XOR = 0xA0
    MOV = 0xB0
    ARSH = 0xC0
    END = 0xD0


class JmpOp(IntEnum):
    """Operation code (high nibble) of JMP and JMP32 instructions."""

    JA = 0x00
    JEQ = 0x10
    JGT = 0x20
    JGE = 0x30
    JSET = 0x40
    JNE = 0x50
    JSGT = 0x60
    JSGE = 0x70
    CALL = 0x80
    EXIT = 0x90
    JLT = 0xA0
    JLE = 0xB0
    JSLT = 0xC0
    JSLE = 0xD0


class Mode(IntEnum):
    """Mode modifier (top three bits) of load/store instructions."""

    IMM = 0x00
    ABS = 0x20
    IND = 0x40
    MEM = 0x60
    MEMSX = 0x80
    ATOMIC = 0xC0


class Size(IntEnum):
    """Access size of load/store instructions, as its opcode bits."""

    W = 0x00
    H = 0x08
    B = 0x10
    DW = 0x18

    @property
    def nbytes(self) -> int:
        """Width of the access in bytes."""
        return {Size.W: 4, Size.H: 2, Size.B: 1, Size.DW: 8}[self]


FETCH = 0x01
"""Atomic modifier: also load the old memory value into ``src`` (``r0`` for cmpxchg)."""


class AtomicOp(IntEnum):
    """The ``imm`` of an ATOMIC store: which read-modify-write to do (FETCH bit clear)."""

    ADD = 0x00
    OR = 0x40
    AND = 0x50
    XOR = 0xA0
    XCHG = 0xE0 | FETCH
    CMPXCHG = 0xF0 | FETCH


LD_IMM64 = Class.LD | Mode.IMM | Size.DW
"""Opcode 0x18 of the two-slot 64-bit immediate load."""

PSEUDO_MAP_FD = 1
"""LD_IMM64 ``src``: imm is a map fd, the register gets the map."""
PSEUDO_MAP_VALUE = 2
"""LD_IMM64 ``src``: imm is a map fd, the register gets its value address + next imm."""
PSEUDO_CALL = 1
"""CALL ``src``: imm is the pc-relative offset of a program-local function."""
PSEUDO_KFUNC_CALL = 2
"""CALL ``src``: imm is the BTF id of a kernel function."""
