"""``sockmap bench messages``, tiny: 8 clients' length-prefixed messages balanced over 4
echo backends on every path; each client gets back exactly what it sent."""

from __future__ import annotations

import json
from pathlib import Path

from sockmap.cli.main import main
from sockmap.kernel.features import bpf_access


def test_messages_tiny(tmp_path: Path) -> None:
    ok, why = bpf_access()
    paths = ["direct", "userspace", "asyncio", "uvloop"] + (["kernel"] if ok else [])
    if not ok:
        print(f"kernel path left out: bpf() refused: {why}")
    out = tmp_path / "messages.json"
    rc = main(
        [
            "bench",
            "messages",
            "--paths",
            ",".join(paths),
            "--count",
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
    assert all(t["intact"] and t["messages"] == 400 for t in data["trials"])
