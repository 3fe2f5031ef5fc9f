"""Light asyncio HTTP client (Protocols, no httpx) for concurrent-stream workloads.

Subcommands print one JSON object on stdout:

* ``streams``: W4 - N concurrent streams (one connection each), starts spread
  over ``--stagger-ms``; reports completions, wall time and per-chunk delay
  (arrival - upstream send time) percentiles.
* ``ttfb``: W5 - sequential streams on one keep-alive connection; reports time
  to first response byte and to first SSE event.

``fetch``/``fetch_stream`` are also used in-process by the runner's checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from bench import payloads
from bench.fake_upstream import raise_nofile_limit
from bench.httpwire import ProtocolError, ResponseParser, build_request
from bench.settings import ACCESS_KEY, CHAT_PATH, HOST
from bench.sinks import CollectSink, StreamRecorder, TimedSink
from bench.stats import ns_to_ms, percentile


class ClientConnection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._sink: TimedSink = CollectSink()
        self._parser = ResponseParser(self._sink)
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        sink = self._sink
        sink.now_ns = time.time_ns()
        sink.now_perf = now_perf = time.perf_counter_ns()
        if not sink.first_byte_perf:
            sink.first_byte_perf = now_perf
        waiter = self._waiter
        if waiter is None or waiter.done():
            sink.error(f"unsolicited bytes {data[:60]!r}")
            return
        try:
            self._parser.feed(data)
        except ProtocolError as exc:
            waiter.set_exception(exc)
            self.close()
            return
        if self._parser.complete:
            waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._parser.eof()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._parser.complete:
                waiter.set_result(None)
            else:
                waiter.set_exception(ConnectionError(f"connection closed mid-response ({exc})"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def reusable(self) -> bool:
        return not self.closed and self._parser.keep_alive

    async def request(self, raw: bytes, sink: TimedSink) -> None:
        """Send ``raw`` and wait until the response is fully parsed into ``sink``."""
        assert self.transport is not None
        if self.closed:
            raise ConnectionError("connection already closed")
        self._sink = sink
        if self._parser.reset(sink):
            sink.error("extra bytes after previous response")
        self._waiter = self._loop.create_future()
        sink.sent_perf = time.perf_counter_ns()
        self.transport.write(raw)
        await self._waiter


async def connect(host: str, port: int) -> ClientConnection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(ClientConnection, host, port)
    return conn


def stream_request(host: str, port: int, chunks: int, delay_ms: int) -> bytes:
    return build_request(
        "POST",
        f"{CHAT_PATH}?chunks={chunks}&delay_ms={delay_ms}",
        f"{host}:{port}",
        payloads.chat_request_body(stream=True),
        {"Authorization": f"Bearer {ACCESS_KEY}", "Content-Type": "application/json"},
    )


async def fetch(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> CollectSink:
    """One request on a fresh connection; returns the collected response."""
    conn = await asyncio.wait_for(connect(host, port), timeout)
    sink = CollectSink()
    try:
        raw = build_request(method, path, f"{host}:{port}", body, headers)
        await asyncio.wait_for(conn.request(raw, sink), timeout)
    finally:
        conn.close()
    return sink


async def fetch_stream(
    host: str, port: int, chunks: int, delay_ms: int, timeout: float = 30.0
) -> StreamRecorder:
    """One bench stream on a fresh connection; returns the checked recorder."""
    rec = StreamRecorder(chunks)
    conn: ClientConnection | None = None
    try:
        conn = await asyncio.wait_for(connect(host, port), timeout)
        await asyncio.wait_for(
            conn.request(stream_request(host, port, chunks, delay_ms), rec), timeout
        )
    except (TimeoutError, OSError, ProtocolError) as exc:
        rec.error(f"{type(exc).__name__}: {exc}")
    finally:
        if conn is not None:
            conn.close()
    rec.finish()
    return rec


# --- W4: many concurrent streams -----------------------------------------------------


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


async def _connect_all(
    host: str, port: int, count: int, timeout: float
) -> list[ClientConnection | str]:
    """Open ``count`` connections, at most 64 connects in flight; failures become strings."""
    sem = asyncio.Semaphore(64)

    async def one() -> ClientConnection | str:
        async with sem:
            try:
                return await asyncio.wait_for(connect(host, port), timeout)
            except (TimeoutError, OSError) as exc:
                return f"connect: {type(exc).__name__}: {exc}"[:120]

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _one_stream(
    conn: ClientConnection | str, raw: bytes, chunks: int, start_at: float, timeout: float
) -> tuple[StreamRecorder, float]:
    loop = asyncio.get_running_loop()
    rec = StreamRecorder(chunks)
    if isinstance(conn, str):
        rec.error(conn)
        return rec, 0.0
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    try:
        await asyncio.wait_for(conn.request(raw, rec), timeout)
    except (TimeoutError, OSError, ProtocolError) as exc:
        rec.error(f"{type(exc).__name__}: {exc}"[:120])
    rec.finish()
    return rec, time.perf_counter()


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

    Stream starts are spread evenly over ``stagger_ms``.
    """
    loop = asyncio.get_running_loop()
    raw = stream_request(host, port, chunks, delay_ms)
    t_connect = time.perf_counter()
    conns = await _connect_all(host, port, streams, timeout)
    connect_s = time.perf_counter() - t_connect
    await asyncio.sleep(0.2)
    step = stagger_ms / 1000.0 / max(1, streams)
    base = loop.time() + 0.02
    t0 = time.perf_counter() + 0.02
    results = await asyncio.gather(
        *(_one_stream(c, raw, chunks, base + i * step, timeout) for i, c in enumerate(conns))
    )
    wall = max(end for _, end in results) - t0
    for c in conns:
        if not isinstance(c, str):
            c.close()
    delays: list[int] = []
    first: list[int] = []
    errors: Counter[str] = Counter()
    complete = 0
    received = 0
    for rec, _ in results:
        delays.extend(rec.delays_ns)
        first.extend(rec.delays_ns[:1])
        received += rec.next_seq
        if rec.ok:
            complete += 1
        else:
            errors[rec.errors[0] if rec.errors else "incomplete"] += 1
    delays.sort()
    first.sort()
    return StreamsResult(
        streams=streams,
        complete=complete,
        wall_s=wall,
        chunks_received=received,
        delay_p50_ms=ns_to_ms(percentile(delays, 50)),
        delay_p99_ms=ns_to_ms(percentile(delays, 99)),
        delay_max_ms=ns_to_ms(delays[-1]) if delays else float("nan"),
        first_delay_p99_ms=ns_to_ms(percentile(first, 99)),
        connect_all_s=connect_s,
        errors=dict(errors.most_common(5)),
    )


# --- W5: time to first byte -------------------------------------------------------------


@dataclass
class TtfbResult:
    requests: int
    ok: int
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    ttfe_p50_ms: float
    ttfe_p99_ms: float
    errors: dict[str, int]


async def run_ttfb(
    host: str, port: int, requests: int, warmup: int, chunks: int, timeout: float
) -> TtfbResult:
    raw = stream_request(host, port, chunks, 0)
    conn: ClientConnection | None = None
    ttfb: list[int] = []
    ttfe: list[int] = []
    errors: Counter[str] = Counter()
    ok = 0
    for i in range(warmup + requests):
        rec = StreamRecorder(chunks, keep_delays=False)
        try:
            if conn is None or not conn.reusable:
                if conn is not None:
                    conn.close()
                conn = await asyncio.wait_for(connect(host, port), timeout)
            await asyncio.wait_for(conn.request(raw, rec), timeout)
        except (TimeoutError, OSError, ProtocolError) as exc:
            rec.error(f"{type(exc).__name__}: {exc}"[:120])
            if conn is not None:
                conn.close()
            conn = None
        rec.finish()
        if i < warmup:
            continue
        if rec.ok:
            ok += 1
            ttfb.append(rec.first_byte_perf - rec.sent_perf)
            ttfe.append(rec.first_event_perf - rec.sent_perf)
        else:
            errors[rec.errors[0]] += 1
    if conn is not None:
        conn.close()
    ttfb.sort()
    ttfe.sort()
    return TtfbResult(
        requests=requests,
        ok=ok,
        ttfb_p50_ms=ns_to_ms(percentile(ttfb, 50)),
        ttfb_p99_ms=ns_to_ms(percentile(ttfb, 99)),
        ttfe_p50_ms=ns_to_ms(percentile(ttfe, 50)),
        ttfe_p99_ms=ns_to_ms(percentile(ttfe, 99)),
        errors=dict(errors.most_common(5)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bench asyncio load client")
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
    args = parser.parse_args(argv)
    raise_nofile_limit()
    result: Any
    if args.cmd == "streams":
        result = asyncio.run(
            run_streams(
                args.host,
                args.port,
                args.streams,
                args.chunks,
                args.delay_ms,
                args.stagger_ms,
                args.timeout,
            )
        )
    else:
        result = asyncio.run(
            run_ttfb(args.host, args.port, args.requests, args.warmup, args.chunks, args.timeout)
        )
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
