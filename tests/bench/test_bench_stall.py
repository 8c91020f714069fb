"""``sockmap bench stall``, tiny: with the consumer stalled, every path still delivers
every byte afterwards, and the summary reports a peak for each."""

from __future__ import annotations

import json
from pathlib import Path

from sockmap.cli.main import main
from sockmap.kernel.features import bpf_access


def test_stall_tiny(tmp_path: Path) -> None:
    ok, why = bpf_access()
    paths = ["direct", "userspace", "uvloop"] + (["raw", "bounded"] if ok else [])
    if not ok:
        print(f"kernel paths left out: bpf() refused: {why}")
    out = tmp_path / "stall.json"
    rc = main(
        [
            "bench",
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
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert {r["path"] for r in data["summary"]} == set(paths)
    assert all(r["intact"] for r in data["summary"])
    assert all(t["delivered"] == t["offered"] == 32 << 20 for t in data["trials"])
    assert data["machine"]["cpus"] >= 1
