"""``sockmap bench churn``, tiny: connections one after another through every path that
passes a FIN on; every echo checked, every connection closed."""

from __future__ import annotations

import json
from pathlib import Path

from sockmap.cli.main import main
from sockmap.kernel.features import bpf_access


def test_churn_tiny(tmp_path: Path) -> None:
    ok, why = bpf_access()
    paths = ["direct", "userspace", "uvloop", "haproxy"] + (["kernel", "bounded"] if ok else [])
    if not ok:
        print(f"kernel paths left out: bpf() refused: {why}")
    out = tmp_path / "churn.json"
    rc = main(
        [
            "bench",
            "churn",
            "--paths",
            ",".join(paths),
            "--conns",
            "50",
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
    assert all(t["ok"] == t["conns"] == 50 for t in data["trials"])
