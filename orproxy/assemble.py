"""Assembling the parts from a config: the key pool, the upstream pool, the attempt loop,
the models cache, the metrics, the state saver. Used at start and again on a reload (only
the parts whose settings changed are rebuilt).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

from orproxy import __version__
from orproxy.config import Config
from orproxy.keys import KeyEvent, KeyPool
from orproxy.observe.accounting import ModelTally
from orproxy.observe.logs import key_event_line
from orproxy.observe.metrics import Metrics
from orproxy.proxy.attempts import AttemptLoop, AttemptSettings
from orproxy.proxy.fetch import fetch_whole
from orproxy.proxy.models_cache import Fetched, ModelsCache
from orproxy.proxy.services import Services
from orproxy.proxy.sticky import StickyMap
from orproxy.state import FileStore, MemoryStore, Snapshot, StateSaver, StateStore
from orproxy.state.keys import from_snapshot, to_records
from orproxy.stream import Stream
from orproxy.upstream.dial import dial
from orproxy.upstream.pool import UpstreamPool

log = logging.getLogger(__name__)

USER_AGENT = f"orproxy/{__version__}".encode()
MODELS_MAX_BYTES = 16 * 1024 * 1024


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The system trust store, plus an extra CA bundle when one is configured."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.set_alpn_protocols(["http/1.1"])
    return context


def make_key_pool(config: Config) -> KeyPool:
    openrouter = config.openrouter
    return KeyPool(key_list(config), strategy=openrouter.key_selection_strategy,
                   same="same" in openrouter.key_selection_opts)


def key_list(config: Config) -> list[tuple[str, str | None]]:
    return [(k.key, k.account) for k in config.openrouter.keys]


def make_sticky(config: Config) -> StickyMap | None:
    openrouter = config.openrouter
    if not openrouter.sticky_sessions:
        return None
    return StickyMap(ttl_seconds=openrouter.sticky_ttl_seconds,
                     capacity=openrouter.sticky_max_conversations)


def sticky_changed(old: Config, new: Config) -> bool:
    a, b = old.openrouter, new.openrouter
    return ((a.sticky_sessions, a.sticky_ttl_seconds, a.sticky_max_conversations)
            != (b.sticky_sessions, b.sticky_ttl_seconds, b.sticky_max_conversations))


def make_upstream_pool(config: Config) -> UpstreamPool:
    origin = config.openrouter.base_url
    tls = tls_context(config.openrouter.ca_file) if origin.tls else None
    proxy, connect_timeout = config.request_proxy, config.timeouts.upstream_connect_seconds

    async def dial_upstream() -> Stream:
        return await dial(origin, tls, proxy, connect_timeout)

    return UpstreamPool(dial_upstream, max_idle=config.limits.max_upstream_idle_connections)


def upstream_changed(old: Config, new: Config) -> bool:
    """Whether the upstream pool must be rebuilt for ``new``."""
    a, b = old.openrouter, new.openrouter
    return ((a.base_url, a.ca_file, old.request_proxy, old.timeouts.upstream_connect_seconds,
             old.limits.max_upstream_idle_connections)
            != (b.base_url, b.ca_file, new.request_proxy, new.timeouts.upstream_connect_seconds,
                new.limits.max_upstream_idle_connections))


def attempt_settings(config: Config) -> AttemptSettings:
    openrouter, timeouts, retry = config.openrouter, config.timeouts, config.retry
    return AttemptSettings(
        host_header=openrouter.base_url.host_header.encode(),
        first_byte_timeout=timeouts.upstream_first_byte_seconds,
        idle_timeout=timeouts.upstream_idle_seconds,
        write_timeout=timeouts.upstream_idle_seconds,
        max_attempts=retry.max_attempts,
        deadline_seconds=retry.deadline_seconds,
        default_cooldown=openrouter.rate_limit_cooldown,
        credit_cooldown=openrouter.credit_cooldown_seconds,
        overload_delay=openrouter.google_rate_delay,
        commit_seconds=openrouter.stream_commit_seconds,
    )


def make_models_cache(config: Config, pool: Callable[[], UpstreamPool]) -> ModelsCache:
    """The cache fetches through ``pool()``, the upstream pool as it is at each fetch (a
    reload may replace it)."""
    openrouter, timeouts = config.openrouter, config.timeouts
    host = openrouter.base_url.host_header.encode()
    target = openrouter.base_url.path.encode() + b"/models"

    async def fetch_models(query: bytes) -> Fetched:
        headers = [(b"Host", host), (b"Accept", b"application/json"),
                   (b"Accept-Encoding", b"identity"), (b"User-Agent", USER_AGENT)]
        return await fetch_whole(pool(), target + query, headers,
                                 first_byte_timeout=timeouts.upstream_first_byte_seconds,
                                 idle_timeout=timeouts.upstream_idle_seconds,
                                 max_bytes=MODELS_MAX_BYTES)

    return ModelsCache(fetch_models, free_only=openrouter.free_only,
                       ttl_seconds=openrouter.cache_ttl if openrouter.enable_cache else 0.0,
                       max_body_bytes=MODELS_MAX_BYTES)


def cache_changed(old: Config, new: Config) -> bool:
    a, b = old.openrouter, new.openrouter
    return ((a.enable_cache, a.cache_ttl, a.free_only, a.base_url)
            != (b.enable_cache, b.cache_ttl, b.free_only, b.base_url))


def build_services(config: Config) -> Services:
    keys = make_key_pool(config)
    pool = make_upstream_pool(config)
    metrics = Metrics(system=config.metrics.enable_system_metrics)
    attempts = AttemptLoop(pool, keys, attempt_settings(config), on_attempt=metrics.attempt,
                           on_first_byte=metrics.first_byte)
    attempts.sticky = make_sticky(config)
    models = ModelTally(allow=config.metrics.models, top_n=config.metrics.models_top_n)
    services: Services
    cache = make_models_cache(config, lambda: services.upstream)
    services = Services(config, keys, pool, attempts, metrics, models, cache)
    return services


def open_state(config: Config, keys: KeyPool) -> StateSaver:
    """Load the saved key state into the pool and return the saver that keeps it."""
    store: StateStore = FileStore(config.state.file) if config.state.file else MemoryStore()
    restored = keys.restore(from_snapshot(store.load()),
                            max_rest_seconds=max(config.openrouter.rate_limit_cooldown,
                                                 config.openrouter.credit_cooldown_seconds,
                                                 31 * 86400.0))
    if config.state.file:
        log.info("key state: %s (%d key(s) restored)", config.state.file, restored)

    def export() -> Snapshot:
        return Snapshot(to_records(keys.export(), time.time()))

    return StateSaver(store, export, counters_interval=config.state.counters_interval_seconds)


def log_key_event(event: KeyEvent) -> None:
    """A key's every change of state is one line: journalctl shows why traffic moved."""
    level, message, fields = key_event_line(event)
    logging.getLogger("orproxy.keys").log(level, message, extra={"fields": fields})


# Settings a reload cannot change in a running process: they take effect after a restart.
RESTART_ONLY: dict[str, Callable[[Config], object]] = {
    "server.host": lambda c: c.server.host,
    "server.port": lambda c: c.server.port,
    "server.log_format": lambda c: c.server.log_format,
    "state.file": lambda c: c.state.file,
    "metrics.enable_system_metrics": lambda c: c.metrics.enable_system_metrics,
    "metrics.models": lambda c: c.metrics.models,
    "metrics.models_top_n": lambda c: c.metrics.models_top_n,
}


def restart_only_changes(old: Config, new: Config) -> list[str]:
    return [name for name, get in RESTART_ONLY.items() if get(old) != get(new)]
