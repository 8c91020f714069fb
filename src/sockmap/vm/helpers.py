"""The helpers a program may call, per program type, and what they do in the VM.

Each helper takes the run's :class:`Memory`, the five argument registers and the pc,
and returns r0. Semantics follow the helper descriptions in include/uapi/linux/bpf.h;
everything outside the program (maps, redirect targets, time...) goes through the
run's ``HelperEnv`` and ``VmMap`` objects.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from sockmap.abi import Helper, MapType, ProgType
from sockmap.abi.internals import program_internals
from sockmap.errors import VmError
from sockmap.vm._semantics import M32, M64
from sockmap.vm.api import HelperEnv
from sockmap.vm.memory import CTX_RID, FIRST_MAP_RID, HALF, OFF_MASK, SHIFT, STACK_SIZE, Memory

__all__ = ["ALLOWED", "HELPERS", "HelperSpec", "kern_ctx_fields", "kfunc", "kfuncs"]

HelperFn = Callable[[Memory, int, int, int, int, int, int], int]

EFAULT = (-errno.EFAULT) & M64
ENOMEM = (-errno.ENOMEM) & M64
INT_MAX = (1 << 31) - 1
SOCK_MAPS = frozenset({MapType.SOCKMAP, MapType.SOCKHASH})
DATA_MAPS = frozenset({MapType.ARRAY, MapType.HASH, MapType.LRU_HASH})
_SOCKMAP = frozenset({MapType.SOCKMAP})
_SOCKHASH = frozenset({MapType.SOCKHASH})


@dataclass(frozen=True, slots=True)
class HelperSpec:
    """A helper's signature as the validator checks it, and its implementation."""

    helper: Helper
    args: tuple[str, ...]
    """Kinds of r1.. : ``map``, ``ctx``, ``ptr`` (memory), ``int`` (any value, the kernel's
    ARG_ANYTHING: a pointer passes as its number), ``size`` (a scalar: ARG_CONST_SIZE)."""
    fn: HelperFn
    returns_map_value: bool = False
    map_types: frozenset[int] = frozenset()
    """Map types the ``map`` argument may have (empty: any)."""


def _env(mem: Memory, pc: int) -> HelperEnv:
    if mem.env is None:
        raise VmError(f"pc {pc}: the program calls a helper but the run has no HelperEnv")
    return mem.env


def _ctx_arg(mem: Memory, r1: int, pc: int) -> None:
    if r1 >> SHIFT != CTX_RID or r1 & ((1 << SHIFT) - 1) != 1 << (SHIFT - 1):
        raise mem.fault(pc, "ctx argument", r1, 0, "R1 must be the context pointer")


def _map_typed(mem: Memory, addr: int, types: frozenset[int], name: str, pc: int) -> int:
    idx, m = mem.map_at(addr, pc)
    if types and mem.static.meta[idx][0] not in types:
        raise VmError(f"pc {pc}: {name} cannot use map#{idx} of type {m.map_type}")
    return idx


def _lookup(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    idx = (r1 >> SHIFT) - FIRST_MAP_RID
    meta = mem.static.meta
    if r1 & OFF_MASK != HALF or not 0 <= idx < len(meta) or meta[idx][0] not in DATA_MAPS:
        idx = _map_typed(mem, r1, DATA_MAPS, "map_lookup_elem", pc)  # raises the error
    _, key_size, value_size = meta[idx]
    o = r2 - mem.sbase
    if 0 <= o <= STACK_SIZE - key_size:  # the key on the stack: the common case
        return fast_lookup(mem, idx, mem.stack, o)
    value = mem.maps[idx].vm_lookup(mem.read_bytes(r2, key_size, pc))
    if value is None:
        return 0
    return mem.add_value(value, value_size, idx)


def _update(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    idx = _map_typed(mem, r1, DATA_MAPS, "map_update_elem", pc)
    m = mem.maps[idx]
    key = mem.read_bytes(r2, m.key_size, pc)
    value = mem.read_bytes(r3, m.value_size, pc)
    return m.vm_update(key, value, r4) & M64


def _delete(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    idx, m = mem.map_at(r1, pc)
    del idx
    return m.vm_delete(mem.read_bytes(r2, m.key_size, pc)) & M64


def _ktime(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    return _env(mem, pc).ktime_ns() & M64


def _prandom(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    return _env(mem, pc).prandom_u32() & M32


def _cpu(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    return 0


def _cookie(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    _ctx_arg(mem, r1, pc)
    return _env(mem, pc).socket_cookie() & M64


def _load_bytes(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    _ctx_arg(mem, r1, pc)
    offset, n = r2 & M32, r4 & M32
    if n == 0:
        raise VmError(f"pc {pc}: skb_load_bytes with len 0")
    buf, off = mem.check_write(r3, n, pc)
    if offset > INT_MAX or offset + n > mem.length:
        buf[off : off + n] = bytes(n)
        return EFAULT
    if offset + n > mem.dlen:
        raise VmError(
            f"pc {pc}: skb_load_bytes({offset}, {n}) needs bytes past the {mem.dlen} "
            f"the engine supplied (of {mem.length}); the program's max_packet_offset is wrong"
        )
    buf[off : off + n] = mem.data[offset : offset + n]
    return 0


def _pull_data(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    """``bpf_skb_pull_data``: the kernel makes ``len`` bytes (0: the linear part) directly
    accessible; the VM's packet is always linear, so only a length past the message fails."""
    _ctx_arg(mem, r1, pc)
    return ENOMEM if r2 & M32 > mem.length else 0


def _redirect_map(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    _ctx_arg(mem, r1, pc)
    idx = _map_typed(mem, r2, _SOCKMAP, "redirect_map", pc)
    return _env(mem, pc).redirect(mem.maps[idx], (r3 & M32).to_bytes(4, "little"), r4) & M64


# Fast forms the translator calls when the validator's state shows the arguments: the
# map pointer is a constant it checked (a data map for a lookup, a SOCKMAP for a
# redirect), the key of a lookup is on the stack, r1 is the context. The translated
# code checks those at run time too and calls the general helper otherwise.


def fast_lookup(mem: Memory, idx: int, stack: bytearray, o: int) -> int:
    """``map_lookup_elem`` of data map ``idx`` with the key at ``stack[o:]``."""
    _, key_size, value_size = mem.static.meta[idx]
    value = mem.maps[idx].vm_lookup(bytes(stack[o : o + key_size]))
    if value is None:
        return 0
    return mem.add_value(value, value_size, idx)


def fast_cookie(mem: Memory, pc: int) -> int:
    """``get_socket_cookie`` of the context."""
    return _env(mem, pc).socket_cookie() & M64


def fast_redirect_map(mem: Memory, idx: int, r3: int, r4: int, pc: int) -> int:
    """``sk_redirect_map`` / ``msg_redirect_map`` into SOCKMAP ``idx``."""
    return _env(mem, pc).redirect(mem.maps[idx], (r3 & M32).to_bytes(4, "little"), r4) & M64


def _redirect_hash(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    _ctx_arg(mem, r1, pc)
    idx = _map_typed(mem, r2, _SOCKHASH, "redirect_hash", pc)
    m = mem.maps[idx]
    return _env(mem, pc).redirect(m, mem.read_bytes(r3, m.key_size, pc), r4) & M64


def _apply(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    _ctx_arg(mem, r1, pc)
    _env(mem, pc).apply_bytes(r2 & M32)
    return 0


def _cork(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    _ctx_arg(mem, r1, pc)
    _env(mem, pc).cork_bytes(r2 & M32)
    return 0


def _sock_update(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    _ctx_arg(mem, r1, pc)
    _, m = mem.map_at(r2, pc)
    return _env(mem, pc).sock_update(m, mem.read_bytes(r3, m.key_size, pc), r4) & M64


_H = Helper
HELPERS: dict[int, HelperSpec] = {
    s.helper: s
    for s in (
        HelperSpec(
            _H.map_lookup_elem, ("map", "ptr"), _lookup, returns_map_value=True, map_types=DATA_MAPS
        ),
        HelperSpec(_H.map_update_elem, ("map", "ptr", "ptr", "int"), _update, map_types=DATA_MAPS),
        HelperSpec(_H.map_delete_elem, ("map", "ptr"), _delete),
        HelperSpec(_H.ktime_get_ns, (), _ktime),
        HelperSpec(_H.ktime_get_boot_ns, (), _ktime),
        HelperSpec(_H.ktime_get_coarse_ns, (), _ktime),
        HelperSpec(_H.get_prandom_u32, (), _prandom),
        HelperSpec(_H.get_smp_processor_id, (), _cpu),
        HelperSpec(_H.get_socket_cookie, ("ctx",), _cookie),
        HelperSpec(_H.skb_load_bytes, ("ctx", "int", "ptr", "size"), _load_bytes),
        HelperSpec(_H.skb_pull_data, ("ctx", "int"), _pull_data),
        HelperSpec(
            _H.sk_redirect_map,
            ("ctx", "map", "int", "int"),
            _redirect_map,
            map_types=frozenset({MapType.SOCKMAP}),
        ),
        HelperSpec(
            _H.sk_redirect_hash,
            ("ctx", "map", "ptr", "int"),
            _redirect_hash,
            map_types=frozenset({MapType.SOCKHASH}),
        ),
        HelperSpec(
            _H.msg_redirect_map,
            ("ctx", "map", "int", "int"),
            _redirect_map,
            map_types=frozenset({MapType.SOCKMAP}),
        ),
        HelperSpec(
            _H.msg_redirect_hash,
            ("ctx", "map", "ptr", "int"),
            _redirect_hash,
            map_types=frozenset({MapType.SOCKHASH}),
        ),
        HelperSpec(
            _H.sock_map_update,
            ("ctx", "map", "ptr", "int"),
            _sock_update,
            map_types=frozenset({MapType.SOCKMAP}),
        ),
        HelperSpec(
            _H.sock_hash_update,
            ("ctx", "map", "ptr", "int"),
            _sock_update,
            map_types=frozenset({MapType.SOCKHASH}),
        ),
        HelperSpec(_H.msg_apply_bytes, ("ctx", "int"), _apply),
        HelperSpec(_H.msg_cork_bytes, ("ctx", "int"), _cork),
    )
}

_BASE = frozenset(
    {
        _H.map_lookup_elem,
        _H.map_update_elem,
        _H.map_delete_elem,
        _H.ktime_get_ns,
        _H.ktime_get_boot_ns,
        _H.ktime_get_coarse_ns,
        _H.get_prandom_u32,
        _H.get_smp_processor_id,
    }
)
ALLOWED: dict[ProgType, frozenset[int]] = {
    ProgType.SK_SKB: _BASE
    | {
        _H.skb_load_bytes,
        _H.skb_pull_data,
        _H.get_socket_cookie,
        _H.sk_redirect_map,
        _H.sk_redirect_hash,
    },
    ProgType.SK_MSG: _BASE
    | {_H.msg_redirect_map, _H.msg_redirect_hash, _H.msg_apply_bytes, _H.msg_cork_bytes},
    ProgType.SCHED_CLS: _BASE | {_H.skb_load_bytes, _H.skb_pull_data, _H.get_socket_cookie},
    ProgType.SOCK_OPS: _BASE | {_H.get_socket_cookie, _H.sock_map_update, _H.sock_hash_update},
}
"""Helper ids each supported program type may call."""


def _cast_to_kern_ctx(mem: Memory, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
    _ctx_arg(mem, r1, pc)
    return mem.kern_ctx()


def kern_ctx_fields() -> dict[int, str]:
    """What the VM models of the kernel ``sk_buff`` that ``bpf_cast_to_kern_ctx`` returns:
    the strparser message's ``full_len`` and ``offset`` (u32 reads), by offset
    (this kernel's, see :func:`sockmap.abi.internals.program_internals`)."""
    k = program_internals()
    if k is None:
        return {}
    return {k.skb_strp_full_len: "strp.full_len", k.skb_strp_offset: "strp.offset"}


def kfuncs() -> dict[int, HelperFn]:
    """The kfuncs the VM runs, by this kernel's BTF ids: only ``bpf_cast_to_kern_ctx``
    (none where the kernel's BTF is not readable)."""
    k = program_internals()
    return {} if k is None else {k.kfunc_cast_to_kern_ctx: _cast_to_kern_ctx}


def kfunc(btf_id: int, pt: ProgType) -> HelperFn | None:
    """The implementation of kfunc ``btf_id`` for program type ``pt``, if the VM has one."""
    return kfuncs().get(btf_id) if pt == ProgType.SK_SKB else None
