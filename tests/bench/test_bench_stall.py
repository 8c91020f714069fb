"""``sockmap bench stall``, tiny: with the consumer stalled, every path still delivers
every byte afterwards, and the summary reports a peak for each."""

from __future__ import annotations

from pathlib import Path

from benchutil import kernel_paths, run_bench


def test_stall_tiny(tmp_path: Path) -> None:
    paths = ["direct", "userspace", "uvloop", *kernel_paths(["raw", "bounded"])]
    data = run_bench(
        tmp_path,
        "stall",
        "--paths",
        ",".join(paths),
        "--mib",
        "32",
        "--stall",
        "0.5",
        "--repeat",
        "1",
        "--placement",
        "same",
    )
    assert {r["path"] for r in data["summary"]} == set(paths)
    assert all(r["intact"] for r in data["summary"])
    assert all(t["delivered"] == t["offered"] == 32 << 20 for t in data["trials"])
    assert data["machine"]["cpus"] >= 1
