"""Tier 1: the dashboard's time-series ring (rates, latency quantiles, recycling, clock steps).

Pure code on an explicit clock: every test passes the time in, nothing sleeps.
"""

from __future__ import annotations

import math
import random
import tracemalloc
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orproxy.observe.timeseries import (
    BINS,
    LATENCY_MAX_SECONDS,
    LATENCY_MIN_SECONDS,
    Series,
    TimeSeries,
    bin_value,
    is_error,
    latency_bin,
)

T0 = 1_767_225_600.0  # a bucket boundary for 10 s steps


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_shape_of_an_empty_series() -> None:
    got = TimeSeries().series(T0 + 3.5)
    assert got == {
        "step_seconds": 10.0, "end": T0,
        "requests_per_second": [0.0] * 60, "errors_per_second": [0.0] * 60,
        "latency_p50_seconds": [None] * 60, "latency_p95_seconds": [None] * 60,
    }


def test_rates_of_one_complete_bucket() -> None:
    ts = TimeSeries(step_seconds=10, points=6)
    statuses = [200] * 15 + [404, 400, 401] + [429, 500, 502, 503, 504] + [201, 204]
    for i, status in enumerate(statuses):  # 25 requests inside [T0, T0 + 10)
        ts.record(T0 + i * 0.39, status, 0.5)
    assert ts.series(T0 + 9.99)["requests_per_second"] == [0.0] * 6  # still filling: unseen
    got = ts.series(T0 + 10.0)
    assert got["end"] == T0 + 10.0
    assert got["requests_per_second"] == [0.0] * 5 + [2.5]
    assert got["errors_per_second"] == [0.0] * 5 + [0.5]  # 429 and 5xx only
    assert got["latency_p50_seconds"][:5] == [None] * 5
    # the bucket moves left as time goes on, and leaves after `points` steps
    later = ts.series(T0 + 35.0)
    assert later["end"] == T0 + 30.0
    assert later["requests_per_second"] == [0.0] * 3 + [2.5, 0.0, 0.0]
    assert ts.series(T0 + 70.0)["requests_per_second"] == [0.0] * 6


@pytest.mark.parametrize(("status", "error"), [
    (100, False), (200, False), (304, False), (400, False), (404, False), (428, False),
    (429, True), (430, False), (499, False), (500, True), (503, True), (599, True),
])
def test_which_statuses_are_errors(status: int, error: bool) -> None:
    assert is_error(status) is error
    ts = TimeSeries(points=1)
    ts.record(T0, status, 0.1)
    assert ts.series(T0 + 10)["errors_per_second"] == [0.1 if error else 0.0]


def test_quantiles_of_known_data() -> None:
    ts = TimeSeries(points=2)
    samples = [i / 1000 for i in range(1, 101)]  # 1 ms … 100 ms
    random.Random(7).shuffle(samples)
    for s in samples:
        ts.record(T0 + 1, 200, s)
    got = ts.series(T0 + 10)
    p50, p95 = got["latency_p50_seconds"][-1], got["latency_p95_seconds"][-1]
    assert p50 is not None and p95 is not None
    assert 0.050 / 1.2 <= p50 <= 0.050 * 1.2
    assert 0.095 / 1.2 <= p95 <= 0.095 * 1.2


def test_a_single_slow_request_dominates_p95_not_p50() -> None:
    ts = TimeSeries(points=1)
    for _ in range(19):
        ts.record(T0, 200, 0.2)
    ts.record(T0, 200, 30.0)  # rank ⌈0.95·20⌉ = 19: still a fast one
    got = ts.series(T0 + 10)
    assert got["latency_p95_seconds"] == [bin_value(latency_bin(0.2))]
    ts.record(T0, 200, 30.0)  # 21 samples: rank 20 is slow
    assert ts.series(T0 + 10)["latency_p95_seconds"] == [bin_value(latency_bin(30.0))]


@given(st.lists(st.floats(min_value=LATENCY_MIN_SECONDS, max_value=LATENCY_MAX_SECONDS * 0.999),
                min_size=1, max_size=200))
def test_quantiles_are_within_one_bin(samples: list[float]) -> None:
    ts = TimeSeries(points=1)
    for s in samples:
        ts.record(T0, 200, s)
    got = ts.series(T0 + 10)
    for q, key in ((0.50, "latency_p50_seconds"), (0.95, "latency_p95_seconds")):
        exact = nearest_rank(samples, q)
        reported = got[key][0]  # type: ignore[literal-required]
        assert reported == bin_value(latency_bin(exact))
        assert exact / 1.2 <= reported <= exact * 1.2


def test_histogram_bins_cover_1ms_to_10min_within_20_percent() -> None:
    assert BINS <= 64  # small and fixed
    x = LATENCY_MIN_SECONDS
    while x < LATENCY_MAX_SECONDS:
        value = bin_value(latency_bin(x))
        assert x / 1.2 <= value <= x * 1.2, x
        x *= 1.01
    indices = [latency_bin(LATENCY_MIN_SECONDS * 1.05**i) for i in range(300)]
    assert indices == sorted(indices)
    assert latency_bin(LATENCY_MAX_SECONDS * 0.99999) == BINS - 2


@pytest.mark.parametrize("seconds", [0.0, 0.0009, -1.0, -math.inf, math.nan])
def test_durations_under_1ms_or_nonsense_fall_in_the_lowest_bin(seconds: float) -> None:
    assert latency_bin(seconds) == 0
    ts = TimeSeries(points=1)
    ts.record(T0, 200, seconds)
    got = ts.series(T0 + 10)
    assert got["requests_per_second"] == [0.1]
    assert got["latency_p50_seconds"] == [LATENCY_MIN_SECONDS]


@pytest.mark.parametrize("seconds", [600.0, 3600.0, math.inf])
def test_durations_of_10min_and_more_fall_in_the_top_bin(seconds: float) -> None:
    assert latency_bin(seconds) == BINS - 1
    ts = TimeSeries(points=1)
    ts.record(T0, 200, seconds)
    assert ts.series(T0 + 10)["latency_p95_seconds"] == [LATENCY_MAX_SECONDS]


def test_a_slot_reused_after_one_lap_starts_empty() -> None:
    ts = TimeSeries(step_seconds=10, points=6)  # 7 slots: bucket b and b + 7 share one
    ts.record(T0, 503, 5.0)
    ts.record(T0 + 70, 200, 0.01)
    got = ts.series(T0 + 80)
    assert got["requests_per_second"] == [0.0] * 5 + [0.1]
    assert got["errors_per_second"] == [0.0] * 6
    assert got["latency_p95_seconds"][-1] == bin_value(latency_bin(0.01))


def test_a_forward_jump_longer_than_the_window_recycles_everything() -> None:
    ts = TimeSeries(step_seconds=10, points=6)
    for i in range(6):
        ts.record(T0 + 10 * i, 500, 1.0)
    assert ts.series(T0 + 60)["errors_per_second"] == [0.1] * 6
    ts.record(T0 + 10_000, 200, 1.0)
    # looking back at the old window: its buckets are gone, not resurrected
    assert ts.series(T0 + 60)["requests_per_second"] == [0.0] * 6
    assert ts.series(T0 + 10_010)["requests_per_second"] == [0.0] * 5 + [0.1]
    assert ts.series(T0 + 10_010)["errors_per_second"] == [0.0] * 6


def test_a_forward_jump_inside_the_window_keeps_what_is_still_in_it() -> None:
    ts = TimeSeries(step_seconds=10, points=6)
    for i in range(6):
        ts.record(T0 + 10 * i, 200, 1.0)
    ts.record(T0 + 90, 200, 1.0)  # the 7-slot window is now buckets 3..9
    assert ts.series(T0 + 60)["requests_per_second"] == [0.0, 0.0, 0.0, 0.1, 0.1, 0.1]
    assert ts.series(T0 + 100)["requests_per_second"] == [0.1, 0.1, 0.0, 0.0, 0.0, 0.1]


def test_time_going_back_inside_the_window_lands_in_the_earlier_bucket() -> None:
    ts = TimeSeries(step_seconds=10, points=6)
    ts.record(T0 + 50, 200, 1.0)
    ts.record(T0 + 21, 500, 1.0)  # 29 s back
    got = ts.series(T0 + 60)
    assert got["requests_per_second"] == [0.0, 0.0, 0.1, 0.0, 0.0, 0.1]
    assert got["errors_per_second"] == [0.0, 0.0, 0.1, 0.0, 0.0, 0.0]


def test_time_going_back_past_the_window_starts_over() -> None:
    ts = TimeSeries(step_seconds=10, points=6)
    ts.record(T0 + 3600, 200, 1.0)
    ts.record(T0, 500, 1.0)  # the clock was set back an hour
    assert ts.series(T0 + 10)["errors_per_second"] == [0.0] * 5 + [0.1]
    ts.record(T0 + 10, 200, 1.0)  # and recording goes on from there
    assert ts.series(T0 + 20)["requests_per_second"] == [0.0] * 4 + [0.1, 0.1]
    # what came before the step is gone even when the clock gets back there
    assert ts.series(T0 + 3610)["requests_per_second"] == [0.0] * 6


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf, 1.7e308, -1.7e308])
def test_nonsense_time_never_raises(now: float) -> None:
    ts = TimeSeries(step_seconds=0.5, points=3)
    ts.record(T0, 200, 1.0)
    ts.record(now, 200, 1.0)
    got = ts.series(now)
    assert len(got["requests_per_second"]) == 3
    assert all(r >= 0 for r in got["requests_per_second"])


def test_series_only_reads() -> None:
    ts = TimeSeries(step_seconds=10, points=6)
    ts.record(T0 + 5, 200, 1.0)
    before = ts.series(T0 + 10)
    for now in (T0 - 1e6, T0 + 1e6, T0 + 15, math.nan):
        ts.series(now)
    assert ts.series(T0 + 10) == before


@pytest.mark.parametrize(("step", "points"), [(0, 60), (-1, 60), (math.nan, 60),
                                              (math.inf, 60), (10, 0)])
def test_bad_construction_is_refused(step: float, points: int) -> None:
    with pytest.raises(ValueError, match=r"step_seconds|points"):
        TimeSeries(step_seconds=step, points=points)


def test_memory_stays_bounded() -> None:
    ts = TimeSeries()
    rng = random.Random(1)
    now = T0

    def burst(n: int) -> None:
        nonlocal now
        for _ in range(n):
            now += rng.expovariate(20.0)
            ts.record(now, rng.choice((200, 200, 429, 502)), rng.lognormvariate(0, 2))

    tracemalloc.start()
    try:
        burst(15_000)  # ≈ 750 s: more than the 610 s ring, so every slot re-allocated traced
        lapped, _ = tracemalloc.get_traced_memory()
        burst(40_000)  # ≈ 2000 s more: the ring laps three times
        ts.record(now - 3 * 3600, 200, 1.0)  # and a reset
        burst(15_000)
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the whole ring (61 slots of 42 counts) is a few tens of KB, and it does not grow
    assert lapped < 128 * 1024, lapped
    assert end - lapped < 4096, end - lapped


# --- model check: the ring against a naive list of every event ---------------------------


@dataclass
class NaiveSeries:
    """Keeps every event; the same window and clock-step rules, written the obvious way."""

    step: float
    points: int
    head: int | None = None
    events: list[tuple[int, int, float]] = field(default_factory=list)

    def record(self, now: float, status: int, seconds: float) -> None:
        if not math.isfinite(now // self.step):
            return
        bucket = int(now // self.step)
        window = self.points + 1
        if self.head is None or bucket > self.head:
            self.head = bucket
        elif bucket <= self.head - window:
            self.head, self.events = bucket, []
        self.events = [e for e in self.events if e[0] > self.head - window]
        self.events.append((bucket, status, seconds))

    def series(self, now: float) -> Series:
        current = int(now // self.step)
        out = Series(step_seconds=self.step, end=current * self.step, requests_per_second=[],
                     errors_per_second=[], latency_p50_seconds=[], latency_p95_seconds=[])
        for bucket in range(current - self.points, current):
            mine = [e for e in self.events if e[0] == bucket]
            out["requests_per_second"].append(len(mine) / self.step)
            out["errors_per_second"].append(
                sum(1 for e in mine if e[1] >= 500 or e[1] == 429) / self.step)
            for q, key in ((0.50, "latency_p50_seconds"), (0.95, "latency_p95_seconds")):
                exact = nearest_rank([e[2] for e in mine], q) if mine else None
                out[key].append(  # type: ignore[literal-required]
                    None if exact is None else bin_value(latency_bin(exact)))
        return out


events = st.lists(st.tuples(
    st.floats(min_value=-200, max_value=200, allow_nan=False),  # time offset, steps both ways
    st.sampled_from([200, 204, 400, 429, 500, 503]),
    st.floats(min_value=0, max_value=1000, allow_nan=False),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(events, st.sampled_from([1.0, 2.5, 10.0]), st.integers(1, 8))
def test_ring_matches_the_naive_model(steps: list[tuple[float, int, float]], step: float,
                                      points: int) -> None:
    ring, naive = TimeSeries(step_seconds=step, points=points), NaiveSeries(step, points)
    now = T0
    for offset, status, seconds in steps:
        now += offset
        ring.record(now, status, seconds)
        naive.record(now, status, seconds)
        for look in (now, now + step, now + points * step / 2):
            got = ring.series(look)
            assert got == naive.series(look)
            assert all(r >= 0 for r in got["requests_per_second"] + got["errors_per_second"])
