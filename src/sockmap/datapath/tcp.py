"""TCP counters the datapath steers by: TCP_INFO, SIOCINQ, SIOCOUTQ.

They give exact answers to "how many redirected bytes have not reached the
target yet?", which the kernel's redirect queue does not show anywhere else.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import time
from dataclasses import dataclass

from sockmap.abi import TCP_STATES

__all__ = ["IdleWatch", "TcpCounters", "inq", "kick", "outq", "tcp_counters"]

SIOCINQ = 0x541B  # FIONREAD
SIOCOUTQ = 0x5411  # TIOCOUTQ
TCP_INFO_LEN = 232
# struct tcp_info offsets (checked against BTF in tests/kernel/test_abi_btf.py)
TCPI_STATE = 0
TCPI_BYTES_ACKED = 120
TCPI_BYTES_RECEIVED = 128
TCPI_NOTSENT_BYTES = 144


@dataclass(frozen=True, slots=True)
class TcpCounters:
    """One socket's byte counters at one instant."""

    state: int
    bytes_acked: int
    bytes_received: int
    notsent: int
    inq: int
    outq: int

    @property
    def written(self) -> int:
        """Bytes ever written into this socket's send path (acked + still queued)."""
        return self.bytes_acked + self.outq

    @property
    def consumed(self) -> int:
        """Bytes received and taken off the receive queue (read, or redirected)."""
        return self.bytes_received - self.inq

    @property
    def state_name(self) -> str:
        return TCP_STATES.get(self.state, str(self.state))


def _ioctl_int(sock: socket.socket | int, request: int) -> int:
    fd = sock if isinstance(sock, int) else sock.fileno()
    buf = fcntl.ioctl(fd, request, b"\0\0\0\0")
    return int(struct.unpack("<i", buf)[0])


def inq(sock: socket.socket | int) -> int:
    """Bytes in the receive queue (SIOCINQ)."""
    return _ioctl_int(sock, SIOCINQ)


def outq(sock: socket.socket | int) -> int:
    """Bytes written but not yet acknowledged by the peer (SIOCOUTQ)."""
    return _ioctl_int(sock, SIOCOUTQ)


def tcp_counters(sock: socket.socket) -> TcpCounters:
    """Read TCP_INFO plus both queue sizes of ``sock``, as of one instant.

    TCP_INFO and the two ioctls are three syscalls: bytes (or a FIN) arriving between
    them would make ``consumed`` look smaller than it is, as if the datapath had
    taken bytes. The reading is repeated until TCP_INFO is the same on both sides of
    the ioctls (a few tries; a busy socket gets the last reading).
    """
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    for _ in range(8):
        queued_in, queued_out = inq(sock), outq(sock)
        again = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
        if _same_instant(raw, again):
            break
        raw = again
    state = raw[TCPI_STATE]
    acked, received = struct.unpack_from("<QQ", raw, TCPI_BYTES_ACKED)
    notsent = struct.unpack_from("<I", raw, TCPI_NOTSENT_BYTES)[0]
    return TcpCounters(state, acked, received, notsent, queued_in, queued_out)


def _same_instant(a: bytes, b: bytes) -> bool:
    """Two TCP_INFO readings agree on state and on bytes acked and received."""
    return a[TCPI_STATE] == b[TCPI_STATE] and a[TCPI_BYTES_ACKED : TCPI_BYTES_RECEIVED + 8] == (
        b[TCPI_BYTES_ACKED : TCPI_BYTES_RECEIVED + 8]
    )


def kick(sock: socket.socket) -> None:
    """Make the kernel run parser/verdict over bytes queued before the socket joined a map.

    Setting SO_RCVLOWAT calls the socket's data-ready path, which sockmap hooks.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


class IdleWatch:
    """Finds sockets that moved no byte either way for ``timeout`` seconds, from their TCP
    counters (one getsockopt per socket per scan; a scan every ``every`` seconds)."""

    def __init__(self, timeout: float, every: float = 1.0) -> None:
        self.timeout = timeout
        self.every = min(every, timeout / 2) if timeout > 0 else every
        self._next = time.monotonic() + self.every
        self._seen: dict[int, tuple[int, int, float]] = {}  # fd -> (received, acked, since)

    def due(self, now: float) -> bool:
        """Time for a scan (never, when the timeout is 0: off)."""
        if self.timeout <= 0 or now < self._next:
            return False
        self._next = now + self.every
        return True

    def idle(self, sock: socket.socket, now: float) -> bool:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
        acked, received = struct.unpack_from("<QQ", raw, TCPI_BYTES_ACKED)
        fd = sock.fileno()
        last = self._seen.get(fd)
        if last is None or last[:2] != (received, acked):
            self._seen[fd] = (received, acked, now)
            return False
        return now - last[2] >= self.timeout

    def forget(self, sock: socket.socket) -> None:
        self._seen.pop(sock.fileno(), None)
