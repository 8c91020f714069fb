"""Real clients and servers through ``sockmap proxy`` in splice mode, on both engines:
iperf3 (byte counts match), sockperf ping-pong, redis-benchmark against redis-server.
Short runs; every server is started and stopped here. The tools come from Debian (the
test set-up installs them as root); a missing tool skips, saying which."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from conformance.test_proxy_splice import free_port
from netutil import wait_until
from sockmap.proxy import ProxyConfig, SpliceProxy


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (the test set-up installs it from Debian as root)")
    return path


@contextlib.contextmanager
def server(cmd: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _listening(port), timeout=10), f"{cmd[0]} did not start"
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _listening(port: int) -> bool:
    import socket  # noqa: PLC0415

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


@contextlib.contextmanager
def proxy_to(port: int, engine_name: str) -> Iterator[SpliceProxy]:
    cfg = ProxyConfig(
        listen=["127.0.0.1:0"],
        backends=[f"127.0.0.1:{port}"],
        engine=engine_name,  # type: ignore[arg-type]
    )
    with SpliceProxy(cfg) as p:
        yield p


def test_iperf3_byte_counts_match(engine_name: str) -> None:
    """Every byte the client sent crossed the proxy.

    iperf3's server stops counting when the client's end-of-test message arrives on
    the control connection, so the last bytes of the data connection still on their
    way through the proxy (its bound plus socket buffers) are delivered but not
    counted: the server's count is compared with a tolerance, the proxy's own count of
    the bytes it took from the client exactly (but for the control connection's few
    hundred bytes). The server may also close its data connection with those bytes
    unread: its kernel then resets it, the proxy passes the reset on, and what the
    client had written but the proxy had not yet taken is discarded, as it would be on a
    direct connection; then only "the server counted no more than crossed" holds."""
    iperf3 = tool("iperf3")
    port = free_port()
    with server([iperf3, "-s", "-p", str(port)], port), proxy_to(port, engine_name) as p:
        _, pport = p.addresses[0]
        res = subprocess.run(
            [iperf3, "-c", "127.0.0.1", "-p", str(pport), "-t", "2", "-J"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        end = json.loads(res.stdout)["end"]
        sent, received = end["sum_sent"]["bytes"], end["sum_received"]["bytes"]
        assert wait_until(lambda: p.active == 0, timeout=15)
        up = sum(n for (_, d), n in p.stats.bytes.items() if d == "up")
        print(
            f"iperf3 through the {engine_name} splice: client sent {sent}, the proxy took "
            f"{up} (control included), the server counted {received}"
        )
        assert sent > 0
        assert received <= up < sent + 65536
        assert sent - (16 << 20) <= received <= sent
        if p.splicer.stats.resets == 0:
            assert up >= sent


def test_sockperf_ping_pong(engine_name: str) -> None:
    sockperf = tool("sockperf")
    port = free_port()
    with (
        server([sockperf, "sr", "--tcp", "-i", "127.0.0.1", "-p", str(port)], port),
        proxy_to(port, engine_name) as p,
    ):
        _, pport = p.addresses[0]
        res = subprocess.run(
            [sockperf, "pp", "--tcp", "-i", "127.0.0.1", "-p", str(pport), "-t", "2"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        out = res.stdout + res.stderr
        assert res.returncode == 0, out
        m = re.search(r"SentMessages=(\d+); ReceivedMessages=(\d+)", out)
        assert m, out
        sent, got = int(m.group(1)), int(m.group(2))
        print(f"sockperf through the {engine_name} splice: {sent} sent, {got} received")
        assert got > 100
        assert sent - got <= 1  # the last one may be in flight when the run ends
        assert "Summary: Latency is" in out


def test_redis_benchmark(engine_name: str) -> None:
    redis_server, redis_benchmark = tool("redis-server"), tool("redis-benchmark")
    port = free_port()
    cmd = [
        redis_server,
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--bind",
        "127.0.0.1",
    ]
    with server(cmd, port), proxy_to(port, engine_name) as p:
        _, pport = p.addresses[0]
        res = subprocess.run(
            [redis_benchmark, "-p", str(pport), "-n", "2000", "-c", "4", "-t", "set,get", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        out = res.stdout + res.stderr
        assert res.returncode == 0, out
        rates = dict(re.findall(r"(SET|GET): ([\d.]+) requests per second", out))
        print(f"redis-benchmark through the {engine_name} splice: {rates}")
        assert set(rates) == {"SET", "GET"}
        assert "error" not in out.lower()


def test_dnsperf_through_balance_mode_to_two_unbound(engine_name: str) -> None:
    """dnsperf over TCP -> balance mode with DNS framing -> two unbound instances serving a
    local zone: no query lost or failed, and both backends answered a share."""
    tool("dnsperf")
    tool("unbound")
    from sockmap.bench.dns import dnsperf, unbound  # noqa: PLC0415
    from sockmap.proxy import Proxy  # noqa: PLC0415

    with unbound(free_port(), "u1") as u1, unbound(free_port(), "u2") as u2:
        cfg = ProxyConfig(
            listen=["127.0.0.1:0"],
            backends=[u1, u2],
            mode="balance",
            framing="dns",
            engine=engine_name,  # type: ignore[arg-type]
        )
        with Proxy(cfg) as p:
            host, port = p.addresses[0]
            res = dnsperf(host, port, runs=500, clients=4)
            assert p.balancer is not None
            counts = p.balancer.read_counters()
    assert res.sent == 2000, res.output
    assert res.completed == 2000, res.output
    assert res.lost == 0
    assert res.rcodes == {"NOERROR": 1500, "NXDOMAIN": 500}
    answered = [counts.responses[0][0], counts.responses[1][0]]
    assert sum(answered) == 2000
    assert min(answered) >= 500, answered  # round robin: both answered a share
