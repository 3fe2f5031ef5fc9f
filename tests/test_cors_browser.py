"""CORS as a browser sees it: headless Chromium loads a page from a second loopback origin
(a small server on another port) whose script posts a streamed chat request to the proxy,
with the access key, and reads the SSE answer with ``response.body.getReader()``.

With the page's origin in ``server.cors_origins`` the browser's preflight is answered by the
proxy (the upstream never sees an OPTIONS), the stream arrives event by event and exactly as
the upstream sent it, and the page can read ``X-Request-ID`` and ``Server-Timing``. An origin
not in the list is blocked; with no list at all the preflight goes upstream, and then the
upstream's own CORS answer decides.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from orproxy.app import App
from tests.browser import Browser
from tests.conftest import ACCESS_KEY, KEYS, ProxyFactory, sample
from tests.fakeor import FakeOpenRouter, Recorded, Responder

pytestmark = pytest.mark.anyio

EVENTS = [f'data: {{"choices":[{{"delta":{{"content":"part {i} ✓"}}}}]}}\n\n'.encode()
          for i in range(6)] + [b"data: [DONE]\n\n"]
GAP_SECONDS = 0.25  # between two events, as the fake sends them
PAGE_SCRIPT = """
window.result = null;
(async () => {
  const out = {chunks: [], text: '', error: null};
  const t0 = performance.now();
  try {
    const response = await fetch(%(url)s, {method: 'POST', headers: {
      'Authorization': 'Bearer ' + %(key)s, 'Content-Type': 'application/json',
      'X-Title': 'test'}, body: JSON.stringify({model: 'test/model', stream: true})});
    out.status = response.status;
    for (const name of ['X-Request-ID', 'Server-Timing', 'X-Process-Time',
                        'Content-Type']) {
      out[name] = response.headers.get(name);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      const text = decoder.decode(value, {stream: true});
      out.chunks.push({at: (performance.now() - t0) / 1000, text});
      out.text += text;
    }
  } catch (error) {
    out.error = String(error);
  }
  window.result = out;
})();
"""


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module scope: one browser for the whole module


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with Browser() as b:
        yield b


@dataclass
class PageServer:
    """The second origin: serves ``html`` at ``/``, plain HTTP on loopback."""

    server: FakeOpenRouter
    html: bytes = b""

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def script(self, req: Recorded, resp: Responder) -> None:
        await resp.head(200, [(b"Content-Type", b"text/html; charset=utf-8"),
                              (b"Content-Length", str(len(self.html)).encode())])
        await resp.data(self.html)
        await resp.end()


@pytest.fixture
async def pages() -> AsyncIterator[PageServer]:
    server = FakeOpenRouter(tls=None)
    page_server = PageServer(server)
    server.script = page_server.script
    await server.start()
    yield page_server
    await server.stop()


async def sse_script(req: Recorded, resp: Responder) -> None:
    """The upstream: a stream, one event every GAP_SECONDS."""
    await resp.head(200, [(b"Content-Type", b"text/event-stream")])
    for event in EVENTS:
        await resp.data(event)
        await asyncio.sleep(GAP_SECONDS)
    await resp.end()


async def fetch_from_page(browser: Browser, pages: PageServer, app: App) -> dict[str, Any]:
    """Load the page from the second origin; what its fetch to the proxy came to."""
    url = f"http://127.0.0.1:{app.port}/api/v1/chat/completions"
    script = PAGE_SCRIPT % {"url": json.dumps(url), "key": json.dumps(ACCESS_KEY)}
    pages.html = (f"<!doctype html><meta charset='utf-8'><title>client</title>"
                  f"<script>{script}</script>").encode()
    page = await browser.new_page(pages.origin + "/")
    try:
        result: dict[str, Any] = await page.wait_for("window.result", timeout=15.0)
        return result
    finally:
        await page.close()


def arrival_times(chunks: list[dict[str, Any]]) -> list[float]:
    """When each of EVENTS was whole in the page: the time of the read that completed it."""
    times: list[float] = []
    ends = itertools.accumulate(len(event.decode()) for event in EVENTS)
    received = 0
    reads = iter(chunks)
    for end in ends:
        while received < end:
            chunk = next(reads)
            received += len(chunk["text"])
            at = chunk["at"]
        times.append(at)
    return times


def preflights_answered(app: App, status: str) -> float:
    return sample(app, "orproxy_requests_total",
                  {"route": "forward", "method": "OPTIONS", "status": status})


async def test_an_allowed_origin_reads_the_stream_as_it_comes(
        browser: Browser, pages: PageServer, make_proxy: ProxyFactory,
        fake: FakeOpenRouter) -> None:
    fake.script = sse_script
    app = await make_proxy(server={"cors_origins": [pages.origin]})
    result = await fetch_from_page(browser, pages, app)

    assert result["error"] is None, result
    assert result["status"] == 200
    assert result["text"] == b"".join(EVENTS).decode()
    # event by event: each one reached the page about GAP_SECONDS after the one before
    # (a proxy that buffered the stream would deliver them together at the end)
    arrived = arrival_times(result["chunks"])
    gaps = [b - a for a, b in itertools.pairwise(arrived)]
    assert all(gap > GAP_SECONDS / 2 for gap in gaps), (gaps, result["chunks"])

    # the headers the proxy exposes are readable from JS; others are not (cross-origin)
    [post] = fake.requests
    assert result["X-Request-ID"] == (post.header(b"x-request-id") or b"").decode()
    assert re.fullmatch(r"upstream;dur=[\d.]+, proxy;dur=[\d.]+", result["Server-Timing"])
    assert result["X-Process-Time"] is None
    assert result["Content-Type"] == "text/event-stream"

    # the browser's preflight was answered by the proxy; the upstream saw the POST only
    assert preflights_answered(app, "2xx") == 1
    assert [r.method for r in fake.requests] == [b"POST"]
    assert post.header(b"authorization") == f"Bearer {KEYS[0]}".encode()
    assert post.header(b"x-title") == b"test"


async def test_an_origin_not_in_the_list_is_blocked(
        browser: Browser, pages: PageServer, make_proxy: ProxyFactory,
        fake: FakeOpenRouter) -> None:
    fake.script = sse_script
    app = await make_proxy(server={"cors_origins": ["https://chat.example"]})
    result = await fetch_from_page(browser, pages, app)
    assert result["error"] == "TypeError: Failed to fetch", result
    assert preflights_answered(app, "4xx") == 1  # refused by the proxy
    assert fake.requests == []


async def test_without_cors_origins_an_upstream_without_cors_blocks_the_page(
        browser: Browser, pages: PageServer, make_proxy: ProxyFactory,
        fake: FakeOpenRouter) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        if req.method == b"OPTIONS":
            await resp.head(204)
            await resp.end()
        else:
            await sse_script(req, resp)

    fake.script = script
    app = await make_proxy()
    result = await fetch_from_page(browser, pages, app)
    assert result["error"] == "TypeError: Failed to fetch", result
    # the preflight went upstream, without a key; the POST never left the browser
    [preflight] = fake.requests
    assert preflight.method == b"OPTIONS" and preflight.header(b"authorization") is None


async def test_without_cors_origins_the_upstreams_own_cors_answer_decides(
        browser: Browser, pages: PageServer, make_proxy: ProxyFactory,
        fake: FakeOpenRouter) -> None:
    upstream_cors = [(b"Access-Control-Allow-Origin", b"*")]

    async def script(req: Recorded, resp: Responder) -> None:
        if req.method == b"OPTIONS":
            await resp.head(204, [*upstream_cors,
                                  (b"Access-Control-Allow-Methods", b"GET, POST, OPTIONS"),
                                  (b"Access-Control-Allow-Headers",
                                   b"Authorization, Content-Type, X-Title")])
            await resp.end()
            return
        await resp.head(200, [(b"Content-Type", b"text/event-stream"), *upstream_cors])
        for event in EVENTS:
            await resp.data(event)
        await resp.end()

    fake.script = script
    app = await make_proxy()
    result = await fetch_from_page(browser, pages, app)
    # the upstream's CORS answer passes through and lets the page in: it reads the stream,
    # but none of the proxy's own headers (nothing exposes them)
    assert result["error"] is None, result
    assert result["status"] == 200
    assert result["text"] == b"".join(EVENTS).decode()
    assert result["X-Request-ID"] is None and result["Server-Timing"] is None
    assert [r.method for r in fake.requests] == [b"OPTIONS", b"POST"]
    assert fake.requests[0].header(b"authorization") is None
    assert fake.requests[1].header(b"authorization") == f"Bearer {KEYS[0]}".encode()
