"""A plain asyncio (or uvloop) length-prefixed message load balancer: what a user would write
instead of a sockmap, and the benchmark's yardstick for balance mode.

Each client gets a connection to every backend; each message (2-byte big-endian length,
DNS over TCP) goes to the next backend in turn, and each answer back to the client.

    python -m sockmap.bench.lb --listen 127.0.0.1:0 --backend 127.0.0.1:5301 \\
        --backend 127.0.0.1:5302 [--uvloop]

It prints ``ready PORT`` once listening and runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys

__all__ = ["main"]


async def _pump_answers(reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            head = await reader.readexactly(2)
            body = await reader.readexactly(int.from_bytes(head, "big"))
            client.write(head + body)


async def _serve(
    backends: list[tuple[str, int]], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    conns = [await asyncio.open_connection(h, p) for h, p in backends]
    tasks = [asyncio.create_task(_pump_answers(r, writer)) for r, _ in conns]
    turn = itertools.cycle([w for _, w in conns])
    try:
        while True:
            head = await reader.readexactly(2)
            body = await reader.readexactly(int.from_bytes(head, "big"))
            next(turn).write(head + body)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        for _, w in conns:
            w.close()
        for t in tasks:
            t.cancel()
        writer.close()


async def _main(listen: tuple[str, int], backends: list[tuple[str, int]]) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve(backends, r, w), listen[0], listen[1], backlog=1024
    )
    port = server.sockets[0].getsockname()[1]
    print(f"ready {port}", flush=True)  # noqa: T201 - the harness reads it
    async with server:
        await server.serve_forever()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sockmap.bench.lb", description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--backend", action="append", required=True)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = p.parse_args(argv)
    coro = _main(_addr(args.listen), [_addr(b) for b in args.backend])
    if args.uvloop:
        import uvloop  # noqa: PLC0415 - optional, benchmark only

        uvloop.run(coro)
    else:
        asyncio.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
