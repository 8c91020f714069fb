"""Least privilege: drop the capabilities a running datapath no longer needs, and
optionally become another user.

Linux capabilities are per thread, and ``capset(2)`` changes only the calling thread's,
so :func:`drop` refuses to run while the process has more than one thread: call it
after setup (maps created, programs loaded and attached, listeners bound) and before
any thread starts. ``setuid``/``setgid`` through the C library change every thread.

What it does, in order: drops every capability but ``keep`` from the bounding set
(``PR_CAPBSET_DROP``, so no later ``execve`` can regain them); with ``user``,
``setgroups([])`` / ``setgid`` / ``setuid`` (with ``PR_SET_KEEPCAPS`` when something is
kept); sets effective and permitted to ``keep`` and inheritable and ambient to nothing
(``capset``); sets ``PR_SET_NO_NEW_PRIVS``; then reads the sets back and checks them.

No dependency: libc's ``syscall``, ``prctl`` and the ``os`` module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import pwd
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sockmap.errors import SockmapError

__all__ = [
    "CAPABILITIES",
    "RUNTIME_CAPS",
    "CapSets",
    "PrivilegeError",
    "cap_names",
    "current",
    "drop",
    "parse_caps",
]

CAPABILITIES: dict[str, int] = {
    name: bit
    for bit, name in enumerate(
        [
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK",
            "CAP_IPC_OWNER",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN",
            "CAP_SYS_BOOT",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE",
            "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG",
            "CAP_MKNOD",
            "CAP_LEASE",
            "CAP_AUDIT_WRITE",
            "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN",
            "CAP_SYSLOG",
            "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND",
            "CAP_AUDIT_READ",
            "CAP_PERFMON",
            "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
        ]
    )
}

RUNTIME_CAPS: dict[str, frozenset[str]] = {
    "kernel": frozenset(),
    "userspace": frozenset(),
}
"""What each engine's datapath needs once set up, measured on Linux 6.18
(``tests/reliability/test_security.py``, ``docs/security.md``): nothing. Inserting a
socket into a map, deleting it and reading counters are ``bpf()`` calls on map fds the
proxy already holds, which the kernel checks against the fd, not against capabilities;
no program is loaded after setup. (Detaching the programs at exit is refused without
CAP_NET_ADMIN; the maps and programs are freed all the same when their fds close.)"""

_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPGET = {"x86_64": 125, "aarch64": 90, "riscv64": 90, "ppc64le": 183, "s390x": 184}
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91, "riscv64": 91, "ppc64le": 184, "s390x": 185}
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4


class PrivilegeError(SockmapError, OSError):
    """Dropping privileges failed; ``errno`` says how, the message says what to do."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        return f"[{errno.errorcode.get(self.errno or 0, self.errno)}] {self.strerror}"


@dataclass(frozen=True)
class CapSets:
    """A thread's capability sets as bit masks (``/proc/<pid>/status`` shows the same)."""

    effective: int
    permitted: int
    inheritable: int
    bounding: int
    ambient: int

    def names(self, which: str = "effective") -> set[str]:
        return cap_names(getattr(self, which))


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_ulong = ctypes.c_ulong
_libc.prctl.argtypes = [ctypes.c_int, _ulong, _ulong, _ulong, _ulong]


def cap_names(mask: int) -> set[str]:
    """The names of the capabilities set in ``mask``."""
    return {name for name, bit in CAPABILITIES.items() if mask >> bit & 1}


def parse_caps(names: Iterable[str]) -> frozenset[str]:
    """``net_bind_service``, ``CAP_BPF``... -> canonical names; unknown ones raise ValueError."""
    out = set()
    for raw in names:
        name = raw.strip().upper()
        if not name:
            continue
        if not name.startswith("CAP_"):
            name = "CAP_" + name
        if name not in CAPABILITIES:
            raise ValueError(f"unknown capability {raw!r} (see capabilities(7))")
        out.add(name)
    return frozenset(out)


def _mask(names: Iterable[str]) -> int:
    m = 0
    for n in names:
        m |= 1 << CAPABILITIES[n]
    return m


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return max(CAPABILITIES.values())


def _syscall_number(table: dict[str, int]) -> int:
    machine = platform.machine()
    if machine not in table:
        raise PrivilegeError(
            errno.ENOSYS,
            f"capget/capset: no syscall number known for {machine}; run without "
            "--drop-privileges and use systemd's CapabilityBoundingSet instead",
        )
    return table[machine]


def _fail(what: str, advice: str) -> PrivilegeError:
    err = ctypes.get_errno()
    return PrivilegeError(err, f"{what}: {os.strerror(err)}; {advice}")


def _capget() -> tuple[int, int, int]:
    hdr = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.syscall(_syscall_number(_SYS_CAPGET), ctypes.byref(hdr), data) != 0:
        raise _fail("capget", "cannot read this thread's capabilities")
    e = data[0].effective | data[1].effective << 32
    p = data[0].permitted | data[1].permitted << 32
    i = data[0].inheritable | data[1].inheritable << 32
    return e, p, i


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    hdr = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for k, m in enumerate((effective, permitted, inheritable)):
        field = ("effective", "permitted", "inheritable")[k]
        setattr(data[0], field, m & 0xFFFFFFFF)
        setattr(data[1], field, m >> 32 & 0xFFFFFFFF)
    if _libc.syscall(_syscall_number(_SYS_CAPSET), ctypes.byref(hdr), data) != 0:
        raise _fail(
            "capset",
            "the kept capabilities must be a subset of the permitted ones "
            "(grant them to the service first, e.g. AmbientCapabilities=)",
        )


def _prctl(option: int, arg: int, what: str, advice: str, arg2: int = 0) -> int:
    r = int(_libc.prctl(option, arg, arg2, 0, 0))
    if r < 0:
        raise _fail(what, advice)
    return r


def current() -> CapSets:
    """The calling thread's capability sets."""
    e, p, i = _capget()
    bounding = 0
    for bit in range(_last_cap() + 1):
        if _libc.prctl(_PR_CAPBSET_READ, bit, 0, 0, 0) == 1:
            bounding |= 1 << bit
    ambient = 0
    for line in Path("/proc/thread-self/status").read_text().splitlines():
        if line.startswith("CapAmb:"):
            ambient = int(line.split()[1], 16)
    return CapSets(e, p, i, bounding, ambient)


def _threads() -> int:
    try:
        return len(list(Path("/proc/self/task").iterdir()))
    except OSError:
        return threading.active_count()


def drop(keep: Iterable[str] = (), user: str | None = None) -> CapSets:
    """Keep only ``keep`` (capability names) in every set, optionally become ``user``
    (name or uid; its primary group, no supplementary groups), forbid regaining
    privileges; return the sets read back. Raises :class:`PrivilegeError` (EBUSY while
    other threads run; EPERM when a step is refused)."""
    wanted = parse_caps(keep)
    n = _threads()
    if n != 1:
        raise PrivilegeError(
            errno.EBUSY,
            f"drop privileges: {n} threads are running, and capabilities are per thread "
            "(capset changes only the caller's); drop them before starting threads",
        )
    keep_mask = _mask(wanted)
    target: pwd.struct_passwd | None = None
    if user:
        try:
            target = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise PrivilegeError(
                errno.ENOENT, f"drop privileges: no user {user!r}; create it or name another"
            ) from None
    _, permitted, _ = _capget()
    if keep_mask & ~permitted:
        missing = ", ".join(sorted(cap_names(keep_mask & ~permitted)))
        raise PrivilegeError(
            errno.EPERM,
            f"drop privileges: cannot keep {missing}: this process does not have it; "
            "grant it (AmbientCapabilities= in the unit, or run as root)",
        )
    # 1. The bounding set: nothing dropped here can come back through execve.
    if permitted >> CAPABILITIES["CAP_SETPCAP"] & 1:
        for bit in range(_last_cap() + 1):
            if not keep_mask >> bit & 1 and _libc.prctl(_PR_CAPBSET_READ, bit, 0, 0, 0) == 1:
                _prctl(
                    _PR_CAPBSET_DROP,
                    bit,
                    f"drop capability {bit} from the bounding set",
                    "needs CAP_SETPCAP",
                )
    # 2. The user.
    if target is not None:
        if keep_mask:
            _prctl(_PR_SET_KEEPCAPS, 1, "keep capabilities across setuid", "needs Linux 2.2+")
        try:
            os.setgroups([])
            os.setgid(target.pw_gid)
            os.setuid(target.pw_uid)
        except OSError as exc:
            raise PrivilegeError(
                exc.errno or errno.EPERM,
                f"become {target.pw_name} (uid {target.pw_uid}, gid {target.pw_gid}): "
                f"{exc.strerror}; switching users needs CAP_SETUID and CAP_SETGID",
            ) from None
        if keep_mask:
            _prctl(_PR_SET_KEEPCAPS, 0, "reset PR_SET_KEEPCAPS", "needs Linux 2.2+")
    # 3. Effective and permitted to what is kept; inheritable and ambient to nothing.
    _capset(keep_mask, keep_mask, 0)
    _prctl(
        _PR_CAP_AMBIENT,
        _PR_CAP_AMBIENT_CLEAR_ALL,
        "clear the ambient capabilities",
        "needs Linux 4.3+",
    )
    # 4. No setuid binary or file capability can give any of it back.
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs", "needs Linux 3.5+")
    got = current()
    if got.effective != keep_mask or got.permitted != keep_mask or got.ambient:
        raise PrivilegeError(
            errno.EPERM,
            f"drop privileges: kept {sorted(got.names('permitted'))}, wanted {sorted(wanted)}",
        )
    if target is not None and (os.getuid(), os.geteuid()) != (target.pw_uid,) * 2:
        raise PrivilegeError(errno.EPERM, f"drop privileges: still uid {os.geteuid()}")
    return got
