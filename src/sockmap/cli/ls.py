"""``sockmap ls``: every sockmap and sockhash on this host, read-only."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Lists maps made by any tool (by id), the programs attached to them, and each "
        "entry with its socket (cookie -> addresses and TCP state, from sock_diag). "
        "Values of size 4 hold no cookie: their sockets cannot be named. "
        "example: sockmap ls --json | jq '.[].entries | length'"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--max-entries", type=int, default=1000, help="entries to show per map (1000)")


def run(args: argparse.Namespace) -> int:
    from sockmap.kernel.features import bpf_access  # noqa: PLC0415

    ok, why = bpf_access()
    if not ok:
        print(f"sockmap ls: cannot read the host's maps: {why}", file=sys.stderr)
        return 2
    from sockmap.inspect import list_socket_maps  # noqa: PLC0415

    views = list_socket_maps(args.max_entries)
    if args.json:
        print(json.dumps([v.as_dict() for v in views], indent=2))
        return 0
    if not views:
        print("no sockmap or sockhash on this host")
        return 0
    for v in views:
        name = f" {v.name!r}" if v.name else ""
        print(
            f"{v.kind} id {v.id}{name}: {len(v.entries)} entries (max {v.max_entries}), "
            f"key {v.key_size} B, value {v.value_size} B"
        )

        def one(p: dict[str, object]) -> str:
            text = f"{p['id']} {p['name']!r}"
            counts = p.get("outcomes")
            if isinstance(counts, dict):
                text += " (" + (", ".join(f"{k} {n}" for k, n in counts.items()) or "idle") + ")"
            return text

        progs = "; ".join(
            f"{kind}: " + ", ".join(one(p) for p in ps) for kind, ps in v.programs.items()
        )
        print(f"  programs: {progs or 'none'}")
        for e in v.entries:
            where = f"[{e.index}]" if e.index is not None else e.key
            if e.socket is not None:
                s = e.socket
                sock = (
                    f"{s['protocol']} {s['local'][0]}:{s['local'][1]} -> "
                    f"{s['remote'][0]}:{s['remote'][1]} {s['state']} "
                    f"recv-q {s['rqueue']} send-q {s['wqueue']}"
                )
            elif e.cookie is not None:
                sock = "(not in this network namespace)"
            else:
                sock = "(value size 4: no cookie)"
            cookie = f"cookie {e.cookie} " if e.cookie is not None else ""
            print(f"  {where}: {cookie}{sock}")
        if v.error:
            print(f"  {v.error}")
    return 0
