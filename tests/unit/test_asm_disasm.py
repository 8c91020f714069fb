"""Disassembler text pinned for a small program, and the assembler reading it back."""

from __future__ import annotations

import pytest

from sockmap import asm
from sockmap.asm import DW, R0, R1, R2, R3, R6, R10, B, H, W
from sockmap.errors import AssemblyError


class SockMap:
    """Stands in for a map object: has a name and an fd."""

    name = "sock_map"
    fd = 9


SOCK_MAP = SockMap()

PROG = asm.Program(
    [
        asm.ldx(W, R0, R1, 0),
        asm.jeq(R0, 0, "out"),
        asm.mov(R6, R1),
        asm.call(asm.Helper.sk_redirect_map),
        asm.ld_map_fd(R1, 5),
        asm.ld_map_fd(R2, SOCK_MAP),
        asm.mov32(R2, 7),
        asm.add32(R2, 7),
        asm.atomic_add(DW, R10, R1, -8),
        asm.label("out"),
        asm.exit_(),
    ],
    name="verdict",
)

EXPECTED = """\
   0: r0 = *(u32 *)(r1 +0)
   1: if r0 == 0x0 goto pc+9 <out>
   2: r6 = r1
   3: call sk_redirect_map#52
   4: r1 = map[fd:5]
   6: r2 = map[sock_map]
   8: w2 = 7
   9: w2 += 7
  10: lock *(u64 *)(r10 -8) += r1
  11: exit"""


def test_pinned_program() -> None:
    assert asm.disassemble(PROG) == EXPECTED


def test_bytes_input_shows_fds_and_no_labels() -> None:
    text = asm.disassemble(PROG.encode(map_fd=lambda r: r if isinstance(r, int) else r.fd))  # type: ignore[attr-defined]
    assert text.splitlines()[1] == "   1: if r0 == 0x0 goto pc+9"
    assert text.splitlines()[5] == "   6: r2 = map[fd:9]"


FORMS = [
    (asm.mov(R1, R2), "r1 = r2"),
    (asm.mov(R1, -1), "r1 = -1"),
    (asm.sub32(R1, R2), "w1 -= w2"),
    (asm.mul(R1, 3), "r1 *= 3"),
    (asm.div(R1, R2), "r1 /= r2"),
    (asm.sdiv(R1, R2), "r1 s/= r2"),
    (asm.mod32(R1, 3), "w1 %= 3"),
    (asm.smod(R1, 3), "r1 s%= 3"),
    (asm.or_(R1, 1), "r1 |= 1"),
    (asm.and_(R1, R2), "r1 &= r2"),
    (asm.xor32(R1, R2), "w1 ^= w2"),
    (asm.lsh(R1, 4), "r1 <<= 4"),
    (asm.rsh32(R1, 4), "w1 >>= 4"),
    (asm.arsh(R1, 4), "r1 s>>= 4"),
    (asm.neg(R3), "r3 = -r3"),
    (asm.neg32(R3), "w3 = -w3"),
    (asm.movsx(R1, R2, 32), "r1 = (s32)r2"),
    (asm.movsx32(R1, R2, 8), "w1 = (s8)w2"),
    (asm.to_be(R1, 16), "r1 = be16 r1"),
    (asm.to_le(R1, 32), "r1 = le32 r1"),
    (asm.bswap(R1, 64), "r1 = bswap64 r1"),
    (asm.ld_imm64(R3, 0x1122334455667788), "r3 = 0x1122334455667788 ll"),
    (asm.ld_map_value(R1, 5, 16), "r1 = map[fd:5][0]+16"),
    (asm.ld_map_fd(R1, SOCK_MAP), "r1 = map[sock_map]"),
    (asm.ldx(B, R0, R1, 3), "r0 = *(u8 *)(r1 +3)"),
    (asm.ldx(DW, R0, R10, -8), "r0 = *(u64 *)(r10 -8)"),
    (asm.ldxsx(H, R0, R1, 2), "r0 = *(s16 *)(r1 +2)"),
    (asm.stx(W, R10, R1, -4), "*(u32 *)(r10 -4) = r1"),
    (asm.st(H, R10, -2, 7), "*(u16 *)(r10 -2) = 7"),
    (asm.atomic_or(W, R10, R1, -4), "lock *(u32 *)(r10 -4) |= w1"),
    (asm.atomic_and(DW, R10, R1, -8, fetch=True), "r1 = atomic64_fetch_and((u64 *)(r10 -8), r1)"),
    (asm.atomic_xor(W, R10, R1, -4, fetch=True), "w1 = atomic_fetch_xor((u32 *)(r10 -4), w1)"),
    (asm.atomic_xchg(DW, R10, R1, -8), "r1 = atomic64_xchg((u64 *)(r10 -8), r1)"),
    (asm.atomic_cmpxchg(W, R10, R1, -4), "w0 = atomic_cmpxchg((u32 *)(r10 -4), w0, w1)"),
    (asm.jne(R1, R2, 3), "if r1 != r2 goto pc+3"),
    (asm.jsgt32(R1, -1, -2), "if w1 s> 0xffffffff goto pc-2"),
    (asm.jset(R1, 0x10, 0), "if r1 & 0x10 goto pc+0"),
    (asm.jle32(R1, R2, 1), "if w1 <= w2 goto pc+1"),
    (asm.ja(-4), "goto pc-4"),
    (asm.gotol(70000), "gotol pc+70000"),
    (asm.call(999), "call unknown#999"),
    (asm.call_local(4), "call pc+4"),
    (asm.exit_(), "exit"),
]


@pytest.mark.parametrize(("insn", "text"), FORMS, ids=[t for _, t in FORMS])
def test_each_form(insn: asm.Instruction, text: str) -> None:
    assert asm.format_instruction(insn) == text
    (parsed,) = asm.assemble(text, maps={"sock_map": SOCK_MAP}).instructions
    assert parsed.encode(map_fd=lambda r: 5) == insn.encode(map_fd=lambda r: 5)


def test_assemble_reads_the_pinned_text_back() -> None:
    again = asm.assemble(EXPECTED, name="verdict", maps={"sock_map": SOCK_MAP})
    assert again == PROG
    assert again.labels == {"out": 11}


def test_assemble_source_with_labels_and_comments() -> None:
    prog = asm.assemble(
        """
        ; count and pass
        r0 = 1            // default verdict
        if r1 == 0 goto out
    loop:
        r1 -= 1
        if r1 s> 0 goto loop
        call map_lookup_elem
    out:
        exit
        """
    )
    assert prog == asm.Program(
        [
            asm.mov(R0, 1),
            asm.jeq(R1, 0, "out"),
            asm.label("loop"),
            asm.sub(R1, 1),
            asm.jsgt(R1, 0, "loop"),
            asm.call(asm.Helper.map_lookup_elem),
            asm.label("out"),
            asm.exit_(),
        ]
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("r1 = frobnicate", "cannot parse"),
        ("r11 = r1", "no register r11"),
        ("w1 += r2", "r \\(64\\) or w \\(32\\)"),
        ("call sk_redirect_map#53", "disagree"),
        ("call no_such_helper", "unknown helper"),
        ("r1 = map[other]", "not in maps"),
        ("r1 = be16 r2", "in place"),
        ("goto nowhere\nexit", None),
    ],
)
def test_assemble_errors(text: str, message: str | None) -> None:
    if message is None:  # parses; fails at encode time like any undefined label
        with pytest.raises(AssemblyError, match="undefined label"):
            asm.assemble(text).encode()
        return
    with pytest.raises(AssemblyError, match=message):
        asm.assemble(text)


def test_error_names_the_line() -> None:
    with pytest.raises(AssemblyError, match="line 2"):
        asm.assemble("exit\nbogus")
