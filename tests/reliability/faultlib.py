"""Fault injection through the proxy: an echo backend in a subprocess that can reset on
cue, a client driver that can reset, half-close and stall, and a ledger that accounts
for every byte.

The backend echoes by *peek, send, consume*: a byte is taken off the receive queue only
once it has been written back, so at any instant every byte it has not answered is still
unread in the kernel. A backend killed with SIGKILL then closes with a reset whenever it
owed anything (the kernel resets a socket closed with unread data), and with a FIN only
when it had answered every byte it received.

Each connection's stream starts with a 16-byte header (magic, connection id, the byte
offset at which the backend resets, 0: never) that is echoed like the rest. The backend
records per connection id, in a shared file (``Slots``): bytes answered, bytes it was
about to answer, how the connection ended, and the SHA-256 of what it received -- so the
ledger sees both ends, even of a backend that was killed.

Ledger rule, per connection: ``sent == delivered + reported_lost + closed_by_backend``,
where ``reported_lost`` is what was sent on a connection the client saw fail (a reset, a
broken pipe, or its own injected reset), and ``closed_by_backend`` is what a *killed*
backend never answered before its kernel closed the connection with a FIN (it had
answered every byte it had received; the client had half-closed, so no reset could
reach it): TCP itself reports that as a clean end, on a direct connection too. Every
other clean EOF must come after every byte. Delivered bytes must be a prefix of what was
sent (checked as they arrive and by hash).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"SMFL"
HEADER = struct.Struct("<4sIQ")  # magic, connection id, reset at (bytes answered; 0: never)
SLOT = struct.Struct("<QQII32s")  # answered, intent, state, errno, sha256 of what it received
SLOT_SIZE = 64
N_SLOTS = 1 << 18

# backend slot states
UNSEEN, OPEN, CLEAN, ERROR, RESET = 0, 1, 2, 3, 4
STATE_NAMES = {UNSEEN: "unseen", OPEN: "open", CLEAN: "clean", ERROR: "error", RESET: "reset"}


def header(conn_id: int, reset_at: int = 0) -> bytes:
    return HEADER.pack(MAGIC, conn_id, reset_at)


def rst_close(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- the backend (runs in a subprocess: python faultlib.py backend PORT SLOTS) ----------


class _BConn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn_id: int | None = None  # None: header not read yet; -1: no header
        self.reset_at = 0
        self.done = 0
        self.hash = hashlib.sha256()
        self.writing = False


def _backend(port: int, slots_path: str) -> None:
    with contextlib.suppress(OSError, AttributeError):
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    with contextlib.suppress(ValueError, OSError):
        import resource  # noqa: PLC0415

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fd = os.open(slots_path, os.O_RDWR)
    mm = mmap.mmap(fd, N_SLOTS * SLOT_SIZE)
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", port))
    lst.listen(4096)
    lst.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lst, selectors.EVENT_READ, None)
    print(f"ready {lst.getsockname()[1]}", flush=True)
    scratch = bytearray(1 << 18)

    def put(c: _BConn, state: int, err: int = 0, intent: int | None = None) -> None:
        if c.conn_id is None or c.conn_id < 0:
            return
        off = (c.conn_id % N_SLOTS) * SLOT_SIZE
        digest = c.hash.digest() if state != OPEN else bytes(32)
        mm[off : off + SLOT.size] = SLOT.pack(
            c.done, c.done if intent is None else intent, state, err, digest
        )

    def finish(c: _BConn, state: int, err: int = 0) -> None:
        put(c, state, err)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(c.sock)
        if state in (RESET, ERROR):
            rst_close(c.sock)
        else:
            c.sock.close()

    def step(c: _BConn) -> None:
        s = c.sock
        if c.conn_id is None:
            head = s.recv(HEADER.size, socket.MSG_PEEK)
            if (len(head) >= 4 and head[:4] != MAGIC) or not head:
                c.conn_id = -1
            elif len(head) < HEADER.size:
                return  # the rest of the header is on its way
            else:
                _, c.conn_id, c.reset_at = HEADER.unpack(head)
                put(c, OPEN)
        want = len(scratch)
        if c.reset_at:
            want = min(want, c.reset_at - c.done)
            if want <= 0:
                finish(c, RESET)
                return
        data = s.recv(want, socket.MSG_PEEK)
        if not data:
            s.shutdown(socket.SHUT_WR)  # every byte answered: end cleanly
            finish(c, CLEAN)
            return
        put(c, OPEN, intent=c.done + len(data))
        try:
            n = s.send(data)
        except BlockingIOError:
            n = 0
        if n:
            got = s.recv_into(scratch, n)  # take exactly what went back out
            assert got == n, (got, n)
            c.hash.update(memoryview(scratch)[:n])
            c.done += n
            put(c, OPEN)
        if n < len(data) and not c.writing:
            c.writing = True
            sel.modify(s, selectors.EVENT_WRITE, c)
        elif n == len(data) and c.writing:
            c.writing = False
            sel.modify(s, selectors.EVENT_READ, c)

    while True:
        for key, _ in sel.select(1.0):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        conn, _ = lst.accept()
                        conn.setblocking(False)
                        sel.register(conn, selectors.EVENT_READ, _BConn(conn))
                continue
            c = key.data
            try:
                step(c)
            except OSError as exc:
                finish(c, ERROR, exc.errno or errno.EIO)


class Slots:
    """The backends' per-connection records (a shared file, read here)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "slots"
        with self.path.open("wb") as f:
            f.truncate(N_SLOTS * SLOT_SIZE)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._mm = mmap.mmap(self._fd, N_SLOTS * SLOT_SIZE, prot=mmap.PROT_READ)

    def get(self, conn_id: int) -> BackendRecord:
        off = (conn_id % N_SLOTS) * SLOT_SIZE
        done, intent, state, err, digest = SLOT.unpack(self._mm[off : off + SLOT.size])
        return BackendRecord(done, intent, state, err, digest)

    def close(self) -> None:
        self._mm.close()
        os.close(self._fd)


@dataclass(frozen=True)
class BackendRecord:
    answered: int
    intent: int
    state: int
    err: int
    digest: bytes


class BackendProc:
    """The echo backend as a subprocess on a fixed port: kill it, start it again."""

    def __init__(self, slots: Slots, port: int = 0) -> None:
        self.slots = slots
        self.port = port
        self.proc: subprocess.Popen[str] | None = None
        self.kills = 0
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        deadline = time.monotonic() + 10
        while True:  # the port may be in TIME_WAIT use briefly after a kill
            proc = subprocess.Popen(
                [sys.executable, __file__, "backend", str(self.port), str(self.slots.path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            if line[:1] == ["ready"]:
                self.port = int(line[1])
                self.proc = proc
                return
            proc.kill()
            proc.wait(5)
            err = proc.stderr.read() if proc.stderr else ""
            if time.monotonic() > deadline:
                raise RuntimeError(f"backend did not start on port {self.port}: {err[-400:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the backend (every connection it has ends as the kernel decides)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        self._close_pipes()
        self.proc = None
        self.kills += 1

    def _close_pipes(self) -> None:
        assert self.proc is not None
        for p in (self.proc.stdout, self.proc.stderr):
            if p is not None:
                p.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self._close_pipes()
            self.proc = None


# -- the client driver ------------------------------------------------------------------


@dataclass
class Plan:
    """What one client connection does."""

    conn_id: int
    size: int
    """Bytes to send, header included (at least the header's 16)."""
    seed: int = 0
    half_close: bool = True
    """Shut the write side after the last byte and read to EOF (else: read every byte
    back, then close)."""
    backend_reset_at: int = 0
    """The backend resets once it has answered this many bytes (0: never)."""
    client_reset_at: int = 0
    """The client resets once it has sent this many bytes (0: never)."""
    stalls: list[tuple[int, float]] = field(default_factory=list)
    """(bytes received, seconds): stop reading that long once that many have arrived."""
    read_chunk: int = 1 << 18
    write_chunk: int = 1 << 18
    kind: str = "none"
    """The fault this connection carries, for the ledger."""

    def data(self) -> bytes:
        body = random.Random(self.seed).randbytes(max(0, self.size - HEADER.size))
        return header(self.conn_id, self.backend_reset_at) + body


@dataclass
class Outcome:
    plan: Plan
    sent: int = 0
    delivered: int = 0
    digest: str = ""
    eof: bool = False
    error: str = ""
    """What the client saw fail: an errno name, "client_reset" (its own), "corrupt",
    "hang", "connect"."""
    detail: str = ""
    started: float = 0.0
    ended: float = 0.0


class _CConn:
    def __init__(self, plan: Plan, timeout: float) -> None:
        self.plan = plan
        self.data = plan.data()
        self.out = Outcome(plan, started=time.monotonic())
        self.hash = hashlib.sha256()
        self.sock = socket.socket()
        self.sock.setblocking(False)
        self.connected = False
        self.shut = False
        self.stall_until = 0.0
        self.stalls = sorted(plan.stalls)
        self.grace_until = 0.0
        self.deadline = time.monotonic() + timeout
        self.events = 0


class Driver:
    """Runs client connections to ``addr`` from one thread, ``concurrency`` at a time."""

    def __init__(self, addr: tuple[str, int], *, timeout: float = 60.0) -> None:
        self.addr = addr
        self.timeout = timeout
        self.sel = selectors.DefaultSelector()
        self.live: dict[int, _CConn] = {}  # by id()
        self.grace: list[_CConn] = []
        self.buf = bytearray(1 << 18)
        self.outcomes: list[Outcome] = []

    def run(
        self,
        plans: Iterator[Plan],
        concurrency: int,
        *,
        on_tick: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        """Run every plan; returns the outcomes in the order connections ended."""
        exhausted = False
        while True:
            while not exhausted and len(self.live) + len(self.grace) < concurrency:
                plan = next(plans, None)
                if plan is None:
                    exhausted = True
                    break
                self._open(plan)
            if exhausted and not self.live and not self.grace:
                break
            now = time.monotonic()
            for key, mask in self.sel.select(0.02):
                c = key.data
                try:
                    self._step(c, mask)
                except OSError as exc:
                    self._fail(c, errno.errorcode.get(exc.errno or 0, str(exc)))
            now = time.monotonic()
            for c in list(self.live.values()):
                if c.stall_until and now >= c.stall_until:
                    c.stall_until = 0.0
                    self._rearm(c)
                if now > c.deadline:
                    self._fail(
                        c,
                        "hang",
                        f"sent {c.out.sent}/{len(c.data)} got {c.out.delivered} eof {c.out.eof}",
                    )
            self._check_grace(now)
            if on_tick is not None:
                on_tick()
        return self.outcomes

    def _open(self, plan: Plan) -> None:
        c = _CConn(plan, self.timeout)
        self.live[id(c)] = c
        rc = c.sock.connect_ex(self.addr)
        if rc not in (0, errno.EINPROGRESS):
            self._fail(c, errno.errorcode.get(rc, str(rc)), "connect")
            return
        self.sel.register(c.sock, selectors.EVENT_WRITE, c)

    def _rearm(self, c: _CConn) -> None:
        if not c.connected:
            mask = selectors.EVENT_WRITE
        else:
            mask = 0
            if not c.stall_until and not c.out.eof:
                mask |= selectors.EVENT_READ
            if c.out.sent < len(c.data):
                mask |= selectors.EVENT_WRITE
        try:
            self.sel.get_key(c.sock)
            registered = True
        except (KeyError, ValueError):
            registered = False
        if mask and registered:
            self.sel.modify(c.sock, mask, c)
        elif mask:
            self.sel.register(c.sock, mask, c)
        elif registered:
            self.sel.unregister(c.sock)

    def _step(self, c: _CConn, mask: int) -> None:
        if not c.connected:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(c, errno.errorcode.get(err, str(err)), "connect")
                return
            c.connected = True
            self._rearm(c)
            return
        p = c.plan
        if mask & selectors.EVENT_WRITE and c.out.sent < len(c.data):
            end = min(len(c.data), c.out.sent + p.write_chunk)
            if p.client_reset_at:
                end = min(end, p.client_reset_at)
            with contextlib.suppress(BlockingIOError):
                c.out.sent += c.sock.send(memoryview(c.data)[c.out.sent : end])
            if p.client_reset_at and c.out.sent >= p.client_reset_at:
                self._end(c, "client_reset")
                rst_close(c.sock)
                return
            if c.out.sent == len(c.data):
                if p.half_close:
                    c.sock.shutdown(socket.SHUT_WR)
                    c.shut = True
                self._rearm(c)
        if mask & selectors.EVENT_READ and not c.stall_until:
            try:
                n = c.sock.recv_into(self.buf, p.read_chunk)
            except BlockingIOError:
                return
            if n == 0:
                c.out.eof = True
                self._eof(c)
                return
            got = c.out.delivered
            if self.buf[:n] != c.data[got : got + n]:
                self._fail(c, "corrupt", f"bytes {got}..{got + n} differ from what was sent")
                return
            c.hash.update(memoryview(self.buf)[:n])
            c.out.delivered += n
            if c.stalls and c.out.delivered >= c.stalls[0][0]:
                c.stall_until = time.monotonic() + c.stalls.pop(0)[1]
                self._rearm(c)
            if not p.half_close and c.out.delivered == len(c.data):
                self._end(c, "")
                c.sock.close()

    def _eof(self, c: _CConn) -> None:
        if c.out.delivered >= len(c.data) and c.out.sent == len(c.data):
            self._end(c, "")
            c.sock.close()
            return
        # EOF before every byte came back: an error may still be on its way (a reset
        # following the FIN); look for it for a moment before calling it a clean end.
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        self.live.pop(id(c), None)
        c.grace_until = time.monotonic() + 2.0
        self.grace.append(c)

    def _check_grace(self, now: float) -> None:
        for c in list(self.grace):
            err = 0
            with contextlib.suppress(OSError):
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not err and c.out.sent < len(c.data):
                try:  # a client that was still sending finds out on its next send
                    c.out.sent += c.sock.send(memoryview(c.data)[c.out.sent :])
                except BlockingIOError:
                    pass
                except OSError as exc:
                    err = exc.errno or errno.EIO
            if err or now >= c.grace_until:
                self.grace.remove(c)
                c.out.digest = c.hash.hexdigest()
                c.out.error = errno.errorcode.get(err, str(err)) if err else ""
                c.out.ended = time.monotonic()
                self.outcomes.append(c.out)
                c.sock.close()

    def _fail(self, c: _CConn, error: str, detail: str = "") -> None:
        self._end(c, error, detail)
        c.sock.close()

    def _end(self, c: _CConn, error: str, detail: str = "") -> None:
        if self.live.pop(id(c), None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        c.out.digest = c.hash.hexdigest()
        c.out.error = error
        c.out.detail = detail
        c.out.ended = time.monotonic()
        self.outcomes.append(c.out)

    def close(self) -> None:
        for c in [*self.live.values(), *self.grace]:
            c.sock.close()
        self.live.clear()
        self.grace.clear()
        self.sel.close()


# -- the ledger -------------------------------------------------------------------------


@dataclass
class Ledger:
    """Per-connection accounting of every byte, from both ends."""

    connections: int = 0
    sent: int = 0
    delivered: int = 0
    reported_lost: int = 0
    closed_by_backend: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    backend_ends: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def add(self, out: Outcome, rec: BackendRecord | None, *, backend_killed: bool) -> None:
        """Account one finished connection; ``rec``: what its backend recorded (None: no
        backend record to check, e.g. the backend never existed); ``backend_killed``: a
        backend was killed while this connection was open."""
        p = out.plan
        data = p.data()
        self.connections += 1
        self.faults[p.kind] += 1
        self.sent += out.sent
        self.delivered += out.delivered
        where = f"conn {p.conn_id} ({p.kind}, {p.size} B)"
        if out.delivered > out.sent:
            self.violations.append(f"{where}: {out.delivered} delivered of {out.sent} sent")
        elif hashlib.sha256(data[: out.delivered]).hexdigest() != out.digest:
            self.violations.append(f"{where}: delivered bytes are not a prefix of what was sent")
        if out.error:
            self.errors[out.error] += 1
            self.reported_lost += out.sent - out.delivered
            if out.error in ("hang", "corrupt"):
                self.violations.append(f"{where}: {out.error}: {out.detail}")
        elif out.delivered != out.sent:
            explained = (
                backend_killed
                and rec is not None
                and rec.state in (OPEN, UNSEEN)  # killed before it finished (or read)
                and p.half_close
                and rec.answered <= out.delivered <= rec.intent
            )
            if explained:
                self.closed_by_backend += out.sent - out.delivered
                self.errors["killed_backend_fin"] += 1
            else:
                state = STATE_NAMES[rec.state] if rec else "-"
                answered = rec.answered if rec else "-"
                self.violations.append(
                    f"{where}: clean EOF after {out.delivered} of {out.sent} bytes "
                    f"(backend {state}, answered {answered}, killed {backend_killed})"
                )
        else:
            self.errors["ok"] += 1
        if rec is None:
            return
        self.backend_ends[STATE_NAMES[rec.state]] += 1
        if rec.state == UNSEEN:
            if out.delivered > 0:
                self.violations.append(f"{where}: answered, but its backend never saw it")
            return
        if rec.answered > out.sent or max(rec.answered, rec.intent) < out.delivered:
            self.violations.append(
                f"{where}: backend answered {rec.answered}, client sent {out.sent}, "
                f"got {out.delivered}"
            )
        if rec.state != OPEN and hashlib.sha256(data[: rec.answered]).digest() != rec.digest:
            self.violations.append(f"{where}: the backend received other bytes than were sent")
        if rec.state == CLEAN and rec.answered != out.sent and out.error != "client_reset":
            self.violations.append(
                f"{where}: the backend saw a clean EOF after {rec.answered} of {out.sent} bytes"
            )
        if rec.state == CLEAN and out.error == "client_reset" and rec.answered != out.sent:
            # The client reset: bytes still in its send queue were never transmitted, so
            # the backend must have seen an error, not a clean EOF.
            self.violations.append(
                f"{where}: the client reset but its backend saw a clean EOF after "
                f"{rec.answered} of {out.sent} bytes"
            )

    def balanced(self) -> bool:
        return self.sent == self.delivered + self.reported_lost + self.closed_by_backend

    def figures(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "faults": dict(self.faults),
            "bytes_sent": self.sent,
            "bytes_delivered": self.delivered,
            "bytes_reported_lost": self.reported_lost,
            "bytes_closed_by_killed_backend": self.closed_by_backend,
            "errors_seen": dict(self.errors),
            "backend_ends": dict(self.backend_ends),
            "violations": len(self.violations),
            "violation_samples": self.violations[:10],
        }


if __name__ == "__main__":
    if sys.argv[1:2] == ["backend"]:
        _backend(int(sys.argv[2]), sys.argv[3])
