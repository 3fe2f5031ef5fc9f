"""The one test client: raw bytes out, responses parsed by an h11 CLIENT, every byte kept.

Requests go out exactly as given (``send``: malformed, trickled or pipelined input), or
framed by h11 with the proxy's access key (``request``). A response is read whole
(``response``), or its head first and then its body piece by piece as the pieces arrive
(``head``, ``data``, ``read_exactly``, ``body``), which is how a streaming test sees that a
piece got through before the next one existed. Parsing with h11 also checks the proxy's
framing; ``raw`` keeps every byte received for what h11 does not show (the terminating
chunk, nothing before a 401). The end of the connection, a FIN or a reset, sets ``eof``
(and ``reset``). A small ``rcvbuf`` makes a slow reader, ``stop_reading`` one that never
reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import h11

from tests.conftest import AUTH

CHAT = b"/api/v1/chat/completions"
LAST_CHUNK = b"0\r\n\r\n"
STREAM_BODY = b'{"model":"m","stream":true}'


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    http_version: bytes = b"1.1"

    def header(self, name: bytes) -> bytes | None:
        values = self.headers_named(name)
        assert len(values) <= 1, f"{name!r} appears {len(values)} times"
        return values[0] if values else None

    def headers_named(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


def header_values(head: h11.Response, name: bytes) -> list[bytes]:
    """Every value of ``name`` in a head from ``RawClient.head`` (h11 lowercases names)."""
    return [v for n, v in head.headers if n == name.lower()]


class Truncated(Exception):
    """The connection ended before the response did."""


class RawClient:
    """One connection to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 keep_raw: bool = True) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)
        self.keep_raw = keep_raw
        self.raw = bytearray()  # every byte received, unless keep_raw is off
        self.eof = False
        self.reset = False  # the end was a reset, not an orderly close

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None, keep_raw: bool = True,
                      limit: int = 64 * 1024) -> RawClient:
        """``rcvbuf``: the kernel's receive buffer, set before connecting so the window the
        proxy sees is small too; ``limit``: how much the reader holds before it stops
        taking bytes from the socket."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer, keep_raw=keep_raw)

    # --- sending ---------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Bytes exactly as given (use ``expect`` or the ``method`` of the reads for HEAD)."""
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, body: bytes = STREAM_BODY, *, target: bytes = CHAT,
                      method: bytes = b"POST", headers: Iterable[tuple[bytes, bytes]] = (),
                      ) -> None:
        """One complete request framed by h11, with the proxy's access key."""
        self._next_cycle()
        head = [(b"Host", b"proxy.test"), AUTH, (b"Content-Type", b"application/json"),
                (b"Content-Length", str(len(body)).encode()), *headers]
        out = self.conn.send(h11.Request(method=method, target=target, headers=head)) or b""
        if body:
            out += self.conn.send(h11.Data(data=body)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        await self.send(out)

    def expect(self, method: bytes = b"GET") -> None:
        """Read what comes next as the answer to a ``method`` request sent raw (h11 must
        know a HEAD, whose answer has no body). Nothing to do after ``request``."""
        self._next_cycle()
        if self.conn.our_state is h11.IDLE:
            self.conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"x")]))
            self.conn.send(h11.EndOfMessage())

    def _next_cycle(self) -> None:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()

    # --- reading ---------------------------------------------------------------------------

    async def _read(self) -> bytes:
        try:
            data = await self.reader.read(65536)
        except ConnectionError:
            self.reset = True
            data = b""
        if not data:
            self.eof = True
        elif self.keep_raw:
            self.raw += data
        return data

    async def read_some(self, timeout: float = 5.0) -> bytes:
        """The next bytes as they come, kept in ``raw`` but not parsed."""
        async with asyncio.timeout(timeout):
            return await self._read()

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

    async def head(self, timeout: float = 5.0, method: bytes = b"GET") -> h11.Response:
        """The next response's head (interim 1xx skipped); ``method`` as for ``expect``."""
        self.expect(method)
        async with asyncio.timeout(timeout):
            while True:
                event = await self._event()
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    raise Truncated("the connection closed before a response")
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
        pieces: list[bytes] = []
        async with asyncio.timeout(timeout):
            while (piece := await self.data(timeout)) is not None:
                pieces.append(piece)
        return b"".join(pieces)

    async def response(self, method: bytes = b"GET", timeout: float = 10.0) -> Response:
        """The next response, whole."""
        async with asyncio.timeout(timeout):
            head = await self.head(timeout, method)
            body = await self.body(timeout)
        return Response(head.status_code, list(head.headers.raw_items()), body,
                        head.http_version)

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
        """Read raw bytes until the server closes the connection (FIN or reset); returns
        what came meanwhile. A TimeoutError if it stays open."""
        extra = bytearray()
        async with asyncio.timeout(timeout):
            while not self.eof:
                extra += await self._read()
        return bytes(extra)

    def stop_reading(self) -> None:
        """Take nothing more from the socket (a client that never reads): what the proxy
        sends waits in the kernel's buffers, then in its own."""
        transport = self.writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()

    def close(self) -> None:
        """Drop the connection at once (what an impatient client does)."""
        self.writer.transport.abort()


@contextlib.asynccontextmanager
async def connected(port: int, *, rcvbuf: int | None = None, keep_raw: bool = True,
                    limit: int = 64 * 1024) -> AsyncIterator[RawClient]:
    """A ``RawClient`` (as ``RawClient.connect`` makes it), dropped at the end."""
    client = await RawClient.connect(port, rcvbuf=rcvbuf, keep_raw=keep_raw, limit=limit)
    try:
        yield client
    finally:
        client.close()


def request_method(data: bytes) -> bytes:
    """The method of the request line in ``data``, if it is one h11 takes (else GET: only
    HEAD changes how an answer is framed)."""
    method = data.split(b" ", 1)[0]
    return method if method.isalpha() and method.isupper() else b"GET"


async def roundtrip(port: int, data: bytes, method: bytes | None = None, *,
                    timeout: float = 30.0) -> Response:
    """``data`` on a connection of its own, and the answer; the connection is dropped after
    it (a client that lingers would hold a proxy slot). ``method``: by default the request
    line's."""
    async with connected(port) as client:
        await client.send(data)
        return await client.response(method or request_method(data), timeout)


async def refused(port: int) -> bool:
    """True if nothing accepts connections on ``port`` any more."""
    try:
        client = await RawClient.connect(port)
    except ConnectionRefusedError:
        return True
    client.close()
    return False
