"""Runs per second of two typical programs, fast path against interpreter.

``python -m sockmap.vm._bench`` prints the figures. The programs and the small
in-memory maps/env here are also what the VM's unit tests use.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from sockmap import asm
from sockmap.abi import SK_BUFF, Helper, MapType, ProgType
from sockmap.asm import DW, R0, R1, R2, R3, R4, R6, R10, W
from sockmap.vm import SkbContext, VmMap, VmProgram, load

__all__ = [
    "ArrayMap",
    "HashMap",
    "RecordingEnv",
    "SockMapStub",
    "length_prefixed_parser",
    "main",
    "round_robin_verdict",
]


class ArrayMap:
    """A BPF_MAP_TYPE_ARRAY in Python: u32 keys, preallocated zeroed values."""

    map_type = MapType.ARRAY
    key_size = 4

    def __init__(self, value_size: int, max_entries: int) -> None:
        self.value_size = value_size
        self.max_entries = max_entries
        self.values = [bytearray(value_size) for _ in range(max_entries)]

    def vm_lookup(self, key: bytes) -> bytearray | None:
        (i,) = struct.unpack("<I", key)
        return self.values[i] if i < self.max_entries else None

    def vm_update(self, key: bytes, value: bytes, flags: int) -> int:
        (i,) = struct.unpack("<I", key)
        if i >= self.max_entries:
            return -7  # -E2BIG
        if flags == 1:  # BPF_NOEXIST: array elements always exist
            return -17
        self.values[i][:] = value
        return 0

    def vm_delete(self, key: bytes) -> int:
        del key
        return -22  # -EINVAL: array elements cannot be deleted


class HashMap:
    """A BPF_MAP_TYPE_HASH in Python."""

    map_type = MapType.HASH

    def __init__(self, key_size: int, value_size: int, max_entries: int) -> None:
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.data: dict[bytes, bytearray] = {}

    def vm_lookup(self, key: bytes) -> bytearray | None:
        return self.data.get(key)

    def vm_update(self, key: bytes, value: bytes, flags: int) -> int:
        if flags == 1 and key in self.data:
            return -17
        if flags == 2 and key not in self.data:
            return -2
        if key not in self.data and len(self.data) >= self.max_entries:
            return -7
        self.data[key] = bytearray(value)
        return 0

    def vm_delete(self, key: bytes) -> int:
        return 0 if self.data.pop(key, None) is not None else -2


class SockMapStub:
    """A SOCKMAP (or SOCKHASH) as a program sees it: only a redirect target."""

    key_size = 4
    value_size = 8

    def __init__(self, max_entries: int = 2, map_type: int = MapType.SOCKMAP) -> None:
        self.max_entries = max_entries
        self.map_type = map_type

    def vm_lookup(self, key: bytes) -> bytearray | None:
        raise AssertionError("the VM never looks up socket maps")

    def vm_update(self, key: bytes, value: bytes, flags: int) -> int:
        raise AssertionError("the VM never updates socket maps")

    def vm_delete(self, key: bytes) -> int:
        return 0


class RecordingEnv:
    """A HelperEnv that records what the program asked for."""

    def __init__(self, cookie: int = 0x1234, valid_keys: int = 2) -> None:
        self.cookie = cookie
        self.valid_keys = valid_keys
        self.redirects: list[tuple[VmMap, bytes, int]] = []
        self.applied: list[int] = []
        self.corked: list[int] = []

    def redirect(self, smap: VmMap, key: bytes, flags: int) -> int:
        self.redirects.append((smap, key, flags))
        ok = int.from_bytes(key[:4], "little") < self.valid_keys and not flags & ~1
        return 1 if ok else 0

    def socket_cookie(self) -> int:
        return self.cookie

    def ktime_ns(self) -> int:
        return 1_000_000_007

    def prandom_u32(self) -> int:
        return 0xDEADBEEF

    def apply_bytes(self, n: int) -> None:
        self.applied.append(n)

    def cork_bytes(self, n: int) -> None:
        self.corked.append(n)

    def sock_update(self, smap: object, key: bytes, flags: int) -> int:
        del smap, key, flags
        return 0


def length_prefixed_parser() -> asm.Program:
    """SK_SKB parser: a 4-byte big-endian length prefix; returns len + 4 (0: need more)."""
    return asm.Program(
        [
            asm.ldx(W, R2, R1, SK_BUFF.offset("data")),
            asm.ldx(W, R3, R1, SK_BUFF.offset("data_end")),
            asm.mov(R4, R2),
            asm.add(R4, 4),
            asm.jgt(R4, R3, "short"),
            asm.ldx(W, R0, R2, 0),
            asm.to_be(R0, 32),
            asm.add(R0, 4),
            asm.exit_(),
            asm.label("short"),
            asm.mov(R0, 0),
            asm.exit_(),
        ],
        name="lenprefix",
    )


def round_robin_verdict(counter: object, sockmap: object, n: int = 2) -> asm.Program:
    """SK_SKB verdict: bump an array-map counter, redirect to sockmap[counter % n]."""
    return asm.Program(
        [
            asm.mov(R6, R1),
            asm.st(W, R10, -4, 0),
            asm.mov(R2, R10),
            asm.add(R2, -4),
            asm.ld_map_fd(R1, counter),
            asm.call(Helper.map_lookup_elem),
            asm.jeq(R0, 0, "drop"),
            asm.mov(R3, 1),
            asm.atomic_add(DW, R0, R3, 0, fetch=True),
            asm.mod(R3, n),
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, sockmap),
            asm.mov(R4, 0),
            asm.call(Helper.sk_redirect_map),
            asm.exit_(),
            asm.label("drop"),
            asm.mov(R0, 0),
            asm.exit_(),
        ],
        name="roundrobin",
    )


def _rate(fn: Callable[[], object], seconds: float = 0.5) -> float:
    runs = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(200):
            fn()
        runs += 200
        now = time.perf_counter()
        if now >= deadline:
            return runs / (now - start)


def main() -> None:
    """Print runs/s of both programs on both paths."""
    message = struct.pack(">I", 60) + bytes(60)
    env = RecordingEnv()
    counter, smap = ArrayMap(8, 1), SockMapStub()
    cases: list[tuple[str, Callable[[bool], VmProgram]]] = [
        (
            "length-prefixed parser",
            lambda f: load(length_prefixed_parser(), ProgType.SK_SKB, fast=f),
        ),
        (
            "round-robin verdict",
            lambda f: load(round_robin_verdict(counter, smap), ProgType.SK_SKB, fast=f),
        ),
    ]
    for title, make in cases:
        rates = {}
        for fast in (True, False):
            prog = make(fast)

            def once(prog: VmProgram = prog) -> object:
                env.redirects.clear()
                return prog.run(SkbContext(data=message, len=len(message)), env)

            rates[fast] = _rate(once)
        print(  # noqa: T201 - the point of this script
            f"{title:24s} fast path {rates[True]:>10,.0f} runs/s   "
            f"interpreter {rates[False]:>10,.0f} runs/s   ({rates[True] / rates[False]:.1f}x)"
        )


if __name__ == "__main__":
    main()
