"""``sockmap demo``: ``sockmap proxy`` on built-in backends and load, with a summary.

Everything runs on loopback in this process:

1. splice mode: a client pushes random bytes through the proxy to an echo backend
   and checks every byte came back in order, then times a 64-byte ping-pong;
2. balance mode (DNS-style framing, round robin): several clients send request after
   request through the proxy to two backends that tag each answer with their name;
   every answer must come back whole, to the client that asked.

The kernel engine runs where ``bpf()`` is permitted (``--engine auto``), else the
userspace engine; the demo says which and why.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field

from sockmap.bench.messages import TaggingServer, frame, read_message
from sockmap.doctor import choose_engine
from sockmap.errors import SockmapError
from sockmap.kernel.features import bpf_access
from sockmap.proxy import Proxy, ProxyConfig

__all__ = ["add_arguments", "run"]

CHUNK = 256 * 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=("auto", "kernel", "userspace"),
        default="auto",
        help="which sockmap to use (default: auto = the kernel's where bpf() is permitted, "
        "else the userspace engine)",
    )
    p.add_argument(
        "--mib", type=int, default=64, help="MiB to push through the splice (default: 64)"
    )
    p.add_argument(
        "--pings", type=int, default=500, help="splice ping-pong round trips (default: 500)"
    )
    p.add_argument(
        "--clients", type=int, default=4, help="balance-mode clients at once (default: 4)"
    )
    p.add_argument(
        "--messages",
        type=int,
        default=1000,
        help="request/response round trips per balance-mode client (default: 1000)",
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="give up after SECONDS (default: 60)"
    )


class EchoBackend:
    """A thread-per-connection echo server on loopback that half-closes after the client does."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, name="echo-accept", daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while True:
                try:
                    n = conn.recv_into(buf)
                except OSError:
                    return
                if not n:
                    break
                conn.sendall(view[:n])
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for t in self._threads:
            t.join(timeout=5)


@dataclass
class Transfer:
    sent: int
    received: int
    seconds: float
    intact: bool
    eof_seen: bool


def _bulk(address: tuple[str, int], total: int, timeout: float) -> Transfer:
    """Send ``total`` random bytes, half-close, read the echo to EOF, compare digests."""
    sock = socket.create_connection(address, timeout=timeout)
    block = os.urandom(CHUNK)
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    received = 0

    def send() -> None:
        left = total
        while left:
            piece = block[: min(left, len(block))]
            sock.sendall(piece)
            sent_hash.update(piece)
            left -= len(piece)
        sock.shutdown(socket.SHUT_WR)

    start = time.perf_counter()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    buf = bytearray(CHUNK)
    eof = False
    with sock:
        while True:
            n = sock.recv_into(buf)
            if not n:
                eof = True
                break
            recv_hash.update(memoryview(buf)[:n])
            received += n
    seconds = time.perf_counter() - start
    sender.join(timeout)
    return Transfer(total, received, seconds, sent_hash.digest() == recv_hash.digest(), eof)


def _pings(address: tuple[str, int], count: int, timeout: float) -> list[float]:
    """Round-trip times (seconds) of ``count`` 64-byte messages."""
    rtts: list[float] = []
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = b"p" * 64
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(msg)
            got = 0
            while got < len(msg):
                chunk = sock.recv(len(msg) - got)
                if not chunk:
                    raise ConnectionError("the proxy closed the ping connection early")
                got += len(chunk)
            rtts.append(time.perf_counter() - t0)
    return rtts


@dataclass
class Conversation:
    """What the balance-mode clients saw."""

    rtts: list[float] = field(default_factory=list)
    share: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    wrong: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _converse(
    address: tuple[str, int], count: int, seed: int, timeout: float, out: Conversation
) -> None:
    """``count`` request/response round trips; each answer must be the tag plus the request."""
    rng = random.Random(seed)  # noqa: S311 - load, not secrets
    rtts: list[float] = []
    share: dict[str, int] = {}
    moved = wrong = 0
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(count):
                body = i.to_bytes(4, "big") + rng.randbytes(rng.randint(12, 1020))
                t0 = time.perf_counter()
                sock.sendall(frame(body))
                answer = read_message(sock)
                rtts.append(time.perf_counter() - t0)
                if answer is None or answer[1:] != body:
                    wrong += 1
                    continue
                tag = answer[:1].decode()
                share[tag] = share.get(tag, 0) + 1
                moved += 2 * (len(body) + 2) + 1
    except (OSError, EOFError) as exc:
        with out.lock:
            out.errors.append(str(exc))
    with out.lock:
        out.rtts += rtts
        out.bytes += moved
        out.wrong += wrong
        for tag, n in share.items():
            out.share[tag] = out.share.get(tag, 0) + n


def _percentiles_us(samples: list[float]) -> tuple[float, float]:
    if not samples:
        return 0.0, 0.0
    us = sorted(s * 1e6 for s in samples)
    return statistics.median(us), us[min(len(us) - 1, int(len(us) * 0.99))]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _engine_line(choice: str) -> tuple[str, str] | None:
    """(engine to use, the sentence saying why), or None when the kernel's is asked for and
    refused (the reason printed)."""
    permitted, why = bpf_access()
    if choice == "kernel" and not permitted:
        print(f"sockmap demo: the kernel engine is unavailable: {why}")
        return None
    name, reason = choose_engine(choice)
    return name, f"engine: {name} ({reason}; picked by --engine {choice})"


def run(args: argparse.Namespace) -> int:
    """Run both parts; 0 when every byte and every answer came back intact."""
    picked = _engine_line(args.engine)
    if picked is None:
        return 2
    engine, line = picked
    print(line)
    echo = EchoBackend()
    tagged = [TaggingServer(b"A"), TaggingServer(b"B")]
    try:
        return _run(args, engine, echo, tagged)
    except (OSError, SockmapError) as exc:
        print(f"sockmap demo: {exc}")
        return 2
    finally:
        echo.close()
        for t in tagged:
            t.close()


def _run(
    args: argparse.Namespace, engine: str, echo: EchoBackend, tagged: list[TaggingServer]
) -> int:
    total = args.mib << 20
    splice_cfg = ProxyConfig(
        listen=["127.0.0.1:0"],
        backends=["{}:{}".format(*echo.address)],
        engine=engine,  # type: ignore[arg-type]
    )
    with Proxy(splice_cfg) as proxy:
        address = proxy.addresses[0]
        print(
            f"1/2 splice: proxy {address[0]}:{address[1]} -> echo backend "
            f"{echo.address[0]}:{echo.address[1]}; {args.mib} MiB there and back, then "
            f"{args.pings} pings ..."
        )
        bulk = _bulk(address, total, args.timeout)
        pings = _pings(address, args.pings, args.timeout)
        splice_closed = _wait(lambda: proxy.active == 0, 10.0)
        sstats = proxy.splicer.stats
    balance_cfg = ProxyConfig(
        listen=["127.0.0.1:0"],
        backends=[t.address for t in tagged],
        mode="balance",
        framing="dns",
        engine=engine,  # type: ignore[arg-type]
    )
    talk = Conversation()
    with Proxy(balance_cfg) as proxy:
        address = proxy.addresses[0]
        print(
            f"2/2 balance: proxy {address[0]}:{address[1]} -> backends A {tagged[0].address}, "
            f"B {tagged[1].address} (DNS-style framing, round robin); {args.clients} clients "
            f"x {args.messages} requests ..."
        )
        threads = [
            threading.Thread(target=_converse, args=(address, args.messages, i, args.timeout, talk))
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.timeout)
        balance_closed = _wait(lambda: proxy.active == 0, 10.0)
        assert proxy.balancer is not None
        counts = proxy.balancer.read_counters()
        bstats = proxy.balancer.stats
        map_line = (
            f"map: {proxy.balancer.sockmap.kind} {proxy.balancer.sockmap.name!r}, "
            f"verdict counters: requests A {counts.requests[0][0]}, B {counts.requests[1][0]}; "
            f"dropped {counts.dropped[0]}"
        )

    asked = args.clients * args.messages
    answered = sum(talk.share.values())
    p50s, p99s = _percentiles_us(pings)
    p50b, p99b = _percentiles_us(talk.rtts)
    mib_s = 2 * bulk.received / bulk.seconds / 2**20 if bulk.seconds else 0.0
    share = ", ".join(
        f"{tag} {100 * n / max(1, answered):.1f}%" for tag, n in sorted(talk.share.items())
    )
    rows = [
        ("run", "bytes", "messages", "p50 µs", "p99 µs", "per-backend share"),
        (
            "splice",
            f"{_mib(2 * bulk.received)} ({mib_s:.0f} MiB/s)",
            f"{len(pings)} pings",
            f"{p50s:.0f}",
            f"{p99s:.0f}",
            "echo 100%",
        ),
        (
            "balance",
            _mib(talk.bytes),
            f"{answered}/{asked}",
            f"{p50b:.0f}",
            f"{p99b:.0f}",
            share or "-",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nengine: {engine}")
    for i, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(map_line)
    print(
        f"splice: {sstats.pairs_opened} pairs, {sstats.fins_forwarded} FINs forwarded, "
        f"{sstats.fins_forced} forced, {sstats.resets} resets; balance: "
        f"{bstats.groups_opened} clients, {bstats.parser_errors} parser errors, "
        f"{bstats.resets} resets"
    )
    problems = []
    if not (bulk.intact and bulk.received == total and bulk.eof_seen):
        problems.append(f"splice transfer {bulk}")
    if not splice_closed or sstats.fins_forced or sstats.resets:
        problems.append("splice connections did not close cleanly")
    if answered != asked or talk.wrong or talk.errors:
        problems.append(
            f"balance: {answered}/{asked} answered, {talk.wrong} wrong, errors {talk.errors[:3]}"
        )
    if len(talk.share) != 2:
        problems.append(f"balance: not every backend answered ({talk.share})")
    if not balance_closed:
        problems.append("balance connections did not close")
    if problems:
        print("FAILED: " + "; ".join(problems))
        return 1
    print(
        "OK: every byte came back intact and FIN crossed both ways (splice); every request "
        "was answered whole, by both backends (balance)"
    )
    return 0


def _wait(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.01)
    return False
