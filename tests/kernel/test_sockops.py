"""SOCK_OPS on a cgroup: an unmodified client and server, run in a child cgroup, get
their connection's sockets put in a SOCKHASH (or the seed's SOCKMAP) by the ready
programs, and a verdict then acts on their traffic without either calling our API."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgroups import fresh_cgroup, inside
from netutil import recv_exactly, sha256, wait_until
from sockmap import asm, programs
from sockmap.abi import SK_BUFF, Helper, SkAction
from sockmap.asm import R0, R1, R2, R3, R4, R6, R10
from sockmap.kernel.engine import KernelEngine
from sockmap.programs.keys import build_key, store_own
from sockmap.programs.sockops import PASSIVE_BASE

pytestmark = pytest.mark.kernel

SERVER = """
import socket, sys, time
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
sys.stdin.readline()  # never reads the connection: the kernel answers for it
"""

CLIENT = """
import socket, sys
port = int(sys.argv[1])
c = socket.create_connection(("127.0.0.1", port), timeout=10)
print(c.getsockname()[1], flush=True)
if not sys.stdin.readline():
    sys.exit(0)  # told to stop
c.sendall(b"ping" * 100)
got = b""
while len(got) < 400:
    got += c.recv(1000)
print("echoed" if got == b"ping" * 100 else "wrong", flush=True)
"""

_SKB = {f: SK_BUFF.offset(f) for f in ("local_ip4", "remote_ip4", "local_port", "remote_port")}


def echo_on_port(sockhash: object, port: int) -> asm.Program:
    """SK_SKB verdict: what a socket whose local port is ``port`` receives goes straight
    back out of it (redirected to itself, by its 4-tuple key); others pass."""
    return asm.Program(
        [
            asm.mov(R6, R1),
            asm.ldx(asm.W, R0, R6, _SKB["local_port"]),
            asm.jne(R0, port, "pass"),
            *store_own(R6, _SKB, -16),
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, sockhash),
            asm.mov(R3, R10),
            asm.add(R3, -16),
            asm.mov(R4, 0),
            asm.call(Helper.sk_redirect_hash),
            asm.exit_(),
            asm.label("pass"),
            asm.mov(R0, SkAction.PASS),
            asm.exit_(),
        ],
        name="echo_on_port",
    )


@pytest.fixture
def cgroup(bpf: None) -> Iterator[Path]:
    with fresh_cgroup() as cg:
        yield cg


def _MOVE_IN(cg: Path) -> list[str]:  # noqa: N802 - reads as the command it is
    return ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"]


def in_cgroup(cg: Path, code: str, *args: str) -> subprocess.Popen[str]:
    """``python -c code`` started inside ``cg`` (it moves itself there before running)."""
    return subprocess.Popen(
        [*_MOVE_IN(cg), sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def occupied(m: object, key: int) -> bool:
    try:
        m.lookup(key)  # type: ignore[attr-defined]
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def stop(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        with contextlib.suppress(OSError, ValueError):
            assert p.stdin is not None
            p.stdin.close()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def test_sock_ops_puts_their_sockets_in_a_sockhash_and_a_verdict_echoes(cgroup: Path) -> None:
    with KernelEngine() as eng:
        h = eng.sockhash(64, key_size=16)
        server = in_cgroup(cgroup, SERVER)
        client = None
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            eng.attach(h, verdict=echo_on_port(h, port))
            eng.attach_cgroup(cgroup, programs.add_established(h))
            client = in_cgroup(cgroup, CLIENT, str(port))
            assert client.stdout is not None
            cport = int(client.stdout.readline())
            ends = {
                build_key(("127.0.0.1", cport), ("127.0.0.1", port)),
                build_key(("127.0.0.1", port), ("127.0.0.1", cport)),
            }
            assert wait_until(lambda: ends <= set(h.keys())), (ends, set(h.keys()))
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == "echoed"
        finally:
            stop(*(p for p in (client, server) if p is not None))


def test_the_seeds_sockmap_variant_keys_both_ends_by_the_client_port(cgroup: Path) -> None:
    with KernelEngine() as eng:
        m = eng.sockmap(2 * PASSIVE_BASE)
        eng.attach_cgroup(cgroup, programs.add_established_map(m))
        server = in_cgroup(cgroup, SERVER)
        client = None
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            client = in_cgroup(cgroup, CLIENT, str(port))
            assert client.stdout is not None
            cport = int(client.stdout.readline())
            # A SOCKMAP iterates every index, filled or not: look the two keys up.
            assert wait_until(lambda: occupied(m, cport) and occupied(m, PASSIVE_BASE + cport))
            assert not occupied(m, cport + 1)
        finally:
            stop(*(p for p in (client, server) if p is not None))


def test_detach_stops_the_insertions(cgroup: Path) -> None:
    with KernelEngine() as eng:
        h = eng.sockhash(64, key_size=16)
        att = eng.attach_cgroup(cgroup, programs.add_established(h))
        att.detach()
        server = in_cgroup(cgroup, SERVER)
        client = None
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            client = in_cgroup(cgroup, CLIENT, str(port))
            assert client.stdout is not None
            client.stdout.readline()
            assert not wait_until(lambda: bool(list(h.keys())), timeout=0.5)
        finally:
            stop(*(p for p in (client, server) if p is not None))


def test_local_acceleration_skips_tcp_and_delivers_every_byte(cgroup: Path) -> None:
    """The service-mesh recipe: sock_ops puts both ends of each local connection in a
    SOCKHASH, and an SK_MSG verdict redirects every send straight onto the peer's
    receive queue. 8 MiB each way arrive byte-exact, and TCP carries none of it."""
    from sockmap.datapath.tcp import tcp_counters  # noqa: PLC0415

    with KernelEngine() as eng:
        h = eng.sockhash(64, key_size=16)
        eng.attach(h, msg_verdict=programs.redirect_to_peer(h))
        eng.attach_cgroup(cgroup, programs.add_established(h))
        with inside(cgroup):
            listener = socket.create_server(("127.0.0.1", 0))
            client = socket.create_connection(listener.getsockname(), timeout=10)
            server, _ = listener.accept()
        listener.close()
        server.settimeout(10)
        try:
            assert wait_until(lambda: len(list(h.keys())) == 2)
            payload = os.urandom(8 << 20)
            sender = threading.Thread(target=client.sendall, args=(payload,))
            sender.start()
            got = recv_exactly(server, len(payload))
            sender.join(10)
            assert got == (len(payload), sha256([payload]))
            back = threading.Thread(target=server.sendall, args=(payload[::-1],))
            back.start()
            client.settimeout(10)
            assert recv_exactly(client, len(payload)) == (len(payload), sha256([payload[::-1]]))
            back.join(10)
            for s in (client, server):
                assert tcp_counters(s).bytes_acked <= 1  # the SYN/FIN aside: no data by TCP
        finally:
            client.close()
            server.close()
