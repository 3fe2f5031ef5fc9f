"""The listening socket: accepting within a budget of file descriptors.

asyncio's own accept loop retries a failing accept() once per backlog slot and logs a
traceback each time; when descriptors run out that is a busy loop that floods the log and
starves every connection already open. This listener instead:
- raises the soft open-file limit to the hard one at start (as nginx's
  ``worker_rlimit_nofile``), and derives the connection cap from it: a forwarded request
  holds two descriptors (client and upstream), and a reserve stays free for upstream
  connections, the pool, logs and the state file;
- stops accepting while at the cap (the kernel's backlog holds the rest) instead of
  accepting and resetting, and accepts again as connections close;
- keeps a few connections beyond the cap for the proxy's own pages (``/health`` answers
  while the proxy is saturated; forwarding on them gets a quick 503);
- on EMFILE/ENFILE pauses briefly and logs the condition once per interval.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

FD_RESERVE = 48  # listener, epoll, logs, state file, DNS, a margin
RESERVE_CONNECTIONS = 8  # beyond the cap: the proxy's own pages only
ACCEPT_BATCH = 64  # accepts per readiness callback: fair to the connections already open
EXHAUSTED_PAUSE_SECONDS = 0.25
LOG_INTERVAL_SECONDS = 60.0
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True)
class FdBudget:
    soft_limit: int  # the open-file limit in force
    raised_from: int | None  # the soft limit before we raised it, if we did
    max_connections: int  # client connections served at once (the cap)


def fd_budget(configured: int, upstream_idle: int, soft: int, hard: int) -> FdBudget:
    """Pure: the cap for ``configured`` connections under open-file limits (soft, hard),
    with the soft limit raised to the hard one. Each connection may hold a client and an
    upstream descriptor; idle pooled upstream connections and the reserve come first."""
    limit = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    limit = max(limit, soft)
    room = limit - FD_RESERVE - RESERVE_CONNECTIONS - upstream_idle
    cap = max(min(configured, room // 2), 1)
    return FdBudget(limit, soft if limit != soft else None, cap)


def raise_fd_limit(configured: int, upstream_idle: int) -> FdBudget:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = fd_budget(configured, upstream_idle, soft, hard)
    if budget.raised_from is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (budget.soft_limit, hard))
        except (ValueError, OSError):
            budget = fd_budget(configured, upstream_idle, soft, soft)
    if budget.max_connections < configured:
        log.warning("max_connections lowered from %d to %d: the open-file limit is %d and a "
                    "forwarded request holds two descriptors (raise LimitNOFILE / ulimit -n "
                    "to serve more)", configured, budget.max_connections, budget.soft_limit)
    return budget


def fd_budget_now(configured: int, upstream_idle: int) -> int:
    """The connection cap under the open-file limit in force now (a reload)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return fd_budget(configured, upstream_idle, soft, soft).max_connections


@dataclass(frozen=True)
class ListenerSnapshot:
    active: int
    cap: int
    paused: bool
    paused_at_cap: int  # times accepting stopped at the cap
    exhausted: int  # accept() failures for lack of descriptors or memory
    reserve_served: int  # connections accepted beyond the cap, for local pages only


class Listener:
    """Accepts on ``sock`` and hands each connection to ``on_accept(sock, reserve)``; the
    owner calls ``closed()`` once per connection it was given."""

    def __init__(self, sock: socket.socket, on_accept: Callable[[socket.socket, bool], None],
                 *, cap: int) -> None:
        self._sock = sock
        self._on_accept = on_accept
        self._loop = asyncio.get_running_loop()
        self.cap = cap
        self.active = 0
        self._reading = False
        self._stopped = False
        self._retry: asyncio.TimerHandle | None = None
        self._paused_at_cap = 0
        self._exhausted = 0
        self._reserve_served = 0
        self._last_log = -LOG_INTERVAL_SECONDS
        self._unlogged = 0

    def start(self) -> None:
        self._sock.setblocking(False)
        self._resume()

    def stop(self) -> None:
        self._stopped = True
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
        self._sock.close()

    def closed(self) -> None:
        self.active -= 1
        if not self._reading and self._retry is None and not self._stopped:
            self._resume()

    def _resume(self) -> None:
        if not self._reading and not self._stopped:
            self._reading = True
            self._loop.add_reader(self._sock.fileno(), self._ready)

    def _pause(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._sock.fileno())

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.active >= self.cap + RESERVE_CONNECTIONS:
                self._paused_at_cap += 1
                self._pause()
                self._note("at the connection cap (%d); not accepting until one closes",
                           self.cap)
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRNOS:
                    log.warning("accept failed: %s", exc)
                    return
                self._exhausted += 1
                self._pause()
                self._retry = self._loop.call_later(EXHAUSTED_PAUSE_SECONDS, self._retry_now)
                self._note("out of descriptors or memory (%s); accepting paused", exc.strerror)
                return
            conn.setblocking(False)
            self.active += 1
            reserve = self.active > self.cap
            self._reserve_served += reserve
            self._on_accept(conn, reserve)

    def _retry_now(self) -> None:
        self._retry = None
        if self.active < self.cap + RESERVE_CONNECTIONS:
            self._resume()

    def _note(self, message: str, arg: object) -> None:
        """Log a saturation condition at most once per interval, with how often it recurred."""
        now = time.monotonic()
        if now - self._last_log < LOG_INTERVAL_SECONDS:
            self._unlogged += 1
            return
        suffix = f" ({self._unlogged} more since the last report)" if self._unlogged else ""
        log.warning(message + suffix, arg)
        self._last_log, self._unlogged = now, 0

    def snapshot(self) -> ListenerSnapshot:
        return ListenerSnapshot(self.active, self.cap, not self._reading, self._paused_at_cap,
                                self._exhausted, self._reserve_served)
