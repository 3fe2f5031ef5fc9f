"""The running proxy: listens, reloads its config on SIGHUP, and shuts down in stages.

Owns the listener, the connection tasks and the signal handlers. Shutdown: stop accepting,
close idle keep-alive connections, let running requests and streams finish within the
grace period, answer 503 to what has not been answered by then, close the upstream pool,
save the key state. A reload re-reads the config; an invalid one is refused with every
problem logged and the old one stays in force; a valid one is applied without dropping a
connection: kept keys keep their state, in-flight requests finish on what they started
with, and what changed is rebuilt.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from orproxy.assemble import (
    attempt_settings,
    build_services,
    cache_changed,
    key_list,
    log_key_event,
    make_models_cache,
    make_sticky,
    make_upstream_pool,
    open_state,
    restart_only_changes,
    sticky_changed,
    upstream_changed,
)
from orproxy.config import Config, ConfigError
from orproxy.keys import KeyEvent
from orproxy.listener import Listener, fd_budget_now, raise_fd_limit
from orproxy.observe.metrics import ProxyCounts
from orproxy.proxy.connection import ConnectionLoop
from orproxy.proxy.quota import QuotaPoller, view_of
from orproxy.stream import Stream

log = logging.getLogger(__name__)


class App:
    def __init__(self, config: Config, reload: Callable[[], Config] | None = None) -> None:
        self.config = config
        self._reload_config = reload  # re-reads the config (file, environment, flags)
        self.services = build_services(config)
        self.saver = open_state(config, self.services.keys)
        self.services.mark_state = self.saver.mark
        self.services.keys.on_change = self._key_changed
        self._listener: Listener | None = None
        self._port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._retired: set[asyncio.Task[None]] = set()
        self.quota = QuotaPoller(self.services)
        self.services.quota_view = self._quota_view
        self._quota_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        server = self.config.server
        limits = self.config.limits
        budget = raise_fd_limit(limits.max_connections, limits.max_upstream_idle_connections)
        try:
            sock = _listening_socket(server.host, server.port)
        except OSError as exc:
            raise StartError(_listen_problem(server.host, server.port, exc)) from exc
        self._port = self.services.listen_port = int(sock.getsockname()[1])
        self._listener = Listener(sock, self._on_accept, cap=budget.max_connections)
        services = self.services
        services.metrics.watch(services.keys, lambda: services.upstream, self._listener,
                               services.models, self._counts)
        self._listener.start()
        self.saver.mark(urgent=True)  # the state as reconciled with this config's keys
        self._start_quota_checks()
        o = self.config.openrouter
        log.info("listening on %s:%d; upstream %s://%s:%d%s; %d key(s) [%s]; strategy %s%s; "
                 "up to %d connections (open-file limit %d)",
                 server.host, self.port, o.base_url.scheme, o.base_url.host, o.base_url.port,
                 o.base_url.path, len(o.keys),
                 ", ".join(v.id for v in self.services.keys.snapshot()),
                 o.key_selection_strategy, " +same" if "same" in o.key_selection_opts else "",
                 budget.max_connections, budget.soft_limit)

    def _counts(self) -> ProxyCounts:
        attempts = self.services.attempts
        sticky = attempts.sticky
        return ProxyCounts(
            sticky_conversations=len(sticky) if sticky else 0,
            sticky_hits=sticky.hits if sticky else 0,
            sticky_misses=sticky.misses if sticky else 0,
            sticky_moved=attempts.sticky_moved, stream_failovers=attempts.failed_over_early,
            quota_checks_ok=self.quota.results["ok"],
            quota_checks_failed=self.quota.results["error"],
            quota=self._quota_view())

    def _quota_view(self) -> dict[str, dict[str, float | None]]:
        return view_of(self.quota, {key.id for key in self.services.keys})

    def _start_quota_checks(self) -> None:
        if self._quota_task is not None:
            self._quota_task.cancel()
            self._quota_task = None
        interval = self.config.openrouter.quota_check_seconds
        if interval > 0:
            self._quota_task = asyncio.get_running_loop().create_task(self.quota.run(interval))

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

    # --- reload ------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config and apply it; False (old config kept) if it is invalid."""
        if self._reload_config is None:
            log.warning("reload: no config source to re-read")
            return False
        try:
            new = self._reload_config()
        except ConfigError as exc:
            # one line each: journald and line-based tools keep every problem at ERROR
            log.error("reload refused; the running configuration stays in force "
                      "(%d problem(s))", len(exc.problems))
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            return False
        self.apply(new)
        return True

    def apply(self, new: Config) -> None:
        old, services = self.config, self.services
        for name in restart_only_changes(old, new):
            log.warning("reload: %s changed; it takes effect after a restart", name)
        before = {v.id for v in services.keys.snapshot()}
        openrouter = new.openrouter
        services.keys.reconfigure(key_list(new), strategy=openrouter.key_selection_strategy,
                                  same="same" in openrouter.key_selection_opts)
        services.configure(new)
        services.attempts.settings = attempt_settings(new)
        if sticky_changed(old, new):
            services.attempts.sticky = make_sticky(new)
        if upstream_changed(old, new):
            retired = services.upstream
            services.upstream = services.attempts.pool = make_upstream_pool(new)
            retired.close()  # idle ones now; busy ones are closed when their request ends
        if cache_changed(old, new):
            retired_cache = services.models_cache
            services.models_cache = make_models_cache(new, lambda: services.upstream)
            self._retire(retired_cache.close())
        if self._listener is not None:
            self._listener.cap = fd_budget_now(new.limits.max_connections,
                                               new.limits.max_upstream_idle_connections)
        logging.getLogger().setLevel(new.server.log_level)
        logging.getLogger("orproxy.access").setLevel(new.server.http_log_level)
        quota_changed = (old.openrouter.quota_check_seconds
                         != new.openrouter.quota_check_seconds)
        self.config = new
        if quota_changed:
            self._start_quota_checks()
        self.saver.mark(urgent=True)
        after = {v.id for v in services.keys.snapshot()}
        log.info("reloaded: %d key(s) (%d added, %d removed); strategy %s",
                 len(after), len(after - before), len(before - after),
                 openrouter.key_selection_strategy)

    def _retire(self, closing: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(closing)
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    # --- shutdown ----------------------------------------------------------------------------

    async def shutdown(self) -> None:
        grace = self.config.timeouts.shutdown_grace_seconds
        self.services.draining = True
        if self._quota_task is not None:
            self._quota_task.cancel()
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
        """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        await stop.wait()
        await self.shutdown()


class StartError(Exception):
    """The proxy cannot start; the message names the setting and what to do."""


def _listen_problem(host: str, port: int, exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return (f"server.host {host!r} is not an address or a name this machine resolves "
                f"({exc.strerror}); use e.g. 127.0.0.1, 0.0.0.0 or ::")
    if exc.errno == 98:  # EADDRINUSE
        return (f"server.port {port} on {host} is in use by another program: choose another "
                f"port (server.port, or --port)")
    if exc.errno == 99:  # EADDRNOTAVAIL
        return f"server.host {host!r} is not an address of this machine"
    if exc.errno == 13:  # EACCES
        return (f"server.port {port} needs privileges (ports below 1024): choose a port "
                f"from 1024 up (server.port, or --port)")
    return f"cannot listen on {host}:{port} (server.host / server.port): {exc.strerror or exc}"


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
