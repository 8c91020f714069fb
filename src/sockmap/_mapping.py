"""Mapping syntax shared by the maps of both engines, on top of their primitive operations.

A map provides ``lookup``, ``update``, ``delete`` and ``next_key``; these mixins add
``keys()``, iteration, ``get``, ``items``, ``m[k]``, ``m[k] = v``, ``del m[k]`` and ``in``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from sockmap.errors import KeyNotFound

__all__ = ["Key", "KeyIteration", "LookupSyntax"]

Key = int | bytes
V = TypeVar("V")
W = TypeVar("W")


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
