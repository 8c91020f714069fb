"""Loading clang-built eBPF objects: maps from BTF-defined `.maps` and the legacy `maps`
section, programs by section name, map relocations; then used on both engines.

The C sources are compiled here with Debian's clang (installed by the test set-up);
where clang is missing the tests skip, saying so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engines import Engine, insert
from netutil import Pairs, recv_exactly, sha256, wait_until
from sockmap.abi import AttachType, MapType, ProgType
from sockmap.elf import ElfError, ElfObject

SRC = Path(__file__).parents[1] / "elf" / "src"


def _multiarch_include() -> list[str]:
    for cand in (f"/usr/include/{sys.implementation._multiarch}",):  # type: ignore[attr-defined]
        if Path(cand, "asm", "types.h").exists():
            return ["-I", cand]
    return []


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang is not installed (the test set-up installs Debian's clang as root)")
    out = tmp_path_factory.mktemp("elf")
    built = {}
    for name in ("splice", "legacy"):
        obj = out / f"{name}.o"
        subprocess.run(
            [
                clang,
                "-O2",
                "-g",
                "-target",
                "bpf",
                *_multiarch_include(),
                "-c",
                str(SRC / f"{name}.c"),
                "-o",
                str(obj),
            ],
            check=True,
            capture_output=True,
        )
        built[name] = obj
    return built


def test_btf_maps_and_programs_by_section(objects) -> None:
    obj = ElfObject.open(objects["splice"])
    assert {
        n: (m.map_type, m.key_size, m.value_size, m.max_entries) for n, m in obj.maps.items()
    } == {
        "sock_map": (MapType.SOCKMAP, 4, 4, 4),
        "counts": (MapType.ARRAY, 4, 8, 2),
    }
    assert obj.license == "GPL"
    parse, route = obj.programs["parse"], obj.programs["route"]
    assert (parse.prog_type, parse.attach_type) == (
        ProgType.SK_SKB,
        AttachType.SK_SKB_STREAM_PARSER,
    )
    assert (route.prog_type, route.attach_type) == (
        ProgType.SK_SKB,
        AttachType.SK_SKB_STREAM_VERDICT,
    )
    refs = {str(i.map_ref) for i in route.program.items if getattr(i, "map_ref", None)}
    assert refs == {"sock_map", "counts"}


def test_legacy_maps_sk_msg_and_sockops(objects) -> None:
    obj = ElfObject.open(objects["legacy"])
    m = obj.maps["msg_map"]
    assert (m.map_type, m.key_size, m.value_size, m.max_entries) == (MapType.SOCKMAP, 4, 4, 2)
    assert obj.programs["msg_to_one"].prog_type == ProgType.SK_MSG
    assert obj.programs["add_established"].prog_type == ProgType.SOCK_OPS


def test_not_an_object_is_a_clear_error(tmp_path) -> None:
    bad = tmp_path / "nope.o"
    bad.write_bytes(b"not an elf file at all")
    with pytest.raises(ElfError, match="not a readable ELF file"):
        ElfObject.open(bad)


def test_the_object_routes_messages_on_both_engines(objects, engine: Engine, pairs: Pairs) -> None:
    """first byte even -> key 1, odd -> key 2, every message counted."""
    loaded = ElfObject.open(objects["splice"]).instantiate(engine)
    smap, counts = loaded.maps["sock_map"], loaded.maps["counts"]
    engine.attach(smap, parser=loaded.programs["parse"], verdict=loaded.programs["route"])
    src, src_srv = pairs()
    b1, b1_srv = pairs()
    b2, b2_srv = pairs()
    insert(engine, smap, 1, b1_srv)
    insert(engine, smap, 2, b2_srv)
    insert(engine, smap, 0, src_srv)
    msgs = [bytes([i]) + b"x" * 50 for i in range(20)]
    for i, m in enumerate(msgs):
        src.sendall(m)
        assert wait_until(lambda n=i + 1: int.from_bytes(counts[0], "little") >= n)
    even = [m for m in msgs if m[0] % 2 == 0]
    odd = [m for m in msgs if m[0] % 2 == 1]
    b1.settimeout(5)
    b2.settimeout(5)
    assert recv_exactly(b1, 51 * len(even)) == (51 * len(even), sha256(even))
    assert recv_exactly(b2, 51 * len(odd)) == (51 * len(odd), sha256(odd))
    assert int.from_bytes(counts[0], "little") == 20


@pytest.mark.kernel
def test_the_kernel_verifier_accepts_every_program(objects) -> None:
    from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415
    from sockmap.kernel.features import bpf_access  # noqa: PLC0415
    from sockmap.kernel.programs import load_program  # noqa: PLC0415

    ok, why = bpf_access()
    if not ok:
        pytest.skip(f"bpf() refused: {why}")
    with KernelEngine() as eng:
        for path in objects.values():
            obj = ElfObject.open(path)
            loaded = obj.instantiate(eng)
            for name, prog in loaded.programs.items():
                attach = obj.programs[name].attach_type
                expected = attach if loaded.types[name] == ProgType.SOCK_OPS else None
                with load_program(prog, loaded.types[name], expected_attach_type=expected):
                    pass


def test_prog_cli_reads_objects(objects, capsys) -> None:
    from sockmap.cli.main import main  # noqa: PLC0415

    assert main(["prog", "disasm", str(objects["legacy"]), "--program", "msg_to_one"]) == 0
    assert "call msg_redirect_map#60" in capsys.readouterr().out
    rc = main(
        [
            "prog",
            "run",
            str(objects["splice"]),
            "--program",
            "route",
            "--socket",
            "sock_map:2",
            "--input",
            "0305",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out.splitlines() == [
        "r0 = 1: SK_PASS",
        "redirect to sock_map[2] (egress)",
    ]
    with pytest.raises(SystemExit, match="choose one with --program"):
        main(["prog", "disasm", str(objects["legacy"])])
