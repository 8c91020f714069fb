"""SOCK_OPS programs: put connections into a socket map by themselves, as they are
established, without the applications calling anything (attach them to a cgroup:
``KernelEngine.attach_cgroup``; on the userspace engine, ``engine.on_established``).

- :func:`add_established` inserts every established IPv4 TCP socket into a SOCKHASH
  under its 4-tuple key (:mod:`sockmap.programs.keys`), both ends of a local
  connection included (``bpf_sock_hash_update``);
- :func:`add_established_map` is the 2017 seed's variant, a SOCKMAP
  (``bpf_sock_map_update``): the connecting end at key ``its local port``, the
  accepting end at ``PASSIVE_BASE + the client's port``, so both ends of a local
  connection are found from the client's port.
"""

from __future__ import annotations

import socket

from sockmap import asm
from sockmap.abi import SOCK_OPS, Helper
from sockmap.asm import R0, R1, R2, R3, R4, R6, R10
from sockmap.programs.keys import store_own

__all__ = [
    "ACTIVE_ESTABLISHED",
    "PASSIVE_BASE",
    "PASSIVE_ESTABLISHED",
    "add_established",
    "add_established_map",
]

ACTIVE_ESTABLISHED = 4
"""``BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB``: our connect completed."""
PASSIVE_ESTABLISHED = 5
"""``BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB``: a connection was accepted."""
PASSIVE_BASE = 65536
BPF_ANY = 0

_FIELDS = {
    f: SOCK_OPS.offset(f)
    for f in ("op", "family", "local_ip4", "remote_ip4", "local_port", "remote_port")
}


def _established_ipv4() -> list[asm.Item]:
    """Jump to "out" unless the event is an IPv4 connection being established (ctx in r6)."""
    return [
        asm.ldx(asm.W, R0, R6, _FIELDS["family"]),
        asm.jne(R0, socket.AF_INET, "out"),
        asm.ldx(asm.W, R0, R6, _FIELDS["op"]),
        asm.jeq(R0, ACTIVE_ESTABLISHED, "established"),
        asm.jne(R0, PASSIVE_ESTABLISHED, "out"),
        asm.label("established"),
    ]


_OUT: list[asm.Item] = [asm.label("out"), asm.mov(R0, 1), asm.exit_()]


def add_established(sockhash: object, *, flags: int = BPF_ANY) -> asm.Program:
    """SOCK_OPS: insert each established IPv4 TCP socket into ``sockhash`` (key size 16)
    under its own 4-tuple key."""
    return asm.Program(
        [
            asm.mov(R6, R1),
            *_established_ipv4(),
            *store_own(R6, _FIELDS, -16),
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, sockhash),
            asm.mov(R3, R10),
            asm.add(R3, -16),
            asm.mov(R4, flags),
            asm.call(Helper.sock_hash_update),
            *_OUT,
        ],
        name="add_established",
    )


def add_established_map(sockmap: object, *, flags: int = BPF_ANY) -> asm.Program:
    """SOCK_OPS, the seed's SOCKMAP form: the connecting end at key ``local port``, the
    accepting end at ``PASSIVE_BASE + remote port`` (the map needs 2 * 65536 slots)."""
    return asm.Program(
        [
            asm.mov(R6, R1),
            *_established_ipv4(),
            asm.ldx(asm.W, R0, R6, _FIELDS["op"]),
            asm.jeq(R0, PASSIVE_ESTABLISHED, "passive"),
            asm.ldx(asm.W, R0, R6, _FIELDS["local_port"]),
            asm.ja("keyed"),
            asm.label("passive"),
            asm.ldx(asm.W, R0, R6, _FIELDS["remote_port"]),
            asm.rsh(R0, 16),  # network order, in the upper half
            asm.to_be(R0, 16),  # -> host order
            asm.add(R0, PASSIVE_BASE),
            asm.label("keyed"),
            asm.stx(asm.W, R10, R0, -4),
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, sockmap),
            asm.mov(R3, R10),
            asm.add(R3, -4),
            asm.mov(R4, flags),
            asm.call(Helper.sock_map_update),
            *_OUT,
        ],
        name="add_established_map",
    )
