"""``sockmap doctor``: a self-test of the running kernel's sockmap, item by item.

Each item gets a verdict:

- ``ok``: it behaves as the datapath needs;
- ``worked around``: the kernel does not do it (or does it wrong), and the tool
  makes up for it (the item says how);
- ``broken``: it does not behave, and nothing here makes up for it;
- ``absent``: the kernel has no such feature (an older kernel); not needed by default.

The probes use loopback sockets and small programs, and release everything. The
report is cached per kernel (release and build) so ``--engine auto`` can consult it
without probing again (:func:`cached_report`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from sockmap import programs
from sockmap.abi import AttachType, Cmd, ProgType
from sockmap.errors import BpfError, errno_name

__all__ = ["Check", "Report", "cached_report", "choose_engine", "run_doctor"]

Verdict = Literal["ok", "worked around", "broken", "absent"]
FIONREAD = 0x541B
CACHE_VERSION = 1
NEEDED = ("bpf", "redirect_verdict", "sk_skb_verdict_attach")
"""Items the kernel engine cannot do without: ``--engine auto`` falls back to the userspace
engine when one of them is not ``ok``."""


@dataclass
class Check:
    """One item: its verdict, what was seen, and what the tool does about it."""

    item: str
    verdict: Verdict
    detail: str
    workaround: str = ""


@dataclass
class Report:
    kernel: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    capabilities: dict[str, Any] = field(default_factory=dict)

    def verdict_of(self, item: str) -> Verdict | None:
        return next((c.verdict for c in self.checks if c.item == item), None)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        checks = [Check(**c) for c in d.get("checks", [])]
        return cls(d["kernel"], checks, d.get("seconds", 0.0), d.get("capabilities", {}))


def kernel_id() -> str:
    u = platform.uname()
    return f"{u.release} {u.version}"


# -- helpers for the probes ------------------------------------------------------


class _Pairs:
    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.socks: list[socket.socket] = [self.listener]

    def __call__(self) -> tuple[socket.socket, socket.socket]:
        c = socket.create_connection(self.listener.getsockname(), timeout=2)
        s, _ = self.listener.accept()
        self.socks += [c, s]
        return c, s

    def close(self) -> None:
        for s in self.socks:
            s.close()


@contextlib.contextmanager
def _lab() -> Iterator[tuple[Any, _Pairs]]:
    from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415

    eng = KernelEngine()
    pairs = _Pairs()
    try:
        yield eng, pairs
    finally:
        pairs.close()
        eng.close()


def _arrives(sock: socket.socket, want: bytes, timeout: float) -> bool:
    sock.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(TimeoutError, OSError):
        while len(got) < len(want) and time.monotonic() < deadline:
            piece = sock.recv(len(want) - len(got))
            if not piece:
                break
            got += piece
    return got == want


def _readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def _redirect_setup(eng: Any, pairs: _Pairs, mode: str) -> tuple[Any, ...]:  # noqa: ANN401
    a, a_srv = pairs()
    b, b_srv = pairs()
    smap = eng.sockmap(2)
    parser = programs.whole_segment() if mode == "strparser" else None
    eng.attach(smap, parser=parser, verdict=programs.redirect_key(smap, 1))
    return a, a_srv, b, b_srv, smap


# -- the probes ------------------------------------------------------------------


def _probe_redirect(mode: str) -> Callable[[], Check]:
    def probe() -> Check:
        item = f"redirect_{mode}"
        with _lab() as (eng, pairs):
            a, a_srv, b, b_srv, smap = _redirect_setup(eng, pairs, mode)
            smap[0], smap[1] = a_srv, b_srv
            a.sendall(b"doctor probe")
            if _arrives(b, b"doctor probe", 2.0):
                return Check(item, "ok", f"a message redirected in {mode} mode arrived")
            return Check(
                item,
                "broken",
                f"a message redirected in {mode} mode did not arrive within 2 s",
                "use the userspace engine",
            )

    return probe


def _probe_queued_before_insertion() -> Check:
    item = "bytes_queued_before_insertion"
    with _lab() as (eng, pairs):
        from sockmap.datapath.tcp import kick  # noqa: PLC0415

        a, a_srv, b, b_srv, smap = _redirect_setup(eng, pairs, "verdict")
        a.sendall(b"early bytes")
        time.sleep(0.05)
        smap[0], smap[1] = a_srv, b_srv
        if _readable(b, 0.3):
            return Check(item, "ok", "bytes queued before insertion were redirected at once")
        kick(a_srv)
        if _arrives(b, b"early bytes", 2.0):
            return Check(
                item,
                "worked around",
                "bytes queued before insertion stay in the source's queue until more arrive",
                "the splicer and balancer kick each socket after insertion (SO_RCVLOWAT)",
            )
        return Check(item, "broken", "queued bytes were not redirected, even after a kick")


def _probe_fin() -> Check:
    item = "fin_forwarded"
    with _lab() as (eng, pairs):
        a, a_srv, b, b_srv, smap = _redirect_setup(eng, pairs, "verdict")
        smap[0], smap[1] = a_srv, b_srv
        a.sendall(b"last")
        a.shutdown(socket.SHUT_WR)
        if not _arrives(b, b"last", 2.0):
            return Check(item, "broken", "the bytes before the FIN did not arrive")
        if _readable(b, 0.3) and b.recv(1) == b"":
            return Check(item, "ok", "the kernel passed the FIN on")
        return Check(
            item,
            "worked around",
            "the kernel does not pass a FIN on to the redirect target",
            "the splicer shuts the target's write side once every byte before the FIN has "
            "entered it (TCP counters)",
        )


def _probe_backpressure() -> Check:
    item = "backpressure"
    limit = 24 << 20
    with _lab() as (eng, pairs):
        a, a_srv, b, b_srv, smap = _redirect_setup(eng, pairs, "verdict")
        smap[0], smap[1] = a_srv, b_srv
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        a.setblocking(False)
        block, sent = bytes(65536), 0
        deadline = time.monotonic() + 2.0
        stalled = 0
        while sent < limit and time.monotonic() < deadline:
            try:
                sent += a.send(block)
                stalled = 0
            except BlockingIOError:
                stalled += 1
                if stalled > 20:
                    break
                time.sleep(0.01)
        if sent >= limit:
            return Check(
                item,
                "worked around",
                f"a stalled reader let {sent >> 20} MiB into the kernel: the redirect path "
                "has no backpressure",
                "the bounded splicer holds sources by SK_PASS within its bound (4 MiB); the "
                "userspace engine pauses reading",
            )
        return Check(item, "ok", f"the sender was stopped after {sent >> 10} KiB")


def _probe_fionread(mode: str) -> Callable[[], Check]:
    def probe() -> Check:
        item = f"fionread_{mode}"
        with _lab() as (eng, pairs):
            a, a_srv = pairs()
            smap = eng.sockmap(1)
            parser = programs.whole_segment() if mode == "strparser" else None
            eng.attach(smap, parser=parser, verdict=programs.pass_())
            smap[0] = a_srv
            a.sendall(b"x" * 100)
            deadline = time.monotonic() + 2.0
            n = 0
            while time.monotonic() < deadline:
                n = int.from_bytes(fcntl.ioctl(a_srv.fileno(), FIONREAD, b"\0" * 4), "little")
                if n >= 100 or _readable(a_srv, 0.05):
                    break
            readable = _readable(a_srv, 0.5)
            if n == 100:
                return Check(item, "ok", "FIONREAD counts the bytes a verdict passed")
            if readable:
                return Check(
                    item,
                    "broken",
                    f"FIONREAD says {n} while 100 passed bytes are readable: applications "
                    "that size their reads by FIONREAD stall (nginx, Java, .NET; the change "
                    "in 6.6.128+ and 6.12.75+)",
                    "our datapath never relies on FIONREAD for passed bytes",
                )
            return Check(item, "broken", "bytes passed by the verdict never became readable")

    return probe


def _probe_splice() -> Check:
    item = "splice_from_socket_in_map"
    with _lab() as (eng, pairs):
        a, a_srv = pairs()
        smap = eng.sockmap(1)
        eng.attach(smap, verdict=programs.pass_())
        smap[0] = a_srv
        a.sendall(b"y" * 100)
        r, w = os.pipe()
        try:
            a_srv.setblocking(False)
            deadline = time.monotonic() + 2.0
            got = 0
            err = ""
            while time.monotonic() < deadline and got < 100:
                try:
                    got += os.splice(a_srv.fileno(), w, 100 - got, flags=os.SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    time.sleep(0.02)
                except OSError as exc:
                    err = errno_name(exc.errno or 0)
                    break
        finally:
            os.close(r)
            os.close(w)
        if got == 100:
            return Check(item, "ok", "splice() reads the bytes a verdict passed")
        return Check(
            item,
            "broken",
            f"splice() from a socket in a map got {got} of 100 passed bytes"
            + (f" ({err})" if err else ""),
            "our datapath does not splice from sockets in a map",
        )


def _probe_states() -> Check:
    item = "socket_states"
    from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415

    results: dict[str, str] = {}
    with KernelEngine() as eng:
        smap = eng.sockmap(8)
        listener = socket.create_server(("127.0.0.1", 0))
        c = socket.create_connection(listener.getsockname())
        s, _ = listener.accept()
        unconnected = socket.socket()
        udp_bound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp_bound.bind(("127.0.0.1", 0))
        udp_unbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c2 = socket.create_connection(listener.getsockname())
        s2, _ = listener.accept()
        c2.shutdown(socket.SHUT_WR)
        time.sleep(0.05)  # s2 is now in CLOSE_WAIT
        cases = {
            "established TCP": s,
            "listening TCP": listener,
            "unconnected TCP": unconnected,
            "TCP after the peer's FIN (CLOSE_WAIT)": s2,
            "bound UDP": udp_bound,
            "unbound UDP": udp_unbound,
        }
        try:
            for i, (name, sock) in enumerate(cases.items()):
                try:
                    smap[i] = sock
                    results[name] = "accepted"
                except BpfError as exc:
                    results[name] = f"refused ({errno_name(exc.errno or 0)})"
        finally:
            for x in (listener, c, s, unconnected, udp_bound, udp_unbound, c2, s2):
                x.close()
    text = "; ".join(f"{k}: {v}" for k, v in results.items())
    if results.get("established TCP") != "accepted":
        return Check(item, "broken", text)
    return Check(
        item,
        "ok",
        text,
        "a client that half-closed before it was spliced is relayed in user space",
    )


def _probe_strparser_pass() -> Check:
    item = "strparser_pass_accounting"
    from sockmap.abi.internals import internals  # noqa: PLC0415

    if internals().strparser_pass_miscounted:
        return Check(
            item,
            "worked around",
            "this kernel's strparser read path (tcp_bpf_strp_read_sock, 6.14+) miscounts "
            "bytes passed to the socket itself, and the socket stops delivering",
            "the bounded splicer holds in verdict-only mode; strparser mode is used only to "
            "redirect (balance mode)",
        )
    return Check(item, "ok", "passed bytes are counted right in strparser mode")


def _probe_link() -> Check:
    item = "sockmap_link_attach"
    from sockmap.kernel.maps import SockMap  # noqa: PLC0415
    from sockmap.kernel.programs import load_program  # noqa: PLC0415
    from sockmap.kernel.syscall import bpf  # noqa: PLC0415

    with SockMap.new(1) as m, load_program(programs.pass_(), ProgType.SK_SKB) as p:
        try:
            fd, _ = bpf(
                Cmd.LINK_CREATE,
                "IIII",
                p.fd,
                m.fd,
                int(AttachType.SK_SKB_VERDICT),
                0,
                what="create a sockmap link",
            )
        except BpfError as exc:
            return Check(
                item,
                "absent",
                f"BPF_LINK_CREATE on a sockmap refused ({errno_name(exc.errno or 0)}): "
                "links for sockmap programs came in Linux 6.10",
                "programs are attached with BPF_PROG_ATTACH",
            )
        os.close(fd)
    return Check(item, "ok", "sockmap programs can be attached as links (BPF_LINK_CREATE)")


def _probe_attach() -> Check:
    item = "sk_skb_verdict_attach"
    from sockmap.kernel.features import _probe_attach as attach_probe  # noqa: PLC0415

    kinds = {
        AttachType.SK_SKB_STREAM_PARSER: ProgType.SK_SKB,
        AttachType.SK_SKB_STREAM_VERDICT: ProgType.SK_SKB,
        AttachType.SK_SKB_VERDICT: ProgType.SK_SKB,
        AttachType.SK_MSG_VERDICT: ProgType.SK_MSG,
    }
    got = {k.name: attach_probe(k, p) for k, p in kinds.items()}
    text = ", ".join(f"{k}: {v}" for k, v in got.items())
    if got["SK_SKB_VERDICT"] != "yes" and got["SK_SKB_STREAM_VERDICT"] != "yes":
        return Check(item, "broken", text, "use the userspace engine")
    return Check(item, "ok", text)


def _probe_sk_msg() -> Check:
    item = "sk_msg_redirect"
    with _lab() as (eng, pairs):
        a, _ = pairs()
        _, b_srv = pairs()
        smap = eng.sockmap(2)
        eng.attach(
            smap, msg_verdict=programs.msg_verdict("redirect", sockmap=smap, key=1, ingress=True)
        )
        smap[0], smap[1] = a, b_srv
        a.sendall(b"sk_msg probe")
        if _arrives(b_srv, b"sk_msg probe", 2.0):
            return Check(item, "ok", "an SK_MSG verdict redirected a send to a receive queue")
        return Check(item, "broken", "an SK_MSG redirect to ingress did not arrive")


def _probe_sock_ops() -> Check:
    item = "sock_ops_cgroup"
    from sockmap.kernel.cgroup import cgroup2_mount  # noqa: PLC0415
    from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415

    try:
        root = cgroup2_mount()
    except BpfError as exc:
        return Check(item, "absent", str(exc), "use the userspace engine's on_established")
    cg = root / f"sockmap-doctor-{os.getpid()}"
    try:
        cg.mkdir()
    except OSError as exc:
        return Check(item, "broken", f"cannot make a cgroup under {root}: {exc.strerror}")
    try:
        with KernelEngine() as eng:
            h = eng.sockhash(4, key_size=16)
            eng.attach_cgroup(cg, programs.add_established(h)).detach()
    except BpfError as exc:
        return Check(item, "broken", f"attaching SOCK_OPS to {cg} failed: {exc}")
    finally:
        with contextlib.suppress(OSError):
            cg.rmdir()
    return Check(item, "ok", f"SOCK_OPS programs attach to cgroups under {root}")


PROBES: dict[str, Callable[[], Check]] = {
    "sk_skb_verdict_attach": _probe_attach,
    "redirect_strparser": _probe_redirect("strparser"),
    "redirect_verdict": _probe_redirect("verdict"),
    "bytes_queued_before_insertion": _probe_queued_before_insertion,
    "fin_forwarded": _probe_fin,
    "backpressure": _probe_backpressure,
    "fionread_verdict": _probe_fionread("verdict"),
    "fionread_strparser": _probe_fionread("strparser"),
    "splice_from_socket_in_map": _probe_splice,
    "socket_states": _probe_states,
    "strparser_pass_accounting": _probe_strparser_pass,
    "sk_msg_redirect": _probe_sk_msg,
    "sock_ops_cgroup": _probe_sock_ops,
    "sockmap_link_attach": _probe_link,
}


def run_doctor(
    only: list[str] | None = None, progress: Callable[[str], None] | None = None
) -> Report:
    """Run the probes (``only`` those items) and return the report (nothing is cached)."""
    from sockmap.kernel.features import bpf_access, capabilities  # noqa: PLC0415

    t0 = time.monotonic()
    report = Report(kernel_id(), capabilities={"caps": capabilities()})
    permitted, why = bpf_access()
    if permitted and not only:
        from sockmap.kernel.features import probe as probe_features  # noqa: PLC0415

        if progress is not None:
            progress("capability matrix (map, program and attach types, helpers)")
        report.capabilities.update(probe_features(helpers=True).as_dict())
    report.checks.append(
        Check("bpf", "ok" if permitted else "broken", why, "" if permitted else "userspace engine")
    )
    if not permitted:
        report.seconds = time.monotonic() - t0
        return report
    for item, probe in PROBES.items():
        if only and item not in only:
            continue
        if progress is not None:
            progress(item)
        try:
            check = probe()
        except (OSError, BpfError) as exc:
            check = Check(item, "broken", f"the probe failed: {exc}")
        report.checks.append(check)
    report.seconds = time.monotonic() - t0
    return report


# -- the cache and --engine auto -----------------------------------------------------


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in kernel_id())
    return Path(base) / "sockmap" / f"doctor-v{CACHE_VERSION}-{safe[:120]}.json"


def save_report(report: Report) -> Path | None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report.as_dict(), indent=1))
        tmp.chmod(0o600)
        tmp.replace(path)
    except OSError:
        return None
    return path


def cached_report() -> Report | None:
    """The last full report for this kernel, if one was saved."""
    try:
        data = json.loads(cache_path().read_text())
        report = Report.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return report if report.kernel == kernel_id() else None


def choose_engine(kind: str = "auto") -> tuple[str, str]:
    """(engine name, why) for ``--engine kind``: ``auto`` takes the kernel engine only where
    bpf() is permitted and the doctor's verdict on what it needs is ``ok`` (the cached
    report for this kernel; else a quick probe of those items, then cached)."""
    from sockmap.kernel.features import bpf_access  # noqa: PLC0415

    if kind == "userspace":
        return "userspace", "asked for"
    permitted, why = bpf_access()
    if kind == "kernel":
        return "kernel", why
    if not permitted:
        return "userspace", f"the kernel's is unavailable: {why}"
    report = cached_report()
    if report is None or any(report.verdict_of(i) is None for i in NEEDED):
        report = run_doctor(only=list(NEEDED))
        if all(c.verdict == "ok" for c in report.checks):
            save_report(report)
    bad = [c for c in report.checks if c.item in NEEDED and c.verdict != "ok"]
    if bad:
        reasons = "; ".join(f"{c.item}: {c.detail}" for c in bad)
        return "userspace", f"the kernel's does not behave here ({reasons}; see sockmap doctor)"
    return "kernel", f"{why}; sockmap doctor: redirect works"
