"""When key state is written: soon after a key's state changes, seldom for counters alone.

Owns the save schedule and the one write in flight. ``mark()`` is what the request path
calls: synchronous and O(1), it only raises a flag and arms at most one timer. The snapshot
is exported on the event loop (the key pool is not thread-safe) and written by
``store.save`` in a worker thread, never on the loop. A failing store is logged once per
kind of failure and retried; nothing raises into the caller. It must not know the key pool,
the file format or where the store keeps its data.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from orproxy.state.store import MAX_WRITER_CHARS, Snapshot, StateStore, clean_text

log = logging.getLogger(__name__)


class Pending(enum.IntEnum):
    """What is unsaved; a larger value needs an earlier write."""

    NONE = 0
    COUNTERS = 1
    URGENT = 2  # a key rested, was disabled or came back


# Module-level aliases: looking a member up on its enum class costs ~0.1 µs, and mark() is
# called on every request.
_COUNTERS, _URGENT = Pending.COUNTERS, Pending.URGENT


class Phase(enum.Enum):
    IDLE = "idle"  # nothing unsaved, no timer
    SCHEDULED = "scheduled"  # one timer armed
    WRITING = "writing"  # one write in flight; marks now cause one more write after it
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True)
class SaverStats:
    """For metrics: read at scrape time."""

    saves: int  # successful writes
    failures: int  # failed writes (export or store)
    last_saved_at: float  # wall-clock epoch seconds of the last successful write; 0.0 = none
    last_duration_seconds: float  # how long that write took
    pending: bool  # something changed that is not yet written


def default_writer() -> str:
    """``host:pid``, to tell writers apart in a shared file."""
    return clean_text(f"{socket.gethostname()}:{os.getpid()}", MAX_WRITER_CHARS)


def failure_kind(exc: BaseException) -> str:
    """Failures of one kind are logged once: the type, and the errno for OS errors."""
    errno = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    return f"{type(exc).__name__}{f'/{errno}' if errno is not None else ''}"


class StateSaver:
    """Writes ``export()`` through ``store`` when ``mark()`` says something changed.

    The saver stamps each snapshot's ``saved_at`` (from ``clock``, wall time) and ``writer``.
    Timers run on the event loop's own monotonic clock. The first counter change after a
    quiet period is written at once; later ones wait until ``counters_interval`` has passed
    since the last write began.
    """

    def __init__(
        self,
        store: StateStore,
        export: Callable[[], Snapshot],
        *,
        counters_interval: float = 5.0,
        urgent_delay: float = 0.05,
        clock: Callable[[], float] = time.time,
        loop: asyncio.AbstractEventLoop | None = None,
        writer: str | None = None,
    ) -> None:
        if not (counters_interval >= 0 and urgent_delay >= 0):
            raise ValueError("counters_interval and urgent_delay must be >= 0")
        self._store = store
        self._export = export
        self._interval = counters_interval
        self._urgent_delay = urgent_delay
        self._clock = clock  # wall clock: saved_at, last_saved_at
        self._loop = loop  # resolved at the first mark if not given
        self._writer = default_writer() if writer is None else writer
        self._phase = Phase.IDLE
        self._pending = Pending.NONE
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_start = -float("inf")  # loop time the last write began
        self._not_before = -float("inf")  # loop time before which no retry starts
        self._saves = 0
        self._failures = 0
        self._last_saved_at = 0.0
        self._last_duration = 0.0
        self._failing: set[str] = set()  # kinds already logged since the last success

    def __repr__(self) -> str:
        return f"<StateSaver {self._phase.value} pending={self._pending.name.lower()}>"

    def stats(self) -> SaverStats:
        return SaverStats(self._saves, self._failures, self._last_saved_at,
                          self._last_duration, self._pending is not Pending.NONE)

    # --- the request path ------------------------------------------------------------------

    def mark(self, urgent: bool = False) -> None:
        """Something changed: ``urgent`` for a key's state (written within urgent_delay),
        else counters (written at most once per counters_interval). Call on the loop."""
        level = _URGENT if urgent else _COUNTERS
        if level <= self._pending:
            return  # already due at least this soon (or right after the write in flight)
        self._pending = level
        if self._phase is Phase.IDLE or self._phase is Phase.SCHEDULED:
            self._schedule()

    # --- schedule --------------------------------------------------------------------------

    def _schedule(self) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        if self._pending is Pending.URGENT:
            due = now + self._urgent_delay
        else:
            due = self._last_start + self._interval
        due = max(due, now, self._not_before)
        if self._timer is not None:
            if self._timer.when() <= due:
                return
            self._timer.cancel()
        self._timer = loop.call_at(due, self._fire)
        self._phase = Phase.SCHEDULED

    def _fire(self) -> None:
        self._timer = None
        self._phase = Phase.WRITING
        assert self._loop is not None
        self._task = self._loop.create_task(self._write_and_reschedule())

    async def _write_and_reschedule(self) -> None:
        try:
            await self._write()
        finally:
            self._task = None
            if self._phase is Phase.WRITING:
                self._phase = Phase.IDLE
                if self._pending is not Pending.NONE:
                    self._schedule()

    async def _write(self) -> None:
        """One export (on the loop) and one store.save (in a thread). Never raises."""
        loop = asyncio.get_running_loop()
        level, self._pending = self._pending, Pending.NONE
        self._last_start = loop.time()
        started = time.perf_counter()
        try:
            snapshot = dataclasses.replace(self._export(), saved_at=self._clock(),
                                           writer=self._writer)
            await asyncio.to_thread(self._store.save, snapshot)
        except Exception as exc:
            self._pending = max(self._pending, level)  # still unsaved
            self._not_before = loop.time() + self._interval
            self._failed(exc)
            return
        self._not_before = -float("inf")
        self._last_duration = time.perf_counter() - started
        self._last_saved_at = snapshot.saved_at
        self._saves += 1
        if self._failing:
            log.info("key state saved again after failures (%s)", ", ".join(sorted(self._failing)))
            self._failing.clear()

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        kind = failure_kind(exc)
        if kind in self._failing:
            log.debug("saving key state failed again (%s)", kind)
            return
        self._failing.add(kind)
        log.warning("could not save key state (%s): %s; retrying every %g s", kind,
                    clean_text(str(exc), 300), self._interval)

    # --- shutdown --------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop scheduling, wait for the write in flight, and write what is still unsaved."""
        if self._phase is Phase.CLOSED or self._phase is Phase.CLOSING:
            return
        self._phase = Phase.CLOSING
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            # wait() neither raises the task's outcome nor cancels it if close() is cancelled
            await asyncio.wait([self._task])
        if self._pending is not Pending.NONE:
            self._not_before = -float("inf")
            await self._write()
        self._phase = Phase.CLOSED
