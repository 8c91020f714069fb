"""A program: instructions and labels, encoded to the bytes ``BPF_PROG_LOAD`` takes, and back.

Labels are resolved only when encoding, so programs can be built from pieces and
concatenated freely; map references stay symbolic until a resolver gives their fds.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable, Iterator
from typing import overload

from sockmap.asm.instruction import (
    S16,
    S32,
    Instruction,
    Item,
    Label,
    MapFd,
)
from sockmap.asm.opcodes import INSN_SIZE, LD_IMM64, PSEUDO_MAP_FD, PSEUDO_MAP_VALUE, Reg
from sockmap.errors import AssemblyError

__all__ = ["Program", "decode"]

_SLOT = struct.Struct("<BBhi")


def _check_item(item: object) -> Item:
    if not isinstance(item, Instruction | Label):
        raise AssemblyError(f"a program holds Instructions and Labels, not {item!r}")
    return item


class Program:
    """An ordered list of instructions and labels, with a name for the kernel (max 15 chars)."""

    def __init__(self, items: Iterable[Item] = (), name: str = "") -> None:
        self.items: list[Item] = [_check_item(i) for i in items]
        self.name = name

    # ------------------------------------------------------------------ container

    def __len__(self) -> int:
        """Number of 8-byte slots (LD_IMM64 counts two; labels none)."""
        return sum(i.slots for i in self.items if isinstance(i, Instruction))

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    @overload
    def __getitem__(self, index: int) -> Item: ...
    @overload
    def __getitem__(self, index: slice) -> list[Item]: ...
    def __getitem__(self, index: int | slice) -> Item | list[Item]:
        return self.items[index]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Program):
            return NotImplemented
        return self.items == other.items and self.name == other.name

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Program({self.items!r}, name={self.name!r})"

    def __add__(self, other: Program | Iterable[Item]) -> Program:
        return Program([*self.items, *other], name=self.name)

    def __radd__(self, other: Iterable[Item]) -> Program:
        return Program([*other, *self.items], name=self.name)

    def __iadd__(self, other: Program | Iterable[Item]) -> Program:
        self.extend(other)
        return self

    def append(self, item: Item) -> None:
        """Add one instruction or label at the end."""
        self.items.append(_check_item(item))

    def extend(self, items: Iterable[Item]) -> None:
        """Add instructions and labels (or another program's) at the end."""
        self.items.extend(_check_item(i) for i in items)

    # ------------------------------------------------------------------ views

    @property
    def instructions(self) -> list[Instruction]:
        """The real instructions, labels left out."""
        return [i for i in self.items if isinstance(i, Instruction)]

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> slot index of the instruction it names; raises on a duplicate."""
        return self._layout()[1]

    @property
    def map_refs(self) -> list[object]:
        """Distinct map references (by identity; ints by value) in order of first use."""
        seen: list[object] = []
        for ins in self.instructions:
            ref = ins.map_ref
            if ref is None:
                continue
            if not any(
                r is ref or (type(r) is int and type(ref) is int and r == ref) for r in seen
            ):
                seen.append(ref)
        return seen

    # ------------------------------------------------------------------ encoding

    def _layout(self) -> tuple[list[tuple[int, Instruction]], dict[str, int], int]:
        placed: list[tuple[int, Instruction]] = []
        labels: dict[str, int] = {}
        pc = 0
        for item in self.items:
            if isinstance(item, Label):
                if item.name in labels:
                    raise AssemblyError(
                        f"label {item.name!r} is defined twice (at pc {labels[item.name]} "
                        f"and pc {pc}); label names must be unique in a program"
                    )
                labels[item.name] = pc
            else:
                placed.append((pc, item))
                pc += item.slots
        return placed, labels, pc

    def layout(self) -> list[tuple[int, Instruction]]:
        """(pc, instruction) pairs with every label target resolved to an offset."""
        placed, labels, end = self._layout()
        out: list[tuple[int, Instruction]] = []
        for pc, ins in placed:
            if ins.target is not None:
                ins = _resolve(ins, pc, labels, end)
            out.append((pc, ins))
        return out

    def resolved(self) -> list[Instruction]:
        """The instructions with every label target resolved to an offset."""
        return [ins for _, ins in self.layout()]

    def encode(self, map_fd: MapFd | None = None) -> bytes:
        """Little-endian bytes, 8 per slot; ``map_fd`` turns each map reference into an fd.

        Without ``map_fd`` only int map references (taken as fds) can be encoded.
        """
        return b"".join(ins.encode(map_fd) for ins in self.resolved())

    @classmethod
    def decode(cls, raw: bytes, name: str = "") -> Program:
        """A program (no labels) from encoded bytes."""
        return cls(decode(raw), name=name)


def _resolve(ins: Instruction, pc: int, labels: dict[str, int], end: int) -> Instruction:
    name = ins.target
    assert name is not None
    if name not in labels:
        known = ", ".join(sorted(labels)) or "none"
        raise AssemblyError(
            f"instruction at pc {pc} jumps to undefined label {name!r} (defined: {known})"
        )
    dest = labels[name]
    if dest >= end:
        raise AssemblyError(f"label {name!r} is at the end of the program and names no instruction")
    delta = dest - (pc + 1)
    if ins.target_in_imm:
        lo, hi = S32
        if not lo <= delta <= hi:
            raise AssemblyError(f"jump at pc {pc} to {name!r} is {delta} slots, beyond 32 bits")
        return dataclasses.replace(ins, imm=delta, target=None)
    lo, hi = S16
    if not lo <= delta <= hi:
        raise AssemblyError(
            f"jump at pc {pc} to {name!r} is {delta} slots, beyond the 16-bit offset; "
            "use gotol for long unconditional jumps"
        )
    return dataclasses.replace(ins, off=delta, target=None)


def _reg_or_int(n: int) -> int:
    return Reg(n) if n <= 10 else n


def decode(raw: bytes) -> list[Instruction]:
    """Instructions from encoded bytes: LD_IMM64 re-joined, a map pseudo's fd kept as its ref."""
    data = bytes(raw)
    if len(data) % INSN_SIZE:
        raise AssemblyError(f"program is {len(data)} bytes, not a multiple of {INSN_SIZE}")
    out: list[Instruction] = []
    pos = 0
    while pos < len(data):
        opcode, regs, off, imm = _SLOT.unpack_from(data, pos)
        dst, src = _reg_or_int(regs & 0x0F), _reg_or_int(regs >> 4)
        pos += INSN_SIZE
        if opcode != LD_IMM64:
            out.append(Instruction(opcode, dst, src, off, imm))
            continue
        if pos >= len(data):
            raise AssemblyError(f"LD_IMM64 at pc {pos // INSN_SIZE - 1} has no second slot")
        op2, regs2, off2, hi = struct.unpack_from("<BBhI", data, pos)
        if op2 or regs2 or off2:
            raise AssemblyError(
                f"second slot of LD_IMM64 at pc {pos // INSN_SIZE - 1} must be zero but its imm"
            )
        pos += INSN_SIZE
        lo = imm & 0xFFFFFFFF
        if src in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE):
            out.append(Instruction(opcode, dst, src, off, hi << 32, None, imm))
        else:
            out.append(Instruction(opcode, dst, src, off, (hi << 32) | lo))
    return out
