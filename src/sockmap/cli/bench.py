"""``sockmap bench``: measure paths side by side, in one run, as ratios.

One workload per command (stream, rr, messages, dns, churn, idle, stall, calibrate),
``all`` for every one of them into a results directory, and ``report`` for the
Markdown tables and PNG plots of such a directory (:mod:`sockmap.bench.report`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sockmap.bench.dnsbench import DNS_PATHS, DnsTrial, run_dns_trial
from sockmap.bench.idle import FDS_PER_CONN, IdleTrial, hard_fd_limit, run_idle, shards_for
from sockmap.bench.rr import RrTrial, run_rr_trial, summarize_rr
from sockmap.bench.stream import KERNEL_PATHS, PATHS, Placement, Trial, run_trial, summarize
from sockmap.kernel.features import bpf_access

__all__ = ["add_arguments", "run"]

_T = TypeVar("_T")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "example: sockmap bench stream --paths raw,bounded --mib 1024 --repeat 5 "
        "--placement split --json results.json"
    )
    p.add_argument(
        "workload",
        choices=(*ALL_WORKLOADS, "all", "report"),
        help="stream: one-way 64 KiB writes, GiB/s and CPU per GiB; rr: request/response "
        "round trips (--size, --count), rate, latency percentiles and CPU per round trip; "
        "idle: many idle connections, memory per connection and the control plane's idle CPU; "
        "dns: dnsperf over TCP through each load balancer to two unbound, queries/s and the "
        "balancer's CPU per query over the direct path's (--runs); stall: a consumer that "
        "reads nothing for --stall seconds while --mib MiB are offered, the host's peak "
        "memory; churn: --conns connections one after another (connect, a round trip, "
        "close), connections/s and CPU per connection; messages: 8 clients x --count "
        "length-prefixed messages (64 B-4 KiB) balanced over 4 echo backends, every answer "
        "checked, messages/s and CPU per message; calibrate: the load generator on the direct "
        "path against iperf3 (stream, --mib) and sockperf ping-pong (64 B round trips); all: "
        "every workload above, each into --out DIR/WORKLOAD.json, then the report; report: "
        "DIR/report.md (tables with ratios to direct and to our engines) and a PNG per "
        "workload from the JSON files in --out",
    )
    p.add_argument(
        "--paths",
        type=_csv,
        default=None,
        help=f"comma-separated paths to compare (default: all of {','.join(PATHS)}; for dns: "
        f"{','.join(DNS_PATHS)})",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=5000,
        help="dns: passes through the 4-query file per trial (default: 5000)",
    )
    p.add_argument(
        "--mib", type=int, default=1024, help="MiB per connection and trial (default: 1024)"
    )
    p.add_argument(
        "--conns",
        type=_csv,
        default=None,
        help="connection counts (default: 1,4 for stream and rr; 1000,10000 for idle)",
    )
    p.add_argument(
        "--repeat", type=int, default=5, help="trials per path; medians reported (default: 5)"
    )
    p.add_argument(
        "--placement",
        type=_csv,
        default=["same", "split"],
        help="same: everything on CPU 0; split: load generator on CPU 1, proxy on CPU 0 "
        "(default: same,split)",
    )
    p.add_argument(
        "--size", type=_csv, default=["64", "16384"], help="rr: request sizes (default: 64,16384)"
    )
    p.add_argument(
        "--count", type=int, default=20000, help="rr: round trips per connection (default: 20000)"
    )
    p.add_argument(
        "--stall", type=float, default=3.0, help="stall: seconds the consumer reads nothing (3)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per trial (default: 120)")
    p.add_argument("--json", metavar="FILE", help="also write every trial and the summary as JSON")
    p.add_argument(
        "--out",
        metavar="DIR",
        default="benchmarks/results",
        help="all, report: the results directory (default: benchmarks/results)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a first look in a minute or two: one run per path, smaller sizes (at most "
        "128 MiB, 2,000 round trips or messages, 1,000 DNS passes, 300 churned connections, "
        "1 s stalls); figures are rougher than the default medians of several runs",
    )


def _placements(names: list[str]) -> list[Placement]:
    cpus = sorted(os.sched_getaffinity(0))
    out = []
    for name in names:
        if name == "same":
            out.append(Placement("same", str(cpus[0]), str(cpus[0])))
        elif name == "split":
            if len(cpus) < 2:
                print("placement split needs two CPUs: skipped", file=sys.stderr)
                continue
            out.append(Placement("split", str(cpus[1]), str(cpus[0])))
        else:
            raise SystemExit(f"unknown placement {name!r} (same, split)")
    return out


def _quick(args: argparse.Namespace) -> None:
    """Shrink every size and the repeat count for ``--quick``."""
    args.repeat = 1
    args.mib = min(args.mib, 128)
    args.count = min(args.count, 2000)
    args.runs = min(args.runs, 1000)
    args.stall = min(args.stall, 1.0)
    if args.workload == "churn":
        args.conns = [str(min(int((args.conns or ["300"])[0]), 300))]


ALL_WORKLOADS = ("calibrate", "stream", "rr", "messages", "dns", "churn", "idle", "stall")


def _run_all(args: argparse.Namespace) -> int:
    """Every workload into ``--out``, then the report; a failed workload is reported and
    the others still run (exit status 1 then)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for i, name in enumerate(ALL_WORKLOADS, 1):
        sub = argparse.Namespace(**vars(args))
        sub.workload = name
        sub.json = str(out / f"{name}.json")
        if name == "idle" and args.quick:
            sub.conns = ["1000"]
        elif name in ("churn", "idle"):
            sub.conns = None  # their own defaults; stream's 1,4 mean nothing to them
        if args.quick and name in ("stream", "rr"):
            sub.conns = ["1"]  # --quick: one connection; the full run adds 4
        if args.quick and name == "rr":
            sub.size = ["64"]  # --quick: small requests only; the full run adds 16 KiB
        if args.quick and name == "stall":
            sub.stall = min(args.stall, 0.5)
        if name == "stall" and not args.quick:
            sub.mib = max(args.mib, 1024)  # workload (g) offers 1 GiB whatever --mib says
        print(f"== [{i}/{len(ALL_WORKLOADS)}] {name}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            rc = run(sub)
        except Exception as exc:  # noqa: BLE001 - one workload's failure must not stop the rest
            print(f"{name}: failed: {exc}", file=sys.stderr)
            rc = 1
        print(f"== {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        if rc != 0:
            failed.append(name)
    rc = _run_report(args)
    if failed:
        print(f"workloads that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return rc


def _run_report(args: argparse.Namespace) -> int:
    from sockmap.bench.report import write_report  # noqa: PLC0415

    try:
        report, pngs = write_report(Path(args.out))
    except FileNotFoundError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(f"report: {report}" + (f", plots: {', '.join(p.name for p in pngs)}" if pngs else ""))
    if not pngs:
        print("no plots: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.workload == "report":
        return _run_report(args)
    if args.workload == "all":
        return _run_all(args)
    if args.quick:
        _quick(args)
    if args.workload == "dns":
        return _run_dns(args)
    if args.workload == "messages":
        return _run_messages(args)
    if args.workload == "calibrate":
        return _run_calibrate(args)
    paths: list[str] = args.paths or list(PATHS)
    unknown = set(paths) - set(PATHS)
    if unknown:
        print(
            f"unknown paths: {', '.join(sorted(unknown))} (known: {', '.join(PATHS)})",
            file=sys.stderr,
        )
        return 2
    ok, why = bpf_access()
    if not ok and KERNEL_PATHS & set(paths):
        print(f"kernel paths skipped: bpf() refused: {why}", file=sys.stderr)
        paths = [p for p in paths if p not in KERNEL_PATHS]
    placements = _placements(args.placement)
    if args.workload == "idle":
        return _run_idle(args, paths, placements)
    if args.workload == "rr":
        return _run_rr(args, paths, placements)
    if args.workload == "stall":
        return _run_stall(args, paths, placements)
    if args.workload == "churn":
        return _run_churn(args, paths, placements)
    nbytes = args.mib << 20
    trials: list[Trial] = []
    counts = [int(c) for c in (args.conns or ["1", "4"])]
    total = len(placements) * len(counts) * args.repeat * len(paths)
    done = 0
    for placement in placements:
        for conns in counts:
            for rep in range(args.repeat):
                for path in paths:  # interleaved, so drift hits every path alike
                    done += 1
                    t = run_trial(path, placement, nbytes, conns, args.timeout)
                    trials.append(t)
                    print(
                        f"[{done}/{total}] {placement.name} conns={conns} run {rep + 1} {path}: "
                        f"{t.gib_per_s:.2f} GiB/s, {t.cpu_per_gib:.2f} CPU s/GiB",
                        file=sys.stderr,
                        flush=True,
                    )
    rows = summarize(trials)
    _print_table(rows)
    return _write_json(args, trials, rows)


def _run_rr(args: argparse.Namespace, paths: list[str], placements: list[Placement]) -> int:
    counts = [int(c) for c in (args.conns or ["1", "4"])]
    sizes = [int(x) for x in args.size]
    trials: list[RrTrial] = []
    total = len(placements) * len(counts) * len(sizes) * args.repeat * len(paths)
    done = 0
    for placement in placements:
        for conns in counts:
            for size in sizes:
                for rep in range(args.repeat):
                    for path in paths:
                        done += 1
                        t = run_rr_trial(path, placement, size, args.count, conns, args.timeout)
                        trials.append(t)
                        print(
                            f"[{done}/{total}] {placement.name} conns={conns} {size} B run "
                            f"{rep + 1} {path}: {t.rate:,.0f} round trips/s, p99 "
                            f"{t.p99_us:.0f} us",
                            file=sys.stderr,
                            flush=True,
                        )
    rows = summarize_rr(trials)
    print(
        f"{'placement':9} {'conns':>5} {'size':>6} {'path':10} {'rt/s':>9} {'p50 us':>7} "
        f"{'p99 us':>7} {'p99.9 us':>8} {'CPU us/rt':>9} {'rate/raw':>8}"
    )
    for r in rows:
        print(
            f"{r['placement']:9} {r['conns']:>5} {r['size']:>6} {r['path']:10} "
            f"{r['rate']:9,.0f} {r['p50_us']:7.0f} {r['p99_us']:7.0f} {r['p999_us']:8.0f} "
            f"{r['cpu_us_per_rt']:9.1f} {r.get('rate_vs_raw', float('nan')):8.2f}"
        )
    return _write_json(args, trials, rows)


def _run_idle(args: argparse.Namespace, paths: list[str], placements: list[Placement]) -> int:
    left_out = [p for p in paths if p not in FDS_PER_CONN]
    if left_out:
        print(f"idle: {', '.join(left_out)} left out (it has no proxy)", file=sys.stderr)
        paths = [p for p in paths if p not in left_out]
    counts = [int(c) for c in (args.conns or ["1000", "10000"])]
    shards = {conns: shards_for(paths, conns) for conns in counts}
    for conns, n in shards.items():
        if n > 1:
            print(
                f"idle: {conns} connections take {n} proxy processes of {conns // n}+ each "
                f"(one process may hold {hard_fd_limit()} descriptors here: ulimit -Hn)",
                file=sys.stderr,
            )
    trials: list[IdleTrial] = []
    placement = placements[-1]  # the load on its own CPU where there is one
    total = len(counts) * args.repeat * len(paths)
    done = 0
    for conns in counts:
        for rep in range(args.repeat):
            for path in paths:
                done += 1
                t = run_idle(path, placement, conns, args.timeout, shards[conns])
                trials.append(t)
                print(
                    f"[{done}/{total}] conns={conns} run {rep + 1} {path}: set up in "
                    f"{t.setup_seconds:.2f} s, host {t.host_per_conn / 1024:.1f} KiB/conn, "
                    f"idle proxy CPU {100 * t.idle_proxy_cpu:.2f}%",
                    file=sys.stderr,
                    flush=True,
                )
    rows: list[dict[str, Any]] = []
    for conns in counts:
        for path in paths:
            ts = [t for t in trials if t.path == path and t.conns == conns]
            rows.append(
                {
                    "path": path,
                    "conns": conns,
                    "shards": shards[conns],
                    "runs": len(ts),
                    "conns_per_s": statistics.median(conns / t.setup_seconds for t in ts),
                    "host_kib_per_conn": statistics.median(t.host_per_conn for t in ts) / 1024,
                    "host_kib_per_conn_min": min(t.host_per_conn for t in ts) / 1024,
                    "host_kib_per_conn_max": max(t.host_per_conn for t in ts) / 1024,
                    "rss_kib_per_conn": statistics.median(t.rss_bytes / conns for t in ts) / 1024,
                    "memavail_kib_per_conn": statistics.median(t.memavail_bytes / conns for t in ts)
                    / 1024,
                    "idle_proxy_cpu_pct": 100 * statistics.median(t.idle_proxy_cpu for t in ts),
                    "idle_busy_cpu_pct": 100 * statistics.median(t.idle_busy_cpu for t in ts),
                }
            )
    for row in rows:
        base = [r for r in rows if r["path"] == "direct" and r["conns"] == row["conns"]]
        if base:
            over = float(row["host_kib_per_conn"]) - float(base[0]["host_kib_per_conn"])
            row["host_kib_per_conn_over_direct"] = over
    print(
        f"{'conns':>6} {'path':10} {'conns/s':>8} {'host KiB/conn':>13} {'over direct':>11} "
        f"{'RSS KiB/conn':>12} {'idle proxy CPU%':>15} {'idle host CPU%':>14}"
    )
    for r in rows:
        print(
            f"{r['conns']:>6} {r['path']:10} {r['conns_per_s']:8.0f} "
            f"{r['host_kib_per_conn']:13.1f} "
            f"{r.get('host_kib_per_conn_over_direct', float('nan')):11.1f} "
            f"{r['rss_kib_per_conn']:12.2f} {r['idle_proxy_cpu_pct']:15.2f} "
            f"{r['idle_busy_cpu_pct']:14.2f}"
        )
    return _write_json(args, trials, rows)


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'placement':9} {'conns':>5} {'path':10} {'GiB/s':>7} {'min-max':>11} "
        f"{'CPU s/GiB':>9} {'proxy':>6} {'rate/raw':>8} {'cpu/raw':>7}"
    )
    for r in rows:
        print(
            f"{r['placement']:9} {r['conns']:>5} {r['path']:10} {r['gib_per_s']:7.2f} "
            f"{r['gib_per_s_min']:5.2f}-{r['gib_per_s_max']:<5.2f} {r['cpu_s_per_gib']:9.2f} "
            f"{r['proxy_cpu_s_per_gib']:6.2f} {r.get('rate_vs_raw', float('nan')):8.2f} "
            f"{r.get('cpu_vs_raw', float('nan')):7.2f}"
            + (
                f"  holds {r['holds']} user MiB {r['user_bytes'] / 2**20:.0f}"
                if "holds" in r
                else ""
            )
        )


def _held(r: dict[str, Any]) -> str:
    return f"  holds {r['holds']}, moved by the control plane {r['user_bytes'] / 2**20:.0f} MiB"


def _run_calibrate(args: argparse.Namespace) -> int:
    from sockmap.bench.calibrate import Calibration, iperf3_gib_per_s, sockperf_rtt  # noqa: PLC0415

    rows: list[Calibration] = []
    for placement in _placements(args.placement):
        cpu = placement.load.split(",")[0]
        for rep in range(args.repeat):
            print(f"{placement.name} run {rep + 1}: stream and round trips ...", file=sys.stderr)
            t = run_trial("direct", placement, args.mib << 20, 1, args.timeout)
            tool = iperf3_gib_per_s(cpu, args.mib << 20)
            rows.append(Calibration(placement.name, "stream", "iperf3", tool, t.gib_per_s, "GiB/s"))
            r = run_rr_trial("direct", placement, 64, args.count, 1, args.timeout)
            rate, p50 = sockperf_rtt(cpu, 64, max(2.0, r.seconds))
            rows.append(Calibration(placement.name, "rr 64 B", "sockperf", rate, r.rate, "rt/s"))
            rows.append(Calibration(placement.name, "rr 64 B p50", "sockperf", p50, r.p50_us, "us"))
    summary = []
    for key in dict.fromkeys((c.placement, c.workload) for c in rows):
        cs = [c for c in rows if (c.placement, c.workload) == key]
        tool = statistics.median(c.tool_value for c in cs)
        ours = statistics.median(c.ours for c in cs)
        summary.append(
            {
                "placement": key[0],
                "workload": key[1],
                "tool": cs[0].tool,
                "tool_value": tool,
                "ours": ours,
                "ratio": ours / tool if tool else float("nan"),
                "unit": cs[0].unit,
            }
        )
    print(f"{'placement':9} {'workload':12} {'tool':9} {'tool says':>12} {'ours':>12} {'ratio':>6}")
    for r2 in summary:
        print(
            f"{r2['placement']:9} {r2['workload']:12} {r2['tool']:9} "
            f"{r2['tool_value']:12,.2f} {r2['ours']:12,.2f} {r2['ratio']:6.2f} {r2['unit']}"
        )
    return _write_json(args, rows, summary)


def _message_paths(args: argparse.Namespace, known: Sequence[str], what: str) -> list[str] | None:
    """The --paths asked for (default: all of ``known``), the kernel one left out, saying
    why, where bpf() is refused; None (said) when one is unknown."""
    paths: list[str] = args.paths or list(known)
    unknown = set(paths) - set(known)
    if unknown:
        print(f"unknown {what} paths: {', '.join(sorted(unknown))}", file=sys.stderr)
        return None
    ok, why = bpf_access()
    if not ok and "kernel" in paths:
        print(f"kernel path skipped: bpf() refused: {why}", file=sys.stderr)
        paths = [p for p in paths if p != "kernel"]
    return paths


def _run_messages(args: argparse.Namespace) -> int:
    from sockmap.bench.msglb import MSG_PATHS, MsgTrial, run_messages  # noqa: PLC0415

    paths = _message_paths(args, MSG_PATHS, "message")
    if paths is None:
        return 2
    placements = _placements(args.placement)
    trials: list[MsgTrial] = _each_trial(
        placements,
        args.repeat,
        paths,
        lambda path, pl: run_messages(path, pl, args.count, args.timeout),
        lambda t: (
            f"{t.per_second:,.0f} messages/s, {t.cpu_us_per_message:.1f} CPU us/message, "
            f"{'intact' if t.intact else 'NOT INTACT'}"
        ),
    )
    rows: list[dict[str, Any]] = []
    for placement in placements:
        mine = [t for t in trials if t.placement == placement.name]
        direct = [t.cpu_us_per_message for t in mine if t.path == "direct"]
        base = statistics.median(direct) if direct else 0.0
        for path in paths:
            ts = [t for t in mine if t.path == path]
            cpu = statistics.median(t.cpu_us_per_message for t in ts)
            rows.append(
                {
                    "placement": placement.name,
                    "path": path,
                    "runs": len(ts),
                    "messages_per_s": statistics.median(t.per_second for t in ts),
                    "min": min(t.per_second for t in ts),
                    "max": max(t.per_second for t in ts),
                    "cpu_us_per_message": cpu,
                    "overhead_us": cpu - base,
                    "intact": all(t.intact for t in ts),
                }
            )
    print(
        f"{'placement':9} {'path':10} {'msg/s':>9} {'min-max':>15} {'CPU us/m':>8} "
        f"{'overhead':>8} intact"
    )
    for r in rows:
        print(
            f"{r['placement']:9} {r['path']:10} {r['messages_per_s']:9,.0f} "
            f"{r['min']:7,.0f}-{r['max']:<7,.0f} {r['cpu_us_per_message']:8.1f} "
            f"{r['overhead_us']:8.1f} {r['intact']}"
        )
    _write_json(args, trials, rows)
    return 0 if all(r["intact"] for r in rows) else 1


def _run_churn(args: argparse.Namespace, paths: list[str], placements: list[Placement]) -> int:
    from sockmap.bench.churn import CHURN_PATHS, ChurnTrial, run_churn  # noqa: PLC0415

    left_out = [p for p in paths if p not in CHURN_PATHS]
    if left_out:
        print(f"churn: {', '.join(left_out)} left out (no FIN passed on)", file=sys.stderr)
        paths = [p for p in paths if p in CHURN_PATHS]
    conns = int((args.conns or ["2000"])[0])
    trials: list[ChurnTrial] = _each_trial(
        placements,
        args.repeat,
        paths,
        lambda path, pl: run_churn(path, pl, conns, args.timeout),
        lambda t: (
            f"{t.per_second:,.0f} conns/s, {t.cpu_us_per_conn:.0f} CPU us/conn, {t.ok}/{t.conns} ok"
        ),
    )
    rows: list[dict[str, Any]] = []
    for placement in placements:
        for path in paths:
            ts = [t for t in trials if t.path == path and t.placement == placement.name]
            rows.append(
                {
                    "placement": placement.name,
                    "path": path,
                    "runs": len(ts),
                    "conns_per_s": statistics.median(t.per_second for t in ts),
                    "min": min(t.per_second for t in ts),
                    "max": max(t.per_second for t in ts),
                    "cpu_us_per_conn": statistics.median(t.cpu_us_per_conn for t in ts),
                    "intact": all(t.ok == t.conns for t in ts),
                }
            )
    print(f"{'placement':9} {'path':10} {'conns/s':>8} {'min-max':>13} {'CPU us/c':>8} intact")
    for r in rows:
        print(
            f"{r['placement']:9} {r['path']:10} {r['conns_per_s']:8,.0f} "
            f"{r['min']:6,.0f}-{r['max']:<6,.0f} {r['cpu_us_per_conn']:8.0f} {r['intact']}"
        )
    _write_json(args, trials, rows)
    return 0 if all(r["intact"] for r in rows) else 1


def _run_stall(args: argparse.Namespace, paths: list[str], placements: list[Placement]) -> int:
    from sockmap.bench.stall import StallTrial, run_stall  # noqa: PLC0415

    nbytes = args.mib << 20
    trials: list[StallTrial] = _each_trial(
        placements,
        args.repeat,
        paths,
        lambda path, pl: run_stall(path, pl, nbytes, args.stall, args.timeout),
        lambda t: (
            f"peak host {t.peak_host_bytes / 2**20:.0f} MiB, "
            f"{'intact' if t.intact else 'NOT INTACT'}"
        ),
    )
    rows: list[dict[str, Any]] = []
    for placement in placements:
        for path in paths:
            ts = [t for t in trials if t.path == path and t.placement == placement.name]
            peaks = [t.peak_host_bytes / 2**20 for t in ts]
            rows.append(
                {
                    "placement": placement.name,
                    "path": path,
                    "runs": len(ts),
                    "peak_host_mib": statistics.median(peaks),
                    "peak_min": min(peaks),
                    "peak_max": max(peaks),
                    "seconds": statistics.median(t.seconds for t in ts),
                    "intact": all(t.intact for t in ts),
                }
            )
    print(f"{'placement':9} {'path':10} {'peak MiB':>9} {'min-max':>13} {'seconds':>8} intact")
    for r in rows:
        print(
            f"{r['placement']:9} {r['path']:10} {r['peak_host_mib']:9.0f} "
            f"{r['peak_min']:6.0f}-{r['peak_max']:<6.0f} {r['seconds']:8.1f} {r['intact']}"
        )
    _write_json(args, trials, rows)
    return 0 if all(t.intact for t in trials) else 1


def _run_dns(args: argparse.Namespace) -> int:
    import shutil  # noqa: PLC0415

    from sockmap.bench.dns import unbound  # noqa: PLC0415

    paths = _message_paths(args, DNS_PATHS, "dns")
    if paths is None:
        return 2
    missing = [
        t for t in ("dnsperf", "unbound") if shutil.which(t, path="/usr/bin:/usr/sbin") is None
    ]
    if missing:
        print(f"dns: {' and '.join(missing)} not installed (Debian packages)", file=sys.stderr)
        return 2
    if "dnsdist" in paths and shutil.which("dnsdist", path="/usr/bin:/usr/sbin") is None:
        print("dnsdist path skipped: dnsdist is not installed", file=sys.stderr)
        paths = [p for p in paths if p != "dnsdist"]
    placements = _placements(args.placement)
    trials: list[DnsTrial] = []
    for placement in placements:
        cpu = int(placement.load.split(",")[0])
        with (
            unbound(_free_port(), "u1", cpu=cpu) as u1,
            unbound(_free_port(), "u2", cpu=cpu) as u2,
        ):
            backends = [u1, u2]

            def one(path: str, pl: Placement, backends: list[str] = backends) -> DnsTrial:
                return run_dns_trial(path, pl, backends, runs=args.runs)

            trials += _each_trial(
                [placement],
                args.repeat,
                paths,
                one,
                lambda t: (
                    f"{t.qps:,.0f} q/s, {t.cpu_us_per_query:.1f} CPU us/query, "
                    f"{'intact' if t.intact else 'NOT INTACT'}"
                ),
            )
    rows = summarize_dns(trials)
    print(
        f"{'placement':9} {'path':9} {'q/s':>9} {'min-max':>17} {'lat us':>7} "
        f"{'CPU us/q':>8} {'overhead':>8} {'vs uvloop':>9} intact"
    )
    for r in rows:
        print(
            f"{r['placement']:9} {r['path']:9} {r['qps']:9,.0f} "
            f"{r['qps_min']:8,.0f}-{r['qps_max']:<8,.0f} {r['latency_us']:7.0f} "
            f"{r['cpu_us_per_query']:8.1f} {r['overhead_us']:8.1f} "
            f"{r.get('overhead_vs_uvloop', float('nan')):9.2f} {r['intact']}"
        )
    _write_json(args, trials, rows)
    return 0 if all(t.intact for t in trials) else 1


def summarize_dns(trials: list[DnsTrial]) -> list[dict[str, Any]]:
    """Medians per (placement, path); overhead = CPU per query minus direct's."""
    rows: list[dict[str, Any]] = []
    for placement in dict.fromkeys(t.placement for t in trials):
        mine = [t for t in trials if t.placement == placement]
        cpu = {
            p: statistics.median(t.cpu_us_per_query for t in mine if t.path == p)
            for p in dict.fromkeys(t.path for t in mine)
        }
        direct = cpu.get("direct", 0.0)
        for path, per_query in cpu.items():
            ts = [t for t in mine if t.path == path]
            row: dict[str, Any] = {
                "placement": placement,
                "path": path,
                "runs": len(ts),
                "qps": statistics.median(t.qps for t in ts),
                "qps_min": min(t.qps for t in ts),
                "qps_max": max(t.qps for t in ts),
                "latency_us": statistics.median(t.latency_avg_us for t in ts),
                "cpu_us_per_query": per_query,
                "overhead_us": per_query - direct,
                "intact": all(t.intact for t in ts),
            }
            if "uvloop" in cpu and cpu["uvloop"] - direct > 0:
                row["overhead_vs_uvloop"] = (per_query - direct) / (cpu["uvloop"] - direct)
            rows.append(row)
    return rows


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _each_trial(
    placements: list[Placement],
    repeat: int,
    paths: list[str],
    run_one: Callable[[str, Placement], _T],
    describe: Callable[[_T], str],
) -> list[_T]:
    """Every path, ``repeat`` times, per placement, interleaved (drift hits every path
    alike), with a progress line per trial on stderr."""
    out: list[_T] = []
    total = len(placements) * repeat * len(paths)
    for placement in placements:
        for rep in range(repeat):
            for path in paths:
                t = run_one(path, placement)
                out.append(t)
                print(
                    f"[{len(out)}/{total}] {placement.name} run {rep + 1} {path}: {describe(t)}",
                    file=sys.stderr,
                    flush=True,
                )
    return out


def _write_json(args: argparse.Namespace, trials: Sequence[object], rows: list[Any]) -> int:
    """Every trial and the summary, to --json when asked; the command's exit status."""
    if args.json:
        doc = {
            "command": "sockmap " + " ".join(sys.argv[1:]),
            "machine": _machine(),
            "trials": [t.__dict__ for t in trials],
            "summary": rows,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


def _machine() -> dict[str, Any]:
    """What the figures were measured on."""
    u = os.uname()
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": f"{u.release} {u.version}",
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": sys.version.split()[0],
    }
