"""Shared fixtures for the kernel tests: bpf() access, loopback sockets, a program-leak check.

Kernel tests run for real. They skip only when bpf() itself is refused, and then say why
(the ``bpf`` fixture). Every socket made through these fixtures is closed at teardown.
At the end of the session, the leak check fails if a BPF program that this run loaded
is still in the kernel without being pinned.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sockets import Sockets
from sockmap.abi import AttachType, MapType
from sockmap.errors import BpfError
from sockmap.kernel.attach import query
from sockmap.kernel.engine import KernelEngine
from sockmap.kernel.features import bpf_access
from sockmap.kernel.info import iter_prog_ids, map_fd_by_id
from sockmap.kernel.maps import open_map_fd

BPFTOOL_HINT = "bpftool is missing: run scripts/test, which installs the Debian package bpftool"


def bpftool_path() -> str | None:
    """Where bpftool is (it lives in /usr/sbin, which a user's PATH may lack)."""
    return shutil.which("bpftool") or shutil.which("bpftool", path="/usr/sbin:/sbin")


def bpftool_json(*args: str) -> object:
    """Run ``bpftool --json ARGS`` and parse what it prints; fail the test if bpftool is absent."""
    tool = bpftool_path()
    if tool is None:
        pytest.fail(BPFTOOL_HINT)
    out = subprocess.run(
        [tool, "--json", *args], capture_output=True, text=True, timeout=30, check=False
    )
    if out.returncode != 0:
        raise AssertionError(f"bpftool {' '.join(args)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


@pytest.fixture
def bpftool() -> Callable[..., dict[str, object]]:
    """``bpftool(*args)`` -> the one JSON object it prints; fails (not skips) without bpftool."""
    if bpftool_path() is None:
        pytest.fail(BPFTOOL_HINT)

    def show(*args: str) -> dict[str, object]:
        out = bpftool_json(*args)
        assert isinstance(out, dict), out
        return out

    return show


# ------------------------------------------------------------------ bpf() access


@pytest.fixture
def bpf() -> None:
    """Skip (saying why) when this process may not call bpf(); otherwise do nothing."""
    permitted, why = bpf_access()
    if not permitted:
        pytest.skip(f"bpf() refused: {why}")


# ------------------------------------------------------------------ program leak check


def _bpf_fds_of_other_processes() -> Iterator[dict[str, str]]:
    """The fdinfo (as a dict) of every bpf map or program fd another process holds."""
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if fd.readlink() not in _BPF_FD_LINKS:
                        continue
                    text = (proc / "fdinfo" / fd.name).read_text()
                    yield {
                        k.strip(): v.strip()
                        for k, _, v in (line.partition(":") for line in text.splitlines())
                    }


_BPF_FD_LINKS = {Path("anon_inode:bpf-prog"), Path("anon_inode:bpf-map")}
_SOCK_MAP_TYPES = {str(int(MapType.SOCKMAP)), str(int(MapType.SOCKHASH))}
_SOCK_ATTACH = (
    AttachType.SK_SKB_STREAM_PARSER,
    AttachType.SK_SKB_STREAM_VERDICT,
    AttachType.SK_SKB_VERDICT,
    AttachType.SK_MSG_VERDICT,
)


def _held_by_other_processes() -> set[int]:
    """Ids of programs another process holds: by a program fd, or attached to a socket map
    it holds. Someone else running tests at the same time is not a leak of ours."""
    held: set[int] = set()
    for info in _bpf_fds_of_other_processes():
        if "prog_id" in info:
            held.add(int(info["prog_id"]))
        elif info.get("map_type") in _SOCK_MAP_TYPES and "map_id" in info:
            with contextlib.suppress(BpfError):
                with open_map_fd(map_fd_by_id(int(info["map_id"]))) as m:
                    for kind in _SOCK_ATTACH:
                        with contextlib.suppress(BpfError):  # EBUSY for the other verdict kind
                            held.update(query(m, kind))
    return held


def _unpinned_new_programs(before: set[int]) -> dict[int, str]:
    """Programs loaded now that were not loaded at session start and are not pinned."""
    now = set(iter_prog_ids())
    new = now - before
    if not new:
        return {}
    if bpftool_path() is None:
        return dict.fromkeys(new, f"(unknown name; {BPFTOOL_HINT} to tell pinned ones apart)")
    listing = bpftool_json("--bpffs", "prog", "show")
    assert isinstance(listing, list)
    names = {int(p["id"]): str(p.get("name", "")) for p in listing if not p.get("pinned")}
    return {pid: names[pid] for pid in sorted(new) if pid in names}


@pytest.fixture(scope="session", autouse=True)
def no_program_leaks() -> Iterator[None]:
    """Fail at session end if a program this run loaded is still loaded and not pinned.

    Programs that existed before the session are ignored, and so are programs that
    another process holds (by fd, or attached to a socket map it holds). Freeing is
    partly asynchronous (a map frees the programs attached to it from a work queue),
    so the check waits a bounded while for the kernel to finish before it decides.
    """
    try:
        before: set[int] | None = set(iter_prog_ids())
    except BpfError:
        before = None  # bpf() refused: nothing can be loaded, nothing to check
    yield
    if before is None:
        return
    gc.collect()
    deadline = time.monotonic() + 10.0
    while True:
        leaks = _unpinned_new_programs(before)
        if leaks:
            others = _held_by_other_processes()
            leaks = {k: v for k, v in leaks.items() if k not in others}
        if not leaks or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
        gc.collect()
    if leaks:
        listed = ", ".join(f"id {k} {v!r}" for k, v in leaks.items())
        pytest.fail(
            f"BPF programs loaded by this test run are still loaded and not pinned: {listed}. "
            "Some test did not close a Prog, a map with programs attached, or an engine."
        )


# ------------------------------------------------------------------ sockets


@pytest.fixture
def socks() -> Iterator[Sockets]:
    """The socket factory; every socket it made is closed at teardown."""
    s = Sockets()
    yield s
    s.close()


@pytest.fixture
def listener(socks: Sockets) -> socket.socket:
    """A listening loopback TCP socket, closed at teardown."""
    return socks.listener()


@pytest.fixture
def tcp_pair(socks: Sockets) -> Callable[[], tuple[socket.socket, socket.socket]]:
    """Factory: each call returns a new connected (client, accepted) loopback pair."""
    return socks.tcp_pair


@pytest.fixture
def engine(bpf: None) -> Iterator[KernelEngine]:
    """A kernel engine that releases all it made at teardown."""
    with KernelEngine() as eng:
        yield eng
