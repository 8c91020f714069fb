"""The byte proxies users would pick instead of a sockmap, for ``sockmap bench`` paths:
an asyncio streams proxy, the same on uvloop, an ``os.splice`` proxy (two threads per
connection, pipe in the middle), and socat and HAProxy in TCP mode (external).

    python -m sockmap.bench.proxies asyncio|uvloop|splice --backend 127.0.0.1:9000

prints ``ready PORT`` once listening (on 127.0.0.1) and runs until killed. Each passes
a half-close on, so a transfer ends as it would directly, and sets TCP_NODELAY on both
sides (as HAProxy does), so small messages are not held back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sockmap.bench.procs import listening, stop_process

__all__ = ["EXTERNAL", "PROXY_PATHS", "external_proxy", "main"]

PROXY_PATHS = ("asyncio", "uvloop", "splice", "socat", "haproxy")
EXTERNAL = ("socat", "haproxy")
_CHUNK = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        writer.close()


async def _serve_async(port: int) -> None:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        br, bw = await asyncio.open_connection("127.0.0.1", port)
        for w in (cw, bw):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pipe(cr, bw), _pipe(br, cw))
        cw.close()
        bw.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)  # noqa: T201
    async with server:
        await server.serve_forever()


def _splice_one(src: socket.socket, dst: socket.socket) -> None:
    r, w = os.pipe()
    try:
        while True:
            n = os.splice(src.fileno(), w, _CHUNK)
            if n == 0:
                break
            while n:
                n -= os.splice(r, dst.fileno(), n)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
    except OSError:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)
    finally:
        os.close(r)
        os.close(w)


def _serve_splice(port: int) -> None:
    lst = socket.create_server(("127.0.0.1", 0), backlog=1024)
    print(f"ready {lst.getsockname()[1]}", flush=True)  # noqa: T201
    while True:
        client, _ = lst.accept()
        backend = socket.create_connection(("127.0.0.1", port))
        for sock in (client, backend):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def close_both(c: socket.socket = client, b: socket.socket = backend) -> None:
            c.close()
            b.close()

        done = threading.Barrier(2, action=close_both)

        def run(a: socket.socket, b: socket.socket, done: threading.Barrier = done) -> None:
            _splice_one(a, b)
            with contextlib.suppress(threading.BrokenBarrierError):
                done.wait()

        threading.Thread(target=run, args=(client, backend), daemon=True).start()
        threading.Thread(target=run, args=(backend, client), daemon=True).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def external_proxy(kind: str, backend_port: int, cpu: str) -> Iterator[int]:
    """socat or HAProxy in TCP mode to ``backend_port``, pinned to ``cpu``; yields its port."""
    exe = shutil.which(kind, path="/usr/bin:/usr/sbin:/bin:/sbin")
    if exe is None:
        raise FileNotFoundError(f"{kind} is not installed (Debian package {kind})")
    port = _free_port()
    tmp = tempfile.TemporaryDirectory(prefix="sockmap-bench-")
    if kind == "socat":
        cmd = [
            exe,
            f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=1024,nodelay",
            f"TCP:127.0.0.1:{backend_port},nodelay",
        ]
    else:
        conf = Path(tmp.name, "haproxy.cfg")
        conf.write_text(
            "global\n  maxconn 8000\n  nbthread 1\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n"
            "  timeout server 300s\n"
            f"frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n"
            f"backend b\n  server s1 127.0.0.1:{backend_port}\n"
        )
        cmd = [exe, "-f", str(conf), "-db"]
    pin = [shutil.which("taskset") or "/usr/bin/taskset", "-c", cpu]
    proc = subprocess.Popen(  # noqa: S603 - the installed tool, our own arguments
        [*pin, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not listening(port):  # (a test connection would reach the sink: it counts them)
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start")
            time.sleep(0.05)
        yield port
    finally:
        stop_process(proc)
        tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sockmap.bench.proxies", description=__doc__)
    p.add_argument("kind", choices=("asyncio", "uvloop", "splice"))
    p.add_argument("--backend", required=True, help="HOST:PORT (the host must be 127.0.0.1)")
    args = p.parse_args(argv)
    port = int(args.backend.rsplit(":", 1)[1])
    if args.kind == "splice":
        _serve_splice(port)
    elif args.kind == "uvloop":
        import uvloop  # noqa: PLC0415 - optional, benchmark only

        uvloop.run(_serve_async(port))
    else:
        asyncio.run(_serve_async(port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
