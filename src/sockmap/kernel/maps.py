"""Kernel maps: a :class:`MapSpec` describes, :meth:`Map.create` makes.

Typed handles allow only what their type allows: :class:`SockMap` and
:class:`SockHash` take sockets as values, :class:`ArrayMap` and :class:`HashMap`
take bytes or integers. All of them are context managers and mappings.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from sockmap._closeable import FdHandle
from sockmap._mapping import Key, KeyCodec, KeyIteration, LookupSyntax, encode_value
from sockmap.abi import BPF_OBJ_NAME_LEN, Cmd, MapType, UpdateFlag
from sockmap.errors import (
    SOCKET_INSERT_HINT,
    BpfError,
    KeyNotFound,
    UnsupportedSocket,
    bpf_error,
)
from sockmap.kernel.info import MapInfo, map_info
from sockmap.kernel.syscall import address, bpf, buffer, check_fd

__all__ = [
    "ArrayMap",
    "HashMap",
    "Key",
    "Map",
    "MapSpec",
    "SockHash",
    "SockMap",
    "encode_value",
    "open_map_fd",
]


_SOCK_TYPES = (MapType.SOCKMAP, MapType.SOCKHASH)


@dataclass(frozen=True, slots=True)
class MapSpec:
    """A description of a map; pure, creates nothing."""

    type: MapType
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.name.encode()) >= BPF_OBJ_NAME_LEN:
            raise ValueError(
                f"map name {self.name!r} is longer than {BPF_OBJ_NAME_LEN - 1} bytes; "
                "the kernel would truncate it"
            )


def _name_bytes(name: str) -> bytes:
    # The kernel accepts only [A-Za-z0-9_.] in object names.
    clean = "".join(c if c.isalnum() or c in "_." else "_" for c in name)
    return clean.encode()[: BPF_OBJ_NAME_LEN - 1]


class Map(FdHandle, KeyCodec, KeyIteration):
    """A live kernel map. Close it (or use ``with``) to release the fd."""

    kind: ClassVar[str] = "map"

    def __init__(self, fd: int, spec: MapSpec) -> None:
        super().__init__(fd)
        self.spec = spec

    # -- life cycle ---------------------------------------------------------
    @classmethod
    def create(cls, spec: MapSpec) -> Self:
        """Create the map described by ``spec`` (``BPF_MAP_CREATE``).

        On ``Map`` itself the result is the typed handle (``SockMap``, ``ArrayMap``...).
        """
        what = (
            f"create {spec.type.name} map (key {spec.key_size} B, value {spec.value_size} B, "
            f"{spec.max_entries} entries)"
        )
        fd, _ = bpf(
            Cmd.MAP_CREATE,
            "7I16s",
            int(spec.type),
            spec.key_size,
            spec.value_size,
            spec.max_entries,
            spec.flags,
            0,
            0,
            _name_bytes(spec.name),
            what=what,
        )
        if cls is Map:  # Map.create(spec) gives the typed handle for spec.type
            return _BY_TYPE.get(spec.type, Map)(fd, spec)  # type: ignore[return-value]
        return cls(fd, spec)

    @property
    def name(self) -> str:
        return self.spec.name

    def info(self) -> MapInfo:
        """What the kernel reports for this map (id, sizes, name)."""
        return map_info(self.fd)

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        label = f" {self.spec.name!r}" if self.spec.name else ""
        return f"<{type(self).__name__}{label} {state} max_entries={self.spec.max_entries}>"

    # -- raw operations ------------------------------------------------------
    def _update_raw(self, key: Key, value: bytes, flags: int, what: str) -> None:
        self._check_flags(flags, what)
        kbuf, vbuf = buffer(self._key(key)), buffer(value)
        fd = self._fd_for(what)
        bpf(
            Cmd.MAP_UPDATE_ELEM, "IIQQQ", fd, 0, address(kbuf), address(vbuf), int(flags), what=what
        )

    def _lookup_raw(self, key: Key) -> bytes:
        what = f"look up {self._label(key)}"
        kbuf, vbuf = buffer(self._key(key)), buffer(self.spec.value_size)
        fd = self._fd_for(what)
        bpf(Cmd.MAP_LOOKUP_ELEM, "IIQQQ", fd, 0, address(kbuf), address(vbuf), 0, what=what)
        return vbuf.raw

    def delete(self, key: Key) -> None:
        """Remove ``key`` (``BPF_MAP_DELETE_ELEM``)."""
        what = f"delete {self._label(key)}"
        kbuf = buffer(self._key(key))
        # sockmap answers EINVAL (not ENOENT) for an empty or out-of-range slot.
        hints = {errno.EINVAL: "the slot is empty or past max_entries"}
        if self.spec.type != MapType.SOCKMAP:
            hints = {}
        bpf(
            Cmd.MAP_DELETE_ELEM, "IIQ", self._fd_for(what), 0, address(kbuf), what=what, hints=hints
        )

    def next_key(self, key: Key | None) -> Key | None:
        """The key after ``key`` (the first key for None); None at the end."""
        what = f"get next key after {key!r} in {self.kind}"
        kbuf = None if key is None else buffer(self._key(key))
        nbuf = buffer(self.spec.key_size)
        try:
            bpf(
                Cmd.MAP_GET_NEXT_KEY,
                "IIQQ",
                self._fd_for(what),
                0,
                address(kbuf),
                address(nbuf),
                what=what,
            )
        except KeyNotFound:
            return None
        return self._unkey(nbuf.raw)


class SockMap(Map, LookupSyntax[int, object]):
    """``BPF_MAP_TYPE_SOCKMAP``: an array of sockets, keys 0..max_entries-1."""

    kind = "sockmap"
    map_type: ClassVar[MapType] = MapType.SOCKMAP

    def __init__(self, fd: int, spec: MapSpec) -> None:
        super().__init__(fd, spec)
        self.inserted_keys: set[Key] = set()
        """Keys this handle inserted a socket under (a superset of what is still there)."""

    @classmethod
    def new(
        cls, max_entries: int, *, value_size: int = 8, key_size: int = 4, name: str = ""
    ) -> Self:
        """Create one; value_size 8 lets lookups return the socket cookie."""
        return cls.create(MapSpec(cls.map_type, key_size, value_size, max_entries, 0, name))

    def update(self, key: Key, sock: object, flags: int = UpdateFlag.ANY) -> None:
        """Insert ``sock`` (a socket object or an fd) under ``key``."""
        fd = check_fd(sock, f"insert into {self._label(key)}")
        value = struct.pack("<Q" if self.spec.value_size == 8 else "<I", fd)
        what = f"insert fd {fd} into {self._label(key)}"
        try:
            self._update_raw(key, value, flags, what)
        except BpfError as e:
            if e.errno == errno.EOPNOTSUPP:
                raise bpf_error(
                    errno.EOPNOTSUPP,
                    what,
                    SOCKET_INSERT_HINT,
                    UnsupportedSocket,
                ) from None
            raise
        self.inserted_keys.add(key)

    def lookup(self, key: Key) -> int:
        """The socket cookie under ``key`` (needs value_size 8: ENOSPC otherwise)."""
        raw = self._lookup_raw(key)  # value_size 4: ENOSPC, with advice from errors.hint
        return (
            int(struct.unpack("<Q", raw)[0]) if len(raw) == 8 else int(struct.unpack("<I", raw)[0])
        )


class SockHash(SockMap):
    """``BPF_MAP_TYPE_SOCKHASH``: sockets under arbitrary keys."""

    kind = "sockhash"
    map_type = MapType.SOCKHASH


class _ValueMap(Map, LookupSyntax[bytes, "int | bytes"]):
    """Maps whose values are plain bytes (ARRAY, HASH)."""

    map_type: ClassVar[MapType]

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
        return cls.create(MapSpec(cls.map_type, key_size, value_size, max_entries, flags, name))

    def _value(self, value: int | bytes) -> bytes:
        return encode_value(value, self.spec.value_size, self.kind)

    def update(self, key: Key, value: int | bytes, flags: int = UpdateFlag.ANY) -> None:
        """Store ``value`` (bytes of value_size, or an unsigned int) under ``key``."""
        self._update_raw(key, self._value(value), flags, f"update {self._label(key)}")

    def lookup(self, key: Key) -> bytes:
        """The raw value under ``key``."""
        return self._lookup_raw(key)

    def lookup_int(self, key: Key) -> int:
        """The value under ``key`` read as a little-endian unsigned int."""
        return int.from_bytes(self._lookup_raw(key), "little")


class ArrayMap(_ValueMap):
    """``BPF_MAP_TYPE_ARRAY``: fixed slots, all present, zero-filled."""

    kind = "array"
    map_type = MapType.ARRAY


class HashMap(_ValueMap):
    """``BPF_MAP_TYPE_HASH``."""

    kind = "hash"
    map_type = MapType.HASH


_BY_TYPE: dict[MapType, type[Map]] = {
    MapType.SOCKMAP: SockMap,
    MapType.SOCKHASH: SockHash,
    MapType.ARRAY: ArrayMap,
    MapType.HASH: HashMap,
}


def open_map_fd(fd: int) -> Map:
    """Wrap an fd to an existing map (from a pin or an id) in its typed handle; takes ownership."""
    info = map_info(fd)
    mtype = info.type if isinstance(info.type, MapType) else MapType.UNSPEC
    cls = _BY_TYPE.get(mtype, Map)
    spec = MapSpec(mtype, info.key_size, info.value_size, info.max_entries, info.flags, info.name)
    return cls(fd, spec)


def is_socket_map(m: Map) -> bool:
    """True for SOCKMAP and SOCKHASH."""
    return m.spec.type in _SOCK_TYPES
