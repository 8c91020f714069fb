"""``sockmap proxy``: run the splicing proxy until SIGTERM or SIGINT, then drain."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from sockmap.errors import SockmapError
from sockmap.proxy import ProxyConfig, SpliceProxy, load_config

__all__ = ["add_arguments", "run"]

EXAMPLES = """\
examples:
  sockmap proxy --listen 127.0.0.1:8080 --backend 127.0.0.1:9001 --backend 127.0.0.1:9002
  sockmap proxy --listen [::1]:8080 --backend [::1]:9001 --engine userspace
  sockmap proxy --config proxy.toml      # SIGHUP re-reads its backends

proxy.toml:
  listen = ["127.0.0.1:8080"]
  backends = ["127.0.0.1:9001", "127.0.0.1:9002"]
  mode = "splice"
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
        "balance: each message to a backend by policy (not implemented yet)",
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
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING... (INFO)")


def _config(args: argparse.Namespace) -> ProxyConfig:
    cfg = load_config(args.config) if args.config else ProxyConfig(metrics="127.0.0.1:9101")
    if args.listen:
        cfg.listen = args.listen
    if args.backend:
        cfg.backends = args.backend
    for name in ("mode", "engine", "connect_timeout", "drain_timeout", "metrics"):
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
        proxy = SpliceProxy(cfg)
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
    proxy.start()
    ready = "ready " + " ".join(f"{h}:{p}" for h, p in proxy.addresses)
    if proxy.metrics_address:
        ready += " metrics {}:{}".format(*proxy.metrics_address)
    print(ready, flush=True)
    done.wait()
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
