"""Helpers for the streaming tests: a client that reads a response piece by piece, and small
building blocks for fake-upstream scripts.

``StreamClient`` frames its requests and parses responses with an h11 CLIENT over a plain
loopback socket (optionally with a small SO_RCVBUF), so a test can read the head, then each
body piece as it arrives, or nothing at all for a while. It keeps every raw byte received
(unless told not to) for framing checks such as "no terminating chunk".
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterable

import h11

from tests.conftest import AUTH
from tests.fakeor import Responder

CHAT = b"/api/v1/chat/completions"
LAST_CHUNK = b"0\r\n\r\n"


class Truncated(Exception):
    """The server closed the connection before the response body was complete."""


class StreamClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 keep_raw: bool = True) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)
        self.keep_raw = keep_raw
        self.raw = bytearray()
        self.eof = False

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None, keep_raw: bool = True,
                      limit: int = 64 * 1024) -> StreamClient:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:  # before connect, so the advertised window is small too
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer, keep_raw)

    async def request(self, body: bytes = b'{"model":"m","stream":true}', *,
                      target: bytes = CHAT, method: bytes = b"POST",
                      headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """Send one complete request (h11-framed, with the proxy's access key)."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        head = [(b"Host", b"proxy.test"), AUTH, (b"Content-Type", b"application/json"),
                (b"Content-Length", str(len(body)).encode()), *headers]
        out = self.conn.send(h11.Request(method=method, target=target, headers=head)) or b""
        if body:
            out += self.conn.send(h11.Data(data=body)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        self.writer.write(out)
        await self.writer.drain()

    async def _read(self) -> bytes:
        try:
            data = await self.reader.read(65536)
        except ConnectionError:
            data = b""
        if not data:
            self.eof = True
        elif self.keep_raw:
            self.raw += data
        return data

    async def _event(self) -> h11.Event:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self.eof:
                    raise Truncated(str(exc)) from exc
                raise
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self._read())
                continue
            assert not isinstance(event, type)
            return event

    async def head(self, timeout: float = 5.0) -> h11.Response:
        async with asyncio.timeout(timeout):
            while True:
                event = await self._event()
                if isinstance(event, h11.InformationalResponse):
                    continue
                assert isinstance(event, h11.Response), event
                return event

    async def data(self, timeout: float = 5.0) -> bytes | None:
        """The next body bytes, or None at the end of the message."""
        async with asyncio.timeout(timeout):
            event = await self._event()
        if isinstance(event, h11.EndOfMessage):
            return None
        assert isinstance(event, h11.Data), event
        return bytes(event.data)

    async def read_exactly(self, n: int, timeout: float = 5.0) -> bytes:
        """Exactly ``n`` body bytes; fails if a body piece would overshoot or the body ends."""
        got = bytearray()
        async with asyncio.timeout(timeout):
            while len(got) < n:
                piece = await self.data(timeout)
                assert piece is not None, f"body ended after {len(got)} of {n} bytes"
                got += piece
        assert len(got) == n, f"got {len(got)} bytes, expected {n}"
        return bytes(got)

    async def body(self, timeout: float = 10.0) -> bytes:
        """The rest of the body up to a proper end of message."""
        parts: list[bytes] = []
        async with asyncio.timeout(timeout):
            while (piece := await self.data(timeout)) is not None:
                parts.append(piece)
        return b"".join(parts)

    async def truncated_body(self, timeout: float = 5.0) -> bytes:
        """Read until the server closes; the body must NOT have ended properly."""
        parts: list[bytes] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    piece = await self.data(timeout)
                    if piece is None:
                        raise AssertionError("the response ended properly; expected a cut-off")
                    parts.append(piece)
        except Truncated:
            return b"".join(parts)

    async def wait_eof(self, timeout: float = 5.0) -> bytes:
        """Read raw bytes until the server closes the connection; returns what came."""
        extra = bytearray()
        async with asyncio.timeout(timeout):
            while not self.eof:
                extra += await self._read()
        return bytes(extra)

    def close(self) -> None:
        """Drop the connection at once (what an impatient client does)."""
        self.writer.transport.abort()


def header_values(resp: h11.Response, name: bytes) -> list[bytes]:
    return [v for n, v in resp.headers if n == name.lower()]


async def hold(resp: Responder, timeout: float = 10.0) -> None:
    """Keep the upstream connection open and silent until the proxy closes it."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await resp.writer.wait_closed()


async def gate(event: asyncio.Event, timeout: float = 10.0) -> bool:
    """Wait for the test to open the gate; False if it never does."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0,
                     step: float = 0.01) -> None:
    """Wait until ``predicate()`` is true, polling; raises TimeoutError otherwise."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the fake's state has no event to wait on
            await asyncio.sleep(step)


async def close_gracefully(resp: Responder, timeout: float = 5.0) -> None:
    """Close the upstream side cleanly (TLS close_notify after every byte written)."""
    resp.writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await resp.writer.wait_closed()


SSE_HEADERS = [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache"),
               (b"X-Generation-Id", b"gen-stream-1")]
