"""Helpers that hide how the two engines differ in *how* passed data is read.

The kernel puts passed bytes on the socket's own receive queue; the userspace
engine hands them out through ``engine.recv``. Every outcome a test asserts with
these is the same on both engines.
"""

from __future__ import annotations

import socket
import time

from sockmap.datapath.tcp import kick
from sockmap.kernel.engine import KernelEngine
from sockmap.userspace.engine import UserspaceEngine

Engine = KernelEngine | UserspaceEngine


def insert(engine: Engine, smap: object, key: int, sock: socket.socket) -> None:
    smap[key] = sock  # type: ignore[index]
    if isinstance(engine, KernelEngine):
        kick(sock)


def read_passed(engine: Engine, sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    """Bytes a verdict passed (or redirected to ingress) to ``sock``'s receive side."""
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        if isinstance(engine, KernelEngine):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                out += sock.recv(n - len(out))
            except TimeoutError:
                break
        else:
            got = engine.recv(sock, n - len(out))
            if not got:
                time.sleep(0.002)
            out += got
    return out


def nothing_passed(engine: Engine, sock: socket.socket) -> bool:
    if isinstance(engine, KernelEngine):
        sock.setblocking(False)
        try:
            sock.recv(1)
        except BlockingIOError:
            return True
        finally:
            sock.setblocking(True)
        return False
    return engine.recv(sock, 1) == b""


def socket_error(engine: Engine, sock: socket.socket) -> int:
    if isinstance(engine, KernelEngine):
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    return engine.error_of(sock)


def bytes_consumed(engine: Engine, sock: socket.socket) -> int:
    if isinstance(engine, KernelEngine):
        from sockmap.datapath.tcp import tcp_counters  # noqa: PLC0415

        return tcp_counters(sock).bytes_received
    return engine.stats(sock).bytes_in
