"""``programs.bounded_redirect`` on the kernel (verdict-only mode): redirect within the
bound, hold by passing past it or when the target is paused, release only once every
passed byte has been taken.

Kernel only for now: the verdict reads the target's ``tcp_sock`` (sockmap lookup,
``bpf_skc_to_tcp_sock``, ``bpf_sk_release``), which the userspace VM does not model yet.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from engines import Engine, insert, read_passed
from netutil import Pairs, wait_until
from sockmap import programs
from sockmap.datapath.splice import cookie_of
from sockmap.datapath.tcp import inq
from sockmap.kernel.engine import KernelEngine
from sockmap.kernel.features import bpf_access
from sockmap.programs.bounded import CONTROL, ROUTE, STATS


@dataclass
class Rig:
    client: socket.socket
    source: socket.socket
    target: socket.socket
    consumer: socket.socket
    stats: Any
    control: Any
    bound: int
    engine: Engine

    def stat(self, key: int) -> tuple[int, int, int, int]:
        held, passed, inflow, holds, *_ = STATS.unpack(self.stats.lookup(key))
        return held, passed, inflow, holds

    def send(self, data: bytes) -> None:
        """One segment, one verdict call: wait until the source has taken it."""

        def taken() -> int:
            return self.stat(0)[1] + self.stat(1)[2]  # passed by the source + redirected

        before = taken()
        self.client.sendall(data)
        assert wait_until(lambda: taken() == before + len(data))

    def take_passed(self) -> bytes:
        """What the source passed to itself (on the kernel, read no further than its
        psock queue: a longer recv falls back to the TCP queue, past the verdict)."""
        out = b""
        if isinstance(self.engine, KernelEngine):
            while n := inq(self.source):
                out += self.source.recv(n)
        else:
            while got := self.engine.recv(self.source, 1 << 20):
                out += got
        return out

    def consumed(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += self.consumer.recv(n - len(out))
        return out


@pytest.fixture
def engine() -> Iterator[Engine]:
    ok, why = bpf_access()
    if not ok:
        pytest.skip(f"kernel engine: bpf() refused: {why}")
    with KernelEngine() as eng:
        yield eng


@pytest.fixture(params=[1 << 20, 4096], ids=["bound1M", "bound4K"])
def rig(engine: Engine, pairs: Pairs, request: pytest.FixtureRequest) -> Iterator[Rig]:
    client, source = pairs()
    consumer, target = pairs()
    smap = engine.sockmap(2)
    routes = engine.hash(4, key_size=8, value_size=ROUTE.size)
    stats = engine.array(2, value_size=STATS.size)
    control = engine.array(2, value_size=CONTROL.size)
    verdict = programs.bounded_redirect(smap, routes, stats, control, bound=request.param)
    engine.attach(smap, verdict=verdict)
    routes[cookie_of(source)] = ROUTE.pack(0, 1)
    routes[cookie_of(target)] = ROUTE.pack(1, 0)
    insert(engine, smap, 1, target)
    insert(engine, smap, 0, source)
    yield Rig(client, source, target, consumer, stats, control, request.param, engine)
    del smap[0]
    del smap[1]


def test_redirects_while_within_the_bound(rig: Rig):
    rig.send(b"a" * 1000)
    assert rig.consumed(1000) == b"a" * 1000
    assert rig.stat(0)[:2] == (0, 0)
    assert rig.stat(1)[2] == 1000


def test_a_paused_target_holds_the_source_until_released(rig: Rig):
    rig.control[1] = CONTROL.pack(0, 0, 1, 0, 0)
    rig.send(b"b" * 500)
    assert rig.stat(0)[:2] == (1, 500)
    assert rig.stat(1)[3] == 1  # one hold because of the target
    rig.control[1] = CONTROL.pack(0, 0, 0, 1, 0)
    rig.send(b"c" * 300)  # still held: order is kept
    assert rig.stat(0)[:2] == (1, 800)
    # The control plane asks for release after taking 500 bytes, but 300 more were
    # passed since: the verdict keeps holding, or they would be overtaken.
    rig.control[0] = CONTROL.pack(501, 0, 0, 0, 0)
    rig.send(b"d" * 200)
    assert rig.stat(0)[:2] == (1, 1000)
    assert rig.take_passed() == b"b" * 500 + b"c" * 300 + b"d" * 200
    rig.control[0] = CONTROL.pack(1001, 0, 0, 0, 0)
    rig.send(b"e" * 100)
    assert rig.stat(0)[:2] == (0, 1000)
    assert rig.consumed(100) == b"e" * 100
    assert rig.stat(1)[2] == 100


def test_the_bound_holds_the_source(rig: Rig):
    first = b"f" * (rig.bound - 100)
    rig.send(first)
    assert rig.stat(0)[0] == 0
    assert rig.consumed(len(first)) == first
    # Bytes the control plane says it wrote into the target count in its backlog too.
    rig.control[1] = CONTROL.pack(0, rig.bound, 0, 0, 0)
    rig.send(b"g" * 200)  # inflow + user_written - bytes_acked + 200 > bound
    assert rig.stat(0)[:2] == (1, 200)
    assert rig.stat(1)[3] == 1
    assert rig.take_passed() == b"g" * 200
    # Nothing written by the control plane after all; resume the target, release.
    rig.control[1] = CONTROL.pack(0, 0, 0, 1, 0)
    rig.control[0] = CONTROL.pack(201, 0, 0, 0, 0)
    rig.send(b"h" * 300)
    assert rig.stat(0)[0] == 0
    assert rig.consumed(300) == b"h" * 300


def test_an_empty_message_is_passed_untouched(rig: Rig):
    rig.client.shutdown(socket.SHUT_WR)  # verdict-only mode: the FIN is an empty message
    assert wait_until(lambda: rig.source.recv(16) == b"")
    assert rig.stat(0)[:2] == (0, 0)
    assert rig.stat(1)[2:] == (0, 0)


def test_a_socket_without_a_route_keeps_its_bytes(engine: Engine, pairs: Pairs):
    client, source = pairs()
    smap = engine.sockmap(1)
    routes = engine.hash(4, key_size=8, value_size=ROUTE.size)
    stats = engine.array(1, value_size=STATS.size)
    control = engine.array(1, value_size=CONTROL.size)
    engine.attach(smap, verdict=programs.bounded_redirect(smap, routes, stats, control))
    insert(engine, smap, 0, source)
    client.sendall(b"x" * 64)
    assert read_passed(engine, source, 64) == b"x" * 64
    del smap[0]


@pytest.mark.parametrize("bound", [0, -1, 1 << 31])
def test_a_bound_out_of_range_is_refused(bound: int):
    with pytest.raises(ValueError, match="backlog bound"):
        programs.bounded_redirect(object(), object(), object(), object(), bound=bound)
