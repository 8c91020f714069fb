"""A sans-IO stream parser: bytes in, whole messages out (the kernel's strparser, in Python).

The parser callable sees the bytes of the message being assembled — from its first
byte to everything received so far — and answers like the kernel's ``parse_msg``:
a length >0 (the message is that many bytes; wait if fewer have arrived), 0 (need
more bytes to tell), or a negative errno (the stream is broken).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from sockmap.errors import StreamError

__all__ = ["NEED_DATA", "ParseFn", "StrParser", "StrpStats"]

ParseFn = Callable[[memoryview, int], int]
"""``parse(prefix, available) -> length``: ``prefix`` holds the message's first bytes
(possibly all ``available`` of them)."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass
class StrpStats:
    """The kernel's strparser counters, by the same names."""

    msgs: int = 0
    bytes: int = 0
    need_more_hdr: int = 0
    msg_too_big: int = 0
    bad_hdr_len: int = 0
    aborts: int = 0


class StrParser:
    """Cuts a byte stream into messages; never touches a socket."""

    def __init__(
        self,
        parse: ParseFn,
        max_msg_size: int | Callable[[], int],
        prefix_size: int | None = None,
    ) -> None:
        self._parse = parse
        if callable(max_msg_size):
            self._limit_fn: Callable[[], int] | None = max_msg_size
            self.max_msg_size = max_msg_size()
        else:
            self._limit_fn = None
            self.max_msg_size = max_msg_size
        self.prefix_size = prefix_size
        """Bytes of the message the parser needs to see (None: all of them)."""
        self._buf = bytearray()
        self._start = 0
        self._want = 0  # length of the message being assembled, 0 while unknown
        self.error = 0
        self.stats = StrpStats()

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as a message."""
        return len(self._buf) - self._start

    def feed(self, data: bytes | memoryview) -> None:
        """Append received bytes."""
        if self.error:
            raise StreamError(self.error, "the stream parser has stopped after an error")
        self._buf += data

    def next_message(self) -> bytes | _NeedData:
        """The next whole message, or NEED_DATA. Raises StreamError once the stream is broken."""
        if self.error:
            raise StreamError(self.error, "the stream parser has stopped after an error")
        available = len(self._buf) - self._start
        if not available:
            return NEED_DATA
        if not self._want:
            view = memoryview(self._buf)
            end = self._start + (
                available if self.prefix_size is None else min(available, self.prefix_size)
            )
            try:
                length = self._parse(view[self._start : end], available)
            finally:
                view.release()
            if length == 0:
                if available >= self.max_msg_size and available >= self._refresh():
                    self.stats.msg_too_big += 1
                    return self._abort(errno.EMSGSIZE, "no message length within the limit")
                self.stats.need_more_hdr += 1
                return NEED_DATA
            if length < 0:
                return self._abort(-length, f"the parser returned {length}")
            if length > self.max_msg_size and length > self._refresh():
                self.stats.msg_too_big += 1
                return self._abort(
                    errno.EMSGSIZE,
                    f"message of {length} bytes is over the {self.max_msg_size} limit",
                )
            self._want = length
        if available < self._want:
            return NEED_DATA
        msg = bytes(self._buf[self._start : self._start + self._want])
        self._start += self._want
        self._want = 0
        self.stats.msgs += 1
        self.stats.bytes += len(msg)
        if self._start > 65536 and self._start * 2 > len(self._buf):
            del self._buf[: self._start]
            self._start = 0
        return msg

    def _refresh(self) -> int:
        """Re-read a moving limit (the kernel's is the socket's current receive buffer)."""
        if self._limit_fn is not None:
            self.max_msg_size = self._limit_fn()
        return self.max_msg_size

    def _abort(self, err: int, why: str) -> _NeedData:
        self.error = err
        self.stats.aborts += 1
        raise StreamError(err, f"stream parser: {why}")
