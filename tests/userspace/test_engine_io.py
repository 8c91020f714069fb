"""The userspace engine on real loopback sockets: backpressure, partial sends, send errors,
no interleaving, Python callables, and the asyncio (uvloop) driver."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from netutil import Pairs, random_chunks, recv_exactly, sha256, wait_until
from sockmap import programs
from sockmap.abi import SkAction
from sockmap.userspace.engine import UserspaceEngine
from sockmap.userspace.psock import RECV_SIZE


def _rss() -> int:
    with open("/proc/self/status") as f:  # noqa: PTH123
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_backpressure_bounds_memory_and_loses_nothing(pairs: Pairs):
    """256 MiB into a consumer that stalls: the engine's queue stays bounded, every byte
    arrives."""
    total = 256 << 20
    high = 1 << 20
    with UserspaceEngine(high_water=high, low_water=high // 4) as eng:
        a, a_srv = pairs()
        b, b_srv = pairs()
        smap = eng.sockmap(2)
        eng.attach(smap, verdict=programs.redirect_key(smap, 1))
        smap[0] = a_srv
        smap[1] = b_srv
        block = os.urandom(1 << 20)
        sent_hash = hashlib.sha256()
        for _ in range(total >> 20):
            sent_hash.update(block)
        sender = threading.Thread(
            target=lambda: [a.sendall(block) for _ in range(total >> 20)],
            daemon=True,
        )
        peak = {"queued": 0, "rss": 0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak["queued"] = max(peak["queued"], eng.pending_bytes(b_srv))
                peak["rss"] = max(peak["rss"], _rss())
                time.sleep(0.002)

        rss0 = _rss()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        sender.start()
        got, h, buf = 0, hashlib.sha256(), bytearray(1 << 20)
        next_stall = 16 << 20
        while got < total:
            if got >= next_stall:  # the consumer stalls now and then
                time.sleep(0.3)
                next_stall += 64 << 20
            n = b.recv_into(buf)
            assert n, "EOF before every byte arrived"
            h.update(memoryview(buf)[:n])
            got += n
        sender.join(30)
        stop.set()
        sampler.join(5)
        assert got == total
        assert h.digest() == sent_hash.digest()
        # Bounded: the target's queue never held more than the high mark plus one read.
        assert peak["queued"] <= high + RECV_SIZE
        assert peak["rss"] - rss0 < 96 << 20, f"RSS grew {(peak['rss'] - rss0) >> 20} MiB"
        assert eng.stats(a_srv).paused > 0  # backpressure really engaged


def test_partial_sends_resume_on_writability(pairs: Pairs):
    with UserspaceEngine() as eng:
        a, a_srv = pairs()
        b, b_srv = pairs()
        b_srv.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.settimeout(None)
        smap = eng.sockmap(2)
        eng.attach(smap, parser=programs.whole_segment(), verdict=programs.redirect_key(smap, 1))
        smap[0] = a_srv
        smap[1] = b_srv
        chunks = random_chunks(8 << 20, seed=21, max_chunk=1 << 20)
        t = threading.Thread(target=lambda: [a.sendall(c) for c in chunks], daemon=True)
        t.start()
        got, digest = 0, hashlib.sha256()
        time.sleep(0.2)  # the reader starts late: the target's small send buffer fills
        while got < 8 << 20:
            piece = b.recv(1500)  # then reads in small pieces
            digest.update(piece)
            got += len(piece)
        t.join(10)
        assert digest.hexdigest() == sha256(chunks)
        assert eng.stats(b_srv).partial_sends > 0


def test_hard_send_error_marks_target_and_is_reported(pairs: Pairs):
    with UserspaceEngine() as eng:
        a, a_srv = pairs()
        b, b_srv = pairs()
        smap = eng.sockmap(2)
        eng.attach(smap, parser=programs.whole_segment(), verdict=programs.redirect_key(smap, 1))
        smap[0] = a_srv
        smap[1] = b_srv
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()  # RST: sending on b_srv now fails
        for _ in range(50):
            a.sendall(b"x" * 10000)
            if eng.send_error_of(b_srv):
                break
            time.sleep(0.02)
        assert eng.send_error_of(b_srv) in (errno.EPIPE, errno.ECONNRESET)
        assert any(ev.kind == "error" and ev.sock is b_srv for ev in eng.events)
        # Its transmit side has stopped: later messages to it are dropped and counted.
        before = eng.stats(a_srv).dropped
        a.sendall(b"after the error")
        assert wait_until(lambda: eng.stats(a_srv).dropped > before)
        assert eng.stats(b_srv).bytes_out == 0


def test_messages_from_two_sources_never_interleave(pairs: Pairs):
    with UserspaceEngine() as eng:
        smap = eng.sockmap(3)
        eng.attach(
            smap, parser=programs.length_prefixed(adjust=4), verdict=programs.redirect_key(smap, 2)
        )
        srcs = []
        for key in (0, 1):
            c, c_srv = pairs()
            smap[key] = c_srv
            srcs.append(c)
        t, t_srv = pairs()
        smap[2] = t_srv
        count, size = 200, 5000

        def send(i: int, sock: socket.socket) -> None:
            for seq in range(count):
                body = struct.pack(">II", i, seq) + bytes([65 + i]) * size
                sock.sendall(struct.pack(">I", len(body)) + body)

        threads = [threading.Thread(target=send, args=(i, s)) for i, s in enumerate(srcs)]
        for th in threads:
            th.start()
        total = 2 * count * (4 + 8 + size)
        got = b""
        t.settimeout(10)
        while len(got) < total:
            got += t.recv(1 << 20)
        for th in threads:
            th.join(10)
        seen = {0: 0, 1: 0}
        pos = 0
        while pos < len(got):
            (length,) = struct.unpack_from(">I", got, pos)
            i, seq = struct.unpack_from(">II", got, pos + 4)
            body = got[pos + 12 : pos + 4 + length]
            assert body == bytes([65 + i]) * size  # whole, not mixed with the other source
            assert seq == seen[i]  # in order per source
            seen[i] += 1
            pos += 4 + length
        assert seen == {0: count, 1: count}


def test_python_callables_as_programs(pairs: Pairs):
    with UserspaceEngine() as eng:
        smap = eng.sockmap(2)

        def parser(ctx, env) -> int:
            return int(ctx.len)

        def verdict(ctx, env) -> int:
            if bytes(ctx.data[:4]) == b"drop":
                return SkAction.DROP
            return env.redirect(smap, 1, 0)

        eng.attach(smap, parser=parser, verdict=verdict)
        a, a_srv = pairs()
        b, b_srv = pairs()
        smap[0] = a_srv
        smap[1] = b_srv
        a.sendall(b"drop this")
        assert wait_until(lambda: eng.stats(a_srv).dropped == 1)
        a.sendall(b"keep this")
        assert recv_exactly(b, 9) == (9, sha256([b"keep this"]))


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_asyncio_driver(pairs: Pairs, loop_kind: str):
    if loop_kind == "uvloop":
        import uvloop  # noqa: PLC0415 - a test dependency (pyproject [test])

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    a, a_srv = pairs()
    b, b_srv = pairs()
    payload = os.urandom(1 << 20)

    async def main() -> bytes:
        with UserspaceEngine(loop=loop) as eng:
            smap = eng.sockmap(2)
            eng.attach(
                smap, parser=programs.whole_segment(), verdict=programs.redirect_key(smap, 1)
            )
            smap[0] = a_srv
            smap[1] = b_srv
            a.setblocking(False)
            b.setblocking(False)
            send = asyncio.ensure_future(loop.sock_sendall(a, payload))
            out = bytearray()
            while len(out) < len(payload):
                out += await asyncio.wait_for(loop.sock_recv(b, 1 << 16), 10)
            await send
            return bytes(out)

    try:
        assert loop.run_until_complete(main()) == payload
    finally:
        loop.close()


def _open_fds() -> set[str]:
    return {p.name for p in Path("/proc/self/fd").iterdir()}


def test_engine_close_releases_fds_and_stops_its_thread(pairs: Pairs):
    a, a_srv = pairs()
    b, b_srv = pairs()
    before_fds = _open_fds()
    before_threads = {t.name for t in threading.enumerate()}
    with UserspaceEngine() as eng:
        smap = eng.sockmap(2)
        eng.hash(4)
        eng.attach(smap, parser=programs.whole_segment(), verdict=programs.redirect_key(smap, 1))
        smap[0] = a_srv
        smap[1] = b_srv
        a.sendall(b"through")
        assert recv_exactly(b, 7)[0] == 7
        assert "sockmap-userspace" in {t.name for t in threading.enumerate()}
    assert wait_until(lambda: _open_fds() == before_fds)
    assert wait_until(lambda: {t.name for t in threading.enumerate()} == before_threads)
    # The sockets are the application's: still open, and plain TCP again.
    a.sendall(b"plain")
    a_srv.settimeout(5)
    assert a_srv.recv(10) == b"plain"


def test_open_engine_userspace_and_auto():
    import sockmap  # noqa: PLC0415
    from sockmap.kernel.features import bpf_access  # noqa: PLC0415

    with sockmap.open_engine("userspace") as eng:
        assert isinstance(eng, UserspaceEngine)
    with sockmap.open_engine("auto") as eng:
        assert eng.name == ("kernel" if bpf_access()[0] else "userspace")


def recv_exactly_of(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


def test_a_redirect_never_reaches_a_socket_that_reused_the_targets_fd(pairs: Pairs):
    """The redirect looks the target up without a syscall while the map's socket object
    holds its fd; when that fd was closed behind the object's back and another socket in
    a map took the number, the full liveness check runs and the message is dropped, as
    the kernel drops a redirect to a key whose socket closed."""
    with UserspaceEngine() as eng:
        src_peer, src = pairs()
        old_peer, old = pairs()
        smap = eng.sockmap(3)
        eng.attach(smap, verdict=programs.redirect_key(smap, 1))
        smap[0] = src
        smap[1] = old
        src_peer.sendall(b"first")
        assert recv_exactly(old_peer, 5) == recv_exactly_of(b"first")
        fd = old.fileno()
        new_peer, accepted = pairs()
        os.close(fd)  # behind the object's back: `old` still answers fileno() == fd
        os.dup2(accepted.fileno(), fd)  # and the number now names another socket
        accepted.close()
        new = socket.socket(fileno=fd)
        smap[2] = new
        src_peer.sendall(b"second")
        new_peer.settimeout(0.5)
        with pytest.raises(TimeoutError):
            new_peer.recv(16)
        assert wait_until(lambda: eng.stats(src).dropped >= 1, timeout=5)
        old.detach()  # its fd number belongs to `new` now
        new.close()
