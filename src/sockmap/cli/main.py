"""The ``sockmap`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from sockmap import __version__
from sockmap.cli import bench, demo, doctor, features, ls, prog, proxy, stats, why

__all__ = ["main"]

Runner = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Runner]] = {
    "bench": (
        "measure paths side by side in one run (direct, raw kernel pair, our engines)",
        bench.add_arguments,
        bench.run,
    ),
    "demo": (
        "run sockmap proxy (splice, then balance) on built-in backends and load, and report",
        demo.add_arguments,
        demo.run,
    ),
    "proxy": (
        "splice clients to backends, or balance their messages, through a sockmap",
        proxy.add_arguments,
        proxy.run,
    ),
    "stats": (
        "show the live counters of a running sockmap proxy",
        stats.add_arguments,
        stats.run,
    ),
    "prog": (
        "assemble, disassemble, load, list and run eBPF programs (run needs no privileges)",
        prog.add_arguments,
        prog.run,
    ),
    "doctor": (
        "check how this kernel's sockmap behaves, item by item (ok / worked around / broken)",
        doctor.add_arguments,
        doctor.run,
    ),
    "ls": (
        "list every sockmap and sockhash on this host, with programs and sockets (read-only)",
        ls.add_arguments,
        ls.run,
    ),
    "why": (
        "say why a socket's messages were or were not redirected (maps, programs, decisions)",
        why.add_arguments,
        why.run,
    ),
    "features": (
        "probe which map, program and attach types and helpers this kernel supports",
        features.add_arguments,
        features.run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sockmap",
        description="Linux BPF sockmap from Python: splice and balance TCP "
        "messages between sockets in the kernel.",
    )
    parser.add_argument("--version", action="version", version=f"sockmap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, add_arguments, runner) in _COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        add_arguments(p)
        p.set_defaults(run=runner)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
