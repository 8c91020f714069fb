"""``sockmap prog``: assemble, disassemble, load, list and run programs.

Sources are our assembler's text (what ``disasm`` prints; ``map[NAME]`` names a map
given with ``--map``), raw bytecode (``.bin``: 8-byte little-endian instructions),
or a ready program from :mod:`sockmap.programs` (``lib:NAME[:ARG...]``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sockmap import asm, programs
from sockmap.abi import MapType, ProgType, SkAction
from sockmap.errors import BpfError, SockmapError

if TYPE_CHECKING:
    from sockmap.kernel.engine import KernelEngine

__all__ = ["add_arguments", "run"]

_MAP_KINDS = {
    # kind: (MapType, default max_entries, key_size, value_size)
    "sockmap": (MapType.SOCKMAP, 2, 4, 4),
    "sockhash": (MapType.SOCKHASH, 2, 8, 4),
    "array": (MapType.ARRAY, 1, 4, 8),
    "hash": (MapType.HASH, 64, 8, 4),
}
_TYPES = {"sk_skb": ProgType.SK_SKB, "sk_msg": ProgType.SK_MSG}

EXAMPLES = """\
examples:
  sockmap prog disasm lib:preset:dns
  sockmap prog asm parser.s -o parser.bin
  sockmap prog run lib:length_prefixed:4:big:4 --input 0000000568656c6c6f
  sockmap prog run route.s --map sm=sockmap:4 --as verdict --input 01020304
  sockmap prog load lib:whole_segment --pin /sys/fs/bpf/whole_segment
  sockmap prog show --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLES + _library_help()
    sub = p.add_subparsers(dest="prog_command", metavar="ACTION", required=True)

    a = sub.add_parser("asm", help="assemble text into raw bytecode")
    _source(a)
    a.add_argument("-o", "--output", help="write the bytecode here (default: hex on stdout)")

    d = sub.add_parser("disasm", help="print a program as assembler text")
    _source(d)

    ld = sub.add_parser("load", help="load into the kernel (and pin); prints the program id")
    _source(ld)
    ld.add_argument("--type", choices=sorted(_TYPES), default="sk_skb", help="program type")
    ld.add_argument("--pin", help="pin the program at this bpffs path (default: do not pin)")
    ld.add_argument("--name", help="program name in the kernel (default: from the source)")

    sh = sub.add_parser("show", help="list the programs loaded on this host")
    sh.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    r = sub.add_parser(
        "run", help="run a program in the userspace VM on given bytes (no privileges)"
    )
    _source(r)
    r.add_argument("--type", choices=sorted(_TYPES), default="sk_skb", help="program type")
    r.add_argument(
        "--as",
        dest="role",
        choices=("parser", "verdict"),
        default=None,
        help="read r0 as a parser's length or a verdict (default: guessed from the name)",
    )
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="the message, in hex")
    src.add_argument("--input-file", help="the message: this file's bytes")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MAP:KEYHEX=VALUEHEX",
        help="put an entry in a data map before the run (repeatable)",
    )
    r.add_argument(
        "--socket",
        action="append",
        default=[],
        metavar="MAP:KEY",
        help="mark a sockmap key as holding a socket (redirects to it succeed)",
    )


def _source(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        help="assembler text file, .bin bytecode, a clang-built .o, lib:NAME[:ARG...], or -",
    )
    p.add_argument(
        "--program", help="which program of an ELF object (*.o) to use (by function name)"
    )
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="NAME=KIND[:ENTRIES[:KEY[:VALUE]]]",
        help=f"a map the program names as map[NAME]; KIND is one of {', '.join(_MAP_KINDS)}",
    )


def _library_help() -> str:
    return (
        "\nready programs (lib:...): whole_segment, fixed_size:N, "
        "length_prefixed[:WIDTH[:ORDER[:ADJUST[:OFFSET[:MAX]]]]], "
        f"preset:{'|'.join(sorted(programs.PRESETS))}, pass, drop, redirect_key:MAP:KEY, "
        "round_robin:MAP:COUNTER:N[:FIRST], hash_route:MAP:START:LEN:N[:FIRST]\n"
    )


@dataclass
class MapSpec:
    name: str
    kind: str
    max_entries: int
    key_size: int
    value_size: int


def _map_spec(text: str) -> MapSpec:
    name, _, rest = text.partition("=")
    parts = rest.split(":")
    if not name or parts[0] not in _MAP_KINDS:
        raise SystemExit(f"--map {text!r}: expected NAME=KIND[:ENTRIES[:KEY[:VALUE]]]")
    _, entries, key, value = _MAP_KINDS[parts[0]]
    nums = [int(x, 0) for x in parts[1:]]
    entries, key, value = (*nums, *[entries, key, value][len(nums) :])[:3]
    return MapSpec(name, parts[0], entries, key, value)


@dataclass
class Loaded:
    """A program ready to encode: where it came from, its items and the maps it names."""

    program: asm.Program | bytes
    name: str
    maps: dict[str, Any] = field(default_factory=dict)
    prog_type: ProgType | None = None
    """Known from the source (an ELF section); else --type decides."""


def _lib(spec: str, maps: dict[str, Any]) -> asm.Program:
    name, *args = spec.split(":")

    def m(ref: str) -> object:
        if ref not in maps:
            raise SystemExit(f"lib:{spec}: map {ref!r} needs --map {ref}=KIND")
        return maps[ref]

    def ints(xs: list[str]) -> list[int]:
        return [int(x, 0) for x in xs]

    try:
        if name == "whole_segment":
            return programs.whole_segment()
        if name == "fixed_size":
            return programs.fixed_size(*ints(args))
        if name == "length_prefixed":
            width = int(args[0]) if args else 4
            order = args[1] if len(args) > 1 else "big"
            rest = ints(args[2:5])
            return programs.length_prefixed(width, order, *rest)  # type: ignore[arg-type]
        if name == "preset":
            return programs.preset(args[0])
        if name == "pass":
            return programs.pass_()
        if name == "drop":
            return programs.drop()
        if name == "redirect_key":
            return programs.redirect_key(m(args[0]), int(args[1], 0))
        if name == "round_robin":
            first = int(args[3], 0) if len(args) > 3 else 0
            return programs.round_robin(m(args[0]), m(args[1]), int(args[2], 0), first=first)
        if name == "hash_route":
            start, length, n = ints(args[1:4])
            first = int(args[4], 0) if len(args) > 4 else 0
            return programs.hash_route(m(args[0]), start, length, n, first=first)
    except (IndexError, ValueError, TypeError) as exc:
        raise SystemExit(f"lib:{spec}: {exc}") from None
    raise SystemExit(f"lib:{name}: no such ready program" + _library_help())


def _read(
    source: str,
    maps: dict[str, Any],
    engine: object = None,
    program: str | None = None,
) -> Loaded:
    if source.endswith(".o"):
        return _read_elf(source, maps, engine, program)
    if source.startswith("lib:"):
        prog = _lib(source[4:], maps)
        return Loaded(prog, prog.name, maps)
    path = Path(source)
    data = sys.stdin.buffer.read() if source == "-" else path.read_bytes()
    if source.endswith(".bin"):
        return Loaded(data, path.stem, maps)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise SystemExit(f"{source}: not text; name raw bytecode *.bin") from None
    return Loaded(asm.assemble(text, name=path.stem, maps=maps), path.stem, maps)


def _read_elf(source: str, maps: dict[str, Any], engine: object, program: str | None) -> Loaded:
    """One program of an ELF object; with an engine, its maps are created there (and
    added to ``maps``, so --set/--socket can name them)."""
    from sockmap.elf import ElfObject  # noqa: PLC0415

    obj = ElfObject.open(source)
    names = sorted(obj.programs)
    if program is None:
        if len(names) != 1:
            raise SystemExit(f"{source} holds {', '.join(names)}: choose one with --program")
        program = names[0]
    if program not in obj.programs:
        raise SystemExit(f"{source} has no program {program!r} (it has {', '.join(names)})")
    ptype = obj.programs[program].prog_type
    if engine is None:
        return Loaded(obj.programs[program].program, program, maps, ptype)
    loaded = obj.instantiate(engine)
    maps.update(loaded.maps)
    return Loaded(loaded.programs[program], program, maps, ptype)


def run(args: argparse.Namespace) -> int:
    action = args.prog_command
    try:
        if action == "show":
            return _show(args)
        specs = [_map_spec(t) for t in args.map]
        if action in ("asm", "disasm"):
            return _asm_or_disasm(args, specs)
        if action == "load":
            return _load(args, specs)
        return _run_vm(args, specs)
    except (SockmapError, OSError) as exc:
        print(f"sockmap prog {action}: {exc}", file=sys.stderr)
        log = getattr(exc, "log", "")
        if log:
            print(log, file=sys.stderr)
        return 1


@dataclass
class _Placeholder:
    """A map named in a program that is only assembled or printed, never loaded."""

    name: str
    index: int
    fd: int = 0

    def __str__(self) -> str:
        return self.name


def _asm_or_disasm(args: argparse.Namespace, specs: list[MapSpec]) -> int:
    maps = {s.name: _Placeholder(s.name, i) for i, s in enumerate(specs)}
    loaded = _read(args.source, maps, None, args.program)
    if args.prog_command == "disasm":
        print(asm.disassemble(loaded.program).rstrip("\n"))
        return 0
    if isinstance(loaded.program, bytes):
        code = loaded.program
    else:
        code = loaded.program.encode(map_fd=lambda ref: getattr(ref, "index", 0))
        for pc, ins in enumerate(asm.decode(code)):
            if ins.opcode == 0x18 and ins.src == 1:
                names = [s.name for s in specs]
                print(f"relocation: insn {pc} loads map {names[ins.imm]}", file=sys.stderr)
    if args.output:
        Path(args.output).write_bytes(code)
        print(f"{len(code) // 8} instructions written to {args.output}", file=sys.stderr)
    else:
        print(code.hex())
    return 0


@contextlib.contextmanager
def _kernel_maps(specs: list[MapSpec]) -> Iterator[tuple[KernelEngine, dict[str, Any]]]:
    from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415

    with KernelEngine() as eng:
        maps: dict[str, Any] = {}
        for s in specs:
            maps[s.name] = _make_map(eng, s)
        yield eng, maps


def _make_map(eng: KernelEngine, s: MapSpec) -> object:
    if s.kind == "sockmap":
        return eng.sockmap(s.max_entries)
    if s.kind == "sockhash":
        return eng.sockhash(s.max_entries, key_size=s.key_size)
    if s.kind == "array":
        return eng.array(s.max_entries, value_size=s.value_size)
    return eng.hash(s.max_entries, key_size=s.key_size, value_size=s.value_size)


def _load(args: argparse.Namespace, specs: list[MapSpec]) -> int:
    from sockmap.kernel.pin import pin  # noqa: PLC0415
    from sockmap.kernel.programs import load_program  # noqa: PLC0415

    with _kernel_maps(specs) as (eng, maps):
        loaded = _read(args.source, maps, eng, args.program)
        ptype = loaded.prog_type or _TYPES[args.type]
        prog = load_program(loaded.program, ptype, name=args.name or loaded.name)
        with prog:
            from sockmap.kernel.info import prog_info  # noqa: PLC0415

            info = prog_info(prog.fd)
            where = ""
            if args.pin:
                where = f", pinned at {pin(prog, args.pin)}"
            print(f"loaded {info.name or loaded.name!r} as program id {info.id}{where}")
            if not args.pin:
                print("(not pinned: it is unloaded again as this command exits)", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    from sockmap.kernel.info import iter_prog_ids, prog_fd_by_id, prog_info  # noqa: PLC0415
    from sockmap.kernel.syscall import close_fd  # noqa: PLC0415

    rows: list[dict[str, Any]] = []
    for pid in iter_prog_ids():
        try:
            fd = prog_fd_by_id(pid)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                continue  # unloaded meanwhile
            raise
        try:
            info = prog_info(fd)
        finally:
            close_fd(fd)
        ptype = info.type.name if isinstance(info.type, ProgType) else str(info.type)
        rows.append(
            {
                "id": info.id,
                "type": ptype,
                "name": info.name,
                "tag": info.tag,
                "insns": info.xlated_len // 8,
                "map_ids": list(info.map_ids),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'id':>6} {'type':16} {'name':16} {'insns':>6} {'tag':16} maps")
    for r in rows:
        print(
            f"{r['id']:>6} {r['type']:16} {r['name']:16} {r['insns']:>6} {r['tag']:16} "
            f"{','.join(str(i) for i in r['map_ids']) or '-'}"
        )
    return 0


def _run_vm(args: argparse.Namespace, specs: list[MapSpec]) -> int:
    from sockmap.userspace import maps as umaps  # noqa: PLC0415
    from sockmap.vm import MsgContext, SkbContext, load  # noqa: PLC0415
    from sockmap.vm.env import RecordingEnv  # noqa: PLC0415

    maps: dict[str, Any] = {}
    for s in specs:
        if s.kind == "sockmap":
            maps[s.name] = umaps.SockMap.new(s.max_entries)
        elif s.kind == "sockhash":
            maps[s.name] = umaps.SockHash.new(s.max_entries, key_size=s.key_size)
        elif s.kind == "array":
            maps[s.name] = umaps.ArrayMap.new(s.max_entries, value_size=s.value_size)
        else:
            maps[s.name] = umaps.HashMap.new(
                s.max_entries, key_size=s.key_size, value_size=s.value_size
            )
    loaded: Loaded | None = None
    if args.source.endswith(".o"):  # the object's maps, created before --set fills them
        from sockmap.userspace.engine import UserspaceEngine  # noqa: PLC0415

        loaded = _read(args.source, maps, UserspaceEngine(), args.program)
    for entry in args.set:
        name, _, kv = entry.partition(":")
        key, _, value = kv.partition("=")
        if name not in maps:
            raise SystemExit(f"--set {entry!r}: no --map {name}")
        maps[name][bytes.fromhex(key)] = bytes.fromhex(value)
    sockets: set[tuple[int, bytes]] = set()
    for entry in args.socket:
        name, _, key = entry.partition(":")
        if name not in maps:
            raise SystemExit(f"--socket {entry!r}: no --map {name}")
        m = maps[name]
        sockets.add((id(m), int(key, 0).to_bytes(m.key_size, "little")))
    if loaded is None:
        loaded = _read(args.source, maps)
    pt = loaded.prog_type or _TYPES[args.type]
    if args.input is not None:
        data = bytes.fromhex(args.input)
    else:
        data = Path(args.input_file).read_bytes()
    prog = load(loaded.program, pt, name=loaded.name)
    env = RecordingEnv(sockets)
    ctx = SkbContext(data=data, len=len(data)) if pt == ProgType.SK_SKB else MsgContext(data=data)
    if pt == ProgType.SK_SKB:
        ctx.strp_full_len = len(data)  # type: ignore[union-attr]
    r0 = prog.run(ctx, env)
    role = args.role or ("parser" if _looks_like_parser(loaded.name) else "verdict")
    if role == "parser":
        length = r0 & 0xFFFFFFFF
        signed = length - (1 << 32) if length >> 31 else length
        what = (
            "need more bytes"
            if signed == 0
            else f"error {errno.errorcode.get(-signed, -signed)}"
            if signed < 0
            else f"message of {signed} bytes"
        )
        print(f"r0 = {signed}: {what}")
        return 0
    verdict = r0 & 0xFFFFFFFF
    name = {0: "SK_DROP", 1: "SK_PASS"}.get(verdict, f"{verdict} (drops)")
    print(f"r0 = {verdict}: {name}")
    if env.redirect_to is not None:
        mid, key, flags = env.redirect_to
        mname = next((n for n, m in maps.items() if id(m) == mid), "?")
        direction = "ingress" if flags & 1 else "egress"
        occupied = "" if (mid, key) in sockets else " (no socket there: the message is dropped)"
        print(f"redirect to {mname}[{int.from_bytes(key, 'little')}] ({direction}){occupied}")
    elif verdict == SkAction.PASS:
        print("no redirect: the message stays with the socket it came in on")
    return 0


def _looks_like_parser(name: str) -> bool:
    return (
        name in ("whole_segment", "length_prefixed")
        or name.startswith("fixed_")
        or (name.replace("_", "-") in programs.PRESETS)
    )
