"""The userspace engine: the kernel engine's API, with the sockmap implemented in Python.

Maps, attach/detach and program loading look and fail exactly like the kernel
engine's; inserting a socket into a map with programs attached makes the engine's
driver take over reading it, as the kernel would. Programs are eBPF (run in the
VM) or plain Python callables ``f(ctx, env) -> int``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sockmap._closeable import Closeable
from sockmap.abi import ProgType
from sockmap.errors import bpf_error
from sockmap.kernel.programs import Encodable
from sockmap.userspace import maps as umaps
from sockmap.userspace.driver import AsyncioDriver, Driver, ThreadDriver
from sockmap.userspace.psock import (
    Datapath,
    Event,
    Interest,
    Programs,
    Psock,
    PsockStats,
    Runner,
    _is_listening,
    addr_fields,
)
from sockmap.vm import SockOpsContext, VmProgram
from sockmap.vm import load as vm_load
from sockmap.vm.env import RecordingEnv

__all__ = ["ManagedListener", "UserProgram", "UserspaceAttachment", "UserspaceEngine"]

_M = TypeVar("_M", bound=umaps.Map)


@dataclass
class UserProgram:
    """A program loaded into the userspace engine: VM bytecode or a Python callable."""

    name: str
    prog_type: ProgType
    run: Runner
    max_packet_offset: int | None = None
    vm: VmProgram | None = None

    def close(self) -> None:
        """Nothing to release; kept for parity with the kernel's ``Prog``."""


ProgLike = Encodable | bytes | Callable[..., int] | UserProgram


@dataclass
class UserspaceAttachment:
    """Programs attached to one userspace socket map."""

    map: umaps.SockMap
    parser: UserProgram | None
    verdict: UserProgram | None
    msg_verdict: UserProgram | None = None

    def programs(self) -> Programs:
        def prefix(p: UserProgram | None) -> int | None:
            return None if p is None or p.max_packet_offset is None else p.max_packet_offset + 1

        return Programs(
            verdict=self.verdict.run if self.verdict else None,
            parser=self.parser.run if self.parser else None,
            parser_prefix=prefix(self.parser),
            verdict_prefix=prefix(self.verdict),
            origin=self.map,
            msg_verdict=self.msg_verdict.run if self.msg_verdict else None,  # type: ignore[arg-type]
        )

    def detach(self) -> None:
        """Detach every program; sockets already in the map keep theirs until removed."""
        if getattr(self.map, "attachment", None) is self:
            self.map.attachment = None


ACTIVE_ESTABLISHED = 4
PASSIVE_ESTABLISHED = 5


class SockOpsEnv(RecordingEnv):
    """The helper environment of one sock_ops run: it can insert the event's socket."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def sock_update(self, smap: object, key: bytes, flags: int) -> int:
        update = getattr(smap, "update", None)
        if not isinstance(smap, umaps.SockMap) or update is None:
            return -errno.EINVAL
        try:
            update(key, self.sock, flags)
        except OSError as exc:
            return -(exc.errno or errno.EINVAL)
        return 0

    def socket_cookie(self) -> int:
        return int.from_bytes(self.sock.getsockopt(socket.SOL_SOCKET, 57, 8), "little")


class ManagedListener(Closeable):
    """A listening socket of the engine: :meth:`accept` runs the sock_ops programs."""

    def __init__(self, engine: UserspaceEngine, sock: socket.socket) -> None:
        self.engine = engine
        self.sock = sock

    def accept(self) -> tuple[socket.socket, object]:
        conn, peer = self.sock.accept()
        self.engine.established(conn, PASSIVE_ESTABLISHED)
        return conn, peer

    def getsockname(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]  # type: ignore[no-any-return]

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class UserspaceEngine(Closeable):
    """A sockmap in Python: same calls, same results, same errno as :class:`KernelEngine`."""

    name = "userspace"

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        high_water: int = 1 << 20,
        low_water: int = 256 << 10,
        max_msg_size: int | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._events: list[Event] = []
        self._listeners: list[Callable[[Event], None]] = []
        self.datapath = Datapath(
            high_water=high_water,
            low_water=low_water,
            max_msg_size=max_msg_size,
            on_interest=self._on_interest,
            on_event=self._on_event,
        )
        self._driver: Driver | None = None
        self._loop = loop
        self._maps: list[umaps.Map] = []
        self._sock_ops: list[UserProgram] = []
        self._closed = False

    # -- driver ------------------------------------------------------------------
    def _ensure_driver(self) -> Driver:
        if self._driver is None:
            if self._loop is not None:
                self._driver = AsyncioDriver(self.datapath, self._loop, self._reap)
            else:
                self._driver = ThreadDriver(self.datapath, self._lock, self._reap)
        return self._driver

    def _on_interest(self, p: Psock, want: Interest) -> None:
        if want.read or want.write or self._driver is not None:
            self._ensure_driver().interest(p, want)

    def _on_event(self, ev: Event) -> None:
        if ev.kind == "readable":
            return
        self._events.append(ev)
        del self._events[:-1024]  # bounded: keep the latest
        for cb in self._listeners:
            cb(ev)

    def batch(self) -> contextlib.AbstractContextManager[object]:
        """Hold the datapath still while several map updates happen as one step.

        A splice inserts two sockets; a message read between the two inserts would be
        redirected to a key that is still empty and dropped.
        """
        return self._lock

    def on_event(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback`` for every eof / error event (from the driver's thread)."""
        self._listeners.append(callback)

    @property
    def events(self) -> list[Event]:
        """The latest eof / error events."""
        return list(self._events)

    def _reap(self, closed: list[Psock]) -> None:
        """Sockets the application closed leave every map, as in the kernel."""
        for p in closed:
            for m in self._maps:
                if isinstance(m, umaps.SockMap):
                    m.remove_socket(p.ref if p.ref is not None else p.sock)
            self.datapath.drop(p)

    # -- maps -------------------------------------------------------------------
    def _own_map(self, m: _M) -> _M:
        if isinstance(m, umaps.SockMap):
            m.on_insert.append(self._inserted)
            m.on_remove.append(self._removed)
            m.before_insert.append(self._admit)
        self._maps.append(m)
        return m

    def sockmap(self, max_entries: int, *, value_size: int = 8, name: str = "") -> umaps.SockMap:
        return self._own_map(umaps.SockMap.new(max_entries, value_size=value_size, name=name))

    def sockhash(
        self,
        max_entries: int,
        *,
        key_size: int = 4,
        value_size: int = 8,
        name: str = "",
    ) -> umaps.SockHash:
        return self._own_map(
            umaps.SockHash.new(max_entries, key_size=key_size, value_size=value_size, name=name),
        )

    def array(self, max_entries: int, *, value_size: int = 8, name: str = "") -> umaps.ArrayMap:
        return self._own_map(umaps.ArrayMap.new(max_entries, value_size=value_size, name=name))

    def hash(
        self,
        max_entries: int,
        *,
        key_size: int = 4,
        value_size: int = 8,
        name: str = "",
    ) -> umaps.HashMap:
        return self._own_map(
            umaps.HashMap.new(max_entries, key_size=key_size, value_size=value_size, name=name),
        )

    def _admit(self, m: umaps.SockMap, key: bytes, ref: umaps.SockRef) -> None:
        """Link the socket to ``m`` as the kernel's ``sock_map_link`` does, before the key
        and flags are looked at: EBUSY when ``m`` has a program of a kind (stream parser;
        stream or skb verdict; msg verdict) that the socket holds already, from any map,
        ``m`` included. Else the socket takes ``m``'s programs, and keeps them if the update
        then fails while the socket is in another map (the kernel's psock outlives it)."""
        att = m.attachment
        if att is None or _is_listening(ref.socket()):
            return  # a listener never runs a map's programs (the kernel links it without)
        busy = (
            (att.msg_verdict is not None and ref.msg is not None)
            or (att.parser is not None and ref.parser is not None)
            or (att.verdict is not None and ref.verdict is not None)
        )
        if busy:
            raise bpf_error(
                errno.EBUSY,
                f"insert fd {ref.fd} into {m.kind} key {key.hex()}",
                "the socket already holds programs of this kind (from this map or another): "
                "delete it from that map first",
            )
        if att.msg_verdict is not None:
            ref.msg = m
        if att.parser is not None:
            ref.parser = m
        if att.verdict is not None:
            ref.verdict = m
        if att.parser is not None and not ref.tcp:
            return  # refused next (EOPNOTSUPP): the slots are filled, nothing starts
        if att.verdict is not None:
            ref.started = True
        with self._lock:
            p = self.datapath.psock_of_ref(ref)
            if p is not None:
                self.datapath.link(p, att.programs())

    def _inserted(self, m: umaps.SockMap, key: bytes, ref: umaps.SockRef) -> None:
        att = m.attachment
        sock = ref.socket()
        has = att is not None and (att.verdict is not None or att.msg_verdict is not None)
        progs = att.programs() if att is not None and has and not _is_listening(sock) else None
        with self._lock:
            self.datapath.join(sock, progs, ref)
        if progs is not None:
            self._ensure_driver().wake()

    def _removed(self, m: umaps.SockMap, key: bytes, ref: umaps.SockRef) -> None:
        att = m.attachment
        with self._lock:
            p = self.datapath.psock_of_ref(ref)
            if ref.links > 0 and ref.started and att is not None and not m.closed:
                # the kernel's sock_map_del_link: leaving a map that has a parser or a
                # verdict stops the socket's own (whichever map they came from) while it
                # stays in others; not when the map closes (its programs went first)
                if att.parser is not None:
                    ref.parser = None
                if att.verdict is not None:
                    ref.verdict = None
                if att.parser is not None or att.verdict is not None:
                    ref.started = False
                    if p is not None:
                        self.datapath.stop(p)
            if p is not None:
                self.datapath.leave(p)

    # -- programs ---------------------------------------------------------------
    def load(
        self,
        program: ProgLike,
        prog_type: ProgType = ProgType.SK_SKB,
        *,
        name: str | None = None,
    ) -> UserProgram:
        """Validate and prepare a program: eBPF for the VM, or a callable ``f(ctx, env)``."""
        if isinstance(program, UserProgram):
            return program
        if callable(program) and not hasattr(program, "encode"):
            pname = name or str(getattr(program, "__name__", "callable"))
            return UserProgram(pname, prog_type, program)  # called as fn(ctx, env) -> int
        vmp = vm_load(program, prog_type, name=name or getattr(program, "name", ""))  # type: ignore[arg-type]
        return UserProgram(vmp.name, prog_type, vmp.run, vmp.max_packet_offset, vmp)

    def attach(
        self,
        smap: umaps.SockMap,
        *,
        parser: ProgLike | None = None,
        verdict: ProgLike | None = None,
        msg_verdict: ProgLike | None = None,
    ) -> UserspaceAttachment:
        """Attach programs to ``smap``; parser+verdict is strparser mode, verdict alone is
        verdict-only mode. Attach before inserting sockets, as with the kernel."""
        if not isinstance(smap, umaps.SockMap):
            raise bpf_error(
                errno.EOPNOTSUPP,
                f"attach programs to {getattr(smap, 'kind', 'map')}",
                "programs attach only to a SOCKMAP or SOCKHASH",
            )
        p = self.load(parser) if parser is not None else None
        v = self.load(verdict) if verdict is not None else None
        mv = self.load(msg_verdict, ProgType.SK_MSG) if msg_verdict is not None else None
        old = smap.attachment
        if old is not None and (old.parser is None) != (p is None) and v is not None:
            raise bpf_error(
                errno.EBUSY,
                f"attach verdict to {smap.kind}",
                "a stream verdict and a verdict-only program cannot both be attached; "
                "detach it first",
            )
        att = UserspaceAttachment(smap, p, v, mv)
        smap.attachment = att
        smap.parser_attached = p is not None
        return att

    # -- the application's side ------------------------------------------------
    def recv(self, sock: socket.socket, n: int = 65536) -> bytes:
        """Read what verdicts passed (or redirected to ingress) for ``sock``.

        In the kernel this data sits in the socket's own receive queue; a Python
        engine cannot put it there, so it is read here. b"" means nothing yet.
        """
        with self._lock:
            p = self.datapath.psock_of(sock)
            if p is None:
                raise bpf_error(
                    errno.ENOENT,
                    f"read passed data of fd {sock.fileno()}",
                    "the socket is in no map of this engine",
                )
            data = self.datapath.read_ingress(p, n)
        if self._driver is not None:
            self._driver.wake()
        return data

    # -- sock_ops: connections the engine makes or accepts -------------------------
    def on_established(self, program: ProgLike) -> UserProgram:
        """The userspace sock_ops: run ``program`` (SOCK_OPS bytecode, e.g.
        ``programs.add_established``, or a callable ``f(ctx, env)``) on every connection
        :meth:`listen`'s listeners accept (``op`` PASSIVE_ESTABLISHED, 5) and :meth:`connect`
        makes (ACTIVE_ESTABLISHED, 4). Its ``bpf_sock_map_update``/``bpf_sock_hash_update``
        (``env.sock_update``) put the socket into this engine's maps."""
        prog = self.load(program, ProgType.SOCK_OPS)
        self._sock_ops.append(prog)
        return prog

    def listen(self, address: tuple[str, int], backlog: int = 128) -> ManagedListener:
        """A TCP listener whose accepted connections run the :meth:`on_established`
        programs before :meth:`ManagedListener.accept` returns them."""
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        return ManagedListener(self, socket.create_server(address, family=family, backlog=backlog))

    def connect(self, address: tuple[str, int], timeout: float | None = None) -> socket.socket:
        """``socket.create_connection``, then the :meth:`on_established` programs."""
        sock = socket.create_connection(address, timeout)
        self.established(sock, ACTIVE_ESTABLISHED)
        return sock

    def established(self, sock: socket.socket, op: int) -> None:
        """Run the sock_ops programs for ``sock`` (done by :meth:`listen` and :meth:`connect`;
        call it for a connection made some other way)."""
        if not self._sock_ops:
            return
        fields = addr_fields(sock)
        for prog in self._sock_ops:
            ctx = SockOpsContext(op, **fields)
            prog.run(ctx, SockOpsEnv(sock))  # type: ignore[arg-type]

    def send(self, sock: socket.socket, data: bytes | bytearray | memoryview) -> int:
        """Send as the application would, through ``sock``'s SK_MSG verdict when it is in a
        map with one (what ``sendmsg`` does in the kernel): the bytes taken, or
        ``OSError(EACCES)`` when the verdict drops them. Other sockets: a plain ``send``."""
        with self._lock:
            p = self.datapath.psock_of(sock)
            if p is not None and p.msg_progs is not None:
                n = self.datapath.send_msg(p, bytes(data))
                wake = True
            else:
                wake = False
        if not wake:
            return sock.send(data)
        self._ensure_driver().wake()
        return n

    def stats(self, sock: socket.socket) -> PsockStats:
        """The outcome counters of ``sock``'s psock."""
        with self._lock:
            p = self.datapath.psock_of(sock)
            if p is None:
                raise bpf_error(
                    errno.ENOENT,
                    f"stats of fd {sock.fileno()}",
                    "the socket is in no map of this engine",
                )
            return p.stats

    def pending_bytes(self, sock: socket.socket) -> int:
        """Bytes redirected to ``sock``'s send path and not yet written into it."""
        with self._lock:
            p = self.datapath.psock_of(sock)
            return 0 if p is None else p.tx_bytes

    def send_error_of(self, sock: socket.socket) -> int:
        """The errno that stopped ``sock``'s transmit side (0 when it still sends)."""
        with self._lock:
            p = self.datapath.psock_of(sock)
            return 0 if p is None else p.tx_error

    def error_of(self, sock: socket.socket) -> int:
        """The errno that stopped ``sock``'s receive or send side (0 when none)."""
        with self._lock:
            p = self.datapath.psock_of(sock)
            return 0 if p is None else (p.rx_error or p.tx_error)

    def close(self) -> None:
        """Stop the driver and free every map (their sockets stay open: they are the app's)."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for m in self._maps:
                m.close()  # fires the removals: psocks go, interests are withdrawn
            self._maps.clear()
            self.datapath.close()
        if self._driver is not None:
            self._driver.close()
