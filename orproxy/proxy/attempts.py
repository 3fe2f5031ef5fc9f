"""The attempt loop: one client request sent upstream, on as many keys as it takes.

A request goes out again only where that is safe (RFC 9110 §9.2.2): where the upstream
said no (its answer classified as the key's limit, an invalid key, no credit, or its own
overload), or where the request never reached it (connect, TLS or outgoing-proxy failure;
once, a reused connection found dead — the keep-alive race). A request the upstream may
have received (it timed out, or the connection closed with no answer) is never repeated.
Every attempt is traced with its key and outcome; retries stay within a budget of
attempts and a deadline, and happen only before any response byte reached the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import h11

from orproxy.errors import (
    NoKeyAvailable,
    Stage,
    UpstreamError,
    UpstreamTimeout,
)
from orproxy.headers import upstream_request_headers
from orproxy.keys import Key, KeyPool
from orproxy.proxy.commit import Decision, FirstEvent
from orproxy.proxy.record import Attempt
from orproxy.proxy.sticky import StickyMap
from orproxy.upstream.classify import (
    OK,
    STATUSES_TO_CLASSIFY,
    Outcome,
    Scope,
    Verdict,
    classify,
)
from orproxy.upstream.connection import UpstreamConnection, may_resend
from orproxy.upstream.pool import UpstreamPool

log = logging.getLogger(__name__)

READ_AHEAD_BYTES = 64 * 1024  # an error body is read up to this before it is classified


@dataclass(slots=True)
class UpstreamRequest:
    method: bytes
    target: bytes  # the upstream's own target (base path + the client's path and query)
    headers: list[tuple[bytes, bytes]]  # the client's, raw
    body: list[bytes]  # as received, never joined
    send_length: bool  # the client framed a body: send an exact Content-Length
    request_id: bytes
    public: bool  # sent with no key at all
    free: bool = True  # may be for a free model: free-model rests apply
    model: str | None = None  # the model the body asks for
    conversation: str | None = None  # the conversation it continues (sticky keys)
    models_query: bytes | None = None  # a GET/HEAD of /models: its query, for the cache


@dataclass(slots=True)
class Delivery:
    """A response to pass on: its head, the body read ahead, and the connection with the
    rest (None once the whole body was read and the connection released)."""

    response: h11.Response
    conn: UpstreamConnection | None
    body: bytes
    ended: bool
    key: Key | None
    pool: UpstreamPool  # where conn goes back (a reload may have replaced the pool since)
    early_error: tuple[int | None, bytes] | None = None  # a stream's error before content
    verdict: Verdict = OK  # what its answer meant for the key


@dataclass(frozen=True)
class AttemptSettings:
    host_header: bytes
    first_byte_timeout: float
    idle_timeout: float
    write_timeout: float
    max_attempts: int
    deadline_seconds: float
    default_cooldown: float
    credit_cooldown: float
    overload_delay: float
    # free-model limits rest a key for free models only (which models are free: the
    # /models list, else the :free suffix)
    scope_free_rests: bool = True
    # hold a stream's head this long for its first event: an error before content fails
    # over to the next key (0: commit at once)
    commit_seconds: float = 0.0


class AttemptLoop:
    def __init__(
        self,
        pool: UpstreamPool,
        keys: KeyPool,
        settings: AttemptSettings,
        *,
        on_attempt: Callable[[str], None] = lambda outcome: None,
        on_first_byte: Callable[[float], None] = lambda seconds: None,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.pool = pool
        self.keys = keys
        self.settings = settings
        self._on_attempt = on_attempt
        self._on_first_byte = on_first_byte
        self.wall = wall  # injectable: tests drive time instead of waiting for it
        self.sleep = sleep
        self.sticky: StickyMap | None = None  # conversations kept on their key
        self.sticky_moved = 0  # conversations whose key could not serve them
        self.failed_over_early = 0  # stream errors before content sent to the next key

    async def run(self, req: UpstreamRequest, trace: list[Attempt]) -> Delivery:
        """The response to deliver; raises NoKeyAvailable or UpstreamError. Each attempt
        is appended to ``trace`` as it ends."""
        tried: list[Key] = []
        deadline = self.keys.clock() + self.settings.deadline_seconds
        fallback: Delivery | None = None  # an overload answer, if no other key is left
        wait = 0.0
        known = prefer = self._conversation_key(req)
        failing_over = False  # a stream failed before content: does another key take it?
        while True:
            key = None
            if not req.public:
                key = self.keys.acquire(exclude=tried, free=req.free, prefer=prefer)
                prefer = None
                if key is not None and failing_over:
                    self.failed_over_early += 1
                failing_over = False
                if key is None:
                    if fallback is not None:
                        return fallback
                    soonest = self.keys.soonest(free=req.free)
                    raise NoKeyAvailable(*soonest) if soonest else NoKeyAvailable(None)
            if wait > 0:  # the upstream asked for patience, and another try follows
                await self.sleep(wait)
            started = self.keys.clock()
            try:
                delivery = await self._attempt(req, key)
            except UpstreamError as exc:
                self._trace(trace, req, key, _failure(exc), 0, started, exc.public_message)
                if exc.stage is Stage.CONNECT and self._budget_left(trace, deadline):
                    wait = 0.0
                    continue
                raise
            verdict = self._verdict(delivery, key)
            status = delivery.response.status_code
            if delivery.early_error is not None:  # the error's own code, not the 200 it came in
                status = delivery.early_error[0] or 0
            self._trace(trace, req, key, verdict.outcome.value, status, started, verdict.reason)
            delivery.verdict = verdict
            if not verdict.retry or not self._budget_left(trace, deadline):
                self._keep_conversation(req, delivery, verdict, known)
                return delivery
            assert key is not None
            tried.append(key)
            if delivery.early_error is not None:
                # the stream failed before content: closing it stops the generation; if no
                # key is left, the client gets the error event as the stream's end
                failing_over = True
                if delivery.conn is not None:
                    delivery.pool.discard(delivery.conn)
                fallback = replace(delivery, conn=None, ended=True)
            elif delivery.conn is not None:  # an error body too large to hold: drop it
                delivery.pool.discard(delivery.conn)
            elif verdict.outcome in (Outcome.OVERLOADED, Outcome.BUSY):
                fallback = delivery
            wait = self._wait_before_next(verdict)
            if wait and self.keys.clock() + wait > deadline:
                # the deadline is for starting attempts: this one could not start in time
                if fallback is not None:
                    return fallback
                soonest = self.keys.soonest(free=req.free)
                if soonest is None:
                    raise NoKeyAvailable(None)
                # not before the wait the upstream asked for, in its words if no key's
                retry_after, words = soonest
                raise NoKeyAvailable(max(retry_after, wait), words or verdict.message)

    def _conversation_key(self, req: UpstreamRequest) -> str | None:
        if self.sticky is None or req.conversation is None or req.public:
            return None
        return self.sticky.get(req.conversation)

    def _keep_conversation(self, req: UpstreamRequest, delivery: Delivery,
                           verdict: Verdict, known: str | None) -> None:
        """A conversation answered by a key stays on it while that key can serve; one that
        had to leave its key (``known``) is counted as moved."""
        if (self.sticky is not None and req.conversation is not None
                and delivery.key is not None and verdict.outcome is Outcome.OK
                and delivery.response.status_code < 400 and delivery.early_error is None):
            if known is not None and delivery.key.id != known:
                self.sticky_moved += 1
            self.sticky.put(req.conversation, delivery.key.id)

    def _budget_left(self, trace: list[Attempt], deadline: float) -> bool:
        return len(trace) < self.settings.max_attempts and self.keys.clock() < deadline

    def _wait_before_next(self, verdict: Verdict) -> float:
        if verdict.outcome not in (Outcome.OVERLOADED, Outcome.BUSY):
            return 0.0
        if verdict.retry_after is not None:
            return min(verdict.retry_after, self.settings.deadline_seconds)
        return self.settings.overload_delay

    def _trace(self, trace: list[Attempt], req: UpstreamRequest, key: Key | None,
               outcome: str, status: int, started: float, reason: str = "") -> None:
        attempt = Attempt(key.id if key is not None else "-", outcome,
                          self.keys.clock() - started)
        trace.append(attempt)
        self._on_attempt(outcome)
        if key is not None:
            self.keys.record_attempt(key, outcome, status, reason)
        level = logging.DEBUG if outcome == "ok" else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "attempt rid=%s n=%d key=%s outcome=%s ms=%.1f",
                    req.request_id.decode(), len(trace), attempt.key_id, outcome,
                    attempt.seconds * 1000)

    def _verdict(self, delivery: Delivery, key: Key | None) -> Verdict:
        status = delivery.response.status_code
        if key is None:
            return OK
        if delivery.early_error is not None:
            code, envelope = delivery.early_error
            verdict = classify(code or 502, [], envelope, self.wall())
            if verdict.outcome is Outcome.OK:  # a provider failure before any content:
                verdict = Verdict(Outcome.OVERLOADED,  # another key may well succeed
                                  reason=f"stream error {code} before content" if code
                                  else "stream error before content",
                                  message=verdict.message)
        elif status in STATUSES_TO_CLASSIFY:
            verdict = classify(status, delivery.response.headers, delivery.body, self.wall())
        else:
            return OK
        self.apply(verdict, key)
        return verdict

    def apply(self, verdict: Verdict, key: Key) -> None:
        """Tell the key pool what a verdict means for ``key`` (also used for in-band
        errors found after the response was committed)."""
        keys, settings = self.keys, self.settings
        account_wide = verdict.scope is Scope.ACCOUNT
        if verdict.outcome is Outcome.KEY_LIMITED:
            seconds = verdict.rest_seconds
            keys.cool_down(key, settings.default_cooldown if seconds is None else seconds,
                           verdict.reason, account_wide=account_wide,
                           free_only=verdict.free_only and settings.scope_free_rests,
                           message=verdict.message)
        elif verdict.outcome is Outcome.NO_CREDIT:
            seconds = verdict.rest_seconds
            keys.cool_down(key, settings.credit_cooldown if seconds is None else seconds,
                           verdict.reason, account_wide=account_wide, message=verdict.message)
        elif verdict.outcome is Outcome.KEY_INVALID:
            keys.disable(key, verdict.reason, verdict.message)

    async def _attempt(self, req: UpstreamRequest, key: Key | None) -> Delivery:
        body_length = sum(map(len, req.body)) if req.send_length else None
        headers = upstream_request_headers(
            req.headers,
            host=self.settings.host_header,
            authorization=b"Bearer " + key.secret.encode() if key is not None else None,
            request_id=req.request_id,
            body_length=body_length,
        )
        pool = self.pool
        conn = await pool.acquire()
        try:
            try:
                return await self._exchange(conn, req, headers, key, pool)
            except UpstreamError as exc:
                if not may_resend(conn, exc):
                    raise
                # the upstream had closed this pooled connection: once more on a new one
                pool.discard(conn)
                conn = await pool.acquire(fresh=True)
                return await self._exchange(conn, req, headers, key, pool)
        except BaseException:
            pool.discard(conn)
            raise

    async def _exchange(self, conn: UpstreamConnection, req: UpstreamRequest,
                        headers: list[tuple[bytes, bytes]], key: Key | None,
                        pool: UpstreamPool) -> Delivery:
        settings = self.settings
        await conn.send_request(req.method, req.target, headers, req.body,
                                settings.write_timeout)
        sent = time.monotonic()
        response = await conn.receive_head(settings.first_byte_timeout)
        self._on_first_byte(time.monotonic() - sent)
        if response.status_code not in STATUSES_TO_CLASSIFY:
            if settings.commit_seconds > 0 and key is not None and _is_stream(response):
                return await self._hold(conn, response, key, pool)
            return Delivery(response, conn, b"", False, key, pool)
        body, ended = await _read_ahead(conn, settings.idle_timeout)
        if ended:
            pool.release(conn)
            return Delivery(response, None, body, True, key, pool)
        return Delivery(response, conn, body, False, key, pool)


    async def _hold(self, conn: UpstreamConnection, response: h11.Response, key: Key,
                    pool: UpstreamPool) -> Delivery:
        """Commit late: hold a 200 stream's head until its first real event (or the bound).
        An error before any content may then still go to another key."""
        holder = _FirstEventHold(conn)
        conn.read_body(holder, self.settings.idle_timeout)
        # the first event often came with the head: then there is nothing to wait for
        timer = None if holder.done.done() else asyncio.get_running_loop().call_later(
            self.settings.commit_seconds, holder.commit)
        try:
            await holder.done
        finally:
            if timer is not None:
                timer.cancel()
            if not holder.ended:
                conn.stop_body()
        body = b"".join(holder.parts)
        watch = holder.watch
        early = ((watch.error_status, watch.error_envelope or b"{}")
                 if watch.decision is Decision.ERROR else None)
        if holder.ended:
            pool.release(conn)
            return Delivery(response, None, body, True, key, pool, early)
        return Delivery(response, conn, body, False, key, pool, early)


def _is_stream(response: h11.Response) -> bool:
    for name, value in response.headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


class _FirstEventHold:
    """Gathers a stream's first bytes until FirstEvent decides, the body ends, or the
    commit bound passes; then pauses the connection."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self._conn = conn
        self.watch = FirstEvent()
        self.parts: list[bytes] = []
        self.ended = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_body(self, data: bytes, end: bool) -> None:
        self.parts.append(data)
        self.ended = end
        if self.done.done():
            return
        decision = self.watch.feed(data)  # first: an error may come with the end
        if end or decision is not Decision.HOLD:
            self._finish()

    def commit(self) -> None:
        """The bound passed with nothing decisive: deliver what is held, as it is."""
        if not self.done.done():
            self._finish()

    def _finish(self) -> None:
        if not self.ended:
            self._conn.pause()
        self.done.set_result(None)

    def on_body_error(self, exc: UpstreamError) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


def _failure(exc: UpstreamError) -> str:
    if exc.stage is Stage.CONNECT:
        return "connect_error"
    return "timeout" if isinstance(exc, UpstreamTimeout) else "upstream_error"


class _ReadAhead:
    """Gathers the first READ_AHEAD_BYTES of a body, then pauses the connection."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self._conn = conn
        self.parts: list[bytes] = []
        self.size = 0
        self.ended = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_body(self, data: bytes, end: bool) -> None:
        self.parts.append(data)
        self.size += len(data)
        self.ended = end
        if end or self.size >= READ_AHEAD_BYTES:
            if not end:
                self._conn.pause()
            if not self.done.done():
                self.done.set_result(None)

    def on_body_error(self, exc: UpstreamError) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def _read_ahead(conn: UpstreamConnection, idle_timeout: float) -> tuple[bytes, bool]:
    reader = _ReadAhead(conn)
    conn.read_body(reader, idle_timeout)
    try:
        await reader.done
    finally:
        if not reader.ended:
            conn.stop_body()
    return b"".join(reader.parts), reader.ended
