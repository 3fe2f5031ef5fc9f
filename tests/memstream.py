"""Test doubles of the OS boundary, so the proxy's connection code runs without sockets.

- ``FakeTransport``: the asyncio.Transport surface ``Stream`` uses. It records every write,
  delivers what the test feeds it (bytes, an orderly EOF, a reset) in order and only while
  reading is not paused — as a real socket would — and simulates the peer's receive window:
  a peer that stops reading fills the write buffer, which pauses the protocol at the high
  water mark and resumes it when the peer reads again.
- ``ScriptedDial``: a dial function for ``UpstreamPool`` whose connections are FakeTransports
  with a scripted far end: it parses what is written with an h11 SERVER and, for each
  complete request, answers with the script's steps (bytes, FIN, RST, a wait, or nothing).
- ``virtual_time_loop``: an event loop whose clock jumps to the next timer whenever nothing
  is ready, so timeouts of minutes elapse at once and exactly; with no timer left at all it
  raises VirtualTimeDeadlock instead of hanging. Use it with
  ``anyio_backend = ("asyncio", {"loop_factory": virtual_time_loop})``.

Only the boundary is faked: the Stream, h11 on both sides, the pool and the relay are real.
"""

from __future__ import annotations

import asyncio
import enum
import json
import selectors
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11

from orproxy.errors import UpstreamConnectError
from orproxy.stream import Stream

# --- an event loop on a virtual clock -------------------------------------------------------

DEADLOCK_SECONDS = 2.0  # real seconds with no timer left before a test is declared stuck


class VirtualTimeDeadlock(RuntimeError):
    """Nothing is scheduled and nothing can arrive: the test would wait forever."""


class _JumpingSelector(selectors.DefaultSelector):
    """A selector that never sleeps on a timer: with nothing ready, the clock jumps ahead by
    the timeout the loop asked for (the time to its next timer)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # no timer left: only a thread could still wake the loop
            ready = super().select(DEADLOCK_SECONDS)
            if not ready:
                raise VirtualTimeDeadlock("no timer is left and nothing arrived: a deadlock")
            return ready
        ready = super().select(0)
        if not ready and timeout > 0:
            self.now += timeout
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """``loop.time()`` is virtual: timers fire in order, at once, at their exact time."""

    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now


def virtual_time_loop() -> asyncio.AbstractEventLoop:
    return VirtualTimeLoop()


async def settle() -> None:
    """Let every pending callback (and the callbacks they schedule) run. On the virtual
    clock this costs one millisecond of virtual time."""
    await asyncio.sleep(0.001)


# --- the transport ------------------------------------------------------------------------


class _Eof:
    pass


EOF = _Eof()


class FakeTransport(asyncio.Transport):
    """One end of a connection. The test plays the peer: ``feed`` / ``feed_eof`` /
    ``reset`` what it sends, ``stop_reading`` / ``read_all`` how it takes what we write."""

    def __init__(self, protocol: asyncio.Protocol,
                 on_write: Callable[[bytes], None] | None = None) -> None:
        super().__init__()
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()
        self._on_write = on_write
        self._inbound: deque[bytes | _Eof | BaseException] = deque()
        self._flush_scheduled = False
        self._lost = False
        self._closing = False
        self._reading = True
        self._protocol_paused = False
        self._peer_reading = True
        self.high = 64 * 1024
        self.low = 16 * 1024
        self._unread = bytearray()  # written bytes the peer has not taken yet
        self.written = bytearray()  # every byte written, in order
        self.writes: list[bytes] = []  # one entry per write()/writelines() call
        self.pause_calls = 0  # pause_reading() calls that paused
        self.resume_calls = 0  # resume_reading() calls that resumed
        self.eof_written = False
        self.aborted = False
        self.lost_exc: BaseException | None = None
        self.extra: dict[str, Any] = {}

    def connect(self) -> None:
        self._protocol.connection_made(self)

    # --- what the peer does (test side) --------------------------------------------------------

    def feed(self, *pieces: bytes) -> None:
        """The peer sends these bytes: each piece is one ``data_received``, in order,
        delivered soon (by the loop, never inside the caller) and only while reading."""
        self._inbound.extend(pieces)
        self._schedule_flush()

    def feed_eof(self) -> None:
        """The peer half-closes (FIN), after whatever was fed before."""
        self._inbound.append(EOF)
        self._schedule_flush()

    def reset(self) -> None:
        """The peer resets the connection (RST), after whatever was fed before."""
        self._inbound.append(ConnectionResetError(104, "Connection reset by peer"))
        self._schedule_flush()

    def lose(self, exc: BaseException | None = None) -> None:
        """The connection is gone now, whatever is still queued (reading paused or not)."""
        self._inbound.clear()
        self._connection_lost(exc)

    def stop_reading(self) -> None:
        """The peer stops reading: what we write from now on stays in our buffer."""
        self._peer_reading = False

    def fill(self) -> None:
        """The buffer is full now: the protocol is told to stop writing."""
        self._peer_reading = False
        self._maybe_pause(force=True)

    def read_all(self) -> None:
        """The peer reads everything buffered and keeps reading."""
        self._peer_reading = True
        data, self._unread = bytes(self._unread), bytearray()
        if data and self._on_write is not None:
            self._on_write(data)
        self._maybe_resume()
        if self._closing and not self._lost:
            self._loop.call_soon(self._connection_lost, None)

    @property
    def buffered(self) -> int:
        """Bytes written that the peer has not taken yet."""
        return len(self._unread)

    @property
    def pending_inbound(self) -> int:
        """Bytes fed but not delivered yet (reading is paused)."""
        return sum(len(p) for p in self._inbound if isinstance(p, bytes))

    # --- asyncio.Transport ---------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof_written:
            raise RuntimeError("write after write_eof")
        if self._closing:
            return  # asyncio drops writes after close (and logs); Stream never does this
        data = bytes(data)
        if not data:
            return
        self.writes.append(data)
        self._took(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        data = b"".join(bytes(d) for d in list_of_data)
        if self.eof_written:
            raise RuntimeError("write after write_eof")
        if self._closing or not data:
            return
        self.writes.append(data)
        self._took(data)

    def _took(self, data: bytes) -> None:
        self.written += data
        if not self._peer_reading:
            self._unread += data
            self._maybe_pause()
        elif self._on_write is not None:
            self._on_write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        if self._reading and not self._closing:
            self._reading = False
            self.pause_calls += 1

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self.resume_calls += 1
            self._schedule_flush()

    def is_reading(self) -> bool:
        return self._reading

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self.buffered:  # a real transport flushes first, then drops the connection
            self._loop.call_soon(self._connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self._closing = True
        self._inbound.clear()
        self._loop.call_soon(self._connection_lost, None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = 64 * 1024 if high is None else high
        self.low = self.high // 4 if low is None else low

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.low, self.high

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # --- internals ---------------------------------------------------------------------------

    def _maybe_pause(self, force: bool = False) -> None:
        if not self._protocol_paused and (force or self.buffered > self.high):
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _maybe_resume(self) -> None:
        if self._protocol_paused and self.buffered <= self.low:
            self._protocol_paused = False
            self._protocol.resume_writing()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._inbound and self._reading and not self._lost:
            item = self._inbound.popleft()
            if isinstance(item, bytes):
                self._protocol.data_received(item)
            elif isinstance(item, _Eof):
                if not self._protocol.eof_received():
                    self.close()
            else:
                self._connection_lost(item)

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self.lost_exc = exc
        self._protocol.connection_lost(exc)  # type: ignore[arg-type]


def make_stream(on_write: Callable[[bytes], None] | None = None,
                ) -> tuple[Stream, FakeTransport]:
    """A connected Stream on a FakeTransport (call inside the running loop)."""
    stream = Stream()
    transport = FakeTransport(stream, on_write)
    transport.connect()
    return stream, transport


# --- a scripted upstream --------------------------------------------------------------------


class Signal(enum.Enum):
    FIN = "fin"  # an orderly close: EOF, and the peer closes its side
    RESET = "reset"  # a TCP reset


FIN = Signal.FIN
RESET = Signal.RESET


@dataclass(frozen=True)
class Wait:
    """Send the following steps only this many seconds later."""

    seconds: float


Step = bytes | Signal | Wait


@dataclass
class Received:
    """One complete request as the scripted upstream parsed it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    conn: int  # which dialed connection (1-based)
    nth: int  # which request on that connection (1-based)

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        assert len(values) <= 1, f"{name!r} sent {len(values)} times"
        return values[0] if values else None

    @property
    def key(self) -> str | None:
        """The upstream key the request carried (its Bearer token)."""
        auth = self.header(b"authorization")
        return auth.removeprefix(b"Bearer ").decode() if auth else None


Script = Callable[[Received], Sequence[Step]]


class ScriptedPeer:
    """The upstream's end of one dialed connection."""

    def __init__(self, dial: ScriptedDial, index: int) -> None:
        self._dial = dial
        self.index = index
        self._h11 = h11.Connection(h11.SERVER)
        self._head: h11.Request | None = None
        self._body = bytearray()
        self.received: list[Received] = []
        self.stream, self.transport = make_stream(self._on_write)
        if not dial.peer_reads:
            self.transport.stop_reading()

    def _on_write(self, data: bytes) -> None:
        self._h11.receive_data(data)
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._head, self._body = event, bytearray()
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._request_done()
            else:
                return

    def _request_done(self) -> None:
        head = self._head
        assert head is not None
        received = Received(head.method, head.target, list(head.headers.raw_items()),
                            bytes(self._body), self.index, len(self.received) + 1)
        self.received.append(received)
        self._dial.requests.append(received)
        # our answers are raw bytes; keep this h11 in step so it parses the next request
        self._h11.send(h11.Response(status_code=200, headers=[(b"Content-Length", b"0")]))
        self._h11.send(h11.EndOfMessage())
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        self.play(self._dial.script(received))

    def play(self, steps: Iterable[Step]) -> None:
        """Send these steps to the proxy (in order, delivered by the loop)."""
        steps = list(steps)
        for i, step in enumerate(steps):
            if isinstance(step, Wait):
                loop = asyncio.get_running_loop()
                loop.call_later(step.seconds, self.play, steps[i + 1:])
                return
            if step is FIN:
                self.transport.feed_eof()
            elif step is RESET:
                self.transport.reset()
            else:
                assert isinstance(step, bytes)
                self.transport.feed(step)


class ScriptedDial:
    """``await dial()`` → a Stream whose far end answers by ``script``: a function of the
    request received, or a list of answers consumed one per request, in order. The first
    ``refuse`` dials fail as the real dial does (UpstreamConnectError). With ``peer_reads``
    False the upstream takes nothing written (its window stays shut)."""

    def __init__(self, script: Script | Sequence[Sequence[Step]], *, refuse: int = 0,
                 peer_reads: bool = True) -> None:
        self.peer_reads = peer_reads
        if callable(script):
            self.script: Script = script
        else:
            answers = deque(script)
            self.script = lambda _received: answers.popleft()
        self.refuse = refuse
        self.dials = 0  # every call, refused ones included
        self.peers: list[ScriptedPeer] = []
        self.requests: list[Received] = []

    async def __call__(self) -> Stream:
        self.dials += 1
        if self.refuse > 0:
            self.refuse -= 1
            raise UpstreamConnectError("connect to upstream: refused (scripted)")
        peer = ScriptedPeer(self, len(self.peers) + 1)
        self.peers.append(peer)
        return peer.stream


# --- building raw responses -------------------------------------------------------------------


def response(status: int, body: bytes = b"", headers: Sequence[tuple[bytes, bytes]] = (), *,
             framing: str = "length", reason: bytes = b"") -> bytes:
    """A raw HTTP/1.1 response: ``framing`` is "length" (Content-Length), "chunked" (one
    chunk), or "close" (delimited by the connection's close: no framing header)."""
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    lines += [name + b": " + value for name, value in headers]
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        assert framing == "close", framing
        payload = body
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def json_response(status: int, doc: Any, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    return response(status, json.dumps(doc).encode(),
                    [(b"Content-Type", b"application/json"), *headers])


@dataclass
class FakeClock:
    """A monotonic clock the test moves by hand (KeyPool, UpstreamPool, the attempt loop),
    with the wall clock that moves with it (``wall``: ``epoch`` seconds ahead)."""

    now: float = 100.0
    sleeps: list[float] = field(default_factory=list)
    epoch: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.epoch + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        """An injected ``sleep``: records the wait and moves the clock, never waits."""
        self.sleeps.append(seconds)
        self.now += seconds
