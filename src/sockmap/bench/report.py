"""``sockmap bench report``: the results of a run as Markdown tables and PNG plots.

Reads the JSON files that ``sockmap bench WORKLOAD --json`` (or ``sockmap bench
all``) wrote into a directory and writes ``report.md`` there: per workload, each
path's median with its spread (min-max over the runs), the CPU it cost per unit of
work, and its ratios to the direct path and to our two engines' paths *of the same
run*; plus one PNG per workload (matplotlib, when installed) with the medians as
bars and the spread as error bars. The machine and the exact command come from the
JSON files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["WORKLOADS", "Workload", "render", "write_report"]


@dataclass(frozen=True)
class Workload:
    """How one workload's summary rows read: what to group by, which figure leads."""

    title: str
    group: tuple[str, ...]  # row keys that make a table section (besides the path)
    metric: str
    unit: str
    lo: str | None  # the spread's keys in the row
    hi: str | None
    higher_is_better: bool
    cpu: str | None
    cpu_unit: str
    kernel_path: str  # our proxy on the kernel engine, in this workload's path names
    extra: tuple[tuple[str, str], ...] = ()  # further columns: (key, heading)


WORKLOADS: dict[str, Workload] = {
    "stream": Workload(
        "(a) Stream: 64 KiB writes, one way", ("placement", "conns"), "gib_per_s", "GiB/s",
        "gib_per_s_min", "gib_per_s_max", True, "cpu_s_per_gib", "CPU s/GiB", "bounded",
    ),
    "rr": Workload(
        "(b) Request/response", ("placement", "conns", "size"), "rate", "round trips/s",
        "rate_min", "rate_max", True, "cpu_us_per_rt", "CPU µs/rt", "bounded",
        (("p50_us", "p50 µs"), ("p99_us", "p99 µs"), ("p999_us", "p99.9 µs")),
    ),
    "messages": Workload(
        "(c) Message load balancing: 8 clients, 4 backends, 64 B-4 KiB", ("placement",),
        "messages_per_s", "messages/s", "min", "max", True, "cpu_us_per_message",
        "CPU µs/msg", "kernel", (("overhead_us", "overhead µs/msg"),),
    ),
    "dns": Workload(
        "(d) DNS over TCP: dnsperf -> balancer -> 2 unbound", ("placement",), "qps",
        "queries/s", "qps_min", "qps_max", True, "cpu_us_per_query", "CPU µs/q", "kernel",
        (("overhead_us", "overhead µs/q"), ("latency_us", "latency µs")),
    ),
    "churn": Workload(
        "(e) Connection churn", ("placement",), "conns_per_s", "connections/s", "min", "max",
        True, "cpu_us_per_conn", "CPU µs/conn", "bounded",
    ),
    "idle": Workload(
        "(f) Idle connections", ("conns",), "host_kib_per_conn", "host KiB/conn",
        "host_kib_per_conn_min", "host_kib_per_conn_max", False, None, "", "bounded",
        (("host_kib_per_conn_over_direct", "over direct KiB"), ("rss_kib_per_conn",
         "proxy RSS KiB/conn"), ("idle_proxy_cpu_pct", "idle proxy CPU %"), ("shards",
         "proxy processes")),
    ),
    "stall": Workload(
        "(g) Stalled consumer: the host's peak memory (offered: see --mib)", ("placement",),
        "peak_host_mib", "MiB", "peak_min", "peak_max", False, None, "", "bounded",
        (("seconds", "seconds"),),
    ),
}
USERSPACE = "userspace"
TIMES = "\u00d7"  # the multiplication sign of the ratio columns


def _fmt(x: Any) -> str:  # noqa: ANN401 - any figure from JSON
    if isinstance(x, bool) or x is None:
        return "" if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return ""
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.2f}"
    return str(x)


def _ratio(a: float, b: float | None) -> str:
    if b is None or not b:
        return ""
    return f"{a / b:.2f}"


Rows = list[dict[str, Any]]


def _sections(w: Workload, rows: Rows) -> dict[tuple[Any, ...], Rows]:
    out: dict[tuple[Any, ...], Rows] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in w.group), []).append(r)
    return out


def render(name: str, doc: dict[str, Any]) -> str:
    """One workload's Markdown: the command, then a table per section."""
    if name == "calibrate":
        return _render_calibrate(doc)
    w = WORKLOADS[name]
    lines = [f"### {w.title}", "", f"`{doc.get('command', '')}`", ""]
    for key, rows in _sections(w, doc.get("summary", [])).items():
        label = ", ".join(f"{k} {v}" for k, v in zip(w.group, key, strict=True))
        by_path = {r["path"]: r for r in rows}

        def ref(path: str, by_path: dict[str, dict[str, Any]] = by_path) -> float | None:
            r = by_path.get(path)
            return float(r[w.metric]) if r is not None else None

        head = ["path", w.unit + " (median)"]
        if w.lo:
            head.append("min-max")
        if w.cpu:
            head.append(w.cpu_unit)
        head += [h for _, h in w.extra]
        head += [f"{TIMES} direct", f"{TIMES} ours ({w.kernel_path})", f"{TIMES} ours (userspace)"]
        head.append("runs")
        if any("intact" in r for r in rows):
            head.append("intact")
        lines += [f"**{label}**" if label else "", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + "---|" * len(head))
        for r in rows:
            v = float(r[w.metric])
            cells = [r["path"], _fmt(v)]
            if w.lo and w.hi:
                cells.append(f"{_fmt(r.get(w.lo))}-{_fmt(r.get(w.hi))}")
            if w.cpu:
                cells.append(_fmt(r.get(w.cpu)))
            cells += [_fmt(r.get(k)) for k, _ in w.extra]
            cells += [
                _ratio(v, ref("direct")),
                _ratio(v, ref(w.kernel_path)),
                _ratio(v, ref(USERSPACE)),
                _fmt(r.get("runs")),
            ]
            if "intact" in head:
                cells.append(_fmt(r.get("intact", "")))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    better = "higher" if w.higher_is_better else "lower"
    lines.append(f"Ratios are of the median {w.unit} ({better} is better), within this run.")
    lines.append("")
    return "\n".join(lines)


def _render_calibrate(doc: dict[str, Any]) -> str:
    lines = [
        "### The load generator against iperf3 and sockperf (direct path)",
        "",
        f"`{doc.get('command', '')}`",
        "",
        "| placement | workload | tool | tool says | ours | ours / tool | unit |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['placement']} | {r['workload']} | {r['tool']} | {_fmt(r['tool_value'])} | "
        f"{_fmt(r['ours'])} | {r['ratio']:.2f} | {r['unit']} |"
        for r in doc.get("summary", [])
    ]
    lines.append("")
    return "\n".join(lines)


def plot(name: str, doc: dict[str, Any], out: Path) -> Path | None:
    """A bar chart of the medians with min-max error bars, one group per section;
    None when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    if name == "calibrate":
        return None
    w = WORKLOADS[name]
    sections = _sections(w, doc.get("summary", []))
    if not sections:
        return None
    paths = list(dict.fromkeys(r["path"] for rows in sections.values() for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(sections) + 0.35 * len(paths)), 4.2))
    width = 0.8 / max(1, len(paths))
    colours = [plt.get_cmap("tab20")(i) for i in range(20)]
    for i, path in enumerate(paths):
        xs, ys, lo, hi = [], [], [], []
        for j, rows in enumerate(sections.values()):
            r = next((r for r in rows if r["path"] == path), None)
            if r is None:
                continue
            v = float(r[w.metric])
            xs.append(j + (i - (len(paths) - 1) / 2) * width)
            ys.append(v)
            lo.append(v - float(r.get(w.lo, v)) if w.lo else 0.0)
            hi.append(float(r.get(w.hi, v)) - v if w.hi else 0.0)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=path, color=colours[i % 20])
    ax.set_xticks(range(len(sections)))
    ax.set_xticklabels(
        [", ".join(f"{k}={v}" for k, v in zip(w.group, key, strict=True)) for key in sections]
    )
    ax.set_ylabel(w.unit + (" (higher is better)" if w.higher_is_better else " (lower is better)"))
    ax.set_title(w.title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.text(0.01, 0.01, doc.get("command", ""), fontsize=6, family="monospace")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path_png = out / f"{name}.png"
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    return path_png


ORDER = ("calibrate", "stream", "rr", "messages", "dns", "churn", "idle", "stall")


def _by(rows: Rows, path: str, **match: Any) -> dict[str, Any] | None:  # noqa: ANN401
    return next(
        (r for r in rows if r["path"] == path and all(r.get(k) == v for k, v in match.items())),
        None,
    )


def targets(docs: dict[str, dict[str, Any]]) -> list[tuple[str, str, float, float, bool]]:
    """(target, where, measured, goal, met) for each of the harness's targets the
    results can answer: throughput ratios (higher is better, goal a minimum) and
    overhead ratios (lower is better, goal a maximum)."""
    out: list[tuple[str, str, float, float, bool]] = []

    def ratio(name: str, key: str, rows: Rows, num: str, den: str, goal: float,
              higher: bool, groups: tuple[str, ...]) -> None:
        for row in rows:
            if row["path"] != num:
                continue
            match = {g: row.get(g) for g in groups}
            base = _by(rows, den, **match)
            if base is None or not base.get(key):
                continue
            value = float(row[key]) / float(base[key])
            where = ", ".join(f"{g} {row.get(g)}" for g in groups)
            out.append((name, where, value, goal, value >= goal if higher else value <= goal))

    if "stream" in docs:
        rows = docs["stream"]["summary"]
        g: tuple[str, ...] = ("placement", "conns")
        ratio("(a) kernel proxy / raw pair, GiB/s", "gib_per_s", rows, "bounded", "raw", 0.95,
              True, g)
        ratio("(a) userspace / uvloop, GiB/s", "gib_per_s", rows, "userspace", "uvloop", 1.0,
              True, g)
    if "rr" in docs:
        rows = docs["rr"]["summary"]
        g = ("placement", "conns", "size")
        ratio("(b) kernel proxy / raw pair, round trips/s", "rate", rows, "bounded", "raw", 0.95,
              True, g)
        ratio("(b) userspace / uvloop, round trips/s", "rate", rows, "userspace", "uvloop", 1.0,
              True, g)
    for name, label, goal_k in (("messages", "(c)", None), ("dns", "(d)", 1 / 3)):
        if name not in docs:
            continue
        rows = docs[name]["summary"]
        if goal_k is not None:
            ratio(f"{label} kernel overhead / uvloop LB's, CPU per message", "overhead_us",
                  rows, "kernel", "uvloop", goal_k, False, ("placement",))
        ratio(f"{label} userspace overhead / uvloop LB's, CPU per message", "overhead_us", rows,
              "userspace", "uvloop", 1.0, False, ("placement",))
    if "stall" in docs:
        for row in docs["stall"]["summary"]:
            if row["path"] in ("bounded", "userspace"):
                v = float(row["peak_host_mib"])
                out.append(
                    (
                        f"(g) {row['path']}: the host's memory peak, MiB",
                        f"placement {row['placement']}",
                        v,
                        STALL_GOAL_MIB,
                        v <= STALL_GOAL_MIB,
                    )
                )
    return out


STALL_GOAL_MIB = 64.0
"""Bounded, for workload (g): the whole host's extra memory stays within 1/16 of the 1 GiB
offered (the raw pair's grows with what is offered)."""


def render_targets(docs: dict[str, dict[str, Any]]) -> str:
    rows = targets(docs)
    if not rows:
        return ""
    lines = [
        "### Targets",
        "",
        "| target | where | measured | goal | met |",
        "|---|---|---|---|---|",
    ]
    for name, where, value, goal, met in rows:
        sign = ">=" if "/ raw pair, " in name or "/ uvloop, " in name else "<="
        fmt = f"{value:.1f}" if "MiB" in name else f"{value:.2f}"
        lines.append(
            f"| {name} | {where} | {fmt} | {sign} {goal:.2f} | {'yes' if met else 'no'} |"
        )
    lines.append("")
    return "\n".join(lines)


def write_report(directory: Path) -> tuple[Path, list[Path]]:
    """``report.md`` and the PNGs for every workload JSON in ``directory``."""
    docs: dict[str, dict[str, Any]] = {}
    for name in ORDER:
        f = directory / f"{name}.json"
        if f.is_file():
            docs[name] = json.loads(f.read_text())
    if not docs:
        raise FileNotFoundError(
            f"no benchmark results (stream.json, rr.json, ...) in {directory}: run "
            "`sockmap bench all` or `sockmap bench WORKLOAD --json FILE` first"
        )
    machine = next(iter(docs.values())).get("machine", {})
    parts = [
        "# Benchmark report",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
        "",
        (
            "Each table comes from one command (shown above it); figures of different "
            "tables come from different runs and are not compared with each other."
        ),
        "",
    ]
    parts.append(render_targets(docs))
    pngs = []
    for name, doc in docs.items():
        parts.append(render(name, doc))
        png = plot(name, doc, directory)
        if png is not None:
            pngs.append(png)
            parts += [f"![{name}]({png.name})", ""]
    report = directory / "report.md"
    report.write_text("\n".join(parts))
    return report, pngs
