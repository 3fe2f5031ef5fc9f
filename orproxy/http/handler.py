"""The per-connection keep-alive loop and one exchange at a time.

The only module that knows every part: it reads a request (ServerConnection), checks it
(validate, routing, auth), answers local routes, or hands the request to the Exchanger
and relays the upstream's response with backpressure. It records metrics and the access
log at phase boundaries. A local error is possible only before our response head is sent;
after it, a failure closes the connection so a truncated body never looks complete.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h11

from orproxy import dashboard
from orproxy.config import Config
from orproxy.errors import (
    ClientRequestError,
    StreamClosed,
    StreamTimeout,
    UpstreamError,
    error_body,
)
from orproxy.http import headers as hdr
from orproxy.http.auth import check_access
from orproxy.http.relay import BodyRelay
from orproxy.http.routing import Route, RouteKind, route
from orproxy.http.server_conn import ServerConnection
from orproxy.http.validate import BodyFraming, check_request_head
from orproxy.keys import KeyPool
from orproxy.stream import Stream
from orproxy.upstream.connection import UpstreamConnection
from orproxy.upstream.exchange import (
    Exchanger,
    ExchangeResult,
    NoKeyAvailable,
    UpstreamRequest,
)
from orproxy.upstream.pool import UpstreamPool

if TYPE_CHECKING:
    from orproxy.metrics import Metrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("orproxy.access")

JSON = b"application/json"
LINGER_SECONDS = 2.0


@dataclass
class Context:
    """Everything a connection needs, built once by the app."""

    config: Config
    keys: KeyPool
    upstream: UpstreamPool
    exchanger: Exchanger
    metrics: Metrics
    started: float = field(default_factory=time.monotonic)
    draining: bool = False
    handlers: set[ConnectionHandler] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.access_key = self.config.server.access_key.encode()
        self.public = frozenset(p.encode() for p in self.config.openrouter.public_endpoints)
        self.base_path = self.config.openrouter.base_url.path.encode()


@dataclass
class Exchange:
    """What one request/response cycle records for logs and metrics."""

    method: bytes
    path: bytes
    request_id: bytes
    route: str = "unknown"
    status: int = 0
    key_id: str = "-"
    attempts: int = 0
    outcome: str = "ok"
    sent_bytes: int = 0


class ConnectionHandler:
    def __init__(self, stream: Stream, ctx: Context) -> None:
        self.stream = stream
        self.ctx = ctx
        cfg = ctx.config
        self.sc = ServerConnection(stream, cfg.limits, cfg.timeouts)
        self.task: asyncio.Task[None] | None = None
        self.busy = False  # a request is being served (graceful shutdown waits for these)
        self._forwarding = False
        self._client_gone = False
        self._linger = False  # we close after an answer while the client may still send
        stream.on_peer_gone = self._on_peer_gone

    def _on_peer_gone(self) -> None:
        self._client_gone = True
        if self._forwarding and self.task is not None:
            # the client left while we wait on the upstream: stop the generation (and its
            # billing) by dropping the upstream connection, like nginx's 499
            self.task.cancel("client closed the connection")

    def close_if_idle(self) -> None:
        if not self.busy:
            self.stream.close()
            if self.task is not None:
                self.task.cancel("shutting down")

    async def run(self) -> None:
        self.task = asyncio.current_task()
        self.ctx.handlers.add(self)
        self.ctx.metrics.connection_opened()
        try:
            await self._serve()
        except StreamClosed:
            pass
        except StreamTimeout:
            # the client stopped reading: close() would wait forever to flush to it
            self.stream.abort()
        except asyncio.CancelledError:
            if not self._client_gone and not self.ctx.draining:
                raise
        except Exception:
            log.exception("connection handler failed")
        finally:
            self.ctx.handlers.discard(self)
            self.ctx.metrics.connection_closed()
            if self._linger and not self._client_gone:
                await self.stream.linger_close(LINGER_SECONDS)
            self.stream.close(self.ctx.config.timeouts.client_write_seconds)

    async def _serve(self) -> None:
        sc = self.sc
        while not self.ctx.draining:
            self.busy = False
            try:
                request = await sc.next_request()
            except ClientRequestError as exc:
                if sc.can_respond and not self.stream.at_eof:
                    ex = Exchange(b"-", b"-", _new_request_id(), "bad_request")
                    self._local_error(ex, exc.status, exc.message, close=True)
                    self._log(ex, time.monotonic())
                return
            if request is None:
                return
            self.busy = True
            if not await self._handle(request) or not sc.next_cycle():
                return
            # a client that pipelines and never reads must not grow our buffer: wait for it
            # to take this answer before reading the next request (write timeout applies)
            await sc.drain()

    async def _handle(self, request: h11.Request) -> bool:
        """Serve one request; False if the connection must close afterwards."""
        t0 = time.monotonic()
        ex = Exchange(request.method, request.target.partition(b"?")[0][:256],
                      hdr.client_request_id(request.headers) or _new_request_id())
        try:
            limits = self.ctx.config.limits
            framing = check_request_head(
                request.http_version, request.method, request.target, request.headers,
                max_head_bytes=limits.max_head_bytes, max_header_count=limits.max_header_count,
                max_target_bytes=limits.max_target_bytes)
            target = route(request.target, self.ctx.public)
            ex.route = target.label
            if target.kind is RouteKind.FORWARD:
                await self._forward(request, framing, target, ex)
            else:
                self._local(request, framing, target, ex)
        except ClientRequestError as exc:
            if self.sc.can_respond:
                self._local_error(ex, exc.status, exc.message, close=True)
            return False
        except asyncio.CancelledError:
            ex.status = ex.status or 499
            ex.outcome = "client_gone" if self._client_gone else "cancelled"
            raise
        finally:
            self._log(ex, t0)
        return not self.ctx.draining and ex.outcome != "aborted"

    # --- local routes ---------------------------------------------------------------------

    def _local(self, request: h11.Request, framing: BodyFraming, target: Route,
               ex: Exchange) -> None:
        close = not self.sc.end_if_bodiless(framing) or self.ctx.draining
        kind = target.kind
        if kind is RouteKind.BAD_TARGET:
            raise ClientRequestError(400, "invalid request target")
        if kind is RouteKind.NOT_FOUND:
            self._local_error(ex, 404, "not found", close=close)
            return
        if request.method not in (b"GET", b"HEAD"):
            self._local_error(ex, 405, "method not allowed", close=close,
                              extra=[(b"Allow", b"GET, HEAD")])
            return
        status, ctype, body, extra = self._local_body(kind)
        self._respond(ex, status, ctype, body, close=close, extra=extra,
                      head_only=request.method == b"HEAD")

    def _local_body(self, kind: RouteKind) -> tuple[int, bytes, bytes, hdr.Headers]:
        ctx = self.ctx
        if kind is RouteKind.METRICS_RAW:
            return 200, ctx.metrics.content_type.encode(), ctx.metrics.render(), []
        if kind is RouteKind.METRICS:
            return 200, b"text/html; charset=utf-8", dashboard.render(ctx.keys.snapshot(),
                                                                      ctx.metrics), []
        counts = ctx.keys.counts()
        soonest = ctx.keys.soonest_available() if not counts["available"] else None
        doc: dict[str, object] = {
            "status": "ok" if counts["available"] else "unavailable",
            "keys": {**counts, "total": len(ctx.keys)},
            "uptime_seconds": round(time.monotonic() - ctx.started, 3),
            "draining": ctx.draining,
        }
        extra: hdr.Headers = []
        if soonest is not None:
            doc["retry_after_seconds"] = seconds = _whole_seconds(soonest)
            extra.append((b"Retry-After", str(seconds).encode()))
        status = 200 if counts["available"] else 503
        return status, JSON, json.dumps(doc).encode(), extra

    # --- forwarding ------------------------------------------------------------------------

    async def _forward(self, request: h11.Request, framing: BodyFraming, target: Route,
                       ex: Exchange) -> None:
        ctx, sc = self.ctx, self.sc
        bodiless = sc.end_if_bodiless(framing)
        # A CORS preflight carries no credentials by design and can do nothing: it goes up
        # like a public endpoint, so browser clients get OpenRouter's own CORS answer.
        public = target.public or (request.method == b"OPTIONS" and any(
            n == b"access-control-request-method" for n, _ in request.headers))
        if not public and not check_access(request.headers, ctx.access_key):
            # a body the client may still send is not read: answer, then close
            self._local_error(ex, 401, "missing or invalid access key", close=not bodiless,
                              extra=[(b"WWW-Authenticate", b"Bearer")])
            return
        expect = [v.lower() for n, v in request.headers if n == b"expect"]
        if expect and expect != [b"100-continue"]:
            raise ClientRequestError(417, "only Expect: 100-continue is supported")
        body = b"" if bodiless else await sc.read_body(framing)
        req = UpstreamRequest(request.method, ctx.base_path + target.path,
                              request.headers.raw_items(), body, framing.framed, ex.request_id,
                              public)
        self._forwarding = True
        try:
            if self._client_gone:
                raise asyncio.CancelledError("client closed the connection")
            await self._exchange_and_relay(req, ex)
        finally:
            self._forwarding = False

    async def _exchange_and_relay(self, req: UpstreamRequest, ex: Exchange) -> None:
        try:
            result = await self.ctx.exchanger.run(req)
        except NoKeyAvailable as exc:
            ex.attempts, ex.outcome = exc.attempts, "no_key"
            self._no_key(ex, exc, self.ctx.draining)
            return
        except UpstreamError as exc:
            ex.outcome = "upstream_error"
            log.warning("upstream failed rid=%s: %s", req.request_id.decode(), exc.message)
            # the details (addresses, the outgoing proxy) stay in our log
            self._local_error(ex, exc.status, exc.public_message, close=self.ctx.draining)
            return
        ex.key_id = result.key.id if result.key else "-"
        ex.attempts, ex.outcome = result.attempts, result.outcomes[-1] if result.outcomes else "ok"
        await self._relay(result, ex)

    def _no_key(self, ex: Exchange, exc: NoKeyAvailable, close: bool) -> None:
        if exc.retry_after is None:
            self._local_error(ex, 503, "every upstream key is disabled", close=close)
            return
        seconds = _whole_seconds(exc.retry_after)
        metadata: dict[str, object] = {"retry_after_seconds": seconds}
        if exc.upstream_message:  # e.g. which of OpenRouter's limits was hit
            metadata["upstream_message"] = exc.upstream_message
        self._local_error(ex, 429, f"every upstream key is rate limited; retry in {seconds}s",
                          close=close, extra=[(b"Retry-After", str(seconds).encode())],
                          metadata=metadata)

    async def _relay(self, result: ExchangeResult, ex: Exchange) -> None:
        """Pass the upstream response on: the head with whatever body is already here in
        one write, then the rest as it arrives (BodyRelay)."""
        resp, conn = result.response, result.conn
        timeouts = self.ctx.config.timeouts
        body, ended = result.body, result.ended
        relay: BodyRelay | None = None
        try:
            if conn is not None and not ended:
                more, ended = conn.take_buffered()
                body += more
            headers = hdr.client_response_headers(resp.headers.raw_items(),
                                                  request_id=ex.request_id,
                                                  close=self.ctx.draining)
            events: list[h11.Event] = [h11.Response(status_code=resp.status_code,
                                                    headers=headers, reason=resp.reason)]
            if body:
                events.append(h11.Data(data=body))
            if ended:
                events.append(h11.EndOfMessage())
            ex.status = resp.status_code
            ex.sent_bytes = len(body)
            self.sc.send(*events)
            if not ended:
                assert conn is not None
                relay = BodyRelay(conn, self.sc, idle_timeout=timeouts.upstream_idle_seconds,
                                  write_timeout=timeouts.client_write_seconds)
                await relay.start()
        except UpstreamError as exc:
            # after our head went out: end the client connection without a final chunk
            ex.outcome = "aborted"
            log.warning("upstream failed mid-response rid=%s: %s", ex.request_id.decode(),
                        exc.message)
            self._drop(conn)
            self.stream.close()
            return
        except BaseException:
            self._drop(conn)
            raise
        finally:
            if relay is not None:
                relay.stop()
                ex.sent_bytes += relay.sent
            self.ctx.metrics.bytes_sent(ex.sent_bytes)
        if conn is not None:
            self.ctx.upstream.release(conn)

    def _drop(self, conn: UpstreamConnection | None) -> None:
        if conn is not None:
            self.ctx.upstream.discard(conn)

    # --- responses the proxy makes itself ---------------------------------------------------

    def _respond(self, ex: Exchange, status: int, ctype: bytes, body: bytes, *, close: bool,
                 extra: hdr.Headers | None = None, head_only: bool = False) -> None:
        headers = hdr.local_response_headers(ctype, ex.request_id, close=close, extra=extra)
        headers.append((b"Content-Length", str(len(body)).encode()))
        events: list[h11.Event] = [h11.Response(status_code=status, headers=headers)]
        if body and not head_only:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        ex.status = status
        ex.sent_bytes = 0 if head_only else len(body)
        self._linger = self._linger or close
        self.sc.send(*events)

    def _local_error(self, ex: Exchange, status: int, message: str, *, close: bool,
                     extra: hdr.Headers | None = None,
                     metadata: dict[str, object] | None = None) -> None:
        if ex.outcome == "ok":
            ex.outcome = "local_error"
        self._respond(ex, status, JSON, error_body(status, message, metadata),
                      close=close, extra=extra)

    def _log(self, ex: Exchange, t0: float) -> None:
        elapsed = time.monotonic() - t0
        self.ctx.metrics.request_done(ex.route, ex.status, elapsed)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "rid=%s method=%s path=%s status=%d ms=%.1f key=%s attempts=%d outcome=%s "
                "bytes=%d", ex.request_id.decode(), ex.method.decode("latin-1"),
                ex.path.decode("latin-1"), ex.status, elapsed * 1000, ex.key_id, ex.attempts,
                ex.outcome, ex.sent_bytes)


_ID_PREFIX = os.urandom(6).hex()
_id_counter = itertools.count(1)


def _new_request_id() -> bytes:
    """Unique per process (a random prefix per start, then a counter): no syscall per
    request, unlike os.urandom."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}".encode()


def _whole_seconds(seconds: float) -> int:
    whole = int(seconds)
    return max(whole + (whole < seconds), 1)
