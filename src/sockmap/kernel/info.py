"""Object information: ``BPF_OBJ_GET_INFO_BY_FD`` and id iteration."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

from sockmap.abi import Cmd, MapType, ProgType
from sockmap.errors import BpfError
from sockmap.kernel.syscall import address, bpf, buffer

__all__ = ["MapInfo", "ProgInfo", "iter_map_ids", "iter_prog_ids", "map_info", "prog_info"]

_MAP_INFO_LEN = 88
_PROG_INFO_LEN = 232


_E = TypeVar("_E", MapType, ProgType)


def _enum_or_int(cls: type[_E], value: int) -> _E | int:
    try:
        return cls(value)
    except ValueError:
        return value


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class MapInfo:
    """What the kernel says about a map (``struct bpf_map_info``)."""

    type: MapType | int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True, slots=True)
class ProgInfo:
    """What the kernel says about a program (``struct bpf_prog_info``)."""

    type: ProgType | int
    id: int
    tag: str
    xlated_len: int
    jited_len: int
    map_ids: tuple[int, ...]
    name: str


def _get_info(fd: int, length: int, what: str) -> bytes:
    info = buffer(length)
    bpf(Cmd.OBJ_GET_INFO_BY_FD, "IIQ", fd, length, address(info), what=what)
    return info.raw


def map_info(fd: int) -> MapInfo:
    """Info of the map behind ``fd``."""
    raw = _get_info(fd, _MAP_INFO_LEN, f"get info of map fd {fd}")
    mtype, mid, ks, vs, maxe, flags = struct.unpack_from("<6I", raw, 0)
    return MapInfo(_enum_or_int(MapType, mtype), mid, ks, vs, maxe, flags, _cstr(raw[24:40]))


def prog_info(fd: int) -> ProgInfo:
    """Info of the program behind ``fd``, including the ids of the maps it uses."""
    raw = _get_info(fd, _PROG_INFO_LEN, f"get info of program fd {fd}")
    nr_maps = struct.unpack_from("<I", raw, 52)[0]
    map_ids: tuple[int, ...] = ()
    if nr_maps:
        ids = buffer(4 * nr_maps)
        info = bytearray(_PROG_INFO_LEN)
        struct.pack_into("<IQ", info, 52, nr_maps, address(ids))
        info_buf = buffer(bytes(info))
        bpf(
            Cmd.OBJ_GET_INFO_BY_FD,
            "IIQ",
            fd,
            _PROG_INFO_LEN,
            address(info_buf),
            what=f"get map ids of program fd {fd}",
        )
        map_ids = struct.unpack(f"<{nr_maps}I", ids.raw)
    ptype, pid = struct.unpack_from("<II", raw, 0)
    jited, xlated = struct.unpack_from("<II", raw, 16)
    return ProgInfo(
        _enum_or_int(ProgType, ptype),
        pid,
        raw[8:16].hex(),
        xlated,
        jited,
        map_ids,
        _cstr(raw[64:80]),
    )


def _iter_ids(cmd: Cmd, kind: str) -> Iterator[int]:
    start = 0
    while True:
        try:
            _, attr = bpf(cmd, "II", start, 0, what=f"list {kind} ids")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        start = struct.unpack_from("<I", attr, 4)[0]
        yield start


def iter_prog_ids() -> Iterator[int]:
    """Ids of every program loaded on the host."""
    return _iter_ids(Cmd.PROG_GET_NEXT_ID, "program")


def iter_map_ids() -> Iterator[int]:
    """Ids of every map on the host."""
    return _iter_ids(Cmd.MAP_GET_NEXT_ID, "map")


def prog_fd_by_id(prog_id: int) -> int:
    """Open a new fd to program ``prog_id`` (the caller closes it)."""
    fd, _ = bpf(Cmd.PROG_GET_FD_BY_ID, "I", prog_id, what=f"open program id {prog_id}")
    return fd


def map_fd_by_id(map_id: int) -> int:
    """Open a new fd to map ``map_id`` (the caller closes it)."""
    fd, _ = bpf(Cmd.MAP_GET_FD_BY_ID, "I", map_id, what=f"open map id {map_id}")
    return fd
