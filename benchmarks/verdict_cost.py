"""Microseconds per verdict run as the userspace engine runs it (helper environment,
context and the splicer's instrumented program), for before/after comparisons of the
VM and the engine.

    python benchmarks/verdict_cost.py [RUNS]

To compare with another version, run the same file with that version first on the
path: ``PYTHONPATH=/path/to/old/checkout/src python benchmarks/verdict_cost.py``.
"""

from __future__ import annotations

import socket
import sys
import time

from sockmap.userspace.engine import UserspaceEngine
from sockmap.userspace.psock import RedirectEnv
from sockmap.userspace.splice import UserspaceSplicer
from sockmap.vm import SkbContext


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    eng = UserspaceEngine()
    sp = UserspaceSplicer(eng, 4, "verdict")
    srv = socket.create_server(("127.0.0.1", 0))
    c1 = socket.create_connection(srv.getsockname())
    s1, _ = srv.accept()
    c2 = socket.create_connection(srv.getsockname())
    s2, _ = srv.accept()
    try:
        sp.splice(s1, c2)
        dp = eng.datapath
        p = dp._by_fd[s1.fileno()]
        progs = p.progs
        assert progs is not None
        assert progs.verdict is not None
        msg = bytes(65536)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(runs):
                env = RedirectEnv(dp, p)
                ctx = SkbContext(data=msg, len=len(msg), **p.ctx_fields)  # type: ignore[arg-type]
                progs.verdict(ctx, env)
            best = min(best, (time.perf_counter() - t0) / runs)
            assert env.target is not None, "the verdict did not redirect"
        print(f"splice verdict: {best * 1e6:.1f} us/run (best of 3 x {runs})")  # noqa: T201
    finally:
        sp.close()
        eng.close()
        for s in (c1, c2, s1, s2, srv):
            s.close()


if __name__ == "__main__":
    main()
