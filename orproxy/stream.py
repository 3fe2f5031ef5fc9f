"""The one place that touches sockets and TLS.

``Stream`` is an asyncio Protocol read as a pull stream: ``read()`` returns whatever bytes
have arrived (or waits for some, with a timeout), ``write()`` queues bytes, ``drain()``
waits while the peer is slow. A Protocol rather than StreamReader/Writer saves a layer of
buffering and a task wake-up per read. Reading pauses itself once ``READ_HIGH_WATER``
bytes wait unread, so a fast sender cannot make us buffer without bound. Foreign
exceptions (OSError, ssl errors, timeouts) become ``StreamClosed`` / ``StreamTimeout`` here
and nowhere else.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import Callable
from typing import cast

from orproxy.errors import StreamClosed, StreamTimeout, map_exceptions

READ_HIGH_WATER = 256 * 1024
WRITE_HIGH_WATER = 64 * 1024
# From 3.12 a socket transport's writelines is a sendmsg of the buffers; before, a join.
GATHER_WRITES = sys.version_info >= (3, 12)
LARGE_WRITE = 16 * 1024  # worth a send of its own rather than a copy


class Stream(asyncio.Protocol):
    def __init__(self, on_made: Callable[[Stream], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._lost: BaseException | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._on_made = on_made
        # Called once when the peer sends EOF or the connection is lost: lets the owner
        # notice a client that went away while nobody is reading.
        self.on_peer_gone: Callable[[], None] | None = None
        # Push mode (see ``set_consumer``): bytes go straight to a callback, no task wake-up.
        self._consumer: Callable[[bytes], None] | None = None
        self._consumer_end: Callable[[], None] | None = None
        # Called when a paused writer may write again (push-mode backpressure).
        self.on_writable: Callable[[], None] | None = None

    # --- asyncio.Protocol callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # other loops' transports (uvloop's) need not subclass asyncio.Transport
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self._consumer is not None:
            self._consumer(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= READ_HIGH_WATER:
            self.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        self._end_consumer()
        self._peer_gone()
        # keep the write side open (the owner decides when to close); TLS cannot half-close
        # and asyncio warns if asked to
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or StreamClosed("connection closed")
        self._eof = True
        self._wake_reader()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(StreamClosed("connection lost"))
        self._end_consumer()
        self._peer_gone()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_writable is not None:
            self.on_writable()

    # --- push mode ------------------------------------------------------------------------

    def set_consumer(self, on_data: Callable[[bytes], None], on_end: Callable[[], None]) -> None:
        """Hand every received byte to ``on_data`` as it arrives (bytes already buffered
        first), and call ``on_end`` once at EOF or loss. Used to relay a body inside the
        I/O callback instead of waking a task per chunk."""
        self._consumer, self._consumer_end = on_data, on_end
        if self._chunks:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            self.resume_reading()
            on_data(data)
        if self._eof and self._consumer is not None:
            self._end_consumer()

    def clear_consumer(self) -> None:
        self._consumer = self._consumer_end = None

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self._lost:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self._lost:
            self._read_paused = False
            self.transport.resume_reading()

    def _end_consumer(self) -> None:
        end = self._consumer_end
        self._consumer = self._consumer_end = None
        if end is not None:
            end()

    # --- the pull interface -----------------------------------------------------------------

    async def read(self, timeout: float | None) -> bytes:
        """Bytes received so far, waiting up to ``timeout`` for some; b"" at EOF."""
        if not self._chunks and not self._eof:
            self._read_waiter = self._loop.create_future()
            try:
                await self._wait(self._read_waiter, timeout, "read timed out")
            finally:
                self._read_waiter = None
        if not self._chunks:
            return b""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self._lost is not None or transport.is_closing():
            raise StreamClosed("write on a closed connection")
        transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        """Several buffers, sent together where that costs no copy of a large one."""
        if len(parts) == 1:
            self.write(parts[0])
            return
        transport = self.transport
        if transport is None or self._lost is not None or transport.is_closing():
            raise StreamClosed("write on a closed connection")
        if GATHER_WRITES:  # a sendmsg of the buffers as they are
            transport.writelines(parts)
            return
        if max(map(len, parts), default=0) < LARGE_WRITE:  # a head and a small body, mostly
            transport.write(b"".join(parts))
            return
        # Before 3.12 asyncio joins them, copying every byte (48 us for a 344 KB /models
        # answer): small ones are joined, a large one goes in a write of its own.
        small: list[bytes] = []
        for part in parts:
            if len(part) < LARGE_WRITE:
                small.append(part)
                continue
            if small:
                transport.write(b"".join(small))
                small.clear()
            transport.write(part)
        if small:
            transport.write(b"".join(small))

    @property
    def needs_drain(self) -> bool:
        return self._write_paused

    async def drain(self, timeout: float | None) -> None:
        """Wait until the peer has taken enough of what was written."""
        if self._lost is not None:
            raise StreamClosed("connection lost")
        if not self._write_paused:
            return
        self._drain_waiter = self._loop.create_future()
        await self._wait(self._drain_waiter, timeout, "write timed out")

    async def _wait(self, waiter: asyncio.Future[None], timeout: float | None,
                    message: str) -> None:
        """Await a waiter with one timer (cheaper than an asyncio.timeout() context)."""
        timer = (self._loop.call_later(timeout, _expire, waiter, message)
                 if timeout is not None else None)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()

    @property
    def lost(self) -> BaseException | None:
        return self._lost

    @property
    def reset(self) -> bool:
        """The connection ended by an error (e.g. RST), not by an orderly close: for a body
        delimited by the close, that means truncated, not complete."""
        return isinstance(self._lost, OSError)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    @property
    def quiet(self) -> bool:
        """Open, nothing unread, no EOF: safe to send a new request on (keep-alive reuse)."""
        return not self._chunks and not self._eof and not self.is_closed

    @property
    def is_closed(self) -> bool:
        return self._lost is not None or self.transport is None or self.transport.is_closing()

    async def linger_close(self, seconds: float) -> None:
        """Close after the peer has read our last response: send FIN, then read and drop
        what the peer is still sending for up to ``seconds``. Closing with unread input
        makes the kernel send RST, which can destroy the response before the peer reads it
        (nginx's lingering_close does the same)."""
        transport = self.transport
        if transport is None or self.is_closed:
            return
        if transport.can_write_eof():
            transport.write_eof()
        deadline = self._loop.time() + seconds
        try:
            while (left := deadline - self._loop.time()) > 0:
                if not await self.read(left):
                    break
        except (StreamClosed, StreamTimeout, OSError):
            pass
        self.close(seconds)

    def close(self, flush_seconds: float | None = None) -> None:
        """Flush what was written, then close. With ``flush_seconds``, a peer that does not
        take the rest within that time is cut off: close() alone would keep the socket and
        its buffer for as long as the peer keeps its window shut."""
        transport = self.transport
        if transport is None:
            return
        transport.close()
        if flush_seconds is not None and transport.get_write_buffer_size():
            self._loop.call_later(flush_seconds, transport.abort)

    def abort(self) -> None:
        """Close at once, dropping unsent bytes."""
        if self.transport is not None:
            self.transport.abort()

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str,
                        timeout: float) -> None:
        """Upgrade this (plain, idle) connection to TLS, e.g. after a proxy tunnel."""
        if self.transport is None or self._chunks:
            raise StreamClosed("unexpected bytes before the TLS handshake")
        with map_exceptions(_CONNECT_ERRORS):
            new = await self._loop.start_tls(self.transport, self, context,
                                             server_hostname=server_hostname,
                                             ssl_handshake_timeout=timeout)
        self.transport = cast(asyncio.Transport, new)

    # --- internals --------------------------------------------------------------------------

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _peer_gone(self) -> None:
        callback, self.on_peer_gone = self.on_peer_gone, None
        if callback is not None:
            callback()


def _expire(waiter: asyncio.Future[None], message: str) -> None:
    if not waiter.done():
        waiter.set_exception(StreamTimeout(message))


async def connect(
    host: str,
    port: int,
    *,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Stream:
    """Open a TCP (optionally TLS) connection; failures become StreamClosed/StreamTimeout."""
    loop = asyncio.get_running_loop()
    with map_exceptions(_CONNECT_ERRORS):
        async with asyncio.timeout(timeout):
            _, stream = await loop.create_connection(
                Stream, host, port, ssl=tls,
                server_hostname=server_hostname if tls else None,
            )
    return stream


# TimeoutError first: since 3.11 it is an OSError too. ssl errors are OSErrors as well.
_CONNECT_ERRORS: dict[type[BaseException], Callable[[str], Exception]] = {
    TimeoutError: lambda message: StreamTimeout(f"timed out ({message})"),
    OSError: lambda message: StreamClosed(f"failed: {message}"),
    ssl.CertificateError: lambda message: StreamClosed(f"certificate: {message}"),
}
