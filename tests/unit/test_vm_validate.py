"""Load-time validation: what is refused, with which errno, naming which pc."""

from __future__ import annotations

import errno
import struct

import pytest

from sockmap import asm
from sockmap.abi import SK_BUFF, Helper, ProgType
from sockmap.abi.internals import program_internals
from sockmap.asm import DW, R0, R1, R2, R3, R4, R5, R10, B, W
from sockmap.asm.instruction import Instruction
from sockmap.errors import VerifierError
from sockmap.vm import SkbContext, load
from sockmap.vm._bench import ArrayMap, SockMapStub, length_prefixed_parser


def refuse(program, pt=ProgType.SK_SKB, **kw) -> VerifierError:
    with pytest.raises(VerifierError) as info:
        load(program, pt, **kw)
    err = info.value
    assert err.log, "the error carries a log"
    return err


def slot(opcode: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", opcode, (src << 4) | dst, off, imm)


EXIT = slot(0x95)
MOV0 = slot(0xB7)


def test_unknown_opcode() -> None:
    err = refuse(MOV0 + slot(0xFF) + EXIT)
    assert err.errno == errno.EINVAL
    assert "pc 1" in str(err)
    assert "unknown opcode 0xff" in str(err)


@pytest.mark.parametrize(
    "raw",
    [
        slot(0x07, 0, 3, 0, 1),  # ALU K with a src register
        slot(0x0F, 0, 1, 0, 5),  # ALU X with an imm
        slot(0x87, 0, 0, 0, 1),  # NEG with imm
        slot(0xD4, 0, 0, 0, 8),  # END of 8 bits
        slot(0xDF, 0, 0, 0, 16),  # ALU64 END with the X bit
        slot(0xBF, 0, 1, 4, 0),  # movsx of 4 bits
        slot(0x37, 0, 0, 2, 1),  # div with off 2
        slot(0x20),  # LD ABS
        slot(0xF1, 0, 1),  # LDX with a bad mode
        slot(0x98, 0, 1),  # LDXSX DW
        slot(0xDB, 10, 1, -8, 0x10),  # atomic sub does not exist
        slot(0xC3, 10, 1, -8, 0x00 | 0x80),  # bad atomic op
        slot(0xC3 & ~0x18 | 0x10, 10, 1, -8, 0),  # atomic on a byte
        slot(0x86, 0, 0, 0, 0),  # JMP32 CALL
        slot(0x07, 11, 0, 0, 1),  # register r11
    ],
)
def test_malformed_instructions(raw: bytes) -> None:
    err = refuse(MOV0 + slot(0xBF, 1, 1) + raw + EXIT)
    assert err.errno == errno.EINVAL
    assert "pc 2" in str(err)


def test_jump_out_of_range() -> None:
    err = refuse(slot(0x05, off=5) + EXIT)
    assert err.errno == errno.EINVAL
    assert "jump out of range from insn 0 to 6" in str(err)
    err = refuse(slot(0x05, off=-2) + EXIT)
    assert "to -1" in str(err)


def test_jump_into_ld_imm64() -> None:
    program = asm.Program([asm.ja(1), asm.ld_imm64(R0, 1), asm.exit_()])
    assert "jump out of range" in str(refuse(program))


def test_fall_through_off_the_end() -> None:
    err = refuse(asm.Program([asm.mov(R0, 0)]))
    assert err.errno == errno.EINVAL
    assert "last insn is not an exit or jmp" in str(err)
    err = refuse(asm.Program([asm.mov(R0, 0), asm.jeq(R0, 0, -2)]))
    assert "last insn" in str(err)


def test_truncated_ld_imm64() -> None:
    raw = asm.Program([asm.ld_imm64(R0, 1 << 40)]).encode()[:8]
    err = refuse(raw)
    assert err.errno == errno.EINVAL
    assert "LD_IMM64" in str(err)


def test_ld_imm64_second_slot_must_be_zero() -> None:
    raw = bytearray(asm.Program([asm.ld_imm64(R0, 1), asm.exit_()]).encode())
    raw[9] = 0x11
    assert "second slot" in str(refuse(bytes(raw)))


def test_ld_imm64_bad_pseudo() -> None:
    bad = Instruction(0x18, R0, 4, 0, 0)
    assert "invalid ld_imm64" in str(refuse(asm.Program([bad, asm.exit_()])))


def test_write_to_r10() -> None:
    for ins in (asm.mov(R10, 0), asm.add(R10, 8), asm.ldx(W, R10, R1, 0), asm.ld_imm64(R10, 1)):
        err = refuse(asm.Program([asm.mov(R0, 0), ins, asm.exit_()]))
        assert err.errno == errno.EACCES
        assert "pc 1" in str(err)
        assert "frame pointer is read only" in str(err)


def test_uninitialised_register() -> None:
    err = refuse(asm.Program([asm.mov(R0, R2), asm.exit_()]))
    assert err.errno == errno.EACCES
    assert "pc 0: R2 !read_ok" in str(err)
    assert "R0 !read_ok" in str(refuse(asm.Program([asm.exit_()])))


def test_uninitialised_on_one_path_only() -> None:
    program = asm.Program(
        [
            asm.ldx(W, R3, R1, 0),
            asm.jeq(R3, 0, "skip"),
            asm.mov(R2, 1),
            asm.label("skip"),
            asm.mov(R0, R2),
            asm.exit_(),
        ]
    )
    err = refuse(program)
    assert "pc 3: R2 !read_ok" in str(err)


def test_path_where_register_is_set_on_both_branches() -> None:
    program = asm.Program(
        [
            asm.ldx(W, R3, R1, 0),
            asm.mov(R2, 2),
            asm.jeq(R3, 0, "skip"),
            asm.mov(R2, 1),
            asm.label("skip"),
            asm.mov(R0, R2),
            asm.exit_(),
        ]
    )
    load(program, ProgType.SK_SKB)


def test_call_clobbers_argument_registers() -> None:
    program = asm.Program(
        [
            asm.mov(R3, 1),
            asm.call(Helper.get_prandom_u32),
            asm.add(R0, R3),
            asm.exit_(),
        ]
    )
    assert "pc 2: R3 !read_ok" in str(refuse(program))


def test_helper_arguments_must_be_set() -> None:
    program = asm.Program([asm.mov(R2, 0), asm.call(Helper.get_socket_cookie), asm.exit_()])
    load(program, ProgType.SK_SKB)  # r1 is the context at entry
    program = asm.Program([asm.mov(R1, 0), asm.call(Helper.skb_load_bytes), asm.exit_()])
    assert "R2 !read_ok" in str(refuse(program))


@pytest.mark.parametrize(
    ("pt", "helper"),
    [
        (ProgType.SK_SKB, Helper.msg_redirect_map),
        (ProgType.SK_SKB, Helper.msg_apply_bytes),
        (ProgType.SK_MSG, Helper.sk_redirect_map),
        (ProgType.SK_MSG, Helper.skb_load_bytes),
        (ProgType.SCHED_CLS, Helper.sk_redirect_hash),
    ],
)
def test_helper_not_allowed_for_type(pt: ProgType, helper: Helper) -> None:
    program = asm.Program([asm.mov(R0, 0), asm.call(helper), asm.exit_()])
    err = refuse(program, pt)
    assert err.errno == errno.EINVAL
    assert f"cannot use helper {helper.name}#{int(helper)}" in str(err)


def test_unknown_and_unsupported_helpers() -> None:
    assert "unknown#9999" in str(refuse(asm.Program([asm.call(9999), asm.exit_()])))
    err = refuse(asm.Program([asm.call(Helper.tail_call), asm.exit_()]))
    assert "not supported" in str(err)


@pytest.mark.parametrize("pt", [ProgType.SK_SKB, ProgType.SK_MSG, ProgType.SCHED_CLS])
def test_allowed_helpers_load(pt: ProgType) -> None:
    for helper in (Helper.ktime_get_ns, Helper.get_prandom_u32):
        load(asm.Program([asm.call(helper), asm.exit_()]), pt)


def test_size_limit() -> None:
    body = [asm.mov(R0, 0)] * 10 + [asm.exit_()]
    err = refuse(asm.Program(body), max_insns=10)
    assert err.errno == errno.E2BIG
    load(asm.Program(body), ProgType.SK_SKB, max_insns=11)
    err = refuse(asm.Program([asm.mov(R0, 0)] * 4096 + [asm.exit_()]))
    assert "4096" in str(err)


def test_empty_program() -> None:
    assert refuse(b"").errno == errno.EINVAL


def test_unresolvable_map() -> None:
    program = asm.Program([asm.ld_map_fd(R1, "not a map"), asm.mov(R0, 0), asm.exit_()])
    err = refuse(program)
    assert err.errno == errno.EBADF
    assert "pc 0" in str(err)
    raw = asm.Program([asm.ld_map_fd(R1, 3), asm.mov(R0, 0), asm.exit_()]).encode()
    assert refuse(raw, maps={4: ArrayMap(4, 1)}).errno == errno.EBADF

    def broken(ref: object) -> None:
        raise KeyError(ref)

    assert "cannot be resolved" in str(refuse(raw, maps=broken))


def test_direct_value_needs_single_element_array() -> None:
    program = asm.Program([asm.ld_map_value(R1, ArrayMap(8, 2)), asm.mov(R0, 0), asm.exit_()])
    assert "max_entries 1" in str(refuse(program))


def test_unreachable_instruction() -> None:
    program = asm.Program([asm.mov(R0, 0), asm.exit_(), asm.mov(R0, 1), asm.exit_()])
    err = refuse(program)
    assert "unreachable insn 2" in str(err)


def test_recursion_refused() -> None:
    program = asm.Program(
        [asm.call_local("f"), asm.exit_(), asm.label("f"), asm.call_local("f"), asm.exit_()]
    )
    assert "recursive" in str(refuse(program))


def test_unknown_kfunc_refused() -> None:
    program = asm.Program([Instruction(0x85, 0, 2, 0, 1), asm.exit_()])
    assert "kfunc#1 is not supported" in str(refuse(program))


needs_kfunc = pytest.mark.skipif(
    program_internals() is None, reason="this kernel's BTF has no bpf_cast_to_kern_ctx"
)


def kern_ctx_program(*body: asm.Item) -> asm.Program:
    k = program_internals()
    assert k is not None
    return asm.Program([asm.call_kfunc(k.kfunc_cast_to_kern_ctx), *body, asm.exit_()])


@needs_kfunc
@pytest.mark.parametrize("fast", [True, False])
def test_cast_to_kern_ctx_reads_the_strparser_fields(fast: bool) -> None:
    k = program_internals()
    assert k is not None
    program = kern_ctx_program(
        asm.ldx(W, R1, R0, k.skb_strp_full_len),
        asm.ldx(W, R2, R0, k.skb_strp_offset),
        asm.lsh(R1, 32),
        asm.or_(R1, R2),
        asm.mov(R0, R1),
    )
    prog = load(program, fast=fast)
    ctx = SkbContext(data=b"abc", strp_full_len=300, strp_offset=0)
    assert prog.run(ctx) == 300 << 32


@needs_kfunc
@pytest.mark.parametrize(
    ("body", "words"),
    [
        ([asm.st(W, R0, 64, 1)], "only reads"),
        ([asm.ldx(W, R0, R0, 0)], "not modelled"),
        ([asm.ldx(DW, R0, R0, 64)], "not modelled"),
    ],
    ids=["write", "other_field", "wide_read"],
)
def test_kern_ctx_accesses_the_vm_does_not_model(body: list[asm.Item], words: str) -> None:
    assert words in str(refuse(kern_ctx_program(*body)))


@needs_kfunc
def test_cast_to_kern_ctx_needs_the_context() -> None:
    program = kern_ctx_program()
    program = asm.Program([asm.mov(R1, 0), *program.items])
    assert "expected=ctx" in str(refuse(program))


@needs_kfunc
def test_cast_to_kern_ctx_only_in_sk_skb() -> None:
    assert "SK_MSG" in str(refuse(kern_ctx_program(asm.mov(R0, 0)), ProgType.SK_MSG))


def test_bounded_loop_allowed() -> None:
    program = asm.Program(
        [
            asm.mov(R0, 0),
            asm.mov(R2, 3),
            asm.label("top"),
            asm.add(R0, 1),
            asm.sub(R2, 1),
            asm.jne(R2, 0, "top"),
            asm.exit_(),
        ]
    )
    load(program, ProgType.SK_SKB)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([asm.mov(R2, 8), asm.ldx(W, R0, R2, 0)], "R2 invalid mem access 'scalar'"),
        ([asm.ldx(W, R0, R10, 0)], "invalid stack off=0 size=4"),
        ([asm.st(DW, R10, -516, 0)], "invalid stack off=-516"),
        ([asm.ld_map_fd(R2, ArrayMap(4, 1)), asm.ldx(W, R0, R2, 0)], "'map_ptr'"),
        (
            [asm.ldx(W, R2, R1, SK_BUFF.offset("data_end")), asm.ldx(B, R0, R2, 0)],
            "'pkt_end'",
        ),
        (
            [asm.ldx(W, R2, R1, SK_BUFF.offset("data")), asm.mov(R0, 0), asm.st(B, R2, 0, 1)],
            "invalid access to packet, off=0 size=1",  # no data_end comparison
        ),
        ([asm.mov(R0, 0), asm.atomic_add(W, R1, R0, 0)], "BPF_ATOMIC stores into R1 ctx"),
    ],
)
def test_invalid_memory_access(items: list[asm.Item], message: str) -> None:
    err = refuse(asm.Program([*items, asm.exit_()]))
    assert err.errno == errno.EACCES
    assert message in str(err)


def test_helper_argument_types() -> None:
    err = refuse(
        asm.Program(
            [
                asm.mov(R1, 0),
                asm.mov(R2, 0),
                asm.call(Helper.map_lookup_elem),
                asm.exit_(),
            ]
        )
    )
    assert "R1 type=scalar expected=map_ptr" in str(err)
    err = refuse(
        asm.Program(
            [
                asm.ld_map_fd(R1, ArrayMap(8, 1)),
                asm.mov(R2, R10),
                asm.add(R2, -2),  # a 4-byte key does not fit in 2 bytes of stack
                asm.call(Helper.map_lookup_elem),
                asm.exit_(),
            ]
        )
    )
    assert "invalid indirect access to stack R2 off=-2 size=4" in str(err)
    # A pointer as flags or key passes, as its number: the kernel's ARG_ANYTHING.
    load(
        asm.Program(
            [
                asm.ld_map_fd(R2, SockMapStub()),
                asm.mov(R3, R10),
                asm.mov(R4, R10),
                asm.call(Helper.sk_redirect_map),
                asm.exit_(),
            ]
        ),
        ProgType.SK_SKB,
    )
    err = refuse(
        asm.Program(
            [
                asm.mov(R2, 0),
                asm.mov(R3, R10),
                asm.add(R3, -8),
                asm.mov(R4, R1),  # a pointer as a length (ARG_CONST_SIZE)
                asm.call(Helper.skb_load_bytes),
                asm.exit_(),
            ]
        )
    )
    assert "R4 type=ctx expected=scalar" in str(err)


def test_error_log_lists_instructions() -> None:
    err = refuse(asm.Program([asm.mov(R0, 1), asm.mov(R0, R3), asm.exit_()]))
    assert err.log.splitlines()[0].startswith("0: ")
    assert "R3 !read_ok" in err.log.splitlines()[-1]


# ---------------------------------------------------------------------------- max_packet_offset


def _mpo(items: list[asm.Item]) -> int | None:
    return load(asm.Program([*items, asm.exit_()]), ProgType.SK_SKB).max_packet_offset


DATA, DATA_END = SK_BUFF.offset("data"), SK_BUFF.offset("data_end")


def test_max_packet_offset() -> None:
    assert length_prefixed_parser() is not None
    assert load(length_prefixed_parser(), ProgType.SK_SKB).max_packet_offset == 3
    assert _mpo([asm.mov(R0, 0)]) == -1
    bounded = [
        asm.ldx(W, R2, R1, DATA),
        asm.ldx(W, R3, R1, DATA_END),
        asm.mov(R0, 0),
        asm.mov(R4, R2),
        asm.add(R4, 20),
        asm.jgt(R4, R3, "out"),
        asm.ldx(B, R0, R2, 7),
        asm.label("out"),
    ]
    assert _mpo(bounded) == 19  # the comparison looks at whether byte 19 exists
    variable = [
        asm.ldx(W, R2, R1, DATA),
        asm.ldx(W, R5, R1, 0),
        asm.add(R2, R5),
        asm.ldx(B, R0, R2, 0),
    ]
    assert _mpo(variable) is None
    length = [
        asm.ldx(W, R2, R1, DATA),
        asm.ldx(W, R0, R1, DATA_END),
        asm.sub(R0, R2),  # data_end - data reveals how much was supplied
    ]
    assert _mpo(length) is None
    spilled = [
        asm.ldx(W, R2, R1, DATA),
        asm.stx(DW, R10, R2, -8),
        asm.mov(R0, 0),
    ]
    assert _mpo(spilled) is None
    var_load = [
        asm.ldx(W, R2, R1, 0),
        asm.mov(R3, R10),
        asm.add(R3, -8),
        asm.mov(R4, 4),
        asm.call(Helper.skb_load_bytes),
    ]
    assert _mpo(var_load) is None
