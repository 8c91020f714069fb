"""Text to :class:`~sockmap.asm.Program`: reads back what :func:`disassemble` prints.

Accepts the disassembler's forms with or without the ``pc:`` prefix, ``name:`` label
lines, symbolic jump targets (``goto out``) and ``;`` or ``//`` comments.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from sockmap.abi.enums import Helper
from sockmap.asm import instruction as ins
from sockmap.asm.instruction import Instruction, Item, Label, Operand, Target
from sockmap.asm.opcodes import PSEUDO_KFUNC_CALL, Class, JmpOp, Reg, Size
from sockmap.asm.program import Program
from sockmap.errors import AssemblyError

__all__ = ["assemble"]

_NAME = r"[A-Za-z_.][A-Za-z0-9_.]*"
_NUM = r"-?(?:0x[0-9a-fA-F]+|\d+)"
_TARGET = rf"(?:pc(?P<delta>[+-]\d+)(?:\s+<(?P<tname>{_NAME})>)?|(?P<label>{_NAME}))"
_MEMREF = r"\((?P<sign>[us])(?P<bits>8|16|32|64) \*\)\(r(?P<base>\d+) (?P<off>[+-]\d+)\)"

_BITS = {8: Size.B, 16: Size.H, 32: Size.W, 64: Size.DW}
_ALU_OPS: dict[str, tuple[Callable[[Reg, Operand], Instruction], ...]] = {
    "=": (ins.mov, ins.mov32),
    "+=": (ins.add, ins.add32),
    "-=": (ins.sub, ins.sub32),
    "*=": (ins.mul, ins.mul32),
    "/=": (ins.div, ins.div32),
    "s/=": (ins.sdiv, ins.sdiv32),
    "|=": (ins.or_, ins.or32),
    "&=": (ins.and_, ins.and32),
    "<<=": (ins.lsh, ins.lsh32),
    ">>=": (ins.rsh, ins.rsh32),
    "%=": (ins.mod, ins.mod32),
    "s%=": (ins.smod, ins.smod32),
    "^=": (ins.xor, ins.xor32),
    "s>>=": (ins.arsh, ins.arsh32),
}
_JMP_OPS: dict[str, tuple[Callable[[Reg, Operand, Target], Instruction], ...]] = {
    "==": (ins.jeq, ins.jeq32),
    "!=": (ins.jne, ins.jne32),
    ">": (ins.jgt, ins.jgt32),
    ">=": (ins.jge, ins.jge32),
    "<": (ins.jlt, ins.jlt32),
    "<=": (ins.jle, ins.jle32),
    "&": (ins.jset, ins.jset32),
    "s>": (ins.jsgt, ins.jsgt32),
    "s>=": (ins.jsge, ins.jsge32),
    "s<": (ins.jslt, ins.jslt32),
    "s<=": (ins.jsle, ins.jsle32),
}
_ATOMIC_OPS = {
    "+=": ins.atomic_add,
    "|=": ins.atomic_or,
    "&=": ins.atomic_and,
    "^=": ins.atomic_xor,
}
_ATOMIC_NAMES = {
    "add": ins.atomic_add,
    "or": ins.atomic_or,
    "and": ins.atomic_and,
    "xor": ins.atomic_xor,
}

_RE_LABEL = re.compile(rf"(?P<name>{_NAME}):")
_RE_RAW = re.compile(
    rf"\.insn op=(?P<op>{_NUM}) dst=(?P<dst>\d+) src=(?P<src>\d+) "
    rf"off=(?P<off>{_NUM}) imm=(?P<imm>{_NUM})"
)
_RE_CALL = re.compile(
    rf"call (?:kfunc#(?P<kid>\d+)|pc(?P<delta>[+-]\d+)(?:\s+<(?P<tname>{_NAME})>)?"
    rf"|(?P<h>{_NAME})?#(?P<id>\d+)|(?P<hname>{_NAME})|(?P<num>\d+))"
)
_RE_GOTO = re.compile(rf"(?P<op>gotol?) {_TARGET}")
_RE_IF = re.compile(
    rf"if (?P<p>[rw])(?P<dst>\d+) (?P<op>[s]?[<>]=?|==|!=|&) "
    rf"(?:(?P<sp>[rw])(?P<src>\d+)|(?P<imm>{_NUM})) goto {_TARGET}"
)
_RE_LOCK = re.compile(rf"lock \*{_MEMREF} (?P<op>[+|&^]=) (?P<p>[rw])(?P<src>\d+)")
_RE_FETCH = re.compile(
    rf"(?P<p>[rw])(?P<dst>\d+) = atomic(?P<w>64)?_(?P<kind>fetch_(?P<op>add|or|and|xor)|xchg)"
    rf"\({_MEMREF}, (?P<sp>[rw])(?P<src>\d+)\)"
)
_RE_CMPXCHG = re.compile(
    rf"(?P<p>[rw])0 = atomic(?P<w>64)?_cmpxchg\({_MEMREF}, [rw]0, (?P<sp>[rw])(?P<src>\d+)\)"
)
_RE_STORE = re.compile(rf"\*{_MEMREF} = (?:r(?P<src>\d+)|(?P<imm>{_NUM}))")
_RE_LOAD = re.compile(rf"r(?P<dst>\d+) = \*{_MEMREF}")
_RE_MAP = re.compile(r"r(?P<dst>\d+) = map\[(?P<ref>[^\]]+)\](?:\[0\]\+(?P<voff>\d+))?")
_RE_IMM64 = re.compile(rf"r(?P<dst>\d+) = (?P<imm>{_NUM}) ll")
_RE_MOVSX = re.compile(r"(?P<p>[rw])(?P<dst>\d+) = \(s(?P<bits>8|16|32)\)(?P<sp>[rw])(?P<src>\d+)")
_RE_END = re.compile(r"r(?P<dst>\d+) = (?P<kind>be|le|bswap)(?P<bits>16|32|64) r(?P<src>\d+)")
_RE_NEG = re.compile(r"(?P<p>[rw])(?P<dst>\d+) = -(?P<sp>[rw])(?P<src>\d+)")
_RE_ALU = re.compile(
    rf"(?P<p>[rw])(?P<dst>\d+) (?P<op>s?(?:<<|>>|[-+*/|&%^])?=) "
    rf"(?:(?P<sp>[rw])(?P<src>\d+)|(?P<imm>{_NUM}))"
)


def _reg(text: str) -> Reg:
    n = int(text)
    if n > 10:
        raise AssemblyError(f"no register r{n}; registers are r0..r10")
    return Reg(n)


def _s32(value: int) -> int:
    """An imm printed as 32-bit hex, back to its signed value."""
    return value - (1 << 32) if (1 << 31) <= value < (1 << 32) else value


class _Parser:
    def __init__(self, maps: Mapping[str, object]) -> None:
        self.maps = maps
        self.items: list[Item] = []
        self.pc = 0
        self.implied: dict[str, int] = {}  # label name -> slot pc, from "pc+N <name>"

    def target(self, m: re.Match[str]) -> Target:
        if label := m.groupdict().get("label"):
            return label
        delta = int(m["delta"])
        name: str | None = m["tname"]
        if name is None:
            return delta
        dest = self.pc + 1 + delta
        if self.implied.setdefault(name, dest) != dest:
            raise AssemblyError(f"label <{name}> is shown at two different pcs")
        return name

    def memsize(self, m: re.Match[str]) -> Size:
        return _BITS[int(m["bits"])]

    def line(self, text: str) -> Item:
        if m := _RE_LABEL.fullmatch(text):
            return Label(m["name"])
        if m := _RE_RAW.fullmatch(text):
            return Instruction(
                int(m["op"], 0), int(m["dst"]), int(m["src"]), int(m["off"], 0), int(m["imm"], 0)
            )
        if text == "exit":
            return ins.exit_()
        if m := _RE_CALL.fullmatch(text):
            return self.call(m)
        if m := _RE_GOTO.fullmatch(text):
            goto = ins.gotol if m["op"] == "gotol" else ins.ja
            return goto(self.target(m))
        if m := _RE_IF.fullmatch(text):
            p = m["p"]
            jump = _JMP_OPS[m["op"]][p == "w"]
            if m["sp"]:
                if m["sp"] != p:
                    raise AssemblyError("both operands of a compare must be r (64) or w (32)")
                return jump(_reg(m["dst"]), _reg(m["src"]), self.target(m))
            return jump(_reg(m["dst"]), _s32(int(m["imm"], 0)), self.target(m))
        if m := _RE_LOCK.fullmatch(text):
            return _ATOMIC_OPS[m["op"]](
                self.memsize(m), _reg(m["base"]), _reg(m["src"]), int(m["off"])
            )
        if m := _RE_FETCH.fullmatch(text):
            if m["dst"] != m["src"]:
                raise AssemblyError("an atomic fetch loads the old value into its src register")
            size, base, src, off = self.memsize(m), _reg(m["base"]), _reg(m["src"]), int(m["off"])
            if m["kind"] == "xchg":
                return ins.atomic_xchg(size, base, src, off)
            return _ATOMIC_NAMES[m["op"]](size, base, src, off, fetch=True)
        if m := _RE_CMPXCHG.fullmatch(text):
            return ins.atomic_cmpxchg(
                self.memsize(m), _reg(m["base"]), _reg(m["src"]), int(m["off"])
            )
        if m := _RE_STORE.fullmatch(text):
            size, base, off = self.memsize(m), _reg(m["base"]), int(m["off"])
            if m["src"] is not None:
                return ins.stx(size, base, _reg(m["src"]), off)
            return ins.st(size, base, off, int(m["imm"], 0))
        if m := _RE_LOAD.fullmatch(text):
            load = ins.ldxsx if m["sign"] == "s" else ins.ldx
            return load(self.memsize(m), _reg(m["dst"]), _reg(m["base"]), int(m["off"]))
        if m := _RE_MAP.fullmatch(text):
            ref = self.map_ref(m["ref"])
            if m["voff"] is None:
                return ins.ld_map_fd(_reg(m["dst"]), ref)
            return ins.ld_map_value(_reg(m["dst"]), ref, int(m["voff"]))
        if m := _RE_IMM64.fullmatch(text):
            return ins.ld_imm64(_reg(m["dst"]), int(m["imm"], 0))
        if m := _RE_MOVSX.fullmatch(text):
            build2 = ins.movsx if m["p"] == "r" else ins.movsx32
            if m["sp"] != m["p"]:
                raise AssemblyError("movsx operands must both be r (64) or w (32)")
            return build2(_reg(m["dst"]), _reg(m["src"]), int(m["bits"]))
        if m := _RE_END.fullmatch(text):
            if m["dst"] != m["src"]:
                raise AssemblyError("a byte swap works in place: rN = be16 rN")
            swap = {"be": ins.to_be, "le": ins.to_le, "bswap": ins.bswap}[m["kind"]]
            return swap(_reg(m["dst"]), int(m["bits"]))
        if m := _RE_NEG.fullmatch(text):
            if m["sp"] != m["p"] or m["dst"] != m["src"]:
                raise AssemblyError("neg works in place: r1 = -r1 or w1 = -w1")
            return (ins.neg if m["p"] == "r" else ins.neg32)(_reg(m["dst"]))
        if (m := _RE_ALU.fullmatch(text)) and m["op"] in _ALU_OPS:
            p = m["p"]
            build3 = _ALU_OPS[m["op"]][p == "w"]
            if m["sp"]:
                if m["sp"] != p:
                    raise AssemblyError("both ALU operands must be r (64) or w (32)")
                return build3(_reg(m["dst"]), _reg(m["src"]))
            return build3(_reg(m["dst"]), int(m["imm"], 0))
        raise AssemblyError(f"cannot parse {text!r}")

    def call(self, m: re.Match[str]) -> Instruction:
        if m["kid"] is not None:
            return Instruction(JmpOp.CALL | Class.JMP, 0, PSEUDO_KFUNC_CALL, 0, int(m["kid"]))
        if m["delta"] is not None:
            return ins.call_local(self.target(m))
        if m["num"] is not None:
            return ins.call(int(m["num"]))
        if m["hname"] is not None:
            if m["hname"] not in Helper.__members__:
                raise AssemblyError(f"unknown helper {m['hname']!r}; write its id: call #N")
            return ins.call(Helper[m["hname"]])
        name, hid = m["h"], int(m["id"])
        if name not in (None, "unknown") and (
            name not in Helper.__members__ or Helper[name] != hid
        ):
            raise AssemblyError(f"helper {name}#{hid}: the name and the id disagree")
        return ins.call(hid)

    def map_ref(self, text: str) -> object:
        if text.startswith("fd:"):
            return int(text[3:], 0)
        if text in self.maps:
            return self.maps[text]
        raise AssemblyError(f"map[{text}] is not in maps=; pass maps={{{text!r}: ...}}")


_PC_PREFIX = re.compile(r"\s*(?P<pc>\d+):\s+")
_COMMENT = re.compile(r"\s*(?:;|//).*$")


def assemble(text: str, name: str = "", maps: Mapping[str, object] | None = None) -> Program:
    """Parse disassembler-style text into a Program; ``maps`` gives refs for ``map[name]``."""
    parser = _Parser(maps or {})
    for lineno, raw_line in enumerate(text.splitlines(), 1):
        line = _COMMENT.sub("", raw_line)
        if m := _PC_PREFIX.match(line):
            line = line[m.end() :]
        line = " ".join(line.split())
        if not line:
            continue
        try:
            item = parser.line(line)
        except AssemblyError as exc:
            raise AssemblyError(f"line {lineno}: {exc}") from None
        parser.items.append(item)
        if isinstance(item, Instruction):
            parser.pc += item.slots
    return Program(_place_implied(parser.items, parser.implied), name=name)


def _place_implied(items: list[Item], implied: dict[str, int]) -> list[Item]:
    """Insert labels known only from ``goto pc+N <name>`` before the instruction they name."""
    explicit = {i.name for i in items if isinstance(i, Label)}
    by_pc: dict[int, list[str]] = {}
    for n, pc in implied.items():
        if n not in explicit:
            by_pc.setdefault(pc, []).append(n)
    out: list[Item] = []
    pc = 0
    for item in items:
        if isinstance(item, Instruction):
            out.extend(Label(n) for n in by_pc.pop(pc, []))
            pc += item.slots
        out.append(item)
    if by_pc:
        where = ", ".join(f"<{n}> at pc {p}" for p, ns in by_pc.items() for n in ns)
        raise AssemblyError(f"jump targets not at an instruction start: {where}")
    return out
