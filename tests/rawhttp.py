"""A minimal raw HTTP/1.1 client for protocol tests: bytes out, parsed responses back.

Requests are written exactly as given (so tests can send malformed or pipelined input);
responses are parsed with an h11 CLIENT, which also checks the proxy's framing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import h11


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    http_version: bytes = b"1.1"
    chunks: list[bytes] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        values = self.headers_named(name)
        assert len(values) <= 1, f"{name!r} appears {len(values)} times"
        return values[0] if values else None

    def headers_named(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class RawClient:
    """One connection; ``send`` raw bytes, ``response`` reads the next response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)
        self.raw = bytearray()  # every byte received, for framing checks

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def expect(self, method: bytes) -> None:
        """Tell the parser which request the next response answers (for HEAD and 1.0)."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        self.conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"x")]))
        self.conn.send(h11.EndOfMessage())

    async def read_some(self, timeout: float = 5.0) -> bytes:
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        self.raw += data
        return data

    async def response(self, method: bytes = b"GET", timeout: float = 10.0) -> Response:
        self.expect(method)
        async with asyncio.timeout(timeout):
            head: h11.Response | None = None
            chunks: list[bytes] = []
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.read_some(timeout))
                elif isinstance(event, h11.InformationalResponse):
                    continue
                elif isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    return Response(head.status_code, list(head.headers.raw_items()),
                                    b"".join(chunks), head.http_version, chunks)
                else:
                    raise AssertionError(f"unexpected {event!r}")

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (EOF or reset)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        return True
                    self.raw += data
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.writer.transport.abort()


async def roundtrip(port: int, data: bytes, method: bytes = b"GET") -> Response:
    client = await RawClient.connect(port)
    try:
        await client.send(data)
        return await client.response(method)
    finally:
        client.close()
