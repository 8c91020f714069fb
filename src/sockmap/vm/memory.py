"""The VM's memory: bounds-checked regions addressed by tagged integers.

A pointer is an ordinary u64 ``(region id << 40) + 2**39 + offset``: arithmetic and
comparisons work on it like on any register value, and every load or store decodes it
back to (region, offset) and checks the offset against that region's size and rights.
Region 0 does not exist, so NULL (0) and small scalars never name memory; nothing a
program computes can reach anything but region bytes.

The packet is read-only unless the validator found a store that may reach it; then it is
writable and a program writes into the context's ``data`` in place (a ``bytes`` or
read-only ``data`` is first replaced by a ``bytearray`` copy), so whoever ran the program
finds the written bytes in ``ctx.data``, as the kernel's skb holds them.
"""

from __future__ import annotations

import struct

from sockmap.abi import ProgType
from sockmap.abi.internals import program_internals
from sockmap.asm.opcodes import FETCH, AtomicOp
from sockmap.errors import VmError
from sockmap.vm._semantics import M32, alu
from sockmap.vm.api import HelperEnv, VmMap
from sockmap.vm.context import (
    CtxAccess,
    MsgContext,
    SkbContext,
    access_table,
    describe_access,
    layout_of,
    read_parts,
    write_parts,
)

__all__ = [
    "CTX_BASE",
    "CTX_RID",
    "PKT_BASE",
    "PKT_RID",
    "STACK_SIZE",
    "Memory",
    "Region",
    "Static",
    "base",
]

SHIFT = 40
HALF = 1 << 39
OFF_MASK = (1 << SHIFT) - 1
STACK_SIZE = 512
CTX_RID = 1
PKT_RID = 2
FIRST_MAP_RID = 3


def base(rid: int) -> int:
    """Address of offset 0 of region ``rid``."""
    return (rid << SHIFT) + HALF


CTX_BASE = base(CTX_RID)
PKT_BASE = base(PKT_RID)


class Region:
    """A span of bytes a program may address."""

    __slots__ = ("buf", "name", "size", "writable")

    def __init__(
        self,
        buf: bytearray | bytes | memoryview | None,
        size: int,
        name: str,
        *,
        writable: bool = False,
    ) -> None:
        self.buf = buf
        self.size = size
        self.writable = writable
        self.name = name

    def __repr__(self) -> str:
        rights = "rw" if self.writable else ("ro" if self.buf is not None else "no access")
        return f"{self.name}[{self.size}, {rights}]"


_CTX_REGION = Region(None, 0, "ctx")


class Static:
    """What every run of one program shares: type, context rules, maps."""

    __slots__ = (
        "handles",
        "maps",
        "meta",
        "packet_writes",
        "pt",
        "sbase",
        "table",
        "value_names",
    )

    def __init__(
        self,
        pt: ProgType,
        table: dict[tuple[int, int, bool], CtxAccess],
        handles: list[Region],
        maps: list[VmMap],
        *,
        packet_writes: bool = False,
    ) -> None:
        self.pt = pt
        self.packet_writes = packet_writes
        """The packet is writable (the validator found a store that may reach it)."""
        self.table = table
        self.handles = handles
        self.maps = maps
        self.sbase = base(FIRST_MAP_RID + len(maps))
        """Address of the main stack frame's byte 0 (r10 - 512)."""
        self.meta = [(int(m.map_type), m.key_size, m.value_size) for m in maps]
        """(map type, key size, value size) per map: read once, not per helper call."""
        self.value_names = [f"map#{i} value" for i in range(len(maps))]


class Memory:
    """The regions of one program run, and the generic (checked) accessors.

    Cheap to create: the region list is only built when a generic access needs it.
    """

    __slots__ = (
        "_regions",
        "ctx",
        "data",
        "dlen",
        "env",
        "kctx",
        "length",
        "maps",
        "pt",
        "sbase",
        "stack",
        "static",
        "table",
        "values",
    )

    def __init__(self, static: Static, ctx: SkbContext | MsgContext, env: HelperEnv | None) -> None:
        self.static = static
        self.pt = static.pt
        self.table = static.table
        self.maps = static.maps
        self.sbase = static.sbase
        self.ctx = ctx
        self.env = env
        data = ctx.data
        if static.packet_writes and type(data) is not bytearray:
            data = _writable(ctx)
        self.data = data
        self.dlen = len(data)
        total = ctx.len if type(ctx) is SkbContext else ctx.size  # type: ignore[union-attr]
        self.length = self.dlen if total is None else total
        self.stack = bytearray(STACK_SIZE)
        self._regions: list[Region] | None = None
        self.values: dict[int, int] = {}
        self.kctx = 0

    @property
    def regions(self) -> list[Region]:
        """Every region by id (0 and the ctx id hold placeholders)."""
        regions = self._regions
        if regions is None:
            regions = self._regions = [
                _CTX_REGION,
                _CTX_REGION,
                Region(self.data, self.dlen, "packet", writable=self.static.packet_writes),
                *self.static.handles,
                Region(self.stack, STACK_SIZE, "stack#0", writable=True),
            ]
        return regions

    # ------------------------------------------------------------------ regions

    def describe(self) -> str:
        """The region list, for error messages."""
        parts = [f"ctx {layout_of(self.pt).name}"]
        parts.extend(
            f"{r!r}@{base(rid):#x}" for rid, r in enumerate(self.regions) if rid >= PKT_RID
        )
        return ", ".join(parts)

    def fault(self, pc: int, what: str, addr: int, size: int, why: str = "") -> VmError:
        """The error for a refused access."""
        rid = addr >> SHIFT
        if 0 < rid < len(self.regions):
            where = f"{self.regions[rid].name} offset {(addr & OFF_MASK) - HALF}"
        else:
            where = "no region"
        reason = f": {why}" if why else ""
        return VmError(
            f"pc {pc}: invalid {what} of {size} bytes at {addr:#x} ({where}){reason}; "
            f"regions: {self.describe()}"
        )

    def new_stack(self, depth: int) -> tuple[int, bytearray]:
        """A fresh 512-byte frame for a local call: its r10 (top) address and bytes."""
        buf = bytearray(STACK_SIZE)
        self.regions.append(Region(buf, STACK_SIZE, f"stack#{depth}", writable=True))
        return base(len(self.regions) - 1) + STACK_SIZE, buf

    def add_value(self, value: bytearray, size: int, idx: int) -> int:
        """Address of a map value (one region per distinct value object in a run)."""
        key = id(value)
        rid = self.values.get(key)
        if rid is None:
            regions = self._regions
            if regions is None:
                regions = self.regions
            rid = len(regions)
            n = len(value)
            name = self.static.value_names[idx]
            regions.append(Region(value, size if size < n else n, name, writable=True))
            self.values[key] = rid
        return (rid << SHIFT) + HALF

    def kern_ctx(self) -> int:
        """Address of the kernel ``sk_buff`` view (``bpf_cast_to_kern_ctx``), one per run:
        read-only, zero but for the strparser fields the context carries."""
        if not self.kctx:
            k = program_internals()
            assert k is not None  # the validator admits the kfunc only then
            buf = bytearray(max(k.skb_strp_full_len, k.skb_strp_offset) + 4)
            ctx = self.ctx
            if type(ctx) is SkbContext:
                struct.pack_into("<I", buf, k.skb_strp_full_len, ctx.strp_full_len & M32)
                struct.pack_into("<I", buf, k.skb_strp_offset, ctx.strp_offset & M32)
            self.regions.append(Region(buf, len(buf), "kernel sk_buff"))
            self.kctx = len(self.regions) - 1
        return base(self.kctx)

    def _span(self, addr: int, size: int, pc: int, *, write: bool) -> tuple[Region, int]:
        rid = addr >> SHIFT
        what = "write" if write else "read"
        if not 0 < rid < len(self.regions) or rid == CTX_RID:
            raise self.fault(pc, what, addr, size, "not a pointer into any region")
        region = self.regions[rid]
        off = (addr & OFF_MASK) - HALF
        if region.buf is None:
            raise self.fault(pc, what, addr, size, "a map pointer cannot be dereferenced")
        if off < 0 or off + size > region.size:
            raise self.fault(pc, what, addr, size, f"outside {region!r}")
        if write and not region.writable:
            why = (
                "the packet is read-only for this program (no store the validator saw reaches it)"
                if rid == PKT_RID
                else "read-only region"
            )
            raise self.fault(pc, what, addr, size, why)
        return region, off

    # ------------------------------------------------------------------ access

    def load(self, addr: int, size: int, pc: int) -> int:
        """A little-endian load of ``size`` bytes, checked."""
        o = addr - self.sbase
        if 0 <= o <= STACK_SIZE - size:
            return int.from_bytes(self.stack[o : o + size], "little")
        rid = addr >> SHIFT
        if rid == CTX_RID:
            return self.ctx_load((addr & OFF_MASK) - HALF, size, pc)
        regions = self._regions
        if regions is not None and CTX_RID < rid < len(regions):
            region = regions[rid]
            off = (addr & OFF_MASK) - HALF
            buf = region.buf
            if buf is not None and 0 <= off <= region.size - size:
                return int.from_bytes(buf[off : off + size], "little")
        region, off = self._span(addr, size, pc, write=False)
        buf = region.buf
        assert buf is not None
        return int.from_bytes(buf[off : off + size], "little")

    def store(self, addr: int, size: int, value: int, pc: int) -> None:
        """A little-endian store of the low ``size`` bytes of ``value``, checked."""
        o = addr - self.sbase
        if 0 <= o <= STACK_SIZE - size:
            self.stack[o : o + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            return
        rid = addr >> SHIFT
        if rid == CTX_RID:
            self.ctx_store((addr & OFF_MASK) - HALF, size, value, pc)
            return
        regions = self._regions
        if regions is not None and PKT_RID < rid < len(regions):  # a map value, mostly
            region = regions[rid]
            off = (addr & OFF_MASK) - HALF
            buf = region.buf
            if region.writable and buf is not None and 0 <= off <= region.size - size:
                mask = (1 << (8 * size)) - 1
                buf[off : off + size] = (value & mask).to_bytes(size, "little")  # type: ignore[index]
                return
        region, off = self._span(addr, size, pc, write=True)
        buf = region.buf
        assert isinstance(buf, bytearray | memoryview)
        buf[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def ctx_load(self, off: int, size: int, pc: int) -> int:
        """A context read, by the program type's access table."""
        acc = self.table.get((off, size, False))
        if acc is None:
            raise self.fault(
                pc, "read", CTX_BASE + off, size, describe_access(self.pt, off, size, write=False)
            )
        if acc.kind == "field":
            return read_parts(self.ctx, acc.parts, self.length)
        if acc.kind == "data_end":
            return PKT_BASE + self.dlen
        return PKT_BASE  # data, data_meta (no metadata: meta == data)

    def ctx_store(self, off: int, size: int, value: int, pc: int) -> None:
        """A context write, by the program type's access table."""
        acc = self.table.get((off, size, True))
        if acc is None:
            raise self.fault(
                pc, "write", CTX_BASE + off, size, describe_access(self.pt, off, size, write=True)
            )
        write_parts(self.ctx, acc.parts, value)

    def read_bytes(self, addr: int, n: int, pc: int) -> bytes:
        """``n`` bytes at ``addr`` (helper arguments), checked."""
        o = addr - self.sbase
        if 0 <= o <= STACK_SIZE - n:
            return bytes(self.stack[o : o + n])
        if addr >> SHIFT == CTX_RID:
            raise self.fault(pc, "read", addr, n, "helpers cannot read the context as memory")
        region, off = self._span(addr, n, pc, write=False)
        buf = region.buf
        assert buf is not None
        return bytes(buf[off : off + n])

    def check_write(self, addr: int, n: int, pc: int) -> tuple[bytearray | memoryview, int]:
        """The writable buffer and offset for ``n`` bytes at ``addr`` (helper outputs)."""
        o = addr - self.sbase
        if 0 <= o <= STACK_SIZE - n:
            return self.stack, o
        if addr >> SHIFT == CTX_RID:
            raise self.fault(pc, "write", addr, n, "helpers cannot write the context")
        region, off = self._span(addr, n, pc, write=True)
        buf = region.buf
        assert isinstance(buf, bytearray | memoryview)
        return buf, off

    def atomic(self, addr: int, size: int, op: int, src: int, r0: int, pc: int) -> tuple[int, int]:
        """A read-modify-write; returns the new (src, r0) register values."""
        if op == AtomicOp.ADD or op == AtomicOp.ADD | FETCH:  # counters: the common case
            rid = addr >> SHIFT
            regions = self._regions
            if regions is not None and CTX_RID < rid < len(regions):
                region = regions[rid]
                off = (addr & OFF_MASK) - HALF
                buf = region.buf
                if region.writable and 0 <= off <= region.size - size and buf is not None:
                    old = int.from_bytes(buf[off : off + size], "little")
                    new = (old + src) & ((1 << (8 * size)) - 1)
                    buf[off : off + size] = new.to_bytes(size, "little")  # type: ignore[index]
                    return (old if op & FETCH else src), r0
        if addr >> SHIFT == CTX_RID:
            raise self.fault(pc, "atomic", addr, size, "atomic operations on the context")
        region, off = self._span(addr, size, pc, write=True)
        buf = region.buf
        assert isinstance(buf, bytearray | memoryview)
        mask = (1 << (8 * size)) - 1
        old = int.from_bytes(buf[off : off + size], "little")
        if op == AtomicOp.XCHG:
            new, src = src & mask, old
        elif op == AtomicOp.CMPXCHG:
            new = src & mask if old == r0 & mask else old
            r0 = old
        else:
            new = alu(op & ~FETCH, old, src, 0, 64) & mask
            if op & FETCH:
                src = old
        buf[off : off + size] = new.to_bytes(size, "little")
        return src, r0

    def map_at(self, addr: int, pc: int) -> tuple[int, VmMap]:
        """The map a map-pointer argument names."""
        idx = (addr >> SHIFT) - FIRST_MAP_RID
        if not 0 <= idx < len(self.maps) or (addr & OFF_MASK) != HALF:
            raise self.fault(pc, "map argument", addr, 0, "not a map pointer")
        return idx, self.maps[idx]


def _writable(ctx: SkbContext | MsgContext) -> bytearray | memoryview:
    """The context's packet as a buffer a program may write: ``data`` itself when it is a
    bytearray or a writable memoryview, else a bytearray copy that replaces it."""
    data = ctx.data
    if type(data) is bytearray or (isinstance(data, memoryview) and not data.readonly):
        return data
    copy = bytearray(data)
    ctx.data = copy
    return copy


def new_table(pt: ProgType) -> dict[tuple[int, int, bool], CtxAccess]:
    """The context access table for ``pt`` (cached)."""
    return access_table(pt)
