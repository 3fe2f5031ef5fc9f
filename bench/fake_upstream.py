"""Fast fake OpenRouter on asyncio Protocols (no h11): the upstream for every subject.

Routes (HTTP/1.1, keep-alive, request bodies framed by Content-Length only):

* ``POST /api/v1/chat/completions`` -> ~1 KB JSON, or, when the body has
  ``"stream": true``, an SSE stream (chunked) of ``chunks`` events sent
  ``delay_ms`` apart (query parameters, defaults 20 and 0), the last one with
  ``usage``, then ``data: [DONE]``. Each event embeds its send time
  (``time.time_ns()``) so clients can measure per-chunk delay.
* ``GET /api/v1/models`` -> ~350 KB JSON.
* ``GET /_bench/stats`` -> JSON counters (requests, Authorization values seen).

One process serves on one core (``--workers N`` adds SO_REUSEPORT processes).
Run: ``python -m bench.fake_upstream --port 18090``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import re
import resource
import signal
import time
from collections import Counter

from bench import payloads
from bench.settings import HOST, UPSTREAM_PORT

_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_MAX_HEAD = 64 * 1024

_CHAT_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    % len(payloads.CHAT_RESPONSE_BODY)
) + payloads.CHAT_RESPONSE_BODY
_MODELS_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    % len(payloads.MODELS_BODY)
) + payloads.MODELS_BODY
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_SSE_END = payloads.http_chunk(payloads.DONE_EVENT) + payloads.LAST_HTTP_CHUNK


def _simple(status: bytes, body: bytes, close: bool = False) -> bytes:
    conn = b"Connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%b\r\n"
        % (status, len(body), conn)
    ) + body


_NOT_FOUND = _simple(b"404 Not Found", b'{"error":{"code":404,"message":"not found"}}')
_BAD_METHOD = _simple(b"405 Method Not Allowed", b'{"error":{"code":405,"message":"bad method"}}')
_BAD_REQUEST = _simple(b"400 Bad Request", b'{"error":{"code":400,"message":"bad request"}}', True)


class Stats:
    """Per-process counters, served at /_bench/stats."""

    def __init__(self) -> None:
        self.requests = 0
        self.streams = 0
        self.connections = 0
        self.auth: Counter[str] = Counter()

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "requests": self.requests,
                "streams": self.streams,
                "connections": self.connections,
                "authorization": dict(self.auth),
            }
        ).encode()


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: parse requests one at a time, answer, keep alive."""

    __slots__ = (
        "_buf",
        "_busy",
        "_closed",
        "_delay",
        "_keep_alive",
        "_loop",
        "_seq",
        "_stats",
        "_t0",
        "_timer",
        "_total",
        "_transport",
    )

    def __init__(self, stats: Stats) -> None:
        self._loop = asyncio.get_running_loop()
        self._stats = stats
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._busy = False
        self._closed = False
        self._keep_alive = True
        self._seq = 0
        self._total = 0
        self._delay = 0.0
        self._t0 = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data
        if not self._busy:
            self._process()

    # -- request parsing ----------------------------------------------------
    def _process(self) -> None:
        transport = self._transport
        assert transport is not None
        while not self._busy and not self._closed:
            buf = self._buf
            hend = buf.find(b"\r\n\r\n")
            if hend < 0:
                if len(buf) > _MAX_HEAD:
                    self._fail()
                return
            line_end = buf.find(b"\r\n", 0, hend + 2)
            parts = buf[:line_end].split(b" ")
            if len(parts) != 3:
                self._fail()
                return
            method, target, version = parts
            raw_headers = buf[line_end : hend + 2]
            headers = raw_headers.lower()
            clen = 0
            i = headers.find(b"\r\ncontent-length:")
            if i >= 0:
                j = headers.find(b"\r\n", i + 17)
                try:
                    clen = int(headers[i + 17 : j])
                except ValueError:
                    self._fail()
                    return
            elif b"\r\ntransfer-encoding:" in headers:
                self._fail()  # the proxy always sends Content-Length
                return
            end = hend + 4 + clen
            if len(buf) < end:
                return
            body = buf[hend + 4 : end]
            self._buf = buf[end:]
            if version == b"HTTP/1.1":
                self._keep_alive = b"\r\nconnection: close" not in headers
            else:
                self._keep_alive = b"\r\nconnection: keep-alive" in headers
            i = headers.find(b"\r\nauthorization:")
            if i >= 0:
                j = headers.find(b"\r\n", i + 16)
                self._stats.auth[raw_headers[i + 16 : j].strip().decode("latin-1")] += 1
            self._stats.requests += 1
            self._dispatch(transport, method, target, body)

    def _fail(self) -> None:
        assert self._transport is not None
        self._transport.write(_BAD_REQUEST)
        self._transport.close()
        self._closed = True

    def _finish(self, transport: asyncio.Transport) -> None:
        if not self._keep_alive:
            transport.close()
            self._closed = True

    # -- routing --------------------------------------------------------------
    def _dispatch(
        self, transport: asyncio.Transport, method: bytes, target: bytes, body: bytes
    ) -> None:
        path, _, query = target.partition(b"?")
        if path == b"/api/v1/chat/completions":
            if method != b"POST":
                transport.write(_BAD_METHOD)
            elif _STREAM_RE.search(body):
                self._start_stream(transport, query)
                return
            else:
                transport.write(_CHAT_RESPONSE)
        elif path == b"/api/v1/models":
            transport.write(_MODELS_RESPONSE if method == b"GET" else _BAD_METHOD)
        elif path == b"/_bench/stats":
            transport.write(_simple(b"200 OK", self._stats.as_json()))
        else:
            transport.write(_NOT_FOUND)
        self._finish(transport)

    # -- streaming --------------------------------------------------------------
    def _start_stream(self, transport: asyncio.Transport, query: bytes) -> None:
        chunks, delay_ms = 20, 0.0
        for item in query.split(b"&"):
            key, _, value = item.partition(b"=")
            try:
                if key == b"chunks":
                    chunks = max(1, int(value))
                elif key == b"delay_ms":
                    delay_ms = max(0.0, float(value))
            except ValueError:
                pass
        self._stats.streams += 1
        transport.write(_SSE_HEAD)
        if delay_ms <= 0:
            event = payloads.sse_event
            chunk = payloads.http_chunk
            for seq in range(chunks - 1):
                transport.write(chunk(event(seq, chunks, time.time_ns())))
            transport.write(chunk(event(chunks - 1, chunks, time.time_ns())) + _SSE_END)
            self._finish(transport)
            return
        self._busy = True
        self._seq = 0
        self._total = chunks
        self._delay = delay_ms / 1000.0
        self._t0 = self._loop.time()
        self._timer = self._loop.call_at(self._t0 + self._delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        transport = self._transport
        if self._closed or transport is None:
            return
        seq = self._seq
        data = payloads.http_chunk(payloads.sse_event(seq, self._total, time.time_ns()))
        self._seq = seq = seq + 1
        if seq < self._total:
            transport.write(data)
            self._timer = self._loop.call_at(self._t0 + (seq + 1) * self._delay, self._tick)
            return
        transport.write(data + _SSE_END)
        self._busy = False
        self._finish(transport)
        if not self._closed and self._buf:
            self._process()


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def serve(host: str, port: int, reuse_port: bool) -> None:
    """Serve until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await loop.create_server(
        lambda: UpstreamProtocol(stats), host, port, backlog=4096, reuse_port=reuse_port
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _run_one(host: str, port: int, reuse_port: bool) -> None:
    raise_nofile_limit()
    asyncio.run(serve(host, port, reuse_port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=UPSTREAM_PORT)
    parser.add_argument(
        "--workers", type=int, default=1, help="processes (SO_REUSEPORT); default 1 = one core"
    )
    args = parser.parse_args(argv)
    if args.workers <= 1:
        _run_one(args.host, args.port, False)
        return 0
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_run_one, args=(args.host, args.port, True))
        for _ in range(args.workers - 1)
    ]
    for proc in procs:
        proc.start()
    try:
        _run_one(args.host, args.port, True)
    finally:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                proc.terminate()
            proc.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
