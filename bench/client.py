"""The bench's HTTP/1.1 client: one connection's I/O, response checking and timing, W4 and W5.

It owns response framing (:class:`ResponseReader`, no I/O), an asyncio Protocol around it
(one request at a time, keep-alive), the two ways a response is consumed (:class:`Response`
keeps the body, :class:`StreamRecorder` checks a bench SSE stream and times every chunk on
arrival), and the load of W4/W5: ``python -m bench.client streams|ttfb`` prints one JSON
object. A failure (connect, timeout, closed mid-response, bad framing) is recorded in
``Response.errors`` and never raised: a load generator counts errors, it does not stop on
them. It knows nothing of subjects, workloads or the report.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from bench import payloads
from bench.fake_upstream import raise_nofile_limit
from bench.settings import AUTH_HEADERS, CHAT_PATH, HOST
from bench.stats import ns_to_ms, percentile

_MAX_ERRORS = 5


class Response:
    """One response as it arrives: status, headers, body, errors, and when bytes came."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.errors: list[str] = []
        self.complete = False  # the whole message arrived, correctly framed
        self.sent_perf = 0  # perf_counter_ns() when the request was written
        self.first_byte_perf = 0
        self.now_ns = 0  # time_ns() of the bytes being handled: what events are stamped with
        self.now_perf = 0
        self._parts: list[bytes] = []

    def fail(self, problem: str) -> None:
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(problem[:160])

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Status and header fields (names lower-cased); repeated names are comma-joined."""
        self.status = status
        for name, value in headers:
            key, val = name.decode("latin-1"), value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {val}" if key in self.headers else val

    def on_body(self, data: bytes) -> None:
        self._parts.append(data)

    def on_end(self) -> None:
        """The exchange is over, complete or not."""

    @property
    def body(self) -> bytes:
        return b"".join(self._parts)

    @property
    def ok(self) -> bool:
        return self.complete and not self.errors


class StreamRecorder(Response):
    """Checks the SSE body of a bench stream and records each chunk's delay.

    A valid stream is status 200, ``text/event-stream``, ``expected`` JSON events with
    ``bench.seq`` 0..expected-1 in order, the last with ``usage`` and ``finish_reason``
    "stop", then ``data: [DONE]``. A chunk's delay is its arrival (``now_ns``) minus the
    upstream's ``bench.sent_ns``; the body itself is not kept.
    """

    def __init__(self, expected: int, keep_delays: bool = True) -> None:
        super().__init__()
        self.expected = expected
        self.keep_delays = keep_delays
        self.next_seq = 0
        self.done = False
        self.first_event_perf = 0
        self.delays_ns: list[int] = []
        self._pending = b""

    def on_body(self, data: bytes) -> None:
        buf = self._pending + data if self._pending else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        start = 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            self._event(buf[start:end])
            start = end + 2
        self._pending = buf[start:]

    def _event(self, block: bytes) -> None:
        data_lines = []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                data_lines.append(value[1:] if value.startswith(b" ") else value)
            elif line and not line.startswith(b":"):
                self.fail(f"unexpected SSE line {line[:60]!r}")
        if not data_lines:
            return
        if not self.first_event_perf:
            self.first_event_perf = self.now_perf
        payload = b"\n".join(data_lines)
        if payload == b"[DONE]":
            if self.done:
                self.fail("duplicate [DONE]")
            elif self.next_seq != self.expected:
                self.fail(f"[DONE] after {self.next_seq}/{self.expected} chunks")
            self.done = True
        elif self.done:
            self.fail("data after [DONE]")
        else:
            self._chunk(payload)

    def _chunk(self, payload: bytes) -> None:
        try:
            obj: Any = json.loads(payload)
            seq, sent_ns = int(obj["bench"]["seq"]), int(obj["bench"]["sent_ns"])
        except (ValueError, KeyError, TypeError):
            self.fail(f"bad chunk JSON {payload[:80]!r}")
            self.next_seq += 1
            return
        if seq != self.next_seq:
            self.fail(f"chunk seq {seq}, expected {self.next_seq}")
        self.next_seq = seq + 1
        if self.keep_delays:
            self.delays_ns.append(self.now_ns - sent_ns)
        if seq == self.expected - 1:
            choice = (obj.get("choices") or [{}])[0]
            if "usage" not in obj or choice.get("finish_reason") != "stop":
                self.fail("last chunk lacks usage or finish_reason=stop")

    def on_end(self) -> None:
        if self.status != 200:
            self.fail(f"status {self.status}")
        ctype = self.headers.get("content-type", "")
        if self.status == 200 and not ctype.startswith("text/event-stream"):
            self.fail(f"content-type {ctype!r}")
        if self._pending.strip():
            self.fail(f"trailing partial event {self._pending[:60]!r}")
        if not self.done and not self.errors:
            self.fail(f"no [DONE] ({self.next_seq}/{self.expected} chunks)")

    @property
    def ok(self) -> bool:
        return super().ok and self.done and self.next_seq == self.expected


class FramingError(Exception):
    """The response broke HTTP/1.1 framing."""


class _Framing(enum.Enum):
    """Where :class:`ResponseReader` is in the current response."""

    HEAD = "head"
    LENGTH = "body by Content-Length"
    CHUNK_SIZE = "chunk size line"
    CHUNK_DATA = "chunk data"
    CHUNK_END = "CRLF after chunk data"
    TRAILERS = "trailers"
    UNTIL_CLOSE = "body until close"
    DONE = "done"


_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


class ResponseReader:
    """Incremental HTTP/1.1 response framing, no I/O: bytes in, head and body pieces out.

    One response at a time (never to a HEAD request); whatever arrives after its end stays
    in :attr:`leftover`.

    Hand-rolled on purpose, unlike the proxy: measured on W4 (2,000 streams), h11 took this
    client from ~1.5 to ~2.4 s CPU and at twice W4's rate lifted the client's own chunk
    delay p50 from ~0.1 to ~2 ms. A load generator must not be what the figures measure.
    """

    def __init__(self) -> None:
        self.state = _Framing.DONE
        self.keep_alive = True
        self._resp: Response = Response()
        self._buf = b""
        self._remaining = 0

    def __repr__(self) -> str:
        return f"<ResponseReader {self.state.name} buffered={len(self._buf)}>"

    def start(self, resp: Response) -> None:
        """Read the next response into ``resp``."""
        self._resp = resp
        self.state = _Framing.HEAD

    @property
    def leftover(self) -> int:
        """Bytes received beyond the end of the last response."""
        return len(self._buf)

    def feed(self, data: bytes) -> bool:
        """Consume ``data``; True once the response is complete. Raises FramingError."""
        buf = self._buf + data if self._buf else bytes(data)
        resp, st = self._resp, _Framing
        while buf:
            state = self.state
            if state is st.CHUNK_DATA or state is st.LENGTH:
                take = buf[: self._remaining]
                buf = buf[len(take) :]
                self._remaining -= len(take)
                resp.on_body(take)
                if not self._remaining:
                    self.state = st.CHUNK_END if state is st.CHUNK_DATA else st.DONE
            elif state is st.CHUNK_END:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise FramingError("chunk data not followed by CRLF")
                buf = buf[2:]
                self.state = st.CHUNK_SIZE
            elif state is st.CHUNK_SIZE:
                line, buf = self._line(buf, 1024)
                if line is None:
                    break
                self._chunk_size(line.split(b";", 1)[0].rstrip(b" \t"))
            elif state is st.HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 65536:
                        raise FramingError("response head over 64 KB")
                    break
                self._head(buf[:end])
                buf = buf[end + 4 :]
            elif state is st.TRAILERS:
                line, buf = self._line(buf, 8192)
                if line is None:
                    break
                if not line:
                    self.state = st.DONE
            elif state is st.UNTIL_CLOSE:
                resp.on_body(buf)
                buf = b""
            else:  # DONE: whatever follows belongs to no request
                break
        self._buf = buf
        return self.state is st.DONE

    def eof(self) -> bool:
        """The peer closed; True if that completes the response (a close-delimited body)."""
        if self.state is _Framing.UNTIL_CLOSE:
            self.state = _Framing.DONE
        return self.state is _Framing.DONE

    @staticmethod
    def _line(buf: bytes, limit: int) -> tuple[bytes | None, bytes]:
        i = buf.find(b"\r\n")
        if i < 0:
            if len(buf) > limit:
                raise FramingError(f"line over {limit} bytes")
            return None, buf
        return buf[:i], buf[i + 2 :]

    def _chunk_size(self, size: bytes) -> None:
        if not _HEX.fullmatch(size):
            raise FramingError(f"bad chunk size {size[:20]!r}")
        self._remaining = int(size, 16)
        self.state = _Framing.CHUNK_DATA if self._remaining else _Framing.TRAILERS

    def _head(self, head: bytes) -> None:
        status_line, *lines = head.split(b"\r\n")
        version, status = _status_line(status_line)
        fields: list[tuple[bytes, bytes]] = []
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or b" " in name:
                raise FramingError(f"bad header line {line[:80]!r}")
            fields.append((name.lower(), value.strip(b" \t")))
        if 100 <= status < 200:
            return  # interim: the final response follows
        self._resp.on_head(status, fields)
        self._framing(version, status)

    def _framing(self, version: bytes, status: int) -> None:
        """RFC 9112 section 6.3: how the body of this response is delimited."""
        headers = self._resp.headers
        conn = headers.get("connection", "").lower()
        self.keep_alive = "close" not in conn if version == b"HTTP/1.1" else "keep-alive" in conn
        te, length = headers.get("transfer-encoding"), headers.get("content-length")
        if status in (204, 304):
            self.state = _Framing.DONE
        elif te is not None:
            if length is not None:
                raise FramingError("both Transfer-Encoding and Content-Length")
            if te.lower() != "chunked":
                raise FramingError(f"unsupported Transfer-Encoding {te[:40]!r}")
            self.state = _Framing.CHUNK_SIZE
        elif length is not None:
            if not length.isdigit():
                raise FramingError(f"bad Content-Length {length[:40]!r}")
            self._remaining = int(length)
            self.state = _Framing.LENGTH if self._remaining else _Framing.DONE
        else:
            self.keep_alive = False
            self.state = _Framing.UNTIL_CLOSE


def _status_line(line: bytes) -> tuple[bytes, int]:
    version, _, rest = line.partition(b" ")
    code, _, _reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise FramingError(f"bad status line {line[:80]!r}")
    return version, int(code)


def build_request(
    method: str, target: str, host: str, headers: Mapping[str, str] | None, body: bytes
) -> bytes:
    """A request's bytes; a body (or a method that has one) gets a Content-Length."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


R = TypeVar("R", bound=Response)


class _Wire(asyncio.Protocol):
    """The socket side of one connection: bytes into the reader, one request at a time."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = ResponseReader()
        self._transport: asyncio.Transport | None = None
        self._resp: Response | None = None
        self._done: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    @property
    def reusable(self) -> bool:
        return not self.closed and self._reader.keep_alive and self._resp is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        resp = self._resp
        if resp is None:  # nothing was asked: the server is out of step
            self.close()
            return
        resp.now_ns = time.time_ns()
        resp.now_perf = now = time.perf_counter_ns()
        if not resp.first_byte_perf:
            resp.first_byte_perf = now
        try:
            complete = self._reader.feed(data)
        except FramingError as exc:
            self._end(f"bad framing: {exc}")
            return
        if complete:
            resp.complete = True
            extra = self._reader.leftover
            self._end(f"{extra} bytes after the end of the response" if extra else None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self._resp
        if resp is not None:
            resp.complete = self._reader.eof()
            self._end(None if resp.complete else f"connection closed mid-response ({exc})")

    def _end(self, problem: str | None) -> None:
        resp, done, timer = self._resp, self._done, self._timer
        self._resp = self._done = self._timer = None
        if timer is not None:
            timer.cancel()
        if problem is not None:
            self.close()
        if resp is not None:
            if problem is not None:
                resp.fail(problem)
            resp.on_end()
        if not self._reader.keep_alive:
            self.close()
        if done is not None and not done.done():
            done.set_result(None)

    async def exchange(self, raw: bytes, resp: Response, timeout: float) -> None:
        """Write ``raw`` and wait until its response is read into ``resp`` (or failed)."""
        if not self.reusable or self._transport is None:
            resp.fail("connection closed before the request")
            return
        self._reader.start(resp)
        self._resp, self._done = resp, self._loop.create_future()
        self._timer = self._loop.call_later(timeout, self._end, f"timeout after {timeout:g} s")
        done = self._done
        resp.sent_perf = time.perf_counter_ns()
        self._transport.write(raw)
        await done

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class Client:
    """One keep-alive connection to ``host:port``, one request at a time, reopened if closed."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.connects = 0  # connections opened so far
        self._wire: _Wire | None = None

    async def connect(self, timeout: float = 10.0) -> str | None:
        """Open a new connection; returns why it failed, or ``None``."""
        self.close()
        loop = asyncio.get_running_loop()
        try:
            _, self._wire = await asyncio.wait_for(
                loop.create_connection(_Wire, self.host, self.port), timeout
            )
        except (OSError, TimeoutError) as exc:
            return f"connect: {type(exc).__name__}: {exc}"
        self.connects += 1
        return None

    async def request(
        self,
        method: str,
        target: str,
        into: R,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        timeout: float = 30.0,
    ) -> R:
        """Send one request and read its response into ``into``, which is returned."""
        if self._wire is None or not self._wire.reusable:
            problem = await self.connect(timeout)
            if problem is not None:
                into.fail(problem)
                return into
        assert self._wire is not None
        raw = build_request(method, target, f"{self.host}:{self.port}", headers, body)
        await self._wire.exchange(raw, into, timeout)
        return into

    def close(self) -> None:
        if self._wire is not None:
            self._wire.close()
            self._wire = None


async def fetch(
    host: str,
    port: int,
    method: str,
    target: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> Response:
    """One request on a fresh connection."""
    client = Client(host, port)
    try:
        return await client.request(
            method, target, Response(), headers=headers, body=body, timeout=timeout
        )
    finally:
        client.close()


async def fetch_stream(
    host: str, port: int, chunks: int, delay_ms: int, timeout: float = 30.0
) -> StreamRecorder:
    """One bench stream (``chunks`` events ``delay_ms`` apart) on a fresh connection."""
    client = Client(host, port)
    try:
        return await _stream(client, StreamRecorder(chunks), chunks, delay_ms, timeout)
    finally:
        client.close()


_STREAM_BODY = payloads.chat_request_body(stream=True)


async def _stream(
    client: Client, rec: StreamRecorder, chunks: int, delay_ms: int, timeout: float
) -> StreamRecorder:
    target = f"{CHAT_PATH}?chunks={chunks}&delay_ms={delay_ms}"
    return await client.request(
        "POST", target, rec, headers=AUTH_HEADERS, body=_STREAM_BODY, timeout=timeout
    )


# --- W4: many concurrent streams -----------------------------------------------------------


@dataclass
class StreamsResult:
    streams: int
    complete: int
    wall_s: float
    chunks_received: int
    delay_p50_ms: float
    delay_p99_ms: float
    delay_max_ms: float
    first_delay_p99_ms: float
    connect_all_s: float
    errors: dict[str, int]


async def _connect_all(clients: list[Client], timeout: float) -> list[str | None]:
    """Open every connection, at most 64 connects in flight (a burst overflows the backlog)."""
    sem = asyncio.Semaphore(64)

    async def one(client: Client) -> str | None:
        async with sem:
            return await client.connect(timeout)

    return list(await asyncio.gather(*(one(c) for c in clients)))


async def run_streams(
    host: str,
    port: int,
    streams: int,
    chunks: int,
    delay_ms: int,
    stagger_ms: float,
    timeout: float,
) -> StreamsResult:
    """Connect all clients first, then start one stream per connection.

    Starts are spread evenly over ``stagger_ms`` so the subject sees a steady chunk rate
    rather than ``chunks`` bursts of ``streams`` chunks.
    """
    loop = asyncio.get_running_loop()
    clients = [Client(host, port) for _ in range(streams)]
    t_connect = time.perf_counter()
    connected = await _connect_all(clients, timeout)
    connect_s = time.perf_counter() - t_connect
    await asyncio.sleep(0.2)
    step = stagger_ms / 1000.0 / max(1, streams)
    base, t0 = loop.time() + 0.02, time.perf_counter() + 0.02

    async def one(i: int) -> tuple[StreamRecorder, float]:
        rec = StreamRecorder(chunks)
        problem = connected[i]
        if problem is not None:
            rec.fail(problem)
            return rec, t0
        await asyncio.sleep(max(0.0, base + i * step - loop.time()))
        await _stream(clients[i], rec, chunks, delay_ms, timeout)
        return rec, time.perf_counter()

    results = await asyncio.gather(*(one(i) for i in range(streams)))
    wall = max(end for _, end in results) - t0
    for client in clients:
        client.close()
    return _streams_result(streams, [rec for rec, _ in results], wall, connect_s)


def _streams_result(
    streams: int, recs: list[StreamRecorder], wall_s: float, connect_s: float
) -> StreamsResult:
    delays = sorted(d for rec in recs for d in rec.delays_ns)
    first = sorted(rec.delays_ns[0] for rec in recs if rec.delays_ns)
    errors = Counter(rec.errors[0] if rec.errors else "incomplete" for rec in recs if not rec.ok)
    return StreamsResult(
        streams=streams,
        complete=sum(1 for rec in recs if rec.ok),
        wall_s=wall_s,
        chunks_received=sum(rec.next_seq for rec in recs),
        delay_p50_ms=ns_to_ms(percentile(delays, 50)),
        delay_p99_ms=ns_to_ms(percentile(delays, 99)),
        delay_max_ms=ns_to_ms(delays[-1]) if delays else float("nan"),
        first_delay_p99_ms=ns_to_ms(percentile(first, 99)),
        connect_all_s=connect_s,
        errors=dict(errors.most_common(5)),
    )


# --- W5: time to first byte ----------------------------------------------------------------


@dataclass
class TtfbResult:
    requests: int
    ok: int
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    ttfe_p50_ms: float
    ttfe_p99_ms: float
    connections: int  # 1 unless the subject closed the keep-alive connection
    errors: dict[str, int]


async def run_ttfb(
    host: str, port: int, requests: int, warmup: int, chunks: int, timeout: float
) -> TtfbResult:
    """Sequential streams on one keep-alive connection (reopened only if it closes)."""
    client = Client(host, port)
    ttfb: list[int] = []
    ttfe: list[int] = []
    errors: Counter[str] = Counter()
    for i in range(warmup + requests):
        rec = await _stream(client, StreamRecorder(chunks, keep_delays=False), chunks, 0, timeout)
        if i < warmup:
            continue
        if rec.ok:
            ttfb.append(rec.first_byte_perf - rec.sent_perf)
            ttfe.append(rec.first_event_perf - rec.sent_perf)
        else:
            errors[rec.errors[0] if rec.errors else "incomplete"] += 1
    client.close()
    ttfb.sort()
    ttfe.sort()
    return TtfbResult(
        requests=requests,
        ok=len(ttfb),
        ttfb_p50_ms=ns_to_ms(percentile(ttfb, 50)),
        ttfb_p99_ms=ns_to_ms(percentile(ttfb, 99)),
        ttfe_p50_ms=ns_to_ms(percentile(ttfe, 50)),
        ttfe_p99_ms=ns_to_ms(percentile(ttfe, 99)),
        connections=client.connects,
        errors=dict(errors.most_common(5)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client", description="W4/W5 load")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("streams", help="W4: many concurrent delayed streams")
    s.add_argument("--streams", type=int, default=2000)
    s.add_argument("--chunks", type=int, default=25)
    s.add_argument("--delay-ms", type=int, default=200)
    s.add_argument("--stagger-ms", type=float, default=200.0)
    t = sub.add_parser("ttfb", help="W5: sequential time to first byte")
    t.add_argument("--requests", type=int, default=200)
    t.add_argument("--warmup", type=int, default=20)
    t.add_argument("--chunks", type=int, default=5)
    for p in (s, t):
        p.add_argument("--host", default=HOST)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--timeout", type=float, default=60.0)
    kwargs = vars(parser.parse_args(argv))
    raise_nofile_limit()
    result: StreamsResult | TtfbResult
    if kwargs.pop("cmd") == "streams":
        result = asyncio.run(run_streams(**kwargs))
    else:
        result = asyncio.run(run_ttfb(**kwargs))
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
