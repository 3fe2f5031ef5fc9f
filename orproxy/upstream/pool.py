"""A keep-alive pool of connections to the one upstream origin.

Bookkeeping is synchronous: ``acquire`` hands out an idle connection (newest first, so the
ones most likely still open are used) or dials a new one; ``release`` takes it back only if
h11 says both sides are DONE. Idle connections past ``IDLE_EXPIRY_SECONDS`` are dropped,
before the upstream's own idle timeout would close them under us. Exposes ``snapshot()``
for metrics; never imports prometheus_client.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

from orproxy.config import Origin, OutgoingProxy
from orproxy.upstream.connection import ConnState, UpstreamConnection
from orproxy.upstream.dial import dial

IDLE_EXPIRY_SECONDS = 50.0


@dataclass(frozen=True)
class PoolSnapshot:
    idle: int
    active: int
    opened: int
    reused: int


class UpstreamPool:
    def __init__(
        self,
        origin: Origin,
        *,
        tls: ssl.SSLContext | None,
        proxy: OutgoingProxy | None,
        connect_timeout: float,
        max_idle: int,
    ) -> None:
        self.origin = origin
        self._tls = tls
        self._proxy = proxy
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._idle: list[UpstreamConnection] = []
        self._active = 0
        self._opened = 0
        self._reused = 0
        self._pruned = 0.0
        self._closed = False

    async def acquire(self, *, fresh: bool = False) -> UpstreamConnection:
        if not fresh:
            now = time.monotonic()
            while self._idle:
                conn = self._idle.pop()
                if not _still_usable(conn, now):
                    conn.close()
                    continue
                conn.state = ConnState.ACTIVE
                self._active += 1
                self._reused += 1
                return conn
        stream = await dial(self.origin, self._tls, self._proxy, self._connect_timeout)
        self._opened += 1
        self._active += 1
        return UpstreamConnection(stream)

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection after its cycle; it is closed unless it can be reused."""
        if conn.state is ConnState.ACTIVE:
            self._active -= 1
        if not self._closed and len(self._idle) < self._max_idle and conn.recycle():
            self._idle.append(conn)
            self._prune(conn.idle_since)
        else:
            conn.close()

    def _prune(self, now: float) -> None:
        """Close idle connections the upstream has dropped (at most once a second), so they
        do not linger half-closed until their turn comes."""
        if now - self._pruned < 1.0:
            return
        self._pruned = now
        keep = []
        for conn in self._idle:
            if _still_usable(conn, now):
                keep.append(conn)
            else:
                conn.close()
        self._idle = keep

    def discard(self, conn: UpstreamConnection) -> None:
        """Close a connection whose cycle did not finish cleanly."""
        if conn.state is ConnState.ACTIVE:
            self._active -= 1
        conn.close()

    def close(self) -> None:
        self._closed = True  # a late release after shutdown closes instead of pooling
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def snapshot(self) -> PoolSnapshot:
        return PoolSnapshot(len(self._idle), self._active, self._opened, self._reused)


def _still_usable(conn: UpstreamConnection, now: float) -> bool:
    """An idle connection is reused only if nothing was heard on it while idle (EOF, a stray
    408, garbage) and it is not so old the upstream may be closing it right now."""
    return conn.clean and now - conn.idle_since <= IDLE_EXPIRY_SECONDS
