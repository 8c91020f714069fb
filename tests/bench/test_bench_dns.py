"""``sockmap bench dns``, tiny: every path answers every query right, and the summary
reports each path's CPU per query over the direct path's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sockmap.cli.main import main
from sockmap.kernel.features import bpf_access


def test_dns_all_paths_tiny(tmp_path: Path) -> None:
    for tool in ("dnsperf", "unbound", "dnsdist"):
        if shutil.which(tool, path="/usr/bin:/usr/sbin") is None:
            pytest.skip(
                f"{tool} is not installed (the test set-up installs it from Debian as root)"
            )
    ok, why = bpf_access()
    paths = ["direct", "userspace", "asyncio", "uvloop", "dnsdist"] + (["kernel"] if ok else [])
    if not ok:
        print(f"kernel path left out: bpf() refused: {why}")
    out = tmp_path / "dns.json"
    rc = main(
        [
            "bench",
            "dns",
            "--paths",
            ",".join(paths),
            "--repeat",
            "1",
            "--placement",
            "same",
            "--runs",
            "200",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {r["path"]: r for r in data["summary"]}
    assert set(rows) == set(paths)
    for r in rows.values():
        assert r["intact"], r
        assert r["qps"] > 0
    assert rows["direct"]["overhead_us"] == 0
    for t in data["trials"]:
        assert t["completed"] == t["sent"] == 800
        assert t["rcodes"] == {"NOERROR": 600, "NXDOMAIN": 200}
