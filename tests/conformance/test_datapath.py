"""One datapath suite, run on both engines: the kernel's sockmap and the userspace one.

The kernel parameter skips only when bpf() is refused (and says why). Where the
engines necessarily differ in *how* the application reads passed data (the
kernel's socket receive queue, the userspace engine's ``recv``), the helpers
below hide it; every outcome asserted is the same for both.
"""

from __future__ import annotations

import errno
import random
import socket
import struct
import threading

import pytest

from engines import Engine, bytes_consumed, insert, nothing_passed, read_passed, socket_error
from netutil import Pairs, random_chunks, recv_exactly, sha256, wait_until
from sockmap import asm, programs
from sockmap.abi import Helper, SkAction
from sockmap.asm import R0, R1, R2, R3, R4, R6, R7, R10
from sockmap.errors import KeyNotFound


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def drop_if_body_starts_with_d(smap: object) -> asm.Program:
    """Verdict: drop messages whose first body byte is 'D', redirect the rest to key 1
    (strparser mode: the message starts where the strparser says, in the segment)."""
    return asm.Program(
        [
            asm.mov(R6, R1),
            *programs.message_length(R7, "strparser"),
            asm.jle(R7, 4, "redirect"),  # empty body: keep it
            *programs.verdict_message_start(R2, "strparser"),
            asm.add(R2, 4),
            asm.mov(R3, R10),
            asm.add(R3, -8),
            asm.mov(R4, 1),
            asm.call(Helper.skb_load_bytes),
            asm.jne(R0, 0, "redirect"),
            asm.ldx(asm.B, R0, R10, -8),
            asm.jne(R0, ord("D"), "redirect"),
            asm.mov(R0, SkAction.DROP),
            asm.exit_(),
            asm.label("redirect"),
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, smap),
            asm.mov(R3, 1),
            asm.mov(R4, 0),
            asm.call(Helper.sk_redirect_map),
            asm.exit_(),
        ],
        name="drop_d",
    )


def _sender(sock: socket.socket, chunks: list[bytes]) -> threading.Thread:
    t = threading.Thread(target=lambda: [sock.sendall(c) for c in chunks], daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("mode", ["strparser", "verdict"])
def test_redirect_egress_random_chunks(engine: Engine, pairs: Pairs, mode: str):
    a, a_srv = pairs()
    b, b_srv = pairs()
    smap = engine.sockmap(2)
    parser = programs.whole_segment() if mode == "strparser" else None
    engine.attach(smap, parser=parser, verdict=programs.redirect_key(smap, 1))
    insert(engine, smap, 0, a_srv)
    insert(engine, smap, 1, b_srv)
    chunks = random_chunks(4 << 20, seed=3)
    t = _sender(a, chunks)
    got, digest = recv_exactly(b, 4 << 20)
    t.join(10)
    assert (got, digest) == (4 << 20, sha256(chunks))


def test_redirect_ingress(engine: Engine, pairs: Pairs):
    a, a_srv = pairs()
    _b, b_srv = pairs()
    smap = engine.sockmap(2)
    engine.attach(
        smap,
        parser=programs.whole_segment(),
        verdict=programs.redirect_key(smap, 1, ingress=True),
    )
    insert(engine, smap, 0, a_srv)
    insert(engine, smap, 1, b_srv)
    a.sendall(b"into the target's own receive side")
    assert read_passed(engine, b_srv, 34) == b"into the target's own receive side"


def test_pass(engine: Engine, pairs: Pairs):
    a, a_srv = pairs()
    smap = engine.sockmap(1)
    engine.attach(smap, parser=programs.whole_segment(), verdict=programs.pass_())
    insert(engine, smap, 0, a_srv)
    a.sendall(b"kept here")
    assert read_passed(engine, a_srv, 9) == b"kept here"


def test_drop(engine: Engine, pairs: Pairs):
    a, a_srv = pairs()
    b, b_srv = pairs()
    smap = engine.sockmap(2)
    engine.attach(smap, parser=programs.whole_segment(), verdict=programs.drop())
    insert(engine, smap, 0, a_srv)
    insert(engine, smap, 1, b_srv)
    a.sendall(b"x" * 5000)
    assert wait_until(lambda: bytes_consumed(engine, a_srv) >= 5000)
    assert nothing_passed(engine, a_srv)
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(1)


def test_redirect_to_an_empty_key_drops(engine: Engine, pairs: Pairs):
    a, a_srv = pairs()
    smap = engine.sockmap(4)
    engine.attach(smap, parser=programs.whole_segment(), verdict=programs.redirect_key(smap, 3))
    insert(engine, smap, 0, a_srv)
    a.sendall(b"nowhere to go")
    assert wait_until(lambda: bytes_consumed(engine, a_srv) >= 13)
    assert nothing_passed(engine, a_srv)


def test_length_prefixed_framing_with_random_chunking(engine: Engine, pairs: Pairs):
    """Message boundaries survive any split: 'D' messages are dropped, the rest arrive."""
    rng = random.Random(5)
    bodies = [
        (b"D" if rng.random() < 0.3 else b"K") + rng.randbytes(rng.randint(0, 3000))
        for _ in range(300)
    ]
    bodies += [b""]
    stream = b"".join(frame(x) for x in bodies)
    expected = b"".join(frame(x) for x in bodies if not x.startswith(b"D"))
    a, a_srv = pairs()
    b, b_srv = pairs()
    smap = engine.sockmap(2)
    engine.attach(
        smap,
        parser=programs.length_prefixed(adjust=4),
        verdict=drop_if_body_starts_with_d(smap),
    )
    insert(engine, smap, 0, a_srv)
    insert(engine, smap, 1, b_srv)
    cuts = sorted(rng.sample(range(1, len(stream)), 2000))
    pieces = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = _sender(a, pieces)
    got, digest = recv_exactly(b, len(expected))
    t.join(10)
    assert got == len(expected)
    assert digest == sha256([expected])


def test_one_message_across_many_segments(engine: Engine, pairs: Pairs):
    body = random.Random(9).randbytes(100_000)  # under the default receive buffer
    msg = frame(body)
    a, a_srv = pairs()
    b, b_srv = pairs()
    smap = engine.sockmap(2)
    engine.attach(
        smap, parser=programs.length_prefixed(adjust=4), verdict=programs.redirect_key(smap, 1)
    )
    insert(engine, smap, 0, a_srv)
    insert(engine, smap, 1, b_srv)
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = _sender(a, [msg[i : i + 100] for i in range(0, len(msg), 100)])
    got, digest = recv_exactly(b, len(msg))
    t.join(10)
    assert (got, digest) == (len(msg), sha256([msg]))


@pytest.mark.parametrize(("delta", "delivered"), [(0, True), (1, False)])
def test_message_of_the_limit_and_one_byte_over(
    engine: Engine,
    pairs: Pairs,
    delta: int,
    delivered: bool,
):
    """The limit is the source's receive buffer (SO_RCVBUF), as in the kernel."""
    a, a_srv = pairs()
    b, b_srv = pairs()
    a_srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    limit = a_srv.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    smap = engine.sockmap(2)
    engine.attach(
        smap, parser=programs.length_prefixed(adjust=4), verdict=programs.redirect_key(smap, 1)
    )
    insert(engine, smap, 0, a_srv)
    insert(engine, smap, 1, b_srv)
    n = limit + delta
    t = _sender(a, [frame(b"y" * (n - 4))])
    if delivered:
        assert recv_exactly(b, n)[0] == n
        assert socket_error(engine, a_srv) == 0
    else:
        assert wait_until(lambda: socket_error(engine, a_srv) == errno.EMSGSIZE)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)
    t.join(10)


def test_closed_socket_leaves_the_map(engine: Engine, pairs: Pairs):
    _a, a_srv = pairs()
    smap = engine.sockmap(4)
    engine.attach(smap, parser=programs.whole_segment(), verdict=programs.pass_())
    insert(engine, smap, 2, a_srv)
    assert 2 in smap
    a_srv.close()
    with pytest.raises(KeyNotFound):
        smap.lookup(2)


def test_detach_then_remove_restores_normal_delivery(engine: Engine, pairs: Pairs):
    a, a_srv = pairs()
    smap = engine.sockmap(1)
    att = engine.attach(smap, parser=programs.whole_segment(), verdict=programs.drop())
    insert(engine, smap, 0, a_srv)
    a.sendall(b"dropped")
    assert wait_until(lambda: bytes_consumed(engine, a_srv) >= 7)
    att.detach()
    del smap[0]
    a.sendall(b"normal again")
    a_srv.settimeout(5)
    assert a_srv.recv(100) == b"normal again"


def test_many_sockets_in_one_map(engine: Engine, pairs: Pairs):
    n = 32
    smap = engine.sockmap(2 * n)
    peers = engine.hash(2 * n, key_size=8, value_size=4)
    engine.attach(
        smap, parser=programs.whole_segment(), verdict=programs.redirect_peer(smap, peers)
    )
    clients = []
    for i in range(n):
        c, c_srv = pairs()
        d, d_srv = pairs()
        for s, peer_key in ((c_srv, 2 * i + 1), (d_srv, 2 * i)):
            cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little")
            peers[cookie] = peer_key
        insert(engine, smap, 2 * i, c_srv)
        insert(engine, smap, 2 * i + 1, d_srv)
        clients.append((c, d))
    for i, (c, _d) in enumerate(clients):
        c.sendall(f"pair {i} says hi".encode())
    for i, (_c, d) in enumerate(clients):
        want = f"pair {i} says hi".encode()
        assert recv_exactly(d, len(want)) == (len(want), sha256([want]))
