"""``sockmap doctor``: check, item by item, how this kernel's sockmap behaves."""

from __future__ import annotations

import argparse
import json
import sys

from sockmap.doctor import NEEDED, PROBES, run_doctor, save_report

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "verdicts: ok; worked around (the kernel falls short, the tool makes up for it); "
        "broken; absent (an older kernel).\nexit status: 0 the kernel engine can run here "
        "(items it does not use may still be broken for other applications), 1 something it "
        "needs is broken, 2 bpf() refused.\nitems: " + ", ".join(PROBES) + "\n"
        "example: sockmap doctor --json > doctor.json"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--only", help="comma-separated items to check (default: all); the report is not cached"
    )


def run(args: argparse.Namespace) -> int:
    only = [x.strip() for x in args.only.split(",")] if args.only else None
    unknown = set(only or []) - set(PROBES)
    if unknown:
        print(f"sockmap doctor: unknown items {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2

    def progress(item: str) -> None:
        print(f"checking {item} ...", file=sys.stderr, flush=True)

    report = run_doctor(only, progress=None if args.json else progress)
    saved = save_report(report) if only is None and report.verdict_of("bpf") == "ok" else None
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"kernel: {report.kernel}")
        caps = report.capabilities
        if "map_types" in caps:

            def have(table: dict[str, str]) -> str:
                return f"{sum(v == 'yes' for v in table.values())}/{len(table)}"

            helpers = ", ".join(
                f"{pt} {sum(hs.values())}" for pt, hs in caps.get("helpers", {}).items()
            )
            print(
                f"capabilities: map types {have(caps['map_types'])}, program types "
                f"{have(caps['prog_types'])}, sockmap attach types {have(caps['attach_types'])}; "
                f"helpers callable: {helpers} (details: --json or sockmap features)"
            )
        width = max(len(c.item) for c in report.checks)
        for c in report.checks:
            print(f"{c.item:<{width}}  {c.verdict.upper():<13}  {c.detail}")
            if c.workaround:
                print(f"{'':<{width}}  {'':<13}  -> {c.workaround}")
        broken = [c.item for c in report.checks if c.verdict == "broken"]
        if broken:
            print(
                f"broken: {', '.join(broken)}"
                + (
                    " (the kernel engine does not rely on them; applications that do are affected)"
                    if not set(broken) & set(NEEDED)
                    else ""
                )
            )
        print(f"({report.seconds:.1f} s" + (f"; saved to {saved})" if saved else ")"))
    if report.verdict_of("bpf") != "ok":
        return 2
    return 1 if any(c.verdict == "broken" and c.item in NEEDED for c in report.checks) else 0
