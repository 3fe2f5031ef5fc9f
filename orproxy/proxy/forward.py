"""Forwarding one request: access check, CORS preflight, Expect, the body, then the attempt
loop, the relay of the answer, and what the answer tells us (tokens, cost, in-band errors).

Two steps, so the connection loop knows when the upstream is being waited on: ``prepare``
(nothing has gone upstream yet: refuse, or read the body) and ``deliver`` (the attempts,
then the response head — the point of no return — and the body relay). Before the head
goes out any failure is answered with a JSON error; after it, a failure cuts the
connection (no final chunk), so a truncated body never looks complete. The body is read
by a scanner beside the relay (never changed) for ``usage`` and in-band errors.
"""

from __future__ import annotations

import logging
import time

import h11

from orproxy.errors import ClientRequestError, NoKeyAvailable, UpstreamError
from orproxy.headers import Headers, client_response_headers, only_decodable_codings
from orproxy.http import cors
from orproxy.http.auth import check_access
from orproxy.http.client_conn import ClientConnection
from orproxy.http.routing import Route
from orproxy.http.validate import BodyFraming
from orproxy.keys import Key, scrub
from orproxy.observe.usage import InflatingScanner, UsageScanner, scanner_for
from orproxy.proxy.attempts import Delivery, UpstreamRequest
from orproxy.proxy.local import After, error_answer, refuse
from orproxy.proxy.models_cache import Fetched
from orproxy.proxy.record import Outcome, RequestRecord
from orproxy.proxy.relay import BodyRelay
from orproxy.proxy.requestinfo import NOTHING, request_info
from orproxy.proxy.services import Services
from orproxy.upstream.classify import Outcome as VerdictOutcome
from orproxy.upstream.classify import classify

log = logging.getLogger(__name__)

READ_METHODS = frozenset({b"GET", b"HEAD"})


def is_preflight(request: h11.Request) -> bool:
    """A CORS preflight: OPTIONS with Access-Control-Request-Method. It carries no
    credentials by design and can do nothing."""
    return request.method == b"OPTIONS" and any(
        n == b"access-control-request-method" for n, _ in request.headers)


class Forwarder:
    def __init__(self, services: Services) -> None:
        self._services = services

    async def prepare(self, client: ClientConnection, request: h11.Request,
                      framing: BodyFraming, target: Route, record: RequestRecord,
                      ) -> UpstreamRequest | After:
        """The request to send upstream, or the After of a refusal already answered."""
        services = self._services
        bodiless = client.end_if_bodiless(framing)
        # public endpoints are public for reading; a preflight goes up without any key too,
        # so browser clients get OpenRouter's own CORS answer
        public = (target.public and request.method in READ_METHODS) or is_preflight(request)
        if not public and not check_access(request.headers, services.access_key):
            # a body the client may still be sending is never read: answer, then close
            record.outcome = Outcome.LOCAL_ERROR
            return refuse(client, record, 401, "missing or invalid access key",
                          close=not bodiless, extra=[(b"WWW-Authenticate", b"Bearer")])
        expect = [v.lower() for n, v in request.headers if n == b"expect"]
        if expect and expect != [b"100-continue"]:
            raise ClientRequestError(417, "only Expect: 100-continue is supported")
        body = [] if bodiless else await client.read_body(framing)
        record.received_bytes = sum(map(len, body))
        services.metrics.bytes_received(record.received_bytes)
        headers = request.headers.raw_items()
        if services.config.metrics.enable_token_counting:
            headers = only_decodable_codings(headers)
        # the body is read only when something depends on it: which keys may serve (free_only,
        # free-model rests) or which key the conversation had (sticky sessions)
        sticky = services.attempts.sticky is not None
        info = (request_info(request.method, headers, body, conversation=sticky)
                if sticky or services.config.openrouter.free_only or services.keys.free_rests()
                else NOTHING)
        return UpstreamRequest(request.method, services.base_path + target.path, headers,
                               body, framing.framed, record.request_id, public,
                               model=info.model, conversation=info.conversation,
                               models_query=_models_query(request.method, target.path))

    async def deliver(self, client: ClientConnection, req: UpstreamRequest,
                      record: RequestRecord) -> After:
        services = self._services
        openrouter = services.config.openrouter
        if req.models_query is not None and (openrouter.enable_cache or openrouter.free_only):
            return await self._from_cache(client, req, record)
        if req.model is not None:
            free = await self._is_free(req.model)
            if openrouter.free_only and not free:
                record.outcome = Outcome.LOCAL_ERROR
                return refuse(client, record, 403, f"model {req.model[:120]!r} is not free and "
                              "this proxy serves free models only (free_only)",
                              close=services.draining)
            req.free = free
        try:
            delivery = await services.attempts.run(req, record.attempts)
        except NoKeyAvailable as exc:
            return error_answer(client, record, exc, Outcome.NO_KEY, close=services.draining)
        except UpstreamError as exc:
            # the details (addresses, the outgoing proxy) stay in our log
            log.warning("upstream failed rid=%s: %s", req.request_id.decode(), exc.message)
            return error_answer(client, record, exc, Outcome.UPSTREAM_ERROR,
                                close=services.draining)
        gone = delivery.verdict
        if gone.outcome is VerdictOutcome.MODEL_GONE and openrouter.free_only:
            # its free variant ended: the free-only list stops offering it
            services.models_cache.drop(gone.model or req.model or "")
        return await self._relay(client, delivery, record)

    async def _is_free(self, model: str) -> bool:
        """Free as the /models list says (every price zero); while no list is known, the
        ``:free`` suffix decides. Only free_only waits for the list to load."""
        cache = self._services.models_cache
        if self._services.config.openrouter.free_only:
            await cache.ensure_loaded()
        known = cache.is_free(model)
        return known if known is not None else model.endswith(":free")

    async def _from_cache(self, client: ClientConnection, req: UpstreamRequest,
                          record: RequestRecord) -> After:
        """``GET/HEAD /api/v1/models``: from the cache (or the upstream's answer passed
        through when the cache cannot hold it)."""
        services = self._services
        assert req.models_query is not None
        head_only = req.method == b"HEAD"
        try:
            answer = await services.models_cache.answer(req.models_query, req.headers,
                                                        head_only)
        except UpstreamError as exc:
            log.warning("models list failed rid=%s: %s", req.request_id.decode(), exc.message)
            return error_answer(client, record, exc, Outcome.UPSTREAM_ERROR,
                                close=services.draining)
        raw = answer.headers
        if not isinstance(answer, Fetched) and answer.content_length is not None:
            raw = [*raw, (b"Content-Length", str(answer.content_length).encode())]
        headers = self._client_headers(raw, record)
        status, body = answer.status, answer.body
        events: list[h11.Event] = [h11.Response(status_code=status, headers=headers)]
        if body and not head_only:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        client.send(*events)
        record.status = status
        record.sent_bytes = 0 if head_only else len(body)
        services.metrics.bytes_sent(record.sent_bytes)
        return After.CLOSE if services.draining else After.KEEP_ALIVE

    async def _relay(self, client: ClientConnection, delivery: Delivery,
                     record: RequestRecord) -> After:
        """Pass the answer on: the head with whatever body is already here in one write,
        then the rest as it arrives."""
        services = self._services
        timeouts = services.config.timeouts
        resp, conn = delivery.response, delivery.conn
        headers = self._client_headers(resp.headers.raw_items(), record)
        scanner = self._scanner(resp)

        def send_head(body: bytes, ended: bool) -> None:
            head = h11.Response(status_code=resp.status_code, reason=resp.reason,
                                headers=headers + _timing(record))
            events: list[h11.Event] = [head]
            if body:
                events.append(h11.Data(data=body))
            if ended:
                events.append(h11.EndOfMessage())
            record.status = resp.status_code
            client.send(*events)

        if conn is None:  # read whole by the attempt loop, already back in the pool
            if scanner is not None and delivery.early_error is None:
                scanner.feed(delivery.body)
                self._account(record, delivery.key, resp.status_code, scanner, True)
            send_head(delivery.body, True)
            record.sent_bytes = len(delivery.body)
            services.metrics.bytes_sent(record.sent_bytes)
            return After.CLOSE if services.draining else After.KEEP_ALIVE
        accounted = False

        def account(complete: bool) -> None:
            nonlocal accounted
            if not accounted:
                accounted = True
                self._account(record, delivery.key, resp.status_code, scanner, complete)

        relay = BodyRelay(conn, client, idle_timeout=timeouts.upstream_idle_seconds,
                          write_timeout=timeouts.client_write_seconds,
                          tap=scanner.feed if scanner is not None else None,
                          on_complete=lambda: account(True))
        try:
            await relay.start(send_head, delivery.body, delivery.ended)
        except UpstreamError as exc:
            delivery.pool.discard(conn)
            if client.can_respond:  # it failed before our head went out
                log.warning("upstream failed rid=%s: %s", record.request_id.decode(),
                            exc.message)
                return error_answer(client, record, exc, Outcome.UPSTREAM_ERROR, close=True)
            record.outcome = Outcome.ABORTED
            log.warning("upstream failed mid-response rid=%s: %s",
                        record.request_id.decode(), exc.message)
            return After.ABORT
        except BaseException:
            delivery.pool.discard(conn)
            raise
        finally:
            relay.stop()
            record.sent_bytes = relay.sent
            services.metrics.bytes_sent(relay.sent)
            account(False)  # a body cut short: what was seen of it still counts
        delivery.pool.release(conn)
        return After.CLOSE if services.draining else After.KEEP_ALIVE

    def _client_headers(self, upstream: Headers, record: RequestRecord) -> Headers:
        """An answer's headers as the client gets them: ours, and CORS if it asked."""
        headers = client_response_headers(upstream, request_id=record.request_id,
                                          close=self._services.draining)
        return cors.without_cors(headers) + record.cors if record.cors else headers

    def _scanner(self, resp: h11.Response) -> UsageScanner | InflatingScanner | None:
        if not self._services.config.metrics.enable_token_counting:
            return None
        if not 200 <= resp.status_code < 300:
            return None
        ctype = encoding = None
        for name, value in resp.headers:
            if name == b"content-type":
                ctype = value
            elif name == b"content-encoding":
                encoding = value
        return scanner_for(ctype, encoding)

    def _account(self, record: RequestRecord, key: Key | None, status: int,
                 scanner: UsageScanner | InflatingScanner | None, complete: bool) -> None:
        """What the answer told us: tokens and cost by key and model, and an in-band error
        recorded (and, for a rate limit, the key rested for later requests)."""
        services = self._services
        if scanner is None:  # nothing read (counting off, an error status, another type)
            if key is not None and complete and 200 <= status < 300:
                services.keys.record_success(key)
            return
        summary = scanner.result()
        usage = summary.usage
        if 200 <= status < 300:
            record.model = services.models.add(summary.model, usage)
        if usage is not None:
            record.prompt_tokens, record.completion_tokens = (usage.prompt_tokens,
                                                              usage.completion_tokens)
            record.cost = usage.cost
        if key is None:
            return
        services.mark_state(False)
        keys = services.keys
        if usage is not None:
            keys.record_usage(key, prompt=usage.prompt_tokens,
                              completion=usage.completion_tokens, cached=usage.cached_tokens,
                              cache_write=usage.cache_write_tokens,
                              reasoning=usage.reasoning_tokens, cost=usage.cost)
        error = summary.error
        if error is not None:
            verdict = None
            if error.code is not None and error.envelope is not None:
                verdict = classify(error.code, [], error.envelope, services.attempts.wall())
                services.attempts.apply(verdict, key)
            reason = verdict.reason if verdict is not None and verdict.reason else (
                f"in-band error {error.code}" if error.code else "in-band error")
            keys.record_in_band_error(key, error.code, reason)
            log.warning("in-band error rid=%s key=%s code=%s: %s", record.request_id.decode(),
                        key.id, error.code, scrub(error.message[:200]))
        elif complete and 200 <= status < 300:
            keys.record_success(key)


def _models_query(method: bytes, path: bytes) -> bytes | None:
    """The query of a GET/HEAD of the models list (b"" for none), else None."""
    if method not in READ_METHODS:
        return None
    bare, mark, query = path.partition(b"?")
    if bare.rstrip(b"/") != b"/models":
        return None
    return mark + query


def _timing(record: RequestRecord) -> Headers:
    """Server-Timing (RFC-free but every browser reads it) and the original's
    X-Process-Time: how long until the head, and how much of it was the upstream's."""
    total = time.monotonic() - record.started
    upstream = min(record.upstream_seconds, total)
    return [(b"Server-Timing", b"upstream;dur=%.1f, proxy;dur=%.1f"
             % (upstream * 1000, (total - upstream) * 1000)),
            (b"X-Process-Time", b"%.4f" % total)]
