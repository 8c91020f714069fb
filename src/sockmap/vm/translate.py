"""The fast path: a validated program translated once into a Python function.

Registers become local variables and each instruction a line of Python specialised
for its operands. The code is a sequence of basic blocks guarded by ``if pc == N``
(inside ``while True`` only when the program jumps backwards). Memory accesses try
the region the validator expects (stack, packet, context field) with an inline bounds
check and otherwise fall back to the same checked ``Memory`` methods the interpreter
uses, so a wrong guess costs speed, never safety. The source is compiled and executed
in a namespace without builtins that holds only the few functions it calls.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from sockmap.abi import MapType, ProgType
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
)
from sockmap.errors import VmError
from sockmap.vm._semantics import M32, M64, alu, bswap, imm64
from sockmap.vm.context import access_table
from sockmap.vm.helpers import (
    DATA_MAPS,
    HELPERS,
    _cookie,
    _lookup,
    _redirect_map,
    fast_cookie,
    fast_lookup,
    fast_redirect_map,
    kfuncs,
)
from sockmap.vm.interp import budget_error, direct_value
from sockmap.vm.memory import CTX_BASE, FIRST_MAP_RID, PKT_BASE, STACK_SIZE, Memory, base
from sockmap.vm.validate import MAX_CALL_FRAMES, Checked, jump_target

__all__ = ["translate"]

_SIZE = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}
_FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}
_MASK = {1: 0xFF, 2: 0xFFFF, 4: M32, 8: M64}
_CMP = {
    JmpOp.JEQ: "==",
    JmpOp.JNE: "!=",
    JmpOp.JGT: ">",
    JmpOp.JGE: ">=",
    JmpOp.JLT: "<",
    JmpOp.JLE: "<=",
    JmpOp.JSGT: ">",
    JmpOp.JSGE: ">=",
    JmpOp.JSLT: "<",
    JmpOp.JSLE: "<=",
}
_SIGNED = frozenset({JmpOp.JSGT, JmpOp.JSGE, JmpOp.JSLT, JmpOp.JSLE})
_PY = {
    AluOp.ADD: "+",
    AluOp.SUB: "-",
    AluOp.MUL: "*",
    AluOp.OR: "|",
    AluOp.AND: "&",
    AluOp.XOR: "^",
}


def _budget(pc: int, budget: int) -> None:
    raise budget_error(pc, budget)


def _deep(pc: int) -> None:
    raise VmError(f"pc {pc}: call stack deeper than {MAX_CALL_FRAMES} frames")


class _Gen:
    def __init__(self, checked: Checked, pt: ProgType, budget: int) -> None:
        self.c = checked
        self.table = access_table(pt)
        self.budget = budget
        n = len(checked.insns)
        self.count = checked.back_edges or checked.calls or budget < n
        self.stack_rid = FIRST_MAP_RID + len(checked.maps)
        self.lines: list[str] = []

    # ------------------------------------------------------------------ structure

    def function(self, entry: int, stop: int) -> None:
        c = self.c
        main = entry == 0
        pcs = [pc for pc in range(entry, stop) if c.insns[pc] is not None]
        leaders = {entry}
        for pc in range(entry, stop):
            ins = c.insns[pc]
            if ins is None:
                continue
            t = jump_target(pc, ins)
            cls, op = ins.opcode & 0x07, ins.opcode & 0xF0
            if cls in (Class.JMP, Class.JMP32) and op != JmpOp.CALL:
                leaders.add(pc + 1)
                if t is not None:
                    leaders.add(t)
        blocks: list[list[int]] = []
        for pc in pcs:
            if pc in leaders or not blocks:
                blocks.append([pc])
            else:
                blocks[-1].append(pc)
        loop = c.back_edges
        w = self.lines.append
        if main:
            w("def run(M, C):")
            w(f"    SB = {base(self.stack_rid)}")
            w("    S = M.stack")
            w(f"    r1 = {CTX_BASE}")
            w(f"    r10 = {base(self.stack_rid) + STACK_SIZE}")
            w("    r0 = r2 = r3 = r4 = r5 = r6 = r7 = r8 = r9 = steps = depth = 0")
        else:
            w(f"def f{entry}(M, C, r1, r2, r3, r4, r5, steps, depth):")
            w("    r10, S = M.new_stack(depth)")
            w(f"    SB = r10 - {STACK_SIZE}")
            w("    r0 = r6 = r7 = r8 = r9 = 0")
        w("    D = M.data")
        w("    DL = M.dlen")
        w("    L = M.length")
        w(f"    DE = {PKT_BASE} + DL")
        w(f"    pc = {entry}")
        ind = "    "
        if loop:
            w("    while True:")
            ind = "        "
        ret = "return r0" if main else "return r0, steps"
        for bi, block in enumerate(blocks):
            start = block[0]
            guarded = loop or bi > 0
            bind = ind + "    " if guarded else ind
            if guarded:
                w(f"{ind}if pc == {start}:")
            if self.count:
                w(f"{bind}steps += {len(block)}")
                w(f"{bind}if steps > {self.budget}:")
                w(f"{bind}    _budget({start}, {self.budget})")
            last = block[-1]
            for pc in block[:-1]:
                for line in self.insn(pc):
                    w(bind + line)
            ins = c.insns[last]
            assert ins is not None
            cls, op = ins.opcode & 0x07, ins.opcode & 0xF0
            nxt = last + ins.slots
            if cls in (Class.JMP, Class.JMP32) and op == JmpOp.EXIT:
                w(f"{bind}{ret}")
            elif cls in (Class.JMP, Class.JMP32) and op == JmpOp.JA:
                t = jump_target(last, ins)
                assert t is not None
                w(f"{bind}pc = {t}")
                if t <= start:
                    w(f"{bind}continue")
            elif cls in (Class.JMP, Class.JMP32) and op != JmpOp.CALL:
                t = jump_target(last, ins)
                assert t is not None
                cond = self.cond(ins)
                if t <= start:
                    w(f"{bind}if {cond}:")
                    w(f"{bind}    pc = {t}")
                    w(f"{bind}    continue")
                    w(f"{bind}pc = {nxt}")
                else:
                    w(f"{bind}pc = {t} if {cond} else {nxt}")
            else:
                for line in self.insn(last):
                    w(bind + line)
                w(f"{bind}pc = {nxt}")
        if not loop:
            w(f"    {ret}")  # unreachable once validated; keeps the function total

    # ------------------------------------------------------------------ instructions

    def cond(self, ins: Instruction) -> str:
        cls, op = ins.opcode & 0x07, ins.opcode & 0xF0
        bits = 64 if cls == Class.JMP else 32
        x = bool(ins.opcode & 0x08)
        if bits == 64:
            a = f"r{ins.dst:d}"
            b = f"r{ins.src:d}" if x else str(imm64(ins.imm))
            sign = 1 << 63
        else:
            a = f"(r{ins.dst:d} & {M32})"
            b = f"(r{ins.src:d} & {M32})" if x else str(ins.imm & M32)
            sign = 1 << 31
        if op == JmpOp.JSET:
            return f"{a} & {b}"
        sym = _CMP[JmpOp(op)]
        if op in _SIGNED:
            bs = f"({b} ^ {sign})" if x else str(int(b) ^ sign)
            return f"({a} ^ {sign}) {sym} {bs}"
        return f"{a} {sym} {b}"

    def insn(self, pc: int) -> list[str]:
        ins = self.c.insns[pc]
        assert ins is not None
        cls = ins.opcode & 0x07
        if cls in (Class.ALU, Class.ALU64):
            return [f"r{ins.dst:d} = {self.alu(ins)}"]
        if ins.opcode == LD_IMM64:
            if ins.src == PSEUDO_MAP_FD:
                return [f"r{ins.dst:d} = {base(FIRST_MAP_RID + self.c.map_index[pc])}"]
            if ins.src == PSEUDO_MAP_VALUE:
                idx = self.c.map_index[pc]
                return [f"r{ins.dst:d} = _mapval(M, {idx}, {pc}) + {ins.map_offset}"]
            return [f"r{ins.dst:d} = {ins.imm & M64}"]
        if cls == Class.LDX:
            return self.load(pc, ins)
        if cls in (Class.ST, Class.STX):
            return self.store(pc, ins)
        op = ins.opcode & 0xF0
        assert op == JmpOp.CALL
        if ins.src == PSEUDO_CALL:
            t = pc + 1 + ins.imm
            return [
                f"if depth + 1 >= {MAX_CALL_FRAMES}:",
                f"    _deep({pc})",
                f"r0, steps = f{t}(M, C, r1, r2, r3, r4, r5, steps, depth + 1)",
            ]
        kind = "k" if ins.src == PSEUDO_KFUNC_CALL else "h"
        general = f"_{kind}{ins.imm}(M, r1, r2, r3, r4, r5, {pc})"
        if kind == "h" and (fast := self.fast_call(pc, ins.imm)) is not None:
            guard, call = fast
            return [f"r0 = {call} if {guard} else {general}"]
        return [f"r0 = {general}"]

    def fast_call(self, pc: int, hid: int) -> tuple[str, str] | None:
        """A guarded direct call for the helpers every datapath program makes, when the
        validator's state at ``pc`` shows their arguments (see ``helpers.fast_*``)."""
        spec = HELPERS.get(hid)
        if spec is None:
            return None
        fn = spec.fn
        if fn is _cookie:
            return f"r1 == {CTX_BASE}", f"_fcookie(M, {pc})"
        map_reg = 1 if fn is _lookup else 2 if fn is _redirect_map else 0
        if not map_reg:
            return None
        kind, idx = self._guess(pc, map_reg)
        if kind != "map" or idx is None or not 0 <= idx < len(self.c.maps):
            return None
        m = self.c.maps[idx]
        mp = base(FIRST_MAP_RID + idx)
        if fn is _redirect_map:
            if m.map_type != MapType.SOCKMAP:
                return None
            return f"r1 == {CTX_BASE} and r2 == {mp}", f"_fredirect(M, {idx}, r3, r4, {pc})"
        if m.map_type not in DATA_MAPS:
            return None
        kind, aux = self._guess(pc, 2)
        if kind != "stk" or aux is None or not 0 <= STACK_SIZE + aux <= STACK_SIZE - m.key_size:
            return None
        o = STACK_SIZE + aux
        return f"r1 == {mp} and r2 == SB + {o}", f"_flookup(M, {idx}, S, {o})"

    def alu(self, ins: Instruction) -> str:
        cls, op = ins.opcode & 0x07, ins.opcode & 0xF0
        bits = 64 if cls == Class.ALU64 else 32
        mask = M64 if bits == 64 else M32
        a = f"r{ins.dst:d}"
        if op == AluOp.NEG:
            return f"(-{a}) & {mask}"
        if op == AluOp.END:
            w = ins.imm
            if not (bits == 64 or ins.opcode & 0x08):
                return a if w == 64 else f"{a} & {(1 << w) - 1}"
            if w == 16:
                return f"(({a} & 255) << 8) | (({a} >> 8) & 255)"
            return f"_bswap({a}, {w})"
        x = bool(ins.opcode & 0x08)
        konst = imm64(ins.imm) if bits == 64 else ins.imm & M32
        b = f"r{ins.src:d}" if x else str(konst)
        if op == AluOp.MOV:
            if ins.off:
                if not x:
                    return str(alu(op, 0, konst, ins.off, bits))
                s = 1 << (ins.off - 1)
                return f"((({b} & {(1 << ins.off) - 1}) ^ {s}) - {s}) & {mask}"
            return b if bits == 64 or not x else f"{b} & {M32}"
        if op in _PY:
            e = f"{a} {_PY[AluOp(op)]} {b}"
            if op in (AluOp.OR, AluOp.AND, AluOp.XOR) and bits == 64:
                return e
            return f"({e}) & {mask}"
        am = a if bits == 64 else f"({a} & {M32})"
        bm = b if bits == 64 or not x else f"({b} & {M32})"
        sh = bits - 1
        if op == AluOp.LSH:
            return f"({a} << ({bm} & {sh})) & {mask}" if x else f"({a} << {konst & sh}) & {mask}"
        if op == AluOp.RSH:
            return f"{am} >> ({bm} & {sh})" if x else f"{am} >> {konst & sh}"
        if op == AluOp.ARSH:
            s = 1 << sh
            n = f"({bm} & {sh})" if x else str(konst & sh)
            return f"((({am} ^ {s}) - {s}) >> {n}) & {mask}"
        if ins.off == 1 or op not in (AluOp.DIV, AluOp.MOD):  # sdiv/smod
            return f"_alu({op}, {a}, {b}, {ins.off}, {bits})"
        if op == AluOp.DIV:
            if not x:
                return f"{am} // {konst}" if konst else "0"
            return f"({am} // {bm} if {bm} else 0)"
        if not x:
            return f"{am} % {konst}" if konst else am
        return f"({am} % {bm} if {bm} else {am})"

    def _guess(self, pc: int, reg: int) -> tuple[str, int | None]:
        st = self.c.states.get(pc)
        v = None if st is None else st[reg]
        if v is None:
            return "x", None
        aux = v[1] if len(v) > 1 and isinstance(v[1], int) else None
        return str(v[0]), aux

    def load(self, pc: int, ins: Instruction) -> list[str]:
        size = _SIZE[ins.opcode & 0x18]
        r, d, off = f"r{ins.src:d}", f"r{ins.dst:d}", ins.off
        generic = f"M.load(({r} + {off}) & {M64}, {size}, {pc})"
        kind, aux = self._guess(pc, ins.src)
        u = f"_u{size}"
        if kind == "stk" and aux is not None and 0 <= STACK_SIZE + aux + off <= STACK_SIZE - size:
            o = STACK_SIZE + aux + off
            expr = f"{u}(S, {o})[0] if {r} == SB + {STACK_SIZE + aux} else {generic}"
            lines = [f"v = {expr}"]
        elif kind == "stk":
            lines = [
                f"o = {r} + {off} - SB",
                f"v = {u}(S, o)[0] if 0 <= o <= {STACK_SIZE - size} else {generic}",
            ]
        elif kind == "pkt" and aux is not None and aux + off >= 0:
            o = aux + off
            lines = [
                f"v = {u}(D, {o})[0] if {r} == {PKT_BASE + aux} and DL >= {o + size} else {generic}"
            ]
        elif kind == "pkt":
            lines = [
                f"o = {r} + {off - PKT_BASE}",
                f"v = {u}(D, o)[0] if 0 <= o <= DL - {size} else {generic}",
            ]
        elif kind == "ctx" and (acc := self.table.get((off, size, False))) is not None:
            if acc.kind == "data_end":
                expr = "DE"
            elif acc.kind != "field":
                expr = str(PKT_BASE)
            elif len(acc.parts) == 1:
                attr, index, esize, lo, hi, _ = acc.parts[0]
                src = (
                    "L"
                    if attr in ("len", "size")
                    else f"C.{attr}" + (f"[{index}]" if index >= 0 else "")
                )
                expr = f"({src} & {(1 << (8 * esize)) - 1})"
                if lo or hi != esize:
                    expr = f"(({expr} >> {8 * lo}) & {(1 << (8 * (hi - lo))) - 1})"
            else:
                expr = f"M.ctx_load({off}, {size}, {pc})"
            lines = [f"v = {expr} if {r} == {CTX_BASE} else {generic}"]
        else:
            lines = [f"v = {generic}"]
        if ins.opcode & 0xE0 == Mode.MEMSX:
            s = 1 << (8 * size - 1)
            lines.append(f"{d} = (((v & {_MASK[size]}) ^ {s}) - {s}) & {M64}")  # v may be a pointer
        else:
            lines.append(f"{d} = v")
        return lines

    def store(self, pc: int, ins: Instruction) -> list[str]:
        size = _SIZE[ins.opcode & 0x18]
        r, off = f"r{ins.dst:d}", ins.off
        addr = f"({r} + {off}) & {M64}"
        if ins.opcode & 0xE0 == Mode.ATOMIC:
            call = f"M.atomic({addr}, {size}, {ins.imm}, r{ins.src:d}, r0, {pc})"
            if ins.imm == AtomicOp.CMPXCHG:
                return [f"r0 = {call}[1]"]
            if ins.imm & FETCH:
                return [f"r{ins.src:d} = {call}[0]"]
            return [call]
        value = f"r{ins.src:d}" if ins.opcode & 0x07 == Class.STX else str(imm64(ins.imm))
        generic = f"M.store({addr}, {size}, {value}, {pc})"
        kind, aux = self._guess(pc, ins.dst)
        masked = (
            value
            if value.isdigit() and size == 8
            else (str(int(value) & _MASK[size]) if value.isdigit() else f"{value} & {_MASK[size]}")
        )
        p = f"_p{size}"
        if kind == "stk" and aux is not None and 0 <= STACK_SIZE + aux + off <= STACK_SIZE - size:
            o = STACK_SIZE + aux + off
            return [
                f"if {r} == SB + {STACK_SIZE + aux}:",
                f"    {p}(S, {o}, {masked})",
                "else:",
                f"    {generic}",
            ]
        if kind == "stk":
            return [
                f"o = {r} + {off} - SB",
                f"if 0 <= o <= {STACK_SIZE - size}:",
                f"    {p}(S, o, {masked})",
                "else:",
                f"    {generic}",
            ]
        if kind == "pkt" and self.c.packet_writes:  # D is writable then (see Memory)
            if aux is not None and aux + off >= 0:
                o = aux + off
                return [
                    f"if {r} == {PKT_BASE + aux} and DL >= {o + size}:",
                    f"    {p}(D, {o}, {masked})",
                    "else:",
                    f"    {generic}",
                ]
            return [
                f"o = {r} + {off - PKT_BASE}",
                f"if 0 <= o <= DL - {size}:",
                f"    {p}(D, o, {masked})",
                "else:",
                f"    {generic}",
            ]
        return [generic]


def _namespace() -> dict[str, Any]:
    ns: dict[str, Any] = {"__builtins__": {}}
    for size, fmt in _FMT.items():
        st = struct.Struct("<" + fmt)
        ns[f"_u{size}"] = st.unpack_from
        ns[f"_p{size}"] = st.pack_into
    ns["_alu"] = alu
    ns["_bswap"] = bswap
    ns["_budget"] = _budget
    ns["_deep"] = _deep
    ns["_mapval"] = direct_value
    ns["_flookup"] = fast_lookup
    ns["_fcookie"] = fast_cookie
    ns["_fredirect"] = fast_redirect_map
    for hid, spec in HELPERS.items():
        ns[f"_h{hid}"] = spec.fn
    for kid, fn in kfuncs().items():
        ns[f"_k{kid}"] = fn
    return ns


def translate(
    checked: Checked, pt: ProgType, budget: int, name: str = ""
) -> tuple[Callable[[Memory, object], int], str]:
    """The specialised function ``run(M, C) -> r0`` for a validated program, and its source."""
    gen = _Gen(checked, pt, budget)
    funcs = checked.funcs
    bounds = [*funcs[1:], len(checked.insns)]
    for entry, stop in zip(funcs, bounds, strict=True):
        gen.function(entry, stop)
        gen.lines.append("")
    source = "\n".join(gen.lines)
    ns = _namespace()
    code = compile(source, f"<bpf {name or 'prog'}>", "exec")
    exec(code, ns)  # noqa: S102 - our own generated code, run without builtins
    fn: Callable[[Memory, object], int] = ns["run"]
    return fn, source
