"""The hand-written ABI in ``sockmap.abi`` against the running kernel's BTF.

Every enum member and context-struct field the project encodes by hand is compared
with ``/sys/kernel/btf/vmlinux``; each comparison is its own test case so a
mismatch names itself.
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path

import pytest

from sockmap.abi import (
    BPF_F_INGRESS,
    SK_BUFF,
    SK_MSG_MD,
    SOCK_OPS,
    AttachType,
    Cmd,
    CtxField,
    CtxLayout,
    Helper,
    MapType,
    ProgType,
    SkAction,
    UpdateFlag,
)
from sockmap.abi.btf import VMLINUX_BTF, Btf, Kind, Member

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def btf() -> Btf:
    if not Path(VMLINUX_BTF).exists():
        pytest.skip(
            f"no {VMLINUX_BTF}: this kernel was built without CONFIG_DEBUG_INFO_BTF "
            "(or sysfs is not mounted), so there is nothing to check the ABI against"
        )
    return Btf.load()


def test_vmlinux_loads_fast_and_whole(btf: Btf) -> None:
    start = time.perf_counter()
    fresh = Btf.load()
    fresh.find("__sk_buff")  # forces the lazy name index too
    elapsed = time.perf_counter() - start
    assert len(fresh) == len(btf) > 10_000
    assert elapsed < 2.0, f"loading and indexing vmlinux BTF took {elapsed:.2f}s"


# ---------------------------------------------------------------- context layouts

LAYOUTS: list[CtxLayout] = [SK_BUFF, SK_MSG_MD, SOCK_OPS]


def _btf_struct(btf: Btf, layout: CtxLayout) -> dict[str, Member]:
    tids = btf.find_all(layout.name, Kind.STRUCT)
    if not tids:
        pytest.skip(f"struct {layout.name} is not in this kernel's BTF")
    return {m.name: m for m in btf.struct_members(tids[0])}


@pytest.mark.parametrize(
    ("layout", "field"),
    [(lay, f) for lay in LAYOUTS for f in lay.fields],
    ids=[f"{lay.name}.{f.name}" for lay in LAYOUTS for f in lay.fields],
)
def test_layout_field_matches_btf(btf: Btf, layout: CtxLayout, field: CtxField) -> None:
    members = _btf_struct(btf, layout)
    assert field.name in members, f"struct {layout.name} has no member {field.name!r}"
    m = members[field.name]
    got = (m.offset_bytes, m.size_bytes, m.count)
    want = (field.offset, field.size, field.count)
    assert got == want, f"{layout.name}.{field.name}: BTF (offset, size, count) {got}, ours {want}"
    assert m.bitfield_size == 0, f"{layout.name}.{field.name} is a bitfield in BTF"
    assert (m.kind is Kind.PTR) == field.pointer, (
        f"{layout.name}.{field.name}: BTF says pointer={m.kind is Kind.PTR}, ours {field.pointer}"
    )


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
def test_layout_size_matches_btf(btf: Btf, layout: CtxLayout) -> None:
    tids = btf.find_all(layout.name, Kind.STRUCT)
    if not tids:
        pytest.skip(f"struct {layout.name} is not in this kernel's BTF")
    assert layout.size == btf.sizeof(tids[0])


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
def test_layout_covers_every_btf_member(btf: Btf, layout: CtxLayout) -> None:
    """A BTF member missing from the layout must at least alias one of its fields.

    ``bpf_sock_ops.reply``/``replylong`` share a union with ``args``, for instance.
    """
    ours = {f.name for f in layout.fields}
    uncovered = [
        m.name
        for m in _btf_struct(btf, layout).values()
        if m.name not in ours and layout.field_at(m.offset_bytes) is None
    ]
    assert not uncovered, f"{layout.name} members this kernel has and we lack: {uncovered}"


# ---------------------------------------------------------------- enums

ENUMS: list[tuple[type[Enum], str, str]] = [
    (Cmd, "bpf_cmd", "BPF_"),
    (MapType, "bpf_map_type", "BPF_MAP_TYPE_"),
    (ProgType, "bpf_prog_type", "BPF_PROG_TYPE_"),
    (AttachType, "bpf_attach_type", "BPF_"),
    (Helper, "bpf_func_id", "BPF_FUNC_"),
    (SkAction, "sk_action", "SK_"),
]

ENUM_CASES = [
    (cls, enum_name, prefix + member_name, member.value)
    for cls, enum_name, prefix in ENUMS
    for member_name, member in cls.__members__.items()
]


@pytest.mark.parametrize(
    ("cls", "enum_name", "kernel_name", "value"),
    ENUM_CASES,
    ids=[f"{c[0].__name__}.{c[2]}" for c in ENUM_CASES],
)
def test_enum_member_matches_btf(
    btf: Btf, cls: type[Enum], enum_name: str, kernel_name: str, value: int
) -> None:
    kernel = btf.enum_values(enum_name)
    assert kernel_name in kernel, f"enum {enum_name} has no {kernel_name}"
    assert kernel[kernel_name] == value, (
        f"{cls.__name__}: {kernel_name} is {kernel[kernel_name]} in the kernel, ours {value}"
    )


# BPF_ANY... live in an anonymous enum in include/uapi/linux/bpf.h, as does BPF_F_INGRESS.
FLAG_CASES = [("BPF_" + name, int(member)) for name, member in UpdateFlag.__members__.items()]
FLAG_CASES.append(("BPF_F_INGRESS", BPF_F_INGRESS))


@pytest.mark.parametrize(("kernel_name", "value"), FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_anonymous_enum_flag_matches_btf(btf: Btf, kernel_name: str, value: int) -> None:
    assert btf.enumerator(kernel_name) == value
