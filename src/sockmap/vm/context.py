"""Program contexts (``__sk_buff``, ``sk_msg_md``, ``bpf_sock_ops``) and which of their bytes
a program may touch.

The access rules follow the kernel's ``*_is_valid_access`` callbacks for each program
type (net/core/filter.c), restated here: a table from (offset, size, write) to how the
access maps onto the context object's attributes. ``data``/``data_end`` reads give
packet pointers, as the kernel's context rewriting does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sockmap.abi import SK_BUFF, SK_MSG_MD, SOCK_OPS, CtxLayout, ProgType

__all__ = ["CtxAccess", "MsgContext", "SkbContext", "SockOpsContext", "access_table"]


@dataclass(slots=True)
class SkbContext:
    """``struct __sk_buff`` as an SK_SKB (or SCHED_CLS) program sees it.

    ``data`` may be only a prefix of the message; ``len`` is the full length (``skb->len``,
    defaults to ``len(data)``). ``remote_port`` is in network byte order in the upper 16 bits,
    ``local_port`` in host order (the kernel's convention); IPv4/IPv6 addresses are the
    u32 words as the kernel stores them (network-order bytes read as little-endian u32).
    Writable fields (``priority``, ``tc_index``; plus ``mark``, ``cb``... for SCHED_CLS) are
    updated in place when the program writes them.
    """

    data: bytes | bytearray | memoryview = b""
    len: int | None = None
    family: int = 0
    remote_ip4: int = 0
    local_ip4: int = 0
    remote_ip6: tuple[int, int, int, int] = (0, 0, 0, 0)
    local_ip6: tuple[int, int, int, int] = (0, 0, 0, 0)
    remote_port: int = 0
    local_port: int = 0
    mark: int = 0
    priority: int = 0
    hash: int = 0
    cb: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])
    pkt_type: int = 0
    queue_mapping: int = 0
    protocol: int = 0
    vlan_present: int = 0
    vlan_tci: int = 0
    vlan_proto: int = 0
    ingress_ifindex: int = 0
    ifindex: int = 0
    tc_index: int = 0
    tc_classid: int = 0
    napi_id: int = 0
    tstamp: int = 0
    wire_len: int = 0
    gso_segs: int = 0
    gso_size: int = 0
    hwtstamp: int = 0
    strp_offset: int = 0
    """Where the message starts in the segment (strparser's ``offset``; the engine hands
    programs the message itself, so 0), read through ``bpf_cast_to_kern_ctx``."""
    strp_full_len: int = 0
    """The message length in a strparser-mode verdict (0 while parsing, as in the kernel)."""


@dataclass(slots=True)
class MsgContext:
    """``struct sk_msg_md`` as an SK_MSG program sees it (read-only for the program).

    ``size`` is the whole message size (defaults to ``len(data)``); ``data`` is what
    direct packet access can see.
    """

    data: bytes | bytearray | memoryview = b""
    size: int | None = None
    family: int = 0
    remote_ip4: int = 0
    local_ip4: int = 0
    remote_ip6: tuple[int, int, int, int] = (0, 0, 0, 0)
    local_ip6: tuple[int, int, int, int] = (0, 0, 0, 0)
    remote_port: int = 0
    local_port: int = 0


class SockOpsContext:
    """``struct bpf_sock_ops`` as a SOCK_OPS program sees it: the event (``op``, ``args``,
    whose first word is also ``reply``, which the program may write), the socket's
    addresses (the same conventions as ``__sk_buff``) and TCP figures (0 unless given)."""

    data = b""
    size = 0

    def __init__(self, op: int = 0, **fields: Any) -> None:  # noqa: ANN401 - field values
        self.op = op
        self.args: list[int] | tuple[int, ...] = (0, 0, 0, 0)
        self.remote_ip6: list[int] | tuple[int, ...] = (0, 0, 0, 0)
        self.local_ip6: list[int] | tuple[int, ...] = (0, 0, 0, 0)
        self.is_fullsock = 1
        for name, value in fields.items():
            if name not in _SOCKOPS_NAMES:
                raise TypeError(f"bpf_sock_ops has no field {name!r}")
            setattr(self, name, value)

    @property
    def reply(self) -> int:
        return int(self.args[0])

    def __getattr__(self, name: str) -> int:
        if name.startswith("_") or name not in _SOCKOPS_NAMES:
            raise AttributeError(name)
        return 0  # a TCP figure nobody gave: 0


_SOCKOPS_NAMES = frozenset(f.name for f in SOCK_OPS.fields)


# A part of an access: (attr, index or -1, elem_size, lo byte, hi byte, shift into the value).
Part = tuple[str, int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class CtxAccess:
    """How one allowed (offset, size, direction) context access is carried out."""

    kind: str
    """``field`` (attributes, see ``parts``), ``data``, ``data_end`` or ``data_meta``."""
    parts: tuple[Part, ...] = ()
    name: str = ""


_SOCK_FIELDS = frozenset(
    {"family", "remote_ip4", "local_ip4", "remote_ip6", "local_ip6", "remote_port", "local_port"}
)
_FULL_ONLY = frozenset({"remote_ip6", "local_ip6", "remote_ip4", "local_ip4"})
_PTR_KINDS = {"data": "data", "data_end": "data_end", "data_meta": "data_meta"}
_SKB_WRITABLE = {
    ProgType.SK_SKB: frozenset({"tc_index", "priority"}),
    ProgType.SCHED_CLS: frozenset(
        {"mark", "tc_index", "priority", "tc_classid", "cb", "tstamp", "queue_mapping"}
    ),
}
_SKB_HIDDEN = {
    ProgType.SK_SKB: frozenset(
        {"tc_classid", "data_meta", "tstamp", "wire_len", "hwtstamp", "mark"}
    ),
    ProgType.SCHED_CLS: _SOCK_FIELDS,
}
UNSUPPORTED = frozenset({"sk", "flow_keys"})
"""Fields the kernel may allow but this VM cannot provide (socket/flow-key pointers)."""


def _skb_kind(pt: ProgType, off: int, size: int, write: bool) -> str | None:
    f = SK_BUFF.field_at(off)
    if f is None or off % size or f.name in UNSUPPORTED or f.name == "tstamp_type":
        return None
    name = f.name
    if name in _SKB_HIDDEN[pt] or (write and name not in _SKB_WRITABLE[pt]):
        return None
    if name == "cb":
        ok = off + size <= f.end
    elif name in _FULL_ONLY or name in _PTR_KINDS:
        ok = size == 4
    elif name == "hwtstamp":
        ok = not write and size == 8
    elif name == "tstamp":
        ok = size == 8
    elif write:
        ok = size == f.size
    else:  # narrow reads inside one field
        ok = size <= f.size and (off - f.offset) % f.size + size <= f.size
    if not ok:
        return None
    return _PTR_KINDS.get(name, "field")


def _msg_kind(off: int, size: int, write: bool) -> str | None:
    f = SK_MSG_MD.field_at(off)
    if write or f is None or off % size or f.name in UNSUPPORTED:
        return None
    if f.name in ("data", "data_end"):
        return f.name if size == 8 and off == f.offset else None
    return "field" if size == 4 else None


_SOCKOPS_WRITABLE = frozenset({"args", "sk_txhash"})  # args[0..3] is also reply/replylong
_SOCKOPS_U64 = frozenset({"bytes_received", "bytes_acked", "skb_hwtstamp"})


def _sockops_kind(off: int, size: int, write: bool) -> str | None:
    f = SOCK_OPS.field_at(off)
    if f is None or off % size or f.pointer:
        return None  # the socket and packet pointers are not modelled
    if write and f.name not in _SOCKOPS_WRITABLE:
        return None
    if f.name in _SOCKOPS_U64:
        return "field" if size == 8 and not write else None
    return "field" if size == 4 else None


def _parts(layout: CtxLayout, off: int, size: int) -> tuple[Part, ...]:
    parts: list[Part] = []
    pos = off
    while pos < off + size:
        f = layout.field_at(pos)
        assert f is not None
        index = (pos - f.offset) // f.size
        elem_start = f.offset + index * f.size
        lo = pos - elem_start
        hi = min(f.size, off + size - elem_start)
        parts.append((f.name, index if f.count > 1 else -1, f.size, lo, hi, 8 * (pos - off)))
        pos = elem_start + hi
    return tuple(parts)


_TABLES: dict[ProgType, dict[tuple[int, int, bool], CtxAccess]] = {}


def layout_of(pt: ProgType) -> CtxLayout:
    """The context struct of a program type."""
    if pt == ProgType.SOCK_OPS:
        return SOCK_OPS
    return SK_MSG_MD if pt == ProgType.SK_MSG else SK_BUFF


def access_table(pt: ProgType) -> dict[tuple[int, int, bool], CtxAccess]:
    """Every allowed context access of program type ``pt``: (off, size, write) -> how."""
    table = _TABLES.get(pt)
    if table is not None:
        return table
    layout = layout_of(pt)
    table = {}
    for off in range(layout.size):
        for size in (1, 2, 4, 8):
            for write in (False, True):
                if pt == ProgType.SK_MSG:
                    kind = _msg_kind(off, size, write)
                elif pt == ProgType.SOCK_OPS:
                    kind = _sockops_kind(off, size, write)
                else:
                    kind = _skb_kind(pt, off, size, write)
                if kind is None:
                    continue
                name = layout.field_at(off).name  # type: ignore[union-attr]
                parts = _parts(layout, off, size) if kind == "field" else ()
                table[off, size, write] = CtxAccess(kind, parts, name)
    _TABLES[pt] = table
    return table


def describe_access(pt: ProgType, off: int, size: int, *, write: bool) -> str:
    """Why a context access is refused, in the kernel's words plus the field's name."""
    layout = layout_of(pt)
    f = layout.field_at(off) if 0 <= off < layout.size else None
    what = "write" if write else "read"
    where = f"{layout.name}.{f.name}" if f else f"outside {layout.name}"
    extra = " (not supported by the userspace VM)" if f and f.name in UNSUPPORTED else ""
    return (
        f"invalid bpf_context access off={off} size={size} ({what} of {where} is not allowed "
        f"for {pt.name} programs){extra}"
    )


def read_parts(ctx: object, parts: tuple[Part, ...], length: int) -> int:
    """Compose a context read from the attributes it covers (``length``: skb len / msg size)."""
    value = 0
    for attr, index, esize, lo, hi, shift in parts:
        raw: Any = length if attr in ("len", "size") else getattr(ctx, attr)
        v: int = raw[index] if index >= 0 else raw
        v &= (1 << (8 * esize)) - 1
        value |= ((v >> (8 * lo)) & ((1 << (8 * (hi - lo))) - 1)) << shift
    return value


def write_parts(ctx: object, parts: tuple[Part, ...], value: int) -> None:
    """Split a context write onto the attributes it covers (read-modify-write per element)."""
    for attr, index, esize, lo, hi, shift in parts:
        width = (1 << (8 * (hi - lo))) - 1
        piece = (value >> shift) & width
        if index >= 0:
            seq = getattr(ctx, attr)
            if not isinstance(seq, list):
                seq = list(seq)
                setattr(ctx, attr, seq)
            old = seq[index] & ((1 << (8 * esize)) - 1)
            seq[index] = (old & ~(width << (8 * lo))) | (piece << (8 * lo))
        else:
            old = getattr(ctx, attr) & ((1 << (8 * esize)) - 1)
            setattr(ctx, attr, (old & ~(width << (8 * lo))) | (piece << (8 * lo)))
