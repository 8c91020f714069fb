"""Which sockets may go into a SOCKMAP/SOCKHASH, decided like this kernel (6.18) does.

The kernel's ``sock_map_update_elem_sys`` looks the fd up (EBADF, ENOTSOCK), asks
whether the protocol can carry a psock at all and whether its state allows it
(EOPNOTSUPP), and later, when the socket is linked to a map that has a stream
parser attached, refuses everything but TCP (EOPNOTSUPP). Here the same answers
come from the socket itself: ``SO_DOMAIN``/``SO_TYPE``/``SO_PROTOCOL``, the TCP
state from ``TCP_INFO``, and ``getsockname``/``getpeername``.

Observed on this kernel (every row is pinned by ``tests/conformance``):

=================================================  ========  ===============
socket                                             no parser parser attached
=================================================  ========  ===============
TCP (v4/v6) ESTABLISHED or LISTEN                  ok        ok
TCP in any other state (unbound, bound, SYN_SENT,  EOPNOTSUPP EOPNOTSUPP
CLOSE_WAIT, FIN_WAIT*, CLOSE...)
UDP (v4/v6) bound (explicitly or by connect)       ok        EOPNOTSUPP
UDP unbound                                        EOPNOTSUPP EOPNOTSUPP
unix stream connected (socketpair, connect,        ok        EOPNOTSUPP
accept; still so after the peer closed)
unix stream unconnected or listening               EOPNOTSUPP EOPNOTSUPP
unix dgram (bound, unbound, connected, pair)       ok        EOPNOTSUPP
unix seqpacket (any; refused only at link time)    EOPNOTSUPP EOPNOTSUPP
UDP-Lite, MPTCP, raw, packet, netlink, vsock...    EOPNOTSUPP EOPNOTSUPP
=================================================  ========  ===============
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from collections.abc import Iterator

from sockmap.errors import SOCKET_INSERT_HINT, UnsupportedSocket, bpf_error
from sockmap.kernel.syscall import check_fd

__all__ = ["SocketKind", "check_insertable", "linkable", "socket_kind", "unsupported"]

SO_COOKIE = 57
_TCP_ESTABLISHED = 1
_TCP_LISTEN = 10
_INET = (socket.AF_INET, socket.AF_INET6)


class SocketKind:
    """What admission found out about a socket (family, type, protocol, and the verdict)."""

    __slots__ = ("family", "linkable", "protocol", "tcp", "type", "usable")

    def __init__(
        self, family: int, type_: int, protocol: int, usable: bool, tcp: bool, linkable: bool
    ) -> None:
        self.family = family
        self.type = type_
        self.protocol = protocol
        self.usable = usable
        """Passes the kernel's first checks (protocol can carry a psock, state allows it)."""
        self.tcp = tcp
        """Is TCP (the only kind a map with a stream parser takes)."""
        self.linkable = linkable
        """Passes the check made when the socket is linked to the map (after the flags and
        key checks): unix seqpacket sockets fail only there."""

    def __repr__(self) -> str:
        return (
            f"<SocketKind family={self.family} type={self.type} protocol={self.protocol} "
            f"usable={self.usable} tcp={self.tcp} linkable={self.linkable}>"
        )


@contextlib.contextmanager
def _as_socket(sock_or_fd: object, fd: int) -> Iterator[socket.socket]:
    """A socket object for ``fd``: the caller's own, or a temporary one over a dup."""
    if isinstance(sock_or_fd, socket.socket) and sock_or_fd.fileno() == fd:
        yield sock_or_fd
        return
    tmp = socket.socket(fileno=os.dup(fd))
    try:
        yield tmp
    finally:
        tmp.close()


def _usable(s: socket.socket, family: int, type_: int, proto: int) -> tuple[bool, bool]:
    """(usable without a parser, is TCP)."""
    if family in _INET and type_ == socket.SOCK_STREAM and proto == socket.IPPROTO_TCP:
        state = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        return state in (_TCP_ESTABLISHED, _TCP_LISTEN), True
    if family in _INET and type_ == socket.SOCK_DGRAM and proto == socket.IPPROTO_UDP:
        # an unbound UDP socket is not hashed yet: refused; connect() binds it
        return int(s.getsockname()[1]) != 0, False
    if family == socket.AF_UNIX and type_ == socket.SOCK_STREAM:
        try:
            s.getpeername()  # connected (the peer may have closed since: still ESTABLISHED)
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise
            return False, False
        return True, False
    if family == socket.AF_UNIX and type_ == socket.SOCK_DGRAM:
        return True, False
    return False, False  # seqpacket, UDP-Lite, MPTCP, raw, packet, netlink, vsock...


def socket_kind(sock_or_fd: object, *, what: str) -> tuple[int, SocketKind]:
    """Look ``sock_or_fd`` up like the kernel does: (fd, kind), or EBADF/ENOTSOCK/EINVAL."""
    fd = check_fd(sock_or_fd, what)
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as e:
        raise bpf_error(e.errno or errno.EBADF, what) from None
    if flags & os.O_PATH:  # the kernel's fd lookup ignores O_PATH files
        raise bpf_error(errno.EBADF, what)
    if not stat.S_ISSOCK(st.st_mode):
        raise bpf_error(errno.ENOTSOCK, what)
    with _as_socket(sock_or_fd, fd) as s:
        family = s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        type_ = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        proto = s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        usable, tcp = _usable(s, family, type_, proto)
    linkable = not (family == socket.AF_UNIX and type_ == socket.SOCK_SEQPACKET)
    return fd, SocketKind(family, type_, proto, usable or not linkable, tcp, linkable)


def unsupported(what: str) -> UnsupportedSocket:
    """The kernel engine's EOPNOTSUPP for an insert."""
    err = bpf_error(errno.EOPNOTSUPP, what, SOCKET_INSERT_HINT, UnsupportedSocket)
    assert isinstance(err, UnsupportedSocket)
    return err


def linkable(kind: SocketKind, parser_attached: bool) -> bool:
    """The link-stage check: not seqpacket, and TCP only where a stream parser is attached."""
    return kind.linkable and (kind.tcp or not parser_attached)


def check_insertable(sock_or_fd: object, *, parser_attached: bool, what: str) -> int:
    """The fd of ``sock_or_fd`` if this kernel would let it into a socket map, else raise.

    Raises like the kernel engine: TypeError for a non-fd, EBADF (closed socket object,
    fd not open, O_PATH fd), EINVAL (fd above 2**31 - 1), ENOTSOCK (not a socket), and
    :class:`UnsupportedSocket` (EOPNOTSUPP) for a socket of the wrong kind or state, or
    for any non-TCP socket when ``parser_attached``.
    """
    fd, kind = socket_kind(sock_or_fd, what=what)
    if not kind.usable or not linkable(kind, parser_attached):
        raise unsupported(what)
    return fd
