"""``sockmap why``: from a socket (cookie, pid:fd or 4-tuple) to the maps holding it, the
programs' counters, its last decisions, and what they mean."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from netutil import Pairs, wait_until
from sockmap import programs
from sockmap.datapath.splice import cookie_of
from sockmap.datapath.tcp import kick
from sockmap.kernel.engine import KernelEngine
from sockmap.programs.outcomes import count_programs

SOCKMAP = [sys.executable, "-m", "sockmap"]


def _why(target: str) -> dict:  # type: ignore[type-arg]
    res = subprocess.run(
        [*SOCKMAP, "why", target, "--json"], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def test_why_a_redirect_missed_then_worked(bpf: None) -> None:
    pairs = Pairs()
    try:
        with KernelEngine() as eng:
            m = eng.sockmap(4, name="why_test")
            _, verdict, counters = count_programs(eng, None, programs.redirect_key(m, 1))
            eng.attach(m, verdict=verdict)
            a, a_srv = pairs()
            b, b_srv = pairs()
            m[0] = a_srv
            kick(a_srv)
            a.sendall(b"lost")  # key 1 is empty
            assert wait_until(lambda: len(counters.decisions(cookie_of(a_srv))) == 1)
            targets = [
                f"cookie:{cookie_of(a_srv)}",
                f"{os.getpid()}:{a_srv.fileno()}",
                "{}:{}-{}:{}".format(*a_srv.getsockname(), *a_srv.getpeername()),
            ]
            for target in targets:
                w = _why(target)
                assert w["socket"]["cookie"] == cookie_of(a_srv)
                assert [(x["id"], x["index"]) for x in w["maps"]] == [(m.info().id, 0)]
                assert [d["outcome"] for d in w["decisions"]] == ["redirect_miss"]
                assert any("empty target key" in f for f in w["findings"])
            m[1] = b_srv
            a.sendall(b"found")
            b.settimeout(5)
            assert b.recv(10) == b"found"
            w = _why(f"cookie:{cookie_of(a_srv)}")
            assert [d["outcome"] for d in w["decisions"]] == ["redirect_miss", "redirect"]
            assert w["counters"]["redirect_key"]["redirect"] == 1
            # sockmap ls shows the same counters beside the program
            res = subprocess.run(
                [*SOCKMAP, "ls", "--json"], capture_output=True, text=True, timeout=60, check=True
            )
            view = next(v for v in json.loads(res.stdout) if v["id"] == m.info().id)
            prog = view["programs"]["SK_SKB_VERDICT"][0]
            assert prog["outcomes"] == {"redirect": 1, "redirect_miss": 1}
    finally:
        pairs.close()


def test_why_a_socket_in_no_map(bpf: None) -> None:
    pairs = Pairs()
    try:
        a, _ = pairs()
        w = _why(f"{os.getpid()}:{a.fileno()}")
        assert w["maps"] == []
        assert any("in no sockmap or sockhash" in f for f in w["findings"])
    finally:
        pairs.close()
