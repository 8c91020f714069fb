"""The userspace datapath: one :class:`Psock` per socket in a map, and the rules between them.

Mirrors the kernel's psock: a socket's incoming bytes go through the strparser
(when a parser is attached) or are taken a chunk at a time (verdict-only), the
verdict passes, drops or redirects each message, and redirected messages are
queued whole on the target's egress (send path) or ingress (receive queue).

Where the kernel drops because a target is full, this applies backpressure: a
source stops reading while a target it feeds is above the high-water mark and
starts again below the low-water mark. Nothing here blocks; the driver calls
:meth:`Datapath.on_readable` / :meth:`Datapath.on_writable` and obeys
:class:`Interest` changes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sockmap.abi import BPF_F_INGRESS, SkAction
from sockmap.errors import StreamError, errno_name
from sockmap.userspace.maps import INTERNAL_FDS, SockRef, fds_of_inodes
from sockmap.userspace.strparser import NEED_DATA, StrParser
from sockmap.vm import MsgContext, SkbContext
from sockmap.vm.api import VmMap

__all__ = ["Datapath", "Event", "Programs", "Psock", "PsockStats", "Runner"]

Runner = Callable[[SkbContext, "RedirectEnv"], int]
MsgRunner = Callable[[MsgContext, "RedirectEnv"], int]
"""A parser or verdict: eBPF through the VM, or a plain Python callable."""

SO_COOKIE = 57
RECV_SIZE = 256 * 1024
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_MAX_IOV = 64


class SocketLookup(Protocol):
    """What the datapath needs of a socket map: the socket under a key."""

    def lookup_socket(self, key: bytes) -> socket.socket | None: ...


@dataclass
class Programs:
    """The programs a socket took when it joined a map (attach first, then insert)."""

    verdict: Runner | None
    parser: Runner | None = None
    parser_prefix: int | None = None
    """Bytes of a message the parser needs (None: all)."""
    verdict_prefix: int | None = None
    """Bytes of a message the verdict needs (None: all)."""
    origin: object = None
    """The map these came from (a socket joins only one map with programs)."""
    msg_verdict: MsgRunner | None = None
    """The SK_MSG verdict, run by :meth:`Datapath.send_msg` (``engine.send``)."""


@dataclass
class PsockStats:
    """Per-socket outcome counters."""

    bytes_in: int = 0
    msgs: int = 0
    passed: int = 0
    dropped: int = 0
    redirected: int = 0
    redirect_ingress: int = 0
    bytes_out: int = 0
    tx_dropped_bytes: int = 0
    partial_sends: int = 0
    """Sends the kernel took only part of (the rest waited for writability)."""
    paused: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """Something the application may want to know: eof, error, closed."""

    kind: str
    sock: socket.socket
    err: int = 0

    def __str__(self) -> str:
        name = f" {errno_name(self.err)}" if self.err else ""
        return f"{self.kind}{name} on fd {self.sock.fileno()}"


def addr_fields(sock: socket.socket) -> dict[str, object]:
    """``__sk_buff`` socket fields from the socket's own addresses (kernel conventions)."""
    fields: dict[str, object] = {"family": sock.family}
    try:
        local, remote = sock.getsockname(), sock.getpeername()
    except OSError:
        return fields
    if sock.family == socket.AF_INET:
        fields["local_ip4"] = struct.unpack("<I", socket.inet_aton(local[0]))[0]
        fields["remote_ip4"] = struct.unpack("<I", socket.inet_aton(remote[0]))[0]
    elif sock.family == socket.AF_INET6:
        fields["local_ip6"] = struct.unpack("<4I", socket.inet_pton(socket.AF_INET6, local[0]))
        fields["remote_ip6"] = struct.unpack("<4I", socket.inet_pton(socket.AF_INET6, remote[0]))
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        fields["local_port"] = local[1]  # host byte order, as the kernel gives it
        # network byte order, in the upper 16 bits of the u32 (as the kernel shows it)
        fields["remote_port"] = socket.htons(remote[1]) << 16
    return fields


class Psock:
    """The datapath state of one socket in one or more maps."""

    def __init__(self, sock: socket.socket, ref: SockRef) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ino = ref.ino
        self.ref = ref
        """The maps' record of the socket: it follows the socket to a dup when the fd it was
        inserted with closes, and holds the kernel-like program slots."""
        # Our own handle on the socket for I/O: a Python socket with a timeout would wait
        # inside recv/send (blocking the driver), and changing the app's socket mode is not
        # ours to do. The dup also means a reused fd number can never receive our bytes.
        self.io = socket.socket(fileno=os.dup(self.fd))
        self.io_fd = self.io.fileno()
        INTERNAL_FDS.add(self.io_fd)
        """The fd the driver watches (ours, so it stays valid until we drop the psock)."""
        self.cookie = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
        self.listener = sock.type == socket.SOCK_STREAM and _is_listening(sock)
        self.memberships = 0
        self.progs: Programs | None = None
        self.strp: StrParser | None = None
        self.ctx_fields = addr_fields(sock)
        self.msg_fields = {k: v for k, v in self.ctx_fields.items() if k in _MSG_FIELDS}
        """The ``sk_msg_md`` subset of ``ctx_fields``."""
        # receive side
        self.reading = False
        self.eof = False
        self.rx_error = 0
        self.blocked_on: set[Psock] = set()
        # send side
        self.txq: deque[memoryview] = deque()
        self.tx_bytes = 0
        self.tx_error = 0
        self.waiters: set[Psock] = set()
        self.ingress: deque[bytes] = deque()
        self.ingress_bytes = 0
        self.stats = PsockStats()
        # SK_MSG state (what the kernel keeps in the psock between sends)
        self.msg_progs: Programs | None = None
        self.msg_eval: int | None = None
        """The verdict being applied (None: run the program on the next bytes)."""
        self.msg_apply = 0
        self.msg_target: Psock | None = None
        self.msg_ingress = False
        self.msg_cork = bytearray()
        self.msg_cork_need = 0
        self.msg_runs = 0

    @property
    def queued(self) -> int:
        """Bytes waiting on this socket: egress not yet sent plus ingress not yet read."""
        return self.tx_bytes + self.ingress_bytes

    def fd_open(self) -> bool:
        """The fd the socket is known by still names it (one ``fstat``, no dup search)."""
        return self.ref.own_fd_open()

    def alive(self) -> bool:
        """False once the application closed the socket: every fd of it in this process (a
        dup keeps it open, as in the kernel; the engine's own I/O handle does not count)."""
        return self.ref.alive()

    def __repr__(self) -> str:
        return f"<Psock fd={self.fd} cookie={self.cookie} queued={self.queued}>"


def _rcvbuf(sock: socket.socket) -> Callable[[], int]:
    """The socket's current receive buffer: the kernel's message limit (it grows with tuning)."""
    return lambda: int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def _is_listening(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


class RedirectEnv:
    """The helper environment of one verdict run (``sockmap.vm.api.HelperEnv``)."""

    __slots__ = ("_dp", "_src", "ingress", "target")

    def __init__(self, dp: Datapath, src: Psock) -> None:
        self._dp = dp
        self._src = src
        self.target: Psock | None = None
        self.ingress = False

    def redirect(self, smap: VmMap | SocketLookup, key: bytes | int, flags: int) -> int:
        if flags & ~BPF_F_INGRESS:
            return SkAction.DROP
        if isinstance(key, int):
            key = key.to_bytes(getattr(smap, "key_size", 4), "little")
        held = getattr(smap, "held_socket", None)
        sock = held(key) if held is not None else None
        target = self._dp._by_fd.get(sock.fileno()) if sock is not None else None
        if target is None or target.sock is not sock:
            # Not the psock made from the very object the map holds: look it up with
            # the liveness checks (an fd closed and reused by another socket fails them).
            lookup = getattr(smap, "lookup_socket", None)
            sock = lookup(key) if lookup is not None else None
            target = self._dp.psock_of(sock) if sock is not None else None
        if target is None or target.listener:
            return SkAction.DROP
        self.target = target
        self.ingress = bool(flags & BPF_F_INGRESS)
        return SkAction.PASS

    def socket_cookie(self) -> int:
        return self._src.cookie

    def ktime_ns(self) -> int:
        return time.monotonic_ns()

    def prandom_u32(self) -> int:
        return random.getrandbits(32)

    def apply_bytes(self, n: int) -> None:  # SK_MSG only; kept for the protocol
        del n

    def cork_bytes(self, n: int) -> None:
        del n

    def sock_update(self, smap: object, key: bytes, flags: int) -> int:  # SOCK_OPS only
        del smap, key, flags
        return -errno.EOPNOTSUPP


class MsgEnv(RedirectEnv):
    """The helper environment of one SK_MSG verdict run: redirect, apply and cork."""

    __slots__ = ("apply", "cork")

    def __init__(self, dp: Datapath, src: Psock) -> None:
        super().__init__(dp, src)
        self.apply = 0
        self.cork = 0

    def apply_bytes(self, n: int) -> None:
        self.apply = n & 0xFFFFFFFF

    def cork_bytes(self, n: int) -> None:
        self.cork = n & 0xFFFFFFFF


_MSG_FIELDS = frozenset(
    {"family", "remote_ip4", "local_ip4", "remote_ip6", "local_ip6", "remote_port", "local_port"}
)


@dataclass
class Interest:
    """What the driver should watch for one fd."""

    read: bool = False
    write: bool = False


@dataclass
class Datapath:
    """All psocks of one engine and the message path between them. Not thread-safe by itself:
    the driver serialises calls."""

    high_water: int = 1 << 20
    low_water: int = 256 << 10
    max_msg_size: int | None = None
    """Parser message limit; None means the socket's SO_RCVBUF, as in the kernel."""
    on_interest: Callable[[Psock, Interest], None] = lambda p, i: None
    on_event: Callable[[Event], None] = lambda e: None
    psocks: dict[int, Psock] = field(default_factory=dict)
    """By cookie."""

    def __post_init__(self) -> None:
        self._buf = bytearray(RECV_SIZE)
        self._batching = False
        self._dirty: dict[int, Psock] = {}
        self._by_fd: dict[int, Psock] = {}
        self._by_ino: dict[int, Psock] = {}
        self._reap_cursor = 0
        self._msg_timers: dict[Psock, tuple[int, float]] = {}
        """Psocks assembling a message under a receive timeout: (messages seen, deadline)."""

    # -- membership ----------------------------------------------------------
    def psock_of(self, sock: socket.socket) -> Psock | None:
        """The live psock of ``sock`` (a socket object the map holds, or any fd of the socket)."""
        fd = sock.fileno()
        p = self._by_fd.get(fd)
        if p is not None and p.sock is sock:
            return p
        if fd < 0:
            return None
        try:
            return self._by_ino.get(os.fstat(fd).st_ino)
        except OSError:
            return None

    def psock_of_ref(self, ref: SockRef) -> Psock | None:
        """The psock made for the socket ``ref`` stands for, if any."""
        p = self._by_ino.get(ref.ino)
        return p if p is not None and p.ref is ref else None

    def join(self, sock: socket.socket, progs: Programs | None, ref: SockRef) -> Psock:
        """A socket entered a map (with that map's programs, if any)."""
        p = self._by_ino.get(ref.ino)
        if p is not None and p.ref is not ref:
            self._drop_psock(p)  # a psock of a closed socket whose inode number came back
            p = None
        if p is None:
            p = Psock(sock, ref)
            self._by_fd[p.fd] = p
            self._by_ino[p.ino] = p
            self.psocks[p.cookie] = p
        else:
            self._follow(p)
        p.memberships += 1
        self.link(p, progs)
        return p

    def link(self, p: Psock, progs: Programs | None) -> None:
        """``p`` takes a map's programs: the SK_MSG verdict, and the parser and verdict,
        which it starts running unless it runs others already."""
        if progs is not None and progs.msg_verdict is not None and p.msg_progs is None:
            p.msg_progs = progs
        if progs is not None and progs.verdict is not None and p.progs is None:
            p.progs = progs
            if progs.parser is not None:
                parser = progs.parser
                fields = p.ctx_fields

                def parse(prefix: memoryview, available: int) -> int:
                    ctx = SkbContext(data=prefix, len=available, **fields)  # type: ignore[arg-type]
                    return _signed(parser(ctx, RedirectEnv(self, p)))

                p.strp = StrParser(parse, self.max_msg_size or _rcvbuf(p.io), progs.parser_prefix)
            self._set_reading(p, True)
            # Bytes that arrived before insertion are processed at once (the kernel
            # needs a kick for that; here the first read takes them).

    def stop(self, p: Psock) -> None:
        """``p`` stops running its parser and verdict (it left a map with programs and is
        still in others, as the kernel's ``sock_map_del_link`` does); SK_MSG stays."""
        if p.progs is None:
            return
        p.progs = None
        p.strp = None
        self._msg_timers.pop(p, None)
        self._set_reading(p, False)
        self.on_interest(p, Interest(read=False, write=bool(p.txq)))

    def leave(self, p: Psock, *, closed: bool = False) -> bool:
        """``p``'s socket left a map; on its last membership (or once closed) the psock goes
        away. True when it went."""
        p.memberships -= 1
        if p.memberships > 0 and not closed:
            return False
        self._drop_psock(p)
        return True

    def drop(self, p: Psock) -> None:
        """``p``'s socket closed: its psock goes (nothing to do if it went already)."""
        if self._by_ino.get(p.ino) is p:
            self._drop_psock(p)

    def _follow(self, p: Psock) -> None:
        """The maps found the socket under another fd (a dup): the psock is known by it too."""
        ref = p.ref
        if ref.fd == p.fd or not ref.own_fd_open():
            return
        if self._by_fd.get(p.fd) is p:
            del self._by_fd[p.fd]
        p.fd = ref.fd
        with contextlib.suppress(OSError):
            p.sock = ref.socket()
        self._by_fd[p.fd] = p

    def _drop_psock(self, p: Psock) -> None:
        self._msg_timers.pop(p, None)
        if self._by_fd.get(p.fd) is p:
            del self._by_fd[p.fd]
        if self._by_ino.get(p.ino) is p:
            del self._by_ino[p.ino]
        self.psocks.pop(p.cookie, None)
        self._set_reading(p, False)
        self.on_interest(p, Interest())
        INTERNAL_FDS.discard(p.io_fd)
        p.io.close()  # the app's own fd decides when the socket really closes
        for src in list(p.waiters):
            src.blocked_on.discard(p)
            self._maybe_resume(src)
        for tgt in p.blocked_on:
            tgt.waiters.discard(p)

    def close(self) -> None:
        """Drop every psock (the engine is closing)."""
        for p in list(self._by_ino.values()):
            self._drop_psock(p)

    def expire_messages(self, now: float) -> None:
        """Abort, with ETIMEDOUT, the stream of every socket whose partial message has been
        incomplete for longer than its SO_RCVTIMEO (the kernel strparser's message timer)."""
        for p, (_, deadline) in list(self._msg_timers.items()):
            if now < deadline:
                continue
            del self._msg_timers[p]
            if p.strp is not None and p.strp.buffered and not p.rx_error:
                p.strp.error = errno.ETIMEDOUT
                self._rx_failed(p, errno.ETIMEDOUT)

    def _arm_message_timer(self, p: Psock) -> None:
        """Time the message being assembled, like the kernel: from its first bytes (the
        timeout read then from SO_RCVTIMEO; none when unset) until it is whole."""
        strp = p.strp
        assert strp is not None
        if not strp.buffered:
            self._msg_timers.pop(p, None)
            return
        timer = self._msg_timers.get(p)
        if timer is not None and timer[0] == strp.stats.msgs:
            return  # the same message is still being assembled
        sec, usec = struct.unpack("ll", p.io.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
        if sec == 0 and usec == 0:
            self._msg_timers.pop(p, None)
            return
        self._msg_timers[p] = (strp.stats.msgs, time.monotonic() + sec + usec / 1e6)

    def reap_closed(self, batch: int = 256) -> list[Psock]:
        """Psocks whose socket the application has closed (the engine removes them from maps).

        Each call looks at up to ``batch`` psocks, taking turns, so a driver that calls
        it every 50 ms costs the same with 10 sockets or 10,000 (a close is then seen
        within ``50 ms * sockets / batch``). A psock whose own fd still names its socket
        costs one ``fstat``; those whose fd closed share one pass over ``/proc/self/fd``
        looking for a dup that keeps the socket open (the kernel keeps it in its maps).
        """
        psocks = list(self._by_ino.values())
        if len(psocks) <= batch:
            window = psocks
        else:
            start = self._reap_cursor % len(psocks)
            self._reap_cursor = start + batch
            window = psocks[start : start + batch] + psocks[: max(0, start + batch - len(psocks))]
        suspects = []
        for p in window:
            if not p.fd_open():
                suspects.append(p)
            elif p.ref.fd != p.fd:
                self._follow(p)  # a map operation found the socket under a dup first
        if not suspects:
            return []
        dups = fds_of_inodes({p.ino for p in suspects if not p.ref.dead})
        closed = []
        for p in suspects:
            if p.ref.follow(dups.get(p.ino)):
                self._follow(p)
            else:
                closed.append(p)
        return closed

    # -- receive path -----------------------------------------------------------
    def _set_reading(self, p: Psock, on: bool) -> None:
        on = on and p.progs is not None and not p.eof and not p.rx_error
        if p.reading != on:
            p.reading = on
            self.on_interest(p, Interest(read=on, write=bool(p.txq)))

    def on_readable(self, p: Psock, budget: int = 16) -> None:
        """Read what the socket has (up to ``budget`` reads) and run it through the programs.

        Egress redirected while one read's messages are handled is sent once they all
        are: one ``sendmsg`` per target and read, not one per message.
        """
        self._batching = True
        try:
            self._read_batch(p, budget)
        finally:
            self._batching = False
            self._flush_dirty()

    def _flush_dirty(self) -> None:
        dirty = self._dirty
        while dirty:
            target = dirty.popitem()[1]
            if target.txq:
                self._flush(target)

    def _read_batch(self, p: Psock, budget: int) -> None:
        buf = self._buf
        for _ in range(budget):
            if self._dirty:
                self._flush_dirty()  # the previous read's messages go out before the next read
            if not p.reading or p.blocked_on:
                return
            size = len(buf) if p.strp is None else min(len(buf), p.strp.max_msg_size)
            try:
                n = p.io.recv_into(buf, size, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._rx_failed(p, e.errno or errno.EIO)
                return
            if n == 0:
                p.eof = True
                self._set_reading(p, False)
                self.on_event(Event("eof", p.sock))
                return
            p.stats.bytes_in += n
            chunk = bytes(memoryview(buf)[:n])
            if p.strp is None:
                self._verdict(p, chunk)
                continue
            p.strp.feed(chunk)
            try:
                while (msg := p.strp.next_message()) is not NEED_DATA:
                    assert isinstance(msg, bytes)
                    self._verdict(p, msg)
            except StreamError as e:
                self._rx_failed(p, e.errno or errno.EPROTO)
                return
            self._arm_message_timer(p)

    def _rx_failed(self, p: Psock, err: int) -> None:
        p.rx_error = err
        self._set_reading(p, False)
        self.on_event(Event("error", p.sock, err))

    def _verdict(self, p: Psock, msg: bytes) -> None:
        progs = p.progs
        assert progs is not None
        assert progs.verdict is not None
        p.stats.msgs += 1
        env = RedirectEnv(self, p)
        prefix = msg if progs.verdict_prefix is None else msg[: progs.verdict_prefix]
        ctx = SkbContext(data=prefix, len=len(msg), **p.ctx_fields)  # type: ignore[arg-type]
        if p.strp is not None:
            ctx.strp_full_len = len(msg)
        verdict = progs.verdict(ctx, env) & 0xFFFFFFFF  # the kernel reads r0 as u32
        if ctx.data is not prefix:  # the verdict wrote into the packet: its bytes go on
            msg = bytes(ctx.data) + msg[len(prefix) :]
        if verdict != SkAction.PASS:  # SK_DROP and every unknown value drop
            p.stats.dropped += 1
            return
        target = env.target
        if target is None:
            p.stats.passed += 1
            self._deliver_ingress(p, p, msg)
            return
        p.stats.redirected += 1
        if env.ingress:
            p.stats.redirect_ingress += 1
            self._deliver_ingress(p, target, msg)
        else:
            self._deliver_egress(p, target, msg)

    # -- delivery ---------------------------------------------------------------
    def _deliver_ingress(self, src: Psock, target: Psock, msg: bytes) -> None:
        target.ingress.append(msg)
        target.ingress_bytes += len(msg)
        self._apply_backpressure(src, target)
        self.on_event(Event("readable", target.sock))

    def _deliver_egress(self, src: Psock, target: Psock, msg: bytes) -> None:
        if target.tx_error:
            target.stats.tx_dropped_bytes += len(msg)
            src.stats.dropped += 1
            return
        had_queue = bool(target.txq)
        target.txq.append(memoryview(msg))
        target.tx_bytes += len(msg)
        if not had_queue:
            if self._batching:
                self._dirty[id(target)] = target  # sent when this read's messages are done
            else:
                self._flush(target)
        self._apply_backpressure(src, target)

    def _apply_backpressure(self, src: Psock, target: Psock) -> None:
        """Pause ``src`` while ``target`` (perhaps itself, for pass) holds too much."""
        if target.queued > self.high_water and target not in src.blocked_on:
            src.blocked_on.add(target)
            target.waiters.add(src)
            src.stats.paused += 1
            self.on_interest(src, Interest(read=False, write=bool(src.txq)))

    def _maybe_resume(self, src: Psock) -> None:
        if not src.blocked_on and src.reading:
            self.on_interest(src, Interest(read=True, write=bool(src.txq)))

    def _drained(self, target: Psock) -> None:
        if target.queued <= self.low_water:
            for src in list(target.waiters):
                target.waiters.discard(src)
                src.blocked_on.discard(target)
                self._maybe_resume(src)

    # -- send path --------------------------------------------------------------
    def on_writable(self, p: Psock) -> None:
        self._flush(p)

    def _flush(self, p: Psock) -> None:
        txq = p.txq
        while txq:
            bufs = [txq[i] for i in range(min(len(txq), _MAX_IOV))]
            try:
                sent = p.io.sendmsg(bufs, [], _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._tx_failed(p, e.errno or errno.EPIPE)
                return
            if sent < sum(len(x) for x in bufs):
                p.stats.partial_sends += 1
            p.tx_bytes -= sent
            p.stats.bytes_out += sent
            while sent:
                head = txq[0]
                if len(head) <= sent:
                    sent -= len(head)
                    txq.popleft()
                else:
                    txq[0] = head[sent:]
                    sent = 0
        self.on_interest(p, Interest(read=p.reading and not p.blocked_on, write=bool(txq)))
        self._drained(p)

    def _tx_failed(self, p: Psock, err: int) -> None:
        """A hard send error: mark the socket, stop its transmit side, drop what waits, report."""
        p.tx_error = err
        p.stats.tx_dropped_bytes += p.tx_bytes
        p.txq.clear()
        p.tx_bytes = 0
        self.on_interest(p, Interest(read=p.reading and not p.blocked_on, write=False))
        self.on_event(Event("error", p.sock, err))
        self._drained(p)

    # -- SK_MSG: the application's sends -----------------------------------------
    def send_msg(self, p: Psock, data: bytes) -> int:
        """Run ``p``'s SK_MSG verdict over one send, as the kernel's ``tcp_bpf_sendmsg``
        does; returns the bytes taken, or raises ``OSError(EACCES)`` when the verdict drops
        them.

        The verdict covers the whole send, or ``apply_bytes`` bytes of it (then runs again
        on the rest; a budget left over carries into the next send). ``cork_bytes(n)``
        holds the bytes until ``n`` have gathered, then runs the verdict on them all. A
        drop sticks: later sends are refused without running the verdict again.
        """
        progs = p.msg_progs
        assert progs is not None
        assert progs.msg_verdict is not None
        if p.msg_cork_need:
            p.msg_cork += data
            if len(p.msg_cork) < p.msg_cork_need:
                return len(data)
            buf, p.msg_cork, p.msg_cork_need = bytes(p.msg_cork), bytearray(), 0
        else:
            buf = bytes(data)
        pos = 0
        taken_before = len(buf) - len(data)  # corked bytes of earlier sends
        while pos < len(buf):
            if p.msg_eval is None:
                env = MsgEnv(self, p)
                rest = buf[pos:]
                ctx = MsgContext(data=rest, size=len(rest), **p.msg_fields)  # type: ignore[arg-type]
                p.msg_runs += 1
                verdict = progs.msg_verdict(ctx, env) & 0xFFFFFFFF
                if ctx.data is not rest:  # the verdict wrote into the message
                    buf = buf[:pos] + bytes(ctx.data)
                if env.cork and env.cork > len(rest):
                    p.msg_cork += rest
                    p.msg_cork_need = env.cork
                    return len(data)
                p.msg_apply = env.apply
                if verdict != SkAction.PASS:
                    p.msg_eval = SkAction.DROP
                else:
                    p.msg_eval = SkAction.PASS
                    p.msg_target, p.msg_ingress = env.target, env.ingress
            n = len(buf) - pos if not p.msg_apply else min(p.msg_apply, len(buf) - pos)
            if p.msg_eval == SkAction.DROP:
                if p.msg_apply:
                    p.msg_apply = max(0, p.msg_apply - n)
                p.stats.dropped += 1
                done = max(0, pos - taken_before)
                if done:
                    return done
                raise OSError(errno.EACCES, "the sk_msg verdict dropped the message")
            chunk = buf[pos : pos + n]
            target = p.msg_target
            if target is None:
                p.stats.passed += 1
                self._deliver_egress(p, p, chunk)
            elif p.msg_ingress:
                p.stats.redirect_ingress += 1
                self._deliver_ingress(p, target, chunk)
            else:
                p.stats.redirected += 1
                self._deliver_egress(p, target, chunk)
            pos += n
            if p.msg_apply:
                p.msg_apply -= n
                if p.msg_apply:
                    continue
            p.msg_eval, p.msg_target = None, None
        return len(data)

    # -- the application's side of pass / ingress --------------------------------
    def read_ingress(self, p: Psock, n: int) -> bytes:
        """Up to ``n`` bytes of what verdicts passed or redirected to ``p``'s receive side."""
        out = bytearray()
        while p.ingress and len(out) < n:
            head = p.ingress[0]
            take = min(n - len(out), len(head))
            out += head[:take]
            if take == len(head):
                p.ingress.popleft()
            else:
                p.ingress[0] = head[take:]
        p.ingress_bytes -= len(out)
        self._drained(p)
        return bytes(out)


def _signed(value: int) -> int:
    """r0 as the kernel's ``int`` return of parse_msg: its low 32 bits, signed."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value
