"""``sockmap bench calibrate``, tiny: the load generator and iperf3/sockperf both measure
the direct path, and the summary sets them side by side."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from benchutil import run_bench


def test_calibrate_tiny(tmp_path: Path) -> None:
    for tool in ("iperf3", "sockperf"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (the test set-up installs it from Debian)")
    data = run_bench(
        tmp_path,
        "calibrate",
        "--mib",
        "64",
        "--count",
        "2000",
        "--repeat",
        "1",
        "--placement",
        "same",
    )
    rows = {r["workload"]: r for r in data["summary"]}
    assert set(rows) == {"stream", "rr 64 B", "rr 64 B p50"}
    for r in rows.values():
        assert r["tool_value"] > 0
        assert r["ours"] > 0
