"""One keep-alive HTTP/1.1 connection to the upstream: an h11 CLIENT over a Stream.

It frames requests and responses (never by hand), names each phase's timeout, and says when
it may be reused: only when both h11 sides are DONE (RFC 9112 §9.3). Protocol and socket
failures leave here as UpstreamError, tagged with whether any response byte had arrived.
"""

from __future__ import annotations

import enum
import time

import h11

from orproxy.errors import (
    StreamClosed,
    StreamTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from orproxy.stream import Stream

Headers = list[tuple[bytes, bytes]]


class ConnState(enum.Enum):
    ACTIVE = "active"  # a request/response cycle is under way
    IDLE = "idle"  # in the pool, reusable
    CLOSED = "closed"


class UpstreamConnection:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.state = ConnState.ACTIVE
        self.reused = False
        self.idle_since = 0.0
        self.got_response_bytes = False
        self.reusable_framing = True  # False once a response was framed suspiciously

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.state.value} reused={self.reused}>"

    def send_request(self, method: bytes, target: bytes, headers: Headers, body: bytes) -> None:
        """Write the whole request in one write (head, body and end coalesced)."""
        conn = self.h11
        try:
            parts = conn.send_with_data_passthrough(
                h11.Request(method=method, target=target, headers=headers)) or []
            if body:  # passed through as it is: no copy of a large body
                parts += conn.send_with_data_passthrough(h11.Data(data=body)) or ()
            parts += conn.send_with_data_passthrough(h11.EndOfMessage()) or ()
        except h11.LocalProtocolError as exc:
            raise UpstreamProtocolError(f"cannot frame request: {exc}") from exc
        try:
            self.stream.writelines(parts)
        except StreamClosed as exc:
            raise UpstreamProtocolError("connection closed before the request was sent") from exc

    async def receive_head(self, timeout: float) -> h11.Response:
        """The final response head (1xx heads are skipped), within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = await self._next_event(deadline - time.monotonic())
            except UpstreamTimeout as exc:
                raise UpstreamTimeout(f"no response within {timeout:g}s",
                                      before_response=exc.before_response) from None
            if isinstance(event, h11.Response):
                names = {name for name, _ in event.headers}
                if b"content-length" in names and b"transfer-encoding" in names:
                    # RFC 9112 §6.3: a sign of response splitting; use it once, never again
                    self.reusable_framing = False
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise UpstreamProtocolError(f"unexpected {type(event).__name__} before response")

    def take_buffered(self) -> tuple[bytes, bool]:
        """Body bytes h11 can give without reading the socket, and whether the message is
        complete. Several Data events are joined so that one write carries them."""
        parts: list[bytes] = []
        conn = self.h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(f"bad response body: {exc}",
                                            before_response=False) from exc
            if type(event) is h11.Data:
                parts.append(event.data)
            elif type(event) is h11.EndOfMessage:
                return b"".join(parts), True
            elif event is h11.NEED_DATA:
                return b"".join(parts), False
            else:
                raise UpstreamProtocolError(f"unexpected {type(event).__name__} in body",
                                            before_response=False)

    async def receive_body(self, timeout: float) -> tuple[bytes, bool]:
        """The next body bytes (waiting up to ``timeout`` between reads) and whether the
        message is complete."""
        while True:
            data, ended = self.take_buffered()
            if data or ended:
                return data, ended
            await self._receive(timeout)

    async def _next_event(self, timeout: float) -> h11.Event:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(f"bad response: {exc}",
                                            before_response=not self.got_response_bytes) from exc
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type)
                return event
            await self._receive(timeout)

    async def _receive(self, timeout: float) -> None:
        before = not self.got_response_bytes
        try:
            data = await self.stream.read(max(timeout, 0.0))
        except StreamTimeout as exc:
            raise UpstreamTimeout(f"upstream silent for {timeout:g}s",
                                  before_response=before) from exc
        if data:
            self.got_response_bytes = True
        elif before:
            raise UpstreamProtocolError("connection closed before any response byte")
        elif self.stream.reset:  # not the end of a close-delimited body: a truncation
            raise UpstreamProtocolError("upstream reset mid-body", before_response=False)
        self.h11.receive_data(data)

    @property
    def clean(self) -> bool:
        """Not one byte more than the responses so far: bytes past the end of a response (a
        body longer than its Content-Length, anything sent while idle in the pool) would
        otherwise be read as the answer to the next request, perhaps another client's."""
        return (self.reusable_framing and not self.h11.trailing_data[0]
                and self.stream.quiet)

    @property
    def reusable(self) -> bool:
        """The cycle ended cleanly on both sides (RFC 9112 §9.3)."""
        return (self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE
                and self.clean)

    def recycle(self) -> bool:
        """Prepare for the next request; False if the connection cannot be reused."""
        if not self.reusable:
            return False
        self.h11.start_next_cycle()
        self.reused = True
        self.got_response_bytes = False
        self.state = ConnState.IDLE
        self.idle_since = time.monotonic()
        return True

    def close(self) -> None:
        if self.state is not ConnState.CLOSED:
            self.state = ConnState.CLOSED
            self.stream.abort()


def is_retryable_on_fresh(conn: UpstreamConnection, exc: UpstreamError) -> bool:
    """A reused connection that failed before any response byte was probably closed by the
    upstream while idle: the request may be sent again on a new connection."""
    return conn.reused and exc.before_response and not isinstance(exc, UpstreamTimeout)
