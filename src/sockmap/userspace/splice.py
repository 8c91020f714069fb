"""Pair splicing on the userspace engine: the same :class:`Splicer`, with exact close rules.

The engine sees a source's EOF itself, in order after every byte it read, so a FIN
may follow as soon as the target's egress queue is empty.
"""

from __future__ import annotations

import queue
import socket
from typing import TypeVar, Unpack

from sockmap.datapath.splice import _TCP_CLOSE, Mode, SpliceOptions, Splicer
from sockmap.datapath.tcp import tcp_counters
from sockmap.userspace.engine import UserspaceEngine
from sockmap.userspace.psock import Event

__all__ = ["UserspaceSplicer", "drain"]

_T = TypeVar("_T")


def drain(events: queue.SimpleQueue[_T], timeout: float) -> list[_T]:
    """Wait up to ``timeout`` for an event; return it and every one queued."""
    try:
        out = [events.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            out.append(events.get_nowait())
        except queue.Empty:
            return out


class UserspaceSplicer(Splicer):
    """Splices pairs through a userspace sockmap."""

    def __init__(
        self,
        engine: UserspaceEngine,
        max_pairs: int = 1024,
        mode: Mode = "strparser",
        **kw: Unpack[SpliceOptions],
    ) -> None:
        self._events: queue.SimpleQueue[tuple[socket.socket, int]] = queue.SimpleQueue()
        self._uengine = engine
        engine.on_event(self._on_event)
        super().__init__(engine, max_pairs, mode, **kw)

    def _on_event(self, ev: Event) -> None:
        if ev.kind in ("eof", "error"):
            # The socket, not its fd number: by the time the watcher looks, the pair may
            # be closed and the number taken by a new pair's socket, which an old EOF
            # would then end (a client got a clean EOF after 0 bytes).
            self._events.put((ev.sock, ev.err))

    def _poll(self, timeout: float) -> list[tuple[int, int]]:
        out = []
        for sock, err in drain(self._events, timeout):
            fd = sock.fileno()
            with self._lock:
                pair = self._by_fd.get(fd)
            if pair is not None and (pair.a is sock or pair.b is sock):
                out.append((fd, err))
        return out

    def _fin_ready(self, source: object, target: object) -> bool:
        del source
        return self._uengine.pending_bytes(target) == 0  # type: ignore[arg-type]

    def _dead(self, sock: socket.socket) -> bool:
        """A TCP socket the peer reset (or that closed): it can take no more bytes."""
        try:
            return tcp_counters(sock).state == _TCP_CLOSE
        except OSError:  # not TCP (no TCP_INFO), or closed meanwhile
            return False

    def held_bytes(self, source: object) -> int:
        """Bytes read from ``source`` and not yet written into its peer (the engine's queue)."""
        with self._lock:
            pair = self._by_fd.get(source.fileno())  # type: ignore[attr-defined]
        if pair is None:
            return 0
        return self._uengine.pending_bytes(pair.other(source.fileno()))  # type: ignore[attr-defined]
