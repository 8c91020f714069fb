"""``sockmap bench idle``, tiny: connections held open through each of our paths, split
over shard processes when one process could not hold their descriptors; a proxy that
fails ends the trial with its error instead of a wait."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchutil import kernel_paths, run_bench

from sockmap.bench.common import Proxy
from sockmap.bench.idle import _processes, _wait_ready, shards_for


def bench_processes() -> set[int]:
    """Processes a trial may start (shards, loads, proxies, socat's forks), wherever they
    are now: one left behind is re-parented, no longer among this process's children."""
    marks = (b"sockmap.bench.", b"socat", b"haproxy", b"fastend")
    found = set()
    for pid in _processes():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if pid != os.getpid() and any(m in cmd for m in marks):
            found.add(pid)
    return found


def test_shards_keep_every_process_under_the_descriptor_limit() -> None:
    # 20,000 descriptors a process: a kernel path needs 2 per connection, the userspace
    # engine 4 (its own duplicate of each socket), the load process 2.
    assert shards_for(["kernel"], 1000, hard=20_000) == 1
    assert shards_for(["direct"], 10_000, hard=20_000) == 2  # the load holds both ends
    assert shards_for(["raw", "kernel", "bounded"], 10_000, hard=20_000) == 2
    assert shards_for(["kernel", "userspace"], 10_000, hard=20_000) == 3
    assert shards_for(["splice"], 10_000, hard=20_000) == 4  # and a pipe per direction
    assert shards_for(["userspace"], 4_800, hard=20_000) == 1
    assert shards_for(["userspace"], 4_900, hard=20_000) == 2
    with pytest.raises(OSError, match="no room"):
        shards_for(["kernel"], 10, hard=100)


def test_idle_tiny_in_two_shards(tmp_path: Path) -> None:
    paths = ["direct", "userspace", "asyncio", "uvloop", "splice", "socat", "haproxy"]
    paths += kernel_paths(["raw", "kernel", "bounded"])
    before = bench_processes()
    data = run_bench(
        tmp_path,
        "idle",
        "--paths",
        ",".join(paths),
        "--conns",
        "60",
        "--repeat",
        "1",
        "--placement",
        "same",
    )
    assert {r["path"] for r in data["summary"]} == set(paths)
    # One shard is enough for 60 connections; every trial carried a byte per connection
    # (the shard checks it) and held its connections while memory was measured.
    assert all(t["conns"] == 60 and t["shards"] == 1 for t in data["trials"])
    # socat forks a process per connection: they are the proxy's, counted with it
    socat = next(t for t in data["trials"] if t["path"] == "socat")
    assert socat["rss_bytes"] > 60 * 100 * 1024, socat
    # and every process a trial started is gone (external proxies and forks included)
    assert bench_processes() <= before


def test_two_shards_split_the_connections(tmp_path: Path) -> None:
    from sockmap.bench.idle import run_idle  # noqa: PLC0415
    from sockmap.bench.stream import Placement  # noqa: PLC0415

    before = bench_processes()
    t = run_idle("asyncio", Placement("same", "0", "0"), 61, 60.0, shards=2)
    assert (t.conns, t.shards) == (61, 2)
    assert t.rss_bytes > 0  # both shard processes reported their growth
    assert bench_processes() <= before


def test_a_failed_proxy_ends_the_wait_with_its_error() -> None:
    # A load that never answers, and a proxy that has failed (as at the descriptor limit):
    # the wait ends with the proxy's error, not after the (long) timeout.
    load = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    proxy = Proxy(0, 0, lambda a, b: None)
    try:
        proxy.error = OSError(24, "Too many open files")
        with pytest.raises(RuntimeError, match=r"the proxy failed: OSError.*Too many open files"):
            _wait_ready(load, proxy, timeout=600)
    finally:
        proxy.close()
        load.kill()
        load.wait(5)
