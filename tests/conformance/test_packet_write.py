"""A verdict that writes into the packet, on both engines: what the receiver gets is what
the verdict wrote (the kernel lets SK_SKB programs store into ``data..data_end``; the
userspace VM runs the same bytecode and the engine delivers the bytes it wrote)."""

from __future__ import annotations

import socket

import pytest

from engines import Engine, insert, read_passed
from netutil import Pairs
from sockmap import asm, programs
from sockmap.abi import SK_BUFF, Helper, SkAction
from sockmap.asm import R0, R1, R2, R3, R4, R6

MARK = ord("#")


def overwrite_first_byte(smap: object, action: str) -> asm.Program:
    """Verdict: replace the message's first byte by ``#``, then pass, redirect to key 1
    (egress) or redirect to key 1's receive side. ``bpf_skb_pull_data`` first: a TCP skb's
    bytes are mostly in page fragments, outside data..data_end until pulled."""
    items: list[asm.Item] = [
        asm.mov(R6, R1),
        asm.mov(R2, 1),
        asm.call(Helper.skb_pull_data),
        asm.ldx(asm.W, R2, R6, SK_BUFF.offset("data")),
        asm.ldx(asm.W, R3, R6, SK_BUFF.offset("data_end")),
        asm.mov(R4, R2),
        asm.add(R4, 1),
        asm.jgt(R4, R3, "decide"),  # no byte to write: the message goes on as it is
        asm.st(asm.B, R2, 0, MARK),
        asm.label("decide"),
    ]
    if action == "pass":
        items += [asm.mov(R0, SkAction.PASS), asm.exit_()]
    else:
        items += [
            asm.mov(R1, R6),
            asm.ld_map_fd(R2, smap),
            asm.mov(R3, 1),
            asm.mov(R4, 1 if action == "ingress" else 0),  # BPF_F_INGRESS or egress
            asm.call(Helper.sk_redirect_map),
            asm.exit_(),
        ]
    return asm.Program(items, name="overwrite_first")


def recv_n(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from a plain socket (what a redirect to egress sent its peer)."""
    sock.settimeout(5.0)
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("mode", ["verdict", "strparser"])
@pytest.mark.parametrize("action", ["egress", "ingress", "pass"])
def test_verdict_packet_write_reaches_the_receiver(
    engine: Engine, pairs: Pairs, action: str, mode: str
) -> None:
    a, a_srv = pairs()
    b, b_srv = pairs()
    smap = engine.sockmap(2)
    parser = programs.whole_segment() if mode == "strparser" else None
    engine.attach(smap, parser=parser, verdict=overwrite_first_byte(smap, action))
    insert(engine, smap, 0, a_srv)
    insert(engine, smap, 1, b_srv)
    a.sendall(b"hello")
    if action == "egress":
        got = recv_n(b, 5)
    else:
        got = read_passed(engine, b_srv if action == "ingress" else a_srv, 5)
    assert got == b"#ello"
