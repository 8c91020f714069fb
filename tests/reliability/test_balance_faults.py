"""Faults through ``sockmap proxy --mode balance`` on both engines, with a reconciling
message ledger.

Balance mode cannot promise what splice mode does (an error for every lost byte): a
request already handed to a backend that then dies gets no answer and no error, by
design (docs/proxy.md). What it must guarantee, and what this checks:

- every answer a client gets is whole, is an answer to one of *its* requests, and comes
  at most once;
- every request is accounted for: answered, or handed to a backend that failed (the
  verdict's per-backend counter minus what that backend answered), or dropped by the
  proxy and counted; a backend that did not fail loses nothing;
- a client that resets, or reads slowly, costs the others nothing, and every group is
  released at the end.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from report import record, size

from netutil import wait_until
from sockmap.bench.messages import TaggingServer, frame, read_message
from sockmap.proxy import Proxy, ProxyConfig


@dataclass
class Client:
    """One client's requests and what came back."""

    cid: int
    bodies: list[bytes]
    slow: bool = False
    reset_after: int = 0  # reset the connection after this many answers (0: never)
    answers: list[bytes] = field(default_factory=list)
    error: str = ""
    done: bool = False


def bodies_for(cid: int, n: int, rng: random.Random) -> list[bytes]:
    return [
        f"c{cid:03d}-{i:05d}-".encode() + rng.randbytes(rng.randint(8, 900)) for i in range(n)
    ]


def run_client(addr: tuple[str, int], c: Client, window: int, rng: random.Random) -> None:
    """Send with at most ``window`` requests outstanding; read until every request is
    answered or the proxy stops answering for 3 s."""
    sent = 0
    try:
        with socket.create_connection(addr, timeout=3) as s:
            while len(c.answers) < len(c.bodies):
                while sent < len(c.bodies) and sent - len(c.answers) < window:
                    s.sendall(frame(c.bodies[sent]))
                    sent += 1
                if c.slow:
                    time.sleep(rng.uniform(0, 0.004))
                try:
                    got = read_message(s)
                except TimeoutError:
                    c.error = "no answer for 3 s"
                    break
                if got is None:
                    c.error = "EOF"
                    break
                c.answers.append(got)
                if c.reset_after and len(c.answers) >= c.reset_after:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    c.error = "reset by the client"
                    break
    except OSError as e:
        c.error = type(e).__name__
    finally:
        c.done = True


@pytest.fixture
def backends() -> Iterator[list[TaggingServer]]:
    servers = [TaggingServer(b"A"), TaggingServer(b"B")]
    yield servers
    for s in servers:
        s.close()


def test_a_backend_reset_loses_only_what_it_held_and_a_bad_client_costs_nothing(
    engine_name: str, backends: list[TaggingServer]
) -> None:
    rng = random.Random(7)
    n_clients, per_client = 8, size(200, 2000)
    clients = [Client(i, bodies_for(i, per_client, rng)) for i in range(n_clients)]
    clients[6].slow = True
    clients[7].reset_after = per_client // 4
    cfg = ProxyConfig(
        listen=["127.0.0.1:0"],
        backends=[b.address for b in backends],
        mode="balance",
        framing="dns",
        engine=engine_name,  # type: ignore[arg-type]
        metrics="off",
        idle_timeout=30.0,
    )
    with Proxy(cfg) as proxy:
        addr = proxy.addresses[0]
        threads = [
            threading.Thread(
                target=run_client, args=(addr, c, 16, random.Random(c.cid)), daemon=True
            )
            for c in clients
        ]
        for t in threads:
            t.start()
        # Backend A resets every connection once a third of the answers are in.
        wait_until(lambda: sum(len(c.answers) for c in clients) >= n_clients * per_client // 3, 30)
        backends[0].drop_connections(reset=True)
        a_requests_at_reset = backends[0].requests
        for t in threads:
            t.join(120)
        assert all(c.done for c in clients), "a client thread hung"
        bal = proxy.balancer
        assert bal is not None
        counters = bal.read_counters()
        assert wait_until(lambda: proxy.active == 0, 15), f"{proxy.active} groups left open"

    # Every answer whole, to its own client, at most once.
    for c in clients:
        mine = set(c.bodies)
        bodies = [a[1:] for a in c.answers]
        assert all(b in mine for b in bodies), f"client {c.cid} got someone else's answer"
        assert len(bodies) == len(set(bodies)), f"client {c.cid} got an answer twice"
    # The well-behaved clients: unanswered requests only where backend A failed.
    good = [c for c in clients if not c.reset_after]
    sent = sum(len(c.bodies) for c in good)
    answered = sum(len(c.answers) for c in good)
    from_a = sum(1 for c in good for a in c.answers if a[:1] == b"A")
    from_b = sum(1 for c in good for a in c.answers if a[:1] == b"B")
    requests_to = [m for m, _ in counters.requests[:2]]
    bad = clients[7]
    bad_sent_at_most = min(len(bad.bodies), len(bad.answers) + 16)
    # Backend B did not fail: it answered every request the verdict gave it (the
    # resetting client's few in flight aside).
    assert requests_to[1] - from_b - sum(1 for a in bad.answers if a[:1] == b"B") <= 16
    lost_at_a = sent - answered
    assert lost_at_a <= requests_to[0] - from_a, (sent, answered, requests_to, from_a)
    # What backend A lost is what it held when it reset: bounded by the window.
    assert lost_at_a <= 16 * n_clients, lost_at_a
    # The slow client and the others got every answer but A's losses.
    for c in good:
        assert c.error in ("", "no answer for 3 s"), (c.cid, c.error)
    assert bad.error == "reset by the client"
    record(
        f"balance_faults_{engine_name}",
        {
            "clients": n_clients,
            "requests": sent + bad_sent_at_most,
            "answered": answered + len(bad.answers),
            "unanswered_lost_at_reset_backend": lost_at_a,
            "backend_a_requests_read_at_reset": a_requests_at_reset,
            "verdict_requests_per_backend": requests_to,
            "verdict_dropped": counters.dropped[0],
            "answers_from": {"A": from_a, "B": from_b},
            "faults": {"backend_reset": 1, "client_reset": 1, "slow_client": 1},
        },
    )


def test_every_client_at_once_with_a_backend_refusing(
    engine_name: str, backends: list[TaggingServer]
) -> None:
    """Many clients at once while one backend address refuses connections: every
    request answered by the live backend, whole and to its client."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = "{}:{}".format(*closed.getsockname())
    rng = random.Random(3)
    n_clients = size(64, 400)
    clients = [Client(i, bodies_for(i, 20, rng)) for i in range(n_clients)]
    cfg = ProxyConfig(
        listen=["127.0.0.1:0"],
        backends=[refused, backends[1].address],
        mode="balance",
        framing="dns",
        engine=engine_name,  # type: ignore[arg-type]
        metrics="off",
        max_pairs=n_clients + 8,
    )
    with Proxy(cfg) as proxy:
        addr = proxy.addresses[0]
        threads = [
            threading.Thread(
                target=run_client, args=(addr, c, 4, random.Random(c.cid)), daemon=True
            )
            for c in clients
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert wait_until(lambda: proxy.active == 0, 15), f"{proxy.active} groups left open"
    for c in clients:
        assert c.error == "", (c.cid, c.error)
        assert sorted(a[1:] for a in c.answers) == sorted(c.bodies)
        assert {a[:1] for a in c.answers} == {b"B"}
    record(
        f"balance_refused_{engine_name}",
        {"clients": n_clients, "requests": 20 * n_clients, "answered": 20 * n_clients},
    )
