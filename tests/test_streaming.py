"""Streaming end to end: bytes, latency, framing, backpressure, aborts, timeouts, shutdown
and upstream keep-alive, on real loopback sockets (the fake OpenRouter over TLS).

Ordering is proved with gates rather than clocks: the fake sends a piece, then waits for the
test to say the client has it, so a proxy that buffers deadlocks and the test times out.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import h11
import psutil
import pytest

from orproxy.app import App
from tests.conftest import ProxyFactory
from tests.fakeor import FakeOpenRouter, Recorded, Responder, Script, completion
from tests.rawhttp import LAST_CHUNK, RawClient, connected, header_values, refused
from tests.streamhelpers import SSE_HEADERS, close_gracefully, eventually, gate, hold

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024

SSE_EVENTS = [
    b": OPENROUTER PROCESSING\n\n",
    b": OPENROUTER PROCESSING\n\n",
    b'data: {"id":"gen-stream-1","object":"chat.completion.chunk","model":"test/model",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"}}]}\n\n',
    'data: {"id":"gen-stream-1","choices":[{"index":0,"delta":{"content":"lo, wörld 🌍"}}]}'
    "\n\n".encode(),
    b": OPENROUTER PROCESSING\r\n\r\n",
    b'data: {"id":"gen-stream-1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":4,"total_tokens":9,"cost":0}}\n\n',
    b"data: [DONE]\n\n",
]
SSE = b"".join(SSE_EVENTS)


def odd_pieces(stream: bytes) -> list[bytes]:
    """Cut the SSE stream where a line-based proxy would be most tempted to reassemble:
    inside "data:", between the two newlines of an event end, inside a multi-byte UTF-8
    character, inside a CRLF, and into one-byte pieces."""
    emoji = stream.index("🌍".encode())
    crlf = stream.index(b"\r\n\r\n")
    done = stream.index(b"data: [DONE]")
    cuts = {1, 2, 3, stream.index(b"\n\n") + 1, stream.index(b"data:") + 2, emoji + 1,
            emoji + 3, crlf + 1, crlf + 3, done + 4, done + 5, len(stream) - 1}
    bounds = [0, *sorted(cuts), len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert b"".join(pieces) == stream and all(pieces)
    return pieces


def no_final_chunk(client: RawClient) -> None:
    assert client.eof, "the proxy did not close the client connection"
    assert not bytes(client.raw).endswith(LAST_CHUNK), "a truncated body looked complete"


async def completion_works(client: RawClient) -> None:
    """A plain completion on this client connection comes back whole."""
    await client.request(b'{"model":"m"}')
    head = await client.head()
    assert head.status_code == 200
    assert json.loads(await client.body())["usage"]["total_tokens"] == 7


def then_completions(fake: FakeOpenRouter, first: Script) -> Script:
    """``first`` answers the first request; a plain completion every later one (what
    ``ok_after`` and ``completion_works`` ask for)."""

    async def script(req: Recorded, resp: Responder) -> None:
        if len(fake.requests) == 1:
            await first(req, resp)
        else:
            await resp.json(200, completion())

    return script


async def ok_after(port: int) -> None:
    """The proxy still serves a fresh client normally."""
    async with connected(port) as client:
        await completion_works(client)


# --- 1. bytes ------------------------------------------------------------------------------


async def test_sse_bytes_pass_through_exactly(proxy: App, fake: FakeOpenRouter) -> None:
    pieces = odd_pieces(SSE)

    async def script(req: Recorded, resp: Responder) -> None:
        await resp.head(200, SSE_HEADERS)
        for piece in pieces:
            await resp.data(piece)
        await resp.end()

    fake.script = script
    async with connected(proxy.port) as client:
        await client.request()
        head = await client.head()
        assert head.status_code == 200
        assert header_values(head, b"content-type") == [b"text/event-stream"]
        assert header_values(head, b"cache-control") == [b"no-cache"]
        assert header_values(head, b"x-generation-id") == [b"gen-stream-1"]
        assert header_values(head, b"transfer-encoding") == [b"chunked"]
        assert header_values(head, b"content-length") == []
        assert await client.body() == SSE
        assert bytes(client.raw).endswith(LAST_CHUNK)
    assert len(fake.requests) == 1


# --- 2. latency: each piece reaches the client before the next is produced -----------------


async def test_each_chunk_reaches_client_before_next_is_produced(
    proxy: App, fake: FakeOpenRouter
) -> None:
    head_seen = asyncio.Event()
    received = [asyncio.Event() for _ in SSE_EVENTS]
    produced: list[int] = []

    async def script(req: Recorded, resp: Responder) -> None:
        await resp.head(200, SSE_HEADERS)
        if not await gate(head_seen):
            resp.abort()
            return
        for k, event in enumerate(SSE_EVENTS):
            produced.append(k)
            await resp.data(event)
            if not await gate(received[k]):  # a buffering proxy stops the stream here
                resp.abort()
                return
        await resp.end()

    fake.script = script
    async with connected(proxy.port) as client:
        await client.request()
        head = await client.head(timeout=5)  # the head alone, before any body byte exists
        assert head.status_code == 200
        assert produced == []
        head_seen.set()
        for k, event in enumerate(SSE_EVENTS):
            assert await client.read_exactly(len(event), timeout=5) == event
            assert produced == list(range(k + 1))
            received[k].set()
        assert await client.data() is None  # a proper end after the last piece


# --- 3. framing ----------------------------------------------------------------------------

UPSTREAM_DATE = b"Mon, 01 Jan 2024 00:00:00 GMT"
BODY = bytes(range(256)) * 800  # 200 KiB, several reads on every hop


def framing_headers(head: h11.Response) -> tuple[list[bytes], list[bytes]]:
    return header_values(head, b"content-length"), header_values(head, b"transfer-encoding")


async def upstream_framed(framing: str, resp: Responder) -> None:
    base = [(b"Content-Type", b"application/octet-stream"), (b"Date", UPSTREAM_DATE),
            (b"Server", b"cloudflare")]
    if framing == "content-length":
        await resp.head(200, [*base, (b"Content-Length", str(len(BODY)).encode())])
        for i in range(0, len(BODY), 50_000):
            await resp.data(BODY[i:i + 50_000])
        await resp.end()
    elif framing == "chunked":
        await resp.head(200, base)  # h11 chunks a 1.1 response without a length
        for i in range(0, len(BODY), 50_000):
            await resp.data(BODY[i:i + 50_000])
        await resp.end()
    else:
        status = b"HTTP/1.0 200 OK\r\n" if framing == "close-http10" else (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n")
        await resp.raw(status + b"".join(n + b": " + v + b"\r\n" for n, v in base) + b"\r\n")
        await resp.raw(BODY[:100_000])
        await resp.raw(BODY[100_000:])
        await close_gracefully(resp)  # the end of the body is the end of the connection


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close-http10",
                                     "close-http11"])
async def test_upstream_framings_reach_client_with_one_framing(
    proxy: App, fake: FakeOpenRouter, framing: str
) -> None:
    async def first(req: Recorded, resp: Responder) -> None:
        await upstream_framed(framing, resp)

    fake.script = then_completions(fake, first)
    async with connected(proxy.port) as client:
        await client.request()
        head = await client.head()
        assert head.status_code == 200
        cl, te = framing_headers(head)
        assert len(cl) + len(te) == 1, head.headers
        if framing == "content-length":
            assert cl == [str(len(BODY)).encode()]
        else:  # chunked stays chunked; close-delimited is re-framed chunked for a 1.1 client
            assert te == [b"chunked"]
        assert header_values(head, b"date") == [UPSTREAM_DATE]
        assert header_values(head, b"server") == [b"cloudflare"]
        assert await client.body() == BODY
        if te:
            assert bytes(client.raw).endswith(LAST_CHUNK)
        # the client connection stays usable whatever the upstream framing was
        await completion_works(client)


async def test_local_date_and_server_added_once(proxy: App, fake: FakeOpenRouter) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        await resp.head(200, SSE_HEADERS)  # no Date, no Server from the upstream
        await resp.data(SSE)
        await resp.end()

    fake.script = script
    async with connected(proxy.port) as client:
        await client.request()
        head = await client.head()
        assert len(header_values(head, b"date")) == 1
        assert header_values(head, b"server") == [b"orproxy"]
        assert await client.body() == SSE


async def test_upstream_with_both_length_and_chunked_gets_one_framing(
    proxy: App, fake: FakeOpenRouter
) -> None:
    async def first(req: Recorded, resp: Responder) -> None:
        await resp.raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                       b"Content-Length: 999\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"d\r\ndata: hello\n\n\r\n0\r\n\r\n")
        await close_gracefully(resp)

    fake.script = then_completions(fake, first)
    async with connected(proxy.port) as client:
        await client.request()
        head = await client.head()
        assert head.status_code == 200
        cl, te = framing_headers(head)
        assert len(cl) + len(te) == 1, head.headers
        assert cl in ([], [b"13"])  # never the upstream's false 999
        assert await client.body() == b"data: hello\n\n"
    await ok_after(proxy.port)


# --- 4. backpressure -----------------------------------------------------------------------

BLOCK = 64 * 1024
BLOCKS = 1024  # 64 MiB


def block(i: int) -> bytes:
    return i.to_bytes(4, "big") * (BLOCK // 4)


def slow_reader(port: int) -> AbstractAsyncContextManager[RawClient]:
    """A client with small buffers, keeping no raw bytes: it takes what the proxy sends only
    as fast as the test reads."""
    return connected(port, rcvbuf=16 * 1024, keep_raw=False, limit=16 * 1024)


async def settled(value: Callable[[], int], quiet: float = 0.5, timeout: float = 15.0) -> int:
    """The value of a growing counter once it has not moved for ``quiet`` seconds."""
    last, since = -1, time.monotonic()
    async with asyncio.timeout(timeout):
        while True:
            now, current = time.monotonic(), int(value())
            if current != last:
                last, since = current, now
            elif now - since >= quiet:
                return current
            await asyncio.sleep(0.05)


async def test_slow_reader_blocks_upstream_and_bounds_memory(
    proxy: App, fake: FakeOpenRouter
) -> None:
    written = [0]
    expected = hashlib.sha256()
    for i in range(BLOCKS):
        expected.update(block(i))

    async def script(req: Recorded, resp: Responder) -> None:
        await resp.head(200, [(b"Content-Type", b"application/octet-stream")])
        for i in range(BLOCKS):
            await resp.data(block(i))  # returns once the transport took it (drain)
            written[0] += BLOCK
        await resp.end()

    fake.script = script
    process = psutil.Process()
    rss_before = process.memory_info().rss
    async with slow_reader(proxy.port) as client:
        await client.request()
        # the client reads nothing: the upstream must come to a stop far below 64 MiB
        stuck = await settled(lambda: written[0])
        # (what is written sits in kernel socket buffers: ~13 MiB on loopback here)
        assert stuck < 32 * MIB, f"upstream wrote {stuck / MIB:.1f} MiB into a stalled client"
        await asyncio.sleep(0.3)
        assert written[0] == stuck
        growth = process.memory_info().rss - rss_before
        assert growth < 24 * MIB, f"RSS grew by {growth / MIB:.1f} MiB"

        # now read it all: every byte, in order, and a proper end
        head = await client.head()
        assert head.status_code == 200
        got, size = hashlib.sha256(), 0
        async with asyncio.timeout(40):
            while (piece := await client.data(timeout=10)) is not None:
                got.update(piece)
                size += len(piece)
        assert size == BLOCK * BLOCKS
        assert got.hexdigest() == expected.hexdigest()
        assert written[0] == BLOCK * BLOCKS


async def stream_blocks(resp: Responder, written: list[int]) -> None:
    await resp.head(200, [(b"Content-Type", b"application/octet-stream")])
    for i in range(BLOCKS):
        await resp.data(block(i))
        written[0] += BLOCK
    await resp.end()


async def test_close_delimited_body_survives_stalled_client(
    proxy: App, fake: FakeOpenRouter
) -> None:
    """The upstream's end-of-body (its close) arrives while the proxy has paused reading
    for a stalled client: it must still be seen once the client catches up."""
    size = 8 * MIB
    finished = asyncio.Event()

    async def script(req: Recorded, resp: Responder) -> None:
        await resp.raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                       b"Connection: close\r\n\r\n")
        for i in range(size // BLOCK):
            await resp.raw(block(i))
        resp.writer.close()
        finished.set()
        await close_gracefully(resp)

    fake.script = script
    async with slow_reader(proxy.port) as client:
        await client.request()
        await asyncio.wait_for(finished.wait(), 10)  # fits in the socket buffers on the way
        head = await client.head()
        assert head.status_code == 200
        assert header_values(head, b"transfer-encoding") == [b"chunked"]
        got, total = hashlib.sha256(), 0
        async with asyncio.timeout(20):
            while (piece := await client.data(timeout=10)) is not None:
                got.update(piece)
                total += len(piece)
        assert total == size
        assert got.hexdigest() == hashlib.sha256(
            b"".join(block(i) for i in range(size // BLOCK))).hexdigest()


async def test_client_abort_while_backpressured_closes_upstream(
    proxy: App, fake: FakeOpenRouter
) -> None:
    written = [0]

    async def script(req: Recorded, resp: Responder) -> None:
        await stream_blocks(resp, written)

    fake.script = script
    async with slow_reader(proxy.port) as client:
        await client.request()
        stuck = await settled(lambda: written[0], quiet=0.3)
        assert 0 < stuck < BLOCK * BLOCKS
        client.close()  # the proxy is waiting for the client to drain
        await fake.wait_closed(1, timeout=2.0)
    assert written[0] < BLOCK * BLOCKS


def proxy_side_sockets(proxy_port: int, client_port: int) -> list[str]:
    """The proxy's own sockets for one client connection, as the OS lists them."""
    return [c.status for c in psutil.Process().net_connections(kind="tcp")
            if c.laddr and c.laddr.port == proxy_port
            and c.raddr and c.raddr.port == client_port]


async def test_client_that_never_reads_is_dropped_after_write_timeout(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    """client_write_seconds bounds how long a stalled reader can hold the proxy: after it,
    the upstream is closed and the proxy lets go of the client socket, rather than keeping
    it (and its unsent bytes) open until the client reads again, which may be never."""
    app = await make_proxy(timeouts={"client_write_seconds": 0.5})
    written = [0]

    async def script(req: Recorded, resp: Responder) -> None:
        await stream_blocks(resp, written)

    fake.script = script
    async with slow_reader(app.port) as client:
        client_port = client.writer.get_extra_info("sockname")[1]
        assert proxy_side_sockets(app.port, client_port) == ["ESTABLISHED"]
        await client.request()
        await fake.wait_closed(1, timeout=3.0)  # the generation is cancelled upstream
        assert written[0] < BLOCK * BLOCKS
        await eventually(lambda: not proxy_side_sockets(app.port, client_port), timeout=2.0)


# --- 5. client aborts ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["reset", "fin"])
async def test_client_abort_mid_stream_closes_upstream(
    proxy: App, fake: FakeOpenRouter, how: str
) -> None:
    async def first(req: Recorded, resp: Responder) -> None:
        await resp.head(200, SSE_HEADERS)
        await resp.data(SSE_EVENTS[0])
        await resp.data(SSE_EVENTS[2])
        await hold(resp)  # a model still generating

    fake.script = then_completions(fake, first)
    async with connected(proxy.port) as client:
        await client.request()
        assert (await client.head()).status_code == 200
        first = SSE_EVENTS[0] + SSE_EVENTS[2]
        assert await client.read_exactly(len(first)) == first
        assert fake.closed == 0
        if how == "reset":
            client.close()
        else:
            client.writer.close()
        await fake.wait_closed(1, timeout=2.0)
    await ok_after(proxy.port)
    assert len(fake.requests) == 2  # the aborted request was not retried
    assert fake.requests[1].conn_id == 2


async def test_client_gone_before_upstream_answers_closes_upstream(
    proxy: App, fake: FakeOpenRouter
) -> None:
    async def first(req: Recorded, resp: Responder) -> None:
        await hold(resp)  # no head yet: the model is thinking

    fake.script = then_completions(fake, first)
    async with connected(proxy.port) as client:
        await client.request()
        await eventually(lambda: len(fake.requests) == 1)
        client.close()
        await fake.wait_closed(1, timeout=2.0)
    await ok_after(proxy.port)
    assert len(fake.requests) == 2


# --- 6. upstream resets --------------------------------------------------------------------


async def test_upstream_reset_mid_stream_cuts_client_without_final_chunk(
    proxy: App, fake: FakeOpenRouter
) -> None:
    sent = SSE_EVENTS[0] + SSE_EVENTS[2] + SSE_EVENTS[3]
    client_has_them = asyncio.Event()

    async def first(req: Recorded, resp: Responder) -> None:
        await resp.head(200, SSE_HEADERS)
        for k in (0, 2, 3):
            await resp.data(SSE_EVENTS[k])
        await gate(client_has_them)
        resp.abort()

    fake.script = then_completions(fake, first)
    async with connected(proxy.port) as client:
        await client.request()
        head = await client.head()
        assert head.status_code == 200
        assert header_values(head, b"transfer-encoding") == [b"chunked"]
        assert await client.read_exactly(len(sent)) == sent
        client_has_them.set()
        assert await client.truncated_body(timeout=3.0) == b""
        no_final_chunk(client)
    await ok_after(proxy.port)


async def test_upstream_content_length_cut_short_cuts_client(
    proxy: App, fake: FakeOpenRouter
) -> None:
    client_has_it = asyncio.Event()
    part = b"x" * 300

    async def first(req: Recorded, resp: Responder) -> None:
        await resp.head(200, [(b"Content-Type", b"application/json"),
                              (b"Content-Length", b"1000")])
        await resp.data(part)
        await gate(client_has_it)
        resp.abort()

    fake.script = then_completions(fake, first)
    async with connected(proxy.port) as client:
        await client.request()
        head = await client.head()
        assert header_values(head, b"content-length") == [b"1000"]
        assert header_values(head, b"transfer-encoding") == []
        assert await client.read_exactly(len(part)) == part
        client_has_it.set()
        assert await client.truncated_body(timeout=3.0) == b""
        assert client.eof
    await ok_after(proxy.port)


# --- 7. upstream timeouts ------------------------------------------------------------------


async def test_upstream_idle_timeout_mid_body_cuts_client(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    app = await make_proxy(timeouts={"upstream_idle_seconds": 0.5})

    async def first(req: Recorded, resp: Responder) -> None:
        await resp.head(200, SSE_HEADERS)
        await resp.data(SSE_EVENTS[2])
        await hold(resp)  # stalls, connection open

    fake.script = then_completions(fake, first)
    async with connected(app.port) as client:
        await client.request()
        assert (await client.head()).status_code == 200
        assert await client.read_exactly(len(SSE_EVENTS[2])) == SSE_EVENTS[2]
        assert await client.truncated_body(timeout=3.0) == b""
        no_final_chunk(client)
        await fake.wait_closed(1, timeout=2.0)
    await ok_after(app.port)


async def test_upstream_first_byte_timeout_gives_504(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    app = await make_proxy(timeouts={"upstream_first_byte_seconds": 0.5},
                           retry={"max_attempts": 1})

    async def first(req: Recorded, resp: Responder) -> None:
        await hold(resp)  # never answers

    fake.script = then_completions(fake, first)
    async with connected(app.port) as client:
        await client.request()
        head = await client.head(timeout=3.0)
        assert head.status_code == 504
        assert header_values(head, b"content-type") == [b"application/json"]
        doc = json.loads(await client.body())
        assert set(doc) == {"error"}
        assert doc["error"]["code"] == 504
        assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
        await fake.wait_closed(1, timeout=2.0)
    assert len(fake.requests) == 1
    await ok_after(app.port)


# --- 8. graceful shutdown ------------------------------------------------------------------


async def test_shutdown_lets_running_stream_finish(
    proxy: App, fake: FakeOpenRouter
) -> None:
    release = asyncio.Event()

    async def script(req: Recorded, resp: Responder) -> None:
        if not req.json().get("stream"):
            await resp.json(200, completion())
            return
        await resp.head(200, SSE_HEADERS)
        await resp.data(SSE_EVENTS[0] + SSE_EVENTS[2])
        if not await gate(release):
            resp.abort()
            return
        for event in SSE_EVENTS[3:]:
            await resp.data(event)
        await resp.end()

    fake.script = script
    port = proxy.port
    idle = await RawClient.connect(port)
    client = await RawClient.connect(port)
    try:
        # an idle keep-alive connection: one complete exchange, then nothing
        await idle.request(b'{"model":"m"}')
        assert (await idle.head()).status_code == 200
        assert json.loads(await idle.body())["usage"]["total_tokens"] == 7

        await client.request()
        assert (await client.head()).status_code == 200
        first = SSE_EVENTS[0] + SSE_EVENTS[2]
        assert await client.read_exactly(len(first)) == first

        shutdown = asyncio.create_task(proxy.shutdown())
        await asyncio.sleep(0.05)
        assert await refused(port)
        assert await idle.wait_eof(timeout=2.0) == b""  # closed, nothing sent
        assert not shutdown.done()  # still waiting for the stream

        release.set()
        assert await client.body() == b"".join(SSE_EVENTS[3:])
        assert bytes(client.raw).endswith(LAST_CHUNK)
        await client.wait_eof(timeout=2.0)  # the connection closes after the response
        await asyncio.wait_for(shutdown, 3.0)
    finally:
        idle.close()
        client.close()


async def test_shutdown_while_waiting_for_upstream_head_finishes_with_close(
    proxy: App, fake: FakeOpenRouter
) -> None:
    """Draining begins while the upstream is still thinking: the response comes through
    whole, and since its head is made after the drain began it announces the close."""
    release = asyncio.Event()

    async def script(req: Recorded, resp: Responder) -> None:
        if not await gate(release):
            resp.abort()
            return
        await resp.head(200, SSE_HEADERS)
        await resp.data(SSE)
        await resp.end()

    fake.script = script
    async with connected(proxy.port) as client:
        await client.request()
        await eventually(lambda: len(fake.requests) == 1)
        shutdown = asyncio.create_task(proxy.shutdown())
        await asyncio.sleep(0.05)
        assert not shutdown.done()
        release.set()
        head = await client.head()
        assert head.status_code == 200
        assert await client.body() == SSE
        assert await client.wait_eof(timeout=2.0) == b""
        await asyncio.wait_for(shutdown, 3.0)
        assert header_values(head, b"connection") == [b"close"]


async def test_shutdown_grace_cuts_stream_that_does_not_finish(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    app = await make_proxy(timeouts={"shutdown_grace_seconds": 0.5})

    async def script(req: Recorded, resp: Responder) -> None:
        await resp.head(200, SSE_HEADERS)
        await resp.data(SSE_EVENTS[2])
        await hold(resp)

    fake.script = script
    async with connected(app.port) as client:
        await client.request()
        assert (await client.head()).status_code == 200
        assert await client.read_exactly(len(SSE_EVENTS[2])) == SSE_EVENTS[2]
        t0 = time.monotonic()
        await asyncio.wait_for(app.shutdown(), 3.0)
        elapsed = time.monotonic() - t0
        assert 0.4 <= elapsed < 3.0, elapsed
        assert await client.truncated_body(timeout=2.0) == b""
        no_final_chunk(client)
        await fake.wait_closed(1, timeout=2.0)


# --- 9. upstream keep-alive ----------------------------------------------------------------


async def test_sequential_requests_reuse_one_upstream_connection(
    proxy: App, fake: FakeOpenRouter
) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        await resp.head(200, SSE_HEADERS)
        for piece in odd_pieces(SSE):
            await resp.data(piece)
        await resp.end()

    fake.script = script
    async with connected(proxy.port) as client:
        for _ in range(2):
            await client.request()
            assert (await client.head()).status_code == 200
            assert await client.body() == SSE
    assert fake.opened == 1
    assert [r.conn_id for r in fake.requests] == [1, 1]


@pytest.mark.parametrize("cut", ["client_abort", "upstream_idle_timeout"])
async def test_response_cut_midway_is_not_pooled(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, cut: str
) -> None:
    app = await make_proxy(timeouts={"upstream_idle_seconds": 0.5})

    async def first(req: Recorded, resp: Responder) -> None:
        await resp.head(200, SSE_HEADERS)
        await resp.data(SSE_EVENTS[2])
        await hold(resp)  # the upstream itself would happily keep the connection

    fake.script = then_completions(fake, first)
    async with connected(app.port) as client:
        await client.request()
        assert (await client.head()).status_code == 200
        assert await client.read_exactly(len(SSE_EVENTS[2])) == SSE_EVENTS[2]
        if cut == "client_abort":
            client.close()
        else:
            await client.truncated_body(timeout=3.0)
        await fake.wait_closed(1, timeout=2.0)
    await ok_after(app.port)
    assert fake.opened == 2
    assert [r.conn_id for r in fake.requests] == [1, 2]


async def test_upstream_connection_close_is_not_pooled_nor_forwarded(
    proxy: App, fake: FakeOpenRouter
) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        headers = [(b"Connection", b"close")] if len(fake.requests) == 1 else []
        await resp.head(200, [*SSE_HEADERS, *headers])
        await resp.data(SSE)
        await resp.end()

    fake.script = script
    async with connected(proxy.port) as client:
        for _ in range(2):
            await client.request()
            head = await client.head()
            assert head.status_code == 200
            assert header_values(head, b"connection") == []  # hop-by-hop: ours to decide
            assert await client.body() == SSE
    assert [r.conn_id for r in fake.requests] == [1, 2]


async def test_pooled_connection_closed_by_upstream_while_idle_is_replaced(
    proxy: App, fake: FakeOpenRouter
) -> None:
    writers: list[Responder] = []

    async def script(req: Recorded, resp: Responder) -> None:
        writers.append(resp)
        await resp.json(200, completion())

    fake.script = script
    async with connected(proxy.port) as client:
        await client.request(b'{"model":"m"}')
        assert (await client.head()).status_code == 200
        await client.body()
        writers[0].writer.transport.abort()  # the upstream's idle timeout fires
        await fake.wait_closed(1)
        await client.request(b'{"model":"m"}')
        assert (await client.head()).status_code == 200
        assert json.loads(await client.body())["usage"]["total_tokens"] == 7
    assert fake.opened == 2
    assert [r.conn_id for r in fake.requests] == [1, 2]


async def test_pooled_connection_dropped_on_reuse_is_retried_on_fresh(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    app = await make_proxy(retry={"max_attempts": 1})  # the fresh retry is not an attempt

    async def script(req: Recorded, resp: Responder) -> None:
        if len(fake.requests) == 2:
            resp.abort()  # closed just as the pooled connection was reused
            return
        await resp.json(200, completion())

    fake.script = script
    async with connected(app.port) as client:
        for _ in range(2):
            await client.request(b'{"model":"m"}')
            assert (await client.head()).status_code == 200
            assert json.loads(await client.body())["usage"]["total_tokens"] == 7
    assert [r.conn_id for r in fake.requests] == [1, 1, 2]
    assert fake.opened == 2
