"""Commit late, end to end (``openrouter.stream_commit_seconds``): a 200 stream's head is
held until its first real event, so an error before any content can still go to the next
key; everything else reaches the client byte for byte.

The fake streams per key with real-shaped OpenRouter chunks; the client reads the response
piece by piece (``RawClient``) and keeps every raw byte, so a test can tell whether the
head has arrived yet, how many heads came, and whether the body ended properly. Each fake
stream that is failed over stays open until the proxy closes it, and says so.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import h11
import pytest

from orproxy.app import App
from orproxy.keys import KeyState
from tests.conftest import KEYS, ProxyFactory, sample
from tests.fakeor import FakeOpenRouter, Recorded, Responder
from tests.rawhttp import LAST_CHUNK, RawClient, header_values
from tests.streamhelpers import eventually, gate
from tests.test_limits_e2e import Clocks, take_time
from tests.test_rotation import per_key, reset_ms, states, views

pytestmark = pytest.mark.anyio

A, C, F = KeyState.AVAILABLE, KeyState.COOLING, KeyState.FREE_LIMITED
MODEL = "google/gemma-3-27b-it:free"
REQUEST = json.dumps({"model": MODEL, "stream": True,
                      "messages": [{"role": "user", "content": "Say hello"}]}).encode()
PROCESSING = b": OPENROUTER PROCESSING\n\n"
DONE = b"data: [DONE]\n\n"
FREE_PER_DAY = ("Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free "
                "model requests per day")


def sse(doc: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


def chunk(gen: str, delta: dict[str, Any], finish: str | None = None,
          **extra: Any) -> bytes:
    return sse({"id": gen, "provider": "Chutes", "model": MODEL,
                "object": "chat.completion.chunk", "created": 1788217200,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "native_finish_reason": finish, "logprobs": None}], **extra})


def error_event(gen: str, error: dict[str, Any]) -> bytes:
    """OpenRouter's mid-stream error: a chunk carrying `error`, finish_reason "error"."""
    return chunk(gen, {"content": ""}, "error", error=error)


def rate_limit(reset: int, message: str = FREE_PER_DAY) -> dict[str, Any]:
    return {"code": 429, "message": message, "metadata": {
        "headers": {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": str(reset)}, "provider_name": None}}


def good_stream(gen: str, words: tuple[str, ...] = ("Hel", "lo!")) -> list[bytes]:
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12, "cost": 0}
    return ([chunk(gen, {"role": "assistant", "content": words[0]})]
            + [chunk(gen, {"content": w}) for w in words[1:]]
            + [chunk(gen, {"content": ""}, "stop"),
               sse({"id": gen, "model": MODEL, "object": "chat.completion.chunk",
                    "choices": [], "usage": usage}), DONE])


def sse_head(gen: str) -> list[tuple[bytes, bytes]]:
    return [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache"),
            (b"X-Generation-Id", gen.encode())]


async def until_closed(resp: Responder, timeout: float = 5.0) -> bool:
    """Wait, silent, until the proxy closes this upstream connection; False on timeout."""
    try:
        async with asyncio.timeout(timeout):
            await resp.writer.wait_closed()
    except TimeoutError:
        return False
    except (ConnectionError, OSError):
        return True
    return True


async def send_all(resp: Responder, parts: list[bytes]) -> None:
    for part in parts:
        await resp.data(part)
    await resp.end()


Opener = Callable[..., Awaitable[RawClient]]


@pytest.fixture
async def stream() -> AsyncIterator[Opener]:
    """Connects a client and sends REQUEST; every client is closed at teardown, passed or
    failed (a socket left to the garbage collector would fail a later test)."""
    opened: list[RawClient] = []

    async def start(port: int, body: bytes = REQUEST) -> RawClient:
        client = await RawClient.connect(port)
        opened.append(client)
        await client.request(body)
        return client

    yield start
    for client in opened:
        client.close()


async def commit_proxy(make_proxy: ProxyFactory, seconds: float = 5.0,
                       **openrouter: Any) -> tuple[App, Clocks]:
    app = await make_proxy(openrouter={"stream_commit_seconds": seconds, **openrouter})
    return app, take_time(app)


# --- an error before content goes to the next key --------------------------------------------


@pytest.mark.parametrize("kind", ["rate-limit", "provider"])
async def test_error_before_content_fails_over_to_one_clean_stream_from_the_next_key(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, stream: Opener, kind: str,
) -> None:
    app, clocks = await commit_proxy(make_proxy)
    provider_error = {"code": 502, "message": "Provider returned error",
                      "metadata": {"provider_name": "Chutes", "raw": "upstream connect error"}}
    error = rate_limit(clocks.reset_ms(90)) if kind == "rate-limit" else provider_error
    closed: list[int] = []
    second = good_stream("gen-key-1")

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        if i == 0:
            await resp.head(200, sse_head("gen-key-0"))
            await resp.data(PROCESSING)
            await resp.data(error_event("gen-key-0", error))
            if await until_closed(resp):  # never ended: only the proxy can end it
                closed.append(i)
        else:
            await resp.head(200, sse_head(f"gen-key-{i}"))
            await send_all(resp, second)

    fake.script = per_key(handler)
    client = await stream(app.port)
    head = await client.head()
    assert head.status_code == 200
    assert header_values(head, b"x-generation-id") == [b"gen-key-1"]
    assert await client.body() == b"".join(second)  # exactly key 1's stream
    assert client.raw.count(b"HTTP/1.1 ") == 1  # one head
    for trace in (b"gen-key-0", b"OPENROUTER PROCESSING", b"error"):
        assert trace not in client.raw
    assert [r.body for r in fake.requests] == [REQUEST, REQUEST]
    await eventually(lambda: closed == [0])  # key 0's generation was stopped
    assert sample(app, "orproxy_stream_failovers_total") == 1.0
    snap = views(app)
    if kind == "rate-limit":
        assert [v.state for v in snap] == [F, A, A]
        assert snap[0].cooling_seconds == 90.0
        assert snap[0].reason == "429 free-models-per-day"
    else:  # a provider failing is no key's fault: nobody rests
        assert [v.state for v in snap] == [A, A, A]
        assert snap[0].stats.last_error == "stream error 502 before content"
    assert snap[1].stats.successes == 1


async def test_an_error_before_content_in_the_streams_only_write_fails_over(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, stream: Opener,
) -> None:
    app, clocks = await commit_proxy(make_proxy)
    first = PROCESSING + error_event("gen-key-0", rate_limit(clocks.reset_ms(90)))
    second = good_stream("gen-key-1")

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        if i == 0:  # head, error and end of body in one write: the hold sees all at once
            await resp.raw_response(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                    b"Content-Length: %d\r\n\r\n%s" % (len(first), first))
        else:
            await resp.head(200, sse_head(f"gen-key-{i}"))
            await send_all(resp, second)

    fake.script = per_key(handler)
    client = await stream(app.port)
    assert header_values(await client.head(), b"x-generation-id") == [b"gen-key-1"]
    assert await client.body() == b"".join(second)
    assert b"OPENROUTER PROCESSING" not in client.raw
    assert states(app) == [F, A, A]
    assert sample(app, "orproxy_stream_failovers_total") == 1.0


async def test_every_key_failing_before_content_ends_the_stream_with_the_last_error(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, stream: Opener,
) -> None:
    app, clocks = await commit_proxy(make_proxy)
    closed: list[int] = []

    def held(i: int) -> list[bytes]:
        limit = f"Rate limit exceeded: limit_rpm/google/gemma-3-27b-it/{i}"
        return [PROCESSING, error_event(f"gen-key-{i}", rate_limit(clocks.reset_ms(30 + i),
                                                                   limit))]

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        await resp.head(200, sse_head(f"gen-key-{i}"))
        for part in held(i):
            await resp.data(part)
        if await until_closed(resp):
            closed.append(i)

    fake.script = per_key(handler)
    client = await stream(app.port)
    head = await client.head()
    assert head.status_code == 200
    assert header_values(head, b"x-generation-id") == [b"gen-key-2"]
    assert await client.body() == b"".join(held(2))  # the last error, as the stream's end
    assert client.conn.their_state is h11.DONE  # a proper end, not a cut
    assert client.raw.endswith(LAST_CHUNK)
    assert client.raw.count(b"HTTP/1.1 ") == 1
    assert b"gen-key-0" not in client.raw and b"gen-key-1" not in client.raw
    await eventually(lambda: sorted(closed) == [0, 1, 2])
    snap = views(app)
    assert [v.state for v in snap] == [C, C, C]
    assert [v.cooling_seconds for v in snap] == [30.0, 31.0, 32.0]
    assert [v.stats.requests for v in snap] == [1, 1, 1]


async def test_a_stream_failing_before_content_with_no_key_left_is_no_failover(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, stream: Opener,
) -> None:
    app, clocks = await commit_proxy(make_proxy, keys=KEYS[:2])
    held = [PROCESSING, error_event("gen", rate_limit(clocks.reset_ms(30), "Rate limit "
                                                      "exceeded: limit_rpm/x/1"))]

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        await resp.head(200, sse_head(f"gen-key-{i}"))
        for part in held:
            await resp.data(part)
        await until_closed(resp)

    fake.script = per_key(handler)
    client = await stream(app.port)
    assert (await client.head()).status_code == 200
    assert await client.body() == b"".join(held)
    assert len(fake.requests) == 2
    # orproxy_stream_failovers_total: "streams that failed before their first content and
    # went to another key" — the first did, the second had no key left to go to
    assert sample(app, "orproxy_stream_failovers_total") == 1.0


async def test_an_error_before_content_counts_as_the_keys_rate_limit_once(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, stream: Opener,
) -> None:
    app, clocks = await commit_proxy(make_proxy)

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        await resp.head(200, sse_head(f"gen-key-{i}"))
        if i == 0:
            await resp.data(error_event("gen-key-0", rate_limit(clocks.reset_ms(30))))
            await until_closed(resp)
        else:
            await send_all(resp, good_stream(f"gen-key-{i}"))

    fake.script = per_key(handler)
    client = await stream(app.port)
    assert (await client.head()).status_code == 200
    await client.body()
    stats = views(app)[0].stats
    # as the same limit under HTTP 429 is counted: a rate limit, not an error of status 200
    assert "200" not in stats.errors_by_kind, stats.errors_by_kind
    assert (stats.rate_limited, stats.errors) == (1, 0)


# --- content first: committed, relayed as it is ---------------------------------------------


async def test_error_after_content_is_relayed_as_is_and_counted_in_band(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, stream: Opener,
) -> None:
    app = await make_proxy(openrouter={"stream_commit_seconds": 5})
    parts = [PROCESSING, chunk("gen-key-0", {"role": "assistant", "content": "Hel"}),
             error_event("gen-key-0", rate_limit(reset_ms(600)))]

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        await resp.head(200, sse_head(f"gen-key-{i}"))
        await send_all(resp, parts)

    fake.script = per_key(handler)
    client = await stream(app.port)
    assert (await client.head()).status_code == 200
    assert await client.body() == b"".join(parts)
    assert len(fake.requests) == 1  # content had gone out: no other key
    assert sample(app, "orproxy_stream_failovers_total") == 0.0
    await eventually(lambda: views(app)[0].stats.errors_by_kind == {"in_band_429": 1})
    snap = views(app)
    assert snap[0].stats.rate_limited == 1 and snap[0].stats.successes == 0
    # the limit still rests the key for the next requests
    assert [v.state for v in snap] == [F, A, A]
    assert 590 < snap[0].cooling_seconds <= 600


async def test_a_whole_stream_in_one_write_with_an_error_after_content_is_counted(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, stream: Opener,
) -> None:
    app, _ = await commit_proxy(make_proxy)
    body = (chunk("gen-key-0", {"role": "assistant", "content": "Hi"})
            + error_event("gen-key-0", {"code": 502, "message": "Provider disconnected",
                                        "metadata": {"provider_name": "Chutes"}}))

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        # head and whole body in one write: the hold reads the stream's end at once
        await resp.raw_response(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    fake.script = per_key(handler)
    client = await stream(app.port)
    assert (await client.head()).status_code == 200
    assert await client.body() == body
    assert len(fake.requests) == 1
    stats = views(app)[0].stats
    assert stats.errors_by_kind == {"in_band_502": 1}
    assert stats.errors == 1 and stats.successes == 0
    assert stats.last_error == "in-band error 502"


async def test_a_slow_first_token_is_committed_at_the_bound_and_relayed_unchanged(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, stream: Opener,
) -> None:
    app, _ = await commit_proxy(make_proxy, 0.3)
    go = asyncio.Event()
    parts = good_stream("gen-key-0", ("Once", " upon", " a time"))

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        await resp.head(200, sse_head("gen-key-0"))
        assert await gate(go)  # nothing more until the client has the head
        await send_all(resp, parts)

    fake.script = per_key(handler)
    started = time.monotonic()
    client = await stream(app.port)
    head = await client.head(timeout=3.0)
    waited = time.monotonic() - started
    assert head.status_code == 200
    assert 0.25 <= waited < 2.0, waited  # held for the bound, then committed
    go.set()
    assert await client.body() == b"".join(parts)
    assert len(fake.requests) == 1
    assert views(app)[0].stats.successes == 1


async def test_a_comment_only_keep_alive_is_held(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, stream: Opener,
) -> None:
    app, _ = await commit_proxy(make_proxy)
    go = asyncio.Event()
    sent = asyncio.Event()
    parts = [PROCESSING, PROCESSING, *good_stream("gen-key-0")]

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        await resp.head(200, sse_head("gen-key-0"))
        await resp.data(parts[0] + parts[1])
        sent.set()
        assert await gate(go)
        await send_all(resp, parts[2:])

    fake.script = per_key(handler)
    client = await stream(app.port)
    async with asyncio.timeout(5):
        await sent.wait()
    with pytest.raises(TimeoutError):
        await client.head(timeout=0.5)
    assert client.raw == b""  # not even the head: a keep-alive decides nothing
    go.set()
    assert (await client.head()).status_code == 200
    assert await client.body() == b"".join(parts)


# --- what is never held -------------------------------------------------------------------------


@pytest.mark.parametrize(("ctype", "asked"), [
    (b"application/json", b'{"model":"m","stream":false,"messages":[]}'),  # not a stream
    (b"application/json", REQUEST),  # a stream asked for, a JSON answer given
    (b"text/plain; charset=utf-8", REQUEST),
    (b"application/x-ndjson", REQUEST),
], ids=["non-stream", "json", "text", "ndjson"])
async def test_a_200_that_is_not_an_event_stream_is_not_held(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, stream: Opener, ctype: bytes,
    asked: bytes,
) -> None:
    app, _ = await commit_proxy(make_proxy)
    go = asyncio.Event()
    body = [b'{"id":"gen-1","choices":[{"message":{"role":"assistant",', b'"content":"hi"}}]}']

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        await resp.head(200, [(b"Content-Type", ctype)])
        await resp.data(body[0])
        assert await gate(go)
        await send_all(resp, body[1:])

    fake.script = per_key(handler)
    client = await stream(app.port, asked)
    head = await client.head(timeout=2.0)  # while the upstream still waits
    assert head.status_code == 200
    assert await client.data(timeout=2.0) == body[0]
    go.set()
    assert await client.body() == body[1]


async def test_with_commit_off_nothing_is_held(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, stream: Opener,
) -> None:
    app, _ = await commit_proxy(make_proxy, 0)
    go = asyncio.Event()
    parts = [PROCESSING, error_event("gen-key-0", rate_limit(reset_ms(60)))]

    async def handler(i: int, req: Recorded, resp: Responder) -> None:
        await resp.head(200, sse_head("gen-key-0"))
        await resp.data(parts[0])
        assert await gate(go)
        await send_all(resp, parts[1:])

    fake.script = per_key(handler)
    client = await stream(app.port)
    assert (await client.head(timeout=2.0)).status_code == 200
    assert await client.data(timeout=2.0) == PROCESSING  # before the first event exists
    go.set()
    assert await client.body() == parts[1]  # an error then is the client's to see
    assert len(fake.requests) == 1
    assert sample(app, "orproxy_stream_failovers_total") == 0.0
    assert states(app) == [F, A, A]
