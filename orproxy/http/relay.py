"""Relaying an upstream response body to the client inside the I/O callbacks.

Once the response head has gone out, every upstream read is parsed by the upstream's h11,
framed by the client's h11 and written, all within the upstream's ``data_received``: no
task wake-up, future or timer per chunk. Backpressure is the transport's own: when the
client's write buffer is full, upstream reading pauses until the client drains. Timeouts
are lazy timers, re-armed once per idle period rather than per chunk. The outcome is one
future: done at EndOfMessage, or failed with the UpstreamError / StreamClosed /
StreamTimeout that ended the body. It owns no connection: the caller releases or closes.
"""

from __future__ import annotations

import asyncio

import h11

from orproxy.errors import StreamTimeout, UpstreamProtocolError, UpstreamTimeout
from orproxy.http.server_conn import ServerConnection
from orproxy.upstream.connection import UpstreamConnection


class BodyRelay:
    def __init__(self, upstream: UpstreamConnection, client: ServerConnection, *,
                 idle_timeout: float, write_timeout: float) -> None:
        self._up = upstream
        self._client = client
        self._idle = idle_timeout
        self._write_timeout = write_timeout
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()
        self.sent = 0
        self._last = 0.0
        self._paused = False  # upstream reading paused because the client is slow
        self._idle_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def start(self) -> asyncio.Future[None]:
        self._last = self._loop.time()
        self._idle_timer = self._loop.call_later(self._idle, self._check_idle)
        self._client.stream.on_writable = self._client_writable
        self._up.stream.set_consumer(self._on_data, self._on_end)
        if not self.done.done() and not self._paused and self._client.stream.needs_drain:
            self._pause()
        return self.done

    def stop(self) -> None:
        """Detach from both streams (idempotent); the caller decides the connections' fate."""
        self._up.stream.clear_consumer()
        self._client.stream.on_writable = None
        for timer in (self._idle_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._write_timer = None

    # --- callbacks ----------------------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        if self.done.done():
            return
        self._last = self._loop.time()
        try:
            self._up.h11.receive_data(data)
            self._pump()
        except Exception as exc:  # never let an error escape into the event loop
            self._finish(exc)

    def _on_end(self) -> None:
        if self.done.done():
            return
        try:
            if self._up.stream.reset:
                raise UpstreamProtocolError("upstream reset mid-body", before_response=False)
            self._up.h11.receive_data(b"")
            self._pump()  # a close-delimited body ends here; any other is cut short
            if not self.done.done():
                raise UpstreamProtocolError("upstream closed mid-body", before_response=False)
        except Exception as exc:
            self._finish(exc)

    def _pump(self) -> None:
        body, ended = self._up.take_buffered()
        if body or ended:
            events: list[h11.Event] = []
            if body:
                events.append(h11.Data(data=body))
                self.sent += len(body)
            if ended:
                events.append(h11.EndOfMessage())
            self._client.send(*events)
        if ended:
            self._finish(None)
        elif self._client.stream.needs_drain and not self._paused:
            self._pause()

    def _pause(self) -> None:
        self._paused = True
        self._up.stream.pause_reading()
        self._write_timer = self._loop.call_later(self._write_timeout, self._write_stalled)

    def _client_writable(self) -> None:
        if self._paused and not self.done.done():
            self._paused = False
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            self._last = self._loop.time()
            self._up.stream.resume_reading()

    def _check_idle(self) -> None:
        if self.done.done():
            return
        now = self._loop.time()
        if self._paused:  # waiting on the client is not the upstream's silence
            self._last = now
        left = self._last + self._idle - now
        if left > 0:
            self._idle_timer = self._loop.call_later(left, self._check_idle)
            return
        self._finish(UpstreamTimeout(f"upstream silent for {self._idle:g}s",
                                     before_response=False))

    def _write_stalled(self) -> None:
        self._finish(StreamTimeout(f"client read nothing for {self._write_timeout:g}s"))

    def _finish(self, exc: BaseException | None) -> None:
        self.stop()
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)
