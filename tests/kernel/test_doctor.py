"""``sockmap doctor`` as a user runs it, and ``--engine auto`` following its report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sockmap.abi.internals import internals
from sockmap.doctor import PROBES, Check, Report, cache_path, choose_engine, kernel_id, save_report

SOCKMAP = [sys.executable, "-m", "sockmap"]


def _doctor(
    tmp_path: Path, *args: str, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    return subprocess.run(
        [*(prefix or []), *SOCKMAP, "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def test_doctor_checks_every_item_and_agrees_with_the_fact_tests(bpf: None, tmp_path: Path) -> None:
    res = _doctor(tmp_path, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    verdicts = {c["item"]: c["verdict"] for c in report["checks"]}
    assert set(verdicts) == {"bpf", *PROBES}
    assert verdicts["bpf"] == "ok"
    assert verdicts["redirect_strparser"] == verdicts["redirect_verdict"] == "ok"
    # What tests/kernel/test_traps.py and test_backpressure_facts.py establish:
    assert verdicts["fin_forwarded"] == "worked around"
    assert verdicts["bytes_queued_before_insertion"] == "worked around"
    assert verdicts["backpressure"] == "worked around"
    miscounted = internals().strparser_pass_miscounted
    assert verdicts["strparser_pass_accounting"] == ("worked around" if miscounted else "ok")
    states = next(c for c in report["checks"] if c["item"] == "socket_states")["detail"]
    assert "established TCP: accepted" in states
    assert "unbound UDP: refused (EOPNOTSUPP)" in states
    saved = next(tmp_path.glob("sockmap/doctor-*.json"))
    assert saved.stat().st_mode & 0o777 == 0o600
    assert json.loads(saved.read_text())["kernel"] == kernel_id()


def test_doctor_text_says_what_is_worked_around(bpf: None, tmp_path: Path) -> None:
    res = _doctor(tmp_path, "--only", "fin_forwarded,redirect_verdict")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "redirect_verdict  OK" in res.stdout
    assert "WORKED AROUND" in res.stdout
    assert "-> the splicer shuts the target's write side" in res.stdout
    assert "checking fin_forwarded" in res.stderr  # progress
    assert not list(tmp_path.glob("sockmap/*.json"))  # a partial run is not cached


def test_auto_follows_the_cached_report(
    bpf: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    good = Report(
        kernel_id(),
        [Check(i, "ok", "fine") for i in ("bpf", "redirect_verdict", "sk_skb_verdict_attach")],
    )
    save_report(good)
    assert choose_engine("auto")[0] == "kernel"
    bad = Report(
        kernel_id(),
        [
            Check("bpf", "ok", "fine"),
            Check("sk_skb_verdict_attach", "ok", "fine"),
            Check("redirect_verdict", "broken", "nothing arrived"),
        ],
    )
    save_report(bad)
    name, why = choose_engine("auto")
    assert name == "userspace"
    assert "redirect_verdict: nothing arrived" in why
    assert choose_engine("kernel")[0] == "kernel"  # asked for: no second-guessing
    cache_path().unlink()
    assert choose_engine("auto")[0] == "kernel"  # probed afresh, and cached
    assert cache_path().exists()


def test_doctor_without_privileges_exits_2_and_says_why(bpf: None, tmp_path: Path) -> None:
    capsh = shutil.which("capsh") or "/usr/sbin/capsh"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    res = subprocess.run(
        [
            capsh,
            "--drop=cap_bpf,cap_sys_admin,cap_perfmon",
            "--",
            "-c",
            " ".join([*SOCKMAP, "doctor"]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "bpf() refused with EPERM" in res.stdout
