"""HTTP/1.1 on the client side: framing, limits, malformed input, keep-alive, 100-continue.

Every request here is written as raw bytes, so the proxy sees exactly what a conformance
or smuggling probe would send.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from orproxy.app import App
from tests.conftest import AUTH, ProxyFactory
from tests.fakeor import FakeOpenRouter, Recorded, Responder, error_of
from tests.rawhttp import RawClient, Response, connected, roundtrip

pytestmark = pytest.mark.anyio

AUTH_LINE = b"Authorization: " + AUTH[1] + b"\r\n"


def post(body: bytes = b"{}", extra: bytes = b"", path: bytes = b"/api/v1/chat/completions",
         ) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: proxy\r\n" + AUTH_LINE + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def assert_error(resp: Response, status: int) -> None:
    """A local error: the status, OpenRouter's JSON error shape, one Date/Server."""
    assert resp.status == status
    error_of(resp)
    assert resp.header(b"date") is not None
    assert resp.header(b"server") == b"orproxy"
    assert resp.header(b"x-request-id")


async def error_and_close(port: int, data: bytes, status: int) -> None:
    async with connected(port) as client:
        await client.send(data)
        resp = await client.response()
        assert_error(resp, status)
        assert resp.header(b"connection") == b"close"
        await client.wait_eof()


BAD_REQUESTS = {
    "cl_and_te": (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: a\r\n" + AUTH_LINE
                  + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te_in_http10": (b"POST /api/v1/chat/completions HTTP/1.0\r\nHost: a\r\n" + AUTH_LINE
                     + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te_gzip": (b"POST /api/v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n"
                b"\r\n0\r\n\r\n", 501),
    "two_te": (b"POST /api/v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    "cl_conflict": (b"POST /api/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                    b"Content-Length: 2\r\n\r\nxx", 400),
    "cl_plus": b"POST /api/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx",
    "cl_negative": b"POST /api/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\nx",
    "cl_hex": b"POST /api/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0x1\r\n\r\nx",
    "http_1_2": (b"GET /health HTTP/1.2\r\nHost: a\r\n\r\n", 505),
    "http_2_0": (b"GET /health HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "http_0_9": b"GET /health\r\n\r\n",
    "no_host": b"GET /health HTTP/1.1\r\n\r\n",
    "two_hosts": b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "bad_host": b"GET /health HTTP/1.1\r\nHost: a b\r\n\r\n",
    "ctl_in_value": b"GET /health HTTP/1.1\r\nHost: a\r\nX-A: a\x01b\r\n\r\n",
    "nul_in_value": b"GET /health HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
    "bare_cr": b"GET /health HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n",
    "space_before_colon": b"GET /health HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n",
    "leading_fold": b"GET /health HTTP/1.1\r\n Host: a\r\n\r\n",
    "space_in_target": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    "chunk_size_overflow": (b"POST /api/v1/x HTTP/1.1\r\nHost: a\r\n" + AUTH_LINE
                            + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\n"),
    "chunk_size_negative": (b"POST /api/v1/x HTTP/1.1\r\nHost: a\r\n" + AUTH_LINE
                            + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"),
    "chunk_bare_lf": (b"POST /api/v1/x HTTP/1.1\r\nHost: a\r\n" + AUTH_LINE
                      + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n"),
    "dot_segments": b"GET /api/v1/../../admin HTTP/1.1\r\nHost: a\r\n" + AUTH_LINE + b"\r\n",
    "encoded_dot_segments": (b"GET /api/v1/%2e%2e/admin HTTP/1.1\r\nHost: a\r\n" + AUTH_LINE
                             + b"\r\n"),
    "asterisk_form": b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    "authority_form": b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
async def test_malformed_requests_are_refused_and_never_forwarded(
    name: str, proxy: App, fake: FakeOpenRouter
) -> None:
    case = BAD_REQUESTS[name]
    data, status = case if isinstance(case, tuple) else (case, 400)
    await error_and_close(proxy.port, data, status)
    assert fake.requests == []


async def test_obs_fold_is_normalised_to_a_space(proxy: App, fake: FakeOpenRouter) -> None:
    """RFC 9112 §5.2 allows replacing obs-fold with SP instead of refusing the request."""
    resp = await roundtrip(proxy.port, post(extra=b"X-Folded: a\r\n b\r\n"), b"POST")
    assert resp.status == 200
    assert fake.requests[0].header(b"x-folded") == b"a b"


async def test_head_limits(make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    app = await make_proxy(limits={"max_head_bytes": 4096, "max_header_count": 10,
                                   "max_target_bytes": 1024})
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(11))
    await error_and_close(app.port, b"GET /health HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n", 431)
    # a head that arrives whole, larger than the limit (h11 only checks heads in pieces)
    big = b"X-Big: " + b"v" * 5000 + b"\r\n"
    await error_and_close(app.port, b"GET /health HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n", 431)
    # the same head trickled in small pieces
    async with connected(app.port) as client:
        data = b"GET /health HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n"
        for i in range(0, len(data), 500):
            await client.send(data[i:i + 500])
            await asyncio.sleep(0.001)
        assert_error(await client.response(), 431)
    target = b"/api/v1/" + b"a" * 2000
    await error_and_close(app.port, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414)
    assert fake.requests == []


async def test_body_limit_from_content_length_before_reading(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    app = await make_proxy(limits={"max_body_bytes": 1000})
    async with connected(app.port) as client:
        # only the head is sent: the answer must not wait for 5000 body bytes
        await client.send(b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: a\r\n" + AUTH_LINE
                          + b"Content-Length: 5000\r\n\r\n")
        resp = await client.response(timeout=5)
        assert_error(resp, 413)
        await client.wait_eof()
    assert fake.requests == []


async def test_body_limit_for_chunked_bodies(make_proxy: ProxyFactory, fake: FakeOpenRouter,
                                             ) -> None:
    app = await make_proxy(limits={"max_body_bytes": 1000})
    chunk = b"200\r\n" + b"x" * 512 + b"\r\n"
    data = (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: a\r\n" + AUTH_LINE
            + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n")
    await error_and_close(app.port, data, 413)
    assert fake.requests == []


async def test_chunked_request_body_is_forwarded_with_exact_length(
    proxy: App, fake: FakeOpenRouter
) -> None:
    data = (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: a\r\n" + AUTH_LINE
            + b"Transfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n"
            + b"X-Trailer: t\r\n\r\n")
    resp = await roundtrip(proxy.port, data, b"POST")
    assert resp.status == 200
    sent = fake.requests[0]
    assert sent.body == b"abcde"
    assert sent.header(b"content-length") == b"5"
    assert sent.header(b"transfer-encoding") is None


async def test_pipelined_requests_are_answered_in_order(proxy: App, fake: FakeOpenRouter) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        if req.body == b'{"n":0}':
            await asyncio.sleep(0.2)  # the first answer comes last from upstream
        await resp.json(200, {"echo": req.json()})

    fake.script = script
    async with connected(proxy.port) as client:
        await client.send(b"".join(post(b'{"n":%d}' % i) for i in range(3))
                          + b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        for i in range(3):
            resp = await client.response(b"POST")
            assert resp.status == 200
            assert json.loads(resp.body) == {"echo": {"n": i}}
        assert (await client.response()).status == 200


async def test_keep_alive_serves_many_requests_on_one_connection(
    proxy: App, fake: FakeOpenRouter
) -> None:
    async with connected(proxy.port) as client:
        for _ in range(5):
            await client.send(post())
            resp = await client.response(b"POST")
            assert resp.status == 200
            assert resp.header(b"connection") is None
    assert fake.opened == 1


async def test_connection_close_is_honoured(proxy: App) -> None:
    async with connected(proxy.port) as client:
        await client.send(post(extra=b"Connection: close\r\n"))
        resp = await client.response(b"POST")
        assert resp.status == 200
        assert resp.header(b"connection") == b"close"
        await client.wait_eof()


async def test_http10_client_gets_a_close_delimited_stream(proxy: App, fake: FakeOpenRouter,
                                                          ) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        await resp.head(200, [(b"Content-Type", b"text/event-stream")])
        await resp.data(b"data: 1\n\n")
        await resp.data(b"data: [DONE]\n\n")
        await resp.end()

    fake.script = script
    async with connected(proxy.port) as client:
        await client.send(post().replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        await client.wait_eof()
        head, _, body = bytes(client.raw).partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 200 ")
        names = [line.split(b":")[0].lower() for line in lines[1:]]
        assert b"transfer-encoding" not in names and b"content-length" not in names
        assert b"connection" in names
        assert body == b"data: 1\n\ndata: [DONE]\n\n"


async def test_expect_100_continue(proxy: App, fake: FakeOpenRouter) -> None:
    async with connected(proxy.port) as client:
        await client.send(b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: a\r\n" + AUTH_LINE
                          + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        interim = await client.read_some()
        assert interim.startswith(b"HTTP/1.1 100 ")
        client.raw.clear()
        client.conn.receive_data(interim)
        await client.send(b"{}")
        resp = await client.response(b"POST")
        assert resp.status == 200
    assert fake.requests[0].body == b"{}"
    assert fake.requests[0].header(b"expect") is None


async def test_expect_100_continue_refused_without_auth(proxy: App, fake: FakeOpenRouter) -> None:
    """A request that will be refused gets its final status instead of 100 Continue."""
    async with connected(proxy.port) as client:
        await client.send(b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
                          b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        first = await client.read_some()
        assert first.startswith(b"HTTP/1.1 401 ")
    assert fake.requests == []


async def test_unknown_expectation_gets_417(proxy: App, fake: FakeOpenRouter) -> None:
    await error_and_close(proxy.port, post(extra=b"Expect: something-else\r\n"), 417)
    assert fake.requests == []


async def test_hop_by_hop_headers_are_stripped_upstream(proxy: App, fake: FakeOpenRouter) -> None:
    extra = (b"Connection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: 5\r\n"
             b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\nTE: trailers\r\n"
             b"Trailer: X-T\r\nUpgrade: websocket\r\nX-End-To-End: kept\r\nHTTP-Referer: app\r\n"
             b"X-Title: My App\r\nAccept-Encoding: gzip\r\n")
    resp = await roundtrip(proxy.port, post(extra=extra), b"POST")
    assert resp.status == 200
    sent = fake.requests[0]
    names = [n.lower() for n, _ in sent.headers]
    for hop in (b"connection", b"x-secret-hop", b"keep-alive", b"proxy-connection",
                b"proxy-authorization", b"te", b"trailer", b"upgrade", b"transfer-encoding"):
        assert hop not in names
    assert sent.header(b"host") == f"127.0.0.1:{fake.port}".encode()
    # end-to-end headers pass with their casing and order
    kept = [(n, v) for n, v in sent.headers if n in (b"X-End-To-End", b"HTTP-Referer",
                                                     b"X-Title", b"Accept-Encoding")]
    assert kept == [(b"X-End-To-End", b"kept"), (b"HTTP-Referer", b"app"),
                    (b"X-Title", b"My App"), (b"Accept-Encoding", b"gzip")]


async def test_hop_by_hop_headers_are_stripped_downstream(proxy: App, fake: FakeOpenRouter,
                                                         ) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        body = b'{"ok":true}'
        await resp.head(200, [(b"Content-Type", b"application/json"),
                              (b"Connection", b"X-Up-Hop"), (b"X-Up-Hop", b"1"),
                              (b"Keep-Alive", b"timeout=5"), (b"Proxy-Authenticate", b"Basic"),
                              (b"Upgrade", b"h2c"), (b"Trailer", b"X-T"),
                              (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
                              (b"Date", b"Mon, 01 Jan 2024 00:00:01 GMT"),
                              (b"Server", b"cloudflare"), (b"Server", b"uvicorn"),
                              (b"X-Request-ID", b"upstream-id"),
                              (b"Content-Encoding", b"identity"),
                              (b"X-Generation-Id", b"gen-1"),
                              (b"Content-Length", str(len(body)).encode())])
        await resp.data(body)
        await resp.end()

    fake.script = script
    resp = await roundtrip(proxy.port, post(extra=b"X-Request-ID: client-id-1\r\n"), b"POST")
    assert resp.status == 200
    names = [n.lower() for n, _ in resp.headers]
    for hop in (b"x-up-hop", b"keep-alive", b"proxy-authenticate", b"upgrade", b"trailer"):
        assert hop not in names
    assert resp.headers_named(b"date") == [b"Mon, 01 Jan 2024 00:00:00 GMT"]
    assert resp.headers_named(b"server") == [b"cloudflare"]
    assert resp.headers_named(b"x-request-id") == [b"client-id-1"]
    assert resp.header(b"content-encoding") == b"identity"
    assert resp.header(b"x-generation-id") == b"gen-1"
    assert resp.body == b'{"ok":true}'


async def test_head_request_to_a_forwarded_endpoint(proxy: App, fake: FakeOpenRouter) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        await resp.head(200, [(b"Content-Type", b"application/json"),
                              (b"Content-Length", b"12345")])
        await resp.end()

    fake.script = script
    async with connected(proxy.port) as client:
        await client.send(b"HEAD /api/v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
        resp = await client.response(b"HEAD")
        assert resp.status == 200
        assert resp.header(b"content-length") == b"12345"
        assert resp.body == b""
        # the connection stays usable: no body bytes were sent after the head
        await client.send(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await client.response()).status == 200
    assert fake.requests[0].method == b"HEAD"


async def test_absolute_form_target(proxy: App, fake: FakeOpenRouter) -> None:
    data = (b"GET http://proxy.example/api/v1/models?x=1 HTTP/1.1\r\nHost: proxy.example\r\n"
            b"\r\n")
    resp = await roundtrip(proxy.port, data)
    assert resp.status == 200
    assert fake.requests[0].target == b"/api/v1/models?x=1"


async def test_every_method_is_forwarded(proxy: App, fake: FakeOpenRouter) -> None:
    async with connected(proxy.port) as client:
        for method in (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"):
            await client.send(method + b" /api/v1/keys/abc?y=2 HTTP/1.1\r\nHost: a\r\n"
                              + AUTH_LINE + b"Content-Length: 2\r\n\r\n{}")
            assert (await client.response(method)).status == 200
    assert [r.method for r in fake.requests] == [b"GET", b"POST", b"PUT", b"PATCH", b"DELETE",
                                                 b"OPTIONS"]
    assert {r.target for r in fake.requests} == {b"/api/v1/keys/abc?y=2"}


async def test_slow_head_is_cut_off_with_408(make_proxy: ProxyFactory) -> None:
    app = await make_proxy(timeouts={"client_head_seconds": 0.5})
    async with connected(app.port) as client:
        await client.send(b"GET /health HTTP/1.1\r\n")
        for _ in range(3):  # a byte now and then does not extend the deadline
            await asyncio.sleep(0.2)
            await client.send(b"X")
        resp = await client.response(timeout=5)
        assert_error(resp, 408)
        await client.wait_eof()


async def test_silent_connection_and_idle_keep_alive_are_closed(make_proxy: ProxyFactory) -> None:
    app = await make_proxy(timeouts={"client_head_seconds": 0.3, "keepalive_seconds": 0.3})
    silent = await RawClient.connect(app.port)
    idle = await RawClient.connect(app.port)
    try:
        await idle.send(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await idle.response()).status == 200
        await silent.wait_eof(timeout=3)
        assert silent.raw == b""  # nothing was asked, nothing is answered
        await idle.wait_eof(timeout=3)
    finally:
        silent.close()
        idle.close()


async def test_slow_body_is_cut_off_with_408(make_proxy: ProxyFactory, fake: FakeOpenRouter,
                                            ) -> None:
    app = await make_proxy(timeouts={"client_body_seconds": 0.3})
    async with connected(app.port) as client:
        await client.send(post(b"{}")[:-1])  # one body byte short
        resp = await client.response(timeout=5)
        assert_error(resp, 408)
    assert fake.requests == []


async def test_garbage_gets_400_json(proxy: App) -> None:
    await error_and_close(proxy.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 4 +
                          b"\r\n\r\n", 400)


async def test_cors_preflight_goes_up_without_any_key(proxy: App, fake: FakeOpenRouter) -> None:
    """Browsers send preflights without credentials; OpenRouter answers them itself."""
    async def script(req: Recorded, resp: Responder) -> None:
        await resp.head(204, [(b"Access-Control-Allow-Origin", b"*"),
                              (b"Access-Control-Allow-Headers", b"authorization,content-type")])
        await resp.end()

    fake.script = script
    resp = await roundtrip(proxy.port, b"OPTIONS /api/v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
                           b"Origin: https://app.example\r\nAccess-Control-Request-Method: POST\r\n"
                           b"\r\n", b"OPTIONS")
    assert resp.status == 204
    assert resp.header(b"access-control-allow-origin") == b"*"
    sent = fake.requests[0]
    assert sent.method == b"OPTIONS"
    assert sent.header(b"authorization") is None
    # an OPTIONS that is no preflight still needs the access key
    resp = await roundtrip(proxy.port, b"OPTIONS /api/v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
                           b"\r\n", b"OPTIONS")
    assert_error(resp, 401)
    assert len(fake.requests) == 1
