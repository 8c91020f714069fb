"""The C load generator: it checks every byte, and a corruption on the way is caught."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Callable

import pytest

from sockmap.bench.native import fastend

BLOCK = 65536


@pytest.fixture(scope="module")
def exe() -> str:
    built = fastend()
    if built is None:
        pytest.skip("no C compiler here: the harness runs the Python load generator")
    return str(built)


def relay(
    listen_port_to: int, tamper: Callable[[int, bytes], bytes]
) -> tuple[int, threading.Thread]:
    """A one-connection relay to ``listen_port_to`` that passes each chunk through
    ``tamper(offset, chunk)``; returns its port."""
    srv = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        c, _ = srv.accept()
        srv.close()
        up = socket.create_connection(("127.0.0.1", listen_port_to))
        off = 0
        while chunk := c.recv(1 << 16):
            up.sendall(tamper(off, chunk))
            off += len(chunk)
        up.shutdown(socket.SHUT_WR)
        up.recv(1)
        up.close()
        c.close()

    t = threading.Thread(target=run)
    t.start()
    return srv.getsockname()[1], t


def transfer(exe: str, nbytes: int, tamper: Callable[[int, bytes], bytes] | None) -> dict[str, int]:
    sink = subprocess.Popen(
        [exe, "sink", "--bytes", str(nbytes)], stdout=subprocess.PIPE, text=True
    )
    assert sink.stdout is not None
    port = int(sink.stdout.readline())
    t = None
    if tamper is not None:
        port, t = relay(port, tamper)
    src = subprocess.Popen(
        [exe, "source", "--bytes", str(nbytes), "--port", str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert src.stdout is not None
        assert src.stdin is not None
        assert src.stdout.readline().strip() == "ready"
        src.stdin.write("go\n")
        src.stdin.flush()
        out, _ = sink.communicate(timeout=60)
        src.communicate(timeout=60)
    finally:
        for p in (sink, src):
            p.kill()
            p.wait(5)
        if t is not None:
            t.join(10)
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_an_intact_stream_checks_clean(exe: str) -> None:
    res = transfer(exe, 8 * BLOCK + 123, None)
    assert res["bytes"] == 8 * BLOCK + 123
    assert res["corrupt_at"] == -1


def test_a_flipped_byte_is_found_at_its_offset(exe: str) -> None:
    at = 3 * BLOCK + 4001

    def flip(off: int, chunk: bytes) -> bytes:
        if off <= at < off + len(chunk):
            b = bytearray(chunk)
            b[at - off] ^= 0x40
            return bytes(b)
        return chunk

    res = transfer(exe, 8 * BLOCK, flip)
    assert res["corrupt_at"] == at


def test_a_swapped_pair_of_blocks_is_found(exe: str) -> None:
    """Blocks share their body: only the index stamped in each tells them apart."""
    data = bytearray()
    state: list[str] = []

    def swap_first_two(off: int, chunk: bytes) -> bytes:
        if state:
            return chunk
        data.extend(chunk)
        if len(data) < 2 * BLOCK:
            return b""
        state.append("swapped")
        d = bytes(data)
        return d[BLOCK : 2 * BLOCK] + d[:BLOCK] + d[2 * BLOCK :]

    res = transfer(exe, 8 * BLOCK, swap_first_two)
    assert res["bytes"] == 8 * BLOCK
    assert res["corrupt_at"] == 0


def test_rr_fails_when_an_answer_differs(exe: str) -> None:
    srv = socket.create_server(("127.0.0.1", 0))

    def bad_echo() -> None:
        c, _ = srv.accept()
        n = 0
        while chunk := c.recv(1 << 16):
            n += 1
            c.sendall(chunk if n < 5 else chunk[:-1] + b"?")
        c.close()

    t = threading.Thread(target=bad_echo)
    t.start()
    rr = subprocess.Popen(
        [exe, "rr", "--block", "64", "--count", "50", "--port", str(srv.getsockname()[1])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = rr.communicate("go\n", timeout=30)
    finally:
        rr.kill()
        rr.wait(5)
        srv.close()
        t.join(10)
    assert rr.returncode == 1
    assert "came back different" in err
