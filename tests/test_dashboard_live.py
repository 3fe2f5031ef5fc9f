"""Tier 3: the dashboard of a running proxy, in headless Chromium.

The real proxy (``make_proxy``) forwards real requests to the fake OpenRouter, which
answers per key: completions and streams carrying OpenRouter's ``usage`` (tokens, cached,
reasoning, cost), a 429 with OpenRouter's body and reset, a 401, a 502. The fake keeps a
ledger of what it served; the page, logged in with HTTP Basic (the access key as the
password), must show exactly that, update it in place as traffic goes on, render hostile
names as text, and talk to nobody but the proxy. One Chromium serves the module; each test
opens its own tab and checks it threw nothing and broke no content-security rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from urllib.parse import urlsplit

import pytest

from orproxy.app import App
from tests.browser import TRAPS, Browser, Page
from tests.conftest import ACCESS_KEY, ProxyFactory, sample
from tests.fakeor import FakeOpenRouter, Recorded, Responder, reset_ms
from tests.rawhttp import Response, roundtrip

pytestmark = pytest.mark.anyio

ACCOUNT_XSS = "<img src=x onerror=alert(1)>"
MODEL_XSS = "<img src=x onerror=alert(2)>/gpt"
USER = "operator"  # ignored by the proxy: the password is what counts
# test keys only; never real
KEYS: list[tuple[str, str | None]] = [
    ("sk-or-v1-dash0000000000000000000000000000000000000000000000000000a11c", "alice"),
    ("sk-or-v1-dash1111111111111111111111111111111111111111111111111111e5e5", ACCOUNT_XSS),
    ("sk-or-v1-dash2222222222222222222222222222222222222222222222222222b0b0", "bob"),
    ("sk-or-v1-dash3333333333333333333333333333333333333333333333333333d00d", None),
]
ALICE, XSS, BOB, ANON = range(4)
# USD per token (prompt, completion), as OpenRouter's /models lists them
PRICES = {
    "openai/gpt-4o-mini": (0.15e-6, 0.6e-6),
    "anthropic/claude-3.5-haiku": (0.8e-6, 4e-6),
    "deepseek/deepseek-r1": (0.55e-6, 2.19e-6),
    "meta-llama/llama-3.3-70b-instruct:free": (0.0, 0.0),
    "google/gemma-3-27b-it:free": (0.0, 0.0),
    MODEL_XSS: (0.15e-6, 0.6e-6),
}
DAILY_LIMIT = ("Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 "
               "free model requests per day")
REST_SECONDS = 90.0
REFRESH = "?refresh=0.2"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module scope: one browser for the whole module


# --- the fake upstream and its ledger --------------------------------------------------------


@dataclass
class Served:
    """What the fake answered, for one key or one model."""

    requests: int = 0
    successes: int = 0
    rate_limited: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0

    def add_usage(self, usage: dict[str, Any]) -> None:
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
        self.reasoning_tokens += usage["completion_tokens_details"]["reasoning_tokens"]
        self.cost += usage["cost"]


@dataclass
class Upstream:
    """The fake's script: each key answers as ``behaviour`` says ("ok" by default); a
    model named ``x/evil`` is answered as MODEL_XSS, ``x/down`` with a 502."""

    behaviour: dict[int, str] = field(default_factory=dict)
    keys: list[Served] = field(default_factory=lambda: [Served() for _ in KEYS])
    models: dict[str, Served] = field(default_factory=dict)  # first answered first
    total: Served = field(default_factory=Served)
    answered: int = 0

    async def script(self, req: Recorded, resp: Responder) -> None:
        i = key_index(req)
        served = self.keys[i]
        served.requests += 1
        behaviour = self.behaviour.get(i, "ok")
        body = req.json()
        if behaviour == "429":
            served.rate_limited += 1
            reset = reset_ms(REST_SECONDS)
            await resp.json(429, {"error": {"code": 429, "message": DAILY_LIMIT, "metadata": {
                "headers": {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0",
                            "X-RateLimit-Reset": str(reset)}, "provider_name": None}}})
        elif behaviour == "401":
            served.errors += 1
            await resp.json(401, {"error": {"code": 401, "message": "User not found."}})
        elif body["model"] == "x/down":
            served.errors += 1
            await resp.json(502, {"error": {"code": 502, "message": "Provider returned error",
                                            "metadata": {"provider_name": "Fireworks"}}})
        else:
            model = MODEL_XSS if body["model"] == "x/evil" else body["model"]
            usage = self.usage(model)
            served.successes += 1
            for ledger in (served, self.models.setdefault(model, Served()), self.total):
                ledger.add_usage(usage)
            self.models[model].requests += 1
            self.total.requests += 1
            if body.get("stream"):
                await stream(resp, model, usage)
            else:
                await resp.json(200, completion(model, usage))

    def usage(self, model: str) -> dict[str, Any]:
        """Realistic and different each time: cached prompt tokens every other answer,
        reasoning tokens from a reasoning model, cost from the model's prices."""
        n = self.answered = self.answered + 1
        prompt, completion_tokens = 800 + 173 * n, 40 + 37 * n
        reasoning = completion_tokens // 2 if "r1" in model else 0
        price_in, price_out = PRICES[model]
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens,
                "cost": round(prompt * price_in + completion_tokens * price_out, 9),
                "prompt_tokens_details": {"cached_tokens": prompt // 2 if n % 2 else 0},
                "completion_tokens_details": {"reasoning_tokens": reasoning}}


def key_index(req: Recorded) -> int:
    auth = req.header(b"authorization")
    assert auth is not None and auth.startswith(b"Bearer "), "no key sent upstream"
    secrets = [k for k, _ in KEYS]
    return secrets.index(auth[len(b"Bearer "):].decode())


def completion(model: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": "gen-1712345678-abcdef", "provider": "OpenAI", "model": model,
            "object": "chat.completion", "created": 1712345678,
            "choices": [{"index": 0, "finish_reason": "stop", "native_finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hello there."}}],
            "usage": usage}


async def stream(resp: Responder, model: str, usage: dict[str, Any]) -> None:
    """OpenRouter's SSE: a keep-alive comment, deltas, the last chunk with usage, [DONE]."""
    await resp.head(200, [(b"Content-Type", b"text/event-stream"),
                          (b"Cache-Control", b"no-cache")])
    await resp.data(b": OPENROUTER PROCESSING\n\n")
    base = {"id": "gen-1712345679-streamed", "provider": "Anthropic", "model": model,
            "object": "chat.completion.chunk", "created": 1712345679}
    for word in ("Hel", "lo", "!"):
        chunk = {**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                            "content": word},
                                      "finish_reason": None}]}
        await resp.data(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    last = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": "stop"}], "usage": usage}
    await resp.data(b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
    await resp.end()


async def chat(app: App, model: str, *, stream_: bool = False) -> Response:
    body = json.dumps({"model": model, "stream": stream_,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    return await roundtrip(app.port, b"POST /api/v1/chat/completions HTTP/1.1\r\n"
                           b"Host: localhost\r\nAuthorization: Bearer " + ACCESS_KEY.encode()
                           + b"\r\nContent-Type: application/json\r\nContent-Length: "
                           + str(len(body)).encode() + b"\r\n\r\n" + body, b"POST")


# the first traffic: every key used, one rested by a 429, one disabled by a 401
TRAFFIC = [("openai/gpt-4o-mini", False), ("anthropic/claude-3.5-haiku", True),
           ("openai/gpt-4o-mini", True), ("deepseek/deepseek-r1", False),
           ("meta-llama/llama-3.3-70b-instruct:free", False), ("openai/gpt-4o-mini", False),
           ("x/evil", False), ("deepseek/deepseek-r1", True)]


async def drive(app: App, traffic: list[tuple[str, bool]]) -> None:
    for model, streamed in traffic:
        response = await chat(app, model, stream_=streamed)
        assert response.status == (502 if model == "x/down" else 200), response.body[:300]


async def busy_proxy(make_proxy: ProxyFactory, fake: FakeOpenRouter,
                     **overrides: Any) -> tuple[App, Upstream]:
    upstream = Upstream(behaviour={XSS: "429", BOB: "401"})
    fake.script = upstream.script
    keys = [{"key": k, "account": a} if a is not None else k for k, a in KEYS]
    app = await make_proxy(openrouter={"keys": keys}, **overrides)
    await drive(app, TRAFFIC)
    return app, upstream


# --- the page ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with Browser() as b:
        yield b


def origin(app: App) -> str:
    return f"http://127.0.0.1:{app.port}"


@contextlib.asynccontextmanager
async def dashboard(browser: Browser, app: App, *,
                    credentials: tuple[str, str] | None = (USER, ACCESS_KEY),
                    ) -> AsyncIterator[Page]:
    """The dashboard, logged in, after its first refresh. On the way out: it threw
    nothing, opened no dialog, broke no CSP rule and asked nothing of another origin."""
    tab = await browser.new_page(credentials=credentials, init_script=TRAPS)
    try:
        await tab.set_viewport(1400, 900)
        await tab.goto(origin(app) + "/metrics" + REFRESH)
        await tab.wait_for("Number(document.querySelector('#status').dataset.refreshes) > 0")
        yield tab
        assert tab.errors == []
        assert await tab.eval("window.__alerts") == []
        assert await tab.eval("window.__violations") == []
        assert {origin_of(url) for url in tab.requests if not url.startswith("data:")} == {
            origin(app)}, tab.requests
    finally:
        await tab.close()


def origin_of(url: str) -> str:
    return urlsplit(url)._replace(path="", query="", fragment="").geturl()


async def key_cells(page: Page, ident: str) -> dict[str, str]:
    return dict(await page.eval(f"""Object.fromEntries(
        [...document.querySelectorAll('#keys tbody tr[data-key-id="{ident}"] [data-field]')]
        .map(e => [e.dataset.field, e.textContent]))"""))


async def field_texts(page: Page, section: str) -> dict[str, str]:
    return dict(await page.eval(f"""Object.fromEntries([...document.querySelectorAll(
        '{section} [data-field]')].map(e => [e.dataset.field, e.textContent]))"""))


async def model_rows(page: Page) -> list[list[str]]:
    return list(await page.eval("""[...document.querySelectorAll('#models tbody tr')]
        .map(tr => [...tr.cells].map(td => td.textContent))"""))


async def refreshes(page: Page) -> int:
    return int(await page.eval("document.querySelector('#status').dataset.refreshes"))


# --- what the page should say, formatted as it formats (en-US) ---------------------------


def key_id(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


def count(n: int) -> str:
    return f"{n:,}"


def money(v: float) -> str:
    if v == 0:
        return "$0.00"
    if v >= 1:
        return f"${v:,.2f}"
    assert v >= 0.0001, v  # the traffic here never costs less
    return f"${v:.4f}"


def rate(v: float) -> str:
    if v == 0:
        return "0"
    if v < 1:
        return f"{v:.2f}"
    if v < 10:
        return f"{v:.1f}"
    return f"{Decimal(repr(v)).quantize(Decimal(1), ROUND_HALF_UP):,}"


def percent(v: float) -> str:
    return (f"{v:.1f}" if v < 10 else str(Decimal(repr(v)).quantize(Decimal(1),
                                                                     ROUND_HALF_UP))) + " %"


def latency(v: float | None) -> str:
    if v is None:
        return "—"
    if v < 0.01:
        return f"{v * 1000:.1f} ms"
    if v < 1:
        return f"{round(v * 1000)} ms"
    return f"{v:.1f} s" if v < 10 else f"{round(v)} s"


def key_numbers(served: Served) -> dict[str, str]:
    return {"requests": count(served.requests), "successes": count(served.successes),
            "rate_limited": count(served.rate_limited), "errors": count(served.errors),
            "prompt_tokens": count(served.prompt_tokens),
            "completion_tokens": count(served.completion_tokens), "cost": money(served.cost)}


def expected_models(upstream: Upstream) -> list[list[str]]:
    busiest = sorted(upstream.models.items(), key=lambda item: -item[1].requests)
    return [[model, count(s.requests), count(s.prompt_tokens), count(s.completion_tokens),
             money(s.cost)] for model, s in busiest]


def expected_totals(upstream: Upstream) -> dict[str, str]:
    t = upstream.total
    return {"requests": count(t.requests), "prompt_tokens": count(t.prompt_tokens),
            "completion_tokens": count(t.completion_tokens),
            "cached_tokens": count(t.cached_tokens),
            "reasoning_tokens": count(t.reasoning_tokens), "cost": money(t.cost)}


# --- the tests -----------------------------------------------------------------------------


async def test_key_table_shows_each_configured_key_with_what_the_fake_served(
        browser: Browser, make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    app, upstream = await busy_proxy(make_proxy, fake)
    async with dashboard(browser, app) as page:
        ids = await page.eval("[...document.querySelectorAll('#keys tbody tr[data-key-id]')]"
                              ".map(tr => tr.dataset.keyId)")
        assert ids == [key_id(secret) for secret, _ in KEYS]
        cells = {i: await key_cells(page, key_id(secret)) for i, (secret, _) in enumerate(KEYS)}
        for i, (secret, account) in enumerate(KEYS):
            assert cells[i]["id"] == key_id(secret)
            assert cells[i]["masked"] == "sk-or-…" + secret[-4:]
            assert cells[i]["account"] == (account or "—")
            numbers = {name: cells[i][name] for name in key_numbers(upstream.keys[i])}
            assert numbers == key_numbers(upstream.keys[i]), i
            assert upstream.keys[i].requests > 0, i  # every key was tried
        for i in (ALICE, ANON):
            assert {name: cells[i][name] for name in ("state", "rest_until", "countdown",
                                                      "reason", "message", "last_error")} == {
                "state": "available", "rest_until": "—", "countdown": "", "reason": "—",
                "message": "", "last_error": "—"}
        cooling = cells[XSS]  # a free-model limit: it rests for free models only
        assert cooling["state"] == "free models resting"
        assert cooling["reason"] == "429 free-models-per-day"
        assert cooling["message"] == DAILY_LIMIT
        assert re.fullmatch(r"in 1:[23]\d", cooling["countdown"]), cooling["countdown"]
        assert re.fullmatch(r"\d\d:\d\d:\d\d", cooling["rest_until"]), cooling["rest_until"]
        assert cooling["last_error"].startswith("429")
        assert re.fullmatch(r"\d+ s ago", cooling["last_error_ago"])
        disabled = cells[BOB]
        assert disabled["state"] == "disabled"
        assert (disabled["rest_until"], disabled["countdown"]) == ("—", "")
        assert disabled["reason"] == "401 invalid key"
        assert disabled["last_error"].startswith("401")
        states = await page.eval("[...document.querySelectorAll('#keys .pill')]"
                                 ".map(p => p.className)")
        assert states == ["pill state-available", "pill state-free_limited",
                          "pill state-disabled", "pill state-available"]
        left = int(await page.eval(f"""document.querySelector("#keys tr[data-key-id='{
            key_id(KEYS[XSS][0])}'] [data-field=countdown]").dataset.seconds"""))
        assert REST_SECONDS - 10 <= left <= REST_SECONDS, left
        html = await page.eval("document.documentElement.outerHTML")
        for secret in [ACCESS_KEY] + [k for k, _ in KEYS]:
            assert secret not in html  # the page knows keys by id and masked form only
        # OpenRouter's own words on why the key was refused, as for a rested key
        assert disabled["message"] == "User not found."


async def test_totals_and_models_show_the_tokens_and_cost_of_the_traffic(
        browser: Browser, make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    app, upstream = await busy_proxy(make_proxy, fake)
    assert upstream.total.requests == len(TRAFFIC)
    assert upstream.total.cached_tokens and upstream.total.reasoning_tokens
    async with dashboard(browser, app) as page:
        assert await field_texts(page, "#totals") == expected_totals(upstream)
        rows = await model_rows(page)
        assert rows == expected_models(upstream)
        assert len(rows) == 5
        assert rows[0][0] == "openai/gpt-4o-mini"  # busiest first
        free = next(row for row in rows if row[0].endswith(":free"))
        assert free == ["meta-llama/llama-3.3-70b-instruct:free", "1", free[2], free[3], "$0.00"]
        process = await field_texts(page, "#process")
        assert re.fullmatch(r"\d+(\.\d)? %", process["cpu_percent"]), process
        assert re.fullmatch(r"\d+(\.\d)? [kMG]B", process["rss_bytes"]), process
        assert process["client_open"] != "—" and re.fullmatch(r"\d+ / \d+", process["upstream"])
        header = await page.eval("[...document.querySelectorAll('#upstream, #strategy')]"
                                 ".map(e => e.textContent)")
        assert header == [f"https://127.0.0.1:{fake.port}/api/v1", "round-robin"]


async def test_charts_draw_the_live_series(browser: Browser, make_proxy: ProxyFactory,
                                           fake: FakeOpenRouter) -> None:
    app, _ = await busy_proxy(make_proxy, fake)
    down = [("x/down", False), ("x/down", False)]
    await drive(app, down)
    # The ring buffer shows complete 10-second buckets only: wait for the one holding the
    # traffic to end, and only then open the page, so the series holds nothing but the
    # traffic (the page's own requests fall in later buckets).
    step = app.services.metrics.series.step_seconds
    boundary = (math.floor(time.time() / step) + 1) * step
    await asyncio.sleep(boundary - time.time() + 0.05)
    async with dashboard(browser, app) as page:
        doc = json.loads((await roundtrip(app.port, b"GET /metrics/json HTTP/1.1\r\n"
                                          b"Host: x\r\nAuthorization: Bearer "
                                          + ACCESS_KEY.encode() + b"\r\n\r\n")).body)
        latest = await page.eval("[...document.querySelectorAll('.chart .latest')]"
                                 ".map(e => e.textContent)")
        assert time.time() < boundary + step, "too slow: the series moved on"
        series = doc["series"]
        assert series["end"] == boundary
        answered = len(TRAFFIC) + len(down)
        assert round(sum(series["requests_per_second"]) * step) == answered
        assert round(sum(series["errors_per_second"]) * step) == len(down)  # the 502s
        req, err = series["requests_per_second"][-1], series["errors_per_second"][-1]
        p50, p95 = series["latency_p50_seconds"][-1], series["latency_p95_seconds"][-1]
        assert req > 0  # the traffic ended in the last complete bucket
        share = f" ({percent(100 * err / req)})"
        assert latest == [f"{rate(req)} req/s", f"{rate(err)} /s{share}",
                          f"p50 {latency(p50)} · p95 {latency(p95)}"]
        paths = await page.eval("""Object.fromEntries([...document.querySelectorAll(
            '.chart svg path.line')].map(p => [p.dataset.series, p.getAttribute('d')]))""")
        assert set(paths) == {"requests", "errors", "p50", "p95"}
        for name in ("requests", "errors"):
            points = path_points(paths[name])
            assert len(points) == len(series["requests_per_second"]) == 60
            assert min(y for _, y in points) < 100 - 1, name  # drawn above the baseline
        for name in ("p50", "p95"):  # a line (or a dot) where requests were answered
            assert path_points(paths[name]), name


def path_points(d: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(r"[ML](-?[\d.]+) (-?[\d.]+)", d)]


async def test_more_traffic_updates_the_numbers_without_a_reload(
        browser: Browser, make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    app, upstream = await busy_proxy(make_proxy, fake)
    async with dashboard(browser, app) as page:
        await page.eval("window.__marker = 'the same document'")
        before = await refreshes(page)
        alice = key_id(KEYS[ALICE][0])
        assert (await key_cells(page, alice))["state"] == "available"
        upstream.behaviour[ALICE] = "429"  # the next request rests alice, the last one left
        await drive(app, [("openai/gpt-4o-mini", True), ("google/gemma-3-27b-it:free", False),
                          ("anthropic/claude-3.5-haiku", False)])
        await page.wait_for("document.querySelector('#totals [data-field=requests]')"
                            f".textContent === '{count(upstream.total.requests)}'")
        await page.wait_for(f"""document.querySelector("#keys tr[data-key-id='{alice}']")
            .dataset.state === 'free_limited'""")
        assert await page.eval("window.__marker") == "the same document"
        assert await refreshes(page) > before
        assert await field_texts(page, "#totals") == expected_totals(upstream)
        assert await model_rows(page) == expected_models(upstream)
        assert "google/gemma-3-27b-it:free" in [row[0] for row in await model_rows(page)]
        for i, (secret, _) in enumerate(KEYS):
            cells = await key_cells(page, key_id(secret))
            assert {name: cells[name] for name in key_numbers(upstream.keys[i])} == \
                key_numbers(upstream.keys[i]), i
        assert (await key_cells(page, alice))["reason"] == "429 free-models-per-day"


async def test_html_in_an_account_and_a_model_name_is_shown_as_text(
        browser: Browser, make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    app, upstream = await busy_proxy(make_proxy, fake)
    assert MODEL_XSS in upstream.models
    async with dashboard(browser, app) as page:
        assert (await key_cells(page, key_id(KEYS[XSS][0])))["account"] == ACCOUNT_XSS
        models = await page.eval("[...document.querySelectorAll("
                                 "'#models tbody td[data-field=model]')].map(e => e.textContent)")
        assert MODEL_XSS in models
        assert await page.eval("document.querySelectorAll('img').length") == 0
        assert await page.eval("document.querySelectorAll('tbody *:not(td, tr, span, code)')"
                               ".length") == 0
        await asyncio.sleep(0.3)  # an onerror handler would have fired by now
        assert await page.eval("window.__alerts") == []
        assert not [url for url in page.requests if urlsplit(url).path.endswith("/x")]


async def test_without_the_access_key_nothing_is_shown(
        browser: Browser, make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    app, _ = await busy_proxy(make_proxy, fake)
    for path in (b"/metrics", b"/metrics/json", b"/metrics/raw"):
        response = await roundtrip(app.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response.status == 401, path
        challenges = response.headers_named(b"www-authenticate")
        assert any(c.startswith(b"Basic ") for c in challenges), challenges
        assert b"<html" not in response.body and b"keys" not in response.body
    tab = await browser.new_page(credentials=(USER, "wrong-key"))
    try:
        await tab.goto(origin(app) + "/metrics" + REFRESH)
        text = await tab.eval("document.body.textContent")
        assert "missing or invalid access key" in text, text
        assert await tab.eval("document.querySelector('#status')") is None
        await asyncio.sleep(0.5)  # a page that got through would be polling by now
        served = [sample(app, "orproxy_requests_total", {"route": route, "method": "GET",
                                                         "status": "2xx"})
                  for route in ("metrics", "metrics_json")]
        assert served == [0.0, 0.0]
        refused = sample(app, "orproxy_requests_total",
                         {"route": "metrics", "method": "GET", "status": "4xx"})
        assert 1 <= refused <= 3  # asked, refused, given up: not retried forever
        paths = {urlsplit(url).path for url in tab.requests}
        assert "/metrics" in paths and not paths & {"/metrics/json", "/metrics/raw"}, paths
    finally:
        await tab.close()


async def test_the_page_talks_to_its_own_origin_only(
        browser: Browser, make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    app, _ = await busy_proxy(make_proxy, fake)
    async with dashboard(browser, app) as page:
        await page.wait_for("Number(document.querySelector('#status').dataset.refreshes) > 3")
        await page.eval("document.querySelector('#raw summary').click()")
        await page.wait_for("document.querySelector('#raw-text').dataset.loaded === '200'")
        raw = await page.eval("document.querySelector('#raw-text').textContent")
        assert "orproxy_requests_total" in raw
        assert {urlsplit(url).path for url in page.requests} == {
            "/metrics", "/metrics/json", "/metrics/raw"}
        # (the fixture checks that every request went to the proxy's origin)


async def test_public_metrics_need_no_credentials(
        browser: Browser, make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    app, upstream = await busy_proxy(make_proxy, fake, metrics={"public": True})
    async with dashboard(browser, app, credentials=None) as page:
        assert await field_texts(page, "#totals") == expected_totals(upstream)
        assert len(await page.eval("[...document.querySelectorAll('#keys tr[data-key-id]')]"
                                   ".map(tr => tr.dataset.keyId)")) == len(KEYS)
    # the API itself still wants the access key
    response = await roundtrip(app.port, b"GET /api/v1/models/user HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.status == 401
