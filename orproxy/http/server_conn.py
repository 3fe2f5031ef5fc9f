"""One client connection as an h11 SERVER: requests in, responses out, with limits.

Owns the client-side timeouts (keep-alive idle, head read, body read, write drain), the
body size limit and 100-continue, and turns h11's RemoteProtocolError into a
ClientRequestError carrying h11's status hint. It never writes framing by hand and knows
nothing of routing, keys or the upstream.
"""

from __future__ import annotations

import re
import time

import h11

from orproxy.config import LimitsConfig, TimeoutsConfig
from orproxy.errors import ClientRequestError, StreamTimeout
from orproxy.http.validate import BodyFraming
from orproxy.stream import Stream

_BARE_LF = re.compile(rb"(?<!\r)\n")


class ServerConnection:
    def __init__(self, stream: Stream, limits: LimitsConfig, timeouts: TimeoutsConfig) -> None:
        self.stream = stream
        self.limits = limits
        self.timeouts = timeouts
        # h11 alone limits heads that arrive in pieces; room for a long target as well, so
        # that a split over-long target is answered 414 by validate, not 431 by h11
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=limits.max_head_bytes + limits.max_target_bytes)
        self.requests = 0

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise ClientRequestError(exc.error_status_hint, str(exc)) from exc

    async def next_request(self) -> h11.Request | None:
        """The next request head, or None when the client closed or idled out between
        requests. A head must arrive whole within ``client_head_seconds`` of its first byte
        (of the connection, for the first request): slow clients are cut off with 408."""
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
                raise ClientRequestError(400, f"unexpected {event!r}")
            started = deadline is not None
            if not started and self.h11.trailing_data[0]:
                deadline = time.monotonic() + self.timeouts.client_head_seconds
            timeout = wait if deadline is None else deadline - time.monotonic()
            try:
                data = await self.stream.read(max(timeout, 0.0))
            except StreamTimeout:
                if self.h11.trailing_data[0]:
                    raise ClientRequestError(408, "request head not received in time") from None
                return None
            if data and deadline is None:
                deadline = time.monotonic() + self.timeouts.client_head_seconds
            self.h11.receive_data(data)

    async def read_body(self, framing: BodyFraming) -> bytes:
        """The whole request body, bounded by ``max_body_bytes`` (413)."""
        limit = self.limits.max_body_bytes
        length = framing.content_length
        if length is not None and length > limit:
            raise ClientRequestError(413, f"request body over {limit} bytes")
        if self.h11.they_are_waiting_for_100_continue:
            self.send(h11.InformationalResponse(status_code=100, headers=[]))
        parts: list[bytes] = []
        size = 0
        while True:
            event = self._next_event()
            if type(event) is h11.Data:
                size += len(event.data)
                if size > limit:
                    raise ClientRequestError(413, f"request body over {limit} bytes")
                parts.append(event.data)
            elif type(event) is h11.EndOfMessage:
                return b"".join(parts)
            elif event is h11.NEED_DATA:
                if _BARE_LF.search(self.h11.trailing_data[0]):
                    # h11 waits for CRLF forever on a bare-LF chunk line: refuse it instead.
                    # (h11 itself checks the CRLF after chunk data, so any LF not after a CR
                    # left unparsed here ended a chunk-size or trailer line.)
                    raise ClientRequestError(400, "bad chunked framing (bare LF)")
                try:
                    data = await self.stream.read(self.timeouts.client_body_seconds)
                except StreamTimeout:
                    raise ClientRequestError(408, "request body not received in time") from None
                self.h11.receive_data(data)
            else:
                raise ClientRequestError(400, f"unexpected {type(event).__name__} in body")

    def end_if_bodiless(self, framing: BodyFraming) -> bool:
        """Consume the end of a request that carries no body; False if it has one."""
        if not framing.bodiless:
            return False
        event = self._next_event()  # h11 yields it at once: no bytes are needed
        return type(event) is h11.EndOfMessage

    @property
    def can_respond(self) -> bool:
        return self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    def send(self, *events: h11.Event) -> None:
        """Frame events with h11 and hand them to the socket in one call. Body bytes are
        passed through as they are (no join, no copy), framing bytes around them."""
        parts: list[bytes] = []
        for event in events:
            parts += self.h11.send_with_data_passthrough(event) or ()
        if parts:
            self.stream.writelines(parts)

    async def drain(self) -> None:
        if self.stream.needs_drain:
            await self.stream.drain(self.timeouts.client_write_seconds)

    def next_cycle(self) -> bool:
        """Start the next keep-alive cycle; False if the connection must close."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

