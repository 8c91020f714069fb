"""The host's TCP and UDP sockets by cookie, from sock_diag netlink (``NETLINK_SOCK_DIAG``).

A sockmap lookup from user space gives a socket's cookie (value size 8); this turns
cookies into what a person can read: addresses, ports, TCP state, queue sizes.
Read-only; needs no privilege for the caller's own namespace.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from dataclasses import dataclass

from sockmap.abi import TCP_STATES

__all__ = ["SockInfo", "sockets_by_cookie"]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states
_SOCKID = struct.Struct(">HH16s16s")  # sport, dport (network order), src, dst
_MSG = struct.Struct("=BBBB")  # family, state, timer, retrans


@dataclass(frozen=True)
class SockInfo:
    """One socket as sock_diag reports it."""

    cookie: int
    protocol: str
    family: int
    state: str
    local: tuple[str, int]
    remote: tuple[str, int]
    rqueue: int
    wqueue: int
    inode: int

    def describe(self) -> str:
        def addr(a: tuple[str, int]) -> str:
            return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"

        return (
            f"{self.protocol} {addr(self.local)} -> {addr(self.remote)} {self.state} "
            f"recv-q {self.rqueue} send-q {self.wqueue}"
        )


def _dump(family: int, protocol: int) -> list[SockInfo]:
    out: list[SockInfo] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(5)
        req = _REQ.pack(family, protocol, 0, 0xFFFFFFFF) + bytes(48)  # every state, any id
        msg = _NLMSG.pack(
            _NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        )
        nl.send(msg + req)
        while True:
            data = nl.recv(1 << 16)
            pos = 0
            while pos + _NLMSG.size <= len(data):
                length, mtype, _, _, _ = _NLMSG.unpack_from(data, pos)
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, pos + _NLMSG.size)[0]
                    if code in (errno.ENOENT, errno.EOPNOTSUPP):
                        return out  # no such protocol here
                    raise OSError(code, f"sock_diag dump failed ({errno.errorcode.get(code)})")
                out.append(_parse(data, pos + _NLMSG.size, protocol))
                pos += (length + 3) & ~3
            if not data:
                return out


def _parse(data: bytes, at: int, protocol: int) -> SockInfo:
    fam, state, _, _ = _MSG.unpack_from(data, at)
    sport, dport, src, dst = _SOCKID.unpack_from(data, at + 4)
    _ifindex, c0, c1 = struct.unpack_from("=III", data, at + 4 + _SOCKID.size)
    _expires, rq, wq, _uid, inode = struct.unpack_from("=IIIII", data, at + 4 + 48)
    size = 4 if fam == socket.AF_INET else 16
    local = socket.inet_ntop(fam, src[:size])
    remote = socket.inet_ntop(fam, dst[:size])
    proto = "tcp" if protocol == socket.IPPROTO_TCP else "udp"
    name = (
        TCP_STATES.get(state, str(state)) if proto == "tcp" else ("BOUND" if sport else "UNBOUND")
    )
    return SockInfo(c0 | c1 << 32, proto, fam, name, (local, sport), (remote, dport), rq, wq, inode)


def sockets_by_cookie() -> dict[int, SockInfo]:
    """Every TCP and UDP socket of this network namespace, by cookie."""
    out: dict[int, SockInfo] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for protocol in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
            with contextlib.suppress(OSError):
                for s in _dump(family, protocol):
                    out[s.cookie] = s
    return out
