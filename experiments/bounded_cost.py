"""Experiment: throughput and process CPU of BoundedSplicer against the raw KernelSplicer,
verdict-only mode, 512 MiB per run, consumer in the same process (not stalled), 5 runs each.

Run as root from the repository root:
    taskset -c 0,1 .venv/bin/python experiments/bounded_cost.py
"""
import socket, sys, time, threading, os, resource
sys.path.insert(0, "tests")
from netutil import Pairs
from sockmap.kernel.engine import KernelEngine
from sockmap.datapath.splice import KernelSplicer
from sockmap.datapath.bounded import BoundedSplicer
TOTAL = 512 << 20
blk = os.urandom(1 << 16)
def run(kind):
    eng = KernelEngine(); pairs = Pairs()
    client, A = pairs(); B, backend = pairs()
    sp = (BoundedSplicer(eng, 4, "verdict") if kind == "bounded" else KernelSplicer(eng, 4, "verdict"))
    sp.splice(A, B)
    def send():
        for _ in range(TOTAL // len(blk)): client.sendall(blk)
    t = threading.Thread(target=send)
    c0 = os.times(); t0 = time.perf_counter(); t.start()
    got = 0; buf = bytearray(1 << 20)
    while got < TOTAL: got += backend.recv_into(buf)
    dt = time.perf_counter() - t0; c1 = os.times(); t.join()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    r = (kind, TOTAL / dt / 2**20, cpu, getattr(sp, "holds", 0))
    sp.close(); eng.close(); pairs.close()
    return r
res = {"raw": [], "bounded": []}
for i in range(5):
    for k in ("raw", "bounded"):
        res[k].append(run(k))
for k, v in res.items():
    mb = sorted(x[1] for x in v); cpu = sorted(x[2] for x in v)
    print(k, "MiB/s median %.0f (min %.0f max %.0f)" % (mb[2], mb[0], mb[-1]), "process CPU s median %.2f" % cpu[2], "holds", [x[3] for x in v])
