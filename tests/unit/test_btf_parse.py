"""The BTF reader on small blobs built here byte by byte (no kernel needed)."""

from __future__ import annotations

import struct

import pytest

from sockmap.abi.btf import BTF_MAGIC, Btf, BtfError, BtfMember, BtfNotFound, Kind, Member
from sockmap.errors import SockmapError


class Blob:
    """Builds a raw BTF blob: header, type section, string section."""

    def __init__(self, byteorder: str = "<", first_id: int = 1, str_base: int = 0) -> None:
        self.bo = byteorder
        self.strings = bytearray(b"\0") if str_base == 0 else bytearray()
        self.str_base = str_base
        self.types: list[bytes] = []
        self.first_id = first_id
        self._soff: dict[str, int] = {"": 0}

    def s(self, name: str) -> int:
        if name not in self._soff:
            self._soff[name] = self.str_base + len(self.strings)
            self.strings += name.encode() + b"\0"
        return self._soff[name]

    def add(
        self,
        kind: Kind,
        name: str = "",
        size_or_type: int = 0,
        vlen: int = 0,
        kflag: bool = False,
        trailer: bytes = b"",
    ) -> int:
        info = (int(kflag) << 31) | (int(kind) << 24) | vlen
        self.types.append(struct.pack(self.bo + "III", self.s(name), info, size_or_type) + trailer)
        return self.first_id + len(self.types) - 1

    def int_(self, name: str, size: int, signed: bool = False, char: bool = False) -> int:
        enc = (1 if signed else 0) | (2 if char else 0)
        word = (enc << 24) | (size * 8)
        return self.add(Kind.INT, name, size, trailer=struct.pack(self.bo + "I", word))

    def ptr(self, to: int) -> int:
        return self.add(Kind.PTR, "", to)

    def array(self, elem: int, index: int, n: int) -> int:
        return self.add(Kind.ARRAY, "", 0, trailer=struct.pack(self.bo + "III", elem, index, n))

    def composite(
        self,
        kind: Kind,
        name: str,
        size: int,
        members: list[tuple[str, int, int, int]],  # name, type, bit offset, bitfield size
        kflag: bool = False,
    ) -> int:
        body = b""
        for mname, mtype, bits, width in members:
            off = (width << 24) | bits if kflag else bits
            body += struct.pack(self.bo + "III", self.s(mname), mtype, off)
        return self.add(kind, name, size, len(members), kflag, body)

    def enum(self, name: str, values: list[tuple[str, int]], signed: bool = False) -> int:
        body = b"".join(struct.pack(self.bo + "Ii", self.s(n), v) for n, v in values)
        return self.add(Kind.ENUM, name, 4, len(values), signed, body)

    def enum_u32(self, name: str, values: list[tuple[str, int]]) -> int:
        body = b"".join(struct.pack(self.bo + "II", self.s(n), v) for n, v in values)
        return self.add(Kind.ENUM, name, 4, len(values), kflag=False, trailer=body)

    def enum64(self, name: str, values: list[tuple[str, int]], signed: bool = False) -> int:
        body = b""
        for n, v in values:
            u = v & 0xFFFFFFFFFFFFFFFF
            body += struct.pack(self.bo + "III", self.s(n), u & 0xFFFFFFFF, u >> 32)
        return self.add(Kind.ENUM64, name, 8, len(values), signed, body)

    def build(self, magic: int = BTF_MAGIC, version: int = 1) -> bytes:
        types = b"".join(self.types)
        hdr = struct.pack(
            self.bo + "HBBIIIII",
            magic,
            version,
            0,
            24,
            0,
            len(types),
            len(types),
            len(self.strings),
        )
        return hdr + types + bytes(self.strings)

    def btf(self, base: Btf | None = None) -> Btf:
        return Btf.from_bytes(self.build(), base)


# ---------------------------------------------------------------- basics


def test_ints_and_names() -> None:
    b = Blob()
    i32 = b.int_("int", 4, signed=True)
    u8 = b.int_("unsigned char", 1, char=True)
    btf = b.btf()
    assert len(btf) == 3
    assert list(btf.ids()) == [1, 2]
    assert btf.find("int") == i32
    assert btf.kind(i32) is Kind.INT
    info = btf.int_info(i32)
    assert (info.size, info.bits, info.offset, info.signed, info.char) == (4, 32, 0, True, False)
    assert btf.int_info(u8).char
    assert btf.sizeof(u8) == 1
    assert btf.name(0) == "void"
    assert btf.kind(0) is Kind.UNKN


def test_big_endian_blob() -> None:
    b = Blob(">")
    u32 = b.int_("u32", 4)
    b.composite(Kind.STRUCT, "s", 8, [("a", u32, 0, 0), ("b", u32, 32, 0)])
    btf = b.btf()
    assert btf.byteorder == ">"
    assert [(m.name, m.offset_bytes) for m in btf.struct_members("s")] == [("a", 0), ("b", 4)]


# ---------------------------------------------------------------- structs


def test_struct_with_bitfields_kind_flag() -> None:
    # struct bf { u32 a:3; u32 b:5; u32 :24; int c; u8 d; };
    b = Blob()
    u32 = b.int_("unsigned int", 4)
    i32 = b.int_("int", 4, signed=True)
    u8 = b.int_("unsigned char", 1)
    b.composite(
        Kind.STRUCT,
        "bf",
        12,
        [("a", u32, 0, 3), ("b", u32, 3, 5), ("", u32, 8, 24), ("c", i32, 32, 0), ("d", u8, 64, 0)],
        kflag=True,
    )
    btf = b.btf()
    tid = btf.find("bf", Kind.STRUCT)
    assert btf.members(tid) == [
        BtfMember("a", u32, 0, 3),
        BtfMember("b", u32, 3, 5),
        BtfMember("", u32, 8, 24),
        BtfMember("c", i32, 32, 0),
        BtfMember("d", u8, 64, 0),
    ]
    ms = btf.struct_members("bf")
    assert [m.name for m in ms] == ["a", "b", "c", "d"]  # the unnamed padding is left out
    a, bb, c, d = ms
    assert (a.bit_offset, a.bitfield_size, a.offset_bytes, a.size_bytes) == (0, 3, 0, 4)
    assert (bb.bit_offset, bb.bitfield_size) == (3, 5)
    assert (c.offset_bytes, c.size_bytes, c.bitfield_size) == (4, 4, 0)
    assert (d.offset_bytes, d.size_bytes, d.end) == (8, 1, 9)
    assert btf.sizeof(tid) == 12


def test_struct_without_kind_flag_reads_plain_bit_offsets() -> None:
    b = Blob()
    u32 = b.int_("u32", 4)
    # offset 0x0300_0020 would be "3-bit field at bit 32" with kind_flag; here it is bit 50331680
    b.composite(Kind.STRUCT, "s", 4, [("x", u32, 32, 0)])
    btf = b.btf()
    assert btf.members(btf.find("s")) == [BtfMember("x", u32, 32, 0)]


def test_anonymous_union_of_pointer_and_padding_is_eight_bytes() -> None:
    # struct ctx { u32 x; union { struct foo *p; u64 :64; }; u32 y[3]; } with a 4-byte long,
    # the way __bpf_md_ptr looks on a 32-bit kernel: the slot is 8 bytes, the pointer 4.
    b = Blob()
    u32 = b.int_("long unsigned int", 4)
    u64 = b.int_("long long unsigned int", 8)
    foo = b.add(Kind.FWD, "foo")
    pfoo = b.ptr(foo)
    anon = b.composite(Kind.UNION, "", 8, [("p", pfoo, 0, 0), ("", u64, 0, 64)], kflag=True)
    arr = b.array(u32, u32, 3)
    b.composite(Kind.STRUCT, "ctx", 32, [("x", u32, 0, 0), ("", anon, 64, 0), ("y", arr, 128, 0)])
    btf = b.btf()
    assert btf.pointer_size == 4
    assert btf.sizeof(pfoo) == 4
    ms = btf.struct_members("ctx")
    assert [(m.name, m.offset_bytes, m.size_bytes, m.count, m.kind) for m in ms] == [
        ("x", 0, 4, 1, Kind.INT),
        ("p", 8, 8, 1, Kind.PTR),
        ("y", 16, 4, 3, Kind.INT),
    ]
    assert btf.pointee(pfoo) == foo
    assert btf.sizeof(btf.find("ctx")) == 32


def test_nested_anonymous_struct_in_union_in_struct() -> None:
    # struct outer { int h; union { struct { int a; int b; }; long l; }; };
    b = Blob()
    i32 = b.int_("int", 4, signed=True)
    i64 = b.int_("long int", 8, signed=True)
    inner = b.composite(Kind.STRUCT, "", 8, [("a", i32, 0, 0), ("b", i32, 32, 0)])
    un = b.composite(Kind.UNION, "", 8, [("", inner, 0, 0), ("l", i64, 0, 0)])
    b.composite(Kind.STRUCT, "outer", 16, [("h", i32, 0, 0), ("", un, 64, 0)])
    btf = b.btf()
    got = [(m.name, m.offset_bytes, m.size_bytes) for m in btf.struct_members("outer")]
    assert got == [("h", 0, 4), ("a", 8, 4), ("b", 12, 4), ("l", 8, 8)]
    # a named union is reachable directly too
    assert [m.name for m in btf.struct_members(un)] == ["a", "b", "l"]


def test_arrays_multidimensional_and_empty() -> None:
    b = Blob()
    i32 = b.int_("int", 4, signed=True)
    row = b.array(i32, i32, 3)
    grid = b.array(row, i32, 2)
    empty = b.array(i32, i32, 0)
    b.composite(Kind.STRUCT, "g", 24, [("m", grid, 0, 0), ("tail", empty, 192, 0)])
    btf = b.btf()
    a = btf.array(grid)
    assert (a.elem_type, a.index_type, a.nelems) == (row, i32, 2)
    assert btf.sizeof(grid) == 24
    assert btf.sizeof(empty) == 0
    assert btf.struct_members("g") == [
        Member("m", 0, 4, 6, grid, Kind.INT, 0, 0),
        Member("tail", 24, 4, 0, empty, Kind.INT, 192, 0),
    ]


def test_typedef_and_modifier_chains() -> None:
    # const volatile s32, typedef s32 -> __s32 -> int; struct through a typedef too
    b = Blob()
    i32 = b.int_("int", 4, signed=True)
    s32_ = b.add(Kind.TYPEDEF, "__s32", i32)
    s32 = b.add(Kind.TYPEDEF, "s32", s32_)
    vol = b.add(Kind.VOLATILE, "", s32)
    cst = b.add(Kind.CONST, "", vol)
    tag = b.add(Kind.TYPE_TAG, "user", cst)
    restr = b.add(Kind.RESTRICT, "", b.ptr(tag))
    st = b.composite(Kind.STRUCT, "st", 4, [("v", cst, 0, 0)])
    b.add(Kind.TYPEDEF, "st_t", st)
    btf = b.btf()
    assert btf.resolve(tag) == i32
    assert btf.resolve(i32) == i32
    assert btf.sizeof(tag) == 4
    assert btf.sizeof(restr) == 8  # no "long" in this blob: pointers default to 8
    assert btf.find("s32", Kind.TYPEDEF) == s32
    assert btf.struct_members(btf.find("st_t")) == [Member("v", 0, 4, 1, cst, Kind.INT, 0, 0)]


def test_typedef_cycle_is_an_error() -> None:
    b = Blob()
    b.add(Kind.TYPEDEF, "a", 2)
    b.add(Kind.TYPEDEF, "b", 1)
    btf = b.btf()
    with pytest.raises(BtfError, match="cycle"):
        btf.resolve(1)
    with pytest.raises(BtfError, match="cycle"):
        btf.sizeof(1)


# ---------------------------------------------------------------- enums


def test_enum_signed_unsigned_and_enum64() -> None:
    b = Blob()
    b.enum("color", [("RED", 0), ("GREEN", 1), ("NEG", -2)], signed=True)
    b.enum_u32("big", [("TOP", 0xFFFFFFFF)])
    e64 = b.enum64("wide", [("W0", 1), ("W1", 1 << 40), ("WMAX", 0xFFFFFFFFFFFFFFFF)])
    b.enum64("swide", [("SNEG", -(1 << 40))], signed=True)
    btf = b.btf()
    assert btf.enum_values("color") == {"RED": 0, "GREEN": 1, "NEG": -2}
    assert btf.enum_values("big") == {"TOP": 0xFFFFFFFF}
    assert btf.enum_values("wide") == {"W0": 1, "W1": 1 << 40, "WMAX": 0xFFFFFFFFFFFFFFFF}
    assert btf.enum_values("swide") == {"SNEG": -(1 << 40)}
    assert btf.sizeof(e64) == 8
    assert btf.enum_values(e64)["W1"] == 1 << 40


def test_anonymous_enum_enumerators() -> None:
    b = Blob()
    b.enum("", [("BPF_ANY", 0), ("BPF_NOEXIST", 1)])
    b.enum("", [("BPF_F_INGRESS", 1)])
    b.enum("", [("DUP", 1)])
    b.enum("other", [("DUP", 2), ("SAME", 7)])
    b.enum64("", [("SAME", 7)])
    btf = b.btf()
    assert btf.enumerator("BPF_NOEXIST") == 1
    assert btf.enumerator("BPF_F_INGRESS") == 1
    assert btf.enumerator("SAME") == 7  # in two enums, but with one value
    with pytest.raises(BtfError, match="different values"):
        btf.enumerator("DUP")
    with pytest.raises(BtfNotFound):
        btf.enumerator("NOPE")


# ---------------------------------------------------------------- every kind is skipped right


def test_every_kind_is_skipped_correctly() -> None:
    b = Blob()
    i32 = b.int_("int", 4, signed=True)
    f64 = b.add(Kind.FLOAT, "double", 8)
    proto = b.add(
        Kind.FUNC_PROTO,
        "",
        i32,
        vlen=2,
        trailer=struct.pack("<IIII", b.s("x"), i32, b.s("y"), f64),
    )
    func = b.add(Kind.FUNC, "f", proto, vlen=1)  # vlen: linkage global
    var = b.add(Kind.VAR, "counter", i32, trailer=struct.pack("<I", 1))
    sec = b.add(Kind.DATASEC, ".data", 16, vlen=1, trailer=struct.pack("<III", var, 0, 4))
    b.add(Kind.DECL_TAG, "my_tag", func, trailer=struct.pack("<i", -1))
    b.add(Kind.FWD, "fwd_union", 0, kflag=True)
    b.enum("e", [("E0", 0)])
    b.enum64("e64", [("F0", 0)])
    b.array(i32, i32, 2)
    b.composite(Kind.UNION, "u", 4, [("i", i32, 0, 0)])
    td = b.add(Kind.TYPEDEF, "td", i32)
    b.add(
        Kind.RESTRICT,
        "",
        b.ptr(b.add(Kind.TYPE_TAG, "t", b.add(Kind.CONST, "", b.add(Kind.VOLATILE, "", td)))),
    )
    last = b.composite(Kind.STRUCT, "after_all", 8, [("p", i32, 0, 0), ("q", f64, 0, 0)])
    btf = b.btf()
    assert len(btf) == last + 1
    assert {btf.kind(t) for t in btf.ids()} == set(Kind) - {Kind.UNKN}
    assert [m.name for m in btf.struct_members("after_all")] == ["p", "q"]
    assert btf.params(proto) == [("x", i32), ("y", f64)]
    assert btf.type(func).size_or_type == proto
    assert btf.var_secinfos(sec) == [(var, 0, 4)]
    assert btf.sizeof(var) == 4
    assert btf.sizeof(sec) == 16
    assert btf.sizeof(f64) == 8
    with pytest.raises(BtfError, match="has no size"):
        btf.sizeof(func)
    with pytest.raises(BtfError, match="has no size"):
        btf.sizeof(0)
    with pytest.raises(BtfError, match="not STRUCT/UNION"):
        btf.members(i32)


# ---------------------------------------------------------------- lookup


def test_find_prefers_definition_over_fwd_and_filters_by_kind() -> None:
    b = Blob()
    fwd = b.add(Kind.FWD, "sock")
    i32 = b.int_("int", 4)
    full = b.composite(Kind.STRUCT, "sock", 4, [("x", i32, 0, 0)])
    same_name = b.add(Kind.TYPEDEF, "sock", full)
    btf = b.btf()
    assert btf.find_all("sock") == [fwd, full, same_name]
    assert btf.find("sock") == full
    assert btf.find("sock", Kind.FWD) == fwd
    assert btf.find("sock", (Kind.TYPEDEF, Kind.UNION)) == same_name
    with pytest.raises(BtfNotFound, match="no BTF type named 'nope'") as exc:
        btf.find("nope")
    assert isinstance(exc.value, KeyError)
    assert isinstance(exc.value, SockmapError)
    with pytest.raises(BtfNotFound, match="kind UNION"):
        btf.find("sock", Kind.UNION)
    with pytest.raises(BtfNotFound):
        btf.struct_members("nope")


def test_split_btf_continues_ids_and_strings() -> None:
    base_b = Blob()
    i32 = base_b.int_("int", 4, signed=True)
    base = base_b.btf()
    split = Blob(first_id=len(base), str_base=len(base_b.strings))
    st = split.composite(Kind.STRUCT, "mod_s", 8, [("a", i32, 0, 0), ("b", i32, 32, 0)])
    mod = split.btf(base)
    assert st == 2
    assert mod.start_id == 2
    assert mod.find("int") == i32
    assert mod.find("mod_s") == st
    assert [(m.name, m.offset_bytes) for m in mod.struct_members("mod_s")] == [("a", 0), ("b", 4)]
    assert mod.name(i32) == "int"


# ---------------------------------------------------------------- malformed blobs


def _good() -> bytes:
    b = Blob()
    i32 = b.int_("int", 4)
    b.composite(Kind.STRUCT, "s", 4, [("x", i32, 0, 0)])
    return b.build()


def test_bad_magic() -> None:
    data = bytearray(_good())
    data[0:2] = b"\x7fE"  # an ELF file, say
    with pytest.raises(BtfError, match="magic"):
        Btf.from_bytes(bytes(data))


def test_bad_version() -> None:
    b = Blob()
    b.int_("int", 4)
    with pytest.raises(BtfError, match="version"):
        Btf.from_bytes(b.build(version=2))


@pytest.mark.parametrize("n", [0, 1, 23])
def test_shorter_than_header(n: int) -> None:
    with pytest.raises(BtfError, match="truncated"):
        Btf.from_bytes(_good()[:n])


def test_truncated_string_section() -> None:
    with pytest.raises(BtfError, match="string section ends"):
        Btf.from_bytes(_good()[:-1])


def test_type_section_past_blob_end() -> None:
    data = bytearray(_good())
    struct.pack_into("<I", data, 12, 10_000)  # type_len
    with pytest.raises(BtfError, match="type section ends"):
        Btf.from_bytes(bytes(data))


@pytest.mark.parametrize("cut", [4, 13, 20])
def test_type_record_cut_short(cut: int) -> None:
    # keep the strings intact but claim a type section that stops inside a record
    data = bytearray(_good())
    type_len = struct.unpack_from("<I", data, 12)[0]
    struct.pack_into("<I", data, 12, type_len - cut)
    with pytest.raises(BtfError, match="type section truncated"):
        Btf.from_bytes(bytes(data))


def test_unknown_kind() -> None:
    b = Blob()
    b.add(Kind.INT, "int", 4, trailer=struct.pack("<I", 32))
    data = bytearray(b.build())
    struct.pack_into("<I", data, 24 + 4, 25 << 24)
    with pytest.raises(BtfError, match="unknown kind 25"):
        Btf.from_bytes(bytes(data))


def test_header_length_impossible() -> None:
    data = bytearray(_good())
    struct.pack_into("<I", data, 4, 8)
    with pytest.raises(BtfError, match="header length"):
        Btf.from_bytes(bytes(data))


def test_string_offset_out_of_range_and_type_id_out_of_range() -> None:
    b = Blob()
    b.types.append(struct.pack("<III", 999, int(Kind.TYPEDEF) << 24, 77))
    btf = b.btf()
    with pytest.raises(BtfError, match="string offset 999"):
        btf.name(1)
    with pytest.raises(BtfError, match="type id 77 out of range"):
        btf.resolve(1)


def test_errors_are_value_errors_and_sockmap_errors() -> None:
    with pytest.raises(ValueError, match="magic"):
        Btf.from_bytes(b"\0" * 24)
    with pytest.raises(SockmapError):
        Btf.from_bytes(b"")


def test_load_missing_file(tmp_path: object) -> None:
    with pytest.raises(BtfError, match="does not exist"):
        Btf.load(f"{tmp_path}/nope")
