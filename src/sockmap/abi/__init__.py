"""Numbers and layouts from the kernel's UAPI (``include/uapi/linux/bpf.h``).

Only what the project uses is here. Every enum value and struct offset is
checked against the running kernel's BTF by ``tests/kernel/test_abi_btf.py``.
"""

from __future__ import annotations

from sockmap.abi.enums import TCP_STATES as TCP_STATES
from sockmap.abi.enums import (
    AttachType,
    Cmd,
    Helper,
    MapType,
    ProgType,
    SkAction,
    UpdateFlag,
)
from sockmap.abi.layouts import SK_BUFF, SK_MSG_MD, SOCK_OPS, CtxField, CtxLayout

BPF_F_INGRESS = 1
"""Flag for sk/msg redirect helpers: deliver to the target's receive queue."""

BPF_OBJ_NAME_LEN = 16
SYS_BPF_X86_64 = 321

__all__ = [
    "BPF_F_INGRESS",
    "BPF_OBJ_NAME_LEN",
    "SK_BUFF",
    "SK_MSG_MD",
    "SOCK_OPS",
    "SYS_BPF_X86_64",
    "AttachType",
    "Cmd",
    "CtxField",
    "CtxLayout",
    "Helper",
    "MapType",
    "ProgType",
    "SkAction",
    "UpdateFlag",
]
