"""Quota checked before it fails, end to end: the background ``GET /api/v1/key`` per key.

The fake answers ``/api/v1/key`` per key (``key_info``) and chats with a completion naming
the key. Checks run every ``quota_check_seconds`` in real time (a short period: a round of
three keys takes a few tenths of a second); what they do to the key pool is read on the
test clocks of ``take_time``, so a rest's length is exact. Each test waits for a whole
round of checks before it looks.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from orproxy.app import App
from orproxy.config import build_config
from orproxy.keys import KeyState, key_id
from tests.conftest import KEYS, ProxyFactory, proxy_config, sample
from tests.fakeor import FakeOpenRouter, Recorded, Responder, Script, completion, key_info
from tests.streamhelpers import eventually, gate
from tests.test_accounting import metrics_json, scrape
from tests.test_limits_e2e import (
    FREE_MODEL,
    PAID_MODEL,
    TO_MIDNIGHT,
    WALL0,
    ask,
    chats,
    content_of,
    key_doc,
    take_time,
)
from tests.test_rotation import ACCOUNT_KEYS, key_index, states, views

pytestmark = pytest.mark.anyio

A, C, D, F = KeyState.AVAILABLE, KeyState.COOLING, KeyState.DISABLED, KeyState.FREE_LIMITED
PERIOD = 0.3  # a round of checks; three keys: one check every 0.1 s
KEY_PATH = b"/api/v1/key"
KeyAnswer = Callable[[Recorded, Responder], Awaitable[None]]


def answer(doc: dict[str, Any], status: int = 200) -> KeyAnswer:
    async def send(req: Recorded, resp: Responder) -> None:
        await resp.json(status, doc)

    return send


def quota_script(by_key: dict[int, KeyAnswer]) -> Script:
    """``/api/v1/key`` answered per key; chats with a completion naming their key."""

    async def run(req: Recorded, resp: Responder) -> None:
        i = key_index(req)
        if req.target == KEY_PATH:
            assert req.method == b"GET" and req.body == b""
            await by_key[i](req, resp)
        else:
            await resp.json(200, completion(f"from key {i}"))

    return run


def key_checks(fake: FakeOpenRouter) -> list[Recorded]:
    return [r for r in fake.requests if r.target == KEY_PATH]


async def checked(app: App, rounds: int = 1) -> None:
    """Wait until every key has been checked ``rounds`` times (answered, or failed)."""
    want = rounds * len(app.services.keys)
    await eventually(lambda: sum(app.quota.results.values()) >= want, timeout=5.0)


async def quota_proxy(make_proxy: ProxyFactory, **openrouter: Any) -> App:
    app = await make_proxy(openrouter={"quota_check_seconds": PERIOD, **openrouter})
    take_time(app)  # before the first check can run: start() never yields
    return app


# --- what an answer is acted on ------------------------------------------------------------


async def test_accounts_are_learned_and_an_account_wide_limit_rests_them_together(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    keys = [KEYS[0], KEYS[1], {"key": KEYS[2], "account": "bob"}]
    app = await quota_proxy(make_proxy, keys=keys)
    fake.script = quota_script({0: answer(key_info(account="user_A")),
                                1: answer(key_info(account="user_A")),
                                2: answer(key_info(account="user_B"))})
    assert [v.account for v in views(app)] == [None, None, "bob"]
    await checked(app)
    # learned from creator_user_id; a configured account is not overwritten
    assert [v.account for v in views(app)] == ["user_A", "user_A", "bob"]
    assert key_doc(await metrics_json(app.port), 1)["account"] == "user_A"
    assert {r.header(b"authorization") for r in key_checks(fake)} == {
        b"Bearer " + k.encode() for k in KEYS}
    assert chats(fake) == []  # asking costs no request
    # a free-model daily limit on one key of user_A rests both of its keys
    limited = {"error": {"code": 429, "message": "Rate limit exceeded: free-models-per-day",
                         "metadata": {"limit_source": "openrouter_free_tier_daily"}}}
    served = fake.script

    async def run(req: Recorded, resp: Responder) -> None:
        if req.target != KEY_PATH and key_index(req) == 0:
            await resp.json(429, limited)
        else:
            await served(req, resp)

    fake.script = run
    assert content_of(await ask(app)) == "from key 2"
    assert [key_index(r) for r in chats(fake)] == [0, 2]
    assert states(app) == [F, F, A]
    assert [v.cooling_seconds for v in views(app)] == [TO_MIDNIGHT, TO_MIDNIGHT, 0.0]


async def test_spending_limit_used_up_rests_the_key_before_a_request_is_spent_on_it(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app = await quota_proxy(make_proxy)
    fake.script = quota_script({0: answer(key_info(limit=10, remaining=0)),
                                1: answer(key_info(limit=10, remaining=2.5)),
                                2: answer(key_info())})
    await checked(app)
    snap = views(app)
    assert [v.state for v in snap] == [C, A, A]
    assert snap[0].cooling_seconds == TO_MIDNIGHT  # limit_reset "daily": UTC midnight
    shown = key_doc(await metrics_json(app.port), 0)
    assert shown["reason"] == "quota: spending limit used up"
    assert shown["message"] == "limit $10 reached; resets daily"
    assert shown["rest_until"] == WALL0 + TO_MIDNIGHT
    for model in (PAID_MODEL, FREE_MODEL, PAID_MODEL, FREE_MODEL):
        await ask(app, model)
    assert [key_index(r) for r in chats(fake)] == [1, 2, 1, 2]  # never key 0


async def test_no_free_requests_left_rests_the_account_for_free_models_only(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app = await quota_proxy(make_proxy)
    spent = answer(key_info(account="user_A", free_left=0))  # per account: both say 0
    fake.script = quota_script({0: spent, 1: spent,
                                2: answer(key_info(account="user_B", free_left=50))})
    await checked(app)
    snap = views(app)
    assert [v.state for v in snap] == [F, F, A]
    assert [v.cooling_seconds for v in snap] == [TO_MIDNIGHT, TO_MIDNIGHT, 0.0]
    shown = key_doc(await metrics_json(app.port), 1)
    assert shown["state"] == "free_limited"
    assert shown["reason"] == "quota: no free-model requests left today"
    assert shown["message"] == "1000 free-model requests a day used up"
    for model in (PAID_MODEL, PAID_MODEL, FREE_MODEL, FREE_MODEL):
        await ask(app, model)
    assert [key_index(r) for r in chats(fake)] == [0, 1, 2, 2]
    assert [r.json()["model"] for r in chats(fake)] == [PAID_MODEL, PAID_MODEL, FREE_MODEL,
                                                       FREE_MODEL]


async def test_one_answer_with_no_free_requests_rests_its_whole_configured_account(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app = await quota_proxy(make_proxy, keys=ACCOUNT_KEYS)
    release = asyncio.Event()

    async def unanswered(req: Recorded, resp: Responder) -> None:
        assert await gate(release)
        await resp.json(200, key_info(account="alice", free_left=0))

    fake.script = quota_script({0: answer(key_info(account="alice", free_left=0)),
                                1: unanswered, 2: answer(key_info(account="bob"))})
    try:
        await eventually(lambda: app.quota.results["ok"] >= 1)  # key 1's answer not read yet
        assert states(app) == [F, F, A]
        assert app.quota.results == {"ok": 1, "error": 0}
    finally:
        release.set()


async def reset(req: Recorded, resp: Responder) -> None:
    resp.reset()


@pytest.mark.parametrize(("refusal", "reason", "message"), [
    (answer(key_info(expires_at="2026-11-01T00:00:00Z")), "key expired",
     "expired at 2026-11-01T00:00:00Z"),
    (answer({"error": {"code": 401, "message": "User not found."}}, 401),
     "401 invalid key (quota check)", ""),
], ids=["expired", "401"])
async def test_expired_or_refused_key_is_disabled(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, refusal: KeyAnswer, reason: str,
    message: str,
) -> None:
    app = await quota_proxy(make_proxy)
    fake.script = quota_script({0: refusal,
                                1: answer(key_info(expires_at="2026-12-31T00:00:00Z")),
                                2: answer(key_info())})
    await checked(app)
    assert states(app) == [D, A, A]  # a future expiry is no reason
    shown = key_doc(await metrics_json(app.port), 0)
    assert shown["state"] == "disabled"
    assert shown["reason"] == reason
    assert shown["message"] == message
    for _ in range(4):
        await ask(app, PAID_MODEL)
    assert [key_index(r) for r in chats(fake)] == [1, 2, 1, 2]


async def garbage(req: Recorded, resp: Responder) -> None:
    body = b"<html><body>Bad gateway</body></html>"
    await resp.head(200, [(b"Content-Type", b"text/html"),
                          (b"Content-Length", str(len(body)).encode())])
    await resp.data(body)
    await resp.end()


@pytest.mark.parametrize("failure", [
    answer({"error": {"code": 500, "message": "Internal Server Error"}}, 500),
    answer({"error": {"code": 429, "message": "Rate limit exceeded"}}, 429),
    garbage,
    answer({"data": "not an object"}),
    reset,
], ids=["500", "429", "html", "no-data", "connection-reset"])
async def test_a_failing_check_changes_nothing_and_is_counted(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, failure: KeyAnswer,
) -> None:
    app = await quota_proxy(make_proxy)
    fake.script = quota_script(dict.fromkeys(range(3), failure))
    await checked(app)
    snap = views(app)
    assert [v.state for v in snap] == [A, A, A]
    assert [v.account for v in snap] == [None, None, None]
    assert [v.reason for v in snap] == ["", "", ""]
    assert [v.stats.requests for v in snap] == [0, 0, 0]  # a check is no attempt
    scraped = await scrape(app.port)
    assert scraped.value("orproxy_quota_checks_total", result="error") >= 3
    assert scraped.value("orproxy_quota_checks_total", result="ok") == 0
    assert scraped.series("orproxy_key_free_requests_remaining") == {}
    assert [k["quota"] for k in (await metrics_json(app.port))["keys"]] == [None] * 3
    for _ in range(3):
        await ask(app)
    assert sorted(key_index(r) for r in chats(fake)) == [0, 1, 2]


# --- when checks run ------------------------------------------------------------------------


async def test_checks_are_spread_over_the_period(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    await make_proxy(openrouter={"quota_check_seconds": 0.6})  # one every 0.2 s
    arrived: list[tuple[float, int]] = []

    async def note(req: Recorded, resp: Responder) -> None:
        arrived.append((time.monotonic(), key_index(req)))
        await resp.json(200, key_info())

    fake.script = quota_script(dict.fromkeys(range(3), note))
    await eventually(lambda: len(arrived) >= 5, timeout=5.0)
    assert [i for _, i in arrived[:5]] == [0, 1, 2, 0, 1]
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(arrived[:5])]
    assert all(0.19 <= gap < 0.45 for gap in gaps), gaps  # period / keys, not the period


async def test_a_slow_check_never_delays_a_request(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app = await quota_proxy(make_proxy)
    release = asyncio.Event()
    waiting = asyncio.Event()

    async def slow(req: Recorded, resp: Responder) -> None:
        waiting.set()
        async with asyncio.timeout(10):
            await release.wait()
        await resp.json(200, key_info())

    fake.script = quota_script(dict.fromkeys(range(3), slow))
    async with asyncio.timeout(5):
        await waiting.wait()
    try:
        for _ in range(3):
            started = time.monotonic()
            assert content_of(await ask(app, PAID_MODEL)).startswith("from key ")
            assert time.monotonic() - started < 0.5  # not queued behind the check
        assert app.quota.results == {"ok": 0, "error": 0}  # the check is still waiting
        assert len(key_checks(fake)) == 1  # and the next does not start before it ends
    finally:
        release.set()
    await checked(app)


# --- what is shown ----------------------------------------------------------------------------


async def test_metrics_and_dashboard_show_the_last_answer(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app = await quota_proxy(make_proxy)
    answers = {0: key_info(limit=10, remaining=7.5, free_left=40),
               1: key_info(limit=20, remaining=20, free_left=40),
               2: key_info(free_left=40)}  # no spending limit

    async def current(req: Recorded, resp: Responder) -> None:
        await resp.json(200, answers[key_index(req)])

    fake.script = quota_script(dict.fromkeys(range(3), current))
    await checked(app)
    ids = [key_id(k) for k in KEYS]
    scraped = await scrape(app.port)
    for kid in ids:
        assert scraped.value("orproxy_key_free_requests_remaining", key_id=kid) == 40
    assert scraped.value("orproxy_key_limit_remaining_usd", key_id=ids[0]) == 7.5
    assert scraped.value("orproxy_key_limit_remaining_usd", key_id=ids[1]) == 20
    assert scraped.label_values("orproxy_key_limit_remaining_usd", "key_id") == set(ids[:2])
    assert scraped.value("orproxy_quota_checks_total", result="ok") >= 3
    doc = await metrics_json(app.port)
    assert key_doc(doc, 0)["quota"] == {"limit_remaining": 7.5, "limit": 10.0,
                                        "free_requests_remaining": 40.0,
                                        "free_requests_limit": 1000.0, "checked_at": WALL0}
    assert key_doc(doc, 2)["quota"]["limit"] is None
    # the next answers replace what is shown
    answers[0] = key_info(limit=10, remaining=7.25, free_left=39)
    await eventually(lambda: sample(app, "orproxy_key_free_requests_remaining",
                                    {"key_id": ids[0]}) == 39, timeout=5.0)
    assert sample(app, "orproxy_key_limit_remaining_usd", {"key_id": ids[0]}) == 7.25
    assert sample(app, "orproxy_key_free_requests_remaining", {"key_id": ids[1]}) == 40
    quota = key_doc(await metrics_json(app.port), 0)["quota"]
    assert (quota["limit_remaining"], quota["free_requests_remaining"]) == (7.25, 39.0)
    assert states(app) == [A, A, A]


async def test_a_key_removed_by_a_reload_leaves_the_quota_metrics(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, ca_file: str,
) -> None:
    app = await quota_proxy(make_proxy)
    fake.script = quota_script(dict.fromkeys(range(3), answer(key_info(free_left=7))))
    await checked(app)
    app.apply(build_config(proxy_config(fake.port, ca_file, openrouter={
        "keys": KEYS[:2], "quota_check_seconds": PERIOD}), {}))
    done = sum(app.quota.results.values())  # the running round may end on the old list
    await eventually(lambda: sum(app.quota.results.values()) >= done + 4, timeout=5.0)
    scraped = await scrape(app.port)
    # a series for a key the proxy no longer has would be read as a key with 7 left
    assert scraped.label_values("orproxy_key_free_requests_remaining", "key_id") == {
        key_id(k) for k in KEYS[:2]}
