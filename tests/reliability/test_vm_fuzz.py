"""Fuzzing the eBPF VM, and its agreement with the kernel's verifier.

1. Robustness: random and mutated bytecode is either refused by validation
   (``VerifierError``) or runs to a result or a ``VmError`` (budget included) within its
   budget, the same on the interpreter and the fast path; nothing else escapes, and a run
   changes nothing outside its regions (read-only context fields; the packet's bytes
   only in a program with a store that may reach it, and never its length).
2. Region probes: loads and stores at offsets the validator cannot see succeed exactly
   when they fall inside the stack, the context's allowed fields, the packet or a map
   value, and fault with ``VmError`` otherwise.
3. Kernel agreement: structured random programs and mutants loaded on the kernel (the
   same loader the engine uses) and in the VM; what the kernel accepts the VM must run,
   and where the kernel can run it (SCHED_CLS under BPF_PROG_TEST_RUN; SK_SKB cannot be
   test-run) the r0 must match.

``SOCKMAP_FUZZ_SEED`` picks the seed (printed and recorded); long mode (``SOCKMAP_LONG=1``)
runs 100,000 programs through the VM and several thousand through the kernel.
"""

from __future__ import annotations

import errno
import os
import random
import re
import struct
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import progfuzz as pf
import pytest
from report import LONG, record, size

from sockmap import asm
from sockmap.abi import Helper, ProgType
from sockmap.errors import BpfError, VerifierError
from sockmap.kernel.features import bpf_access
from sockmap.kernel.maps import Map, MapSpec
from sockmap.kernel.programs import load_program
from sockmap.kernel.run import run_program
from sockmap.vm import SkbContext, VmProgram

SEED = int(os.environ.get("SOCKMAP_FUZZ_SEED", "0")) or (
    random.SystemRandom().randrange(1, 1 << 32) if LONG else 20240617
)
FIGURES: dict[str, Any] = {"seed": SEED}
PT_CHOICES = [ProgType.SK_SKB, ProgType.SK_SKB, ProgType.SK_MSG, ProgType.SOCK_OPS]


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    print(f"\nvm fuzz seed {SEED} (set SOCKMAP_FUZZ_SEED={SEED} to repeat)")
    yield
    record("vm_fuzz", FIGURES)


def _fail(what: str, failures: list[str]) -> None:
    if failures:
        head = "\n".join(failures[:8])
        pytest.fail(f"{len(failures)} {what} (seed {SEED}); first ones:\n{head}")


# ---------------------------------------------------------------------------- 1. robustness


def _program(rng: random.Random, base: list[pf.Seed]) -> tuple[str, bytes, ProgType]:
    r = rng.random()
    if r < 0.35:
        return "random", pf.random_program(rng), rng.choice(PT_CHOICES)
    if r < 0.8:
        seed = rng.choice(base)
        raw, done = pf.mutate(rng, seed.raw)
        return f"mutant of {seed.name} ({'+'.join(done)})", raw, seed.pt
    raw, _ = pf.structured(rng)
    if rng.random() < 0.7:
        raw, done = pf.mutate(rng, raw)
        return f"structured mutant ({'+'.join(done)})", raw, ProgType.SK_SKB
    return "structured", raw, ProgType.SK_SKB


def test_random_and_mutated_programs_are_refused_or_run() -> None:
    rng = random.Random(SEED)
    base = pf.seeds()
    n = size(2000, 100_000)
    refused: Counter[str] = Counter()
    runtime: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    failures: list[str] = []
    started = time.monotonic()
    for i in range(n):
        origin, raw, pt = _program(rng, base)
        counts["generated"] += 1
        maps = pf.vm_maps()
        try:
            with pf.wall_limit():
                prog = pf.vm_load(raw, pt, maps)
        except VerifierError as exc:
            refused[pf.category(exc)] += 1
            counts["refused"] += 1
            continue
        except BaseException as exc:
            failures.append(f"#{i} {origin} {pt.name} load: {type(exc).__name__}: {exc} "
                            f"raw={raw.hex()}")  # fmt: skip
            continue
        counts["accepted"] += 1
        for _ in range(2):
            ctx = pf.make_ctx(rng, pt)
            slow, fast, problems = pf.run_both(prog, ctx, maps)
            counts["runs"] += 1
            counts[f"runs {slow.kind}"] += 1
            if slow.kind == "vm_error":
                runtime[slow.error] += 1
            counts["paths agree"] += slow.same(fast)
            if problems:
                failures.append(f"#{i} {origin} {pt.name}: {'; '.join(problems)} raw={raw.hex()}")
                break
    seconds = time.monotonic() - started
    FIGURES["robustness"] = {
        "programs": n,
        "refused by validation": counts["refused"],
        "accepted": counts["accepted"],
        "runs": counts["runs"],
        "runs ran": counts["runs ran"],
        "runs budget exhausted": counts["runs budget"],
        "runs vm error": counts["runs vm_error"],
        "runs escaped": counts["runs escaped"],
        "interpreter == fast path": counts["paths agree"],
        "refused per class": dict(refused.most_common()),
        "vm errors per class": dict(runtime.most_common()),
        "failures": len(failures),
        "seconds": round(seconds, 1),
    }
    print(FIGURES["robustness"])
    _fail("programs broke the VM's contract", failures)
    assert counts["accepted"] > n // 20, "the generators hardly make a loadable program"
    assert counts["runs ran"] > 0
    assert counts["runs vm_error"] > 0


# ---------------------------------------------------------------------------- 2. regions


def test_accesses_outside_regions_fault_and_inside_work() -> None:
    rng = random.Random(SEED + 1)
    n = size(600, 20_000)
    failures: list[str] = []
    allowed = faulted = 0
    for i in range(n):
        p = pf.probe(rng)
        maps = pf.vm_maps()
        prog = pf.vm_load(p.raw, ProgType.SK_SKB, maps)  # the validator cannot see the offset
        counter = maps[pf.vfd(0)]
        before = counter.state()
        slow, fast, problems = pf.run_both(prog, p.ctx, maps)
        want = "ran" if p.allowed else "vm_error"
        for run in (slow, fast):
            if run.kind != want:
                problems.append(f"{p.what}: expected {want}, got {pf.summary(run)}")
        if p.value_span and p.allowed:
            lo, hi = p.value_span
            after = fast.maps[pf.vfd(0)]
            old, new = before[0][0], after[0][0]  # type: ignore[index]
            if old[:lo] != new[:lo] or old[hi:] != new[hi:] or after[0][1:] != before[0][1:]:  # type: ignore[index]
                problems.append(f"{p.what}: map value bytes outside [{lo}, {hi}) changed")
        elif fast.maps[pf.vfd(0)] != before:
            problems.append(f"{p.what}: the map value changed")
        if problems:
            failures.append(f"#{i}: {'; '.join(problems)} raw={p.raw.hex()}")
        allowed += p.allowed
        faulted += not p.allowed
    FIGURES["region probes"] = {"probes": n, "allowed": allowed, "must fault": faulted,
                                "failures": len(failures)}  # fmt: skip
    _fail("region probes went wrong", failures)
    assert allowed
    assert faulted


# ---------------------------------------------------------------------------- regressions

SLOT = struct.Struct("<BBhi")


def _ins(op: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return SLOT.pack(op, dst | src << 4, off, imm)


def _call_graph(n: int, fan: int) -> bytes:
    """``n`` functions of 3 slots; function i calls i+1 (and i+2 when ``fan`` is 2)."""
    raw = b""
    for i in range(n):
        pc = 3 * i
        calls = [j for j in (i + 1, i + 2)[:fan] if j < n]
        body = [_ins(0x85, src=1, imm=3 * j - (pc + k + 1)) for k, j in enumerate(calls)]
        body += [_ins(0xB7)] * (2 - len(body))
        raw += b"".join(body) + _ins(0x95)
    return raw


@pytest.mark.parametrize(("n", "fan"), [(60, 2), (1300, 1)], ids=["diamonds", "long chain"])
def test_deep_or_branching_call_graphs_are_refused_quickly(n: int, fan: int) -> None:
    """Found by this fuzzer: the call-depth check walked every call path (exponential in a
    graph of diamonds: 60 functions never finished) and recursed once per frame (a chain
    of 1300 functions raised RecursionError). Both are refused, at once, as too deep."""
    raw = _call_graph(n, fan)
    with pf.wall_limit(2.0), pytest.raises(VerifierError) as info:
        pf.vm_load(raw, ProgType.SK_SKB, pf.vm_maps())
    assert info.value.errno == errno.E2BIG
    assert "more than 8 frames" in str(info.value)


def test_sign_extended_load_of_a_packet_pointer() -> None:
    """Found by this fuzzer: an ldxsx of ``data_end`` from the context gave the interpreter a
    truncated scalar and the fast path the whole pointer. The kernel refuses it at load; so
    does the VM now, and through a pointer it cannot see both paths give the same scalar."""
    direct = _ins(0x81, 0, 1, 80) + _ins(0xB7) + _ins(0x95)  # r0 = *(s32 *)(r1 + 80)
    with pytest.raises(VerifierError, match="invalid bpf_context access off=80 size=4"):
        pf.vm_load(direct, ProgType.SK_SKB, pf.vm_maps())
    hidden = (
        _ins(0x7B, 10, 1, -8)  # spill r1: the reload is a pointer the validator cannot see
        + _ins(0x79, 2, 10, -8)
        + _ins(0x81, 0, 2, 80)  # r0 = *(s32 *)(r2 + 80)
        + _ins(0x95)
    )
    prog = pf.vm_load(hidden, ProgType.SK_SKB, pf.vm_maps())
    ctx = SkbContext(data=bytes(0x90))
    assert prog.run(ctx) == prog.interpret(ctx) == 0x90  # the low 32 bits of data_end


def test_call_graph_at_the_limit_still_loads() -> None:
    raw = _call_graph(8, 2)  # depth 8: the most the kernel allows too
    prog = pf.vm_load(raw, ProgType.SK_SKB, pf.vm_maps())
    assert prog.run(SkbContext(data=b"x"), pf.FuzzEnv()) == 0


def _kernel_says(raw: bytes, pt: ProgType = ProgType.SK_SKB) -> tuple[bool, str] | None:
    """The kernel verifier's answer on ``raw`` (fresh maps): (accepted, reason); None
    where bpf() is refused (the VM's side of a test still runs)."""
    permitted, _why = bpf_access()
    if not permitted:
        return None
    kmaps = KernelMaps()
    try:
        return kernel_load(raw, pt, kmaps)
    finally:
        kmaps.close()


def _kernel_and_vm_accept(raw: bytes, pt: ProgType = ProgType.SK_SKB) -> VmProgram:
    said = _kernel_says(raw, pt)
    if said is not None:
        assert said[0], f"this kernel refuses it ({said[1]}): the VM need not accept it"
    return pf.vm_load(raw, pt, pf.vm_maps())


def _overwrite(n: int, at: int, size: asm.Size = asm.B) -> bytes:
    """SK_SKB: check ``data + n <= data_end``, then store 0x23 at ``data + at``; r0 = 1."""
    return pf.encode(asm.Program([
        asm.ldx(asm.W, asm.R2, asm.R1, 76),  # data
        asm.ldx(asm.W, asm.R3, asm.R1, 80),  # data_end
        asm.mov(asm.R4, asm.R2),
        asm.add(asm.R4, n),
        asm.jgt(asm.R4, asm.R3, "out"),
        asm.st(size, asm.R2, at, 0x23),
        asm.label("out"),
        asm.mov(asm.R0, 1),
        asm.exit_(),
    ]))  # fmt: skip


def test_direct_packet_write_is_run() -> None:
    """Found by this fuzzer (39 of the 53 kernel-accepted programs the VM refused): SK_SKB
    programs may store into data..data_end. The VM runs them, both paths alike, and the
    written bytes are the context's data afterwards."""
    prog = _kernel_and_vm_accept(_overwrite(4, 3))
    slow, fast, problems = pf.run_both(prog, SkbContext(data=bytearray(b"abcdef")), pf.vm_maps())
    assert not problems
    assert slow.ctx["data"] == fast.ctx["data"] == b"abc#ef"


def test_direct_packet_write_past_the_check_is_refused_like_the_kernel() -> None:
    raw = _overwrite(4, 4)  # one byte past what the comparison proved
    said = _kernel_says(raw)
    if said is not None:
        assert said == (False, "R2 offset is outside of the packet")
    with pytest.raises(VerifierError, match="invalid access to packet, off=4 size=1"):
        pf.vm_load(raw, ProgType.SK_SKB, pf.vm_maps())


def _jumps_over_the_bad_read(raw: bytes, taken: bool) -> None:
    """``raw`` reads ctx at a bad offset unless its branch jumps over it (``taken``): the
    kernel (where bpf() is permitted) and the VM accept it exactly when it is taken."""
    said = _kernel_says(raw)
    if said is not None:
        assert said[0] is taken
    if taken:
        assert pf.vm_load(raw, ProgType.SK_SKB, pf.vm_maps()).run(SkbContext()) == 0
    else:
        with pytest.raises(VerifierError, match="invalid bpf_context access off=2 size=4"):
            pf.vm_load(raw, ProgType.SK_SKB, pf.vm_maps())


@pytest.mark.parametrize("op", [0xDD, 0xBD, 0x1D, 0x3D, 0x7D, 0x5D, 0xAD, 0x2D, 0xCD, 0x6D])
def test_a_register_compared_with_itself_decides_the_branch(op: int) -> None:
    """Found by this fuzzer: ``if r7 s<= r7 goto`` is always taken, so the kernel never looks
    at what it jumps over (here a misaligned context read); the VM refused it. The kernel
    knows r7 (0, from a zeroed stack slot); the VM does not track the stack's contents, but
    a register compared with itself decides the branch whatever its value."""
    raw = (
        _ins(0x7A, 10, 0, -8)  # *(u64 *)(r10 - 8) = 0
        + _ins(0x69, 7, 10, -6)  # r7 = *(u16 *)(r10 - 6)
        + _ins(op, 7, 7, 1)  # if r7 <op> r7 goto +1
        + _ins(0x61, 0, 1, 2)  # r0 = *(u32 *)(r1 + 2): refused wherever it is reached
        + _ins(0xB7)
        + _ins(0x95)
    )
    taken = op in (0xDD, 0xBD, 0x1D, 0x3D, 0x7D)  # s<=, <=, ==, >=, s>=
    _jumps_over_the_bad_read(raw, taken)


@pytest.mark.parametrize(
    ("op", "imm", "taken"),
    [(0x76, -(1 << 31), True), (0xC6, -(1 << 31), False), (0x35, 0, True), (0xA5, 0, False),
     (0xB5, -1, True), (0x25, -1, False), (0xD6, 0x7FFFFFFF, True), (0x66, 0x7FFFFFFF, False)],
)  # fmt: skip
def test_a_comparison_true_for_every_value_decides_the_branch(
    op: int, imm: int, taken: bool
) -> None:
    """Found by this fuzzer: ``if w9 s>= 0x80000000 goto`` holds whatever w9 is; the kernel
    never looks at what it jumps over (here a packet write past its check)."""
    raw = (
        _ins(0x61, 7, 1, 0)  # r7 = skb->len: any value
        + _ins(op, 7, 0, 1, imm)  # if r7 <op> imm goto +1
        + _ins(0x61, 0, 1, 2)  # r0 = *(u32 *)(r1 + 2): refused wherever it is reached
        + _ins(0xB7)
        + _ins(0x95)
    )
    _jumps_over_the_bad_read(raw, taken)


def test_exit_with_an_offset_is_accepted() -> None:
    """Found by this fuzzer: the kernel does not look at an exit's offset; the VM refused it."""
    prog = _kernel_and_vm_accept(_ins(0xB7, imm=3) + _ins(0x95, off=-1))
    assert prog.run(SkbContext()) == prog.interpret(SkbContext()) == 3


def test_array_lookup_without_null_check_is_accepted() -> None:
    """Found by this fuzzer: Linux 6.14+ knows an ARRAY lookup with a constant in-range key
    is not NULL. The VM accepts a dereference of any ARRAY lookup and faults on a NULL."""
    def program(key: int) -> bytes:
        return pf.encode(asm.Program([
            asm.st(asm.W, asm.R10, -8, key),  # a form whose constant the kernel tracks
            asm.ld_map_fd(asm.R1, pf.REFS["counter"]),
            asm.mov(asm.R2, asm.R10),
            asm.add(asm.R2, -8),
            asm.call(Helper.map_lookup_elem),
            asm.ldx(asm.DW, asm.R0, asm.R0, 0),
            asm.exit_(),
        ]))  # fmt: skip

    prog = _kernel_and_vm_accept(program(1))
    assert prog.run(SkbContext(), pf.FuzzEnv()) == 0
    past = pf.vm_load(program(99), ProgType.SK_SKB, pf.vm_maps())  # the kernel refuses this one
    slow, fast, problems = pf.run_both(past, SkbContext(), pf.vm_maps())
    assert not problems
    assert slow.kind == fast.kind == "vm_error"  # a NULL value pointer faults


def test_malformed_instruction_on_a_dead_path_is_accepted() -> None:
    """Found by this fuzzer: the kernel checks an instruction's fields only where a path
    reaches it; a malformed one behind an always-taken branch is dead code, not an error."""
    body = (
        _ins(0xB7, imm=5)  # r0 = 5
        + _ins(0x55, dst=0, off=1, imm=5)  # if r0 != 5 goto +1 (never)
        + _ins(0x95)
        + _ins(0x7D, imm=2)  # jsgt X with an immediate: reserved fields
        + _ins(0x95)
    )
    prog = _kernel_and_vm_accept(body)
    assert prog.run(SkbContext()) == prog.interpret(SkbContext()) == 5
    reached = _ins(0xB7, imm=4) + body[8:]
    with pytest.raises(VerifierError, match="reserved fields"):
        pf.vm_load(reached, ProgType.SK_SKB, pf.vm_maps())


# ---------------------------------------------------------------------------- 3. kernel


class KernelMaps:
    """Real maps of every shape in ``progfuzz.MAPS``."""

    def __init__(self) -> None:
        self.maps = [
            Map.create(MapSpec(d.type, d.key_size, d.value_size, d.max_entries, name=d.name[:15]))
            for d in pf.MAPS
        ]

    def fd(self, virtual: int) -> int | None:
        i = virtual - pf.VFD_BASE
        return self.maps[i].fd if 0 <= i < len(self.maps) else None

    def close(self) -> None:
        for m in self.maps:
            m.close()


_STATS = ("processed ", "verification time", "stack depth", "mark_precise", "from ", "last_idx")


def kernel_reason(exc: BpfError) -> str:
    log = getattr(exc, "log", "")
    lines = [x.strip() for x in log.strip().splitlines() if x.strip()]
    for line in reversed(lines):
        if not line.startswith(_STATS) and not re.match(r"^\d+: \(", line):
            return re.sub(r"-?\b(0x[0-9a-f]+|\d+)\b", "N", line)[:70]
    return f"errno {exc.errno}"


def kernel_load(raw: bytes, pt: ProgType, kmaps: KernelMaps) -> tuple[bool, str]:
    try:
        with load_program(pf.to_kernel(raw, kmaps.fd), pt, name="vmfuzz"):
            return True, ""
    except BpfError as exc:
        return False, kernel_reason(exc)


_NONDET = {
    Helper.ktime_get_ns,
    Helper.ktime_get_boot_ns,
    Helper.ktime_get_coarse_ns,
    Helper.get_prandom_u32,
    Helper.get_smp_processor_id,
    Helper.get_socket_cookie,
}
_SAME_IN_TEST_RUN = {0, 76, 80}  # len, data, data_end: what a 64-byte test run shows alike


def comparable(prog: VmProgram) -> bool:
    """Whether r0 depends only on what a SCHED_CLS test run and the VM see alike: the
    packet, its length, fresh maps (no clocks, random numbers, cookies, other fields)."""
    c = prog.checked
    if c.calls:
        return False  # a callee's frame is not cleared on the kernel
    for pc, ins in enumerate(c.insns):
        if ins is None:
            continue
        st = c.states.get(pc)
        if st is None:
            continue
        if ins.opcode == 0x85 and (ins.src or ins.imm in _NONDET):
            return False
        cls = ins.opcode & 0x07
        if cls == 0x01:  # LDX
            kind = _kind(st[ins.src])
            if kind in ("x", "kctx") or (kind == "ctx" and ins.off not in _SAME_IN_TEST_RUN):
                return False
        kinds = {_kind(st[r]) for r in _operands(ins)}
        if ins.opcode == 0x95 and _kind(st[0]) != "s":
            return False  # a pointer returned: its value differs by design
        if cls in (0x04, 0x07) and kinds - {"s"}:
            after = c.states.get(pc + 1)
            if after is None or _kind(after[ins.dst]) in ("s", "x"):
                return False  # a pointer's value turned into a number
        pointer_cmp = kinds - {"s"} and not kinds <= {"pkt", "end"} and not kinds <= {"mvn", "s"}
        if cls in (0x05, 0x06) and ins.opcode & 0xF0 not in (0x80, 0x90, 0x00) and pointer_cmp:
            return False  # a pointer compared with a number
        if cls == 0x03 and _kind(st[ins.src]) != "s":  # atomics too: they add it in
            return False  # a pointer stored where it can be read back as a number
    return True


def _kind(v: tuple[object, ...] | None) -> str:
    return "x" if v is None else str(v[0])


def _operands(ins: asm.Instruction) -> list[int]:
    cls = ins.opcode & 0x07
    if cls in (0x04, 0x07, 0x05, 0x06) and ins.opcode not in (0x85, 0x95, 0x05, 0x06):
        read_dst = [] if cls in (0x04, 0x07) and ins.opcode & 0xF0 == 0xB0 else [ins.dst]  # mov
        return [*read_dst, ins.src] if ins.opcode & 0x08 else read_dst
    return []


def _kernel_program(rng: random.Random, base: list[pf.Seed]) -> tuple[str, bytes, ProgType]:
    r = rng.random()
    if r < 0.5:
        raw, tags = pf.structured(rng)
        return "structured " + ",".join(sorted(tags)), raw, ProgType.SK_SKB
    if r < 0.8:
        seed = rng.choice(base)
        raw, done = pf.mutate(rng, seed.raw, rounds=1)
        return f"mutant of {seed.name} ({done[0]})", raw, seed.pt
    raw, _ = pf.structured(rng)
    raw, done = pf.mutate(rng, raw, rounds=1)
    return f"structured mutant ({done[0]})", raw, ProgType.SK_SKB


KNOWN_VM_LIMITS = (
    "not supported by the userspace VM",
    "is not modelled by the userspace VM",
    "!read_ok",
    "uses reserved fields",
    "unknown opcode",
)
"""VM refusals of kernel-accepted programs that are known limits, not bugs: what the VM does
not implement (most kfuncs and helpers, socket pointers, most of the kernel sk_buff) and
where its analysis is less precise than the kernel's, which follows each path on its own
(a register unset, or a malformed instruction, on a path that only the kernel proves dead:
``!read_ok``, ``reserved fields``; presumed, the kernel's log does not say)."""


def test_kernel_verifier_agreement() -> None:
    permitted, why = bpf_access()
    if not permitted:
        pytest.skip(f"bpf() refused, so there is no kernel verifier to agree with: {why}")
    rng = random.Random(SEED + 2)
    base = pf.seeds()
    n = size(300, 6000)
    c: Counter[str] = Counter()
    kernel_only: Counter[str] = Counter()
    vm_only: Counter[str] = Counter()
    vm_limits: Counter[str] = Counter()
    run_errors: Counter[str] = Counter()
    r0_diff: list[str] = []
    failures: list[str] = []
    started = time.monotonic()
    kmaps = KernelMaps()
    try:
        for i in range(n):
            origin, raw, pt = _kernel_program(rng, base)
            c["programs"] += 1
            k_ok, k_why = kernel_load(raw, pt, kmaps)
            maps = pf.vm_maps()
            try:
                with pf.wall_limit():
                    prog: VmProgram | None = pf.vm_load(raw, pt, maps)
                v_why = ""
            except VerifierError as exc:
                prog, v_why = None, pf.category(exc)
                known = any(k in str(exc).split("\n")[0] for k in KNOWN_VM_LIMITS)
            except BaseException as exc:
                failures.append(f"#{i} {origin}: load {type(exc).__name__}: {exc} raw={raw.hex()}")
                continue
            c["kernel accepted"] += k_ok
            c["vm accepted"] += prog is not None
            c["both accepted"] += k_ok and prog is not None
            c["both refused"] += not k_ok and prog is None
            if not k_ok and prog is not None:
                vm_only[k_why] += 1
            if k_ok and prog is None:
                (vm_limits if known else kernel_only)[v_why] += 1
                if not known:
                    failures.append(f"#{i} {origin} {pt.name}: kernel accepts, VM refuses: "
                                    f"{v_why} raw={raw.hex()}")  # fmt: skip
            if prog is None:
                continue
            ran_all = True
            for _ in range(3):
                ctx = pf.make_ctx(rng, pt, full=True)
                slow, _fast, problems = pf.run_both(prog, ctx, maps)
                if problems:
                    failures.append(f"#{i} {origin}: {'; '.join(problems)} raw={raw.hex()}")
                if slow.kind != "ran":
                    ran_all = False
                    if k_ok:
                        run_errors[slow.error] += 1
                        failures.append(f"#{i} {origin} {pt.name}: kernel accepts, VM run: "
                                        f"{pf.summary(slow)} raw={raw.hex()}")  # fmt: skip
                    break
            if k_ok:
                c["kernel accepted, vm ran"] += ran_all
            if k_ok and pt == ProgType.SK_SKB and comparable(prog):
                _compare_r0(rng, raw, c, r0_diff, origin)
    finally:
        kmaps.close()
    seconds = time.monotonic() - started
    accepted = c["kernel accepted"]
    FIGURES["kernel agreement"] = {
        "programs": n,
        "kernel accepted": accepted,
        "vm accepted (validation)": c["vm accepted"],
        "both accepted": c["both accepted"],
        "both refused": c["both refused"],
        "kernel accepted, vm ran": c["kernel accepted, vm ran"],
        "kernel accepted, vm refused (documented limits)": dict(vm_limits.most_common()),
        "kernel accepted, vm refused (other)": dict(kernel_only.most_common()),
        "kernel accepted, vm run errors": dict(run_errors.most_common()),
        "kernel refused, vm accepted (vm more permissive), by kernel reason": dict(
            vm_only.most_common(25)
        ),
        "r0 comparable (SCHED_CLS test run)": c["r0 compared"],
        "r0 agree": c["r0 agree"],
        "r0 not comparable (SCHED_CLS refused by kernel or VM)": c["r0 sched_cls refused"],
        "r0 disagreements": r0_diff[:20],
        "agreement rate (kernel accepts => vm runs)": round(
            c["kernel accepted, vm ran"] / accepted, 4) if accepted else None,
        "verdict agreement rate (accept/refuse alike)": round(
            (c["both accepted"] + c["both refused"]) / n, 4),
        "seconds": round(seconds, 1),
    }
    print(FIGURES["kernel agreement"])
    assert accepted > n // 10, "the generators hardly make a program the kernel accepts"
    _fail("disagreements with the kernel", failures + r0_diff)


def _compare_r0(
    rng: random.Random, raw: bytes, c: Counter[str], diffs: list[str], origin: str
) -> None:
    """The same bytes as SCHED_CLS on the kernel (fresh maps, a test run) and in the VM."""
    packet = rng.randbytes(64)
    # The kernel does not clear the stack (a privileged program may read it unset); the VM
    # does. Clearing it first makes the two comparable.
    raw = b"".join(SLOT.pack(0x7A, 10, -8 * (i + 1), 0) for i in range(64)) + raw
    kmaps = KernelMaps()
    try:
        try:
            kprog = load_program(pf.to_kernel(raw, kmaps.fd), ProgType.SCHED_CLS, name="vmfuzz")
        except BpfError:
            c["r0 sched_cls refused"] += 1
            return
        with kprog:
            want = run_program(kprog, packet).retval
    finally:
        kmaps.close()
    got = []
    for interp in (True, False):
        try:  # fresh maps for each run, as the kernel's
            prog = pf.vm_load(raw, ProgType.SCHED_CLS, pf.vm_maps())
        except VerifierError:
            # As SK_SKB the VM accepted it (checked by the caller); a SCHED_CLS refusal is
            # a helper that type may not call on a path only the kernel proves dead.
            c["r0 sched_cls refused"] += 1
            return
        ctx = SkbContext(data=bytearray(packet), len=64)
        env = pf.FuzzEnv()
        try:
            r0 = prog.interpret(ctx, env) if interp else prog.run(ctx, env)
            got.append(r0 & 0xFFFFFFFF)
        except Exception as exc:
            got.append(pf.category(exc))  # type: ignore[arg-type]
    c["r0 compared"] += 1
    if got == [want, want]:
        c["r0 agree"] += 1
    else:
        diffs.append(f"{origin}: r0 kernel {want:#x}, VM {got} packet={packet.hex()} "
                     f"raw={raw.hex()}")  # fmt: skip


def test_kernel_reason_reads_the_log() -> None:
    """The classifier the report uses: the verifier's last word, numbers blanked."""
    permitted, why = bpf_access()
    if not permitted:
        pytest.skip(f"bpf() refused: {why}")
    with pytest.raises(BpfError) as info:
        load_program(asm.Program([asm.exit_()]), ProgType.SK_SKB).close()
    assert kernel_reason(info.value) == "R0 !read_ok"
