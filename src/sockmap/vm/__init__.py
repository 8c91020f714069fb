"""A userspace eBPF virtual machine for socket programs (SK_SKB, SK_MSG; SCHED_CLS for tests).

``load()`` validates a program once (like a small verifier) and translates it to a
specialised Python function; ``VmProgram.run()`` runs it against a context and a
``HelperEnv``. All memory is bounds-checked regions; see :mod:`sockmap.vm.memory`.
"""

from __future__ import annotations

from sockmap.vm.api import HelperEnv, VmMap
from sockmap.vm.context import MsgContext, SkbContext, SockOpsContext
from sockmap.vm.program import DEFAULT_BUDGET, MapResolver, VmProgram, load

__all__ = [
    "DEFAULT_BUDGET",
    "HelperEnv",
    "MapResolver",
    "MsgContext",
    "SkbContext",
    "SockOpsContext",
    "VmMap",
    "VmProgram",
    "load",
]
