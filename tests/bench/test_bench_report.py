"""``sockmap bench report``: tables with the right ratios, and a PNG per workload."""

from __future__ import annotations

import json
from pathlib import Path

from sockmap.bench.report import render, targets
from sockmap.cli.main import main

MACHINE = {"kernel": "k", "cpus": 2, "cpu_model": "m", "python": "3.11"}


def _row(path: str, rate: float, **kw: object) -> dict[str, object]:
    return {
        "placement": "same",
        "conns": 1,
        "path": path,
        "runs": 5,
        "gib_per_s": rate,
        "gib_per_s_min": rate - 0.1,
        "gib_per_s_max": rate + 0.1,
        "cpu_s_per_gib": 1.0,
        **kw,
    }


def _stream_doc() -> dict[str, object]:
    rows = [_row("direct", 2.0), _row("bounded", 1.0), _row("userspace", 0.5), _row("raw", 1.5)]
    return {"command": "sockmap bench stream --repeat 5", "machine": MACHINE, "summary": rows}


def _cells(md: str, path: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {path} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_ratios_are_to_direct_and_to_both_engines_of_the_same_table() -> None:
    md = render("stream", _stream_doc())
    assert "`sockmap bench stream --repeat 5`" in md
    head = _cells(md, "path")
    raw = dict(zip(head, _cells(md, "raw"), strict=True))
    assert raw["GiB/s (median)"] == "1.50"
    assert raw["min-max"] == "1.40-1.60"
    assert raw["\u00d7 direct"] == "0.75"
    assert raw["\u00d7 ours (bounded)"] == "1.50"
    assert raw["\u00d7 ours (userspace)"] == "3.00"
    assert raw["runs"] == "5"


def test_report_writes_markdown_and_plots(tmp_path: Path, capsys) -> None:
    (tmp_path / "stream.json").write_text(json.dumps(_stream_doc()))
    assert main(["bench", "report", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Machine: kernel k, cpus 2" in report
    assert "![stream](stream.png)" in report
    png = (tmp_path / "stream.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 5000
    assert "plots: stream.png" in capsys.readouterr().out


def test_report_without_results_says_what_to_run(tmp_path: Path, capsys) -> None:
    assert main(["bench", "report", "--out", str(tmp_path)]) == 2
    assert "sockmap bench all" in capsys.readouterr().err


def test_targets_are_ratios_within_one_run() -> None:
    rows = [_row("raw", 2.0), _row("bounded", 1.9), _row("uvloop", 1.0), _row("userspace", 0.8)]
    got = {(t[0], t[1]): t for t in targets({"stream": {"summary": rows}})}
    kernel = got[("(a) kernel proxy / raw pair, GiB/s", "placement same, conns 1")]
    assert kernel[2:] == (0.95, 0.95, True)
    user = got[("(a) userspace / uvloop, GiB/s", "placement same, conns 1")]
    assert user[2:] == (0.8, 1.0, False)
