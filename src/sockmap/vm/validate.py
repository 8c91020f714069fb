"""Load-time validation: structure, control flow, register and pointer types.

Done once per program, in three passes:

1. every instruction alone: known opcode, operands in range, reserved fields zero,
   no write to r10, helper allowed for the program type, maps resolved;
2. control flow: jump targets inside the program (and inside their subprogram), no
   fall-through off the end, no unreachable instruction, no recursion;
3. an abstract interpretation over the CFG to a fixpoint, tracking for every register
   "uninitialised" or a type (scalar with maybe a constant, ctx, stack/packet pointer with
   maybe a constant offset, packet end, map, map value (or NULL), unknown). On the final
   states it rejects reads of registers some path left unwritten, and accesses whose base
   is definitely not usable memory; it also works out ``max_packet_offset``.

A packet pointer also carries the kernel's ``range``: how many bytes from ``data`` a
comparison with ``data_end`` has proven present (``find_good_pkt_pointers``). A direct
packet write at a constant offset past it is refused, as the kernel refuses it; reads
and writes the analysis cannot place are bounds-checked at run time instead.

Loops are allowed: termination is not proven, the run-time instruction budget bounds it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from sockmap.abi import Helper, MapType, ProgType
from sockmap.asm import format_instruction
from sockmap.asm.instruction import Instruction
from sockmap.asm.opcodes import (
    FETCH,
    LD_IMM64,
    PSEUDO_CALL,
    PSEUDO_KFUNC_CALL,
    PSEUDO_MAP_FD,
    PSEUDO_MAP_VALUE,
    AluOp,
    AtomicOp,
    Class,
    JmpOp,
    Mode,
    Size,
)
from sockmap.errors import VerifierError
from sockmap.vm._semantics import M32, M64, alu, end, imm64, jmp, sext
from sockmap.vm.api import VmMap
from sockmap.vm.context import access_table, describe_access
from sockmap.vm.helpers import ALLOWED, HELPERS, kern_ctx_fields, kfunc
from sockmap.vm.memory import STACK_SIZE

__all__ = ["Checked", "Value", "validate"]

MAX_CALL_FRAMES = 8

Value = tuple[object, ...] | None
"""Abstract register: None = not initialised; else (kind, aux)."""
State = tuple[Value, ...]

X: Value = ("x",)
CTX: Value = ("ctx",)
END: Value = ("end",)
KCTX: Value = ("kctx",)
SCALAR: Value = ("s", None)
_TYPE_NAMES = {
    "s": "scalar",
    "ctx": "ctx",
    "stk": "fp",
    "pkt": "pkt",
    "end": "pkt_end",
    "map": "map_ptr",
    "mv": "map_value",
    "mvn": "map_value_or_null",
    "kctx": "trusted_ptr_sk_buff",
    "x": "unknown",
}
_ALU_OPS = frozenset(int(o) for o in AluOp)
_COND_OPS = frozenset(int(o) for o in JmpOp) - {JmpOp.JA, JmpOp.CALL, JmpOp.EXIT}
EXIT = Class.JMP | JmpOp.EXIT
_ATOMIC_OPS = frozenset(
    {*(int(o) for o in AtomicOp), *(o | FETCH for o in (0x00, 0x40, 0x50, 0xA0))}
)
_SIZES = {Size.B: 1, Size.H: 2, Size.W: 4, Size.DW: 8}
PACKET_WRITERS = frozenset({ProgType.SK_SKB, ProgType.SK_MSG, ProgType.SCHED_CLS})
"""Program types the kernel lets write packet data directly (``may_access_direct_pkt_data``)."""
MAX_PACKET_OFF = 0xFFFF
# A comparison of a packet pointer with data_end: for each (op, packet pointer on the left),
# which branch learns the bytes before the pointer are present, and whether the pointer's
# own byte is too (a strict "<"): the kernel's try_match_pkt_pointers.
_PKT_CMP = {
    (JmpOp.JGT, True): ("fall", False),  # pkt > end: else pkt <= end
    (JmpOp.JGT, False): ("taken", True),  # end > pkt
    (JmpOp.JLT, True): ("taken", True),  # pkt < end
    (JmpOp.JLT, False): ("fall", False),  # end < pkt: else pkt <= end
    (JmpOp.JGE, True): ("fall", True),  # pkt >= end: else pkt < end
    (JmpOp.JGE, False): ("taken", False),  # end >= pkt
    (JmpOp.JLE, True): ("taken", False),  # pkt <= end
    (JmpOp.JLE, False): ("fall", True),  # end <= pkt: else pkt < end
}
# A register compared with itself decides the branch whatever its value. The kernel prunes
# such a branch when it knows the value (a constant it tracks on the stack, which this
# analysis does not); pruning it always keeps the VM from refusing what the kernel accepts.
_PKT_CMP_OPS = frozenset({JmpOp.JGT, JmpOp.JLT, JmpOp.JGE, JmpOp.JLE})
_SELF_CMP: dict[int, bool] = {
    **dict.fromkeys((JmpOp.JEQ, JmpOp.JGE, JmpOp.JLE, JmpOp.JSGE, JmpOp.JSLE), True),
    **dict.fromkeys((JmpOp.JNE, JmpOp.JGT, JmpOp.JLT, JmpOp.JSGT, JmpOp.JSLT), False),
}


def _decided(op: int, c: int, bits: int) -> bool | None:
    """Whether ``x <op> c`` holds for every ``x`` of ``bits`` (True), for none (False), or
    depends on x (None): ``x >= 0``, ``w s>= 0x80000000``... The kernel's value ranges
    decide these; pruning the other branch keeps the VM from refusing what it accepts."""
    umax = M64 if bits == 64 else M32
    smin = 1 << (bits - 1)
    edges = {
        JmpOp.JGE: (0, True),
        JmpOp.JLT: (0, False),
        JmpOp.JLE: (umax, True),
        JmpOp.JGT: (umax, False),
        JmpOp.JSGE: (smin, True),
        JmpOp.JSLT: (smin, False),
        JmpOp.JSLE: (smin - 1, True),
        JmpOp.JSGT: (smin - 1, False),
    }
    edge = edges.get(JmpOp(op)) if op in _COND_OPS else None
    return edge[1] if edge is not None and c == edge[0] else None


def _pkt(off: object, rng: int = 0) -> Value:
    """A packet pointer ``off`` bytes past ``data`` (an int; None: not constant) with ``rng``
    bytes from ``data`` proven present."""
    return ("pkt", off if isinstance(off, int) else None, rng)


def _range(v: Value) -> int:
    assert v is not None
    rng = v[2] if len(v) > 2 else 0
    assert isinstance(rng, int)
    return rng


def _const(v: Value) -> int | None:
    """The constant of a scalar, if known."""
    if v is None or v[0] != "s" or not isinstance(v[1], int):
        return None
    return v[1]


def _i(v: Value) -> int:
    """The int aux (constant, offset, map index) of an abstract value known to have one."""
    assert v is not None
    aux = v[1]
    assert isinstance(aux, int)
    return aux


def tname(v: Value) -> str:
    """The kernel-style name of an abstract register type."""
    return "uninit" if v is None else _TYPE_NAMES[str(v[0])]


@dataclass
class Checked:
    """A validated program and what the analysis learned about it."""

    insns: list[Instruction | None]
    """One entry per 8-byte slot; None for the second slot of LD_IMM64."""
    maps: list[VmMap]
    map_index: dict[int, int]
    states: dict[int, State]
    funcs: list[int]
    back_edges: bool
    max_packet_offset: int | None
    calls: bool = False
    packet_writes: bool = False
    """Some store may reach the packet: runs then get a writable packet (see ``Memory``)."""
    notes: list[str] = field(default_factory=list)


def jump_target(pc: int, ins: Instruction) -> int | None:
    """Where a jump (or local call) at ``pc`` goes; None for other instructions."""
    cls = ins.opcode & 0x07
    if cls not in (Class.JMP, Class.JMP32):
        return None
    op = ins.opcode & 0xF0
    if op == JmpOp.CALL:
        return pc + 1 + ins.imm if ins.src == PSEUDO_CALL else None
    if op == JmpOp.EXIT:
        return None
    if op == JmpOp.JA and cls == Class.JMP32:
        return pc + 1 + sext(ins.imm, 32)
    return pc + 1 + ins.off


class _Validator:
    def __init__(
        self,
        placed: list[tuple[int, Instruction]],
        n: int,
        pt: ProgType,
        resolve: Callable[[object], VmMap | None],
    ) -> None:
        self.pt = pt
        self.n = n
        self.insns: list[Instruction | None] = [None] * n
        for pc, ins in placed:
            self.insns[pc] = ins
        self.placed = placed
        self.resolve = resolve
        self.maps: list[VmMap] = []
        self.map_refs: list[object] = []
        self.map_index: dict[int, int] = {}
        self.table = access_table(pt)
        self.pkt_unknown = False
        self.packet_writes = False
        self.cands: list[int] = []
        self.bad: dict[int, VerifierError] = {}
        """Malformed instructions: refused only if the analysis reaches them."""

    # ------------------------------------------------------------------ errors

    def fail(self, err: int, pc: int, msg: str) -> VerifierError:
        lines = [f"{p}: {format_instruction(i)}" for p, i in self.placed if p <= pc]
        text = f"pc {pc}: {msg}" if pc >= 0 else msg
        lines.append(text)
        return VerifierError(err, text, log="\n".join(lines) + "\n")

    # ------------------------------------------------------------------ pass 1

    def check_insn(self, pc: int, ins: Instruction) -> None:
        op, cls = ins.opcode & 0xF0, ins.opcode & 0x07
        bad = self.fail
        if ins.dst > 10 or (ins.src > 10 and ins.opcode != LD_IMM64):
            raise bad(errno.EINVAL, pc, f"invalid register (dst r{ins.dst:d}, src r{ins.src:d})")
        xsrc = bool(ins.opcode & 0x08)
        if cls in (Class.ALU, Class.ALU64):
            if op not in _ALU_OPS:
                raise bad(errno.EINVAL, pc, f"unknown opcode {ins.opcode:#04x}")
            if op == AluOp.END:
                if (
                    (cls == Class.ALU64 and xsrc)
                    or ins.imm not in (16, 32, 64)
                    or ins.src
                    or ins.off
                ):
                    raise bad(errno.EINVAL, pc, "BPF_END uses reserved fields or a bad width")
            elif op == AluOp.NEG:
                if xsrc or ins.src or ins.off or ins.imm:
                    raise bad(errno.EINVAL, pc, "BPF_NEG uses reserved fields")
            else:
                if op in (AluOp.DIV, AluOp.MOD):
                    ok_off: tuple[int, ...] = (0, 1)
                elif op == AluOp.MOV and xsrc:
                    ok_off = (0, 8, 16, 32) if cls == Class.ALU64 else (0, 8, 16)
                else:
                    ok_off = (0,)
                if ins.off not in ok_off or (xsrc and ins.imm) or (not xsrc and ins.src):
                    raise bad(errno.EINVAL, pc, "BPF_ALU uses reserved fields")
            if ins.dst == 10:
                raise bad(errno.EACCES, pc, "frame pointer is read only (write to r10)")
        elif cls in (Class.JMP, Class.JMP32):
            self.check_jmp(pc, ins, op, cls, xsrc)
        elif ins.opcode == LD_IMM64:
            if ins.src not in (0, PSEUDO_MAP_FD, PSEUDO_MAP_VALUE) or ins.off:
                raise bad(errno.EINVAL, pc, f"invalid ld_imm64 (src {ins.src:d}, off {ins.off})")
            if ins.dst == 10:
                raise bad(errno.EACCES, pc, "frame pointer is read only (write to r10)")
            if ins.src:
                self.resolve_map(pc, ins)
        elif cls == Class.LD:
            raise bad(
                errno.EINVAL, pc, f"unknown opcode {ins.opcode:#04x} (BPF_LD ABS/IND unsupported)"
            )
        elif cls == Class.LDX:
            mode, size = ins.opcode & 0xE0, ins.opcode & 0x18
            if mode not in (Mode.MEM, Mode.MEMSX) or (mode == Mode.MEMSX and size == Size.DW):
                raise bad(errno.EINVAL, pc, f"unknown opcode {ins.opcode:#04x}")
            if ins.imm:
                raise bad(errno.EINVAL, pc, "BPF_LDX uses reserved fields")
            if ins.dst == 10:
                raise bad(errno.EACCES, pc, "frame pointer is read only (write to r10)")
        elif cls == Class.ST:
            if ins.opcode & 0xE0 != Mode.MEM or ins.src:
                raise bad(errno.EINVAL, pc, f"unknown opcode {ins.opcode:#04x} or reserved src")
        else:  # STX
            mode, size = ins.opcode & 0xE0, ins.opcode & 0x18
            if mode == Mode.MEM:
                if ins.imm:
                    raise bad(errno.EINVAL, pc, "BPF_STX uses reserved fields")
            elif mode == Mode.ATOMIC:
                if size not in (Size.W, Size.DW) or ins.imm not in _ATOMIC_OPS:
                    raise bad(errno.EINVAL, pc, f"invalid atomic operation {ins.imm:#x}")
                if ins.imm & FETCH and ins.src == 10:
                    raise bad(errno.EACCES, pc, "frame pointer is read only (atomic fetch)")
            else:
                raise bad(errno.EINVAL, pc, f"unknown opcode {ins.opcode:#04x}")

    def check_jmp(self, pc: int, ins: Instruction, op: int, cls: int, xsrc: bool) -> None:
        bad = self.fail
        if op == JmpOp.JA:
            if (
                xsrc
                or ins.src
                or ins.dst
                or (cls == Class.JMP and ins.imm)
                or (cls == Class.JMP32 and ins.off)
            ):
                raise bad(errno.EINVAL, pc, "BPF_JA uses reserved fields")
        elif op == JmpOp.CALL:
            if cls != Class.JMP or xsrc or ins.dst or ins.off:
                raise bad(errno.EINVAL, pc, "BPF_CALL uses reserved fields")
            if ins.src == PSEUDO_CALL:
                return
            if ins.src == PSEUDO_KFUNC_CALL:
                if kfunc(ins.imm, self.pt) is None:
                    raise bad(
                        errno.EINVAL,
                        pc,
                        f"kfunc#{ins.imm} is not supported by the userspace VM for "
                        f"{self.pt.name} programs (only bpf_cast_to_kern_ctx in SK_SKB)",
                    )
                return
            if ins.src:
                raise bad(errno.EINVAL, pc, f"BPF_CALL with unknown src_reg {ins.src}")
            try:
                name = f"{Helper(ins.imm).name}#{ins.imm}"
            except ValueError:
                raise bad(errno.EINVAL, pc, f"invalid func unknown#{ins.imm}") from None
            if ins.imm not in HELPERS:
                raise bad(errno.EINVAL, pc, f"helper {name} is not supported by the userspace VM")
            if ins.imm not in ALLOWED[self.pt]:
                raise bad(
                    errno.EINVAL,
                    pc,
                    f"program of this type ({self.pt.name}) cannot use helper {name}",
                )
        elif op == JmpOp.EXIT:
            if cls != Class.JMP or xsrc or ins.src or ins.dst or ins.imm:  # off: the kernel
                raise bad(errno.EINVAL, pc, "BPF_EXIT uses reserved fields")  # ignores it
        elif op not in _COND_OPS or (xsrc and ins.imm) or (not xsrc and ins.src):
            raise bad(errno.EINVAL, pc, f"unknown opcode {ins.opcode:#04x} or reserved fields")

    def resolve_map(self, pc: int, ins: Instruction) -> None:
        ref = ins.map_ref
        for i, known in enumerate(self.map_refs):
            if known is ref or (type(known) is int and type(ref) is int and known == ref):
                self.map_index[pc] = i
                break
        else:
            try:
                m = self.resolve(ref)
            except Exception as exc:
                raise self.fail(errno.EBADF, pc, f"map {ref!r} cannot be resolved: {exc}") from exc
            if m is None or not hasattr(m, "vm_lookup"):
                raise self.fail(errno.EBADF, pc, f"map {ref!r} is not pointing to a valid map")
            self.map_index[pc] = len(self.maps)
            self.maps.append(m)
            self.map_refs.append(ref)
        if ins.src == PSEUDO_MAP_VALUE:
            m = self.maps[self.map_index[pc]]
            if m.map_type != 2 or m.max_entries != 1 or ins.map_offset >= m.value_size:
                raise self.fail(
                    errno.EINVAL,
                    pc,
                    "direct map value access needs an ARRAY map with max_entries 1 and an "
                    f"offset below value_size (offset {ins.map_offset})",
                )

    # ------------------------------------------------------------------ pass 2

    def check_cfg(self) -> tuple[list[int], bool]:
        n, insns = self.n, self.insns
        entries = {0}
        for pc, ins in self.placed:
            t = jump_target(pc, ins)
            if t is None:
                continue
            if not 0 <= t < n or insns[t] is None:
                raise self.fail(errno.EINVAL, pc, f"jump out of range from insn {pc} to {t}")
            if ins.opcode & 0xF0 == JmpOp.CALL:
                entries.add(t)
        funcs = sorted(entries)
        func_of = [0] * n
        fi = 0
        for pc in range(n):
            while fi + 1 < len(funcs) and funcs[fi + 1] <= pc:
                fi += 1
            func_of[pc] = funcs[fi]
        # each function ends in exit or an unconditional jump; jumps stay inside it
        bounds = [*funcs[1:], n]
        for start, stop in zip(funcs, bounds, strict=True):
            last = stop - 1 if insns[stop - 1] is not None else stop - 2
            tail = insns[last]
            assert tail is not None
            op = tail.opcode & 0xF0
            if not (
                tail.opcode & 0x07 in (Class.JMP, Class.JMP32) and op in (JmpOp.EXIT, JmpOp.JA)
            ):
                raise self.fail(
                    errno.EINVAL, last, f"last insn is not an exit or jmp (function at {start})"
                )
        back = False
        for pc, ins in self.placed:
            t = jump_target(pc, ins)
            if t is None or ins.opcode & 0xF0 == JmpOp.CALL:
                continue
            if func_of[t] != func_of[pc]:
                raise self.fail(errno.EINVAL, pc, f"jump out of range from insn {pc} to {t}")
            back = back or t <= pc
        # reachability over all edges
        seen = [False] * n
        todo = [0]
        while todo:
            pc = todo.pop()
            if seen[pc]:
                continue
            seen[pc] = True
            todo.extend(self.cfg_succ(pc))
        for pc, _ in self.placed:
            if not seen[pc]:
                raise self.fail(errno.EINVAL, pc, f"unreachable insn {pc}")
        # call graph: no recursion, bounded depth
        callees: dict[int, set[int]] = {f: set() for f in funcs}
        for pc, ins in self.placed:
            if ins.opcode == Class.JMP | JmpOp.CALL and ins.src == PSEUDO_CALL:
                callees[func_of[pc]].add(pc + 1 + ins.imm)

        # Depth-first, each function once (a walk of every call path is exponential in a
        # call graph of diamonds) and without Python recursion (chains of ~2000 functions).
        depth: dict[int, int] = {}
        on_path = {0}
        walk = [(0, iter(sorted(callees[0])))]
        while walk:
            f, pending = walk[-1]
            c = next(pending, None)
            if c is None:
                walk.pop()
                on_path.discard(f)
                depth[f] = 1 + max((depth[x] for x in callees[f]), default=0)
            elif c in on_path:
                raise self.fail(errno.EINVAL, c, f"recursive call to the function at insn {c}")
            elif c not in depth:
                on_path.add(c)
                walk.append((c, iter(sorted(callees[c]))))
        if depth[0] > MAX_CALL_FRAMES:
            raise self.fail(errno.E2BIG, 0, f"the call stack is more than {MAX_CALL_FRAMES} frames")
        return funcs, back

    def cfg_succ(self, pc: int) -> list[int]:
        ins = self.insns[pc]
        assert ins is not None
        cls, op = ins.opcode & 0x07, ins.opcode & 0xF0
        nxt = pc + ins.slots
        if cls not in (Class.JMP, Class.JMP32):
            return [nxt]
        if op == JmpOp.EXIT:
            return []
        t = jump_target(pc, ins)
        if op == JmpOp.CALL:
            return [nxt] if t is None else [nxt, t]
        assert t is not None
        return [t] if op == JmpOp.JA else [nxt, t]

    # ------------------------------------------------------------------ pass 3

    def join(self, a: Value, b: Value) -> Value:
        if a == b:
            return a
        if a is None or b is None:
            return None
        ka, kb = a[0], b[0]
        if ka == kb == "pkt":
            # the kernel checks each path alone: an access is safe if it is on the worst one
            return _pkt(a[1] if a[1] == b[1] else None, min(_range(a), _range(b)))
        if ka == kb and ka in ("s", "stk"):
            return (ka, None)
        if {ka, kb} == {"mv", "mvn"} and a[1] == b[1]:
            return ("mvn", a[1])
        if ka in ("pkt", "end") or kb in ("pkt", "end"):
            self.pkt_unknown = True
        return X

    def successors(self, pc: int, st: State) -> list[tuple[int, State]]:
        ins = self.insns[pc]
        assert ins is not None
        cls, op = ins.opcode & 0x07, ins.opcode & 0xF0
        nxt = pc + ins.slots
        regs = list(st)
        if cls in (Class.ALU, Class.ALU64):
            regs[ins.dst] = self.alu_value(ins, st, 64 if cls == Class.ALU64 else 32)
            return [(nxt, tuple(regs))]
        if ins.opcode == LD_IMM64:
            if ins.src == PSEUDO_MAP_FD:
                regs[ins.dst] = ("map", self.map_index[pc])
            elif ins.src == PSEUDO_MAP_VALUE:
                regs[ins.dst] = ("mv", self.map_index[pc])
            else:
                regs[ins.dst] = ("s", ins.imm & M64)
            return [(nxt, tuple(regs))]
        if cls == Class.LDX:
            size = _SIZES[Size(ins.opcode & 0x18)]
            base = st[ins.src]
            if ins.opcode & 0xE0 == Mode.MEMSX:
                regs[ins.dst] = SCALAR
            elif base == CTX:
                acc = self.table.get((ins.off, size, False))
                kind = acc.kind if acc else "field"
                regs[ins.dst] = {"data": _pkt(0), "data_meta": _pkt(0), "data_end": END}.get(
                    kind, SCALAR
                )
            elif base == KCTX and kern_ctx_fields().get(ins.off) == "strp.offset":
                # The engines hand a program the message itself: it starts at offset 0.
                regs[ins.dst] = ("s", 0)
            else:
                regs[ins.dst] = X if size == 8 else SCALAR
            return [(nxt, tuple(regs))]
        if cls == Class.ST:
            return [(nxt, st)]
        if cls == Class.STX:
            if ins.opcode & 0xE0 == Mode.ATOMIC:
                loaded = X if ins.opcode & 0x18 == Size.DW else SCALAR
                if ins.imm == AtomicOp.CMPXCHG:
                    regs[0] = loaded
                elif ins.imm & FETCH:
                    regs[ins.src] = loaded
            return [(nxt, tuple(regs))]
        # jumps
        if op == JmpOp.EXIT:
            return []
        if op == JmpOp.CALL:
            if ins.src == PSEUDO_CALL:
                callee: list[Value] = [None] * 11
                for r in range(1, 6):
                    v = st[r]
                    callee[r] = ("stk", None) if v is not None and v[0] == "stk" else v
                callee[10] = ("stk", 0)
                regs[0] = X
                for r in range(1, 6):
                    regs[r] = None
                return [(nxt, tuple(regs)), (pc + 1 + ins.imm, tuple(callee))]
            if ins.src == PSEUDO_KFUNC_CALL:
                regs[0] = KCTX
                for r in range(1, 6):
                    regs[r] = None
                return [(nxt, tuple(regs))]
            spec = HELPERS[ins.imm]
            if ins.imm == Helper.skb_pull_data:
                # the packet may have moved: no earlier data_end comparison holds any more
                regs = [_pkt(v[1]) if v is not None and v[0] == "pkt" else v for v in regs]
            if spec.returns_map_value:
                m = st[1]
                regs[0] = ("mvn", m[1] if m is not None and m[0] == "map" else -1)
            else:
                regs[0] = SCALAR
            for r in range(1, 6):
                regs[r] = None
            return [(nxt, tuple(regs))]
        t = jump_target(pc, ins)
        assert t is not None
        if op == JmpOp.JA:
            return [(t, st)]
        bits = 64 if cls == Class.JMP else 32
        d = st[ins.dst]
        s: Value = (
            st[ins.src]
            if ins.opcode & 0x08
            else (
                "s",
                imm64(ins.imm) if bits == 64 else ins.imm & M32,
            )
        )
        dc, sc = _const(d), _const(s)
        if dc is not None and sc is not None:
            return [(t, st)] if jmp(op, dc, sc, bits) else [(nxt, st)]
        if ins.opcode & 0x08 and ins.src == ins.dst and op in _SELF_CMP and d is not None:
            return [(t, st)] if _SELF_CMP[op] else [(nxt, st)]
        if sc is not None and d is not None and d[0] in ("s", "x") and not ins.opcode & 0x08:
            always = _decided(op, sc, bits)
            if always is not None:
                return [(t, st)] if always else [(nxt, st)]
        if bits == 64 and ins.opcode & 0x08 and d is not None and s is not None:
            learned = self.packet_check(op, d, s)
            if learned is not None:
                branch, rng = learned
                good = [
                    _pkt(v[1], max(_range(v), rng))
                    if v is not None and v[0] == "pkt" and v[1] is not None
                    else v
                    for v in st
                ]
                return [(nxt, tuple(good if branch == "fall" else st)),
                        (t, tuple(good if branch == "taken" else st))]  # fmt: skip
        taken_regs, fall_regs = list(st), list(st)
        if (
            d is not None
            and d[0] == "mvn"
            and not ins.opcode & 0x08
            and ins.imm == 0
            and op in (JmpOp.JEQ, JmpOp.JNE)
        ):
            null, nonnull = ("s", 0), ("mv", d[1])
            taken_regs[ins.dst], fall_regs[ins.dst] = (
                (null, nonnull) if op == JmpOp.JEQ else (nonnull, null)
            )
        elif d == SCALAR and bits == 64 and s is not None and s[0] == "s" and s[1] is not None:
            if op == JmpOp.JEQ:
                taken_regs[ins.dst] = s
            elif op == JmpOp.JNE:
                fall_regs[ins.dst] = s
        return [(nxt, tuple(fall_regs)), (t, tuple(taken_regs))]

    @staticmethod
    def packet_check(op: int, d: Value, s: Value) -> tuple[str, int] | None:
        """What a 64-bit comparison of registers ``d`` and ``s`` proves of the packet: the
        branch ("fall" or "taken") where the bytes before a constant-offset packet pointer
        are present, and how many; None if it proves nothing."""
        assert d is not None
        assert s is not None
        if d[0] == "pkt" and s == END:
            ptr, left = d, True
        elif d == END and s[0] == "pkt":
            ptr, left = s, False
        else:
            return None
        rule = _PKT_CMP.get((JmpOp(op), left)) if op in _PKT_CMP_OPS else None
        off = ptr[1]
        if rule is None or not isinstance(off, int):
            return None
        branch, open_right = rule
        if off < 0 or (off == 0 and open_right) or off > MAX_PACKET_OFF:
            return None
        return branch, off + open_right

    def alu_value(self, ins: Instruction, st: State, bits: int) -> Value:
        op = ins.opcode & 0xF0
        d = st[ins.dst]
        if op in (AluOp.END, AluOp.NEG):
            if d is not None and d[0] == "s" and d[1] is not None:
                c = _i(d)
                if op == AluOp.NEG:
                    return ("s", (-c) & (M64 if bits == 64 else M32))
                return ("s", end(bool(ins.opcode & 0x08), bits == 64, c, ins.imm))
            return SCALAR if d is None or d[0] == "s" else X
        s: Value = (
            st[ins.src]
            if ins.opcode & 0x08
            else (
                "s",
                imm64(ins.imm) if bits == 64 else ins.imm & M32,
            )
        )
        if op == AluOp.MOV:
            if bits == 64 and ins.off == 0:
                return s
            if s is not None and s[0] == "s" and s[1] is not None:
                return ("s", alu(op, 0, _i(s), ins.off, bits))
            return SCALAR
        if d is None or s is None:
            return X
        kd, ks = d[0], s[0]
        if kd == "s" and ks == "s":
            if d[1] is not None and s[1] is not None:
                return ("s", alu(op, _i(d), _i(s), ins.off, bits))
            return SCALAR
        if bits == 64 and op in (AluOp.ADD, AluOp.SUB):
            # A constant keeps a packet pointer's range; a variable gives a new pointer with
            # none (the kernel gives it a new id).
            if kd == "stk" and ks == "s":
                if d[1] is None or s[1] is None:
                    return (kd, None)
                c = sext(_i(s), 64)
                return (kd, _i(d) + (c if op == AluOp.ADD else -c))
            if kd == "pkt" and ks == "s":
                if d[1] is None or s[1] is None:
                    return _pkt(None)
                c = sext(_i(s), 64)
                return _pkt(_i(d) + (c if op == AluOp.ADD else -c), _range(d))
            if op == AluOp.ADD and ks == "stk" and kd == "s":
                if d[1] is None or s[1] is None:
                    return (ks, None)
                return (ks, _i(s) + sext(_i(d), 64))
            if op == AluOp.ADD and ks == "pkt" and kd == "s":
                if d[1] is None or s[1] is None:
                    return _pkt(None)
                return _pkt(_i(s) + sext(_i(d), 64), _range(s))
            if kd == "mv" and ks == "s":
                return d
            if op == AluOp.SUB and kd == ks and kd in ("pkt", "stk"):
                return SCALAR
        if bits == 32 and kd != "x" and ks != "x":
            return SCALAR
        return X

    def analyse(self) -> dict[int, State]:
        init: list[Value] = [None] * 11
        init[1] = CTX
        init[10] = ("stk", 0)
        states: dict[int, State] = {0: tuple(init)}
        work = [0]
        while work:
            pc = work.pop()
            if pc in self.bad:
                continue  # refused if reached: nothing after it matters
            for succ, nst in self.successors(pc, states[pc]):
                old = states.get(succ)
                new = (
                    nst
                    if old is None
                    else tuple(self.join(a, b) for a, b in zip(old, nst, strict=True))
                )
                if new != old:
                    states[succ] = new
                    work.append(succ)
        return states

    # ------------------------------------------------------------------ pass 4

    def reads(self, ins: Instruction) -> list[int]:
        cls, op = ins.opcode & 0x07, ins.opcode & 0xF0
        x = bool(ins.opcode & 0x08)
        if cls in (Class.ALU, Class.ALU64):
            if op in (AluOp.END, AluOp.NEG):
                return [ins.dst]
            return ([ins.src] if x else []) + ([] if op == AluOp.MOV else [ins.dst])
        if ins.opcode == LD_IMM64:
            return []
        if cls == Class.LDX:
            return [ins.src]
        if cls == Class.ST:
            return [ins.dst]
        if cls == Class.STX:
            extra = [0] if ins.opcode & 0xE0 == Mode.ATOMIC and ins.imm == AtomicOp.CMPXCHG else []
            return [ins.dst, ins.src, *extra]
        if op == JmpOp.EXIT:
            return [0]
        if op == JmpOp.CALL:
            if ins.src == PSEUDO_KFUNC_CALL:
                return [1]
            return [] if ins.src else list(range(1, len(HELPERS[ins.imm].args) + 1))
        if op == JmpOp.JA:
            return []
        return [ins.dst, ins.src] if x else [ins.dst]

    def check_states(self, states: dict[int, State], funcs: list[int]) -> None:
        for pc, ins in self.placed:
            st = states.get(pc)
            if st is None:
                continue  # dead on every path once constants are known
            for r in self.reads(ins):
                if st[r] is None:
                    raise self.fail(
                        errno.EACCES,
                        pc,
                        f"R{r:d} !read_ok (read of a register never written on this path)",
                    )
            cls, op = ins.opcode & 0x07, ins.opcode & 0xF0
            if cls in (Class.LDX, Class.ST, Class.STX):
                self.check_mem(pc, ins, st)
            elif cls in (Class.ALU, Class.ALU64):
                self.track_alu(ins, st)
            elif cls in (Class.JMP, Class.JMP32):
                if op == JmpOp.CALL and not ins.src:
                    self.check_call(pc, ins, st)
                elif op == JmpOp.CALL and ins.src == PSEUDO_KFUNC_CALL:
                    v = st[1]
                    if v is None or v[0] not in ("ctx", "x"):
                        raise self.fail(
                            errno.EACCES,
                            pc,
                            f"R1 type={tname(v)} expected=ctx for bpf_cast_to_kern_ctx",
                        )
                elif op == JmpOp.EXIT:
                    if st[0] is not None and st[0][0] in ("pkt", "end"):
                        self.pkt_unknown = True
                elif op not in (JmpOp.JA, JmpOp.CALL):
                    self.track_cmp(ins, st)
        del funcs

    def check_mem(self, pc: int, ins: Instruction, st: State) -> None:
        cls = ins.opcode & 0x07
        size = _SIZES[Size(ins.opcode & 0x18)]
        atomic = cls == Class.STX and ins.opcode & 0xE0 == Mode.ATOMIC
        write = cls != Class.LDX
        reg = ins.src if cls == Class.LDX else ins.dst
        v = st[reg]
        assert v is not None
        k = v[0]
        if cls == Class.STX:
            sv = st[ins.src]
            if sv is not None and sv[0] in ("pkt", "end"):
                self.pkt_unknown = True  # a packet pointer spilled to memory
        if write and not atomic and k in ("pkt", "x") and self.pt in PACKET_WRITERS:
            self.packet_writes = True  # a store the analysis cannot place may hit the packet
        if k == "mvn" and self.array_value(v):
            pass  # the kernel proves a constant in-range key non-NULL; a NULL faults at run time
        elif k in ("s", "mvn", "map", "end"):
            raise self.fail(errno.EACCES, pc, f"R{reg:d} invalid mem access '{tname(v)}'")
        if k == "ctx":
            if atomic:
                raise self.fail(
                    errno.EACCES, pc, f"BPF_ATOMIC stores into R{reg:d} ctx is not allowed"
                )
            # BPF_ST into the context is allowed since Linux 6.3, like BPF_STX
            acc = self.table.get((ins.off, size, write))
            sx = cls == Class.LDX and ins.opcode & 0xE0 == Mode.MEMSX
            if acc is None or (sx and acc.kind != "field"):  # no sign-extended pointers
                raise self.fail(
                    errno.EACCES, pc, describe_access(self.pt, ins.off, size, write=write)
                )
        elif k == "kctx":
            if write:
                raise self.fail(
                    errno.EACCES, pc, f"R{reg:d} is a kernel sk_buff: only reads are allowed"
                )
            if size != 4 or ins.off not in kern_ctx_fields():
                raise self.fail(
                    errno.EACCES,
                    pc,
                    f"read of {size} bytes at offset {ins.off} of the kernel sk_buff is not "
                    "modelled by the userspace VM (only the strparser full_len and offset)",
                )
        elif k == "pkt":
            if write:
                self.check_packet_write(pc, ins, reg, v, size, atomic=atomic)
            if v[1] is None:
                self.pkt_unknown = True
            else:
                self.cands.append(_i(v) + ins.off + size - 1)
        elif k == "stk" and v[1] is not None:
            o = _i(v) + ins.off
            if o < -STACK_SIZE or o + size > 0:
                raise self.fail(errno.EACCES, pc, f"invalid stack off={o} size={size}")

    def check_packet_write(
        self, pc: int, ins: Instruction, reg: int, v: Value, size: int, *, atomic: bool
    ) -> None:
        """A store into the packet: only where the kernel allows one (program type, no
        atomics, inside the range a data_end comparison proved)."""
        assert v is not None
        if self.pt not in PACKET_WRITERS:
            raise self.fail(
                errno.EACCES, pc, f"cannot write into packet (R{reg:d} in a {self.pt.name} program)"
            )
        if atomic:
            raise self.fail(errno.EACCES, pc, f"BPF_ATOMIC stores into R{reg:d} pkt is not allowed")
        base = v[1]
        if not isinstance(base, int):
            return  # a variable offset: checked at run time
        off, rng = base + ins.off, _range(v)
        if off < 0 or off + size > rng:
            raise self.fail(
                errno.EACCES,
                pc,
                f"invalid access to packet, off={off} size={size}, R{reg:d}(off={base},r={rng}): "
                f"R{reg:d} offset is outside of the packet (a direct packet write needs a "
                "data_end comparison that covers it)",
            )

    def array_value(self, v: Value) -> bool:
        """Whether a map_value_or_null comes from an ARRAY map: the kernel (6.14+) drops the
        NULL of a lookup with a constant in-range key, which this analysis does not track."""
        assert v is not None
        idx = v[1]
        return (
            isinstance(idx, int)
            and 0 <= idx < len(self.maps)
            and (self.maps[idx].map_type == MapType.ARRAY)
        )

    def track_alu(self, ins: Instruction, st: State) -> None:
        op, bits = ins.opcode & 0xF0, 64 if ins.opcode & 0x07 == Class.ALU64 else 32
        vals = [st[ins.dst]] if op in (AluOp.END, AluOp.NEG) else []
        if op not in (AluOp.END, AluOp.NEG):
            if ins.opcode & 0x08:
                vals.append(st[ins.src])
            if op != AluOp.MOV:
                vals.append(st[ins.dst])
        kinds = {v[0] for v in vals if v is not None}
        if "end" in kinds and not (op == AluOp.MOV and bits == 64 and ins.off == 0):
            self.pkt_unknown = True
        if "pkt" in kinds:
            result = self.alu_value(ins, st, bits)
            pointer_diff = op == AluOp.SUB and bits == 64
            if (
                result is None
                or result[0] not in ("pkt", "s")
                or (result[0] == "s" and not pointer_diff)
            ):
                self.pkt_unknown = True

    def track_cmp(self, ins: Instruction, st: State) -> None:
        if not ins.opcode & 0x08:
            return
        a, b = st[ins.dst], st[ins.src]
        if a is None or b is None or END not in (a, b):
            return
        other = b if a == END else a
        if other[0] == "pkt" and other[1] is not None:
            self.cands.append(_i(other) - 1)
        else:
            self.pkt_unknown = True

    def check_call(self, pc: int, ins: Instruction, st: State) -> None:
        spec = HELPERS[ins.imm]
        name = f"{spec.helper.name}#{ins.imm}"
        for i, kind in enumerate(spec.args, 1):
            v = st[i]
            assert v is not None
            k = v[0]
            if k in ("pkt", "end"):
                self.pkt_unknown = True
            ok = {
                "map": k in ("map", "x"),
                "ctx": k in ("ctx", "x"),
                "ptr": k in ("stk", "pkt", "mv", "x"),
                "int": True,
                "size": k in ("s", "x"),
            }[kind]
            if not ok:
                expected = {
                    "map": "map_ptr",
                    "ctx": "ctx",
                    "ptr": "pointer to memory",
                    "size": "scalar",
                }
                raise self.fail(
                    errno.EACCES, pc, f"R{i} type={tname(v)} expected={expected[kind]} for {name}"
                )
            if kind == "map" and k == "map" and spec.map_types:
                m = self.maps[_i(v)]
                if m.map_type not in spec.map_types:
                    raise self.fail(
                        errno.EINVAL, pc, f"cannot pass map_type {m.map_type} into func {name}"
                    )
        if ins.imm == Helper.skb_load_bytes:
            off, n = st[2], st[4]
            assert off is not None
            assert n is not None
            if n[0] == "s" and n[1] == 0:
                raise self.fail(errno.EACCES, pc, "R4 invalid zero-sized read for skb_load_bytes")
            if off[0] == "s" and off[1] is not None and n[0] == "s" and n[1] is not None:
                self.cands.append(_i(off) + _i(n) - 1)
            else:
                self.pkt_unknown = True
            dst = st[3]
            if dst is not None and dst[0] in ("pkt", "x") and self.pt in PACKET_WRITERS:
                self.packet_writes = True
        self.check_stack_arg(pc, ins, st)

    def check_stack_arg(self, pc: int, ins: Instruction, st: State) -> None:
        """Stack pointers passed as key/value/destination must cover the bytes used."""
        spec = HELPERS[ins.imm]
        sizes: dict[int, int] = {}
        m = st[1] if spec.args[:1] == ("map",) else st[2] if spec.args[1:2] == ("map",) else None
        mp = self.maps[_i(m)] if m is not None and m[0] == "map" else None
        if mp is not None:
            for i, kind in enumerate(spec.args, 1):
                if kind == "ptr":
                    sizes[i] = (
                        mp.value_size
                        if ins.imm == Helper.map_update_elem and i == 3
                        else mp.key_size
                    )
        if ins.imm == Helper.skb_load_bytes:
            n = st[4]
            if n is not None and n[0] == "s" and n[1] is not None:
                sizes[3] = _i(n) & M32
        for r, size in sizes.items():
            v = st[r]
            if v is not None and v[0] == "stk" and v[1] is not None:
                o = _i(v)
                if o < -STACK_SIZE or o + size > 0:
                    raise self.fail(
                        errno.EACCES,
                        pc,
                        f"invalid indirect access to stack R{r:d} off={o} size={size}",
                    )


def refusal(err: int, message: str) -> VerifierError:
    """A refusal that is not about one instruction (its log is the message)."""
    return VerifierError(err, message, log=message + "\n")


def validate(
    placed: list[tuple[int, Instruction]],
    n: int,
    pt: ProgType,
    resolve: Callable[[object], VmMap | None],
    max_insns: int,
) -> Checked:
    """Validate a laid-out program; raises :class:`VerifierError` naming pc and reason."""
    if pt not in ALLOWED:
        raise refusal(errno.EINVAL, f"program type {pt.name} is not supported by the userspace VM")
    if n == 0:
        raise refusal(errno.EINVAL, "the program has no instructions")
    if n > max_insns:
        raise refusal(
            errno.E2BIG, f"the program has {n} instructions, more than the limit of {max_insns}"
        )
    v = _Validator(placed, n, pt, resolve)
    for pc, ins in placed:
        try:
            v.check_insn(pc, ins)
        except VerifierError as exc:
            if exc.errno == errno.EBADF:
                raise  # the kernel resolves every map reference, reached or not
            v.bad[pc] = exc
    funcs, back = v.check_cfg()
    states = v.analyse()
    # Like the kernel, refuse a malformed instruction only where some path reaches it; one
    # on a path the analysis proved dead is never run: it becomes an exit.
    for pc in sorted(v.bad):
        if pc in states:
            raise v.bad[pc]
        dead = v.insns[pc]
        assert dead is not None
        v.insns[pc] = Instruction(LD_IMM64) if dead.slots == 2 else Instruction(EXIT)
    v.check_states(states, funcs)
    mpo = None if v.pkt_unknown else max(v.cands, default=-1)
    return Checked(
        insns=v.insns,
        maps=v.maps,
        map_index=v.map_index,
        states=states,
        funcs=funcs,
        back_edges=back,
        max_packet_offset=mpo,
        calls=len(funcs) > 1,
        packet_writes=v.packet_writes,
    )
