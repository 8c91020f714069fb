"""The reference interpreter: one instruction at a time, every access through ``Memory``."""

from __future__ import annotations

from sockmap.asm.opcodes import (
    LD_IMM64,
    PSEUDO_CALL,
    PSEUDO_MAP_FD,
    PSEUDO_MAP_VALUE,
    AluOp,
    AtomicOp,
    Class,
    JmpOp,
    Mode,
)
from sockmap.errors import VmError
from sockmap.vm._semantics import M32, M64, alu, end, imm64, jmp, sext
from sockmap.vm.helpers import HELPERS, kfuncs
from sockmap.vm.memory import CTX_BASE, FIRST_MAP_RID, STACK_SIZE, Memory, base
from sockmap.vm.validate import MAX_CALL_FRAMES, Checked

__all__ = ["budget_error", "direct_value", "interpret"]

_SIZE = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}


def budget_error(pc: int, budget: int) -> VmError:
    """The error for a run that used up its instruction budget."""
    return VmError(f"pc {pc}: instruction budget of {budget} exhausted (a loop that does not end?)")


def direct_value(mem: Memory, idx: int, pc: int) -> int:
    """Address of element 0's value of array map ``idx`` (LD_IMM64 map-value pseudo)."""
    m = mem.maps[idx]
    value = m.vm_lookup(bytes(m.key_size))
    if value is None:
        raise VmError(f"pc {pc}: map#{idx} has no element 0 for a direct value load")
    return mem.add_value(value, m.value_size, idx)


def interpret(checked: Checked, mem: Memory, budget: int) -> int:
    """Run a validated program; returns r0 (u64)."""
    insns = checked.insns
    regs = [0] * 11
    regs[1] = CTX_BASE
    regs[10] = base(len(mem.regions) - 1) + STACK_SIZE
    frames: list[tuple[int, list[int]]] = []
    pc = 0
    steps = 0
    while True:
        steps += 1
        if steps > budget:
            raise budget_error(pc, budget)
        ins = insns[pc]
        assert ins is not None
        opcode, dst, src, off, imm = ins.opcode, ins.dst, ins.src, ins.off, ins.imm
        cls = opcode & 0x07
        op = opcode & 0xF0
        nxt = pc + 1
        if cls in (Class.ALU64, Class.ALU):
            bits = 64 if cls == Class.ALU64 else 32
            if op == AluOp.END:
                regs[dst] = end(bool(opcode & 0x08), bits == 64, regs[dst], imm)
            elif op == AluOp.NEG:
                regs[dst] = (-regs[dst]) & (M64 if bits == 64 else M32)
            else:
                b = regs[src] if opcode & 0x08 else (imm64(imm) if bits == 64 else imm & M32)
                regs[dst] = alu(op, regs[dst], b, off, bits)
        elif cls in (Class.JMP, Class.JMP32):
            if op == JmpOp.EXIT:
                if not frames:
                    return regs[0]
                pc, saved = frames.pop()
                regs[6:11] = saved
                continue
            if op == JmpOp.CALL:
                if src == PSEUDO_CALL:  # local function
                    if len(frames) + 1 >= MAX_CALL_FRAMES:
                        raise VmError(f"pc {pc}: call stack deeper than {MAX_CALL_FRAMES} frames")
                    frames.append((nxt, regs[6:11]))
                    regs[10] = mem.new_stack(len(frames))[0]
                    pc = nxt + imm
                    continue
                fn = kfuncs()[imm] if src else HELPERS[imm].fn
                regs[0] = fn(mem, regs[1], regs[2], regs[3], regs[4], regs[5], pc)
            elif op == JmpOp.JA:
                pc = nxt + (sext(imm, 32) if cls == Class.JMP32 else off)
                continue
            else:
                bits = 64 if cls == Class.JMP else 32
                b = regs[src] if opcode & 0x08 else (imm64(imm) if bits == 64 else imm & M32)
                if jmp(op, regs[dst], b, bits):
                    nxt += off
        elif opcode == LD_IMM64:
            if src == PSEUDO_MAP_FD:
                regs[dst] = base(FIRST_MAP_RID + checked.map_index[pc])
            elif src == PSEUDO_MAP_VALUE:
                regs[dst] = direct_value(mem, checked.map_index[pc], pc) + ins.map_offset
            else:
                regs[dst] = imm & M64
            nxt = pc + 2
        elif cls == Class.LDX:
            size = _SIZE[opcode & 0x18]
            v = mem.load((regs[src] + off) & M64, size, pc)
            if opcode & 0xE0 == Mode.MEMSX:
                v = sext(v, 8 * size) & M64
            regs[dst] = v
        elif cls == Class.ST:
            mem.store((regs[dst] + off) & M64, _SIZE[opcode & 0x18], imm64(imm), pc)
        elif opcode & 0xE0 == Mode.ATOMIC:
            size = _SIZE[opcode & 0x18]
            s, r0 = mem.atomic((regs[dst] + off) & M64, size, imm, regs[src], regs[0], pc)
            if imm == AtomicOp.CMPXCHG:
                regs[0] = r0
            else:
                regs[src] = s
        else:
            mem.store((regs[dst] + off) & M64, _SIZE[opcode & 0x18], regs[src], pc)
        pc = nxt
