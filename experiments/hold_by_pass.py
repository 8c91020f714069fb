"""Experiment: bounded kernel redirect by holding the source with SK_PASS (verdict-only mode).

One direction, client -> A ==redirect==> B -> consumer, with a consumer that stalls
at random. The verdict is ``programs.bounded_redirect``: per-key ``stats``
(held, passed, inflow) written by the verdict, per-key ``control`` (release point
+ 1, target bytes written as last published by user space, paused flag). It redirects while the target's redirect queue
(redirected - published written) stays under QBOUND; past it, it marks the source
held and passes (SK_PASS) this and every later message, so TCP flow control slows
the sender. User space, once the queue is empty, is the target's only writer: it
reads the held bytes (never more than SIOCINQ, i.e. the psock's queue -- a larger
recv falls back to the raw TCP queue and the same bytes reach the verdict twice)
and writes them into B, then publishes "release at byte N"; the verdict resumes
redirecting only when what it has passed equals N, so no passed byte is overtaken.

Run as root from the repository root:
    .venv/bin/python experiments/hold_by_pass.py [MiB=64] [QBOUND KiB=1024] [stall probability per read=0.02]
Prints bytes received, hash check, how the bytes went, and the peak held bytes
(redirect queue + target SIOCOUTQ + source receive queue + passed-not-forwarded).
"""
import socket, sys, time, threading, hashlib, random, struct, errno
sys.path.insert(0, "tests")
from netutil import Pairs, random_chunks
from sockmap.kernel.engine import KernelEngine
from sockmap import programs
from sockmap.programs.bounded import CONTROL, ROUTE, STATS
from sockmap.datapath.splice import cookie_of
from sockmap.datapath.tcp import tcp_counters, outq, inq
TOTAL = int(sys.argv[1]) << 20 if len(sys.argv) > 1 else 64 << 20
HIGH, LOW = 4 << 20, 1 << 20
QBOUND = int(sys.argv[2]) << 10 if len(sys.argv) > 2 else 1 << 20
STALL_P = float(sys.argv[3]) if len(sys.argv) > 3 else 0.02
eng = KernelEngine(); pairs = Pairs()
client, A = pairs(); consumer, B = pairs()
A.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 512 << 10); B.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
sm = eng.sockmap(2)
routes = eng.hash(4, key_size=8, value_size=ROUTE.size)
stats = eng.array(2, value_size=STATS.size)      # per key: held, passed, inflow
control = eng.array(2, value_size=CONTROL.size)  # per key: release, written, paused
v = programs.bounded_redirect(sm, routes, stats, control, bound=QBOUND)
routes[cookie_of(A)] = ROUTE.pack(0, 1)
eng.attach(sm, verdict=v)
sm[1] = B; sm[0] = A
def st():
    held, passed, _ = STATS.unpack(stats.lookup(0))
    return held, passed, STATS.unpack(stats.lookup(1))[2]
ctl_written = 0; ctl_paused = 0
def publish_target():
    control[1] = CONTROL.pack(0, ctl_written, ctl_paused)
import os
_data = os.urandom(TOTAL); _rng = random.Random(1); chunks = []; _p = 0
while _p < TOTAL:
    _n = _rng.randint(1, 65536); chunks.append(_data[_p:_p+_n]); _p += _n
want = hashlib.sha256(b"".join(chunks)).hexdigest()
def send():
    for c in chunks: client.sendall(c)
    client.shutdown(socket.SHUT_WR)
res = {}
def consume():
    rng = random.Random(2); h = hashlib.sha256(); got = 0; buf = bytearray(1 << 20)
    consumer.settimeout(20)
    while got < TOTAL:
        if rng.random() < STALL_P: time.sleep(rng.uniform(0.2, 1.0))
        n = consumer.recv_into(buf)
        if not n: break
        h.update(memoryview(buf)[:n]); got += n
    res["got"] = got; res["hash"] = h.hexdigest()
ts = [threading.Thread(target=send), threading.Thread(target=consume)]
for t in ts: t.start()
A.setblocking(False); B.setblocking(False)
user_written = 0; pend = b""; paused = False; peak = 0; holds = 0; releasing = False; attempts = 0
t0 = time.time()
while ts[1].is_alive() and time.time() - t0 < 120:
    state, passed, redir = st()
    bw = tcp_counters(B).written
    qlen = redir - (bw - user_written)          # in B's redirect queue
    ctl_written = bw - user_written; publish_target()
    held = qlen + len(pend) + (passed - user_written - len(pend)) + outq(B)
    peak = max(peak, qlen + outq(B) + tcp_counters(A).bytes_received - tcp_counters(A).consumed + (passed - user_written))
    if not paused and qlen + outq(B) > HIGH:
        ctl_paused = 1; publish_target(); paused = True; holds += 1
    if state == 1 and qlen <= 0:
        # we are B's only writer: forward passed bytes
        while True:
            if not pend:
                k = inq(A)   # the psock's queue only: never let recv fall back to the raw TCP queue
                if k <= 0: break
                try: pend = A.recv(min(k, 1 << 18))
                except BlockingIOError: break
                if not pend: break
            try: n = B.send(pend)
            except BlockingIOError: break
            user_written += n; pend = pend[n:]
        if paused and outq(B) < LOW and not pend:
            ctl_paused = 0; publish_target(); paused = False
        if not paused and not pend:
            control[0] = CONTROL.pack(user_written + 1, 0, 0); attempts += 1
    elif state == 0 and not paused and CONTROL.unpack(control.lookup(0))[0]:
        control[0] = CONTROL.pack(0, 0, 0)
    if paused and state == 0 and qlen + outq(B) < LOW:
        ctl_paused = 0; publish_target(); paused = False
    time.sleep(0.001)
for t in ts: t.join(5)
state, passed, redir = st()
print("got", res.get("got"), "of", TOTAL, "hash ok", res.get("hash") == want, "holds", holds, "attempts", attempts,
      "passed", passed, "redirected", redir, "user_written", user_written, "peak MiB %.1f" % (peak / 2**20))
