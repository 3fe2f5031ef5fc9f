"""The answers the proxy makes itself: /health, /metrics, /metrics/raw, and its errors.

Also the one way a local response is written (``respond``), and what becomes of the
connection after an answer (``After``): decided here, by the code that knows, and returned
to the connection loop.
"""

from __future__ import annotations

import enum
import json
import time

import h11

from orproxy import __version__
from orproxy.errors import Answer, ClientRequestError, answer_for, error_body, whole_seconds
from orproxy.headers import Headers, local_response_headers
from orproxy.http import cors
from orproxy.http.auth import check_access
from orproxy.http.client_conn import ClientConnection
from orproxy.http.routing import Route, RouteKind
from orproxy.http.validate import BodyFraming
from orproxy.observe import dashboard
from orproxy.proxy.record import Outcome, RequestRecord
from orproxy.proxy.services import Services

JSON = b"application/json"
METRICS_PAGES = frozenset({RouteKind.METRICS, RouteKind.METRICS_JSON, RouteKind.METRICS_RAW})
# a browser asked for the access key shows its login prompt (user name ignored)
LOGIN = [(b"WWW-Authenticate", b'Basic realm="orproxy", charset="UTF-8"'),
         (b"WWW-Authenticate", b"Bearer")]


class After(enum.Enum):
    """What becomes of the client connection once an answer has gone out."""

    KEEP_ALIVE = "keep_alive"  # read the next request
    CLOSE = "close"  # flush, then close
    LINGER = "linger"  # FIN, then drain what the client still sends, then close
    ABORT = "abort"  # drop at once: a response was cut short and must not look complete


def respond(client: ClientConnection, record: RequestRecord, status: int, ctype: bytes,
            body: bytes, *, close: bool, extra: Headers | None = None,
            head_only: bool = False) -> None:
    headers = local_response_headers(ctype, record.request_id, close=close,
                                     extra=(extra or []) + record.cors)
    headers.append((b"Content-Length", str(len(body)).encode()))
    events: list[h11.Event] = [h11.Response(status_code=status, headers=headers)]
    if body and not head_only:
        events.append(h11.Data(data=body))
    events.append(h11.EndOfMessage())
    record.status = status
    record.sent_bytes = 0 if head_only else len(body)
    client.send(*events)


def respond_error(client: ClientConnection, record: RequestRecord, answer: Answer, *,
                  close: bool = False, outcome: Outcome = Outcome.LOCAL_ERROR) -> After:
    """Send an error answer; LINGER if the connection closes after it (the client may
    still be sending), else KEEP_ALIVE."""
    close = close or answer.close
    if record.outcome is Outcome.OK or record.outcome is Outcome.LOCAL:
        record.outcome = outcome
    respond(client, record, answer.status, JSON,
            error_body(answer.status, answer.message, answer.metadata), close=close,
            extra=answer.headers, head_only=record.method == b"HEAD")
    return After.LINGER if close else After.KEEP_ALIVE


def refuse(client: ClientConnection, record: RequestRecord, status: int, message: str, *,
           close: bool, extra: Headers | None = None) -> After:
    return respond_error(client, record, Answer(status, message, extra or []), close=close)


def preflight(client: ClientConnection, request: h11.Request, record: RequestRecord,
              origins: tuple[str, ...], *, close: bool) -> After:
    """A CORS preflight answered here: 204 with what the origin may do, or 403."""
    origin = cors.allowed_origin(origins, request.headers)
    if origin is None:
        return refuse(client, record, 403, "origin not allowed (server.cors_origins)",
                      close=close)
    headers = local_response_headers(b"text/plain", record.request_id, close=close,
                                     extra=cors.preflight_headers(origin, request.headers))
    record.status, record.outcome = 204, Outcome.LOCAL
    client.send(h11.Response(status_code=204, headers=headers), h11.EndOfMessage())
    return After.LINGER if close else After.KEEP_ALIVE


class LocalPages:
    def __init__(self, services: Services) -> None:
        self._services = services

    def answer(self, client: ClientConnection, request: h11.Request, framing: BodyFraming,
               target: Route, record: RequestRecord) -> After:
        services = self._services
        close = not client.end_if_bodiless(framing) or services.draining
        kind = target.kind
        if kind is RouteKind.BAD_TARGET:
            raise ClientRequestError(400, "invalid request target")
        if kind is RouteKind.NOT_FOUND:
            return refuse(client, record, 404, f"not found: the API is at {self._base_url()} "
                          "(e.g. POST /api/v1/chat/completions)", close=close)
        if request.method not in (b"GET", b"HEAD"):
            return refuse(client, record, 405, "method not allowed", close=close,
                          extra=[(b"Allow", b"GET, HEAD")])
        if (kind in METRICS_PAGES and not services.config.metrics.public
                and not check_access(request.headers, services.access_key, basic=True)):
            return refuse(client, record, 401, "missing or invalid access key", close=close,
                          extra=LOGIN)
        status, ctype, body, extra = self._content(kind, request)
        record.outcome = Outcome.LOCAL
        respond(client, record, status, ctype, body, close=close, extra=extra,
                head_only=request.method == b"HEAD")
        return After.LINGER if close else After.KEEP_ALIVE

    def _facts(self) -> dashboard.Facts:
        """As configured now (a reload may change them)."""
        config = self._services.config
        origin = config.openrouter.base_url
        return dashboard.Facts(__version__, self._services.started_wall,
                               f"{origin.scheme}://{origin.host_header}{origin.path}",
                               config.openrouter.key_selection_strategy)

    def _base_url(self) -> str:
        """The base URL clients should use: a /v1/… or / request missed it."""
        host = self._services.config.server.host
        host = "localhost" if host in ("", "0.0.0.0", "::") else host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self._services.listen_port}/api/v1"

    def _content(self, kind: RouteKind, request: h11.Request,
                 ) -> tuple[int, bytes, bytes, Headers]:
        services = self._services
        if kind is RouteKind.METRICS_RAW:
            accept = b",".join(v for n, v in request.headers if n == b"accept")
            ctype, body = services.metrics.render(accept)
            return 200, ctype, body, []
        if kind is RouteKind.METRICS:
            # the page may not be framed by another site (clickjacking)
            return 200, b"text/html; charset=utf-8", dashboard.page(), [
                (b"Content-Security-Policy", b"frame-ancestors 'none'"),
                (b"X-Frame-Options", b"DENY")]
        if kind is RouteKind.METRICS_JSON:
            doc = dashboard.document(
                self._facts(), services.keys.snapshot(), services.models.snapshot(),
                services.models.total, services.upstream.snapshot(),
                services.metrics.totals().open_connections, services.probe,
                services.metrics.series.series(time.time()), services.quota_view())
            return 200, JSON, json.dumps(doc, separators=(",", ":")).encode(), []
        return self._health()

    def _health(self) -> tuple[int, bytes, bytes, Headers]:
        """ok: some key serves any request; paid_only: keys rest for free models only;
        unavailable (503, with Retry-After): no key serves anything now."""
        services = self._services
        keys = services.keys
        counts = keys.counts()
        if counts["available"]:
            status = "ok"
        elif counts["free_limited"]:
            status = "paid_only"
        else:
            status = "unavailable"
        doc: dict[str, object] = {
            "status": status,
            "keys": {**counts, "total": len(keys)},
            "uptime_seconds": round(time.monotonic() - services.started, 3),
            "draining": services.draining,
        }
        extra: Headers = []
        soonest = keys.soonest_available() if status != "ok" else None
        if soonest is not None:
            doc["retry_after_seconds"] = seconds = whole_seconds(soonest)
            extra.append((b"Retry-After", str(seconds).encode()))
        code = 503 if status == "unavailable" else 200
        return code, JSON, json.dumps(doc).encode(), extra


def error_answer(client: ClientConnection, record: RequestRecord, exc: BaseException,
                 outcome: Outcome, *, close: bool = False) -> After:
    return respond_error(client, record, answer_for(exc), close=close, outcome=outcome)
