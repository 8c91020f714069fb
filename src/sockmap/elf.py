"""Programs and maps from an eBPF ELF object (what ``clang -target bpf -c`` writes).

Programs are found by section name (``sk_skb/stream_parser``, ``sk_skb/stream_verdict``,
``sk_skb/verdict``, ``sk_skb``, ``sk_msg``, ``sockops``), one per function symbol in
the section. Maps come from BTF-defined ``.maps`` (``__uint(type, ...)``,
``__uint(max_entries, ...)``, ``__type(key, ...)``/``__uint(key_size, ...)``...) and
from the legacy ``maps`` section (``struct bpf_map_def``). A map relocation (an
``R_BPF_64_64`` on a 64-bit immediate load) becomes a map reference of our
assembler, so the same object works with either engine:

```python
obj = ElfObject.open("splice.o")
with sockmap.open_engine() as eng:
    loaded = obj.instantiate(eng)                   # creates the maps in that engine
    eng.attach(loaded.maps["sock_map"],
               parser=loaded.programs["parse"], verdict=loaded.programs["route"])
```

pyelftools reads the ELF; our BTF reader reads the object's ``.BTF``.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sockmap import asm
from sockmap.abi import AttachType, MapType, ProgType
from sockmap.abi.btf import Btf, BtfError, Kind
from sockmap.asm.instruction import Instruction
from sockmap.asm.opcodes import LD_IMM64, PSEUDO_MAP_FD
from sockmap.errors import BpfError

__all__ = ["ElfMap", "ElfObject", "ElfProgram", "LoadedObject"]

SECTIONS: dict[str, tuple[ProgType, AttachType | None]] = {
    "sk_skb/stream_parser": (ProgType.SK_SKB, AttachType.SK_SKB_STREAM_PARSER),
    "sk_skb/stream_verdict": (ProgType.SK_SKB, AttachType.SK_SKB_STREAM_VERDICT),
    "sk_skb/verdict": (ProgType.SK_SKB, AttachType.SK_SKB_VERDICT),
    "sk_skb": (ProgType.SK_SKB, None),
    "sk_msg": (ProgType.SK_MSG, AttachType.SK_MSG_VERDICT),
    "sockops": (ProgType.SOCK_OPS, AttachType.CGROUP_SOCK_OPS),
}
"""Section name -> (program type, where it attaches)."""

R_BPF_64_64 = 1
_MAP_DEF = struct.Struct("<IIIII")
_BTF_MAP_FIELDS = ("type", "max_entries", "key_size", "value_size", "map_flags")


class ElfError(BpfError):
    """An object this loader cannot use: says which section or symbol, and why."""

    def __init__(self, path: object, message: str) -> None:
        super().__init__(errno.EINVAL, f"{path}: {message}")


@dataclass(frozen=True)
class ElfMap:
    """A map the object defines."""

    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


@dataclass(frozen=True)
class ElfProgram:
    """A program of the object; its map references name the object's maps."""

    name: str
    section: str
    prog_type: ProgType
    attach_type: AttachType | None
    program: asm.Program


@dataclass
class LoadedObject:
    """An object's maps created in one engine, and its programs bound to them."""

    maps: dict[str, Any] = field(default_factory=dict)
    programs: dict[str, asm.Program] = field(default_factory=dict)
    types: dict[str, ProgType] = field(default_factory=dict)


@dataclass(frozen=True)
class _MapRef:
    """A placeholder map reference until the object is instantiated in an engine."""

    name: str
    fd: int = -1

    def __str__(self) -> str:
        return self.name


class ElfObject:
    """The programs, maps and license of one eBPF ELF object."""

    def __init__(
        self, path: str, maps: dict[str, ElfMap], programs: dict[str, ElfProgram], license_: str
    ) -> None:
        self.path = path
        self.maps = maps
        self.programs = programs
        self.license = license_

    @classmethod
    def open(cls, path: str | Path) -> ElfObject:
        from elftools.common.exceptions import ELFError  # noqa: PLC0415
        from elftools.elf.elffile import ELFFile  # noqa: PLC0415

        where = str(path)
        try:
            with Path(path).open("rb") as f:
                elf = ELFFile(f)
                if elf["e_machine"] not in ("EM_BPF", 247):
                    raise ElfError(where, f"not an eBPF object (machine {elf['e_machine']})")
                return cls._read(where, elf)
        except ELFError as exc:
            raise ElfError(where, f"not a readable ELF file: {exc}") from None

    @classmethod
    def _read(cls, where: str, elf: Any) -> ElfObject:  # noqa: ANN401 - pyelftools objects
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            raise ElfError(where, "no symbol table")
        sections = list(elf.iter_sections())
        maps: dict[str, ElfMap] = {}
        btf = None
        btf_sec = elf.get_section_by_name(".BTF")
        if btf_sec is not None:
            try:
                btf = Btf.from_bytes(btf_sec.data())
            except BtfError as exc:
                raise ElfError(where, f"unreadable .BTF section: {exc}") from None
        maps_idx = {i for i, s in enumerate(sections) if s.name in (".maps", "maps")}
        for sym in symtab.iter_symbols():
            shndx = sym["st_shndx"]
            if not isinstance(shndx, int) or shndx not in maps_idx or not sym.name:
                continue
            sec = sections[shndx]
            if sec.name == "maps":
                raw = sec.data()[sym["st_value"] : sym["st_value"] + _MAP_DEF.size]
                if len(raw) < _MAP_DEF.size:
                    raise ElfError(where, f"map {sym.name!r}: short bpf_map_def in 'maps'")
                t, ks, vs, me, flags = _MAP_DEF.unpack(raw)
                maps[sym.name] = ElfMap(sym.name, t, ks, vs, me, flags)
        if btf is not None:
            maps.update(_btf_maps(where, btf))
        license_sec = elf.get_section_by_name("license")
        license_ = license_sec.data().split(b"\0")[0].decode() if license_sec else "GPL"
        programs: dict[str, ElfProgram] = {}
        for idx, sec in enumerate(sections):
            kind = SECTIONS.get(sec.name)
            if kind is None or not sec["sh_flags"] & 0x4 or not sec.data_size:
                continue
            relocs = _relocations(elf, sec.name, symtab)
            funcs = sorted(
                (s["st_value"], s["st_size"], s.name)
                for s in symtab.iter_symbols()
                if s["st_shndx"] == idx and s["st_info"]["type"] == "STT_FUNC"
            )
            data = sec.data()
            for start, size, name in funcs:
                items = _program_items(where, name, data[start : start + size], start, relocs, maps)
                programs[name] = ElfProgram(
                    name, sec.name, kind[0], kind[1], asm.Program(items, name=name[:15])
                )
        if not programs:
            known = ", ".join(SECTIONS)
            raise ElfError(where, f"no programs in sections this loader knows ({known})")
        return cls(where, maps, programs, license_)

    def instantiate(self, engine: Any) -> LoadedObject:  # noqa: ANN401 - either engine
        """Create this object's maps in ``engine`` and bind the programs to them."""
        out = LoadedObject()
        for m in self.maps.values():
            out.maps[m.name] = _create(engine, m, self.path)
        for p in self.programs.values():
            items: list[asm.Item] = []
            for item in p.program.items:
                if isinstance(item, Instruction) and isinstance(item.map_ref, _MapRef):
                    items.append(asm.ld_map_fd(asm.Reg(item.dst), out.maps[item.map_ref.name]))
                else:
                    items.append(item)
            out.programs[p.name] = asm.Program(items, name=p.program.name)
            out.types[p.name] = p.prog_type
        return out


def _btf_maps(where: str, btf: Btf) -> dict[str, ElfMap]:
    out: dict[str, ElfMap] = {}
    for sec in btf.find_all(".maps", Kind.DATASEC):
        for var, _, _ in btf.var_secinfos(sec):
            name = btf.name(var)
            struct_id = btf.resolve(btf.type(var).size_or_type)
            values: dict[str, int] = {}
            for m in btf.members(struct_id):
                if m.name in _BTF_MAP_FIELDS:
                    arr = btf.resolve(btf.pointee(m.type_id))
                    values[m.name] = btf.array(arr).nelems
                elif m.name in ("key", "value"):
                    values[f"{m.name}_size"] = btf.sizeof(btf.pointee(m.type_id))
            if "type" not in values:
                raise ElfError(where, f"BTF map {name!r} has no __uint(type, ...)")
            out[name] = ElfMap(
                name,
                values["type"],
                values.get("key_size", 4),
                values.get("value_size", 4),
                values.get("max_entries", 1),
                values.get("map_flags", 0),
            )
    return out


def _relocations(elf: Any, section: str, symtab: Any) -> dict[int, str]:  # noqa: ANN401
    """Byte offset in ``section`` -> the symbol a 64-bit load there refers to."""
    rel = elf.get_section_by_name(f".rel{section}")
    out: dict[int, str] = {}
    if rel is None:
        return out
    for r in rel.iter_relocations():
        if r["r_info_type"] == R_BPF_64_64:
            out[r["r_offset"]] = symtab.get_symbol(r["r_info_sym"]).name
    return out


def _program_items(
    where: str,
    name: str,
    code: bytes,
    base: int,
    relocs: dict[int, str],
    maps: dict[str, ElfMap],
) -> list[asm.Item]:
    items: list[asm.Item] = []
    off = 0
    for ins in asm.decode(code):
        sym = relocs.get(base + off)
        if sym is not None:
            if ins.opcode != LD_IMM64:
                raise ElfError(where, f"{name}: relocation on a non-64-bit load at +{off}")
            if sym not in maps:
                raise ElfError(where, f"{name}: refers to {sym!r}, which is not a map")
            items.append(Instruction(LD_IMM64, ins.dst, PSEUDO_MAP_FD, 0, 0, map_ref=_MapRef(sym)))
        elif ins.opcode == 0x85 and ins.src == 1:
            raise ElfError(where, f"{name}: calls another function (not supported yet)")
        else:
            items.append(ins)
        off += 8 * ins.slots
    return items


def _create(engine: Any, m: ElfMap, where: str) -> Any:  # noqa: ANN401
    t = m.map_type
    if t == MapType.SOCKMAP:
        return engine.sockmap(m.max_entries, name=m.name[:15])
    if t == MapType.SOCKHASH:
        return engine.sockhash(m.max_entries, key_size=m.key_size, name=m.name[:15])
    if t == MapType.ARRAY:
        return engine.array(m.max_entries, value_size=m.value_size, name=m.name[:15])
    if t in (MapType.HASH, MapType.LRU_HASH):
        return engine.hash(
            m.max_entries, key_size=m.key_size, value_size=m.value_size, name=m.name[:15]
        )
    raise ElfError(where, f"map {m.name!r}: type {t} is not supported by this loader")
