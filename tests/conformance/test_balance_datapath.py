"""The message balancer (``sockmap.datapath.balance``) on both engines: messages spread
over backends and answered whole, a backend that dies taken out, half-closes passed on,
and a malformed message closing only its own client."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from engines import Engine
from netutil import Pairs, wait_until
from sockmap import programs
from sockmap.bench.messages import TaggingServer, frame, random_bodies, read_message, send_chunked
from sockmap.datapath.balance import Balancer
from sockmap.programs import LengthField
from sockmap.programs.balance import Policy


def connect_group(bal: Balancer, pairs: Pairs, servers: list[TaggingServer]) -> socket.socket:
    """A client socket whose proxy side joins ``bal`` with a connection to each server."""
    client, proxied = pairs()
    backends: list[socket.socket | None] = []
    for s in servers:
        host, port = s.address.split(":")
        backends.append(socket.create_connection((host, int(port)), timeout=5))
    bal.add(proxied, backends)
    pairs.sockets.remove(proxied)  # the balancer owns it now
    return client


def converse(client: socket.socket, bodies: list[bytes], seed: int) -> list[bytes]:
    """Send every framed body (cut at random points) and read as many responses."""
    data = b"".join(frame(b) for b in bodies)
    sender = threading.Thread(target=send_chunked, args=(client, data, seed), daemon=True)
    sender.start()
    got = []
    for _ in bodies:
        msg = read_message(client)
        assert msg is not None, f"EOF after {len(got)} of {len(bodies)} responses"
        got.append(msg)
    sender.join(10)
    return got


def check_answers(bodies: list[bytes], answers: list[bytes]) -> dict[bytes, int]:
    """Every request answered once, whole; return how many each backend answered."""
    share: dict[bytes, int] = {}
    seen = []
    for a in answers:
        share[a[:1]] = share.get(a[:1], 0) + 1
        seen.append(a[1:])
    assert sorted(seen) == sorted(bodies)
    return share


def test_messages_are_spread_and_answered_whole(
    engine: Engine, servers: list[TaggingServer]
) -> None:
    pairs = Pairs()
    bal = Balancer(engine, programs.preset("dns"), Policy("round-robin"), max_clients=16)
    try:
        clients = [connect_group(bal, pairs, servers) for _ in range(6)]
        results: dict[int, list[bytes]] = {}
        bodies = {i: random_bodies(150, seed=i) for i in range(len(clients))}

        def run(i: int) -> None:
            results[i] = converse(clients[i], bodies[i], seed=100 + i)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        total: dict[bytes, int] = {}
        for i in range(len(clients)):
            for k, v in check_answers(bodies[i], results[i]).items():
                total[k] = total.get(k, 0) + v
        assert total[b"A"] + total[b"B"] == 900
        assert min(total.values()) >= 300, total  # round robin: close to half each
        counts = bal.read_counters()
        assert counts.requests[0][0] + counts.requests[1][0] == 900
        assert counts.responses[0][0] == total[b"A"]
        assert counts.responses[1][0] == total[b"B"]
        assert (
            counts.requests[0][1]
            == sum(len(frame(b)) for i in bodies for b in bodies[i]) - counts.requests[1][1]
        )
        assert counts.dropped == (0, 0)
    finally:
        bal.close()
        pairs.close()


def test_hash_policy_sends_equal_bytes_to_one_backend(
    engine: Engine, servers: list[TaggingServer]
) -> None:
    pairs = Pairs()
    bal = Balancer(engine, programs.preset("dns"), Policy("hash", start=6, length=2))  # body[4:6]
    try:
        client = connect_group(bal, pairs, servers)
        bodies = [struct.pack(">IH", i, i % 7) + b"x" * (i % 50) for i in range(200)]
        answers = converse(client, bodies, seed=5)
        check_answers(bodies, answers)
        by_key: dict[int, set[bytes]] = {}
        for a in answers:
            by_key.setdefault(struct.unpack(">H", a[5:7])[0], set()).add(a[:1])
        assert all(len(tags) == 1 for tags in by_key.values()), by_key
        assert len({t for tags in by_key.values() for t in tags}) == 2  # both used
    finally:
        bal.close()
        pairs.close()


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_a_dead_backend_is_taken_out(
    engine: Engine, servers: list[TaggingServer], reset: bool
) -> None:
    pairs = Pairs()
    bal = Balancer(engine, programs.preset("dns"), Policy("round-robin"))
    try:
        client = connect_group(bal, pairs, servers)
        check_answers(first := random_bodies(40, seed=1), converse(client, first, seed=2))
        servers[0].drop_connections(reset=reset)
        assert wait_until(lambda: bal.stats.backend_closes == 1)
        later = random_bodies(60, seed=3)
        share = check_answers(later, converse(client, later, seed=4))
        assert share == {b"B": 60}
        assert bal.read_counters().dropped == (0, 0)
        # The last backend leaving closes the client cleanly (as the server would have).
        servers[1].drop_connections()
        client.settimeout(10)
        assert client.recv(1) == b""
    finally:
        bal.close()
        pairs.close()


def test_client_half_close_gets_every_answer_then_eof(
    engine: Engine, servers: list[TaggingServer]
) -> None:
    pairs = Pairs()
    bal = Balancer(engine, programs.preset("dns"), Policy("round-robin"))
    try:
        client = connect_group(bal, pairs, servers)
        bodies = random_bodies(100, seed=9)
        send_chunked(client, b"".join(frame(b) for b in bodies), seed=10)
        client.shutdown(socket.SHUT_WR)
        client.settimeout(20)
        answers = []
        while (m := read_message(client)) is not None:
            answers.append(m)
        check_answers(bodies, answers)
        assert wait_until(lambda: bal.active == 0)
        assert bal.stats.fins_forced == 0
    finally:
        bal.close()
        pairs.close()


def test_an_oversized_message_closes_only_its_client(
    engine: Engine, servers: list[TaggingServer]
) -> None:
    pairs = Pairs()
    bal = Balancer(engine, programs.preset("dns", max_size=1000), Policy("round-robin"))
    try:
        good = connect_group(bal, pairs, servers)
        bad = connect_group(bal, pairs, servers)
        check_answers(b1 := random_bodies(20, seed=1, high=900), converse(good, b1, seed=1))
        bad.sendall(frame(b"ok") + struct.pack(">H", 5000) + b"z" * 5000)
        bad.settimeout(10)
        # The client is reset at once (an answer still in flight to it may be lost),
        # never closed cleanly.
        with pytest.raises(ConnectionResetError):
            while read_message(bad) is not None:
                pass
        assert wait_until(lambda: bal.stats.parser_errors == 1)
        check_answers(b2 := random_bodies(50, seed=2, high=900), converse(good, b2, seed=2))
        assert bal.active == 1
    finally:
        bal.close()
        pairs.close()


def test_a_malformed_length_field_closes_only_its_client(engine: Engine) -> None:
    """A 4-byte length that counts the whole message: a value under 4 is malformed."""
    whole = LengthField(4, "big", adjust=0)
    servers = [TaggingServer(b"A", whole), TaggingServer(b"B", whole)]
    pairs = Pairs()
    bal = Balancer(engine, programs.length_prefixed(4, "big", 0), Policy("round-robin"))
    try:
        good = connect_group(bal, pairs, servers)
        bad = connect_group(bal, pairs, servers)
        bad.sendall(frame(b"fine", whole) + struct.pack(">I", 2) + b"zz")
        bad.settimeout(10)
        with pytest.raises(ConnectionResetError):
            while read_message(bad, whole) is not None:
                pass
        assert wait_until(lambda: bal.stats.parser_errors == 1)
        bodies = random_bodies(40, seed=3)
        data = b"".join(frame(b, whole) for b in bodies)
        send_chunked(good, data, seed=3)
        good.settimeout(10)
        check_answers(bodies, [read_message(good, whole) or b"" for _ in bodies])
        assert bal.active == 1
    finally:
        bal.close()
        pairs.close()
        for s in servers:
            s.close()
