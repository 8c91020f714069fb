"""``sockmap prog``: each action run as a user would, output checked."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from sockmap import asm, programs
from sockmap.cli.main import main
from sockmap.kernel.features import bpf_access
from sockmap.kernel.pin import ensure_bpffs, unpin


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["prog", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    ("source", "data", "expected"),
    [
        ("lib:length_prefixed:4:big:4", "0000000568656c6c6f", "r0 = 9: message of 9 bytes"),
        ("lib:preset:dns", "00", "r0 = 0: need more bytes"),
        ("lib:length_prefixed:4:big:0:0:100", "00001000aaaa", "r0 = -90: error EMSGSIZE"),
        ("lib:length_prefixed:4:big:0", "00000001aaaa", "r0 = -74: error EBADMSG"),
        ("lib:fixed_size:7", "", "r0 = 7: message of 7 bytes"),
    ],
)
def test_run_parsers(capsys, source: str, data: str, expected: str) -> None:
    rc, out, _ = run(capsys, "run", source, "--input", data)
    assert rc == 0
    assert out.strip() == expected


def test_run_verdict_reports_the_redirect(capsys) -> None:
    msg = bytes(range(1, 9))
    key = 1 + programs.fnv1a(msg[:4]) % 4
    rc, out, _ = run(
        capsys,
        "run",
        "lib:hash_route:sm:0:4:4:1",
        "--map",
        "sm=sockmap:5",
        "--socket",
        f"sm:{key}",
        "--input",
        msg.hex(),
    )
    assert rc == 0
    assert out.splitlines() == ["r0 = 1: SK_PASS", f"redirect to sm[{key}] (egress)"]


def test_run_verdict_to_an_empty_key_says_it_drops(capsys) -> None:
    rc, out, _ = run(
        capsys, "run", "lib:redirect_key:sm:3", "--map", "sm=sockmap:4", "--input", "00"
    )
    assert rc == 0
    assert out.splitlines() == [
        "r0 = 0: SK_DROP",
        "redirect to sm[3] (egress) (no socket there: the message is dropped)",
    ]


def test_run_with_a_data_map_entry(capsys, tmp_path: Path) -> None:
    """Text source naming an array: the program returns the array's first value."""
    src = tmp_path / "read_counter.s"
    src.write_text(
        "*(u32 *)(r10 -4) = 0\n"
        "r1 = map[counter]\n"
        "r2 = r10\n"
        "r2 += -4\n"
        "call map_lookup_elem#1\n"
        "if r0 == 0x0 goto out\n"
        "r0 = *(u64 *)(r0 +0)\n"
        "out:\n"
        "exit\n"
    )
    rc, out, _ = run(
        capsys,
        "run",
        str(src),
        "--map",
        "counter=array:1",
        "--set",
        "counter:00000000=2a00000000000000",
        "--as",
        "parser",
        "--input",
        "00",
    )
    assert rc == 0
    assert out.strip() == "r0 = 42: message of 42 bytes"


def test_asm_then_disasm_round_trip(capsys, tmp_path: Path) -> None:
    text = asm.disassemble(programs.preset("dns"))
    src = tmp_path / "dns.s"
    src.write_text(text)
    binary = tmp_path / "dns.bin"
    rc, _, err = run(capsys, "asm", str(src), "-o", str(binary))
    assert rc == 0
    assert "instructions written" in err
    assert binary.read_bytes() == programs.preset("dns").encode()
    rc, out, _ = run(capsys, "disasm", str(binary))
    assert rc == 0
    assert asm.assemble(out).encode() == binary.read_bytes()


def test_asm_lists_map_relocations(capsys, tmp_path: Path) -> None:
    rc, out, err = run(capsys, "asm", "lib:redirect_key:sm:1", "--map", "sm=sockmap:2")
    assert rc == 0
    assert bytes.fromhex(out.strip())
    assert "loads map sm" in err


def test_bad_map_spec_is_a_clear_error(capsys) -> None:
    with pytest.raises(SystemExit, match="expected NAME=KIND"):
        main(["prog", "run", "lib:pass", "--map", "sm=wat", "--input", "00"])


@pytest.mark.kernel
def test_load_pin_and_show(capsys) -> None:
    ok, why = bpf_access()
    if not ok:
        pytest.skip(f"bpf() refused: {why}")
    where = ensure_bpffs() / f"sockmap_cli_test_{os.getpid()}"
    try:
        rc, out, _ = run(
            capsys, "load", "lib:whole_segment", "--name", "cli_test_ws", "--pin", str(where)
        )
        assert rc == 0
        assert out.startswith("loaded 'cli_test_ws' as program id ")
        assert out.strip().endswith(f"pinned at {where}")
        pid = int(out.split("program id ")[1].split(",")[0])
        rc, out, _ = run(capsys, "show", "--json")
        assert rc == 0
        shown = {p["id"]: p for p in json.loads(out)}
        assert shown[pid]["name"] == "cli_test_ws"
        assert shown[pid]["type"] == "SK_SKB"
    finally:
        with contextlib.suppress(OSError):
            unpin(where)


@pytest.mark.kernel
def test_load_refused_program_prints_the_verifier_log(capsys, tmp_path: Path) -> None:
    ok, why = bpf_access()
    if not ok:
        pytest.skip(f"bpf() refused: {why}")
    src = tmp_path / "bad.s"
    src.write_text("exit\n")  # r0 never written
    rc, _, err = run(capsys, "load", str(src))
    assert rc == 1
    assert "R0 !read_ok" in err
