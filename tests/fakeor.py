"""A fake OpenRouter for tests: an h11 server on loopback, over TLS from trustme.

Each request is answered by ``script(request, responder)``, an async function the test
sets. The fake records every request (method, target, raw headers, body) and every
connection's opening and closing, so tests can check what the proxy sent upstream and
that it closed what it should have. ``Responder`` frames with h11 by default and can also
write raw bytes, for upstream misbehaviour h11 would refuse to produce.

Also OpenRouter's shapes both ways: the bodies it answers with (``completion``,
``rate_limited_body`` with a ``reset_ms``, ``key_info`` …), and ``error_of``, which holds an
error answer of the proxy to OpenRouter's error shape.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import h11

if TYPE_CHECKING:
    from tests.rawhttp import Response


@dataclass
class Recorded:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    conn_id: int

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        assert len(values) <= 1, f"{name!r} sent {len(values)} times"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Responder:
    def __init__(self, conn: h11.Connection, writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.writer = writer

    async def head(self, status: int, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await self._send(h11.Response(status_code=status, headers=headers or []))

    async def data(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def raw_response(self, data: bytes) -> None:
        """Send a whole response as raw bytes (framing h11 would refuse to produce) and
        keep this side's h11 state in step, so the connection can serve the next request."""
        await self.raw(data)
        self.conn.send(h11.Response(status_code=200, headers=[(b"Content-Length", b"0")]))
        self.conn.send(h11.EndOfMessage())

    def abort(self) -> None:
        self.writer.transport.abort()

    def reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), not an orderly close."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def _send(self, event: h11.Event) -> None:
        out = self.conn.send(event)
        assert out is not None
        self.writer.write(out)
        await self.writer.drain()

    async def json(self, status: int, doc: Any, headers: list[tuple[bytes, bytes]] | None = None,
                   ) -> None:
        body = json.dumps(doc).encode()
        await self.head(status, [(b"Content-Type", b"application/json"),
                                 (b"Content-Length", str(len(body)).encode()), *(headers or [])])
        await self.data(body)
        await self.end()


Script = Callable[[Recorded, Responder], Awaitable[None]]


def completion(content: str = "hello", model: str = "test/model") -> dict[str, Any]:
    return {
        "id": "gen-123", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


async def ok_script(req: Recorded, resp: Responder) -> None:
    await resp.json(200, completion())


def reset_ms(seconds_from_now: float, now: float | None = None) -> int:
    """An X-RateLimit-Reset as OpenRouter writes it (epoch milliseconds), ``seconds_from_now``
    after ``now`` (a test clock's wall time; by default the real one)."""
    return int(((time.time() if now is None else now) + seconds_from_now) * 1000)


def rate_limited_body(reset_ms: int, message: str = "Rate limit exceeded.",
                      ) -> dict[str, Any]:
    return {"error": {"code": 429, "message": message, "metadata": {
        "headers": {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": str(reset_ms)}, "provider_name": None}}}


OVERLOAD_BODY = {"error": {"code": 429, "message": "Provider returned error", "metadata": {
    "raw": "google/gemma-3-27b-it:free is temporarily rate-limited upstream. Please retry "
           "shortly.", "provider_name": "Google AI Studio"}}}


@dataclass
class FakeOpenRouter:
    tls: ssl.SSLContext | None = None
    script: Script = ok_script
    requests: list[Recorded] = field(default_factory=list)
    opened: int = 0
    closed: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _conn_closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

    @property
    def open_connections(self) -> int:
        return self.opened - self.closed

    async def wait_closed(self, count: int, timeout: float = 5.0) -> None:
        """Wait until at least ``count`` connections have closed."""
        async with asyncio.timeout(timeout):
            while self.closed < count:
                self._conn_closed.clear()
                await self._conn_closed.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        self._writers.add(writer)
        conn_id = self.opened
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(conn, reader, conn_id)
                if request is None:
                    break
                self.requests.append(request)
                await self.script(request, Responder(conn, writer))
                if writer.transport.is_closing():
                    break
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                if conn.our_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, ssl.SSLError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            self._writers.discard(writer)
            self._conn_closed.set()
            writer.transport.abort()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader,
                            conn_id: int) -> Recorded | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return Recorded(head.method, head.target, list(head.headers.raw_items()),
                                bytes(body), conn_id)
            elif isinstance(event, h11.ConnectionClosed):
                return None


@dataclass
class SlowReadingFake(FakeOpenRouter):
    """The fake OpenRouter, reading each request at about ``piece / delay`` bytes a second:
    an upstream that takes a large body slowly, so the proxy must hold it meanwhile."""

    piece: int = 64 * 1024
    delay: float = 0.004

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader,
                            conn_id: int) -> Recorded | None:
        slow = cast(asyncio.StreamReader, _SlowReader(reader, self.piece, self.delay))
        return await super()._read_request(conn, slow, conn_id)


class _SlowReader:
    """A StreamReader stand-in that hands out at most ``piece`` bytes per ``delay``."""

    def __init__(self, reader: asyncio.StreamReader, piece: int, delay: float) -> None:
        self._reader = reader
        self._piece = piece
        self._delay = delay

    async def read(self, n: int) -> bytes:
        await asyncio.sleep(self._delay)
        return await self._reader.read(min(n, self._piece))


def key_info(*, label: str = "main", account: str = "user_1", limit: float | None = None,
             remaining: float | None = None, free_left: int = 50,
             expires_at: str | None = None) -> dict[str, Any]:
    """A ``GET /api/v1/key`` answer, as OpenRouter shapes it."""
    return {"data": {
        "label": label, "limit": limit, "limit_remaining": remaining, "limit_reset": "daily",
        "usage": 1.25, "usage_daily": 0.5, "usage_weekly": 0.75, "usage_monthly": 1.0,
        "is_free_tier": False, "expires_at": expires_at, "creator_user_id": account,
        "free_model_daily_requests": {"used": 1000 - free_left, "limit": 1000,
                                      "remaining": free_left},
        "rate_limit": {"requests": -1, "interval": "10s"},
    }}


def error_of(resp: Response) -> dict[str, Any]:
    """The ``error`` object of an error answer in OpenRouter's shape, checked: JSON, nothing
    but ``error``, its ``code`` the status, a message."""
    assert resp.header(b"content-type") == b"application/json", resp.headers
    doc = json.loads(resp.body)
    assert set(doc) == {"error"}, doc
    error = doc["error"]
    assert isinstance(error, dict)
    assert error["code"] == resp.status, doc
    assert isinstance(error["message"], str) and error["message"], doc
    return error
