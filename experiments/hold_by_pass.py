"""Experiment: bounded kernel redirect by holding the source with SK_PASS (verdict-only mode).

One direction, client -> A ==redirect==> B -> consumer, with a consumer that stalls
at random. The verdict keeps per-source state in ``stats`` (state, passed, redirected)
and reads ``ctl`` (release point + 1, paused flag, target bytes written as last
published by user space). It redirects while the target's redirect queue
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
from sockmap import asm
from sockmap.abi import SK_BUFF, SkAction, Helper
from sockmap.asm import R0,R1,R2,R3,R4,R6,R7,R8,R9,R10
from sockmap.datapath.tcp import tcp_counters, outq, inq
TOTAL = int(sys.argv[1]) << 20 if len(sys.argv) > 1 else 64 << 20
HIGH, LOW = 4 << 20, 1 << 20
QBOUND = int(sys.argv[2]) << 10 if len(sys.argv) > 2 else 1 << 20
STALL_P = float(sys.argv[3]) if len(sys.argv) > 3 else 0.02
eng = KernelEngine(); pairs = Pairs()
client, A = pairs(); consumer, B = pairs()
A.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 512 << 10); B.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
sm = eng.sockmap(2)
stats = eng.array(1, value_size=24)   # state, passed, redirected
ctl = eng.array(3, value_size=8)      # [0] release expected+1 for source 0, [1] paused flag for target 1
v = asm.Program([
  asm.mov(R6, R1),
  asm.ldx(asm.W, R7, R1, SK_BUFF.offset("len")),
  asm.st(asm.W, R10, -4, 0),
  asm.ld_map_fd(R1, stats), asm.mov(R2, R10), asm.add(R2, -4), asm.call(Helper.map_lookup_elem),
  asm.jeq(R0, 0, "drop"), asm.mov(R8, R0),
  asm.ld_map_fd(R1, ctl), asm.mov(R2, R10), asm.add(R2, -4), asm.call(Helper.map_lookup_elem),
  asm.jeq(R0, 0, "drop"), asm.mov(R9, R0),   # r9 = &ctl[0]
  asm.ldx(asm.DW, R1, R8, 0),
  asm.jeq(R1, 0, "open"),
  # held: release only when passed + 1 == ctl[0]
  asm.ldx(asm.DW, R2, R9, 0), asm.jeq(R2, 0, "pass"),
  asm.ldx(asm.DW, R3, R8, 8), asm.add(R3, 1), asm.jne(R2, R3, "pass"),
  asm.st(asm.DW, R8, 0, 0),
  asm.label("open"),
  asm.st(asm.W, R10, -4, 1),
  asm.ld_map_fd(R1, ctl), asm.mov(R2, R10), asm.add(R2, -4), asm.call(Helper.map_lookup_elem),
  asm.jeq(R0, 0, "drop"),
  asm.ldx(asm.DW, R1, R0, 0), asm.jeq(R1, 0, "bound"),
  asm.st(asm.DW, R8, 0, 1), asm.ja("pass"),
  asm.label("bound"),
  asm.st(asm.W, R10, -4, 2),
  asm.ld_map_fd(R1, ctl), asm.mov(R2, R10), asm.add(R2, -4), asm.call(Helper.map_lookup_elem),
  asm.jeq(R0, 0, "drop"),
  asm.ldx(asm.DW, R1, R0, 0),          # target bytes written by the kernel (published, stale = low)
  asm.ldx(asm.DW, R2, R8, 16),         # redirected so far
  asm.sub(R2, R1), asm.add(R2, R7),    # queue after this message
  asm.jle(R2, QBOUND, "redirect"),
  asm.st(asm.DW, R8, 0, 1), asm.ja("pass"),
  asm.label("redirect"),
  asm.mov(R1, R6), asm.ld_map_fd(R2, sm), asm.mov(R3, 1), asm.mov(R4, 0), asm.call(Helper.sk_redirect_map),
  asm.jne(R0, SkAction.PASS, "pass_to_self"),
  asm.atomic_add(asm.DW, R8, R7, 16),
  asm.exit_(),
  asm.label("pass_to_self"), asm.st(asm.DW, R8, 0, 1),
  asm.label("pass"),
  asm.atomic_add(asm.DW, R8, R7, 8),
  asm.mov(R0, SkAction.PASS), asm.exit_(),
  asm.label("drop"), asm.mov(R0, SkAction.DROP), asm.exit_(),
])
eng.attach(sm, verdict=v)
sm[1] = B; sm[0] = A
def st():
    raw = stats.lookup(0); return struct.unpack("<QQQ", raw)
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
    ctl[2] = bw - user_written
    held = qlen + len(pend) + (passed - user_written - len(pend)) + outq(B)
    peak = max(peak, qlen + outq(B) + tcp_counters(A).bytes_received - tcp_counters(A).consumed + (passed - user_written))
    if not paused and qlen + outq(B) > HIGH:
        ctl[1] = 1; paused = True; holds += 1
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
            ctl[1] = 0; paused = False
        if not paused and not pend:
            ctl[0] = user_written + 1; attempts += 1
    elif state == 0 and not paused and ctl.lookup_int(0):
        ctl[0] = 0
    if paused and state == 0 and qlen + outq(B) < LOW:
        ctl[1] = 0; paused = False
    time.sleep(0.001)
for t in ts: t.join(5)
state, passed, redir = st()
print("got", res.get("got"), "of", TOTAL, "hash ok", res.get("hash") == want, "holds", holds, "attempts", attempts,
      "passed", passed, "redirected", redir, "user_written", user_written, "peak MiB %.1f" % (peak / 2**20))
