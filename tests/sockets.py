"""Loopback sockets in every state a sockmap cares about, shared by the test suites."""

from __future__ import annotations

import contextlib
import os
import socket
import time

from sockmap.datapath.tcp import tcp_counters

TCP_CLOSE_WAIT = 8
TCP_FIN_WAIT2 = 5


def wait_for_tcp_state(sock: socket.socket, state: int, timeout: float = 5.0) -> bool:
    """Poll TCP_INFO until ``sock`` is in ``state``; bounded, True when reached."""
    deadline = time.monotonic() + timeout
    while tcp_counters(sock).state != state:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


class Sockets:
    """Loopback sockets in the states a sockmap cares about; all closed at the end."""

    def __init__(self) -> None:
        self._all: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._listener6: socket.socket | None = None

    def track(self, sock: socket.socket) -> socket.socket:
        self._all.append(sock)
        return sock

    def listener(self) -> socket.socket:
        if self._listener is None:
            self._listener = self.track(socket.create_server(("127.0.0.1", 0)))
        return self._listener

    def listener6(self) -> socket.socket:
        if self._listener6 is None:
            self._listener6 = self.track(socket.create_server(("::1", 0), family=socket.AF_INET6))
        return self._listener6

    def tcp_pair(self) -> tuple[socket.socket, socket.socket]:
        lst = self.listener()
        client = self.track(socket.create_connection(lst.getsockname(), timeout=5))
        server, _ = lst.accept()
        self.track(server)
        server.settimeout(5)
        return client, server

    def tcp6_pair(self) -> tuple[socket.socket, socket.socket]:
        lst = self.listener6()
        client = self.track(socket.create_connection(lst.getsockname()[:2], timeout=5))
        server, _ = lst.accept()
        self.track(server)
        return client, server

    def unbound_tcp(self, family: int = socket.AF_INET) -> socket.socket:
        return self.track(socket.socket(family, socket.SOCK_STREAM))

    def bound_tcp(self) -> socket.socket:
        s = self.unbound_tcp()
        s.bind(("127.0.0.1", 0))
        return s

    def refused_tcp(self) -> socket.socket:
        """A TCP socket whose connect was refused: state CLOSE."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        s = self.unbound_tcp()
        with contextlib.suppress(OSError):
            s.connect(("127.0.0.1", port))
        return s

    def fin_wait2(self) -> socket.socket:
        client, _ = self.tcp_pair()
        client.shutdown(socket.SHUT_WR)
        assert wait_for_tcp_state(client, TCP_FIN_WAIT2)
        return client

    def udp(self, family: int = socket.AF_INET, bind: str | None = None) -> socket.socket:
        s = self.track(socket.socket(family, socket.SOCK_DGRAM))
        if bind is not None:
            s.bind((bind, 0))
        return s

    def unbound_udp(self) -> socket.socket:
        return self.udp()

    def bound_udp(self) -> socket.socket:
        return self.udp(bind="127.0.0.1")

    def udp_connected(self) -> socket.socket:
        s = self.udp()
        s.connect(("127.0.0.1", 9))  # binds it
        return s

    def unix_pair(self, kind: int = socket.SOCK_STREAM) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        return self.track(a), self.track(b)

    def unix(self, kind: int = socket.SOCK_STREAM) -> socket.socket:
        return self.track(socket.socket(socket.AF_UNIX, kind))

    def unix_unconnected(self) -> socket.socket:
        return self.unix()

    def unix_listening(self) -> socket.socket:
        s = self.unix()
        s.bind(f"\0sockmap-conf-{os.getpid()}-{id(s)}")
        s.listen()
        return s

    def unix_connected(self) -> tuple[socket.socket, socket.socket]:
        lst = self.unix_listening()
        c = self.unix()
        c.connect(lst.getsockname())
        a, _ = lst.accept()
        return c, self.track(a)

    def unix_peer_closed(self) -> socket.socket:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b.close()
        return self.track(a)

    def netlink(self) -> socket.socket:
        return self.track(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))

    def close_wait(self) -> socket.socket:
        client, server = self.tcp_pair()
        server.close()
        assert wait_for_tcp_state(client, TCP_CLOSE_WAIT)
        return client

    def wait_close_wait(self, sock: socket.socket) -> bool:
        return wait_for_tcp_state(sock, TCP_CLOSE_WAIT)

    def close(self) -> None:
        for s in self._all:
            s.close()
        self._all.clear()
