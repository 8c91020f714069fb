"""Running ``sockmap bench`` as a user would, for the tiny bench tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sockmap.cli.main import main
from sockmap.kernel.features import bpf_access


def kernel_paths(paths: list[str]) -> list[str]:
    """``paths`` where bpf() is permitted; none (and why, printed) where it is refused."""
    ok, why = bpf_access()
    if not ok:
        print(f"kernel paths left out: bpf() refused: {why}")
    return paths if ok else []


def run_bench(tmp_path: Path, workload: str, *args: str) -> dict[str, Any]:
    """``sockmap bench WORKLOAD ARGS --json``: exit status 0, then the JSON it wrote."""
    out = tmp_path / f"{workload}.json"
    assert main(["bench", workload, *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())  # type: ignore[no-any-return]
