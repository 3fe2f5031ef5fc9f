"""Prometheus metrics on a private registry.

Counters and histograms are updated at phase boundaries by the connection loop; key, pool
and listener state are read from their ``snapshot()`` at scrape time by collectors, so none
of them imports prometheus_client. Totals the dashboard shows are kept as plain numbers
beside the counters (``totals()``), never read back from the registry. Label values are
bounded: route names, status classes, attempt outcomes, key ids (never keys).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orproxy.keys import KeyPool, KeyState
from orproxy.listener import Listener
from orproxy.upstream.pool import UpstreamPool

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60, 120, 300, 600)


@dataclass(frozen=True)
class Totals:
    open_connections: int
    body_bytes: int


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter("orproxy_requests", "Requests answered, by route and status "
                                 "class", ["route", "status"], registry=r)
        self._duration = Histogram("orproxy_request_duration_seconds", "Time from request head "
                                   "to the end of the response", ["route"], registry=r,
                                   buckets=LATENCY_BUCKETS)
        self._attempts = Counter("orproxy_upstream_attempts", "Upstream attempts by outcome",
                                 ["outcome"], registry=r)
        self._bytes = Counter("orproxy_response_body_bytes", "Upstream body bytes relayed to "
                              "clients", registry=r)
        self._open = Gauge("orproxy_client_connections", "Open client connections", registry=r)
        self._accepted = Counter("orproxy_client_connections_accepted", "Client connections "
                                 "accepted", registry=r)
        ProcessCollector(registry=r)
        # label children looked up once: .labels() costs a lock and a dict build per call
        self._children: dict[tuple[str, int], tuple[Callable[[], None],
                                                    Callable[[float], None]]] = {}
        self._attempt_children: dict[str, Callable[[], None]] = {}
        self._open_count = 0
        self._body_bytes = 0

    def watch(self, keys: KeyPool, pool: UpstreamPool, listener: Listener) -> None:
        self.registry.register(_StateCollector(keys, pool, listener))

    def connection_opened(self) -> None:
        self._open.inc()
        self._accepted.inc()
        self._open_count += 1

    def connection_closed(self) -> None:
        self._open.dec()
        self._open_count -= 1

    def totals(self) -> Totals:
        return Totals(self._open_count, self._body_bytes)

    def request_done(self, route: str, status: int, seconds: float) -> None:
        pair = self._children.get((route, status))
        if pair is None:
            cls = f"{status // 100}xx" if status else "none"
            pair = (self._requests.labels(route, cls).inc, self._duration.labels(route).observe)
            self._children[(route, status)] = pair
        pair[0]()
        pair[1](seconds)

    def attempt(self, outcome: str) -> None:
        inc = self._attempt_children.get(outcome)
        if inc is None:
            inc = self._attempt_children[outcome] = self._attempts.labels(outcome).inc
        inc()

    def bytes_sent(self, n: int) -> None:
        if n:
            self._bytes.inc(n)
            self._body_bytes += n

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, keys: KeyPool, pool: UpstreamPool, listener: Listener) -> None:
        self._keys = keys
        self._pool = pool
        self._listener = listener

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily("orproxy_keys", "Upstream keys by state", labels=["state"])
        for state, count in self._keys.counts().items():
            states.add_metric([state], count)
        yield states
        per_key = GaugeMetricFamily("orproxy_key_available", "1 if the key is in rotation now",
                                    labels=["key_id"])
        cooling = GaugeMetricFamily("orproxy_key_cooldown_seconds", "Seconds until the key "
                                    "returns", labels=["key_id"])
        uses = CounterMetricFamily("orproxy_key_uses", "Attempts made with the key",
                                   labels=["key_id"])
        for view in self._keys.snapshot():
            per_key.add_metric([view.id], 1.0 if view.state is KeyState.AVAILABLE else 0.0)
            cooling.add_metric([view.id], view.cooling_seconds)
            uses.add_metric([view.id], view.uses)
        yield per_key
        yield cooling
        yield uses
        snap = self._pool.snapshot()
        conns = GaugeMetricFamily("orproxy_upstream_connections", "Upstream connections",
                                  labels=["state"])
        conns.add_metric(["idle"], snap.idle)
        conns.add_metric(["active"], snap.active)
        yield conns
        opened = CounterMetricFamily("orproxy_upstream_connections_opened", "Upstream "
                                     "connections dialled")
        opened.add_metric([], snap.opened)
        yield opened
        dropped = CounterMetricFamily("orproxy_upstream_idle_dropped", "Idle upstream "
                                      "connections closed because the upstream closed them")
        dropped.add_metric([], snap.dropped_idle)
        yield dropped
        listen = self._listener.snapshot()
        cap = GaugeMetricFamily("orproxy_client_connection_limit", "Client connections "
                                "served at once (from max_connections and the open-file limit)")
        cap.add_metric([], listen.cap)
        yield cap
        paused = GaugeMetricFamily("orproxy_accept_paused", "1 while new connections wait in "
                                   "the backlog")
        paused.add_metric([], 1.0 if listen.paused else 0.0)
        yield paused
        stops = CounterMetricFamily("orproxy_accept_pauses", "Times accepting stopped",
                                    labels=["reason"])
        stops.add_metric(["connection_cap"], listen.paused_at_cap)
        stops.add_metric(["out_of_descriptors"], listen.exhausted)
        yield stops
