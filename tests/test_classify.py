"""What an upstream answer means for its key: every limit signal OpenRouter sends (OPENROUTER.md).

Bodies are shaped like real OpenRouter answers; times are fixed against a wall clock one hour
before 2026-09-01T00:00:00Z, the reset in the real body quoted in OPENROUTER.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from orproxy.upstream.classify import (
    MAX_SECONDS,
    OK,
    RULES,
    STATUSES_TO_CLASSIFY,
    Outcome,
    Scope,
    Verdict,
    classify,
    read_signals,
    retry_after_seconds,
)

RESET_MS = 1788220800000  # 2026-09-01T00:00:00Z
RESET_S = 1788220800.0
WALL = RESET_S - 3600.0  # 23:00 UTC, one hour before the reset and before UTC midnight

REAL_DAILY = (
    b'{"error":{"code":429,"message":"Rate limit exceeded: free-models-per-day. Add 10 credits '
    b'to unlock 1000 free model requests per day","metadata":{"headers":{"X-RateLimit-Limit":'
    b'"50","X-RateLimit-Remaining":"0","X-RateLimit-Reset":"1788220800000"},'
    b'"provider_name":null}}}'
)
UPSTREAM_RATE_LIMITED = {
    "message": "Provider returned error", "code": 429,
    "metadata": {
        "raw": "google/gemini-2.0-flash-exp:free is temporarily rate-limited upstream. Please "
               "retry shortly, or add your own key to accumulate your rate limits: "
               "https://openrouter.ai/settings/integrations",
        "provider_name": "Google AI Studio",
    },
}
RESOURCE_EXHAUSTED = {
    "message": "Provider returned error", "code": 429,
    "metadata": {
        "raw": '{\n  "error": {\n    "code": 429,\n    "message": "Resource has been exhausted '
               '(e.g. check quota).",\n    "status": "RESOURCE_EXHAUSTED"\n  }\n}\n',
        "provider_name": "Google",
    },
}


def body(error: dict[str, Any]) -> bytes:
    return json.dumps({"error": error}).encode()


def limited(rest: float | None, reason: str, *, free: bool = False) -> Verdict:
    return Verdict(Outcome.KEY_LIMITED, rest_seconds=rest,
                   scope=Scope.ACCOUNT if free else Scope.KEY, free_only=free, reason=reason)


def overloaded(retry_after: float | None = None) -> Verdict:
    return Verdict(Outcome.OVERLOADED, retry_after=retry_after, reason="429 upstream overloaded")


def first_rule(status: int, headers: list[tuple[bytes, bytes]], raw: bytes) -> str | None:
    signals = read_signals(status, headers, raw, WALL)
    return next((rule.name for rule in RULES if rule.test(signals)), None)


# --- the table ------------------------------------------------------------------------------


def test_rule_names_are_unique_and_statuses_to_classify_never_include_2xx() -> None:
    assert len({rule.name for rule in RULES}) == len(RULES)
    assert {401, 402, 403, 429} <= STATUSES_TO_CLASSIFY
    assert not any(200 <= status < 300 for status in STATUSES_TO_CLASSIFY)


@pytest.mark.parametrize(
    ("status", "headers", "raw", "rule"),
    [
        (401, [], b'{"error":{"code":401,"message":"User not found."}}', "401 invalid key"),
        (403, [], body({"code": 403, "message": "This API key is disabled"}),
         "403 key disabled/expired"),
        (404, [], body({"code": 404, "message": "gone",
                        "availability": {"code": "free_variant_ended"}}), "model gone"),
        (429, [], REAL_DAILY, "429 OpenRouter limit (X-RateLimit-*)"),
        (429, [], body(UPSTREAM_RATE_LIMITED), "429 provider / capacity"),
        (429, [], body({"code": 429, "message": "Rate limit exceeded"}), "429 OpenRouter limit"),
        (402, [], body({"code": 402, "message": "x",
                        "metadata": {"limit_source": "openrouter_in_flight_budget"}}),
         "402 in-flight budget"),
        (402, [], body({"code": 402, "message": "x",
                        "metadata": {"limit_source": "openrouter_key_limit"}}), "402 key limit"),
        (402, [], body({"code": 402, "message": "x",
                        "metadata": {"limit_source": "openrouter_credits"}}),
         "402 account credits"),
        (402, [], body({"code": 402, "message": "Insufficient credits"}), "402 no credit"),
        (403, [], body({"code": 403, "message": "Your input was flagged"}), None),
        (500, [], REAL_DAILY, None),
    ],
)
def test_each_rule_is_reached_by_a_real_shaped_answer(
    status: int, headers: list[tuple[bytes, bytes]], raw: bytes, rule: str | None
) -> None:
    assert first_rule(status, headers, raw) == rule


# --- 429: OpenRouter's own limits ---------------------------------------------------------


def test_real_daily_limit_rests_the_account_for_free_models_until_the_epoch_ms_reset() -> None:
    verdict = classify(429, [], REAL_DAILY, WALL)
    assert verdict == limited(3600.0, "429 free-models-per-day", free=True)
    assert verdict.retry is True
    assert verdict.message.startswith("Rate limit exceeded: free-models-per-day. Add 10")
    assert classify(429, [], REAL_DAILY, RESET_S - 12345.5).rest_seconds == 12345.5


def test_high_balance_daily_limit_without_reset_rests_until_utc_midnight() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded: free-models-per-day-high-balance",
              "metadata": {"headers": {"X-RateLimit-Limit": "1000",
                                       "X-RateLimit-Remaining": "0"}}})
    assert classify(429, [], b, WALL) == limited(
        3600.0, "429 free-models-per-day-high-balance", free=True)
    assert classify(429, [], b, RESET_S - 30.0).rest_seconds == 30.0
    assert classify(429, [], b, RESET_S).rest_seconds == 86400.0  # at midnight: the next one


def test_free_tier_daily_limit_source_is_account_free_only_and_daily() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded",
              "metadata": {"limit_source": "openrouter_free_tier_daily",
                           "error_type": "rate_limit_exceeded"}})
    assert classify(429, [], b, WALL) == limited(3600.0, "429 openrouter_free_tier_daily",
                                                 free=True)


def test_free_models_per_minute_is_account_wide_but_not_daily() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded: free-models-per-min. ",
              "metadata": {"headers": {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0",
                                       "X-RateLimit-Reset": str(int(WALL * 1000) + 17_000)}}})
    assert classify(429, [], b, WALL) == limited(17.0, "429 free-models-per-min", free=True)
    no_reset = body({"code": 429, "message": "Rate limit exceeded: free-models-per-min"})
    assert classify(429, [], no_reset, WALL) == limited(None, "429 free-models-per-min",
                                                        free=True)


def test_a_free_limit_named_anywhere_in_the_message_counts() -> None:
    b = body({"code": 429, "message": "Too many requests (free-models-per-min); slow down"})
    assert classify(429, [], b, WALL) == limited(None, "429 free-models-per-min", free=True)


def test_per_model_rpm_limit_is_the_keys_for_every_model() -> None:
    b = body({"code": 429,
              "message": "Rate limit exceeded: limit_rpm/google/gemini-2.0-flash-exp/abc123",
              "metadata": {"headers": {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0",
                                       "X-RateLimit-Reset": str(int(WALL * 1000) + 42_000)}}})
    assert classify(429, [], b, WALL) == limited(
        42.0, "429 limit_rpm/google/gemini-2.0-flash-exp/abc123")


@pytest.mark.parametrize("name", [b"X-RateLimit-Reset", b"x-ratelimit-reset", b"X-RATELIMIT-RESET"])
@pytest.mark.parametrize(("value", "rest"), [(b"1788220800000", 3600.0), (b"1788220800", 3600.0),
                                             (b"90", 90.0), (b"2.5", 2.5)])
def test_reset_header_in_epoch_ms_epoch_s_or_seconds_from_now(
    name: bytes, value: bytes, rest: float
) -> None:
    b = body({"code": 429, "message": "Rate limit exceeded"})
    headers = [(b"content-type", b"application/json"), (name, value)]
    assert classify(429, headers, b, WALL) == limited(rest, "429 rate limited")


def test_metadata_reset_wins_over_headers_and_headers_over_retry_after() -> None:
    headers = [(b"X-RateLimit-Reset", str(RESET_MS + 60_000).encode()), (b"Retry-After", b"5")]
    assert classify(429, headers, REAL_DAILY, WALL).rest_seconds == 3600.0
    assert classify(429, headers, b"", WALL).rest_seconds == 3660.0
    assert classify(429, [(b"Retry-After", b"5")], b"", WALL).rest_seconds == 5.0


def test_metadata_header_name_is_case_insensitive_and_number_valued() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded",
              "metadata": {"headers": {"x-ratelimit-reset": RESET_MS}}})
    assert classify(429, [], b, WALL).rest_seconds == 3600.0


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf", "", True, None, [1], {"a": 1},
                                   10**400, "1e5"])
def test_unusable_metadata_reset_falls_back_to_the_header_then_to_the_default(value: Any) -> None:
    b = body({"code": 429, "message": "Rate limit exceeded",
              "metadata": {"headers": {"X-RateLimit-Reset": value}}})
    assert classify(429, [(b"x-ratelimit-reset", b"30")], b, WALL).rest_seconds == 30.0
    assert classify(429, [], b, WALL) == limited(None, "429 rate limited")


def test_ratelimit_headers_make_a_429_openrouters_own_even_with_provider_fields() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded: free-models-per-day",
              "metadata": {"provider_code": "429", "raw": "RESOURCE_EXHAUSTED",
                           "limit_source": "openrouter_shared_capacity"},
              "availability": {"code": "capacity_exhausted", "retry_after": 5}})
    headers = [(b"X-RateLimit-Limit", b"50"), (b"X-RateLimit-Remaining", b"0"),
               (b"X-RateLimit-Reset", str(RESET_MS).encode())]
    verdict = classify(429, headers, b, WALL)
    assert verdict.outcome is Outcome.KEY_LIMITED and verdict.rest_seconds == 3600.0
    # without them the same body is the provider's
    assert classify(429, [], b, WALL).outcome is Outcome.OVERLOADED


def test_no_reset_anywhere_means_the_callers_default() -> None:
    assert classify(429, [], body({"code": 429, "message": "Rate limit exceeded"}), WALL) == (
        limited(None, "429 rate limited"))


# --- 429: a provider's, nobody's key rests -----------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        UPSTREAM_RATE_LIMITED,
        RESOURCE_EXHAUSTED,
        {"message": "Provider returned error", "code": 429,
         "metadata": {"raw": {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}},
                      "provider_name": "Google"}},
        {"message": "Provider returned error", "code": 429,
         "metadata": {"provider_code": 429, "provider_name": "DeepInfra",
                      "error_type": "rate_limit_exceeded"}},
        {"message": "Rate limit exceeded",
         "metadata": {"limit_source": "openrouter_shared_capacity",
                      "error_type": "rate_limit_exceeded"}},
        {"message": "Rate limit exceeded",
         "metadata": {"limit_source": "upstream_provider_shared_pool"}},
        {"message": "No capacity",
         "availability": {"code": "capacity_exhausted", "retryable": True}},
        {"message": "deepseek/deepseek-r1:free is temporarily rate-limited upstream"},
    ],
    ids=["raw-rate-limited-upstream", "raw-resource-exhausted-str", "raw-resource-exhausted-obj",
         "provider-code", "shared-capacity", "provider-shared-pool", "capacity-exhausted",
         "message"],
)
def test_provider_429_variants_rest_no_key(error: dict[str, Any]) -> None:
    verdict = classify(429, [], body(error), WALL)
    assert verdict == overloaded()
    assert verdict.retry is True and verdict.rest_seconds is None


def test_provider_429_retry_after_from_availability_then_header() -> None:
    b = body({"code": 429, "message": "No capacity",
              "availability": {"code": "capacity_exhausted", "retryable": True,
                               "retry_after": 30}})
    assert classify(429, [(b"Retry-After", b"7")], b, WALL) == overloaded(30.0)
    assert classify(429, [(b"Retry-After", b"7")], body(RESOURCE_EXHAUSTED), WALL) == (
        overloaded(7.0))
    date = datetime.fromtimestamp(WALL + 120, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert classify(429, [(b"retry-after", date.encode())], body(UPSTREAM_RATE_LIMITED),
                    WALL) == overloaded(120.0)
    assert classify(429, [], body(UPSTREAM_RATE_LIMITED), WALL) == overloaded(None)


@pytest.mark.parametrize(("value", "seconds"), [(0, 1.0), (0.25, 1.0), ("12", 12.0),
                                                (10**9, MAX_SECONDS), (-3, None), ("x", None),
                                                (True, None)])
def test_availability_retry_after_is_bounded(value: Any, seconds: float | None) -> None:
    b = body({"code": 429, "message": "No capacity",
              "availability": {"code": "capacity_exhausted", "retry_after": value}})
    assert classify(429, [], b, WALL).retry_after == seconds


# --- 402 ----------------------------------------------------------------------------------------


def test_402_in_flight_budget_is_busy_wait_retry_after_and_no_rest() -> None:
    b = body({"code": 402, "message": "In-flight spending budget exceeded; retry shortly",
              "metadata": {"limit_source": "openrouter_in_flight_budget"}})
    verdict = classify(402, [(b"Retry-After", b"3")], b, WALL)
    assert verdict == Verdict(Outcome.BUSY, retry_after=3.0,
                              reason="402 openrouter_in_flight_budget")
    assert verdict.retry is True and verdict.rest_seconds is None
    assert classify(402, [], b, WALL).retry_after is None


@pytest.mark.parametrize(
    ("limit_reset", "rest"),
    [
        (RESET_MS, 3600.0),
        (str(int(RESET_S)), 3600.0),
        ("2026-09-01T00:00:00Z", 3600.0),
        ("2026-09-01T00:00:00", 3600.0),  # no zone: UTC
        ("daily", 3600.0),  # WALL is Monday 2026-08-31 23:00 UTC
        ("weekly", 6 * 86400 + 3600.0),  # weeks run Monday to Sunday: to the next Monday
        ("monthly", 3600.0),
        (" Daily ", 3600.0),
        ("someday", None),
        (None, None),
    ],
)
def test_402_key_limit_rests_that_key_until_its_limit_resets(
    limit_reset: Any, rest: float | None
) -> None:
    b = body({"code": 402, "message": "API key USD spend limit exceeded",
              "metadata": {"limit_source": "openrouter_key_limit", "limit_reset": limit_reset}})
    verdict = classify(402, [], b, WALL)
    assert verdict == Verdict(Outcome.NO_CREDIT, rest_seconds=rest,
                              reason="402 openrouter_key_limit")
    assert verdict.scope is Scope.KEY


def test_402_key_limit_periods_at_other_times() -> None:
    b: dict[str, Any] = {"error": {"code": 402, "metadata": {
        "limit_source": "openrouter_key_limit", "limit_reset": "weekly"}}}
    wednesday_noon = datetime(2026, 9, 2, 12, tzinfo=UTC).timestamp()
    assert classify(402, [], b, wednesday_noon).rest_seconds == 4.5 * 86400
    monday_midnight = datetime(2026, 9, 7, tzinfo=UTC).timestamp()
    assert classify(402, [], b, monday_midnight).rest_seconds == 7 * 86400
    b["error"]["metadata"]["limit_reset"] = "monthly"
    dec_31 = datetime(2026, 12, 31, 18, tzinfo=UTC).timestamp()
    assert classify(402, [], b, dec_31).rest_seconds == 6 * 3600
    b["error"]["metadata"]["limit_reset"] = "daily"
    assert classify(402, [], b, dec_31).rest_seconds == 6 * 3600


def test_402_key_limit_falls_back_to_the_ratelimit_reset_header() -> None:
    b = body({"code": 402, "message": "x", "metadata": {"limit_source": "openrouter_key_limit"}})
    assert classify(402, [(b"X-RateLimit-Reset", str(RESET_MS).encode())], b, WALL) == Verdict(
        Outcome.NO_CREDIT, rest_seconds=3600.0, reason="402 openrouter_key_limit")


def test_402_account_credits_rest_every_key_of_the_account() -> None:
    b = body({"code": 402, "message": "Insufficient credits",
              "metadata": {"limit_source": "openrouter_credits"}})
    assert classify(402, [], b, WALL) == Verdict(Outcome.NO_CREDIT, scope=Scope.ACCOUNT,
                                                 reason="402 openrouter_credits")
    negative = body({"code": 402, "message": "Your account has a negative credit balance. Add "
                                             "credits to continue, even on free models."})
    assert classify(402, [], negative, WALL) == Verdict(Outcome.NO_CREDIT, scope=Scope.ACCOUNT,
                                                        reason="402 negative balance")


@pytest.mark.parametrize("raw", [body({"code": 402, "message": "Insufficient credits. Add more "
                                                               "using https://openrouter.ai/credits"}),
                                 b"", b"Payment Required"])
def test_bare_402_rests_that_key_for_the_default(raw: bytes) -> None:
    verdict = classify(402, [], raw, WALL)
    assert verdict == Verdict(Outcome.NO_CREDIT, reason="402 no credit")
    assert verdict.retry and verdict.scope is Scope.KEY and verdict.rest_seconds is None


# --- availability: a model gone for free keys ------------------------------------------------


@pytest.mark.parametrize("status", [200, 400, 404, 410, 429, 502, 503])
def test_free_variant_ended_is_model_gone_at_any_status(status: int) -> None:
    b = body({"code": status, "message": "The free variant of this model has ended",
              "metadata": {"model": "deepseek/deepseek-r1:free"},
              "availability": {"code": "free_variant_ended", "retryable": False}})
    verdict = classify(status, [(b"Retry-After", b"9")], b, WALL)
    assert verdict == Verdict(Outcome.MODEL_GONE, reason=f"{status} free_variant_ended",
                              model="deepseek/deepseek-r1:free")
    assert verdict.retry is False


def test_availability_is_read_from_metadata_too() -> None:
    gone = body({"code": 404, "message": "gone",
                 "metadata": {"availability": {"code": "free_variant_ended"}}})
    assert classify(404, [], gone, WALL).outcome is Outcome.MODEL_GONE
    busy = body({"code": 429, "message": "No capacity",
                 "metadata": {"availability": {"code": "capacity_exhausted", "retry_after": 4}}})
    assert classify(429, [], busy, WALL) == overloaded(4.0)


def test_model_gone_names_the_model_only_when_the_body_does() -> None:
    b: dict[str, Any] = {"error": {"code": 404, "availability": {"code": "free_variant_ended"}}}
    assert classify(404, [], b, WALL).model is None
    b["error"]["availability"]["model"] = "x" * 201  # not a model id anyone sent
    assert classify(404, [], b, WALL).model is None
    b["error"]["availability"]["model"] = "meta-llama/llama-3.3-70b-instruct:free"
    assert classify(404, [], b, WALL).model == "meta-llama/llama-3.3-70b-instruct:free"


# --- 401, 403 ---------------------------------------------------------------------------------


def test_401_is_key_invalid() -> None:
    verdict = classify(401, [], b'{"error":{"code":401,"message":"No auth credentials found"}}',
                       WALL)
    assert verdict == Verdict(Outcome.KEY_INVALID, reason="401 invalid key")
    assert verdict.retry and verdict.message == "No auth credentials found"
    assert classify(401, [], b"", WALL) == verdict


@pytest.mark.parametrize(("message", "reason"), [
    ("This API key is disabled", "403 key disabled"),
    ("API key has expired", "403 key expired"),
    ("Key is expired, create a new one", "403 key expired"),
])
def test_403_with_a_key_problem_is_key_invalid(message: str, reason: str) -> None:
    verdict = classify(403, [], body({"code": 403, "message": message}), WALL)
    assert verdict == Verdict(Outcome.KEY_INVALID, reason=reason)


def test_403_moderation_passes_on_and_the_key_is_fine() -> None:
    b = body({"code": 403, "message": "openai/gpt-4o requires moderation on OpenAI. Your input "
                                      "was flagged for \"harassment\".",
              "metadata": {"reasons": ["harassment"], "flagged_input": "…",
                           "provider_name": "OpenAI", "model_slug": "openai/gpt-4o"}})
    assert classify(403, [], b, WALL) == OK


# --- everything else passes on -------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204, 301, 304, 400, 404, 408, 413, 422, 500, 502,
                                    503, 504])
def test_other_statuses_are_ok_even_with_limit_signals(status: int) -> None:
    headers = [(b"retry-after", b"30"), (b"x-ratelimit-reset", str(RESET_MS).encode())]
    verdict = classify(status, headers, REAL_DAILY, WALL)
    assert verdict == OK and verdict.retry is False


@pytest.mark.parametrize("raw", [b"", b"Too Many Requests", b"<html>429</html>", b"\xff\xfe\x00",
                                 b"[1, 2]", b'"error"', b'{"error": "rate limited"}',
                                 b'{"error": {"metadata": "x"}}', b"null", b'{"error":{'])
def test_an_odd_429_is_openrouters_limit_with_no_known_reset(raw: bytes) -> None:
    assert classify(429, [], raw, WALL) == limited(None, "429 rate limited")
    assert classify(429, [(b"Retry-After", b"7")], raw, WALL) == limited(7.0, "429 rate limited")


# --- in-band errors: the same function --------------------------------------------------------


def test_in_band_sse_error_event_is_classified_like_the_status() -> None:
    event = {"id": "gen-1", "object": "chat.completion.chunk", "provider": "Chutes",
             "error": {"code": 429, "message": "Rate limit exceeded: free-models-per-day",
                       "metadata": {"headers": {"X-RateLimit-Reset": str(RESET_MS)}}},
             "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}
    envelope = json.dumps({"error": event["error"]}, separators=(",", ":")).encode()
    expected = limited(3600.0, "429 free-models-per-day", free=True)
    assert classify(429, [], envelope, WALL) == expected
    assert classify(429, [], {"error": event["error"]}, WALL) == expected  # already parsed
    provider = {"error": {"code": 429, "message": "Provider returned error",
                          "metadata": {"raw": "temporarily rate-limited upstream"}}}
    assert classify(429, [], provider, WALL) == overloaded()
    assert classify(502, [], {"error": {"code": 502, "message": "Provider down"}}, WALL) == OK


# --- bounds and formats ------------------------------------------------------------------------


def test_every_time_is_at_least_a_second_and_at_most_31_days() -> None:
    assert MAX_SECONDS == 31 * 86400.0
    past = body({"code": 429, "message": "x",
                 "metadata": {"headers": {"X-RateLimit-Reset": str(RESET_MS)}}})
    assert classify(429, [], past, RESET_S + 500).rest_seconds == 1.0
    assert classify(429, [(b"retry-after", b"0")], b"", WALL).rest_seconds == 1.0
    far_ms = str(int((WALL + 400 * 86400) * 1000)).encode()
    assert classify(429, [(b"x-ratelimit-reset", far_ms)], b"", WALL).rest_seconds == MAX_SECONDS
    assert classify(429, [(b"retry-after", b"99999999")], b"", WALL).rest_seconds == MAX_SECONDS
    huge = body({"code": 429, "message": "x",
                 "metadata": {"headers": {"X-RateLimit-Reset": 1e300}}})
    assert classify(429, [], huge, WALL).rest_seconds == MAX_SECONDS


def test_retry_after_http_date_forms() -> None:
    # IMF-fixdate, RFC 850 and asctime: RFC 9110 §5.6.7 asks recipients to accept all three
    wall = 784111777.0 - 120.0  # two minutes before Sun, 06 Nov 1994 08:49:37 GMT
    for value in (b"Sun, 06 Nov 1994 08:49:37 GMT", b"Sunday, 06-Nov-94 08:49:37 GMT",
                  b"Sun Nov  6 08:49:37 1994"):
        assert retry_after_seconds(value, wall) == 120.0, value
    assert retry_after_seconds(b" 30 ", wall) == 30.0
    assert retry_after_seconds(b"Sun, 06 Nov 1994 08:49:37 GMT", wall + 1e6) == 1.0


def test_retry_after_bad_values_are_ignored() -> None:
    for value in (None, b"", b"soon", b"-5", b"1.5", b"\xb2", b"1\xb9",
                  b"Sun, 99 Nov 1994 08:49:37 GMT"):
        assert retry_after_seconds(value, WALL) is None, value


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
def test_dates_and_midnights_are_utc_whatever_the_local_zone() -> None:
    assert retry_after_seconds(b"Sun Nov  6 08:49:37 1994", 784111777.0 - 120.0) == 120.0
    daily = body({"code": 429, "message": "Rate limit exceeded: free-models-per-day"})
    assert classify(429, [], daily, WALL).rest_seconds == 3600.0
    key_limit = {"error": {"code": 402, "metadata": {"limit_source": "openrouter_key_limit",
                                                     "limit_reset": "2026-09-01T00:00:00"}}}
    assert classify(402, [], key_limit, WALL).rest_seconds == 3600.0


def test_reason_and_message_stay_bounded_whatever_the_upstream_says() -> None:
    b = body({"code": 429, "message": "Rate limit exceeded: " + "x" * 5000,
              "metadata": {"limit_source": "evil\r\nSet-Cookie: a=b" + "y" * 500}})
    verdict = classify(429, [], b, WALL)
    assert len(verdict.reason) <= 4 + 64 and "\r" not in verdict.reason
    assert " " not in verdict.reason[4:]
    assert len(verdict.message) == 300


# --- nothing upstream sends makes it raise -------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "raw"),
    [
        ([(b"retry-after", b"\xb2")], b""),  # '²' is isdigit() but not a float
        ([], b'{"error":{"metadata":{"headers":{"X-RateLimit-Reset":1' + b"0" * 400 + b"}}}}"),
        ([], b"[" * 5000),
        ([], b'{"error":' * 2000 + b"{}" + b"}" * 2000),
        ([], body({"code": 429, "message": ["not", "a", "string"],
                   "metadata": {"headers": ["x"], "limit_source": 5, "raw": ""},
                   "availability": "gone"})),
    ],
    ids=["retry-after-superscript", "huge-int-reset", "deep-array", "deep-object", "wrong-types"],
)
def test_odd_upstream_bytes_never_raise(headers: list[tuple[bytes, bytes]], raw: bytes) -> None:
    verdict = classify(429, headers, raw, WALL)
    assert verdict == limited(None, "429 rate limited")


NAMES = st.sampled_from(["error", "metadata", "headers", "raw", "message", "X-RateLimit-Reset",
                         "limit_source", "availability", "code", "retry_after", "limit_reset",
                         "provider_code", "model"])
VALUES = st.sampled_from(["free-models-per-day", "openrouter_key_limit", "openrouter_credits",
                          "openrouter_in_flight_budget", "free_variant_ended", "daily", "weekly",
                          "capacity_exhausted", "Rate limit exceeded: free-models-per-min",
                          "1788220800000", "-1", "key is disabled"])
HEADER_NAMES = st.sampled_from([b"retry-after", b"Retry-After", b"x-ratelimit-reset",
                                b"X-RateLimit-Limit", b"content-type"])


@settings(max_examples=300, database=None, deadline=None)
@given(
    status=st.sampled_from([200, 400, 401, 402, 403, 404, 429, 500, 503]),
    headers=st.lists(st.tuples(HEADER_NAMES, st.binary(max_size=30)), max_size=4),
    raw=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
            | VALUES,
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=4),
            max_leaves=14,
        ).map(lambda doc: json.dumps(doc).encode()),
    ),
    wall=st.floats(0, 4e9),
)
@example(status=429, headers=[(b"retry-after", b"\xb2")], raw=b"", wall=WALL)
def test_classify_is_total_and_bounded(
    status: int, headers: list[tuple[bytes, bytes]], raw: bytes, wall: float
) -> None:
    verdict = classify(status, headers, raw, wall)
    assert isinstance(verdict, Verdict)
    for seconds in (verdict.rest_seconds, verdict.retry_after):
        assert seconds is None or 1.0 <= seconds <= MAX_SECONDS
    if verdict.rest_seconds is not None:
        assert verdict.outcome in (Outcome.KEY_LIMITED, Outcome.NO_CREDIT)
    if verdict.outcome is Outcome.OK:
        assert verdict == OK
    assert verdict.retry is (verdict.outcome not in (Outcome.OK, Outcome.MODEL_GONE))
    assert len(verdict.message) <= 300 and len(verdict.reason) <= 80
    if status not in (401, 402, 403, 429):
        assert verdict.outcome in (Outcome.OK, Outcome.MODEL_GONE)
