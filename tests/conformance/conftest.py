"""Fixtures for the conformance suite: one set of map tests, run over both engines.

``engine_maps`` is parametrized over ``kernel`` and ``userspace``; the kernel param
skips (saying why) only when this process may not call bpf().
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest

from sockmap.datapath.tcp import tcp_counters
from sockmap.kernel import maps as kmaps
from sockmap.kernel.features import bpf_access
from sockmap.userspace import maps as umaps

TCP_CLOSE_WAIT = 8
TCP_FIN_WAIT2 = 5


def kernel_refusal() -> str | None:
    """Why bpf() is refused here, or None when the kernel engine can run."""
    permitted, why = bpf_access()
    return None if permitted else why


def wait_for_tcp_state(sock: socket.socket, state: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while tcp_counters(sock).state != state:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


class Sockets:
    """Loopback sockets in the states a sockmap cares about; all closed at the end."""

    def __init__(self) -> None:
        self._all: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._listener6: socket.socket | None = None

    def track(self, sock: socket.socket) -> socket.socket:
        self._all.append(sock)
        return sock

    def listener(self) -> socket.socket:
        if self._listener is None:
            self._listener = self.track(socket.create_server(("127.0.0.1", 0)))
        return self._listener

    def listener6(self) -> socket.socket:
        if self._listener6 is None:
            self._listener6 = self.track(socket.create_server(("::1", 0), family=socket.AF_INET6))
        return self._listener6

    def tcp_pair(self) -> tuple[socket.socket, socket.socket]:
        lst = self.listener()
        client = self.track(socket.create_connection(lst.getsockname(), timeout=5))
        server, _ = lst.accept()
        self.track(server)
        return client, server

    def tcp6_pair(self) -> tuple[socket.socket, socket.socket]:
        lst = self.listener6()
        client = self.track(socket.create_connection(lst.getsockname()[:2], timeout=5))
        server, _ = lst.accept()
        self.track(server)
        return client, server

    def unbound_tcp(self, family: int = socket.AF_INET) -> socket.socket:
        return self.track(socket.socket(family, socket.SOCK_STREAM))

    def bound_tcp(self) -> socket.socket:
        s = self.unbound_tcp()
        s.bind(("127.0.0.1", 0))
        return s

    def refused_tcp(self) -> socket.socket:
        """A TCP socket whose connect was refused: state CLOSE."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        s = self.unbound_tcp()
        with contextlib.suppress(OSError):
            s.connect(("127.0.0.1", port))
        return s

    def fin_wait2(self) -> socket.socket:
        client, _ = self.tcp_pair()
        client.shutdown(socket.SHUT_WR)
        assert wait_for_tcp_state(client, TCP_FIN_WAIT2)
        return client

    def udp(self, family: int = socket.AF_INET, bind: str | None = None) -> socket.socket:
        s = self.track(socket.socket(family, socket.SOCK_DGRAM))
        if bind is not None:
            s.bind((bind, 0))
        return s

    def udp_connected(self) -> socket.socket:
        s = self.udp()
        s.connect(("127.0.0.1", 9))  # binds it
        return s

    def unix_pair(self, kind: int = socket.SOCK_STREAM) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        return self.track(a), self.track(b)

    def unix(self, kind: int = socket.SOCK_STREAM) -> socket.socket:
        return self.track(socket.socket(socket.AF_UNIX, kind))

    def unix_listening(self) -> socket.socket:
        s = self.unix()
        s.bind(f"\0sockmap-conf-{os.getpid()}-{id(s)}")
        s.listen()
        return s

    def unix_connected(self) -> tuple[socket.socket, socket.socket]:
        lst = self.unix_listening()
        c = self.unix()
        c.connect(lst.getsockname())
        a, _ = lst.accept()
        return c, self.track(a)

    def unix_peer_closed(self) -> socket.socket:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b.close()
        return self.track(a)

    def netlink(self) -> socket.socket:
        return self.track(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))

    def close_wait(self) -> socket.socket:
        client, server = self.tcp_pair()
        server.close()
        assert wait_for_tcp_state(client, TCP_CLOSE_WAIT)
        return client

    def wait_close_wait(self, sock: socket.socket) -> bool:
        return wait_for_tcp_state(sock, TCP_CLOSE_WAIT)

    def close(self) -> None:
        for s in self._all:
            s.close()
        self._all.clear()


@pytest.fixture
def socks() -> Iterator[Sockets]:
    s = Sockets()
    yield s
    s.close()


@pytest.fixture
def socket_factory() -> type[Sockets]:
    """The ``Sockets`` class, for tests that need fresh sockets per hypothesis example."""
    return Sockets


@dataclass
class EngineMaps:
    """Map classes of one engine plus a factory that closes what it made."""

    engine: str
    module: ModuleType
    made: list[Any] = field(default_factory=list)
    engines: list[Any] = field(default_factory=list)

    @property
    def SockMap(self) -> Any:  # noqa: N802 - reads like the class it is
        return self.module.SockMap

    @property
    def SockHash(self) -> Any:  # noqa: N802
        return self.module.SockHash

    @property
    def ArrayMap(self) -> Any:  # noqa: N802
        return self.module.ArrayMap

    @property
    def HashMap(self) -> Any:  # noqa: N802
        return self.module.HashMap

    @property
    def Map(self) -> Any:  # noqa: N802
        return self.module.Map

    def cls(self, kind: str) -> Any:
        return {
            "sockmap": self.SockMap,
            "sockhash": self.SockHash,
            "array": self.ArrayMap,
            "hash": self.HashMap,
        }[kind]

    def __call__(self, kind: str, max_entries: int, **kw: Any) -> Any:
        m = self.cls(kind).new(max_entries, **kw)
        self.made.append(m)
        return m

    def create(self, spec: kmaps.MapSpec, kind: str | None = None) -> Any:
        m = (self.Map if kind is None else self.cls(kind)).create(spec)
        self.made.append(m)
        return m

    def with_parser(self, kind: str, max_entries: int = 2) -> Any:
        """A socket map with a stream parser (and verdict) attached."""
        if self.engine == "userspace":
            m = self(kind, max_entries)
            m.parser_attached = True
            return m
        from sockmap import programs  # noqa: PLC0415
        from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415

        eng = KernelEngine()
        self.engines.append(eng)
        m = eng.sockmap(max_entries) if kind == "sockmap" else eng.sockhash(max_entries)
        eng.attach(m, parser=programs.whole_segment(), verdict=programs.pass_())
        return m

    def close(self) -> None:
        for m in self.made:
            m.close()
        for e in self.engines:
            e.close()


ENGINES = ["kernel", "userspace"]


def open_engine_maps(engine: str) -> EngineMaps:
    if engine == "kernel":
        why = kernel_refusal()
        if why is not None:
            print(f"kernel engine skipped: bpf() refused: {why}")
            pytest.skip(f"bpf() refused: {why}")
        return EngineMaps("kernel", kmaps)
    return EngineMaps("userspace", umaps)


@pytest.fixture(params=ENGINES)
def engine_maps(request: pytest.FixtureRequest) -> Iterator[EngineMaps]:
    """The map classes of one engine (``kernel`` or ``userspace``) and a factory."""
    em = open_engine_maps(request.param)
    yield em
    em.close()


@pytest.fixture
def kernel_and_userspace() -> Iterator[tuple[EngineMaps, EngineMaps]]:
    """Both engines side by side (skips, saying why, where bpf() is refused)."""
    k, u = open_engine_maps("kernel"), open_engine_maps("userspace")
    yield k, u
    k.close()
    u.close()


SocketFactory = Callable[[Sockets], socket.socket]
