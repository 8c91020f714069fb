"""``sockmap why``: why a socket's messages were (not) redirected."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "examples: sockmap why cookie:16403 | sockmap why 4242:7 (pid:fd) | "
        "sockmap why 127.0.0.1:8080-127.0.0.1:40312 (local-remote)"
    )
    p.add_argument("socket", help="cookie:N, PID:FD, or LOCAL-REMOTE (HOST:PORT-HOST:PORT)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--last", type=int, default=20, help="logged decisions to show (20)")


def run(args: argparse.Namespace) -> int:
    from sockmap.kernel.features import bpf_access  # noqa: PLC0415

    ok, reason = bpf_access()
    if not ok:
        print(f"sockmap why: cannot read the host's maps: {reason}", file=sys.stderr)
        return 2
    from sockmap.inspect import why  # noqa: PLC0415

    try:
        w = why(args.socket, args.last)
    except (ValueError, OSError) as exc:
        print(f"sockmap why: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(w.as_dict(), indent=2))
        return 0
    s = w.socket
    if s is not None:
        print(
            f"socket cookie {s['cookie']}: {s['protocol']} {s['local'][0]}:{s['local'][1]} -> "
            f"{s['remote'][0]}:{s['remote'][1]} {s['state']}, recv-q {s['rqueue']}, "
            f"send-q {s['wqueue']}"
        )
    for m in w.maps:
        where = f"key {m['index']}" if m["index"] is not None else f"key {m['key']}"
        progs = "; ".join(
            f"{k}: " + ", ".join(f"{p['id']} {p['name']!r}" for p in ps)
            for k, ps in m["programs"].items()
        )
        print(f"in {m['kind']} {m['id']} {m['name']!r} under {where}; programs: {progs or 'none'}")
    for prog, counts in w.counters.items():
        nonzero = ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "nothing yet"
        print(f"program {prog!r} (all sockets): {nonzero}")
    if w.decisions:
        print("last decisions about this socket: " + ", ".join(d["outcome"] for d in w.decisions))
    for f in w.findings:
        print(f"- {f}")
    return 0
