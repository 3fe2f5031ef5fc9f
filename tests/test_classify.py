"""Tier 1: what an upstream answer means for its key (OpenRouter 429/401/402 semantics)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from orproxy.keys import KeyPool, KeyState
from orproxy.upstream.classify import (
    MAX_COOLDOWN_SECONDS,
    OK,
    Outcome,
    Verdict,
    classify,
    retry_after_seconds,
)

# 2026-09-01T00:00:00Z, the reset in the real body quoted in OPENROUTER.md
RESET_MS = 1788220800000
RESET_S = 1788220800.0
WALL = RESET_S - 3600.0  # one hour before the reset

REAL_DAILY = (
    b'{"error":{"code":429,"message":"Rate limit exceeded: free-models-per-day. Add 10 credits '
    b'to unlock 1000 free model requests per day","metadata":{"headers":{"X-RateLimit-Limit":'
    b'"50","X-RateLimit-Remaining":"0","X-RateLimit-Reset":"1788220800000"},'
    b'"provider_name":null}}}'
)
UPSTREAM_RATE_LIMITED = json.dumps({"error": {
    "message": "Provider returned error", "code": 429,
    "metadata": {
        "raw": "google/gemini-2.0-flash-exp:free is temporarily rate-limited upstream. Please "
               "retry shortly, or add your own key to accumulate your rate limits: "
               "https://openrouter.ai/settings/integrations",
        "provider_name": "Google AI Studio",
    },
}}).encode()
RESOURCE_EXHAUSTED_STR = json.dumps({"error": {
    "message": "Provider returned error", "code": 429,
    "metadata": {
        "raw": '{\n  "error": {\n    "code": 429,\n    "message": "Resource has been exhausted '
               '(e.g. check quota).",\n    "status": "RESOURCE_EXHAUSTED"\n  }\n}\n',
        "provider_name": "Google",
    },
}}).encode()
RESOURCE_EXHAUSTED_OBJ = json.dumps({"error": {
    "message": "Provider returned error", "code": 429,
    "metadata": {"raw": {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}},
                 "provider_name": "Google"},
}}).encode()


def body(error: dict[str, Any]) -> bytes:
    return json.dumps({"error": error}).encode()


def limited(seconds: float | None, *, account_wide: bool = False) -> Verdict:
    return Verdict(Outcome.KEY_LIMITED, seconds, account_wide, "429 rate limited")


OVERLOADED = Verdict(Outcome.OVERLOADED, reason="429 upstream overloaded")


# --- statuses that are not the key's concern -----------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204, 206, 301, 304, 400, 403, 404, 408, 413, 422,
                                    500, 502, 503, 504])
def test_other_statuses_are_ok(status: int) -> None:
    verdict = classify(status, [(b"retry-after", b"30")], REAL_DAILY, WALL)
    assert verdict == OK
    assert verdict.retry is False


def test_401_is_key_invalid_and_402_no_credit() -> None:
    invalid = classify(401, [], b'{"error":{"code":401,"message":"No auth credentials found"}}',
                       WALL)
    assert invalid == Verdict(Outcome.KEY_INVALID, reason="401 invalid key")
    no_credit = classify(402, [], b'{"error":{"code":402,"message":"Insufficient credits"}}',
                         WALL)
    assert no_credit == Verdict(Outcome.NO_CREDIT, reason="402 insufficient credit")
    assert invalid.retry and no_credit.retry
    assert invalid.cooldown_seconds is None and no_credit.cooldown_seconds is None


# --- the key's quota ---------------------------------------------------------------------------


def test_real_daily_limit_body_resets_at_the_epoch_ms_and_is_account_wide() -> None:
    verdict = classify(429, [], REAL_DAILY, WALL)
    assert verdict == limited(3600.0, account_wide=True)
    assert verdict.retry is True


def test_real_daily_body_from_another_wall_clock() -> None:
    assert classify(429, [], REAL_DAILY, RESET_S - 12345.5).cooldown_seconds == 12345.5


def test_high_balance_variant_is_account_wide() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded: free-models-per-day-high-balance",
              "metadata": {"headers": {"X-RateLimit-Reset": str(RESET_MS)}}})
    assert classify(429, [], b, WALL) == limited(3600.0, account_wide=True)


def test_limit_source_free_tier_daily_is_account_wide() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded",
              "metadata": {"limit_source": "openrouter_free_tier_daily",
                           "error_type": "rate_limit_exceeded",
                           "headers": {"X-RateLimit-Reset": RESET_MS}}})  # a number, not a str
    assert classify(429, [], b, WALL) == limited(3600.0, account_wide=True)


def test_per_model_rpm_limit_is_the_keys_not_account_wide() -> None:
    b = body({"code": 429,
              "message": "Rate limit exceeded: limit_rpm/google/gemini-2.0-flash-exp/abc123",
              "metadata": {"headers": {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0",
                                       "X-RateLimit-Reset": str(int(WALL * 1000) + 42_000)}}})
    assert classify(429, [], b, WALL) == limited(42.0)


def test_metadata_header_name_is_case_insensitive() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded",
              "metadata": {"headers": {"x-ratelimit-reset": str(RESET_MS)}}})
    assert classify(429, [], b, WALL) == limited(3600.0)


@pytest.mark.parametrize("name", [b"X-RateLimit-Reset", b"x-ratelimit-reset", b"X-RATELIMIT-RESET"])
def test_reset_from_the_response_header_in_epoch_ms(name: bytes) -> None:
    b = body({"code": 429, "message": "Rate limit exceeded"})
    verdict = classify(429, [(b"content-type", b"application/json"), (name, b"1788220800000")],
                       b, WALL)
    assert verdict == limited(3600.0)


def test_reset_header_in_epoch_seconds_and_in_seconds_from_now() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded"})
    assert classify(429, [(b"x-ratelimit-reset", b"1788220800")], b, WALL) == limited(3600.0)
    assert classify(429, [(b"x-ratelimit-reset", b"90")], b, WALL) == limited(90.0)
    assert classify(429, [(b"x-ratelimit-reset", b"2.5")], b, WALL) == limited(2.5)


def test_metadata_reset_wins_over_response_headers() -> None:
    headers = [(b"X-RateLimit-Reset", str(RESET_MS + 60_000).encode()), (b"Retry-After", b"5")]
    assert classify(429, headers, REAL_DAILY, WALL).cooldown_seconds == 3600.0


def test_reset_header_wins_over_retry_after() -> None:
    headers = [(b"Retry-After", b"5"), (b"X-RateLimit-Reset", str(RESET_MS).encode())]
    assert classify(429, headers, b"", WALL).cooldown_seconds == 3600.0


def test_unusable_metadata_reset_falls_back_to_headers() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded",
              "metadata": {"headers": {"X-RateLimit-Reset": "soon"}}})
    assert classify(429, [(b"retry-after", b"30")], b, WALL) == limited(30.0)


@pytest.mark.parametrize("value", [b"30", b" 30 ", b"030"])
def test_retry_after_in_seconds(value: bytes) -> None:
    b = body({"code": 429, "message": "Rate limit exceeded"})
    assert classify(429, [(b"Retry-After", value)], b, WALL) == limited(30.0)


def test_retry_after_as_http_date() -> None:
    # IMF-fixdate, RFC 850 and asctime: RFC 9110 §5.6.7 asks recipients to accept all three
    wall = 784111777.0 - 120.0  # two minutes before Sun, 06 Nov 1994 08:49:37 GMT
    for value in (b"Sun, 06 Nov 1994 08:49:37 GMT", b"Sunday, 06-Nov-94 08:49:37 GMT",
                  b"Sun Nov  6 08:49:37 1994"):
        assert retry_after_seconds(value, wall) == 120.0, value
        assert classify(429, [(b"retry-after", value)], b"", wall) == limited(120.0)


@pytest.fixture
def non_utc_local_time() -> Iterator[None]:
    """The process runs with a local zone 5 hours from UTC (restored afterwards)."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.usefixtures("non_utc_local_time")
@pytest.mark.parametrize("value", [b"Sun, 06 Nov 1994 08:49:37 GMT",
                                   b"Sunday, 06-Nov-94 08:49:37 GMT",
                                   b"Sun Nov  6 08:49:37 1994"])
def test_retry_after_http_date_is_gmt_whatever_the_local_zone(value: bytes) -> None:
    """An HTTP-date is always GMT, even asctime's, which carries no zone (RFC 9110 §5.6.7)."""
    assert retry_after_seconds(value, 784111777.0 - 120.0) == 120.0


def test_retry_after_bad_values_are_ignored() -> None:
    for value in (None, b"", b"soon", b"-5", b"1.5", b"Sun, 99 Nov 1994 08:49:37 GMT"):
        assert retry_after_seconds(value, WALL) is None, value
    assert classify(429, [(b"retry-after", b"soon")], b"", WALL) == limited(None)


def test_no_reset_anywhere_means_use_the_default() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded"})
    assert classify(429, [], b, WALL) == limited(None)


@pytest.mark.parametrize("raw", [b"", b"Too Many Requests", b"<html>429</html>", b"\xff\xfe\x00",
                                 b"[1, 2]", b'"error"', b'{"error": "rate limited"}',
                                 b'{"error": {"metadata": "x"}}', b"null", b'{"error":{'])
def test_non_json_or_odd_bodies_are_the_keys_limit(raw: bytes) -> None:
    assert classify(429, [], raw, WALL) == limited(None)
    assert classify(429, [(b"Retry-After", b"7")], raw, WALL) == limited(7.0)


def test_the_reported_reset_rests_the_account_until_exactly_then() -> None:
    """classify → KeyPool, as the exchange wires them: the real daily-limit body seen at WALL
    rests both keys of that account for exactly an hour on the monotonic clock; the other
    account's key stays in rotation."""
    mono = [50.0]
    pool = KeyPool([("sk-or-v1-" + "a" * 64, "alice"), ("sk-or-v1-" + "b" * 64, "alice"),
                    ("sk-or-v1-" + "c" * 64, "bob")], strategy="first", clock=lambda: mono[0])
    key = pool.acquire()
    assert key is not None and key.account == "alice"
    verdict = classify(429, [], REAL_DAILY, WALL)
    assert verdict.cooldown_seconds is not None
    pool.cool_down(key, verdict.cooldown_seconds, verdict.reason,
                   account_wide=verdict.account_wide)
    assert [v.state for v in pool.snapshot()] == [KeyState.COOLING, KeyState.COOLING,
                                                  KeyState.AVAILABLE]
    mono[0] = 50.0 + 3599.999
    other = pool.acquire()
    assert other is not None and other.account == "bob"
    mono[0] = 50.0 + 3600.0
    assert pool.acquire() is key


# --- clamping -------------------------------------------------------------------------------


def test_a_reset_in_the_past_or_now_rests_one_second() -> None:
    b = body({"code": 429, "message": "x",
              "metadata": {"headers": {"X-RateLimit-Reset": str(RESET_MS)}}})
    assert classify(429, [], b, RESET_S + 500).cooldown_seconds == 1.0
    assert classify(429, [], b, RESET_S).cooldown_seconds == 1.0
    assert classify(429, [(b"retry-after", b"0")], b"", WALL).cooldown_seconds == 1.0
    assert classify(429, [(b"x-ratelimit-reset", b"0")], b"", WALL).cooldown_seconds == 1.0
    past = b"Sun, 06 Nov 1994 08:49:37 GMT"
    assert classify(429, [(b"retry-after", past)], b"", WALL).cooldown_seconds == 1.0


def test_a_reset_far_away_is_clamped_to_31_days() -> None:
    assert MAX_COOLDOWN_SECONDS == 31 * 86400.0
    far_ms = str(int((WALL + 400 * 86400) * 1000)).encode()
    assert classify(429, [(b"x-ratelimit-reset", far_ms)], b"", WALL).cooldown_seconds == (
        MAX_COOLDOWN_SECONDS)
    assert classify(429, [(b"retry-after", b"99999999")], b"", WALL).cooldown_seconds == (
        MAX_COOLDOWN_SECONDS)
    assert classify(429, [(b"x-ratelimit-reset", b"inf")], b"", WALL).cooldown_seconds == (
        MAX_COOLDOWN_SECONDS)
    b = body({"code": 429, "message": "x",
              "metadata": {"headers": {"X-RateLimit-Reset": 1e300}}})
    assert classify(429, [], b, WALL).cooldown_seconds == MAX_COOLDOWN_SECONDS


@pytest.mark.parametrize("value", ["-1", "nan", "", True, None, [1], {"a": 1}])
def test_unusable_reset_values_are_ignored(value: Any) -> None:
    b = body({"code": 429, "message": "x", "metadata": {"headers": {"X-RateLimit-Reset": value}}})
    assert classify(429, [], b, WALL) == limited(None)


# --- overload: nobody's key rests ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        UPSTREAM_RATE_LIMITED,
        RESOURCE_EXHAUSTED_STR,
        RESOURCE_EXHAUSTED_OBJ,
        body({"code": 429, "message": "Rate limit exceeded",
              "metadata": {"limit_source": "openrouter_shared_capacity",
                           "error_type": "rate_limit_exceeded"}}),
        body({"code": 429, "message": "Rate limit exceeded",
              "metadata": {"limit_source": "upstream_provider_shared_pool"}}),
        body({"code": 429, "message": "No capacity",
              "availability": {"code": "capacity_exhausted", "retry_after": 30}}),
        body({"code": 429, "message": "deepseek/deepseek-r1:free is temporarily rate-limited "
                                      "upstream"}),
    ],
    ids=["raw-rate-limited-upstream", "raw-resource-exhausted-str", "raw-resource-exhausted-obj",
         "shared-capacity", "provider-shared-pool", "capacity-exhausted", "message"],
)
def test_overload_variants(raw: bytes) -> None:
    # even with reset headers present, an overload rests no key
    headers = [(b"Retry-After", b"30"), (b"X-RateLimit-Reset", str(RESET_MS).encode())]
    verdict = classify(429, headers, raw, WALL)
    assert verdict == OVERLOADED
    assert verdict.retry is True and verdict.account_wide is False


def test_overload_wins_over_a_daily_limit_marker() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded: free-models-per-day",
              "metadata": {"limit_source": "openrouter_shared_capacity"}})
    assert classify(429, [], b, WALL) == OVERLOADED


def test_other_limit_sources_and_availability_codes_are_the_keys() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded",
              "metadata": {"limit_source": "key_rpm"},
              "availability": {"code": "ok"}})
    assert classify(429, [], b, WALL) == limited(None)


# --- robustness ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "raw"),
    [
        ([(b"retry-after", b"\xb2")], b""),  # '²' is isdigit() but not a float
        ([(b"retry-after", b"1\xb9")], b""),
        ([], b'{"error":{"metadata":{"headers":{"X-RateLimit-Reset":1' + b"0" * 400 + b"}}}}"),
        ([], b"[" * 5000),
        ([], b'{"error":' * 2000 + b"{}" + b"}" * 2000),
    ],
    ids=["retry-after-superscript", "retry-after-digit-superscript", "huge-int-reset",
         "deep-array", "deep-object"],
)
def test_odd_upstream_bytes_never_raise(headers: list[tuple[bytes, bytes]], raw: bytes) -> None:
    """An odd 429 from upstream is a rate limit with no usable reset, never an exception."""
    verdict = classify(429, headers, raw, WALL)
    assert verdict.outcome is Outcome.KEY_LIMITED
    assert verdict.cooldown_seconds is None


HEADER_NAMES = st.sampled_from([b"retry-after", b"Retry-After", b"x-ratelimit-reset",
                                b"X-RateLimit-Reset", b"content-type", b"x-other"])


@settings(max_examples=150, database=None, deadline=None)
@given(
    status=st.sampled_from([200, 400, 401, 402, 429, 500, 503]),
    headers=st.lists(st.tuples(HEADER_NAMES, st.binary(max_size=30)), max_size=4),
    raw=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
            lambda inner: st.lists(inner, max_size=3)
            | st.dictionaries(st.sampled_from(["error", "metadata", "headers", "raw",
                                               "message", "X-RateLimit-Reset", "limit_source",
                                               "availability", "code"]), inner, max_size=4),
            max_leaves=12,
        ).map(lambda doc: json.dumps(doc).encode()),
    ),
    wall=st.floats(0, 4e9),
)
@example(status=429, headers=[(b"retry-after", b"\xb2")], raw=b"", wall=WALL)
def test_classify_is_total(
    status: int, headers: list[tuple[bytes, bytes]], raw: bytes, wall: float
) -> None:
    """Any status, headers and body give a Verdict; a cooldown is always within [1 s, 31 d]."""
    verdict = classify(status, headers, raw, wall)
    assert isinstance(verdict, Verdict)
    assert verdict.retry is (verdict.outcome is not Outcome.OK)
    if status not in (401, 402, 429):
        assert verdict == OK
    if verdict.cooldown_seconds is not None:
        assert verdict.outcome is Outcome.KEY_LIMITED
        assert 1.0 <= verdict.cooldown_seconds <= MAX_COOLDOWN_SECONDS
