"""sockmap: Linux BPF sockmap from Python.

``open_engine("kernel")`` drives the kernel's sockmap through ``bpf(2)``;
``open_engine("userspace")`` is the same sockmap in Python, running the same
bytecode in a VM; ``sockmap.asm`` writes programs, ``sockmap.programs`` has ready ones.
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
    from sockmap.userspace.engine import UserspaceEngine

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


def open_engine(kind: EngineKind = "auto") -> KernelEngine | UserspaceEngine:
    """Open an engine: ``kernel`` needs bpf(); ``userspace`` runs anywhere; ``auto`` picks
    the kernel's where bpf() is permitted and ``sockmap doctor`` finds its redirect
    working (the cached report, or a quick probe), the userspace one elsewhere; the
    choice and why are logged (``sockmap`` logger)."""
    import logging  # noqa: PLC0415

    from sockmap.doctor import choose_engine  # noqa: PLC0415
    from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415 - keep import light
    from sockmap.userspace.engine import UserspaceEngine  # noqa: PLC0415

    if kind not in ("auto", "kernel", "userspace"):
        raise ValueError(f"engine must be 'auto', 'kernel' or 'userspace', not {kind!r}")
    name, why = choose_engine(kind)
    logging.getLogger("sockmap").info("%s engine (%s; --engine %s)", name, why, kind)
    if name == "userspace":
        return UserspaceEngine()
    return KernelEngine()
