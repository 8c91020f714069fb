"""Plain helpers for loopback tests: connected pairs, bounded waits, random streams."""

from __future__ import annotations

import hashlib
import random
import socket
import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, step: float = 0.005) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class Pairs:
    """Makes connected loopback TCP pairs (client, accepted) and closes them all at the end."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.sockets: list[socket.socket] = [self.listener]

    def __call__(self) -> tuple[socket.socket, socket.socket]:
        client = socket.create_connection(self.listener.getsockname(), timeout=5)
        server, _ = self.listener.accept()
        server.settimeout(5)
        self.sockets += [client, server]
        return client, server

    def track(self, sock: socket.socket) -> socket.socket:
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        for s in self.sockets:
            s.close()


def random_chunks(total: int, seed: int, max_chunk: int = 65536) -> list[bytes]:
    """``total`` random bytes cut into random-size chunks (reproducible by ``seed``)."""
    rng = random.Random(seed)
    data = rng.randbytes(total)
    chunks, pos = [], 0
    while pos < total:
        n = rng.randint(1, max_chunk)
        chunks.append(data[pos : pos + n])
        pos += n
    return chunks


def recv_exactly(sock: socket.socket, total: int) -> tuple[int, str]:
    """Read ``total`` bytes (or until EOF); return (count, sha256 hex)."""
    h = hashlib.sha256()
    got = 0
    buf = bytearray(1 << 20)
    while got < total:
        n = sock.recv_into(buf, min(len(buf), total - got))
        if not n:
            break
        h.update(memoryview(buf)[:n])
        got += n
    return got, h.hexdigest()


def recv_to_eof(sock: socket.socket) -> tuple[int, str]:
    """Read until EOF; return (count, sha256 hex)."""
    h = hashlib.sha256()
    got = 0
    buf = bytearray(1 << 20)
    while True:
        n = sock.recv_into(buf)
        if not n:
            return got, h.hexdigest()
        h.update(memoryview(buf)[:n])
        got += n


def sha256(chunks: list[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()
