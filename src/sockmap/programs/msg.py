"""SK_MSG verdicts: run on ``sendmsg`` of a socket in the map, before the bytes enter it.

A verdict passes the bytes (they are sent as usual), drops them (the sender's
``send`` fails with EACCES, and so do its later sends: a drop sticks), or redirects
them to a socket of a map: out of that socket (egress) or onto its receive queue
(``ingress=True``). ``apply`` makes the verdict cover the next ``apply`` bytes (the
program runs again after them, across sends); ``cork`` holds the bytes until ``cork``
have gathered, then runs the program on them all. On the userspace engine the same
bytecode runs on ``engine.send(sock, data)``.
"""

from __future__ import annotations

from typing import Literal

from sockmap import asm
from sockmap.abi import BPF_F_INGRESS, SK_MSG_MD, Helper, SkAction
from sockmap.asm import R0, R1, R2, R3, R4, R6, R10
from sockmap.programs.keys import swap_ends

__all__ = ["msg_verdict", "redirect_to_peer"]

_FIELDS = {f: SK_MSG_MD.offset(f) for f in ("local_ip4", "remote_ip4", "local_port", "remote_port")}


def _budget(helper: Helper, n: int) -> list[asm.Item]:
    if not n:
        return []
    if not 0 < n < 1 << 31:
        raise ValueError(f"byte count {n} must be between 1 and 2**31 - 1")
    return [asm.mov(R1, R6), asm.mov(R2, n), asm.call(helper)]


def msg_verdict(
    action: Literal["pass", "drop", "redirect"] = "pass",
    *,
    sockmap: object = None,
    key: int = 0,
    ingress: bool = False,
    apply: int = 0,
    cork: int = 0,
) -> asm.Program:
    """An SK_MSG verdict: ``pass``, ``drop``, or ``redirect`` to ``key`` of ``sockmap``
    (a SOCKMAP; an empty key drops), after asking for ``apply``/``cork`` bytes (0: not)."""
    items: list[asm.Item] = [
        asm.mov(R6, R1),
        *_budget(Helper.msg_apply_bytes, apply),
        *_budget(Helper.msg_cork_bytes, cork),
    ]
    if action == "redirect":
        if sockmap is None:
            raise ValueError("a redirect needs the sockmap")
        items += [
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, sockmap),
            asm.mov(R3, key),
            asm.mov(R4, BPF_F_INGRESS if ingress else 0),
            asm.call(Helper.msg_redirect_map),
            asm.exit_(),
        ]
    elif action in ("pass", "drop"):
        items += [asm.mov(R0, SkAction.PASS if action == "pass" else SkAction.DROP), asm.exit_()]
    else:
        raise ValueError(f"action must be pass, drop or redirect, not {action!r}")
    name = f"msg_{action}" + (f"_apply{apply}" if apply else "") + (f"_cork{cork}" if cork else "")
    return asm.Program(items, name=name)


def redirect_to_peer(sockhash: object, *, ingress: bool = True) -> asm.Program:
    """SK_MSG verdict: redirect each send to the other end of the same connection, looked
    up in ``sockhash`` by 4-tuple key (:mod:`sockmap.programs.keys`). With
    ``ingress=True`` (the local-acceleration recipe) the bytes land straight on the
    peer's receive queue, skipping TCP; a connection whose other end is not in the map
    is passed as usual."""
    return asm.Program(
        [
            asm.mov(R6, R1),
            *swap_ends(R6, _FIELDS, -16),
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, sockhash),
            asm.mov(R3, R10),
            asm.add(R3, -16),
            asm.mov(R4, BPF_F_INGRESS if ingress else 0),
            asm.call(Helper.msg_redirect_hash),
            asm.jeq(R0, SkAction.PASS, "sent"),
            asm.mov(R0, SkAction.PASS),  # no peer in the map: send as usual
            asm.label("sent"),
            asm.exit_(),
        ],
        name="redirect_to_peer",
    )
