"""SK_MSG verdicts on real sockets, the same scenarios on both engines: pass, drop (the
sender gets EACCES, and a drop sticks), redirect egress and ingress, an empty key,
``apply_bytes`` and ``cork_bytes`` -- with sends split in several calls.

The kernel runs the verdict on the application's ``send``; the userspace engine on
``engine.send(sock, data)``. Each test counts the verdict's runs with an ARRAY the
program increments, and reads what arrived where."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from engines import Engine, read_passed
from netutil import Pairs
from sockmap import asm, programs
from sockmap.abi import Helper
from sockmap.asm import R0, R1, R2, R6, R7, R10
from sockmap.kernel.engine import KernelEngine


def counted(counter: object, verdict: asm.Program) -> asm.Program:
    """``verdict`` preceded by ``counter[0] += 1`` (it starts with ``r6 = r1``)."""
    prologue: list[asm.Item] = [
        asm.st(asm.W, R10, -4, 0),
        asm.ld_map_fd(R1, counter),
        asm.mov(R2, R10),
        asm.add(R2, -4),
        asm.call(Helper.map_lookup_elem),
        asm.jeq(R0, 0, "uncounted"),
        asm.mov(R7, 1),
        asm.atomic_add(asm.DW, R0, R7, 0),
        asm.label("uncounted"),
    ]
    first, *rest = verdict.items
    return asm.Program([first, *prologue, *rest], name=verdict.name)


@dataclass
class Setup:
    engine: Engine
    pairs: Pairs
    smap: object = None
    counter: object = None
    c: socket.socket | None = None  # the sender, in the map at key 0
    s: socket.socket | None = None  # its peer
    d: socket.socket | None = None  # a redirect target, at key 1
    e: socket.socket | None = None  # d's peer

    def build(self, make: object) -> None:
        self.smap = self.engine.sockmap(4)
        self.counter = self.engine.array(1)
        self.engine.attach(self.smap, msg_verdict=counted(self.counter, make(self.smap)))  # type: ignore[operator]
        self.c, self.s = self.pairs()
        self.d, self.e = self.pairs()
        self.smap[0] = self.c  # type: ignore[index]
        self.smap[1] = self.d  # type: ignore[index]

    def send(self, *chunks: bytes) -> list[int | str]:
        """What each send returned: a byte count, or the errno's name."""
        out: list[int | str] = []
        for x in chunks:
            try:
                if isinstance(self.engine, KernelEngine):
                    out.append(self.c.send(x))  # type: ignore[union-attr]
                else:
                    out.append(self.engine.send(self.c, x))  # type: ignore[arg-type]
            except OSError as exc:
                out.append(errno.errorcode[exc.errno or 0])
        return out

    @property
    def runs(self) -> int:
        return int.from_bytes(self.counter.lookup(0), "little")  # type: ignore[attr-defined]

    def arrived(self, sock: socket.socket | None, n: int, wait: float = 2.0) -> bytes:
        """Up to ``n`` bytes that reached ``sock`` (by TCP, so read with recv)."""
        assert sock is not None
        sock.settimeout(0.05)
        out = b""
        deadline = time.monotonic() + wait
        while len(out) < n and time.monotonic() < deadline:
            try:
                got = sock.recv(n - len(out))
            except TimeoutError:
                continue
            if not got:
                break
            out += got
        return out


@pytest.fixture
def setup(engine: Engine) -> Iterator[Setup]:
    pairs = Pairs()
    yield Setup(engine, pairs)
    pairs.close()


def test_pass_sends_as_usual(setup: Setup) -> None:
    setup.build(lambda m: programs.msg_verdict("pass"))
    assert setup.send(b"hello", b"world") == [5, 5]
    assert setup.arrived(setup.s, 10) == b"helloworld"
    assert setup.runs == 2


def test_drop_fails_the_send_and_sticks(setup: Setup) -> None:
    """The kernel keeps a drop verdict for the socket's later sends: they fail too, and
    the program does not run again."""
    setup.build(lambda m: programs.msg_verdict("drop"))
    assert setup.send(b"hello", b"world", b"again") == ["EACCES"] * 3
    assert setup.runs == 1
    assert setup.arrived(setup.s, 1, wait=0.3) == b""


def test_redirect_egress_leaves_by_the_target(setup: Setup) -> None:
    setup.build(lambda m: programs.msg_verdict("redirect", sockmap=m, key=1))
    assert setup.send(b"hello", b"world") == [5, 5]
    assert setup.arrived(setup.e, 10) == b"helloworld"
    assert setup.arrived(setup.s, 1, wait=0.2) == b""
    assert setup.runs == 2


def test_redirect_ingress_lands_on_the_target(setup: Setup) -> None:
    setup.build(lambda m: programs.msg_verdict("redirect", sockmap=m, key=1, ingress=True))
    assert setup.send(b"hello", b"world") == [5, 5]
    assert setup.d is not None
    assert read_passed(setup.engine, setup.d, 10) == b"helloworld"
    assert setup.runs == 2


def test_redirect_to_an_empty_key_drops(setup: Setup) -> None:
    setup.build(lambda m: programs.msg_verdict("redirect", sockmap=m, key=3))
    assert setup.send(b"hello", b"world") == ["EACCES", "EACCES"]
    assert setup.runs == 1


@pytest.mark.parametrize(
    "chunks", [[b"x" * 25], [b"x" * 5] * 5, [b"x" * 7, b"x" * 11, b"x" * 7]], ids=str
)
def test_apply_bytes_reruns_the_verdict_every_n_bytes_across_sends(
    setup: Setup, chunks: list[bytes]
) -> None:
    setup.build(lambda m: programs.msg_verdict("pass", apply=10))
    assert setup.send(*chunks) == [len(x) for x in chunks]
    assert setup.arrived(setup.s, 25) == b"x" * 25
    assert setup.runs == 3  # at bytes 0, 10 and 20


def test_apply_bytes_with_a_redirect(setup: Setup) -> None:
    setup.build(lambda m: programs.msg_verdict("redirect", sockmap=m, key=1, apply=10))
    assert setup.send(b"y" * 25) == [25]
    assert setup.arrived(setup.e, 25) == b"y" * 25
    assert setup.runs == 3


@pytest.mark.parametrize(
    ("chunks", "runs"),
    [([b"a" * 4, b"b" * 6], 2), ([b"a" * 4, b"b" * 3, b"c" * 5], 2), ([b"a" * 12], 1)],
    ids=["4+6", "4+3+5", "12"],
)
def test_cork_bytes_holds_until_enough_then_runs_on_them_all(
    setup: Setup, chunks: list[bytes], runs: int
) -> None:
    setup.build(lambda m: programs.msg_verdict("pass", cork=10))
    total = b"".join(chunks)
    assert setup.send(*chunks) == [len(x) for x in chunks]
    assert setup.arrived(setup.s, len(total)) == total
    assert setup.runs == runs


def test_corked_bytes_short_of_the_mark_stay_held(setup: Setup) -> None:
    setup.build(lambda m: programs.msg_verdict("pass", cork=10))
    assert setup.send(b"a" * 4) == [4]
    assert setup.arrived(setup.s, 1, wait=0.3) == b""
    assert setup.runs == 1
    assert setup.send(b"b" * 6) == [6]
    assert setup.arrived(setup.s, 10) == b"aaaabbbbbb"


def pass_first_then_drop(counter: object) -> asm.Program:
    """Run 1: pass, with apply_bytes(5); every later run: drop."""
    return asm.Program(
        [
            asm.mov(R6, R1),
            asm.st(asm.W, R10, -4, 0),
            asm.ld_map_fd(R1, counter),
            asm.mov(R2, R10),
            asm.add(R2, -4),
            asm.call(Helper.map_lookup_elem),
            asm.jeq(R0, 0, "drop"),
            asm.mov(R7, 1),
            asm.atomic_add(asm.DW, R0, R7, 0, fetch=True),
            asm.jne(R7, 0, "drop"),
            asm.mov(R1, R6),
            asm.mov(R2, 5),
            asm.call(Helper.msg_apply_bytes),
            asm.mov(R0, 1),
            asm.exit_(),
            asm.label("drop"),
            asm.mov(R0, 0),
            asm.exit_(),
        ],
        name="pass_then_drop",
    )


def test_a_drop_inside_a_send_returns_the_bytes_taken_before_it(setup: Setup) -> None:
    """The second send straddles the end of the pass budget: its first 2 bytes are sent,
    the verdict runs again and drops the rest, and send returns 2; later sends fail."""
    setup.smap = setup.engine.sockmap(2)
    setup.counter = setup.engine.array(1)
    setup.engine.attach(setup.smap, msg_verdict=pass_first_then_drop(setup.counter))
    setup.c, setup.s = setup.pairs()
    setup.c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    setup.smap[0] = setup.c  # type: ignore[index]
    assert setup.send(b"aaa", b"bbb", b"ccc") == [3, 2, "EACCES"]
    assert setup.arrived(setup.s, 5) == b"aaabb"
    assert setup.runs == 2
