"""One keep-alive HTTP/1.1 connection to the upstream: an h11 CLIENT over a Stream.

It frames requests and responses (never by hand), names each phase's timeout, and says when
it may be reused: only when both h11 sides are DONE and not one byte more arrived (RFC 9112
§9.3). After the response head, the body is *pushed* to one consumer at a time through a
narrow interface (``read_body`` / ``pause`` / ``resume`` / ``stop_body``), and this is
the one place that knows the rule "a reset truncates, an orderly close ends" and the
upstream's idle timeout. Failures leave as UpstreamError, tagged with the stage reached.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Sequence
from typing import Protocol

import h11

from orproxy.errors import (
    Stage,
    StreamClosed,
    StreamTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from orproxy.stream import Stream

Headers = list[tuple[bytes, bytes]]
SEND_BATCH_BYTES = 256 * 1024  # request body written in batches of this, with backpressure


class ConnState(enum.Enum):
    ACTIVE = "active"  # a request/response cycle is under way
    IDLE = "idle"  # in the pool, reusable
    CLOSED = "closed"


class BodyConsumer(Protocol):
    """Where a response body goes, piece by piece, inside the I/O callbacks."""

    def on_body(self, data: bytes, end: bool) -> None: ...

    def on_body_error(self, exc: UpstreamError) -> None: ...


class UpstreamConnection:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._h11 = h11.Connection(h11.CLIENT)
        self.state = ConnState.ACTIVE
        self.reused = False
        self.idle_since = 0.0
        self.stage = Stage.CONNECT
        self.reusable_framing = True  # False once a response was framed suspiciously
        self._consumer: BodyConsumer | None = None
        self._idle_timeout = 0.0
        self._last_data = 0.0
        self._paused = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()  # connections are made in it

    def __repr__(self) -> str:
        return (f"<UpstreamConnection {self.state.value} {self.stage.value} "
                f"reused={self.reused}>")

    # --- request and response head ----------------------------------------------------------

    async def send_request(self, method: bytes, target: bytes, headers: Headers,
                           body: Sequence[bytes], write_timeout: float) -> None:
        """Write the request: head, body pieces and end, coalesced into few writes, waiting
        for the upstream to take each batch of a large body (so it is never copied whole
        into the transport's buffer)."""
        conn = self._h11
        try:
            batch = conn.send_with_data_passthrough(
                h11.Request(method=method, target=target, headers=headers)) or []
            size = 0
            for piece in body:
                batch += conn.send_with_data_passthrough(h11.Data(data=piece)) or ()
                size += len(piece)
                if size >= SEND_BATCH_BYTES:
                    self._write(batch)
                    batch, size = [], 0
                    await self._drain(write_timeout)
            batch += conn.send_with_data_passthrough(h11.EndOfMessage()) or ()
        except h11.LocalProtocolError as exc:
            raise UpstreamProtocolError(f"cannot frame request: {exc}", self.stage) from exc
        self._write(batch)

    def _write(self, parts: list[bytes]) -> None:
        try:
            self.stream.writelines(parts)
        except StreamClosed as exc:
            raise UpstreamProtocolError("connection closed while sending", self.stage) from exc
        self.stage = Stage.SENT

    async def _drain(self, timeout: float) -> None:
        try:
            await self.stream.drain(timeout)
        except StreamTimeout as exc:
            raise UpstreamTimeout("upstream did not take the request body", self.stage) from exc
        except StreamClosed as exc:
            raise UpstreamProtocolError("connection closed while sending", self.stage) from exc

    async def receive_head(self, timeout: float) -> h11.Response:
        """The final response head (1xx heads are skipped), within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(f"bad response: {exc}", self.stage) from exc
            if event is h11.NEED_DATA:
                await self._receive(deadline - time.monotonic(), timeout)
            elif type(event) is h11.Response:
                names = {name for name, _ in event.headers}
                if b"content-length" in names and b"transfer-encoding" in names:
                    # RFC 9112 §6.3: a sign of response splitting; use it once, never again
                    self.reusable_framing = False
                return event
            elif type(event) is not h11.InformationalResponse:
                raise UpstreamProtocolError("unexpected event before the response",
                                            self.stage)

    async def _receive(self, timeout: float, total: float) -> None:
        try:
            data = await self.stream.read(max(timeout, 0.0))
        except StreamTimeout as exc:
            raise UpstreamTimeout(f"no response within {total:g}s", self.stage) from exc
        if not data:
            raise UpstreamProtocolError("connection closed before the response", self.stage)
        self.stage = Stage.RESPONSE
        self._h11.receive_data(data)

    # --- the body, pushed to one consumer at a time -------------------------------------------

    def read_body(self, consumer: BodyConsumer, idle_timeout: float) -> None:
        """Push the body to ``consumer`` from now on: what h11 already holds at once, then
        each read inside the I/O callback. The consumer is told of the end (``end=True``)
        or of a failure exactly once, unless it is replaced or stopped first."""
        self._consumer = consumer
        self._idle_timeout = idle_timeout
        self._pump()
        if self._consumer is not consumer:
            return  # it was all here already: no timer, no socket reads
        loop = self._loop
        self._last_data = loop.time()
        if self._idle_timer is None:
            self._idle_timer = loop.call_later(idle_timeout, self._check_idle)
        self.stream.set_consumer(self._feed, self._end)

    def pause(self) -> None:
        """Stop reading the socket (the consumer cannot take more now); not silence."""
        self._paused = True
        self.stream.pause_reading()

    def resume(self) -> None:
        self._paused = False
        self._last_data = asyncio.get_running_loop().time()
        self.stream.resume_reading()

    def stop_body(self) -> None:
        """Detach the consumer (idempotent); the connection's fate is the caller's."""
        self._consumer = None
        self.stream.clear_consumer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _feed(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        self._h11.receive_data(data)
        self._pump()

    def _end(self) -> None:
        if self.stream.reset:  # an RST is never the end of a close-delimited body
            self._fail(UpstreamProtocolError("upstream reset mid-body", Stage.RESPONSE))
            return
        self._h11.receive_data(b"")
        self._pump()  # a close-delimited body ends here; any other is cut short
        if self._consumer is not None:
            self._fail(UpstreamProtocolError("upstream closed mid-body", Stage.RESPONSE))

    def _pump(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        parts: list[bytes] = []
        ended = False
        try:
            while True:
                event = self._h11.next_event()
                if type(event) is h11.Data:
                    parts.append(event.data)
                elif type(event) is h11.EndOfMessage:
                    ended = True
                    break
                elif event is h11.NEED_DATA:
                    break
                else:
                    raise UpstreamProtocolError("unexpected event in the body", Stage.RESPONSE)
        except h11.RemoteProtocolError as exc:
            self._fail(UpstreamProtocolError(f"bad response body: {exc}", Stage.RESPONSE))
            return
        except UpstreamError as exc:
            self._fail(exc)
            return
        if ended:
            self.stop_body()
        if parts or ended:
            consumer.on_body(parts[0] if len(parts) == 1 else b"".join(parts), ended)

    def _fail(self, exc: UpstreamError) -> None:
        consumer = self._consumer
        self.stop_body()
        if consumer is not None:
            consumer.on_body_error(exc)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._consumer is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._paused:  # waiting on our consumer is not the upstream's silence
            self._last_data = now
        left = self._last_data + self._idle_timeout - now
        if left > 0:
            self._idle_timer = loop.call_later(left, self._check_idle)
            return
        self._fail(UpstreamTimeout(f"upstream silent for {self._idle_timeout:g}s",
                                   Stage.RESPONSE))

    # --- reuse ------------------------------------------------------------------------------

    @property
    def clean(self) -> bool:
        """Not one byte more than the responses so far: bytes past the end of a response (a
        body longer than its Content-Length, anything sent while idle in the pool) would
        otherwise be read as the answer to the next request, perhaps another client's."""
        return (self.reusable_framing and not self._h11.trailing_data[0]
                and self.stream.quiet)

    @property
    def reusable(self) -> bool:
        """The cycle ended cleanly on both sides (RFC 9112 §9.3)."""
        return (self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE
                and self.clean)

    def recycle(self) -> bool:
        """Prepare for the next request; False if the connection cannot be reused."""
        if not self.reusable:
            return False
        self._h11.start_next_cycle()
        self.reused = True
        self.stage = Stage.CONNECT
        self.state = ConnState.IDLE
        return True

    def close(self) -> None:
        if self.state is not ConnState.CLOSED:
            self.state = ConnState.CLOSED
            self.stop_body()
            self.stream.abort()


def may_resend(conn: UpstreamConnection, exc: UpstreamError) -> bool:
    """The one case where a request that may have gone out goes out again: a reused
    connection that closed (not timed out) before any response byte — the upstream dropped
    it while idle, the race every keep-alive client meets (RFC 9112 §9.3.1)."""
    return (conn.reused and exc.stage is not Stage.RESPONSE
            and not isinstance(exc, UpstreamTimeout))
