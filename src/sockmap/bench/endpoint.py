"""The load generator's two ends, each run as its own process (``python -m
sockmap.bench.endpoint``) so that neither shares an interpreter with the proxy.

``sink``: listens (printing its port), accepts ``--conns`` connections, reads
``--bytes`` from each with 1 MiB reads, then prints one JSON line ``{"bytes": ...,
"seconds": ...}`` (first byte to last). ``source``: connects ``--conns`` times, prints
``ready``, waits for a line on stdin, writes ``--bytes`` to each connection in
``--block``-byte writes, then half-closes. ``idle``: see :func:`_idle`. Each pins
itself to ``--cpus``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import resource
import socket
import sys
import threading
import time

__all__ = ["main"]


def allow_files(n: int) -> None:
    """Make room for ``n`` descriptors in this process (root may raise the hard limit
    too), or say why there cannot be. (Shared with the harness; stdlib only here.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))
        return
    if hard < n:
        raise OSError(
            errno.EMFILE,
            f"{n} descriptors needed (2 per proxied connection) but the hard limit is "
            f"{hard}: raise it (ulimit -Hn as root, CAP_SYS_RESOURCE) or use fewer connections",
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def _each_conn(conns: list[socket.socket], run: object) -> float:
    """Run ``run(i, conn)`` for every connection at once, one thread each; the seconds
    it took for them all."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(conns)]  # type: ignore[arg-type]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _pin(cpus: str | None) -> None:
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def _sink(args: argparse.Namespace) -> dict[str, float]:
    srv = socket.create_server(("127.0.0.1", 0), backlog=args.conns)
    print(srv.getsockname()[1], flush=True)
    conns = [srv.accept()[0] for _ in range(args.conns)]
    srv.close()
    if args.stall:
        time.sleep(args.stall)  # a consumer that stops reading (workload "stall")
    totals = [0] * len(conns)
    first = [0.0]

    def drain(i: int, c: socket.socket) -> None:
        buf = bytearray(1 << 20)
        got = 0
        while got < args.bytes:
            n = c.recv_into(buf)
            if not n:
                break
            if not first[0]:
                first[0] = time.perf_counter()
            got += n
        totals[i] = got
        c.close()

    threads = [threading.Thread(target=drain, args=(i, c)) for i, c in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"bytes": sum(totals), "seconds": time.perf_counter() - first[0]}


def _source(args: argparse.Namespace) -> dict[str, float]:
    block = os.urandom(args.block)
    conns = [socket.create_connection(("127.0.0.1", args.port)) for _ in range(args.conns)]

    def pump(c: socket.socket) -> None:
        left = args.bytes
        view = memoryview(block)
        while left > 0:
            n = min(left, len(block))
            c.sendall(view[:n])
            left -= n
        c.shutdown(socket.SHUT_WR)

    print("ready", flush=True)
    sys.stdin.readline()  # "go": the harness starts measuring CPU first
    t0 = time.perf_counter()
    threads = [threading.Thread(target=pump, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    for c in conns:
        c.close()
    return {"bytes": args.bytes * len(conns), "seconds": seconds}


def _idle(args: argparse.Namespace) -> dict[str, float]:
    """Hold ``--conns`` connections open through whatever listens on the port read from
    stdin: listen as the backend (printing its port), connect the clients, check one
    byte crosses each connection, print ``ready``, then wait for a line and close."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=4096)
    print(srv.getsockname()[1], flush=True)
    port = int(sys.stdin.readline())
    backends: list[socket.socket] = []

    failed: list[OSError] = []

    def accept() -> None:
        try:
            while len(backends) < args.conns:
                backends.append(srv.accept()[0])
        except OSError as exc:
            failed.append(exc)

    t = threading.Thread(target=accept)
    t.start()
    clients: list[socket.socket] = []
    for _ in range(args.conns):
        clients.append(socket.create_connection(("127.0.0.1", port)))
        while len(clients) - len(backends) > 1024 and t.is_alive():
            time.sleep(0.001)  # keep the accept queues from overflowing
    t.join()
    if failed:
        raise failed[0]
    t0 = time.perf_counter()
    for c in clients:
        c.sendall(b"x")
    arrived = sum(len(b.recv(1)) for b in backends)
    print("ready", flush=True)
    sys.stdin.readline()
    for s in clients + backends:
        s.close()
    srv.close()
    return {"bytes": arrived, "seconds": time.perf_counter() - t0}


def _echo(args: argparse.Namespace) -> dict[str, float]:
    """Echo every connection until it closes (``--conns`` of them, each served as soon as
    it is accepted), then report."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=min(args.conns, 4096))
    print(srv.getsockname()[1], flush=True)
    total = [0]

    def serve(c: socket.socket) -> None:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        with contextlib.suppress(OSError):
            while n := c.recv_into(buf):
                c.sendall(view[:n])
                total[0] += n
        c.close()

    threads = []
    for _ in range(args.conns):
        t = threading.Thread(target=serve, args=(srv.accept()[0],))
        t.start()
        threads.append(t)
    srv.close()
    for t in threads:
        t.join()
    return {"bytes": total[0], "seconds": 0.0}


def _messages(args: argparse.Namespace) -> dict[str, float]:
    """Workload (c)'s client: ``--conns`` connections (spread over the comma-separated
    ``--ports``), each sending ``--count`` length-prefixed messages (2-byte big-endian
    length, 64 B to 4 KiB, each unique) with up to 16 outstanding, and checking that the
    answers are exactly the messages it sent (any order: they may cross backends)."""
    import hashlib  # noqa: PLC0415
    import random  # noqa: PLC0415

    ports = [int(p) for p in args.ports.split(",")]
    conns = [
        socket.create_connection(("127.0.0.1", ports[i % len(ports)]), timeout=30)
        for i in range(args.conns)
    ]
    for c in conns:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print("ready", flush=True)
    sys.stdin.readline()
    results = [0] * len(conns)

    def run(i: int, c: socket.socket) -> None:
        rng = random.Random(i)  # noqa: S311 - load, not secrets
        sent: list[bytes] = []
        window = threading.Semaphore(16)
        got: list[bytes] = []

        def reader() -> None:
            buf = b""
            while len(got) < args.count:
                data = c.recv(1 << 16)
                if not data:
                    return
                buf += data
                while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                    n = 2 + int.from_bytes(buf[:2], "big")
                    got.append(hashlib.blake2b(buf[:n]).digest())
                    buf = buf[n:]
                    window.release()

        t = threading.Thread(target=reader)
        t.start()
        for k in range(args.count):
            body = k.to_bytes(4, "big") + i.to_bytes(4, "big")
            body += rng.randbytes(rng.randint(62, 4094) - len(body))
            msg = len(body).to_bytes(2, "big") + body
            sent.append(hashlib.blake2b(msg).digest())
            window.acquire()
            c.sendall(msg)
        t.join()
        results[i] = len(got) if sorted(got) == sorted(sent) else -1

    seconds = _each_conn(conns, run)
    for c in conns:
        c.close()
    intact = all(r == args.count for r in results)
    return {"messages": sum(max(0, r) for r in results), "seconds": seconds, "intact": intact}


def _churn(args: argparse.Namespace) -> dict[str, float]:
    """``--conns`` connections one after another: connect, a 64-byte round trip, close."""
    print("ready", flush=True)
    sys.stdin.readline()
    msg = os.urandom(64)
    ok = 0
    t0 = time.perf_counter()
    for _ in range(args.conns):
        with socket.create_connection(("127.0.0.1", args.port), timeout=10) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.sendall(msg)
            got = b""
            while len(got) < len(msg):
                piece = c.recv(len(msg) - len(got))
                if not piece:
                    break
                got += piece
            ok += got == msg
            c.shutdown(socket.SHUT_WR)
            c.recv(1)  # the server's FIN, passed on
    return {"conns": ok, "seconds": time.perf_counter() - t0}


def _rr(args: argparse.Namespace) -> dict[str, float]:
    """``--count`` request/response round trips of ``--block`` bytes per connection."""
    conns = [socket.create_connection(("127.0.0.1", args.port)) for _ in range(args.conns)]
    for c in conns:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = os.urandom(args.block)
    samples: list[list[float]] = [[] for _ in conns]
    print("ready", flush=True)
    sys.stdin.readline()

    def run(i: int, c: socket.socket) -> None:
        buf = bytearray(args.block)
        view = memoryview(buf)
        out = samples[i]
        for _ in range(args.count):
            t0 = time.perf_counter()
            c.sendall(msg)
            got = 0
            while got < len(buf):
                n = c.recv_into(view[got:])
                if not n:
                    raise ConnectionError("the peer closed during a round trip")
                got += n
            out.append(time.perf_counter() - t0)
        c.shutdown(socket.SHUT_WR)

    seconds = _each_conn(conns, run)
    lat = sorted(x for s in samples for x in s)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6

    for c in conns:
        c.close()
    return {
        "round_trips": len(lat),
        "seconds": seconds,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sockmap.bench.endpoint")
    p.add_argument("role", choices=("sink", "source", "idle", "echo", "rr", "churn", "messages"))
    p.add_argument("--ports", default="", help="messages: comma-separated ports to connect to")
    p.add_argument("--count", type=int, default=10000, help="rr: round trips per connection")
    p.add_argument("--bytes", type=int, required=True, help="bytes per connection")
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--port", type=int, default=0, help="source: the port to connect to")
    p.add_argument("--block", type=int, default=64 << 10, help="source: bytes per write")
    p.add_argument("--cpus", default=None, help="comma-separated CPUs to pin to")
    p.add_argument(
        "--stall", type=float, default=0.0, help="sink: seconds to read nothing before draining"
    )
    args = p.parse_args(argv)
    _pin(args.cpus)
    role = {
        "sink": _sink,
        "source": _source,
        "idle": _idle,
        "echo": _echo,
        "rr": _rr,
        "churn": _churn,
        "messages": _messages,
    }[args.role]
    if args.role == "idle":
        allow_files(2 * args.conns + 64)
    result = role(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
