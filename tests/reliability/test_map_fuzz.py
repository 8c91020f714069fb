"""Stateful differential fuzzing of map operations: a kernel map and a userspace map
side by side, every answer compared step by step (the kernel is the oracle).

A hypothesis ``RuleBasedStateMachine`` creates maps (every kind, key and value size,
max_entries and map flags, invalid ones included: the create error is compared too),
updates them with every flag combination, looks up, deletes, walks ``next_key`` from
None, present and absent keys, iterates, closes maps (then EBADF on both), and keeps a
pool of sockets of every kind and state (TCP established both sides, listening, only
bound, unbound, connecting, CLOSE_WAIT, shut down; UDP bound, unbound, connected and
over IPv6; unix stream, dgram and seqpacket; a closed socket object, a pipe, a regular
file) that it inserts, closes (a closed socket leaves every map on both engines) and
replaces by another socket under the same fd number. After each step the keys and the
values of every open map must agree; socket maps may hold only open sockets' cookies.

Normal mode: 200 derandomized runs of up to 40 steps. Long mode (``SOCKMAP_LONG=1``):
more, random, runs; ``record("map_fuzz")`` keeps the runs, the operations executed per
rule, the outcome (errno) histogram and the mismatches (there must be none).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from report import LONG, record, size

from netutil import Pairs
from sockets import TCP_CLOSE_WAIT, TCP_FIN_WAIT2, wait_for_tcp_state
from sockmap import programs
from sockmap.abi import MapType
from sockmap.errors import BpfError, errno_name
from sockmap.kernel import maps as kmaps
from sockmap.kernel.engine import KernelEngine
from sockmap.kernel.features import bpf_access
from sockmap.kernel.maps import MapSpec
from sockmap.userspace import maps as umaps
from sockmap.userspace.engine import UserspaceEngine

SO_COOKIE = 57
TCP_ESTABLISHED, TCP_SYN_SENT = 1, 2

F_NO_PREALLOC, F_NO_COMMON_LRU, F_NUMA, F_RDONLY, F_WRONLY, F_ZERO_SEED = 1, 2, 4, 8, 16, 64
F_RDONLY_PROG, F_WRONLY_PROG, F_MMAPABLE, F_INNER_MAP = 128, 256, 1024, 4096

KINDS = ["sockmap", "sockhash", "array", "hash"]
KIND = st.sampled_from(["sockmap", "sockhash"] * 2 + ["array", "hash"])  # sockets first
TYPES = {
    "sockmap": MapType.SOCKMAP,
    "sockhash": MapType.SOCKHASH,
    "array": MapType.ARRAY,
    "hash": MapType.HASH,
}
MAX_OPEN = 4
MAX_MAPS = 6  # open and closed
MAX_SOCKETS = 14


def kernel_refusal() -> str | None:
    """Why bpf() is refused here, or None (as ``tests/conformance/conftest.py``)."""
    permitted, why = bpf_access()
    return None if permitted else why


# ------------------------------------------------------------------ figures


@dataclass
class Figures:
    """What the fuzzer did, over every run of every test in this file."""

    runs: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    by_rule: Counter[str] = field(default_factory=Counter)  # "update sockmap EOPNOTSUPP"
    invariant_checks: int = 0
    mismatches: int = 0
    sockets: Counter[str] = field(default_factory=Counter)
    maps_created: Counter[str] = field(default_factory=Counter)


FIGURES = Figures()


# ------------------------------------------------------------------ outcomes


def outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    """What ``fn()`` gave: ("ok", value) or (exception class, errno name, operation)."""
    try:
        out = fn()
    except BpfError as e:
        # the operation the message names ("insert fd", "look up", "create SOCKMAP"...)
        words = " ".join(e.strerror.split()[:2]) if e.strerror else ""
        return (type(e).__name__, e.errno, words)
    except Exception as e:  # any other exception must be the same on both too
        return (type(e).__name__, getattr(e, "errno", None))
    if isinstance(out, Iterator):
        out = list(out)
    if isinstance(out, list):
        out = tuple(out)
    return ("ok", out)


def label(out: tuple[Any, ...]) -> str:
    """The histogram bucket of an outcome: "ok", "ENOENT", "TypeError"..."""
    if out[0] == "ok":
        return "ok"
    return errno_name(out[1]) if isinstance(out[1], int) else str(out[0])


def accept_queue(listener: socket.socket) -> int:
    """Connections waiting in a listener's accept queue (``tcpi_unacked`` of a listener)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    return int.from_bytes(info[24:28], "little")


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def is_tcp(sock: socket.socket) -> bool:
    return sock.family != socket.AF_UNIX and sock.type == socket.SOCK_STREAM


def wait_for_state_change(sock: socket.socket, state: int, timeout: float = 5.0) -> None:
    """Wait (bounded) until ``sock`` has left TCP ``state``: the only admissible state a
    peer's close can take it out of, so that both engines then see the same socket."""
    deadline = time.monotonic() + timeout
    while tcp_state(sock) == state:
        assert time.monotonic() < deadline, f"the socket stayed in TCP state {state} for 5 s"
        time.sleep(0.002)


def cookie_of(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


# ------------------------------------------------------------------ sockets

SOCKET_KINDS = [
    "tcp-client",
    "tcp-accepted",
    "tcp-listening",
    "tcp-bound",
    "tcp-unbound",
    "tcp-connecting",
    "tcp-close-wait",
    "tcp-shut-wr",
    "tcp-shut-rdwr",
    "tcp-shut-rd",
    "tcp6-client",
    "tcp6-accepted",
    "udp-bound",
    "udp-unbound",
    "udp-connected",
    "udp6-bound",
    "unix-stream",
    "unix-stream-unconnected",
    "unix-dgram",
    "unix-dgram-unbound",
    "unix-seqpacket",
    "closed-socket",
    "pipe",
    "file",
]

REUSE_KINDS = [k for k in SOCKET_KINDS if k != "closed-socket"]


@dataclass
class Entry:
    """One value of the pool: a socket object (maybe closed) or a bare fd (pipe, file)."""

    kind: str
    obj: socket.socket | int
    cookie: int = 0
    peer: socket.socket | None = None  # kept open by us, never inserted

    @property
    def is_socket(self) -> bool:
        return isinstance(self.obj, socket.socket)

    @property
    def open(self) -> bool:
        return not isinstance(self.obj, socket.socket) or self.obj.fileno() >= 0


class SocketMaker:
    """Makes loopback sockets of each kind; owns the listeners and peers behind them."""

    def __init__(self, tmpdir: str) -> None:
        self.tmpdir = tmpdir
        self.owned: list[socket.socket] = []  # listeners, peers, fillers: closed at the end
        self.fds: list[int] = []  # pipe read ends
        self._lst: socket.socket | None = None
        self._lst6: socket.socket | None = None
        self._full: socket.socket | None = None

    def _own(self, s: socket.socket) -> socket.socket:
        self.owned.append(s)
        return s

    def listener(self, family: int = socket.AF_INET) -> socket.socket:
        if family == socket.AF_INET6:
            if self._lst6 is None:
                self._lst6 = self._own(socket.create_server(("::1", 0), family=family))
            return self._lst6
        if self._lst is None:
            self._lst = self._own(socket.create_server(("127.0.0.1", 0), backlog=64))
        return self._lst

    def tcp_pair(self, family: int = socket.AF_INET) -> tuple[socket.socket, socket.socket]:
        lst = self.listener(family)
        client = socket.create_connection(lst.getsockname()[:2], timeout=5)
        server, _ = lst.accept()
        return client, server

    def connecting(self) -> socket.socket:
        """A TCP socket in SYN_SENT: its SYN goes to a listener whose accept queue is full
        (backlog 0 and one connection never accepted), so the kernel drops every SYN and
        the socket stays SYN_SENT for the ~2 minutes of SYN retries."""
        if self._full is None:
            full = self._own(socket.socket())
            full.bind(("127.0.0.1", 0))
            full.listen(0)
            self._own(socket.create_connection(full.getsockname(), timeout=5))
            deadline = time.monotonic() + 5
            while accept_queue(full) < 1:  # the filler is queued: the queue is full
                assert time.monotonic() < deadline, "the filler connection never got queued"
                time.sleep(0.002)
            self._full = full
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(self._full.getsockname())
        s.setblocking(True)
        assert tcp_state(s) == TCP_SYN_SENT, "the connecting socket is not in SYN_SENT"
        return s

    def make(self, kind: str) -> Entry:  # one branch per kind
        if kind in ("tcp-client", "tcp-accepted", "tcp6-client", "tcp6-accepted"):
            fam = socket.AF_INET6 if kind.startswith("tcp6") else socket.AF_INET
            client, server = self.tcp_pair(fam)
            mine, peer = (client, server) if kind.endswith("client") else (server, client)
            return Entry(kind, mine, peer=self._own(peer))
        if kind == "tcp-listening":
            return Entry(kind, socket.create_server(("127.0.0.1", 0)))
        if kind == "tcp-bound":
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            return Entry(kind, s)
        if kind == "tcp-unbound":
            return Entry(kind, socket.socket())
        if kind == "tcp-connecting":
            return Entry(kind, self.connecting())
        if kind == "tcp-close-wait":
            client, server = self.tcp_pair()
            server.close()
            assert wait_for_tcp_state(client, TCP_CLOSE_WAIT), "no CLOSE_WAIT in 5 s"
            return Entry(kind, client)
        if kind.startswith("tcp-shut-"):
            client, server = self.tcp_pair()
            how = {"wr": socket.SHUT_WR, "rdwr": socket.SHUT_RDWR, "rd": socket.SHUT_RD}
            client.shutdown(how[kind.removeprefix("tcp-shut-")])
            if kind != "tcp-shut-rd":  # FIN_WAIT1 -> FIN_WAIT2 once the FIN is acked
                assert wait_for_tcp_state(client, TCP_FIN_WAIT2), "no FIN_WAIT2 in 5 s"
            return Entry(kind, client, peer=self._own(server))
        if kind == "udp-bound":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            return Entry(kind, s)
        if kind == "udp-unbound":
            return Entry(kind, socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        if kind == "udp-connected":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(("127.0.0.1", 9))
            return Entry(kind, s)
        if kind == "udp6-bound":
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.bind(("::1", 0))
            return Entry(kind, s)
        if kind in ("unix-stream", "unix-dgram", "unix-seqpacket"):
            stype = {
                "unix-stream": socket.SOCK_STREAM,
                "unix-dgram": socket.SOCK_DGRAM,
                "unix-seqpacket": socket.SOCK_SEQPACKET,
            }[kind]
            a, b = socket.socketpair(socket.AF_UNIX, stype)
            return Entry(kind, a, peer=self._own(b))
        if kind == "unix-stream-unconnected":
            return Entry(kind, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        if kind == "unix-dgram-unbound":
            return Entry(kind, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        if kind == "closed-socket":
            s = socket.socket()
            s.close()
            return Entry(kind, s)
        if kind == "pipe":
            r, w = os.pipe()
            self.fds.append(r)
            return Entry(kind, w)
        if kind == "file":
            fd, _ = tempfile.mkstemp(dir=self.tmpdir)
            return Entry(kind, fd)
        raise AssertionError(f"unknown socket kind {kind}")

    def close(self) -> None:
        for s in self.owned:
            s.close()
        self.owned.clear()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


# ------------------------------------------------------------------ map pairs


@dataclass
class Pair:
    """A kernel map and a userspace map made from one spec."""

    kind: str
    spec: MapSpec
    k: Any
    u: Any
    programs: str = ""  # "", "strparser" or "verdict-only"
    katt: Any = None  # the kernel attachment, detached at close

    @property
    def closed(self) -> bool:
        return bool(self.k.closed)

    @property
    def ordered(self) -> bool:
        """False for a HASH with a random seed: its order is the kernel's secret."""
        return self.kind != "hash" or bool(self.spec.flags & F_ZERO_SEED)

    @property
    def sock(self) -> bool:
        return self.kind in ("sockmap", "sockhash")

    def key(self, sel: int | str) -> Any:
        """A key for selector ``sel``: a small int (as bytes when key_size has no int
        format), or a deliberately bad one."""
        ks = self.spec.key_size
        if sel == "max":
            return (1 << (8 * ks)) - 1 if ks in (1, 2, 4, 8) else b"\xff" * ks
        if sel == "wrong-size":
            return b"\x01" * (ks + 1)
        if sel == "negative":
            return -1
        if sel == "str":
            return "1"
        assert isinstance(sel, int)
        if self.kind in ("sockmap", "array"):
            sel %= self.spec.max_entries + 1  # one key in n + 1 past the end
        if ks in (1, 2, 4, 8):
            return sel
        return sel.to_bytes(ks, "little") if ks else b""

    def close(self) -> None:
        if self.katt is not None and not self.k.closed:
            # as KernelEngine.close: the kernel frees a closed map later, from a work queue,
            # and until then its sockets keep its programs (EBUSY elsewhere); detach and
            # empty it first so that its sockets are free at once, as on the userspace engine
            self.katt.detach()
            for key in list(self.k.inserted_keys):
                with contextlib.suppress(BpfError):
                    self.k.delete(key)
        self.k.close()
        self.u.close()


KEY = st.sampled_from([*range(8)] * 3 + ["max", "wrong-size", "negative", "str"])
# ANY, NOEXIST, EXIST; then F_LOCK and both (EINVAL in the kernel), then unknown bits
UPDATE_FLAGS = st.sampled_from([0] * 16 + [1] * 8 + [2] * 8 + [3, 4, 5, 6, 7, 8, 0x10, 1 << 32, -1])
MAP_FLAGS = st.sampled_from(
    [0] * 8
    + [
        F_NUMA,
        F_RDONLY,
        F_WRONLY,
        F_RDONLY | F_WRONLY,
        F_NO_PREALLOC,
        F_NO_COMMON_LRU,
        F_ZERO_SEED,
        F_NO_PREALLOC | F_ZERO_SEED,
        F_RDONLY_PROG,
        F_WRONLY_PROG,
        F_RDONLY_PROG | F_WRONLY_PROG,
        F_MMAPABLE,
        F_INNER_MAP,
        1 << 20,
    ]
)
KEY_SIZES = st.sampled_from([4] * 10 + [1, 2, 8, 3, 0, 513])
VALUE_SIZES = st.sampled_from([8] * 5 + [4] * 4 + [0, 3, 16])
MAX_ENTRIES = st.sampled_from([1, 2, 3, 4, 5] * 3 + [0, 2**31, 2**32 - 1])
MAP_INDEX = st.integers(0, 3 * MAX_MAPS)  # mostly an open map (see MapFuzz.pair)
# a value for a socket map: (pool index, as a bare int fd) or a bad value
# (pool index, passed as a bare fd, or else a bad value instead); one in eight is bad
POOL = "pool"
SOCK_VALUE = st.tuples(
    st.integers(0, MAX_SOCKETS - 1),
    st.sampled_from([False] * 3 + [True]),
    st.sampled_from([POOL] * 49 + [-1, 2**31, 2**40, True, 1.5, "3", None]),
)
# a value for a value map: an int, or bytes of value_size + delta
VALUE = st.tuples(
    st.sampled_from(["int"] * 5 + ["bytes"] * 4 + ["bad"]),
    st.integers(0, 2**16),
    st.binary(min_size=0, max_size=1),
    st.sampled_from([0] * 8 + [-1, 1]),  # bytes of value_size + this
    st.sampled_from([2**32 - 1, 2**32, 2**64, -1]),
)


class MapFuzz(RuleBasedStateMachine):
    """Drives kernel and userspace maps side by side; every answer must agree."""

    def __init__(self) -> None:
        super().__init__()
        FIGURES.runs += 1
        self.tmp = tempfile.TemporaryDirectory(prefix="sockmap-fuzz-")
        self.maker = SocketMaker(self.tmp.name)
        self.pairs: list[Pair] = []
        self.pool: list[Entry] = []
        self.observe_later = False  # after a close: let the next operation meet it first
        self.keng: KernelEngine | None = None
        self.ueng: UserspaceEngine | None = None
        self.step = 0

    # -- comparing ------------------------------------------------------------
    def both(self, rule_name: str, pair: Pair, op: Callable[[Any], Any]) -> tuple[Any, ...]:
        """Run ``op`` on the kernel map, then on the userspace map; the outcomes must agree."""
        self.step += 1
        FIGURES.ops[rule_name] += 1
        kout = outcome(lambda: op(pair.k))
        uout = outcome(lambda: op(pair.u))
        if not pair.ordered and kout[0] == "ok" and uout[0] == "ok":
            kout, uout = ("ok", self._unordered(kout[1])), ("ok", self._unordered(uout[1]))
        FIGURES.outcomes[label(kout)] += 1
        kind = f"{pair.kind}+{pair.programs}" if pair.programs else pair.kind
        FIGURES.by_rule[f"{rule_name} {kind} {label(kout)}"] += 1
        self.check(kout == uout, f"{rule_name} on {kind} {pair.spec}", kout, uout)
        self.observe_later = False
        return kout

    @staticmethod
    def _unordered(value: Any) -> Any:
        return tuple(sorted(value, key=repr)) if isinstance(value, tuple) else value

    def check(self, ok: bool, what: str, kout: Any, uout: Any) -> None:
        if not ok:
            FIGURES.mismatches += 1
            raise AssertionError(f"step {self.step}: {what}: kernel {kout} != userspace {uout}")

    # -- maps -------------------------------------------------------------------
    def _create(self, kind: str, ks: int, vs: int, n: int, flags: int) -> None:
        spec = MapSpec(TYPES[kind], ks, vs, n, flags, name=f"fuzz_{kind}")
        FIGURES.ops["create"] += 1
        self.step += 1
        made: list[Any] = []

        def create(mod: Any) -> Any:
            m = mod.Map.create(spec)
            made.append(m)
            info = m.info()
            return (type(m).__name__, info.type, info.key_size, info.value_size,
                    info.max_entries, info.flags, info.name)  # fmt: skip

        kout, uout = outcome(lambda: create(kmaps)), outcome(lambda: create(umaps))
        FIGURES.outcomes[label(kout)] += 1
        FIGURES.by_rule[f"create {kind} {label(kout)}"] += 1
        try:
            self.check(kout == uout, f"create {spec}", kout, uout)
        except AssertionError:
            for m in made:
                m.close()
            raise
        if kout[0] == "ok":
            k, u = made
            self.pairs.append(Pair(kind, spec, k, u))
            FIGURES.maps_created[kind] += 1

    @initialize(kind=KIND, vs=st.sampled_from([8, 8, 4]), n=st.integers(1, 4))
    def first_map(self, kind: str, vs: int, n: int) -> None:
        """Every run starts with one valid map (zero-seeded when a HASH)..."""
        self._create(kind, 4, vs, n, F_ZERO_SEED if kind == "hash" else 0)

    @initialize(kinds=st.lists(st.sampled_from(SOCKET_KINDS), min_size=1, max_size=3))
    def first_sockets(self, kinds: list[str]) -> None:
        """... and a few sockets, an established TCP one always among them."""
        for kind in ["tcp-client", *kinds]:
            self.add_socket(kind)

    @precondition(lambda self: len(self.pairs) < MAX_MAPS and len(self.open_pairs()) < MAX_OPEN)
    @rule(
        kind=KIND,
        ks=KEY_SIZES,
        vs=VALUE_SIZES,
        n=MAX_ENTRIES,
        flags=MAP_FLAGS,
        zero_seed=st.booleans(),
    )
    def create_map(self, kind: str, ks: int, vs: int, n: int, flags: int, zero_seed: bool) -> None:
        if kind == "array" and n > 5:
            n = 5  # a valid ARRAY that large would allocate gigabytes
        if kind == "hash" and zero_seed:
            flags |= F_ZERO_SEED
        self._create(kind, ks, vs, n, flags)

    def open_pairs(self) -> list[Pair]:
        return [p for p in self.pairs if not p.closed]

    def pair(self, i: int) -> Pair:
        """Map ``i`` (open or closed) for a small ``i``, else an open one if there is one."""
        if i < len(self.pairs):
            return self.pairs[i]
        pairs = self.open_pairs() or self.pairs
        return pairs[i % len(pairs)]

    def engines(self) -> tuple[KernelEngine, UserspaceEngine]:
        """One engine of each kind per run, for the maps with programs: the EBUSY rule (a
        socket runs the programs of one map only) holds within an engine."""
        if self.keng is None:
            self.keng = KernelEngine()
            self.ueng = UserspaceEngine()
        assert self.ueng is not None
        return self.keng, self.ueng

    @precondition(lambda self: len(self.pairs) < MAX_MAPS and len(self.open_pairs()) < MAX_OPEN)
    @rule(
        kind=st.sampled_from(["sockmap", "sockhash"]),
        ks=st.sampled_from([4, 4, 4, 1, 8, 3]),
        vs=st.just(8),
        n=st.integers(1, 4),
        mode=st.sampled_from(["strparser", "verdict-only"]),
    )
    def create_map_with_programs(self, kind: str, ks: int, vs: int, n: int, mode: str) -> None:
        """A socket map with programs attached (a stream parser and verdict, or a verdict
        only) on both engines: admission changes (TCP only with a parser, EBUSY for a
        socket that runs another map's programs)."""
        FIGURES.ops["create"] += 1
        self.step += 1
        keng, ueng = self.engines()
        made: list[Any] = []

        def create(eng: Any) -> Any:
            if kind == "sockmap":
                m = eng.sockmap(n, value_size=vs, name="fuzz_progs")
            else:
                m = eng.sockhash(n, key_size=ks, value_size=vs, name="fuzz_progs")
            made.append(m)
            parser = programs.whole_segment() if mode == "strparser" else None
            made.append(eng.attach(m, parser=parser, verdict=programs.pass_()))
            return type(m).__name__

        kout, uout = outcome(lambda: create(keng)), outcome(lambda: create(ueng))
        FIGURES.outcomes[label(kout)] += 1
        FIGURES.by_rule[f"create {kind}+{mode} {label(kout)}"] += 1
        self.check(kout == uout, f"create {kind} with {mode} programs", kout, uout)
        if kout[0] == "ok":
            k, katt, u, _ = made
            spec = MapSpec(TYPES[kind], ks if kind == "sockhash" else 4, vs, n, 0, "fuzz_progs")
            self.pairs.append(Pair(kind, spec, k, u, mode, katt))
            FIGURES.maps_created[f"{kind}+{mode}"] += 1

    @precondition(lambda self: len(self.open_pairs()) >= 2)
    @rule(i=st.integers(0, MAX_MAPS - 1))
    def close_map(self, i: int) -> None:
        """Close both maps: every later operation on them is EBADF on both."""
        FIGURES.ops["close_map"] += 1
        self.pair(i).close()

    # -- map operations ------------------------------------------------------------
    def sock_value(self, sel: tuple[int, bool, Any]) -> Any:
        if sel[2] != POOL:
            return sel[2]
        if not self.pool:
            return -1
        entry = self.pool[sel[0] % len(self.pool)]
        if sel[1] and entry.is_socket and entry.open:
            assert isinstance(entry.obj, socket.socket)
            return entry.obj.fileno()  # a bare fd rather than the socket object
        return entry.obj

    @staticmethod
    def plain_value(pair: Pair, sel: tuple[str, int, bytes, int, int]) -> Any:
        mode, number, blob, delta, bad = sel
        vs = pair.spec.value_size
        if mode == "bad":
            return bad
        if mode == "bytes" or vs not in (1, 2, 4, 8):
            n = max(0, vs + delta)
            return (blob * n)[:n] if blob else number.to_bytes(8, "little")[:n].ljust(n, b"\0")
        return number % (1 << (8 * vs))

    @precondition(lambda self: self.pairs)
    @rule(i=MAP_INDEX, key=KEY, sv=SOCK_VALUE, v=VALUE, flags=UPDATE_FLAGS)
    def update(self, i: int, key: Any, sv: Any, v: Any, flags: int) -> None:
        self._update(self.pair(i), key, sv, v, flags)

    @precondition(lambda self: any(p.sock for p in self.open_pairs()))
    @rule(i=MAP_INDEX, key=KEY, sv=SOCK_VALUE, flags=UPDATE_FLAGS)
    def update_socket_map(self, i: int, key: Any, sv: Any, flags: int) -> None:
        """Updates of an open socket map, drawn as often as every other operation."""
        pairs = [p for p in self.open_pairs() if p.sock]
        self._update(pairs[i % len(pairs)], key, sv, ("int", 0, b"", 0, 0), flags)

    def _update(self, p: Pair, key: Any, sv: Any, v: Any, flags: int) -> None:
        value = self.sock_value(sv) if p.sock else self.plain_value(p, v)
        k = p.key(key)
        self.both("update", p, lambda m: m.update(k, value, flags))

    def some_key(self, p: Pair, key: Any, j: int) -> Any:
        """A key that holds a value for ``j`` < 8 when there is one, else ``key``."""
        present = self.present_keys(p) if j < 8 else []
        return present[j % len(present)] if present else p.key(key)

    @precondition(lambda self: self.pairs)
    @rule(i=MAP_INDEX, key=KEY, j=st.integers(0, 15))
    def lookup(self, i: int, key: Any, j: int) -> None:
        p = self.pair(i)
        k = self.some_key(p, key, j)
        self.both("lookup", p, lambda m: m.lookup(k))

    @precondition(lambda self: self.pairs)
    @rule(i=MAP_INDEX, key=KEY, j=st.integers(0, 15))
    def delete(self, i: int, key: Any, j: int) -> None:
        p = self.pair(i)
        k = self.some_key(p, key, j)
        self.both("delete", p, lambda m: m.delete(k))

    @precondition(lambda self: self.pairs)
    @rule(i=MAP_INDEX, which=st.sampled_from(["none", "present", "absent"]),
          j=st.integers(0, 15))  # fmt: skip
    def next_key(self, i: int, which: str, j: int) -> None:
        p = self.pair(i)
        key: Any = None
        if which != "none":
            present = self.present_keys(p)
            if which == "present" and present:
                key = present[j % len(present)]
            else:
                key = next((p.key(c) for c in range(j, j + 20) if p.key(c) not in present), None)
                if key is None:
                    key = p.key("max")
        if not p.ordered:
            # a random-seeded HASH walks in its own order: compare only what both must say
            self.both("next_key", p, lambda m: _in_map(m, m.next_key(key)))
            return
        self.both("next_key", p, lambda m: m.next_key(key))

    def present_keys(self, p: Pair) -> list[Any]:
        """The keys that hold a value in the kernel map (peeked without counting)."""
        if p.closed:
            return []
        try:
            keys = list(p.k.keys())
            if p.kind == "sockmap" and p.spec.value_size == 8:
                keys = [k for k in keys if p.k.get(k) is not None]
        except BpfError:
            return []
        return keys if p.ordered else sorted(keys, key=repr)  # no random order in the choice

    @precondition(lambda self: self.pairs)
    @rule(i=MAP_INDEX, items=st.booleans())
    def iterate(self, i: int, items: bool) -> None:
        p = self.pair(i)
        if items:
            self.both("iterate", p, lambda m: list(m.items()))
        else:
            self.both("iterate", p, lambda m: list(m.keys()))

    # -- sockets ---------------------------------------------------------------------
    @precondition(lambda self: len(self.pool) < MAX_SOCKETS)
    @rule(kind=st.sampled_from(SOCKET_KINDS))
    def add_socket(self, kind: str) -> None:
        FIGURES.ops["add_socket"] += 1
        FIGURES.sockets[kind] += 1
        entry = self.maker.make(kind)
        if entry.is_socket and entry.open:
            assert isinstance(entry.obj, socket.socket)
            entry.cookie = cookie_of(entry.obj)
        self.pool.append(entry)

    def open_sockets(self) -> list[Entry]:
        return [e for e in self.pool if e.is_socket and e.open]

    @precondition(lambda self: self.pool)
    @rule(i=st.integers(0, MAX_SOCKETS - 1), later=st.booleans(), keep=st.booleans())
    def close_socket(self, i: int, later: bool, keep: bool) -> None:
        """Close a pool value: a socket leaves every key of every map on both engines."""
        FIGURES.ops["close_socket"] += 1
        entry = self.pool[i % len(self.pool)]
        if isinstance(entry.obj, socket.socket):
            entry.obj.close()
            if not keep:  # else it stays in the pool as a closed socket object (fd -1)
                self.pool.remove(entry)
                if entry.peer is not None:
                    entry.peer.close()
        else:
            os.close(entry.obj)  # a bare fd number may be reused: it leaves the pool
            self.pool.remove(entry)
        self.observe_later = later
        self.settle()

    def settle(self) -> None:
        """After a close: the userspace engine holds a dup of every socket in a map with
        programs (its I/O handle) until it sees the application's close, and in this one
        process that dup keeps the socket open for the kernel too. Let the engine see the
        close first (its reaper would within 50 ms), as a second process would not need."""
        for p in self.open_pairs():
            if p.programs:
                list(p.u.sockets())  # prunes the closed ones

    @precondition(lambda self: self.open_sockets())
    @rule(i=st.integers(0, MAX_SOCKETS - 1), kind=st.sampled_from(REUSE_KINDS),
          later=st.booleans())  # fmt: skip
    def reuse_fd(self, i: int, kind: str, later: bool) -> None:
        """Close a socket and give its fd number to a new socket (or pipe, file) of ``kind``."""
        FIGURES.ops["reuse_fd"] += 1
        FIGURES.sockets[kind] += 1
        opened = self.open_sockets()
        entry = opened[i % len(opened)]
        assert isinstance(entry.obj, socket.socket)
        new = self.maker.make(kind)  # made first, so that no helper fd takes the number
        fd = entry.obj.fileno()
        entry.obj.close()
        if isinstance(new.obj, socket.socket):
            os.dup2(new.obj.fileno(), fd)
            new.obj.close()
            new.obj = socket.socket(fileno=fd)
            new.cookie = cookie_of(new.obj)
        else:
            os.dup2(new.obj, fd)
            os.close(new.obj)
            new.obj = fd
        if entry.peer is not None:
            entry.peer.close()
        entry.kind = f"{kind} (fd {fd} reused)"
        entry.obj, entry.cookie, entry.peer = new.obj, new.cookie, new.peer
        self.observe_later = later
        self.settle()

    @precondition(lambda self: self.open_sockets() and len(self.pool) < MAX_SOCKETS)
    @rule(i=st.integers(0, MAX_SOCKETS - 1))
    def dup_socket(self, i: int) -> None:
        """Another fd on an open socket: the socket stays in its maps, with programs or
        without, until both are closed."""
        FIGURES.ops["dup_socket"] += 1
        opened = self.open_sockets()
        entry = opened[i % len(opened)]
        assert isinstance(entry.obj, socket.socket)
        self.pool.append(Entry(f"{entry.kind} (dup)", entry.obj.dup(), entry.cookie))

    @precondition(lambda self: any(e.peer is not None for e in self.open_sockets()))
    @rule(i=st.integers(0, MAX_SOCKETS - 1), reset=st.booleans())
    def close_peer(self, i: int, reset: bool) -> None:
        """Close the far end of a connected socket, with a FIN or a reset: TCP leaves
        ESTABLISHED (CLOSE_WAIT, CLOSE...; waited for), and a socket that does so inside a
        map stays there on the kernel, but cannot be inserted anew."""
        FIGURES.ops["close_peer"] += 1
        with_peer = [e for e in self.open_sockets() if e.peer is not None]
        entry = with_peer[i % len(with_peer)]
        assert entry.peer is not None
        assert isinstance(entry.obj, socket.socket)
        if reset and is_tcp(entry.peer):
            entry.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        entry.peer.close()
        entry.peer = None
        if is_tcp(entry.obj):
            wait_for_state_change(entry.obj, TCP_ESTABLISHED)

    @precondition(lambda self: self.open_sockets())
    @rule(i=st.integers(0, MAX_SOCKETS - 1),
          how=st.sampled_from([socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR]))  # fmt: skip
    def shutdown_socket(self, i: int, how: int) -> None:
        """Shut down a socket that may be in maps: ESTABLISHED TCP goes to FIN_WAIT1
        at once (SHUT_WR), a listener or a connecting socket to CLOSE (SHUT_RD)."""
        FIGURES.ops["shutdown_socket"] += 1
        opened = self.open_sockets()
        entry = opened[i % len(opened)]
        assert isinstance(entry.obj, socket.socket)
        with contextlib.suppress(OSError):  # ENOTCONN: not connected
            entry.obj.shutdown(how)

    # -- invariants ------------------------------------------------------------------
    @invariant()
    def maps_agree(self) -> None:
        """Every open map holds the same keys and values on both engines; socket maps only
        open sockets' cookies."""
        if self.observe_later:
            return
        FIGURES.invariant_checks += 1
        live = {e.cookie for e in self.open_sockets()}
        for p in self.open_pairs():
            kout = outcome(lambda p=p: list(p.k.keys()))
            uout = outcome(lambda p=p: list(p.u.keys()))
            if not p.ordered and kout[0] == uout[0] == "ok":
                kout, uout = ("ok", self._unordered(kout[1])), ("ok", self._unordered(uout[1]))
            self.check(kout == uout, f"keys of {p.kind} {p.spec}", kout, uout)
            kout = outcome(lambda p=p: dict(p.k.items()))
            uout = outcome(lambda p=p: dict(p.u.items()))
            self.check(kout == uout, f"items of {p.kind} {p.spec}", kout, uout)
            if p.sock and kout[0] == "ok":
                stale = set(kout[1].values()) - live
                self.check(not stale, f"cookies of closed sockets in {p.kind}", stale, live)

    def teardown(self) -> None:
        for p in self.pairs:
            p.close()
        if self.keng is not None:
            self.keng.close()
        if self.ueng is not None:
            self.ueng.close()
        for e in self.pool:
            if isinstance(e.obj, socket.socket):
                e.obj.close()
            else:
                os.close(e.obj)
            if e.peer is not None:
                e.peer.close()
        self.maker.close()
        self.tmp.cleanup()


def _in_map(m: Any, key: Any) -> Any:
    """For an unordered walk: whether next_key gave the end or a key the map holds."""
    if key is None:
        return None
    return "a key of the map" if any(key == k for k in m) else f"not a key: {key!r}"


# ------------------------------------------------------------------ the tests


@pytest.fixture
def kernel_ok() -> None:
    why = kernel_refusal()
    if why is not None:
        pytest.skip(f"kernel engine: bpf() refused: {why}")


def test_map_fuzz(kernel_ok: None) -> None:
    """The state machine: ``size(200, 1500)`` runs of up to 40 steps; in long mode the
    figures go to ``map_fuzz.json``."""
    start = time.monotonic()
    runs_before, ops_before = FIGURES.runs, sum(FIGURES.ops.values())
    try:
        run_state_machine_as_test(
            MapFuzz,
            settings=settings(
                max_examples=size(200, 1500),
                stateful_step_count=40,
                deadline=None,
                derandomize=not LONG,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        seconds = time.monotonic() - start
        ops = sum(FIGURES.ops.values()) - ops_before
        record(
            "map_fuzz",
            {
                "runs": FIGURES.runs - runs_before,
                "operations": ops,
                "operations_per_rule": dict(sorted(FIGURES.ops.items())),
                "outcomes": dict(sorted(FIGURES.outcomes.items())),
                "outcomes_per_rule_and_map": dict(sorted(FIGURES.by_rule.items())),
                "invariant_checks": FIGURES.invariant_checks,
                "mismatches": FIGURES.mismatches,
                "sockets_made": dict(sorted(FIGURES.sockets.items())),
                "maps_created": dict(sorted(FIGURES.maps_created.items())),
                "seconds": round(seconds, 1),
            },
        )
    assert FIGURES.mismatches == 0
    assert ops >= size(2000, 10_000), f"only {ops} operations executed"


# ------------------------------------------------------------------ what the fuzzer found


def _engine(name: str) -> Any:
    if name == "kernel":
        why = kernel_refusal()
        if why is not None:
            pytest.skip(f"kernel engine: bpf() refused: {why}")
        return KernelEngine()
    return UserspaceEngine()


@pytest.fixture
def tcp_pair(pairs: Pairs) -> tuple[socket.socket, socket.socket]:
    return pairs()


@pytest.mark.parametrize("mode", ["strparser", "verdict-only"])
@pytest.mark.parametrize("engine_name", ["kernel", "userspace"])
def test_closing_a_socket_in_a_map_with_programs_closes_it(engine_name, mode, tcp_pair) -> None:
    """Found by the fuzzer: on the userspace engine a socket the application closed while
    in a map with programs left the map, but its psock (and the engine's dup of the
    socket) stayed, so the connection never closed: the peer got no FIN, the kernel kept
    the socket in its maps. ``Datapath.leave`` looked the psock up by ``fileno()``, -1
    once closed."""
    client, server = tcp_pair
    with _engine(engine_name) as eng:
        m = eng.sockhash(2)
        parser = programs.whole_segment() if mode == "strparser" else None
        eng.attach(m, parser=parser, verdict=programs.pass_())
        m.update(1, client)
        client.close()
        assert server.recv(16) == b""  # the FIN (a timeout here: the socket stayed open)
        assert list(m.items()) == []


def test_a_dup_keeps_a_socket_in_a_map_with_programs(engine_name, tcp_pair) -> None:
    """Found by the fuzzer: the kernel keeps a socket in its maps while any fd of it is
    open; the userspace engine's reaper removed it from a map with programs within 50 ms
    of the close of the fd it was inserted with, though a dup kept it open (maps without
    programs kept it, ``tests/conformance/test_map_ops.py``)."""
    client, _ = tcp_pair
    with _engine(engine_name) as eng:
        m = eng.sockmap(2)
        eng.attach(m, parser=programs.whole_segment(), verdict=programs.pass_())
        m.update(0, client)
        cookie = cookie_of(client)
        with client.dup():
            client.close()
            time.sleep(0.2)  # the userspace reaper's turn (every 50 ms); no timing is judged
            assert list(m.items()) == [(0, cookie)]
        assert list(m.items()) == []


@pytest.mark.parametrize("mode", ["strparser", "verdict-only"])
def test_a_socket_in_a_map_with_programs_cannot_go_in_again(engine_name, mode, tcp_pair) -> None:
    """Found by the fuzzer, a kernel fact (6.18): a socket that runs a map's stream or skb
    verdict can be in that map once only; inserting it again, at its own key or another,
    is EBUSY (``sock_map_link`` finds the programs on the socket and does not ask whose
    they are). After a delete it may go in again. The userspace engine refused only a
    socket that ran *another* map's programs."""
    client, _ = tcp_pair
    with _engine(engine_name) as eng:
        m = eng.sockhash(4)
        parser = programs.whole_segment() if mode == "strparser" else None
        eng.attach(m, parser=parser, verdict=programs.pass_())
        m.update(1, client)
        for key in (1, 2):
            with pytest.raises(BpfError) as exc:
                m.update(key, client)
            assert exc.value.errno == 16  # EBUSY
        assert list(m.keys()) == [1]
        m.delete(1)
        m.update(2, client)
        assert list(m.keys()) == [2]


@pytest.mark.parametrize(
    "engine_name",
    [
        "kernel",
        "userspace",
    ],
)
@pytest.mark.parametrize("mode", ["strparser", "verdict-only"])
def test_a_listener_goes_into_maps_with_programs(engine_name, mode) -> None:
    """Found by the fuzzer, a kernel fact (6.18): a listening socket never runs a map's
    programs, so it may be in several maps with programs, and at several keys of one."""
    with _engine(engine_name) as eng, socket.create_server(("127.0.0.1", 0)) as lst:
        a, b = eng.sockhash(4), eng.sockhash(4)
        parser = programs.whole_segment() if mode == "strparser" else None
        for m in (a, b):
            eng.attach(m, parser=parser, verdict=programs.pass_())
        a.update(0, lst)
        a.update(1, lst)
        b.update(0, lst)
        assert sorted(a.keys()) == [0, 1]
        assert list(b.keys()) == [0]
