"""The composition root: builds the parts from the config, listens, and shuts down in stages.

Owns the listener, the connection tasks and the signal handlers. Shutdown: stop accepting,
close idle keep-alive connections, let running requests and streams finish within the
grace period, answer 503 to what has not been answered by then, close the upstream pool.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import time

from orproxy import __version__
from orproxy.config import Config
from orproxy.keys import KeyEvent, KeyPool
from orproxy.listener import Listener, raise_fd_limit
from orproxy.observe.accounting import ModelTally
from orproxy.observe.logs import key_event_line
from orproxy.observe.metrics import Metrics
from orproxy.proxy.attempts import AttemptLoop, AttemptSettings
from orproxy.proxy.connection import ConnectionLoop
from orproxy.proxy.fetch import fetch_whole
from orproxy.proxy.models_cache import Fetched, ModelsCache
from orproxy.proxy.services import Services
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


def build_services(config: Config) -> Services:
    openrouter, timeouts, retry = config.openrouter, config.timeouts, config.retry
    keys = KeyPool([(k.key, k.account) for k in openrouter.keys],
                   strategy=openrouter.key_selection_strategy,
                   same="same" in openrouter.key_selection_opts)
    origin = openrouter.base_url
    tls = tls_context(openrouter.ca_file) if origin.tls else None

    async def dial_upstream() -> Stream:
        return await dial(origin, tls, config.request_proxy, timeouts.upstream_connect_seconds)

    pool = UpstreamPool(dial_upstream, max_idle=config.limits.max_upstream_idle_connections)
    metrics = Metrics(system=config.metrics.enable_system_metrics)
    settings = AttemptSettings(
        host_header=origin.host_header.encode(),
        first_byte_timeout=timeouts.upstream_first_byte_seconds,
        idle_timeout=timeouts.upstream_idle_seconds,
        write_timeout=timeouts.upstream_idle_seconds,
        max_attempts=retry.max_attempts,
        deadline_seconds=retry.deadline_seconds,
        default_cooldown=openrouter.rate_limit_cooldown,
        credit_cooldown=openrouter.credit_cooldown_seconds,
        overload_delay=openrouter.google_rate_delay,
    )
    attempts = AttemptLoop(pool, keys, settings, on_attempt=metrics.attempt,
                           on_first_byte=metrics.first_byte)
    models = ModelTally(allow=config.metrics.models, top_n=config.metrics.models_top_n)
    services: Services

    async def fetch_models(query: bytes) -> Fetched:
        headers = [(b"Host", settings.host_header), (b"Accept", b"application/json"),
                   (b"Accept-Encoding", b"identity"), (b"User-Agent", USER_AGENT)]
        return await fetch_whole(services.upstream, origin.path.encode() + b"/models" + query,
                                 headers, first_byte_timeout=timeouts.upstream_first_byte_seconds,
                                 idle_timeout=timeouts.upstream_idle_seconds,
                                 max_bytes=MODELS_MAX_BYTES)

    cache = ModelsCache(fetch_models, free_only=openrouter.free_only,
                        ttl_seconds=openrouter.cache_ttl if openrouter.enable_cache else 0.0,
                        max_body_bytes=MODELS_MAX_BYTES)
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


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.services = build_services(config)
        self.saver = open_state(config, self.services.keys)
        self.services.mark_state = self.saver.mark
        self.services.keys.on_change = self._key_changed
        self._listener: Listener | None = None
        self._port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        server = self.config.server
        limits = self.config.limits
        budget = raise_fd_limit(limits.max_connections, limits.max_upstream_idle_connections)
        sock = _listening_socket(server.host, server.port)
        self._port = int(sock.getsockname()[1])
        self._listener = Listener(sock, self._on_accept, cap=budget.max_connections)
        self.services.metrics.watch(self.services.keys, self.services.upstream, self._listener,
                                    self.services.models)
        self._listener.start()
        self.saver.mark(urgent=True)  # the state as reconciled with this config's keys
        o = self.config.openrouter
        log.info("listening on %s:%d; upstream %s://%s:%d%s; %d key(s) [%s]; strategy %s%s; "
                 "up to %d connections (open-file limit %d)",
                 server.host, self.port, o.base_url.scheme, o.base_url.host, o.base_url.port,
                 o.base_url.path, len(o.keys),
                 ", ".join(v.id for v in self.services.keys.snapshot()),
                 o.key_selection_strategy, " +same" if "same" in o.key_selection_opts else "",
                 budget.max_connections, budget.soft_limit)

    def _key_changed(self, event: KeyEvent) -> None:
        log_key_event(event)
        self.saver.mark(urgent=True)

    def _on_accept(self, sock: socket.socket, reserve: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(sock, reserve))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, reserve: bool) -> None:
        assert self._listener is not None
        try:
            if self.services.draining:
                sock.close()
                return
            try:
                _, stream = await asyncio.get_running_loop().connect_accepted_socket(
                    Stream, sock)
            except OSError:
                sock.close()
                return
            await ConnectionLoop(stream, self.services, reserve=reserve).run()
        finally:
            self._listener.closed()

    async def shutdown(self) -> None:
        grace = self.config.timeouts.shutdown_grace_seconds
        self.services.draining = True
        if self._listener is not None:
            self._listener.stop()
        for connection in list(self.services.connections):
            connection.close_if_idle()
        if self._tasks:
            log.info("shutting down: waiting up to %.0fs for %d connection(s)", grace,
                     len(self._tasks))
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel("shutdown grace period over")
            if pending:
                log.warning("shutdown: cut off %d connection(s) after the grace period",
                            len(pending))
                await asyncio.wait(pending, timeout=5)
        self.services.upstream.close()
        await self.services.models_cache.close()
        await self.saver.close()
        log.info("stopped")

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.shutdown()


def _listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (IPv4 or IPv6, as the host says)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock
