"""Admission into socket maps with programs, both engines against one table of kernel facts.

The kernel (6.18) links a socket to a map (``sock_map_link``) before it looks at the key
and the flags: EBUSY when the map has a program of a kind — stream parser, stream or skb
verdict, msg verdict — whose slot the socket's psock holds already, from any map, that
map included. The psock lives while the socket is in some map, so a socket that is also
in a map without programs keeps what a failed update gave it; leaving a map with a
parser or verdict stops and clears those slots (not the msg verdict's). Every row was
observed on the kernel engine; the userspace engine must answer the same.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sockmap import programs
from sockmap.abi import MapType
from sockmap.errors import BpfError
from sockmap.kernel import maps as kmaps
from sockmap.kernel.engine import KernelEngine
from sockmap.kernel.maps import MapSpec
from sockmap.userspace import maps as umaps
from sockmap.userspace.engine import UserspaceEngine

MODES = ["strparser", "verdict-only", "msg"]


def attach_kw(mode: str) -> dict[str, Any]:
    if mode == "strparser":
        return {"parser": programs.whole_segment(), "verdict": programs.pass_()}
    if mode == "verdict-only":
        return {"verdict": programs.pass_()}
    if mode == "parser-only":
        return {"parser": programs.whole_segment()}
    if mode == "msg":
        return {"msg_verdict": programs.msg_verdict()}
    assert mode == "all"
    return {**attach_kw("strparser"), **attach_kw("msg")}


class World:
    """One engine, maps with programs, maps without (not the engine's), TCP sockets."""

    def __init__(self, engine_name: str) -> None:
        self.eng: Any = KernelEngine() if engine_name == "kernel" else UserspaceEngine()
        self.mods: Any = kmaps if engine_name == "kernel" else umaps
        self.lst = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.owned: list[Any] = []

    def progs(self, mode: str, kind: str = "sockhash", n: int = 4) -> tuple[Any, Any]:
        m = self.eng.sockmap(n) if kind == "sockmap" else self.eng.sockhash(n)
        return m, self.eng.attach(m, **attach_kw(mode))

    def plain(self) -> Any:
        m = self.mods.Map.create(MapSpec(MapType.SOCKHASH, 4, 8, 4, 0, "plain"))
        self.owned.append(m)
        return m

    def tcp(self) -> socket.socket:
        c = socket.create_connection(self.lst.getsockname(), timeout=5)
        s, _ = self.lst.accept()
        self.owned += [c, s]
        return c

    def close(self) -> None:
        for o in reversed(self.owned):
            o.close()
        self.eng.close()
        self.lst.close()


@pytest.fixture
def world(engine_name: str) -> Iterator[World]:
    w = World(engine_name)
    yield w
    w.close()


def answer(fn: Callable[[], object]) -> str:
    try:
        fn()
    except BpfError as e:
        return "EOPNOTSUPP" if e.errno == errno.EOPNOTSUPP else errno.errorcode[e.errno or 0]
    return "ok"


@pytest.mark.parametrize("kind", ["sockmap", "sockhash"])
@pytest.mark.parametrize("mode", ["strparser", "verdict-only"])
def test_again_into_the_same_map_and_the_errno_order(world: World, kind: str, mode: str) -> None:
    m, _ = world.progs(mode, kind, n=2)
    s = world.tcp()
    m.update(0, s)
    got = {
        "own key": answer(lambda: m.update(0, s)),
        "own key NOEXIST": answer(lambda: m.update(0, s, 1)),
        "empty key EXIST": answer(lambda: m.update(1, s, 2)),
        "bad flags": answer(lambda: m.update(1, s, 4)),
        "past max_entries": answer(lambda: m.update(5, s)),
    }
    m.update(1, world.tcp())
    got["full"] = answer(lambda: m.update(5, s))
    m.delete(0)
    got["after delete"] = answer(lambda: m.update(0, s))
    # a SOCKMAP checks the index first; a SOCKHASH finds it full only after the link
    beyond = "E2BIG" if kind == "sockmap" else "EBUSY"
    assert got == {
        "own key": "EBUSY",
        "own key NOEXIST": "EBUSY",
        "empty key EXIST": "EBUSY",
        "bad flags": "EINVAL",
        "past max_entries": beyond,
        "full": beyond,
        "after delete": "ok",
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("flags", "taken", "first"), [(2, False, "ENOENT"), (1, True, "EEXIST"), (0, True, "E2BIG")]
)
def test_a_failed_update_leaves_the_programs_on_a_socket_in_another_map(
    world: World, mode: str, flags: int, taken: bool, first: str
) -> None:
    """The link comes before the key checks: a socket whose psock outlives the failed
    update (it is in another map) keeps the programs; without one it does not."""
    plain = world.plain()
    m, _ = world.progs(mode, n=1 if first == "E2BIG" else 4)
    s, alone = world.tcp(), world.tcp()
    if taken:
        m.update(0, world.tcp())
    plain.update(0, s)
    key = 1 if first == "E2BIG" else 0
    assert answer(lambda: m.update(key, s, flags)) == first
    assert answer(lambda: m.update(key, alone, flags)) == first
    if taken:
        m.delete(0)
    assert answer(lambda: m.update(0, s)) == "EBUSY"
    assert answer(lambda: m.update(0, alone)) == "ok"
    plain.delete(0)  # the psock goes with its last map: so do the programs
    m.delete(0)
    assert answer(lambda: m.update(0, s)) == "ok"


@pytest.mark.parametrize("mode", MODES)
def test_leaving_a_map_while_in_another(world: World, mode: str) -> None:
    """Delete or replace clears the parser and verdict slots, never the msg verdict's."""
    plain = world.plain()
    m, _ = world.progs(mode)
    s, t = world.tcp(), world.tcp()
    plain.update(0, s)
    plain.update(1, t)
    m.update(0, s)
    m.update(1, t)
    m.delete(0)
    m.update(1, world.tcp())  # t replaced
    again = "EBUSY" if mode == "msg" else "ok"
    assert [answer(lambda: m.update(2, s)), answer(lambda: m.update(3, t))] == [again, again]
    assert [answer(lambda: plain.update(2, s)), answer(lambda: plain.update(0, s))] == ["ok", "ok"]


@pytest.mark.parametrize("mode", MODES)
def test_detach_then_delete_keeps_the_programs(world: World, mode: str) -> None:
    plain = world.plain()
    b, att = world.progs(mode)
    c, _ = world.progs(mode)
    s = world.tcp()
    plain.update(0, s)
    b.update(0, s)
    att.detach()
    b.delete(0)
    assert answer(lambda: c.update(0, s)) == "EBUSY"
    assert answer(lambda: b.update(0, s)) == "ok"  # b has no programs now


@pytest.mark.parametrize("mode", MODES)
def test_a_map_given_programs_late_stops_the_sockets_own(world: World, mode: str) -> None:
    """``sock_map_del_link`` asks which programs the map has now, not whose the socket runs."""
    late = world.eng.sockhash(4)
    running, _ = world.progs(mode)
    s = world.tcp()
    late.update(0, s)
    running.update(0, s)
    world.eng.attach(late, **attach_kw(mode))
    late.delete(0)
    other, _ = world.progs(mode)
    assert answer(lambda: other.update(0, s)) == ("EBUSY" if mode == "msg" else "ok")


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("strparser", "verdict-only", "EBUSY"),
        ("verdict-only", "strparser", "EBUSY"),
        ("msg", "strparser", "ok"),
        ("strparser", "msg", "ok"),
        ("parser-only", "strparser", "EBUSY"),
        ("parser-only", "verdict-only", "ok"),
        ("verdict-only", "parser-only", "ok"),
        ("all", "msg", "EBUSY"),
    ],
)
def test_which_program_kinds_collide(world: World, first: str, second: str, expected: str) -> None:
    a, _ = world.progs(first)
    b, _ = world.progs(second)
    s = world.tcp()
    a.update(0, s)
    assert answer(lambda: b.update(0, s)) == expected


@pytest.mark.parametrize("mode", MODES)
def test_a_listener_takes_no_programs(world: World, mode: str) -> None:
    a, _ = world.progs(mode)
    b, _ = world.progs(mode)
    lst = socket.create_server(("127.0.0.1", 0))
    world.owned.append(lst)
    assert [answer(lambda: a.update(0, lst)), answer(lambda: a.update(1, lst))] == ["ok", "ok"]
    assert answer(lambda: b.update(0, lst)) == "ok"


def test_udp_in_a_verdict_only_map_goes_in_once(world: World) -> None:
    m, _ = world.progs("verdict-only")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    world.owned.append(u)
    u.bind(("127.0.0.1", 0))
    assert [answer(lambda: m.update(0, u)), answer(lambda: m.update(1, u))] == ["ok", "EBUSY"]


def non_tcp(world: World, kind: str) -> socket.socket:
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        world.owned.append(s)
        return s
    stype = socket.SOCK_STREAM if kind == "unix-stream" else socket.SOCK_DGRAM
    a, b = socket.socketpair(socket.AF_UNIX, stype)
    world.owned += [a, b]
    return a


@pytest.mark.parametrize("kind", ["udp", "unix-stream", "unix-dgram"])
def test_ebusy_comes_before_the_tcp_only_refusal_of_a_parser(world: World, kind: str) -> None:
    """A non-TCP socket is refused by a map with a stream parser (EOPNOTSUPP) only after
    the link's EBUSY; the failed link leaves that map's slots filled on a socket that is
    in another map (then EBUSY for a verdict), not its msg verdict's."""
    plain = world.plain()
    strp, _ = world.progs("strparser")
    verdict, _ = world.progs("verdict-only")
    msg, _ = world.progs("msg")
    s = non_tcp(world, kind)
    assert answer(lambda: verdict.update(0, s)) == "ok"
    assert answer(lambda: strp.update(0, s)) == "EBUSY"
    t = non_tcp(world, kind)
    plain.update(0, t)
    assert answer(lambda: strp.update(0, t)) == "EOPNOTSUPP"
    assert answer(lambda: verdict.update(1, t)) == "EBUSY"
    assert answer(lambda: msg.update(0, t)) == "ok"
    u = non_tcp(world, kind)
    assert answer(lambda: strp.update(1, u)) == "EOPNOTSUPP"
    assert answer(lambda: verdict.update(2, u)) == "ok"  # no other map: its psock went
