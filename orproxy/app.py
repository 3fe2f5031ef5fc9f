"""The composition root: builds the parts from the config, listens, and shuts down in stages.

Owns the listening socket, the connection tasks and the signal handlers. Shutdown: stop
accepting, close idle keep-alive connections, let running requests and streams finish
within the grace period, cancel what is left, close the upstream pool.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl

from orproxy.config import Config
from orproxy.http.handler import ConnectionHandler, Context
from orproxy.keys import KeyPool
from orproxy.metrics import Metrics
from orproxy.stream import Stream
from orproxy.upstream.exchange import Exchanger, ExchangeSettings
from orproxy.upstream.pool import UpstreamPool

log = logging.getLogger(__name__)


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The system trust store, plus an extra CA bundle when one is configured."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.set_alpn_protocols(["http/1.1"])
    return context


def build_context(config: Config) -> Context:
    o, t, r = config.openrouter, config.timeouts, config.retry
    keys = KeyPool([(k.key, k.account) for k in o.keys], strategy=o.key_selection_strategy,
                   same="same" in o.key_selection_opts)
    pool = UpstreamPool(o.base_url, tls=tls_context(o.ca_file) if o.base_url.tls else None,
                        proxy=config.request_proxy, connect_timeout=t.upstream_connect_seconds,
                        max_idle=config.limits.max_upstream_idle_connections)
    metrics = Metrics()
    metrics.watch(keys, pool)
    settings = ExchangeSettings(
        host_header=o.base_url.host_header.encode(),
        first_byte_timeout=t.upstream_first_byte_seconds,
        idle_timeout=t.upstream_idle_seconds,
        max_attempts=r.max_attempts,
        deadline_seconds=r.deadline_seconds,
        default_cooldown=o.rate_limit_cooldown,
        credit_cooldown=o.credit_cooldown_seconds,
        overload_delay=o.google_rate_delay,
    )
    exchanger = Exchanger(pool, keys, settings, on_attempt=metrics.attempt)
    return Context(config, keys, pool, exchanger, metrics)


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.ctx = build_context(config)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        server_cfg = self.config.server
        self._server = await loop.create_server(
            lambda: Stream(on_made=self._on_connection), server_cfg.host, server_cfg.port,
            reuse_address=True, backlog=1024,
        )
        o = self.config.openrouter
        log.info("listening on %s:%d; upstream %s://%s:%d%s; %d key(s) [%s]; strategy %s%s",
                 server_cfg.host, self.port, o.base_url.scheme, o.base_url.host,
                 o.base_url.port, o.base_url.path, len(o.keys),
                 ", ".join(v.id for v in self.ctx.keys.snapshot()), o.key_selection_strategy,
                 " +same" if "same" in o.key_selection_opts else "")

    def _on_connection(self, stream: Stream) -> None:
        if self.ctx.draining or len(self._tasks) >= self.config.limits.max_connections:
            stream.abort()
            return
        handler = ConnectionHandler(stream, self.ctx)
        task = asyncio.get_running_loop().create_task(handler.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        grace = self.config.timeouts.shutdown_grace_seconds
        self.ctx.draining = True
        if self._server is not None:
            self._server.close()
        for handler in list(self.ctx.handlers):
            handler.close_if_idle()
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
        self.ctx.upstream.close()
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
