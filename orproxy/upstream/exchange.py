"""The attempt loop: send one client request upstream, on as many keys as it takes.

Retries happen only before any response byte has been passed on, under a budget (attempts
and a deadline). A response whose status may be the key's fault (401/402/429) is read
first (up to PREFETCH_BYTES) and classified; the key pool is told what it means; the next
key is tried while the budget lasts. A reused pooled connection that dies before answering
is retried once on a fresh connection without counting as an attempt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11

from orproxy.errors import UpstreamError
from orproxy.http.headers import upstream_request_headers
from orproxy.keys import Key, KeyPool
from orproxy.upstream.classify import STATUSES_TO_CLASSIFY, Outcome, Verdict, classify
from orproxy.upstream.connection import UpstreamConnection, is_retryable_on_fresh
from orproxy.upstream.pool import UpstreamPool

PREFETCH_BYTES = 64 * 1024


@dataclass
class UpstreamRequest:
    method: bytes
    target: bytes  # the upstream's own target (base path + the client's path and query)
    headers: list[tuple[bytes, bytes]]  # the client's, raw
    body: bytes
    send_length: bool  # the client framed a body: send an exact Content-Length
    request_id: bytes
    public: bool


@dataclass
class ExchangeResult:
    response: h11.Response
    conn: UpstreamConnection | None  # None once the whole body is read and the conn released
    body: bytes  # body bytes read ahead
    ended: bool
    key: Key | None = None
    outcomes: list[str] = field(default_factory=list)

    @property
    def attempts(self) -> int:
        return len(self.outcomes)


class NoKeyAvailable(Exception):
    def __init__(self, retry_after: float | None, attempts: int, upstream_message: str = "",
                 ) -> None:
        super().__init__("no upstream key available")
        self.retry_after = retry_after
        self.attempts = attempts
        self.upstream_message = upstream_message  # OpenRouter's words on the last limit seen


@dataclass
class ExchangeSettings:
    host_header: bytes
    first_byte_timeout: float
    idle_timeout: float
    max_attempts: int
    deadline_seconds: float
    default_cooldown: float
    credit_cooldown: float
    overload_delay: float


class Exchanger:
    def __init__(
        self,
        pool: UpstreamPool,
        keys: KeyPool,
        settings: ExchangeSettings,
        *,
        on_attempt: Callable[[str], None] = lambda outcome: None,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.pool = pool
        self.keys = keys
        self.s = settings
        self._on_attempt = on_attempt
        self._wall = wall
        self._sleep = sleep

    async def run(self, req: UpstreamRequest) -> ExchangeResult:
        tried: list[Key] = []
        outcomes: list[str] = []
        deadline = self.keys.clock() + self.s.deadline_seconds
        overloaded: ExchangeResult | None = None
        limited_message = ""
        while True:
            key = None
            if not req.public:
                key = self.keys.acquire(exclude=tried)
                if key is None:
                    if overloaded is not None:
                        return overloaded
                    raise NoKeyAvailable(self.keys.soonest_available(), len(outcomes),
                                         limited_message)
            if overloaded is not None and self.s.overload_delay > 0:
                # the upstream asked for patience; only worth it if another try follows
                await self._sleep(self.s.overload_delay)
            try:
                result = await self._attempt(req, key)
            except UpstreamError as exc:
                outcomes.append("error")
                self._on_attempt("error")
                if exc.before_response and self._budget_left(len(outcomes), deadline):
                    continue
                raise
            result.key, result.outcomes = key, outcomes
            verdict = self._verdict(result, key)
            if verdict.outcome is Outcome.KEY_LIMITED:
                limited_message = verdict.message
            outcomes.append(verdict.outcome.value)
            self._on_attempt(verdict.outcome.value)
            if not verdict.retry or not self._budget_left(len(outcomes), deadline):
                return result
            assert key is not None
            tried.append(key)
            overloaded = None
            if result.conn is not None:  # an error body too large to hold: drop it
                self.pool.discard(result.conn)
            elif verdict.outcome is Outcome.OVERLOADED:
                overloaded = result

    def _budget_left(self, attempts: int, deadline: float) -> bool:
        return attempts < self.s.max_attempts and self.keys.clock() < deadline

    def _verdict(self, result: ExchangeResult, key: Key | None) -> Verdict:
        status = result.response.status_code
        if key is None or status not in STATUSES_TO_CLASSIFY:
            return Verdict(Outcome.OK)
        verdict = classify(status, result.response.headers, result.body, self._wall())
        if verdict.outcome is Outcome.KEY_LIMITED:
            seconds = verdict.cooldown_seconds
            self.keys.cool_down(key, self.s.default_cooldown if seconds is None else seconds,
                                verdict.reason, account_wide=verdict.account_wide)
        elif verdict.outcome is Outcome.NO_CREDIT:
            self.keys.cool_down(key, self.s.credit_cooldown, verdict.reason)
        elif verdict.outcome is Outcome.KEY_INVALID:
            self.keys.disable(key, verdict.reason)
        return verdict

    async def _attempt(self, req: UpstreamRequest, key: Key | None) -> ExchangeResult:
        headers = upstream_request_headers(
            req.headers,
            host=self.s.host_header,
            authorization=b"Bearer " + key.secret.encode() if key is not None else None,
            request_id=req.request_id,
            body_length=len(req.body) if req.send_length else None,
        )
        conn = await self.pool.acquire()
        try:
            try:
                return await self._send(conn, req, headers)
            except UpstreamError as exc:
                if not is_retryable_on_fresh(conn, exc):
                    raise
                self.pool.discard(conn)
                conn = await self.pool.acquire(fresh=True)
                return await self._send(conn, req, headers)
        except BaseException:
            self.pool.discard(conn)
            raise

    async def _send(
        self, conn: UpstreamConnection, req: UpstreamRequest, headers: list[tuple[bytes, bytes]]
    ) -> ExchangeResult:
        conn.send_request(req.method, req.target, headers, req.body)
        response = await conn.receive_head(self.s.first_byte_timeout)
        if response.status_code not in STATUSES_TO_CLASSIFY:
            return ExchangeResult(response, conn, b"", False)
        parts: list[bytes] = []
        size, ended = 0, False
        while size < PREFETCH_BYTES and not ended:
            data, ended = await conn.receive_body(self.s.idle_timeout)
            parts.append(data)
            size += len(data)
        if ended:
            self.pool.release(conn)
            return ExchangeResult(response, None, b"".join(parts), True)
        return ExchangeResult(response, conn, b"".join(parts), False)
