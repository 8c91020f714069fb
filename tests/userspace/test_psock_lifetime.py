"""A psock's life on the userspace engine follows the socket, as the kernel's does: a dup
keeps it running after the fd it was inserted with closes, and leaving a map with
programs while staying in another stops its programs (``sock_map_del_link``)."""

from __future__ import annotations

import socket
import time

import pytest

from netutil import Pairs
from sockmap import programs
from sockmap.userspace.engine import UserspaceEngine


@pytest.fixture
def tcp_pair(pairs: Pairs) -> tuple[socket.socket, socket.socket]:
    return pairs()


def passed(eng: UserspaceEngine, sock: socket.socket, n: int) -> bytes:
    """What the verdict passed for ``sock``: ``n`` bytes, waited for (bounded)."""
    got = b""
    deadline = time.monotonic() + 5
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {got!r} passed in 5 s"
        got += eng.recv(sock)
        time.sleep(0.005)
    return got


def test_a_dup_keeps_the_psock_running(tcp_pair) -> None:
    client, server = tcp_pair
    with UserspaceEngine() as eng:
        m = eng.sockhash(2)
        eng.attach(m, verdict=programs.pass_())
        m.update(1, client)
        dup = client.dup()
        client.close()
        time.sleep(0.2)  # the reaper's turns (every 50 ms); no timing is judged
        server.sendall(b"after")
        assert passed(eng, dup, 5) == b"after"
        assert eng.stats(dup).passed >= 1
        assert list(m.keys()) == [1]
        dup.close()
        time.sleep(0.2)
        assert list(m.keys()) == []
        assert server.recv(16) == b""  # closed: the engine's own dup went with it


def test_leaving_a_map_with_programs_stops_them(tcp_pair) -> None:
    client, server = tcp_pair
    with UserspaceEngine() as eng:
        plain, progs = eng.sockhash(2), eng.sockhash(2)
        eng.attach(progs, verdict=programs.pass_())
        plain.update(0, client)
        progs.update(0, client)
        server.sendall(b"in")
        assert passed(eng, client, 2) == b"in"
        del progs[0]  # still in `plain`: the psock stays, its verdict stops
        server.sendall(b"out")
        time.sleep(0.2)  # a running verdict would have read it by now
        assert eng.recv(client) == b""
        assert client.recv(16, socket.MSG_DONTWAIT) == b"out"  # still in the socket's queue
        progs.update(1, client)  # the verdict slot is free again
        assert list(progs.keys()) == [1]
