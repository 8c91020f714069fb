"""encode -> decode -> encode is the identity, for generated programs and for raw slots."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap import asm
from sockmap.asm import Reg, Size

regs = st.sampled_from(list(Reg))
s16 = st.integers(-(1 << 15), (1 << 15) - 1)
s32 = st.integers(-(1 << 31), (1 << 31) - 1)
sizes = st.sampled_from(list(Size))
operand = st.one_of(regs, s32)

OPS = ["add", "sub", "mul", "div", "sdiv", "or", "and", "lsh", "rsh", "mod", "smod", "xor"]
OPS += ["mov", "arsh"]
ALU = [getattr(asm, n + "_" if n in ("or", "and") else n) for n in OPS]
ALU += [getattr(asm, n + "32") for n in OPS]
CONDS = ["jeq", "jne", "jgt", "jge", "jlt", "jle", "jset", "jsgt", "jsge", "jslt", "jsle"]
JUMPS = [getattr(asm, n + sfx) for n in CONDS for sfx in ("", "32")]
ATOMICS = [asm.atomic_add, asm.atomic_or, asm.atomic_and, asm.atomic_xor]

instructions = st.one_of(
    st.builds(lambda f, d, s: f(d, s), st.sampled_from(ALU), regs, operand),
    st.builds(asm.neg, regs),
    st.builds(asm.neg32, regs),
    st.builds(asm.movsx, regs, regs, st.sampled_from([8, 16, 32])),
    st.builds(asm.movsx32, regs, regs, st.sampled_from([8, 16])),
    st.builds(
        lambda f, d, b: f(d, b),
        st.sampled_from([asm.to_le, asm.to_be, asm.bswap]),
        regs,
        st.sampled_from([16, 32, 64]),
    ),
    st.builds(lambda f, d, s, o: f(d, s, o), st.sampled_from(JUMPS), regs, operand, s16),
    st.builds(asm.ja, s16),
    st.builds(asm.gotol, s32),
    st.builds(asm.call, st.integers(0, 300)),
    st.builds(asm.call_local, s32),
    st.just(asm.exit_()),
    st.builds(asm.ld_imm64, regs, st.integers(0, (1 << 64) - 1)),
    st.builds(asm.ld_map_fd, regs, st.integers(0, (1 << 31) - 1)),
    st.builds(asm.ld_map_value, regs, st.integers(0, (1 << 31) - 1), st.integers(0, (1 << 32) - 1)),
    st.builds(asm.ldx, sizes, regs, regs, s16),
    st.builds(asm.ldxsx, st.sampled_from([Size.B, Size.H, Size.W]), regs, regs, s16),
    st.builds(asm.stx, sizes, regs, regs, s16),
    st.builds(asm.st, sizes, regs, s16, s32),
    st.builds(
        lambda f, sz, d, s, o, fetch: f(sz, d, s, o, fetch=fetch),
        st.sampled_from(ATOMICS),
        st.sampled_from([Size.W, Size.DW]),
        regs,
        regs,
        s16,
        st.booleans(),
    ),
    st.builds(asm.atomic_xchg, st.sampled_from([Size.W, Size.DW]), regs, regs, s16),
    st.builds(asm.atomic_cmpxchg, st.sampled_from([Size.W, Size.DW]), regs, regs, s16),
)


@given(st.lists(instructions, max_size=40))
def test_encode_decode_encode(insns: list[asm.Instruction]) -> None:
    raw = asm.Program(insns).encode()
    decoded = asm.decode(raw)
    assert decoded == insns
    assert asm.Program(decoded).encode() == raw


@given(st.lists(instructions, max_size=40))
def test_disassemble_assemble(insns: list[asm.Instruction]) -> None:
    prog = asm.Program(insns)
    text = asm.disassemble(prog)
    assert len(text.splitlines()) == len(insns)
    again = asm.assemble(text)
    assert again.encode() == prog.encode()
    assert asm.disassemble(again) == text


# biased toward the small fields real instructions have, so most slots hit a real form
small = st.sampled_from([0, 0, 1, 8, 16, 32, 64, -1, 0xE1, 0xF1, 0x41])
slot = st.tuples(
    st.integers(0, 255).filter(lambda op: op != asm.LD_IMM64),
    st.integers(0, 255),
    st.one_of(small, s16),
    st.one_of(small, s32),
)


@settings(max_examples=500)
@given(st.lists(slot, min_size=1, max_size=30))
def test_arbitrary_slots_round_trip(slots: list[tuple[int, int, int, int]]) -> None:
    raw = b"".join(struct.pack("<BBhi", *s) for s in slots)
    decoded = asm.decode(raw)
    assert asm.Program(decoded).encode() == raw
    text = asm.disassemble(raw)  # never fails; unknown forms print as .insn
    assert asm.assemble(text).encode() == raw


def test_odd_raw_forms_survive_text() -> None:
    raw = bytes.fromhex(
        "bfcb000000000000"  # r11 = r12: no such registers
        "18110300050000000000000000000000"  # map pseudo with a nonzero off
        "18c10000050000000000000000000000"  # LD_IMM64 with src 12
        "0700010001000000"  # add with off=1
        "8701000001000000"  # neg with an imm
        "e700000000000000"  # ALU64 op 0xe: no such op
        "d800000000000000"  # LD class, DW ABS: legacy, not decoded
    )
    text = asm.disassemble(raw)
    assert all(".insn" in line for line in text.splitlines()), text
    assert asm.assemble(text).encode() == raw
