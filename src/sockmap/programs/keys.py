"""4-tuple keys for SOCKHASH maps, built the same way in Python and in programs.

The kernel shows programs a socket's addresses with mixed byte orders: the IPv4
addresses as they are on the wire (network order), ``local_port`` in host order, and
``remote_port`` in network order *in the upper 16 bits* of its u32 (``__sk_buff``,
``sk_msg_md`` and ``bpf_sock_ops`` alike, on little-endian machines; checked on this
kernel by ``tests/kernel/test_sockops.py`` and ``tests/conformance/test_keys.py``).
A :data:`FOUR_TUPLE` key keeps those orders, so a program copies the fields as they
come and Python builds the same 16 bytes from a socket:

====== ====== =====================================================
offset bytes  field
====== ====== =====================================================
0      4      local IPv4 address (network order)
4      4      remote IPv4 address (network order)
8      4      local port (host order, u32)
12     4      remote port (u32: network order in the upper 16 bits)
====== ====== =====================================================

:func:`peer_key` is the key of the other end of a local connection: what a socket's
own key becomes with the two ends swapped.
"""

from __future__ import annotations

import socket
import struct

from sockmap import asm
from sockmap.asm import R0, R10

__all__ = [
    "FOUR_TUPLE",
    "KEY_SIZE",
    "build_key",
    "key_of",
    "peer_key",
    "swap_ends",
]

FOUR_TUPLE = struct.Struct("<4s4sII")
KEY_SIZE = FOUR_TUPLE.size


def build_key(local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    """The key of a socket with these (IPv4 address, port) ends."""
    return FOUR_TUPLE.pack(
        socket.inet_aton(local[0]),
        socket.inet_aton(remote[0]),
        local[1],
        socket.htons(remote[1]) << 16,
    )


def key_of(sock: socket.socket) -> bytes:
    """The key of a connected IPv4 TCP socket, as a program builds it for that socket."""
    if sock.family != socket.AF_INET:
        raise ValueError("4-tuple keys are for IPv4 sockets")
    return build_key(sock.getsockname()[:2], sock.getpeername()[:2])


def peer_key(sock: socket.socket) -> bytes:
    """The key of the other end of ``sock``'s connection (both ends on this host)."""
    return build_key(sock.getpeername()[:2], sock.getsockname()[:2])


def store_own(ctx: asm.Reg, fields: dict[str, int], slot: int) -> list[asm.Item]:
    """Copy the socket's own 4-tuple from the context in ``ctx`` to the stack at
    ``r10 + slot`` (16 bytes); ``fields`` gives each field's offset in that context.
    Clobbers r0."""
    out: list[asm.Item] = []
    for name, at in (("local_ip4", 0), ("remote_ip4", 4), ("local_port", 8), ("remote_port", 12)):
        out += [asm.ldx(asm.W, R0, ctx, fields[name]), asm.stx(asm.W, R10, R0, slot + at)]
    return out


def swap_ends(ctx: asm.Reg, fields: dict[str, int], slot: int) -> list[asm.Item]:
    """Store the key of the *peer* socket: the addresses swapped, the local port turned
    to network order as the peer's remote port, the remote port to host order as the
    peer's local port. Clobbers r0."""
    return [
        asm.ldx(asm.W, R0, ctx, fields["remote_ip4"]),
        asm.stx(asm.W, R10, R0, slot + 0),
        asm.ldx(asm.W, R0, ctx, fields["local_ip4"]),
        asm.stx(asm.W, R10, R0, slot + 4),
        asm.ldx(asm.W, R0, ctx, fields["remote_port"]),
        asm.rsh(R0, 16),
        asm.to_be(R0, 16),  # network -> host order (a 16-bit swap on this little-endian ABI)
        asm.stx(asm.W, R10, R0, slot + 8),
        asm.ldx(asm.W, R0, ctx, fields["local_port"]),
        asm.to_be(R0, 16),  # host -> network order
        asm.lsh(R0, 16),
        asm.stx(asm.W, R10, R0, slot + 12),
    ]
