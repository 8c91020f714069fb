"""Map operations, one suite over both engines: the kernel is the oracle.

Every test runs with ``engine_maps`` = kernel and = userspace and expects the same
result and errno (the whole table of docs/semantics.md, admission, value size 4 vs
8, close removal). ``test_differential_*`` run hypothesis-generated operation
sequences on a kernel map and a userspace map side by side.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockmap.abi import MapType, UpdateFlag
from sockmap.errors import BpfError, KeyExists, KeyNotFound, MapFull, UnsupportedSocket
from sockmap.kernel.maps import MapSpec

SOCK_KINDS = pytest.mark.parametrize("kind", ["sockmap", "sockhash"])
_CLASS_OF = {
    errno.ENOENT: KeyNotFound,
    errno.EEXIST: KeyExists,
    errno.E2BIG: MapFull,
    errno.EOPNOTSUPP: UnsupportedSocket,
}


def check_error(err: BaseException, expected: int, *words: str) -> None:
    cls = _CLASS_OF.get(expected, BpfError)
    assert isinstance(err, cls), f"{type(err).__name__} is not {cls.__name__}: {err}"
    assert isinstance(err, BpfError)
    assert err.errno == expected, f"errno {errno.errorcode.get(err.errno or 0)}: {err}"
    text = str(err)
    for w in words:
        assert w in text, f"{w!r} not in message {text!r}"


def raises(expected: int, fn: Callable[[], object], *words: str) -> BpfError:
    with pytest.raises(BpfError) as exc:
        fn()
    check_error(exc.value, expected, *words)
    return exc.value


def so_cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, 57, 8), "little")


def closed_fd_number() -> int:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return r


# ------------------------------------------------------------------ create

F_NO_PREALLOC, F_NUMA, F_RDONLY, F_WRONLY, F_ZERO_SEED = 1, 4, 8, 16, 64
F_RDONLY_PROG, F_WRONLY_PROG, F_MMAPABLE, F_INNER_MAP = 128, 256, 1024, 4096

# (type, key_size, value_size, max_entries, flags, expected errno; 0 = created)
CREATE = [
    (MapType.SOCKMAP, 4, 4, 1, 0, 0),
    (MapType.SOCKMAP, 4, 8, 1, 0, 0),
    (MapType.SOCKMAP, 4, 3, 1, 0, errno.EINVAL),
    (MapType.SOCKMAP, 4, 16, 1, 0, errno.EINVAL),
    (MapType.SOCKMAP, 4, 0, 1, 0, errno.EINVAL),
    (MapType.SOCKMAP, 4, 8, 0, 0, errno.EINVAL),
    (MapType.SOCKMAP, 8, 8, 1, 0, errno.EINVAL),
    (MapType.SOCKMAP, 0, 8, 1, 0, errno.EINVAL),
    (MapType.SOCKMAP, 4, 8, 2**31, 0, errno.EINVAL),
    (MapType.SOCKMAP, 4, 8, 2**32 - 1, 0, errno.EINVAL),
    (MapType.SOCKMAP, 4, 8, 1, F_NUMA, 0),
    (MapType.SOCKMAP, 4, 8, 1, F_RDONLY, 0),
    (MapType.SOCKMAP, 4, 8, 1, F_WRONLY, 0),
    (MapType.SOCKMAP, 4, 8, 1, F_RDONLY | F_WRONLY, errno.EINVAL),
    (MapType.SOCKMAP, 4, 8, 1, F_NO_PREALLOC, errno.EINVAL),
    (MapType.SOCKMAP, 4, 8, 1, F_RDONLY_PROG, errno.EINVAL),
    (MapType.SOCKMAP, 4, 8, 1, 1 << 20, errno.EINVAL),
    (MapType.SOCKHASH, 4, 4, 1, 0, 0),
    (MapType.SOCKHASH, 4, 8, 1, 0, 0),
    (MapType.SOCKHASH, 4, 3, 1, 0, errno.EINVAL),
    (MapType.SOCKHASH, 4, 16, 1, 0, errno.EINVAL),
    (MapType.SOCKHASH, 4, 8, 0, 0, errno.EINVAL),
    (MapType.SOCKHASH, 8, 8, 1, 0, 0),
    (MapType.SOCKHASH, 1, 8, 1, 0, 0),
    (MapType.SOCKHASH, 2, 8, 1, 0, 0),
    (MapType.SOCKHASH, 512, 8, 1, 0, 0),
    (MapType.SOCKHASH, 513, 8, 1, 0, errno.E2BIG),
    (MapType.SOCKHASH, 0, 8, 1, 0, errno.EINVAL),
    (MapType.SOCKHASH, 4, 8, 2**27 + 1, 0, errno.EINVAL),
    (MapType.SOCKHASH, 4, 8, 2**32 - 1, 0, errno.EINVAL),
    (MapType.SOCKHASH, 4, 8, 1, F_RDONLY, 0),
    (MapType.SOCKHASH, 4, 8, 1, F_ZERO_SEED, errno.EINVAL),
    (MapType.ARRAY, 4, 8, 3, 0, 0),
    (MapType.ARRAY, 4, 1, 3, 0, 0),
    (MapType.ARRAY, 4, 3, 3, 0, 0),
    (MapType.ARRAY, 4, 4096, 3, 0, 0),
    (MapType.ARRAY, 4, 8, 0, 0, errno.EINVAL),
    (MapType.ARRAY, 4, 0, 3, 0, errno.EINVAL),
    (MapType.ARRAY, 8, 8, 3, 0, errno.EINVAL),
    (MapType.ARRAY, 0, 8, 3, 0, errno.EINVAL),
    (MapType.ARRAY, 4, 2**31, 1, 0, errno.E2BIG),
    (MapType.ARRAY, 4, 8, 3, F_NUMA | F_RDONLY_PROG, 0),
    (MapType.ARRAY, 4, 8, 3, F_MMAPABLE, 0),
    (MapType.ARRAY, 4, 8, 3, F_INNER_MAP, 0),
    (MapType.ARRAY, 4, 8, 3, F_NO_PREALLOC, errno.EINVAL),
    (MapType.ARRAY, 4, 8, 3, F_ZERO_SEED, errno.EINVAL),
    (MapType.ARRAY, 4, 8, 3, F_RDONLY_PROG | F_WRONLY_PROG, errno.EINVAL),
    (MapType.HASH, 4, 8, 3, 0, 0),
    (MapType.HASH, 1, 1, 3, 0, 0),
    (MapType.HASH, 513, 8, 3, 0, 0),
    (MapType.HASH, 4, 8, 0, 0, errno.EINVAL),
    (MapType.HASH, 0, 8, 3, 0, errno.EINVAL),
    (MapType.HASH, 4, 0, 3, 0, errno.EINVAL),
    (MapType.HASH, 4, 4194252, 1, F_NO_PREALLOC, errno.E2BIG),
    (MapType.HASH, 4, 4194251, 1, F_NO_PREALLOC, 0),
    (MapType.HASH, 4, 8, 2**28, F_NO_PREALLOC, errno.E2BIG),
    (MapType.HASH, 4, 8, 3, F_NO_PREALLOC | F_ZERO_SEED, 0),
    (MapType.HASH, 4, 8, 3, F_MMAPABLE, errno.EINVAL),
    (MapType.HASH, 4, 8, 3, 2, errno.EINVAL),  # NO_COMMON_LRU: LRU maps only
]


@pytest.mark.parametrize(("mtype", "ks", "vs", "n", "flags", "err"), CREATE)
def test_create(engine_maps, mtype, ks, vs, n, flags, err) -> None:
    spec = MapSpec(mtype, ks, vs, n, flags, name="t_create")
    if err:
        raises(err, lambda: engine_maps.create(spec), f"create {mtype.name} map", f"{n} entries")
        return
    m = engine_maps.create(spec)
    info = m.info()
    assert (info.type, info.key_size, info.value_size, info.max_entries) == (mtype, ks, vs, n)
    assert info.flags == flags & ~(F_RDONLY | F_WRONLY)  # fd permissions, not kept as flags
    assert info.name == "t_create"
    assert info.id > 0


def test_names_are_cleaned_like_the_kernel(engine_maps) -> None:
    m = engine_maps.create(MapSpec(MapType.ARRAY, 4, 4, 1, name="a-b c.d"))
    assert m.info().name == "a_b_c.d"


def test_ids_differ(engine_maps) -> None:
    a, b = engine_maps("array", 1), engine_maps("array", 1)
    assert a.info().id != b.info().id


# ------------------------------------------------------------------ update flags

FLAG_CASES = [
    (False, UpdateFlag.ANY, 0),
    (False, UpdateFlag.NOEXIST, 0),
    (False, UpdateFlag.EXIST, errno.ENOENT),
    (True, UpdateFlag.ANY, 0),
    (True, UpdateFlag.NOEXIST, errno.EEXIST),
    (True, UpdateFlag.EXIST, 0),
]


@SOCK_KINDS
@pytest.mark.parametrize(("filled", "flag", "err"), FLAG_CASES)
def test_update_flags(engine_maps, socks, kind, filled, flag, err) -> None:
    m = engine_maps(kind, 4)
    old, new = socks.tcp_pair()
    if filled:
        m.update(1, old)
    if err:
        raises(err, lambda: m.update(1, new, flag), f"insert fd {new.fileno()} into {kind} key 1")
        if filled:
            assert m.lookup(1) == so_cookie(old)
        else:
            assert 1 not in m
        return
    m.update(1, new, flag)
    assert m.lookup(1) == so_cookie(new) != so_cookie(old)


@SOCK_KINDS
@pytest.mark.parametrize("flags", [0x8, 0x10, 1 << 32, -1], ids=hex)
def test_unknown_update_flags(engine_maps, socks, kind, flags) -> None:
    m = engine_maps(kind, 2)
    a, _ = socks.tcp_pair()
    raises(errno.EINVAL, lambda: m.update(0, a, flags), "insert fd", "unknown update flags")
    assert 0 not in m


@SOCK_KINDS
@pytest.mark.parametrize("flags", [3, 4, 5, 6, 7])
def test_lock_and_both_flags_are_einval(engine_maps, socks, kind, flags) -> None:
    m = engine_maps(kind, 2)
    a, _ = socks.tcp_pair()
    raises(errno.EINVAL, lambda: m.update(0, a, flags), "insert fd")
    assert 0 not in m


def test_error_precedence(engine_maps, socks, tmp_path: Path) -> None:
    """Which check answers first when several would fail: the kernel's order."""
    m = engine_maps("sockmap", 2)
    r, w = os.pipe()
    try:
        raises(errno.EINVAL, lambda: m.update(0, r, UpdateFlag.F_LOCK))  # F_LOCK first
        raises(errno.ENOTSOCK, lambda: m.update(9, r))  # the fd before the key
        raises(errno.ENOTSOCK, lambda: m.update(0, r, 3))  # the fd before the flags
    finally:
        os.close(r)
        os.close(w)
    raises(errno.EOPNOTSUPP, lambda: m.update(9, socks.udp()))  # the socket before the key
    raises(errno.EOPNOTSUPP, lambda: m.update(0, socks.udp(), 3))
    a, _ = socks.tcp_pair()
    raises(errno.EINVAL, lambda: m.update(9, a, 3))  # flags before the key
    # with a parser: the key is checked before the TCP-only rule, that before EEXIST
    p = engine_maps.with_parser("sockmap")
    udp = socks.udp(bind="127.0.0.1")
    raises(errno.E2BIG, lambda: p.update(5, udp))
    raises(errno.EINVAL, lambda: p.update(0, udp, 3))
    p.update(0, a)
    raises(errno.EOPNOTSUPP, lambda: p.update(0, udp, UpdateFlag.NOEXIST))
    p.delete(0)
    h = engine_maps.with_parser("sockhash", 1)
    h.update(1, a)
    raises(errno.EOPNOTSUPP, lambda: h.update(2, udp))  # not E2BIG
    raises(errno.EOPNOTSUPP, lambda: h.update(2, udp, UpdateFlag.EXIST))  # not ENOENT
    h.delete(1)


# ------------------------------------------------------------------ capacity


@pytest.mark.parametrize("key", [2, 3, 2**32 - 1])
def test_sockmap_key_past_max_entries(engine_maps, socks, key) -> None:
    m = engine_maps("sockmap", 2)
    a, _ = socks.tcp_pair()
    raises(errno.E2BIG, lambda: m.update(key, a), f"sockmap key {key}", "max_entries")
    m.update(1, a)
    assert m.lookup(1) == so_cookie(a)


def test_sockhash_full(engine_maps, socks) -> None:
    m = engine_maps("sockhash", 2)
    a, b = socks.tcp_pair()
    m.update(100, a)
    m.update(200, a)
    for flag in (UpdateFlag.ANY, UpdateFlag.NOEXIST):
        raises(errno.E2BIG, lambda flag=flag: m.update(300, b, flag), "sockhash key 300")
    raises(errno.ENOENT, lambda: m.update(300, b, UpdateFlag.EXIST), "sockhash key 300")
    m.update(200, b)
    assert dict(m.items()) == {100: so_cookie(a), 200: so_cookie(b)}
    m.delete(100)
    m.update(300, b, UpdateFlag.NOEXIST)
    assert sorted(m.keys()) == [200, 300]


def test_sockhash_closed_socket_frees_its_slot(engine_maps, socks) -> None:
    m = engine_maps("sockhash", 1)
    a, b = socks.tcp_pair()[0], socks.tcp_pair()[0]
    m.update(1, a)
    raises(errno.E2BIG, lambda: m.update(2, b))
    a.close()
    m.update(2, b, UpdateFlag.NOEXIST)
    assert list(m.items()) == [(2, so_cookie(b))]


# ------------------------------------------------------------------ lookup


@SOCK_KINDS
def test_lookup_returns_so_cookie(engine_maps, socks, kind) -> None:
    m = engine_maps(kind, 4)
    client, server = socks.tcp_pair()
    lst = socks.listener()
    for key, sock in enumerate((client, server, lst)):
        m.update(key, sock)
    assert [m.lookup(k) for k in range(3)] == [so_cookie(s) for s in (client, server, lst)]
    assert m[0] == so_cookie(client)


@SOCK_KINDS
def test_value_size_4(engine_maps, socks, kind) -> None:
    m = engine_maps(kind, 4, value_size=4)
    a, b = socks.tcp_pair()
    m.update(0, a)
    with pytest.raises(KeyExists):
        m.update(0, b, UpdateFlag.NOEXIST)
    raises(errno.ENOSPC, lambda: m.lookup(0), "look up", "value_size=8")
    raises(errno.ENOSPC, lambda: m.lookup(1), "look up")  # even an empty slot
    raises(errno.ENOSPC, lambda: 0 in m)
    m.delete(0)
    raises(errno.EINVAL if kind == "sockmap" else errno.ENOENT, lambda: m.delete(0))


@SOCK_KINDS
def test_lookup_of_empty_and_deleted_key(engine_maps, socks, kind) -> None:
    m = engine_maps(kind, 4)
    a, _ = socks.tcp_pair()
    for _ in range(2):
        exc = raises(errno.ENOENT, lambda: m.lookup(2), f"look up {kind} key 2")
        assert isinstance(exc, KeyError)
        with pytest.raises(KeyError):
            m[2]
        assert m.get(2) is None
        assert 2 not in m
        m.update(2, a)
        assert m.get(2) == so_cookie(a)
        m.delete(2)


def test_sockmap_lookup_past_max_entries(engine_maps) -> None:
    m = engine_maps("sockmap", 2)
    raises(errno.ENOENT, lambda: m.lookup(5), "look up sockmap key 5")


# ------------------------------------------------------------------ delete


@pytest.mark.parametrize(
    ("kind", "key", "err"),
    [("sockmap", 1, errno.EINVAL), ("sockmap", 9, errno.EINVAL), ("sockhash", 1, errno.ENOENT)],
)
def test_delete_missing(engine_maps, kind, key, err) -> None:
    m = engine_maps(kind, 4)
    raises(err, lambda: m.delete(key), f"delete {kind} key {key}")
    with pytest.raises(BpfError) as exc:
        del m[key]
    assert exc.value.errno == err


# ------------------------------------------------------------------ iteration


def test_sockmap_next_key(engine_maps, socks) -> None:
    m = engine_maps("sockmap", 4)
    a, _ = socks.tcp_pair()
    m[2] = a
    assert m.next_key(None) == 0
    assert [m.next_key(k) for k in range(4)] == [1, 2, 3, None]
    assert m.next_key(10) == 0
    assert list(m.keys()) == [0, 1, 2, 3]
    assert list(m.items()) == [(2, so_cookie(a))]
    assert "2" not in m
    one = engine_maps("sockmap", 1)
    assert (one.next_key(None), one.next_key(0), one.next_key(5)) == (0, None, 0)


def test_sockhash_next_key_order_is_the_kernels(engine_maps, socks) -> None:
    m = engine_maps("sockhash", 8)
    a, b = socks.tcp_pair()
    assert m.next_key(None) is None
    for k in (9, 11, 12, 1, 3):  # 9, 11 and 12 share a bucket of 8
        m[k] = a
    # jhash(key, 0) buckets in index order, the newest first within a bucket
    assert list(m.keys()) == [1, 12, 11, 9, 3]
    assert m.next_key(7) == 1  # a missing key gives the first
    assert m.next_key(12) == 11
    m[9] = b  # a replace moves the key to the head of its bucket
    assert list(m.keys()) == [1, 9, 12, 11, 3]
    del m[12]
    assert 12 not in m
    assert list(m.keys()) == [1, 9, 11, 3]


def test_sockhash_with_8_byte_keys(engine_maps, socks) -> None:
    m = engine_maps("sockhash", 4, key_size=8)
    a, _ = socks.tcp_pair()
    big = 2**40 + 3
    m[big] = a
    m[b"\x01" * 8] = a
    assert sorted(m.keys()) == sorted([big, int.from_bytes(b"\x01" * 8, "little")])
    assert m[big] == so_cookie(a)
    with pytest.raises(BpfError) as exc:
        m[b"\x01" * 4] = a
    check_error(exc.value, errno.EINVAL, "key is 4 bytes", "key_size is 8")


def test_sockhash_odd_key_size_yields_bytes(engine_maps, socks) -> None:
    m = engine_maps("sockhash", 4, key_size=3)
    a, _ = socks.tcp_pair()
    m[b"abc"] = a
    m[b"xyz"] = a
    assert sorted(m.keys()) == [b"abc", b"xyz"]


# ------------------------------------------------------------------ values


@SOCK_KINDS
def test_value_by_fd_or_socket_object(engine_maps, socks, kind) -> None:
    m = engine_maps(kind, 2)
    a, _ = socks.tcp_pair()
    m.update(0, a.fileno())
    m.update(1, a)
    assert m.lookup(0) == m.lookup(1) == so_cookie(a)


@SOCK_KINDS
def test_fd_not_open(engine_maps, kind) -> None:
    m = engine_maps(kind, 2)
    fd = closed_fd_number()
    raises(errno.EBADF, lambda: m.update(0, fd), f"insert fd {fd} into {kind} key 0")
    raises(errno.EBADF, lambda: m.update(0, 2**31 - 1), "insert fd 2147483647")


@SOCK_KINDS
def test_fd_above_int_max(engine_maps, kind) -> None:
    m = engine_maps(kind, 2)
    raises(errno.EINVAL, lambda: m.update(0, 2**31), "insert into", "fd 2147483648", "at most")


@SOCK_KINDS
@pytest.mark.parametrize("what", ["pipe", "regular file", "directory", "/dev/null", "O_PATH"])
def test_fd_that_is_not_a_socket(engine_maps, tmp_path: Path, kind, what) -> None:
    m = engine_maps(kind, 2)
    other = -1
    if what == "pipe":
        fd, other = os.pipe()
    elif what == "regular file":
        fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    elif what == "directory":
        fd = os.open(tmp_path, os.O_RDONLY)
    elif what == "/dev/null":
        fd = os.open("/dev/null", os.O_RDWR)
    else:
        fd = os.open(tmp_path, os.O_PATH)
    try:
        expected = errno.EBADF if what == "O_PATH" else errno.ENOTSOCK  # O_PATH: no file
        raises(expected, lambda: m.update(0, fd), f"insert fd {fd}")
    finally:
        os.close(fd)
        if other >= 0:
            os.close(other)


def test_map_fd_is_not_a_socket(kernel_and_userspace) -> None:
    k, u = kernel_and_userspace
    arr = k("array", 1)
    for em in (k, u):
        m = em("sockmap", 2)
        raises(errno.ENOTSOCK, lambda m=m: m.update(0, arr.fd), "not a socket")


@SOCK_KINDS
def test_closed_socket_object(engine_maps, kind) -> None:
    m = engine_maps(kind, 2)
    s = socket.socket()
    s.close()
    raises(errno.EBADF, lambda: m.update(1, s), "fd -1", "closed", f"{kind} key 1")


@SOCK_KINDS
@pytest.mark.parametrize("bad", [True, 1.5, "3", None])
def test_non_fd_values_are_type_errors(engine_maps, kind, bad) -> None:
    m = engine_maps(kind, 2)
    with pytest.raises(TypeError):
        m.update(0, bad)


# ------------------------------------------------------------------ admission

ADMISSION: list[tuple[str, Callable[[Any], socket.socket], int, int]] = [
    # (name, make, errno without a parser, errno with a parser attached)
    ("tcp-unbound", lambda s: s.unbound_tcp(), errno.EOPNOTSUPP, errno.EOPNOTSUPP),
    ("tcp-bound", lambda s: s.bound_tcp(), errno.EOPNOTSUPP, errno.EOPNOTSUPP),
    ("tcp-listening", lambda s: s.listener(), 0, 0),
    ("tcp-established-client", lambda s: s.tcp_pair()[0], 0, 0),
    ("tcp-established-accepted", lambda s: s.tcp_pair()[1], 0, 0),
    ("tcp-close-wait", lambda s: s.close_wait(), errno.EOPNOTSUPP, errno.EOPNOTSUPP),
    ("tcp-fin-wait2", lambda s: s.fin_wait2(), errno.EOPNOTSUPP, errno.EOPNOTSUPP),
    ("tcp-refused", lambda s: s.refused_tcp(), errno.EOPNOTSUPP, errno.EOPNOTSUPP),
    ("tcp6-unbound", lambda s: s.unbound_tcp(socket.AF_INET6), errno.EOPNOTSUPP, errno.EOPNOTSUPP),
    ("tcp6-listening", lambda s: s.listener6(), 0, 0),
    ("tcp6-established", lambda s: s.tcp6_pair()[0], 0, 0),
    ("udp-unbound", lambda s: s.udp(), errno.EOPNOTSUPP, errno.EOPNOTSUPP),
    ("udp-bound", lambda s: s.udp(bind="127.0.0.1"), 0, errno.EOPNOTSUPP),
    ("udp-connected", lambda s: s.udp_connected(), 0, errno.EOPNOTSUPP),
    ("udp6-unbound", lambda s: s.udp(socket.AF_INET6), errno.EOPNOTSUPP, errno.EOPNOTSUPP),
    ("udp6-bound", lambda s: s.udp(socket.AF_INET6, "::1"), 0, errno.EOPNOTSUPP),
    ("unix-stream-pair", lambda s: s.unix_pair()[0], 0, errno.EOPNOTSUPP),
    ("unix-stream-connected", lambda s: s.unix_connected()[0], 0, errno.EOPNOTSUPP),
    ("unix-stream-accepted", lambda s: s.unix_connected()[1], 0, errno.EOPNOTSUPP),
    ("unix-stream-peer-closed", lambda s: s.unix_peer_closed(), 0, errno.EOPNOTSUPP),
    ("unix-stream-unconnected", lambda s: s.unix(), errno.EOPNOTSUPP, errno.EOPNOTSUPP),
    ("unix-stream-listening", lambda s: s.unix_listening(), errno.EOPNOTSUPP, errno.EOPNOTSUPP),
    ("unix-dgram-pair", lambda s: s.unix_pair(socket.SOCK_DGRAM)[0], 0, errno.EOPNOTSUPP),
    ("unix-dgram-unbound", lambda s: s.unix(socket.SOCK_DGRAM), 0, errno.EOPNOTSUPP),
    (
        "unix-seqpacket-pair",
        lambda s: s.unix_pair(socket.SOCK_SEQPACKET)[0],
        errno.EOPNOTSUPP,
        errno.EOPNOTSUPP,
    ),
    ("netlink", lambda s: s.netlink(), errno.EOPNOTSUPP, errno.EOPNOTSUPP),
]


@SOCK_KINDS
@pytest.mark.parametrize("parser", [False, True], ids=["plain", "parser"])
@pytest.mark.parametrize(
    ("make", "err", "err_parser"), [k[1:] for k in ADMISSION], ids=[k[0] for k in ADMISSION]
)
def test_which_sockets_can_be_inserted(
    engine_maps, socks, kind, parser, make, err, err_parser
) -> None:
    m = engine_maps.with_parser(kind) if parser else engine_maps(kind, 2)
    sock = make(socks)
    expected = err_parser if parser else err
    if expected:
        raises(expected, lambda: m.update(0, sock), "[EOPNOTSUPP]", f"insert fd {sock.fileno()}")
        raises(expected, lambda: m.update(0, sock.fileno()))  # a bare fd: the same answer
        assert 0 not in m
    else:
        m.update(0, sock)
        assert m.lookup(0) == so_cookie(sock)
        m.delete(0)


@SOCK_KINDS
def test_socket_reaching_close_wait_inside_the_map_stays(engine_maps, socks, kind) -> None:
    m, other = engine_maps(kind, 2), engine_maps(kind, 2)
    client, server = socks.tcp_pair()
    m.update(0, client)
    server.close()
    assert socks.wait_close_wait(client)
    assert m.lookup(0) == so_cookie(client)
    with pytest.raises(UnsupportedSocket):
        other.update(0, client)
    client.close()
    assert 0 not in m


# ------------------------------------------------------------------ close removal


def test_close_removes_from_every_key_and_map(engine_maps, socks) -> None:
    sm, sh = engine_maps("sockmap", 4), engine_maps("sockhash", 4)
    a, b = socks.tcp_pair()
    ca, cb = so_cookie(a), so_cookie(b)
    for k in (0, 1, 2):
        sm[k] = a
    sh[10] = a
    sh[20] = a
    sm[3] = b
    sh[30] = b
    a.close()
    for k in (0, 1, 2):
        with pytest.raises(KeyNotFound):
            sm.lookup(k)
    assert dict(sm.items()) == {3: cb}
    assert dict(sh.items()) == {30: cb}
    raises(errno.EINVAL, lambda: sm.delete(0))
    raises(errno.ENOENT, lambda: sh.delete(10))
    assert ca != cb


@pytest.mark.parametrize(
    "make",
    [
        lambda s: s.udp(bind="127.0.0.1"),
        lambda s: s.unix_pair()[0],
        lambda s: s.unix_pair(socket.SOCK_DGRAM)[0],
        lambda s: s.tcp_pair()[1],
    ],
    ids=["udp", "unix-stream", "unix-dgram", "tcp"],
)
@SOCK_KINDS
def test_close_removes_every_kind(engine_maps, socks, kind, make) -> None:
    m = engine_maps(kind, 2)
    s = make(socks)
    m.update(1, s)
    s.close()
    assert 1 not in m
    assert list(m.items()) == []


@SOCK_KINDS
def test_fd_number_reused_by_another_socket(engine_maps, socks, kind) -> None:
    m = engine_maps(kind, 2)
    a, _ = socks.tcp_pair()
    fd = a.fileno()
    m.update(0, fd)
    a.close()
    b = socks.udp(bind="127.0.0.1")
    if b.fileno() != fd:  # make the new socket take the old number
        os.dup2(b.fileno(), fd)
        b.close()
        b = socks.track(socket.socket(fileno=fd))
    assert 0 not in m
    m.update(0, b)
    assert m.lookup(0) == so_cookie(b)


@SOCK_KINDS
def test_a_dup_keeps_the_socket_in_the_map(engine_maps, socks, kind) -> None:
    m = engine_maps(kind, 2)
    a, _ = socks.tcp_pair()
    cookie = so_cookie(a)
    m.update(0, a)
    dup = socks.track(a.dup())
    a.close()
    assert m.lookup(0) == cookie
    dup.close()
    assert 0 not in m


def test_deleting_every_entry_of_a_shared_socket(engine_maps, socks) -> None:
    sm, sh = engine_maps("sockmap", 4), engine_maps("sockhash", 4)
    a, _ = socks.tcp_pair()
    sm[0] = a
    sm[1] = a
    sh[5] = a
    sm[1] = a
    for m, k in ((sm, 0), (sm, 1), (sh, 5)):
        m.delete(k)
    assert list(sm.items()) == []
    assert list(sh.items()) == []


# ------------------------------------------------------------------ read-only / write-only


@SOCK_KINDS
def test_rdonly_and_wronly_maps(engine_maps, socks, kind) -> None:
    a, _ = socks.tcp_pair()
    mtype = MapType.SOCKMAP if kind == "sockmap" else MapType.SOCKHASH
    ro = engine_maps.create(MapSpec(mtype, 4, 8, 2, F_RDONLY), kind)
    raises(errno.EPERM, lambda: ro.update(0, a))
    raises(errno.EPERM, lambda: ro.delete(0))
    raises(errno.ENOENT, lambda: ro.lookup(0))
    wo = engine_maps.create(MapSpec(mtype, 4, 8, 2, F_WRONLY), kind)
    wo.update(0, a)
    raises(errno.EPERM, lambda: wo.lookup(0))
    raises(errno.EPERM, lambda: wo.next_key(None))
    wo.delete(0)


def test_rdonly_value_maps(engine_maps) -> None:
    for kind in ("array", "hash"):
        ro = engine_maps(kind, 2, flags=F_RDONLY)
        raises(errno.EPERM, lambda ro=ro: ro.update(0, 1))
        wo = engine_maps(kind, 2, flags=F_WRONLY)
        wo.update(0, 1)
        raises(errno.EPERM, lambda wo=wo: wo.lookup(0))


# ------------------------------------------------------------------ ARRAY and HASH


def test_array(engine_maps) -> None:
    a = engine_maps("array", 3)
    assert list(a.items()) == [(k, bytes(8)) for k in range(3)]
    a.update(1, 5)
    a[2] = b"abcdefgh"
    assert a.lookup_int(1) == 5
    assert a[2] == b"abcdefgh"
    assert a.lookup_int(0) == 0
    assert list(a.keys()) == [0, 1, 2]
    assert 2 in a
    assert 3 not in a
    for bad in (b"abc", b"x" * 9, 2**64, -1):
        raises(errno.EINVAL, lambda bad=bad: a.update(0, bad), "array value")
    raises(errno.EEXIST, lambda: a.update(0, 1, UpdateFlag.NOEXIST), "update array key 0")
    a.update(0, 7, UpdateFlag.EXIST)
    assert a.lookup_int(0) == 7
    for flags in (3, 4, 5, 6):
        raises(errno.EINVAL, lambda flags=flags: a.update(0, 1, flags))
    assert (a.next_key(None), a.next_key(2), a.next_key(7)) == (0, None, 0)


def test_array_key_out_of_range(engine_maps) -> None:
    a = engine_maps("array", 3, value_size=4)
    raises(errno.E2BIG, lambda: a.update(3, 1), "update array key 3")
    raises(errno.E2BIG, lambda: a.update(3, 1, UpdateFlag.NOEXIST))
    raises(errno.ENOENT, lambda: a.lookup(3), "look up array key 3")
    raises(errno.EINVAL, lambda: a.delete(1), "delete array key 1")
    raises(errno.EINVAL, lambda: a.delete(9))
    a.update(2, 2**32 - 1)
    assert a.lookup(2) == b"\xff" * 4


def test_hash(engine_maps) -> None:
    h = engine_maps("hash", 2)
    raises(errno.ENOENT, lambda: h.lookup(1), "look up hash key 1")
    raises(errno.ENOENT, lambda: h.delete(1), "delete hash key 1")
    raises(errno.ENOENT, lambda: h.update(1, 1, UpdateFlag.EXIST), "update hash key 1")
    h[1] = 1
    h[2] = b"\x02" + bytes(7)
    with pytest.raises(KeyExists):
        h.update(2, 3, UpdateFlag.NOEXIST)
    raises(errno.E2BIG, lambda: h.update(3, 3), "update hash key 3")
    raises(errno.ENOENT, lambda: h.update(3, 3, UpdateFlag.EXIST))
    h[2] = 9
    assert {k: int.from_bytes(v, "little") for k, v in h.items()} == {1: 1, 2: 9}
    del h[1]
    assert list(h.keys()) == [2]
    assert h.get(1) is None
    for flags in (3, 4, 5):
        raises(errno.EINVAL, lambda flags=flags: h.update(2, 1, flags))


def test_hash_zero_seed_order(engine_maps) -> None:
    h = engine_maps("hash", 16, flags=F_ZERO_SEED)
    for k in (5, 9, 1, 77, 3, 1000, 12):
        h[k] = k
    assert list(h.keys()) == [1000, 77, 5, 1, 12, 9, 3]
    h[9] = 1  # a replace moves the key to the head of its bucket
    assert list(h.keys()) == [1000, 77, 5, 1, 9, 12, 3]
    assert h.next_key(4242) == 1000


# ------------------------------------------------------------------ life cycle


@pytest.mark.parametrize("kind", ["sockmap", "sockhash", "array", "hash"])
def test_closed_map_is_ebadf(engine_maps, socks, kind) -> None:
    sock, _ = socks.tcp_pair()
    with engine_maps.cls(kind).new(2) as m:
        assert not m.closed
    assert m.closed
    value = sock if kind.startswith("sock") else 1
    ops: list[Callable[[], object]] = [
        lambda: m.lookup(0),
        lambda: m.update(0, value),
        lambda: m.delete(0),
        lambda: m.next_key(None),
        lambda: list(m.keys()),
        m.info,
    ]
    for op in ops:
        raises(errno.EBADF, op, "closed")
    m.close()
    assert "closed" in repr(m)
    raises(errno.EBADF, lambda: m.lookup(1), "look up")


# ------------------------------------------------------------------ differential

KEY_SPACE = {"sockmap": 5, "sockhash": 6, "array": 5, "hash": 6}
FLAGS = st.sampled_from([0, 0, 0, 1, 2, 3, 4, 8])


def _outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        out = fn()
    except BpfError as e:
        return ("error", e.errno, type(e).__name__)
    except TypeError as e:
        return ("type error", str(e))
    if isinstance(out, list):
        return ("ok", tuple(out))
    return ("ok", out)


def _sock_pool(socks: Any, fds: list[int]) -> list[Any]:
    c, s = socks.tcp_pair()
    r, w = os.pipe()
    fds += [r, w]
    closed = socket.socket()
    closed.close()
    pool: list[Any] = [
        c,
        s,
        socks.listener(),
        socks.udp(bind="127.0.0.1"),
        socks.udp(),
        socks.unix_pair()[0],
        socks.unix_pair(socket.SOCK_SEQPACKET)[0],
        w,
        closed,
        c.fileno(),
        socks.close_wait(),
        socks.tcp6_pair()[1],
    ]
    return pool


OPS = st.one_of(
    st.tuples(st.just("update"), st.integers(0, 9), st.integers(0, 11), FLAGS),
    st.tuples(st.just("lookup"), st.integers(0, 9)),
    st.tuples(st.just("delete"), st.integers(0, 9)),
    st.tuples(st.just("next"), st.one_of(st.none(), st.integers(0, 9))),
    st.tuples(st.just("keys")),
    st.tuples(st.just("close"), st.integers(0, 5)),
)


def _run(m: Any, op: tuple[Any, ...], pool: list[Any], space: int, value_map: bool) -> Any:
    name = op[0]
    if name == "update":
        key = op[1] % space
        value = op[2] if value_map else pool[op[2]]
        return lambda: m.update(key, value, op[3])
    if name == "lookup":
        return lambda: m.lookup(op[1] % space)
    if name == "delete":
        return lambda: m.delete(op[1] % space)
    if name == "next":
        return lambda: m.next_key(None if op[1] is None else op[1] % space)
    return lambda: list(m.items())


@pytest.mark.parametrize("kind", ["sockmap", "sockhash", "array", "hash"])
@pytest.mark.parametrize("value_size", [8, 4])
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, max_size=30), max_entries=st.integers(1, 4))
def test_differential(
    kernel_and_userspace, socket_factory, kind, value_size, ops, max_entries
) -> None:
    """The same operations on a kernel map and a userspace map: the same answers, step by step."""
    k, u = kernel_and_userspace
    socks = socket_factory()
    fds: list[int] = []
    try:
        pool = _sock_pool(socks, fds)
        kw: dict[str, int] = {"value_size": value_size}
        if kind == "hash":
            kw["flags"] = F_ZERO_SEED  # the kernel's order is then reproducible
        km, um = k(kind, max_entries, **kw), u(kind, max_entries, **kw)
        space = KEY_SPACE[kind] if kind != "sockmap" else max_entries + 2
        value_map = kind in ("array", "hash")
        for step, op in enumerate(ops):
            if op[0] == "close":
                if not value_map and isinstance(pool[op[1]], socket.socket):
                    pool[op[1]].close()  # closes it for both maps at once
                continue
            kout = _outcome(_run(km, op, pool, space, value_map))
            uout = _outcome(_run(um, op, pool, space, value_map))
            assert kout == uout, f"step {step} {op}: kernel {kout} != userspace {uout}"
    finally:
        socks.close()
        for fd in fds:
            os.close(fd)
