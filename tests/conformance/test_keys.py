"""4-tuple keys: what a program builds from its context equals what Python builds from
the same socket (``sockmap.programs.keys``), on both engines, for an SK_SKB verdict and an
SK_MSG verdict -- the socket's own key and its peer's."""

from __future__ import annotations

import socket
import time

import pytest

from engines import Engine, insert
from netutil import Pairs, wait_until
from sockmap import asm
from sockmap.abi import SK_BUFF, SK_MSG_MD, CtxLayout, Helper, SkAction
from sockmap.asm import R0, R1, R2, R3, R4, R6, R10
from sockmap.kernel.engine import KernelEngine
from sockmap.programs.keys import key_of, peer_key, store_own, swap_ends

NAMES = ("local_ip4", "remote_ip4", "local_port", "remote_port")


def recorder(table: object, layout: CtxLayout) -> asm.Program:
    """Store the socket's own key at table[0] and its peer's at table[1]; pass."""
    fields = {f: layout.offset(f) for f in NAMES}
    items: list[asm.Item] = [asm.mov(R6, R1)]
    for index, build in ((0, store_own), (1, swap_ends)):
        items += [
            *build(R6, fields, -16),
            asm.st(asm.W, R10, -20, index),
            asm.ld_map_fd(R1, table),
            asm.mov(R2, R10),
            asm.add(R2, -20),
            asm.mov(R3, R10),
            asm.add(R3, -16),
            asm.mov(R4, 0),
            asm.call(Helper.map_update_elem),
        ]
    return asm.Program([*items, asm.mov(R0, SkAction.PASS), asm.exit_()], name="record_keys")


@pytest.mark.parametrize("kind", ["sk_skb", "sk_msg"])
def test_keys_built_in_a_program_match_python(engine: Engine, kind: str) -> None:
    pairs = Pairs()
    try:
        table = engine.hash(2, key_size=4, value_size=16)
        smap = engine.sockmap(2)
        if kind == "sk_skb":
            engine.attach(smap, verdict=recorder(table, SK_BUFF))
        else:
            engine.attach(smap, msg_verdict=recorder(table, SK_MSG_MD))
        c, s = pairs()
        watched = s if kind == "sk_skb" else c
        insert(engine, smap, 0, watched)
        if kind == "sk_skb":
            c.sendall(b"x")  # s receives: its verdict runs
        elif isinstance(engine, KernelEngine):
            c.sendall(b"x")  # c sends: its sk_msg verdict runs
        else:
            engine.send(c, b"x")

        def recorded() -> bool:
            try:
                table.lookup(1)  # type: ignore[attr-defined]
            except OSError:
                return False
            return True

        assert wait_until(recorded)
        time.sleep(0.01)
        assert table.lookup(0) == key_of(watched)  # type: ignore[attr-defined]
        assert table.lookup(1) == peer_key(watched)  # type: ignore[attr-defined]
        assert peer_key(watched) == key_of(c if watched is s else s)
        assert watched.family == socket.AF_INET
    finally:
        pairs.close()
