"""The per-connection keep-alive loop: one request at a time, from head to answer.

It owns the connection's lifecycle (``Phase``, one explicit state), reads each request
head, checks and routes it, hands it to the local pages or the forwarder, and ends the
connection as the answering code decided (``After``): keep alive, close, linger, abort. A
client that leaves while the upstream is being waited on cancels the work at once, which
closes the upstream connection and stops the generation (and its billing). When the
shutdown grace runs out before a request is answered, the client gets a 503.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time

import h11

from orproxy.errors import (
    ClientRequestError,
    ConnectionLimit,
    ShuttingDown,
    StreamClosed,
    StreamTimeout,
)
from orproxy.headers import client_request_id
from orproxy.http import cors
from orproxy.http.client_conn import ClientConnection
from orproxy.http.routing import RouteKind, route
from orproxy.http.validate import check_request_head
from orproxy.observe.logs import request_id
from orproxy.proxy.forward import Forwarder, is_preflight
from orproxy.proxy.local import After, LocalPages, error_answer, preflight
from orproxy.proxy.record import Outcome, RequestRecord, new_request_id
from orproxy.proxy.services import Services
from orproxy.stream import Stream

log = logging.getLogger(__name__)
access_log = logging.getLogger("orproxy.access")

LINGER_SECONDS = 2.0


class Phase(enum.Enum):
    IDLE = "idle"  # between requests: may be closed at shutdown
    READING = "reading"  # a request head or body is arriving, or a local page is answered
    FORWARDING = "forwarding"  # waiting on the upstream or relaying its answer
    GONE = "gone"  # the client closed or reset the connection
    CLOSED = "closed"


class ConnectionLoop:
    def __init__(self, stream: Stream, services: Services, *, reserve: bool = False) -> None:
        self.stream = stream
        self.services = services
        self.reserve = reserve  # accepted over the connection cap: local pages only
        self.client = ClientConnection(stream, services.config.limits, services.config.timeouts)
        self.phase = Phase.IDLE
        self._task: asyncio.Task[None] | None = None
        self._local = LocalPages(services)
        self._forwarder = Forwarder(services)
        stream.on_peer_gone = self._peer_gone

    def __repr__(self) -> str:
        return f"<ConnectionLoop {self.phase.value} {self.client!r}>"

    def _peer_gone(self) -> None:
        was = self.phase
        self.phase = Phase.GONE
        if was is Phase.FORWARDING and self._task is not None:
            # like nginx's 499: drop the upstream connection, which stops the generation
            self._task.cancel("client closed the connection")

    def close_if_idle(self) -> None:
        if self.phase is Phase.IDLE:
            self.stream.close()
            if self._task is not None:
                self._task.cancel("shutting down")

    async def run(self) -> None:
        self._task = asyncio.current_task()
        services = self.services
        services.connections.add(self)
        services.metrics.connection_opened()
        after = After.CLOSE
        try:
            after = await self._serve()
        except StreamClosed:
            pass
        except StreamTimeout:
            after = After.ABORT  # the client stopped reading: close() would wait to flush
        except asyncio.CancelledError:
            if self.phase is not Phase.GONE and not services.draining:
                raise
        except Exception:
            log.exception("connection failed")
            after = After.ABORT
        finally:
            services.connections.discard(self)
            services.metrics.connection_closed()
            await self._end(after)

    async def _end(self, after: After) -> None:
        gone = self.phase is Phase.GONE
        self.phase = Phase.CLOSED
        if after is After.ABORT:
            self.stream.abort()
            return
        if after is After.LINGER and not gone:
            await self.stream.linger_close(LINGER_SECONDS)
        self.stream.close(self.services.config.timeouts.client_write_seconds)

    async def _serve(self) -> After:
        client = self.client
        while not self.services.draining:
            self.phase = Phase.IDLE
            try:
                request = await client.next_request()
            except ClientRequestError as exc:
                if not client.can_respond or self.stream.at_eof:
                    return After.CLOSE
                record = RequestRecord(b"-", b"-", new_request_id(), "bad_request")
                after = error_answer(client, record, exc, Outcome.BAD_REQUEST)
                self._log(record)
                return after
            if request is None:
                return After.CLOSE
            self.phase = Phase.READING
            after = await self._handle(request)
            if after is not After.KEEP_ALIVE or not client.next_cycle():
                return after
            # a client that pipelines and never reads must not grow our buffer: wait for it
            # to take this answer before reading the next request (write timeout applies)
            await client.drain()
        return After.CLOSE

    async def _handle(self, request: h11.Request) -> After:
        """Serve one request; say what becomes of the connection."""
        client, services = self.client, self.services
        record = RequestRecord(request.method, request.target.partition(b"?")[0][:256],
                               client_request_id(request.headers) or new_request_id())
        context = request_id.set(record.request_id.decode())
        try:
            limits = services.config.limits
            framing = check_request_head(
                request.http_version, request.method, request.target, request.headers,
                max_head_bytes=limits.max_head_bytes, max_header_count=limits.max_header_count,
                max_target_bytes=limits.max_target_bytes)
            target = route(request.target, services.public)
            record.route = target.label
            origins = services.config.server.cors_origins
            if origins:
                origin = cors.allowed_origin(origins, request.headers)
                record.cors = cors.response_headers(origin) if origin else []
                if is_preflight(request) and target.kind is not RouteKind.BAD_TARGET:
                    bodiless = client.end_if_bodiless(framing)
                    return preflight(client, request, record, origins,
                                     close=not bodiless or services.draining)
            if target.kind is not RouteKind.FORWARD:
                after = self._local.answer(client, request, framing, target, record)
            elif self.reserve:
                raise ConnectionLimit
            else:
                prepared = await self._forwarder.prepare(client, request, framing, target,
                                                         record)
                if isinstance(prepared, After):
                    return prepared
                if self.phase is Phase.GONE:
                    raise asyncio.CancelledError("client closed the connection")
                self.phase = Phase.FORWARDING
                after = await self._forwarder.deliver(client, prepared, record)
        except (ClientRequestError, ConnectionLimit) as exc:
            if not client.can_respond:
                return After.ABORT
            return error_answer(client, record, exc, Outcome.BAD_REQUEST
                                if isinstance(exc, ClientRequestError) else Outcome.LOCAL_ERROR)
        except asyncio.CancelledError:
            return self._cancelled(record)
        finally:
            self._log(record)
            request_id.reset(context)
        return After.CLOSE if services.draining and after is After.KEEP_ALIVE else after

    def _cancelled(self, record: RequestRecord) -> After:
        """The client left, or the shutdown grace ran out."""
        if self.phase is Phase.GONE or not self.services.draining:
            record.status = record.status or 499
            record.outcome = Outcome.CLIENT_GONE
            raise asyncio.CancelledError
        record.outcome = Outcome.SHUTDOWN
        if not self.client.can_respond:
            return After.ABORT  # our head went out: the body must not look complete
        return error_answer(self.client, record, ShuttingDown(), Outcome.SHUTDOWN)

    def _log(self, record: RequestRecord) -> None:
        elapsed = time.monotonic() - record.started
        self.services.metrics.request_done(record.route, record.method, record.status,
                                           elapsed)
        if not access_log.isEnabledFor(logging.INFO):
            return
        fields = {
            "rid": record.request_id.decode(), "method": record.method.decode("latin-1"),
            "path": record.path.decode("latin-1"), "route": record.route,
            "status": record.status, "ms": round(elapsed * 1000, 1), "key": record.key_id,
            "attempts": len(record.attempts), "outcome": record.outcome.value,
            "bytes": record.sent_bytes,
        }
        if record.model:
            fields.update(model=record.model, prompt_tokens=record.prompt_tokens,
                          completion_tokens=record.completion_tokens,
                          cost=round(record.cost, 8))
        access_log.info(" ".join(f"{k}={v}" for k, v in fields.items()),
                        extra={"fields": fields})
