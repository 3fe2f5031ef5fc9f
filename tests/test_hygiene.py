"""Connection hygiene: stray upstream bytes never reach another client, slow clients never
grow the proxy's buffers, and framing edge cases found in review stay fixed."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from orproxy.app import App
from tests.conftest import AUTH, ProxyFactory
from tests.fakeor import FakeOpenRouter, Recorded, Responder
from tests.procs import free_port
from tests.rawhttp import connected, roundtrip

pytestmark = pytest.mark.anyio


def get(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nAuthorization: " + AUTH[1] + b"\r\n\r\n"


async def test_bytes_past_a_response_never_answer_the_next_request(
    proxy: App, fake: FakeOpenRouter
) -> None:
    """A body longer than its Content-Length: the rest is not kept for the next client."""
    async def script(req: Recorded, resp: Responder) -> None:
        if req.target.endswith(b"/first"):
            await resp.raw_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
                b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Evil: 1\r\n\r\nSMUGGLED")
        else:
            await resp.json(200, {"for": req.target.decode()})

    fake.script = script
    first = await roundtrip(proxy.port, get(b"/api/v1/first"))
    assert first.body == b"hello"
    second = await roundtrip(proxy.port, get(b"/api/v1/second"))
    assert json.loads(second.body) == {"for": "/api/v1/second"}
    assert second.header(b"x-evil") is None
    assert fake.opened == 2  # the polluted connection was not reused


async def test_bytes_heard_while_idle_disqualify_a_pooled_connection(
    proxy: App, fake: FakeOpenRouter
) -> None:
    """E.g. the 408 some servers send before closing an idle connection."""
    async def script(req: Recorded, resp: Responder) -> None:
        await resp.json(200, {"for": req.target.decode()})
        if req.target.endswith(b"/first"):
            async def stray() -> None:
                await asyncio.sleep(0.1)
                await resp.raw(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 7\r\n\r\ntimeout")
            asyncio.get_running_loop().create_task(stray())

    fake.script = script
    assert (await roundtrip(proxy.port, get(b"/api/v1/first"))).status == 200
    await asyncio.sleep(0.3)
    second = await roundtrip(proxy.port, get(b"/api/v1/second"))
    assert second.status == 200
    assert json.loads(second.body) == {"for": "/api/v1/second"}
    assert fake.opened == 2


async def test_response_with_both_framings_is_not_pooled(proxy: App, fake: FakeOpenRouter) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        if req.target.endswith(b"/first"):
            await resp.raw_response(b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        else:
            await resp.json(200, {"ok": True})

    fake.script = script
    first = await roundtrip(proxy.port, get(b"/api/v1/first"))
    assert first.body == b"ok"
    assert first.header(b"content-length") is None
    assert (await roundtrip(proxy.port, get(b"/api/v1/second"))).status == 200
    assert fake.opened == 2


async def test_pipelining_client_that_never_reads_does_not_grow_our_buffer(
    make_proxy: ProxyFactory,
) -> None:
    app = await make_proxy(timeouts={"client_write_seconds": 1})
    async with connected(app.port, rcvbuf=4096) as client:
        client.stop_reading()
        request = b"GET /metrics/raw HTTP/1.1\r\nHost: a\r\n\r\n"
        sent = 0
        for _ in range(2000):  # until the kernel takes no more: the proxy stopped reading
            if client.writer.transport.get_write_buffer_size():
                break
            client.writer.write(request * 5)
            sent += len(request) * 5
            await asyncio.sleep(0)
        await asyncio.sleep(0.3)
        buffered = [h.stream.transport.get_write_buffer_size() for h in app.services.connections
                    if h.stream.transport is not None]
        assert buffered and max(buffered) < 1_000_000, buffered
        # and the stalled client is cut off once the write timeout passes
        await asyncio.sleep(2.0)
        assert not app.services.connections
        assert sent > 0


async def test_closing_on_a_client_that_never_reads_gives_up(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    """close() must not keep a socket and its unsent bytes forever: a response that ends
    while ~tens of KB still wait in our buffer for a client that never reads."""
    async def script(req: Recorded, resp: Responder) -> None:
        body = b"x" * 60_000
        await resp.head(200, [(b"Content-Length", str(len(body)).encode())])
        await resp.data(body)
        await resp.end()

    fake.script = script
    app = await make_proxy(timeouts={"client_write_seconds": 0.5})
    async with connected(app.port, rcvbuf=4096) as client:
        client.stop_reading()
        for _ in range(500):  # the handler exists from accept on
            if app.services.connections:
                break
            await asyncio.sleep(0.002)
        stream = next(iter(app.services.connections)).stream
        assert stream.transport is not None
        # small kernel buffers on both ends, so the response's tail waits in ours
        stream.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await client.send(get(b"/api/v1/big").replace(b"\r\n\r\n",
                                                        b"\r\nConnection: close\r\n\r\n"))
        await asyncio.sleep(0.3)
        assert not app.services.connections  # the response ended; the handler closed the connection
        assert stream.transport is not None
        assert stream.transport.get_write_buffer_size() > 0  # ...with bytes still unsent
        await asyncio.sleep(1.0)
        assert stream.lost is not None  # connection_lost: the socket was given up


async def test_chunked_trailer_arriving_in_two_pieces(proxy: App, fake: FakeOpenRouter) -> None:
    async with connected(proxy.port) as client:
        await client.send(b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: "
                          + AUTH[1] + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
                          b"X-T: 1\r\n")
        await asyncio.sleep(0.2)
        await client.send(b"\r\n")
        assert (await client.response(b"POST")).status == 200
    assert fake.requests[0].body == b"hello"


async def test_expect_100_continue_is_case_insensitive(proxy: App) -> None:
    async with connected(proxy.port) as client:
        await client.send(b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: "
                          + AUTH[1] + b"\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\n")
        interim = await client.read_some()
        assert interim.startswith(b"HTTP/1.1 100 ")
        client.conn.receive_data(interim)
        await client.send(b"{}")
        assert (await client.response(b"POST")).status == 200


async def test_long_target_in_pieces_is_414(proxy: App) -> None:
    async with connected(proxy.port) as client:
        line = b"GET /api/v1/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
        for i in range(0, len(line), 4000):
            await client.send(line[i:i + 4000])
            await asyncio.sleep(0.01)
        assert (await client.response()).status == 414


async def test_upstream_failure_details_stay_in_our_log(make_proxy: ProxyFactory) -> None:
    port = free_port()
    app = await make_proxy(openrouter={"base_url": f"http://127.0.0.1:{port}/api/v1"},
                           retry={"max_attempts": 1})
    resp = await roundtrip(app.port, get(b"/api/v1/models"))
    assert resp.status == 502
    assert json.loads(resp.body) == {"error": {"code": 502, "message": "upstream unreachable"}}
    assert str(port).encode() not in resp.body


async def test_reset_in_a_close_delimited_body_is_not_a_complete_response(
    proxy: App, fake: FakeOpenRouter
) -> None:
    """Without framing, only an orderly close ends the body: a reset truncates it."""
    async def script(req: Recorded, resp: Responder) -> None:
        await resp.raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                       b"data: part1\n\n")
        await asyncio.sleep(0.1)
        await resp.raw(b"data: part2\n\n")
        await asyncio.sleep(0.1)
        resp.reset()

    fake.script = script
    async with connected(proxy.port) as client:
        await client.send(get(b"/api/v1/chat/completions"))
        await client.wait_eof()
        assert b"data: part2" in client.raw
        assert not bytes(client.raw).endswith(b"0\r\n\r\n")  # no final chunk
