"""What a compiled function sees when it runs as plain Python: the stand-in context, the
``redirect`` call, and integer views of maps."""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sockmap import asm
from sockmap.abi import SkAction

__all__ = [
    "SK_DROP",
    "SK_PASS",
    "CompiledProgram",
    "Msg",
    "Skb",
    "SockOps",
    "apply_bytes",
    "cork_bytes",
    "redirect",
    "redirect_peer",
    "sock_hash_update",
    "sock_map_update",
]

SK_DROP = int(SkAction.DROP)
SK_PASS = int(SkAction.PASS)
M64 = (1 << 64) - 1


class PastTheMessage(Exception):  # noqa: N818 - control flow, not an error
    """A read past the message: the program ends with 0, as the compiled code does."""


@dataclass
class Skb:
    """The message as a compiled function sees it when run as plain Python.

    ``data`` is the message from its first byte; ``len`` its length; the other fields
    are the ``__sk_buff`` fields of the same names.
    """

    data: bytes = b""
    local_port: int = 0
    remote_port: int = 0
    family: int = 0
    local_ip4: int = 0
    remote_ip4: int = 0
    cookie: int = 1
    _redirect: list[tuple[object, int, int]] = field(default_factory=list, repr=False)

    @property
    def len(self) -> int:
        return len(self.data)

    def load(self, offset: int, size: int, order: str = "big") -> int:
        """``size`` (1, 2, 4, 8) bytes at ``offset`` of the message, as an unsigned int."""
        if offset < 0 or offset + size > len(self.data):
            raise PastTheMessage
        return int.from_bytes(self.data[offset : offset + size], order)  # type: ignore[arg-type]


@dataclass
class Msg(Skb):
    """An SK_MSG verdict's view of one send, as plain Python: ``data`` is what the
    program can read directly, ``size`` the whole send (``len`` reads it)."""

    size: int | None = None
    applied: list[int] = field(default_factory=list, repr=False)
    corked: list[int] = field(default_factory=list, repr=False)

    @property
    def len(self) -> int:
        return len(self.data) if self.size is None else self.size

    def load(self, offset: int, size: int, order: str = "big") -> int:
        if offset < 0 or offset + size > len(self.data):
            raise PastTheMessage
        return int.from_bytes(self.data[offset : offset + size], order)  # type: ignore[arg-type]


def apply_bytes(n: int) -> int:
    """``bpf_msg_apply_bytes``: the verdict holds for the next ``n`` bytes (no effect as
    plain Python)."""
    del n
    return 0


def cork_bytes(n: int) -> int:
    """``bpf_msg_cork_bytes``: wait for ``n`` bytes before running the verdict again (no
    effect as plain Python)."""
    del n
    return 0


def redirect(smap: Any, key: int, ingress: bool = False) -> int:  # noqa: ANN401
    """Redirect the message to the socket at ``key`` of ``smap``: SK_PASS if one is
    there, else SK_DROP (the kernel's ``bpf_sk_redirect_map``). Compiled, it is that
    helper; as plain Python it asks the map."""
    del ingress
    try:
        return SK_PASS if key in smap else SK_DROP
    except (TypeError, KeyError, OSError):
        return SK_DROP


@dataclass
class SockOps:
    """A SOCK_OPS program's view of one socket event, as plain Python."""

    op: int = 0
    local_port: int = 0
    remote_port: int = 0
    family: int = 0
    local_ip4: int = 0
    remote_ip4: int = 0
    cookie: int = 1
    inserted: list[tuple[object, object]] = field(default_factory=list, repr=False)


def sock_map_update(smap: Any, key: int) -> int:  # noqa: ANN401
    """``bpf_sock_map_update``: put the event's socket into ``smap`` at ``key`` (as plain
    Python there is no socket: returns 0)."""
    del smap, key
    return 0


def sock_hash_update(h: Any) -> int:  # noqa: ANN401
    """``bpf_sock_hash_update`` under the socket's own 4-tuple key (plain Python: 0)."""
    del h
    return 0


def redirect_peer(h: Any, ingress: bool = False) -> int:  # noqa: ANN401
    """Redirect to the other end of the connection, by its 4-tuple key in SOCKHASH ``h``
    (plain Python has no connection to look at: SK_DROP)."""
    del h, ingress
    return SK_DROP


class IntMap:
    """A data map seen as ints, as a compiled function sees it: missing keys read 0."""

    def __init__(self, m: Any) -> None:  # noqa: ANN401 - any engine's map
        self.m = m
        self.key_size = m.key_size
        self.value_size = m.value_size

    def _key(self, k: int) -> bytes:
        return (k & M64).to_bytes(8, "little")[: self.key_size]

    def __getitem__(self, k: int) -> int:
        try:
            raw = self.m.lookup(self._key(k))
        except KeyError:
            return 0
        if isinstance(raw, int):
            return raw
        return int.from_bytes(bytes(raw)[: min(8, self.value_size)], "little")

    def __setitem__(self, k: int, v: int) -> None:
        self.m[self._key(k)] = (
            (v & M64).to_bytes(8, "little")[: self.value_size].ljust(self.value_size, b"\0")
        )


class CompiledProgram(asm.Program):
    """An eBPF program compiled from a Python function, callable as that function."""

    def __init__(
        self,
        items: list[asm.Item],
        name: str,
        fn: Callable[..., Any],
        kind: str,
        maps: dict[str, object],
    ) -> None:
        super().__init__(items, name=name)
        self.fn = fn
        self.kind = kind
        self.maps = maps

    def __call__(self, skb: Skb) -> int:
        """Run the function as plain Python, with r0's meaning: a parser's length as a
        signed 32-bit int, a verdict's action as an unsigned one."""
        fn = self.fn
        wrapped = {name: IntMap(m) for name, m in self.maps.items()}
        glob = dict(fn.__globals__)
        glob.update({k: v for k, v in wrapped.items() if k in fn.__code__.co_names})
        closure = None
        if fn.__closure__:
            cells = []
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__, strict=True):
                cells.append(types.CellType(wrapped.get(name, cell.cell_contents)))
            closure = tuple(cells)
        fresh = types.FunctionType(fn.__code__, glob, fn.__name__, fn.__defaults__, closure)
        try:
            r0 = fresh(skb)
        except PastTheMessage:
            r0 = 0
        r0 = int(r0) & 0xFFFFFFFF
        if self.kind == "parser" and r0 >> 31:
            r0 -= 1 << 32
        return r0
