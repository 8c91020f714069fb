"""Workload (c): message load balancing. 8 clients send length-prefixed messages (2-byte
length, 64 B to 4 KiB, each unique, 16 outstanding per client) through the path to 4
echo backends; every client checks it got back exactly what it sent. Messages/s and
whole-machine CPU per message.

Paths: ``direct`` (the clients spread over the 4 backends themselves: the limit),
``kernel`` and ``userspace`` (``sockmap proxy --mode balance``, round robin), and the
``asyncio`` and ``uvloop`` length-prefixed LBs of :mod:`sockmap.bench.lb`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

from sockmap.bench.common import endpoint, readline
from sockmap.bench.cpu import cpu_sample
from sockmap.bench.dnsbench import balancer

__all__ = ["MSG_PATHS", "MsgTrial", "run_messages"]

MSG_PATHS = ("direct", "kernel", "userspace", "asyncio", "uvloop")


@dataclass
class MsgTrial:
    path: str
    placement: str
    messages: int
    seconds: float
    busy_cpu: float
    intact: bool

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_message(self) -> float:
        return 1e6 * self.busy_cpu / self.messages if self.messages else float("nan")


def run_messages(
    path: str,
    placement: object,
    count: int,
    timeout: float,
    *,
    clients: int = 8,
    backends: int = 4,
) -> MsgTrial:
    load = str(getattr(placement, "load", "0"))
    proxy_cpu = str(getattr(placement, "proxy", "0"))
    # (the balancer's start-up probe is one more client, through every backend)
    per_backend = clients // backends if path == "direct" else clients + 1
    procs = [endpoint("echo", 0, per_backend, load) for _ in range(backends)]
    cli = None
    try:
        ports = [int(readline(p, 10)) for p in procs]
        ctx: contextlib.AbstractContextManager[int | None]
        if path == "direct":
            ctx = contextlib.nullcontext(None)
        else:
            ctx = balancer(path, proxy_cpu, [f"127.0.0.1:{p}" for p in ports])
        with ctx as port:
            targets = ports if port is None else [port]
            cli = endpoint(
                "messages",
                0,
                clients,
                load,
                0,
                "--ports",
                ",".join(map(str, targets)),
                "--count",
                str(count),
            )
            assert cli.stdin is not None
            if readline(cli, 30).strip() != "ready":
                raise RuntimeError(f"{path}: the clients could not connect")
            before = cpu_sample()
            cli.stdin.write("go\n")
            cli.stdin.flush()
            result = json.loads(readline(cli, timeout))
            used = cpu_sample() - before
        return MsgTrial(
            path,
            str(getattr(placement, "name", "")),
            int(result["messages"]),
            float(result["seconds"]),
            used.busy,
            bool(result["intact"]) and int(result["messages"]) == clients * count,
        )
    finally:
        for p in [*procs, *([cli] if cli is not None else [])]:
            p.kill()
            p.wait(5)
