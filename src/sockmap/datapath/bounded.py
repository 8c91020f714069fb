"""A kernel splicer that loses nothing and keeps what the kernel holds per connection bounded.

The raw redirect path has no backpressure: with the reader stalled, the kernel queues
whatever the sender sends. Here the verdict (:func:`sockmap.programs.bounded_redirect`)
sees each target's backlog (redirect queue + send queue) from the target's
``tcp_sock`` and, past ``bound``, holds the source by passing its messages to the
source's own receive queue. Passed bytes are charged to the source's receive memory,
whose ``SO_RCVBUF`` is clamped, so TCP flow control slows the sender and nothing is
dropped.

This control plane then finishes the job, and is idle while nothing is held:

1. EPOLLIN on a source means the verdict passed something: the source is held.
2. The control plane pauses the target (every source of it is held from then on)
   and waits until the target's redirect queue is empty (``inflow`` equals what has
   entered the target), so it is the target's only writer.
3. It reads the held bytes -- never more than the verdict counted as passed, so it
   cannot take bytes the verdict has not seen -- and writes them into the target,
   keeping the backlog within the bound.
4. When a source's passed bytes are all written it releases the source (the verdict
   resumes redirecting at the next message boundary, only if nothing was passed in
   between) and un-pauses the target.

FIN, reset and error handling are :class:`~sockmap.datapath.splice.KernelSplicer`'s;
a FIN is forwarded only once the held bytes are written too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
from dataclasses import dataclass, field
from typing import Unpack

from sockmap import asm, programs
from sockmap.abi.internals import internals
from sockmap.datapath.splice import (
    _WATCH,
    KernelSplicer,
    Mode,
    SpliceOptions,
    SplicePair,
    cookie_of,
    fin_ready,
)
from sockmap.datapath.tcp import inq, kick, tcp_counters
from sockmap.errors import BpfError, SockmapError, errno_name
from sockmap.kernel.engine import KernelEngine
from sockmap.kernel.maps import ArrayMap
from sockmap.programs.bounded import CONTROL, ROUTE, STATS, Stats, zero_stats

__all__ = ["Backlog", "BoundedSplicer"]

log = logging.getLogger(__name__)
_CHUNK = 256 << 10


@dataclass
class _End:
    """Control-plane state of one socket, as a source and as a target."""

    sock: socket.socket
    key: int
    target: _End | None = None
    # as a source
    held: bool = False
    """Passed bytes are waiting to be moved (EPOLLIN seen, not released yet)."""
    read: int = 0
    """Bytes the control plane has read from this socket (all of them passed)."""
    pending: bytearray = field(default_factory=bytearray)
    """Read, not yet written into the target."""
    trimmed: int = 0
    """Trims done: repeated bytes dropped from what the verdict passed (published)."""
    # as a target
    user_written: int = 0
    """Bytes written into this socket other than by the kernel's redirect (published)."""
    paused: bool = False
    resumed: int = 0
    release: int = 0

    def publish(self, control: ArrayMap) -> None:
        pause = 1 if self.paused else 0
        control[self.key] = CONTROL.pack(
            self.release, self.user_written, pause, self.resumed, self.trimmed
        )


@dataclass(frozen=True)
class Backlog:
    """What one direction of a pair holds at one instant (bytes)."""

    queued: int
    """In the kernel for the target: redirect queue + send queue (the verdict's bound)."""
    source_queue: int
    """In the source's receive queue: passed by the verdict, not read yet."""
    user: int
    """Read by the control plane, not yet written into the target."""

    @property
    def total(self) -> int:
        return self.queued + self.source_queue + self.user


class BoundedSplicer(KernelSplicer):
    """A :class:`KernelSplicer` whose kernel memory per direction stays within ``bound``.

    ``bound`` (default 4 MiB) covers, per direction, the target's redirect and send
    queues plus the source's receive queue: the verdict keeps the first two within
    ``bound - 2 * rcvbuf`` and the source's ``SO_RCVBUF`` is clamped to ``rcvbuf``
    (the kernel doubles it for overhead). A held source is served once the target's
    queue is below a quarter of that, so the kernel, not Python, moves most bytes.
    """

    def __init__(
        self,
        engine: KernelEngine,
        max_pairs: int = 1024,
        mode: Mode = "verdict",
        *,
        bound: int = 4 << 20,
        rcvbuf: int = 256 << 10,
        **kw: Unpack[SpliceOptions],
    ) -> None:
        if bound <= 2 * rcvbuf:
            raise ValueError(f"bound {bound} must exceed twice rcvbuf ({2 * rcvbuf} bytes)")
        if mode == "strparser" and internals().strparser_pass_miscounted:
            raise BpfError(
                errno.EOPNOTSUPP,
                "the bounded splicer cannot hold a source in strparser mode on this kernel: "
                "its strparser read path (tcp_bpf_strp_read_sock, Linux 6.14+) miscounts "
                "bytes passed to the socket itself and the socket stops delivering "
                "(docs/semantics.md); use mode='verdict'",
            )
        self.bound = bound
        self.rcvbuf = rcvbuf
        self.kengine = engine
        self.queue_bound = bound - 2 * rcvbuf
        self.low_mark = self.queue_bound // 4
        self._ends: dict[int, _End] = {}  # by fd
        self._held: dict[int, _End] = {}  # held sources, by fd
        self.holds = 0
        self.late_holds = 0
        """Holds found only when a FIN was due (no EPOLLIN after the source's FIN)."""
        self.releases = 0
        self.user_bytes = 0
        self._buf = bytearray(_CHUNK)
        self.trims = 0
        super().__init__(engine, max_pairs, mode, **kw)

    # -- programs and registration -------------------------------------------
    def _verdict(self, max_pairs: int) -> asm.Program:
        n = 2 * max_pairs
        self.routes = self.kengine.hash(n, key_size=8, value_size=ROUTE.size, name="bd_routes")
        self.bstats = self.kengine.array(n, value_size=STATS.size, name="bd_stats")
        self.control = self.kengine.array(n, value_size=CONTROL.size, name="bd_control")
        return programs.bounded_redirect(
            self.sockmap,
            self.routes,
            self.bstats,
            self.control,
            bound=self.queue_bound,
            mode=self.mode,
        )

    def _register(self, pair: SplicePair) -> None:
        a, b = _End(pair.a, pair.key_a), _End(pair.b, pair.key_b)
        a.target, b.target = b, a
        for end, target in ((a, b), (b, a)):
            # The splicer owns the sockets: its reads and writes must never wait (a
            # Python timeout would make them poll first, then raise TimeoutError).
            end.sock.setblocking(False)
            end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            # What the application wrote before the splice counts as written by us:
            # the verdict's backlog is then exact from the first byte.
            end.user_written = tcp_counters(end.sock).written
            self.bstats[end.key] = zero_stats()
            end.publish(self.control)
            self.routes[cookie_of(end.sock)] = ROUTE.pack(end.key, target.key)
        with self._lock:
            self._ends[a.sock.fileno()] = a
            self._ends[b.sock.fileno()] = b

    def _unregister(self, sock: socket.socket, key: int) -> None:
        with contextlib.suppress(SockmapError, OSError):
            del self.routes[cookie_of(sock)]
        self._ends.pop(sock.fileno(), None)
        self._held.pop(sock.fileno(), None)

    _interest = _WATCH | select.EPOLLIN  # EPOLLIN: the verdict passed (held) something

    # -- events ----------------------------------------------------------------
    def _event(self, fd: int, mask: int, pair: SplicePair) -> bool:
        with self._lock:
            end = self._ends.get(fd)
        if end is None:
            return False
        if mask & select.EPOLLIN and not end.held:
            self._hold(end)  # the verdict passed bytes: held until we move them
        hup = bool(mask & (select.EPOLLRDHUP | select.EPOLLHUP))
        news = hup and fd not in pair.eof
        self._rearm(end, eof=hup or fd in pair.eof)
        return news

    def _hold(self, end: _End) -> None:
        end.held = True
        with self._lock:
            self._held[end.sock.fileno()] = end
        self.holds += 1

    def _rearm(self, end: _End, *, eof: bool) -> None:
        """Level-triggered epoll: watch only what is still news for this socket (after a
        FIN it stays readable for good, and a held source is already being served)."""
        interest = select.EPOLLERR
        if not eof:
            interest |= _WATCH
            if not end.held:
                interest |= select.EPOLLIN
        with contextlib.suppress(OSError, ValueError):
            self._epoll.modify(end.sock.fileno(), interest)

    def _tick(self) -> bool:
        """Move held bytes; True while some source is still held."""
        with self._lock:
            held = list(self._held.values())
        for src in held:
            try:
                self._move(src)
            except OSError as exc:
                # A hard error on either socket. The failed call took it (SO_ERROR is
                # cleared), so epoll no longer reports EPOLLERR, only the hang-up, which
                # would pass for a FIN: a reset would reach the peer as a clean end after
                # truncated data. Reset the pair here.
                err = exc.errno or errno.EIO
                with self._lock:
                    pair = self._by_fd.get(src.sock.fileno())
                if pair is None:
                    continue
                self.stats.resets += 1
                self.last_error = err
                log.warning("moving held bytes failed (%s): resetting the pair", errno_name(err))
                self._close_pair(pair, abort=True)
        return bool(self._held)

    def _move(self, src: _End) -> None:
        dst = src.target
        assert dst is not None
        st = Stats.read(self.bstats, src.key)
        if st.overlaps > st.trims:
            self._overlapped(src)  # a repeat the verdict could not turn into a trim
            return
        if not dst.paused:
            verdict_held, passed = st.held, st.passed
            if not verdict_held and passed == src.read:
                # Readable, but nothing passed: bytes that came before the socket joined
                # the map (the kick hands them to the verdict). Pausing the target here
                # would hold every source of it for nothing.
                self._unhold(src)
                kick(src.sock)
                return
            dst.paused = True
            dst.publish(self.control)
        tst = Stats.read(self.bstats, dst.key)
        inflow, holds = tst.inflow, tst.holds
        counters = tcp_counters(dst.sock)
        if inflow != counters.written - dst.user_written:
            return  # the kernel still has redirected bytes on their way into dst
        queued = counters.written - counters.bytes_acked  # dst's send queue: nothing else left
        if queued > self.low_mark and not src.pending:
            return  # let the target drain first: the kernel then moves more before the next hold
        room = self.queue_bound - queued
        if src.pending:  # the rest of a partial write
            n = self._send(dst, src.pending, room)
            del src.pending[:n]
            if src.pending:
                return
            room -= n
        buf = self._buf
        passed = Stats.read(self.bstats, src.key).passed
        while room > 0:
            # One look per chunk: a sender that keeps sending keeps the verdict passing,
            # and what it passed meanwhile is taken too, or the release could never match.
            st = Stats.read(self.bstats, src.key)
            passed = st.passed
            owed = passed - src.read
            if owed <= 0:
                break
            # Never ask for more than the psock queue holds (SIOCINQ counts it on a
            # socket in a map): past it, recv falls back to the TCP queue and returns
            # bytes the verdict has not seen -- and then runs the verdict on them too,
            # so they would arrive twice.
            queued = inq(src.sock)
            if queued <= 0:
                return  # counted as passed, not queued yet: the next tick takes it
            want = min(owed, room, len(buf), queued)
            if st.trims != src.trimmed:  # repeated bytes to drop at skip_at
                if src.read == st.skip_at:
                    if queued < st.skip_len:
                        return  # the repeated bytes are not all queued yet
                    self._trim(src, st.skip_len)
                    continue
                want = min(want, st.skip_at - src.read)
            try:
                got = src.sock.recv_into(buf, want)
            except BlockingIOError:
                return  # counted as passed, not queued yet: the next tick takes it
            if not got:
                return
            src.read += got
            n = self._send(dst, memoryview(buf)[:got])
            room -= n
            if n < got:
                src.pending += buf[n:got]
                return
        if not src.pending and src.read == passed:
            self._release(src, dst, passed, holds)

    def _send(
        self, dst: _End, data: bytes | bytearray | memoryview, limit: int | None = None
    ) -> int:
        """Write up to ``limit`` bytes of ``data`` into ``dst``; how many went in."""
        if limit is not None:
            if limit <= 0:
                return 0
            data = data[:limit]
        try:
            n = dst.sock.send(data)
        except BlockingIOError:
            return 0
        dst.user_written += n
        self.user_bytes += n
        return n

    def _release(self, src: _End, dst: _End, passed: int, holds: int) -> None:
        """Every byte the verdict passed up to ``passed`` is in ``dst``: hand the source back
        to the kernel (from its next message on, if nothing more was passed) and resume
        ``dst``."""
        src.release = passed + 1
        src.publish(self.control)
        self.releases += 1
        dst.paused = False
        dst.resumed = holds
        dst.publish(self.control)
        self._unhold(src)

    def _trim(self, src: _End, n: int) -> None:
        """Drop ``n`` repeated bytes at the head of the source's passed bytes."""
        scratch = self._buf  # nothing is pending in it: partial writes are copied out
        left = n
        while left:
            got = src.sock.recv_into(scratch, min(left, len(scratch)))
            if not got:
                raise ConnectionError("the source closed inside repeated bytes")
            left -= got
        src.read += n
        src.trimmed += 1
        src.publish(self.control)
        self.trims += 1
        log.info("dropped %d bytes the kernel repeated on sockmap key %d", n, src.key)

    def _overlapped(self, src: _End) -> None:
        """The kernel handed the verdict a segment that partly repeats bytes it had seen:
        the stream can no longer be delivered exactly once, so the pair is reset."""
        with self._lock:
            pair = self._by_fd.get(src.sock.fileno())
        log.error(
            "the kernel repeated part of a segment on sockmap key %d: resetting its pair",
            src.key,
        )
        self.stats.resets += 1
        self.last_error = errno.EPROTO
        if pair is not None:
            self._close_pair(pair, abort=True)

    def repeats(self) -> int:
        """Segments the kernel handed a verdict twice, dropped by it (all open sockets)."""
        with self._lock:
            keys = [e.key for e in self._ends.values()]
        return sum(Stats.read(self.bstats, k).repeats for k in keys)

    def _unhold(self, src: _End) -> None:
        src.held = False
        with self._lock:
            self._held.pop(src.sock.fileno(), None)
            pair = self._by_fd.get(src.sock.fileno())
        self._rearm(src, eof=pair is None or src.sock.fileno() in pair.eof)

    # -- FIN -------------------------------------------------------------------
    def _fin_ready(self, source: socket.socket, target: socket.socket) -> bool:
        end = self._ends.get(source.fileno())
        if end is not None and (end.held or end.pending):
            return False
        if end is not None and Stats.read(self.bstats, end.key).passed > end.read:
            # Passed bytes nobody is moving: after the source's FIN epoll no longer
            # watches EPOLLIN (it stays readable for good), so a hold no EPOLLIN announced
            # (one that went on past a release that no longer matched, the FIN and the
            # last bytes in one segment) would be found by nobody. The FIN waits for them.
            self.late_holds += 1
            self._hold(end)
            return False
        try:
            return inq(source) == 0 and fin_ready(source, target)
        except ValueError:  # closed meanwhile
            return True

    # -- measurement -----------------------------------------------------------
    def held_bytes(self, source: socket.socket) -> int:
        """Everything the direction out of ``source`` holds now (see :class:`Backlog`)."""
        return self.backlog(source).total

    def backlog(self, source: socket.socket) -> Backlog:
        """What the direction out of ``source`` holds now (for tests and stats)."""
        src = self._ends[source.fileno()]
        dst = src.target
        assert dst is not None
        inflow = Stats.read(self.bstats, dst.key).inflow
        acked = tcp_counters(dst.sock).bytes_acked
        return Backlog(inflow + dst.user_written - acked, inq(source), len(src.pending))
