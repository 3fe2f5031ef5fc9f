"""Key routing that knows OpenRouter, end to end: one test per classifier rule, each with a
real-shaped upstream answer, through the running proxy.

The fake answers per key; each test checks what the client got, which keys the fake saw,
the key pool's states and rest lengths, and what ``/metrics/json`` says about each key.
Rests never wait in real time: ``take_time`` puts the running proxy on test clocks (the key
pool's monotonic and wall clocks, the wall clock the attempt loop classifies with, the quota
poller's and the sticky map's clocks) and records the attempt loop's waits instead of
sleeping them, so a test moves time forward itself and sees exactly how long a rest is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from orproxy.app import App
from orproxy.keys import KeyState, key_id
from tests.conftest import KEYS, ProxyFactory, sample
from tests.fakeor import (
    FakeOpenRouter,
    Recorded,
    Responder,
    Script,
    completion,
    rate_limited_body,
)
from tests.rawhttp import Response, roundtrip
from tests.test_accounting import keys_by_id, metrics_json
from tests.test_rotation import ACCOUNT_KEYS, chat, key_index, states, used_keys, views

pytestmark = pytest.mark.anyio

A, C, D = KeyState.AVAILABLE, KeyState.COOLING, KeyState.DISABLED
F = KeyState.FREE_LIMITED

# Sunday 2026-11-29, noon UTC: the next UTC midnight is 12 h away, the next Monday too, the
# next month 36 h away.
WALL0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC).timestamp()
MONO0 = 5000.0
TO_MIDNIGHT = 12 * 3600.0
TO_MONTH_END = 36 * 3600.0

FREE_MODEL = "google/gemma-3-27b-it:free"
PAID_MODEL = "openai/gpt-4o"
ZERO = {"prompt": "0", "completion": "0", "request": "0", "image": "0"}
PRICED = {"prompt": "0.0000025", "completion": "0.00001", "request": "0", "image": "0"}
# what /api/v1/models says: free is every price zero, whatever the id says
MODELS: dict[str, Any] = {"data": [
    {"id": FREE_MODEL, "pricing": ZERO},
    {"id": "openrouter/free", "pricing": ZERO},
    {"id": "meta-llama/llama-3.3-70b-instruct:free", "pricing": ZERO},
    {"id": PAID_MODEL, "pricing": PRICED},
    {"id": "cheap/looks-free:free", "pricing": {**ZERO, "completion": "0.0000001"}},
]}


# --- test time ---------------------------------------------------------------------------------


class FakeClock:
    """A clock that moves only when the test moves it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Clocks:
    mono: FakeClock
    wall: FakeClock
    waits: list[float] = field(default_factory=list)  # the attempt loop's waits, in order

    def advance(self, seconds: float) -> None:
        self.mono.now += seconds
        self.wall.now += seconds

    def reset_ms(self, seconds_from_now: float) -> int:
        """An X-RateLimit-Reset as OpenRouter writes it (epoch milliseconds)."""
        return round((self.wall.now + seconds_from_now) * 1000)


def take_time(app: App, wall: float = WALL0) -> Clocks:
    """Put the running proxy on test clocks; its waits before a retry are recorded, not
    slept. (The attempt loop's wall clock and sleep, and the quota poller's wall clock, are
    private attributes: there is no public way to inject them into a running App.)"""
    clocks = Clocks(FakeClock(MONO0), FakeClock(wall))
    services = app.services
    services.keys.clock = clocks.mono
    services.keys.wall = clocks.wall
    attempts = services.attempts
    attempts.wall = clocks.wall

    async def sleep(seconds: float) -> None:
        clocks.waits.append(seconds)

    attempts.sleep = sleep
    app.quota.wall = clocks.wall
    if attempts.sticky is not None:
        attempts.sticky.clock = clocks.mono
    return clocks


# --- requests and answers ----------------------------------------------------------------------


def chat_body(model: str, text: str = "hi") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}]}).encode()


async def ask(app: App, model: str = FREE_MODEL) -> Response:
    return await chat(app.port, chat_body(model))


def content_of(resp: Response) -> str:
    assert resp.status == 200, resp.body[:300]
    text = json.loads(resp.body)["choices"][0]["message"]["content"]
    assert isinstance(text, str)
    return text


def models_of(fake: FakeOpenRouter, start: int = 0) -> list[str]:
    """The model of each chat request the fake saw."""
    return [r.json()["model"] for r in chats(fake)[start:]]


def chats(fake: FakeOpenRouter) -> list[Recorded]:
    return [r for r in fake.requests if r.target == b"/api/v1/chat/completions"]


def error_doc(code: int, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


Answer = tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]


def script(answers: dict[int, Answer], *, models: bool = False, once: bool = False,
           seen: list[int] | None = None, clocks: Clocks | None = None,
           ) -> Script:
    """Key i answers ``answers[i]`` (status, body, headers) — only the first time if
    ``once`` — the others a completion naming their key; ``/models`` gets MODELS. ``seen``
    collects, per chat request, how many waits the attempt loop had recorded when it
    arrived."""
    answers = dict(answers)

    async def run(req: Recorded, resp: Responder) -> None:
        if req.target.startswith(b"/api/v1/models"):
            assert models, "the proxy fetched /models"
            await resp.json(200, MODELS)
            return
        i = key_index(req)
        if seen is not None and clocks is not None:
            seen.append(len(clocks.waits))
        if i in answers:
            status, body, headers = answers.pop(i) if once else answers[i]
            await resp.json(status, body, headers)
        else:
            await resp.json(200, completion(f"from key {i}"))

    return run


def key_doc(doc: dict[str, Any], i: int) -> dict[str, Any]:
    """Key i as /metrics/json shows it."""
    shown = keys_by_id(doc)[key_id(KEYS[i])]
    assert isinstance(shown, dict)
    return shown


# --- OpenRouter's own 429: the key (or the account, for free models) rests -------------------

PER_MODEL = "Rate limit exceeded: limit_rpm/google/gemini-2.5-pro/8f2a"


@pytest.mark.parametrize("where", ["body", "headers"])
async def test_ratelimit_429_rests_the_key_until_its_reset(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, where: str,
) -> None:
    app = await make_proxy()
    clocks = take_time(app)
    reset = clocks.reset_ms(30)
    if where == "body":
        answer: Answer = (429, rate_limited_body(reset, PER_MODEL), [])
    else:  # the same limit told as HTTP headers, the body bare
        answer = (429, error_doc(429, PER_MODEL), [
            (b"X-RateLimit-Limit", b"20"), (b"X-RateLimit-Remaining", b"0"),
            (b"X-RateLimit-Reset", str(reset).encode())])
    fake.script = script({0: answer}, once=True)
    assert content_of(await ask(app)) == "from key 1"
    assert used_keys(fake) == [0, 1]
    snap = views(app)
    assert [v.state for v in snap] == [C, A, A]
    assert snap[0].cooling_seconds == 30.0
    assert clocks.waits == []  # a rested key is no reason to wait: the next key goes at once
    shown = key_doc(await metrics_json(app.port), 0)
    assert shown["state"] == "cooling"
    assert shown["reason"] == "429 limit_rpm/google/gemini-2.5-pro/8f2a"
    assert shown["message"] == PER_MODEL
    assert shown["rest_until"] == WALL0 + 30
    assert shown["last_error"] == "429 limit_rpm/google/gemini-2.5-pro/8f2a"
    assert key_doc(await metrics_json(app.port), 1)["state"] == "available"
    # the resting key is skipped, for paid models too (the limit is not a free-model one)
    assert content_of(await ask(app)) == "from key 2"
    assert content_of(await ask(app, PAID_MODEL)) == "from key 1"
    clocks.advance(29.9)
    assert states(app) == [C, A, A]
    clocks.advance(0.1)
    assert states(app) == [A, A, A]
    for _ in range(2):
        await ask(app)
    assert used_keys(fake, 4) == [2, 0]  # back in rotation
    assert sample(app, "orproxy_upstream_attempts_total", {"outcome": "key_limited"}) == 1.0


@pytest.mark.parametrize("listed", [False, True], ids=["suffix", "models-list"])
async def test_free_model_limit_rests_the_account_for_free_models_only(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, listed: bool,
) -> None:
    # which models are free: the /models list when the cache has it (every price zero,
    # whatever the id says), else the :free suffix
    if listed:
        app = await make_proxy(openrouter={"keys": ACCOUNT_KEYS, "enable_cache": True})
        free, paid = "openrouter/free", "cheap/looks-free:free"
    else:
        app = await make_proxy(openrouter={"keys": ACCOUNT_KEYS})
        free, paid = FREE_MODEL, PAID_MODEL
    clocks = take_time(app)
    message = "Rate limit exceeded: free-models-per-min. "
    fake.script = script({0: (429, rate_limited_body(clocks.reset_ms(60), message), [])},
                         models=listed, once=True)
    if listed:
        assert (await roundtrip(app.port, b"GET /api/v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
                                )).status == 200
    assert content_of(await ask(app, free)) == "from key 2"
    # the other key of "alice" was not even tried: the limit is the account's
    assert used_keys(fake, len(fake.requests) - 2) == [0, 2]
    snap = views(app)
    assert [v.state for v in snap] == [F, F, A]
    assert [v.cooling_seconds for v in snap] == [60.0, 60.0, 0.0]
    # a paid model still uses alice's keys; a free one does not
    for model in (paid, paid, free, free):
        await ask(app, model)
    assert used_keys(fake, len(fake.requests) - 4) == [0, 1, 2, 2]
    assert models_of(fake, len(chats(fake)) - 4) == [paid, paid, free, free]
    doc = await metrics_json(app.port)
    for i in (0, 1):
        shown = key_doc(doc, i)
        assert shown["state"] == "free_limited"
        assert shown["reason"] == "429 free-models-per-min"
        assert shown["message"] == message
        assert shown["rest_until"] == WALL0 + 60
    assert key_doc(doc, 2)["state"] == "available"
    assert sample(app, "orproxy_keys", {"state": "free_limited"}) == 2.0
    assert (await roundtrip(app.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")).status == 200
    clocks.advance(60)
    assert states(app) == [A, A, A]


@pytest.mark.parametrize(("wall", "rest"), [(WALL0, TO_MIDNIGHT), (WALL0 + 43140, 60.0)],
                         ids=["noon", "23:59"])
async def test_daily_limit_without_a_reset_rests_until_the_next_utc_midnight(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, wall: float, rest: float,
) -> None:
    app = await make_proxy()
    clocks = take_time(app, wall)
    message = ("Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free "
               "model requests per day")
    body = error_doc(429, message, metadata={"limit_source": "openrouter_free_tier_daily",
                                             "error_type": "rate_limit_exceeded"})
    fake.script = script({0: (429, body, [])})
    assert content_of(await ask(app)) == "from key 1"
    snap = views(app)
    assert [v.state for v in snap] == [F, A, A]
    assert snap[0].cooling_seconds == rest
    shown = key_doc(await metrics_json(app.port), 0)
    assert shown["reason"] == "429 openrouter_free_tier_daily"
    assert shown["rest_until"] == wall + rest
    clocks.advance(rest - 1)
    assert states(app) == [F, A, A]
    clocks.advance(1)
    assert states(app) == [A, A, A]


# --- a provider's 429 and the in-flight budget: nobody's key rests, the loop waits ---------

PROVIDER_429 = error_doc(429, "Provider returned error", metadata={
    "provider_code": 429, "provider_name": "DeepInfra", "error_type": "rate_limit_exceeded",
    "raw": "{\"error\":\"Too many requests, please slow down\"}"})
CAPACITY_429 = error_doc(429, "No capacity for this model right now", availability={
    "code": "capacity_exhausted", "retryable": True, "retry_after": 3})


@pytest.mark.parametrize(("answer", "wait"), [
    ((429, PROVIDER_429, [(b"Retry-After", b"7")]), 7.0),
    ((429, CAPACITY_429, []), 3.0),
    ((429, PROVIDER_429, []), 0.5),  # no hint: google_rate_delay
], ids=["retry-after", "availability", "no-hint"])
async def test_provider_429_rests_no_key_and_waits_before_the_next_attempt(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, answer: Answer, wait: float,
) -> None:
    app = await make_proxy(openrouter={"google_rate_delay": 0.5})
    clocks = take_time(app)
    seen: list[int] = []
    fake.script = script({0: answer}, once=True, seen=seen, clocks=clocks)
    assert content_of(await ask(app)) == "from key 1"
    assert used_keys(fake) == [0, 1]
    assert clocks.waits == [wait]
    assert seen == [0, 1]  # the wait came between the attempts
    assert states(app) == [A, A, A]
    assert [v.cooling_seconds for v in views(app)] == [0.0, 0.0, 0.0]
    shown = key_doc(await metrics_json(app.port), 0)
    assert shown["state"] == "available" and shown["reason"] == ""
    assert shown["last_error"] == "429 upstream overloaded"
    assert sample(app, "orproxy_upstream_attempts_total", {"outcome": "overloaded"}) == 1.0
    await ask(app)
    assert used_keys(fake, 2) == [2]
    await ask(app)
    assert used_keys(fake, 3) == [0]  # still in rotation


IN_FLIGHT = error_doc(402, "Too many requests in flight for this key's spending budget",
                      metadata={"limit_source": "openrouter_in_flight_budget"})


async def test_402_in_flight_budget_waits_and_retries_without_a_rest(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app = await make_proxy()
    clocks = take_time(app)
    fake.script = script({0: (402, IN_FLIGHT, [(b"Retry-After", b"2")])})
    assert content_of(await ask(app)) == "from key 1"
    assert used_keys(fake) == [0, 1]
    assert clocks.waits == [2.0]
    assert states(app) == [A, A, A]
    shown = key_doc(await metrics_json(app.port), 0)
    assert shown["reason"] == "" and shown["last_error"] == "402 openrouter_in_flight_budget"
    assert sample(app, "orproxy_upstream_attempts_total", {"outcome": "busy"}) == 1.0


async def test_402_in_flight_budget_on_every_key_passes_the_last_answer_on(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app = await make_proxy()
    clocks = take_time(app)
    busy = {i: (402, error_doc(402, f"in flight on key {i}",
                               metadata={"limit_source": "openrouter_in_flight_budget"}),
                [(b"Retry-After", b"2")]) for i in range(3)}
    fake.script = script(busy)
    resp = await ask(app)
    assert resp.status == 402
    assert json.loads(resp.body) == busy[2][1]
    assert used_keys(fake) == [0, 1, 2]
    assert clocks.waits == [2.0, 2.0]  # before each retry; none when no key is left
    assert states(app) == [A, A, A]
    again = await ask(app)  # nothing rests: the next request goes upstream again
    assert again.status == 402
    assert len(fake.requests) == 6


# --- 402: the key's spending limit, the account's credit --------------------------------------


@pytest.mark.parametrize(("reset", "rest"), [("daily", TO_MIDNIGHT),
                                              ("monthly", TO_MONTH_END)])
async def test_402_key_limit_rests_that_key_until_its_limit_reset(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, reset: str, rest: float,
) -> None:
    app = await make_proxy(openrouter={"keys": ACCOUNT_KEYS})
    clocks = take_time(app)
    message = "Key limit exceeded: this key's spending limit of $5 is used up"
    body = error_doc(402, message, metadata={"limit_source": "openrouter_key_limit",
                                             "limit_reset": reset})
    fake.script = script({0: (402, body, [])})
    assert content_of(await ask(app, PAID_MODEL)) == "from key 1"  # alice's other key serves
    snap = views(app)
    assert [v.state for v in snap] == [C, A, A]
    assert snap[0].cooling_seconds == rest
    shown = key_doc(await metrics_json(app.port), 0)
    assert shown["reason"] == "402 openrouter_key_limit"
    assert shown["message"] == message
    assert shown["rest_until"] == WALL0 + rest
    assert clocks.waits == []
    clocks.advance(rest)
    assert states(app) == [A, A, A]


@pytest.mark.parametrize(("body", "reason"), [
    (error_doc(402, "Insufficient credits. Add more using https://openrouter.ai/credits",
               metadata={"limit_source": "openrouter_credits"}), "402 openrouter_credits"),
    (error_doc(402, "Your account has a negative credit balance. Add credits to continue."),
     "402 negative balance"),
], ids=["credits", "negative-balance"])
async def test_402_account_credit_rests_every_key_of_the_account(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, body: dict[str, Any], reason: str,
) -> None:
    app = await make_proxy(openrouter={"keys": ACCOUNT_KEYS, "credit_cooldown_seconds": 900})
    clocks = take_time(app)
    fake.script = script({0: (402, body, [])})
    assert content_of(await ask(app, PAID_MODEL)) == "from key 2"
    assert used_keys(fake) == [0, 2]
    snap = views(app)
    assert [v.state for v in snap] == [C, C, A]  # for every model: there is no money
    assert [v.cooling_seconds for v in snap] == [900.0, 900.0, 0.0]
    doc = await metrics_json(app.port)
    for i in (0, 1):
        assert key_doc(doc, i)["reason"] == reason
        assert key_doc(doc, i)["message"] == body["error"]["message"]
    for model in (PAID_MODEL, FREE_MODEL):
        assert content_of(await ask(app, model)) == "from key 2"
    clocks.advance(900)
    assert states(app) == [A, A, A]


# --- the model is gone for free keys --------------------------------------------------------

GONE_MODEL = "meta-llama/llama-3.3-70b-instruct:free"


def gone_body(model_named: bool) -> dict[str, Any]:
    availability: dict[str, Any] = {"code": "free_variant_ended", "retryable": False}
    if model_named:
        availability["model"] = GONE_MODEL
    return error_doc(404, f"The free variant of {GONE_MODEL} has ended; use the paid model",
                     availability=availability)


async def listed_ids(app: App) -> list[str]:
    resp = await roundtrip(app.port, b"GET /api/v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 200
    return [m["id"] for m in json.loads(resp.body)["data"]]


@pytest.mark.parametrize("free_only", [True, False], ids=["free_only", "all-models"])
@pytest.mark.parametrize("model_named", [True, False], ids=["named", "from-request"])
async def test_free_variant_ended_is_not_retried_and_the_client_gets_openrouters_answer(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, free_only: bool, model_named: bool,
) -> None:
    app = await make_proxy(openrouter={"enable_cache": True, "free_only": free_only})
    take_time(app)
    body = gone_body(model_named)
    sent = json.dumps(body).encode()
    fake.script = script({0: (404, body, [(b"X-Generation-Id", b"gen-gone")])}, models=True)
    assert GONE_MODEL in await listed_ids(app)
    resp = await ask(app, GONE_MODEL)
    assert resp.status == 404
    assert resp.body == sent  # OpenRouter's own answer, byte for byte
    assert resp.header(b"x-generation-id") == b"gen-gone"
    assert len(chats(fake)) == 1  # no other key tried: the model is gone for every free key
    assert states(app) == [A, A, A]  # and no key is at fault
    assert sample(app, "orproxy_upstream_attempts_total", {"outcome": "model_gone"}) == 1.0
    assert key_doc(await metrics_json(app.port), 0)["last_error"] == "404 free_variant_ended"
    ids = await listed_ids(app)
    if free_only:
        assert GONE_MODEL not in ids  # the free-only list stops offering it
        assert "openrouter/free" in ids
        refused = await ask(app, GONE_MODEL)  # and free_only now refuses it locally
        assert refused.status == 403
        assert len(chats(fake)) == 1
    else:
        assert GONE_MODEL in ids


# --- the key itself is refused: disabled ------------------------------------------------------


@pytest.mark.parametrize(("status", "message", "reason"), [
    (401, "User not found.", "401 invalid key"),
    (403, "This API key is disabled.", "403 key disabled"),
    (403, "This key expired on 2026-11-01 and can no longer be used.", "403 key expired"),
], ids=["401", "403-disabled", "403-expired"])
async def test_refused_key_is_disabled_for_good(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, status: int, message: str, reason: str,
) -> None:
    app = await make_proxy()
    clocks = take_time(app)
    fake.script = script({0: (status, error_doc(status, message), [])})
    assert content_of(await ask(app)) == "from key 1"
    assert used_keys(fake) == [0, 1]
    assert states(app) == [D, A, A]
    shown = key_doc(await metrics_json(app.port), 0)
    assert shown["state"] == "disabled"
    assert shown["reason"] == reason
    assert shown["message"] == message
    assert shown["rest_until"] is None
    assert clocks.waits == []
    clocks.advance(7 * 86400)  # no rest ends: only a new config brings it back
    for _ in range(6):
        await ask(app, PAID_MODEL)
    assert 0 not in used_keys(fake, 2)
    assert states(app) == [D, A, A]
    assert sample(app, "orproxy_key_state", {"key_id": views(app)[0].id,
                                              "state": "disabled"}) == 1.0
