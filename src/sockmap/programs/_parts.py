"""Instruction sequences the ready-made programs share."""

from __future__ import annotations

from sockmap import asm
from sockmap.abi import Helper
from sockmap.asm import R0, R1, R2, R10

__all__ = ["lookup_by_cookie"]


def lookup_by_cookie(table: object) -> list[asm.Item]:
    """``r0 = &table[cookie of the socket in r1]`` (or 0); the cookie stays at r10-8.

    Expects the context in r1; clobbers r1-r5.
    """
    return [
        asm.call(Helper.get_socket_cookie),
        asm.stx(asm.DW, R10, R0, -8),
        asm.ld_map_fd(R1, table),
        asm.mov(R2, R10),
        asm.add(R2, -8),
        asm.call(Helper.map_lookup_elem),
    ]
