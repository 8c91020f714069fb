"""The disassembly of each example compiled program is kept as a golden file (set
SOCKMAP_UPDATE_GOLDEN=1 to rewrite them), and its size is held against a hand-written
equivalent: at most 1.5x the instructions (the counts are printed)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from compiled_examples import EXAMPLES
from sockmap import asm

GOLDEN = Path(__file__).parent / "golden"


def normalized(text: str) -> str:
    """kfunc ids differ between kernel builds; the rest is ours."""
    return re.sub(r"kfunc#\d+", "kfunc#ID", text)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_disassembly_matches_the_golden_file(name: str) -> None:
    compiled, _ = EXAMPLES[name]
    text = normalized(asm.disassemble(compiled))
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("SOCKMAP_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run with SOCKMAP_UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_within_one_and_a_half_times_the_hand_written(name: str) -> None:
    compiled, by_hand = EXAMPLES[name]
    ours, theirs = len(compiled), len(by_hand())
    print(f"{name}: compiled {ours} instructions, hand-written {theirs}: {ours / theirs:.2f}x")
    assert ours <= 1.5 * theirs
