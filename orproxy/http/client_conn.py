"""One client connection as an h11 SERVER: requests in, responses out, with limits.

Owns the client-side timeouts (keep-alive idle, head read, body read, write drain), the
body size limit, 100-continue, and the narrow interface the body relay writes through
(``send_body``, ``needs_drain``, ``on_writable``). h11's RemoteProtocolError becomes a
ClientRequestError with h11's status hint and our own words. It never writes framing by
hand and knows nothing of routing, keys or the upstream.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import h11

from orproxy.config import LimitsConfig, TimeoutsConfig
from orproxy.errors import ClientRequestError, StreamTimeout, client_protocol_error
from orproxy.http.chunks import ChunkedGuard
from orproxy.http.validate import BodyFraming
from orproxy.stream import Stream


class ClientConnection:
    def __init__(self, stream: Stream, limits: LimitsConfig, timeouts: TimeoutsConfig) -> None:
        self.stream = stream
        self.limits = limits
        self.timeouts = timeouts
        # h11 alone limits heads that arrive in pieces; room for a long target as well, so
        # that a split over-long target is answered 414 by validate, not 431 by h11
        self._h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=limits.max_head_bytes + limits.max_target_bytes)
        self.requests = 0

    def __repr__(self) -> str:
        return (f"<ClientConnection requests={self.requests} ours={self._h11.our_state} "
                f"theirs={self._h11.their_state}>")

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise client_protocol_error(exc.error_status_hint) from None

    async def next_request(self) -> h11.Request | None:
        """The next request head, or None when the client closed or idled out between
        requests. A head must arrive whole within ``client_head_seconds`` of its first byte
        (of the connection, for the first request): slow clients are cut off with 408.
        Between requests the wait is ``keepalive_seconds``."""
        first = self.requests == 0
        wait = self.timeouts.client_head_seconds if first else self.timeouts.keepalive_seconds
        deadline = time.monotonic() + self.timeouts.client_head_seconds if first else None
        while True:
            event = self._next_event()
            if type(event) is h11.Request:
                self.requests += 1
                return event
            if type(event) is h11.ConnectionClosed:
                return None
            if event is not h11.NEED_DATA:
                raise client_protocol_error(400)
            if deadline is None and self._h11.trailing_data[0]:
                deadline = time.monotonic() + self.timeouts.client_head_seconds
            timeout = wait if deadline is None else deadline - time.monotonic()
            try:
                data = await self.stream.read(max(timeout, 0.0))
            except StreamTimeout:
                if self._h11.trailing_data[0]:
                    raise ClientRequestError(408, "request head not received in time") from None
                return None
            if data and deadline is None:
                deadline = time.monotonic() + self.timeouts.client_head_seconds
            self._h11.receive_data(data)

    async def read_body(self, framing: BodyFraming) -> list[bytes]:
        """The whole request body as the pieces h11 gave (never joined: a large body is
        held once), bounded by ``max_body_bytes`` (413)."""
        limit = self.limits.max_body_bytes
        length = framing.content_length
        if length is not None and length > limit:
            raise ClientRequestError(413, "request body too large")
        guard = ChunkedGuard(limit) if framing.chunked else None
        if guard is not None:
            guard.feed(self._h11.trailing_data[0])
        if self._h11.they_are_waiting_for_100_continue:
            self.send(h11.InformationalResponse(status_code=100, headers=[]))
        parts: list[bytes] = []
        size = 0
        while True:
            event = self._next_event()
            if type(event) is h11.Data:
                size += len(event.data)
                if size > limit:
                    raise ClientRequestError(413, "request body too large")
                parts.append(event.data)
            elif type(event) is h11.EndOfMessage:
                return parts
            elif event is h11.NEED_DATA:
                try:
                    data = await self.stream.read(self.timeouts.client_body_seconds)
                except StreamTimeout:
                    raise ClientRequestError(408, "request body not received in time") from None
                if guard is not None and not guard.done:
                    guard.feed(data)
                self._h11.receive_data(data)
            else:
                raise client_protocol_error(400)

    def end_if_bodiless(self, framing: BodyFraming) -> bool:
        """Consume the end of a request that carries no body; False if it has one."""
        if not framing.bodiless:
            return False
        event = self._next_event()  # h11 yields it at once: no bytes are needed
        return type(event) is h11.EndOfMessage

    @property
    def can_respond(self) -> bool:
        """No response head has gone out for the current request yet."""
        return self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    def send(self, *events: h11.Event) -> None:
        """Frame events with h11 and hand them to the socket in one call. Body bytes are
        passed through as they are (no join, no copy), framing bytes around them."""
        parts: list[bytes] = []
        for event in events:
            parts += self._h11.send_with_data_passthrough(event) or ()
        if parts:
            self.stream.writelines(parts)

    # --- the body relay's side: a destination for response body bytes ------------------------

    def send_body(self, data: bytes, end: bool) -> None:
        if data and end:
            self.send(h11.Data(data=data), h11.EndOfMessage())
        elif data:
            self.send(h11.Data(data=data))
        elif end:
            self.send(h11.EndOfMessage())

    @property
    def needs_drain(self) -> bool:
        return self.stream.needs_drain

    def on_writable(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` whenever the client has taken enough to write more."""
        self.stream.on_writable = callback

    async def drain(self) -> None:
        if self.stream.needs_drain:
            await self.stream.drain(self.timeouts.client_write_seconds)

    def next_cycle(self) -> bool:
        """Start the next keep-alive cycle; False if the connection must close."""
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            return True
        return False
