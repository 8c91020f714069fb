"""Offsets into kernel-internal structures and kfunc ids, read from the running kernel's BTF.

Unlike the UAPI (``__sk_buff``, ``bpf_sock_ops``), these layouts change between
kernel builds, so they are never hard-coded: programs that read them are built
for the kernel they will be loaded into. Two uses:

- ``struct tcp_sock`` fields (``bytes_acked``), reached from an SK_SKB program by
  looking a socket up in a sockmap and casting it with ``bpf_skc_to_tcp_sock``:
  a verdict can see how much of what it redirected into a target has left it.
- ``struct sk_buff``'s control block, which in strparser mode holds
  ``struct strp_msg`` (``full_len``, ``offset``), reached with the kfunc
  ``bpf_cast_to_kern_ctx``: a parser can read the message being framed, not
  only the segment's first bytes, and a verdict can see the message's length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sockmap.abi.btf import VMLINUX_BTF, Btf, BtfError, BtfNotFound, Kind
from sockmap.errors import SockmapError

__all__ = ["KernelInternals", "internals", "program_internals"]


@dataclass(frozen=True, slots=True)
class KernelInternals:
    """What the bounded datapath and the offset-aware parser need from this kernel build."""

    tcp_sock_bytes_acked: int
    """Offset of ``struct tcp_sock.bytes_acked`` (u64)."""
    skb_strp_full_len: int
    """Offset in ``struct sk_buff`` of the strparser message's ``full_len`` (s32)."""
    skb_strp_offset: int
    """Offset in ``struct sk_buff`` of the strparser message's ``offset`` (s32)."""
    skb_cb: int
    """Offset of ``struct sk_buff.cb``; outside strparser mode a TCP segment's ``struct
    tcp_skb_cb`` (``seq``, then ``end_seq``) starts there."""
    kfunc_cast_to_kern_ctx: int
    """BTF id of the kfunc ``bpf_cast_to_kern_ctx`` (0: this kernel has none)."""
    strparser_pass_miscounted: bool = False
    """The kernel reads for the strparser through ``tcp_bpf_strp_read_sock`` (Linux 6.14+
    and stable backports), which miscounts bytes a verdict passed to the socket itself
    while earlier passed bytes are still unread: the socket then stops delivering
    (docs/semantics.md, ``tests/kernel/test_strparser_pass_accounting.py``)."""


def _member(btf: Btf, struct: str, name: str) -> tuple[int, int]:
    for m in btf.struct_members(struct):
        if m.name == name:
            return m.offset_bytes, m.size_bytes * m.count
    raise BtfError(f"struct {struct} has no member {name!r} on this kernel")


@functools.cache
def internals(path: str = str(VMLINUX_BTF)) -> KernelInternals:
    """Read the layouts from ``path`` (the running kernel's BTF by default); cached.

    Raises :class:`SockmapError` saying what is missing when the kernel has no BTF
    or a layout the programs rely on.
    """
    try:
        btf = Btf.load(path)
        acked, _ = _member(btf, "tcp_sock", "bytes_acked")
        cb, cb_size = _member(btf, "sk_buff", "cb")
        strp, _ = _member(btf, "sk_skb_cb", "strp")
        seq, _ = _member(btf, "tcp_skb_cb", "seq")
        end_seq, _ = _member(btf, "tcp_skb_cb", "end_seq")
        full_len, _ = _member(btf, "strp_msg", "full_len")
        offset, _ = _member(btf, "strp_msg", "offset")
        kfuncs = btf.find_all("bpf_cast_to_kern_ctx")
        strp_read = btf.find_all("tcp_bpf_strp_read_sock", Kind.FUNC)
    except (OSError, BtfError, BtfNotFound) as exc:
        raise SockmapError(
            f"cannot read kernel layouts from {path}: {exc}; programs that read tcp_sock or "
            "strparser state need a kernel built with CONFIG_DEBUG_INFO_BTF",
        ) from exc
    if (seq, end_seq) != (0, 4):
        raise SockmapError(f"tcp_skb_cb starts with seq at {seq}, end_seq at {end_seq}: unknown")
    if strp + 8 > cb_size:
        raise SockmapError(f"strp_msg at {strp} does not fit sk_buff.cb ({cb_size} bytes)")
    return KernelInternals(
        tcp_sock_bytes_acked=acked,
        skb_strp_full_len=cb + strp + full_len,
        skb_strp_offset=cb + strp + offset,
        skb_cb=cb,
        kfunc_cast_to_kern_ctx=kfuncs[0] if kfuncs else 0,
        strparser_pass_miscounted=bool(strp_read),
    )


@functools.cache
def program_internals() -> KernelInternals | None:
    """This kernel's layouts if it has ``bpf_cast_to_kern_ctx`` (Linux 6.3+ with BTF), else
    None; cached. Ready-made parsers read the strparser offset through the kfunc only
    then, and the userspace VM runs the kfunc under this id."""
    try:
        k = internals()
    except SockmapError:
        return None
    return k if k.kfunc_cast_to_kern_ctx else None
