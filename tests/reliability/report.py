"""Long mode and reports for the reliability tests.

``SOCKMAP_LONG=1`` turns each test's sizes up to the long mode that issue-level
figures come from (``scripts/reliability`` sets it). ``record`` writes a test's
figures as JSON to ``$SOCKMAP_REPORT_DIR/<name>.json`` when that variable is set,
so a normal suite run leaves no files behind.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

LONG = os.environ.get("SOCKMAP_LONG", "") not in ("", "0")


def size(normal: int, long: int) -> int:
    """``long`` in long mode, ``normal`` otherwise."""
    return long if LONG else normal


def record(name: str, figures: dict[str, Any]) -> Path | None:
    """Save ``figures`` under ``name`` with the mode, the kernel and the time; print a summary."""
    doc = {
        "name": name,
        "mode": "long" if LONG else "normal",
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **figures,
    }
    print(f"reliability report {name}: {json.dumps(figures, sort_keys=True)[:400]}")
    out_dir = os.environ.get("SOCKMAP_REPORT_DIR")
    if not out_dir:
        return None
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path
