"""Fixtures every test directory shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from netutil import Pairs
from sockmap.kernel.features import bpf_access


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    """Factory of connected loopback TCP pairs (client, accepted), all closed at teardown."""
    p = Pairs()
    yield p
    p.close()


@pytest.fixture(params=["kernel", "userspace"])
def engine_name(request: pytest.FixtureRequest) -> str:
    """The name of an engine for code that opens its own (the proxy); skips the kernel,
    saying why, where bpf() is refused."""
    if request.param == "kernel":
        ok, why = bpf_access()
        if not ok:
            pytest.skip(f"kernel engine: bpf() refused: {why}")
    return str(request.param)
