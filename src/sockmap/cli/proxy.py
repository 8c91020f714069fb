"""``sockmap proxy``: run the splicing or balancing proxy until SIGTERM or SIGINT, then drain."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from sockmap.errors import SockmapError
from sockmap.proxy import Proxy, ProxyConfig, load_config

__all__ = ["add_arguments", "run"]

EXAMPLES = """\
examples:
  sockmap proxy --listen 127.0.0.1:8080 --backend 127.0.0.1:9001 --backend 127.0.0.1:9002
  sockmap proxy --listen [::1]:8080 --backend [::1]:9001 --engine userspace
  sockmap proxy --config proxy.toml      # SIGHUP re-reads its backends

  # A DNS-over-TCP load balancer: each query to the next of two resolvers.
  sockmap proxy --mode balance --framing dns --listen 127.0.0.1:5300 \\
      --backend 127.0.0.1:5301 --backend 127.0.0.1:5302

  # Length-prefixed messages (4-byte big-endian length of the body), routed by the
  # hash of bytes 4..11 (a session id): the same id, the same backend.
  sockmap proxy --mode balance --framing length:4:big:4 --policy hash:4:8 \\
      --backend 127.0.0.1:9001 --backend 127.0.0.1:9002

proxy.toml:
  listen = ["127.0.0.1:8080"]
  backends = ["127.0.0.1:9001", "127.0.0.1:9002"]
  mode = "balance"          # or "splice"
  framing = "kafka"
  policy = "field:8:2"      # route by the 2-byte field at offset 8 ...
  routes = { "0x1" = "127.0.0.1:9001", "2" = "127.0.0.1:9002" }  # ... value -> backend
  max_message = 1048576
  engine = "auto"
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLES
    p.add_argument("--config", help="a TOML file with the settings below (flags override it)")
    p.add_argument(
        "--listen",
        action="append",
        help="HOST:PORT or [IPV6]:PORT to accept clients on (repeatable; default 127.0.0.1:9000)",
    )
    p.add_argument(
        "--backend", action="append", help="HOST:PORT of a backend (repeatable; tried in turn)"
    )
    p.add_argument(
        "--mode",
        choices=("splice", "balance"),
        help="splice: each client paired with its own backend connection (default); "
        "balance: each client connected to every backend, each of its messages to one of "
        "them by --policy, each response back to it whole",
    )
    p.add_argument(
        "--framing",
        help="balance mode: where messages end: a preset (dns, postgres, kafka, thrift, "
        "memcached-binary) or length:WIDTH[:big|little[:ADJUST[:OFFSET]]], the message "
        "being the WIDTH-byte length field at OFFSET plus ADJUST bytes (e.g. length:2:big:2 "
        "is DNS over TCP)",
    )
    p.add_argument(
        "--policy",
        help="balance mode: round-robin (default); hash:START:LENGTH (FNV-1a of those message "
        "bytes: equal bytes, same backend); field:START:WIDTH[:big|little] (the field's value "
        "looked up in --route, unmatched values to the first backend)",
    )
    p.add_argument(
        "--route",
        action="append",
        metavar="VALUE=HOST:PORT",
        help="field policy: messages whose field is VALUE go to that backend (repeatable)",
    )
    p.add_argument(
        "--max-message",
        type=int,
        help="balance mode: bytes; a longer message closes its client (EMSGSIZE) (1 MiB)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        help="seconds: close a client connection that moved no byte either way this long "
        "(300; 0: never)",
    )
    p.add_argument(
        "--message-timeout",
        type=float,
        help="balance mode, seconds: reset a client whose message is still incomplete this "
        "long after its first bytes (30; 0: never)",
    )
    p.add_argument(
        "--max-clients",
        type=int,
        dest="max_pairs",
        help="clients open at once; more are reset (1024)",
    )
    p.add_argument(
        "--engine",
        choices=("auto", "kernel", "userspace"),
        help="kernel sockmap, userspace engine, or auto (the kernel's where bpf() is permitted)",
    )
    p.add_argument("--connect-timeout", type=float, help="seconds per backend attempt (3)")
    p.add_argument(
        "--drain-timeout", type=float, help="seconds to let open connections finish on exit (10)"
    )
    p.add_argument(
        "--metrics",
        default=None,
        help="HOST:PORT for Prometheus metrics at /metrics, or off (default: 127.0.0.1:9101; "
        "localhost unless you say otherwise)",
    )
    p.add_argument(
        "--drop-privileges",
        action="store_true",
        default=None,
        help="after setup (maps, programs, listeners bound) drop every capability the "
        "datapath no longer needs (it needs none) and set no_new_privs",
    )
    p.add_argument(
        "--user",
        help="with --drop-privileges: also become this user (name or uid; no supplementary "
        "groups)",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING... (INFO)")


def _config(args: argparse.Namespace) -> ProxyConfig:
    cfg = load_config(args.config) if args.config else ProxyConfig(metrics="127.0.0.1:9101")
    if args.listen:
        cfg.listen = args.listen
    if args.backend:
        cfg.backends = args.backend
    if args.route:
        try:
            cfg.routes = dict(r.split("=", 1) for r in args.route)
        except ValueError:
            raise ValueError(f"--route {args.route}: expected VALUE=HOST:PORT") from None
    for name in (
        "mode",
        "engine",
        "connect_timeout",
        "drain_timeout",
        "metrics",
        "framing",
        "policy",
        "max_message",
        "max_pairs",
        "idle_timeout",
        "message_timeout",
        "drop_privileges",
        "user",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        cfg = _config(args)
        proxy = Proxy(cfg)
    except (ValueError, OSError, SockmapError) as exc:
        print(f"sockmap proxy: {exc}", file=sys.stderr)
        return 2
    done = threading.Event()

    def stop(signum: int, frame: object) -> None:
        del frame
        logging.getLogger("sockmap.proxy").info(
            "%s: no longer accepting; draining", signal.Signals(signum).name
        )
        done.set()

    def reload(signum: int, frame: object) -> None:
        del signum, frame
        if not args.config:
            logging.getLogger("sockmap.proxy").warning("SIGHUP: no --config to reload from")
            return
        try:
            proxy.set_backends(load_config(args.config).backends)
        except (ValueError, OSError) as exc:
            logging.getLogger("sockmap.proxy").warning("SIGHUP: kept the backends: %s", exc)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    try:
        proxy.start()
    except (OSError, SockmapError) as exc:
        print(f"sockmap proxy: {exc}", file=sys.stderr)
        proxy.stop(drain=False)
        return 2
    ready = "ready " + " ".join(f"{h}:{p}" for h, p in proxy.addresses)
    if proxy.metrics_address:
        ready += " metrics {}:{}".format(*proxy.metrics_address)
    print(ready, flush=True)
    # A signal may land on any thread; the main thread runs the handler only once it
    # wakes, so wait in short turns rather than block for good.
    while not done.wait(0.2):
        pass
    proxy.stop(drain=True)
    s = proxy.stats
    logging.getLogger("sockmap.proxy").info(
        "stopped: %d clients accepted, %d spliced, %d refused, %d backend failures",
        s.accepted,
        s.spliced,
        s.clients_refused,
        s.backend_failures,
    )
    return 0
