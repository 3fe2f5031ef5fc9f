"""One whole upstream answer for the proxy's own use: the ``/models`` list for its cache,
and ``/api/v1/key`` for a key's quota. Not a client's request: no attempt loop, no relay.

The body is read whole, up to a bound; a reused connection found dead is tried once more on
a fresh one (nothing else is retried: these are reads, repeated by their callers later).
"""

from __future__ import annotations

import asyncio

from orproxy.errors import Stage, UpstreamError, UpstreamProtocolError
from orproxy.proxy.models_cache import Fetched
from orproxy.upstream.connection import UpstreamConnection, may_resend
from orproxy.upstream.pool import UpstreamPool

Headers = list[tuple[bytes, bytes]]


async def fetch_whole(pool: UpstreamPool, target: bytes, headers: Headers, *,
                      first_byte_timeout: float, idle_timeout: float,
                      max_bytes: int) -> Fetched:
    """GET ``target`` (the upstream's own path and query) with ``headers`` (Host included)."""
    conn = await pool.acquire()
    try:
        try:
            return await _get(pool, conn, target, headers, first_byte_timeout, idle_timeout,
                              max_bytes)
        except UpstreamError as exc:
            if not may_resend(conn, exc):
                raise
            pool.discard(conn)
            conn = await pool.acquire(fresh=True)
            return await _get(pool, conn, target, headers, first_byte_timeout, idle_timeout,
                              max_bytes)
    except BaseException:
        pool.discard(conn)
        raise


async def _get(pool: UpstreamPool, conn: UpstreamConnection, target: bytes, headers: Headers,
               first_byte_timeout: float, idle_timeout: float, max_bytes: int) -> Fetched:
    await conn.send_request(b"GET", target, headers, [], idle_timeout)
    response = await conn.receive_head(first_byte_timeout)
    reader = _Whole(max_bytes)
    conn.read_body(reader, idle_timeout)
    try:
        await reader.done
    finally:
        conn.stop_body()
    pool.release(conn)
    return Fetched(response.status_code, list(response.headers.raw_items()),
                   b"".join(reader.parts))


class _Whole:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.parts: list[bytes] = []
        self._size = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_body(self, data: bytes, end: bool) -> None:
        self.parts.append(data)
        self._size += len(data)
        if self.done.done():
            return
        if self._size > self._limit:
            self.done.set_exception(UpstreamProtocolError(
                f"answer over {self._limit} bytes", Stage.RESPONSE))
        elif end:
            self.done.set_result(None)

    def on_body_error(self, exc: UpstreamError) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
