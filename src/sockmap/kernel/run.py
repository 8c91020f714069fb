"""Running a loaded program on given input (``BPF_PROG_TEST_RUN``).

SK_SKB programs cannot be test-run (the kernel answers ENOTSUPP, 524); a SCHED_CLS
program over a packet can, which makes the kernel an oracle for instruction
semantics: the assembler's bytes and, later, the userspace VM's results.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sockmap.abi import Cmd
from sockmap.kernel.programs import Prog
from sockmap.kernel.syscall import address, bpf, buffer

__all__ = ["RunResult", "run_program"]


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one test run returned."""

    retval: int
    duration_ns: int


def run_program(prog: Prog, data: bytes = bytes(64), repeat: int = 1) -> RunResult:
    """Run ``prog`` ``repeat`` times over ``data``; return r0 (as u32) and the mean duration."""
    dbuf = buffer(data)
    _, attr = bpf(
        Cmd.PROG_TEST_RUN,
        "IIIIQQII",
        prog.fd,
        0,
        len(data),
        0,
        address(dbuf),
        0,
        repeat,
        0,
        what=f"test-run program {prog.name!r}",
    )
    retval = struct.unpack_from("<I", attr, 4)[0]
    duration = struct.unpack_from("<I", attr, 36)[0]
    return RunResult(retval, duration)
