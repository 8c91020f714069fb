"""Host-wide views of socket maps (``sockmap ls``): every SOCKMAP and SOCKHASH, whoever
made it, with the programs attached and each entry joined with its socket's state.

Read-only: maps are opened by id, looked at, and closed; nothing is changed.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from sockmap.abi import AttachType, MapType
from sockmap.errors import BpfError, errno_name
from sockmap.kernel.attach import query
from sockmap.kernel.info import iter_map_ids, map_fd_by_id, map_info, prog_fd_by_id, prog_info
from sockmap.kernel.maps import SockMap, open_map_fd
from sockmap.kernel.sockdiag import SockInfo, sockets_by_cookie

__all__ = ["Entry", "SocketMapView", "list_socket_maps"]

_KINDS = (
    AttachType.SK_SKB_STREAM_PARSER,
    AttachType.SK_SKB_STREAM_VERDICT,
    AttachType.SK_SKB_VERDICT,
    AttachType.SK_MSG_VERDICT,
)


@dataclass
class Entry:
    key: str
    """The key, hex (little-endian for a SOCKMAP index: also given as ``index``)."""
    index: int | None
    cookie: int | None
    socket: dict[str, Any] | None
    """sock_diag's view of the socket (None: not found in this namespace)."""


@dataclass
class SocketMapView:
    id: int
    kind: str
    name: str
    key_size: int
    value_size: int
    max_entries: int
    programs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _program(pid: int) -> dict[str, Any]:
    try:
        fd = prog_fd_by_id(pid)
    except BpfError:
        return {"id": pid, "name": "?"}
    try:
        info = prog_info(fd)
        return {"id": pid, "name": info.name, "tag": info.tag, "insns": info.xlated_len // 8}
    finally:
        os.close(fd)


def _view(map_id: int, socks: dict[int, SockInfo], max_entries: int) -> SocketMapView | None:
    try:
        fd = map_fd_by_id(map_id)
    except BpfError:
        return None  # gone meanwhile
    try:
        info = map_info(fd)
    except BpfError:
        os.close(fd)
        return None
    if info.type not in (MapType.SOCKMAP, MapType.SOCKHASH):
        os.close(fd)
        return None
    kind = "sockmap" if info.type == MapType.SOCKMAP else "sockhash"
    view = SocketMapView(map_id, kind, info.name, info.key_size, info.value_size, info.max_entries)
    with open_map_fd(fd) as m:
        assert isinstance(m, SockMap)  # SOCKHASH is one too
        for k in _KINDS:
            with contextlib.suppress(BpfError):
                ids = query(m, k)
                if ids:
                    view.programs[k.name] = [_program(i) for i in ids]
        try:
            for key in m:
                raw = key if isinstance(key, bytes) else int(key).to_bytes(info.key_size, "little")
                cookie: int | None = None
                try:
                    cookie = m.lookup(raw)
                except BpfError as exc:
                    if exc.errno == errno.ENOENT:
                        continue  # an empty SOCKMAP slot
                    # value size 4 (ENOSPC): no cookie to show
                sock = socks.get(cookie) if cookie is not None else None
                view.entries.append(
                    Entry(
                        raw.hex(),
                        int.from_bytes(raw, "little") if kind == "sockmap" else None,
                        cookie,
                        asdict(sock) if sock is not None else None,
                    )
                )
                if len(view.entries) >= max_entries:
                    break
        except BpfError as exc:
            view.error = f"listing entries failed: {errno_name(exc.errno or 0)}"
    return view


def list_socket_maps(max_entries: int = 1000) -> list[SocketMapView]:
    """Every socket map on the host (at most ``max_entries`` entries shown for each)."""
    socks = sockets_by_cookie()
    out = []
    for map_id in iter_map_ids():
        view = _view(map_id, socks, max_entries)
        if view is not None:
            out.append(view)
    return out
