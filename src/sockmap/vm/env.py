"""A stand-alone :class:`~sockmap.vm.api.HelperEnv`, for running programs outside an engine."""

from __future__ import annotations

from sockmap.abi import SkAction

__all__ = ["RecordingEnv"]


class RecordingEnv:
    """A HelperEnv for one run outside an engine: it records the redirect a verdict asks
    for, and answers SK_PASS only for the (map id, key) pairs in ``sockets``."""

    def __init__(self, sockets: set[tuple[int, bytes]] | None = None) -> None:
        self.sockets = sockets or set()
        self.redirect_to: tuple[int, bytes, int] | None = None
        self.inserted: list[tuple[int, bytes, int]] = []

    def redirect(self, smap: object, key: bytes, flags: int) -> int:
        self.redirect_to = (id(smap), key, flags)
        ok = (id(smap), key) in self.sockets and flags & ~1 == 0
        return int(SkAction.PASS if ok else SkAction.DROP)

    def socket_cookie(self) -> int:
        return 1

    def ktime_ns(self) -> int:
        import time  # noqa: PLC0415

        return time.monotonic_ns()

    def prandom_u32(self) -> int:
        import random  # noqa: PLC0415

        return random.getrandbits(32)

    def apply_bytes(self, n: int) -> None:
        del n

    def cork_bytes(self, n: int) -> None:
        del n

    def sock_update(self, smap: object, key: bytes, flags: int) -> int:
        self.inserted.append((id(smap), key, flags))
        return 0
