"""Userspace maps without a kernel: the engine hooks, the VM seam, hashing and liveness.

Kernel-identical results are checked in tests/conformance; these need no bpf().
"""

from __future__ import annotations

import errno
import gc
import os
import socket
from collections.abc import Iterator

import pytest

from sockmap.abi import MapType, UpdateFlag
from sockmap.errors import BpfError, KeyNotFound, UnsupportedSocket
from sockmap.kernel.maps import MapSpec
from sockmap.userspace import admission
from sockmap.userspace import maps as um
from sockmap.vm.api import VmMap


class Socks:
    def __init__(self) -> None:
        self.all: list[socket.socket] = []
        self.listener = self.track(socket.create_server(("127.0.0.1", 0)))

    def track(self, s: socket.socket) -> socket.socket:
        self.all.append(s)
        return s

    def pair(self) -> tuple[socket.socket, socket.socket]:
        c = self.track(socket.create_connection(self.listener.getsockname()))
        a, _ = self.listener.accept()
        return c, self.track(a)

    def close(self) -> None:
        for s in self.all:
            s.close()


@pytest.fixture
def socks() -> Iterator[Socks]:
    s = Socks()
    yield s
    s.close()


def cookie(s: socket.socket) -> int:
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little")


# ------------------------------------------------------------------ jhash


def test_jhash_known_values() -> None:
    # computed by the kernel's lookup3 (jhash.h) for these inputs
    assert um.jhash(b"") == 0xDEADBEEF
    assert um.jhash2(b"") == 0xDEADBEEF
    # jhash and jhash2 agree on whole words
    for key in (b"\x01\x00\x00\x00", bytes(range(12)), bytes(range(16)), bytes(range(24))):
        assert um.jhash(key, 7) == um.jhash2(key, 7)
    assert um.jhash(b"abc") != um.jhash(b"abd")


def test_sockhash_order_is_bucket_order(socks: Socks) -> None:
    m = um.SockHash.new(8)
    a, _ = socks.pair()
    for k in (9, 11, 12, 1, 3):
        m[k] = a
    assert list(m.keys()) == [1, 12, 11, 9, 3]
    m[9] = a
    assert list(m.keys()) == [1, 9, 12, 11, 3]


# ------------------------------------------------------------------ engine hooks


def test_callbacks_insert_replace_delete_close(socks: Socks) -> None:
    m = um.SockMap.new(4)
    events: list[tuple[str, bytes, int]] = []
    m.on_insert.append(lambda mm, k, ref: events.append(("in", k, ref.socket().fileno())))
    m.on_remove.append(lambda mm, k, ref: events.append(("out", k, ref.socket().fileno())))
    a, b = socks.pair()
    m[0] = a
    m[0] = b  # replace: the new one joins before the old one leaves
    m[1] = a
    del m[0]
    k0, k1 = bytes(4), (1).to_bytes(4, "little")
    assert events == [
        ("in", k0, a.fileno()),
        ("in", k0, b.fileno()),
        ("out", k0, a.fileno()),
        ("in", k1, a.fileno()),
        ("out", k0, b.fileno()),
    ]
    events.clear()
    m.close()
    assert events == [("out", k1, a.fileno())]


def test_callbacks_get_the_callers_socket_object(socks: Socks) -> None:
    m = um.SockHash.new(4)
    got: list[socket.socket] = []
    m.on_insert.append(lambda mm, k, ref: got.append(ref.socket()))
    a, _ = socks.pair()
    m[1] = a
    m[2] = a.fileno()  # the same socket by fd: still the caller's object
    assert got == [a, a]
    assert m.lookup_socket(1) is a
    assert m.lookup_socket((2).to_bytes(4, "little")) is a


def test_before_insert_can_refuse(socks: Socks) -> None:
    m = um.SockMap.new(2)

    def refuse(mm: um.SockMap, key: bytes, ref: um.SockRef) -> None:
        raise BpfError(errno.EBUSY, "busy")

    m.before_insert.append(refuse)
    a, _ = socks.pair()
    with pytest.raises(BpfError) as exc:
        m[0] = a
    assert exc.value.errno == errno.EBUSY
    assert 0 not in m
    # the kernel's order: E2BIG and EOPNOTSUPP come before the link-time hook
    with pytest.raises(BpfError) as exc:
        m[5] = a
    assert exc.value.errno == errno.E2BIG


def test_closed_socket_leaves_lazily_with_on_remove(socks: Socks) -> None:
    m = um.SockHash.new(4)
    gone: list[bytes] = []
    m.on_remove.append(lambda mm, k, s: gone.append(k))
    a, b = socks.pair()
    m[1] = a
    m[2] = a
    m[3] = b
    a.close()
    assert m.lookup_socket(1) is None  # the redirect path never fires callbacks
    assert gone == []
    assert sorted(m.keys()) == [3]
    assert sorted(gone) == [(1).to_bytes(4, "little"), (2).to_bytes(4, "little")]


def test_dropped_socket_object_leaves(socks: Socks) -> None:
    m = um.SockMap.new(2)
    c, _ = socks.pair()
    s = socket.socket(fileno=os.dup(c.fileno()))
    m[0] = s
    del s
    gc.collect()  # the object closes its fd: the socket is still open through c
    assert m.get(0) == cookie(c)
    c.close()
    assert m.get(0) is None


def test_fd_inserted_socket_is_borrowed_not_owned(socks: Socks) -> None:
    m = um.SockMap.new(2)
    a, b = socks.pair()
    m[0] = a.fileno()
    s = m.lookup_socket(0)
    assert s is not None
    assert s.fileno() == a.fileno()
    assert s is not a
    s.close()  # closing the borrowed object leaves the application's fd open
    del s
    gc.collect()
    a.sendall(b"x")
    assert b.recv(1) == b"x"
    assert m.get(0) == cookie(a)


def test_sockets_and_remove_socket(socks: Socks) -> None:
    m, h = um.SockMap.new(4), um.SockHash.new(4)
    a, b = socks.pair()
    m[0], m[2], h[7] = a, b, a
    assert [(k, s.fileno()) for k, s in m.sockets()] == [
        (bytes(4), a.fileno()),
        ((2).to_bytes(4, "little"), b.fileno()),
    ]
    assert m.remove_socket(b) == 1
    assert 2 not in m
    assert um.remove_socket(a) == 2
    assert list(m.sockets()) == []
    assert list(h.keys()) == []


def test_parser_attached_refuses_non_tcp(socks: Socks) -> None:
    m = um.SockMap.new(2)
    m.parser_attached = True
    u = socks.track(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    u.bind(("127.0.0.1", 0))
    with pytest.raises(UnsupportedSocket):
        m[0] = u
    m.parser_attached = False
    m[0] = u
    assert m[0] == cookie(u)


# ------------------------------------------------------------------ admission


def test_check_insertable(socks: Socks) -> None:
    a, _ = socks.pair()
    assert admission.check_insertable(a, parser_attached=True, what="x") == a.fileno()
    assert admission.check_insertable(a.fileno(), parser_attached=False, what="x") == a.fileno()
    x, y = socket.socketpair()
    socks.track(x)
    socks.track(y)
    assert admission.check_insertable(x, parser_attached=False, what="x") == x.fileno()
    with pytest.raises(UnsupportedSocket) as exc:
        admission.check_insertable(x, parser_attached=True, what="insert fd 9 into it")
    assert "insert fd 9 into it" in str(exc.value)
    r, w = os.pipe()
    try:
        with pytest.raises(BpfError) as e2:
            admission.check_insertable(r, parser_attached=False, what="x")
        assert e2.value.errno == errno.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(BpfError) as e3:
        admission.check_insertable(r, parser_attached=False, what="x")
    assert e3.value.errno == errno.EBADF
    with pytest.raises(BpfError) as e4:
        admission.check_insertable(2**31, parser_attached=False, what="x")
    assert e4.value.errno == errno.EINVAL
    with pytest.raises(TypeError):
        admission.check_insertable("3", parser_attached=False, what="x")


# ------------------------------------------------------------------ the VM seam


def test_value_maps_satisfy_vm_map() -> None:
    maps: list[VmMap] = [um.ArrayMap.new(2), um.HashMap.new(2), um.SockMap.new(2)]
    assert [m.map_type for m in maps] == [MapType.ARRAY, MapType.HASH, MapType.SOCKMAP]
    assert (maps[0].key_size, maps[0].value_size, maps[0].max_entries) == (4, 8, 2)


def test_array_vm_storage_is_live() -> None:
    a = um.ArrayMap.new(2, value_size=4)
    k1 = (1).to_bytes(4, "little")
    slot = a.vm_lookup(k1)
    assert slot == bytearray(4)
    assert slot is not None
    slot[:] = b"\x07\x00\x00\x00"
    assert a.lookup_int(1) == 7
    a.update(1, 9)
    assert slot == b"\x09\x00\x00\x00"  # same storage
    assert a.vm_lookup((2).to_bytes(4, "little")) is None
    assert a.vm_update(k1, b"\x01\x00\x00\x00", 0) == 0
    assert a.vm_update(k1, b"\x01\x00\x00\x00", UpdateFlag.NOEXIST) == -errno.EEXIST
    assert a.vm_update((5).to_bytes(4, "little"), bytes(4), 0) == -errno.E2BIG
    assert a.vm_update(k1, bytes(4), UpdateFlag.F_LOCK) == -errno.EINVAL
    assert a.vm_update(k1, bytes(4), 3) == -errno.EINVAL
    assert a.vm_delete(k1) == -errno.EINVAL


def test_hash_vm_ops() -> None:
    h = um.HashMap.new(1, value_size=2)
    k = b"\x01\x00\x00\x00"
    assert h.vm_lookup(k) is None
    assert h.vm_update(k, b"ab", UpdateFlag.EXIST) == -errno.ENOENT
    assert h.vm_update(k, b"ab", 0) == 0
    v = h.vm_lookup(k)
    assert v == b"ab"
    assert v is not None
    v[0] = ord("z")
    assert h.lookup(1) == b"zb"
    assert h.vm_update(b"\x02\x00\x00\x00", b"cd", 0) == -errno.E2BIG
    assert h.vm_delete(k) == 0
    assert h.vm_delete(k) == -errno.ENOENT


def test_sock_map_vm_ops(socks: Socks) -> None:
    m, h = um.SockMap.new(2), um.SockHash.new(2)
    a, _ = socks.pair()
    m[0] = a
    h[0] = a
    assert m.vm_lookup(bytes(4)) is None
    assert m.vm_update(bytes(4), bytes(8), 0) == -errno.EOPNOTSUPP
    assert m.vm_delete((1).to_bytes(4, "little")) == -errno.EINVAL
    assert m.vm_delete(bytes(4)) == 0
    assert h.vm_delete((1).to_bytes(4, "little")) == -errno.ENOENT
    assert h.vm_delete(bytes(4)) == 0


# ------------------------------------------------------------------ life cycle


def test_no_fd_and_info() -> None:
    m = um.SockMap.new(2, name="x")
    assert not hasattr(m, "fd")
    assert not hasattr(m, "fileno")
    i1, i2 = m.info(), um.ArrayMap.new(1).info()
    assert i1.id != i2.id
    assert i1.name == "x"
    with m:
        pass
    assert m.closed
    with pytest.raises(BpfError) as exc:
        m.info()
    assert exc.value.errno == errno.EBADF
    assert um.SockMap.lookup_socket(m, 0) is None


def test_map_create_dispatches_by_type() -> None:
    assert type(um.Map.create(MapSpec(MapType.HASH, 4, 4, 1))) is um.HashMap
    with pytest.raises(BpfError) as exc:
        um.Map.create(MapSpec(MapType.LRU_HASH, 4, 4, 1))
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(TypeError):
        um.ArrayMap.create(MapSpec(MapType.HASH, 4, 4, 1))


def test_lookup_errors_are_typed() -> None:
    m = um.SockHash.new(2)
    with pytest.raises(KeyNotFound):
        m.lookup(3)
    assert m.next_key(None) is None
