"""The conformance corpus (what the kernel returns) through the interpreter and the fast path."""

from __future__ import annotations

import pytest

from corpus import CORPUS
from sockmap import asm
from sockmap.abi import ProgType
from sockmap.vm import SkbContext, load


def _zero_packet() -> SkbContext:
    return SkbContext(data=bytes(64), len=64)


@pytest.mark.parametrize(("name", "items", "expected"), CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_interpreter(name: str, items: list[asm.Item], expected: int) -> None:
    prog = load(asm.Program(items, name=name[:15]), ProgType.SCHED_CLS, fast=False)
    assert not prog.fast
    assert prog.run(_zero_packet()) & 0xFFFFFFFF == expected


@pytest.mark.parametrize(("name", "items", "expected"), CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_fast_path(name: str, items: list[asm.Item], expected: int) -> None:
    prog = load(asm.Program(items), ProgType.SCHED_CLS)
    assert prog.fast
    assert prog.source is not None
    assert prog.source.startswith("def run(")
    assert prog.run(_zero_packet()) & 0xFFFFFFFF == expected
    assert prog.interpret(_zero_packet()) & 0xFFFFFFFF == expected


@pytest.mark.parametrize(("name", "items", "expected"), CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_from_bytes(name: str, items: list[asm.Item], expected: int) -> None:
    raw = asm.Program(items).encode()
    for fast in (False, True):
        prog = load(raw, ProgType.SCHED_CLS, fast=fast)
        assert prog.run(_zero_packet()) & 0xFFFFFFFF == expected
