"""Recent request rate, error rate and latency quantiles for the dashboard's charts.

A ring of fixed time buckets (10 s × 60 by default: the last ten minutes). Each bucket holds
a request count, an error count and a small log-bucketed latency histogram, so memory is
bounded and fixed at construction: no samples are kept. ``record`` is on the hot path of
every finished request and is O(1); ``series`` is read at dashboard refresh time.

Pure: no I/O, no awaits, no clock of its own. The caller passes the time (wall-clock epoch
seconds, since the page compares ``end`` with the server's ``now``), so tests never sleep.
It knows nothing of HTTP beyond which statuses count as errors.
"""

from __future__ import annotations

import math
from typing import TypedDict

# Latency histogram: bin 0 holds everything under LATENCY_MIN_SECONDS (and NaN or negative
# durations, which a clock step can produce); bins 1..N are log-spaced with ratio √2 from
# 1 ms; bin N+1 holds LATENCY_MAX_SECONDS and above. A quantile is reported as its bin's
# geometric midpoint, so within a bin the error is at most √(√2) - 1 ≈ 19 %.
LATENCY_MIN_SECONDS = 0.001
LATENCY_MAX_SECONDS = 600.0
_RATIO = math.sqrt(2.0)
_INV_LOG_RATIO = 1.0 / math.log(_RATIO)
_PER_MIN = 1.0 / LATENCY_MIN_SECONDS
_log = math.log  # a module global: one lookup on the hot path instead of two
_LOG_BINS = math.ceil(math.log(LATENCY_MAX_SECONDS / LATENCY_MIN_SECONDS) * _INV_LOG_RATIO)
BINS = _LOG_BINS + 2
_OVERFLOW = BINS - 1
_ERRORS = BINS  # a slot's counts list: BINS histogram counts, then the error count
# What a bin reports: the lower bound for the underflow bin ("under 1 ms" is shown as 1 ms),
# the geometric midpoint for log bins, the upper bound for the overflow bin.
_BIN_VALUE: list[float] = (
    [LATENCY_MIN_SECONDS]
    + [LATENCY_MIN_SECONDS * _RATIO ** (i + 0.5) for i in range(_LOG_BINS)]
    + [LATENCY_MAX_SECONDS]
)


class Series(TypedDict):
    """The ``series`` member of ``/metrics/json``: oldest first, equal lengths, the last
    point is the bucket that ends at ``end``."""

    step_seconds: float
    end: float
    requests_per_second: list[float]
    errors_per_second: list[float]
    latency_p50_seconds: list[float | None]
    latency_p95_seconds: list[float | None]


def is_error(status: int) -> bool:
    """An error for the error-rate chart: a 5xx (ours or the upstream's) or a 429 (no key
    could serve, or OpenRouter refused). Other 4xx are the client's mistakes, not trouble
    an operator should see as an error spike."""
    return status >= 500 or status == 429


def latency_bin(seconds: float) -> int:
    """The histogram bin of one duration; never raises (NaN and negatives go to bin 0)."""
    if seconds >= LATENCY_MAX_SECONDS:
        return BINS - 1
    if seconds >= LATENCY_MIN_SECONDS:
        # no clamp needed: the top log bin's edge is 2^(39/2) ms, well past 600 s
        return int(_log(seconds * _PER_MIN) * _INV_LOG_RATIO) + 1
    return 0


def bin_value(index: int) -> float:
    """The duration a quantile that falls in bin ``index`` is reported as."""
    return _BIN_VALUE[index]


class TimeSeries:
    """The last ``points`` buckets of ``step_seconds`` each, plus the one filling now.

    Bucket *b* covers ``[b·step, (b+1)·step)`` of the caller's clock and lives in slot
    ``b % slots``. Each slot is one list: the latency histogram's BINS counts (whose sum is
    the request count) and then the error count. Invariant: a slot's stamp is None or a
    bucket inside the window ``(head - slots, head]``; moving the head forward unstamps the
    slots it passes over, which is how old buckets are recycled without a sweep.

    Time that goes backwards within the window is recorded into the earlier bucket; a jump
    back by more than the window means the clock was reset, so history is dropped and
    recording starts again from the new time (otherwise nothing would be recorded until the
    clock caught up again).
    """

    __slots__ = ("_counts", "_head", "_slots", "_stamp", "_step", "points")

    def __init__(self, step_seconds: float = 10.0, points: int = 60) -> None:
        if not (step_seconds > 0 and math.isfinite(step_seconds)):
            raise ValueError(f"step_seconds must be a positive number, not {step_seconds!r}")
        if points < 1:
            raise ValueError(f"points must be at least 1, not {points!r}")
        self._step = float(step_seconds)
        self.points = points
        # one more slot than points: the bucket being filled now is not shown until it ends
        self._slots = points + 1
        # bucket number held by each slot; None: none (every int is a possible bucket)
        self._stamp: list[int | None] = [None] * self._slots
        self._counts = [[0] * (BINS + 1) for _ in range(self._slots)]
        self._head = -(2**63)  # newest bucket number written; far past: nothing yet

    @property
    def step_seconds(self) -> float:
        return self._step

    def __repr__(self) -> str:
        live = [i for i, stamp in enumerate(self._stamp) if stamp is not None]
        requests = sum(sum(self._counts[i][:BINS]) for i in live)
        return (f"<TimeSeries {self._step:g}s×{self.points} head={self._head} "
                f"live_buckets={len(live)} requests={requests}>")

    def record(self, now: float, status: int, seconds: float) -> None:
        """One finished request at time ``now``: its status and how long it took.

        The hot path: a floor division, two list lookups and two increments, plus one log
        for the histogram bin. Slow paths (a new bucket, a clock step) live in ``_open``.
        """
        try:
            bucket = int(now // self._step)
        except (ValueError, OverflowError):  # NaN or infinite time: nothing sensible to do
            return
        slot = bucket % self._slots
        if self._stamp[slot] != bucket:
            self._open(bucket, slot)
        counts = self._counts[slot]
        # latency_bin(), inlined: a call costs as much as the rest of this method
        if seconds >= LATENCY_MAX_SECONDS:
            counts[_OVERFLOW] += 1
        elif seconds >= LATENCY_MIN_SECONDS:
            counts[int(_log(seconds * _PER_MIN) * _INV_LOG_RATIO) + 1] += 1
        else:
            counts[0] += 1
        if status >= 500 or status == 429:  # is_error(), inlined
            counts[_ERRORS] += 1

    def _open(self, bucket: int, slot: int) -> None:
        """Make ``slot`` hold ``bucket``, empty, keeping the stamp invariant."""
        head, slots = self._head, self._slots
        if bucket > head:
            # unstamp every slot the head passes over: their buckets leave the window
            for passed in range(max(head + 1, bucket - slots + 1), bucket):
                self._stamp[passed % slots] = None
            self._head = bucket
        elif bucket <= head - slots:
            self._stamp = [None] * slots
            self._head = bucket
        self._stamp[slot] = bucket
        self._counts[slot] = [0] * (BINS + 1)

    def series(self, now: float) -> Series:
        """The ``points`` complete buckets ending at the bucket boundary at or before
        ``now``. Empty buckets give rate 0 and latency None. Reads only: calling it never
        changes what later calls return."""
        try:  # the same floor division as record(): x // y and floor(x / y) differ at edges
            current = int(now // self._step)
        except (ValueError, OverflowError):  # NaN or infinite time: show the newest window
            current = self._head + 1
        step = self._step
        requests: list[float] = []
        errors: list[float] = []
        p50: list[float | None] = []
        p95: list[float | None] = []
        for bucket in range(current - self.points, current):
            slot = bucket % self._slots
            counts = self._counts[slot]
            total = sum(counts[:BINS]) if self._stamp[slot] == bucket else 0
            if total:
                requests.append(total / step)
                errors.append(counts[_ERRORS] / step)
                p50.append(_quantile(counts, total, 0.50))
                p95.append(_quantile(counts, total, 0.95))
            else:
                requests.append(0.0)
                errors.append(0.0)
                p50.append(None)
                p95.append(None)
        return Series(step_seconds=step, end=current * step, requests_per_second=requests,
                      errors_per_second=errors, latency_p50_seconds=p50,
                      latency_p95_seconds=p95)


def _quantile(counts: list[int], total: int, q: float) -> float:
    """The q-quantile of a slot holding ``total`` samples: the value of the bin holding the
    sample of rank ⌈q·total⌉ (nearest-rank definition)."""
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index, n in enumerate(counts[:BINS]):
        seen += n
        if seen >= rank:
            return _BIN_VALUE[index]
    return _BIN_VALUE[-1]  # unreachable while total is the histogram's sum
