"""Direct packet writes in the VM: which the validator admits (exactly the kernel's rule: a
store inside the range a data_end comparison proved), and what a run writes, on both paths."""

from __future__ import annotations

import errno

import pytest

from sockmap import asm
from sockmap.abi import SK_BUFF, SK_MSG_MD, Helper, ProgType
from sockmap.asm import DW, R0, R1, R2, R3, R4, R6, R7, B, H, W
from sockmap.errors import BpfError, VerifierError, VmError
from sockmap.kernel.features import bpf_access
from sockmap.kernel.programs import load_program
from sockmap.vm import MsgContext, SkbContext, load

DATA, DATA_END = SK_BUFF.offset("data"), SK_BUFF.offset("data_end")
SIZES = {1: B, 2: H, 4: W, 8: DW}

# (jump, packet pointer on the left) -> (branch where the bytes are proven, range - n)
RULES = {
    ("jgt", True): ("fall", 0),  # if data + n > data_end goto out
    ("jgt", False): ("taken", 1),  # if data_end > data + n goto ok
    ("jlt", True): ("taken", 1),
    ("jlt", False): ("fall", 0),
    ("jge", True): ("fall", 1),
    ("jge", False): ("taken", 0),
    ("jle", True): ("taken", 0),
    ("jle", False): ("fall", 1),
}


def checked_write(jump: str, left: bool, n: int, at: int, size: int, branch: str) -> asm.Program:
    """data + n compared with data_end by ``jump``; a store of ``size`` bytes at data + at
    on ``branch`` ("fall" or "taken") of it; r0 = 1."""
    build = getattr(asm, jump)
    cond = build(R4, R3, "taken") if left else build(R3, R4, "taken")
    store = asm.st(SIZES[size], R2, at, 0x23)
    return asm.Program([
        asm.ldx(W, R2, R1, DATA),
        asm.ldx(W, R3, R1, DATA_END),
        asm.mov(R4, R2),
        asm.add(R4, n),
        cond,
        *([store] if branch == "fall" else []),
        asm.mov(R0, 1),
        asm.exit_(),
        asm.label("taken"),
        *([store] if branch == "taken" else []),
        asm.mov(R0, 1),
        asm.exit_(),
    ])  # fmt: skip


def _cases() -> list[tuple[str, asm.Program, bool]]:
    cases = []
    for (jump, left), (good, extra) in RULES.items():
        name = f"{jump}{'' if left else '_swapped'}"
        for n in (0, 1, 4):
            rng = 0 if (extra and n == 0) else n + extra  # nothing learned from data < end
            for at, size in ((0, 1), (n - 1, 1), (n, 1), (0, 4), (n - 4, 4), (-1, 1)):
                for branch in ("fall", "taken"):
                    ok = branch == good and at >= 0 and at + size <= rng
                    prog = checked_write(jump, left, n, at, size, branch)
                    cases.append((f"{name} n={n} at={at} size={size} {branch}", prog, ok))
    return cases


CASES = _cases()


def vm_accepts(program: asm.Program, pt: ProgType = ProgType.SK_SKB) -> bool:
    """Whether the VM loads ``program``; a refusal must be the kernel's, for the packet."""
    try:
        load(program, pt)
    except VerifierError as exc:
        refusal = exc
    else:
        return True
    assert refusal.errno == errno.EACCES
    assert "offset is outside of the packet" in str(refusal)
    return False


@pytest.mark.parametrize(("program", "ok"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_write_is_admitted_only_inside_the_proven_range(program: asm.Program, ok: bool) -> None:
    assert vm_accepts(program) is ok


def test_the_kernel_agrees_on_every_case() -> None:
    permitted, why = bpf_access()
    if not permitted:
        pytest.skip(f"bpf() refused, no kernel verifier to compare with: {why}")
    wrong = []
    for name, program, ok in CASES:
        try:
            load_program(program, ProgType.SK_SKB).close()
            kernel = True
        except BpfError:
            kernel = False
        if kernel is not ok:
            wrong.append(f"{name}: kernel {'accepts' if kernel else 'refuses'}")
    assert not wrong, wrong


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([asm.ldx(W, R2, R1, DATA), asm.st(B, R2, 0, 1)], "off=0 size=1, R2(off=0,r=0)"),
        (
            [
                asm.ldx(W, R2, R1, DATA),
                asm.ldx(W, R3, R1, DATA_END),
                asm.mov(R4, R2),
                asm.add(R4, 8),
                asm.jgt(R4, R3, "out"),
                asm.mov(R6, R1),
                asm.mov(R7, R2),
                asm.mov(R1, R6),
                asm.mov(R2, 8),
                asm.call(Helper.skb_pull_data),  # the packet may move: the check lapses
                asm.st(B, R7, 0, 1),
                asm.label("out"),
            ],
            "off=0 size=1, R7(off=0,r=0)",
        ),
        (
            [
                asm.ldx(W, R2, R1, DATA),
                asm.ldx(W, R3, R1, DATA_END),
                asm.mov(R4, R2),
                asm.add(R4, 8),
                asm.jgt32(R4, R3, "out"),
                asm.st(B, R2, 0, 1),
                asm.label("out"),
            ],
            "off=0 size=1, R2(off=0,r=0)",  # a 32-bit comparison proves nothing
        ),
    ],
    ids=["no check", "after skb_pull_data", "jmp32 check"],
)
def test_unproven_writes_are_refused(items: list[asm.Item], message: str) -> None:
    with pytest.raises(VerifierError, match="invalid access to packet") as info:
        load(asm.Program([*items, asm.mov(R0, 1), asm.exit_()]), ProgType.SK_SKB)
    assert message in str(info.value)


def test_atomic_into_the_packet_and_writes_outside_writer_types_are_refused() -> None:
    atomic = checked_write("jgt", True, 8, 0, 8, "fall").items
    atomic[5] = asm.atomic_add(DW, R2, R4, 0)
    with pytest.raises(VerifierError, match="BPF_ATOMIC stores into R2 pkt"):
        load(asm.Program(atomic), ProgType.SK_SKB)
    assert vm_accepts(checked_write("jgt", True, 1, 0, 1, "fall"), ProgType.SCHED_CLS)


def overwrite(n: int = 4) -> asm.Program:
    """Write '#' at data[0], 'x' (u16 'xy') at data[n - 2]: both inside ``data + n``."""
    p = checked_write("jgt", True, n, 0, 1, "fall").items
    p.insert(6, asm.st(H, R2, n - 2, 0x7978))
    return asm.Program(p)


@pytest.mark.parametrize("fast", [False, True], ids=["interpreter", "fast path"])
def test_a_run_writes_into_the_context_data(fast: bool) -> None:
    prog = load(overwrite(), ProgType.SK_SKB, fast=fast)
    assert prog.checked.packet_writes
    assert prog.max_packet_offset == 3
    buf = bytearray(b"abcdef")
    ctx = SkbContext(data=buf)
    assert prog.run(ctx) == 1
    assert ctx.data is buf  # in place
    assert buf == b"#bxyef"
    ctx = SkbContext(data=b"abcdef")  # immutable: replaced by the written copy
    prog.run(ctx)
    assert type(ctx.data) is bytearray
    assert ctx.data == b"#bxyef"
    view = memoryview(bytearray(b"abcdef"))
    ctx = SkbContext(data=view)
    prog.run(ctx)
    assert ctx.data is view
    assert view.tobytes() == b"#bxyef"
    ro = memoryview(b"abcdef")
    ctx = SkbContext(data=ro)
    prog.run(ctx)
    assert ctx.data == b"#bxyef"
    assert ro.tobytes() == b"abcdef"
    short = SkbContext(data=b"abc")  # the check fails: nothing written, nothing copied
    prog.run(short)
    assert short.data == b"abc"


@pytest.mark.parametrize("fast", [False, True], ids=["interpreter", "fast path"])
def test_a_program_without_packet_stores_keeps_the_packet_read_only(fast: bool) -> None:
    program = asm.Program([
        asm.ldx(W, R2, R1, DATA),
        asm.ldx(W, R3, R1, DATA_END),
        asm.mov(R4, R2),
        asm.add(R4, 1),
        asm.jgt(R4, R3, "out"),
        asm.ldx(B, R0, R2, 0),
        asm.exit_(),
        asm.label("out"),
        asm.mov(R0, 0),
        asm.exit_(),
    ])  # fmt: skip
    prog = load(program, ProgType.SK_SKB, fast=fast)
    assert not prog.checked.packet_writes
    data = b"abc"
    ctx = SkbContext(data=data)
    assert prog.run(ctx) == ord("a")
    assert ctx.data is data


@pytest.mark.parametrize("fast", [False, True], ids=["interpreter", "fast path"])
@pytest.mark.parametrize("offset", [-1, 0, 5, 6, 1 << 20])
def test_a_write_the_validator_cannot_place_is_bounds_checked_at_run_time(
    fast: bool, offset: int
) -> None:
    """The offset arrives in ``priority``: inside the packet the byte is written, outside it
    the run faults, on both paths."""
    program = asm.Program([
        asm.ldx(W, R3, R1, SK_BUFF.offset("priority")),
        asm.sub(R3, 1 << 30),
        asm.ldx(W, R2, R1, DATA),
        asm.add(R2, R3),
        asm.st(B, R2, 0, 0x23),
        asm.mov(R0, 1),
        asm.exit_(),
    ])  # fmt: skip
    prog = load(program, ProgType.SK_SKB, fast=fast)
    assert prog.checked.packet_writes
    ctx = SkbContext(data=bytearray(b"abcdef"), priority=(offset + (1 << 30)) & 0xFFFFFFFF)
    if 0 <= offset < 6:
        assert prog.run(ctx) == 1
        assert ctx.data[offset] == 0x23
    else:
        with pytest.raises(VmError, match="outside packet"):
            prog.run(ctx)
        assert ctx.data == b"abcdef"


def test_sk_msg_writes_into_the_message() -> None:
    program = asm.Program([
        asm.ldx(DW, R2, R1, SK_MSG_MD.offset("data")),
        asm.ldx(DW, R3, R1, SK_MSG_MD.offset("data_end")),
        asm.mov(R4, R2),
        asm.add(R4, 2),
        asm.jgt(R4, R3, "out"),
        asm.st(H, R2, 0, 0x2121),
        asm.label("out"),
        asm.mov(R0, 1),
        asm.exit_(),
    ])  # fmt: skip
    for fast in (False, True):
        ctx = MsgContext(data=b"hello")
        assert load(program, ProgType.SK_MSG, fast=fast).run(ctx) == 1
        assert ctx.data == b"!!llo"


@pytest.mark.parametrize(("length", "pull", "r0"), [(8, 0, 0), (8, 8, 0), (8, 9, -errno.ENOMEM)])
def test_skb_pull_data(length: int, pull: int, r0: int) -> None:
    program = asm.Program([asm.mov(R2, pull), asm.call(Helper.skb_pull_data), asm.exit_()])
    for fast in (False, True):
        got = load(program, ProgType.SK_SKB, fast=fast).run_signed(SkbContext(data=bytes(length)))
        assert got == r0
