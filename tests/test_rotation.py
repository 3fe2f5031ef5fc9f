"""Key rotation and failure handling, end to end: client → proxy → fake OpenRouter.

Every test drives real requests over loopback; the fake decides per key (from the
Authorization it receives) what to answer, and the tests check which keys the proxy used,
what the client saw, and what state the key pool ended in. Every proxy here runs on the
test clock (conftest ``on_clock``): OpenRouter's reset times are written from its wall
clock, a rest ends when the test moves it, and the wait before a retry is recorded in
``clock.sleeps`` instead of slept.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Container
from email.utils import formatdate
from typing import Any

import anyio
import pytest

from orproxy.app import App
from orproxy.config import build_config
from orproxy.keys import KeyState, KeyView
from tests.conftest import AUTH, KEYS, ProxyFactory, clocked, proxy_config, sample
from tests.fakeor import (
    OVERLOAD_BODY,
    FakeOpenRouter,
    Recorded,
    Responder,
    completion,
    error_of,
    rate_limited_body,
    reset_ms,
)
from tests.memstream import FakeClock
from tests.procs import free_port
from tests.rawhttp import Response, roundtrip

pytestmark = pytest.mark.anyio

CHAT_BODY = b'{"model":"google/gemma-3-27b-it:free","messages":[{"role":"user","content":"hi"}]}'
Handler = Callable[[int, Recorded, Responder], Awaitable[None]]


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def make_proxy(make_proxy: ProxyFactory, clock: FakeClock) -> ProxyFactory:
    return clocked(make_proxy, clock)


def key_index(req: Recorded) -> int:
    """Which of KEYS the proxy put in this upstream request."""
    auth = req.header(b"authorization")
    assert auth is not None, "no Authorization sent upstream"
    assert auth.startswith(b"Bearer "), auth
    return KEYS.index(auth[len(b"Bearer "):].decode())


def used_keys(fake: FakeOpenRouter, start: int = 0) -> list[int]:
    return [key_index(r) for r in fake.requests[start:]]


def per_key(handler: Handler) -> Callable[[Recorded, Responder], Awaitable[None]]:
    async def script(req: Recorded, resp: Responder) -> None:
        await handler(key_index(req), req, resp)

    return script


def limited_keys(limited: Container[int], body_for: Callable[[int], Any]) -> Handler:
    """429 ``body_for(i)`` on the keys in ``limited`` (a live view: a test may add keys
    later); a completion on the others."""

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        if i in limited:
            await resp.json(429, body_for(i))
        else:
            await resp.json(200, completion(f"from key {i}"))

    return handler


def chat_request(body: bytes = CHAT_BODY, extra: bytes = b"") -> bytes:
    return (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Authorization: " + AUTH[1] + b"\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def chat(port: int, body: bytes = CHAT_BODY) -> Response:
    return await roundtrip(port, chat_request(body), b"POST")


def overload_body(provider: str) -> dict[str, Any]:
    """OVERLOAD_BODY with its own provider name, to tell one answer from another."""
    doc: dict[str, Any] = json.loads(json.dumps(OVERLOAD_BODY))
    doc["error"]["metadata"]["provider_name"] = provider
    return doc


def views(app: App) -> list[KeyView]:
    return app.services.keys.snapshot()


def states(app: App) -> list[KeyState]:
    return [v.state for v in views(app)]


A, C, D = KeyState.AVAILABLE, KeyState.COOLING, KeyState.DISABLED
F = KeyState.FREE_LIMITED


# --- round robin and the key's own rate limit ----------------------------------------------


async def test_round_robin_spreads_requests_over_keys_in_order(
    proxy: App, fake: FakeOpenRouter
) -> None:
    for _ in range(7):
        resp = await chat(proxy.port)
        assert resp.status == 200
    assert used_keys(fake) == [0, 1, 2, 0, 1, 2, 0]
    assert [v.uses for v in views(proxy)] == [3, 2, 2]
    assert states(proxy) == [A, A, A]


async def test_concurrent_requests_share_the_keys_evenly(
    proxy: App, fake: FakeOpenRouter
) -> None:
    async def slow(i: int, req: Recorded, resp: Responder) -> None:
        await asyncio.sleep(0.05)
        await resp.json(200, completion(f"from key {i}"))

    fake.script = per_key(slow)
    results: list[Response] = []

    async def one() -> None:
        results.append(await chat(proxy.port))

    async with anyio.create_task_group() as tg:
        for _ in range(30):
            tg.start_soon(one)
    assert [r.status for r in results] == [200] * 30
    assert sorted(used_keys(fake)) == [0] * 10 + [1] * 10 + [2] * 10
    assert [v.uses for v in views(proxy)] == [10, 10, 10]
    # each client got the answer of the key its request went out with
    contents = sorted(json.loads(r.body)["choices"][0]["message"]["content"] for r in results)
    assert contents == sorted(f"from key {i}" for i in used_keys(fake))


async def test_429_with_reset_in_body_cools_exactly_that_key(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    fake.script = per_key(limited_keys({0}, lambda i: rate_limited_body(
        reset_ms(30, clock.wall()))))
    resp = await chat(proxy.port)
    assert resp.status == 200, resp.body
    assert json.loads(resp.body)["choices"][0]["message"]["content"] == "from key 1"
    assert used_keys(fake) == [0, 1]
    snap = views(proxy)
    assert [v.state for v in snap] == [C, A, A]
    assert 27.0 < snap[0].cooling_seconds <= 30.0
    assert snap[0].reason == "429 rate limited"
    assert snap[1].cooling_seconds == 0.0 and snap[2].cooling_seconds == 0.0
    # later requests skip the cooled key and never see a 429
    for _ in range(4):
        resp = await chat(proxy.port)
        assert resp.status == 200
    assert used_keys(fake, 2) == [2, 1, 2, 1]


async def test_cooled_key_returns_after_its_reset(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    limited = {0}

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        if i in limited:
            limited.discard(i)
            await resp.json(429, rate_limited_body(reset_ms(2, clock.wall())))
        else:
            await resp.json(200, completion())

    fake.script = per_key(handler)
    assert (await chat(proxy.port)).status == 200
    assert used_keys(fake) == [0, 1]
    assert states(proxy) == [C, A, A]
    for _ in range(2):
        assert (await chat(proxy.port)).status == 200
    assert used_keys(fake, 2) == [2, 1]
    clock.advance(1.9)
    assert states(proxy) == [C, A, A]  # not before its reset
    clock.advance(0.4)
    assert states(proxy) == [A, A, A]
    for _ in range(3):
        assert (await chat(proxy.port)).status == 200
    assert sorted(used_keys(fake, 4)) == [0, 1, 2]


RESET_SOURCES: list[tuple[str, Callable[[float], list[tuple[bytes, bytes]]], float]] = [
    ("x-ratelimit-reset header (epoch ms)",
     lambda wall: [(b"X-RateLimit-Reset", str(reset_ms(45, wall)).encode())], 45.0),
    ("x-ratelimit-reset header (epoch s)",
     lambda wall: [(b"X-RateLimit-Reset", str(int(wall) + 45).encode())], 45.0),
    ("retry-after seconds", lambda wall: [(b"Retry-After", b"7")], 7.0),
    ("retry-after http-date",
     lambda wall: [(b"Retry-After", formatdate(wall + 40, usegmt=True).encode())], 40.0),
]


@pytest.mark.parametrize(("source", "make_headers", "expected"), RESET_SOURCES,
                         ids=[s[0] for s in RESET_SOURCES])
async def test_reset_from_response_headers(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock, source: str,
    make_headers: Callable[[float], list[tuple[bytes, bytes]]], expected: float,
) -> None:
    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        if i == 0:
            await resp.json(429, {"error": {"code": 429, "message": "Rate limit exceeded"}},
                            make_headers(clock.wall()))
        else:
            await resp.json(200, completion())

    fake.script = per_key(handler)
    resp = await chat(proxy.port)
    assert resp.status == 200
    assert used_keys(fake) == [0, 1]
    snap = views(proxy)
    assert [v.state for v in snap] == [C, A, A]
    assert expected - 3.0 < snap[0].cooling_seconds <= expected + 0.01, source


async def test_body_reset_wins_over_header_reset(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        if i == 0:
            await resp.json(429, rate_limited_body(reset_ms(100, clock.wall())),
                            [(b"Retry-After", b"5")])
        else:
            await resp.json(200, completion())

    fake.script = per_key(handler)
    assert (await chat(proxy.port)).status == 200
    assert 97.0 < views(proxy)[0].cooling_seconds <= 100.0


async def test_429_without_reset_uses_rate_limit_cooldown(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    app = await make_proxy(openrouter={"rate_limit_cooldown": 321})
    fake.script = per_key(limited_keys(
        {0}, lambda i: {"error": {"code": 429, "message": "Rate limit exceeded"}}))
    assert (await chat(app.port)).status == 200
    snap = views(app)
    assert [v.state for v in snap] == [C, A, A]
    assert 318.0 < snap[0].cooling_seconds <= 321.0


async def test_429_with_unparsable_body_still_cools_with_default(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    app = await make_proxy(openrouter={"rate_limit_cooldown": 77})

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        if i == 0:
            await resp.head(429, [(b"Content-Type", b"text/plain"), (b"Content-Length", b"4")])
            await resp.data(b"slow")
            await resp.end()
        else:
            await resp.json(200, completion())

    fake.script = per_key(handler)
    assert (await chat(app.port)).status == 200
    assert used_keys(fake) == [0, 1]
    assert 74.0 < views(app)[0].cooling_seconds <= 77.0


async def test_all_keys_cooling_gives_429_with_retry_after_of_soonest(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    resets = {0: 30, 1: 10, 2: 20}
    fake.script = per_key(limited_keys({0, 1, 2}, lambda i: rate_limited_body(
        reset_ms(resets[i], clock.wall()))))
    resp = await chat(proxy.port)
    assert resp.status == 429
    assert resp.header(b"retry-after") == b"10"
    assert resp.header(b"content-type") == b"application/json"
    error = error_of(resp)
    assert error["code"] == 429
    assert isinstance(error["message"], str) and error["message"]
    # OpenRouter's own words on the last limit come along, so users see which limit it was
    assert error["metadata"] == {"retry_after_seconds": 10,
                                 "upstream_message": "Rate limit exceeded."}
    assert used_keys(fake) == [0, 1, 2]
    assert states(proxy) == [C, C, C]
    # the next request is answered locally: nothing more goes upstream
    again = await chat(proxy.port)
    assert again.status == 429
    assert again.header(b"retry-after") == b"10"
    assert len(fake.requests) == 3


# --- overload: nobody's key is at fault ----------------------------------------------------

OVERLOAD_BODIES = {
    "raw temporarily rate-limited": OVERLOAD_BODY,
    "raw RESOURCE_EXHAUSTED": {"error": {"code": 429, "message": "Provider returned error",
                                         "metadata": {"raw": {"error": {
                                             "code": 429, "status": "RESOURCE_EXHAUSTED"}},
                                             "provider_name": "Google"}}},
    "limit_source shared capacity": {"error": {"code": 429, "message": "Rate limited",
                                               "metadata": {"limit_source":
                                                            "openrouter_shared_capacity"}}},
    "availability capacity_exhausted": {"error": {"code": 429, "message": "No capacity",
                                                  "availability": {"code": "capacity_exhausted",
                                                                   "retry_after": 3}}},
}


@pytest.mark.parametrize("body", list(OVERLOAD_BODIES.values()), ids=list(OVERLOAD_BODIES))
async def test_overload_429_cools_nothing_and_retries_on_another_key(
    proxy: App, fake: FakeOpenRouter, body: dict[str, Any]
) -> None:
    fake.script = per_key(limited_keys({0}, lambda i: body))
    resp = await chat(proxy.port)
    assert resp.status == 200
    assert json.loads(resp.body)["choices"][0]["message"]["content"] == "from key 1"
    assert used_keys(fake) == [0, 1]
    assert states(proxy) == [A, A, A]
    assert [v.cooling_seconds for v in views(proxy)] == [0.0, 0.0, 0.0]
    # the overloaded key stays in rotation: it is tried again in its turn
    for _ in range(2):
        assert (await chat(proxy.port)).status == 200
    assert used_keys(fake, 2) == [2, 0, 1]


async def test_overload_retry_waits_google_rate_delay(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    app = await make_proxy(openrouter={"google_rate_delay": 0.3})
    arrivals: list[float] = []

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        arrivals.append(clock())
        if i == 0:
            await resp.json(429, OVERLOAD_BODY)
        else:
            await resp.json(200, completion())

    fake.script = per_key(handler)
    assert (await chat(app.port)).status == 200
    assert used_keys(fake) == [0, 1]
    assert arrivals[1] >= arrivals[0] + 0.3  # the test clock's seconds
    assert clock.sleeps == [0.3]
    assert states(app) == [A, A, A]


async def test_no_overload_delay_when_no_key_is_left_to_retry(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    # one key, overloaded: there is nothing to retry on, so waiting google_rate_delay before
    # answering only delays the client
    app = await make_proxy(openrouter={"keys": [KEYS[0]], "google_rate_delay": 2.0})

    async def script(req: Recorded, resp: Responder) -> None:
        await resp.json(429, OVERLOAD_BODY)

    fake.script = script
    resp = await chat(app.port)
    assert resp.status == 429
    assert json.loads(resp.body) == OVERLOAD_BODY
    assert len(fake.requests) == 1
    assert clock.sleeps == [], f"client waited {clock.sleeps}s for a retry that never happened"


async def test_overloaded_on_every_key_passes_the_upstreams_429_on(
    proxy: App, fake: FakeOpenRouter
) -> None:
    def body(i: int) -> dict[str, Any]:
        return overload_body(f"provider-{i}")

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        await resp.json(429, body(i), [(b"X-Upstream-Marker", str(i).encode())])

    fake.script = per_key(handler)
    resp = await chat(proxy.port)
    assert resp.status == 429
    assert used_keys(fake) == [0, 1, 2]
    assert json.loads(resp.body) == body(2)
    assert resp.header(b"x-upstream-marker") == b"2"
    assert resp.header(b"content-type") == b"application/json"
    assert resp.header(b"retry-after") is None
    assert states(proxy) == [A, A, A]
    assert [v.cooling_seconds for v in views(proxy)] == [0.0, 0.0, 0.0]


# --- 401 / 402 -------------------------------------------------------------------------------


async def test_401_disables_the_key_for_good(proxy: App, fake: FakeOpenRouter) -> None:
    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        if i == 0:
            await resp.json(401, {"error": {"code": 401, "message": "User not found."}})
        else:
            await resp.json(200, completion(f"from key {i}"))

    fake.script = per_key(handler)
    resp = await chat(proxy.port)
    assert resp.status == 200
    assert json.loads(resp.body)["choices"][0]["message"]["content"] == "from key 1"
    assert used_keys(fake) == [0, 1]
    snap = views(proxy)
    assert [v.state for v in snap] == [D, A, A]
    assert snap[0].reason == "401 invalid key"
    for _ in range(6):
        assert (await chat(proxy.port)).status == 200
    assert 0 not in used_keys(fake, 2)
    assert states(proxy) == [D, A, A]


async def test_402_cools_the_key_for_credit_cooldown(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    app = await make_proxy(openrouter={"credit_cooldown_seconds": 120})

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        if i == 0:
            await resp.json(402, {"error": {"code": 402, "message": "Insufficient credits"}})
        else:
            await resp.json(200, completion())

    fake.script = per_key(handler)
    assert (await chat(app.port)).status == 200
    assert used_keys(fake) == [0, 1]
    snap = views(app)
    assert [v.state for v in snap] == [C, A, A]
    assert 117.0 < snap[0].cooling_seconds <= 120.0
    assert snap[0].reason == "402 no credit"


async def test_every_key_invalid_gives_503(proxy: App, fake: FakeOpenRouter) -> None:
    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        await resp.json(401, {"error": {"code": 401, "message": "User not found."}})

    fake.script = per_key(handler)
    resp = await chat(proxy.port)
    assert resp.status == 503
    assert error_of(resp)["code"] == 503
    assert resp.header(b"retry-after") is None
    assert used_keys(fake) == [0, 1, 2]
    assert states(proxy) == [D, D, D]
    again = await chat(proxy.port)
    assert again.status == 503
    assert len(fake.requests) == 3


# --- the retry budget ------------------------------------------------------------------------


async def test_max_attempts_bounds_the_retries(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    app = await make_proxy(retry={"max_attempts": 2})
    reset = reset_ms(50, clock.wall())

    def body(i: int) -> dict[str, Any]:
        return rate_limited_body(reset, message=f"Rate limit exceeded: key {i}")

    fake.script = per_key(limited_keys({0, 1, 2}, body))
    resp = await chat(app.port)
    assert resp.status == 429
    assert json.loads(resp.body) == body(1)
    assert used_keys(fake) == [0, 1]
    assert states(app) == [C, C, A]


async def test_deadline_bounds_the_retries(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    app = await make_proxy(retry={"deadline_seconds": 0.2},
                           openrouter={"google_rate_delay": 0.4})

    def body(i: int) -> dict[str, Any]:
        return overload_body(f"provider-{i}")

    fake.script = per_key(limited_keys({0, 1, 2}, body))
    resp = await chat(app.port)
    assert resp.status == 429
    # waiting 0.4 s would start the next attempt after the 0.2 s deadline: it never starts,
    # and the client gets the overload answer it has
    assert used_keys(fake) == [0]
    assert json.loads(resp.body) == body(0)


async def test_request_body_is_resent_byte_for_byte(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    fake.script = per_key(limited_keys({0, 1}, lambda i: rate_limited_body(
        reset_ms(60, clock.wall()))))
    body = ('{"model":"x", "messages":[{"role":"user","content":"héllo ✓ \\u0000 \\n"}],'
            '  "pad":"' + "z" * 3000 + '"}\n').encode()
    chunks = body[:100], body[100:]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    raw = (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
           b"Authorization: " + AUTH[1] + b"\r\nContent-Type: application/json\r\n"
           b"HTTP-Referer: https://example.test/app\r\nX-Title: My App\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    resp = await roundtrip(proxy.port, raw, b"POST")
    assert resp.status == 200
    assert used_keys(fake) == [0, 1, 2]
    for sent in fake.requests:
        assert sent.method == b"POST"
        assert sent.target == b"/api/v1/chat/completions"
        assert sent.body == body
        assert sent.header(b"content-length") == str(len(body)).encode()
        assert sent.header(b"transfer-encoding") is None
        assert sent.header(b"content-type") == b"application/json"
        assert sent.header(b"http-referer") == b"https://example.test/app"
        assert sent.header(b"x-title") == b"My App"


# --- strategies ------------------------------------------------------------------------------


async def test_strategy_first_uses_the_first_usable_key(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    app = await make_proxy(openrouter={"key_selection_strategy": "first"})
    limited: set[int] = set()
    fake.script = per_key(limited_keys(limited, lambda i: rate_limited_body(
        reset_ms(60, clock.wall()))))
    for _ in range(4):
        assert (await chat(app.port)).status == 200
    assert used_keys(fake) == [0, 0, 0, 0]
    limited.add(0)
    for _ in range(3):
        assert (await chat(app.port)).status == 200
    assert used_keys(fake, 4) == [0, 1, 1, 1]
    assert states(app) == [C, A, A]


async def test_strategy_random_uses_only_usable_keys(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    app = await make_proxy(openrouter={"key_selection_strategy": "random"})

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        if i == 1:
            await resp.json(401, {"error": {"code": 401, "message": "User not found."}})
        else:
            await resp.json(200, completion())

    fake.script = per_key(handler)
    for _ in range(40):
        assert (await chat(app.port)).status == 200
    used = used_keys(fake)
    assert used.count(1) <= 1  # tried at most once, then disabled for good
    if 1 in used:
        assert used[used.index(1) + 1] != 1
    successes = [k for k in used if k != 1]
    assert len(successes) == 40
    assert set(successes) == {0, 2}  # both usable keys get traffic (2^-39 to fail by chance)
    assert states(app)[0] is A and states(app)[2] is A


async def test_key_selection_same_sticks_to_the_last_key(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    app = await make_proxy(openrouter={"key_selection_opts": ["same"]})
    limited: set[int] = set()
    fake.script = per_key(limited_keys(limited, lambda i: rate_limited_body(
        reset_ms(60, clock.wall()))))
    for _ in range(3):
        assert (await chat(app.port)).status == 200
    assert used_keys(fake) == [0, 0, 0]
    limited.add(0)
    for _ in range(3):
        assert (await chat(app.port)).status == 200
    assert used_keys(fake, 3) == [0, 1, 1, 1]
    assert states(app) == [C, A, A]


# --- accounts --------------------------------------------------------------------------------

ACCOUNT_KEYS = [{"key": KEYS[0], "account": "alice"}, {"key": KEYS[1], "account": "alice"},
                {"key": KEYS[2], "account": "bob"}]


@pytest.mark.parametrize("body", [
    rate_limited_body(0, message="Rate limit exceeded: free-models-per-day. Add 10 credits to "
                                 "unlock 1000 free model requests per day"),
    rate_limited_body(0, message="Rate limit exceeded: free-models-per-day-high-balance"),
    {"error": {"code": 429, "message": "Rate limit exceeded",
               "metadata": {"limit_source": "openrouter_free_tier_daily",
                            "error_type": "rate_limit_exceeded"}},
     "_reset_header": True},
], ids=["message", "high-balance", "limit_source"])
async def test_account_wide_daily_limit_cools_every_key_of_the_account(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, clock: FakeClock, body: dict[str, Any]
) -> None:
    app = await make_proxy(openrouter={"keys": ACCOUNT_KEYS})
    reset = reset_ms(500, clock.wall())

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        if i == 0:
            doc = json.loads(json.dumps(body))
            headers: list[tuple[bytes, bytes]] = []
            if doc.pop("_reset_header", False):
                headers.append((b"X-RateLimit-Reset", str(reset).encode()))
            else:
                doc["error"]["metadata"]["headers"]["X-RateLimit-Reset"] = str(reset)
            await resp.json(429, doc, headers)
        else:
            await resp.json(200, completion(f"from key {i}"))

    fake.script = per_key(handler)
    resp = await chat(app.port)
    assert resp.status == 200
    assert json.loads(resp.body)["choices"][0]["message"]["content"] == "from key 2"
    assert used_keys(fake) == [0, 2]
    snap = views(app)
    assert [v.state for v in snap] == [F, F, A]  # resting for free models only
    assert [v.account for v in snap] == ["alice", "alice", "bob"]
    for v in snap[:2]:
        assert 497.0 < v.cooling_seconds <= 500.0
    for _ in range(3):
        assert (await chat(app.port)).status == 200
    assert used_keys(fake, 2) == [2, 2, 2]


async def test_daily_limit_without_accounts_cools_only_that_key(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    fake.script = per_key(limited_keys({0}, lambda i: rate_limited_body(
        reset_ms(30, clock.wall()), message="Rate limit exceeded: free-models-per-day")))
    assert (await chat(proxy.port)).status == 200
    assert used_keys(fake) == [0, 1]
    assert states(proxy) == [F, A, A]


async def test_per_model_limit_cools_only_that_key_of_the_account(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    app = await make_proxy(openrouter={"keys": ACCOUNT_KEYS})
    message = "Rate limit exceeded: limit_rpm/google/gemini-2.5-pro/8f2a"
    fake.script = per_key(limited_keys({0}, lambda i: rate_limited_body(
        reset_ms(30, clock.wall()), message)))
    resp = await chat(app.port)
    assert resp.status == 200
    assert used_keys(fake) == [0, 1]
    assert states(app) == [C, A, A]


async def test_free_per_minute_limit_rests_every_key_of_the_account_for_free_models(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    # free-model limits are per account (OPENROUTER.md): the other key of "alice" is skipped
    app = await make_proxy(openrouter={"keys": ACCOUNT_KEYS})
    message = "Rate limit exceeded: free-models-per-min."
    fake.script = per_key(limited_keys({0}, lambda i: rate_limited_body(
        reset_ms(30, clock.wall()), message)))
    resp = await chat(app.port)
    assert resp.status == 200
    assert used_keys(fake) == [0, 2]
    assert states(app) == [F, F, A]


# --- transport failures and non-key errors ---------------------------------------------------


async def test_unreachable_upstream_gives_502_after_the_attempts(ca_file: str) -> None:
    config = proxy_config(free_port(), ca_file, retry={"max_attempts": 3})
    app = App(build_config(config, {}))
    await app.start()
    try:
        resp = await chat(app.port)
        assert resp.status == 502
        for name in (b"x-request-id", b"date", b"server"):
            assert len(resp.headers_named(name)) == 1, name
        assert resp.header(b"content-type") == b"application/json"
        error = error_of(resp)
        assert error["code"] == 502
        assert error["message"] == "upstream unreachable"  # no addresses for clients
        assert sample(app, "orproxy_upstream_attempts_total",
                      {"outcome": "connect_error"}) == 3.0
        snap = app.services.keys.snapshot()
        assert [v.state for v in snap] == [A, A, A]  # a dead upstream is no key's fault
        assert sum(v.uses for v in snap) == 3
    finally:
        await app.shutdown()


@pytest.mark.parametrize("status", [500, 502, 503, 400, 403])
async def test_upstream_errors_pass_through_unchanged(
    proxy: App, fake: FakeOpenRouter, status: int
) -> None:
    body = json.dumps({"error": {"code": status, "message": f"upstream says {status}",
                                 "metadata": {"provider_name": "X"}}}).encode()

    async def script(req: Recorded, resp: Responder) -> None:
        await resp.head(status, [(b"Content-Type", b"application/json"),
                                 (b"Content-Length", str(len(body)).encode()),
                                 (b"X-Generation-Id", b"gen-abc")])
        await resp.data(body)
        await resp.end()

    fake.script = script
    resp = await chat(proxy.port)
    assert resp.status == status
    assert resp.body == body
    assert resp.header(b"x-generation-id") == b"gen-abc"
    assert resp.header(b"content-type") == b"application/json"
    assert len(fake.requests) == 1
    assert states(proxy) == [A, A, A]
