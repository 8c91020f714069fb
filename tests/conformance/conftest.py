"""Fixtures for the conformance suite: one set of map tests, run over both engines.

``engine_maps`` and ``engine`` are parametrized over ``kernel`` and ``userspace``;
the kernel param skips (saying why) only when this process may not call bpf().
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest

from engines import Engine
from sockets import Sockets
from sockmap.kernel import maps as kmaps
from sockmap.kernel.engine import KernelEngine
from sockmap.kernel.features import bpf_access
from sockmap.userspace import maps as umaps
from sockmap.userspace.engine import UserspaceEngine


def kernel_refusal() -> str | None:
    """Why bpf() is refused here, or None when the kernel engine can run."""
    permitted, why = bpf_access()
    return None if permitted else why


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


@pytest.fixture(params=["kernel", "userspace"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    if request.param == "kernel":
        ok, why = bpf_access()
        if not ok:
            pytest.skip(f"kernel engine: bpf() refused: {why}")
        eng: Engine = KernelEngine()
    else:
        eng = UserspaceEngine()
    with eng:
        yield eng


@pytest.fixture
def servers() -> Iterator[list[Any]]:
    """Two tagging message servers (answers tagged b"A" and b"B"), for balance mode."""
    from sockmap.bench.messages import TaggingServer  # noqa: PLC0415

    s = [TaggingServer(b"A"), TaggingServer(b"B")]
    yield s
    for x in s:
        x.close()
