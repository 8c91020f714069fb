"""Experiment: a length-prefixed BPF parser that reads the strparser offset through the kfunc
bpf_cast_to_kern_ctx frames pipelined messages (3 MB of 2,000 messages in one sendall)
byte-exact. KID and the offset 40+24+4 are this kernel build's (see sockmap.abi.internals).

Run as root from the repository root: .venv/bin/python experiments/parser_offset_kfunc.py
"""
import socket, sys, time, struct
sys.path.insert(0, "tests")
from netutil import Pairs
from sockmap.kernel.engine import KernelEngine
from sockmap import asm, programs
from sockmap.asm import R0,R1,R2,R3,R4,R6,R7,R8,R9,R10, PSEUDO_KFUNC_CALL
from sockmap.asm.instruction import Instruction
from sockmap.asm.opcodes import JmpOp, Class
from sockmap.abi import Helper, SkAction, SK_BUFF
KID = 62980
eng = KernelEngine(); pairs = Pairs()
client, A = pairs(); consumer, B = pairs()
sm = eng.sockmap(2)
# parser: offset from strp_msg, then 4-byte BE length at offset, +4
parser = asm.Program([
    asm.mov(R6, R1),
    Instruction(JmpOp.CALL | Class.JMP, 0, PSEUDO_KFUNC_CALL, 0, KID),
    asm.ldx(asm.W, R2, R0, 40 + 24 + 4),   # strp.offset
    asm.mov(R1, R6),
    asm.mov(R3, R10), asm.add(R3, -8), asm.mov(R4, 4),
    asm.call(Helper.skb_load_bytes),
    asm.jne(R0, 0, "more"),
    asm.ldx(asm.W, R0, R10, -8), asm.to_be(R0, 32), asm.add(R0, 4),
    asm.exit_(),
    asm.label("more"), asm.mov(R0, 0), asm.exit_(),
], name="lp_off")
eng.attach(sm, parser=parser, verdict=programs.redirect_key(sm, 1))
sm[1] = B; sm[0] = A
import random
rng = random.Random(1)
msgs = [bytes([i % 256]) * rng.randint(1, 3000) for i in range(2000)]
blob = b"".join(struct.pack(">I", len(m)) + m for m in msgs)
client.sendall(blob)
got = b""
consumer.settimeout(3)
try:
    while len(got) < len(blob):
        d = consumer.recv(1 << 20)
        if not d: break
        got += d
except socket.timeout: pass
print(len(got), len(blob), got == blob)
