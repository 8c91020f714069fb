"""I/O drivers for the userspace datapath: a selector thread, or an asyncio loop.

A driver owns the readiness watching and calls the :class:`Datapath` when a socket
is readable or writable, under the engine's lock. It also notices sockets the
application closed (their fd is gone) and hands them to the engine to remove.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable

from sockmap._closeable import Closeable
from sockmap.userspace.psock import Datapath, Interest, Psock

__all__ = ["AsyncioDriver", "Driver", "ThreadDriver"]

REAP_INTERVAL = 0.05


class Driver(Closeable):
    """The interface the engine uses."""

    def interest(self, p: Psock, want: Interest) -> None:
        raise NotImplementedError

    def wake(self) -> None:
        """Run a turn soon (e.g. after a socket joined with data already queued)."""


class ThreadDriver(Driver):
    """One daemon thread with an epoll set; every datapath call is made under ``lock``."""

    def __init__(
        self,
        dp: Datapath,
        lock: threading.RLock,
        reap: Callable[[list[Psock]], None],
    ) -> None:
        self._dp = dp
        self._lock = lock
        self._reap = reap
        self._epoll = select.epoll()
        self._masks: dict[int, int] = {}
        self._psocks: dict[int, Psock] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="sockmap-userspace", daemon=True)
        self._thread.start()

    def interest(self, p: Psock, want: Interest) -> None:
        if self._stop:
            return
        mask = (select.EPOLLIN if want.read else 0) | (select.EPOLLOUT if want.write else 0)
        old = self._masks.get(p.io_fd)
        if old == mask or (old is None and not mask):
            return
        try:
            if not mask:
                del self._masks[p.io_fd]
                self._psocks.pop(p.io_fd, None)
                self._epoll.unregister(p.io_fd)
            elif old is None:
                self._masks[p.io_fd] = mask
                self._psocks[p.io_fd] = p
                self._epoll.register(p.io_fd, mask)
            else:
                self._masks[p.io_fd] = mask
                self._epoll.modify(p.io_fd, mask)
        except OSError:  # closed behind our back: the reaper removes it
            self._masks.pop(p.io_fd, None)
            self._psocks.pop(p.io_fd, None)
        if threading.current_thread() is not self._thread:
            self.wake()  # the loop's own changes are seen at its next poll without a wake-up

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        last_reap = time.monotonic()
        while not self._stop:
            try:
                events = self._epoll.poll(REAP_INTERVAL)
            except OSError:
                return
            with self._lock:
                if self._stop:
                    return
                for fd, mask in events:
                    if fd == self._wake_r.fileno():
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                        continue
                    p = self._psocks.get(fd)
                    if p is None:
                        continue
                    if mask & (select.EPOLLOUT | select.EPOLLERR):
                        self._dp.on_writable(p)
                    if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        self._dp.on_readable(p)
                now = time.monotonic()
                if now - last_reap >= REAP_INTERVAL:
                    last_reap = now
                    self._dp.expire_messages(now)
                    closed = self._dp.reap_closed()
                    if closed:
                        self._reap(closed)

    def close(self) -> None:
        self._stop = True
        self.wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()


class AsyncioDriver(Driver):
    """Readiness through an asyncio loop's ``add_reader``/``add_writer`` (uvloop works too).

    Call the engine from the loop's thread.
    """

    def __init__(
        self,
        dp: Datapath,
        loop: asyncio.AbstractEventLoop,
        reap: Callable[[list[Psock]], None],
    ) -> None:
        self._dp = dp
        self._loop = loop
        self._reap = reap
        self._masks: dict[int, Interest] = {}
        self._reaper = loop.call_later(REAP_INTERVAL, self._reap_turn)

    def interest(self, p: Psock, want: Interest) -> None:
        old = self._masks.get(p.io_fd, Interest())
        loop = self._loop
        try:
            if want.read and not old.read:
                loop.add_reader(p.io_fd, self._dp.on_readable, p)
            elif old.read and not want.read:
                loop.remove_reader(p.io_fd)
            if want.write and not old.write:
                loop.add_writer(p.io_fd, self._dp.on_writable, p)
            elif old.write and not want.write:
                loop.remove_writer(p.io_fd)
        except (OSError, ValueError):
            want = Interest()
        if want.read or want.write:
            self._masks[p.io_fd] = Interest(want.read, want.write)
        else:
            self._masks.pop(p.io_fd, None)

    def _reap_turn(self) -> None:
        self._dp.expire_messages(time.monotonic())
        closed = self._dp.reap_closed()
        if closed:
            for p in closed:
                self._forget(p.io_fd)
            self._reap(closed)
        self._reaper = self._loop.call_later(REAP_INTERVAL, self._reap_turn)

    def _forget(self, fd: int) -> None:
        old = self._masks.pop(fd, None)
        if old is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if old.read:
                self._loop.remove_reader(fd)
            if old.write:
                self._loop.remove_writer(fd)

    def close(self) -> None:
        self._reaper.cancel()
        for fd in list(self._masks):
            self._forget(fd)
