"""A keep-alive pool of connections to the one upstream origin.

Bookkeeping is synchronous: ``acquire`` hands out an idle connection (newest first, so the
ones most likely still open are used) or dials a new one; ``release`` takes it back only if
it can be reused. An idle connection is watched: the moment the upstream closes it, resets
it or sends anything, it is closed and leaves the pool (no CLOSE-WAIT sockets counted as
idle). Idle connections older than ``IDLE_EXPIRY_SECONDS`` are dropped before the upstream's
own idle timeout would close them under us. Exposes ``snapshot()`` for metrics; never
imports prometheus_client.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from orproxy.stream import Stream
from orproxy.upstream.connection import ConnState, UpstreamConnection

IDLE_EXPIRY_SECONDS = 50.0
PRUNE_INTERVAL_SECONDS = 1.0

Dial = Callable[[], Awaitable[Stream]]


@dataclass(frozen=True)
class PoolSnapshot:
    idle: int
    active: int
    opened: int
    reused: int
    dropped_idle: int  # idle connections the upstream closed (or spoke on) while pooled


class UpstreamPool:
    def __init__(self, dial: Dial, *, max_idle: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._dial = dial
        self._max_idle = max_idle
        self._clock = clock
        self._idle: list[UpstreamConnection] = []
        self._active = 0
        self._opened = 0
        self._reused = 0
        self._dropped_idle = 0
        self._pruned = 0.0
        self._closed = False

    async def acquire(self, *, fresh: bool = False) -> UpstreamConnection:
        if not fresh:
            now = self._clock()
            while self._idle:
                conn = self._idle.pop()
                conn.stream.clear_consumer()
                if not self._usable(conn, now):
                    conn.close()
                    continue
                conn.state = ConnState.ACTIVE
                self._active += 1
                self._reused += 1
                return conn
        stream = await self._dial()
        self._opened += 1
        self._active += 1
        return UpstreamConnection(stream)

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection after its cycle; it is closed unless it can be reused."""
        if conn.state is ConnState.ACTIVE:
            self._active -= 1
        if self._closed or len(self._idle) >= self._max_idle or not conn.recycle():
            conn.close()
            return
        conn.idle_since = now = self._clock()
        self._idle.append(conn)
        conn.stream.resume_reading()  # a relay may have paused it: EOF must be seen
        # anything heard while idle (EOF, RST, a stray 408) ends the connection at once
        conn.stream.set_consumer(lambda _data: self._lost_idle(conn),
                                 lambda: self._lost_idle(conn))
        self._prune(now)

    def discard(self, conn: UpstreamConnection) -> None:
        """Close a connection whose cycle did not finish cleanly."""
        if conn.state is ConnState.ACTIVE:
            self._active -= 1
        conn.close()

    def _lost_idle(self, conn: UpstreamConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
            self._dropped_idle += 1
        conn.close()

    def _prune(self, now: float) -> None:
        """Close idle connections too old to trust (at most once a second)."""
        if now - self._pruned < PRUNE_INTERVAL_SECONDS:
            return
        self._pruned = now
        keep = []
        for conn in self._idle:
            if self._usable(conn, now):
                keep.append(conn)
            else:
                conn.close()
        self._idle = keep

    def _usable(self, conn: UpstreamConnection, now: float) -> bool:
        """Reused only if nothing was heard on it while idle and it is not so old that the
        upstream may be closing it right now."""
        return conn.clean and now - conn.idle_since <= IDLE_EXPIRY_SECONDS

    def close(self) -> None:
        self._closed = True  # a late release after shutdown closes instead of pooling
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def snapshot(self) -> PoolSnapshot:
        return PoolSnapshot(len(self._idle), self._active, self._opened, self._reused,
                            self._dropped_idle)
