"""``sockmap bench churn``, tiny: connections one after another through every path that
passes a FIN on; every echo checked, every connection closed."""

from __future__ import annotations

from pathlib import Path

from benchutil import kernel_paths, run_bench


def test_churn_tiny(tmp_path: Path) -> None:
    paths = ["direct", "userspace", "uvloop", "haproxy", *kernel_paths(["kernel", "bounded"])]
    data = run_bench(
        tmp_path,
        "churn",
        "--paths",
        ",".join(paths),
        "--conns",
        "50",
        "--repeat",
        "1",
        "--placement",
        "same",
    )
    assert {r["path"] for r in data["summary"]} == set(paths)
    assert all(t["ok"] == t["conns"] == 50 for t in data["trials"])
