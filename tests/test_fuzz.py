"""Property tests: random splits and mutations of requests and of upstream responses never
crash the proxy, never hang it, and never leak a connection.

The fake upstream and the proxy run on their own event loop in a thread, so hypothesis can
drive plain blocking sockets example after example against one running proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orproxy.app import App
from orproxy.config import build_config
from tests.conftest import AUTH, proxy_config
from tests.fakeor import FakeOpenRouter, Recorded, Responder
from tests.rawhttp import connected

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
REQUEST = (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: "
           + AUTH[1] + b"\r\nContent-Type: application/json\r\nContent-Length: "
           + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
SSE = b"".join([b": OPENROUTER PROCESSING\n\n"] + [b'data: {"i":%d}\n\n' % i for i in range(8)]
               + [b"data: [DONE]\n\n"])


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Running:
    app: App
    fake: FakeOpenRouter
    loop: asyncio.AbstractEventLoop
    errors: _ErrorLog
    upstream_splits: list[int] = field(default_factory=list)

    def quiesce(self) -> None:
        """Wait until the proxy holds no client connection and no active upstream one."""
        async def wait() -> None:
            services = self.app.services
            for _ in range(300):
                if not services.connections and services.upstream.snapshot().active == 0:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"leaked: {len(services.connections)} client connection(s), "
                                 f"{services.upstream.snapshot()}")

        asyncio.run_coroutine_threadsafe(wait(), self.loop).result(10)


@pytest.fixture(scope="module")
def running(server_tls: ssl.SSLContext, ca_file: str) -> Iterator[Running]:
    loop = asyncio.new_event_loop()
    errors = _ErrorLog()
    logging.getLogger("orproxy").addHandler(errors)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> Running:
        fake = FakeOpenRouter(tls=server_tls)
        await fake.start()
        config = build_config(proxy_config(fake.port, ca_file, timeouts={
            "client_head_seconds": 1, "client_body_seconds": 0.5, "keepalive_seconds": 2}), {})
        app = App(config)
        await app.start()
        return Running(app, fake, loop, errors)

    state = asyncio.run_coroutine_threadsafe(start(), loop).result(10)

    async def script(req: Recorded, resp: Responder) -> None:
        # the upstream answer arrives cut at random places
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        framed = head + b"%x\r\n" % len(SSE) + SSE + b"\r\n0\r\n\r\n"
        cuts = sorted(c % len(framed) for c in state.upstream_splits)
        pieces = [framed[a:b] for a, b in zip([0, *cuts], [*cuts, len(framed)], strict=True)]
        for piece in pieces[:-1]:
            if piece:
                await resp.raw(piece)
                await asyncio.sleep(0)
        await resp.raw_response(pieces[-1])

    state.fake.script = script
    yield state

    async def stop() -> None:
        await state.app.shutdown()
        await state.fake.stop()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(20)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()
    logging.getLogger("orproxy").removeHandler(errors)


def exchange(port: int, pieces: list[bytes], timeout: float = 5.0) -> bytes:
    """Send pieces one by one, then read until the proxy closes or goes quiet for
    ``timeout``; every byte received. (On an event loop of this thread's own: the proxy's
    runs in another.)"""
    return asyncio.run(_exchange(port, pieces, timeout))


async def _exchange(port: int, pieces: list[bytes], timeout: float) -> bytes:
    async with connected(port) as client:
        with contextlib.suppress(OSError):
            for piece in pieces:
                await client.send(piece)
        with contextlib.suppress(TimeoutError):
            while not client.eof and not (_complete_responses(bytes(client.raw)) >= 1
                                          and b"\r\n0\r\n\r\n" in client.raw):
                await client.read_some(timeout)
    return bytes(client.raw)


def _complete_responses(data: bytes) -> int:
    return data.count(b"HTTP/1.1 ")


def parse_responses(data: bytes) -> list[tuple[int, bytes]]:
    """Every complete response in ``data``; fails on anything that is not valid HTTP/1.1."""
    conn = h11.Connection(h11.CLIENT)
    out: list[tuple[int, bytes]] = []
    conn.receive_data(data)
    status, body = 0, bytearray()
    while True:
        if conn.our_state is h11.IDLE or (conn.our_state is h11.DONE and
                                          conn.their_state is h11.DONE):
            if conn.our_state is h11.DONE:
                conn.start_next_cycle()
            conn.send(h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"x")]))
            conn.send(h11.EndOfMessage())
        event = conn.next_event()
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return out
        if isinstance(event, h11.Response):
            status, body = event.status_code, bytearray()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append((status, bytes(body)))


def splits(data: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(data)), max_size=12).map(
        lambda cuts: [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)],
                                                strict=True) if b > a])


FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(pieces=splits(REQUEST), upstream_cuts=st.lists(st.integers(0, 10_000), max_size=10))
def test_random_splits_both_ways_relay_the_exact_stream(
    running: Running, pieces: list[bytes], upstream_cuts: list[int]
) -> None:
    running.upstream_splits[:] = upstream_cuts
    data = exchange(running.app.port, pieces)
    responses = parse_responses(data)
    assert responses == [(200, SSE)]
    assert running.fake.requests[-1].body == BODY
    assert not running.errors.records


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, len(REQUEST) - 1),
              st.sampled_from([b"\r", b"\n", b"\x00", b" ", b":", b"\t", b"0", b"9", b"-",
                               b"\x7f", b"\xff", b",", b"a"])),
    min_size=1, max_size=4)


def mutate(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for op, pos, byte in ops:
        pos %= max(len(out), 1)
        if op == "flip":
            out[pos:pos + 1] = byte
        elif op == "insert":
            out[pos:pos] = byte
        else:
            del out[pos:pos + 1]
    return bytes(out)


@FUZZ
@given(ops=MUTATIONS, cut=st.integers(1, 64))
def test_mutated_requests_get_a_valid_answer_or_a_close(
    running: Running, ops: list[tuple[str, int, bytes]], cut: int
) -> None:
    running.upstream_splits[:] = []
    request = mutate(REQUEST, ops)
    data = exchange(running.app.port, [request[:cut], request[cut:]])
    responses = parse_responses(data)  # whatever came back is well-formed HTTP/1.1
    for status, body in responses:
        assert 200 <= status < 600
        if status >= 400:
            assert body.startswith(b'{"error":{"code":%d' % status)
    assert not running.errors.records


def test_no_connection_leaks_after_fuzzing(running: Running) -> None:
    running.quiesce()
    data = exchange(running.app.port, [REQUEST])
    assert parse_responses(data) == [(200, SSE)]
    running.quiesce()
    assert not running.errors.records
