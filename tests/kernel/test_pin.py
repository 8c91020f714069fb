"""Pinning maps and programs on bpffs, seen from bpftool as well as from sockmap."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from netutil import wait_until
from sockmap import programs
from sockmap.abi import MapType, ProgType
from sockmap.errors import BpfError, KeyExists, KeyNotFound, PermissionDenied
from sockmap.kernel.features import capabilities
from sockmap.kernel.info import iter_prog_ids
from sockmap.kernel.maps import HashMap, SockHash, SockMap
from sockmap.kernel.pin import (
    DEFAULT_BPFFS,
    bpffs_mounted,
    ensure_bpffs,
    open_pinned,
    pin,
    unpin,
)
from sockmap.kernel.programs import Prog, load_program

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf")]

MNT_DETACH = 2


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    """/sys/fs/bpf/sockmap-test-<pid>/, removed with everything pinned in it at teardown."""
    ensure_bpffs()
    d = DEFAULT_BPFFS / f"sockmap-test-{os.getpid()}"
    yield d
    if d.exists():
        shutil.rmtree(d)


def test_ensure_bpffs_finds_the_mounted_one() -> None:
    assert ensure_bpffs() == DEFAULT_BPFFS
    assert bpffs_mounted(DEFAULT_BPFFS)
    assert ensure_bpffs() == DEFAULT_BPFFS  # idempotent
    assert not bpffs_mounted(Path("/tmp"))


def test_ensure_bpffs_mounts_one_where_there_is_none(tmp_path: Path) -> None:
    target = tmp_path / "bpffs"
    assert not bpffs_mounted(target)
    if not capabilities()["CAP_SYS_ADMIN"]:
        with pytest.raises(PermissionDenied) as exc:
            ensure_bpffs(target)
        assert "mount -t bpf" in str(exc.value)
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    try:
        assert ensure_bpffs(target) == target
        assert bpffs_mounted(target)
        with HashMap.new(1) as m:
            p = pin(m, target / "m")
            assert p.exists()
            unpin(p)
    finally:
        if bpffs_mounted(target):
            assert libc.umount2(str(target).encode(), MNT_DETACH) == 0, os.strerror(
                ctypes.get_errno()
            )
    assert not bpffs_mounted(target)


@pytest.mark.parametrize("cls", [SockMap, SockHash], ids=["sockmap", "sockhash"])
def test_pin_map_seen_by_bpftool_and_reopened(pin_dir: Path, bpftool, cls) -> None:
    path = pin_dir / "sub" / "the_map"
    with cls.new(3, name="pinned_map") as m:
        mid = m.info().id
        assert pin(m, path) == path
        shown = bpftool("map", "show", "pinned", str(path))
        assert shown["id"] == mid
        assert shown["type"] == m.spec.type.name.lower()
        assert shown["name"] == "pinned_map"
        assert (shown["bytes_key"], shown["bytes_value"], shown["max_entries"]) == (4, 8, 3)
    # our fd is closed; the pin keeps the map alive and open_pinned finds it
    again = open_pinned(path)
    try:
        assert type(again) is cls
        assert again.info().id == mid
        assert again.spec.type == cls.map_type
        assert again.spec.max_entries == 3
        assert again.name == "pinned_map"
    finally:
        again.close()
    unpin(path)
    assert not path.exists()
    with pytest.raises(KeyNotFound) as exc:
        open_pinned(path)
    assert exc.value.errno == errno.ENOENT
    assert f"open pinned object {path}" in str(exc.value)


def test_pin_program_seen_by_bpftool_and_reopened(pin_dir: Path, bpftool) -> None:
    path = pin_dir / "the_prog"
    prog = load_program(programs.pass_(), ProgType.SK_SKB, name="pinned_prog")
    pid = prog.info().id
    try:
        pin(prog, path)
    finally:
        prog.close()
    assert pid in set(iter_prog_ids())  # still loaded: the pin holds it
    shown = bpftool("prog", "show", "pinned", str(path))
    assert shown["id"] == pid
    assert shown["type"] == "sk_skb"
    assert shown["name"] == "pinned_prog"
    again = open_pinned(path)
    try:
        assert isinstance(again, Prog)
        assert again.info().id == pid
        assert again.prog_type == ProgType.SK_SKB
        assert again.name == "pinned_prog"
        assert again.insn_count == 2
    finally:
        again.close()
    unpin(path)
    assert not path.exists()
    assert wait_until(lambda: pid not in set(iter_prog_ids())), "unpinned program still loaded"


def test_pin_twice_is_key_exists(pin_dir: Path) -> None:
    with HashMap.new(1) as m:
        path = pin(m, pin_dir / "twice")
        with pytest.raises(KeyExists) as exc:
            pin(m, path)
        assert exc.value.errno == errno.EEXIST
        assert f"at {path}" in str(exc.value)
        unpin(path)


def test_unpin_missing_path(pin_dir: Path) -> None:
    missing = pin_dir / "nothing-here"
    with pytest.raises(KeyNotFound) as exc:
        unpin(missing)
    assert exc.value.errno == errno.ENOENT
    assert isinstance(exc.value, KeyError)
    assert f"unpin {missing}" in str(exc.value)
    assert "nothing is pinned there" in str(exc.value)


def test_pin_outside_bpffs_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "not-bpffs" / "m"
    with HashMap.new(1) as m:
        with pytest.raises(BpfError) as exc:
            pin(m, target)
    e = exc.value
    assert e.errno == errno.EPERM  # what the kernel itself answers for a non-bpffs path
    text = str(e)
    assert str(target) in text
    assert "not on a bpf filesystem" in text
    assert str(DEFAULT_BPFFS) in text
    assert "ensure_bpffs" in text
    assert not target.parent.exists()  # refused before creating directories


def test_pin_outside_bpffs_is_permission_denied(tmp_path: Path) -> None:
    with HashMap.new(1) as m:
        with pytest.raises(PermissionDenied):
            pin(m, tmp_path / "m")


def test_open_pinned_of_a_plain_file_is_refused(tmp_path: Path) -> None:
    # Not a bpf object: the kernel answers EACCES (a PermissionDenied), not EINVAL.
    f = tmp_path / "plain"
    f.write_text("x")
    with pytest.raises(PermissionDenied) as exc:
        open_pinned(f)
    assert exc.value.errno == errno.EACCES
    assert f"open pinned object {f}" in str(exc.value)


def test_map_type_survives_the_round_trip(pin_dir: Path) -> None:
    with HashMap.new(4, key_size=8, value_size=16, name="kv") as m:
        m[1] = b"x" * 16
        path = pin(m, pin_dir / "kv")
    again = open_pinned(path)
    try:
        assert isinstance(again, HashMap)
        assert again.spec.type == MapType.HASH
        assert (again.spec.key_size, again.spec.value_size) == (8, 16)
        assert again[1] == b"x" * 16  # the data lived on in the pinned map
    finally:
        again.close()
        unpin(path)
