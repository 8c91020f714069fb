"""The userspace engine's sock_ops: connections its listeners accept and its connector
makes run SOCK_OPS programs (the same bytecode as the kernel's, or a callable), which put
them into maps; with an SK_MSG verdict that makes the local-acceleration recipe."""

from __future__ import annotations

import errno
import os

import pytest

from engines import read_passed
from sockmap import asm, programs
from sockmap.abi import ProgType
from sockmap.datapath.tcp import tcp_counters
from sockmap.errors import VerifierError
from sockmap.programs.keys import key_of
from sockmap.programs.sockops import PASSIVE_BASE
from sockmap.userspace.engine import UserspaceEngine
from sockmap.vm import SockOpsContext
from sockmap.vm import load as vm_load


def test_add_established_puts_both_ends_in_the_sockhash() -> None:
    with UserspaceEngine() as eng:
        h = eng.sockhash(16, key_size=16)
        eng.on_established(programs.add_established(h))
        with eng.listen(("127.0.0.1", 0)) as lst:
            c = eng.connect(lst.getsockname(), timeout=5)
            s, _ = lst.accept()
        try:
            assert set(h.keys()) == {key_of(c), key_of(s)}
        finally:
            c.close()
            s.close()


def test_the_seeds_sockmap_variant() -> None:
    with UserspaceEngine() as eng:
        m = eng.sockmap(2 * PASSIVE_BASE)
        eng.on_established(programs.add_established_map(m))
        with eng.listen(("127.0.0.1", 0)) as lst:
            c = eng.connect(lst.getsockname(), timeout=5)
            s, _ = lst.accept()
        try:
            cport = c.getsockname()[1]
            assert m.lookup(cport) == m.lookup(cport)  # filled
            assert m[PASSIVE_BASE + cport] is not None
            with pytest.raises(OSError) as err:
                m.lookup(cport + 1)
            assert err.value.errno == errno.ENOENT
        finally:
            c.close()
            s.close()


def test_a_python_callable_as_sock_ops() -> None:
    with UserspaceEngine() as eng:
        h = eng.sockhash(16, key_size=16)
        seen: list[int] = []

        def add(ctx: SockOpsContext, env: object) -> int:
            seen.append(ctx.op)
            return env.sock_update(h, b"k" * 16 if ctx.op == 5 else b"c" * 16, 0)  # type: ignore[attr-defined]

        eng.on_established(add)
        with eng.listen(("127.0.0.1", 0)) as lst:
            c = eng.connect(lst.getsockname(), timeout=5)
            s, _ = lst.accept()
        try:
            assert seen == [4, 5]
            assert set(h.keys()) == {b"k" * 16, b"c" * 16}
        finally:
            c.close()
            s.close()


def test_local_acceleration_on_the_userspace_engine() -> None:
    """sock_ops + SK_MSG redirect to the peer's ingress: what one end sends with
    engine.send arrives at the other through engine.recv, and TCP carries none of it."""
    with UserspaceEngine() as eng:
        h = eng.sockhash(16, key_size=16)
        eng.attach(h, msg_verdict=programs.redirect_to_peer(h))
        eng.on_established(programs.add_established(h))
        with eng.listen(("127.0.0.1", 0)) as lst:
            c = eng.connect(lst.getsockname(), timeout=5)
            s, _ = lst.accept()
        try:
            payload = os.urandom(1 << 20)
            for i in range(0, len(payload), 65536):
                assert eng.send(c, payload[i : i + 65536]) == 65536
            assert read_passed(eng, s, len(payload)) == payload
            assert eng.send(s, b"back") == 4
            assert read_passed(eng, c, 4) == b"back"
            for sock in (c, s):  # the connecting end counts its SYN: no data by TCP
                assert tcp_counters(sock).bytes_acked <= 1
                assert tcp_counters(sock).bytes_received <= 1
        finally:
            c.close()
            s.close()


def test_the_vm_checks_sock_ops_context_access() -> None:
    ok = asm.Program([asm.ldx(asm.W, asm.R0, asm.R1, 0), asm.exit_()])  # op
    vm_load(ok, ProgType.SOCK_OPS)
    pointer = asm.Program([asm.ldx(asm.DW, asm.R0, asm.R1, 192), asm.exit_()])  # skb_data
    with pytest.raises(VerifierError):
        vm_load(pointer, ProgType.SOCK_OPS)
    write = asm.Program(  # op is read-only
        [asm.mov(asm.R2, 1), asm.stx(asm.W, asm.R1, asm.R2, 0), asm.mov(asm.R0, 1), asm.exit_()]
    )
    with pytest.raises(VerifierError):
        vm_load(write, ProgType.SOCK_OPS)
    reply = asm.Program(
        [asm.mov(asm.R2, 7), asm.stx(asm.W, asm.R1, asm.R2, 4), asm.mov(asm.R0, 1), asm.exit_()]
    )
    ctx = SockOpsContext(4)
    vm_load(reply, ProgType.SOCK_OPS).run(ctx)
    assert ctx.reply == 7
