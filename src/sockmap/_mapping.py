"""Mapping syntax shared by the maps of both engines, on top of their primitive operations.

A map provides ``lookup``, ``update``, ``delete`` and ``next_key``; these mixins add
``keys()``, iteration, ``get``, ``items``, ``m[k]``, ``m[k] = v``, ``del m[k]`` and ``in``.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from sockmap.errors import BpfError, KeyNotFound

if TYPE_CHECKING:
    from sockmap.kernel.maps import MapSpec

__all__ = ["Key", "KeyCodec", "KeyIteration", "LookupSyntax", "encode_value", "pack_int"]

Key = int | bytes
V = TypeVar("V")
W = TypeVar("W")


INT_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


def pack_int(value: int, size: int, what: str) -> bytes:
    """An unsigned int as ``size`` little-endian bytes (EINVAL when it cannot be)."""
    fmt = INT_FORMATS.get(size)
    if fmt is None:
        raise BpfError(errno.EINVAL, f"{what}: an int cannot fill {size} bytes; pass bytes")
    if not 0 <= value < 1 << (8 * size):
        raise BpfError(errno.EINVAL, f"{what}: {value} does not fit in {size} bytes unsigned")
    return struct.pack(fmt, value)


def encode_value(value: int | bytes, size: int, kind: str) -> bytes:
    """A map value as bytes: an unsigned int packed little-endian, or bytes of exactly ``size``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return pack_int(value, size, f"{kind} value")
    raw = bytes(value)
    if len(raw) != size:
        raise BpfError(
            errno.EINVAL,
            f"{kind} value is {len(raw)} bytes, the map's value_size is {size}",
        )
    return raw


class KeyCodec:
    """Keys as the kernel takes them (ints or bytes of key_size), and how errors name them."""

    kind: ClassVar[str] = "map"
    spec: MapSpec

    def _key(self, key: Key) -> bytes:
        if isinstance(key, bytes | bytearray | memoryview):
            raw = bytes(key)
            if len(raw) != self.spec.key_size:
                raise BpfError(
                    errno.EINVAL,
                    f"{self.kind} key is {len(raw)} bytes, the map's key_size is "
                    f"{self.spec.key_size}",
                )
            return raw
        if isinstance(key, int) and not isinstance(key, bool):
            return pack_int(key, self.spec.key_size, f"{self.kind} key")
        raise TypeError(f"a map key is an int or bytes, not {type(key).__name__}")

    def _unkey(self, raw: bytes) -> Key:
        fmt = INT_FORMATS.get(self.spec.key_size)
        return int(struct.unpack(fmt, raw)[0]) if fmt else raw

    def _label(self, key: Key) -> str:
        name = f" {self.spec.name!r}" if self.spec.name else ""
        return f"{self.kind}{name} key {key!r}"

    @staticmethod
    def _check_flags(flags: int, what: str) -> None:
        if int(flags) & ~0x7:
            raise BpfError(errno.EINVAL, f"{what}: unknown update flags {flags:#x}")


class KeyIteration:
    """``keys()``, ``iter()`` and ``del m[k]`` from ``next_key`` and ``delete``."""

    def next_key(self, key: Key | None) -> Key | None:
        raise NotImplementedError

    def delete(self, key: Key) -> None:
        raise NotImplementedError

    def keys(self) -> Iterator[Key]:
        """Every key, in the kernel's order (array-like maps yield every index)."""
        key = self.next_key(None)
        while key is not None:
            yield key
            key = self.next_key(key)

    def __iter__(self) -> Iterator[Key]:
        return self.keys()

    def __delitem__(self, key: Key) -> None:
        self.delete(key)


class LookupSyntax(KeyIteration, Generic[V, W]):
    """``get``, ``items``, ``m[k]``, ``m[k] = v`` and ``in`` from ``lookup`` and ``update``."""

    def lookup(self, key: Key) -> V:
        raise NotImplementedError

    def update(self, key: Key, value: W, flags: int = 0) -> None:
        raise NotImplementedError

    def get(self, key: Key) -> V | None:
        """The value under ``key``, or None when there is none."""
        try:
            return self.lookup(key)
        except KeyNotFound:
            return None

    def items(self) -> Iterator[tuple[Key, V]]:
        """(key, value) for every filled key."""
        for key in self.keys():
            value = self.get(key)
            if value is not None:
                yield key, value

    def __setitem__(self, key: Key, value: W) -> None:
        self.update(key, value)

    def __getitem__(self, key: Key) -> V:
        return self.lookup(key)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, int | bytes):
            return False
        return self.get(key) is not None
