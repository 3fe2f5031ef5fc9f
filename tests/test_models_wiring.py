"""The /models cache and free_only through the running proxy, on loopback with the fake."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import pytest

from orproxy.app import App
from tests.conftest import AUTH, ProxyFactory
from tests.fakeor import FakeOpenRouter, Recorded, Responder, completion
from tests.rawhttp import roundtrip

pytestmark = pytest.mark.anyio

FREE = {"prompt": "0", "completion": "0", "request": "0", "image": "0"}
PAID = {"prompt": "0.000001", "completion": "0.000002", "request": "0", "image": "0"}
MODELS: dict[str, Any] = {"data": [
    {"id": "meta-llama/llama-3.3-70b-instruct:free", "pricing": FREE},
    {"id": "openrouter/free", "pricing": FREE},
    {"id": "openai/gpt-4o", "pricing": PAID},
    {"id": "cheap/looks-free:free", "pricing": {"prompt": "0", "completion": "0.1"}},
]}


def get(target: bytes, *headers: tuple[bytes, bytes], method: bytes = b"GET") -> bytes:
    lines = b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    return method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n"


def chat(model: str) -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    return (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: "
            + AUTH[1] + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body.encode())


def serve_models(fake: FakeOpenRouter, gate: asyncio.Event | None = None) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        if req.target.startswith(b"/api/v1/models"):
            if gate is not None:
                await gate.wait()
            await resp.json(200, MODELS)
        else:
            await resp.json(200, completion())

    fake.script = script


def model_fetches(fake: FakeOpenRouter) -> list[Recorded]:
    return [r for r in fake.requests if r.target.startswith(b"/api/v1/models")]


async def cached_proxy(make_proxy: ProxyFactory, **openrouter: Any) -> App:
    return await make_proxy(openrouter={"enable_cache": True, "cache_ttl": 300, **openrouter})


async def test_a_hundred_concurrent_misses_make_one_upstream_fetch(
        make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    gate = asyncio.Event()
    serve_models(fake, gate)
    app = await cached_proxy(make_proxy)
    pending = [asyncio.create_task(roundtrip(app.port, get(b"/api/v1/models")))
               for _ in range(100)]
    await asyncio.sleep(0.3)
    gate.set()
    answers = await asyncio.gather(*pending)
    assert {a.status for a in answers} == {200}
    assert {json.loads(a.body)["data"][2]["id"] for a in answers} == {"openai/gpt-4o"}
    assert len(model_fetches(fake)) == 1
    [fetch] = model_fetches(fake)
    assert fetch.header(b"authorization") is None  # public: no key spent on it
    again = await roundtrip(app.port, get(b"/api/v1/models"))
    assert again.header(b"x-orproxy-cache") == b"HIT" and len(model_fetches(fake)) == 1
    other = await roundtrip(app.port, get(b"/api/v1/models?supported_parameters=tools"))
    assert other.status == 200 and len(model_fetches(fake)) == 2  # the query is in the key


async def test_etag_304_and_gzip_through_the_proxy(make_proxy: ProxyFactory,
                                                   fake: FakeOpenRouter) -> None:
    serve_models(fake)
    app = await cached_proxy(make_proxy)
    first = await roundtrip(app.port, get(b"/api/v1/models"))
    etag = first.header(b"etag")
    assert etag is not None and first.header(b"vary") == b"Accept-Encoding"
    assert first.header(b"date") is not None and first.header(b"x-request-id") is not None
    not_modified = await roundtrip(app.port, get(b"/api/v1/models", (b"If-None-Match", etag)))
    assert not_modified.status == 304 and not_modified.body == b""
    zipped = await roundtrip(app.port, get(b"/api/v1/models", (b"Accept-Encoding", b"gzip")))
    assert zipped.header(b"content-encoding") == b"gzip"
    assert json.loads(gzip.decompress(zipped.body)) == json.loads(first.body)
    head = await roundtrip(app.port, get(b"/api/v1/models", method=b"HEAD"), b"HEAD")
    assert head.status == 200 and head.body == b""
    assert head.header(b"content-length") == str(len(first.body)).encode()
    assert len(model_fetches(fake)) == 1


async def test_free_only_filters_the_list_and_refuses_paid_models_before_any_key(
        make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    serve_models(fake)
    app = await cached_proxy(make_proxy, free_only=True)
    listed = await roundtrip(app.port, get(b"/api/v1/models"))
    assert [m["id"] for m in json.loads(listed.body)["data"]] == [
        "meta-llama/llama-3.3-70b-instruct:free", "openrouter/free"]
    refused = await roundtrip(app.port, chat("openai/gpt-4o"), b"POST")
    assert refused.status == 403
    error = json.loads(refused.body)["error"]
    assert error["code"] == 403 and "free_only" in error["message"]
    fooled = await roundtrip(app.port, chat("cheap/looks-free:free"), b"POST")
    assert fooled.status == 403  # the suffix alone does not make a model free
    assert [r.target for r in fake.requests] == [b"/api/v1/models"]  # no key was used
    served = await roundtrip(app.port, chat("openrouter/free"), b"POST")
    assert served.status == 200
    assert [v.uses for v in app.services.keys.snapshot()] == [1, 0, 0]


async def test_free_only_without_the_cache_still_knows_the_list(
        make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    serve_models(fake)
    app = await make_proxy(openrouter={"free_only": True})
    assert (await roundtrip(app.port, chat("openai/gpt-4o"), b"POST")).status == 403
    assert (await roundtrip(app.port, chat("meta-llama/llama-3.3-70b-instruct:free"),
                            b"POST")).status == 200


async def test_a_failed_models_fetch_answers_head_without_a_body(
        make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        resp.abort()

    fake.script = script
    app = await cached_proxy(make_proxy)
    resp = await roundtrip(app.port, get(b"/api/v1/models", method=b"HEAD"), b"HEAD")
    assert resp.status == 502 and resp.body == b""
    assert resp.header(b"content-type") == b"application/json"
