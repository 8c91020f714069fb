"""Fixtures every test directory shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from netutil import Pairs


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    """Factory of connected loopback TCP pairs (client, accepted), all closed at teardown."""
    p = Pairs()
    yield p
    p.close()
