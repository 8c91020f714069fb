"""``sockmap stats``: the live counters of a running ``sockmap proxy`` (from its metrics)."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = "example: sockmap stats --metrics 127.0.0.1:9101 --watch 2"
    p.add_argument(
        "--metrics", default="127.0.0.1:9101", help="the proxy's metrics HOST:PORT (127.0.0.1:9101)"
    )
    p.add_argument("--watch", type=float, metavar="SECONDS", help="print again every SECONDS")


def _snapshot(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()  # noqa: S310 - http only, ours
    out = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("sockmap_"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out.append((sample.name, dict(sample.labels), sample.value))
    return out


def run(args: argparse.Namespace) -> int:
    url = f"http://{args.metrics}/metrics"
    while True:
        try:
            rows = _snapshot(url)
        except (urllib.error.URLError, OSError) as exc:
            print(
                f"sockmap stats: no proxy metrics at {url} ({exc}); is `sockmap proxy` running "
                "with --metrics there?",
                file=sys.stderr,
            )
            return 1
        for name, labels, value in rows:
            label = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            short = name.removeprefix("sockmap_proxy_")
            print(f"{short:32} {label:40} {value:>14,.0f}")
        if not args.watch:
            return 0
        print(flush=True)
        time.sleep(args.watch)
