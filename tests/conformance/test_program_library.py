"""The ready-made programs on both engines, held to one plain-Python reference.

Each case sends a random stream of messages, cut at random points, from one source
through a parser and a verdict to four backends (keys 1-4), and checks that every
backend received exactly the messages the reference routes to it, in order. The
reference is the same for both engines, so the engines agree with each other too.
Every program used here is therefore also accepted by the kernel verifier.
"""

from __future__ import annotations

import errno
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from engines import Engine, bytes_consumed, insert, read_passed, socket_error
from netutil import Pairs, recv_exactly, sha256, wait_until
from sockmap import asm, programs
from sockmap.datapath.splice import cookie_of
from sockmap.programs import PRESETS, LengthField, fnv1a

BACKENDS = 4
Route = Callable[[int, bytes], int | None]
"""(index of the message, message) -> key it goes to (None: dropped)."""


def make_message(f: LengthField, rng: random.Random, cap: int = 4000) -> bytes:
    """A random message that ``f`` frames as exactly its own size."""
    field_max = (1 << (8 * f.width)) - 1
    lo = max(f.header, f.adjust)
    hi = min(cap, field_max + f.adjust, f.max_size or cap)
    size = rng.randint(lo, hi)
    msg = bytearray(rng.randbytes(size))
    msg[f.offset : f.header] = (size - f.adjust).to_bytes(f.width, f.order)
    assert f.size_of(bytes(msg)) == size
    return bytes(msg)


@dataclass
class Setup:
    engine: Engine
    pairs: Pairs
    smap: object = None
    source: socket.socket | None = None
    source_srv: socket.socket | None = None
    backends: list[tuple[socket.socket, socket.socket]] | None = None

    def build(self, parser: asm.Program | None, verdict: Callable[[object], asm.Program]) -> None:
        self.smap = self.engine.sockmap(1 + BACKENDS)
        self.engine.attach(self.smap, parser=parser, verdict=verdict(self.smap))
        self.source, self.source_srv = self.pairs()
        self.backends = [self.pairs() for _ in range(BACKENDS)]
        for key, (_, srv) in enumerate(self.backends, 1):
            insert(self.engine, self.smap, key, srv)
        insert(self.engine, self.smap, 0, self.source_srv)

    def send(self, messages: list[bytes], rng: random.Random) -> threading.Thread:
        stream = b"".join(messages)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, 3 * len(messages))))
        pieces = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        src = self.source
        assert src is not None
        src.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = threading.Thread(target=lambda: [src.sendall(p) for p in pieces], daemon=True)
        t.start()
        return t

    def check(self, messages: list[bytes], route: Route, *, ingress: bool = False) -> None:
        want: dict[int, list[bytes]] = {k: [] for k in range(1, BACKENDS + 1)}
        for i, m in enumerate(messages):
            key = route(i, m)
            if key is not None:
                want[key].append(m)
        assert self.backends is not None
        for key, (peer, srv) in enumerate(self.backends, 1):
            total = sum(map(len, want[key]))
            if ingress:
                got = read_passed(self.engine, srv, total)
                assert (len(got), sha256([got])) == (total, sha256(want[key])), f"key {key}"
            else:
                peer.settimeout(10)
                assert recv_exactly(peer, total) == (total, sha256(want[key])), f"key {key}"


@pytest.fixture
def setup(engine: Engine, pairs: Pairs) -> Setup:
    return Setup(engine, pairs)


def by_hash(start: int, length: int) -> Route:
    """hash_route's reference: a message too short for the range hashes as empty."""

    def route(_i: int, m: bytes) -> int:
        key = m[start : start + length] if len(m) >= start + length else b""
        return 1 + fnv1a(key) % BACKENDS

    return route


FIELDS = [
    LengthField(1, "big", adjust=1),
    LengthField(2, "little", adjust=5, offset=3),
    LengthField(4, "big", adjust=4),
    LengthField(4, "little", adjust=0, offset=2),
    LengthField(8, "big", adjust=8),
    LengthField(8, "little", adjust=-2, offset=4),
]


@pytest.mark.parametrize("f", FIELDS, ids=lambda f: f"w{f.width}{f.order[0]}a{f.adjust}o{f.offset}")
def test_length_prefixed_with_hash_routing(setup: Setup, f: LengthField) -> None:
    """Framing is exact wherever a message starts: routing by its bytes depends on it."""
    rng = random.Random(f.width * 31 + f.offset)
    messages = [make_message(f, rng, cap=600) for _ in range(300)]
    setup.build(
        programs.length_prefixed(f.width, f.order, f.adjust, f.offset),
        lambda m: programs.hash_route(m, f.header, 3, BACKENDS, first=1, mode="strparser"),
    )
    t = setup.send(messages, rng)
    setup.check(messages, by_hash(f.header, 3))
    t.join(10)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_frame_their_protocol(setup: Setup, name: str) -> None:
    f = PRESETS[name]
    rng = random.Random(name)
    messages = [make_message(f, rng) for _ in range(150)]
    setup.build(
        programs.preset(name),
        lambda m: programs.hash_route(m, 0, f.header + 2, BACKENDS, first=1, mode="strparser"),
    )
    t = setup.send(messages, rng)
    setup.check(messages, by_hash(0, f.header + 2))
    t.join(10)


def test_fixed_size_with_round_robin(setup: Setup) -> None:
    rng = random.Random(4)
    messages = [rng.randbytes(100) for _ in range(400)]
    counter = setup.engine.array(1, value_size=8)
    setup.build(
        programs.fixed_size(100),
        lambda m: programs.round_robin(m, counter, BACKENDS, first=1),
    )
    t = setup.send(messages, rng)
    setup.check(messages, lambda i, _m: 1 + i % BACKENDS)
    t.join(10)
    assert counter[0] == struct.pack("<Q", 400)


@pytest.mark.parametrize("order", ["big", "little"])
def test_field_route_with_a_default(setup: Setup, order: str) -> None:
    """A 2-byte field at offset 4 (after the 4-byte length) picks the backend."""
    rng = random.Random(7)
    table = setup.engine.hash(8, key_size=8, value_size=4)
    routes = {7: 1, 300: 2, 65535: 3}
    for value, key in routes.items():
        table[struct.pack("<Q", value)] = struct.pack("<I", key)
    values = [*routes, 1, 2, 9999]
    messages = []
    for _ in range(300):
        body = rng.choice(values).to_bytes(2, order) + rng.randbytes(rng.randint(0, 500))  # type: ignore[arg-type]
        messages.append(struct.pack(">I", len(body)) + body)
    messages.append(struct.pack(">I", 1) + b"x")  # too short for the field: the default
    setup.build(
        programs.length_prefixed(adjust=4),
        lambda m: programs.field_route(
            m,
            table,
            4,
            2,
            order=order,
            default=4,
            mode="strparser",  # type: ignore[arg-type]
        ),
    )
    t = setup.send(messages, rng)

    def route(_i: int, m: bytes) -> int:
        if len(m) < 6:
            return 4
        return routes.get(int.from_bytes(m[4:6], order), 4)  # type: ignore[arg-type]

    setup.check(messages, route)
    t.join(10)


def test_field_route_drops_unknown_values_without_a_default(setup: Setup) -> None:
    rng = random.Random(8)
    table = setup.engine.hash(4, key_size=8, value_size=4)
    table[struct.pack("<Q", 1)] = struct.pack("<I", 2)
    messages = [bytes([rng.choice([1, 2])]) * 50 for _ in range(200)]
    setup.build(
        programs.fixed_size(50),
        lambda m: programs.field_route(m, table, 0, 1, mode="strparser"),
    )
    t = setup.send(messages, rng)
    setup.check(messages, lambda _i, m: 2 if m[0] == 1 else None)
    t.join(10)


def test_verdict_only_mode_hash_routing_of_single_writes(setup: Setup) -> None:
    """No parser: each received segment is a message; writes spaced so each is one."""
    rng = random.Random(9)
    setup.build(None, lambda m: programs.hash_route(m, 0, 8, BACKENDS, first=1))
    src, srv = setup.source, setup.source_srv
    assert src is not None
    assert srv is not None
    messages: list[bytes] = []
    sent = 0
    for _ in range(40):
        m = rng.randbytes(rng.randint(8, 300))
        messages.append(m)
        src.sendall(m)
        sent += len(m)
        assert wait_until(lambda n=sent: bytes_consumed(setup.engine, srv) >= n)
    setup.check(messages, by_hash(0, 8))


def test_hash_route_ingress(setup: Setup) -> None:
    rng = random.Random(10)
    messages = [make_message(PRESETS["dns"], rng, cap=300) for _ in range(100)]
    setup.build(
        programs.preset("dns"),
        lambda m: programs.hash_route(m, 2, 4, BACKENDS, first=1, mode="strparser", ingress=True),
    )
    t = setup.send(messages, rng)
    setup.check(messages, by_hash(2, 4), ingress=True)
    t.join(10)


def test_pair_redirects_to_key_xor_1(setup: Setup) -> None:
    """Source at key 0 -> key 1; the pair map says which key each socket has."""
    keys = setup.engine.hash(8, key_size=8, value_size=4)
    setup.build(programs.whole_segment(), lambda m: programs.pair(m, keys))
    assert setup.source_srv is not None
    keys[cookie_of(setup.source_srv)] = struct.pack("<I", 0)
    rng = random.Random(11)
    messages = [rng.randbytes(1000) for _ in range(50)]
    t = setup.send(messages, rng)
    setup.check(messages, lambda _i, _m: 1)
    t.join(10)


@pytest.mark.parametrize(
    ("claimed", "err"),
    [(5000, errno.EMSGSIZE), (2, errno.EBADMSG)],
    ids=["over_max", "shorter_than_header"],
)
def test_bad_length_stops_the_stream_with_an_error(setup: Setup, claimed: int, err: int) -> None:
    """Good messages before the bad one are delivered; the socket then reports the error."""
    f = LengthField(4, "big", adjust=0, max_size=1000)
    good = [struct.pack(">I", 10) + b"okokok", struct.pack(">I", 8) + b"fine"]
    setup.build(
        programs.length_prefixed(4, "big", 0, max_size=1000),
        lambda m: programs.redirect_key(m, 1),
    )
    bad = struct.pack(">I", claimed) + b"z" * 20
    assert f.size_of(bad) == -err
    t = setup.send([*good, bad], random.Random(12))
    setup.check(good, lambda _i, _m: 1)
    srv = setup.source_srv
    assert srv is not None
    assert wait_until(lambda: socket_error(setup.engine, srv) == err)
    t.join(10)


@pytest.mark.parametrize(
    "partial", [b"\x00\x00", struct.pack(">I", 100) + b"half"], ids=["header", "body"]
)
def test_a_message_left_incomplete_past_so_rcvtimeo_stops_the_stream(
    setup: Setup, partial: bytes
) -> None:
    """The strparser times each message from its first bytes with the socket's SO_RCVTIMEO:
    one still incomplete then stops the stream with ETIMEDOUT (a slowloris guard); whole
    messages before it, and a message completed in time, are delivered."""
    setup.build(programs.length_prefixed(4, "big", 4), lambda m: programs.redirect_key(m, 1))
    srv, src = setup.source_srv, setup.source
    assert srv is not None
    assert src is not None
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 400_000))
    first = struct.pack(">I", 4) + b"late"
    src.sendall(first[:5])
    time.sleep(0.2)  # within the timeout
    src.sendall(first[5:] + partial)
    setup.check([first], lambda _i, _m: 1)
    assert socket_error(setup.engine, srv) == 0
    assert wait_until(lambda: socket_error(setup.engine, srv) == errno.ETIMEDOUT, timeout=5)
