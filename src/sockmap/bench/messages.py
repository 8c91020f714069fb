"""Length-prefixed message servers and clients for balance mode's demo and tests (any
:class:`~sockmap.programs.LengthField`; DNS-style framing by default: a 2-byte big-endian
length, then the body).

A :class:`TaggingServer` answers every request with ``tag + body``, one response per
request in order, so a test can tell which backend answered which request and that
every response arrived whole.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading

from sockmap.programs.parsers import PRESETS, LengthField

__all__ = ["TaggingServer", "frame", "random_bodies", "read_message", "send_chunked"]


DNS = PRESETS["dns"]


def frame(body: bytes, field: LengthField = DNS) -> bytes:
    """``body`` as one message: zero bytes up to the length field, the field, the body."""
    value = field.header + len(body) - field.adjust
    return bytes(field.offset) + value.to_bytes(field.width, field.order) + body


def read_message(sock: socket.socket, field: LengthField = DNS) -> bytes | None:
    """One message's body (what follows the length field), or None at EOF (a truncated
    message raises)."""
    head = _read_exactly(sock, field.header)
    if head is None:
        return None
    size = field.size_of(head)
    if size < field.header:
        raise ValueError(f"bad length field {head.hex()}")
    body = _read_exactly(sock, size - field.header)
    if body is None:
        raise EOFError(f"EOF inside a {size}-byte message")
    return body


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            if buf:
                raise EOFError(f"EOF after {len(buf)} of {n} bytes")
            return None
        buf += got
    return buf


class TaggingServer:
    """Answers each framed request with ``tag + body``; counts requests; can drop every
    connection on demand (a backend that dies)."""

    def __init__(self, tag: bytes, field: LengthField = DNS) -> None:
        self.tag = tag
        self.field = field
        self.server = socket.create_server(("127.0.0.1", 0))
        self.requests = 0
        self.conns: list[socket.socket] = []
        self._resetting: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self) -> str:
        host, port = self.server.getsockname()[:2]
        return f"{host}:{port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self._lock:
                self.conns.append(conn)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, EOFError):
            while (body := read_message(conn, self.field)) is not None:
                with self._lock:
                    self.requests += 1
                conn.sendall(frame(self.tag + body, self.field))
            if conn not in self._resetting:
                conn.shutdown(socket.SHUT_WR)
        conn.close()

    def drop_connections(self, reset: bool = False) -> None:
        with self._lock:
            conns, self.conns = self.conns, []
        if reset:
            self._resetting.update(conns)
        for c in conns:
            with contextlib.suppress(OSError):  # one its client already closed is fine
                if reset:  # a reset and nothing else: no FIN first
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # Wakes the thread blocked reading it: the close takes effect only then.
                c.shutdown(socket.SHUT_RD if reset else socket.SHUT_RDWR)
            c.close()

    def close(self) -> None:
        self.server.close()
        self.drop_connections()


def random_bodies(n: int, seed: int, low: int = 1, high: int = 4000) -> list[bytes]:
    """``n`` distinct bodies (each starts with its 4-byte index) of random sizes."""
    rng = random.Random(seed)  # noqa: S311 - test data, reproducible by seed
    return [
        struct.pack(">I", i) + rng.randbytes(rng.randint(max(0, low - 4), high - 4))
        for i in range(n)
    ]


def send_chunked(sock: socket.socket, data: bytes, seed: int, max_chunk: int = 3000) -> None:
    """Write ``data`` in random-size pieces (messages cut anywhere)."""
    rng = random.Random(seed)  # noqa: S311 - test data, reproducible by seed
    pos = 0
    while pos < len(data):
        n = rng.randint(1, max_chunk)
        sock.sendall(data[pos : pos + n])
        pos += n
