"""Real client SDKs through the proxy: the openai SDK (sync, async, streaming) and httpx.

The fake answers like OpenRouter does (JSON completions, SSE with keep-alive comments and a
final usage chunk, the models list); the tests check that what the SDK parses equals what
the fake sent, and that the proxy's own errors map onto the SDK's exception types.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import httpx
import openai
import pytest

from orproxy.app import App
from tests.conftest import ACCESS_KEY, KEYS, on_clock, sample
from tests.fakeor import FakeOpenRouter, Recorded, Responder, rate_limited_body, reset_ms
from tests.memstream import FakeClock

pytestmark = pytest.mark.anyio

MODEL = "meta-llama/llama-3.3-70b-instruct:free"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]

COMPLETION: dict[str, Any] = {
    "id": "gen-1700000000-abc", "provider": "Chutes", "model": MODEL,
    "object": "chat.completion", "created": 1700000000,
    "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                 "native_finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Hello there!", "refusal": None,
                             "reasoning": None}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16, "cost": 0,
              "prompt_tokens_details": {"cached_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0}},
}


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "gen-1700000000-xyz", "provider": "Chutes", "model": MODEL,
            "object": "chat.completion.chunk", "created": 1700000001,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                         "native_finish_reason": finish, "logprobs": None}]}


USAGE_CHUNK: dict[str, Any] = {
    "id": "gen-1700000000-xyz", "provider": "Chutes", "model": MODEL,
    "object": "chat.completion.chunk", "created": 1700000001, "choices": [],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "cost": 0,
              "prompt_tokens_details": {"cached_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0}},
}
CHUNKS: list[dict[str, Any]] = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"role": "assistant", "content": "Hel"}),
    chunk({"role": "assistant", "content": "lo!"}),
    chunk({"role": "assistant", "content": ""}, "stop"),
    USAGE_CHUNK,
]
MODELS: dict[str, Any] = {"data": [
    {"id": "openrouter/free", "name": "Free Models Router", "created": 1750000000,
     "context_length": 200000, "pricing": {"prompt": "0", "completion": "0", "request": "0"},
     "architecture": {"modality": "text->text"}, "supported_parameters": ["tools"]},
    {"id": MODEL, "name": "Llama 3.3 70B (free)", "created": 1733506137,
     "context_length": 131072, "pricing": {"prompt": "0", "completion": "0"},
     "architecture": {"modality": "text->text"}, "supported_parameters": []},
]}


async def send_sse(resp: Responder, gate: asyncio.Event | None = None) -> None:
    await resp.head(200, [(b"Content-Type", b"text/event-stream"),
                          (b"Cache-Control", b"no-cache"), (b"X-Generation-Id",
                                                            b"gen-1700000000-xyz")])
    await resp.data(b": OPENROUTER PROCESSING\n\n")
    if gate is not None:
        await asyncio.wait_for(gate.wait(), 10)
    await resp.data(b": OPENROUTER PROCESSING\n\n")
    for doc in CHUNKS:
        await resp.data(b"data: " + json.dumps(doc).encode() + b"\n\n")
        await asyncio.sleep(0.005)
    await resp.data(b"data: [DONE]\n\n")
    await resp.end()


async def openrouter_script(req: Recorded, resp: Responder) -> None:
    if req.method == b"GET" and req.target.startswith(b"/api/v1/models"):
        await resp.json(200, MODELS)
        return
    assert req.target == b"/api/v1/chat/completions", req.target
    if req.json().get("stream"):
        await send_sse(resp)
    else:
        await resp.json(200, COMPLETION)


def base_url(app: App) -> str:
    return f"http://127.0.0.1:{app.port}/api/v1"


def check_upstream_request(sent: Recorded, key: str, *, stream: bool) -> None:
    assert sent.method == b"POST"
    assert sent.header(b"authorization") == b"Bearer " + key.encode()
    doc = sent.json()
    assert doc["model"] == MODEL
    assert doc["messages"] == MESSAGES
    assert doc.get("stream", False) is stream
    assert ACCESS_KEY.encode() not in b"".join(n + v for n, v in sent.headers)


# --- the openai SDK --------------------------------------------------------------------------


async def test_openai_sync_chat_completion(proxy: App, fake: FakeOpenRouter) -> None:
    fake.script = openrouter_script

    def call() -> dict[str, Any]:
        with openai.OpenAI(base_url=base_url(proxy), api_key=ACCESS_KEY, max_retries=0,
                           default_headers={"HTTP-Referer": "https://app.example",
                                            "X-Title": "Test App"}) as client:
            completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)
            assert completion.choices[0].message.content == "Hello there!"
            assert completion.usage is not None and completion.usage.total_tokens == 16
            return completion.to_dict()

    parsed = await anyio.to_thread.run_sync(call)
    assert parsed == COMPLETION
    [sent] = fake.requests
    check_upstream_request(sent, KEYS[0], stream=False)
    assert sent.header(b"http-referer") == b"https://app.example"
    assert sent.header(b"x-title") == b"Test App"


async def test_openai_async_chat_completion(proxy: App, fake: FakeOpenRouter) -> None:
    fake.script = openrouter_script
    async with openai.AsyncOpenAI(base_url=base_url(proxy), api_key=ACCESS_KEY,
                                  max_retries=0) as client:
        results = [await client.chat.completions.create(model=MODEL, messages=MESSAGES)
                   for _ in range(3)]
    assert [r.to_dict() for r in results] == [COMPLETION] * 3
    assert [r.header(b"authorization") for r in fake.requests] == [
        b"Bearer " + k.encode() for k in KEYS]
    for sent, key in zip(fake.requests, KEYS, strict=True):
        check_upstream_request(sent, key, stream=False)


async def test_openai_async_streaming(proxy: App, fake: FakeOpenRouter) -> None:
    fake.script = openrouter_script
    async with openai.AsyncOpenAI(base_url=base_url(proxy), api_key=ACCESS_KEY,
                                  max_retries=0) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True})
        got: list[dict[str, Any]] = [c.to_dict() async for c in stream]
    assert got == CHUNKS
    assert "".join(c["choices"][0]["delta"]["content"] for c in got if c["choices"]) == "Hello!"
    assert got[-1]["usage"]["total_tokens"] == 15
    [sent] = fake.requests
    check_upstream_request(sent, KEYS[0], stream=True)


async def test_openai_sync_streaming(proxy: App, fake: FakeOpenRouter) -> None:
    fake.script = openrouter_script

    def call() -> list[dict[str, Any]]:
        with openai.OpenAI(base_url=base_url(proxy), api_key=ACCESS_KEY,
                           max_retries=0) as client:
            stream = client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                    stream=True)
            with stream:
                return [c.to_dict() for c in stream]

    got = await anyio.to_thread.run_sync(call)
    assert got == CHUNKS
    check_upstream_request(fake.requests[0], KEYS[0], stream=True)


async def test_openai_models_list(proxy: App, fake: FakeOpenRouter) -> None:
    fake.script = openrouter_script
    async with openai.AsyncOpenAI(base_url=base_url(proxy), api_key=ACCESS_KEY,
                                  max_retries=0) as client:
        page = await client.models.list()
        models = [m async for m in page]
    assert [m.id for m in models] == ["openrouter/free", MODEL]
    assert [m.to_dict() for m in models] == MODELS["data"]
    [sent] = fake.requests
    assert sent.method == b"GET" and sent.target == b"/api/v1/models"
    assert sent.header(b"authorization") is None


async def test_openai_rate_limit_error_when_every_key_cools(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    on_clock(proxy, clock)  # the rest is exactly 12 s: the test clock stands still
    reset = reset_ms(12, clock.wall())

    async def limited(req: Recorded, resp: Responder) -> None:
        await resp.json(429, rate_limited_body(reset))

    fake.script = limited

    def call() -> openai.RateLimitError:
        with openai.OpenAI(base_url=base_url(proxy), api_key=ACCESS_KEY,
                           max_retries=0) as client:
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(model=MODEL, messages=MESSAGES)
            return info.value

    exc = await anyio.to_thread.run_sync(call)
    assert exc.status_code == 429
    assert exc.response.headers["retry-after"] == "12"
    assert isinstance(exc.body, dict)
    assert exc.body["code"] == 429
    assert exc.body["metadata"] == {"retry_after_seconds": 12,
                                    "upstream_message": "Rate limit exceeded."}
    assert len(fake.requests) == 3
    # and once every key rests, the async client gets the same without any upstream call
    async with openai.AsyncOpenAI(base_url=base_url(proxy), api_key=ACCESS_KEY,
                                  max_retries=0) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert len(fake.requests) == 3


async def test_openai_authentication_error_with_wrong_access_key(
    proxy: App, fake: FakeOpenRouter
) -> None:
    async with openai.AsyncOpenAI(base_url=base_url(proxy), api_key="wrong",
                                  max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert info.value.status_code == 401
    assert isinstance(info.value.body, dict) and info.value.body["code"] == 401
    assert fake.requests == []


async def test_openai_sees_passed_through_upstream_error(
    proxy: App, fake: FakeOpenRouter
) -> None:
    async def bad(req: Recorded, resp: Responder) -> None:
        await resp.json(400, {"error": {"code": 400, "message": "model is required"}})

    fake.script = bad
    async with openai.AsyncOpenAI(base_url=base_url(proxy), api_key=ACCESS_KEY,
                                  max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert info.value.body == {"code": 400, "message": "model is required"}


# --- httpx -----------------------------------------------------------------------------------


async def test_httpx_keep_alive_many_requests_on_one_connection(
    proxy: App, fake: FakeOpenRouter
) -> None:
    fake.script = openrouter_script
    headers = {"Authorization": f"Bearer {ACCESS_KEY}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}",
                                 headers=headers) as client:
        for i in range(60):
            if i % 3 == 2:
                resp = await client.get("/health")
                assert resp.status_code == 200
                assert resp.json()["status"] == "ok"
            else:
                resp = await client.post("/api/v1/chat/completions",
                                         json={"model": MODEL, "messages": MESSAGES})
                assert resp.status_code == 200
                assert resp.json() == COMPLETION
            assert resp.http_version == "HTTP/1.1"
            assert "connection" not in resp.headers
    accepted = sample(proxy, "orproxy_client_connections_accepted_total")
    assert accepted == 1.0
    assert len(fake.requests) == 40
    assert fake.opened == 1  # the upstream connection is kept alive and reused too
    assert [r.conn_id for r in fake.requests] == [1] * 40


async def test_httpx_stream_forwards_keepalive_comment_before_the_rest(
    proxy: App, fake: FakeOpenRouter
) -> None:
    gate = asyncio.Event()

    async def script(req: Recorded, resp: Responder) -> None:
        await send_sse(resp, gate)

    fake.script = script
    received = b""
    async with httpx.AsyncClient() as client, client.stream(
        "POST", f"http://127.0.0.1:{proxy.port}/api/v1/chat/completions",
        headers={"Authorization": f"Bearer {ACCESS_KEY}"},
        json={"model": MODEL, "messages": MESSAGES, "stream": True},
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream"
        assert resp.headers["x-generation-id"] == "gen-1700000000-xyz"
        async for data in resp.aiter_raw():
            received += data
            if received == b": OPENROUTER PROCESSING\n\n":
                gate.set()  # the fake sends the rest only once the comment got through
    assert gate.is_set()
    events = [e for e in received.split(b"\n\n") if e]
    assert events[:2] == [b": OPENROUTER PROCESSING"] * 2
    assert [json.loads(e[len(b"data: "):]) for e in events[2:-1]] == CHUNKS
    assert events[-1] == b"data: [DONE]"
