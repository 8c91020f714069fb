"""Program context layouts: ``struct __sk_buff``, ``struct sk_msg_md``, ``struct bpf_sock_ops``.

A field is (name, offset, size). Arrays are one field with ``count`` elements.
Values are as the UAPI header defines them; the BTF test checks them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CtxField:
    """One member of a context struct."""

    name: str
    offset: int
    size: int
    count: int = 1
    pointer: bool = False
    """``__bpf_md_ptr`` members: 8 bytes in the struct, a pointer in the program."""

    @property
    def end(self) -> int:
        return self.offset + self.size * self.count


@dataclass(frozen=True, slots=True)
class CtxLayout:
    """A context struct as programs see it."""

    name: str
    fields: tuple[CtxField, ...]

    @property
    def size(self) -> int:
        return max(f.end for f in self.fields)

    def __getitem__(self, name: str) -> CtxField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}")

    def offset(self, name: str, index: int = 0) -> int:
        """Byte offset of ``name`` (element ``index`` for array fields)."""
        f = self[name]
        if not 0 <= index < f.count:
            raise IndexError(f"{self.name}.{name} has {f.count} elements, not index {index}")
        return f.offset + index * f.size

    def field_at(self, offset: int) -> CtxField | None:
        """The field covering byte ``offset``, if any."""
        for f in self.fields:
            if f.offset <= offset < f.end:
                return f
        return None


def _f(name: str, offset: int, size: int = 4, count: int = 1, *, pointer: bool = False) -> CtxField:
    return CtxField(name, offset, size, count, pointer)


SK_BUFF = CtxLayout(
    "__sk_buff",
    (
        _f("len", 0),
        _f("pkt_type", 4),
        _f("mark", 8),
        _f("queue_mapping", 12),
        _f("protocol", 16),
        _f("vlan_present", 20),
        _f("vlan_tci", 24),
        _f("vlan_proto", 28),
        _f("priority", 32),
        _f("ingress_ifindex", 36),
        _f("ifindex", 40),
        _f("tc_index", 44),
        _f("cb", 48, 4, 5),
        _f("hash", 68),
        _f("tc_classid", 72),
        _f("data", 76),
        _f("data_end", 80),
        _f("napi_id", 84),
        _f("family", 88),
        _f("remote_ip4", 92),
        _f("local_ip4", 96),
        _f("remote_ip6", 100, 4, 4),
        _f("local_ip6", 116, 4, 4),
        _f("remote_port", 132),
        _f("local_port", 136),
        _f("data_meta", 140),
        _f("flow_keys", 144, 8, pointer=True),
        _f("tstamp", 152, 8),
        _f("wire_len", 160),
        _f("gso_segs", 164),
        _f("sk", 168, 8, pointer=True),
        _f("gso_size", 176),
        _f("tstamp_type", 180, 1),
        _f("hwtstamp", 184, 8),
    ),
)

SK_MSG_MD = CtxLayout(
    "sk_msg_md",
    (
        _f("data", 0, 8, pointer=True),
        _f("data_end", 8, 8, pointer=True),
        _f("family", 16),
        _f("remote_ip4", 20),
        _f("local_ip4", 24),
        _f("remote_ip6", 28, 4, 4),
        _f("local_ip6", 44, 4, 4),
        _f("remote_port", 60),
        _f("local_port", 64),
        _f("size", 68),
        _f("sk", 72, 8, pointer=True),
    ),
)

SOCK_OPS = CtxLayout(
    "bpf_sock_ops",
    (
        _f("op", 0),
        _f("args", 4, 4, 4),
        _f("family", 20),
        _f("remote_ip4", 24),
        _f("local_ip4", 28),
        _f("remote_ip6", 32, 4, 4),
        _f("local_ip6", 48, 4, 4),
        _f("remote_port", 64),
        _f("local_port", 68),
        _f("is_fullsock", 72),
        _f("snd_cwnd", 76),
        _f("srtt_us", 80),
        _f("bpf_sock_ops_cb_flags", 84),
        _f("state", 88),
        _f("rtt_min", 92),
        _f("snd_ssthresh", 96),
        _f("rcv_nxt", 100),
        _f("snd_nxt", 104),
        _f("snd_una", 108),
        _f("mss_cache", 112),
        _f("ecn_flags", 116),
        _f("rate_delivered", 120),
        _f("rate_interval_us", 124),
        _f("packets_out", 128),
        _f("retrans_out", 132),
        _f("total_retrans", 136),
        _f("segs_in", 140),
        _f("data_segs_in", 144),
        _f("segs_out", 148),
        _f("data_segs_out", 152),
        _f("lost_out", 156),
        _f("sacked_out", 160),
        _f("sk_txhash", 164),
        _f("bytes_received", 168, 8),
        _f("bytes_acked", 176, 8),
        _f("sk", 184, 8, pointer=True),
        _f("skb_data", 192, 8, pointer=True),
        _f("skb_data_end", 200, 8, pointer=True),
        _f("skb_len", 208),
        _f("skb_tcp_flags", 212),
        _f("skb_hwtstamp", 216, 8),
    ),
)
