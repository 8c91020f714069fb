"""``sockmap features``: what this kernel lets us do, probed live."""

from __future__ import annotations

import argparse
import json

from sockmap.kernel.features import probe

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--no-helpers",
        action="store_true",
        help="skip the per-helper probes (faster)",
    )


def _yes(values: dict[str, str]) -> str:
    good = [k for k, v in values.items() if v == "yes"]
    bad = [f"{k} ({v})" for k, v in values.items() if v != "yes"]
    text = ", ".join(good) or "none"
    return text + (f"; not available: {', '.join(bad)}" if bad else "")


def run(args: argparse.Namespace) -> int:
    """Print the probe; exit 0 whether or not bpf() is permitted (the answer is the output)."""
    feats = probe(helpers=not args.no_helpers)
    if args.json:
        print(json.dumps(feats.as_dict(), indent=2, sort_keys=True))
        return 0
    caps = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in feats.capabilities.items())
    print(f"kernel: {feats.kernel}")
    print(f"bpf(): {'permitted' if feats.permitted else 'REFUSED'} - {feats.reason}")
    print(f"capabilities: {caps}")
    print(
        f"bpffs mounted at /sys/fs/bpf: {'yes' if feats.bpffs else 'no'}; "
        f"BTF: {'yes' if feats.btf else 'no'}"
    )
    if not feats.permitted:
        return 0
    print(f"map types: {_yes(feats.map_types)}")
    print(f"program types: {_yes(feats.prog_types)}")
    print(f"attach types: {_yes(feats.attach_types)}")
    for ptype, helpers in feats.helpers.items():
        have = [h for h, ok in helpers.items() if ok]
        missing = [h for h, ok in helpers.items() if not ok]
        print(f"helpers for {ptype} ({len(have)}/{len(helpers)} probed): {', '.join(have)}")
        if missing:
            print(f"  not callable from {ptype}: {', '.join(missing)}")
    return 0
