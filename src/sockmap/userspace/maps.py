"""Userspace maps: SOCKMAP, SOCKHASH, ARRAY and HASH in Python, answering like this kernel.

The kernel is the oracle: every operation gives the result and the errno the kernel
engine (:mod:`sockmap.kernel.maps`) gives on this kernel, with the same typed errors
and the same wording, checked in the same order (``tests/conformance`` runs one suite
over both engines and a differential test side by side).

Iteration order is the kernel's too: SOCKHASH hashes keys with ``jhash(key, 0)`` into
``roundup_pow_of_two(max_entries)`` buckets, newest first within a bucket, exactly as
``sock_hash_get_next_key`` walks them. A kernel HASH seeds its hash randomly (its order
is not reproducible) unless created with ``BPF_F_ZERO_SEED``; this HASH always uses the
zero-seed order, which is then the kernel's.

Sockets: the kernel holds a reference to the *socket*, not to the fd, and a socket
that is closed leaves every key of every map. A Python map cannot hold the socket
without keeping it open, so it remembers the fd, the socket's inode and its
``SO_COOKIE``, and checks lazily — on every operation that can observe it — that the
socket still exists: the fd still names the same inode, or another fd of this
process does (a ``dup`` keeps a socket open, as in the kernel). A closed socket is
then removed (``on_remove`` fires) before the operation answers.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import os
import socket
import stat
import struct
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Self

from sockmap._closeable import Closeable
from sockmap._mapping import KeyCodec, KeyIteration, LookupSyntax
from sockmap.abi import MapType, UpdateFlag
from sockmap.errors import BpfError, bpf_error
from sockmap.kernel.info import MapInfo
from sockmap.kernel.maps import Key, MapSpec, _name_bytes, encode_value
from sockmap.kernel.syscall import check_fd
from sockmap.userspace.admission import SO_COOKIE, linkable, socket_kind, unsupported

__all__ = [
    "ArrayMap",
    "HashMap",
    "Key",
    "Map",
    "MapSpec",
    "SockCallback",
    "SockHash",
    "SockMap",
    "SockRef",
    "fds_of_inodes",
    "jhash",
    "jhash2",
    "remove_socket",
]

SockCallback = Callable[["SockMap", bytes, "SockRef"], None]
"""``callback(map, key, ref)``: ``on_insert``, ``on_remove`` and ``before_insert``."""

# Map flags, as in the kernel's uapi bpf.h.
F_NO_PREALLOC = 1 << 0
F_NUMA_NODE = 1 << 2
F_RDONLY = 1 << 3
F_WRONLY = 1 << 4
F_ZERO_SEED = 1 << 6
F_RDONLY_PROG = 1 << 7
F_WRONLY_PROG = 1 << 8
F_MMAPABLE = 1 << 10
F_INNER_MAP = 1 << 12
_ACCESS = F_RDONLY | F_WRONLY | F_RDONLY_PROG | F_WRONLY_PROG
_CREATE_FLAGS = {
    MapType.SOCKMAP: F_NUMA_NODE | F_RDONLY | F_WRONLY,
    MapType.SOCKHASH: F_NUMA_NODE | F_RDONLY | F_WRONLY,
    MapType.ARRAY: F_NUMA_NODE | _ACCESS | F_MMAPABLE | F_INNER_MAP,
    MapType.HASH: F_NO_PREALLOC | F_NUMA_NODE | _ACCESS | F_ZERO_SEED,
}
_U32_MAX = 0xFFFF_FFFF
_BUCKET_SIZE = 16  # sizeof(struct bucket) and sizeof(struct bpf_shtab_bucket)
_HTAB_MAX_KV = 4194256  # KMALLOC_MAX_SIZE - sizeof(struct htab_elem): measured here
_MAX_BPF_STACK = 512
_INT_MAX = 0x7FFF_FFFF

_ids = itertools.count(1)
_live: weakref.WeakSet[SockMap] = weakref.WeakSet()


# ------------------------------------------------------------------ the kernel's jhash


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _U32_MAX


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _U32_MAX
    a ^= _rol(c, 4)
    c = (c + b) & _U32_MAX
    b = (b - a) & _U32_MAX
    b ^= _rol(a, 6)
    a = (a + c) & _U32_MAX
    c = (c - b) & _U32_MAX
    c ^= _rol(b, 8)
    b = (b + a) & _U32_MAX
    a = (a - c) & _U32_MAX
    a ^= _rol(c, 16)
    c = (c + b) & _U32_MAX
    b = (b - a) & _U32_MAX
    b ^= _rol(a, 19)
    a = (a + c) & _U32_MAX
    c = (c - b) & _U32_MAX
    c ^= _rol(b, 4)
    b = (b + a) & _U32_MAX
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b
    c = (c - _rol(b, 14)) & _U32_MAX
    a ^= c
    a = (a - _rol(c, 11)) & _U32_MAX
    b ^= a
    b = (b - _rol(a, 25)) & _U32_MAX
    c ^= b
    c = (c - _rol(b, 16)) & _U32_MAX
    a ^= c
    a = (a - _rol(c, 4)) & _U32_MAX
    b ^= a
    b = (b - _rol(a, 14)) & _U32_MAX
    c ^= b
    return (c - _rol(b, 24)) & _U32_MAX


def jhash(key: bytes, initval: int = 0) -> int:
    """The kernel's ``jhash(key, len(key), initval)`` (Bob Jenkins' lookup3, little-endian)."""
    length = len(key)
    a = b = c = (0xDEADBEEF + length + initval) & _U32_MAX
    pos = 0
    while length - pos > 12:
        x, y, z = struct.unpack_from("<III", key, pos)
        a, b, c = _mix((a + x) & _U32_MAX, (b + y) & _U32_MAX, (c + z) & _U32_MAX)
        pos += 12
    tail = key[pos:]
    if not tail:
        return c
    tail = tail + bytes(12 - len(tail))
    x, y, z = struct.unpack("<III", tail)
    return _final((a + x) & _U32_MAX, (b + y) & _U32_MAX, (c + z) & _U32_MAX)


def jhash2(key: bytes, initval: int = 0) -> int:
    """The kernel's ``jhash2(u32 *k, len(key) / 4, initval)``; ``len(key)`` is a multiple of 4."""
    words = struct.unpack(f"<{len(key) // 4}I", key)
    n = len(words)
    a = b = c = (0xDEADBEEF + (n << 2) + initval) & _U32_MAX
    i = 0
    while n - i > 3:
        a, b, c = _mix(
            (a + words[i]) & _U32_MAX, (b + words[i + 1]) & _U32_MAX, (c + words[i + 2]) & _U32_MAX
        )
        i += 3
    rest = words[i:]
    if not rest:
        return c
    rest = rest + (0,) * (3 - len(rest))
    return _final((a + rest[0]) & _U32_MAX, (b + rest[1]) & _U32_MAX, (c + rest[2]) & _U32_MAX)


def _sockhash_hash(key: bytes) -> int:
    return jhash(key, 0)  # sock_hash_bucket_hash


def _htab_hash(key: bytes) -> int:
    return jhash2(key, 0) if len(key) % 4 == 0 else jhash(key, 0)  # htab_map_hash, zero seed


def _roundup_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _Buckets:
    """The order of a kernel hash table: buckets by hash, newest first within one."""

    def __init__(self, max_entries: int, hashfn: Callable[[bytes], int]) -> None:
        self._mask = _roundup_pow2(max_entries) - 1
        self._hash = hashfn
        self._lists: dict[int, list[bytes]] = {}
        self._used: list[int] = []  # sorted indices of non-empty buckets

    def _index(self, key: bytes) -> int:
        return self._hash(key) & self._mask

    def add_head(self, key: bytes) -> None:
        """Insert ``key`` (or move it, on a replace) to the head of its bucket."""
        i = self._index(key)
        lst = self._lists.get(i)
        if lst is None:
            self._lists[i] = [key]
            bisect.insort(self._used, i)
            return
        with contextlib.suppress(ValueError):
            lst.remove(key)
        lst.insert(0, key)

    def remove(self, key: bytes) -> None:
        i = self._index(key)
        lst = self._lists[i]
        lst.remove(key)
        if not lst:
            del self._lists[i]
            del self._used[bisect.bisect_left(self._used, i)]

    def _first_from(self, i: int) -> bytes | None:
        pos = bisect.bisect_left(self._used, i)
        return self._lists[self._used[pos]][0] if pos < len(self._used) else None

    def first(self) -> bytes | None:
        return self._first_from(0)

    def after(self, key: bytes) -> bytes | None:
        """The key after ``key`` (which is present) in the kernel's walk, or None."""
        i = self._index(key)
        lst = self._lists[i]
        pos = lst.index(key)
        if pos + 1 < len(lst):
            return lst[pos + 1]
        return self._first_from(i + 1)


# ------------------------------------------------------------------ sockets


class _BorrowedSocket(socket.socket):
    """A socket object over an fd the application owns: closing it never closes the fd."""

    __slots__ = ()

    def close(self) -> None:
        self.detach()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.detach()


INTERNAL_FDS: set[int] = set()
"""Fds the engine itself holds on sockets (its I/O handles): they do not keep a socket
in a map, only the application's own fds do."""


def fds_of_inodes(inos: set[int]) -> dict[int, int]:
    """An fd of this process (not one of the engine's own) on each socket inode of ``inos``
    that is still open: one pass over ``/proc/self/fd``, one ``fstat`` per fd."""
    found: dict[int, int] = {}
    if not inos:
        return found
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):  # noqa: PTH208 - no Path per fd: 15,000 fds
            fd = int(name)
            if fd in INTERNAL_FDS:
                continue
            try:
                st = os.fstat(fd)
            except OSError:
                continue  # closed meanwhile, or the listing's own fd
            ino = st.st_ino
            if ino in inos and ino not in found and stat.S_ISSOCK(st.st_mode):
                found[ino] = fd
                if len(found) == len(inos):
                    break
    return found


def _fd_of_inode(ino: int) -> int | None:
    """Another fd of this process on socket inode ``ino`` (a dup), or None."""
    return fds_of_inodes({ino}).get(ino)


class SockRef:
    """What a userspace socket map holds for a socket: its fd, inode and cookie.

    One per live socket, shared by every map and key that holds it. It also stands for
    the kernel's psock where admission needs one: ``links`` counts the map entries that
    hold the socket (the psock lives while it is above 0), and ``parser``, ``verdict``
    and ``msg`` name the map whose programs fill each of the psock's program slots
    (``started``: a verdict was started, the kernel's ``saved_data_ready``).
    """

    __slots__ = (
        "__weakref__",
        "_borrowed",
        "_dead",
        "_obj",
        "cookie",
        "fd",
        "ino",
        "links",
        "msg",
        "parser",
        "started",
        "tcp",
        "verdict",
    )

    def __init__(self, fd: int, ino: int, cookie: int, tcp: bool) -> None:
        self.fd = fd
        self.ino = ino
        self.cookie = cookie
        self.tcp = tcp
        self._obj: weakref.ref[socket.socket] | None = None
        self._borrowed: socket.socket | None = None
        self._dead = False
        self.links = 0
        self.parser: object = None
        self.verdict: object = None
        self.msg: object = None
        self.started = False

    @property
    def dead(self) -> bool:
        """The socket was found closed (every fd of it in this process)."""
        return self._dead

    def own_fd_open(self) -> bool:
        """The fd it is known by still names the socket (one ``fstat``; no dup search)."""
        if self._dead:
            return False
        try:
            return os.fstat(self.fd).st_ino == self.ino
        except OSError:
            return False

    def follow(self, fd: int | None) -> bool:
        """Take the result of a dup search: the socket lives on under ``fd``, or is closed."""
        if fd is None:
            self._dead = True
            return False
        if fd != self.fd:
            self.fd, self._borrowed = fd, None
        return True

    def alive(self) -> bool:
        """True while the socket is open in this process (under its fd or another one)."""
        if self.own_fd_open():
            return True
        return not self._dead and self.follow(_fd_of_inode(self.ino))

    def unlink(self) -> None:
        """A map entry let go of the socket; with the last one the psock and its programs go."""
        self.links -= 1
        if self.links <= 0:
            self.links = 0
            self.release_programs()

    def release_programs(self) -> None:
        """Empty every program slot (the kernel freed the psock)."""
        self.parser = self.verdict = self.msg = None
        self.started = False

    def held_socket(self) -> socket.socket | None:
        """The caller's own socket object while it still holds the fd, else None; no
        syscall. ``socket.close()`` makes it None at once; an fd closed behind the
        object's back (``os.close``) is only seen by :meth:`alive`."""
        if self._dead or self._obj is None:
            return None
        obj = self._obj()
        if obj is not None and obj.fileno() == self.fd:
            return obj
        return None

    def socket(self) -> socket.socket:
        """A socket object for it: the caller's own if it still has the fd, else a borrowed one."""
        obj = self._obj() if self._obj is not None else None
        if self._dead:  # for on_remove: the object the engine was given, closed by now
            if obj is not None:
                return obj
            if self._borrowed is not None:
                return self._borrowed
            raise OSError(errno.EBADF, "the socket is closed")
        if obj is not None and obj.fileno() == self.fd:
            return obj
        if self._borrowed is None or self._borrowed.fileno() != self.fd:
            self._borrowed = _BorrowedSocket(fileno=self.fd)
        return self._borrowed

    def matches(self, sock: object) -> bool:
        if sock is self:
            return True
        if self._obj is not None and self._obj() is sock:
            return True
        if self._borrowed is not None and self._borrowed is sock:
            return True
        fileno = getattr(sock, "fileno", None)
        fd = sock if isinstance(sock, int) else (fileno() if fileno is not None else -1)
        if not isinstance(fd, int) or fd < 0:
            return False
        try:
            return os.fstat(fd).st_ino == self.ino and not self._dead
        except OSError:
            return False

    def __repr__(self) -> str:
        return f"<SockRef fd={self.fd} cookie={self.cookie}{' dead' if self._dead else ''}>"


_refs: weakref.WeakValueDictionary[int, SockRef] = weakref.WeakValueDictionary()
_refs_lock = threading.Lock()


def _ref_for(sock: object, fd: int, tcp: bool) -> SockRef:
    ino = os.fstat(fd).st_ino
    with _refs_lock:
        ref = _refs.get(ino)
        if ref is None or not ref.alive() or ref.ino != ino:
            if isinstance(sock, socket.socket) and sock.fileno() == fd:
                raw = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
            else:
                with socket.socket(fileno=os.dup(fd)) as tmp:
                    raw = tmp.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
            ref = SockRef(fd, ino, int.from_bytes(raw, "little"), tcp)
            _refs[ino] = ref
        if isinstance(sock, socket.socket) and sock.fileno() == fd:
            current = ref._obj() if ref._obj is not None else None
            if current is None or current.fileno() != ref.fd:
                ref._obj = weakref.ref(sock)
                ref.fd = fd
        return ref


def remove_socket(sock: object) -> int:
    """Remove ``sock`` from every key of every open userspace socket map (the engine's hook
    for a close it detected); returns how many entries went."""
    return sum(m.remove_socket(sock) for m in list(_live))


# ------------------------------------------------------------------ maps


class Map(Closeable, KeyCodec, KeyIteration):
    """A userspace map. No fd: ``close()`` (or ``with``) ends it; operations then EBADF."""

    kind: ClassVar[str] = "map"
    _TYPE: ClassVar[MapType] = MapType.UNSPEC

    def __init__(self, spec: MapSpec) -> None:
        self.spec = spec
        self._id = next(_ids)
        self._closed = False
        self._lock = threading.RLock()

    # -- life cycle ---------------------------------------------------------
    @classmethod
    def create(cls, spec: MapSpec) -> Self:
        """Create the map described by ``spec``, refusing what the kernel refuses."""
        what = (
            f"create {spec.type.name} map (key {spec.key_size} B, value {spec.value_size} B, "
            f"{spec.max_entries} entries)"
        )
        target: type[Map] = cls
        if spec.type != cls._TYPE:
            found = _BY_TYPE.get(spec.type)
            if found is None:
                raise bpf_error(
                    errno.EINVAL,
                    what,
                    "the userspace engine has SOCKMAP, SOCKHASH, ARRAY and HASH maps only",
                )
            if not issubclass(found, cls):
                raise TypeError(f"{cls.__name__}.create() cannot make a {spec.type.name} map")
            target = found
        err = _spec_error(spec)
        if err:
            raise bpf_error(err, what)
        made = target(spec)
        assert isinstance(made, cls)
        return made

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End the map; further operations raise EBADF."""
        self._closed = True

    def info(self) -> MapInfo:
        """What the kernel would report: id (unique in this process), sizes, flags, name."""
        self._check_open("use")
        s = self.spec
        name = _name_bytes(s.name).decode()
        flags = s.flags & ~(F_RDONLY | F_WRONLY)  # the kernel keeps these as fd modes only
        return MapInfo(s.type, self._id, s.key_size, s.value_size, s.max_entries, flags, name)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"userspace id={self._id}"
        label = f" {self.spec.name!r}" if self.spec.name else ""
        return f"<{type(self).__name__}{label} {state} max_entries={self.spec.max_entries}>"

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise bpf_error(
                errno.EBADF, f"{what} {self!r}", f"the {self.kind} is closed; make a new one"
            )

    def _check_perm(self, what: str, write: bool) -> None:
        if self.spec.flags & (F_RDONLY if write else F_WRONLY):
            raise bpf_error(errno.EPERM, what, "the map was created read-only or write-only")

    # -- VmMap ---------------------------------------------------------------
    @property
    def map_type(self) -> int:
        return int(self.spec.type)

    @property
    def key_size(self) -> int:
        return self.spec.key_size

    @property
    def value_size(self) -> int:
        return self.spec.value_size

    @property
    def max_entries(self) -> int:
        return self.spec.max_entries

    def vm_lookup(self, key: bytes) -> bytearray | None:
        """The live value storage under ``key`` (value maps), None for none."""
        del key
        return None

    def vm_update(self, key: bytes, value: bytes, flags: int) -> int:
        del key, value, flags
        return -errno.EOPNOTSUPP

    def vm_delete(self, key: bytes) -> int:
        del key
        return -errno.EOPNOTSUPP

    # -- operations shared by all kinds ---------------------------------------
    def _delete_raw(self, kb: bytes) -> int:
        """Delete; 0 or the errno."""
        raise NotImplementedError

    def _next_raw(self, kb: bytes | None) -> bytes | None:
        raise NotImplementedError

    def _delete_hint(self) -> str:
        return ""

    def delete(self, key: Key) -> None:
        """Remove ``key``."""
        what = f"delete {self._label(key)}"
        kb = self._key(key)
        self._check_open(what)
        self._check_perm(what, write=True)
        err = self._delete_raw(kb)
        if err:
            raise bpf_error(err, what, self._delete_hint() if err == errno.EINVAL else "")

    def next_key(self, key: Key | None) -> Key | None:
        """The key after ``key`` (the first key for None); None at the end."""
        what = f"get next key after {key!r} in {self.kind}"
        kb = None if key is None else self._key(key)
        self._check_open(what)
        self._check_perm(what, write=False)
        nxt = self._next_raw(kb)
        return None if nxt is None else self._unkey(nxt)


def _index(kb: bytes) -> int:
    return int.from_bytes(kb, "little")


def _array_next(kb: bytes | None, max_entries: int) -> bytes | None:
    """``array_map_get_next_key`` / ``sock_map_get_next_key``."""
    i = _U32_MAX if kb is None else _index(kb)
    if i >= max_entries:
        return bytes(4)
    if i == max_entries - 1:
        return None
    return (i + 1).to_bytes(4, "little")


def _spec_error(spec: MapSpec) -> int:
    """The errno the kernel's map_alloc_check/map_alloc gives ``spec`` (0: created)."""
    t, ks, vs, n, flags = spec.type, spec.key_size, spec.value_size, spec.max_entries, spec.flags
    if flags & ~_CREATE_FLAGS[t] or (flags & F_RDONLY and flags & F_WRONLY):
        return errno.EINVAL
    if flags & F_RDONLY_PROG and flags & F_WRONLY_PROG:
        return errno.EINVAL
    if n == 0:
        return errno.EINVAL
    if t in (MapType.SOCKMAP, MapType.SOCKHASH):
        if vs not in (4, 8) or ks == 0 or (t == MapType.SOCKMAP and ks != 4):
            return errno.EINVAL
        if t == MapType.SOCKHASH:
            if ks > _MAX_BPF_STACK:
                return errno.E2BIG
            if _roundup_pow2(n) > _U32_MAX // _BUCKET_SIZE:
                return errno.EINVAL
        elif n > _INT_MAX:
            return errno.EINVAL  # observed for 2**31 and 2**32 - 1
        return 0
    if t == MapType.ARRAY:
        if ks != 4 or vs == 0:
            return errno.EINVAL
        return errno.E2BIG if vs > _INT_MAX else 0
    # HASH
    if ks == 0 or vs == 0:
        return errno.EINVAL
    if ks + vs >= _HTAB_MAX_KV:
        return errno.E2BIG
    if _roundup_pow2(n) > _U32_MAX // _BUCKET_SIZE:
        return errno.E2BIG
    return 0


class SockMap(Map, LookupSyntax[int, object]):
    """``BPF_MAP_TYPE_SOCKMAP``: an array of sockets, keys 0..max_entries-1.

    For the engine: ``on_insert``/``on_remove`` are lists of ``callback(map, key, ref)``
    called after a socket joined or left a key (outside the map's lock; on a replace
    the new socket's ``on_insert`` comes before the old one's ``on_remove``);
    ``before_insert`` callbacks run where the kernel links the socket to the map and may
    refuse it by raising a :class:`~sockmap.errors.BpfError` (EBUSY...);
    ``parser_attached`` makes inserts refuse non-TCP sockets; ``attachment`` is the
    engine's.
    """

    kind = "sockmap"
    _TYPE = MapType.SOCKMAP

    def __init__(self, spec: MapSpec) -> None:
        super().__init__(spec)
        self._entries: dict[bytes, SockRef] = {}
        self.on_insert: list[SockCallback] = []
        self.on_remove: list[SockCallback] = []
        self.before_insert: list[SockCallback] = []
        self.parser_attached = False
        self.attachment: Any = None
        _live.add(self)

    @classmethod
    def new(
        cls, max_entries: int, *, value_size: int = 8, key_size: int = 4, name: str = ""
    ) -> Self:
        """Create one; value_size 8 lets lookups return the socket cookie."""
        return cls.create(MapSpec(cls._TYPE, key_size, value_size, max_entries, 0, name))

    # -- storage (the hash variant overrides these) ---------------------------
    def _store(self, kb: bytes, ref: SockRef) -> None:
        old = self._entries.get(kb)
        self._entries[kb] = ref
        ref.links += 1
        if old is not None:
            old.unlink()

    def _unstore(self, kb: bytes) -> SockRef:
        ref = self._entries.pop(kb)
        ref.unlink()
        return ref

    def _live_ref(self, kb: bytes, gone: list[tuple[bytes, SockRef]]) -> SockRef | None:
        """The entry under ``kb`` if its socket is still open; a closed one is removed."""
        ref = self._entries.get(kb)
        if ref is None:
            return None
        if ref.alive():
            return ref
        gone.append((kb, self._unstore(kb)))
        return None

    def _prune(self, gone: list[tuple[bytes, SockRef]]) -> None:
        for kb in list(self._entries):
            self._live_ref(kb, gone)

    def _fire(self, callbacks: list[SockCallback], events: list[tuple[bytes, SockRef]]) -> None:
        for kb, ref in events:
            for cb in list(callbacks):
                cb(self, kb, ref)

    def _removed(self, gone: list[tuple[bytes, SockRef]]) -> None:
        self._fire(self.on_remove, gone)

    # -- operations ------------------------------------------------------------
    def update(self, key: Key, sock: object, flags: int = UpdateFlag.ANY) -> None:
        """Insert ``sock`` (a socket object or an fd) under ``key``."""
        fd = check_fd(sock, f"insert into {self._label(key)}")
        what = f"insert fd {fd} into {self._label(key)}"
        self._check_flags(flags, what)
        kb = self._key(key)
        self._check_open(what)
        self._check_perm(what, write=True)
        if flags & UpdateFlag.F_LOCK:
            raise bpf_error(errno.EINVAL, what)
        fd, kind = socket_kind(sock, what=what)
        if not kind.usable:
            raise unsupported(what)
        if flags > UpdateFlag.EXIST:
            raise bpf_error(errno.EINVAL, what)
        if self._TYPE == MapType.SOCKMAP and _index(kb) >= self.spec.max_entries:
            raise bpf_error(errno.E2BIG, what)
        ref = _ref_for(sock, fd, kind.tcp)
        gone: list[tuple[bytes, SockRef]] = []
        try:
            for hook in list(self.before_insert):
                hook(self, kb, ref)
            # after the link's EBUSY, as in the kernel (whose psock keeps the programs)
            if not linkable(kind, self.parser_attached):
                raise unsupported(what)
            with self._lock:
                old = self._live_ref(kb, gone)
                if old is not None and flags == UpdateFlag.NOEXIST:
                    raise bpf_error(errno.EEXIST, what)
                if old is None and flags == UpdateFlag.EXIST:
                    raise bpf_error(errno.ENOENT, what)
                if old is None and self._TYPE == MapType.SOCKHASH:
                    if len(self._entries) >= self.spec.max_entries:
                        self._prune(gone)
                    if len(self._entries) >= self.spec.max_entries:
                        raise bpf_error(errno.E2BIG, what)
                self._store(kb, ref)
        except BpfError:
            if ref.links == 0:
                ref.release_programs()  # the kernel frees the psock it made for this update
            raise
        finally:
            self._removed(gone)
        try:
            self._fire(self.on_insert, [(kb, ref)])
        except OSError as exc:
            raise self._not_taken(kb, ref, old, what, exc) from exc
        if old is not None:
            self._removed([(kb, old)])

    def _not_taken(
        self, kb: bytes, ref: SockRef, old: SockRef | None, what: str, exc: OSError
    ) -> BpfError:
        """The engine could not take a socket just stored (EMFILE for its own duplicate of
        the socket, say): the entry goes again, so map and datapath agree, and the error
        says what to do. (A socket it replaced has left the key.)"""
        with self._lock:
            if self._entries.get(kb) is ref:
                self._unstore(kb)
        if old is not None:
            self._removed([(kb, old)])
        err = exc.errno or errno.EIO
        advice = ""
        if err in (errno.EMFILE, errno.ENFILE):
            advice = (
                "the userspace engine keeps its own duplicate of each socket in a map: raise "
                "the open-file limit (ulimit -n) or put fewer sockets in maps"
            )
        return bpf_error(err, f"{what}: the userspace engine could not take the socket", advice)

    def _lookup_ref(self, key: Key) -> SockRef:
        what = f"look up {self._label(key)}"
        kb = self._key(key)
        self._check_open(what)
        self._check_perm(what, write=False)
        if self.spec.value_size != 8:
            raise bpf_error(errno.ENOSPC, what)
        gone: list[tuple[bytes, SockRef]] = []
        with self._lock:
            ref = self._live_ref(kb, gone)
        self._removed(gone)
        if ref is None:
            raise bpf_error(errno.ENOENT, what)
        return ref

    def lookup(self, key: Key) -> int:
        """The socket cookie under ``key`` (needs value_size 8: ENOSPC otherwise)."""
        return self._lookup_ref(key).cookie

    def _delete_raw(self, kb: bytes) -> int:
        gone: list[tuple[bytes, SockRef]] = []
        with self._lock:
            ref = self._live_ref(kb, gone)
            if ref is not None:
                gone.append((kb, self._unstore(kb)))
        self._removed(gone)
        if ref is None:
            return errno.EINVAL if self._TYPE == MapType.SOCKMAP else errno.ENOENT
        return 0

    def _delete_hint(self) -> str:
        return "the slot is empty or past max_entries"

    def _next_raw(self, kb: bytes | None) -> bytes | None:
        return _array_next(kb, self.spec.max_entries)

    # -- for the engine --------------------------------------------------------
    def _ref_at(self, key: Key) -> SockRef | None:
        """The entry under ``key``, or None (a bad key, none there, or a closed map)."""
        try:
            kb = self._key(key)
        except (BpfError, TypeError):
            return None
        return None if self._closed else self._entries.get(kb)

    def held_socket(self, key: bytes) -> socket.socket | None:
        """The socket object the application inserted under ``key``, while it holds its
        fd (no syscall; None otherwise: then use :meth:`lookup_socket`)."""
        ref = self._ref_at(key)
        return None if ref is None else ref.held_socket()

    def lookup_socket(self, key: Key) -> socket.socket | None:
        """The socket under ``key`` for a redirect, or None (never raises, fires nothing)."""
        ref = self._ref_at(key)
        if ref is None or not ref.alive():
            return None
        try:
            return ref.socket()
        except OSError:
            return None

    def sockets(self) -> Iterator[tuple[bytes, socket.socket]]:
        """(key bytes, socket) for every live entry (closed sockets are removed first)."""
        gone: list[tuple[bytes, SockRef]] = []
        with self._lock:
            self._prune(gone)
            entries = list(self._entries.items())
        self._removed(gone)
        for kb, ref in entries:
            with contextlib.suppress(OSError):
                yield kb, ref.socket()

    def remove_socket(self, sock: object) -> int:
        """Remove ``sock`` from every key of this map; returns how many entries went."""
        with self._lock:
            gone = [(kb, ref) for kb, ref in self._entries.items() if ref.matches(sock)]
            for kb, _ in gone:
                self._unstore(kb)
        self._removed(gone)
        return len(gone)

    def close(self) -> None:
        """End the map: every socket leaves it (``on_remove`` fires), operations EBADF."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            gone = list(self._entries.items())
            for kb, _ in gone:
                self._unstore(kb)
        _live.discard(self)
        self._removed(gone)

    def vm_delete(self, key: bytes) -> int:
        """``bpf_map_delete_elem`` from a program: 0, -EINVAL (sockmap) or -ENOENT."""
        if len(key) != self.spec.key_size:
            return -errno.EINVAL
        return -self._delete_raw(bytes(key))


class SockHash(SockMap):
    """``BPF_MAP_TYPE_SOCKHASH``: sockets under arbitrary keys, in the kernel's order."""

    kind = "sockhash"
    _TYPE = MapType.SOCKHASH

    def __init__(self, spec: MapSpec) -> None:
        super().__init__(spec)
        self._order = _Buckets(spec.max_entries, _sockhash_hash)

    def _store(self, kb: bytes, ref: SockRef) -> None:
        super()._store(kb, ref)
        self._order.add_head(kb)

    def _unstore(self, kb: bytes) -> SockRef:
        self._order.remove(kb)
        return super()._unstore(kb)

    def _next_raw(self, kb: bytes | None) -> bytes | None:
        gone: list[tuple[bytes, SockRef]] = []
        try:
            with self._lock:
                start = None if kb is None else self._live_ref(kb, gone)
                while True:
                    nxt = self._order.first() if start is None else self._order.after(kb or b"")
                    if nxt is None or self._live_ref(nxt, gone) is not None:
                        return nxt
        finally:
            self._removed(gone)


class _ValueMap(Map, LookupSyntax[bytes, "int | bytes"]):
    """Maps whose values are plain bytes (ARRAY, HASH)."""

    @classmethod
    def new(
        cls,
        max_entries: int,
        *,
        key_size: int = 4,
        value_size: int = 8,
        flags: int = 0,
        name: str = "",
    ) -> Self:
        return cls.create(MapSpec(cls._TYPE, key_size, value_size, max_entries, flags, name))

    def _value(self, value: int | bytes) -> bytes:
        return encode_value(value, self.spec.value_size, self.kind)

    # the kernel's map ops: 0 / errno, and the stored value
    def _update_op(self, kb: bytes, value: bytes, flags: int) -> int:
        raise NotImplementedError

    def _lookup_op(self, kb: bytes) -> bytearray | None:
        raise NotImplementedError

    def update(self, key: Key, value: int | bytes, flags: int = UpdateFlag.ANY) -> None:
        """Store ``value`` (bytes of value_size, or an unsigned int) under ``key``."""
        raw = self._value(value)
        what = f"update {self._label(key)}"
        self._check_flags(flags, what)
        kb = self._key(key)
        self._check_open(what)
        self._check_perm(what, write=True)
        if flags & UpdateFlag.F_LOCK:  # no spin lock in the value: refused by bpf()
            raise bpf_error(errno.EINVAL, what)
        with self._lock:
            err = self._update_op(kb, raw, int(flags))
        if err:
            raise bpf_error(err, what)

    def _lookup_raw(self, key: Key) -> bytes:
        what = f"look up {self._label(key)}"
        kb = self._key(key)
        self._check_open(what)
        self._check_perm(what, write=False)
        with self._lock:
            stored = self._lookup_op(kb)
            if stored is None:
                raise bpf_error(errno.ENOENT, what)
            return bytes(stored)

    def lookup(self, key: Key) -> bytes:
        """The raw value under ``key``."""
        return self._lookup_raw(key)

    def lookup_int(self, key: Key) -> int:
        """The value under ``key`` read as a little-endian unsigned int."""
        return int.from_bytes(self._lookup_raw(key), "little")

    # -- VmMap -----------------------------------------------------------------
    def vm_lookup(self, key: bytes) -> bytearray | None:
        if len(key) != self.spec.key_size:
            return None
        with self._lock:
            return self._lookup_op(bytes(key))

    def vm_update(self, key: bytes, value: bytes, flags: int) -> int:
        """``bpf_map_update_elem`` from a program: 0 or -errno, as the kernel's map op."""
        if len(key) != self.spec.key_size or len(value) != self.spec.value_size:
            return -errno.EINVAL
        if flags & UpdateFlag.F_LOCK:
            return -errno.EINVAL
        with self._lock:
            return -self._update_op(bytes(key), bytes(value), flags)

    def vm_delete(self, key: bytes) -> int:
        if len(key) != self.spec.key_size:
            return -errno.EINVAL
        with self._lock:
            return -self._delete_raw(bytes(key))


class ArrayMap(_ValueMap):
    """``BPF_MAP_TYPE_ARRAY``: fixed slots, all present, zero-filled."""

    kind = "array"
    _TYPE = MapType.ARRAY

    def __init__(self, spec: MapSpec) -> None:
        super().__init__(spec)
        self._slots: dict[int, bytearray] = {}  # made on first touch; the rest read as zeros

    def _update_op(self, kb: bytes, value: bytes, flags: int) -> int:
        if flags & ~UpdateFlag.F_LOCK > UpdateFlag.EXIST:
            return errno.EINVAL
        i = _index(kb)
        if i >= self.spec.max_entries:
            return errno.E2BIG
        if flags & UpdateFlag.NOEXIST:
            return errno.EEXIST  # every slot exists
        slot = self._lookup_op(kb)
        assert slot is not None
        slot[:] = value  # in place: a program's pointer sees the new value
        return 0

    def _lookup_op(self, kb: bytes) -> bytearray | None:
        i = _index(kb)
        if i >= self.spec.max_entries:
            return None
        slot = self._slots.get(i)
        if slot is None:
            slot = self._slots[i] = bytearray(self.spec.value_size)
        return slot

    def _delete_raw(self, kb: bytes) -> int:
        del kb
        return errno.EINVAL  # array slots cannot be deleted

    def _next_raw(self, kb: bytes | None) -> bytes | None:
        return _array_next(kb, self.spec.max_entries)


class HashMap(_ValueMap):
    """``BPF_MAP_TYPE_HASH``, iterated in the kernel's zero-seed order."""

    kind = "hash"
    _TYPE = MapType.HASH

    def __init__(self, spec: MapSpec) -> None:
        super().__init__(spec)
        self._values: dict[bytes, bytearray] = {}
        self._order = _Buckets(spec.max_entries, _htab_hash)

    def _update_op(self, kb: bytes, value: bytes, flags: int) -> int:
        if flags & ~UpdateFlag.F_LOCK > UpdateFlag.EXIST:
            return errno.EINVAL
        old = self._values.get(kb)
        if old is not None and flags == UpdateFlag.NOEXIST:
            return errno.EEXIST
        if old is None and flags == UpdateFlag.EXIST:
            return errno.ENOENT
        if old is None:
            if len(self._values) >= self.spec.max_entries:
                return errno.E2BIG
            self._values[kb] = bytearray(value)
        else:
            old[:] = value
        self._order.add_head(kb)  # the kernel links a new element at the bucket's head
        return 0

    def _lookup_op(self, kb: bytes) -> bytearray | None:
        return self._values.get(kb)

    def _delete_raw(self, kb: bytes) -> int:
        with self._lock:
            if kb not in self._values:
                return errno.ENOENT
            del self._values[kb]
            self._order.remove(kb)
        return 0

    def _next_raw(self, kb: bytes | None) -> bytes | None:
        with self._lock:
            if kb is None or kb not in self._values:
                return self._order.first()
            return self._order.after(kb)


_BY_TYPE: dict[MapType, type[Map]] = {
    MapType.SOCKMAP: SockMap,
    MapType.SOCKHASH: SockHash,
    MapType.ARRAY: ArrayMap,
    MapType.HASH: HashMap,
}


def is_socket_map(m: Map) -> bool:
    """True for SOCKMAP and SOCKHASH."""
    return isinstance(m, SockMap)
