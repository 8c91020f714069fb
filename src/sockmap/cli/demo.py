"""``sockmap demo``: a client, a pair-splicing proxy on the kernel sockmap, and an echo backend.

Everything runs on loopback in this process. The client pushes random bytes
through the proxy, the backend echoes them, and the client checks that every
byte came back in order; then a ping-pong gives a latency sample and a
half-close shows that FIN crosses the splice both ways.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from typing import cast

from sockmap._closeable import Closeable
from sockmap.abi import AttachType
from sockmap.datapath.splice import KernelSplicer, Mode, Splicer
from sockmap.errors import BpfError, SockmapError
from sockmap.kernel.attach import query
from sockmap.kernel.engine import Attachment, KernelEngine
from sockmap.kernel.features import bpf_access

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
        "--mode",
        choices=("strparser", "verdict"),
        default="strparser",
        help="kernel attach mode: stream parser + verdict, or verdict only (default: strparser)",
    )
    p.add_argument(
        "--mib",
        type=int,
        default=64,
        help="MiB to push through the proxy (default: 64)",
    )
    p.add_argument(
        "--pings",
        type=int,
        default=500,
        help="ping-pong round trips to time (default: 500)",
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="give up after SECONDS (default: 60)"
    )


class EchoBackend:
    """A thread-per-connection echo server on loopback that half-closes after the client does."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.echoed = 0
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

    def _echo(self, conn: socket.socket) -> None:
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
                self.echoed += n
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for t in self._threads:
            t.join(timeout=5)


class SpliceProxy:
    """Accepts clients, connects each to the backend, and hands the pair to the splicer."""

    def __init__(self, splicer: Splicer, backend: tuple[str, int]) -> None:
        self.splicer = splicer
        self.backend = backend
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._serve, name="proxy-accept", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.backend, timeout=5)
                upstream.settimeout(None)
                self.splicer.splice(client, upstream)
            except (OSError, SockmapError) as e:
                self.errors.append(str(e))
                client.close()

    def close(self) -> None:
        self.listener.close()
        self._thread.join(timeout=5)


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


def _wait(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.01)
    return False


def _open(args: argparse.Namespace) -> tuple[Closeable, Splicer] | None:
    """The engine and splicer ``--engine`` asks for, saying which and why; None if unavailable."""
    mode = cast("Mode", args.mode)
    permitted, why = bpf_access()
    if args.engine == "kernel" and not permitted:
        print(f"sockmap demo: the kernel engine is unavailable: {why}")
        return None
    if args.engine == "kernel" or (args.engine == "auto" and permitted):
        print(f"engine: kernel ({why}; picked by --engine {args.engine}), mode: {mode}")
        kengine = KernelEngine()
        return kengine, KernelSplicer(kengine, 64, mode)
    from sockmap.userspace.engine import UserspaceEngine  # noqa: PLC0415 - only when used
    from sockmap.userspace.splice import UserspaceSplicer  # noqa: PLC0415

    reason = "asked for" if args.engine == "userspace" else f"the kernel's is unavailable: {why}"
    print(f"engine: userspace ({reason}; picked by --engine {args.engine}), mode: {mode}")
    uengine = UserspaceEngine()
    return uengine, UserspaceSplicer(uengine, 64, mode)


def _attached(splicer: Splicer) -> str:
    """Which programs are attached, as the engine reports them."""
    att = splicer.attachment
    if isinstance(att, Attachment):
        kinds = (AttachType.SK_SKB_STREAM_PARSER, att.verdict_kind)
        return f"programs attached (ids): { {k.name: query(att.map, k) for k in kinds} }"
    names = [p.name for p in (att.parser, att.verdict) if p is not None]
    return f"programs attached (userspace VM): {names}"


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every byte came back intact and every connection closed cleanly."""
    opened = _open(args)
    if opened is None:
        return 2
    engine, splicer = opened
    total = args.mib * 1024 * 1024
    backend = EchoBackend()
    try:
        with engine, splicer:
            proxy = SpliceProxy(splicer, backend.address)
            try:
                print(
                    f"proxy {proxy.address[0]}:{proxy.address[1]} -> echo backend "
                    f"{backend.address[0]}:{backend.address[1]}"
                )
                print(f"pushing {args.mib} MiB of random bytes through the splice and back ...")
                bulk = _bulk(proxy.address, total, args.timeout)
                rtts = _pings(proxy.address, args.pings, args.timeout)
                closed = _wait(lambda: splicer.active == 0, 5.0)
                smap = splicer.sockmap
                attached = _attached(splicer)
                stats = splicer.stats
                mib_s = 2 * bulk.received / bulk.seconds / 2**20 if bulk.seconds else 0.0
                print(
                    f"bytes moved: {bulk.sent} sent, {bulk.received} echoed back "
                    f"({2 * bulk.received} through the proxy, both directions)"
                )
                print(f"throughput: {mib_s:.0f} MiB/s through the proxy over {bulk.seconds:.2f} s")
                rtts_us = sorted(r * 1e6 for r in rtts)
                p99 = rtts_us[min(len(rtts_us) - 1, int(len(rtts_us) * 0.99))]
                print(
                    f"latency (64 B ping-pong, {len(rtts)} round trips): "
                    f"median {statistics.median(rtts_us):.0f} us, p99 {p99:.0f} us"
                )
                print(
                    f"map: {smap.kind} {smap.name!r} id {smap.info().id}, "
                    f"{smap.spec.max_entries} slots, {len(list(smap.items()))} in use now; "
                    f"{attached}"
                )
                print(
                    f"splice: {stats.pairs_opened} pairs opened, {stats.pairs_closed} closed, "
                    f"{stats.fins_forwarded} FINs forwarded, {stats.fins_forced} forced, "
                    f"{stats.resets} resets"
                )
                ok = (
                    bulk.intact
                    and bulk.received == total
                    and bulk.eof_seen
                    and closed
                    and stats.fins_forced == 0
                    and not proxy.errors
                )
                verdict = "OK: every byte came back intact, in order, and FIN crossed both ways"
                print(verdict if ok else f"FAILED: {bulk}, closed={closed}, errors={proxy.errors}")
                return 0 if ok else 1
            finally:
                proxy.close()
    except BpfError as e:
        print(f"sockmap demo: {e}")
        return 2
    finally:
        backend.close()
