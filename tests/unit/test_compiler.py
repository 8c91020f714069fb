"""The restricted-Python compiler: the same function as plain Python and as eBPF in the
userspace VM gives the same answers; anything outside the subset is refused with the
file, line and construct."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiled_examples import length_prefixed
from sockmap.abi import ProgType
from sockmap.compiler import (
    CompileError,
    Msg,
    Skb,
    apply_bytes,
    msg_verdict,
    redirect,
    stream_verdict,
)
from sockmap.userspace import maps as umaps
from sockmap.vm import MsgContext, SkbContext, load
from sockmap.vm.env import RecordingEnv

COUNTS = umaps.ArrayMap.new(4, value_size=8)
ROUTES = umaps.HashMap.new(16, key_size=8, value_size=4)
SOCKS = umaps.SockMap.new(8)


@stream_verdict(mode="verdict")
def fnv_route(skb):
    h = 2166136261
    for i in range(8):
        if i >= skb.len:
            break
        h = ((h ^ skb.load(i, 1)) * 16777619) & 0xFFFFFFFF
    return 1 + h % 4


@stream_verdict(mode="verdict")
def field_route(skb):
    if skb.len < 2:
        return 0
    key = ROUTES[skb.load(0, 2, "little")]
    return key if key else 7


@stream_verdict(mode="verdict")
def counter(skb):
    COUNTS[0] += 1
    COUNTS[1] += skb.len
    kind = skb.load(0, 1) if skb.len else 0
    COUNTS[2] = kind * 3 + (1 if kind > 100 and skb.len > 10 else 2)
    return COUNTS[0]


@stream_verdict(mode="verdict")
def send_to(skb):
    return redirect(SOCKS, skb.load(0, 1) % 8)


def vm_run(prog, data: bytes, signed: bool = False) -> int:
    vmp = load(prog)
    ctx = SkbContext(data=data, len=len(data))
    env = RecordingEnv()
    return vmp.run_signed(ctx, env) if signed else vmp.run(ctx, env) & 0xFFFFFFFF


@given(st.binary(max_size=40), st.integers(0, 70000))
@settings(max_examples=200, deadline=None)
def test_length_prefixed_python_equals_vm(tail: bytes, n: int) -> None:
    data = n.to_bytes(4, "big") + tail
    for cut in (0, 2, 4, len(data)):
        piece = data[:cut]
        assert length_prefixed(Skb(piece)) == vm_run(length_prefixed, piece, signed=True)


@given(st.binary(max_size=20))
@settings(max_examples=200, deadline=None)
def test_hash_routing_python_equals_vm(data: bytes) -> None:
    assert fnv_route(Skb(data)) == vm_run(fnv_route, data)


def test_field_routing_through_a_map() -> None:
    for value, key in ((7, 1), (300, 2), (65535, 3)):
        ROUTES[value.to_bytes(8, "little")] = key.to_bytes(4, "little")
    rng = random.Random(1)
    for _ in range(200):
        data = rng.choice([7, 300, 65535, 1, 2]).to_bytes(2, "little") + rng.randbytes(3)
        assert field_route(Skb(data)) == vm_run(field_route, data)
    assert vm_run(field_route, b"\x07") == 0  # too short


def test_counter_python_equals_vm_and_both_update_the_map() -> None:
    rng = random.Random(2)
    datas = [rng.randbytes(rng.randint(0, 30)) for _ in range(100)]
    for d in datas:
        counter(Skb(d))
    python_counts = [int.from_bytes(COUNTS[i], "little") for i in range(3)]
    for i in range(4):
        COUNTS[i] = bytes(8)
    vm_results = [vm_run(counter, d) for d in datas]
    vm_counts = [int.from_bytes(COUNTS[i], "little") for i in range(3)]
    assert vm_results == list(range(1, 101))
    assert python_counts == vm_counts
    assert vm_counts[1] == sum(map(len, datas))


def test_redirect_says_drop_for_an_empty_key() -> None:
    assert send_to(Skb(b"\x03")) == 0
    assert vm_run(send_to, b"\x03") == 0


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("def f(skb):\n    while True:\n        pass\n", "While statements"),
        ("def f(skb):\n    return undefined_name\n", "'undefined_name' is not a local"),
        ("def f(skb):\n    for i in range(10**6):\n        pass\n", "range() needs a constant"),
        ("def f(skb):\n    return skb.nope\n", "context field 'nope'"),
        ("def f(skb):\n    return 1 < 2 < 3\n", "chained comparisons"),
        ("def f(skb):\n    return print(1)\n", "can be called"),
        ("def f(skb):\n    return skb.load(0, 3)\n", "size must be a constant 1, 2, 4 or 8"),
        ("def f(skb):\n    return 1.5\n", "Constant expressions"),
        ("def f(a, b):\n    return 0\n", "exactly one argument"),
    ],
)
def test_outside_the_subset_is_refused_with_file_and_line(tmp_path, source: str, words: str):
    path = tmp_path / "prog_under_test.py"
    path.write_text(source)
    ns: dict[str, object] = {}
    exec(compile(source, str(path), "exec"), ns)
    with pytest.raises(CompileError) as info:
        stream_verdict(ns["f"], mode="verdict")
    msg = str(info.value)
    assert words in msg
    assert str(path) in msg
    assert ":1" in msg or ":2" in msg or ":3" in msg


@msg_verdict
def msg_route(msg):
    if msg.len > 1000:
        apply_bytes(msg.len)
        return redirect(SOCKS, 1)
    kind = msg.load(0, 1)
    if kind == 0x50:
        return redirect(SOCKS, 2 + msg.load(1, 2, "little") % 4)
    return 1 if kind else 0


def test_msg_verdict_python_equals_vm() -> None:
    vmp = load(msg_route, ProgType.SK_MSG)
    rng = random.Random(3)
    for _ in range(300):
        data = rng.choice([b"P", b"\x00", b"A"]) + rng.randbytes(rng.randint(0, 10))
        size = rng.choice([len(data), 2000])
        env = RecordingEnv()
        vm = vmp.run(MsgContext(data=data, size=size), env) & 0xFFFFFFFF
        assert vm == msg_route(Msg(data, size=size)), data.hex()
