"""The assembler's bytes through the real verifier and CPU: every corpus program gives
its expected result under BPF_PROG_TEST_RUN (as SCHED_CLS over a 64-byte packet)."""

from __future__ import annotations

import errno

import pytest

from corpus import CORPUS
from sockmap import asm, programs
from sockmap.abi import ProgType
from sockmap.errors import ENOTSUPP, BpfError
from sockmap.kernel.features import bpf_access
from sockmap.kernel.programs import load_program
from sockmap.kernel.run import run_program as run_prog

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module", autouse=True)
def _permitted() -> None:
    ok, why = bpf_access()
    if not ok:
        pytest.skip(f"bpf() refused: {why}")


@pytest.mark.parametrize(("name", "items", "expected"), CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_on_kernel(name: str, items: list[asm.Item], expected: int):
    with load_program(asm.Program(items, name="corpus"), ProgType.SCHED_CLS) as prog:
        assert run_prog(prog).retval == expected, name


def test_sk_skb_cannot_be_test_run():
    """Why the oracle uses SCHED_CLS: the kernel refuses test runs of SK_SKB programs."""
    with load_program(programs.whole_segment(), ProgType.SK_SKB) as prog:
        with pytest.raises(BpfError) as ei:
            run_prog(prog)
    assert ei.value.errno in (ENOTSUPP, errno.EOPNOTSUPP, errno.EINVAL)
    assert "test-run program" in str(ei.value)
