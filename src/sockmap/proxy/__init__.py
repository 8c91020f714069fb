"""``sockmap proxy``: client connections spliced to backend connections through a sockmap.

Splice mode (this module so far): every accepted client gets its own backend
connection, and the pair's bytes flow in the kernel (``BoundedSplicer``: bounded
memory, exact half-close, reset passed on as reset) or in the userspace engine
(``UserspaceSplicer``). Backends are tried in turn, starting from the next one each
time; a refused or unreachable backend is skipped, and a client for which every
backend failed is closed with a reset and a logged reason. Balance mode (each message
to a backend by policy) is still to come.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import selectors
import socket
import stat
import struct
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sockmap.datapath.splice import SplicePair
from sockmap.errors import SockmapError

__all__ = ["ProxyConfig", "ProxyStats", "SpliceProxy", "load_config", "parse_address"]

log = logging.getLogger("sockmap.proxy")

EngineChoice = Literal["auto", "kernel", "userspace"]


def parse_address(text: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (on ``default_host``) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"address {text!r}: expected HOST:PORT or [IPV6]:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or default_host), int(port)


@dataclass
class ProxyConfig:
    """What a proxy listens on and where it sends (flags or a TOML file)."""

    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:9000"])
    backends: list[str] = field(default_factory=list)
    mode: Literal["splice", "balance"] = "splice"
    engine: EngineChoice = "auto"
    connect_timeout: float = 3.0
    drain_timeout: float = 10.0
    metrics: str = "off"
    """HOST:PORT to serve Prometheus metrics on (the command's default: 127.0.0.1:9101),
    or "off"."""
    max_pairs: int = 1024
    bound: int = 4 << 20

    def validate(self) -> None:
        if not self.backends:
            raise ValueError("no backends: give at least one --backend HOST:PORT")
        for a in (*self.listen, *self.backends):
            parse_address(a)
        if self.metrics != "off":
            parse_address(self.metrics)
        if self.mode != "splice":
            raise ValueError(
                f"mode {self.mode!r} is not implemented yet; use --mode splice (balance mode "
                "is planned: see docs/proxy.md)"
            )
        if self.engine not in ("auto", "kernel", "userspace"):
            raise ValueError(f"engine must be auto, kernel or userspace, not {self.engine!r}")


def load_config(path: str | Path) -> ProxyConfig:
    """Read a TOML config; refuse one that anyone may write (it says where bytes go)."""
    p = Path(path)
    mode = p.stat().st_mode
    if mode & stat.S_IWOTH:
        raise PermissionError(
            errno.EPERM, f"{p} is world-writable: anyone could redirect the traffic; chmod o-w it"
        )
    data = tomllib.loads(p.read_text())
    data.setdefault("metrics", "127.0.0.1:9101")  # the command's default
    known = set(ProxyConfig.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{p}: unknown settings {', '.join(sorted(unknown))}")
    cfg = ProxyConfig(**data)
    cfg.validate()
    return cfg


@dataclass
class ProxyStats:
    accepted: int = 0
    spliced: int = 0
    backend_failures: int = 0
    clients_refused: int = 0
    relayed: int = 0
    """Pairs relayed in user space because the client had already half-closed."""
    bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    """(backend, "up" | "down") -> bytes moved by closed connections."""
    per_backend: dict[str, int] = field(default_factory=dict)


class SpliceProxy:
    """Accepts on every listen address and splices each client to a backend."""

    def __init__(self, config: ProxyConfig) -> None:
        config.validate()
        self.config = config
        self.stats = ProxyStats()
        self.engine, self.splicer, self.engine_name = _open_splicer(config)
        self._backends = [parse_address(b) for b in config.backends]
        self._next = 0
        self._listeners: list[socket.socket] = []
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        for text in config.listen:
            host, port = parse_address(text)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            lst = socket.create_server((host, port), family=family, backlog=1024)
            lst.setblocking(False)
            self._listeners.append(lst)
            self._sel.register(lst, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="proxy-accept", daemon=True)
        self._backend_of: dict[SplicePair, str] = {}
        self._count_lock = threading.Lock()
        self._connecting = threading.BoundedSemaphore(64)
        self.splicer.on_close.append(self._pair_closed)
        self.metrics_address: tuple[str, int] | None = None
        self._metrics_server: Any = None

    def set_backends(self, backends: list[str]) -> None:
        """Use these backends for new clients (open connections keep theirs)."""
        parsed = [parse_address(b) for b in backends]
        if not parsed:
            raise ValueError("no backends")
        self._backends = parsed
        self._next = 0
        self.config.backends = list(backends)
        log.info("backends now %s", ", ".join(backends))

    @property
    def active(self) -> int:
        return int(self.splicer.active)

    def _pair_closed(self, pair: SplicePair) -> None:
        backend = self._backend_of.pop(pair, "?")
        up, down = pair.bytes_moved()
        self._count(backend, "up", up)
        self._count(backend, "down", down)

    def _count(self, backend: str, direction: str, n: int) -> None:
        with self._count_lock:
            key = (backend, direction)
            self.stats.bytes[key] = self.stats.bytes.get(key, 0) + n

    def _start_metrics(self) -> None:
        if self.config.metrics == "off":
            return
        from prometheus_client import start_http_server  # noqa: PLC0415

        from sockmap.proxy.metrics import registry_for  # noqa: PLC0415

        host, port = parse_address(self.config.metrics)
        server, _ = start_http_server(port, host, registry=registry_for(self))
        self._metrics_server = server
        self.metrics_address = (host, server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, server.server_port)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self._listeners]

    def start(self) -> SpliceProxy:
        self._start_metrics()
        self._thread.start()
        log.info(
            "listening on %s, splicing to %s (%s engine)",
            ", ".join(f"{h}:{p}" for h, p in self.addresses),
            ", ".join(self.config.backends),
            self.engine_name,
        )
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.2):
                lst = key.fileobj
                assert isinstance(lst, socket.socket)
                try:
                    client, peer = lst.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    if self._stop.is_set():
                        return
                    raise
                self.stats.accepted += 1
                # Connecting may take up to connect_timeout per backend: do it aside, so a
                # slow backend does not hold up the next clients (at most 64 at a time).
                self._connecting.acquire()
                threading.Thread(
                    target=self._connect_aside,
                    args=(client, peer),
                    name="proxy-connect",
                    daemon=True,
                ).start()

    def _connect_aside(self, client: socket.socket, peer: object) -> None:
        try:
            self._connect_and_splice(client, peer)
        except Exception:
            log.exception("handling client %s failed", peer)
            _reset(client)
        finally:
            self._connecting.release()

    def _connect_and_splice(self, client: socket.socket, peer: object) -> None:
        client.setblocking(True)
        reasons = []
        n = len(self._backends)
        for i in range(n):
            host, port = self._backends[(self._next + i) % n]
            try:
                upstream = socket.create_connection((host, port), self.config.connect_timeout)
            except OSError as exc:
                self.stats.backend_failures += 1
                reasons.append(f"{host}:{port}: {exc.strerror or exc}")
                continue
            upstream.settimeout(None)
            self._next = (self._next + i + 1) % n
            name = f"{host}:{port}"
            try:
                pair = self.splicer.splice(client, upstream)
            except (OSError, SockmapError) as exc:
                if getattr(exc, "errno", None) != errno.EOPNOTSUPP:
                    log.warning("cannot splice %s to %s:%d: %s", peer, host, port, exc)
                    upstream.close()
                    _reset(client)
                    return
                # A client that sent everything and half-closed before we got to it is
                # no longer ESTABLISHED, and a sockmap takes only established sockets:
                # relay this pair in user space instead (nothing has been read yet).
                self.stats.relayed += 1
                _relay(client, upstream, functools.partial(self._count, name))
            else:
                self.stats.spliced += 1
                self._backend_of[pair] = name
            self.stats.per_backend[name] = self.stats.per_backend.get(name, 0) + 1
            return
        self.stats.clients_refused += 1
        log.warning("client %s closed: no backend answered (%s)", peer, "; ".join(reasons))
        _reset(client)

    def stop(self, *, drain: bool = True) -> None:
        """Stop accepting; let spliced pairs finish (up to ``drain_timeout``); release all."""
        self._stop.set()
        for lst in self._listeners:
            with contextlib.suppress(OSError):
                self._sel.unregister(lst)
            lst.close()
        if self._thread.is_alive():
            self._thread.join(5)
        if drain:
            deadline = time.monotonic() + self.config.drain_timeout
            while self.splicer.active and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.splicer.active:
                log.warning(
                    "%d pairs still open after the drain timeout: closing them", self.splicer.active
                )
        self.splicer.close()
        self.engine.close()
        self._sel.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def __enter__(self) -> SpliceProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _relay(
    a: socket.socket, b: socket.socket, count: Callable[[str, int], None] | None = None
) -> None:
    """Copy both ways in two threads, passing on half-closes; a reset resets both.
    ``count(direction, n)`` hears of every chunk ("up": a to b)."""
    for s in (a, b):
        s.setblocking(True)  # a failed splice may have left them non-blocking

    def close_both() -> None:
        a.close()
        b.close()

    done = threading.Barrier(2, action=close_both)

    def pump(src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(1 << 18):
                dst.sendall(data)
                if count is not None:
                    count(direction, len(data))
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            _reset(src)
            _reset(dst)
        with contextlib.suppress(threading.BrokenBarrierError):
            done.wait()

    for src, dst, direction in ((a, b, "up"), (b, a, "down")):
        threading.Thread(
            target=pump, args=(src, dst, direction), name="proxy-relay", daemon=True
        ).start()


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _open_splicer(config: ProxyConfig) -> tuple[Any, Any, str]:
    from sockmap import open_engine  # noqa: PLC0415
    from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415

    engine = open_engine(config.engine)
    if isinstance(engine, KernelEngine):
        from sockmap.datapath.bounded import BoundedSplicer  # noqa: PLC0415

        return (
            engine,
            BoundedSplicer(engine, config.max_pairs, "verdict", bound=config.bound),
            "kernel",
        )
    from sockmap.userspace.splice import UserspaceSplicer  # noqa: PLC0415

    return engine, UserspaceSplicer(engine, config.max_pairs, "verdict"), "userspace"
