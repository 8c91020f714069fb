"""Differential test: random straight-line ALU/JMP/stack programs, interpreter == fast path."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockmap import asm
from sockmap.abi import ProgType
from sockmap.asm import R0, R10, Reg
from sockmap.vm import SkbContext, load

REGS = [Reg(i) for i in range(10)]
ALU2 = [
    "add", "sub", "mul", "div", "sdiv", "mod", "smod", "or_", "and_", "xor", "lsh", "rsh",
    "arsh", "mov",
]  # fmt: skip
JMPS = ["jeq", "jne", "jgt", "jge", "jlt", "jle", "jset", "jsgt", "jsge", "jslt", "jsle"]
SIZES = [asm.B, asm.H, asm.W, asm.DW]

u64 = st.integers(0, (1 << 64) - 1)
imm = st.one_of(
    st.integers(-(1 << 31), (1 << 31) - 1), st.sampled_from([0, 1, -1, 31, 32, 63, 64, -(1 << 31)])
)
reg = st.sampled_from(REGS)


@st.composite
def op(draw: st.DrawFn) -> tuple[str, tuple[object, ...]]:
    kind = draw(st.sampled_from(["alu", "alu", "alu", "unary", "jmp", "mem"]))
    if kind == "alu":
        name = draw(st.sampled_from(ALU2)) + draw(st.sampled_from(["", "32"]))
        name = name.replace("_32", "32")
        src = draw(st.one_of(reg, imm))
        return "alu", (getattr(asm, name), draw(reg), src)
    if kind == "unary":
        which = draw(
            st.sampled_from(["neg", "neg32", "bswap", "to_be", "to_le", "movsx", "movsx32"])
        )
        d = draw(reg)
        if which in ("neg", "neg32"):
            return "raw", (getattr(asm, which)(d),)
        if which == "movsx":
            return "raw", (asm.movsx(d, draw(reg), draw(st.sampled_from([8, 16, 32]))),)
        if which == "movsx32":
            return "raw", (asm.movsx32(d, draw(reg), draw(st.sampled_from([8, 16]))),)
        return "raw", (getattr(asm, which)(d, draw(st.sampled_from([16, 32, 64]))),)
    if kind == "jmp":
        name = draw(st.sampled_from(JMPS)) + draw(st.sampled_from(["", "32"]))
        return "jmp", (
            getattr(asm, name),
            draw(reg),
            draw(st.one_of(reg, imm)),
            draw(st.integers(1, 6)),
        )
    size = draw(st.sampled_from(SIZES))
    off = -draw(st.integers(1, 64 // size.nbytes)) * size.nbytes
    which = draw(st.sampled_from(["stx", "st", "ldx", "ldxsx"]))
    if which == "stx":
        return "raw", (asm.stx(size, R10, draw(reg), off),)
    if which == "st":
        return "raw", (asm.st(size, R10, off, draw(imm)),)
    if which == "ldxsx" and size != asm.DW:
        return "raw", (asm.ldxsx(size, draw(reg), R10, off),)
    return "raw", (asm.ldx(size, draw(reg), R10, off),)


@st.composite
def program(draw: st.DrawFn) -> asm.Program:
    init = draw(st.lists(u64, min_size=10, max_size=10))
    ops = draw(st.lists(op(), min_size=1, max_size=30))
    body: list[list[asm.Item]] = []
    for i, (kind, args) in enumerate(ops):
        if kind == "alu":
            build, d, s = args
            body.append([build(d, s)])
        elif kind == "jmp":
            build, d, s, ahead = args
            target = min(i + 1 + int(ahead), len(ops))  # forward: always terminates
            body.append([build(d, s, f"L{target}")])
        else:
            body.append([args[0]])
    items: list[asm.Item] = [asm.ld_imm64(r, v) for r, v in zip(REGS, init, strict=True)]
    # the stack starts zeroed in the VM; make that explicit for the kernel
    items.extend(asm.st(asm.DW, R10, -8 * (i + 1), 0) for i in range(8))
    used = {ins.target for part in body for ins in part if isinstance(ins, asm.Instruction)}
    for i, part in enumerate(body):
        if f"L{i}" in used:
            items.append(asm.label(f"L{i}"))
        items.extend(part)
    if f"L{len(ops)}" in used:
        items.append(asm.label(f"L{len(ops)}"))
    items.extend(asm.xor(R0, r) for r in REGS[1:])
    items.append(asm.exit_())
    return asm.Program(items)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program())
def test_fast_path_equals_interpreter(prog: asm.Program) -> None:
    slow = load(prog, ProgType.SCHED_CLS, fast=False)
    fast = load(prog, ProgType.SCHED_CLS, fast=True)
    ctx = SkbContext(data=bytes(64), len=64)
    assert fast.run(ctx) == slow.run(SkbContext(data=bytes(64), len=64)), fast.source
