"""Splice TCP connection pairs through a sockmap, with the two traps of the kernel handled.

- Bytes queued before insertion: after a socket joins the map it is kicked
  (``SO_RCVLOWAT``) so the kernel parses and redirects what was already queued.
- FIN is not forwarded by sockmap: a watcher thread sees EPOLLRDHUP on a source
  and shuts the target's write side only once every byte the source received has
  been written into the target (``target bytes_acked + SIOCOUTQ >= source
  bytes_received - 1``, the FIN counting one), so nothing is truncated.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypedDict, Union, Unpack

from sockmap import asm, programs
from sockmap._closeable import Closeable
from sockmap.datapath.tcp import IdleWatch, kick, tcp_counters
from sockmap.errors import BpfError, SockmapError, bpf_error, errno_name
from sockmap.kernel.engine import KernelEngine
from sockmap.programs.outcomes import count_programs

__all__ = ["KernelSplicer", "SplicePair", "SpliceStats", "Splicer", "cookie_of", "fin_ready"]

log = logging.getLogger(__name__)
SO_COOKIE = 57
Mode = Literal["strparser", "verdict"]
_WATCH = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


if TYPE_CHECKING:
    from sockmap.userspace.engine import UserspaceEngine

SpliceEngine = Union["KernelEngine", "UserspaceEngine"]
"""Either engine: both have the same sockmap/hash/attach calls."""


class SpliceOptions(TypedDict, total=False):
    """Keyword options every splicer takes (see :class:`Splicer`)."""

    fin_timeout: float
    poll_interval: float
    parser: asm.Program | None
    idle_timeout: float


def cookie_of(sock: socket.socket) -> int:
    """The kernel's socket cookie (what a value_size-8 sockmap lookup returns)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def fin_ready(source: socket.socket, target: socket.socket) -> bool:
    """True once everything ``source`` received (FIN aside) has been written into ``target``."""
    src, dst = tcp_counters(source), tcp_counters(target)
    return dst.written >= src.consumed - 1


_FIN_RECEIVED_STATES = {8, 9, 11, 6}  # CLOSE_WAIT, LAST_ACK, CLOSING, TIME_WAIT
_TCP_CLOSE = 7


def _taken(sock: socket.socket) -> int | None:
    """Bytes taken off ``sock``'s receive queue so far, its FIN aside (None: not TCP)."""
    try:
        c = tcp_counters(sock)
    except OSError:
        return None
    return c.consumed - (1 if c.state in _FIN_RECEIVED_STATES else 0)


def _progress(sock: socket.socket) -> tuple[int, int] | None:
    """What has gone into ``sock`` and been acknowledged by its peer (None: unknown)."""
    try:
        c = tcp_counters(sock)
    except OSError:
        return None
    return c.bytes_acked, c.written


def _fin_received(sock: socket.socket) -> bool:
    try:
        return tcp_counters(sock).state in _FIN_RECEIVED_STATES
    except OSError:
        return False


@dataclass
class SpliceStats:
    """Counters of a splicer, for ``sockmap demo`` and tests."""

    pairs_opened: int = 0
    pairs_closed: int = 0
    fins_forwarded: int = 0
    fins_forced: int = 0
    resets: int = 0
    late_epipes: int = 0
    idle_closed: int = 0


@dataclass(eq=False)
class SplicePair:
    """Two connected sockets whose streams the kernel redirects into each other."""

    a: socket.socket
    b: socket.socket
    key_a: int
    key_b: int
    eof: set[int] = field(default_factory=set)
    """Fds whose peer has half-closed (EPOLLRDHUP seen)."""
    shut: set[int] = field(default_factory=set)
    """Fds whose write side we shut after forwarding a FIN to them."""
    eof_since: dict[int, float] = field(default_factory=dict)
    """When each half-close was seen, or its FIN last made progress (see fin_timeout)."""
    fin_progress: dict[int, tuple[int, int]] = field(default_factory=dict)
    """The target's (bytes acked, bytes written) when a waiting FIN last made progress."""
    done: threading.Event = field(default_factory=threading.Event)
    closing: bool = False

    def waiting_fin(self) -> bool:
        """A source has half-closed and its FIN has not been passed on yet."""
        return any(self.other(fd).fileno() not in self.shut for fd in self.eof)

    def other(self, fd: int) -> socket.socket:
        return self.b if fd == self.a.fileno() else self.a

    def bytes_moved(self) -> tuple[int, int]:
        """(a→b, b→a) bytes consumed from each source so far, a FIN not counted (0 once
        closed)."""

        def moved(sock: socket.socket) -> int:
            c = tcp_counters(sock)  # bytes_received counts a FIN as one
            fin = sock.fileno() in self.eof or c.state in _FIN_RECEIVED_STATES
            return c.consumed - (1 if fin else 0)

        try:
            return moved(self.a), moved(self.b)
        except OSError:
            return 0, 0


class Splicer(Closeable):
    """Splices pairs through one socket map of either engine; a thread propagates close.

    Subclasses say how half-closes and errors are seen (:meth:`_poll`) and when a
    FIN may follow the last byte (:meth:`_fin_ready`).
    """

    def __init__(
        self,
        engine: SpliceEngine,
        max_pairs: int = 1024,
        mode: Mode = "strparser",
        *,
        fin_timeout: float = 10.0,
        poll_interval: float = 0.001,
        parser: asm.Program | None = None,
        idle_timeout: float = 0.0,
    ) -> None:
        """``idle_timeout`` (seconds, 0: none): a pair whose first socket moved no byte
        either way that long is closed."""
        self.engine = engine
        self.mode = mode
        self.fin_timeout = fin_timeout
        self.poll_interval = poll_interval
        self.sockmap = engine.sockmap(2 * max_pairs, name="splice")
        if mode == "strparser":
            parser = parser or programs.whole_segment()
        elif parser is not None:
            raise ValueError("a parser needs mode='strparser'")
        # Each engine takes its own maps; these came from the same engine.
        verdict = self._verdict(max_pairs)
        parser, counted, self.program_counters = count_programs(engine, parser, verdict)
        self.attachment = engine.attach(self.sockmap, parser=parser, verdict=counted)  # type: ignore[arg-type]
        self.stats = SpliceStats()
        self._idle = IdleWatch(idle_timeout)
        self.last_error = 0
        self._free = list(range(max_pairs - 1, -1, -1))
        self._by_fd: dict[int, SplicePair] = {}
        self._pairs: set[SplicePair] = set()
        self._closing: set[SplicePair] = set()
        """Pairs with a half-close seen, until they are closed."""
        self.on_close: list[Callable[[SplicePair], None]] = []
        """Called with each pair as it closes, before its sockets are."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sockmap-splice", daemon=True)

    # -- public -------------------------------------------------------------
    def splice(self, a: socket.socket, b: socket.socket) -> SplicePair:
        """Redirect a's incoming bytes out of b and b's out of a, until both sides close.

        The splicer owns both sockets from here on and closes them when done.
        """
        with self._lock:
            if not self._free:
                raise bpf_error(errno.E2BIG, "splice", "every pair slot is in use; raise max_pairs")
            slot = self._free.pop()
            if not self._thread.is_alive() and not self._stop.is_set():
                self._thread.start()
        pair = SplicePair(a, b, 2 * slot, 2 * slot + 1)
        with self._lock:
            # Known before the sockets join the map: the userspace engine reports an EOF
            # or an error once, as an event, the moment it reads it; one that came before
            # the pair was known was dropped, and its FIN never passed on.
            self._pairs.add(pair)
            self._by_fd[a.fileno()] = pair
            self._by_fd[b.fileno()] = pair
        taken = _taken(a)
        try:
            self._register(pair)
            # Between the two inserts a message from a would meet an empty key and be
            # dropped; the userspace engine can hold its datapath still meanwhile. (The
            # kernel cannot; there the window is two bpf() calls, and bytes queued before
            # insertion wait for the kick below, after both are in.)
            with self.engine.batch():
                self.sockmap[pair.key_a] = a
                try:
                    self.sockmap[pair.key_b] = b
                except BaseException:
                    # a leaves again while the datapath is still held (userspace engine):
                    # none of its bytes is taken, so the caller may still relay the pair
                    with contextlib.suppress(SockmapError, OSError):
                        del self.sockmap[pair.key_a]
                    raise
        except BaseException as exc:
            with self._lock:
                self._pairs.discard(pair)
            self._forget(pair)
            if taken is not None and isinstance(exc, OSError) and _taken(a) != taken:
                # The datapath took bytes of a (the kernel's verdict ran on them between
                # the inserts; with b not in the map it dropped them): relaying the pair
                # now would lose them silently, its peer seeing a clean end.
                raise bpf_error(
                    errno.ECONNABORTED,
                    f"splice: {exc}; bytes of the first socket were taken before the second "
                    "could join",
                    "reset both connections: the stream cannot be delivered whole",
                ) from exc
            raise
        with self._lock:
            self.stats.pairs_opened += 1
        self._watch(pair)
        return pair

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        """Stop the watcher and close every spliced socket; the engine keeps its maps."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close_pair(pair)
        with contextlib.suppress(BpfError):
            self.attachment.detach()

    # -- what subclasses provide ----------------------------------------------
    def _verdict(self, max_pairs: int) -> asm.Program:
        """The verdict to attach (its maps made here): redirect to the peer by cookie."""
        self.peers = self.engine.hash(2 * max_pairs, key_size=8, value_size=4, name="splice_peers")
        return programs.redirect_peer(self.sockmap, self.peers)

    def _register(self, pair: SplicePair) -> None:
        """Tell the verdict about a pair, before its sockets join the map."""
        self.peers[cookie_of(pair.a)] = pair.key_b
        self.peers[cookie_of(pair.b)] = pair.key_a

    def _unregister(self, sock: socket.socket, key: int) -> None:
        """Undo :meth:`_register` for one socket (still open)."""
        with contextlib.suppress(SockmapError, OSError):
            del self.peers[cookie_of(sock)]

    def _tick(self) -> bool:
        """Periodic work of the watcher; True while it wants to run again soon."""
        return False

    def _watch(self, pair: SplicePair) -> None:
        """Start watching a new pair for half-closes and errors."""

    def _unwatch(self, sock: socket.socket) -> None:
        """Stop watching one socket."""

    def _poll(self, timeout: float) -> list[tuple[int, int]]:
        """Wait up to ``timeout``; return (fd, errno) pairs: errno 0 for a half-close."""
        raise NotImplementedError

    def _fin_ready(self, source: socket.socket, target: socket.socket) -> bool:
        raise NotImplementedError

    def _dead(self, sock: socket.socket) -> bool:
        """True when ``sock`` can take no more bytes (reset or fully closed)."""
        del sock
        return False

    # -- watcher --------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self._tick()
            with self._lock:
                pending = busy or any(p.waiting_fin() for p in self._closing)
            try:
                events = self._poll(self.poll_interval if pending else 0.05)
            except OSError:
                return
            # The pairs the events are about, as they are now: handling one event may
            # close a pair, and its fd numbers may belong to a new pair (the proxy
            # accepts meanwhile) before a later event of the same batch, about the old
            # sockets, is handled.
            with self._lock:
                found = [(fd, err, self._by_fd.get(fd)) for fd, err in events]
            for fd, err, pair in found:
                if pair is None or pair.closing:
                    continue
                if err:
                    # A reset (or another hard error): pass it on as a reset.
                    self.stats.resets += 1
                    self.last_error = err
                    log.warning("socket fd %d failed (%s): resetting its pair", fd, errno_name(err))
                    self._close_pair(pair, abort=True)
                    continue
                # The peer half-closed: forward its FIN when safe.
                pair.eof.add(fd)
                pair.eof_since[fd] = time.monotonic()
                with self._lock:
                    self._closing.add(pair)
            self._forward_fins()
            self._close_idle()

    def _close_idle(self) -> None:
        now = time.monotonic()
        if not self._idle.due(now):
            return
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            try:
                idle = not pair.closing and self._idle.idle(pair.a, now)
            except OSError:
                continue
            if idle:
                self.stats.idle_closed += 1
                log.info("pair idle for %.0fs: closed", self._idle.timeout)
                self._close_pair(pair)

    def _forward_fins(self) -> None:
        """Forward the FINs that are due; only pairs with a half-close seen are looked at,
        so idle connections cost nothing here."""
        with self._lock:
            pairs = list(self._closing)
        now = time.monotonic()
        for pair in pairs:
            for src_fd in list(pair.eof):
                target = pair.other(src_fd)
                source = pair.a if target is pair.b else pair.b
                if target.fileno() in pair.shut:
                    if source.fileno() not in pair.shut and self._dead(source):
                        # Reset after its FIN was passed on (the bytes sent to it met a
                        # closed peer): the target must get the reset, not keep a clean
                        # EOF after truncated data. The engine may not report it: the
                        # userspace engine reads a source no more after its EOF.
                        self.stats.resets += 1
                        log.warning(
                            "socket fd %d was reset after its FIN: resetting its pair", src_fd
                        )
                        self._close_pair(pair, abort=True)
                        break
                    continue
                try:
                    ready = self._fin_ready(source, target)
                except OSError:
                    ready = True
                if not ready and self._dead(target):
                    # The target was reset after its peer's FIN (epoll reported the FIN
                    # first): what the source still sent can never arrive, so the pair
                    # is reset, never closed cleanly after truncated data.
                    self.stats.resets += 1
                    log.warning(
                        "socket fd %d was reset with bytes still due: resetting its pair",
                        target.fileno(),
                    )
                    self._close_pair(pair, abort=True)
                    break
                if not ready:
                    # fin_timeout counts from the last progress toward the target's peer,
                    # not from the EOF: a slow reader still taking a long backlog after
                    # its peer's FIN would otherwise get a forced FIN before the rest of
                    # it (a clean EOF ~ a send queue short, seen in the fault soak).
                    mark = _progress(target)
                    if mark is not None and mark != pair.fin_progress.get(src_fd):
                        pair.fin_progress[src_fd] = mark
                        pair.eof_since[src_fd] = now
                forced = not ready and now - pair.eof_since[src_fd] > self.fin_timeout
                if ready or forced:
                    with contextlib.suppress(OSError):
                        target.shutdown(socket.SHUT_WR)
                    pair.shut.add(target.fileno())
                    if forced:
                        self.stats.fins_forced += 1
                        log.warning("forced FIN after %.1fs without progress", self.fin_timeout)
                    else:
                        self.stats.fins_forwarded += 1
            if len(pair.shut) == 2:
                self._close_pair(pair)

    def _close_pair(self, pair: SplicePair, abort: bool = False) -> None:
        with self._lock:
            self._closing.discard(pair)
            if pair not in self._pairs or pair.closing:
                return
            pair.closing = True
        for hook in self.on_close:
            try:
                hook(pair)  # the sockets are still open: counters can be read
            except Exception:
                log.exception("a splice close hook failed")
        with self._lock:
            self._pairs.discard(pair)  # `active` drops only once the hooks have run
        if abort:
            linger = struct.pack("ii", 1, 0)  # close() then sends RST
            for s in (pair.a, pair.b):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        for s in (pair.a, pair.b):
            self._unwatch(s)
        self._idle.forget(pair.a)
        self._forget(pair)
        for s in (pair.a, pair.b):
            s.close()  # closing removes the socket from the sockmap
        self.stats.pairs_closed += 1
        pair.done.set()

    def _forget(self, pair: SplicePair) -> None:
        with self._lock:
            for s, key in ((pair.a, pair.key_a), (pair.b, pair.key_b)):
                if s.fileno() >= 0:
                    self._by_fd.pop(s.fileno(), None)
                    self._unregister(s, key)
                    with contextlib.suppress(SockmapError, OSError):
                        del self.sockmap[key]  # before close: no fd reuse can meet the entry
            self._free.append(pair.key_a // 2)


class KernelSplicer(Splicer):
    """Splices through the kernel sockmap: kicks queued bytes, watches EPOLLRDHUP, and forwards
    a FIN by the TCP counters."""

    def __init__(
        self,
        engine: KernelEngine,
        max_pairs: int = 1024,
        mode: Mode = "strparser",
        **kw: Unpack[SpliceOptions],
    ) -> None:
        self._epoll = select.epoll()
        super().__init__(engine, max_pairs, mode, **kw)

    _interest = _WATCH
    """What epoll watches on a spliced socket."""

    def _watch(self, pair: SplicePair) -> None:
        # Bytes that arrived before insertion would sit there until more data came.
        kick(pair.a)
        kick(pair.b)
        for sock in (pair.a, pair.b):
            try:
                self._epoll.register(sock.fileno(), self._interest)
            except (OSError, ValueError):
                # Once a is watched, the watcher may see its reset (the bytes already
                # went through the kernel) and close the pair before b is registered.
                if sock.fileno() == -1:
                    return
                raise

    def _unwatch(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(sock.fileno())

    def _fin_ready(self, source: socket.socket, target: socket.socket) -> bool:
        return fin_ready(source, target)

    def _dead(self, sock: socket.socket) -> bool:
        try:
            return tcp_counters(sock).state == _TCP_CLOSE
        except OSError:
            return True

    def _poll(self, timeout: float) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for fd, mask in self._epoll.poll(timeout):
            with self._lock:
                pair = self._by_fd.get(fd)
            if pair is None:
                continue
            if mask & select.EPOLLERR:
                sock = pair.a if fd == pair.a.fileno() else pair.b
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # clears it
                if err == errno.EPIPE and _fin_received(pair.other(fd)):
                    # Verdict-only mode hands the source's FIN to the verdict as an
                    # empty message; redirecting it reports EPIPE on the target, after
                    # every byte before the FIN was sent. Benign: the FIN rule goes on.
                    self.stats.late_epipes += 1
                    continue
                out.append((fd, err or errno.EIO))
                continue
            if self._event(fd, mask, pair):
                out.append((fd, 0))
        return out

    def _event(self, fd: int, mask: int, pair: SplicePair) -> bool:
        """A non-error epoll event on ``fd``; True when it reports a half-close."""
        del mask, pair
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)  # seen once is enough
        return True

    def close(self) -> None:
        super().close()
        self._epoll.close()
