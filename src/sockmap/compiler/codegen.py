"""The restricted-Python compiler: a function's ``ast`` to our assembler's instructions.

The subset, and what it means compiled:

- **Values** are 64-bit unsigned integers: ``+ - * // % & | ^ << >>`` and unary
  ``- ~`` wrap modulo 2**64; ``//`` and ``%`` are unsigned (a zero divisor gives 0
  for ``//`` and the dividend for ``%``, as eBPF does); comparisons ``== != < <=
  > >=`` are unsigned. A negative constant is its two's complement (``return -90``
  returns -90). ``and``/``or``/``not`` and ``x if c else y`` work on truth (nonzero).
  Run as plain Python the same function uses Python's unbounded ints: the two agree
  as long as no value leaves 0..2**64-1 (and nothing divides by zero).
- **Statements**: assignment and augmented assignment to local names and to map
  items, ``if``/``elif``/``else``, ``for NAME in range(N)`` with constant ``N`` (at
  most 4096; ``break`` and ``continue`` allowed), ``return``, ``pass``, and
  expression statements.
- **Names**: the argument (the context), locals (ints), and, from the enclosing
  scope or module, int constants and maps (a sockmap for ``redirect``; an ARRAY or
  HASH for ``m[key]``).
- **The context** ``skb``: ``skb.len`` (the message length: for a parser the bytes
  received from the message's start, for a verdict the message), ``skb.load(off,
  size, order="big")`` (``size`` 1, 2, 4 or 8 bytes of the message; a read past
  the message ends the program with 0: "need more" for a parser, SK_DROP for a
  verdict), ``skb.cookie`` and the ``__sk_buff`` fields ``local_port``,
  ``remote_port``, ``family``, ``local_ip4``, ``remote_ip4``.
- **Maps**: ``m[k]`` reads the value (little-endian, at most 8 bytes; a missing key
  reads 0), ``m[k] = v`` writes it, ``m[k] += v`` adds atomically when the key
  exists (else writes ``v``). Keys are ints, little-endian in the map's key size.
- **redirect(smap, key, ingress=False)**: ``bpf_sk_redirect_map``; returns SK_PASS
  or SK_DROP, so ``return redirect(...)`` is the usual verdict.
- **SOCK_OPS** (``@sock_ops``): the context is the socket event: ``ops.op`` (4: our
  connect completed, 5: a connection accepted...) and the socket's address fields;
  ``sock_map_update(smap, key)`` puts the socket in a SOCKMAP, ``sock_hash_update(h)``
  in a SOCKHASH under its own 4-tuple key (:mod:`sockmap.programs.keys`); both return
  0 or a negative errno.
- **redirect_peer(h, ingress=False)** (SK_SKB and SK_MSG): redirect to the other end of
  the same connection, found in SOCKHASH ``h`` by its 4-tuple key.
- **SK_MSG** (``@msg_verdict``): the context is the send; ``msg.len`` is its size,
  ``msg.load`` reads the part the program sees directly (``data``..``data_end``;
  past it the program ends with 0, SK_DROP), ``redirect`` is
  ``bpf_msg_redirect_map``, and ``apply_bytes(n)``/``cork_bytes(n)`` are
  ``bpf_msg_apply_bytes``/``bpf_msg_cork_bytes``.

Locals live in registers r6-r8 while they fit and in the stack frame after; r9
holds the context.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sockmap import asm
from sockmap.abi import BPF_F_INGRESS, SK_BUFF, SK_MSG_MD, SOCK_OPS, CtxLayout, Helper, MapType
from sockmap.abi.internals import program_internals
from sockmap.asm import R0, R1, R2, R3, R4, R6, R7, R8, R9, R10, Reg
from sockmap.compiler.runtime import CompiledProgram
from sockmap.errors import ProgramError

__all__ = ["CompileError", "compile_function"]

MAX_RANGE = 4096
_FIELDS = ("local_port", "remote_port", "family", "local_ip4", "remote_ip4")
_LOCAL_REGS = (R6, R7, R8)
# Frame: -8 load buffer, -16 map key, -24 map value, -32 message start,
# -40 message length; locals and spilled temporaries below.
_BUF, _KEY, _VAL, _START, _LEN = -8, -16, -24, -32, -40
_FIRST_SLOT = -48
_MAP_TYPES = {MapType.ARRAY, MapType.HASH, MapType.LRU_HASH}
_SOCK_MAPS = {MapType.SOCKMAP}
_TUPLE = -512
"""16 bytes at the bottom of the frame for a 4-tuple key (locals grow down from -48)."""
_SOCKOPS_FIELDS = ("op", *_FIELDS)


class CompileError(ProgramError):
    """A construct outside the subset: says file, line and what."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = where


@dataclass
class _Ctx:
    fn: Callable[..., Any]
    file: str
    first_line: int
    arg: str
    kind: str
    mode: str
    items: list[asm.Item] = field(default_factory=list)
    local_slots: dict[str, Reg | int] = field(default_factory=dict)
    next_slot: int = _FIRST_SLOT
    free_regs: list[Reg] = field(default_factory=lambda: list(_LOCAL_REGS))
    labels: int = 0
    loops: list[tuple[str, str]] = field(default_factory=list)
    maps: dict[str, object] = field(default_factory=dict)
    temps_in_use: int = 0
    loads: int = 0
    start_is_zero: bool = False

    def where(self, node: ast.AST) -> str:
        return f"{self.file}:{self.first_line + getattr(node, 'lineno', 1) - 1}"

    def fail(self, node: ast.AST, what: str) -> CompileError:
        return CompileError(self.where(node), what)

    def label(self, stem: str) -> str:
        self.labels += 1
        return f"{stem}_{self.labels}"

    def emit(self, *items: asm.Item) -> None:
        self.items.extend(items)


def _resolve(ctx: _Ctx, name: str) -> object:
    fn = ctx.fn
    code = fn.__code__
    if fn.__closure__ and name in code.co_freevars:
        return fn.__closure__[code.co_freevars.index(name)].cell_contents
    if name in fn.__globals__:
        return fn.__globals__[name]
    raise KeyError(name)


def _map_type(obj: object) -> int | None:
    t = getattr(obj, "map_type", None)
    if t is None:
        spec = getattr(obj, "spec", None)
        t = getattr(spec, "map_type", None)
    return int(t) if t is not None else None


def compile_function(fn: object, *, kind: str, mode: str) -> CompiledProgram:
    """Compile ``fn`` (see the module docstring) into a program of ``kind`` ("parser" or
    "verdict") for ``mode`` ("strparser" or "verdict")."""
    if not callable(fn) or not hasattr(fn, "__code__"):
        raise CompileError("<decorator>", f"{fn!r} is not a Python function")
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        file = inspect.getsourcefile(fn) or "<unknown>"
        _, first = inspect.getsourcelines(fn)
    except (OSError, TypeError) as exc:
        raise CompileError("<decorator>", f"cannot read the source of {fn!r}: {exc}") from None
    tree = ast.parse(source)
    fdef = next((n for n in tree.body if isinstance(n, ast.FunctionDef)), None)
    if fdef is None:
        raise CompileError(f"{file}:{first}", "expected a function definition")
    args = fdef.args
    if len(args.args) != 1 or args.vararg or args.kwarg or args.kwonlyargs or args.defaults:
        raise CompileError(f"{file}:{first}", "the function must take exactly one argument")
    ctx = _Ctx(fn, file, first, args.args[0].arg, kind, mode)
    ctx.emit(asm.mov(R9, R1))
    _prologue(ctx)
    body = fdef.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if not _block(ctx, body):
        ctx.emit(asm.mov(R0, 0), asm.exit_())  # falling off the end returns 0
    if ctx.loads:
        ctx.emit(asm.label("past_the_message"), asm.mov(R0, 0), asm.exit_())
    name = fdef.name[:15]
    return CompiledProgram(_peephole(ctx.items), name, fn, kind, ctx.maps)


def _peephole(items: list[asm.Item]) -> list[asm.Item]:
    """Drop a move or stack load that only undoes the instruction just before it
    (``r6 = r0; r0 = r6``, ``*(fp-8) = r0; r0 = *(fp-8)``), when no jump lands between."""
    out: list[asm.Item] = []
    for item in items:
        prev = out[-1] if out else None
        if (
            isinstance(item, asm.Instruction)
            and isinstance(prev, asm.Instruction)
            and _undoes(prev, item)
        ):
            continue
        out.append(item)
    return out


_MOV_X = 0xBF  # ALU64 | MOV | X
_LDX_DW, _STX_DW = 0x79, 0x7B


def _undoes(prev: asm.Instruction, ins: asm.Instruction) -> bool:
    if prev.opcode == ins.opcode == _MOV_X:
        return (prev.dst, prev.src) == (ins.src, ins.dst)
    if prev.opcode == _STX_DW and ins.opcode == _LDX_DW:
        return (prev.dst, prev.off, prev.src) == (ins.src, ins.off, ins.dst)
    return False


def _layout(ctx: _Ctx) -> CtxLayout:
    return {"msg": SK_MSG_MD, "sockops": SOCK_OPS}.get(ctx.kind, SK_BUFF)


def _prologue(ctx: _Ctx) -> None:
    """Message start and length into the frame (see ``skb.len`` and ``skb.load``)."""
    if ctx.kind == "sockops":
        return
    if ctx.kind == "msg":
        ctx.start_is_zero = True
        ctx.emit(asm.ldx(asm.W, R2, R9, SK_MSG_MD.offset("size")), asm.stx(asm.DW, R10, R2, _LEN))
        return
    k = program_internals()
    skb_len = asm.ldx(asm.W, R2, R9, SK_BUFF.offset("len"))
    if ctx.mode == "verdict" or k is None:
        ctx.start_is_zero = True
        ctx.emit(skb_len, asm.stx(asm.DW, R10, R2, _LEN))
        return
    ctx.emit(
        asm.mov(R1, R9),
        asm.call_kfunc(k.kfunc_cast_to_kern_ctx),
        asm.ldx(asm.W, R3, R0, k.skb_strp_offset),
        asm.stx(asm.DW, R10, R3, _START),
    )
    if ctx.kind == "parser":
        ctx.emit(skb_len, asm.sub(R2, R3), asm.stx(asm.DW, R10, R2, _LEN))
    else:
        ctx.emit(asm.ldx(asm.W, R2, R0, k.skb_strp_full_len), asm.stx(asm.DW, R10, R2, _LEN))


# -- statements ------------------------------------------------------------------


def _block(ctx: _Ctx, body: list[ast.stmt]) -> bool:
    """Compile statements; True when the block never falls through (what follows a
    return, break or continue is never run, so it is not compiled)."""
    return any(_stmt(ctx, stmt) for stmt in body)


def _stmt(ctx: _Ctx, node: ast.stmt) -> bool:
    """Compile one statement; True when it never falls through."""
    if isinstance(node, ast.Return):
        if node.value is None:
            ctx.emit(asm.mov(R0, 0))
        else:
            _expr(ctx, node.value, R0)
        ctx.emit(asm.exit_())
        return True
    if isinstance(node, ast.If):
        return _if(ctx, node)
    if isinstance(node, ast.Break | ast.Continue):
        if not ctx.loops:
            raise ctx.fail(node, f"{type(node).__name__.lower()} outside a loop")
        top, end = ctx.loops[-1]
        ctx.emit(asm.ja(end if isinstance(node, ast.Break) else top))
        return True
    if isinstance(node, ast.Assign):
        if len(node.targets) != 1:
            raise ctx.fail(node, "chained assignment (a = b = ...) is not supported")
        _assign(ctx, node.targets[0], node.value)
    elif isinstance(node, ast.AugAssign):
        _augassign(ctx, node)
    elif isinstance(node, ast.For):
        _for(ctx, node)
    elif isinstance(node, ast.Pass):
        pass
    elif isinstance(node, ast.Expr):
        _expr(ctx, node.value, R0)
    else:
        raise ctx.fail(node, f"{type(node).__name__} statements are not supported")
    return False


def _local(ctx: _Ctx, name: str, node: ast.AST) -> Reg | int:
    if name == ctx.arg:
        raise ctx.fail(node, f"the context argument {name!r} cannot be assigned")
    where = ctx.local_slots.get(name)
    if where is None:
        if ctx.free_regs:
            where = ctx.free_regs.pop(0)
        else:
            where = ctx.next_slot
            ctx.next_slot -= 8
        ctx.local_slots[name] = where
    return where


def _store_local(ctx: _Ctx, where: Reg | int, src: Reg) -> None:
    if isinstance(where, Reg):
        if where != src:
            ctx.emit(asm.mov(where, src))
    else:
        ctx.emit(asm.stx(asm.DW, R10, src, where))


def _assign(ctx: _Ctx, target: ast.expr, value: ast.expr) -> None:
    if isinstance(target, ast.Name):
        where = _local(ctx, target.id, target)
        _expr(ctx, value, R0)
        _store_local(ctx, where, R0)
    elif isinstance(target, ast.Subscript):
        m = _data_map(ctx, target.value)
        _expr(ctx, value, R0)
        ctx.emit(asm.stx(asm.DW, R10, R0, _VAL))
        _map_key(ctx, target.slice)
        _update(ctx, m)
    else:
        raise ctx.fail(target, "only names and map[key] can be assigned")


def _augassign(ctx: _Ctx, node: ast.AugAssign) -> None:
    target = node.target
    if isinstance(target, ast.Name):
        if target.id not in ctx.local_slots:
            raise ctx.fail(node, f"{target.id!r} is used before it is assigned")
        where = ctx.local_slots[target.id]
        binop = ast.BinOp(left=ast.Name(id=target.id, ctx=ast.Load()), op=node.op, right=node.value)
        ast.copy_location(binop, node)
        _expr(ctx, binop, R0)
        _store_local(ctx, where, R0)
        return
    if not isinstance(target, ast.Subscript) or not isinstance(node.op, ast.Add):
        raise ctx.fail(node, "augmented assignment to a map item supports only +=")
    m = _data_map(ctx, target.value)
    size = _value_width(ctx, m, node)
    value = _constant(ctx, node.value)
    small = value is not None and -(1 << 31) <= value < 1 << 31
    if not small:
        _expr(ctx, node.value, R0)
        ctx.emit(asm.stx(asm.DW, R10, R0, _VAL))
    _map_key(ctx, target.slice)
    found, done = ctx.label("aug_found"), ctx.label("aug_done")
    ctx.emit(
        asm.ld_map_fd(R1, m),
        asm.mov(R2, R10),
        asm.add(R2, _KEY),
        asm.call(Helper.map_lookup_elem),
    )
    if _map_type(m) == MapType.ARRAY:
        # Every index below max_entries exists; one past it cannot be written either.
        ctx.emit(asm.jeq(R0, 0, done))
    else:
        ctx.emit(asm.jne(R0, 0, found))
        if small:
            ctx.emit(asm.st(asm.DW, R10, _VAL, value))  # type: ignore[arg-type]
        _update(ctx, m)
        ctx.emit(asm.ja(done), asm.label(found))
    if small:
        ctx.emit(asm.mov(R1, value))  # type: ignore[arg-type]
    else:
        ctx.emit(asm.ldx(asm.DW, R1, R10, _VAL))
    ctx.emit(asm.atomic_add(size, R0, R1, 0), asm.label(done))


def _if(ctx: _Ctx, node: ast.If) -> bool:
    orelse, end = ctx.label("else"), ctx.label("endif")
    _cond(ctx, node.test, false_label=orelse)
    body_ends = _block(ctx, node.body)
    if not node.orelse:
        ctx.emit(asm.label(orelse))
        return False
    if not body_ends:
        ctx.emit(asm.ja(end))
    ctx.emit(asm.label(orelse))
    else_ends = _block(ctx, node.orelse)
    ctx.emit(asm.label(end))
    return body_ends and else_ends


def _for(ctx: _Ctx, node: ast.For) -> None:
    it = node.iter
    if (
        not isinstance(node.target, ast.Name)
        or not isinstance(it, ast.Call)
        or not isinstance(it.func, ast.Name)
        or it.func.id != "range"
        or len(it.args) != 1
        or it.keywords
        or node.orelse
    ):
        raise ctx.fail(node, "loops must be 'for NAME in range(N)' with a constant N")
    n = _constant(ctx, it.args[0])
    if n is None or not 0 <= n <= MAX_RANGE:
        raise ctx.fail(it, f"range() needs a constant between 0 and {MAX_RANGE}")
    where = _local(ctx, node.target.id, node.target)
    top, cont, end = ctx.label("loop"), ctx.label("next"), ctx.label("endloop")
    ctx.emit(asm.mov(R0, 0))
    _store_local(ctx, where, R0)
    ctx.emit(asm.label(top))
    _load_local(ctx, where, R0)
    ctx.emit(asm.jge(R0, n, end))
    ctx.loops.append((cont, end))
    _block(ctx, node.body)
    ctx.loops.pop()
    ctx.emit(asm.label(cont))
    _load_local(ctx, where, R0)
    ctx.emit(asm.add(R0, 1))
    _store_local(ctx, where, R0)
    ctx.emit(asm.ja(top), asm.label(end))


def _load_local(ctx: _Ctx, where: Reg | int, dst: Reg) -> None:
    if isinstance(where, Reg):
        if where != dst:
            ctx.emit(asm.mov(dst, where))
    else:
        ctx.emit(asm.ldx(asm.DW, dst, R10, where))


# -- conditions -----------------------------------------------------------------

_JUMPS = {
    ast.Eq: (asm.jeq, asm.jne),
    ast.NotEq: (asm.jne, asm.jeq),
    ast.Lt: (asm.jlt, asm.jge),
    ast.LtE: (asm.jle, asm.jgt),
    ast.Gt: (asm.jgt, asm.jle),
    ast.GtE: (asm.jge, asm.jlt),
}


def _cond(ctx: _Ctx, node: ast.expr, *, false_label: str) -> None:
    """Fall through when ``node`` is true, jump to ``false_label`` when false."""
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            for v in node.values:
                _cond(ctx, v, false_label=false_label)
            return
        true_label = ctx.label("or_true")
        for v in node.values[:-1]:
            nxt = ctx.label("or_next")
            _cond(ctx, v, false_label=nxt)
            ctx.emit(asm.ja(true_label), asm.label(nxt))
        _cond(ctx, node.values[-1], false_label=false_label)
        ctx.emit(asm.label(true_label))
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        skip = ctx.label("not")
        _cond(ctx, node.operand, false_label=skip)
        ctx.emit(asm.ja(false_label), asm.label(skip))
        return
    if isinstance(node, ast.Compare):
        if len(node.ops) != 1:
            raise ctx.fail(node, "chained comparisons (a < b < c) are not supported")
        op = type(node.ops[0])
        if op not in _JUMPS:
            raise ctx.fail(node, f"comparison {op.__name__} is not supported")
        _, negated = _JUMPS[op]
        _expr(ctx, node.left, R0)
        right = _constant(ctx, node.comparators[0])
        if right is not None and -(1 << 31) <= right < 1 << 31:
            ctx.emit(negated(R0, right, false_label))
        else:
            slot = _spill(ctx, R0)
            _expr(ctx, node.comparators[0], R1)
            ctx.emit(asm.ldx(asm.DW, R0, R10, slot))
            _unspill(ctx)
            ctx.emit(negated(R0, R1, false_label))
        return
    _expr(ctx, node, R0)
    ctx.emit(asm.jeq(R0, 0, false_label))


# -- expressions ----------------------------------------------------------------

_BINOPS: dict[type, Callable[[Reg, Reg | int], asm.Instruction]] = {
    ast.Add: asm.add,
    ast.Sub: asm.sub,
    ast.Mult: asm.mul,
    ast.FloorDiv: asm.div,
    ast.Mod: asm.mod,
    ast.BitAnd: asm.and_,
    ast.BitOr: asm.or_,
    ast.BitXor: asm.xor,
    ast.LShift: asm.lsh,
    ast.RShift: asm.rsh,
}


def _constant(ctx: _Ctx, node: ast.expr) -> int | None:
    """The value of a constant expression (literals, int names from outside), or None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, bool | int):
        return int(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _constant(ctx, node.operand)
        return None if inner is None else -inner
    if isinstance(node, ast.Name) and node.id not in ctx.local_slots and node.id != ctx.arg:
        try:
            value = _resolve(ctx, node.id)
        except KeyError:
            return None
        if isinstance(value, bool | int):
            return int(value)
    return None


def _spill(ctx: _Ctx, reg: Reg) -> int:
    slot = ctx.next_slot - 8 * ctx.temps_in_use
    if slot < -512 + 8:
        raise CompileError(ctx.file, "expression too deep for the 512-byte stack")
    ctx.temps_in_use += 1
    ctx.emit(asm.stx(asm.DW, R10, reg, slot))
    return slot


def _unspill(ctx: _Ctx) -> None:
    ctx.temps_in_use -= 1


def _expr(ctx: _Ctx, node: ast.expr, dst: Reg) -> None:
    """Evaluate ``node`` into ``dst`` (r0 or r1); clobbers r0-r5."""
    value = _constant(ctx, node)
    if value is not None:
        if -(1 << 31) <= value < 1 << 31:
            ctx.emit(asm.mov(dst, value))
        else:
            ctx.emit(asm.ld_imm64(dst, value & ((1 << 64) - 1)))
        return
    if isinstance(node, ast.Name):
        if node.id in ctx.local_slots:
            _load_local(ctx, ctx.local_slots[node.id], dst)
            return
        if node.id == ctx.arg:
            raise ctx.fail(node, f"the context {node.id!r} can only be used as {node.id}.FIELD")
        raise ctx.fail(node, f"name {node.id!r} is not a local, an int constant or a map read")
    if isinstance(node, ast.BinOp):
        op = type(node.op)
        if op not in _BINOPS:
            raise ctx.fail(node, f"operator {op.__name__} is not supported")
        right = _constant(ctx, node.right)
        _expr(ctx, node.left, R0)
        if right is not None and -(1 << 31) <= right < 1 << 31:
            ctx.emit(_BINOPS[op](R0, right))
        else:
            slot = _spill(ctx, R0)
            _expr(ctx, node.right, R1)
            ctx.emit(asm.ldx(asm.DW, R0, R10, slot))
            _unspill(ctx)
            ctx.emit(_BINOPS[op](R0, R1))
        if dst != R0:
            ctx.emit(asm.mov(dst, R0))
        return
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.Not):
            _truth(ctx, node, dst)
            return
        _expr(ctx, node.operand, dst)
        if isinstance(node.op, ast.USub):
            ctx.emit(asm.neg(dst))
        elif isinstance(node.op, ast.Invert):
            ctx.emit(asm.xor(dst, -1))
        elif not isinstance(node.op, ast.UAdd):
            raise ctx.fail(node, f"unary {type(node.op).__name__} is not supported")
        return
    if isinstance(node, ast.Compare | ast.BoolOp):
        _truth(ctx, node, dst)
        return
    if isinstance(node, ast.IfExp):
        other, end = ctx.label("ifexp_else"), ctx.label("ifexp_end")
        _cond(ctx, node.test, false_label=other)
        _expr(ctx, node.body, dst)
        ctx.emit(asm.ja(end), asm.label(other))
        _expr(ctx, node.orelse, dst)
        ctx.emit(asm.label(end))
        return
    if isinstance(node, ast.Attribute):
        _attribute(ctx, node, dst)
        return
    if isinstance(node, ast.Subscript):
        m = _data_map(ctx, node.value)
        width = _value_width(ctx, m, node)
        _map_key(ctx, node.slice)
        missing = ctx.label("missing")
        ctx.emit(
            asm.ld_map_fd(R1, m),
            asm.mov(R2, R10),
            asm.add(R2, _KEY),
            asm.call(Helper.map_lookup_elem),
            asm.jeq(R0, 0, missing),
            asm.ldx(width, R0, R0, 0),
            asm.label(missing),
        )
        if dst != R0:
            ctx.emit(asm.mov(dst, R0))
        return
    if isinstance(node, ast.Call):
        _call(ctx, node, dst)
        return
    raise ctx.fail(node, f"{type(node).__name__} expressions are not supported")


def _truth(ctx: _Ctx, node: ast.expr, dst: Reg) -> None:
    false, end = ctx.label("false"), ctx.label("truth_end")
    _cond(ctx, node, false_label=false)
    ctx.emit(asm.mov(dst, 1), asm.ja(end), asm.label(false), asm.mov(dst, 0), asm.label(end))


def _attribute(ctx: _Ctx, node: ast.Attribute, dst: Reg) -> None:
    if not isinstance(node.value, ast.Name) or node.value.id != ctx.arg:
        raise ctx.fail(node, "only the context's fields can be read (skb.FIELD)")
    name = node.attr
    fields = _SOCKOPS_FIELDS if ctx.kind == "sockops" else _FIELDS
    if name == "len" and ctx.kind != "sockops":
        ctx.emit(asm.ldx(asm.DW, dst, R10, _LEN))
    elif name == "cookie" and ctx.kind != "msg":
        ctx.emit(asm.mov(R1, R9), asm.call(Helper.get_socket_cookie))
        if dst != R0:
            ctx.emit(asm.mov(dst, R0))
    elif name in fields:
        ctx.emit(asm.ldx(asm.W, dst, R9, _layout(ctx).offset(name)))
    else:
        known = ", ".join(("len", "cookie", *fields))
        raise ctx.fail(node, f"context field {name!r} is not supported (known: {known})")


def _call(ctx: _Ctx, node: ast.Call, dst: Reg) -> None:
    func = node.func
    if (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Name)
        and func.value.id == ctx.arg
        and func.attr == "load"
    ):
        _load(ctx, node, dst)
        return
    if isinstance(func, ast.Name) and func.id == "redirect":
        _redirect(ctx, node, dst)
        return
    if isinstance(func, ast.Name) and func.id in ("sock_map_update", "sock_hash_update"):
        _sock_update(ctx, node, func.id, dst)
        return
    if isinstance(func, ast.Name) and func.id == "redirect_peer":
        _redirect_peer(ctx, node, dst)
        return
    if isinstance(func, ast.Name) and func.id in ("apply_bytes", "cork_bytes"):
        if ctx.kind != "msg":
            raise ctx.fail(node, f"{func.id}() is for @msg_verdict programs")
        if len(node.args) != 1 or node.keywords:
            raise ctx.fail(node, f"{func.id}(n)")
        helper = Helper.msg_apply_bytes if func.id == "apply_bytes" else Helper.msg_cork_bytes
        _expr(ctx, node.args[0], R0)
        ctx.emit(asm.mov(R2, R0), asm.mov(R1, R9), asm.call(helper))
        if dst != R0:
            ctx.emit(asm.mov(dst, R0))
        return
    raise ctx.fail(
        node,
        "only skb.load(...), redirect(...), redirect_peer(...), apply_bytes(n), cork_bytes(n), "
        "sock_map_update(...) and sock_hash_update(...) can be called",
    )


def _load(ctx: _Ctx, node: ast.Call, dst: Reg) -> None:
    args = list(node.args)
    kw = {k.arg: k.value for k in node.keywords}
    if not 2 <= len(args) <= 3 or set(kw) - {"order"}:
        raise ctx.fail(node, "skb.load(offset, size, order='big')")
    size = _constant(ctx, args[1])
    if size not in (1, 2, 4, 8):
        raise ctx.fail(node, "skb.load's size must be a constant 1, 2, 4 or 8")
    order_node = args[2] if len(args) == 3 else kw.get("order")
    order = "big"
    if order_node is not None:
        if not isinstance(order_node, ast.Constant) or order_node.value not in ("big", "little"):
            raise ctx.fail(node, "skb.load's order must be 'big' or 'little'")
        order = str(order_node.value)
    ctx.loads += 1
    if ctx.kind == "msg":
        _load_msg(ctx, args[0], size, dst)
        if order == "big" and size > 1:
            ctx.emit(asm.to_be(dst, size * 8))
        return
    const_off = _constant(ctx, args[0])
    if const_off is not None and 0 <= const_off < 1 << 30:
        # A constant offset: one bounds check against the message length.
        ctx.emit(
            asm.ldx(asm.DW, R4, R10, _LEN),
            asm.jlt(R4, const_off + size, "past_the_message"),
        )
        if ctx.start_is_zero:
            ctx.emit(asm.mov(R2, const_off))
        else:
            ctx.emit(asm.ldx(asm.DW, R2, R10, _START))
            if const_off:
                ctx.emit(asm.add(R2, const_off))
    else:
        _expr(ctx, args[0], R0)
        # offset + size must lie within the message (so a verdict never reads the next one)
        ctx.emit(
            asm.mov(R3, R0),
            asm.add(R3, size),
            asm.ldx(asm.DW, R4, R10, _LEN),
            asm.jgt(R3, R4, "past_the_message"),
            asm.jlt(R3, size, "past_the_message"),  # the offset wrapped
        )
        if ctx.start_is_zero:
            ctx.emit(asm.mov(R2, R0))
        else:
            ctx.emit(asm.ldx(asm.DW, R2, R10, _START), asm.add(R2, R0))
    ctx.emit(
        asm.mov(R1, R9),
        asm.mov(R3, R10),
        asm.add(R3, _BUF),
        asm.mov(R4, size),
        asm.call(Helper.skb_load_bytes),
        asm.jne(R0, 0, "past_the_message"),
        asm.ldx({1: asm.B, 2: asm.H, 4: asm.W, 8: asm.DW}[size], dst, R10, _BUF),
    )
    if order == "big" and size > 1:
        ctx.emit(asm.to_be(dst, size * 8))


def _load_msg(ctx: _Ctx, offset: ast.expr, size: int, dst: Reg) -> None:
    """A read of the message an SK_MSG program sees directly (``data``..``data_end``:
    the first part of a large send). Past it, the program ends with 0 (SK_DROP)."""
    const_off = _constant(ctx, offset)
    if const_off is None:
        _expr(ctx, offset, R0)
        ctx.emit(asm.jgt(R0, 0xFFFF, "past_the_message"), asm.mov(R4, R0))
    elif not 0 <= const_off <= 0xFFFF:
        raise ctx.fail(offset, "a message offset must be between 0 and 65535")
    ctx.emit(
        asm.ldx(asm.DW, R2, R9, SK_MSG_MD.offset("data")),
        asm.ldx(asm.DW, R3, R9, SK_MSG_MD.offset("data_end")),
    )
    if const_off is None:
        ctx.emit(asm.add(R2, R4))
    elif const_off:
        ctx.emit(asm.add(R2, const_off))
    ctx.emit(
        asm.mov(R1, R2),
        asm.add(R1, size),
        asm.jgt(R1, R3, "past_the_message"),
        asm.ldx({1: asm.B, 2: asm.H, 4: asm.W, 8: asm.DW}[size], dst, R2, 0),
    )


def _redirect_args(
    ctx: _Ctx, node: ast.Call, positional: int, usage: str
) -> tuple[list[ast.expr], int]:
    """The ``positional`` arguments of a redirect call and its flags (``ingress=``, a
    constant, as an optional last positional or a keyword)."""
    args = list(node.args)
    kw = {k.arg: k.value for k in node.keywords}
    n = len(args) + len(kw)
    if n not in (positional, positional + 1) or set(kw) - {"ingress"} or len(args) < positional:
        raise ctx.fail(node, usage)
    ingress_node = args[positional] if len(args) > positional else kw.get("ingress")
    flags = 0
    if ingress_node is not None:
        value = _constant(ctx, ingress_node)
        if value is None:
            name = usage.split("(", 1)[0]
            raise ctx.fail(node, f"{name}'s ingress must be a constant True or False")
        flags = BPF_F_INGRESS if value else 0
    return args[:positional], flags


def _redirect(ctx: _Ctx, node: ast.Call, dst: Reg) -> None:
    args, flags = _redirect_args(ctx, node, 2, "redirect(smap, key, ingress=False)")
    smap = _map_object(ctx, args[0])
    if _map_type(smap) not in _SOCK_MAPS:
        raise ctx.fail(node, "redirect needs a SOCKMAP")
    _expr(ctx, args[1], R0)
    helper = Helper.msg_redirect_map if ctx.kind == "msg" else Helper.sk_redirect_map
    ctx.emit(
        asm.mov(R3, R0),
        asm.mov(R1, R9),
        asm.ld_map_fd(R2, smap),
        asm.mov(R4, flags),
        asm.call(helper),
    )
    if dst != R0:
        ctx.emit(asm.mov(dst, R0))


def _sock_update(ctx: _Ctx, node: ast.Call, name: str, dst: Reg) -> None:
    from sockmap.programs.keys import store_own  # noqa: PLC0415

    if ctx.kind != "sockops":
        raise ctx.fail(node, f"{name}() is for @sock_ops programs")
    hashed = name == "sock_hash_update"
    if node.keywords or len(node.args) != (1 if hashed else 2):
        raise ctx.fail(node, "sock_hash_update(h)" if hashed else "sock_map_update(smap, key)")
    m = _map_object(ctx, node.args[0])
    want = MapType.SOCKHASH if hashed else MapType.SOCKMAP
    if _map_type(m) != want:
        raise ctx.fail(node, f"{name} needs a {want.name}")
    if hashed:
        fields = {f: SOCK_OPS.offset(f) for f in _FIELDS if f != "family"}
        ctx.emit(*store_own(R9, fields, _TUPLE), asm.mov(R3, R10), asm.add(R3, _TUPLE))
    else:
        _map_key(ctx, node.args[1])
        ctx.emit(asm.mov(R3, R10), asm.add(R3, _KEY))
    helper = Helper.sock_hash_update if hashed else Helper.sock_map_update
    ctx.emit(asm.mov(R1, R9), asm.ld_map_fd(R2, m), asm.mov(R4, 0), asm.call(helper))
    if dst != R0:
        ctx.emit(asm.mov(dst, R0))


def _redirect_peer(ctx: _Ctx, node: ast.Call, dst: Reg) -> None:
    from sockmap.programs.keys import swap_ends  # noqa: PLC0415

    if ctx.kind in {"sockops", "parser"}:
        raise ctx.fail(node, "redirect_peer() is for verdicts")
    args, flags = _redirect_args(ctx, node, 1, "redirect_peer(h, ingress=False)")
    h = _map_object(ctx, args[0])
    if _map_type(h) != MapType.SOCKHASH:
        raise ctx.fail(node, "redirect_peer needs a SOCKHASH (keyed by 4-tuple)")
    fields = {f: _layout(ctx).offset(f) for f in _FIELDS if f != "family"}
    helper = Helper.msg_redirect_hash if ctx.kind == "msg" else Helper.sk_redirect_hash
    ctx.emit(
        *swap_ends(R9, fields, _TUPLE),
        asm.mov(R1, R9),
        asm.ld_map_fd(R2, h),
        asm.mov(R3, R10),
        asm.add(R3, _TUPLE),
        asm.mov(R4, flags),
        asm.call(helper),
    )
    if dst != R0:
        ctx.emit(asm.mov(dst, R0))


# -- maps -------------------------------------------------------------------------


def _map_object(ctx: _Ctx, node: ast.expr) -> object:
    if not isinstance(node, ast.Name) or node.id in ctx.local_slots:
        raise ctx.fail(node, "a map must be named by a variable from outside the function")
    try:
        obj = _resolve(ctx, node.id)
    except KeyError:
        raise ctx.fail(node, f"name {node.id!r} is not defined outside the function") from None
    if _map_type(obj) is None:
        raise ctx.fail(node, f"{node.id!r} is not a map")
    return obj


def _data_map(ctx: _Ctx, node: ast.expr) -> object:
    m = _map_object(ctx, node)
    if _map_type(m) not in _MAP_TYPES:
        raise ctx.fail(node, "m[key] needs an ARRAY or HASH map")
    key_size = int(getattr(m, "key_size", 0) or getattr(getattr(m, "spec", None), "key_size", 0))
    if key_size not in (1, 2, 4, 8):
        raise ctx.fail(node, f"map keys must be 1, 2, 4 or 8 bytes to index by int, not {key_size}")
    assert isinstance(node, ast.Name)
    ctx.maps[node.id] = m
    return m


def _value_width(ctx: _Ctx, m: object, node: ast.AST) -> asm.Size:
    size = int(getattr(m, "value_size", 0) or getattr(getattr(m, "spec", None), "value_size", 0))
    if size not in (1, 2, 4, 8):
        raise ctx.fail(node, f"map values must be 1, 2, 4 or 8 bytes to read as ints, not {size}")
    return {1: asm.B, 2: asm.H, 4: asm.W, 8: asm.DW}[size]


def _map_key(ctx: _Ctx, node: ast.expr) -> None:
    """The key expression, stored little-endian at the frame's key slot."""
    key = _constant(ctx, node)
    if key is not None and -(1 << 31) <= key < 1 << 31:
        ctx.emit(asm.st(asm.DW, R10, _KEY, key))
        return
    _expr(ctx, node, R0)
    ctx.emit(asm.stx(asm.DW, R10, R0, _KEY))


def _update(ctx: _Ctx, m: object) -> None:
    ctx.emit(
        asm.ld_map_fd(R1, m),
        asm.mov(R2, R10),
        asm.add(R2, _KEY),
        asm.mov(R3, R10),
        asm.add(R3, _VAL),
        asm.mov(R4, 0),
        asm.call(Helper.map_update_elem),
    )
