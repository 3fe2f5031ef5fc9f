"""Tests that protect single lines: each fails if its line is deleted or weakened.

Each of these lines once could be deleted with the whole suite staying green:
- Stream pausing its reads at READ_HIGH_WATER unread bytes;
- the lingering close after an error answer with ``Connection: close``;
- time paused for a slow client not counting as upstream silence;
- the pool's idle age limit and its pruning of expired idle connections;
- the attempt loop discarding a connection whose error body was too large to read whole;
- the keep-alive wait between requests being ``keepalive_seconds``.
Socket-free where the line is (FakeTransport, virtual clock); the lingering close is about
what the kernel does, so that one runs on loopback against the real proxy.

The second half holds unit tests of the pure policy modules (chunks, auth, routing,
validate, headers, keys, classify) for the edges mutation testing found unguarded: each
kills mutants that survived the rest of the suite.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orproxy.config import LimitsConfig, TimeoutsConfig
from orproxy.errors import ClientRequestError, UpstreamError
from orproxy.headers import (
    client_response_headers,
    local_response_headers,
    only_decodable_codings,
)
from orproxy.http.auth import basic_password, check_access
from orproxy.http.chunks import MAX_LINE_BYTES, MAX_SIZE_DIGITS, ChunkedGuard
from orproxy.http.client_conn import ClientConnection
from orproxy.http.routing import Route, RouteKind, has_dot_segment, route
from orproxy.http.validate import BodyFraming, check_request_head
from orproxy.keys import (
    DISABLED_RECHECK_SECONDS,
    Change,
    KeyEvent,
    KeyPool,
    KeyState,
    KeyStats,
    SavedKey,
)
from orproxy.proxy.attempts import READ_AHEAD_BYTES
from orproxy.proxy.record import Attempt
from orproxy.stream import READ_HIGH_WATER
from orproxy.upstream.classify import MAX_SECONDS, Outcome, classify
from orproxy.upstream.connection import UpstreamConnection
from orproxy.upstream.pool import IDLE_EXPIRY_SECONDS, PRUNE_INTERVAL_SECONDS, UpstreamPool
from tests.conftest import ProxyFactory
from tests.fakeor import FakeOpenRouter
from tests.memstream import (
    FakeClock,
    ScriptedDial,
    json_response,
    make_stream,
    response,
    settle,
    virtual_time_loop,
)
from tests.rawhttp import RawClient, Truncated
from tests.test_attempts import IDS, OK, A, B, request, take, world

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"loop_factory": virtual_time_loop})


REAL_LOOP = pytest.mark.parametrize("anyio_backend", ["asyncio"])


# --- Stream: reading pauses at READ_HIGH_WATER unread ------------------------------------------


async def test_a_stream_stops_reading_at_256_kib_unread_and_resumes_once_read() -> None:
    assert READ_HIGH_WATER == 256 * 1024
    stream, t = make_stream()
    t.feed(b"a" * (READ_HIGH_WATER - 1))
    await settle()
    assert t.is_reading() and t.pause_calls == 0
    t.feed(b"b", b"c" * 1000)
    await settle()
    assert not t.is_reading() and t.pause_calls == 1  # a fast sender cannot grow our buffer
    assert t.pending_inbound == 1000  # the kernel keeps it (TCP pushes back)
    assert await stream.read(1.0) == b"a" * (READ_HIGH_WATER - 1) + b"b"
    assert t.is_reading() and t.resume_calls == 1
    assert await stream.read(1.0) == b"c" * 1000


# --- the lingering close after an error answer --------------------------------------------------


@REAL_LOOP
async def test_a_client_still_sending_its_body_can_read_the_401(make_proxy: ProxyFactory,
                                                                fake: FakeOpenRouter) -> None:
    """The proxy answers 401 without reading the body and closes. Closing with unread
    input makes the kernel send RST, which destroys the answer before a client that is
    still writing reads it; the lingering close (FIN, then drain) lets it through."""
    app = await make_proxy()
    client = await RawClient.connect(app.port)
    size = 8 * 1024 * 1024
    try:
        await client.send(b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: p\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size)
        piece = b"x" * (64 * 1024)
        for _ in range(size // len(piece)):  # the whole body, then read the answer
            await client.send(piece)
        answer = await client.response(b"POST")
    except (ConnectionError, Truncated) as exc:  # a write, or the read, met the reset
        pytest.fail(f"the answer was lost: the proxy reset the connection ({exc!r})")
    finally:
        client.close()
    assert answer.status == 401
    assert answer.header(b"connection") == b"close"
    assert json.loads(answer.body)["error"]["code"] == 401
    assert fake.requests == []


# --- upstream silence does not count while we paused it for a slow client -----------------------


class Collector:
    def __init__(self) -> None:
        self.data = bytearray()
        self.ended = False
        self.error: UpstreamError | None = None

    def on_body(self, data: bytes, end: bool) -> None:
        self.data += data
        self.ended = end

    def on_body_error(self, exc: UpstreamError) -> None:
        self.error = exc


async def test_time_paused_for_a_slow_client_is_not_upstream_silence() -> None:
    stream, t = make_stream()
    conn = UpstreamConnection(stream)
    await conn.send_request(b"GET", b"/x", [(b"Host", b"up")], [], 10.0)
    t.feed(b"HTTP/1.1 200 \r\nContent-Length: 6\r\n\r\nabc")
    await conn.receive_head(10.0)
    consumer = Collector()
    conn.read_body(consumer, 30.0)
    conn.pause()  # the client cannot take more
    await asyncio.sleep(300.0)  # ten idle timeouts
    assert consumer.error is None
    conn.resume()
    t.feed(b"def")
    await settle()
    assert (bytes(consumer.data), consumer.ended, consumer.error) == (b"abcdef", True, None)


# --- the pool's idle age limit and pruning -------------------------------------------------------


async def cycle(conn: UpstreamConnection) -> None:
    """One whole request/response on ``conn``, so that it may go back to the pool."""
    await conn.send_request(b"GET", b"/x", [(b"Host", b"up")], [], 10.0)
    assert (await conn.receive_head(10.0)).status_code == 200
    consumer = Collector()
    conn.read_body(consumer, 10.0)
    await settle()
    assert consumer.ended


def ok_pool() -> tuple[UpstreamPool, ScriptedDial, FakeClock]:
    clock = FakeClock()
    dial = ScriptedDial(lambda _received: [response(200, b"ok")])
    return UpstreamPool(dial, max_idle=4, clock=clock), dial, clock


async def test_an_idle_connection_older_than_the_expiry_is_not_reused() -> None:
    pool, dial, clock = ok_pool()
    first = await pool.acquire()
    await cycle(first)
    pool.release(first)
    clock.advance(IDLE_EXPIRY_SECONDS)  # just at the limit: still trusted
    again = await pool.acquire()
    assert again is first and again.reused
    await cycle(again)
    pool.release(again)
    clock.advance(IDLE_EXPIRY_SECONDS + 0.5)  # too old: the upstream may close it any moment
    fresh = await pool.acquire()
    assert fresh is not first and not fresh.reused
    assert dial.peers[0].transport.aborted and dial.dials == 2
    pool.discard(fresh)


async def test_expired_idle_connections_are_closed_without_waiting_for_an_acquire() -> None:
    pool, dial, clock = ok_pool()
    old, new = await pool.acquire(), await pool.acquire()
    await cycle(old)
    await cycle(new)
    pool.release(old)
    clock.advance(IDLE_EXPIRY_SECONDS + PRUNE_INTERVAL_SECONDS)
    pool.release(new)  # any release prunes (at most once a second)
    assert dial.peers[0].transport.aborted  # the old one closed: no socket kept for nothing
    assert not dial.peers[1].transport.is_closing()
    assert pool.snapshot().idle == 1


# --- an error body too large to read whole: its connection is closed -----------------------------


async def test_a_connection_left_with_an_unread_error_body_is_closed() -> None:
    big = json_response(429, {"error": {"code": 429, "message": "Rate limit exceeded",
                                        "metadata": {"pad": "p" * (2 * READ_HIGH_WATER)}}})
    pieces = [big[i:i + 16384] for i in range(0, len(big), 16384)]  # as a socket gives it
    assert len(big) > READ_AHEAD_BYTES
    w = world({A: [pieces], B: [[OK]]})
    trace: list[Attempt] = []
    delivery = await w.loop.run(request(), trace)
    assert [(a.key_id, a.outcome) for a in trace] == [(IDS[A], "key_limited"),
                                                       (IDS[B], "ok")]
    assert w.dial.dials == 2  # the first connection still held the rest of the 429
    await take(w, delivery)
    assert w.dial.peers[0].transport.aborted  # closed, not left open and forgotten
    assert w.pool.snapshot().active == 0 and w.pool.snapshot().idle == 1


# --- keep-alive: the wait between requests is keepalive_seconds ----------------------------------


@pytest.mark.parametrize(("head", "keepalive"), [(5.0, 50.0), (50.0, 5.0)])
async def test_between_requests_the_wait_is_keepalive_seconds(head: float,
                                                              keepalive: float) -> None:
    loop = asyncio.get_running_loop()
    stream, t = make_stream()
    client = ClientConnection(stream, LimitsConfig(),
                              TimeoutsConfig(client_head_seconds=head, keepalive_seconds=keepalive))
    start = loop.time()
    t.feed(b"GET /health HTTP/1.1\r\nHost: p\r\n\r\n")
    assert await client.next_request() is not None
    assert client.end_if_bodiless(BodyFraming(None, False))
    client.send(h11.Response(status_code=200, headers=[(b"Content-Length", b"0")]),
                h11.EndOfMessage())
    assert client.next_cycle()
    start = loop.time()
    assert await client.next_request() is None  # idle: closed quietly, no 408
    assert loop.time() - start == pytest.approx(keepalive, abs=0.01)


async def test_a_client_idle_longer_than_the_head_timeout_is_still_served() -> None:
    stream, t = make_stream()
    client = ClientConnection(stream, LimitsConfig(),
                              TimeoutsConfig(client_head_seconds=5.0, keepalive_seconds=50.0))
    t.feed(b"GET /a HTTP/1.1\r\nHost: p\r\n\r\n")
    assert await client.next_request() is not None
    client.end_if_bodiless(BodyFraming(None, False))
    client.send(h11.Response(status_code=204, headers=[]), h11.EndOfMessage())
    assert client.next_cycle()
    second = asyncio.ensure_future(client.next_request())
    await asyncio.sleep(20.0)  # four head timeouts, well within keep-alive
    t.feed(b"GET /b HTTP/1.1\r\nHost: p\r\n\r\n")
    request = await second
    assert request is not None and request.target == b"/b"


async def test_the_first_request_head_waits_client_head_seconds() -> None:
    loop = asyncio.get_running_loop()
    stream, _ = make_stream()
    client = ClientConnection(stream, LimitsConfig(),
                              TimeoutsConfig(client_head_seconds=5.0, keepalive_seconds=50.0))
    start = loop.time()
    assert await client.next_request() is None
    assert loop.time() - start == pytest.approx(5.0, abs=0.01)



# === pure policy: edges that mutation testing found unguarded =====================================
#
# Each test below kills mutants of the pure modules (mutmut 3, see the report): a boundary, a
# default, a field that no other test looked at.

# --- ChunkedGuard (orproxy/http/chunks.py) ------------------------------------------------------


def chunked(pieces: list[bytes], *, ext: bytes = b"", trailers: list[bytes] | None = None,
            ) -> bytes:
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces if p)
    return out + b"0\r\n" + b"".join(t + b"\r\n" for t in trailers or []) + b"\r\n"


def guard_feed(guard: ChunkedGuard, data: bytes, cuts: list[int]) -> None:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    for a, b in zip([0, *points], [*points, len(data)], strict=True):
        guard.feed(data[a:b])


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.binary(min_size=1, max_size=40), max_size=6),
       ext=st.sampled_from([b"", b";a=1", b";name=\"v\""]),
       trailers=st.lists(st.sampled_from([b"X-T: 1", b"Y: two words"]), max_size=2),
       cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=20),
       after=st.binary(max_size=20))
def test_a_valid_chunked_body_passes_the_guard_however_split(
        pieces: list[bytes], ext: bytes, trailers: list[bytes], cuts: list[int],
        after: bytes) -> None:
    body = chunked(pieces, ext=ext, trailers=trailers)
    limit = sum(map(len, pieces))
    guard = ChunkedGuard(limit)  # exactly the body's size: at the limit is allowed
    guard_feed(guard, body[:-1], cuts)
    assert not guard.done  # one byte short of the last CRLF
    guard.feed(body[-1:] + after)  # what follows is the next request: not the guard's
    assert guard.done


def test_data_that_looks_like_framing_is_skipped_by_count() -> None:
    guard = ChunkedGuard(100)
    guard.feed(b"a\r\n" + b"\n\n0\r\n\r\nzz\n" + b"\r\n")  # 10 data bytes full of LFs
    assert not guard.done
    guard.feed(b"0\r\n\r\n")
    assert guard.done


@pytest.mark.parametrize("data", [
    b"1" * (MAX_SIZE_DIGITS + 1),  # refused before its line ends
    b"0" * (MAX_SIZE_DIGITS + 1) + b"5\r\n",
])
def test_a_chunk_size_of_more_than_16_digits_is_refused_at_once(data: bytes) -> None:
    with pytest.raises(ClientRequestError) as info:
        ChunkedGuard(10**30).feed(data)
    assert (info.value.status, info.value.message) == (400, "bad chunked framing "
                                                            "(chunk size too long)")


def test_a_chunk_size_of_16_digits_is_allowed() -> None:
    guard = ChunkedGuard(100)
    guard.feed(b"0" * (MAX_SIZE_DIGITS - 1) + b"5\r\nhello\r\n0\r\n\r\n")
    assert guard.done


@pytest.mark.parametrize(("limit", "data"), [
    (100, b"65"),  # 101 bytes: refused as its digits arrive, before the line ends
    (100, b"64\r\n" + b"x" * 100 + b"\r\n1\r\n"),  # 100 used, one more is too many
    (10, b"5\r\nhello\r\n6\r\n"),  # the limit counts every chunk
])
def test_a_chunk_beyond_what_is_left_of_the_limit_is_refused_with_413(limit: int,
                                                                       data: bytes) -> None:
    with pytest.raises(ClientRequestError) as info:
        ChunkedGuard(limit).feed(data)
    assert (info.value.status, info.value.message) == (413, "request body too large")


@pytest.mark.parametrize(("line", "status"), [
    (b"1" * (MAX_SIZE_DIGITS + 1), 400),
    (b"65", 413),  # 0x65 = 101 > the 99 left
])
def test_a_later_chunk_size_is_refused_as_early_as_the_first(line: bytes, status: int) -> None:
    guard = ChunkedGuard(100)
    guard.feed(b"1\r\nx\r\n")
    with pytest.raises(ClientRequestError) as info:
        guard.feed(line)  # no line end yet
    assert info.value.status == status


def test_chunks_exactly_filling_the_limit_are_allowed() -> None:
    guard = ChunkedGuard(11)
    guard.feed(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert guard.done


@pytest.mark.parametrize("data", [
    b"5\nhello\r\n0\r\n\r\n",  # a chunk-size line
    b"5\r\nhello\r\n0\n\r\n",  # the last chunk's line
    b"0\r\nX-T: 1\n\r\n",  # a trailer line
    b"0\r\n\n",  # the final empty line
])
def test_a_line_ended_by_a_bare_lf_is_refused(data: bytes) -> None:
    with pytest.raises(ClientRequestError) as info:
        ChunkedGuard(100).feed(data)
    assert (info.value.status, info.value.message) == (400, "bad chunked framing (bare LF)")


def test_a_line_longer_than_4096_bytes_is_refused_before_it_ends() -> None:
    fits = ChunkedGuard(100)  # 4096 bytes with its CR: allowed
    fits.feed(b"5;" + b"e" * (MAX_LINE_BYTES - 3) + b"\r\nhello\r\n0\r\n\r\n")
    assert fits.done
    guard = ChunkedGuard(100)
    guard.feed(b"5;" + b"e" * (MAX_LINE_BYTES - 2))  # 4096 so far, no end yet
    with pytest.raises(ClientRequestError) as info:
        guard.feed(b"\r")  # the CR counts
    assert (info.value.status, info.value.message) == (400, "bad chunked framing "
                                                            "(line too long)")


def test_a_long_trailer_line_is_refused_too() -> None:
    with pytest.raises(ClientRequestError):
        ChunkedGuard(100).feed(b"0\r\nX: " + b"v" * MAX_LINE_BYTES)


def test_a_size_line_that_is_not_hex_is_left_to_h11() -> None:
    guard = ChunkedGuard(100)
    guard.feed(b"zz\r\n")  # h11 refuses it; the guard neither raises nor moves on
    assert not guard.done
    guard.feed(b"0\r\n\r\n")
    assert guard.done


def test_the_guard_starts_at_a_size_line_with_an_empty_line_buffer() -> None:
    guard = ChunkedGuard(100)
    guard.feed(b"0\r\n")
    assert not guard.done
    guard.feed(b"\r\n")
    assert guard.done


# --- the access check (orproxy/http/auth.py) ------------------------------------------------------

ACCESS_KEY = b"local-access-key-0123"


def basic(user: bytes, password: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", b"Basic " + base64.b64encode(user + b":" + password))]


def test_basic_password_reads_a_single_well_formed_basic_header() -> None:
    assert basic_password(basic(b"anyone", ACCESS_KEY)) == ACCESS_KEY
    assert basic_password(basic(b"u", b"pa:ss")) == b"pa:ss"  # the first colon splits
    assert basic_password(basic(b"u", b"")) == b""
    lower = [(b"authorization", b"basic " + base64.b64encode(b"u:p"))]
    assert basic_password(lower) == b"p"


@pytest.mark.parametrize("headers", [
    [],
    [(b"Authorization", b"Bearer " + base64.b64encode(b"u:p"))],
    [(b"Authorization", b"Basic " + base64.b64encode(b"no colon"))],
    [(b"Authorization", b"Basic " + base64.b64encode(b"u:p") + b"!!")],  # not base64
    [(b"Authorization", b"Basic ")],
    basic(b"u", b"p") * 2,
])
def test_basic_password_refuses_anything_else(headers: list[tuple[bytes, bytes]]) -> None:
    assert basic_password(headers) is None


def test_basic_counts_only_where_allowed_and_bearer_always() -> None:
    bearer = [(b"Authorization", b"Bearer " + ACCESS_KEY)]
    assert check_access(bearer, ACCESS_KEY) and check_access(bearer, ACCESS_KEY, basic=True)
    assert not check_access(basic(b"u", ACCESS_KEY), ACCESS_KEY)  # not for the API
    assert check_access(basic(b"u", ACCESS_KEY), ACCESS_KEY, basic=True)  # the pages
    assert not check_access(basic(b"u", b"wrong"), ACCESS_KEY, basic=True)
    assert not check_access([], ACCESS_KEY, basic=True)
    assert not check_access([(b"Authorization", b"Bearer ")], b"", basic=True)


# --- routing (orproxy/http/routing.py) ----------------------------------------------------------


@pytest.mark.parametrize(("target", "expected"), [
    (b"http:///api/v1/models", Route(RouteKind.FORWARD, b"/models", public=True)),
    (b"http://h/api/v1//chat", Route(RouteKind.FORWARD, b"//chat")),
    (b"/api/v1/modelsX", Route(RouteKind.FORWARD, b"/modelsX")),  # not the public one
    (b"/healthX", Route(RouteKind.NOT_FOUND)),
    (b"/api/v1/..\\admin", Route(RouteKind.BAD_TARGET)),  # a backslash read as a slash
    (b"/api/v1/%2e%2e%5cadmin", Route(RouteKind.BAD_TARGET)),
    (b"/api/v1/x\\..\\..\\y", Route(RouteKind.BAD_TARGET)),
])
def test_route_edges(target: bytes, expected: Route) -> None:
    assert route(target, frozenset({b"/api/v1/models"})) == expected


def test_dot_segments_are_decoded_twice_as_documented_and_no_more() -> None:
    assert has_dot_segment(b"/a/%252e%252e/b")  # twice encoded: found
    assert not has_dot_segment(b"/a/%25252e%25252e/b")  # three times: left to the upstream
    assert not has_dot_segment(b"/a/%2525252e/b")


# --- request-head checks (orproxy/http/validate.py) ---------------------------------------------


def framing_of(headers: list[tuple[bytes, bytes]]) -> BodyFraming:
    return check_request_head(b"1.1", b"POST", b"/api/v1/x", headers, max_head_bytes=16384,
                              max_header_count=100, max_target_bytes=8192)


def test_the_framing_found_is_exact() -> None:
    assert framing_of([(b"host", b"a")]) == BodyFraming(None, False)
    assert framing_of([(b"host", b"a"), (b"content-length", b"5")]) == BodyFraming(5, False)
    assert framing_of([(b"host", b"a"), (b"transfer-encoding", b"chunked")]) == (
        BodyFraming(None, True))


# --- header rewriting (orproxy/headers.py) ------------------------------------------------------


def test_the_headers_we_add_are_cased_as_usual() -> None:
    out = client_response_headers([], request_id=b"r", close=False)
    assert [n for n, _ in out] == [b"Date", b"Server", b"X-Request-ID"]
    local = local_response_headers(b"application/json", b"r", close=True)
    assert [n for n, _ in local] == [b"Date", b"Server", b"Content-Type", b"Cache-Control",
                                     b"X-Request-ID", b"Connection"]


# --- the key pool (orproxy/keys.py) ------------------------------------------------------------

K1, K2, K3, K4 = ("sk-or-v1-protect-key-aaaaaaaaaa01", "sk-or-v1-protect-key-bbbbbbbbbb02",
                  "sk-or-v1-protect-key-cccccccccc03", "sk-or-v1-protect-key-dddddddddd04")


def pool_of(*secrets: str, accounts: dict[str, str] | None = None, **kwargs: Any,
            ) -> tuple[KeyPool, FakeClock, list[KeyEvent]]:
    clock = FakeClock(now=1000.0)
    pool = KeyPool([(s, (accounts or {}).get(s)) for s in secrets], clock=clock,
                   wall=lambda: 5_000_000.0, **kwargs)
    events: list[KeyEvent] = []
    pool.on_change = events.append
    return pool, clock, events


def test_a_free_model_rest_ends_exactly_at_its_time() -> None:
    pool, clock, _ = pool_of(K1)
    (key,) = pool
    pool.cool_down(key, 10, "429 free", free_only=True)
    assert key.state(clock.now) is KeyState.FREE_LIMITED
    assert key.rest_end(False) == 0.0 and key.rest_end(True) == clock.now + 10
    assert pool.acquire(free=False) is key and pool.acquire() is None  # free by default
    assert pool.soonest() == (10.0, "") and pool.soonest(free=False) == (0.0, "")
    clock.advance(10)
    assert key.state(clock.now) is KeyState.AVAILABLE


def test_a_shorter_free_model_rest_does_not_shorten_a_longer_one() -> None:
    pool, clock, events = pool_of(K1)
    (key,) = pool
    pool.cool_down(key, 100, "first", free_only=True)
    pool.cool_down(key, 50, "second", free_only=True)
    pool.cool_down(key, 100, "same end", free_only=True)
    assert key.free_until == clock.now + 100 and key.reason == "first"
    assert [e.reason for e in events] == ["first"]  # one rest, announced once


def test_a_rest_and_a_disable_are_announced_with_every_field() -> None:
    pool, _, events = pool_of(K1, K2, accounts={K1: "acct", K2: "acct"})
    k1, k2 = pool
    pool.cool_down(k1, 30, "429 x", account_wide=True, free_only=True, message="words")
    pool.disable(k2, "401 invalid key")
    assert k2.message == ""  # no words given: none kept
    pool.disable(k1, "403 key disabled", "Key disabled by its owner")
    assert events == [
        *(KeyEvent(Change.RESTED, k.id, k.masked, "acct", "429 x", "words", 30.0,
                   5_000_030.0, True, True) for k in (k1, k2)),  # the account: both
        KeyEvent(Change.DISABLED, k2.id, k2.masked, "acct", "401 invalid key", ""),
        KeyEvent(Change.DISABLED, k1.id, k1.masked, "acct", "403 key disabled",
                 "Key disabled by its owner"),
    ]


def test_a_rest_that_ends_is_announced_once_but_not_for_a_disabled_key() -> None:
    pool, clock, events = pool_of(K1, K2, K3, accounts={K2: "acct"})
    k1, k2, k3 = pool  # k1 never rests: the others come after it
    pool.cool_down(k2, 10, "r2")
    pool.cool_down(k3, 10, "r3", free_only=True)
    pool.disable(k3, "gone")
    clock.advance(5)
    pool.snapshot()
    assert [e.change for e in events] == [Change.RESTED, Change.RESTED, Change.DISABLED]
    clock.advance(5)
    pool.snapshot()
    pool.snapshot()
    assert events[3:] == [KeyEvent(Change.RETURNED, k2.id, k2.masked, "acct", "r2")]
    pool.cool_down(k1, 10, "r1", free_only=True)  # a free-model rest ends at its own end
    clock.advance(9)
    pool.acquire(free=False)
    assert len(events) == 5
    clock.advance(1)
    pool.acquire(free=False)
    assert events[5:] == [KeyEvent(Change.RETURNED, k1.id, k1.masked, None, "r1")]


def test_a_preferred_key_is_used_only_when_it_can_serve() -> None:
    pool, _, _ = pool_of(K1, K2, K3)
    k1, k2, k3 = pool
    assert pool.acquire(prefer=k3.id) is k3
    assert pool.acquire(prefer=k3.id, exclude=[k3]) is k1  # excluded: the usual pick
    pool.cool_down(k3, 10, "r", free_only=True)
    assert pool.acquire(prefer=k3.id) is k2  # resting for free models
    assert pool.acquire(prefer=k3.id, free=False) is k3
    assert pool.acquire(prefer="no-such-id") in (k1, k2)  # unknown: the usual pick
    assert pool.by_id(k2.id) is k2 and pool.by_id("nope") is None
    assert list(pool) == [k1, k2, k3]


def test_same_moves_on_when_the_last_key_rests_for_free_models() -> None:
    pool, _, _ = pool_of(K1, K2, same=True)
    k1, k2 = pool
    assert pool.acquire() is k1 and pool.acquire() is k1
    pool.cool_down(k1, 10, "r", free_only=True)
    assert pool.acquire() is k2
    assert pool.acquire(free=False) is k2  # sticks to the new last key


def test_random_never_picks_an_excluded_or_free_resting_key() -> None:
    pool, _, _ = pool_of(K1, K2, K3, strategy="random", rng=random.Random(7))
    k1, k2, k3 = pool
    pool.cool_down(k2, 10, "r", free_only=True)
    for _ in range(50):
        assert pool.acquire(exclude=[k1]) is k3
    assert {pool.acquire(exclude=[k1], free=False) for _ in range(50)} == {k2, k3}


def test_reconfigure_keeps_kept_keys_and_follows_the_configured_accounts() -> None:
    pool, _, _ = pool_of(K1, K2, same=True)
    k1, k2 = pool
    k1.stats.requests = 5
    pool.learn_account(k2, "learned")
    assert pool.acquire(exclude=[k1]) is k2  # now the `same` key, though not the first
    pool.reconfigure([(K1, "cfg"), (K2, None), (K3, "new")], strategy="round-robin",
                     same=True)
    a, b, c = pool
    assert (a, b) == (k1, k2) and a.stats.requests == 5  # the same objects, state kept
    assert (a.account, b.account, c.account) == ("cfg", "learned", "new")
    assert pool.acquire() is k2  # `same` still sticks to a kept key
    pool.reconfigure([(K1, None), (K2, "cfg2")], strategy="first", same=True)
    assert (k1.account, k2.account) == (None, "cfg2")  # the config wins over what we learned
    pool.reconfigure([(K1, None), (K2, None)], strategy="first", same=True)
    assert k2.account is None  # a configured account removed is removed
    assert pool.acquire() is k2
    pool.reconfigure([(K1, None)], strategy="first", same=True)
    assert pool.acquire() is k1  # the last key is gone: no stale `same`
    with pytest.raises(ValueError, match=r"^a key pool needs at least one key$"):
        pool.reconfigure([], strategy="first", same=False)


def test_snapshot_shows_rests_as_wall_clock_ends_and_words_only_while_resting() -> None:
    pool, clock, _ = pool_of(K1, K2, K3)
    k1, k2, k3 = pool
    pool.cool_down(k1, 30, "429 a", message="limit words")
    pool.cool_down(k2, 20, "429 free", free_only=True, message="free words")
    k3.message = "old words"
    views = {v.id: v for v in pool.snapshot()}
    assert (views[k1.id].cooling_seconds, views[k1.id].rest_until) == (30.0, 5_000_030.0)
    assert (views[k2.id].cooling_seconds, views[k2.id].rest_until) == (20.0, 5_000_020.0)
    assert (views[k1.id].message, views[k2.id].message) == ("limit words", "free words")
    assert (views[k3.id].message, views[k3.id].rest_until, views[k3.id].reason) == ("", 0.0, "")
    later = {v.id: v for v in pool.snapshot(now=clock.now + 25)}  # an explicit now is used
    assert later[k1.id].cooling_seconds == 5.0 and later[k2.id].rest_until == 0.0
    k1.stats.requests = 3
    (view, *_) = pool.snapshot()
    assert view.stats.requests == 3
    view.stats.errors_by_kind["x"] = 1
    assert k1.stats.errors_by_kind == {}  # a copy: the view cannot change the key


# --- classifying answers (orproxy/upstream/classify.py) ------------------------------------------

WALL_NOW = 1_764_000_000.0  # 2025-11-24T16:00:00Z


def error_doc(status: int, message: Any = "m", **metadata: Any) -> bytes:
    return json.dumps({"error": {"code": status, "message": message,
                                 "metadata": metadata}}).encode()


@pytest.mark.parametrize(("status", "body", "outcome"), [
    (404, json.dumps({"error": {"code": 404, "message": "gone for free",
                                "availability": {"code": "free_variant_ended"}}}).encode(),
     Outcome.MODEL_GONE),
    (429, error_doc(429, "gone for free", raw="provider said no"), Outcome.OVERLOADED),
    (402, error_doc(402, "gone for free", limit_source="openrouter_in_flight_budget"),
     Outcome.BUSY),
    (402, error_doc(402, "gone for free", limit_source="openrouter_key_limit"),
     Outcome.NO_CREDIT),
    (402, error_doc(402, "gone for free", limit_source="openrouter_credits"), Outcome.NO_CREDIT),
    (402, error_doc(402, "gone for free"), Outcome.NO_CREDIT),
])
def test_every_verdict_keeps_openrouters_words(status: int, body: bytes,
                                               outcome: Outcome) -> None:
    verdict = classify(status, [], body, WALL_NOW)
    assert (verdict.outcome, verdict.message) == (outcome, "gone for free")


def test_a_message_that_is_not_text_gives_no_words() -> None:
    assert classify(402, [], error_doc(402, 123), WALL_NOW).message == ""


def test_a_limit_name_is_looked_for_in_the_first_1200_characters_only() -> None:
    near = classify(429, [], error_doc(429, "x" * 1150 + " Rate limit exceeded: limit_a"),
                    WALL_NOW)
    far = classify(429, [], error_doc(429, "x" * 1250 + " Rate limit exceeded: limit_a"),
                   WALL_NOW)
    assert (near.reason, far.reason) == ("429 limit_a", "429 rate limited")


def test_a_limit_name_loses_only_its_trailing_punctuation() -> None:
    verdict = classify(429, [], error_doc(429, "Rate limit exceeded: per_X."), WALL_NOW)
    assert verdict.reason == "429 per_X"


def test_metadata_headers_count_only_when_they_are_ratelimit_headers() -> None:
    body = error_doc(429, "Provider returned error", raw="busy", headers={"Retry-After": "5"})
    assert classify(429, [], body, WALL_NOW).outcome is Outcome.OVERLOADED


def test_a_retry_after_date_rests_an_own_limit_until_then() -> None:
    when = format_datetime(datetime.fromtimestamp(WALL_NOW + 120, UTC), usegmt=True)
    verdict = classify(429, [(b"Retry-After", when.encode())], error_doc(429, "limited"),
                       WALL_NOW)
    assert verdict.outcome is Outcome.KEY_LIMITED and verdict.rest_seconds == 120.0


@pytest.mark.parametrize(("model", "found"), [
    ({"metadata": {"model_id": "m/id"}}, "m/id"),
    ({"metadata": {"model_slug": "m/slug"}}, "m/slug"),
    ({"model": "m/err"}, "m/err"),
    ({"metadata": {"model": "x"}}, "x"),  # one character is a name
    ({"metadata": {"model": "m" * 200}}, "m" * 200),
    ({"metadata": {"model": "m" * 201}}, None),  # too long to be one
    ({"metadata": {"model": ""}}, None),
])
def test_the_model_gone_is_named_from_any_of_its_places(model: dict[str, Any],
                                                         found: str | None) -> None:
    error: dict[str, Any] = {"code": 404, "message": "m",
                             "availability": {"code": "free_variant_ended"}}
    for key, value in model.items():
        if key == "metadata":
            error["metadata"] = value
        else:
            error[key] = value
    verdict = classify(404, [], json.dumps({"error": error}).encode(), WALL_NOW)
    assert verdict.outcome is Outcome.MODEL_GONE and verdict.model == found


@pytest.mark.parametrize(("reset", "rest"), [
    ("100000000000", MAX_SECONDS),  # 1e11 exactly: epoch seconds, far away
    ("100000000000.5", 1.0),  # past 1e11: epoch milliseconds, long gone
    ("1000000000", MAX_SECONDS),  # 1e9 exactly: seconds from now
    ("1000000000.5", 1.0),  # past 1e9: epoch seconds, long gone
])
def test_a_reset_is_read_as_ms_epoch_s_or_seconds_by_size(reset: str, rest: float) -> None:
    body = error_doc(429, "Rate limit exceeded: x", headers={"X-RateLimit-Reset": reset})
    assert classify(429, [], body, WALL_NOW).rest_seconds == rest


def test_a_daily_key_limit_rests_until_the_next_utc_midnight_to_the_second() -> None:
    wall = WALL_NOW + 5 * 3600 + 23 * 60 + 45.25  # 21:23:45.25
    body = error_doc(402, "cap", limit_source="openrouter_key_limit", limit_reset="daily")
    assert classify(402, [], body, wall).rest_seconds == pytest.approx(
        8 * 3600 - (5 * 3600 + 23 * 60 + 45.25), abs=1e-6)


def test_a_daily_key_limit_counts_utc_midnight_whatever_the_local_zone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+5:30
    time.tzset()
    try:
        body = error_doc(402, "cap", limit_source="openrouter_key_limit", limit_reset="daily")
        assert classify(402, [], body, WALL_NOW).rest_seconds == 8 * 3600.0
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_period_reset_past_any_date_is_a_day() -> None:
    body = error_doc(402, "cap", limit_source="openrouter_key_limit", limit_reset="weekly")
    assert classify(402, [], body, 1e12).rest_seconds == 86400.0  # year 33658


def test_each_attempt_and_in_band_error_is_counted_by_kind() -> None:
    pool, _, _ = pool_of(K1)
    (key,) = pool
    stats = key.stats
    pool.record_attempt(key, "ok", 200)
    assert (stats.requests, stats.errors, stats.errors_by_kind) == (1, 0, {})
    pool.record_attempt(key, "ok", 400)  # delivered, but an error answer
    assert (stats.errors, stats.rate_limited, stats.last_error) == (1, 0, "400")
    for _ in range(3):
        pool.record_attempt(key, "key_limited", 429)
    assert (stats.errors, stats.rate_limited, stats.last_error) == (1, 3, "429 key_limited")
    pool.record_attempt(key, "key_limited", 429, "429 limit_rpm")  # the verdict's reason
    assert stats.last_error == "429 limit_rpm"
    pool.record_attempt(key, "connect_error", 0)
    assert (stats.errors, stats.last_error) == (2, "connect_error")
    pool.record_in_band_error(key, 429, "in-band limit")
    pool.record_in_band_error(key, None, "x" * 300)
    assert (stats.requests, stats.rate_limited, stats.errors) == (7, 5, 3)
    assert stats.errors_by_kind == {"400": 1, "429": 4, "connect_error": 1, "in_band_429": 1,
                                    "in_band": 1}
    assert stats.last_error == "x" * 200 and stats.last_error_at == 5_000_000.0


def test_capacity_answers_are_counted_apart_from_the_keys_own_errors() -> None:
    pool, _, _ = pool_of(K1)
    (key,) = pool
    stats = key.stats
    pool.record_attempt(key, "overloaded", 429, "429 upstream overloaded")
    pool.record_attempt(key, "overloaded", 429)
    assert stats.last_error == "overloaded"
    pool.record_attempt(key, "busy", 402, "402 in flight")
    assert (stats.requests, stats.errors, stats.rate_limited) == (3, 0, 0)  # not the key's
    assert stats.errors_by_kind == {"overloaded": 2, "busy": 1}
    assert stats.last_error == "402 in flight"


def test_the_soonest_key_and_the_counts_follow_the_request_and_the_time_asked() -> None:
    pool, clock, _ = pool_of(K1, K2)
    k1, k2 = pool
    pool.cool_down(k1, 10, "free", free_only=True, message="free words")
    pool.cool_down(k2, 5, "all", message="all words")
    assert pool.soonest() == (5.0, "all words")  # both rest for free models: k2 first
    assert pool.soonest(free=False) == (0.0, "free words")  # k1 serves paid models now
    assert pool.counts(now=clock.now + 7) == {"available": 1, "free_limited": 1,
                                               "cooling": 0, "disabled": 0}
    views = {v.id: v for v in pool.snapshot(now=clock.now + 4.5)}
    assert views[k2.id].rest_until == 5_000_000.5  # under a second left: still shown


@pytest.mark.parametrize(("limit", "line", "refused"), [
    (89, b"5A\r\n", True),  # upper-case hex counts: 0x5A = 90
    (90, b"5A\r\n", False),
    (100, b"X5\r\n", False),  # not a size: left to h11, never misread
])
def test_chunk_sizes_are_read_as_hex_of_either_case(limit: int, line: bytes,
                                                    refused: bool) -> None:
    guard = ChunkedGuard(limit)
    if refused:
        with pytest.raises(ClientRequestError):
            guard.feed(line)
    else:
        guard.feed(line)


def test_accept_encoding_keeps_a_decodable_coding_whatever_its_parameters() -> None:
    headers = [(b"Accept-Encoding", b"gzip;q=1;level=2, br, deflate ;q=0.5")]
    assert only_decodable_codings(headers) == [(b"Accept-Encoding",
                                                b"gzip;q=1;level=2, deflate ;q=0.5")]


def test_export_gives_each_rest_as_a_wall_clock_end() -> None:
    pool, clock, _ = pool_of(K1, K2, K3, K4)
    k1, k2, k3, k4 = pool
    pool.cool_down(k1, 30, "r1", message="m1")
    pool.cool_down(k2, 20, "r2", free_only=True, message="m2")
    pool.disable(k3, "gone", "refused")
    pool.cool_down(k4, 10, "short")
    pool.cool_down(k4, 50, "long free", free_only=True)  # a full rest is what is saved
    k1.stats.errors_by_kind["429"] = 1
    saved = pool.export()
    assert [(s.id, s.rest_until, s.free_only, s.disabled, s.disabled_at, s.reason, s.message)
            for s in saved] == [
        (k1.id, 5_000_030.0, False, False, 0.0, "r1", "m1"),
        (k2.id, 5_000_020.0, True, False, 0.0, "r2", "m2"),
        (k3.id, 0.0, False, True, 5_000_000.0, "gone", "refused"),
        (k4.id, 5_000_010.0, False, False, 0.0, "long free", ""),
    ]
    saved[0].stats.errors_by_kind["429"] = 7
    assert k1.stats.errors_by_kind == {"429": 1}  # a copy
    k1.cooling_until, k1.free_until = clock.now, clock.now + 40  # a full rest ending now
    assert pool.export()[0].rest_until == 5_000_040.0  # is over: the free rest is saved
    k1.cooling_until, k1.free_until = clock.now + 30, 0.0
    later = pool.export(now=clock.now + 20)  # an explicit now is used; ended rests are 0
    assert [(s.rest_until, s.free_only) for s in later] == [
        (5_000_010.0, False), (0.0, False), (0.0, False), (5_000_030.0, True)]


def saved_key(key_id_: str, rest_until: float = 0.0, *, free_only: bool = False,
              disabled: bool = False, disabled_at: float = 0.0, reason: str = "",
              message: str = "", requests: int = 0) -> SavedKey:
    return SavedKey(key_id_, rest_until, free_only, disabled, disabled_at, reason, message,
                    KeyStats(requests=requests, errors_by_kind={"x": requests}))


def test_restore_takes_back_rests_disables_and_stats_by_key_id() -> None:
    pool, clock, events = pool_of(K1, K2, K3, K4)
    k1, k2, k3, k4 = pool
    wall = 5_000_000.0
    saved = [saved_key(k1.id, wall + 30, reason="r1", message="m1", requests=3),
             saved_key(k2.id, wall + 20, free_only=True, reason="r2", message="m2"),
             saved_key(k3.id, disabled=True, disabled_at=wall - 100, reason="gone",
                       message="refused"),
             saved_key("not-configured", wall + 99),
             saved_key(k4.id, wall + 10, disabled=True,
                       disabled_at=wall - DISABLED_RECHECK_SECONDS, reason="old")]
    assert pool.restore(saved) == 4
    assert (k1.cooling_until, k1.free_until, k1.reason, k1.message) == (
        clock.now + 30, 0.0, "r1", "m1")
    assert k1.stats.requests == 3 and k1.stats.errors_by_kind == {"x": 3}
    saved[0].stats.errors_by_kind["x"] = 9
    assert k1.stats.errors_by_kind == {"x": 3}  # a copy
    assert (k2.cooling_until, k2.free_until, k2.reason) == (0.0, clock.now + 20, "r2")
    assert (k3.disabled, k3.disabled_at, k3.reason, k3.message) == (
        True, wall - 100, "gone", "refused")
    assert not k4.disabled  # refused a day ago or more: tried again,
    assert k4.cooling_until == clock.now + 10 and k4.reason == "old"  # with its rest
    clock.advance(10)
    pool.snapshot()
    assert [(e.change, e.key_id) for e in events] == [(Change.RETURNED, k4.id)]
    clock.advance(10)
    pool.snapshot()
    assert [e.key_id for e in events] == [k4.id, k2.id]
    clock.advance(10)
    pool.snapshot()
    assert [e.key_id for e in events] == [k4.id, k2.id, k1.id]


def test_restore_drops_ended_rests_and_cuts_long_ones() -> None:
    pool, _, _ = pool_of(K1, K2, K3)
    k1, k2, k3 = pool
    wall = 5_000_000.0
    assert pool.restore([saved_key(k1.id, wall, reason="ended"),
                         saved_key(k2.id, wall + 40 * 86400.0, reason="long"),
                         saved_key(k3.id, wall + 500.0, reason="cut")],
                        now=2000.0, max_rest_seconds=100.0) == 3
    assert (k1.cooling_until, k1.reason) == (0.0, "")  # ended while we were down
    pool.restore([saved_key(k1.id, wall + 0.5, reason="almost over")], now=2000.0)
    assert (k1.cooling_until, k1.reason) == (2000.5, "almost over")  # under a second: kept
    assert k2.cooling_until == 2000.0 + 100.0  # cut to the maximum, from the given now
    assert k3.cooling_until == 2100.0
    pool2, clock2, _ = pool_of(K1)
    (key,) = pool2
    pool2.restore([saved_key(key.id, wall + 40 * 86400.0)])
    assert key.cooling_until == clock2.now + 31 * 86400.0  # the default maximum
