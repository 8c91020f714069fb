"""The two traps of raw sockmap, shown on the real kernel, and the helpers that handle them.

1. Bytes queued before a socket joins the map stay there until more data comes;
   ``kick`` (SO_RCVLOWAT) makes the kernel process them at once.
2. sockmap does not forward FIN: the redirect target never sends one by itself.
   ``KernelSplicer`` forwards it only once every byte has reached the target.
"""

from __future__ import annotations

import select
import socket
import struct
import threading

import pytest

from netutil import Pairs, random_chunks, recv_exactly, recv_to_eof, sha256, wait_until
from sockmap import programs
from sockmap.datapath.splice import KernelSplicer, fin_ready
from sockmap.datapath.tcp import inq, kick, tcp_counters
from sockmap.kernel.engine import KernelEngine

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("mode", ["strparser", "verdict"])
def test_bytes_queued_before_insertion_stall_until_kicked(
    engine: KernelEngine,
    pairs: Pairs,
    mode: str,
):
    a, a_srv = pairs()
    b, b_srv = pairs()
    smap = engine.sockmap(2)
    parser = programs.whole_segment() if mode == "strparser" else None
    engine.attach(smap, parser=parser, verdict=programs.redirect_key(smap, 1))
    early = b"early bytes " * 1000
    a.sendall(early)
    assert wait_until(lambda: inq(a_srv) == len(early))
    smap[0] = a_srv
    smap[1] = b_srv
    # The trap: nothing moves, the bytes sit in the source's queue.
    b.setblocking(False)
    assert not select.select([b], [], [], 0.3)[0]
    # (SIOCINQ cannot show them now: on a socket in a map it reports the psock's queue.)
    # The fix: a kick makes the kernel parse and redirect them, in order.
    kick(a_srv)
    b.setblocking(True)
    b.settimeout(5)
    got, digest = recv_exactly(b, len(early))
    assert got == len(early)
    assert digest == sha256([early])


def test_fin_is_not_forwarded_by_the_kernel(engine: KernelEngine, pairs: Pairs):
    a, a_srv = pairs()
    b, b_srv = pairs()
    smap = engine.sockmap(2)
    engine.attach(smap, parser=programs.whole_segment(), verdict=programs.redirect_key(smap, 1))
    smap[0] = a_srv
    smap[1] = b_srv
    ep = select.epoll()
    ep.register(a_srv.fileno(), select.EPOLLRDHUP)
    a.sendall(b"last words")
    a.shutdown(socket.SHUT_WR)
    assert b.recv(100) == b"last words"
    # The source sees the half-close ...
    assert ep.poll(5)
    ep.close()
    # ... but the target's peer never gets a FIN: no EOF, just silence.
    assert not select.select([b], [], [], 0.3)[0]


@pytest.mark.parametrize("mode", ["strparser", "verdict"])
def test_splicer_forwards_fin_after_the_last_byte(engine: KernelEngine, pairs: Pairs, mode: str):
    """A large transfer followed at once by a half-close arrives whole, then EOF."""
    client, client_srv = pairs()
    backend, backend_srv = pairs()
    total = 64 << 20
    chunks = random_chunks(total, seed=11, max_chunk=1 << 20)
    with KernelSplicer(engine, 4, mode) as splicer:  # type: ignore[arg-type]
        pair = splicer.splice(client_srv, backend_srv)

        def send() -> None:
            for c in chunks:
                client.sendall(c)
            client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        backend.settimeout(30)
        got, digest = recv_to_eof(backend)  # ends only when the forwarded FIN arrives
        sender.join(30)
        assert got == total
        assert digest == sha256(chunks)
        # Close the other direction too: the pair then finishes and closes itself.
        backend.sendall(b"bye")
        backend.shutdown(socket.SHUT_WR)
        client.settimeout(10)
        assert recv_to_eof(client)[0] == 3
        assert pair.done.wait(10)
        assert splicer.stats.fins_forwarded == 2
        assert splicer.stats.fins_forced == 0
        assert splicer.stats.resets == 0
        assert splicer.active == 0


def test_fin_ready_waits_for_redirected_bytes(engine: KernelEngine, pairs: Pairs):
    """While the target's reader is stalled, redirected bytes are not all written yet."""
    a, a_srv = pairs()
    b, b_srv = pairs()
    smap = engine.sockmap(2)
    engine.attach(smap, parser=programs.whole_segment(), verdict=programs.redirect_key(smap, 1))
    smap[0] = a_srv
    smap[1] = b_srv
    total = 32 << 20
    sender = threading.Thread(target=lambda: a.sendall(b"z" * total), daemon=True)
    sender.start()
    # b does not read: bytes pile up in the kernel's redirect queue.
    assert wait_until(lambda: tcp_counters(a_srv).consumed >= total, timeout=20)
    assert not fin_ready(a_srv, b_srv)
    got, _ = recv_exactly(b, total)
    assert got == total
    assert wait_until(lambda: fin_ready(a_srv, b_srv))
    sender.join(10)


def test_splicer_passes_a_reset_on(engine: KernelEngine, pairs: Pairs):
    client, client_srv = pairs()
    backend, backend_srv = pairs()
    with KernelSplicer(engine, 2) as splicer:
        pair = splicer.splice(client_srv, backend_srv)
        client.sendall(b"hello")
        assert backend.recv(10) == b"hello"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        assert pair.done.wait(10)
        assert splicer.stats.resets == 1
        backend.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while backend.recv(100):
                pass
