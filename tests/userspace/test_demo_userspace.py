"""``sockmap demo`` on the userspace engine, with and without bpf() privileges."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from netutil import Pairs, recv_exactly, sha256
from sockmap.userspace.engine import UserspaceEngine
from sockmap.userspace.splice import UserspaceSplicer

SOCKMAP = [sys.executable, "-m", "sockmap.cli.main"]


def _check_ok(out: str, engine_line: str) -> None:
    assert engine_line in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "8.0 MiB" in rows["splice"]
    assert "200/200" in rows["balance"]
    assert "0 forced, 0 resets" in out
    assert out.rstrip().endswith("by both backends (balance)")


DEMO_ARGS = ["--mib", "4", "--pings", "20", "--clients", "2", "--messages", "100"]


def test_demo_userspace():
    res = subprocess.run(
        [*SOCKMAP, "demo", "--engine", "userspace", *DEMO_ARGS],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    _check_ok(res.stdout, "engine: userspace (asked for")


def test_auto_picks_userspace_without_privileges():
    capsh = shutil.which("capsh") or "/usr/sbin/capsh"
    assert Path(capsh).exists(), "capsh is missing: run scripts/test (installs libcap2-bin)"
    line = " ".join([*SOCKMAP, "demo", "--engine", "auto", *DEMO_ARGS])
    res = subprocess.run(
        [capsh, "--drop=cap_bpf,cap_sys_admin,cap_perfmon", "--", "-c", line],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    _check_ok(
        res.stdout, "engine: userspace (the kernel's is unavailable: bpf() refused with EPERM"
    )


@pytest.mark.parametrize("rounds", [20])
def test_splicer_loses_nothing_sent_before_the_splice(rounds: int):
    """Clients that send at once, before their pair is spliced: every byte arrives."""
    pairs = Pairs()
    try:
        with UserspaceEngine() as eng, UserspaceSplicer(eng, 4) as sp:
            for _ in range(rounds):
                c, c_srv = pairs()
                d, d_srv = pairs()
                payload = os.urandom(1 << 20)
                t = threading.Thread(target=c.sendall, args=(payload,), daemon=True)
                t.start()  # already streaming while the splice is set up
                pair = sp.splice(c_srv, d_srv)
                assert recv_exactly(d, len(payload)) == (len(payload), sha256([payload]))
                t.join(10)
                c.shutdown(socket.SHUT_WR)
                d.shutdown(socket.SHUT_WR)
                assert pair.done.wait(10)
            assert sp.stats.fins_forced == 0
    finally:
        pairs.close()
