"""The Python examples of docs/programs.md run as written (on the userspace engine)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "programs.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)  # not "```python notest"


def test_the_doc_has_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # From a file, as a user would run it: the compiler reads a function's source.
    script = tmp_path / f"programs_md_block_{index}.py"
    script.write_text(BLOCKS[index])
    runpy.run_path(str(script), run_name="__main__")
    capsys.readouterr()
