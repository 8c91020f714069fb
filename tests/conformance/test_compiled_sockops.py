"""The local-acceleration recipe written in restricted Python (``@sock_ops`` with
``sock_hash_update``, ``@msg_verdict`` with ``redirect_peer``), on both engines: the
compiled sock_ops puts both ends of a connection in the SOCKHASH under the keys Python
builds, and the compiled SK_MSG verdict hands each send to the peer's receive side."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

from engines import Engine, read_passed
from sockmap.compiler import msg_verdict, redirect_peer, sock_hash_update, sock_ops
from sockmap.kernel.engine import KernelEngine
from sockmap.programs.keys import key_of

AF_INET, ACTIVE, PASSIVE = 2, 4, 5


@contextlib.contextmanager
def connected(engine: Engine, program: object) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A local connection whose two ends ran ``program`` as sock_ops."""
    if isinstance(engine, KernelEngine):
        from cgroups import fresh_cgroup, inside  # noqa: PLC0415

        with fresh_cgroup() as cg:
            engine.attach_cgroup(cg, program)  # type: ignore[arg-type]
            with inside(cg):
                lst = socket.create_server(("127.0.0.1", 0))
                c = socket.create_connection(lst.getsockname(), timeout=10)
                s, _ = lst.accept()
            lst.close()
            try:
                yield c, s
            finally:
                c.close()
                s.close()
        return
    engine.on_established(program)  # type: ignore[arg-type]
    with engine.listen(("127.0.0.1", 0)) as ulst:
        c = engine.connect(ulst.getsockname(), timeout=10)
        s, _ = ulst.accept()
    try:
        yield c, s
    finally:
        c.close()
        s.close()


def test_compiled_local_acceleration(engine: Engine) -> None:
    h = engine.sockhash(16, key_size=16)

    @sock_ops
    def add(ops):  # type: ignore[no-untyped-def]
        if ops.family == AF_INET and (ops.op == ACTIVE or ops.op == PASSIVE):
            sock_hash_update(h)
        return 1

    @msg_verdict
    def to_peer(msg):  # type: ignore[no-untyped-def]
        redirect_peer(h, ingress=True)  # no peer in the map: sent as usual
        return 1

    engine.attach(h, msg_verdict=to_peer)
    with connected(engine, add) as (c, s):
        assert set(h.keys()) == {key_of(c), key_of(s)}
        payload = os.urandom(256 << 10)
        for i in range(0, len(payload), 16384):
            piece = payload[i : i + 16384]
            if isinstance(engine, KernelEngine):
                c.sendall(piece)
            else:
                assert engine.send(c, piece) == len(piece)
        assert read_passed(engine, s, len(payload)) == payload
