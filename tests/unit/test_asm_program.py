"""Programs: label resolution, slot counting, map references, concatenation, error cases."""

from __future__ import annotations

import pytest

from sockmap import asm
from sockmap.asm import R0, R1, R2, W
from sockmap.errors import AssemblyError


def test_labels_forward_and_backward_across_ld_imm64() -> None:
    prog = asm.Program(
        [
            asm.label("top"),
            asm.mov(R0, 0),  # pc 0
            asm.ld_imm64(R1, 1),  # pc 1-2
            asm.jeq(R0, 0, "out"),  # pc 3 -> 5: off +1
            asm.ja("top"),  # pc 4 -> 0: off -5
            asm.label("out"),
            asm.exit_(),  # pc 5
        ]
    )
    assert len(prog) == 6
    assert prog.labels == {"top": 0, "out": 5}
    raw = prog.encode()
    assert raw[3 * 8 : 4 * 8].hex() == "1500010000000000"
    assert raw[4 * 8 : 5 * 8].hex() == "0500fbff00000000"


def test_forward_jump_over_ld_imm64_counts_two_slots() -> None:
    prog = asm.Program([asm.jne(R1, 0, "out"), asm.ld_imm64(R0, 5), asm.label("out"), asm.exit_()])
    assert prog.encode()[:8].hex() == "5501020000000000"


def test_label_targets_in_imm_for_gotol_and_local_call() -> None:
    prog = asm.Program(
        [
            asm.call_local("fn"),  # pc 0 -> 3: imm 2
            asm.gotol("end"),  # pc 1 -> 4: imm 2
            asm.exit_(),  # pc 2
            asm.label("fn"),
            asm.mov(R0, 1),  # pc 3
            asm.label("end"),
            asm.exit_(),  # pc 4
        ]
    )
    raw = prog.encode()
    assert raw[:8].hex() == "8510000002000000"
    assert raw[8:16].hex() == "0600000002000000"


def test_jump_to_self_is_minus_one_and_two_labels_one_insn() -> None:
    prog = asm.Program([asm.label("a"), asm.label("b"), asm.ja("a"), asm.ja("b")])
    assert prog.encode().hex() == "0500ffff00000000" + "0500feff00000000"


def test_undefined_label() -> None:
    with pytest.raises(AssemblyError, match=r"undefined label 'nowhere'"):
        asm.Program([asm.ja("nowhere"), asm.exit_()]).encode()


def test_duplicate_label() -> None:
    prog = asm.Program([asm.label("x"), asm.exit_(), asm.label("x"), asm.exit_()])
    with pytest.raises(AssemblyError, match="defined twice"):
        prog.encode()
    with pytest.raises(AssemblyError, match="defined twice"):
        _ = prog.labels


def test_label_at_end_names_nothing() -> None:
    with pytest.raises(AssemblyError, match="end of the program"):
        asm.Program([asm.ja("end"), asm.label("end")]).encode()
    # an unused trailing label is harmless, and names the next piece once concatenated
    tail = asm.Program([asm.ja("end"), asm.label("end")])
    assert (
        tail + asm.Program([asm.exit_()])
    ).encode().hex() == "0500000000000000" + "9500000000000000"


def test_jump_offset_out_of_16_bits() -> None:
    body = [asm.mov(R0, 0)] * 32767
    ok = asm.Program([asm.ja("far"), *body, asm.label("far"), asm.exit_()])
    assert ok.encode()[:8].hex() == "0500ff7f00000000"
    too_far = asm.Program([asm.ja("far"), *body, asm.mov(R0, 0), asm.label("far"), asm.exit_()])
    with pytest.raises(AssemblyError, match="gotol"):
        too_far.encode()
    long = asm.Program([asm.gotol("far"), *body, asm.mov(R0, 0), asm.label("far"), asm.exit_()])
    assert long.encode()[:8].hex() == "0600000000800000"


def test_backward_jump_out_of_range() -> None:
    body = [asm.mov(R0, 0)] * 32768
    prog = asm.Program([asm.label("top"), *body, asm.jeq(R0, 0, "top")])
    with pytest.raises(AssemblyError, match="16-bit"):
        prog.encode()


def test_unresolved_instruction_encode() -> None:
    with pytest.raises(AssemblyError, match="unresolved"):
        asm.ja("x").encode()


def test_map_refs_distinct_in_first_use_order() -> None:
    class Map:
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def __eq__(self, other: object) -> bool:  # equal maps are still distinct refs
            return True

        __hash__ = None  # type: ignore[assignment]

    a, b = Map(3), Map(4)
    prog = asm.Program(
        [
            asm.ld_map_fd(R1, b),
            asm.ld_map_fd(R2, a),
            asm.ld_map_value(R1, b, 4),
            asm.ld_map_fd(R1, 7),
            asm.ld_map_fd(R1, 7),
            asm.exit_(),
        ]
    )
    refs = prog.map_refs
    assert len(refs) == 3
    assert refs[0] is b
    assert refs[1] is a
    assert refs[2] == 7
    fds = {id(a): 30, id(b): 40}
    raw = prog.encode(map_fd=lambda r: r if isinstance(r, int) else fds[id(r)])
    assert raw[4:8] == (40).to_bytes(4, "little")
    assert raw[20:24] == (30).to_bytes(4, "little")


def test_concatenation_and_extend() -> None:
    head = asm.Program([asm.mov(R0, 0), asm.jeq(R1, 0, "out")], name="verdict")
    tail = [asm.mov(R0, 1), asm.label("out"), asm.exit_()]
    prog = head + tail
    assert prog.name == "verdict"
    assert len(prog) == 4
    assert prog.encode()[8:16].hex() == "1501010000000000"
    assert len(head) == 2  # + does not modify
    head.extend(tail)
    assert head == prog
    head2 = asm.Program(name="verdict")
    head2 += prog
    head2.append(asm.exit_())
    assert len(head2) == 5
    assert head2[0] == asm.mov(R0, 0)
    first: list[asm.Item] = [asm.mov(R2, 0)]
    combined = first + prog
    assert isinstance(combined, asm.Program)
    assert len(combined) == 5
    assert prog.instructions == [i for i in prog if isinstance(i, asm.Instruction)]


def test_program_rejects_non_instructions() -> None:
    with pytest.raises(AssemblyError, match="Instructions and Labels"):
        asm.Program([asm.exit_(), b"\x95"])  # type: ignore[list-item]


def test_decode_errors() -> None:
    with pytest.raises(AssemblyError, match="multiple of 8"):
        asm.decode(b"\x95" * 9)
    with pytest.raises(AssemblyError, match="second slot"):
        asm.decode(bytes.fromhex("1801000001000000"))
    with pytest.raises(AssemblyError, match="must be zero"):
        asm.decode(bytes.fromhex("1801000001000000" + "0501000000000000"))


def test_decode_keeps_map_fd_as_ref() -> None:
    (ins,) = asm.decode(bytes.fromhex("1822000007000000" + "0000000010000000"))
    assert ins.map_ref == 7
    assert ins.map_offset == 16
    assert ins == asm.ld_map_value(R2, 7, 16)
    assert asm.Program([ins]).encode().hex() == "1822000007000000" + "0000000010000000"


def test_program_decode_and_helper_call_by_enum() -> None:
    prog = asm.Program(
        [asm.ldx(W, R0, R1, 0), asm.call(asm.Helper.sk_redirect_map), asm.exit_()], name="v"
    )
    again = asm.Program.decode(prog.encode(), name="v")
    assert again == prog
    assert again.resolved() == prog.instructions
