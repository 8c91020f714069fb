"""Prometheus metrics of a running proxy, read from its counters at each scrape."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from sockmap.proxy import Proxy

__all__ = ["ProxyCollector", "metrics_server", "registry_for"]


class ProxyCollector(Collector):
    """Everything the proxy counts, as Prometheus families (no state of its own)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        p = self.proxy
        s = p.stats
        yield CounterMetricFamily(
            "sockmap_proxy_connections_accepted", "Clients accepted.", value=s.accepted
        )
        yield GaugeMetricFamily(
            "sockmap_proxy_connections_active", "Client connections open now.", value=p.active
        )
        spliced = CounterMetricFamily(
            "sockmap_proxy_connections", "Clients connected to each backend.", labels=["backend"]
        )
        for backend, n in sorted(s.per_backend.items()):
            spliced.add_metric([backend], n)
        yield spliced
        yield CounterMetricFamily(
            "sockmap_proxy_connections_relayed",
            "Clients relayed in user space (half-closed before the splice).",
            value=s.relayed,
        )
        yield CounterMetricFamily(
            "sockmap_proxy_backend_failures",
            "Backend connection attempts that failed.",
            value=s.backend_failures,
        )
        yield CounterMetricFamily(
            "sockmap_proxy_clients_refused",
            "Clients reset because no backend answered.",
            value=s.clients_refused,
        )
        yield CounterMetricFamily(
            "sockmap_proxy_clients_over_limit",
            "Clients reset because max_pairs clients were open already.",
            value=s.over_limit,
        )
        moved = CounterMetricFamily(
            "sockmap_proxy_bytes",
            "Bytes moved, by backend and direction (up: client to backend); spliced "
            "connections count when they close, balanced messages as they pass.",
            labels=["backend", "direction"],
        )
        totals = dict(s.bytes)
        if p.balancer is not None:
            yield from self._balance(p, totals)
        for (backend, direction), n in sorted(totals.items()):
            moved.add_metric([backend, direction], n)
        yield moved
        outcomes = CounterMetricFamily(
            "sockmap_program_outcomes",
            "What each run of the proxy's programs decided (pass, drop, redirect, "
            "redirect_miss: target key empty; parsers: message, need_more, parser_error).",
            labels=["map", "program", "outcome"],
        )
        map_name = str(getattr(p.splicer.sockmap, "name", "") or "sockmap")
        for prog, counts in sorted(p.splicer.program_counters.snapshot().items()):
            for outcome, n in counts.items():
                outcomes.add_metric([map_name, prog, outcome], n)
        yield outcomes
        sp = p.splicer.stats
        yield CounterMetricFamily(
            "sockmap_proxy_resets", "Connections reset (an error on either side).", value=sp.resets
        )
        yield CounterMetricFamily(
            "sockmap_proxy_idle_closed",
            "Client connections closed after idle_timeout without a byte either way.",
            value=sp.idle_closed,
        )
        yield CounterMetricFamily(
            "sockmap_proxy_fins_forced",
            "Half-closes forwarded after fin_timeout without progress.",
            value=sp.fins_forced,
        )

    @staticmethod
    def _balance(p: Proxy, totals: dict[tuple[str, str], int]) -> Iterator[CounterMetricFamily]:
        """Balance mode's families, from the verdict's counters; adds its bytes to totals."""
        bal = p.balancer
        assert bal is not None
        c = bal.read_counters()
        messages = CounterMetricFamily(
            "sockmap_proxy_messages",
            "Messages moved, by backend and direction (up: requests to the backend).",
            labels=["backend", "direction"],
        )
        for j, name in enumerate(p.positions):
            label = name or f"removed-{j}"
            for direction, (m, b) in (("up", c.requests[j]), ("down", c.responses[j])):
                messages.add_metric([label, direction], m)
                totals[label, direction] = totals.get((label, direction), 0) + b
        yield messages
        yield CounterMetricFamily(
            "sockmap_proxy_messages_dropped",
            "Client messages dropped because none of its backend connections was left.",
            value=c.dropped[0],
        )
        yield CounterMetricFamily(
            "sockmap_proxy_parser_errors",
            "Clients closed for a malformed or oversized message (EBADMSG, EMSGSIZE).",
            value=bal.stats.parser_errors,
        )
        yield CounterMetricFamily(
            "sockmap_proxy_message_timeouts",
            "Clients reset for a message left incomplete past message_timeout.",
            value=bal.stats.message_timeouts,
        )
        yield CounterMetricFamily(
            "sockmap_proxy_backend_closes",
            "Backend connections that closed or failed while their client was open.",
            value=bal.stats.backend_closes,
        )


def registry_for(proxy: Proxy) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ProxyCollector(proxy))
    return registry


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        """Scrapes are not worth a line on stderr each."""


def metrics_server(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """A bound (not yet serving) HTTP server for ``registry`` at /metrics: the caller runs
    ``serve_forever`` in a thread, so binding can happen before a privilege drop and
    serving after it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    return make_server(host, port, make_wsgi_app(registry), server_class, _QuietHandler)
