"""The ``struct tcp_info`` offsets the datapath reads, against the running kernel's BTF."""

from __future__ import annotations

from pathlib import Path

import pytest

from sockmap.abi.btf import VMLINUX_BTF, Btf
from sockmap.datapath import tcp

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize(
    ("member", "offset", "size"),
    [
        ("tcpi_state", tcp.TCPI_STATE, 1),
        ("tcpi_bytes_acked", tcp.TCPI_BYTES_ACKED, 8),
        ("tcpi_bytes_received", tcp.TCPI_BYTES_RECEIVED, 8),
        ("tcpi_notsent_bytes", tcp.TCPI_NOTSENT_BYTES, 4),
    ],
)
def test_tcp_info_offsets_match_btf(member: str, offset: int, size: int):
    if not Path(VMLINUX_BTF).exists():
        pytest.skip(f"no {VMLINUX_BTF}: kernel built without BTF")
    members = {m.name: m for m in Btf.load().struct_members("tcp_info")}
    assert (members[member].offset_bytes, members[member].size_bytes) == (offset, size)
    assert offset + size <= tcp.TCP_INFO_LEN
