"""``sockmap proxy``: client connections spliced or message-balanced to backends through a
sockmap.

Splice mode: every accepted client gets its own backend connection, and the pair's
bytes flow in the kernel (``BoundedSplicer``: bounded memory, exact half-close, reset
passed on as reset) or in the userspace engine (``UserspaceSplicer``). Backends are
tried in turn, starting from the next one each time; a refused or unreachable backend
is skipped, and a client for which every backend failed is closed with a reset and a
logged reason.

Balance mode: every accepted client gets a connection to each backend, and each
message it sends (framed by ``framing``) goes to one of them by ``policy``
(:class:`~sockmap.datapath.balance.Balancer`); each response goes back on the
connection it belongs to.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
import select
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

from sockmap import asm, programs
from sockmap.datapath.balance import Balancer
from sockmap.datapath.splice import SplicePair
from sockmap.datapath.tcp import tcp_counters
from sockmap.errors import SockmapError
from sockmap.programs.balance import MAX_BACKENDS, parse_policy

__all__ = [
    "Proxy",
    "ProxyConfig",
    "ProxyStats",
    "SpliceProxy",
    "load_config",
    "parse_address",
    "parse_framing",
]

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


def parse_framing(text: str, max_size: int | None = None) -> asm.Program | None:
    """The parser a ``--framing`` names: ``none`` (None), a preset (dns, postgres, kafka,
    thrift, memcached-binary) or ``length:WIDTH[:big|little[:ADJUST[:OFFSET]]]`` (the
    message is the WIDTH-byte length field at OFFSET plus ADJUST bytes)."""
    if text == "none":
        return None
    if text in programs.PRESETS:
        return programs.preset(text, max_size=max_size)
    kind, *args = text.split(":")
    if kind == "length" and 1 <= len(args) <= 4:
        try:
            width = int(args[0])
            order = args[1] if len(args) > 1 else "big"
            adjust = int(args[2]) if len(args) > 2 else 0
            offset = int(args[3]) if len(args) > 3 else 0
            return programs.length_prefixed(width, order, adjust, offset, max_size)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"framing {text!r}: {exc}") from None
    presets = ", ".join(sorted(programs.PRESETS))
    raise ValueError(
        f"framing {text!r}: expected none, a preset ({presets}) or "
        "length:WIDTH[:big|little[:ADJUST[:OFFSET]]]"
    )


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
    """Most clients open at once (splice: pairs; balance: clients, each with a connection
    to every backend); more are reset."""
    bound: int = 4 << 20
    framing: str = "none"
    """How messages are cut: none, a preset or length:WIDTH[:ORDER[:ADJUST[:OFFSET]]]."""
    policy: str = "round-robin"
    """Balance mode: round-robin, hash:START:LENGTH or field:START:WIDTH[:ORDER]."""
    routes: dict[str, str] = field(default_factory=dict)
    """Field routing: field value (decimal or 0x hex) -> backend HOST:PORT."""
    max_message: int = 1 << 20
    """Bytes: a longer message closes its client (EMSGSIZE) when a framing is set."""
    max_backends: int = 8
    """Balance mode: backend slots per client (backends ever configured, reloads included)."""
    idle_timeout: float = 300.0
    """Seconds: a client connection that moved no byte either way this long is closed (0: never)."""
    message_timeout: float = 30.0
    """Balance mode, seconds: a client message still incomplete this long after its first
    bytes resets the client (a slowloris guard; 0: never)."""
    drop_privileges: bool = False
    """After setup (maps, programs, listeners, the metrics socket), keep only the
    capabilities the datapath still needs (``sockmap.privileges.RUNTIME_CAPS``: none)."""
    user: str = ""
    """With ``drop_privileges``: also become this user (name or uid; "" stays)."""

    def validate(self) -> None:
        if not self.backends:
            raise ValueError("no backends: give at least one --backend HOST:PORT")
        for a in (*self.listen, *self.backends):
            parse_address(a)
        if self.metrics != "off":
            parse_address(self.metrics)
        if self.mode not in ("splice", "balance"):
            raise ValueError(f"mode must be splice or balance, not {self.mode!r}")
        parse_framing(self.framing)
        policy = parse_policy(self.policy)
        if self.mode == "balance":
            if self.framing == "none":
                raise ValueError(
                    "balance mode needs --framing (a preset such as dns, or length:...): "
                    "messages are balanced, and framing says where each one ends"
                )
            if not 1 <= self.max_backends <= MAX_BACKENDS:
                raise ValueError(f"max_backends must be between 1 and {MAX_BACKENDS}")
            if len(self.backends) > self.max_backends:
                raise ValueError(
                    f"{len(self.backends)} backends, max_backends {self.max_backends}: raise it"
                )
        elif self.framing != "none":
            raise ValueError("--framing is for balance mode (splice mode moves bytes as they come)")
        if self.routes and policy.kind != "field":
            raise ValueError("routes need the field policy (--policy field:START:WIDTH)")
        for value, backend in self.routes.items():
            int(value, 0)
            if backend not in self.backends:
                raise ValueError(f"route {value} -> {backend}: not one of the backends")
        if self.max_message < 1:
            raise ValueError("max_message must be positive")
        if self.idle_timeout < 0 or self.message_timeout < 0:
            raise ValueError("timeouts are seconds, 0 or more (0: none)")
        if self.engine not in ("auto", "kernel", "userspace"):
            raise ValueError(f"engine must be auto, kernel or userspace, not {self.engine!r}")
        if self.user and not self.drop_privileges:
            raise ValueError("user is for drop_privileges (--drop-privileges --user NAME)")


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
    over_limit: int = 0
    """Clients reset because ``max_pairs`` clients were open already."""
    relayed: int = 0
    """Pairs relayed in user space because the client had already half-closed."""
    bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    """(backend, "up" | "down") -> bytes moved by closed connections."""
    per_backend: dict[str, int] = field(default_factory=dict)


class Proxy:
    """Accepts on every listen address; splices each client to a backend, or balances its
    messages over every backend (``config.mode``)."""

    def __init__(self, config: ProxyConfig) -> None:
        config.validate()
        self.config = config
        self.stats = ProxyStats()
        self.engine, self.splicer, self.engine_name = _open_datapath(config)
        self.balancer: Balancer | None = (
            self.splicer if isinstance(self.splicer, Balancer) else None
        )
        self.positions: list[str | None] = list(config.backends)
        """Balance mode: backend index -> HOST:PORT (None: removed by a reload)."""
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
        if self.balancer is None:
            self.splicer.on_close.append(self._pair_closed)
        self.metrics_address: tuple[str, int] | None = None
        self._metrics_server: Any = None
        self._metrics_thread: threading.Thread | None = None

    def set_backends(self, backends: list[str]) -> None:
        """Use these backends for new clients (open connections keep theirs)."""
        parsed = [parse_address(b) for b in backends]
        if not parsed:
            raise ValueError("no backends")
        if self.balancer is not None:
            # Backend indexes stay put (open clients' slots and counters use them).
            positions = [p if p in backends else None for p in self.positions]
            positions += [b for b in backends if b not in positions]
            if len(positions) > self.config.max_backends:
                raise ValueError(
                    f"{len(positions)} backend slots needed (reloads keep old ones): "
                    f"max_backends is {self.config.max_backends}; restart to compact"
                )
            self.positions = positions
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

    def _bump(self, counter: str) -> None:
        # Connect threads run side by side: += on a shared attribute can lose updates.
        with self._count_lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)

    def _bump_backend(self, backend: str) -> None:
        with self._count_lock:
            self.stats.per_backend[backend] = self.stats.per_backend.get(backend, 0) + 1

    def _count(self, backend: str, direction: str, n: int) -> None:
        with self._count_lock:
            key = (backend, direction)
            self.stats.bytes[key] = self.stats.bytes.get(key, 0) + n

    def _bind_metrics(self) -> None:
        """Bind the metrics endpoint (its thread starts later, after any privilege drop)."""
        if self.config.metrics == "off":
            return
        from sockmap.proxy.metrics import metrics_server, registry_for  # noqa: PLC0415

        host, port = parse_address(self.config.metrics)
        server = metrics_server(host, port, registry_for(self))
        self._metrics_server = server
        self.metrics_address = (host, server.server_port)
        if not _is_loopback(host):
            log.warning(
                "metrics on http://%s:%d/metrics are reachable from other hosts and have no "
                "authentication (they show backends and traffic): bind 127.0.0.1 unless a "
                "firewall or a scraper on this host needs otherwise",
                host,
                server.server_port,
            )
        log.info("metrics on http://%s:%d/metrics", host, server.server_port)

    def _drop_privileges(self) -> None:
        # Imported now: a user switched to may not be able to read the Python install.
        import encodings.idna  # noqa: F401, PLC0415

        from sockmap import privileges  # noqa: PLC0415

        keep = privileges.RUNTIME_CAPS[self.engine_name]
        got = privileges.drop(keep, self.config.user or None)
        log.info(
            "privileges dropped: uid %d, capabilities kept: %s",
            os.getuid(),
            ", ".join(sorted(got.names())) or "none",
        )

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self._listeners]

    def start(self) -> Proxy:
        self._bind_metrics()
        if self.config.drop_privileges:
            self._drop_privileges()  # before any thread: capabilities are per thread
        if self._metrics_server is not None:
            self._metrics_thread = threading.Thread(
                target=self._metrics_server.serve_forever, name="proxy-metrics", daemon=True
            )
            self._metrics_thread.start()
        self._thread.start()
        how = "splicing to"
        if self.balancer is not None:
            policy = self.balancer.policy.describe()
            how = f"balancing {self.config.framing} messages ({policy}) over"
        log.info(
            "listening on %s, %s %s (%s engine)",
            ", ".join(f"{h}:{p}" for h, p in self.addresses),
            how,
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
            if self.splicer.active >= self.config.max_pairs:
                self._over_limit(client, peer)
            elif self.balancer is not None:
                self._connect_and_balance(self.balancer, client, peer)
            else:
                self._connect_and_splice(client, peer)
        except Exception:
            log.exception("handling client %s failed", peer)
            _reset(client)
        finally:
            self._connecting.release()

    def _over_limit(self, client: socket.socket, peer: object) -> None:
        self._bump("over_limit")
        log.warning(
            "client %s reset: %d clients open already (max_pairs; --max-clients to raise it)",
            peer,
            self.config.max_pairs,
        )
        _reset(client)

    def _connect_and_splice(self, client: socket.socket, peer: object) -> None:
        client.setblocking(True)
        reasons = []
        n = len(self._backends)
        for i in range(n):
            host, port = self._backends[(self._next + i) % n]
            try:
                upstream = socket.create_connection((host, port), self.config.connect_timeout)
            except OSError as exc:
                self._bump("backend_failures")
                reasons.append(f"{host}:{port}: {exc.strerror or exc}")
                continue
            upstream.settimeout(None)
            self._next = (self._next + i + 1) % n
            name = f"{host}:{port}"
            try:
                pair = self.splicer.splice(client, upstream)
            except (OSError, SockmapError) as exc:
                if getattr(exc, "errno", None) != errno.EOPNOTSUPP:
                    if getattr(exc, "errno", None) == errno.E2BIG:
                        upstream.close()
                        self._over_limit(client, peer)  # every slot taken meanwhile
                        return
                    log.warning("cannot splice %s to %s:%d: %s", peer, host, port, exc)
                    _reset(upstream)  # some of the client's bytes may be gone
                    _reset(client)
                    return
                # A client that sent everything and half-closed before we got to it is
                # no longer ESTABLISHED, and a sockmap takes only established sockets:
                # relay this pair in user space instead (nothing has been read yet).
                self._bump("relayed")
                _relay(client, upstream, functools.partial(self._count, name))
            else:
                self._bump("spliced")
                self._backend_of[pair] = name
            self._bump_backend(name)
            return
        self._bump("clients_refused")
        log.warning("client %s closed: no backend answered (%s)", peer, "; ".join(reasons))
        _reset(client)

    def _connect_and_balance(self, bal: Balancer, client: socket.socket, peer: object) -> None:
        client.setblocking(True)
        reasons = []
        conns: list[socket.socket | None] = []
        for name in self.positions:
            conn = None
            if name is not None:
                try:
                    conn = socket.create_connection(
                        parse_address(name), self.config.connect_timeout
                    )
                    conn.settimeout(None)
                except OSError as exc:
                    self._bump("backend_failures")
                    reasons.append(f"{name}: {exc.strerror or exc}")
            conns.append(conn)
        live = [(self.positions[j], c) for j, c in enumerate(conns) if c is not None]
        if not live:
            self._bump("clients_refused")
            log.warning("client %s closed: no backend answered (%s)", peer, "; ".join(reasons))
            _reset(client)
            return
        if reasons:
            log.info("client %s: balancing without %s", peer, "; ".join(reasons))
        try:
            bal.add(client, conns)
        except (OSError, SockmapError) as exc:
            if getattr(exc, "errno", None) != errno.EOPNOTSUPP:
                for _, c in live:
                    c.close()
                if getattr(exc, "errno", None) == errno.E2BIG:
                    self._over_limit(client, peer)  # every slot taken meanwhile
                    return
                log.warning("cannot balance %s: %s", peer, exc)
                _reset(client)
                return
            # Half-closed before we got to it (no longer ESTABLISHED): relay it whole to
            # one backend in user space, so its messages stay in order and whole.
            name, conn = live[0]
            for _, c in live[1:]:
                c.close()
            self._bump("relayed")
            _relay(client, conn, functools.partial(self._count, str(name)))
        else:
            self._bump("spliced")
        for name, _ in live:
            key = str(name)
            self._bump_backend(key)

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
            if self._metrics_thread is not None:  # shutdown() waits for serve_forever
                self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def __enter__(self) -> Proxy:
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
    failed = threading.Event()
    ended = {"up": threading.Event(), "down": threading.Event()}

    def abort() -> None:
        failed.set()
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RD)  # wakes the other direction's recv; sends nothing

    def pump(src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            read = 0  # nothing had been read from either socket before the relay
            while data := src.recv(1 << 18):
                read += len(data)
                dst.sendall(data)
                if count is not None:
                    count(direction, len(data))
            # recv says EOF for a reset socket too once its error has been taken (by the
            # other direction's send): pass a FIN on only if one came (it counts one in
            # bytes_received), or the peer would see a clean end after truncated data.
            c = tcp_counters(src)
            if c.state == _TCP_CLOSE and c.bytes_received <= read:
                raise ConnectionResetError(errno.ECONNRESET, "reset, not half-closed")
            if not failed.is_set():  # woken by the other direction's reset: no FIN
                dst.shutdown(socket.SHUT_WR)
                ended[direction].set()
                # Keep watching src for a reset until the other direction has passed its
                # FIN on: that pump sits in recv on dst and would not see it, so a peer
                # that closed and then met the last bytes sent to it would leave dst with
                # a clean end after truncated data (a direct connection gets the reset).
                watch = select.poll()
                watch.register(src, 0)  # POLLERR and POLLHUP are reported anyway
                other = ended["down" if direction == "up" else "up"]
                while not other.is_set() and not failed.is_set():
                    if watch.poll(200):
                        if src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                            raise ConnectionResetError(errno.ECONNRESET, "reset after its FIN")
                        time.sleep(0.01)  # a hang-up: the other direction ends or fails now
        except OSError:
            abort()  # both closed with a reset once both directions have stopped
        with contextlib.suppress(threading.BrokenBarrierError):
            done.wait()

    for src, dst, direction in ((a, b, "up"), (b, a, "down")):
        threading.Thread(
            target=pump, args=(src, dst, direction), name="proxy-relay", daemon=True
        ).start()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


_TCP_CLOSE = 7

SpliceProxy = Proxy
"""The proxy's earlier name (it spliced only)."""


def _open_datapath(config: ProxyConfig) -> tuple[Any, Any, str]:
    from sockmap import open_engine  # noqa: PLC0415
    from sockmap.kernel.engine import KernelEngine  # noqa: PLC0415

    engine = open_engine(config.engine)
    name = "kernel" if isinstance(engine, KernelEngine) else "userspace"
    if config.mode == "balance":
        parser = parse_framing(config.framing, config.max_message)
        assert parser is not None  # validate() saw to it
        policy = parse_policy(config.policy)
        index = {b: j for j, b in enumerate(config.backends)}
        routes = {int(v, 0): index[b] for v, b in config.routes.items()}
        try:
            bal = Balancer(
                engine,
                parser,
                policy,
                max_clients=config.max_pairs,
                max_backends=config.max_backends,
                routes=routes,
                message_timeout=config.message_timeout,
                idle_timeout=config.idle_timeout,
            )
        except BaseException:
            engine.close()
            raise
        return engine, bal, name
    if isinstance(engine, KernelEngine):
        from sockmap.datapath.bounded import BoundedSplicer  # noqa: PLC0415

        return (
            engine,
            BoundedSplicer(
                engine,
                config.max_pairs,
                "verdict",
                bound=config.bound,
                idle_timeout=config.idle_timeout,
            ),
            "kernel",
        )
    from sockmap.userspace.splice import UserspaceSplicer  # noqa: PLC0415

    splicer = UserspaceSplicer(
        engine, config.max_pairs, "verdict", idle_timeout=config.idle_timeout
    )
    return engine, splicer, "userspace"
