"""``sockmap bench messages``, tiny: 8 clients' length-prefixed messages balanced over 4
echo backends on every path; each client gets back exactly what it sent."""

from __future__ import annotations

from pathlib import Path

from benchutil import kernel_paths, run_bench


def test_messages_tiny(tmp_path: Path) -> None:
    paths = ["direct", "userspace", "asyncio", "uvloop", *kernel_paths(["kernel"])]
    data = run_bench(
        tmp_path,
        "messages",
        "--paths",
        ",".join(paths),
        "--count",
        "50",
        "--repeat",
        "1",
        "--placement",
        "same",
    )
    assert {r["path"] for r in data["summary"]} == set(paths)
    assert all(t["intact"] and t["messages"] == 400 for t in data["trials"])
