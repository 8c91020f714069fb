"""``sockmap ls``: every socket map on the host, ours or another tool's, with programs and
each entry's socket; read-only."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from kernel.conftest import bpftool_path
from netutil import Pairs
from sockmap import programs
from sockmap.datapath.splice import cookie_of
from sockmap.kernel.engine import KernelEngine

SOCKMAP = [sys.executable, "-m", "sockmap"]


def _ls() -> list[dict]:  # type: ignore[type-arg]
    res = subprocess.run(
        [*SOCKMAP, "ls", "--json"], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def test_ls_shows_our_map_its_program_and_its_sockets(bpf: None) -> None:
    pairs = Pairs()
    try:
        with KernelEngine() as eng:
            m = eng.sockmap(4, name="ls_test")
            eng.attach(m, verdict=programs.redirect_key(m, 1))
            _, a_srv = pairs()
            _, b_srv = pairs()
            m[0] = a_srv
            m[3] = b_srv
            views = {v["id"]: v for v in _ls()}
            v = views[m.info().id]
            assert (v["kind"], v["name"], v["max_entries"]) == ("sockmap", "ls_test", 4)
            assert [p["name"] for p in v["programs"]["SK_SKB_VERDICT"]] == ["redirect_key"]
            entries = {e["index"]: e for e in v["entries"]}
            assert set(entries) == {0, 3}
            for index, sock in ((0, a_srv), (3, b_srv)):
                e = entries[index]
                assert e["cookie"] == cookie_of(sock)
                assert e["socket"]["state"] == "ESTABLISHED"
                assert tuple(e["socket"]["local"]) == sock.getsockname()
                assert tuple(e["socket"]["remote"]) == sock.getpeername()
            # read-only: everything is still there
            assert m.lookup(0) == cookie_of(a_srv)
            assert m.lookup(3) == cookie_of(b_srv)
            assert {m.info().id} <= {x["id"] for x in _ls()}
    finally:
        pairs.close()


def test_ls_shows_maps_other_tools_made(bpf: None) -> None:
    tool = bpftool_path()
    assert tool, "bpftool is missing: run scripts/test, which installs it"
    pin = Path("/sys/fs/bpf") / f"sockmap_ls_{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            tool,
            "map",
            "create",
            str(pin),
            "type",
            "sockhash",
            "key",
            "16",
            "value",
            "8",
            "entries",
            "8",
            "name",
            "other_tool",
        ],
        check=True,
        timeout=30,
    )
    try:
        views = [v for v in _ls() if v["name"] == "other_tool"]
        assert len(views) == 1
        assert (views[0]["kind"], views[0]["key_size"], views[0]["entries"]) == ("sockhash", 16, [])
    finally:
        pin.unlink()
