"""Outcome counters and a decision log for any program we generate (library or compiler).

:func:`instrument` rewrites a program so that every run counts its outcome in an ARRAY
(``outcomes``, :data:`OUTCOMES` u64 counters) and, when a ``log`` is given, records
(socket cookie, outcome, time) in a ring of the last :data:`LOG_SIZE` decisions. The
same bytecode runs in the kernel and in the userspace VM, so both engines count alike.

What a run counts as:

- a parser: ``message`` (a length > 0), ``need_more`` (0) or ``parser_error`` (< 0);
- a verdict (SK_SKB or SK_MSG): ``redirect`` (it returned SK_PASS after a redirect
  helper succeeded), ``redirect_miss`` (its last redirect helper found the key empty),
  ``pass`` (SK_PASS with no redirect) or ``drop``.

The program's return value is unchanged. The rewrite uses the frame at r10-456..r10-425
and refuses programs with local calls or that use those bytes.
"""

from __future__ import annotations

import struct
from typing import Literal

from sockmap import asm
from sockmap.abi import Helper, SkAction
from sockmap.asm import R0, R1, R2, R6, R10

__all__ = [
    "LOG_ENTRY",
    "LOG_SIZE",
    "OUTCOMES",
    "decode_log",
    "instrument",
    "read_outcomes",
]

OUTCOMES = (
    "pass",
    "drop",
    "redirect",
    "redirect_miss",
    "message",
    "need_more",
    "parser_error",
)
_INDEX = {name: i for i, name in enumerate(OUTCOMES)}
PARSER_OUTCOMES = ("message", "need_more", "parser_error")
VERDICT_OUTCOMES = ("pass", "drop", "redirect", "redirect_miss")
HEAD = len(OUTCOMES)
"""Index of the decision log's write counter in the outcomes ARRAY."""
OUTCOMES_ENTRIES = HEAD + 1
LOG_SIZE = 256
LOG_ENTRY = struct.Struct("<QQQ")
"""A decision: socket cookie (0 where the program type cannot ask), outcome index, ktime ns."""

_REDIRECT_HELPERS = {
    int(Helper.sk_redirect_map),
    int(Helper.sk_redirect_hash),
    int(Helper.msg_redirect_map),
    int(Helper.msg_redirect_hash),
}
_FLAG, _RET, _CTX, _KEY = -456, -448, -440, -432
_SCRATCH = (-464, -424)
"""The frame bytes the rewrite uses (a compiled program's locals stop far above; its 4-tuple
key sits below, at r10-512)."""
_CALL, _EXIT = 0x85, 0x95

Kind = Literal["parser", "verdict", "msg"]


def _is_helper_call(item: asm.Item, helpers: set[int]) -> bool:
    return (
        isinstance(item, asm.Instruction)
        and item.opcode == _CALL
        and item.src == 0
        and item.imm in helpers
    )


def instrument(
    program: asm.Program, outcomes: object, kind: Kind, *, log: object = None
) -> asm.Program:
    """``program`` counting its outcomes in ``outcomes`` (ARRAY, :data:`OUTCOMES_ENTRIES`
    u64 values) and, with ``log`` (ARRAY, :data:`LOG_SIZE` values of
    ``LOG_ENTRY.size`` bytes), logging each decision."""
    items = list(program.items)
    for it in items:
        if isinstance(it, asm.Instruction):
            if it.opcode == _CALL and it.src == 1:
                raise ValueError(f"{program.name}: programs with local calls are not instrumented")
            if R10 in (it.dst, it.src) and _SCRATCH[0] < it.off < _SCRATCH[1]:
                raise ValueError(f"{program.name}: uses r10{it.off}, which the counters need")
    out: list[asm.Item] = [asm.st(asm.DW, R10, _FLAG, 0), asm.stx(asm.DW, R10, R1, _CTX)]
    n = 0
    for it in items:
        if isinstance(it, asm.Instruction) and it.opcode == _EXIT:
            out.append(asm.ja("__outcome"))
            continue
        out.append(it)
        if kind != "parser" and _is_helper_call(it, _REDIRECT_HELPERS):
            n += 1
            out += [
                asm.mov(R1, 2),
                asm.jne32(R0, SkAction.PASS, f"__miss_{n}"),
                asm.mov(R1, 1),
                asm.label(f"__miss_{n}"),
                asm.stx(asm.DW, R10, R1, _FLAG),
            ]
    out += [asm.label("__outcome"), asm.stx(asm.DW, R10, R0, _RET)]
    if kind == "parser":
        out += [
            asm.mov(R1, _INDEX["message"]),
            asm.jsgt(R0, 0, "__counted"),
            asm.mov(R1, _INDEX["need_more"]),
            asm.jeq(R0, 0, "__counted"),
            asm.mov(R1, _INDEX["parser_error"]),
        ]
    else:
        out += [
            asm.ldx(asm.DW, R2, R10, _FLAG),
            asm.mov(R1, _INDEX["redirect_miss"]),
            asm.jeq(R2, 2, "__counted"),
            asm.mov(R1, _INDEX["drop"]),
            asm.jne32(R0, SkAction.PASS, "__counted"),
            asm.mov(R1, _INDEX["redirect"]),
            asm.jeq(R2, 1, "__counted"),
            asm.mov(R1, _INDEX["pass"]),
        ]
    out += [
        asm.label("__counted"),
        asm.mov(R6, R1),  # the outcome (r6 is dead: the program has ended)
        *_add_one(outcomes, R6, "__added"),
    ]
    if log is not None:
        out += _log(outcomes, log, kind)
    out += [asm.ldx(asm.DW, R0, R10, _RET), asm.exit_()]
    return asm.Program(out, name=program.name)


def _add_one(m: object, index: asm.Reg, done: str) -> list[asm.Item]:
    """``m[index] += 1`` (clobbers r0-r5; keeps ``index``)."""
    return [
        asm.stx(asm.W, R10, index, _KEY),
        asm.ld_map_fd(R1, m),
        asm.mov(R2, R10),
        asm.add(R2, _KEY),
        asm.call(Helper.map_lookup_elem),
        asm.jeq(R0, 0, done),
        asm.mov(R1, 1),
        asm.atomic_add(asm.DW, R0, R1, 0),
        asm.label(done),
    ]


def _log(outcomes: object, log: object, kind: Kind) -> list[asm.Item]:
    """Append (cookie, outcome in r6, ktime) to the ring (clobbers r0-r5, r7)."""
    from sockmap.asm import R3, R7  # noqa: PLC0415

    items: list[asm.Item] = [
        asm.st(asm.W, R10, _KEY, HEAD),
        asm.ld_map_fd(R1, outcomes),
        asm.mov(R2, R10),
        asm.add(R2, _KEY),
        asm.call(Helper.map_lookup_elem),
        asm.jeq(R0, 0, "__logged"),
        asm.mov(R7, 1),
        asm.atomic_add(asm.DW, R0, R7, 0, fetch=True),
        asm.mod(R7, LOG_SIZE),
        asm.stx(asm.W, R10, R7, _KEY),
        asm.ld_map_fd(R1, log),
        asm.mov(R2, R10),
        asm.add(R2, _KEY),
        asm.call(Helper.map_lookup_elem),
        asm.jeq(R0, 0, "__logged"),
        asm.mov(R7, R0),
        asm.stx(asm.DW, R7, R6, 8),
    ]
    if kind == "msg":
        items.append(asm.st(asm.DW, R7, 0, 0))
    else:
        items += [
            asm.ldx(asm.DW, R1, R10, _CTX),
            asm.call(Helper.get_socket_cookie),
            asm.stx(asm.DW, R7, R0, 0),
        ]
    items += [
        asm.call(Helper.ktime_get_ns),
        asm.stx(asm.DW, R7, R0, 16),
        asm.label("__logged"),
    ]
    del R3
    return items


def read_outcomes(outcomes: object) -> dict[str, int]:
    """The counters, by outcome name (any engine's ARRAY)."""
    get = outcomes.lookup  # type: ignore[attr-defined]
    return {name: int.from_bytes(bytes(get(i))[:8], "little") for i, name in enumerate(OUTCOMES)}


def decode_log(outcomes: object, log: object) -> list[tuple[int, str, int]]:
    """The logged decisions, oldest first: (cookie, outcome, ktime ns)."""
    head = int.from_bytes(bytes(outcomes.lookup(HEAD))[:8], "little")  # type: ignore[attr-defined]
    first = max(0, head - LOG_SIZE)
    out = []
    for i in range(first, head):
        cookie, index, t = LOG_ENTRY.unpack(bytes(log.lookup(i % LOG_SIZE)))  # type: ignore[attr-defined]
        name = OUTCOMES[index] if index < len(OUTCOMES) else str(index)
        out.append((cookie, name, t))
    return out


class ProgramCounters:
    """The outcome counters (and decision logs) of the programs of one attachment, made by
    :func:`count_programs`; maps named ``oc_<program>`` and ``lg_<program>`` so that
    ``sockmap why`` finds them from the program."""

    def __init__(self) -> None:
        self.maps: dict[str, tuple[object, object]] = {}
        self.kinds: dict[str, Kind] = {}

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{program name: {outcome: count}}, the outcomes its kind can have."""
        out = {}
        for name, (oc, _) in self.maps.items():
            counts = read_outcomes(oc)
            keep = PARSER_OUTCOMES if self.kinds[name] == "parser" else VERDICT_OUTCOMES
            out[name] = {k: v for k, v in counts.items() if k in keep}
        return out

    def decisions(self, cookie: int | None = None) -> list[tuple[str, int, str, int]]:
        """Logged decisions (program, cookie, outcome, ktime ns), oldest first per program;
        only ``cookie``'s when given."""
        out = []
        for name, (oc, lg) in self.maps.items():
            if lg is None:
                continue
            for c, outcome, t in decode_log(oc, lg):
                if cookie is None or c == cookie:
                    out.append((name, c, outcome, t))
        return out


def count_programs(
    engine: object,
    parser: asm.Program | None,
    verdict: asm.Program | None,
    *,
    log: bool = True,
) -> tuple[asm.Program | None, asm.Program | None, ProgramCounters]:
    """Instrument a parser and a verdict with outcome maps made by ``engine`` (the verdict
    also with a decision log when ``log``)."""
    counters = ProgramCounters()

    def wrap(p: asm.Program | None, kind: Kind, with_log: bool) -> asm.Program | None:
        if p is None:
            return None
        name = (p.name or kind)[:12]
        oc = engine.array(OUTCOMES_ENTRIES, value_size=8, name=f"oc_{name}")  # type: ignore[attr-defined]
        lg = (
            engine.array(LOG_SIZE, value_size=LOG_ENTRY.size, name=f"lg_{name}")  # type: ignore[attr-defined]
            if with_log
            else None
        )
        counters.maps[p.name or kind] = (oc, lg)
        counters.kinds[p.name or kind] = kind
        return instrument(p, oc, kind, log=lg)

    return wrap(parser, "parser", False), wrap(verdict, "verdict", log), counters
