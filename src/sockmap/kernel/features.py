"""What the running kernel supports, found by probing (never assumed).

Each probe makes the smallest object of its kind and releases it at once:
a one-entry map per map type, ``r0 = 0; exit`` per program type, an attach and
detach per sockmap attach type, and per helper a program that calls it — the
verifier says "invalid func"/"unknown func" only when the helper is absent.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sockmap import asm
from sockmap.abi import AttachType, Helper, MapType, ProgType
from sockmap.errors import BpfError, VerifierError, errno_name
from sockmap.kernel.attach import attach, detach
from sockmap.kernel.maps import Map, MapSpec, SockMap
from sockmap.kernel.programs import Prog, load_program

__all__ = ["Features", "bpf_access", "capabilities", "probe"]

CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}

# (key_size, value_size, max_entries, flags) that each probed map type accepts
_MAP_PROBES: dict[MapType, tuple[int, int, int, int]] = {
    MapType.HASH: (4, 8, 1, 0),
    MapType.ARRAY: (4, 8, 1, 0),
    MapType.PROG_ARRAY: (4, 4, 1, 0),
    MapType.PERF_EVENT_ARRAY: (4, 4, 1, 0),
    MapType.PERCPU_HASH: (4, 8, 1, 0),
    MapType.PERCPU_ARRAY: (4, 8, 1, 0),
    MapType.LRU_HASH: (4, 8, 1, 0),
    MapType.LRU_PERCPU_HASH: (4, 8, 1, 0),
    MapType.LPM_TRIE: (8, 8, 1, 1),  # BPF_F_NO_PREALLOC is required
    MapType.DEVMAP: (4, 4, 1, 0),
    MapType.SOCKMAP: (4, 8, 1, 0),
    MapType.CPUMAP: (4, 4, 1, 0),
    MapType.XSKMAP: (4, 4, 1, 0),
    MapType.SOCKHASH: (4, 8, 1, 0),
    MapType.REUSEPORT_SOCKARRAY: (4, 8, 1, 0),
    MapType.QUEUE: (0, 8, 1, 0),
    MapType.STACK: (0, 8, 1, 0),
    MapType.DEVMAP_HASH: (4, 4, 1, 0),
    MapType.RINGBUF: (0, 0, 4096, 0),
    MapType.BLOOM_FILTER: (0, 8, 1, 0),
}

_PROG_PROBES: tuple[ProgType, ...] = (
    ProgType.SOCKET_FILTER,
    ProgType.SCHED_CLS,
    ProgType.SCHED_ACT,
    ProgType.XDP,
    ProgType.CGROUP_SKB,
    ProgType.CGROUP_SOCK,
    ProgType.SOCK_OPS,
    ProgType.SK_SKB,
    ProgType.SK_MSG,
    ProgType.SK_REUSEPORT,
)

_ATTACH_PROBES: dict[AttachType, ProgType] = {
    AttachType.SK_SKB_STREAM_PARSER: ProgType.SK_SKB,
    AttachType.SK_SKB_STREAM_VERDICT: ProgType.SK_SKB,
    AttachType.SK_SKB_VERDICT: ProgType.SK_SKB,
    AttachType.SK_MSG_VERDICT: ProgType.SK_MSG,
}

_HELPER_PROG_TYPES = (ProgType.SK_SKB, ProgType.SK_MSG, ProgType.SOCK_OPS)
_ABSENT_MARKERS = ("invalid func ", "unknown func ", "program of this type cannot use helper")


def capabilities() -> dict[str, bool]:
    """Which of the capabilities bpf() cares about this process has (CapEff)."""
    eff = 0
    with suppress(OSError), Path("/proc/self/status").open() as f:
        for line in f:
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
    return {name: bool(eff >> bit & 1) for name, bit in CAPS.items()}


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return None


def bpf_access() -> tuple[bool, str]:
    """(permitted, why): try the cheapest bpf() call and explain a refusal."""
    try:
        Map.create(MapSpec(MapType.ARRAY, 4, 4, 1)).close()
    except BpfError as e:
        caps = capabilities()
        missing = [c for c in ("CAP_BPF", "CAP_NET_ADMIN") if not caps[c]]
        if e.errno == errno.EPERM:
            why = "bpf() refused with EPERM"
            if missing and not caps["CAP_SYS_ADMIN"]:
                why += f": this process lacks {', '.join(missing)} (and CAP_SYS_ADMIN)"
            unpriv = _sysctl("kernel.unprivileged_bpf_disabled")
            if unpriv not in (None, "0"):
                why += f"; kernel.unprivileged_bpf_disabled={unpriv} blocks unprivileged use"
            why += "; run as root or grant CAP_BPF+CAP_NET_ADMIN, or use --engine userspace"
            return False, why
        if e.errno == errno.ENOSYS:
            return False, "this kernel has no bpf() syscall (ENOSYS)"
        return False, f"bpf() failed: {e}"
    return True, "bpf() is permitted"


@contextmanager
def _closing(obj: Map | Prog) -> Iterator[Map | Prog]:
    try:
        yield obj
    finally:
        obj.close()


def _trivial(ret: int = 0) -> asm.Program:
    return asm.Program([asm.mov(asm.R0, ret), asm.exit_()], name="probe")


def _refusal(e: BpfError, absent: tuple[int, ...]) -> str:
    """A probe's answer for a refusal: "no" for the errnos that mean absent, else the error."""
    return "no" if e.errno in absent else f"error {errno_name(e.errno or 0)}"


def _probe_map(mtype: MapType) -> str:
    ks, vs, n, flags = _MAP_PROBES[mtype]
    try:
        with _closing(Map.create(MapSpec(mtype, ks, vs, n, flags))):
            return "yes"
    except BpfError as e:
        return _refusal(e, (errno.EINVAL, errno.EOPNOTSUPP))


def _probe_prog(ptype: ProgType) -> str:
    try:
        with _closing(load_program(_trivial(), ptype, name="probe")):
            return "yes"
    except BpfError as e:
        return _refusal(e, (errno.EINVAL, errno.EACCES))


def _probe_attach(kind: AttachType, ptype: ProgType) -> str:
    try:
        with _closing(SockMap.new(1)) as m, _closing(load_program(_trivial(), ptype)) as p:
            assert isinstance(m, SockMap)
            assert isinstance(p, Prog)
            attach(m, p, kind)
            detach(m, p, kind)
            return "yes"
    except BpfError as e:
        return _refusal(e, (errno.EINVAL, errno.EOPNOTSUPP))


def _probe_helper(helper: Helper, ptype: ProgType) -> bool:
    prog = asm.Program([asm.call(helper), asm.mov(asm.R0, 0), asm.exit_()], name="probe")
    try:
        load_program(prog, ptype, name="probe").close()
    except VerifierError as e:
        return not any(marker in e.log for marker in _ABSENT_MARKERS)
    except BpfError:
        return False
    return True  # a helper needing no arguments loads outright


@dataclass
class Features:
    """The result of :func:`probe`: plain data, ready for JSON."""

    permitted: bool
    reason: str
    kernel: str
    capabilities: dict[str, bool]
    bpffs: bool = False
    btf: bool = False
    map_types: dict[str, str] = field(default_factory=dict)
    prog_types: dict[str, str] = field(default_factory=dict)
    attach_types: dict[str, str] = field(default_factory=dict)
    helpers: dict[str, dict[str, bool]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def probe(helpers: bool = True) -> Features:
    """Probe this kernel; with bpf() refused only ``permitted``/``reason`` are filled."""
    from sockmap.kernel.pin import bpffs_mounted  # noqa: PLC0415 - pin imports maps

    permitted, reason = bpf_access()
    feats = Features(
        permitted,
        reason,
        os.uname().release,
        capabilities(),
        bpffs=bpffs_mounted(),
        btf=Path("/sys/kernel/btf/vmlinux").exists(),
    )
    if not permitted:
        return feats
    feats.map_types = {t.name: _probe_map(t) for t in _MAP_PROBES}
    feats.prog_types = {t.name: _probe_prog(t) for t in _PROG_PROBES}
    feats.attach_types = {k.name: _probe_attach(k, p) for k, p in _ATTACH_PROBES.items()}
    if helpers:
        for ptype in _HELPER_PROG_TYPES:
            if feats.prog_types.get(ptype.name) != "yes":
                continue
            feats.helpers[ptype.name] = {h.name: _probe_helper(h, ptype) for h in Helper}
    return feats
