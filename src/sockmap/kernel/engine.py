"""The kernel engine: one owner for the maps and programs of a piece of work.

Everything it creates it closes on :meth:`KernelEngine.close` (or ``with``), so
no fd and no unpinned program outlives it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sockmap._closeable import Closeable
from sockmap.abi import AttachType, ProgType
from sockmap.errors import BpfError, PermissionDenied, bpf_error
from sockmap.kernel.attach import attach, detach
from sockmap.kernel.cgroup import CgroupAttachment, attach_cgroup
from sockmap.kernel.features import bpf_access
from sockmap.kernel.maps import ArrayMap, HashMap, Map, SockHash, SockMap
from sockmap.kernel.programs import Encodable, Prog, load_program

__all__ = ["Attachment", "KernelEngine"]

_T = TypeVar("_T", bound=Map | Prog)
ProgLike = Prog | Encodable


@dataclass
class Attachment:
    """Programs attached to one socket map; ``detach()`` undoes it."""

    map: SockMap
    parser: Prog | None
    verdict: Prog | None
    verdict_kind: AttachType
    msg_verdict: Prog | None = None

    def pairs(self) -> list[tuple[Prog, AttachType]]:
        out: list[tuple[Prog, AttachType]] = []
        if self.parser is not None:
            out.append((self.parser, AttachType.SK_SKB_STREAM_PARSER))
        if self.verdict is not None:
            out.append((self.verdict, self.verdict_kind))
        if self.msg_verdict is not None:
            out.append((self.msg_verdict, AttachType.SK_MSG_VERDICT))
        return out

    def detach(self) -> None:
        """Detach every program (sockets already in the map keep theirs until removed)."""
        for prog, kind in self.pairs():
            if not prog.closed and not self.map.closed:
                detach(self.map, prog, kind)


class KernelEngine(Closeable):
    """Creates kernel maps and programs and releases them all on close."""

    name = "kernel"

    def __init__(self) -> None:
        permitted, why = bpf_access()
        if not permitted:
            raise PermissionDenied(1, why) if "EPERM" in why else bpf_error(38, why)
        self._owned: list[Map | Prog] = []
        self._attachments: list[Attachment | CgroupAttachment] = []

    def _own(self, obj: _T) -> _T:
        self._owned.append(obj)
        return obj

    def batch(self) -> contextlib.AbstractContextManager[object]:
        """For parity with the userspace engine: the kernel's map updates cannot be grouped."""
        return contextlib.nullcontext()

    # -- maps ---------------------------------------------------------------
    def sockmap(self, max_entries: int, *, value_size: int = 8, name: str = "") -> SockMap:
        """A SOCKMAP (keys 0..max_entries-1); value_size 8 makes lookups return cookies."""
        return self._own(SockMap.new(max_entries, value_size=value_size, name=name))

    def sockhash(
        self,
        max_entries: int,
        *,
        key_size: int = 4,
        value_size: int = 8,
        name: str = "",
    ) -> SockHash:
        """A SOCKHASH with keys of ``key_size`` bytes."""
        return self._own(
            SockHash.new(max_entries, key_size=key_size, value_size=value_size, name=name),
        )

    def array(self, max_entries: int, *, value_size: int = 8, name: str = "") -> ArrayMap:
        """An ARRAY map of u32 keys."""
        return self._own(ArrayMap.new(max_entries, value_size=value_size, name=name))

    def hash(
        self,
        max_entries: int,
        *,
        key_size: int = 4,
        value_size: int = 8,
        name: str = "",
    ) -> HashMap:
        """A HASH map."""
        return self._own(
            HashMap.new(max_entries, key_size=key_size, value_size=value_size, name=name),
        )

    # -- programs -----------------------------------------------------------
    def load(
        self,
        program: ProgLike,
        prog_type: ProgType = ProgType.SK_SKB,
        *,
        name: str | None = None,
    ) -> Prog:
        """Load an assembler program (or return an already loaded one as is)."""
        if isinstance(program, Prog):
            return program
        return self._own(load_program(program, prog_type, name=name))

    def attach(
        self,
        smap: SockMap,
        *,
        parser: ProgLike | None = None,
        verdict: ProgLike | None = None,
        msg_verdict: ProgLike | None = None,
    ) -> Attachment:
        """Attach programs to ``smap``: parser+verdict is strparser mode, verdict alone is
        verdict-only mode (``BPF_SK_SKB_VERDICT``, one message per received chunk).

        Attach before inserting sockets: a socket takes the programs present when it joins.
        """
        p = self.load(parser) if parser is not None else None
        v = self.load(verdict) if verdict is not None else None
        mv = self.load(msg_verdict, ProgType.SK_MSG) if msg_verdict is not None else None
        kind = AttachType.SK_SKB_STREAM_VERDICT if p is not None else AttachType.SK_SKB_VERDICT
        att = Attachment(smap, p, v, kind, mv)
        done: list[tuple[Prog, AttachType]] = []
        try:
            for prog, how in att.pairs():
                attach(smap, prog, how)
                done.append((prog, how))
        except BaseException:
            for prog, how in reversed(done):
                detach(smap, prog, how)
            raise
        self._attachments.append(att)
        return att

    def attach_cgroup(self, cgroup: str | Path, sock_ops: ProgLike) -> CgroupAttachment:
        """Attach a SOCK_OPS program to a cgroup v2 directory (``cgroup2_mount()`` says
        where the hierarchy is): the TCP sockets of its processes run it on their events.
        Detached when the engine closes."""
        prog = self.load(sock_ops, ProgType.SOCK_OPS)
        attach_cgroup(cgroup, prog, AttachType.CGROUP_SOCK_OPS)
        att = CgroupAttachment(cgroup, prog, AttachType.CGROUP_SOCK_OPS)
        self._attachments.append(att)
        return att

    # -- life cycle ---------------------------------------------------------
    def close(self) -> None:
        """Release everything this engine made: detach, empty the socket maps, close.

        The kernel frees a closed sockmap later, from a work queue; until then its
        sockets would keep our programs (and refuse to join a map with others, EBUSY).
        Detaching and deleting the entries first releases them at once.
        """
        attachments, self._attachments = self._attachments, []
        owned, self._owned = self._owned, []
        for att in attachments:
            with contextlib.suppress(BpfError):
                att.detach()
        for obj in owned:
            if isinstance(obj, SockMap) and not obj.closed:
                for key in list(obj.inserted_keys):
                    with contextlib.suppress(BpfError):
                        obj.delete(key)
        for obj in sorted(owned, key=lambda o: isinstance(o, Map)):
            obj.close()
