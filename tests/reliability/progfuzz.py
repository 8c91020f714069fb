"""Program generators and a checked runner for the VM fuzz tests (``test_vm_fuzz.py``).

Programs are raw bytecode (8-byte slots). Map references are *virtual* fds
(``VFD_BASE + index`` into :data:`MAPS`): the VM resolves them to fresh Python maps, the
kernel side rewrites them to the fds of real maps of the same shape
(:func:`to_kernel`). Everything here is deterministic given a ``random.Random``.
"""

from __future__ import annotations

import copy
import re
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from random import Random
from types import FrameType
from typing import Any

from corpus import CORPUS
from sockmap import asm, programs
from sockmap.abi import SK_BUFF, Helper, MapType, ProgType
from sockmap.abi.internals import program_internals
from sockmap.asm import DW, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10, B, H, W
from sockmap.errors import SockmapError, VmError
from sockmap.programs import balance
from sockmap.vm import MsgContext, SkbContext, SockOpsContext, VmProgram, load
from sockmap.vm.context import access_table
from sockmap.vm.memory import CTX_RID, FIRST_MAP_RID, HALF, PKT_RID, SHIFT, STACK_SIZE

SLOT = struct.Struct("<BBhi")
M32 = 0xFFFFFFFF
M64 = (1 << 64) - 1
BUDGET = 20_000
"""Instruction budget of every fuzz run (the VM's own stop for loops)."""
WALL_LIMIT = 5.0
"""Seconds one load or run may take before it counts as a hang."""

# ---------------------------------------------------------------------------- maps


@dataclass(frozen=True)
class MapDef:
    name: str
    type: MapType
    key_size: int
    value_size: int
    max_entries: int


MAPS: list[MapDef] = [
    MapDef("counter", MapType.ARRAY, 4, 8, 4),
    MapDef("cookies", MapType.HASH, 8, 8, 16),
    MapDef("sockmap", MapType.SOCKMAP, 4, 8, 8),
    MapDef("sockhash", MapType.SOCKHASH, 16, 8, 8),
    MapDef("direct", MapType.ARRAY, 4, 16, 1),
    MapDef("counters", MapType.ARRAY, 4, 16, 17),
    MapDef("table", MapType.HASH, 8, 4, 16),
    MapDef("peerkeys", MapType.HASH, 8, 4, 16),
    MapDef("stats", MapType.ARRAY, 4, 80, 8),
    MapDef("control", MapType.ARRAY, 4, 40, 8),
    MapDef("routes", MapType.HASH, 8, 8, 16),
    MapDef("outcomes", MapType.ARRAY, 4, 8, 16),
    MapDef("log", MapType.ARRAY, 4, 24, 64),
    MapDef("sockhash8", MapType.SOCKHASH, 8, 8, 8),
]
VFD_BASE = 1000
BAD_FD = 0x7FFF_FFF0
"""What an unknown map reference becomes on the kernel: an fd that is never open."""


def vfd(index: int) -> int:
    return VFD_BASE + index


class MapRef:
    """A map reference inside an assembler program; encodes to its virtual fd."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<{MAPS[self.index].name}>"


REFS = {m.name: MapRef(i) for i, m in enumerate(MAPS)}


def encode(program: asm.Program) -> bytes:
    return program.encode(map_fd=lambda ref: vfd(ref.index))  # type: ignore[attr-defined]


class FuzzMap:
    """A VmMap of one :class:`MapDef`: arrays preallocated, hashes in a dict, socket maps
    as redirect targets only. ``state()``/``restore()`` compare and rewind runs."""

    def __init__(self, d: MapDef) -> None:
        self.d = d
        self.map_type = int(d.type)
        self.key_size = d.key_size
        self.value_size = d.value_size
        self.max_entries = d.max_entries
        self.array = [bytearray(d.value_size) for _ in range(d.max_entries)]
        self.hash: dict[bytes, bytearray] = {}
        self.deleted: list[bytes] = []

    @property
    def is_array(self) -> bool:
        return self.d.type == MapType.ARRAY

    def vm_lookup(self, key: bytes) -> bytearray | None:
        assert len(key) == self.key_size, (key, self.d)
        if self.is_array:
            i = int.from_bytes(key, "little")
            return self.array[i] if i < self.max_entries else None
        if self.d.type in (MapType.SOCKMAP, MapType.SOCKHASH):
            raise AssertionError("the VM looked up a socket map")
        return self.hash.get(key)

    def vm_update(self, key: bytes, value: bytes, flags: int) -> int:
        assert len(key) == self.key_size, key
        assert len(value) == self.value_size, value
        if flags > 2:
            return -22
        if self.is_array:
            i = int.from_bytes(key, "little")
            if i >= self.max_entries:
                return -7
            if flags == 1:
                return -17
            self.array[i][:] = value
            return 0
        if flags == 1 and key in self.hash:
            return -17
        if flags == 2 and key not in self.hash:
            return -2
        if key not in self.hash and len(self.hash) >= self.max_entries:
            return -7
        if key in self.hash:
            self.hash[key][:] = value
        else:
            self.hash[key] = bytearray(value)
        return 0

    def vm_delete(self, key: bytes) -> int:
        assert len(key) == self.key_size
        self.deleted.append(key)
        if self.is_array:
            return -22
        return 0 if self.hash.pop(key, None) is not None else -2

    def state(self) -> tuple[object, ...]:
        return (
            tuple(bytes(v) for v in self.array),
            tuple(sorted((k, bytes(v)) for k, v in self.hash.items())),
            tuple(self.deleted),
        )

    def restore(self, state: tuple[Any, ...]) -> None:
        for buf, old in zip(self.array, state[0], strict=True):
            buf[:] = old
        self.hash = {k: bytearray(v) for k, v in state[1]}
        self.deleted = list(state[2])


def vm_maps() -> dict[int, FuzzMap]:
    """A fresh set of VM maps by virtual fd."""
    return {vfd(i): FuzzMap(d) for i, d in enumerate(MAPS)}


def vm_load(raw: bytes, pt: ProgType, maps: dict[int, FuzzMap], fast: bool = True) -> VmProgram:
    return load(raw, pt, maps=lambda fd: maps.get(fd) if isinstance(fd, int) else None,  # type: ignore[arg-type,return-value]
                fast=fast, budget=BUDGET)  # fmt: skip


class FuzzEnv:
    """A deterministic HelperEnv that records every call."""

    def __init__(self, valid_keys: int = 2) -> None:
        self.valid_keys = valid_keys
        self.calls: list[tuple[object, ...]] = []

    def redirect(self, smap: object, key: bytes, flags: int) -> int:
        self.calls.append(("redirect", MAPS_BY_OBJ.get(id(smap), "?"), key, flags))
        ok = int.from_bytes(key[:4], "little") < self.valid_keys and not flags & ~1
        return 1 if ok else 0

    def socket_cookie(self) -> int:
        self.calls.append(("cookie",))
        return 0x1234

    def ktime_ns(self) -> int:
        self.calls.append(("ktime",))
        return 1_000_000_007

    def prandom_u32(self) -> int:
        self.calls.append(("prandom",))
        return 0xDEADBEEF

    def apply_bytes(self, n: int) -> None:
        self.calls.append(("apply", n))

    def cork_bytes(self, n: int) -> None:
        self.calls.append(("cork", n))

    def sock_update(self, smap: object, key: bytes, flags: int) -> int:
        self.calls.append(("sock_update", key, flags))
        return 0


MAPS_BY_OBJ: dict[int, str] = {}


# ---------------------------------------------------------------------------- raw bytecode

Slot = tuple[int, int, int, int, int]  # opcode, dst, src, off, imm


def slots(raw: bytes) -> list[Slot]:
    out = []
    for i in range(0, len(raw) - len(raw) % 8, 8):
        op, regs, off, imm = SLOT.unpack_from(raw, i)
        out.append((op, regs & 0xF, regs >> 4, off, imm))
    return out


def pack(items: list[Slot]) -> bytes:
    return b"".join(
        SLOT.pack(op & 0xFF, (dst & 0xF) | (src & 0xF) << 4, off, imm)
        for op, dst, src, off, imm in items
    )


def _valid_opcodes() -> list[int]:
    ops: list[int] = []
    for cls in (0x04, 0x07):  # ALU, ALU64
        for op in range(0x00, 0xD0, 0x10):
            ops += [cls | op, cls | op | 0x08]
        ops += [cls | 0xD0, cls | 0xD8]
    for cls in (0x05, 0x06):  # JMP, JMP32
        for op in (0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0xA0, 0xB0, 0xC0, 0xD0):
            ops += [cls | op, cls | op | 0x08]
    ops += [0x05, 0x06, 0x85, 0x95, 0x18]
    for size in (0x00, 0x08, 0x10, 0x18):
        ops += [0x61 | size, 0x62 | size, 0x63 | size]  # LDX, ST, STX (MEM)
        if size != 0x18:
            ops.append(0x81 | size)  # LDX MEMSX
    ops += [0xC3, 0xDB]  # atomics W, DW
    return ops


VALID_OPCODES = _valid_opcodes()
INTERESTING = [0, 1, -1, 2, 4, 7, 8, 16, 31, 32, 63, 64, 255, 0x7FFF, -0x8000, 0x7FFFFFFF,
               -0x80000000, 76, 80, 0, 4, 8]  # fmt: skip
OFFS = [0, 0, 1, -1, -4, -8, -16, -64, -512, -513, 2, 4, 8, 16, 76, 80, 0x7FFF, -0x8000]
HELPER_IDS = [int(h) for h in Helper] + [0, 1000, -1]
ATOMIC_IMMS = [0x00, 0x01, 0x40, 0x41, 0x50, 0x51, 0xA0, 0xA1, 0xE1, 0xF1, 0x02]


def random_slot(rng: Random) -> list[Slot]:
    """One biased random instruction (two slots for LD_IMM64)."""
    op = rng.choice(VALID_OPCODES)
    dst = rng.randrange(11) if rng.random() < 0.95 else rng.randrange(16)
    src = rng.randrange(11) if rng.random() < 0.95 else rng.randrange(16)
    off = rng.choice(OFFS) if rng.random() < 0.7 else rng.randrange(-0x8000, 0x8000)
    imm = rng.choice(INTERESTING) if rng.random() < 0.7 else rng.randrange(-(1 << 31), 1 << 31)
    cls = op & 7
    if cls in (0x04, 0x07) and rng.random() < 0.7:
        src = src if op & 0x08 else 0
        off = 0 if rng.random() < 0.8 else rng.choice([1, 8, 16, 32])
        if op & 0xF0 == 0xD0:
            imm = rng.choice([16, 32, 64])
    if cls in (0x05, 0x06) and op & 0xF0 not in (0x80, 0x90) and rng.random() < 0.8:
        off = rng.randrange(-4, 8)
        src = src if op & 0x08 else 0
        imm = imm if not op & 0x08 else 0
    if op == 0x85:
        r = rng.random()
        if r < 0.6:
            src, imm = 0, rng.choice(HELPER_IDS)
        elif r < 0.8:
            src, imm = 1, rng.randrange(-3, 8)
        else:
            k = program_internals()
            src, imm = 2, (k.kfunc_cast_to_kern_ctx if k else 1)
        dst, off = 0, 0
    if op == 0x95 and rng.random() < 0.9:
        dst = src = off = imm = 0
    if op == 0xDB or op == 0xC3:
        imm = rng.choice(ATOMIC_IMMS)
    if op == 0x18:
        src = rng.choice([0, 0, 1, 2, 3])
        if src in (1, 2):
            imm = vfd(rng.randrange(len(MAPS) + 1))
            off = 0
        hi = rng.randrange(-(1 << 31), 1 << 31) if rng.random() < 0.3 else 0
        return [(op, dst, src, off if rng.random() < 0.2 else 0, imm), (0, 0, 0, 0, hi)]
    if cls in (0x01, 0x03) and rng.random() < 0.7:
        imm = 0
    return [(op, dst, src, off, imm)]


def random_program(rng: Random) -> bytes:
    """Random bytecode: pure noise, or instructions biased to valid opcodes."""
    n = rng.randint(1, 24)
    if rng.random() < 0.15:
        return rng.randbytes(8 * n)
    out: list[Slot] = []
    if rng.random() < 0.5:
        out.append((0xB7, 0, 0, 0, rng.choice(INTERESTING)))  # r0 initialised
    while len(out) < n:
        out += random_slot(rng)
    if rng.random() < 0.8:
        out.append((0x95, 0, 0, 0, 0))
    return pack(out)


MUTATIONS = ("flip", "replace", "insert", "delete", "off", "imm", "reg", "dup", "swap", "opcode")


def mutate(rng: Random, raw: bytes, rounds: int | None = None) -> tuple[bytes, list[str]]:
    """``raw`` with 1-3 random mutations; returns the bytes and what was done."""
    items = slots(raw)
    done: list[str] = []
    for _ in range(rounds or rng.randint(1, 3)):
        kind = rng.choice(MUTATIONS)
        done.append(kind)
        if not items:
            items = [(0x95, 0, 0, 0, 0)]
        i = rng.randrange(len(items))
        op, dst, src, off, imm = items[i]
        if kind == "flip":
            b = bytearray(pack(items))
            bit = rng.randrange(8 * len(b))
            b[bit // 8] ^= 1 << (bit % 8)
            items = slots(bytes(b))
        elif kind == "replace":
            items[i : i + 1] = random_slot(rng)
        elif kind == "insert":
            items[i:i] = random_slot(rng)
        elif kind == "delete" and len(items) > 1:
            del items[i]
        elif kind == "off":
            delta = rng.choice([1, -1, 2, -2, 8, -8]) if rng.random() < 0.7 else None
            new = off + delta if delta is not None else rng.choice(OFFS)
            items[i] = (op, dst, src, max(-0x8000, min(0x7FFF, new)), imm)
        elif kind == "imm":
            delta = rng.choice([1, -1, 4, -4]) if rng.random() < 0.5 else None
            new = imm + delta if delta is not None else rng.choice(INTERESTING)
            items[i] = (op, dst, src, off, max(-(1 << 31), min((1 << 31) - 1, new)))
        elif kind == "reg":
            if rng.random() < 0.5:
                items[i] = (op, rng.randrange(11), src, off, imm)
            else:
                items[i] = (op, dst, rng.randrange(11), off, imm)
        elif kind == "dup":
            items.insert(i, items[i])
        elif kind == "swap":
            j = rng.randrange(len(items))
            items[i], items[j] = items[j], items[i]
        elif kind == "opcode":
            same_class = [o for o in VALID_OPCODES if o & 7 == op & 7] or VALID_OPCODES
            items[i] = (rng.choice(same_class), dst, src, off, imm)
    return pack(items), done


def to_kernel(raw: bytes, fds: Callable[[int], int | None]) -> bytes:
    """``raw`` with every map reference's virtual fd replaced by a real one (unknown: BAD_FD)."""
    items = slots(raw)
    for i, (op, dst, src, off, imm) in enumerate(items):
        if op == 0x18 and src in (1, 2) and i + 1 < len(items):
            fd = fds(imm)
            items[i] = (op, dst, src, off, BAD_FD if fd is None else fd)
    return pack(items) + raw[len(raw) - len(raw) % 8 :]


# ---------------------------------------------------------------------------- seeds


@dataclass
class Seed:
    name: str
    raw: bytes
    pt: ProgType


def seeds() -> list[Seed]:
    """Corpus programs and the ready programs, encoded with virtual map fds."""
    r = REFS
    out = [Seed(f"corpus:{name}", encode(asm.Program(items)), ProgType.SK_SKB)
           for name, items, _ in CORPUS]  # fmt: skip
    skb: list[tuple[str, Callable[[], asm.Program]]] = [
        ("whole_segment", programs.whole_segment),
        ("fixed_size", lambda: programs.fixed_size(8)),
        ("length_prefixed", lambda: programs.length_prefixed(4, "big", 4, 0, 1 << 20)),
        ("length_prefixed2le", lambda: programs.length_prefixed(2, "little", 0, 2)),
        ("pass", programs.pass_),
        ("drop", programs.drop),
        ("redirect_key", lambda: programs.redirect_key(r["sockmap"], 1)),
        ("redirect_peer", lambda: programs.redirect_peer(r["sockmap"], r["peerkeys"])),
        ("pair", lambda: programs.pair(r["sockmap"], r["peerkeys"], ingress=True)),
        ("round_robin", lambda: programs.round_robin(r["sockmap"], r["counter"], 3)),
        ("hash_route", lambda: programs.hash_route(r["sockmap"], 0, 4, 2)),
        ("field_route", lambda: programs.field_route(r["sockmap"], r["table"], 1, 2, default=0)),
        ("balance_rr", lambda: balance.balance(
            r["sockmap"], r["cookies"], r["counters"], max_backends=8, counter=r["counter"])),
        ("balance_hash", lambda: balance.balance(
            r["sockmap"], r["cookies"], r["counters"], balance.Policy("hash", 0, 4),
            max_backends=2)),
        ("balance_field", lambda: balance.balance(
            r["sockmap"], r["cookies"], r["counters"], balance.Policy("field", 0, 2, 2),
            max_backends=2, table=r["table"])),
        ("bounded", lambda: programs.bounded_redirect(
            r["sockmap"], r["routes"], r["stats"], r["control"])),
        ("instrumented", lambda: programs.instrument(
            programs.redirect_key(r["sockmap"], 0), r["outcomes"], "verdict", log=r["log"])),
    ]  # fmt: skip
    skb += [(f"preset:{name}", lambda p=name: programs.preset(p))  # type: ignore[misc]
            for name in sorted(programs.PRESETS)]  # fmt: skip
    msg: list[tuple[str, Callable[[], asm.Program]]] = [
        ("msg_pass", lambda: programs.msg_verdict("pass", apply=10, cork=4)),
        ("msg_drop", lambda: programs.msg_verdict("drop")),
        ("msg_redirect", lambda: programs.msg_verdict("redirect", sockmap=r["sockmap"], key=1)),
        ("msg_peer", lambda: programs.redirect_to_peer(r["sockhash"])),
    ]
    ops: list[tuple[str, Callable[[], asm.Program]]] = [
        ("add_established", lambda: programs.add_established(r["sockhash"])),
        ("add_established_map", lambda: programs.add_established_map(r["sockmap"])),
    ]
    for group, pt in ((skb, ProgType.SK_SKB), (msg, ProgType.SK_MSG), (ops, ProgType.SOCK_OPS)):
        for name, build in group:
            try:
                prog = build()
            except (SockmapError, ValueError, AttributeError, TypeError):
                continue  # not buildable on this kernel (e.g. no BTF for the bounded verdict)
            out.append(Seed(name, encode(prog), pt))
    return out


# ---------------------------------------------------------------------------- structured programs

SKB_READS = sorted((off, size) for (off, size, write) in access_table(ProgType.SK_SKB) if not write)
SKB_WRITES = sorted((off, size) for (off, size, write) in access_table(ProgType.SK_SKB) if write)
_SIZES = {1: B, 2: H, 4: W, 8: DW}
_ALU = ["add", "sub", "mul", "div", "sdiv", "mod", "smod", "or_", "and_", "xor", "lsh", "rsh",
        "arsh", "mov"]  # fmt: skip
_JMP = ["jeq", "jne", "jgt", "jge", "jlt", "jle", "jset", "jsgt", "jsge", "jslt", "jsle"]
SCALARS = [R0, R7, R8, R9]


@dataclass
class _Builder:
    rng: Random
    blocks: list[list[asm.Item]] = field(default_factory=list)
    tags: set[str] = field(default_factory=set)

    def imm(self) -> int:
        rng = self.rng
        return rng.choice(INTERESTING) if rng.random() < 0.6 else rng.randrange(-(1 << 31), 1 << 31)

    def skip_to(self) -> str:
        return f"B{len(self.blocks) + self.rng.randint(1, 3)}"


def structured(rng: Random, pt: ProgType = ProgType.SK_SKB) -> tuple[bytes, set[str]]:
    """A small well-formed-looking program: mostly valid, sometimes deliberately not.

    Returns the bytes and tags naming the deliberate faults it may carry.
    """
    b = _Builder(rng)
    items: list[asm.Item] = [asm.mov(R6, R1)]
    items += [asm.st(DW, R10, -8 * (i + 1), 0) for i in range(8)]  # the stack read is set
    for r in SCALARS:
        items.append(asm.ld_imm64(r, rng.getrandbits(64)) if rng.random() < 0.3
                     else asm.mov(r, b.imm()))  # fmt: skip
    n = rng.randint(2, 10)
    makers = [_alu, _alu, _unary, _jump, _stack, _ctx_load, _ctx_load, _ctx_store, _packet,
              _packet, _helper, _lookup, _lookup, _update, _redirect, _kfunc, _loop]  # fmt: skip
    for _ in range(n):
        b.blocks.append(rng.choice(makers)(b, pt))
    for i, block in enumerate(b.blocks):
        items.append(asm.label(f"B{i}"))
        items += block
    for i in range(len(b.blocks), len(b.blocks) + 4):
        items.append(asm.label(f"B{i}"))
    if rng.random() < 0.5:
        items += [asm.xor(R0, R7), asm.and_(R0, 1)]
    items.append(asm.exit_())
    return encode(asm.Program(items)), b.tags


def _alu(b: _Builder, pt: ProgType) -> list[asm.Item]:
    rng = b.rng
    name = rng.choice(_ALU) + rng.choice(["", "32"])
    name = name.replace("_32", "32")
    dst = rng.choice(SCALARS)
    if rng.random() < 0.5:
        src: asm.Reg | int = rng.choice(SCALARS)
    else:
        src = b.imm()
        if name.startswith(("lsh", "rsh", "arsh")):
            src = rng.randrange(32 if name.endswith("32") else 64) if rng.random() < 0.9 else src
            if not 0 <= src < (32 if name.endswith("32") else 64):
                b.tags.add("bad_shift")
        if name.startswith(("div", "mod", "sdiv", "smod")) and src == 0:
            b.tags.add("div_imm_zero")
    return [getattr(asm, name)(dst, src)]


def _unary(b: _Builder, pt: ProgType) -> list[asm.Item]:
    rng = b.rng
    d = rng.choice(SCALARS)
    which = rng.choice(["neg", "neg32", "bswap", "to_be", "to_le", "movsx", "movsx32"])
    if which in ("neg", "neg32"):
        return [getattr(asm, which)(d)]
    if which == "movsx":
        return [asm.movsx(d, rng.choice(SCALARS), rng.choice([8, 16, 32]))]
    if which == "movsx32":
        return [asm.movsx32(d, rng.choice(SCALARS), rng.choice([8, 16]))]
    return [getattr(asm, which)(d, rng.choice([16, 32, 64]))]


def _jump(b: _Builder, pt: ProgType) -> list[asm.Item]:
    rng = b.rng
    name = rng.choice(_JMP) + rng.choice(["", "32"])
    src: asm.Reg | int = rng.choice(SCALARS) if rng.random() < 0.5 else b.imm()
    return [getattr(asm, name)(rng.choice(SCALARS), src, b.skip_to())]


def _stack(b: _Builder, pt: ProgType) -> list[asm.Item]:
    rng = b.rng
    size = rng.choice([1, 2, 4, 8])
    r = rng.random()
    if r < 0.85:
        off = -size * rng.randint(1, 64 // size)
    elif r < 0.9:
        off = -rng.randint(65, 512) // size * size
        b.tags.add("stack_uninit_maybe")
    else:
        off = rng.choice([0, 8, -520, -513, -3])
        b.tags.add("stack_bad_off")
    s = _SIZES[size]
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            return [asm.stx(s, R10, rng.choice(SCALARS), off)]
        return [asm.st(s, R10, off, b.imm())]
    if rng.random() < 0.2 and size != 8:
        return [asm.ldxsx(s, rng.choice(SCALARS), R10, off)]
    return [asm.ldx(s, rng.choice(SCALARS), R10, off)]


def _ctx_load(b: _Builder, pt: ProgType) -> list[asm.Item]:
    rng = b.rng
    if rng.random() < 0.75:
        off, size = rng.choice(SKB_READS)
        if off in (SK_BUFF.offset("data"), SK_BUFF.offset("data_end")):
            return [asm.ldx(W, R2, R6, off)]  # a pointer: not into a scalar register
    else:
        off, size = rng.randrange(-8, 200), rng.choice([1, 2, 4, 8])
        b.tags.add("ctx_random_off")
    return [asm.ldx(_SIZES[size], rng.choice([R7, R8, R9]), R6, off)]


def _ctx_store(b: _Builder, pt: ProgType) -> list[asm.Item]:
    rng = b.rng
    if rng.random() < 0.6:
        off, size = rng.choice(SKB_WRITES)
    else:
        off, size = rng.randrange(-8, 200), rng.choice([1, 2, 4, 8])
        b.tags.add("ctx_random_store")
    if rng.random() < 0.8:
        return [asm.stx(_SIZES[size], R6, rng.choice(SCALARS), off)]
    b.tags.add("ctx_st_imm")
    return [asm.st(_SIZES[size], R6, off, b.imm())]


def _packet(b: _Builder, pt: ProgType) -> list[asm.Item]:
    rng = b.rng
    n = rng.choice([1, 2, 4, 8, 14, 20])
    size = rng.choice([1, 2, 4, 8])
    at = rng.randrange(0, max(1, n - size + 1)) if rng.random() < 0.8 else rng.randrange(0, 40)
    if at + size > n:
        b.tags.add("pkt_past_check")
    skip = b.skip_to()
    items: list[asm.Item] = [
        asm.ldx(W, R2, R6, SK_BUFF.offset("data")),
        asm.ldx(W, R3, R6, SK_BUFF.offset("data_end")),
        asm.mov(R4, R2),
        asm.add(R4, n),
    ]
    if rng.random() < 0.85:
        items.append(asm.jgt(R4, R3, skip))
    else:
        b.tags.add("pkt_no_check")
    if rng.random() < 0.25:
        b.tags.add("pkt_write")
        items.append(asm.stx(_SIZES[size], R2, rng.choice(SCALARS), at))
    else:
        items.append(asm.ldx(_SIZES[size], rng.choice(SCALARS), R2, at))
    return items


def _helper(b: _Builder, pt: ProgType) -> list[asm.Item]:
    rng = b.rng
    which = rng.choice(["ktime", "prandom", "cookie", "load_bytes", "load_bytes", "cpu", "pull"])
    if which == "pull":  # makes bytes directly accessible; earlier data_end checks lapse
        return [asm.mov(R1, R6), asm.mov(R2, rng.choice([0, 1, 8, 64])),
                asm.call(Helper.skb_pull_data)]  # fmt: skip
    if which == "ktime":
        return [asm.call(Helper.ktime_get_ns)]
    if which == "prandom":
        return [asm.call(Helper.get_prandom_u32)]
    if which == "cpu":
        return [asm.call(Helper.get_smp_processor_id)]
    if which == "cookie":
        return [asm.mov(R1, R6), asm.call(Helper.get_socket_cookie)]
    n = rng.choice([1, 2, 4, 8]) if rng.random() < 0.9 else rng.choice([0, 16, 100])
    off = rng.randrange(0, 24)
    if n > 16 or n == 0:
        b.tags.add("load_bytes_bad_len")
    return [
        asm.mov(R1, R6),
        asm.mov(R2, off),
        asm.mov(R3, R10),
        asm.add(R3, -16),
        asm.mov(R4, n),
        asm.call(Helper.skb_load_bytes),
        asm.ldx(DW, rng.choice([R7, R8, R9]), R10, -16),
    ]


def _lookup(b: _Builder, pt: ProgType) -> list[asm.Item]:
    rng = b.rng
    name = rng.choice(["counter", "cookies", "counters", "direct", "table"])
    d = MAPS[REFS[name].index]
    key_slot = -8 if d.key_size == 8 else -4
    key = rng.randrange(d.max_entries + 1) if d.type == MapType.ARRAY else rng.randrange(3)
    skip = f"N{len(b.blocks)}"
    items: list[asm.Item] = [
        asm.st(W if d.key_size == 4 else DW, R10, key_slot, key),
        asm.ld_map_fd(R1, REFS[name]),
        asm.mov(R2, R10),
        asm.add(R2, key_slot),
        asm.call(Helper.map_lookup_elem),
    ]
    if rng.random() < 0.85:
        items.append(asm.jeq(R0, 0, skip))
    else:
        b.tags.add("no_null_check")
    size = rng.choice([s for s in (1, 2, 4, 8) if s <= d.value_size])
    off = (rng.randrange(0, d.value_size - size + 1) if rng.random() < 0.85
           else rng.choice([-1, d.value_size, d.value_size - 1]))  # fmt: skip
    if not 0 <= off <= d.value_size - size:
        b.tags.add("value_bad_off")
    r = rng.random()
    if r < 0.4:
        items.append(asm.ldx(_SIZES[size], rng.choice([R7, R8, R9]), R0, off))
    elif r < 0.7:
        items.append(asm.stx(_SIZES[size], R0, rng.choice([R7, R8, R9]), off))
    else:
        asize = rng.choice([4, 8])
        aoff = off - off % asize
        items.append(asm.atomic_add(_SIZES[asize], R0, R7, aoff, fetch=rng.random() < 0.5))
    items += [asm.label(skip), asm.mov(R0, 0)]
    return items


def _update(b: _Builder, pt: ProgType) -> list[asm.Item]:
    rng = b.rng
    name = rng.choice(["counter", "cookies", "table"])
    d = MAPS[REFS[name].index]
    items: list[asm.Item] = [
        asm.st(DW, R10, -8, rng.randrange(3)),
        asm.stx(DW, R10, R7, -24),
        asm.stx(DW, R10, R8, -16),
        asm.ld_map_fd(R1, REFS[name]),
        asm.mov(R2, R10),
        asm.add(R2, -8),
    ]
    if rng.random() < 0.7:
        items += [asm.mov(R3, R10), asm.add(R3, -24), asm.mov(R4, rng.choice([0, 0, 1, 2, 4])),
                  asm.call(Helper.map_update_elem)]  # fmt: skip
    else:
        items.append(asm.call(Helper.map_delete_elem))
    del d
    return items


def _redirect(b: _Builder, pt: ProgType) -> list[asm.Item]:
    rng = b.rng
    if rng.random() < 0.7:
        return [
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, REFS["sockmap"]),
            asm.mov(R3, rng.randrange(4)),
            asm.mov(R4, rng.choice([0, 0, 1, 2])),
            asm.call(Helper.sk_redirect_map),
        ]
    return [
        asm.st(DW, R10, -16, rng.randrange(3)),
        asm.st(DW, R10, -8, 0),
        asm.mov(R1, R6),
        asm.ld_map_fd(R2, REFS["sockhash"]),
        asm.mov(R3, R10),
        asm.add(R3, -16),
        asm.mov(R4, 0),
        asm.call(Helper.sk_redirect_hash),
    ]


def _kfunc(b: _Builder, pt: ProgType) -> list[asm.Item]:
    k = program_internals()
    if k is None:
        return [asm.mov(R0, 0)]
    off = b.rng.choice([k.skb_strp_full_len, k.skb_strp_offset, 0, 8])
    if off not in (k.skb_strp_full_len, k.skb_strp_offset):
        b.tags.add("kctx_other_field")
    return [asm.mov(R1, R6), asm.call_kfunc(k.kfunc_cast_to_kern_ctx),
            asm.ldx(W, b.rng.choice([R7, R8, R9]), R0, off), asm.mov(R0, 0)]  # fmt: skip


def _loop(b: _Builder, pt: ProgType) -> list[asm.Item]:
    rng = b.rng
    label = f"L{len(b.blocks)}"
    count = rng.randint(1, 20)
    return [
        asm.mov(R5, count),
        asm.label(label),
        asm.add(R9, rng.choice(SCALARS)),
        asm.sub(R5, 1),
        asm.jne(R5, 0, label),
    ]


# ---------------------------------------------------------------------------- contexts


def make_ctx(
    rng: Random, pt: ProgType, full: bool = False
) -> SkbContext | MsgContext | SockOpsContext:
    """A context for ``pt`` with random addresses and data (``full``: ``len == len(data)``)."""
    n = rng.choice([0, 1, 2, 4, 7, 8, 14, 16, 20, 32, 64, 100])
    data = bytearray(rng.randbytes(n))
    total = n if full or rng.random() < 0.7 else n + rng.randrange(1, 64)
    ip = [rng.getrandbits(32) for _ in range(4)]
    port = rng.getrandbits(16)
    if pt == ProgType.SK_MSG:
        return MsgContext(data=data, size=total, family=2, remote_ip4=ip[0], local_ip4=ip[1],
                          remote_port=port << 16, local_port=rng.getrandbits(16))  # fmt: skip
    if pt == ProgType.SOCK_OPS:
        return SockOpsContext(
            op=rng.choice([0, 4, 5, 6, rng.randrange(20)]),
            args=[rng.getrandbits(32) for _ in range(4)],
            family=rng.choice([2, 10]),
            remote_ip4=ip[0],
            local_ip4=ip[1],
            remote_port=port << 16,
            local_port=rng.getrandbits(16),
            state=rng.randrange(12),
            bytes_acked=rng.getrandbits(40),
        )
    return SkbContext(
        data=data, len=total, family=rng.choice([2, 10]), remote_ip4=ip[0], local_ip4=ip[1],
        remote_ip6=(ip[0], ip[1], ip[2], ip[3]), remote_port=port << 16,
        local_port=rng.getrandbits(16), priority=rng.getrandbits(32), hash=rng.getrandbits(32),
        protocol=rng.getrandbits(16), strp_full_len=rng.randrange(200),
    )  # fmt: skip


WRITABLE = {
    ProgType.SK_SKB: {"priority", "tc_index"},
    ProgType.SCHED_CLS: {"mark", "tc_index", "priority", "tc_classid", "cb", "tstamp",
                         "queue_mapping"},
    ProgType.SK_MSG: set(),
    ProgType.SOCK_OPS: {"args", "sk_txhash"},
}
"""Context attributes a program of each type may change (everything else must not move)."""


def ctx_state(ctx: object) -> dict[str, object]:
    if isinstance(ctx, SockOpsContext):
        names = list(vars(ctx))
    else:
        names = [n for n in type(ctx).__slots__ if not n.startswith("_")]  # type: ignore[attr-defined]
    out: dict[str, object] = {}
    for name in names:
        v = getattr(ctx, name)
        out[name] = bytes(v) if isinstance(v, bytearray | memoryview) else (
            tuple(v) if isinstance(v, list) else v)  # fmt: skip
    return out


# ---------------------------------------------------------------------------- running


class Hang(BaseException):
    """A load or run took longer than WALL_LIMIT."""


@contextmanager
def wall_limit(seconds: float = WALL_LIMIT) -> Iterator[None]:
    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_NUM = re.compile(r"-?\b(0x[0-9a-f]+|\d+)\b")


def category(exc: BaseException) -> str:
    """A short class of an error: its type, errno and message with numbers blanked."""
    text = str(getattr(exc, "strerror", None) or exc).split("\n")[0]
    text = re.sub(r"^pc \d+: ", "", text)
    text = text.split("; regions:")[0].split(" (")[0]
    text = _NUM.sub("N", text)
    words = " ".join(text.split()[:7])
    err = getattr(exc, "errno", None)
    return f"{type(exc).__name__}{f' {err}' if err else ''}: {words}"


@dataclass
class Run:
    """What one run did."""

    kind: str  # "ran", "budget", "vm_error", "escaped"
    r0: int | None = None
    error: str = ""
    ctx: dict[str, object] = field(default_factory=dict)
    maps: dict[int, object] = field(default_factory=dict)
    calls: list[tuple[object, ...]] = field(default_factory=list)

    def same(self, other: Run) -> bool:
        return (self.kind, self.r0, self.error, self.ctx, self.maps, self.calls) == (
            other.kind, other.r0, other.error, other.ctx, other.maps, other.calls)  # fmt: skip


def run_once(
    prog: VmProgram,
    ctx: object,
    maps: dict[int, FuzzMap],
    interpret: bool,
) -> tuple[Run, list[str]]:
    """Run ``prog`` once on a copy of ``ctx``; check it touched nothing but its regions."""
    problems: list[str] = []
    c = copy.deepcopy(ctx)
    before = ctx_state(c)
    env = FuzzEnv()
    for m in maps.values():
        MAPS_BY_OBJ[id(m)] = m.d.name
    try:
        with wall_limit():
            r0 = prog.interpret(c, env) if interpret else prog.run(c, env)  # type: ignore[arg-type]
        run = Run("ran", r0)
        if not 0 <= r0 <= M64:
            problems.append(f"r0 {r0:#x} is not a u64")
    except VmError as exc:
        cat = category(exc)
        run = Run("budget" if "budget" in cat else "vm_error", error=cat)
    except Hang as exc:
        run = Run("escaped", error=f"hang: {exc}")
        problems.append(run.error)
    except Exception as exc:
        run = Run("escaped", error=f"{type(exc).__name__}: {exc}")
        problems.append(run.error)
    run.ctx = after = ctx_state(c)
    run.maps = {fd: m.state() for fd, m in maps.items()}
    run.calls = env.calls
    writable = WRITABLE[prog.prog_type]
    if prog.checked.packet_writes:  # a store may reach the packet: its bytes, not its length
        writable = writable | {"data"}
        if len(after.get("data", b"")) != len(before.get("data", b"")):  # type: ignore[arg-type]
            problems.append("the packet changed length")
    for name, old in before.items():
        if name not in writable and after.get(name) != old:
            problems.append(f"context field {name} changed: {old!r} -> {after.get(name)!r}")
    problems += [f"context gained attribute {n}" for n in set(after) - set(before) - writable]
    return run, problems


def run_both(prog: VmProgram, ctx: object, maps: dict[int, FuzzMap]) -> tuple[Run, Run, list[str]]:
    """The interpreter and the fast path on the same context and the same map contents."""
    start = {fd: m.state() for fd, m in maps.items()}
    slow, p1 = run_once(prog, ctx, maps, interpret=True)
    for fd, m in maps.items():
        m.restore(start[fd])  # type: ignore[arg-type]
    fast, p2 = run_once(prog, ctx, maps, interpret=False)
    problems = p1 + p2
    if prog.fast and not slow.same(fast):
        problems.append(f"interpreter {summary(slow)} != fast path {summary(fast)}")
    return slow, fast, problems


def summary(run: Run) -> str:
    return f"{run.kind} r0={run.r0} {run.error}".strip()


# ---------------------------------------------------------------------------- region probes


@dataclass
class Probe:
    """A program that accesses ``base + offset`` where the validator cannot see the offset,
    and whether the VM must allow it."""

    raw: bytes
    ctx: SkbContext
    allowed: bool
    what: str
    value_span: tuple[int, int] | None = None
    """For map-value writes: the bytes [lo, hi) of counter[0] the write may change."""


BIAS = 1 << 20


def probe(rng: Random) -> Probe:
    """A load or store at an offset the validator cannot know (it arrives in ``priority``)."""
    base = rng.choice(["stack", "ctx", "packet", "value", "map", "forged"])
    size = rng.choice([1, 2, 4, 8])
    write = rng.random() < 0.4
    dlen = rng.choice([0, 1, 8, 20, 64])
    r = rng.random()
    if r < 0.6:
        span = {"stack": (-STACK_SIZE - 9, 9), "ctx": (-9, 200), "packet": (-9, dlen + 9),
                "value": (-9, 8 + 9)}.get(base, (-9, 64))  # fmt: skip
        off = rng.randrange(*span)
    else:
        off = rng.randrange(-(1 << 40), 1 << 40) if r < 0.8 else rng.choice([-1, 0, 1 << 31])
    ctx = SkbContext(data=bytearray(rng.randbytes(dlen)), len=dlen, priority=(off + BIAS) & M32)
    # the offset the program computes: priority (u32) - BIAS
    real = ((off + BIAS) & M32) - BIAS
    s = _SIZES[size]
    items: list[asm.Item] = [
        asm.ldx(W, R3, R1, SK_BUFF.offset("priority")),
        asm.sub(R3, BIAS),
        asm.mov(R0, 0),
        asm.mov(R6, R1),
    ]
    span_ = None
    if base == "stack":
        items += [asm.mov(R2, R10), asm.add(R2, R3)]
        ok = -STACK_SIZE <= real <= -size
    elif base == "ctx":
        items += [asm.mov(R2, R1), asm.add(R2, R3)]
        ok = (real, size, write) in access_table(ProgType.SK_SKB)
    elif base == "packet":
        items += [asm.ldx(W, R2, R1, SK_BUFF.offset("data")), asm.add(R2, R3)]
        ok = 0 <= real <= dlen - size  # a write too: the store makes the packet writable
    elif base == "value":
        items += [
            asm.st(W, R10, -4, 0),
            asm.ld_map_fd(R1, REFS["counter"]),
            asm.mov(R2, R10),
            asm.add(R2, -4),
            asm.call(Helper.map_lookup_elem),
            asm.jne(R0, 0, "found"),
            asm.exit_(),
            asm.label("found"),
            asm.mov(R2, R0),
            asm.ldx(W, R3, R6, SK_BUFF.offset("priority")),
            asm.sub(R3, BIAS),
            asm.add(R2, R3),
            asm.mov(R0, 0),
        ]
        ok = 0 <= real <= 8 - size
        span_ = (real, real + size)
    elif base == "map":
        items += [asm.ld_map_fd(R2, REFS["counter"]), asm.add(R2, R3)]
        ok = False
    else:  # a forged address: a region's tag, or none, plus the offset
        # no maps in this program: the main stack frame is the region after the packet
        rid = rng.choice([0, CTX_RID, PKT_RID, FIRST_MAP_RID, FIRST_MAP_RID + 1, 99])
        addr = ((rid << SHIFT) + HALF) & M64
        items += [asm.ld_imm64(R2, addr), asm.stx(DW, R10, R2, -8), asm.ldx(DW, R2, R10, -8),
                  asm.add(R2, R3)]  # fmt: skip
        if rid == PKT_RID:
            ok = 0 <= real <= dlen - size
        elif rid == CTX_RID:
            ok = (real, size, write) in access_table(ProgType.SK_SKB)
        elif rid == FIRST_MAP_RID:  # the main stack frame
            ok = 0 <= real <= STACK_SIZE - size
        else:
            ok = False
        base = f"forged rid {rid}"
    # spilled and reloaded, the pointer is one the validator knows nothing about
    items += [asm.stx(DW, R10, R2, -16), asm.ldx(DW, R2, R10, -16)]
    if write:
        items.append(asm.stx(s, R2, R3, 0))
    else:
        items.append(asm.ldx(s, R0, R2, 0))
    items += [asm.mov(R0, 0) if write else asm.and_(R0, -1), asm.exit_()]
    what = f"{'write' if write else 'read'} of {size} at {base}{real:+d} (dlen {dlen})"
    return Probe(encode(asm.Program(items)), ctx, ok, what, span_ if write else None)


__all__ = [
    "BUDGET",
    "MAPS",
    "Hang",
    "Probe",
    "Run",
    "Seed",
    "category",
    "make_ctx",
    "mutate",
    "probe",
    "random_program",
    "run_both",
    "seeds",
    "structured",
    "to_kernel",
    "vm_load",
    "vm_maps",
    "wall_limit",
]
