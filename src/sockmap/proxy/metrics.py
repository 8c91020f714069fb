"""Prometheus metrics of a running proxy, read from its counters at each scrape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from sockmap.proxy import SpliceProxy

__all__ = ["ProxyCollector", "registry_for"]


class ProxyCollector(Collector):
    """Everything the proxy counts, as Prometheus families (no state of its own)."""

    def __init__(self, proxy: SpliceProxy) -> None:
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
        moved = CounterMetricFamily(
            "sockmap_proxy_bytes",
            "Bytes moved, by backend and direction (up: client to backend); spliced "
            "connections count when they close.",
            labels=["backend", "direction"],
        )
        for (backend, direction), n in sorted(s.bytes.items()):
            moved.add_metric([backend, direction], n)
        yield moved
        sp = p.splicer.stats
        yield CounterMetricFamily(
            "sockmap_proxy_resets", "Connections reset (an error on either side).", value=sp.resets
        )
        yield CounterMetricFamily(
            "sockmap_proxy_fins_forced",
            "Half-closes forwarded after fin_timeout without progress.",
            value=sp.fins_forced,
        )


def registry_for(proxy: SpliceProxy) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ProxyCollector(proxy))
    return registry
