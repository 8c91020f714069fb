"""Compiled programs on the real kernel: the verifier accepts them as SK_SKB programs,
and, test-run as SCHED_CLS over random packets (SK_SKB cannot be test-run), they return
what the plain-Python function and the userspace VM return."""

from __future__ import annotations

import random

import pytest

from sockmap.abi import ProgType
from sockmap.compiler import (
    Skb,
    apply_bytes,
    compile_function,
    msg_verdict,
    redirect,
    stream_parser,
    stream_verdict,
)
from sockmap.kernel.engine import KernelEngine
from sockmap.kernel.programs import load_program
from sockmap.kernel.run import run_program
from sockmap.userspace.engine import UserspaceEngine
from sockmap.vm import SkbContext, load
from sockmap.vm.env import RecordingEnv

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf")]


def test_the_verifier_accepts_compiled_parsers_and_verdicts() -> None:
    with KernelEngine() as eng:
        smap = eng.sockmap(4)
        routes = eng.hash(16, key_size=8, value_size=4)

        @stream_parser
        def parse(skb):
            if skb.len < 2:
                return 0
            n = skb.load(0, 2)
            return n + 2 if n < 4000 else -90

        @stream_verdict
        def verdict(skb):
            key = routes[skb.load(2, 2)] if skb.len >= 4 else 0
            if not key:
                key = 1 + skb.cookie % 3
            return redirect(smap, key)

        @stream_verdict(mode="verdict")
        def ingress(skb):
            return redirect(smap, skb.local_port % 4, ingress=True)

        @msg_verdict
        def on_send(msg):
            if msg.len > 100:
                apply_bytes(100)
            return redirect(smap, 1 + msg.load(0, 1) % 3) if msg.len else 1

        for prog in (parse, verdict, ingress):
            with load_program(prog, ProgType.SK_SKB):
                pass
        with load_program(on_send, ProgType.SK_MSG):
            pass
        eng.attach(smap, parser=parse, verdict=verdict)


def make_compute(counts):
    """The same function over the given counter map (compiled once per engine's map)."""

    @stream_verdict(mode="verdict")
    def compute(skb):
        h = 2166136261
        for i in range(12):
            h = ((h ^ skb.load(i, 1)) * 16777619) & 0xFFFFFFFF
        counts[0] += 1
        word = skb.load(12, 4, "little")
        if word > 0x80000000 and h % 2 == 0:
            return (h ^ word) % 1000
        return h % 1000 + (skb.len // 3)

    return compute


def test_python_vm_and_kernel_agree_on_random_packets() -> None:
    rng = random.Random(7)
    datas = [rng.randbytes(rng.randint(16, 80)) for _ in range(300)]
    with KernelEngine() as keng, UserspaceEngine() as ueng:
        kcounts, ucounts = keng.array(4, value_size=8), ueng.array(4, value_size=8)
        kcompute, ucompute = make_compute(kcounts), make_compute(ucounts)
        with load_program(kcompute, ProgType.SCHED_CLS) as kprog:
            vm = load(ucompute)
            for data in datas:
                kernel = run_program(kprog, data).retval
                vmr = vm.run(SkbContext(data=data, len=len(data)), RecordingEnv()) & 0xFFFFFFFF
                assert kernel == vmr == ucompute(Skb(data)), data.hex()
        # the kernel and the VM counted every run (the Python runs too, on the VM's map)
        assert int.from_bytes(kcounts[0], "little") == 300
        assert int.from_bytes(ucounts[0], "little") == 600


def make_programs(routes):
    """A length-prefixed parser with a limit and routing through a map, compiled for
    test runs (no strparser offset: SCHED_CLS has none), over the given map."""

    def parse(skb):
        if skb.len < 4:
            return 0
        n = skb.load(0, 4)
        if n > 1000:
            return -90
        return n + 4

    def field(skb):
        if skb.len < 2:
            return 0
        key = routes[skb.load(0, 2, "little")]
        return key if key else 9

    return (
        compile_function(parse, kind="parser", mode="verdict"),
        compile_function(field, kind="verdict", mode="verdict"),
    )


def test_parser_and_field_routing_agree_three_ways() -> None:
    rng = random.Random(11)
    with KernelEngine() as keng, UserspaceEngine() as ueng:
        kroutes = keng.hash(16, key_size=8, value_size=4)
        uroutes = ueng.hash(16, key_size=8, value_size=4)
        for value, key in ((7, 1), (300, 2), (65535, 3)):
            for m in (kroutes, uroutes):
                m[value.to_bytes(8, "little")] = key.to_bytes(4, "little")
        kprogs, uprogs = make_programs(kroutes), make_programs(uroutes)
        for kp, up in zip(kprogs, uprogs, strict=True):
            with load_program(kp, ProgType.SCHED_CLS) as kprog:
                vm = load(up)
                for _ in range(200):
                    head = rng.choice(
                        [
                            rng.randint(0, 2000).to_bytes(4, "big"),
                            rng.choice([7, 300, 65535, 5]).to_bytes(2, "little") + b"xx",
                        ]
                    )
                    data = head + rng.randbytes(rng.randint(10, 40))
                    kernel = run_program(kprog, data).retval
                    ctx = SkbContext(data=data, len=len(data))
                    vmr = vm.run(ctx, RecordingEnv()) & 0xFFFFFFFF
                    assert kernel == vmr == up(Skb(data)) & 0xFFFFFFFF, (up.name, data.hex())
