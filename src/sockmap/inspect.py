"""Host-wide views of socket maps (``sockmap ls``): every SOCKMAP and SOCKHASH, whoever
made it, with the programs attached and each entry joined with its socket's state.

Read-only: maps are opened by id, looked at, and closed; nothing is changed.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sockmap.abi import AttachType, MapType
from sockmap.errors import BpfError, errno_name
from sockmap.kernel.attach import query
from sockmap.kernel.info import iter_map_ids, map_fd_by_id, map_info, prog_fd_by_id, prog_info
from sockmap.kernel.maps import SockMap, open_map_fd
from sockmap.kernel.sockdiag import SockInfo, sockets_by_cookie

__all__ = ["Entry", "SocketMapView", "Why", "list_socket_maps", "why"]

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
        out: dict[str, Any] = {
            "id": pid,
            "name": info.name,
            "tag": info.tag,
            "insns": info.xlated_len // 8,
        }
    finally:
        os.close(fd)
    counters = _outcomes_of(pid)
    if counters is not None:
        out["outcomes"] = counters
    return out


def _outcomes_of(pid: int) -> dict[str, int] | None:
    """The outcome counters of an instrumented program (its ``oc_`` map), if any."""
    from sockmap.programs.outcomes import read_outcomes  # noqa: PLC0415

    oc_id = next((i for n, i in _program_maps(pid).items() if n.startswith("oc_")), None)
    if oc_id is None:
        return None
    with contextlib.suppress(BpfError), open_map_fd(map_fd_by_id(oc_id)) as oc:
        return {k: v for k, v in read_outcomes(oc).items() if v}
    return None


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


# -- sockmap why ----------------------------------------------------------------------


@dataclass
class Why:
    """What ``sockmap why`` found about one socket, and what it concludes."""

    target: str
    socket: dict[str, Any] | None = None
    maps: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resolve(target: str, socks: dict[int, SockInfo]) -> SockInfo | None:
    text = target.strip()
    if text.startswith("cookie:") or text.isdigit():
        return socks.get(int(text.removeprefix("cookie:")))
    if text.count(":") == 1 and "-" not in text and "." not in text:  # pid:fd
        pid, fd = text.split(":")
        link = str(Path(f"/proc/{int(pid)}/fd/{int(fd)}").readlink())
        if not link.startswith("socket:["):
            raise ValueError(f"{target}: fd {fd} of pid {pid} is not a socket ({link})")
        inode = int(link[8:-1])
        return next((s for s in socks.values() if s.inode == inode), None)
    local, sep, remote = text.partition("-")
    if not sep:
        raise ValueError(
            f"{target!r}: give a cookie (cookie:N), PID:FD, or LOCAL-REMOTE such as "
            "127.0.0.1:8080-127.0.0.1:40000"
        )

    def hp(x: str) -> tuple[str, int]:
        host, _, port = x.strip().strip("[").rpartition(":")
        return host.strip("[]"), int(port)

    want = (hp(local), hp(remote))
    return next((s for s in socks.values() if (s.local, s.remote) == want), None)


def _program_maps(pid: int) -> dict[str, int]:
    """The ids of the maps a program uses, by map name."""
    try:
        fd = prog_fd_by_id(pid)
    except BpfError:
        return {}
    try:
        ids = prog_info(fd).map_ids
    finally:
        os.close(fd)
    out = {}
    for mid in ids:
        with contextlib.suppress(BpfError):
            mfd = map_fd_by_id(mid)
            try:
                out[map_info(mfd).name] = mid
            finally:
                os.close(mfd)
    return out


def why(target: str, last: int = 20) -> Why:
    """Which maps hold the socket, under which key; its TCP state and queues; the programs
    attached and their counters; its last logged decisions; and what they mean."""
    from sockmap.programs.outcomes import decode_log, read_outcomes  # noqa: PLC0415

    socks = sockets_by_cookie()
    w = Why(target)
    info = _resolve(target, socks)
    if info is None:
        w.findings.append(
            "no such TCP/UDP socket in this network namespace (closed, or another namespace)"
        )
        return w
    w.socket = asdict(info)
    if info.protocol == "tcp" and info.state not in ("ESTABLISHED", "LISTEN"):
        w.findings.append(
            f"the socket is {info.state}: a sockmap takes only established (or listening) "
            "TCP sockets, and a closed one leaves every map"
        )
    holding = [(v, e) for v in list_socket_maps() for e in v.entries if e.cookie == info.cookie]
    if not holding:
        w.findings.append(
            "the socket is in no sockmap or sockhash: no verdict ever sees its bytes (was it "
            "inserted? a SOCKHASH key built with the wrong byte order inserts nothing it "
            "should; sockmap ls lists what each map holds)"
        )
        return w
    for v, e in holding:
        w.maps.append(
            {
                "id": v.id,
                "kind": v.kind,
                "name": v.name,
                "key": e.key,
                "index": e.index,
                "programs": v.programs,
            }
        )
        if not v.programs:
            w.findings.append(
                f"{v.kind} {v.id} has no programs attached: the socket's bytes are not "
                "parsed or redirected (attach before inserting: a socket takes the programs "
                "present when it joins)"
            )
        for progs in v.programs.values():
            for p in progs:
                names = _program_maps(p["id"])
                oc_id = next((i for n, i in names.items() if n.startswith("oc_")), None)
                lg_id = next((i for n, i in names.items() if n.startswith("lg_")), None)
                if oc_id is None:
                    continue
                with open_map_fd(map_fd_by_id(oc_id)) as oc:
                    w.counters[p["name"]] = read_outcomes(oc)
                    if lg_id is not None:
                        with open_map_fd(map_fd_by_id(lg_id)) as lg:
                            for cookie, outcome, t in decode_log(oc, lg):
                                if cookie == info.cookie:
                                    w.decisions.append(
                                        {"program": p["name"], "outcome": outcome, "ktime": t}
                                    )
    w.decisions = w.decisions[-last:]
    seen = [d["outcome"] for d in w.decisions]
    if "redirect_miss" in seen:
        w.findings.append(
            f"{seen.count('redirect_miss')} of its last {len(seen)} messages met an empty "
            "target key: the socket they were meant for was not in the map then (not yet "
            "inserted, closed, or a wrong key)"
        )
    if "drop" in seen:
        w.findings.append(
            f"{seen.count('drop')} of its last {len(seen)} messages were dropped by the verdict"
        )
    if "pass" in seen:
        w.findings.append(
            f"{seen.count('pass')} of its last {len(seen)} messages were passed to the socket "
            "itself: the verdict asked for no redirect"
        )
    if holding and w.counters and not seen:
        w.findings.append(
            "no decision about this socket among the last logged ones: its bytes have not "
            "reached the verdict"
            + (
                f" ({info.rqueue} bytes wait in its receive queue: queued before insertion? "
                "kick it, see sockmap doctor)"
                if info.rqueue
                else ""
            )
        )
    if seen and all(s == "redirect" for s in seen):
        w.findings.append(f"its last {len(seen)} messages were redirected")
    if holding and not w.counters and all(v.programs for v, _ in holding):
        w.findings.append(
            "its programs keep no outcome counters (programs.instrument adds them), so "
            "nothing says what they decided"
        )
    return w
