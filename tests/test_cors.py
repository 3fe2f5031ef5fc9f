"""CORS for browser clients (server.cors_origins): preflights answered here, and every
answer to an allowed origin marked so the browser lets the page read it."""

from __future__ import annotations

import pytest

from orproxy.http.cors import allowed_origin, preflight_headers
from tests.conftest import AUTH, ProxyFactory
from tests.fakeor import FakeOpenRouter, Recorded, Responder, completion
from tests.rawhttp import roundtrip

pytestmark = pytest.mark.anyio

ORIGIN = b"https://chat.example"


def request(method: bytes, target: bytes, *headers: tuple[bytes, bytes],
            body: bytes = b"") -> bytes:
    lines = b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    length = b"Content-Length: %d\r\n" % len(body) if body or method == b"POST" else b""
    return method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n" + lines + length + b"\r\n" + body


PREFLIGHT = request(b"OPTIONS", b"/api/v1/chat/completions", (b"Origin", ORIGIN),
                    (b"Access-Control-Request-Method", b"POST"),
                    (b"Access-Control-Request-Headers", b"authorization, content-type, x-title"))


def test_allowed_origin_and_preflight_headers() -> None:
    headers = [(b"Origin", ORIGIN)]
    assert allowed_origin((), headers) is None
    assert allowed_origin(("https://other.example",), headers) is None
    assert allowed_origin(("https://chat.example",), headers) == ORIGIN
    assert allowed_origin(("*",), headers) == ORIGIN
    assert allowed_origin(("*",), [(b"Origin", b"null")]) is None
    asked = [(b"Access-Control-Request-Headers", b"X-Title, bad header, authorization")]
    allow = dict(preflight_headers(ORIGIN, asked))[b"Access-Control-Allow-Headers"]
    assert allow == b"authorization, content-type, x-title"


async def test_preflight_is_answered_here_without_an_access_key(
        make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    app = await make_proxy(server={"cors_origins": ["https://chat.example"]})
    resp = await roundtrip(app.port, PREFLIGHT, b"OPTIONS")
    assert resp.status == 204
    assert resp.header(b"access-control-allow-origin") == ORIGIN
    assert resp.header(b"vary") == b"Origin"
    assert b"authorization" in (resp.header(b"access-control-allow-headers") or b"")
    assert b"x-title" in (resp.header(b"access-control-allow-headers") or b"")
    assert resp.header(b"access-control-max-age") == b"600"
    assert resp.header(b"content-length") is None and resp.body == b""
    assert fake.requests == []
    other = PREFLIGHT.replace(ORIGIN, b"https://evil.example")
    refused = await roundtrip(app.port, other, b"OPTIONS")
    assert refused.status == 403 and refused.header(b"access-control-allow-origin") is None


async def test_answers_to_an_allowed_origin_are_marked_and_the_upstreams_replaced(
        make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        await resp.json(200, completion(), [(b"Access-Control-Allow-Origin", b"*")])

    fake.script = script
    app = await make_proxy(server={"cors_origins": ["*"]})
    chat = request(b"POST", b"/api/v1/chat/completions", AUTH, (b"Origin", ORIGIN), body=b"{}")
    resp = await roundtrip(app.port, chat, b"POST")
    assert resp.status == 200
    assert resp.headers_named(b"access-control-allow-origin") == [ORIGIN]
    expose = resp.header(b"access-control-expose-headers") or b""
    assert b"X-Request-ID" in expose and b"Server-Timing" in expose
    for target in (b"/health", b"/nope"):
        local = await roundtrip(app.port, request(b"GET", target, (b"Origin", ORIGIN)))
        assert local.header(b"access-control-allow-origin") == ORIGIN, target
    denied = await roundtrip(app.port, request(b"POST", b"/api/v1/chat/completions",
                                               (b"Origin", ORIGIN), body=b"{}"), b"POST")
    assert denied.status == 401 and denied.header(b"access-control-allow-origin") == ORIGIN


async def test_without_cors_origins_a_preflight_goes_up_as_before(
        make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        await resp.head(204, [(b"Access-Control-Allow-Origin", b"*")])
        await resp.end()

    fake.script = script
    app = await make_proxy()
    resp = await roundtrip(app.port, PREFLIGHT, b"OPTIONS")
    assert resp.status == 204 and resp.header(b"access-control-allow-origin") == b"*"
    [sent] = fake.requests
    assert sent.method == b"OPTIONS" and sent.header(b"authorization") is None
