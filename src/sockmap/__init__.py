"""sockmap: Linux BPF sockmap from Python.

``open_engine("kernel")`` drives the kernel's sockmap through ``bpf(2)``;
``sockmap.asm`` writes the programs, ``sockmap.programs`` has ready ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from sockmap.errors import (
    BpfError,
    KeyExists,
    KeyNotFound,
    MapFull,
    PermissionDenied,
    SockmapError,
    UnsupportedSocket,
    VerifierError,
)

if TYPE_CHECKING:
    from sockmap.kernel.engine import KernelEngine

__version__ = "0.1.0"

__all__ = [
    "BpfError",
    "KeyExists",
    "KeyNotFound",
    "MapFull",
    "PermissionDenied",
    "SockmapError",
    "UnsupportedSocket",
    "VerifierError",
    "__version__",
    "open_engine",
]

EngineKind = Literal["auto", "kernel", "userspace"]


def open_engine(kind: EngineKind = "auto") -> KernelEngine:
    """Open an engine: ``kernel`` needs bpf(); ``auto`` picks it where bpf() is permitted.

    The userspace engine is not built yet: asking for it (or ``auto`` where bpf()
    is refused) raises an error that says why the kernel engine is unavailable.
    """
    from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415 - keep import light
    from sockmap.kernel.features import bpf_access  # noqa: PLC0415

    if kind not in ("auto", "kernel", "userspace"):
        raise ValueError(f"engine must be 'auto', 'kernel' or 'userspace', not {kind!r}")
    if kind == "userspace":
        raise SockmapError("the userspace engine is not available yet; use 'kernel'")
    permitted, why = bpf_access()
    if not permitted and kind == "auto":
        raise SockmapError(f"no engine available: the kernel engine needs bpf(), but {why}")
    return KernelEngine()
