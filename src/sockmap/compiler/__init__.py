"""Restricted Python to eBPF: write a parser or verdict as a small Python function.

```python
from sockmap.compiler import stream_parser, stream_verdict, redirect

@stream_parser
def parse(skb):
    if skb.len < 4:
        return 0                       # need more
    n = skb.load(0, 4)                 # 4 bytes at message offset 0, big-endian
    if n > 65536:
        return -90                     # -EMSGSIZE stops the stream
    return n + 4

@stream_verdict(mode="strparser")
def route(skb):
    return redirect(smap, 1 + skb.load(4, 1) % 4)   # smap: a sockmap in scope
```

The decorated object is an :class:`asm.Program` (attach it like any other) that can
also be called as plain Python on a stand-in context (:class:`Skb`). What the
subset allows, and its semantics, are in :mod:`sockmap.compiler.codegen`; anything
else fails at decoration time with :class:`CompileError` naming file, line and
construct.
"""

from __future__ import annotations

from sockmap.compiler.codegen import CompileError, compile_function
from sockmap.compiler.runtime import (
    SK_DROP,
    SK_PASS,
    CompiledProgram,
    Msg,
    Skb,
    SockOps,
    apply_bytes,
    cork_bytes,
    redirect,
    redirect_peer,
    sock_hash_update,
    sock_map_update,
)

__all__ = [
    "SK_DROP",
    "SK_PASS",
    "CompileError",
    "CompiledProgram",
    "Msg",
    "Skb",
    "SockOps",
    "apply_bytes",
    "compile_function",
    "cork_bytes",
    "msg_verdict",
    "redirect",
    "redirect_peer",
    "sock_hash_update",
    "sock_map_update",
    "sock_ops",
    "stream_parser",
    "stream_verdict",
]


def stream_parser(fn: object) -> CompiledProgram:
    """Compile ``fn(skb) -> length`` as a stream parser (strparser mode)."""
    return compile_function(fn, kind="parser", mode="strparser")


def stream_verdict(fn: object = None, *, mode: str = "strparser") -> object:
    """Compile ``fn(skb) -> verdict`` as a stream verdict; ``mode`` says how it will be
    attached ("strparser": with a parser; "verdict": alone)."""
    if mode not in ("strparser", "verdict"):
        raise ValueError(f"mode must be 'strparser' or 'verdict', not {mode!r}")

    def wrap(f: object) -> CompiledProgram:
        return compile_function(f, kind="verdict", mode=mode)

    return wrap if fn is None else wrap(fn)


def msg_verdict(fn: object) -> CompiledProgram:
    """Compile ``fn(msg) -> verdict`` as an SK_MSG verdict (run on ``sendmsg``):
    ``msg.len`` is the size of the send, ``msg.load`` reads the part the program sees
    directly, ``redirect``/``apply_bytes``/``cork_bytes`` are the SK_MSG helpers."""
    return compile_function(fn, kind="msg", mode="verdict")


def sock_ops(fn: object) -> CompiledProgram:
    """Compile ``fn(ops) -> int`` as a SOCK_OPS program (attach it to a cgroup, or give it
    to the userspace engine's ``on_established``): ``ops.op`` is the event,
    ``sock_map_update``/``sock_hash_update`` put the socket into a map."""
    return compile_function(fn, kind="sockops", mode="verdict")
