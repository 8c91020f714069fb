"""A small reader of BTF, the kernel's compact type format (``Documentation/bpf/btf.rst``).

It reads a raw BTF blob — ``/sys/kernel/btf/vmlinux`` is one — and answers the few
questions this project asks of it: the offsets and sizes of a struct's members, the
values of an enum, ``sizeof`` a type. The type section is scanned once on load (each
record's length is known from its kind and ``vlen``); everything else — names,
members, enumerators — is decoded only when asked for.

>>> btf = Btf.load()                                    # doctest: +SKIP
>>> btf.struct_members("__sk_buff")[0]                  # doctest: +SKIP
Member(name='len', offset_bytes=0, size_bytes=4, count=1, ...)
>>> btf.enum_values("sk_action")                        # doctest: +SKIP
{'SK_DROP': 0, 'SK_PASS': 1}

Module BTF (``/sys/kernel/btf/<module>``) is "split" BTF on top of vmlinux: pass the
vmlinux :class:`Btf` as ``base``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from sockmap.errors import SockmapError

__all__ = [
    "BTF_MAGIC",
    "VMLINUX_BTF",
    "ArrayInfo",
    "Btf",
    "BtfError",
    "BtfMember",
    "BtfNotFound",
    "BtfType",
    "IntInfo",
    "Kind",
    "Member",
]

BTF_MAGIC = 0xEB9F
BTF_VERSION = 1
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

_HDR_FMT = "HBBIIIII"  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
_HDR_SIZE = struct.calcsize("<" + _HDR_FMT)  # 24
_TYPE_SIZE = 12  # struct btf_type: name_off, info, size/type
_MAX_CHAIN = 64  # longest typedef/modifier/array chain followed before calling it a cycle


class Kind(IntEnum):
    """``BTF_KIND_*``."""

    UNKN = 0  # only type id 0, "void"
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Bytes that follow the 12-byte btf_type, per kind: (fixed, per vlen item).
_TRAILER: tuple[tuple[int, int], ...] = (
    (0, 0),  # UNKN (never in the type section)
    (4, 0),  # INT: u32 encoding/offset/bits
    (0, 0),  # PTR
    (12, 0),  # ARRAY: btf_array {type, index_type, nelems}
    (0, 12),  # STRUCT: btf_member {name_off, type, offset}
    (0, 12),  # UNION
    (0, 8),  # ENUM: btf_enum {name_off, s32 val}
    (0, 0),  # FWD
    (0, 0),  # TYPEDEF
    (0, 0),  # VOLATILE
    (0, 0),  # CONST
    (0, 0),  # RESTRICT
    (0, 0),  # FUNC (vlen is the linkage)
    (0, 8),  # FUNC_PROTO: btf_param {name_off, type}
    (4, 0),  # VAR: btf_var {linkage}
    (0, 12),  # DATASEC: btf_var_secinfo {type, offset, size}
    (0, 0),  # FLOAT
    (4, 0),  # DECL_TAG: btf_decl_tag {s32 component_idx}
    (0, 0),  # TYPE_TAG
    (0, 12),  # ENUM64: btf_enum64 {name_off, val_lo32, val_hi32}
)

_MODIFIERS = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})
_SIZED = frozenset(
    {Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FLOAT, Kind.DATASEC}
)
_COMPOSITE = (Kind.STRUCT, Kind.UNION)
_ENUMS = (Kind.ENUM, Kind.ENUM64)


class BtfError(SockmapError, ValueError):
    """The BTF blob is malformed (bad magic, truncated, a type id out of range...)."""


class BtfNotFound(SockmapError, KeyError):  # noqa: N818 - reads as a kind, like KeyError
    """No type (or enumerator) of that name and kind is in this BTF."""

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, slots=True)
class BtfType:
    """One ``struct btf_type`` record, undecoded beyond its common header."""

    id: int
    kind: Kind
    name: str
    vlen: int
    kind_flag: bool
    size_or_type: int
    """``size`` for INT/STRUCT/UNION/ENUM/ENUM64/FLOAT/DATASEC, else a type id."""


@dataclass(frozen=True, slots=True)
class IntInfo:
    """The word after an INT: ``BTF_INT_ENCODING/OFFSET/BITS``."""

    size: int
    bits: int
    offset: int
    signed: bool
    char: bool
    bool: bool


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """``struct btf_array``."""

    elem_type: int
    index_type: int
    nelems: int


@dataclass(frozen=True, slots=True)
class BtfMember:
    """A STRUCT/UNION member as BTF records it (no flattening)."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int
    """Width in bits when the struct's ``kind_flag`` is set and this is a bitfield, else 0."""


@dataclass(frozen=True, slots=True)
class Member:
    """A member as C code sees it: anonymous structs/unions flattened into their parent.

    Arrays (of any rank) are one member of ``count`` elements of ``size_bytes`` each.
    """

    name: str
    offset_bytes: int
    size_bytes: int
    count: int = 1
    type_id: int = 0
    """The member's declared type (before typedefs and array dimensions are stripped)."""
    kind: Kind = Kind.INT
    """Kind of the element type with typedefs/modifiers resolved (PTR for pointers)."""
    bit_offset: int = 0
    bitfield_size: int = 0

    @property
    def end(self) -> int:
        return self.offset_bytes + self.size_bytes * self.count


class Btf:
    """A parsed BTF blob. Build with :meth:`load` or :meth:`from_bytes`."""

    def __init__(self, data: bytes, base: Btf | None = None) -> None:
        """Parse ``data`` (a raw BTF blob, not ELF); ``base`` for split (module) BTF."""
        self.base = base
        self._data = data
        if len(data) < _HDR_SIZE:
            raise BtfError(f"BTF blob truncated: {len(data)} bytes, the header alone is 24")
        magic = struct.unpack_from("<H", data, 0)[0]
        if magic == BTF_MAGIC:
            self.byteorder = "<"
        elif magic == 0x9FEB:
            self.byteorder = ">"
        else:
            raise BtfError(
                f"not a BTF blob: magic 0x{magic:04x}, expected 0x{BTF_MAGIC:04x} "
                "(an ELF object carries BTF in its .BTF section; pass that section's bytes)"
            )
        bo = self.byteorder
        (_, version, self.flags, hdr_len, type_off, type_len, str_off, str_len) = (
            struct.unpack_from(bo + _HDR_FMT, data, 0)
        )
        if version != BTF_VERSION:
            raise BtfError(f"unsupported BTF version {version} (this reader knows {BTF_VERSION})")
        if hdr_len < _HDR_SIZE or hdr_len > len(data):
            raise BtfError(f"BTF header length {hdr_len} is impossible for a {len(data)}-byte blob")
        for what, off, length in (("type", type_off, type_len), ("string", str_off, str_len)):
            if hdr_len + off + length > len(data):
                raise BtfError(
                    f"BTF blob truncated: {what} section ends at byte {hdr_len + off + length}, "
                    f"the blob has {len(data)}"
                )
        self._type_start = hdr_len + type_off
        self._type_end = self._type_start + type_len
        self._str_start: int = hdr_len + str_off
        self._str_len: int = str_len
        if str_len and data[self._str_start + str_len - 1] != 0:
            raise BtfError("BTF string section must end with a NUL byte")
        if base is None and str_len and data[self._str_start] != 0:
            raise BtfError('BTF string section must start with a NUL byte (offset 0 is "")')
        # For split BTF both ids and string offsets continue from the base.
        self._str_base: int = base.string_section_len if base else 0
        self.start_id: int = base.end_id if base else 1
        self._offs: list[int] = []
        self._names: list[int] = []
        self._infos: list[int] = []
        self._st: list[int] = []
        self._scan()
        self.end_id: int = self.start_id + len(self._offs)
        self._strcache: dict[int, str] = {}
        self._by_name: dict[str, list[int]] | None = None
        self._enumerators: dict[str, list[int]] | None = None
        self._pointer_size: int | None = None

    # ----------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | Path = VMLINUX_BTF, base: Btf | None = None) -> Btf:
        """Read and parse the BTF blob at ``path`` (the running kernel's by default)."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise BtfError(
                f"{path} does not exist: the kernel was built without CONFIG_DEBUG_INFO_BTF "
                "or sysfs is not mounted"
            ) from None
        return cls(data, base)

    @classmethod
    def from_bytes(cls, data: bytes, base: Btf | None = None) -> Btf:
        return cls(bytes(data), base)

    def _scan(self) -> None:
        data, pos, end = self._data, self._type_start, self._type_end
        unpack = struct.Struct(self.byteorder + "III").unpack_from
        trailer = _TRAILER
        nkinds = len(trailer)
        offs, names, infos, sts = self._offs, self._names, self._infos, self._st
        while pos < end:
            if pos + _TYPE_SIZE > end:
                raise BtfError(
                    f"BTF type section truncated: type {self.start_id + len(offs)} "
                    f"header at byte {pos} runs past the section end {end}"
                )
            name_off, info, st = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            if kind == 0 or kind >= nkinds:
                raise BtfError(
                    f"BTF type {self.start_id + len(offs)} at byte {pos} has unknown kind {kind}"
                )
            fixed, per = trailer[kind]
            offs.append(pos)
            names.append(name_off)
            infos.append(info)
            sts.append(st)
            pos += _TYPE_SIZE + fixed + per * (info & 0xFFFF)
        if pos != end:
            raise BtfError(
                f"BTF type section truncated: type {self.start_id + len(offs) - 1} "
                f"runs to byte {pos}, past the section end {end}"
            )

    # ----------------------------------------------------------------- basics

    @property
    def string_section_len(self) -> int:
        """Length of all strings up to and including this BTF's (base's too, when split)."""
        return self._str_base + self._str_len

    def __len__(self) -> int:
        """Number of type ids, counting void (id 0) and a base's types."""
        return self.end_id

    def ids(self) -> range:
        """This BTF's own type ids (not a base's, not void)."""
        return range(self.start_id, self.end_id)

    def string(self, off: int) -> str:
        """The NUL-terminated string at ``off`` in the string section."""
        if off < self._str_base:
            assert self.base is not None
            return self.base.string(off)
        cached = self._strcache.get(off)
        if cached is not None:
            return cached
        local = off - self._str_base
        if local >= self._str_len:
            raise BtfError(f"BTF string offset {off} is past the string section ({self._str_len})")
        start = self._str_start + local
        stop = self._data.find(b"\0", start, self._str_start + self._str_len)
        s = self._data[start:stop].decode("utf-8", "replace")
        self._strcache[off] = s
        return s

    def _local(self, tid: int) -> int:
        i = tid - self.start_id
        if not 0 <= i < len(self._offs):
            raise BtfError(f"BTF type id {tid} out of range (1..{self.end_id - 1})")
        return i

    def kind(self, tid: int) -> Kind:
        if tid == 0:
            return Kind.UNKN
        if tid < self.start_id and self.base is not None:
            return self.base.kind(tid)
        return Kind((self._infos[self._local(tid)] >> 24) & 0x1F)

    def name(self, tid: int) -> str:
        if tid == 0:
            return "void"
        if tid < self.start_id and self.base is not None:
            return self.base.name(tid)
        return self.string(self._names[self._local(tid)])

    def type(self, tid: int) -> BtfType:
        """The common header of type ``tid``."""
        if tid == 0:
            return BtfType(0, Kind.UNKN, "void", 0, kind_flag=False, size_or_type=0)
        if tid < self.start_id and self.base is not None:
            return self.base.type(tid)
        i = self._local(tid)
        info = self._infos[i]
        return BtfType(
            tid,
            Kind((info >> 24) & 0x1F),
            self.string(self._names[i]),
            info & 0xFFFF,
            bool(info >> 31),
            self._st[i],
        )

    def _owner(self, tid: int) -> tuple[Btf, int]:
        """The Btf that holds ``tid`` and the local index there."""
        btf: Btf = self
        while tid < btf.start_id and btf.base is not None:
            btf = btf.base
        return btf, btf._local(tid)

    def _expect(self, tid: int, *kinds: Kind) -> tuple[Btf, int]:
        k = self.kind(tid)
        if k not in kinds:
            want = "/".join(x.name for x in kinds)
            raise BtfError(f"BTF type {tid} ({self.name(tid)!r}) is {k.name}, not {want}")
        return self._owner(tid)

    # ----------------------------------------------------------------- per-kind data

    def int_info(self, tid: int) -> IntInfo:
        btf, i = self._expect(tid, Kind.INT)
        (word,) = struct.unpack_from(btf.byteorder + "I", btf._data, btf._offs[i] + _TYPE_SIZE)
        enc = (word >> 24) & 0x0F
        return IntInfo(
            size=btf._st[i],
            bits=word & 0xFF,
            offset=(word >> 16) & 0xFF,
            signed=bool(enc & 1),
            char=bool(enc & 2),
            bool=bool(enc & 4),
        )

    def array(self, tid: int) -> ArrayInfo:
        btf, i = self._expect(tid, Kind.ARRAY)
        elem, index, n = struct.unpack_from(
            btf.byteorder + "III", btf._data, btf._offs[i] + _TYPE_SIZE
        )
        return ArrayInfo(elem, index, n)

    def _items(self, btf: Btf, i: int, fmt: str) -> list[tuple[int, ...]]:
        vlen = btf._infos[i] & 0xFFFF
        size = struct.calcsize("<" + fmt)
        start = btf._offs[i] + _TYPE_SIZE
        view = memoryview(btf._data)[start : start + vlen * size]
        return list(struct.iter_unpack(btf.byteorder + fmt, view))

    def members(self, tid: int) -> list[BtfMember]:
        """Members of STRUCT/UNION ``tid`` exactly as recorded."""
        btf, i = self._expect(tid, *_COMPOSITE)
        kflag = btf._infos[i] >> 31
        out = []
        for name_off, mtype, off in self._items(btf, i, "III"):
            if kflag:
                out.append(BtfMember(btf.string(name_off), mtype, off & 0xFFFFFF, off >> 24))
            else:
                out.append(BtfMember(btf.string(name_off), mtype, off, 0))
        return out

    def enumerators(self, tid: int) -> list[tuple[str, int]]:
        """``(name, value)`` of ENUM/ENUM64 ``tid``; signed when its ``kind_flag`` says so."""
        btf, i = self._expect(tid, *_ENUMS)
        signed = bool(btf._infos[i] >> 31)
        if btf.kind(tid) is Kind.ENUM:
            out = []
            for name_off, val in self._items(btf, i, "Ii"):
                out.append((btf.string(name_off), val if signed else val & 0xFFFFFFFF))
            return out
        out = []
        for name_off, lo, hi in self._items(btf, i, "III"):
            val = (hi << 32) | lo
            if signed and val >= 1 << 63:
                val -= 1 << 64
            out.append((btf.string(name_off), val))
        return out

    def params(self, tid: int) -> list[tuple[str, int]]:
        """``(name, type id)`` of FUNC_PROTO ``tid``'s parameters."""
        btf, i = self._expect(tid, Kind.FUNC_PROTO)
        return [(btf.string(n), t) for n, t in self._items(btf, i, "II")]

    def var_secinfos(self, tid: int) -> list[tuple[int, int, int]]:
        """``(type id, offset, size)`` of DATASEC ``tid``'s variables."""
        btf, i = self._expect(tid, Kind.DATASEC)
        return [(t, o, s) for t, o, s in self._items(btf, i, "III")]

    # ----------------------------------------------------------------- resolution

    def resolve(self, tid: int) -> int:
        """Follow TYPEDEF/CONST/VOLATILE/RESTRICT/TYPE_TAG to the underlying type id."""
        for _ in range(_MAX_CHAIN):
            if self.kind(tid) not in _MODIFIERS:
                return tid
            tid = self._ref(tid)
        raise BtfError(f"BTF type chain from {tid} is longer than {_MAX_CHAIN}: a cycle?")

    def _ref(self, tid: int) -> int:
        """The raw ``size``/``type`` word of ``tid`` (no name decoding)."""
        btf, i = self._owner(tid)
        return btf._st[i]

    def pointee(self, tid: int) -> int:
        """The type a PTR (after resolving modifiers) points to."""
        rt = self.resolve(tid)
        if self.kind(rt) is not Kind.PTR:
            raise BtfError(f"BTF type {tid} is {self.kind(rt).name}, not a pointer")
        return self._ref(rt)

    @property
    def pointer_size(self) -> int:
        """Size of a pointer: BTF has none, so take ``long``'s (8 when there is none)."""
        if self._pointer_size is None:
            size = 8
            for name in ("long unsigned int", "long int", "unsigned long", "long"):
                for tid in self.find_all(name, Kind.INT):
                    size = self._ref(tid)
                    break
                else:
                    continue
                break
            self._pointer_size = size
        return self._pointer_size

    def sizeof(self, tid: int) -> int:
        """``sizeof`` type ``tid`` in bytes."""
        mult = 1
        for _ in range(_MAX_CHAIN):
            kind = self.kind(tid)
            if kind in _SIZED:
                return mult * self._ref(tid)
            if kind is Kind.PTR:
                return mult * self.pointer_size
            if kind is Kind.ARRAY:
                a = self.array(tid)
                mult *= a.nelems
                tid = a.elem_type
            elif kind in _MODIFIERS or kind is Kind.VAR:
                tid = self._ref(tid)
            else:
                raise BtfError(f"sizeof BTF type {tid}: a {kind.name} has no size")
        raise BtfError(f"BTF type chain from {tid} is longer than {_MAX_CHAIN}: a cycle?")

    # ----------------------------------------------------------------- lookup by name

    def _name_index(self) -> dict[str, list[int]]:
        if self._by_name is None:
            index: dict[str, list[int]] = {}
            string = self.string
            for i, name_off in enumerate(self._names):
                if name_off:
                    index.setdefault(string(name_off), []).append(self.start_id + i)
            self._by_name = index
        return self._by_name

    def find_all(self, name: str, kind: Kind | tuple[Kind, ...] | None = None) -> list[int]:
        """Every type id named ``name`` (of ``kind``, when given), a base's first."""
        ids = list(self.base.find_all(name, kind)) if self.base else []
        own = self._name_index().get(name, [])
        if kind is None:
            return ids + own
        kinds = (kind,) if isinstance(kind, Kind) else kind
        return ids + [t for t in own if self.kind(t) in kinds]

    def find(self, name: str, kind: Kind | tuple[Kind, ...] | None = None) -> int:
        """The type id named ``name`` (of ``kind``); a full definition beats a FWD."""
        ids = self.find_all(name, kind)
        if not ids:
            what = "" if kind is None else f" of kind {_kind_names(kind)}"
            raise BtfNotFound(f"no BTF type named {name!r}{what}")
        for tid in ids:
            if self.kind(tid) is not Kind.FWD:
                return tid
        return ids[0]

    # ----------------------------------------------------------------- the questions asked

    def _composite(self, name_or_id: str | int) -> int:
        if isinstance(name_or_id, int):
            return name_or_id
        return self.find(name_or_id, _COMPOSITE)

    def struct_members(self, name_or_id: str | int) -> list[Member]:
        """Members of a struct/union as C exposes them.

        Anonymous struct/union members are flattened into their parent with offsets
        adjusted; unnamed non-composite members (padding bitfields like ``__u32 :24``)
        are left out. A pointer that is the only named member of an anonymous union —
        the UAPI's ``__bpf_md_ptr`` — takes the union's size (8), as its slot does.
        """
        out: list[Member] = []
        self._flatten(self.resolve(self._composite(name_or_id)), 0, out, 0)
        return out

    def _flatten(self, tid: int, base_bits: int, out: list[Member], depth: int) -> None:
        if depth > _MAX_CHAIN:
            raise BtfError(f"BTF struct nesting deeper than {_MAX_CHAIN} at type {tid}")
        members = self.members(tid)
        is_anon_union = depth > 0 and self.kind(tid) is Kind.UNION
        named = [m for m in members if m.name]
        for m in members:
            bits = base_bits + m.bit_offset
            if not m.name:
                rt = self.resolve(m.type_id)
                if self.kind(rt) in _COMPOSITE:
                    self._flatten(rt, bits, out, depth + 1)
                continue
            elem, count = self.resolve(m.type_id), 1
            for _ in range(_MAX_CHAIN):
                if self.kind(elem) is not Kind.ARRAY:
                    break
                a = self.array(elem)
                count *= a.nelems
                elem = self.resolve(a.elem_type)
            kind = self.kind(elem)
            size = self.sizeof(elem) if kind not in (Kind.FWD, Kind.FUNC_PROTO) else 0
            if is_anon_union and kind is Kind.PTR and len(named) == 1 and count == 1:
                size = max(size, self._ref(tid))
            out.append(
                Member(
                    name=m.name,
                    offset_bytes=bits // 8,
                    size_bytes=size,
                    count=count,
                    type_id=m.type_id,
                    kind=kind,
                    bit_offset=bits,
                    bitfield_size=m.bitfield_size,
                )
            )

    def enum_values(self, name_or_id: str | int) -> dict[str, int]:
        """``{enumerator: value}`` of the ENUM/ENUM64 named (or with id) ``name_or_id``."""
        tid = name_or_id if isinstance(name_or_id, int) else self.find(name_or_id, _ENUMS)
        return dict(self.enumerators(self.resolve(tid)))

    def _enumerator_index(self) -> dict[str, list[int]]:
        if self._enumerators is None:
            index: dict[str, list[int]] = {}
            for i, info in enumerate(self._infos):
                if (info >> 24) & 0x1F in _ENUMS:
                    for ename, val in self.enumerators(self.start_id + i):
                        index.setdefault(ename, []).append(val)
            self._enumerators = index
        return self._enumerators

    def _enumerator_values(self, name: str) -> list[int]:
        vals = self.base._enumerator_values(name) if self.base else []
        return vals + self._enumerator_index().get(name, [])

    def enumerator(self, name: str) -> int:
        """Value of enumerator ``name`` in whichever enum holds it (anonymous ones too).

        Raises :class:`BtfNotFound` when no enum has it and :class:`BtfError` when
        several enums give it different values.
        """
        vals = self._enumerator_values(name)
        if not vals:
            raise BtfNotFound(f"no BTF enum has an enumerator named {name!r}")
        if len(set(vals)) > 1:
            raise BtfError(f"enumerator {name!r} has different values in BTF: {sorted(set(vals))}")
        return vals[0]


def _kind_names(kind: Kind | tuple[Kind, ...]) -> str:
    kinds = (kind,) if isinstance(kind, Kind) else kind
    return "/".join(k.name for k in kinds)
