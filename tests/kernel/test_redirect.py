"""End to end on the real kernel: redirect, verdict-only mode, drop, pass, detach, close."""

from __future__ import annotations

import errno
import socket
import threading

import pytest

from netutil import Pairs, random_chunks, recv_exactly, sha256, wait_until
from sockmap import programs
from sockmap.abi import AttachType
from sockmap.datapath.tcp import inq, tcp_counters
from sockmap.errors import KeyNotFound
from sockmap.kernel.attach import detach, query
from sockmap.kernel.engine import KernelEngine

pytestmark = pytest.mark.kernel


def _send_all(sock: socket.socket, chunks: list[bytes]) -> threading.Thread:
    t = threading.Thread(target=lambda: [sock.sendall(c) for c in chunks], daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("mode", ["strparser", "verdict"])
def test_redirect_8mib_random_chunks_arrive_intact(engine: KernelEngine, pairs: Pairs, mode: str):
    """A's incoming stream leaves through B's send path, whole and in order."""
    a, a_srv = pairs()
    b, b_srv = pairs()
    smap = engine.sockmap(2)
    parser = programs.whole_segment() if mode == "strparser" else None
    att = engine.attach(smap, parser=parser, verdict=programs.redirect_key(smap, 1))
    expected = (
        AttachType.SK_SKB_STREAM_VERDICT if mode == "strparser" else AttachType.SK_SKB_VERDICT
    )
    assert att.verdict_kind == expected
    smap[0] = a_srv
    smap[1] = b_srv
    chunks = random_chunks(8 << 20, seed=7)
    sender = _send_all(a, chunks)
    got, digest = recv_exactly(b, 8 << 20)
    sender.join(10)
    assert got == 8 << 20
    assert digest == sha256(chunks)
    assert inq(a_srv) == 0  # nothing stayed on the source


def test_ingress_redirect_lands_in_target_receive_queue(engine: KernelEngine, pairs: Pairs):
    a, a_srv = pairs()
    _b, b_srv = pairs()
    smap = engine.sockmap(2)
    engine.attach(
        smap, parser=programs.whole_segment(), verdict=programs.redirect_key(smap, 1, ingress=True)
    )
    smap[0] = a_srv
    smap[1] = b_srv
    a.sendall(b"to the other side's own queue")
    b_srv.settimeout(5)
    assert b_srv.recv(100) == b"to the other side's own queue"


def test_drop_verdict_drops(engine: KernelEngine, pairs: Pairs):
    a, a_srv = pairs()
    smap = engine.sockmap(1)
    engine.attach(smap, parser=programs.whole_segment(), verdict=programs.drop())
    smap[0] = a_srv
    a.sendall(b"x" * 1000)
    assert wait_until(lambda: tcp_counters(a_srv).bytes_received >= 1000)
    assert inq(a_srv) == 0
    a_srv.setblocking(False)
    with pytest.raises(BlockingIOError):
        a_srv.recv(10)


def test_pass_verdict_delivers_to_own_socket(engine: KernelEngine, pairs: Pairs):
    a, a_srv = pairs()
    smap = engine.sockmap(1)
    engine.attach(smap, parser=programs.whole_segment(), verdict=programs.pass_())
    smap[0] = a_srv
    a.sendall(b"kept")
    assert a_srv.recv(10) == b"kept"


def test_detach_restores_normal_delivery(engine: KernelEngine, pairs: Pairs):
    a, a_srv = pairs()
    smap = engine.sockmap(1)
    att = engine.attach(smap, parser=programs.whole_segment(), verdict=programs.drop())
    smap[0] = a_srv
    a.sendall(b"dropped")
    assert wait_until(lambda: tcp_counters(a_srv).bytes_received >= 7)
    assert inq(a_srv) == 0
    att.detach()
    assert query(smap, AttachType.SK_SKB_STREAM_VERDICT) == []
    # A socket keeps the programs it joined with until it leaves the map.
    del smap[0]
    a.sendall(b"normal again")
    assert a_srv.recv(100) == b"normal again"
    # A socket inserted after detach has no programs at all.
    c, c_srv = pairs()
    smap[0] = c_srv
    c.sendall(b"plain")
    assert c_srv.recv(100) == b"plain"


def test_detach_requires_the_attached_program(engine: KernelEngine):
    smap = engine.sockmap(1)
    att = engine.attach(smap, verdict=programs.drop())
    other = engine.load(programs.pass_())
    with pytest.raises(OSError) as ei:
        detach(smap, other, AttachType.SK_SKB_VERDICT)
    assert ei.value.errno == errno.ENOENT
    att.detach()


def test_closed_socket_disappears_from_map(engine: KernelEngine, pairs: Pairs):
    _a, a_srv = pairs()
    smap = engine.sockmap(4)
    engine.attach(smap, parser=programs.whole_segment(), verdict=programs.pass_())
    smap[2] = a_srv
    assert 2 in smap
    a_srv.close()
    with pytest.raises(KeyNotFound):
        smap.lookup(2)
    assert list(smap.items()) == []
