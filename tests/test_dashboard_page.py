"""Tier 3: the live dashboard page in headless Chromium.

A tiny h11 server on loopback plays the proxy: it serves ``dashboard.html`` byte for byte
at /metrics, a JSON document the test changes at will at /metrics/json, and Prometheus text
at /metrics/raw, all behind HTTP Basic auth. Its clock runs an hour ahead of ours, so the
countdowns are only right if the page corrects for clock skew. One Chromium serves the
module; each test opens its own tab and checks it threw nothing.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import math
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import pytest

from tests.browser import TRAPS, Browser, BrowserError, Page

PAGE = Path(__file__).parent.parent / "orproxy" / "observe" / "dashboard.html"
SCREENSHOT = "/tmp/orproxy-dashboard.png"
USER, PASSWORD = "admin", "correct horse"
SKEW_SECONDS = 3600.0  # the server's clock is this far ahead of the browser's
REFRESH = "?refresh=0.2"
ACCOUNT_XSS = "<img src=x onerror=alert(1)>"
MODEL_XSS = "<script>alert(2)</script>/m"
RAW_TEXT = ("# HELP orproxy_requests_total Requests answered <b>by route</b>\n"
            "# TYPE orproxy_requests_total counter\n"
            'orproxy_requests_total{route="chat",status="2xx"} 1234.0\n')

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module scope: one browser and one server for the whole module


def series(points: int = 60) -> dict[str, Any]:
    requests = [round(2 + 1.5 * math.sin(i / 6), 2) for i in range(points)]
    errors = [0.3 if 40 <= i < 44 else 0.0 for i in range(points)]
    p50: list[float | None] = [round(0.6 + 0.2 * math.cos(i / 5), 3) for i in range(points)]
    p95: list[float | None] = [round(2.0 + 0.8 * math.sin(i / 4), 3) for i in range(points)]
    for i in range(20, 25):  # nobody asked anything for 50 s: no latency to show
        p50[i] = p95[i] = None
    requests[-1], errors[-1], p50[-1], p95[-1] = 2.5, 0.25, 0.8, 2.1
    return {"step_seconds": 10, "end": 0.0, "requests_per_second": requests,
            "errors_per_second": errors, "latency_p50_seconds": p50,
            "latency_p95_seconds": p95}


def key(ident: str, **fields: Any) -> dict[str, Any]:
    base = {"id": ident, "masked": f"sk-or-…{ident[:4]}", "account": None,
            "state": "available", "rest_until": None, "reason": "", "message": "",
            "requests": 0, "successes": 0, "rate_limited": 0, "errors": 0,
            "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0,
            "last_error": None, "last_error_at": None, "quota": None}
    base.update(fields)
    return base


def document(server_now: float) -> dict[str, Any]:
    return {
        "version": "0.2.0", "now": server_now, "started": server_now - 5600.0,
        "uptime_seconds": 5600.1, "upstream": "https://openrouter.ai/api/v1",
        "strategy": "round-robin",
        "process": {"cpu_percent": 3.2, "rss_bytes": 41943040},
        "system": {"cpu_percent": 12.5, "memory_percent": 41.0},
        "connections": {"client_open": 3, "upstream_idle": 2, "upstream_active": 1},
        "totals": {"requests": 1234, "prompt_tokens": 1234567, "completion_tokens": 20000,
                   "cached_tokens": 5000, "reasoning_tokens": 1000, "cost": 0.1234},
        "keys": [
            key("9aff94b7", account="alice", requests=1234, successes=1200, rate_limited=30,
                errors=4, prompt_tokens=1234567, completion_tokens=45678, cost=0.0123,
                quota={"free_requests_remaining": 12.0, "free_requests_limit": 1000.0,
                       "limit_remaining": 3.2, "limit": 5.0, "checked_at": server_now}),
            key("1c0ffee2", account=ACCOUNT_XSS, state="cooling",
                rest_until=server_now + 90.0, reason="429 free-models-per-day",
                message="Rate limit exceeded: free-models-per-day. <b>Add 10 credits</b>",
                requests=50, successes=49, rate_limited=1, prompt_tokens=9000,
                completion_tokens=700, cost=0.0, last_error="429 free-models-per-day",
                last_error_at=server_now - 125.0),
            key("deadbeef", account="bob", state="disabled", reason="401 invalid key",
                message="User not found.", requests=2, errors=2,
                last_error="401 invalid key", last_error_at=server_now - 7200.0),
        ],
        "models": [
            {"model": "openai/gpt-4o", "requests": 900, "prompt_tokens": 800000,
             "completion_tokens": 30000, "cost": 1234.5},
            {"model": "meta-llama/llama-3.3-70b-instruct:free", "requests": 300,
             "prompt_tokens": 400000, "completion_tokens": 15000, "cost": 0.0},
            {"model": MODEL_XSS, "requests": 4, "prompt_tokens": 100, "completion_tokens": 10,
             "cost": 0.00001},
            {"model": "other", "requests": 30, "prompt_tokens": 34567,
             "completion_tokens": 678, "cost": 0.0042},
        ],
        "series": series(),
    }


class MetricsServer:
    """The proxy's /metrics routes, played by h11 on loopback, Basic auth on every path."""

    def __init__(self) -> None:
        self.page = PAGE.read_bytes()
        self.started = time.time() + SKEW_SECONDS
        self.base = document(self.started)
        self.changes: dict[str, Any] = {}  # merged over ``base`` at each request
        self.fail: str | None = None  # None, "503" or "drop" for /metrics/json
        self.hits: list[tuple[str, bool]] = []  # (target, carried the right credentials)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def now(self) -> float:
        return time.time() + SKEW_SECONDS

    def current(self) -> dict[str, Any]:
        doc = copy.deepcopy(self.base)
        doc.update(copy.deepcopy(self.changes))
        doc["now"] = self.now()
        doc["series"]["end"] = math.floor(doc["now"] / 10) * 10.0
        return doc

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = h11.Connection(h11.SERVER)
        try:
            while (request := await self._request(conn, reader)) is not None:
                answer = self._answer(request)
                if answer is None:  # a dropped connection, as a crashed proxy would do
                    break
                for event in answer:
                    writer.write(conn.send(event))  # type: ignore[arg-type]
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _request(self, conn: h11.Connection,
                       reader: asyncio.StreamReader) -> h11.Request | None:
        request = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None

    def _answer(self, request: h11.Request) -> list[h11.Event] | None:
        target = request.target.decode()
        path = urlsplit(target).path
        expected = b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())
        authorized = dict(request.headers).get(b"authorization") == expected
        self.hits.append((target, authorized))
        if not authorized:
            return respond(401, b"text/plain", b"unauthorized",
                           [(b"WWW-Authenticate", b'Basic realm="orproxy"')])
        if path in ("/metrics", "/metrics/"):
            return respond(200, b"text/html; charset=utf-8", self.page)
        if path == "/metrics/json":
            if self.fail == "drop":
                return None
            if self.fail is not None:
                return respond(int(self.fail), b"text/plain", b"broken on purpose")
            return respond(200, b"application/json", json.dumps(self.current()).encode())
        if path == "/metrics/raw":
            return respond(200, b"text/plain; version=0.0.4", RAW_TEXT.encode())
        return respond(404, b"text/plain", b"not found")

    def json_hits(self) -> list[tuple[str, bool]]:
        return [hit for hit in self.hits if urlsplit(hit[0]).path == "/metrics/json"]


def respond(status: int, content_type: bytes, body: bytes,
            extra: list[tuple[bytes, bytes]] | None = None) -> list[h11.Event]:
    headers = [(b"Content-Type", content_type), (b"Content-Length", str(len(body)).encode()),
               (b"Cache-Control", b"no-store"), *(extra or [])]
    return [h11.Response(status_code=status, headers=headers), h11.Data(data=body),
            h11.EndOfMessage()]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with Browser() as b:
        yield b


@pytest.fixture
async def server() -> AsyncIterator[MetricsServer]:
    s = MetricsServer()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def page(browser: Browser, server: MetricsServer) -> AsyncIterator[Page]:
    """The dashboard, logged in, after its first successful refresh; it must throw nothing."""
    tab = await browser.new_page(credentials=(USER, PASSWORD), init_script=TRAPS)
    try:
        await tab.set_viewport(1400, 900)
        await tab.goto(server.origin + "/metrics" + REFRESH)
        await tab.wait_for("Number(document.querySelector('#status').dataset.refreshes) > 0")
        yield tab
        assert tab.errors == []
        assert await tab.eval("window.__alerts") == []
        assert await tab.eval("window.__violations") == []
    finally:
        await tab.close()


async def texts(page: Page, selector: str) -> list[str]:
    return list(await page.eval(
        f"[...document.querySelectorAll({json.dumps(selector)})].map(e => e.textContent)"))


async def key_cells(page: Page, key_id: str) -> dict[str, str]:
    return dict(await page.eval(f"""Object.fromEntries(
        [...document.querySelectorAll('#keys tbody tr[data-key-id="{key_id}"] [data-field]')]
        .map(e => [e.dataset.field, e.textContent]))"""))


async def refreshes(page: Page) -> int:
    return int(await page.eval("document.querySelector('#status').dataset.refreshes"))


# --- the page as a file -------------------------------------------------------------------


def test_page_is_self_contained_and_never_parses_data_as_html() -> None:
    text = PAGE.read_text()
    assert re.findall(r"https?://[^\s'\"<>]+", text) == ["http://www.w3.org/2000/svg"]
    assert re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", text) == ["data:,"]
    assert "@import" not in text and "url(" not in text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function"):
        assert sink not in text, sink
    assert "fetch(JSON_URL, { ...FETCH_OPTIONS" in text
    assert "new URL('metrics/json', ROOT)" in text and "location.origin + '/'" in text
    assert "credentials: 'same-origin', cache: 'no-store'" in text


# --- the page in Chromium -----------------------------------------------------------------


async def test_key_table_has_one_row_per_key_with_its_values(page: Page) -> None:
    ids = await page.eval("[...document.querySelectorAll('#keys tbody tr[data-key-id]')]"
                          ".map(tr => tr.dataset.keyId)")
    assert ids == ["9aff94b7", "1c0ffee2", "deadbeef"]
    alice = await key_cells(page, "9aff94b7")
    assert alice == {
        "id": "9aff94b7", "masked": "sk-or-…9aff", "account": "alice", "state": "available",
        "quota": "free 12/1,000 left · $3.20 left",
        "rest_until": "—", "countdown": "", "reason": "—", "message": "", "requests": "1,234",
        "successes": "1,200", "rate_limited": "30", "errors": "4",
        "prompt_tokens": "1,234,567", "completion_tokens": "45,678", "cost": "$0.0123",
        "last_error": "—", "last_error_ago": ""}
    cooling = await key_cells(page, "1c0ffee2")
    assert cooling["state"] == "cooling"
    assert cooling["reason"] == "429 free-models-per-day"
    assert cooling["message"] == "Rate limit exceeded: free-models-per-day. <b>Add 10 credits</b>"
    assert cooling["cost"] == "$0.00"
    assert cooling["last_error"] == "429 free-models-per-day"
    assert cooling["last_error_ago"] == "2 min ago"
    disabled = await key_cells(page, "deadbeef")
    assert disabled["state"] == "disabled" and disabled["rest_until"] == "—"
    assert disabled["last_error_ago"] == "2 h 00 min ago"
    colours = await page.eval("""[...document.querySelectorAll('#keys .pill')]
        .map(p => getComputedStyle(p).color)""")
    assert len(set(colours)) == 3  # each state its own colour


async def test_html_in_names_and_messages_is_shown_as_text(page: Page) -> None:
    assert (await key_cells(page, "1c0ffee2"))["account"] == ACCOUNT_XSS
    assert MODEL_XSS in await texts(page, "#models tbody td[data-field=model]")
    assert await page.eval("document.querySelectorAll('img').length") == 0
    assert await page.eval("document.querySelectorAll('tbody *:is(b, script)').length") == 0
    assert await page.eval("[...document.scripts].map(s => s.textContent.includes('syncRows'))"
                           ) == [True]  # the one script is the page's own
    await asyncio.sleep(0.3)  # an onerror handler would have fired by now
    assert await page.eval("window.__alerts") == []


async def test_totals_models_and_process_are_formatted_for_people(page: Page) -> None:
    totals = dict(await page.eval("""Object.fromEntries([...document.querySelectorAll(
        '#totals [data-field]')].map(e => [e.dataset.field, e.textContent]))"""))
    assert totals == {"requests": "1,234", "prompt_tokens": "1,234,567",
                      "completion_tokens": "20,000", "cached_tokens": "5,000",
                      "reasoning_tokens": "1,000", "cost": "$0.1234"}
    rows = await page.eval("""[...document.querySelectorAll('#models tbody tr')]
        .map(tr => [...tr.cells].map(td => td.textContent))""")
    assert rows == [
        ["openai/gpt-4o", "900", "800,000", "30,000", "$1,234.50"],
        ["meta-llama/llama-3.3-70b-instruct:free", "300", "400,000", "15,000", "$0.00"],
        [MODEL_XSS, "4", "100", "10", "$0.000010"],
        ["other", "30", "34,567", "678", "$0.0042"]]
    assert await page.eval("document.querySelector('#models tr[data-model=other]')"
                           ".classList.contains('other')")
    process = dict(await page.eval("""Object.fromEntries([...document.querySelectorAll(
        '#process [data-field]')].map(e => [e.dataset.field, e.textContent]))"""))
    assert process == {"cpu_percent": "3.2 %", "rss_bytes": "42 MB", "client_open": "3",
                       "upstream": "2 / 1", "system_cpu_percent": "13 %",
                       "system_memory_percent": "41 %"}
    assert await page.eval("[...document.querySelectorAll('#process .system')]"
                           ".map(e => e.hidden)") == [False, False]
    header = await texts(page, "#version, #upstream, #strategy, #uptime")
    assert header == ["v0.2.0", "https://openrouter.ai/api/v1", "round-robin", "1 h 33 min"]


async def test_countdown_runs_on_the_server_clock(browser: Browser,
                                                  server: MetricsServer) -> None:
    # one fetch a minute: whatever moves from here on is the page's own one-second clock
    tab = await browser.new_page(credentials=(USER, PASSWORD))
    try:
        await tab.goto(server.origin + "/metrics?refresh=60")
        await tab.wait_for("document.querySelector('#status').dataset.refreshes === '1'")
        await check_countdown(tab)
        assert await tab.eval("document.querySelector('#status').dataset.refreshes") == "1"
        assert tab.errors == []
    finally:
        await tab.close()


async def check_countdown(page: Page) -> None:
    selector = json.dumps("#keys tr[data-key-id='1c0ffee2'] [data-field=countdown]")
    first = int(await page.eval(f"document.querySelector({selector}).dataset.seconds"))
    # 90 s after the server's now; uncorrected for the hour of skew it would read 3690 s
    assert 84 <= first <= 90, first
    text = await page.eval(f"document.querySelector({selector}).textContent")
    assert re.fullmatch(r"in 1:[23]\d", text), text
    # the rest end on the browser's own clock: now + the countdown, give or take a second
    assert await page.eval(f"""(() => {{
        const until = document.querySelector(
            "#keys tr[data-key-id='1c0ffee2'] [data-field=rest_until]").textContent;
        const left = Number(document.querySelector({selector}).dataset.seconds);
        const fmt = {{ hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false }};
        return [-1, 0, 1].some(d => until.includes(
            new Date(Date.now() + (left + d) * 1000).toLocaleTimeString([], fmt)));
    }})()"""), await texts(page, "#keys [data-field=rest_until]")
    await page.wait_for(f"Number(document.querySelector({selector}).dataset.seconds) < {first}",
                        timeout=3)
    assert (await texts(page, "#uptime"))[0] == "1 h 33 min"


async def test_charts_draw_the_series(page: Page) -> None:
    for chart in ("requests", "errors", "latency"):
        paths = await page.eval(f"""[...document.querySelectorAll(
            '#chart-{chart} svg path.line')].map(p => p.getAttribute('d'))""")
        assert paths, chart
        for d in paths:
            assert d.count("L") >= 30, (chart, d[:80])
    latency = await page.eval("""Object.fromEntries([...document.querySelectorAll(
        '#chart-latency svg path.line')].map(p => [p.dataset.series, p.getAttribute('d')]))""")
    assert set(latency) == {"p50", "p95"}
    assert latency["p50"].count("M") == 2  # the gap of nulls breaks the line in two
    assert await texts(page, ".chart .latest") == [
        "2.5 req/s", "0.25 /s (10 %)", "p50 800 ms · p95 2.1 s"]
    assert await page.eval("document.querySelector('#chart-requests svg title').textContent"
                           ) == "Requests per second"


async def test_new_data_updates_the_page_in_place(page: Page, server: MetricsServer) -> None:
    await page.eval("window.__marker = 'still the same document'")
    before = await refreshes(page)
    keys = copy.deepcopy(server.base["keys"][1:])
    keys[0]["state"], keys[0]["rest_until"] = "available", None
    keys.append(key("0badf00d", account="carol", requests=7))
    server.changes = {"totals": {**server.base["totals"], "requests": 5678901},
                      "keys": keys, "system": None}
    await page.wait_for("document.querySelector('#totals [data-field=requests]')"
                        ".textContent === '5,678,901'")
    assert await page.eval("window.__marker") == "still the same document"
    assert await refreshes(page) > before
    assert await page.eval("[...document.querySelectorAll('#keys tbody tr[data-key-id]')]"
                           ".map(tr => tr.dataset.keyId)") == ["1c0ffee2", "deadbeef",
                                                               "0badf00d"]
    cells = await key_cells(page, "1c0ffee2")
    assert cells["state"] == "available" and cells["rest_until"] == "—"
    assert cells["countdown"] == ""
    assert await page.eval("[...document.querySelectorAll('#process .system')]"
                           ".map(e => e.hidden)") == [True, True]
    server.changes = {"keys": []}
    await page.wait_for("document.querySelector('#keys tbody').textContent === 'none'")
    assert await page.eval("window.__marker") == "still the same document"


async def test_raw_toggle_shows_the_prometheus_text(page: Page, server: MetricsServer) -> None:
    assert await page.eval("document.querySelector('#raw-text').textContent") == ""
    await page.eval("document.querySelector('#raw summary').click()")
    await page.wait_for("document.querySelector('#raw-text').dataset.loaded === '200'")
    assert await page.eval("document.querySelector('#raw-text').textContent") == RAW_TEXT
    assert await page.eval("document.querySelectorAll('#raw b').length") == 0
    assert [hit for hit in server.hits if hit[0] == "/metrics/raw"] == [("/metrics/raw", True)]


async def test_a_failed_fetch_shows_the_banner_until_one_succeeds(
        page: Page, server: MetricsServer) -> None:
    banner_shown = "!document.querySelector('#banner').hidden"
    assert not await page.eval(banner_shown)
    for failure, words in (("503", "HTTP 503"), ("drop", "Failed to fetch")):
        server.fail = failure
        await page.wait_for(banner_shown)
        text = await page.eval("document.querySelector('#banner').textContent")
        assert words in text and "Retrying every 0.2 s" in text, text
        assert await page.eval("document.querySelector('#status').textContent") == "offline"
        failures = int(await page.eval("document.querySelector('#status').dataset.failures"))
        before = await refreshes(page)
        await page.wait_for("Number(document.querySelector('#status').dataset.failures) > "
                            f"{failures}")  # it keeps retrying
        server.fail = None
        await page.wait_for("document.querySelector('#banner').hidden")
        assert await refreshes(page) > before
        assert await page.eval("document.querySelector('#status').textContent") == "live"


async def test_no_request_leaves_the_origin(browser: Browser, server: MetricsServer) -> None:
    tab = await browser.new_page(credentials=(USER, PASSWORD), init_script=TRAPS)
    try:
        # served under /metrics/ the data still comes from the absolute /metrics/json
        await tab.goto(server.origin + "/metrics/" + REFRESH)
        await tab.wait_for("Number(document.querySelector('#status').dataset.refreshes) > 3")
        await tab.eval("document.querySelector('#raw summary').click()")
        await tab.wait_for("document.querySelector('#raw-text').dataset.loaded === '200'")
        origins = {urlsplit(url)._replace(path="", query="", fragment="").geturl()
                   for url in tab.requests if not url.startswith("data:")}
        assert origins == {server.origin}, tab.requests
        paths = {urlsplit(target).path for target, _ in server.hits}
        assert paths == {"/metrics/", "/metrics/json", "/metrics/raw"}
        # fetch() sent the Basic credentials the browser logged in with (same-origin)
        assert server.json_hits() and all(ok for _, ok in server.json_hits())
        assert await tab.eval("window.__violations") == []
        assert tab.errors == []
    finally:
        await tab.close()


async def test_refresh_period_comes_from_the_page_url(
        browser: Browser, server: MetricsServer) -> None:
    tab = await browser.new_page(credentials=(USER, PASSWORD))
    try:
        period = "document.querySelector('#status').dataset.refreshSeconds"
        for query, seconds in (("", "2"), ("?refresh=0.5", "0.5"), ("?refresh=junk", "2"),
                               ("?refresh=0", "2"), ("?refresh=0.25", "0.25")):
            await tab.goto(server.origin + "/metrics" + query)
            assert await tab.eval(period) == seconds, query
        await tab.wait_for("Number(document.querySelector('#status').dataset.refreshes) > 0")
        before = len(server.json_hits())
        await asyncio.sleep(1.5)
        assert 3 <= len(server.json_hits()) - before <= 8  # every 0.25 s, give or take
        assert tab.errors == []
    finally:
        await tab.close()


async def test_wrong_credentials_are_refused_not_retried_forever(
        browser: Browser, server: MetricsServer) -> None:
    tab = await browser.new_page(credentials=(USER, "wrong"))
    try:
        await tab.goto(server.origin + "/metrics")
        assert await tab.eval("document.body.textContent") == "unauthorized"
        assert 1 <= len(server.hits) <= 3 and not any(ok for _, ok in server.hits)
    finally:
        await tab.close()


async def test_missing_chromium_is_an_error_not_a_skip() -> None:
    with pytest.raises(BrowserError, match="apt-get install chromium"):
        async with Browser("/nonexistent/chromium"):
            pass
    with pytest.raises(BrowserError, match="exited with 1 at start"):
        async with Browser("/bin/false"):
            pass


async def test_chromium_is_killed_and_its_profile_removed_even_on_failure() -> None:
    with pytest.raises(RuntimeError, match="a test failed"):
        async with Browser() as b:
            pid, profile = b.pid, b.profile
            assert pid is not None and profile is not None
            assert live_group_members(pid) and exists(profile, "DevToolsActivePort")
            raise RuntimeError("a test failed")
    assert pid is not None and profile is not None
    assert not exists(profile)
    assert live_group_members(pid) == []


def exists(*parts: str) -> bool:
    return Path(*parts).exists()


def live_group_members(pgid: int) -> list[int]:
    """Processes of a process group that have not exited (zombies awaiting reaping by init
    do not count)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


async def test_screenshots_light_and_dark(page: Page) -> None:
    for dark, path in ((False, SCREENSHOT), (True, SCREENSHOT.replace(".png", "-dark.png"))):
        await page.set_viewport(1400, 900, dark=dark)
        background = await page.eval("getComputedStyle(document.body).backgroundColor")
        assert (background == "rgb(14, 17, 22)") is dark, background
        await page.screenshot(path)
        data = read_bytes(path)
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()
