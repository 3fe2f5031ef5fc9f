"""Relaying a response body from the upstream to the client inside the I/O callbacks.

Once the attempt loop has a response to deliver, the relay writes its head together with
whatever body bytes are already here (one write), then each body piece as the upstream
connection pushes it: no task wake-up, future or timer per chunk. Backpressure is the
client transport's: while its buffer is full the source is paused, and a client that takes
nothing for ``write_timeout`` fails the relay. The relay knows both sides only through two
narrow interfaces (``BodySource``, ``BodyDestination``); it owns no connection — the caller
releases or closes them. The outcome is one future: done at the end of the body, or failed
with the UpstreamError / StreamTimeout that ended it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from orproxy.errors import StreamTimeout, UpstreamError
from orproxy.upstream.connection import BodyConsumer


class BodySource(Protocol):
    def read_body(self, consumer: BodyConsumer, idle_timeout: float) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def stop_body(self) -> None: ...


class BodyDestination(Protocol):
    def send_body(self, data: bytes, end: bool) -> None: ...

    @property
    def needs_drain(self) -> bool: ...

    def on_writable(self, callback: Callable[[], None] | None) -> None: ...


SendHead = Callable[[bytes, bool], None]  # (body bytes to send with the head, ended)
Tap = Callable[[bytes], None]  # sees every body byte relayed (token accounting)
# called once the whole body is here, before its last bytes go out: what the body said
# (a rate limit in-band) is acted on before the client can send its next request
OnComplete = Callable[[], None]


class BodyRelay:
    def __init__(self, source: BodySource, destination: BodyDestination, *,
                 idle_timeout: float, write_timeout: float, tap: Tap | None = None,
                 on_complete: OnComplete | None = None) -> None:
        self._source = source
        self._destination = destination
        self._idle = idle_timeout
        self._write_timeout = write_timeout
        self._tap = tap
        self._on_complete = on_complete
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()
        self.sent = 0
        self._held: list[bytes] | None = None  # body gathered while the head is not out yet
        self._ended = False
        self._paused = False
        self._write_timer: asyncio.TimerHandle | None = None

    def start(self, send_head: SendHead, body: bytes = b"", ended: bool = False,
              ) -> asyncio.Future[None]:
        """Send the head with ``body`` and whatever the source already holds, then relay
        the rest as it arrives."""
        self._held = [body] if body else []
        self._ended = ended
        if not ended:
            self._source.read_body(self, self._idle)
        held, self._held = self._held, None
        if self.done.done():  # the source failed before anything went out
            return self.done
        data = held[0] if len(held) == 1 else b"".join(held)
        self._account(data)
        if self._ended:
            self._complete()
        send_head(data, self._ended)
        if self._ended:
            self._finish(None)
            return self.done
        self._destination.on_writable(self._writable)
        self._source.resume()  # the attempt loop may have paused it after its read-ahead
        if self._destination.needs_drain:
            self._pause()
        return self.done

    def stop(self) -> None:
        """Detach from both sides (idempotent)."""
        self._source.stop_body()
        self._destination.on_writable(None)
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # --- BodyConsumer ---------------------------------------------------------------------

    def on_body(self, data: bytes, end: bool) -> None:
        if self.done.done():
            return
        if self._held is not None:  # still inside start(): goes out with the head
            if data:
                self._held.append(data)
            self._ended = end
            return
        try:
            self._account(data)
            if end:
                self._complete()
            self._destination.send_body(data, end)
        except Exception as exc:  # never let an error escape into the event loop
            self._finish(exc)
            return
        if end:
            self._finish(None)
        elif self._destination.needs_drain and not self._paused:
            self._pause()

    def on_body_error(self, exc: UpstreamError) -> None:
        self._finish(exc)

    # --- backpressure -------------------------------------------------------------------------

    def _account(self, data: bytes) -> None:
        if data:
            self.sent += len(data)
            if self._tap is not None:
                self._tap(data)

    def _complete(self) -> None:
        if self._on_complete is not None:
            self._on_complete()

    def _pause(self) -> None:
        self._paused = True
        self._source.pause()
        self._write_timer = self._loop.call_later(self._write_timeout, self._write_stalled)

    def _writable(self) -> None:
        if self._paused and not self.done.done():
            self._paused = False
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            self._source.resume()

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
