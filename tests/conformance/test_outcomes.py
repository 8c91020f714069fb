"""Outcome counters and the decision log (``programs.instrument``) on both engines: the
same instrumented bytecode counts the same outcomes, for library and compiled programs."""

from __future__ import annotations

import struct
import time

import pytest

from engines import Engine, insert, read_passed
from netutil import Pairs, wait_until
from sockmap import programs
from sockmap.compiler import redirect, stream_verdict
from sockmap.datapath.splice import cookie_of
from sockmap.programs.outcomes import count_programs, instrument, read_outcomes


def test_verdict_and_parser_outcomes_and_the_log(engine: Engine) -> None:
    pairs = Pairs()
    try:
        m = engine.sockmap(4)
        parser, verdict, counters = count_programs(
            engine, programs.length_prefixed(2, "big", 2, max_size=100), programs.redirect_key(m, 1)
        )
        engine.attach(m, parser=parser, verdict=verdict)
        a, a_srv = pairs()
        b, b_srv = pairs()
        insert(engine, m, 0, a_srv)
        a.sendall(b"\x00\x03abc")  # key 1 is empty: a miss
        assert wait_until(lambda: counters.snapshot()["redirect_key"]["redirect_miss"] == 1)
        insert(engine, m, 1, b_srv)
        a.sendall(b"\x00")  # half a header ...
        time.sleep(0.1)
        a.sendall(b"\x02hi")  # ... then the rest: one message
        b.settimeout(5)
        assert b.recv(10) == b"\x00\x02hi"
        a.sendall(struct.pack(">H", 500) + b"x")  # over max_size: a parser error
        assert wait_until(lambda: counters.snapshot()["length_prefixed"]["parser_error"] == 1)
        snap = counters.snapshot()
        assert snap["redirect_key"] == {"pass": 0, "drop": 0, "redirect": 1, "redirect_miss": 1}
        assert snap["length_prefixed"]["message"] == 2
        assert snap["length_prefixed"]["need_more"] >= 1
        log = counters.decisions(cookie_of(a_srv))
        assert [d[2] for d in log] == ["redirect_miss", "redirect"]
        assert counters.decisions(cookie_of(b_srv)) == []
    finally:
        pairs.close()


@pytest.mark.parametrize("verdict", ["pass", "drop"])
def test_pass_and_drop_are_counted(engine: Engine, verdict: str) -> None:
    pairs = Pairs()
    try:
        m = engine.sockmap(1)
        oc = engine.array(8, value_size=8)
        prog = programs.pass_() if verdict == "pass" else programs.drop()
        engine.attach(m, verdict=instrument(prog, oc, "verdict"))
        a, a_srv = pairs()
        insert(engine, m, 0, a_srv)
        a.sendall(b"one")
        if verdict == "pass":
            assert read_passed(engine, a_srv, 3) == b"one"
        assert wait_until(lambda: read_outcomes(oc)[verdict] == 1)
        assert sum(read_outcomes(oc).values()) == 1
    finally:
        pairs.close()


def test_a_compiled_verdict_is_counted(engine: Engine) -> None:
    pairs = Pairs()
    try:
        m = engine.sockmap(3)

        @stream_verdict(mode="verdict")
        def odd_even(skb):  # type: ignore[no-untyped-def]
            return redirect(m, 1 + skb.len % 2)

        oc = engine.array(8, value_size=8)
        engine.attach(m, verdict=instrument(odd_even, oc, "verdict"))
        a, a_srv = pairs()
        _, b_srv = pairs()
        insert(engine, m, 0, a_srv)
        insert(engine, m, 2, b_srv)  # key 1 stays empty
        a.sendall(b"12")  # even: key 1: a miss
        assert wait_until(lambda: read_outcomes(oc)["redirect_miss"] == 1)
        a.sendall(b"1")  # odd: key 2
        assert wait_until(lambda: read_outcomes(oc)["redirect"] == 1)
    finally:
        pairs.close()
