"""``sockmap demo`` and ``sockmap features`` as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from sockmap.kernel.features import bpf_access

pytestmark = pytest.mark.kernel
SOCKMAP = [sys.executable, "-m", "sockmap.cli.main"]


@pytest.fixture
def permitted() -> None:
    ok, why = bpf_access()
    if not ok:
        pytest.skip(f"bpf() refused: {why}")


def _run(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*(prefix or []), *SOCKMAP, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_demo_runs_both_modes_and_exits_zero(permitted: None):
    res = _run("demo", "--mib", "16", "--pings", "50", "--clients", "3", "--messages", "200")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "engine: kernel (bpf() is permitted" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "32.0 MiB" in rows["splice"]
    assert "50 pings" in rows["splice"]
    assert "600/600" in rows["balance"]
    assert "A 50.0%, B 50.0%" in rows["balance"]
    assert "verdict counters: requests A 300, B 300; dropped 0" in out
    assert "0 forced, 0 resets" in out
    assert out.rstrip().endswith("by both backends (balance)")


def _capsh_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    capsh = shutil.which("capsh") or "/usr/sbin/capsh"
    line = " ".join([*SOCKMAP, *args])
    return subprocess.run(
        [capsh, "--drop=cap_bpf,cap_sys_admin,cap_perfmon", "--", "-c", line],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_demo_without_privileges_says_why_and_fails(permitted: None):
    """Run by root with the capabilities dropped: bpf() is refused with EPERM."""
    res = _capsh_cmd("demo", "--engine", "kernel")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "EPERM" in res.stdout
    assert "CAP_BPF" in res.stdout
    assert "Traceback" not in res.stderr


def test_features_json(permitted: None):
    res = _run("features", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["permitted"] is True
    assert data["map_types"]["SOCKMAP"] == "yes"
    assert data["attach_types"]["SK_SKB_STREAM_PARSER"] == "yes"
    assert data["helpers"]["SK_SKB"]["sk_redirect_map"] is True
    assert data["helpers"]["SK_SKB"]["msg_redirect_map"] is False  # an SK_MSG helper


def test_features_without_privileges(permitted: None):
    res = _capsh_cmd("features", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["permitted"] is False
    assert "EPERM" in data["reason"]
    assert data["capabilities"]["CAP_BPF"] is False


@pytest.mark.parametrize("command", [[], ["demo"], ["features"]])
def test_help(command: list[str]):
    res = _run(*command, "--help")
    assert res.returncode == 0
    assert "usage: sockmap" in res.stdout
