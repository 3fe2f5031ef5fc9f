"""Prometheus metrics on a private registry.

Counters and histograms are updated at phase boundaries by the connection loop (label
children cached: ``.labels()`` costs a lock and a dict per call). Key, model, pool and
listener state are read from their snapshots at scrape time by one collector, so none of
them imports prometheus_client. Totals the dashboard shows are kept as plain numbers beside
the counters, never read back from the registry. Names follow Prometheus conventions
(``orproxy_`` prefix, ``_total``, base units); label values are bounded: route names,
methods, status classes, attempt outcomes, key ids (never keys), bounded model labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from orproxy import __version__
from orproxy.keys import KeyPool, KeyState
from orproxy.listener import Listener
from orproxy.observe.accounting import ModelTally
from orproxy.observe.timeseries import TimeSeries
from orproxy.upstream.pool import UpstreamPool

# LLM latencies: a cached answer in milliseconds, a reasoning model in minutes
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20,
                   30, 60, 120, 300, 600)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
TOKEN_KINDS = ("prompt", "completion", "cached", "cache_write", "reasoning")


@dataclass(frozen=True)
class ProxyCounts:
    """Plain numbers from the proxy layer, read at scrape time."""

    sticky_conversations: int = 0
    sticky_hits: int = 0
    sticky_misses: int = 0
    sticky_moved: int = 0  # a conversation's key could not serve it: another took over
    stream_failovers: int = 0  # stream errors before content sent to the next key
    quota_checks_ok: int = 0
    quota_checks_failed: int = 0
    quota: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Totals:
    open_connections: int
    body_bytes_in: int
    body_bytes_out: int
    requests: int


class Metrics:
    def __init__(self, *, system: bool = False) -> None:
        # no *_created series: they double the text and say little
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter("orproxy_requests", "Requests answered, by route, method and "
                                 "status class", ["route", "method", "status"], registry=r)
        self._duration = Histogram("orproxy_request_duration_seconds", "Time from request "
                                   "head to the end of the response", ["route"], registry=r,
                                   buckets=LATENCY_BUCKETS)
        self._ttfb = Histogram("orproxy_upstream_first_byte_seconds", "Time from sending a "
                               "request upstream to its response head", registry=r,
                               buckets=LATENCY_BUCKETS)
        self._attempts = Counter("orproxy_upstream_attempts", "Upstream attempts by outcome",
                                 ["outcome"], registry=r)
        self._bytes_in = Counter("orproxy_request_body_bytes", "Request body bytes received "
                                 "from clients", registry=r)
        self._bytes_out = Counter("orproxy_response_body_bytes", "Upstream body bytes relayed "
                                  "to clients", registry=r)
        self._open = Gauge("orproxy_client_connections", "Open client connections", registry=r)
        self._accepted = Counter("orproxy_client_connections_accepted", "Client connections "
                                 "accepted", registry=r)
        info = Gauge("orproxy_build_info", "Always 1; the version as a label", ["version"],
                     registry=r)
        info.labels(__version__).set(1)
        ProcessCollector(registry=r)
        self.series = TimeSeries()
        self._system = system
        self._children: dict[tuple[str, bytes, int],
                             tuple[Callable[[], None], Callable[[float], None]]] = {}
        self._attempt_children: dict[str, Callable[[], None]] = {}
        self._open_count = 0
        self._bytes_in_count = 0
        self._bytes_out_count = 0
        self._request_count = 0

    def watch(self, keys: KeyPool, pool: Callable[[], UpstreamPool], listener: Listener,
              models: ModelTally, counts: Callable[[], ProxyCounts] = ProxyCounts) -> None:
        self.registry.register(_StateCollector(keys, pool, listener, models, counts,
                                               self._system))

    # --- the hot path --------------------------------------------------------------------------

    def connection_opened(self) -> None:
        self._open.inc()
        self._accepted.inc()
        self._open_count += 1

    def connection_closed(self) -> None:
        self._open.dec()
        self._open_count -= 1

    def request_done(self, route: str, method: bytes, status: int, seconds: float) -> None:
        pair = self._children.get((route, method, status))
        if pair is None:
            name = method.decode("latin-1")
            cls = f"{status // 100}xx" if status else "none"
            pair = (self._requests.labels(route, name if name in METHODS else "other",
                                          cls).inc,
                    self._duration.labels(route).observe)
            self._children[(route, method, status)] = pair
        pair[0]()
        pair[1](seconds)
        self._request_count += 1
        if route == "forward":  # the charts show traffic, not the dashboard's own polls
            self.series.record(time.time(), status, seconds)

    def attempt(self, outcome: str) -> None:
        inc = self._attempt_children.get(outcome)
        if inc is None:
            inc = self._attempt_children[outcome] = self._attempts.labels(outcome).inc
        inc()

    def first_byte(self, seconds: float) -> None:
        self._ttfb.observe(seconds)

    def bytes_received(self, n: int) -> None:
        if n:
            self._bytes_in.inc(n)
            self._bytes_in_count += n

    def bytes_sent(self, n: int) -> None:
        if n:
            self._bytes_out.inc(n)
            self._bytes_out_count += n

    # --- reading -------------------------------------------------------------------------------

    def totals(self) -> Totals:
        return Totals(self._open_count, self._bytes_in_count, self._bytes_out_count,
                      self._request_count)

    def render(self, accept: bytes = b"") -> tuple[bytes, bytes]:
        """(content type, exposition): OpenMetrics when the scraper asks for it."""
        if b"application/openmetrics-text" in accept:
            body: bytes = openmetrics.generate_latest(self.registry)  # type: ignore[no-untyped-call]
            return openmetrics.CONTENT_TYPE_LATEST.encode(), body
        return CONTENT_TYPE_LATEST.encode(), generate_latest(self.registry)


class _StateCollector(Collector):
    """Key, model, pool, listener and system state, read from snapshots at scrape time."""

    def __init__(self, keys: KeyPool, pool: Callable[[], UpstreamPool], listener: Listener,
                 models: ModelTally, counts: Callable[[], ProxyCounts], system: bool) -> None:
        self._keys = keys
        self._pool = pool  # the pool in use now (a reload may replace it)
        self._listener = listener
        self._models = models
        self._counts = counts
        self._system = system

    def collect(self) -> Iterator[Metric]:
        yield from self._key_metrics()
        yield from self._model_metrics()
        yield from self._connection_metrics()
        yield from self._proxy_metrics()
        if self._system:
            yield from _system_metrics()

    def _key_metrics(self) -> Iterator[Metric]:
        views = self._keys.snapshot()
        states = GaugeMetricFamily("orproxy_keys", "Upstream keys by state", labels=["state"])
        for name, count in self._keys.counts().items():
            states.add_metric([name], count)
        yield states
        state = GaugeMetricFamily("orproxy_key_state", "1 for the state each key is in",
                                  labels=["key_id", "state"])
        available = GaugeMetricFamily("orproxy_key_available", "1 if the key is in rotation "
                                      "now", labels=["key_id"])
        cooling = GaugeMetricFamily("orproxy_key_cooldown_seconds", "Seconds until the key "
                                    "returns", labels=["key_id"])
        rest_end = GaugeMetricFamily("orproxy_key_rest_until_timestamp_seconds", "When the "
                                     "key's rest ends (Unix time; 0 when not resting)",
                                     labels=["key_id"])
        requests = CounterMetricFamily("orproxy_key_requests", "Upstream attempts made with "
                                       "the key", labels=["key_id"])
        successes = CounterMetricFamily("orproxy_key_successes", "Answers delivered whole "
                                        "(2xx, no in-band error)", labels=["key_id"])
        limited = CounterMetricFamily("orproxy_key_rate_limited", "429s the key got (HTTP or "
                                      "in-band)", labels=["key_id"])
        errors = CounterMetricFamily("orproxy_key_errors", "Failed attempts and in-band errors "
                                     "by kind (status, timeout, connect_error, in_band_…)",
                                     labels=["key_id", "kind"])
        tokens = CounterMetricFamily("orproxy_key_tokens", "Tokens OpenRouter reported for the "
                                     "key's answers", labels=["key_id", "kind"])
        cost = CounterMetricFamily("orproxy_key_cost_usd", "Cost OpenRouter reported for the "
                                   "key's answers, in US dollars", labels=["key_id"])
        for view in views:
            kid, stats = view.id, view.stats
            for each in KeyState:
                state.add_metric([kid, each.value], 1.0 if view.state is each else 0.0)
            available.add_metric([kid], 1.0 if view.state is KeyState.AVAILABLE else 0.0)
            cooling.add_metric([kid], view.cooling_seconds)
            rest_end.add_metric([kid], view.rest_until)
            requests.add_metric([kid], stats.requests)
            successes.add_metric([kid], stats.successes)
            limited.add_metric([kid], stats.rate_limited)
            for kind, count in sorted(stats.errors_by_kind.items()):
                errors.add_metric([kid, kind], count)
            for kind, count in zip(TOKEN_KINDS, _tokens(stats), strict=True):
                tokens.add_metric([kid, kind], count)
            cost.add_metric([kid], stats.cost)
        yield from (state, available, cooling, rest_end, requests, successes, limited, errors,
                    tokens, cost)

    def _model_metrics(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("orproxy_model_requests", "Answered requests by model "
                                       "(bounded: the allow-list or the first N, else other)",
                                       labels=["model"])
        tokens = CounterMetricFamily("orproxy_model_tokens", "Tokens by model",
                                     labels=["model", "kind"])
        cost = CounterMetricFamily("orproxy_model_cost_usd", "Cost by model, in US dollars",
                                   labels=["model"])
        for label, tally in self._models.snapshot().items():
            requests.add_metric([label], tally.requests)
            for kind, count in zip(TOKEN_KINDS, _tokens(tally), strict=True):
                tokens.add_metric([label, kind], count)
            cost.add_metric([label], tally.cost)
        total = self._models.total
        all_tokens = CounterMetricFamily("orproxy_tokens", "Tokens of every answer",
                                         labels=["kind"])
        for kind, count in zip(TOKEN_KINDS, _tokens(total), strict=True):
            all_tokens.add_metric([kind], count)
        all_cost = CounterMetricFamily("orproxy_cost_usd", "Cost of every answer, in US dollars",
                                       value=total.cost)
        yield from (requests, tokens, cost, all_tokens, all_cost)

    def _connection_metrics(self) -> Iterator[Metric]:
        snap = self._pool().snapshot()
        conns = GaugeMetricFamily("orproxy_upstream_connections", "Upstream connections by "
                                  "state", labels=["state"])
        conns.add_metric(["idle"], snap.idle)
        conns.add_metric(["active"], snap.active)
        opened = CounterMetricFamily("orproxy_upstream_connections_opened", "Upstream "
                                     "connections dialled",
                                     value=snap.opened)
        dropped = CounterMetricFamily("orproxy_upstream_idle_dropped", "Idle upstream "
                                      "connections closed because the upstream closed them",
                                      value=snap.dropped_idle)
        listen = self._listener.snapshot()
        cap = GaugeMetricFamily("orproxy_client_connection_limit", "Client connections "
                                "served at once (from max_connections and the open-file limit)",
                                value=listen.cap)
        paused = GaugeMetricFamily("orproxy_accept_paused", "1 while new connections wait in "
                                   "the backlog",
                                   value=1.0 if listen.paused else 0.0)
        stops = CounterMetricFamily("orproxy_accept_pauses", "Times accepting stopped",
                                    labels=["reason"])
        stops.add_metric(["connection_cap"], listen.paused_at_cap)
        stops.add_metric(["out_of_descriptors"], listen.exhausted)
        yield from (conns, opened, dropped, cap, paused, stops)

    def _proxy_metrics(self) -> Iterator[Metric]:
        counts = self._counts()
        conversations = GaugeMetricFamily("orproxy_sticky_conversations", "Conversations "
                                          "remembered with their key",
                                          value=counts.sticky_conversations)
        sticky = CounterMetricFamily("orproxy_sticky_lookups", "Requests of a conversation by "
                                     "what the sticky map knew (hit: its key was known)",
                                     labels=["result"])
        sticky.add_metric(["hit"], counts.sticky_hits)
        sticky.add_metric(["miss"], counts.sticky_misses)
        moved = CounterMetricFamily("orproxy_sticky_moved", "Conversations whose key could "
                                    "not serve them, moved to another key",
                                    value=counts.sticky_moved)
        failovers = CounterMetricFamily("orproxy_stream_failovers", "Streams that failed before "
                                        "their first content and went to another key",
                                        value=counts.stream_failovers)
        checks = CounterMetricFamily("orproxy_quota_checks", "Background GET /api/v1/key "
                                     "checks by result", labels=["result"])
        checks.add_metric(["ok"], counts.quota_checks_ok)
        checks.add_metric(["error"], counts.quota_checks_failed)
        free = GaugeMetricFamily("orproxy_key_free_requests_remaining", "Free-model requests "
                                 "left today, as the last quota check said", labels=["key_id"])
        left = GaugeMetricFamily("orproxy_key_limit_remaining_usd", "The key's spending limit "
                                 "left, as the last quota check said", labels=["key_id"])
        for kid, quota in sorted(counts.quota.items()):
            if quota.get("free_requests_remaining") is not None:
                free.add_metric([kid], float(quota["free_requests_remaining"] or 0.0))
            if quota.get("limit_remaining") is not None:
                left.add_metric([kid], float(quota["limit_remaining"] or 0.0))
        yield from (conversations, sticky, moved, failovers, checks, free, left)


def _tokens(stats: object) -> tuple[int, int, int, int, int]:
    get = stats.__getattribute__
    return (get("prompt_tokens"), get("completion_tokens"), get("cached_tokens"),
            get("cache_write_tokens"), get("reasoning_tokens"))


def _system_metrics() -> Iterator[Metric]:
    import psutil  # loaded on the first scrape, not at start

    cpu = GaugeMetricFamily("orproxy_system_cpu_utilization_ratio", "Whole-machine CPU "
                            "use since the previous scrape (0-1)",
                            value=psutil.cpu_percent(interval=None) / 100.0)
    memory = psutil.virtual_memory()
    used = GaugeMetricFamily("orproxy_system_memory_used_bytes", "Memory in use on the "
                             "machine",
                             value=float(memory.total - memory.available))
    total = GaugeMetricFamily("orproxy_system_memory_total_bytes", "Memory of the machine",
                              value=float(memory.total))
    yield from (cpu, used, total)
