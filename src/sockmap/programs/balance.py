"""The message balancer's verdict: each client's messages to one of its backend connections,
each backend's messages back to their client.

Key layout (what :class:`sockmap.datapath.balance.Balancer` builds): every client owns
a block of keys, the client at ``base`` and its connection to backend ``j`` at
``base + 1 + j``. ``roles`` (HASH, u64 socket cookie -> u64) says who a socket is:

- a client: ``base | n << 32`` with ``n >= 1`` backend slots after ``base``;
- a backend connection: ``client key | j << 48`` (``n = 0``), ``j`` its backend index.

A client's message goes to slot ``policy(message) % n``; a slot whose socket has left
the map (the backend connection closed) is skipped for the next one, so messages go to
the backends that remain and are dropped (counted) only when none does. Every message
is counted in ``counters`` (ARRAY of ``2 * max_backends + 1`` values of two u64:
messages, bytes): index ``2j`` requests sent to backend ``j``, ``2j + 1`` responses
from it, the last one messages dropped for want of a backend.

Strparser mode only: a message is redirected whole, so messages from several backends
to one client never interleave.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sockmap import asm
from sockmap.abi import Helper, SkAction
from sockmap.asm import R0, R1, R2, R3, R4, R6, R7, R8, R9, R10
from sockmap.programs._parts import lookup_by_cookie, message_length, redirect_tail
from sockmap.programs.verdicts import field_lookup, fnv_of_range, next_count

__all__ = [
    "COUNTER_SIZE",
    "MAX_BACKENDS",
    "Policy",
    "backend_role",
    "balance",
    "client_role",
    "parse_policy",
]

MAX_BACKENDS = 64
"""Backend slots per client a balance verdict can try (it tries them all, unrolled)."""
COUNTER_SIZE = 16
"""Bytes of one ``counters`` value: u64 messages, u64 bytes."""


@dataclass(frozen=True)
class Policy:
    """How a client's message picks its backend slot.

    - ``round-robin``: a counter shared by every client (``counter`` map: ARRAY, u64).
    - ``hash``: FNV-1a of ``length`` message bytes at ``start`` (same bytes, same backend).
    - ``field``: the ``width``-byte field at ``start`` looked up in ``table`` (HASH, u64
      value -> u32 backend index); a value not in it goes to ``default`` (an index),
      or is dropped when ``default`` is None.
    """

    kind: Literal["round-robin", "hash", "field"] = "round-robin"
    start: int = 0
    length: int = 1
    width: Literal[1, 2, 4, 8] = 2
    order: Literal["big", "little"] = "big"
    default: int | None = 0

    def describe(self) -> str:
        if self.kind == "hash":
            return f"hash of bytes {self.start}..{self.start + self.length - 1}"
        if self.kind == "field":
            return f"route by the {self.width}-byte {self.order}-endian field at {self.start}"
        return "round robin"


def parse_policy(text: str) -> Policy:
    """``round-robin``, ``hash:START:LENGTH`` or ``field:START:WIDTH[:big|little]``."""
    kind, *args = text.split(":")

    def bad(why: str) -> ValueError:
        return ValueError(f"policy {text!r}: {why}")

    try:
        if kind in ("round-robin", "rr") and not args:
            return Policy("round-robin")
        if kind == "hash" and len(args) == 2:
            return Policy("hash", start=int(args[0]), length=int(args[1]))
        if kind == "field" and len(args) in (2, 3):
            order = args[2] if len(args) == 3 else "big"
            width = int(args[1])
            if order not in ("big", "little") or width not in (1, 2, 4, 8):
                raise bad("the field is WIDTH 1, 2, 4 or 8 bytes, big or little endian")
            return Policy("field", start=int(args[0]), width=width, order=order)  # type: ignore[arg-type]
    except ValueError as exc:
        if str(exc).startswith("policy"):
            raise
        raise bad(str(exc)) from None
    raise bad("expected round-robin, hash:START:LENGTH or field:START:WIDTH[:big|little]")


def client_role(base: int, n: int) -> int:
    """The ``roles`` value of a client at key ``base`` with ``n`` backend slots."""
    if not 1 <= n <= MAX_BACKENDS:
        raise ValueError(f"{n} backend slots: between 1 and {MAX_BACKENDS}")
    return base | n << 32


def backend_role(client_key: int, index: int) -> int:
    """The ``roles`` value of a connection to backend ``index`` of the client at a key."""
    if not 0 <= index < MAX_BACKENDS:
        raise ValueError(f"backend index {index}: between 0 and {MAX_BACKENDS - 1}")
    return client_key | index << 48


_SAVED_BASE = -72
_SAVED_N = -80


def _count(counters: object, index: asm.Reg, done: str) -> list[asm.Item]:
    """``counters[index] += (1, message length)`` (context in r6; clobbers r0-r5 and
    ``index``; the stack at r10-88); ``done`` names the label after it."""
    return [
        asm.stx(asm.W, R10, index, -88),
        asm.ld_map_fd(R1, counters),
        asm.mov(R2, R10),
        asm.add(R2, -88),
        asm.call(Helper.map_lookup_elem),
        asm.jeq(R0, 0, done),
        asm.mov(index, R0),
        asm.mov(R1, R6),
        *message_length(R0, "strparser"),
        asm.mov(R1, 1),
        asm.atomic_add(asm.DW, index, R1, 0),
        asm.atomic_add(asm.DW, index, R0, 8),
        asm.label(done),
    ]


def balance(
    sockmap: object,
    roles: object,
    counters: object,
    policy: Policy = Policy(),
    *,
    max_backends: int = 8,
    counter: object = None,
    table: object = None,
) -> asm.Program:
    """Verdict (strparser mode) of the message balancer; see the module's docstring.

    ``counter`` (ARRAY, u64) is needed by round robin, ``table`` by field routing.
    """
    if not 1 <= max_backends <= MAX_BACKENDS:
        raise ValueError(f"max_backends {max_backends}: between 1 and {MAX_BACKENDS}")
    if policy.kind == "round-robin" and counter is None:
        raise ValueError("round robin needs a counter map (ARRAY of one u64)")
    if policy.kind == "field" and table is None:
        raise ValueError("field routing needs a table map (HASH u64 -> u32)")
    drops = 2 * max_backends
    items: list[asm.Item] = [
        asm.mov(R6, R1),
        *lookup_by_cookie(roles),
        asm.jeq(R0, 0, "unknown"),
        asm.ldx(asm.W, R7, R0, 0),  # key: own base, or the client's key
        asm.ldx(asm.H, R8, R0, 4),  # n: backend slots (0 for a backend connection)
        asm.ldx(asm.H, R9, R0, 6),  # backend index of a backend connection
        asm.jne(R8, 0, "client"),
        # A backend's message goes back to its client.
        asm.lsh(R9, 1),
        asm.add(R9, 1),
        *_count(counters, R9, "counted_response"),
        *redirect_tail(sockmap, R7, ingress=False),
        asm.label("client"),
        asm.stx(asm.DW, R10, R7, _SAVED_BASE),
        asm.stx(asm.DW, R10, R8, _SAVED_N),
        asm.mov(R1, R6),
    ]
    # The policy leaves the slot's choice in r0 (or jumps to "miss").
    if policy.kind == "round-robin":
        items += [*next_count(counter, "miss"), asm.mov(R0, R7)]
    elif policy.kind == "hash":
        items += fnv_of_range(policy.start, policy.length, "strparser")
    else:
        items += [
            *field_lookup(table, policy.start, policy.width, policy.order, "strparser", "miss"),
            asm.ldx(asm.W, R0, R0, 0),
            asm.ja("chosen"),
            asm.label("miss"),
        ]
        if policy.default is None:
            items.append(asm.ja("none"))
        else:
            items.append(asm.mov(R0, policy.default))
    if policy.kind == "round-robin":
        items += [asm.ja("chosen"), asm.label("miss"), asm.mov(R0, 0)]
    items += [
        asm.label("chosen"),
        asm.ldx(asm.DW, R9, R10, _SAVED_BASE),
        asm.ldx(asm.DW, R8, R10, _SAVED_N),
        asm.mov32(R7, R0),
        asm.mod(R7, R8),  # the slot to try first
    ]
    for t in range(max_backends):
        if t:
            items += [
                asm.add(R7, 1),
                asm.jlt(R7, R8, f"try_{t}"),
                asm.mov(R7, 0),
                asm.label(f"try_{t}"),
            ]
        items += [
            asm.jle(R8, t, "none"),  # every slot tried
            asm.mov(R3, R9),
            asm.add(R3, 1),
            asm.add(R3, R7),
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, sockmap),
            asm.mov(R4, 0),
            asm.call(Helper.sk_redirect_map),
            asm.jeq(R0, SkAction.PASS, "sent"),
        ]
    items += [
        asm.label("none"),
        asm.mov(R9, drops),
        *_count(counters, R9, "counted_drop"),
        asm.label("unknown"),
        asm.mov(R0, SkAction.DROP),
        asm.exit_(),
        asm.label("sent"),
        asm.lsh(R7, 1),
        *_count(counters, R7, "counted_request"),
        asm.mov(R0, SkAction.PASS),
        asm.exit_(),
    ]
    return asm.Program(items, name="balance")
