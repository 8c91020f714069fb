"""Balance messages from clients across backends through a sockmap, on either engine.

Each client gets a *group*: the client socket and one connection to each backend.
The :func:`~sockmap.programs.balance.balance` verdict sends every message a client
sends to one of its group's backend connections (by policy), and every message a
backend connection receives back to that client. Responses are routed by connection,
so no protocol field is rewritten; messages are redirected whole (strparser mode), so
responses from several backends never interleave on the client.

Close rules (a watcher thread, like the splicer's):

- the client half-closes: once every byte it sent has entered the backend
  connections, their write sides are shut (the backends answer what is in flight
  and close);
- a backend connection closes or fails: it leaves the map at once, so the client's
  further messages go to the other backends; requests in flight to it get no answer
  (the client's own retry covers them, as it would for a direct connection);
- no backend connection left: once every response has entered the client, its write
  side is shut; the group closes when the client has half-closed too;
- the client fails (a reset, or a framing error such as EMSGSIZE/EBADMSG from the
  parser): the whole group is closed, the client with a reset.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sockmap import asm
from sockmap._closeable import Closeable
from sockmap.datapath.splice import SpliceEngine, cookie_of
from sockmap.datapath.tcp import IdleWatch, inq, kick, tcp_counters
from sockmap.errors import SockmapError, bpf_error, errno_name
from sockmap.programs.balance import (
    COUNTER_SIZE,
    Policy,
    backend_role,
    balance,
    client_role,
)
from sockmap.programs.outcomes import count_programs
from sockmap.userspace.psock import Event
from sockmap.userspace.splice import drain

__all__ = ["BalanceCounters", "BalanceStats", "Balancer", "Group"]

log = logging.getLogger(__name__)
_WATCH = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_COUNTER = struct.Struct("<QQ")
PARSER_ERRORS = frozenset({errno.EMSGSIZE, errno.EBADMSG})


@dataclass(eq=False)
class Group:
    """A client and its connections to the backends (None where a backend is gone)."""

    client: socket.socket
    base: int
    backends: list[socket.socket | None]
    client_eof: bool = False
    backends_shut: bool = False
    client_shut: bool = False
    eof_since: float = 0.0
    sent_retired: int = 0
    """Bytes written into backend connections that have closed since (kernel accounting)."""
    received_retired: int = 0
    """Bytes taken from backend connections that have closed since (kernel accounting)."""
    done: threading.Event = field(default_factory=threading.Event)
    closing: bool = False

    def key_of(self, index: int) -> int:
        return self.base + 1 + index

    def open_backends(self) -> list[tuple[int, socket.socket]]:
        return [(j, s) for j, s in enumerate(self.backends) if s is not None]


@dataclass
class BalanceStats:
    groups_opened: int = 0
    groups_closed: int = 0
    backend_closes: int = 0
    """Backend connections that closed or failed while their client was still open."""
    resets: int = 0
    parser_errors: int = 0
    message_timeouts: int = 0
    """Clients reset because a message stayed incomplete past ``message_timeout``."""
    idle_closed: int = 0
    fins_forced: int = 0


@dataclass(frozen=True)
class BalanceCounters:
    """What the verdict counted: per backend index, (messages, bytes) each way."""

    requests: list[tuple[int, int]]
    responses: list[tuple[int, int]]
    dropped: tuple[int, int]


class Balancer(Closeable):
    """Balances the messages of client groups through one socket map of either engine."""

    def __init__(
        self,
        engine: SpliceEngine,
        parser: asm.Program,
        policy: Policy | None = None,
        *,
        max_clients: int = 1024,
        max_backends: int = 8,
        routes: dict[int, int] | None = None,
        fin_timeout: float = 10.0,
        poll_interval: float = 0.002,
        message_timeout: float = 0.0,
        idle_timeout: float = 0.0,
    ) -> None:
        """``message_timeout`` (seconds, 0: none): a client message still incomplete that
        long after its first bytes resets the client (the strparser's timer, armed by the
        client socket's SO_RCVTIMEO, in either engine). ``idle_timeout`` (0: none): a
        client whose connection moved no byte either way that long is closed."""
        from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415

        self.engine = engine
        self.kernel = isinstance(engine, KernelEngine)
        self.policy = policy = policy or Policy()
        self.max_backends = max_backends
        self.fin_timeout = fin_timeout
        self.poll_interval = poll_interval
        self.message_timeout = message_timeout
        self._idle = IdleWatch(idle_timeout)
        self.stride = 1 + max_backends
        n = max_clients * self.stride
        self.sockmap = engine.sockmap(n, name="balance")
        self.roles = engine.hash(n, key_size=8, value_size=8, name="balance_roles")
        self.counters = engine.array(
            2 * max_backends + 1, value_size=COUNTER_SIZE, name="balance_count"
        )
        extra: dict[str, Any] = {}
        if policy.kind == "round-robin":
            extra["counter"] = self.counter = engine.array(1, name="balance_rr")
        if policy.kind == "field":
            self.table = engine.hash(1024, key_size=8, value_size=4, name="balance_routes")
            for value, index in (routes or {}).items():
                self.table[value] = index
            extra["table"] = self.table
        verdict = balance(
            self.sockmap, self.roles, self.counters, policy, max_backends=max_backends, **extra
        )
        counted_parser, counted, self.program_counters = count_programs(engine, parser, verdict)
        self.attachment = engine.attach(
            self.sockmap,  # type: ignore[arg-type]
            parser=counted_parser,
            verdict=counted,
        )
        self.stats = BalanceStats()
        self.on_close: list[Callable[[Group], None]] = []
        """Called with each group as it closes, before its sockets are."""
        self._free = list(range(max_clients - 1, -1, -1))
        self._groups: set[Group] = set()
        self._closing: set[Group] = set()
        self._by_fd: dict[int, Group] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._epoll = select.epoll() if self.kernel else None
        self._events: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        if not self.kernel:
            engine.on_event(self._on_event)  # type: ignore[union-attr]
        self._thread = threading.Thread(target=self._run, name="sockmap-balance", daemon=True)

    # -- public ---------------------------------------------------------------
    def add(self, client: socket.socket, backends: list[socket.socket | None]) -> Group:
        """Balance ``client``'s messages over ``backends`` (index = backend index; None for
        one that could not be reached). The balancer owns every socket from here on."""
        if not any(s is not None for s in backends):
            raise ValueError("a client needs at least one backend connection")
        if len(backends) > self.max_backends:
            raise ValueError(f"{len(backends)} backends: this balancer takes {self.max_backends}")
        with self._lock:
            if not self._free:
                raise bpf_error(errno.E2BIG, "balance", "every client slot is in use")
            slot = self._free.pop()
            if not self._thread.is_alive() and not self._stop.is_set():
                self._thread.start()
        group = Group(client, slot * self.stride, list(backends))
        if self.message_timeout > 0:
            sec = int(self.message_timeout)
            usec = int((self.message_timeout - sec) * 1e6)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, usec))
        with self._lock:
            # Known before the sockets join the map: the userspace engine reports an EOF or
            # an error once, as an event, the moment it reads it; one that came before the
            # group was known was dropped, and the group never closed.
            self._groups.add(group)
            for s in (client, *(s for _, s in group.open_backends())):
                self._by_fd[s.fileno()] = group
        try:
            for j, s in group.open_backends():
                self.roles[cookie_of(s)] = backend_role(group.base, j)
            self.roles[cookie_of(client)] = client_role(group.base, len(backends))
            # Backends first: a client message must find them in the map.
            with self.engine.batch():
                for j, s in group.open_backends():
                    self.sockmap[group.key_of(j)] = s
                self.sockmap[group.base] = client
        except BaseException:
            with self._lock:
                self._groups.discard(group)
            self._forget(group)
            with contextlib.suppress(OSError):  # the caller may read it itself
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bytes(16))
            raise
        with self._lock:
            self.stats.groups_opened += 1
        for s in (client, *(s for _, s in group.open_backends())):
            self._watch(s)
        return group

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._groups)

    def read_counters(self) -> BalanceCounters:
        def one(i: int) -> tuple[int, int]:
            m, b = _COUNTER.unpack(self.counters.lookup(i))
            return int(m), int(b)

        n = self.max_backends
        return BalanceCounters(
            [one(2 * j) for j in range(n)], [one(2 * j + 1) for j in range(n)], one(2 * n)
        )

    def close(self) -> None:
        """Stop the watcher and close every group's sockets; the engine keeps its maps."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._lock:
            groups = list(self._groups)
        for g in groups:
            self._close_group(g)
        with contextlib.suppress(SockmapError, OSError):
            self.attachment.detach()
        if self._epoll is not None:
            self._epoll.close()

    # -- engine-specific signals ---------------------------------------------
    def _on_event(self, ev: Event) -> None:
        if ev.kind in ("eof", "error"):
            self._events.put((ev.sock.fileno(), ev.err))

    def _watch(self, sock: socket.socket) -> None:
        if self._epoll is not None:
            try:
                kick(sock)  # bytes queued before insertion
                self._epoll.register(sock.fileno(), _WATCH)
            except (OSError, ValueError):
                # The group's sockets are watched one by one: the watcher may have seen
                # the client's close and closed the group before this one's turn.
                if sock.fileno() != -1:
                    raise

    def _unwatch(self, sock: socket.socket) -> None:
        if self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(sock.fileno())

    def _poll(self, timeout: float) -> list[tuple[int, int]]:
        if self._epoll is None:
            return drain(self._events, timeout)
        out2: list[tuple[int, int]] = []
        for fd, mask in self._epoll.poll(timeout):
            err = 0
            if mask & select.EPOLLERR:
                with self._lock:
                    g = self._by_fd.get(fd)
                sock = _sock_of(g, fd) if g is not None else None
                if sock is not None:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.EIO
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)  # seen once is enough
            out2.append((fd, err))
        return out2

    def _written(self, socks: list[socket.socket]) -> int:
        return sum(tcp_counters(s).written for s in socks)

    def _sent_all(self, g: Group) -> bool:
        """Every byte the client sent has entered its backend connections."""
        socks = [s for _, s in g.open_backends()]
        if not self.kernel:
            return all(self.engine.pending_bytes(s) == 0 for s in socks)  # type: ignore[union-attr]
        return self._written(socks) + g.sent_retired >= tcp_counters(g.client).consumed - 1

    def _answered_all(self, g: Group) -> bool:
        """Every response taken from the (now closed) backend connections entered the client."""
        if not self.kernel:
            return self.engine.pending_bytes(g.client) == 0  # type: ignore[union-attr]
        return tcp_counters(g.client).written >= g.received_retired

    def _backend_drained(self, s: socket.socket) -> bool:
        """The parser has taken everything the backend connection received."""
        return not self.kernel or inq(s) == 0

    # -- watcher --------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                pending = bool(self._closing)
            try:
                events = self._poll(self.poll_interval if pending else 0.05)
            except OSError:
                return
            for fd, err in events:
                with self._lock:
                    g = self._by_fd.get(fd)
                if g is None or g.closing:
                    continue
                if fd == g.client.fileno():
                    if err:
                        self._client_failed(g, err)
                    else:
                        g.client_eof = True
                        g.eof_since = time.monotonic()
                        with self._lock:
                            self._closing.add(g)
                    continue
                j = next(j for j, s in g.open_backends() if s.fileno() == fd)
                self._backend_gone(g, j, err)
            self._progress()
            self._close_idle()

    def _close_idle(self) -> None:
        now = time.monotonic()
        if not self._idle.due(now):
            return
        with self._lock:
            groups = list(self._groups)
        for g in groups:
            try:
                idle = not g.closing and self._idle.idle(g.client, now)
            except OSError:
                continue
            if idle:
                self.stats.idle_closed += 1
                log.info("client fd %d idle for %.0fs: closed", fd_of(g), self._idle.timeout)
                self._close_group(g)

    def _client_failed(self, g: Group, err: int) -> None:
        if err in PARSER_ERRORS:
            self.stats.parser_errors += 1
            log.warning("client fd %d sent a bad message (%s): closed", fd_of(g), errno_name(err))
        elif err == errno.ETIMEDOUT and self.message_timeout > 0:
            self.stats.message_timeouts += 1
            log.warning(
                "client fd %d left a message incomplete for %.1fs: closed",
                fd_of(g),
                self.message_timeout,
            )
        else:
            self.stats.resets += 1
            log.info("client fd %d failed (%s): closing its group", fd_of(g), errno_name(err))
        self._close_group(g, abort=True)

    def _backend_gone(self, g: Group, j: int, err: int) -> None:
        s = g.backends[j]
        assert s is not None
        deadline = time.monotonic() + 1.0
        while not err and not self._backend_drained(s) and time.monotonic() < deadline:
            time.sleep(0.001)  # let the parser take its last responses
        with contextlib.suppress(SockmapError, OSError):
            del self.sockmap[g.key_of(j)]  # further messages go to the other backends
        if self.kernel:
            with contextlib.suppress(OSError):
                c = tcp_counters(s)
                g.sent_retired += c.written
                # A FIN counts one in bytes_received. A reset may or may not have come
                # after one (a peer that shuts down, then closes with unread data), and
                # nothing shows which: count one either way. Responses are redirected as
                # whole messages of several bytes, so this byte of slack lets the client's
                # FIN overtake only a message sent but for its very last byte.
                g.received_retired += max(0, c.consumed - 1)
        if not g.client_eof:
            self.stats.backend_closes += 1
            log.info(
                "backend %d closed its connection for client fd %d (%s)",
                j,
                fd_of(g),
                errno_name(err) if err else "FIN",
            )
        with self._lock:
            self._by_fd.pop(s.fileno(), None)
        self._unwatch(s)
        with contextlib.suppress(SockmapError, OSError):
            del self.roles[cookie_of(s)]
        g.backends[j] = None
        s.close()
        with self._lock:
            self._closing.add(g)

    def _progress(self) -> None:
        with self._lock:
            groups = list(self._closing)
        now = time.monotonic()
        for g in groups:
            if g.closing:
                continue
            try:
                forced = g.client_eof and now - g.eof_since > self.fin_timeout
                if g.client_eof and not g.backends_shut and (self._sent_all(g) or forced):
                    for _, s in g.open_backends():
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_WR)
                    g.backends_shut = True
                idle = not g.open_backends() and not g.client_shut
                if idle and (self._answered_all(g) or forced):
                    with contextlib.suppress(OSError):
                        g.client.shutdown(socket.SHUT_WR)
                    g.client_shut = True
            except OSError:
                forced = True
            if forced:
                self.stats.fins_forced += 1
                log.warning("group of client fd %d closed after %.1fs", fd_of(g), self.fin_timeout)
            if (g.client_eof and g.client_shut) or forced:
                self._close_group(g)

    def _close_group(self, g: Group, abort: bool = False) -> None:
        with self._lock:
            self._closing.discard(g)
            if g not in self._groups or g.closing:
                return
            g.closing = True
        for hook in self.on_close:
            try:
                hook(g)
            except Exception:
                log.exception("a balance close hook failed")
        with self._lock:
            self._groups.discard(g)
        socks = [g.client, *(s for _, s in g.open_backends())]
        if abort:
            linger = struct.pack("ii", 1, 0)  # close() then sends RST
            for s in socks:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        for s in socks:
            self._unwatch(s)
        self._idle.forget(g.client)
        self._forget(g)
        for s in socks:
            s.close()
        self.stats.groups_closed += 1
        g.done.set()

    def _forget(self, g: Group) -> None:
        with self._lock:
            for key, s in ((g.base, g.client), *((g.key_of(j), s) for j, s in g.open_backends())):
                if s.fileno() < 0:
                    continue
                self._by_fd.pop(s.fileno(), None)
                with contextlib.suppress(SockmapError, OSError):
                    del self.roles[cookie_of(s)]
                with contextlib.suppress(SockmapError, OSError):
                    del self.sockmap[key]
            self._free.append(g.base // self.stride)


def fd_of(g: Group) -> int:
    return g.client.fileno()


def _sock_of(g: Group, fd: int) -> socket.socket | None:
    if g.client.fileno() == fd:
        return g.client
    return next((s for _, s in g.open_backends() if s.fileno() == fd), None)
