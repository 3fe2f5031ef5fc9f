"""The body relay without sockets: these upstream bytes in, these client bytes out.

A real UpstreamConnection (h11 CLIENT) and a real ClientConnection (h11 SERVER), each over a
real Stream on a FakeTransport, joined by a real BodyRelay. The tests feed raw upstream
bytes (split anywhere), play the client's receive window, and look at exactly what the
client transport was given, at the relay's outcome, and at the upstream transport's
pause/resume calls. Timeouts run on a virtual clock: they elapse at once, at their exact time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orproxy.config import LimitsConfig, TimeoutsConfig
from orproxy.errors import (
    StreamClosed,
    StreamTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from orproxy.headers import client_response_headers
from orproxy.http.client_conn import ClientConnection
from orproxy.http.validate import BodyFraming
from orproxy.proxy.relay import BodyRelay
from orproxy.stream import GATHER_WRITES, LARGE_WRITE
from orproxy.upstream.connection import UpstreamConnection
from tests.memstream import FakeTransport, make_stream, response, settle, virtual_time_loop

pytestmark = pytest.mark.anyio

IDLE = 30.0  # upstream idle timeout (virtual seconds)
WRITE = 100.0  # client write-stall timeout
UP_HEADERS = [(b"Date", b"Sat, 29 Nov 2025 12:00:00 GMT"), (b"Server", b"up")]
RID = b"rid-1"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"loop_factory": virtual_time_loop})


# --- the two sides ------------------------------------------------------------------------


@dataclass
class Relay:
    """One relay under test, with both transports and what it reported."""

    up: UpstreamConnection
    up_t: FakeTransport
    client: ClientConnection
    client_t: FakeTransport
    resp: h11.Response
    relay: BodyRelay | None = None
    tapped: list[bytes] = field(default_factory=list)
    heads: list[tuple[bytes, bool]] = field(default_factory=list)
    completed: list[bytes] = field(default_factory=list)  # client bytes at each on_complete

    def start(self, body: bytes = b"", ended: bool = False, idle: float = IDLE,
              write: float = WRITE) -> asyncio.Future[None]:
        self.relay = BodyRelay(self.up, self.client, idle_timeout=idle, write_timeout=write,
                               tap=self.tapped.append, on_complete=self._complete)
        if not body and not ended:  # nothing read ahead: what forward.py passes then
            return self.relay.start(self._send_head)
        return self.relay.start(self._send_head, body, ended)

    def _complete(self) -> None:
        """on_complete: the whole body is here; what the client has been given so far."""
        self.completed.append(bytes(self.client_t.written))

    def _send_head(self, body: bytes, ended: bool) -> None:
        """What forward.py's relay sends: the client head with the body already here."""
        self.heads.append((body, ended))
        headers = client_response_headers(self.resp.headers.raw_items(), request_id=RID,
                                          close=False)
        events: list[h11.Event] = [h11.Response(status_code=self.resp.status_code,
                                                headers=headers, reason=self.resp.reason)]
        if body:
            events.append(h11.Data(data=body))
        if ended:
            events.append(h11.EndOfMessage())
        self.client.send(*events)


async def client_side() -> tuple[ClientConnection, FakeTransport]:
    """A client connection that has read a GET and may now answer it."""
    stream, transport = make_stream()
    client = ClientConnection(stream, LimitsConfig(), TimeoutsConfig())
    transport.feed(b"GET /api/v1/chat HTTP/1.1\r\nHost: proxy\r\n\r\n")
    request = await client.next_request()
    assert request is not None
    assert client.end_if_bodiless(BodyFraming(None, False))
    return client, transport


async def sides(*pieces: bytes) -> Relay:
    """An upstream connection that sent its request and has read the response head from
    ``pieces`` (fed one by one until the head is in; the rest is fed unread)."""
    stream, up_t = make_stream()
    up = UpstreamConnection(stream)
    await up.send_request(b"GET", b"/api/v1/chat", [(b"Host", b"up")], [], 10.0)
    head = asyncio.ensure_future(up.receive_head(10.0))
    queue = list(pieces)
    while not head.done():
        assert queue, "the pieces end before the response head"
        up_t.feed(queue.pop(0))
        await settle()
    up_t.feed(*queue)
    await settle()
    client, client_t = await client_side()
    return Relay(up, up_t, client, client_t, head.result())


def parse_client(written: bytes) -> tuple[h11.Response, bytes, bool]:
    """What a client makes of the bytes: the head, the body, and whether it ended."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"p")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(written)
    head: h11.Response | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            assert not conn.trailing_data[0], "bytes after the end of the response"
            return head, bytes(body), True
        else:
            assert event is h11.NEED_DATA, event
            assert head is not None
            return head, bytes(body), False


def head_bytes(length: int | None) -> bytes:
    """The exact client head for a 200 with UP_HEADERS: Content-Length if the upstream
    gave one, else h11 frames the client's body chunked."""
    framing = (b"Content-Length: %d\r\n" % length if length is not None
               else b"Transfer-Encoding: chunked\r\n")
    if length is None:
        return (b"HTTP/1.1 200 \r\nDate: Sat, 29 Nov 2025 12:00:00 GMT\r\nServer: up\r\n"
                b"X-Request-ID: rid-1\r\n" + framing + b"\r\n")
    return (b"HTTP/1.1 200 \r\nDate: Sat, 29 Nov 2025 12:00:00 GMT\r\nServer: up\r\n"
            + framing + b"X-Request-ID: rid-1\r\n\r\n")


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


async def outcome(done: asyncio.Future[None]) -> BaseException | None:
    """The relay's outcome once it has one (on the virtual clock: at once)."""
    await asyncio.wait([done], timeout=10 * WRITE)
    assert done.done(), "the relay never finished"
    return done.exception()


# --- exact bytes, per framing ------------------------------------------------------------------


async def test_content_length_body_goes_out_with_the_head_then_as_it_arrives() -> None:
    raw = response(200, b"0123456789", UP_HEADERS)
    head_end = raw.index(b"\r\n\r\n") + 4
    r = await sides(raw[:head_end + 3])  # 3 body bytes came with the head
    done = r.start()
    r.up_t.feed(raw[head_end + 3:head_end + 6])
    await settle()
    r.up_t.feed(raw[head_end + 6:])
    assert await outcome(done) is None
    assert r.client_t.writes == [head_bytes(10) + b"012", b"345", b"6789"]
    assert r.heads == [(b"012", False)]
    assert r.tapped == [b"012", b"345", b"6789"]
    assert r.relay is not None and r.relay.sent == 10
    assert r.up.reusable  # both sides done, nothing more: the caller may pool it


async def test_chunked_body_is_reframed_chunk_for_piece() -> None:
    raw = response(200, b"", UP_HEADERS, framing="chunked")[:-5]  # head only
    r = await sides(raw)
    done = r.start()
    for piece in (b"5\r\nhello\r\n", b"6\r\n wo", b"rld\r\n", b"0\r\n\r\n"):
        r.up_t.feed(piece)
        await settle()
    assert await outcome(done) is None
    assert bytes(r.client_t.written) == (head_bytes(None) + b"5\r\nhello\r\n" + b"3\r\n wo\r\n"
                                         + b"3\r\nrld\r\n" + b"0\r\n\r\n")
    assert r.tapped == [b"hello", b" wo", b"rld"]
    assert r.up.reusable


async def test_close_delimited_body_ends_at_an_orderly_close() -> None:
    r = await sides(response(200, b"", UP_HEADERS, framing="close") + b"abc")
    done = r.start()
    r.up_t.feed(b"defg")
    await settle()
    r.up_t.feed_eof()
    assert await outcome(done) is None
    assert bytes(r.client_t.written) == (head_bytes(None) + b"3\r\nabc\r\n" + b"4\r\ndefg\r\n"
                                         + b"0\r\n\r\n")
    assert r.tapped == [b"abc", b"defg"]
    assert not r.up.reusable  # the body ended with the connection


async def test_close_delimited_body_cut_by_a_reset_fails_with_no_final_chunk() -> None:
    r = await sides(response(200, b"", UP_HEADERS, framing="close") + b"abc")
    done = r.start()
    r.up_t.feed(b"defg")
    await settle()
    r.up_t.reset()
    exc = await outcome(done)
    assert isinstance(exc, UpstreamProtocolError)
    assert "reset" in exc.message
    written = bytes(r.client_t.written)
    assert written == head_bytes(None) + b"3\r\nabc\r\n" + b"4\r\ndefg\r\n"
    assert not written.endswith(b"0\r\n\r\n")
    assert r.tapped == [b"abc", b"defg"]


@pytest.mark.parametrize("end", ["fin", "reset"])
async def test_length_body_cut_short_fails_however_it_ends(end: str) -> None:
    r = await sides(response(200, b"0123456789", UP_HEADERS)[:-4])  # 6 of 10 body bytes
    done = r.start()
    if end == "fin":
        r.up_t.feed_eof()
    else:
        r.up_t.reset()
    exc = await outcome(done)
    assert isinstance(exc, UpstreamProtocolError)
    _, body, ended = parse_client(bytes(r.client_t.written))
    assert (body, ended) == (b"012345", False)


@pytest.mark.parametrize("end", ["fin", "reset"])
async def test_chunked_body_cut_short_fails_without_its_last_chunk(end: str) -> None:
    r = await sides(response(200, b"hello", UP_HEADERS, framing="chunked")[:-5])
    done = r.start()
    if end == "fin":
        r.up_t.feed_eof()
    else:
        r.up_t.reset()
    assert isinstance(await outcome(done), UpstreamProtocolError)
    assert bytes(r.client_t.written) == head_bytes(None) + b"5\r\nhello\r\n"


# --- any split, any moment ---------------------------------------------------------------------

BODIES = st.binary(min_size=0, max_size=600)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, framing=st.sampled_from(["length", "chunked", "close"]),
       cuts=st.lists(st.integers(min_value=1, max_value=900), max_size=12),
       early=st.integers(min_value=0, max_value=3),
       chunk_sizes=st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=8))
async def test_any_split_relays_the_body_whole_and_once(
        body: bytes, framing: str, cuts: list[int], early: int, chunk_sizes: list[int]) -> None:
    """However the upstream's bytes are split, and whether they were held by h11, buffered
    in the stream before the relay started, or pushed after: the client gets the body
    exactly, properly ended, and the tap sees each byte once."""
    if framing == "chunked":  # several chunks of varied sizes, not one
        head = response(200, b"", UP_HEADERS, framing="chunked")[:-5]
        payload, rest, i = b"", body, 0
        while rest:
            size = chunk_sizes[i % len(chunk_sizes)]
            payload += b"%x\r\n%s\r\n" % (len(rest[:size]), rest[:size])
            rest, i = rest[size:], i + 1
        raw = head + payload + b"0\r\n\r\n"
    else:
        raw = response(200, body, UP_HEADERS, framing=framing)
    head_end = raw.index(b"\r\n\r\n") + 4
    pieces = split(raw, cuts)  # the piece ending the head may carry body bytes too
    at_head = next(i for i, p in enumerate(pieces) if sum(map(len, pieces[:i + 1])) >= head_end)
    first = at_head + 1 + early  # pieces fed before the relay starts (unread, buffered)
    r = await sides(*pieces[:first])
    done = r.start()
    for piece in pieces[first:]:
        r.up_t.feed(piece)
        await settle()
    if framing == "close":
        r.up_t.feed_eof()
    assert await outcome(done) is None
    client_head, got, ended = parse_client(bytes(r.client_t.written))
    assert client_head.status_code == 200
    assert (got, ended) == (body, True)
    assert b"".join(r.tapped) == body
    assert all(r.tapped)  # no empty taps
    assert r.relay is not None and r.relay.sent == len(body)
    assert r.up.reusable is (framing != "close")


async def test_a_body_read_ahead_and_ended_goes_out_with_the_head_and_reads_nothing() -> None:
    r = await sides(b"HTTP/1.1 429 \r\nContent-Length: 5\r\n\r\n")
    r.up_t.feed(b"hello")  # would be read if the relay asked the source
    done = r.start(b"hello", ended=True)
    assert done.done() and done.exception() is None
    assert r.heads == [(b"hello", True)]
    _, body, ended = parse_client(bytes(r.client_t.written))
    assert (body, ended) == (b"hello", True)
    assert r.tapped == [b"hello"]


async def test_a_body_read_ahead_goes_first_then_the_rest() -> None:
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: 8\r\n\r\nabc")

    class ReadAhead:  # what the attempt loop does: take what is here, pause, detach
        def on_body(self, data: bytes, end: bool) -> None:
            assert (data, end) == (b"abc", False)
            r.up.pause()

        def on_body_error(self, exc: UpstreamError) -> None:
            raise AssertionError(exc)

    r.up.read_body(ReadAhead(), IDLE)
    r.up.stop_body()
    r.up_t.feed(b"defgh")
    await settle()
    assert r.up_t.pending_inbound == 5  # paused: not delivered yet
    done = r.start(b"abc", ended=False)  # the read-ahead bytes (not in h11 any more)
    assert await outcome(done) is None
    _, body, ended = parse_client(bytes(r.client_t.written))
    assert (body, ended) == (b"abcdefgh", True)
    assert r.heads == [(b"abc", False)]
    assert b"".join(r.tapped) == b"abcdefgh"


async def test_a_body_complete_before_start_goes_out_in_the_head_write() -> None:
    raw = response(200, b"whole", UP_HEADERS)
    r = await sides(raw)
    done = r.start()
    assert done.done() and done.exception() is None  # nothing to wait for
    assert r.heads == [(b"whole", True)]
    assert r.client_t.writes == [head_bytes(5) + b"whole"]


async def test_an_upstream_failing_before_the_head_sends_nothing() -> None:
    """A bad chunk already in h11's buffer fails the relay inside start(): the client gets
    no head, so the caller may still answer with an error."""
    r = await sides(response(200, b"", UP_HEADERS, framing="chunked")[:-5] + b"zz\r\n")
    before = len(r.client_t.written)
    done = r.start()
    assert done.done()
    assert isinstance(done.exception(), UpstreamProtocolError)
    assert r.heads == []
    assert len(r.client_t.written) == before
    assert r.client.can_respond


# --- backpressure --------------------------------------------------------------------------------


async def test_a_full_client_buffer_pauses_the_upstream_until_the_client_reads() -> None:
    piece = bytes(range(256)) * 64  # 16 KiB
    total = 20
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: %d\r\n\r\n" % (len(piece) * total))
    r.client_t.stop_reading()
    done = r.start()
    r.up_t.feed(*[piece] * total)
    await settle()
    # 64 KiB high water: the relay paused the upstream once the client's buffer went over it
    assert r.up_t.pause_calls == 1
    assert not r.up_t.is_reading()
    taken = len(r.client_t.written)
    assert 64 * 1024 < taken <= 64 * 1024 + len(piece) + 200
    assert r.up_t.pending_inbound == len(piece) * total - (r.relay.sent if r.relay else 0)
    rounds = 0
    while not done.done():
        rounds += 1
        r.client_t.read_all()  # the client takes everything: resume, relay more, pause again
        r.client_t.stop_reading()
        await settle()
        assert rounds < 20
    assert done.exception() is None
    assert r.up_t.resume_calls >= 4 and r.up_t.pause_calls == r.up_t.resume_calls
    _, body, ended = parse_client(bytes(r.client_t.written))
    assert (body, ended) == (piece * total, True)
    assert b"".join(r.tapped) == piece * total


async def test_a_client_full_from_the_start_pauses_the_upstream_at_once() -> None:
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: 6\r\n\r\nabc")
    r.client_t.fill()
    done = r.start()
    assert r.up_t.pause_calls == 1 and not r.up_t.is_reading()
    r.up_t.feed(b"def")
    await settle()
    assert r.up_t.pending_inbound == 3 and not done.done()
    r.client_t.read_all()
    await settle()
    assert r.up_t.resume_calls == 1
    assert await outcome(done) is None
    assert parse_client(bytes(r.client_t.written))[1:] == (b"abcdef", True)


async def test_a_client_that_reads_nothing_fails_the_relay_after_the_write_timeout() -> None:
    loop = asyncio.get_running_loop()
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: 100000\r\n\r\n")
    r.client_t.stop_reading()
    done = r.start(idle=10 * WRITE)
    r.up_t.feed(b"x" * 70000)
    await settle()
    paused_at = loop.time()
    assert r.up_t.pause_calls == 1
    exc = await outcome(done)
    assert isinstance(exc, StreamTimeout)
    assert str(exc) == "client read nothing for 100s"
    assert loop.time() - paused_at == pytest.approx(WRITE, abs=0.01)
    assert r.relay is not None
    r.relay.stop()  # forward.py stops the relay whatever its outcome
    # detached from both sides: nothing more is relayed, the client's callback is gone
    assert r.client.stream.on_writable is None
    r.client_t.read_all()
    await settle()
    assert r.up_t.resume_calls == 0


async def test_the_write_timeout_counts_one_stall_not_the_sum_of_stalls() -> None:
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: 400000\r\n\r\n")
    r.client_t.stop_reading()
    done = r.start(idle=10 * WRITE)
    for _ in range(4):
        r.up_t.feed(b"y" * 80000)
        await asyncio.sleep(0.8 * WRITE)  # stalled for most of the timeout, then reads
        assert not done.done()
        r.client_t.read_all()
        r.client_t.stop_reading()
        await settle()
    assert r.up_t.pause_calls == r.up_t.resume_calls == 4
    r.up_t.feed(b"y" * 80000)
    assert await outcome(done) is None
    assert parse_client(bytes(r.client_t.written))[1:] == (b"y" * 400000, True)


# --- the upstream's idle timeout ----------------------------------------------------------------


async def test_a_silent_upstream_fails_the_relay_idle_seconds_after_its_last_byte() -> None:
    loop = asyncio.get_running_loop()
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: 10\r\n\r\n")
    done = r.start()
    await asyncio.sleep(IDLE / 2)
    r.up_t.feed(b"abc")
    await settle()
    last = loop.time()
    exc = await outcome(done)
    assert isinstance(exc, UpstreamTimeout)
    assert loop.time() - last == pytest.approx(IDLE, abs=0.01)
    assert parse_client(bytes(r.client_t.written))[1:] == (b"abc", False)


async def test_a_client_taking_its_bytes_does_not_make_the_upstream_look_alive() -> None:
    """Only a pause the relay made is undone: a client's buffer filling and emptying
    between two upstream reads neither resumes the upstream nor restarts its idle clock."""
    loop = asyncio.get_running_loop()
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: 10\r\n\r\n")
    done = r.start()
    r.up_t.feed(b"abc")
    await settle()
    last = loop.time()
    await asyncio.sleep(IDLE / 2)
    r.client_t.fill()  # full and drained again while the relay was not writing
    r.client_t.read_all()
    exc = await outcome(done)
    assert isinstance(exc, UpstreamTimeout)
    assert loop.time() - last == pytest.approx(IDLE, abs=0.01)
    assert r.up_t.resume_calls == 0


async def test_time_paused_for_a_slow_client_is_not_upstream_silence() -> None:
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: 70001\r\n\r\n")
    r.client_t.stop_reading()
    done = r.start(idle=IDLE, write=100 * IDLE)
    r.up_t.feed(b"z" * 70000)
    await settle()
    assert r.up_t.pause_calls == 1  # the relay paused the upstream: the client is slow
    await asyncio.sleep(10 * IDLE)  # far longer than the idle timeout
    assert not done.done()
    r.client_t.read_all()
    await settle()
    r.up_t.feed(b"!")
    assert await outcome(done) is None
    assert parse_client(bytes(r.client_t.written))[1:] == (b"z" * 70000 + b"!", True)


async def test_after_a_pause_the_idle_timeout_runs_again_from_the_resume() -> None:
    loop = asyncio.get_running_loop()
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: 70001\r\n\r\n")
    r.client_t.stop_reading()
    done = r.start(idle=IDLE, write=100 * IDLE)
    r.up_t.feed(b"z" * 70000)
    await settle()
    await asyncio.sleep(3.5 * IDLE)  # resumed between two of the idle timer's checks
    r.client_t.read_all()
    await settle()
    resumed = loop.time()
    exc = await outcome(done)  # the last byte never comes
    assert isinstance(exc, UpstreamTimeout)
    assert loop.time() - resumed == pytest.approx(IDLE, abs=0.01)


# --- the client going away, and stop() --------------------------------------------------------


async def test_a_client_gone_mid_body_fails_the_relay_and_detaches_the_upstream() -> None:
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: 10\r\n\r\nab")
    done = r.start()
    r.client_t.lose(ConnectionResetError())
    await settle()
    r.up_t.feed(b"cd")
    exc = await outcome(done)
    assert isinstance(exc, StreamClosed)
    tapped = list(r.tapped)
    assert tapped[0] == b"ab"
    r.up_t.feed(b"efghij")  # detached: nothing more is relayed or counted
    await settle()
    assert r.tapped == tapped and r.heads == [(b"ab", False)]


async def test_stop_detaches_from_both_sides_and_is_idempotent() -> None:
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: 10\r\n\r\nab")
    done = r.start()
    assert r.relay is not None
    r.relay.stop()
    r.relay.stop()
    r.up_t.feed(b"cdefghij")
    await settle()
    assert r.tapped == [b"ab"] and not done.done()
    assert r.client.stream.on_writable is None
    await asyncio.sleep(10 * IDLE)  # no timer is left to fire either
    assert not done.done()
    done.cancel()


# --- on_complete: the whole body is here, before its last bytes go out -------------------------


async def test_on_complete_runs_once_before_the_last_bytes_go_out() -> None:
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: 6\r\n\r\nabc")
    done = r.start()
    assert r.completed == []
    r.up_t.feed(b"def")
    assert await outcome(done) is None
    written = bytes(r.client_t.written)
    assert r.completed == [written[:-3]]  # called with "def" not yet given to the client
    assert written.endswith(b"abcdef")


async def test_on_complete_runs_before_the_head_when_the_body_is_already_whole() -> None:
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: 3\r\n\r\nabc")
    done = r.start()
    assert done.done() and r.completed == [b""]  # before the head went out


async def test_on_complete_is_not_called_for_a_body_cut_short() -> None:
    r = await sides(b"HTTP/1.1 200 \r\nContent-Length: 6\r\n\r\nabc")
    done = r.start()
    r.up_t.reset()
    assert isinstance(await outcome(done), UpstreamProtocolError)
    assert r.completed == []


async def test_a_large_buffer_is_written_on_its_own_not_joined_with_the_head() -> None:
    # Before 3.12 asyncio's writelines joins (a copy of every byte of a 344 KB answer);
    # the small parts are joined, a large one is written as it is.
    stream, transport = make_stream()
    head, body, tail = b"H" * 200, b"B" * (LARGE_WRITE * 20), b"0\r\n\r\n"
    stream.writelines([head, b"x", body, tail])
    assert bytes(transport.written) == head + b"x" + body + tail
    if GATHER_WRITES:
        assert transport.writes == [head + b"x" + body + tail]
    else:
        assert transport.writes == [head + b"x", body, tail]
    transport.writes.clear()
    stream.writelines([head, tail])
    assert transport.writes == [head + tail]
    stream.writelines([])  # an empty batch writes nothing
    assert transport.writes == [head + tail]
