"""The attempt loop without sockets: a real UpstreamPool over a ScriptedDial, a real KeyPool
on a fake clock, and an injected ``sleep`` that records its waits and moves the clock.

What is checked is what leaves the proxy (every request the scripted upstream received, on
which connection, with which key), what the key pool is told, the trace of attempts, and
the rule that matters most: a request the upstream may have received is never sent again
(RFC 9110 §9.2.2), except once on a fresh connection when a *reused* connection turns out
dead before any response byte (the keep-alive race, RFC 9112 §9.3.1). Nothing waits for
real: the loop runs on a virtual clock and the injected sleep only records.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import h11
import pytest

from orproxy.errors import (
    NoKeyAvailable,
    Stage,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from orproxy.keys import Key, KeyPool, KeyState, key_id
from orproxy.proxy.attempts import (
    READ_AHEAD_BYTES,
    AttemptLoop,
    AttemptSettings,
    Delivery,
    UpstreamRequest,
    _is_stream,
)
from orproxy.proxy.record import Attempt
from orproxy.proxy.sticky import StickyMap
from orproxy.stream import Stream
from orproxy.upstream.pool import UpstreamPool
from tests.fakeor import reset_ms
from tests.memstream import (
    FIN,
    RESET,
    FakeClock,
    Received,
    ScriptedDial,
    Step,
    Wait,
    json_response,
    response,
    settle,
    virtual_time_loop,
)

pytestmark = pytest.mark.anyio

A, B, C = ("sk-or-v1-test-key-aaaaaaaaaaaa0001", "sk-or-v1-test-key-bbbbbbbbbbbb0002",
           "sk-or-v1-test-key-cccccccccccc0003")
IDS = {A: key_id(A), B: key_id(B), C: key_id(C)}
WALL = 1_764_000_000.0  # the wall clock classify() is given (epoch seconds)
SETTINGS = AttemptSettings(
    host_header=b"openrouter.test", first_byte_timeout=600.0, idle_timeout=300.0,
    write_timeout=300.0, max_attempts=5, deadline_seconds=60.0, default_cooldown=3600.0,
    credit_cooldown=7200.0, overload_delay=2.5)
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"loop_factory": virtual_time_loop})


# --- answers the scripted upstream gives ------------------------------------------------------

OK = json_response(200, {"id": "gen-1", "choices": []})


def limited(seconds: float, message: str = "Rate limit exceeded: limit_rpm/m/1.") -> bytes:
    """OpenRouter's own 429 for the key: rests it until the reset it states."""
    return json_response(429, {"error": {"code": 429, "message": message, "metadata": {
        "headers": {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": str(reset_ms(seconds, WALL))}}}})


OVERLOADED = json_response(429, {"error": {"code": 429, "message": "Provider returned error",
                                           "metadata": {"raw": "m is temporarily rate-limited "
                                                               "upstream.",
                                                        "provider_name": "P"}}})
INVALID = json_response(401, {"error": {"code": 401, "message": "User not found."}})
NO_CREDIT = json_response(402, {"error": {"code": 402, "message": "Insufficient credits"}})
BAD_REQUEST = json_response(400, {"error": {"code": 400, "message": "bad model"}})


def busy(retry_after: int) -> bytes:
    return json_response(402, {"error": {"code": 402, "message": "too many in flight",
                                         "metadata": {"limit_source":
                                                      "openrouter_in_flight_budget"}}},
                         [(b"Retry-After", str(retry_after).encode())])


# --- the world under test ---------------------------------------------------------------------


@dataclass
class World:
    clock: FakeClock
    dial: ScriptedDial
    pool: UpstreamPool
    keys: KeyPool
    loop: AttemptLoop
    outcomes: list[str] = field(default_factory=list)  # what on_attempt was told
    started: list[float] = field(default_factory=list)  # clock at each request received
    first_bytes: list[float] = field(default_factory=list)  # what on_first_byte was told

    @property
    def sent_keys(self) -> list[str | None]:
        return [r.key for r in self.dial.requests]

    def key(self, secret: str) -> Key:
        return next(k for k in self.keys if k.secret == secret)

    def state(self, secret: str) -> KeyState:
        return self.key(secret).state(self.clock.now)


def world(answers: dict[str | None, Sequence[Sequence[Step]]] | None = None, *,
          keys: Sequence[str] = (A, B, C), takes: float = 0.0, refuse: int = 0,
          connect_takes: float = 0.0, accounts: dict[str, str] | None = None,
          peer_reads: bool = True, **settings: Any) -> World:
    """Keys A, B, C round-robin; each key's requests are answered in turn by ``answers``
    (by key secret; None for a public request); each request takes ``takes`` seconds,
    each dial ``connect_takes``."""
    clock = FakeClock()
    queues = {k: list(v) for k, v in (answers or {}).items()}
    w: World

    def script(received: Received) -> Sequence[Step]:
        w.started.append(clock.now)
        clock.advance(takes)
        queue = queues[received.key]
        return queue.pop(0) if len(queue) > 1 else queue[0]

    dial = ScriptedDial(script, refuse=refuse, peer_reads=peer_reads)

    async def slow_dial() -> Stream:
        clock.advance(connect_takes)
        return await dial()

    pool = UpstreamPool(slow_dial, max_idle=8, clock=clock)
    key_pool = KeyPool([(k, (accounts or {}).get(k)) for k in keys], clock=clock,
                       wall=lambda: WALL)
    outcomes: list[str] = []
    first_bytes: list[float] = []
    loop = AttemptLoop(pool, key_pool, replace(SETTINGS, **settings),
                       on_attempt=outcomes.append, on_first_byte=first_bytes.append,
                       wall=lambda: WALL, sleep=clock.sleep)
    w = World(clock, dial, pool, key_pool, loop, outcomes, first_bytes=first_bytes)
    return w


def request(*, public: bool = False, free: bool = True, method: bytes = b"POST",
            body: bytes = BODY) -> UpstreamRequest:
    headers = [(b"Host", b"proxy.local"), (b"Content-Type", b"application/json"),
               (b"Authorization", b"Bearer local-access-key")]
    if body:
        headers.append((b"Content-Length", str(len(body)).encode()))
    return UpstreamRequest(method, b"/api/v1/chat/completions", headers, [body] if body else [],
                           bool(body), b"rid-1", public, free)


async def run(w: World, req: UpstreamRequest | None = None,
              ) -> tuple[Delivery, list[Attempt]]:
    trace: list[Attempt] = []
    delivery = await w.loop.run(req or request(), trace)
    return delivery, trace


async def failure(w: World, req: UpstreamRequest | None = None,
                  ) -> tuple[BaseException, list[Attempt]]:
    trace: list[Attempt] = []
    with pytest.raises((UpstreamError, NoKeyAvailable)) as info:
        await w.loop.run(req or request(), trace)
    return info.value, trace


async def take(w: World, delivery: Delivery) -> bytes:
    """Read the rest of a delivered body and give the connection back, as the relay and
    forward.py do; the body whole."""
    conn = delivery.conn
    if conn is None:
        return delivery.body
    parts = [delivery.body]
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    class Reader:
        def on_body(self, data: bytes, end: bool) -> None:
            parts.append(data)
            if end:
                done.set_result(None)

        def on_body_error(self, exc: UpstreamError) -> None:
            done.set_exception(exc)

    conn.read_body(Reader(), 300.0)
    conn.resume()
    await done
    assert delivery.pool is w.pool
    delivery.pool.release(conn)
    return b"".join(parts)


def outcomes(trace: list[Attempt]) -> list[tuple[str, str]]:
    return [(a.key_id, a.outcome) for a in trace]


def assert_nothing_held(w: World) -> None:
    """Every connection handed out came back or was closed (no socket leaks)."""
    snapshot = w.pool.snapshot()
    assert snapshot.active == 0
    still_open = [p for p in w.dial.peers if not p.transport.is_closing()]
    assert len(still_open) == snapshot.idle


# --- rotation as classified ---------------------------------------------------------------------


async def test_a_key_limited_429_rests_the_key_and_the_next_key_answers() -> None:
    w = world({A: [[limited(30)]], B: [[OK]]})
    delivery, trace = await run(w)
    assert delivery.response.status_code == 200 and delivery.key is w.key(B)
    assert outcomes(trace) == [(IDS[A], "key_limited"), (IDS[B], "ok")]
    assert w.outcomes == ["key_limited", "ok"]
    assert w.sent_keys == [A, B]
    assert [r.body for r in w.dial.requests] == [BODY, BODY]  # the same bytes each time
    assert w.state(A) is KeyState.COOLING and w.state(B) is KeyState.AVAILABLE
    assert w.key(A).cooling_until == pytest.approx(w.clock.now + 30)
    assert w.key(A).message == "Rate limit exceeded: limit_rpm/m/1."
    assert json.loads(await take(w, delivery)) == {"id": "gen-1", "choices": []}
    assert w.dial.dials == 1  # the 429 was read whole: its connection carried the retry
    assert w.loop.failed_over_early == 0  # no stream failed over: nothing to count
    assert_nothing_held(w)


async def test_a_401_disables_the_key_and_the_next_key_answers() -> None:
    w = world({A: [[INVALID]], B: [[OK]]})
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "key_invalid"), (IDS[B], "ok")]
    assert w.state(A) is KeyState.DISABLED
    await take(w, delivery)
    w.clock.advance(10 * 86400)
    assert w.state(A) is KeyState.DISABLED  # until the config changes


async def test_a_402_rests_the_key_for_the_credit_cooldown() -> None:
    w = world({A: [[NO_CREDIT]], B: [[OK]]})
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "no_credit"), (IDS[B], "ok")]
    assert w.key(A).cooling_until == w.clock.now + SETTINGS.credit_cooldown
    await take(w, delivery)


async def test_a_key_limited_429_without_a_reset_rests_for_the_default_cooldown() -> None:
    bare = json_response(429, {"error": {"code": 429, "message": "Rate limit exceeded"}})
    w = world({A: [[bare]], B: [[OK]]})
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "key_limited"), (IDS[B], "ok")]
    assert w.key(A).cooling_until == w.clock.now + SETTINGS.default_cooldown
    await take(w, delivery)


async def test_an_answer_that_is_not_the_keys_fault_is_delivered_at_once() -> None:
    w = world({A: [[BAD_REQUEST]]})
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "ok")]
    assert delivery.response.status_code == 400
    assert (delivery.conn, delivery.ended) == (None, True)  # read whole, pooled again
    assert delivery.pool is w.pool  # the pool it came from, even with no connection left
    assert json.loads(delivery.body)["error"]["message"] == "bad model"
    assert w.pool.snapshot().idle == 1
    assert w.state(A) is KeyState.AVAILABLE
    assert_nothing_held(w)


async def test_a_success_is_never_held_back_to_be_read() -> None:
    w = world({A: [[response(200, b"x" * 100)]]})
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "ok")]
    assert (delivery.body, delivery.ended) == (b"", False) and delivery.conn is not None
    assert await take(w, delivery) == b"x" * 100


async def test_the_request_goes_up_with_our_host_the_keys_bearer_and_an_exact_length() -> None:
    w = world({A: [[OK]]})
    await take(w, (await run(w))[0])
    (sent,) = w.dial.requests
    assert sent.method == b"POST" and sent.target == b"/api/v1/chat/completions"
    assert sent.header(b"host") == b"openrouter.test"
    assert sent.header(b"authorization") == b"Bearer " + A.encode()
    assert sent.header(b"content-length") == str(len(BODY)).encode()
    assert sent.header(b"x-request-id") == b"rid-1"


async def test_a_public_request_goes_up_without_any_key() -> None:
    w = world({None: [[OK]]})
    delivery, trace = await run(w, request(public=True, method=b"GET", body=b""))
    assert outcomes(trace) == [("-", "ok")]
    assert w.dial.requests[0].header(b"authorization") is None
    assert w.dial.requests[0].header(b"content-length") is None  # no body framed, none sent
    assert all(k.uses == 0 for k in w.keys._keys)
    await take(w, delivery)


# --- overload: no rest, a wait only before another try ---------------------------------------


async def test_overload_rests_no_key_and_waits_the_overload_delay_before_the_next_try() -> None:
    w = world({A: [[OVERLOADED]], B: [[OK]]})
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "overloaded"), (IDS[B], "ok")]
    assert w.clock.sleeps == [SETTINGS.overload_delay]
    assert w.started == [100.0, 100.0 + SETTINGS.overload_delay]
    assert all(w.state(k) is KeyState.AVAILABLE for k in (A, B, C))
    await take(w, delivery)


async def test_overload_waits_its_retry_after_instead() -> None:
    over = json_response(429, json.loads(OVERLOADED.split(b"\r\n\r\n", 1)[1]),
                         [(b"Retry-After", b"7")])
    w = world({A: [[over]], B: [[OK]]})
    await take(w, (await run(w))[0])
    assert w.clock.sleeps == [7.0]


async def test_a_busy_402_waits_its_retry_after_and_rests_nothing() -> None:
    w = world({A: [[busy(3)]], B: [[OK]]})
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "busy"), (IDS[B], "ok")]
    assert w.clock.sleeps == [3.0]
    assert w.state(A) is KeyState.AVAILABLE
    await take(w, delivery)


async def test_overload_on_every_key_passes_the_last_answer_on_without_a_last_wait() -> None:
    w = world({A: [[OVERLOADED]], B: [[OVERLOADED]], C: [[OVERLOADED]]})
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "overloaded"), (IDS[B], "overloaded"),
                               (IDS[C], "overloaded")]
    assert w.clock.sleeps == [2.5, 2.5]  # between tries; none after the last
    assert delivery.response.status_code == 429 and delivery.key is w.key(C)
    assert b"temporarily rate-limited" in delivery.body
    assert_nothing_held(w)


async def test_overload_when_the_attempts_run_out_passes_it_on_without_a_wait() -> None:
    w = world({A: [[OVERLOADED]], B: [[OVERLOADED]]}, max_attempts=2)
    delivery, trace = await run(w)
    assert len(trace) == 2 and delivery.key is w.key(B)
    assert w.clock.sleeps == [2.5]


# --- the budget: attempts and deadline ------------------------------------------------------------


async def test_the_attempt_budget_bounds_the_tries() -> None:
    w = world({A: [[limited(30)]], B: [[limited(30)]], C: [[OK]]}, max_attempts=2)
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "key_limited"), (IDS[B], "key_limited")]
    assert delivery.response.status_code == 429 and delivery.key is w.key(B)
    assert w.sent_keys == [A, B]  # C never tried
    assert_nothing_held(w)


async def test_the_deadline_bounds_the_tries() -> None:
    w = world({A: [[limited(30)]], B: [[limited(30)]], C: [[OK]]}, takes=35.0)
    delivery, trace = await run(w)
    # A: 100→135 (before the deadline at 160: try again); B: 135→170 (past it: stop)
    assert outcomes(trace) == [(IDS[A], "key_limited"), (IDS[B], "key_limited")]
    assert [a.seconds for a in trace] == [35.0, 35.0]
    assert delivery.response.status_code == 429 and w.sent_keys == [A, B]


async def test_no_attempt_starts_after_the_deadline_even_after_a_wait() -> None:
    """Retries are budgeted by a deadline *for starting attempts* (docs/DESIGN.md): a wait
    asked for by an overload answer must not carry the next attempt past it."""
    over = json_response(429, json.loads(OVERLOADED.split(b"\r\n\r\n", 1)[1]),
                         [(b"Retry-After", b"55")])
    w = world({A: [[over]], B: [[OK]]}, takes=10.0)
    await run(w)  # A: 100→110, then a wait of 55 s would start B at 165
    deadline = 100.0 + SETTINGS.deadline_seconds
    assert all(start <= deadline for start in w.started), (w.started, deadline)


# --- no key left: 429 with OpenRouter's words, every time -----------------------------------------


async def test_no_key_left_names_the_soonest_keys_limit_on_every_answer() -> None:
    w = world({A: [[limited(300, "A: limit 300")]], B: [[limited(100, "B: limit 100")]],
               C: [[limited(200, "C: limit 200")]]})
    exc, trace = await failure(w)
    assert isinstance(exc, NoKeyAvailable)
    assert [a.outcome for a in trace] == ["key_limited"] * 3
    assert exc.retry_after == pytest.approx(100) and exc.upstream_message == "B: limit 100"
    for elapsed in (0.0, 30.0, 60.0):  # later requests: no attempt at all, same words
        w.clock.advance(elapsed)
        exc, trace = await failure(w)
        assert isinstance(exc, NoKeyAvailable) and trace == []
        assert exc.upstream_message == "B: limit 100"
    assert exc.retry_after == pytest.approx(100 - 90)
    assert len(w.dial.requests) == 3
    w.clock.advance(11)  # B is back
    w.dial.script = lambda _received: [OK]
    _, trace = await run(w)
    assert outcomes(trace) == [(IDS[B], "ok")]


async def test_no_key_left_after_a_free_models_per_day_limit_keeps_its_words() -> None:
    message = ("Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free "
               "model requests per day")
    daily = limited(5000, message)
    for scoped in (False, True):
        w = world({A: [[daily]], B: [[daily]], C: [[daily]]}, scope_free_rests=scoped)
        for n in range(4):
            exc, trace = await failure(w)
            assert isinstance(exc, NoKeyAvailable)
            assert exc.upstream_message == message, (scoped, n)
            assert exc.retry_after == pytest.approx(5000)
            assert len(trace) == (3 if n == 0 else 0)


async def test_every_key_disabled_gives_no_retry_time() -> None:
    w = world({A: [[INVALID]], B: [[INVALID]], C: [[INVALID]]})
    exc, _ = await failure(w)
    assert isinstance(exc, NoKeyAvailable) and exc.retry_after is None


# --- defect 1: a request the upstream may have received is never sent again -------------------


async def test_a_post_with_no_answer_before_the_first_byte_timeout_is_sent_once() -> None:
    loop = asyncio.get_running_loop()
    w = world({A: [[]]})  # the upstream takes the request and says nothing
    start = loop.time()
    exc, trace = await failure(w)
    assert isinstance(exc, UpstreamTimeout) and exc.stage is Stage.SENT
    assert loop.time() - start == pytest.approx(SETTINGS.first_byte_timeout, abs=0.01)
    assert outcomes(trace) == [(IDS[A], "timeout")]
    assert len(w.dial.requests) == 1 and w.dial.dials == 1
    assert_nothing_held(w)


@pytest.mark.parametrize("close", [FIN, RESET])
async def test_a_post_whose_connection_closes_without_an_answer_is_sent_once(close: Step,
                                                                              ) -> None:
    w = world({A: [[close]], B: [[OK]]})
    exc, trace = await failure(w)
    assert isinstance(exc, UpstreamProtocolError) and exc.stage is Stage.SENT
    assert outcomes(trace) == [(IDS[A], "upstream_error")]
    assert len(w.dial.requests) == 1 and w.dial.dials == 1
    assert w.state(A) is KeyState.AVAILABLE  # nobody's fault we know of: no rest
    assert_nothing_held(w)


async def test_a_head_cut_short_is_not_sent_again() -> None:
    w = world({A: [[b"HTTP/1.1 200 OK\r\nContent-Le", FIN]], B: [[OK]]})
    exc, trace = await failure(w)
    assert isinstance(exc, UpstreamProtocolError) and exc.stage is Stage.RESPONSE
    assert len(w.dial.requests) == 1 and outcomes(trace) == [(IDS[A], "upstream_error")]


async def test_an_error_body_that_stalls_is_not_sent_again() -> None:
    loop = asyncio.get_running_loop()
    w = world({A: [[limited(30)[:-10]]], B: [[OK]]})  # the 429's body never ends
    start = loop.time()
    exc, trace = await failure(w)
    assert isinstance(exc, UpstreamTimeout) and exc.stage is Stage.RESPONSE
    assert loop.time() - start == pytest.approx(SETTINGS.idle_timeout, abs=0.01)
    assert outcomes(trace) == [(IDS[A], "timeout")]
    assert len(w.dial.requests) == 1
    assert_nothing_held(w)


async def first_request_pooled(w: World) -> None:
    """One request answered with a body read whole: its connection goes back to the pool."""
    delivery, _ = await run(w)
    assert delivery.conn is None and w.pool.snapshot().idle == 1


@pytest.mark.parametrize("close", [FIN, RESET])
async def test_a_reused_connection_dead_before_any_byte_is_retried_once_on_a_new_one(
        close: Step) -> None:
    w = world({A: [[BAD_REQUEST], [close], [OK]]}, keys=(A,))
    await first_request_pooled(w)
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "ok")]  # one attempt; the resend is not a retry
    assert [(r.conn, r.nth) for r in w.dial.requests] == [(1, 1), (1, 2), (2, 1)]
    assert w.dial.requests[1].body == w.dial.requests[2].body == BODY
    assert w.dial.peers[0].transport.is_closing()
    assert json.loads(await take(w, delivery))["id"] == "gen-1"
    assert_nothing_held(w)


async def test_the_keep_alive_race_is_retried_once_only() -> None:
    w = world({A: [[BAD_REQUEST], [FIN], [FIN], [OK]]}, keys=(A,))
    await first_request_pooled(w)
    exc, trace = await failure(w)
    assert isinstance(exc, UpstreamProtocolError) and exc.stage is Stage.SENT
    assert outcomes(trace) == [(IDS[A], "upstream_error")]
    assert [(r.conn, r.nth) for r in w.dial.requests] == [(1, 1), (1, 2), (2, 1)]
    assert_nothing_held(w)


async def test_a_reused_connection_that_times_out_is_not_sent_again() -> None:
    w = world({A: [[BAD_REQUEST], []]}, keys=(A,))
    await first_request_pooled(w)
    exc, trace = await failure(w)
    assert isinstance(exc, UpstreamTimeout)
    assert [(r.conn, r.nth) for r in w.dial.requests] == [(1, 1), (1, 2)]
    assert outcomes(trace) == [(IDS[A], "timeout")]


async def test_a_reused_connection_cut_after_response_bytes_is_not_sent_again() -> None:
    w = world({A: [[BAD_REQUEST], [b"HTTP/1.1 20", FIN]]}, keys=(A,))
    await first_request_pooled(w)
    exc, _ = await failure(w)
    assert isinstance(exc, UpstreamProtocolError) and exc.stage is Stage.RESPONSE
    assert len(w.dial.requests) == 2 and w.dial.dials == 1


async def test_a_pooled_connection_the_upstream_closed_while_idle_is_never_used() -> None:
    w = world({A: [[BAD_REQUEST], [OK]]}, keys=(A,))
    await first_request_pooled(w)
    w.dial.peers[0].play([FIN])
    await settle()
    assert w.pool.snapshot().idle == 0 and w.pool.snapshot().dropped_idle == 1
    delivery, _ = await run(w)
    assert [(r.conn, r.nth) for r in w.dial.requests] == [(1, 1), (2, 1)]
    await take(w, delivery)


# --- connect failures ---------------------------------------------------------------------------


async def test_connect_failures_are_retried_on_the_next_keys() -> None:
    w = world({C: [[OK]]}, refuse=2)
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "connect_error"), (IDS[B], "connect_error"),
                               (IDS[C], "ok")]
    assert w.dial.dials == 3 and len(w.dial.requests) == 1
    assert w.clock.sleeps == []
    assert all(w.state(k) is KeyState.AVAILABLE for k in (A, B, C))  # not the keys' fault
    await take(w, delivery)
    assert_nothing_held(w)


async def test_connect_failures_stop_at_the_attempt_budget() -> None:
    w = world({}, refuse=100, max_attempts=4)
    exc, trace = await failure(w)
    assert isinstance(exc, UpstreamConnectError)
    assert [a.outcome for a in trace] == ["connect_error"] * 4
    assert [a.key_id for a in trace] == [IDS[A], IDS[B], IDS[C], IDS[A]]
    assert w.dial.dials == 4 and w.dial.requests == []
    assert w.pool.snapshot().active == 0


async def test_connect_failures_stop_at_the_deadline() -> None:
    w = world({}, refuse=100, connect_takes=25.0)
    exc, trace = await failure(w)
    assert isinstance(exc, UpstreamConnectError)
    assert len(trace) == 3  # 100→125, 125→150, 150→175: past 160, no fourth


async def test_connect_failures_then_a_public_request_succeeds() -> None:
    w = world({None: [[OK]]}, refuse=1)
    delivery, trace = await run(w, request(public=True, method=b"GET", body=b""))
    assert outcomes(trace) == [("-", "connect_error"), ("-", "ok")]
    await take(w, delivery)


# --- the trace ----------------------------------------------------------------------------------


async def test_the_trace_lists_every_attempt_with_its_key_and_outcome() -> None:
    w = world({A: [[OK]], B: [[OVERLOADED]], C: [[INVALID]]}, refuse=1, takes=1.5)
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "connect_error"), (IDS[B], "overloaded"),
                               (IDS[C], "key_invalid"), (IDS[A], "ok")]
    assert w.outcomes == [a.outcome for a in trace]
    assert [a.seconds for a in trace] == [0.0, 1.5, 1.5, 1.5]
    assert w.clock.sleeps == [2.5]  # after the overload only
    assert delivery.response.status_code == 200 and delivery.key is w.key(A)
    await take(w, delivery)
    assert_nothing_held(w)


# --- what the key pool is told ----------------------------------------------------------------


async def test_the_key_pool_is_told_each_verdicts_reason_and_words() -> None:
    w = world({A: [[limited(30)]], B: [[INVALID]], C: [[NO_CREDIT]]})
    await failure(w)
    assert (w.key(A).reason, w.key(A).message) == ("429 limit_rpm/m/1",
                                                   "Rate limit exceeded: limit_rpm/m/1.")
    assert (w.key(B).reason, w.key(B).message) == ("401 invalid key", "User not found.")
    assert (w.key(C).reason, w.key(C).message) == ("402 no credit", "Insufficient credits")


async def test_a_402_key_limit_rests_until_the_limit_resets() -> None:
    capped = json_response(402, {"error": {"code": 402, "message": "Key limit exceeded",
                                           "metadata": {"limit_source": "openrouter_key_limit",
                                                        "limit_reset": str(int(WALL) + 900)}}})
    w = world({A: [[capped]], B: [[OK]]})
    await take(w, (await run(w))[0])
    assert w.key(A).cooling_until == pytest.approx(w.clock.now + 900)


async def test_an_account_wide_limit_rests_every_key_of_the_account() -> None:
    credits = json_response(402, {"error": {"code": 402, "message": "Account out of credits",
                                            "metadata": {"limit_source": "openrouter_credits"}}})
    w = world({A: [[credits]], C: [[OK]]}, accounts={A: "acct-1", B: "acct-1", C: "acct-2"})
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "no_credit"), (IDS[C], "ok")]  # B rests with A
    assert w.state(A) is w.state(B) is KeyState.COOLING
    assert w.key(B).cooling_until == w.clock.now + SETTINGS.credit_cooldown
    assert w.key(B).message == "Account out of credits"
    assert w.state(C) is KeyState.AVAILABLE
    await take(w, delivery)


async def test_a_key_limit_of_one_key_rests_only_that_key() -> None:
    w = world({A: [[limited(30)]], B: [[OK]]}, accounts={A: "acct-1", B: "acct-1"})
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "key_limited"), (IDS[B], "ok")]
    assert w.state(B) is KeyState.AVAILABLE
    await take(w, delivery)


FREE_DAILY = ("Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free "
              "model requests per day")


@pytest.mark.parametrize("scoped", [False, True])
async def test_a_free_model_limit_rests_the_account_for_free_models_when_so_scoped(
        scoped: bool) -> None:
    w = world({A: [[limited(600, FREE_DAILY)]], C: [[OK]]}, scope_free_rests=scoped,
              accounts={A: "acct-1", B: "acct-1", C: "acct-2"})
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "key_limited"), (IDS[C], "ok")]
    await take(w, delivery)
    for key in (A, B):  # the whole account: free-model limits are per account
        expected = KeyState.FREE_LIMITED if scoped else KeyState.COOLING
        assert w.state(key) is expected
    w.dial.script = lambda _received: [OK]
    paid, trace = await run(w, request(free=False))  # a paid model: free rests do not count
    assert [a.key_id for a in trace] == ([IDS[A]] if scoped else [IDS[C]])
    await take(w, paid)


async def test_a_limit_that_is_not_for_free_models_rests_the_key_for_every_model() -> None:
    w = world({A: [[limited(30)]], B: [[OK]]}, scope_free_rests=True)
    await take(w, (await run(w))[0])
    assert w.state(A) is KeyState.COOLING


async def test_every_attempt_is_counted_in_the_keys_stats() -> None:
    w = world({B: [[limited(30)]], C: [[OK]]}, refuse=1)
    delivery, trace = await run(w)
    assert [a.outcome for a in trace] == ["connect_error", "key_limited", "ok"]
    assert w.key(A).stats.errors_by_kind == {"connect_error": 1}
    assert w.key(A).stats.last_error == "upstream unreachable"  # our words, no address
    assert w.key(B).stats.errors_by_kind == {"429": 1}
    assert w.key(B).stats.last_error == "429 limit_rpm/m/1"  # the verdict's reason
    assert w.key(C).stats.requests == 1 and w.key(C).stats.errors_by_kind == {}
    await take(w, delivery)


# --- more budget and wait edges ---------------------------------------------------------------


async def test_an_attempt_ending_exactly_at_the_deadline_is_the_last() -> None:
    w = world({A: [[limited(30)]], B: [[limited(30)]], C: [[OK]]}, takes=30.0)
    delivery, trace = await run(w)  # A: 100→130, B: 130→160 = the deadline
    assert len(trace) == 2 and delivery.response.status_code == 429


@pytest.mark.parametrize(("delay", "answer", "waited"), [
    (0.5, OVERLOADED, 0.5),
    (9.0, json_response(429, json.loads(OVERLOADED.split(b"\r\n\r\n", 1)[1]),
                        [(b"Retry-After", b"1")]), 1.0),
])
async def test_short_waits_are_waited_too(delay: float, answer: bytes, waited: float) -> None:
    w = world({A: [[answer]], B: [[OK]]}, overload_delay=delay)
    await take(w, (await run(w))[0])
    assert w.clock.sleeps == [waited]


async def test_a_public_request_answered_429_is_passed_on_untouched() -> None:
    w = world({None: [[limited(30)]]})
    delivery, trace = await run(w, request(public=True, method=b"GET", body=b""))
    assert outcomes(trace) == [("-", "ok")]  # no key to rest, nothing to retry
    assert delivery.response.status_code == 429 and delivery.key is None
    assert all(w.state(k) is KeyState.AVAILABLE for k in (A, B, C))


async def test_the_first_byte_wait_is_reported() -> None:
    w = world({A: [[OK]]})
    await take(w, (await run(w))[0])
    (seconds,) = w.first_bytes
    assert 0.0 <= seconds < 5.0


async def test_the_attempts_are_logged_with_their_key_id_and_outcome(
        caplog: pytest.LogCaptureFixture) -> None:
    w = world({A: [[limited(30)]], B: [[OK]]}, takes=1.5)
    with caplog.at_level(logging.DEBUG, logger="orproxy.proxy.attempts"):
        await take(w, (await run(w))[0])
    lines = [(r.levelno, r.getMessage()) for r in caplog.records
             if r.name == "orproxy.proxy.attempts"]
    assert lines == [
        (logging.INFO, f"attempt rid=rid-1 n=1 key={IDS[A]} outcome=key_limited ms=1500.0"),
        (logging.DEBUG, f"attempt rid=rid-1 n=2 key={IDS[B]} outcome=ok ms=1500.0"),
    ]
    assert all(A not in r.getMessage() for r in caplog.records)  # never the key itself


# --- the keep-alive race with more than one idle connection --------------------------------------


async def test_the_keep_alive_resend_goes_on_a_new_connection_not_another_pooled_one() -> None:
    state = {"raced": False}

    def script(received: Received) -> Sequence[Step]:
        if received.nth == 1:
            return [BAD_REQUEST]
        if not state["raced"]:
            state["raced"] = True
            return [FIN]
        return [OK]

    w = world(keys=(A,))
    w.dial.script = script
    await asyncio.gather(run(w), run(w))  # two connections, both back in the pool
    assert w.pool.snapshot().idle == 2
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "ok")] and delivery.key is w.key(A)
    resent = w.dial.requests[-1]
    assert (resent.conn, resent.nth) == (3, 1)  # freshly dialed: a pooled one may be stale too
    await take(w, delivery)
    assert_nothing_held(w)


# --- the request body the upstream does not take ------------------------------------------------


async def test_a_request_body_the_upstream_stops_taking_times_out_and_is_not_resent() -> None:
    loop = asyncio.get_running_loop()
    big = b'{"x":"' + b"y" * (600 * 1024) + b'"}'
    w = world({A: [[OK]], B: [[OK]]}, peer_reads=False)
    start = loop.time()
    exc, trace = await failure(w, request(body=big))
    assert isinstance(exc, UpstreamTimeout) and exc.stage is Stage.SENT
    assert loop.time() - start == pytest.approx(SETTINGS.write_timeout, abs=0.01)
    assert outcomes(trace) == [(IDS[A], "timeout")] and w.dial.dials == 1
    assert_nothing_held(w)


# --- the read-ahead of an error body, piece by piece --------------------------------------------


def pieces_of(raw: bytes, size: int, gap: float = 0.1) -> list[Step]:
    """The head at once, then the body ``size`` bytes at a time, ``gap`` seconds apart."""
    head_end = raw.index(b"\r\n\r\n") + 4
    steps: list[Step] = [raw[:head_end]]
    for i in range(head_end, len(raw), size):
        steps += [Wait(gap), raw[i:i + size]]
    return steps


def error_body(status: int, size: int) -> bytes:
    """A JSON error of exactly ``size`` bytes of body."""
    doc = {"error": {"code": status, "message": "bad", "metadata": {"pad": ""}}}
    pad = size - len(json.dumps(doc).encode())
    doc["error"]["metadata"]["pad"] = "p" * pad  # type: ignore[index]
    return json_response(status, doc)


async def test_the_read_ahead_stops_at_its_limit_and_pauses_the_upstream() -> None:
    raw = error_body(400, 100_000)
    w = world({A: [pieces_of(raw, 16384)]})
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "ok")]
    assert delivery.ended is False and delivery.key is w.key(A)
    assert delivery.body == raw[raw.index(b"\r\n\r\n") + 4:][:READ_AHEAD_BYTES]
    assert not w.dial.peers[0].transport.is_reading()  # nothing more read for now
    assert await take(w, delivery) == raw[raw.index(b"\r\n\r\n") + 4:]


async def test_a_body_one_byte_short_of_the_limit_is_read_on_to_its_end() -> None:
    raw = error_body(400, READ_AHEAD_BYTES + 10)
    w = world({A: [pieces_of(raw, READ_AHEAD_BYTES - 1)]})
    delivery, _ = await run(w)
    assert (delivery.conn, delivery.ended) == (None, True)
    assert len(delivery.body) == READ_AHEAD_BYTES + 10


# --- commit late: a stream's head held until its first real event -------------------------------

SSE = [(b"Content-Type", b"text/event-stream")]
CONTENT = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
LIMIT_EVENT = (b'data: {"error":{"code":429,"message":"Rate limit exceeded: limit_rpm/m/1."},'
               b'"choices":[{"finish_reason":"error"}]}\n\n')
PROVIDER_EVENT = (b'data: {"error":{"code":502,"message":"provider fell over"},'
                  b'"choices":[{"finish_reason":"error"}]}\n\n')


def stream(*events: bytes, end: bool = True, gap: float = 0.0) -> list[Step]:
    """A 200 text/event-stream, chunked, each event a chunk (``gap`` seconds apart)."""
    steps: list[Step] = [response(200, b"", SSE, framing="chunked")[:-5]]
    for event in events:
        if gap:
            steps.append(Wait(gap))
        steps.append(b"%x\r\n%s\r\n" % (len(event), event))
    if end:
        steps.append(b"0\r\n\r\n")
    return steps


async def test_an_error_event_before_content_goes_to_the_next_key() -> None:
    w = world({A: [stream(LIMIT_EVENT, end=False)], B: [stream(CONTENT)]}, commit_seconds=5.0)
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "key_limited"), (IDS[B], "ok")]
    assert w.state(A) is KeyState.COOLING and w.loop.failed_over_early == 1
    assert w.key(A).stats.errors_by_kind == {"429": 1}  # counted by the event's own code,
    assert w.key(A).stats.rate_limited == 1  # not the 200 it came in
    assert w.dial.peers[0].transport.aborted  # closed: that generation stops (and its bill)
    assert delivery.key is w.key(B) and delivery.early_error is None
    assert delivery.body == CONTENT  # held, then delivered with the head
    assert await take(w, delivery) == CONTENT
    assert_nothing_held(w)


async def test_a_provider_error_event_is_an_overload_another_key_may_serve() -> None:
    w = world({A: [stream(PROVIDER_EVENT, end=False)], B: [stream(CONTENT)]},
              commit_seconds=5.0)
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "overloaded"), (IDS[B], "ok")]
    assert w.state(A) is KeyState.AVAILABLE and w.clock.sleeps == [SETTINGS.overload_delay]
    assert w.key(A).stats.last_error == "stream error 502 before content"
    await take(w, delivery)
    assert_nothing_held(w)


async def test_an_error_event_ending_the_stream_in_the_same_read_still_goes_to_the_next_key(
        ) -> None:
    """The usual shape of an early failure: the error event and the stream's end arrive
    together (one read, one on_body(data, end=True)). The first event is still an error
    before content, so another key may serve the request."""
    w = world({A: [stream(PROVIDER_EVENT)], B: [stream(CONTENT)]}, commit_seconds=5.0)
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "overloaded"), (IDS[B], "ok")]
    assert delivery.key is w.key(B)
    await take(w, delivery)
    assert_nothing_held(w)  # the first stream had ended: its connection went back


async def test_an_error_event_on_every_key_ends_the_stream_with_the_last_error() -> None:
    w = world({A: [stream(PROVIDER_EVENT, end=False)], B: [stream(PROVIDER_EVENT, end=False)],
               C: [stream(PROVIDER_EVENT, end=False)]}, commit_seconds=5.0)
    delivery, trace = await run(w)
    assert [a.outcome for a in trace] == ["overloaded"] * 3
    assert (delivery.key, delivery.conn, delivery.ended) == (w.key(C), None, True)
    assert delivery.body == PROVIDER_EVENT and delivery.early_error == (
        502, b'{"error":{"code":502,"message":"provider fell over"}}')
    assert w.loop.failed_over_early == 2  # the third had no key left to go to
    assert delivery.verdict.message == ""  # words (a str) only from an error classify knows
    assert_nothing_held(w)


async def test_content_first_commits_with_the_bytes_held() -> None:
    w = world({A: [stream(CONTENT, CONTENT, gap=1.0)]}, commit_seconds=5.0)
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "ok")]
    assert (delivery.body, delivery.ended, delivery.early_error) == (CONTENT, False, None)
    assert not w.dial.peers[0].transport.is_reading()  # paused until the relay takes over
    assert await take(w, delivery) == CONTENT * 2


async def test_a_stream_with_nothing_decisive_commits_when_the_bound_passes() -> None:
    loop = asyncio.get_running_loop()
    w = world({A: [stream(b": keep-alive\n\n", CONTENT, gap=0.3)]}, commit_seconds=0.5)
    start = loop.time()
    delivery, trace = await run(w)
    assert loop.time() - start == pytest.approx(0.5, abs=0.01)
    assert outcomes(trace) == [(IDS[A], "ok")]
    assert (delivery.body, delivery.ended) == (b": keep-alive\n\n", False)
    assert await take(w, delivery) == b": keep-alive\n\n" + CONTENT


async def test_everything_held_goes_out_with_the_head_in_order() -> None:
    w = world({A: [stream(b": keep-alive\n\n", b": still thinking\n\n", CONTENT, gap=1.0)]},
              commit_seconds=5.0)
    delivery, _ = await run(w)
    assert delivery.body == b": keep-alive\n\n: still thinking\n\n" + CONTENT
    await take(w, delivery)


async def test_an_early_error_with_a_reset_time_rests_the_key_until_then() -> None:
    event = (b'data: {"error":{"code":429,"message":"Rate limit exceeded: limit_rpm/m/1.",'
             b'"metadata":{"headers":{"X-RateLimit-Reset":"%d"}}}}\n\n' % reset_ms(90, WALL))
    w = world({A: [stream(event, end=False)], B: [stream(CONTENT)]}, commit_seconds=5.0)
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "key_limited"), (IDS[B], "ok")]
    assert w.key(A).cooling_until == pytest.approx(w.clock.now + 90)
    await take(w, delivery)


async def test_an_early_error_without_a_code_is_named_without_one() -> None:
    event = b'data: {"error":{"message":"something broke"}}\n\n'
    w = world({A: [stream(event, end=False)], B: [stream(CONTENT)]}, commit_seconds=5.0)
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "overloaded"), (IDS[B], "ok")]
    assert w.key(A).stats.last_error.split() == ["stream", "error", "before", "content"]
    await take(w, delivery)


async def test_a_stream_that_ends_while_held_is_delivered_whole() -> None:
    w = world({A: [stream(b": only a comment\n\n")]}, commit_seconds=5.0)
    delivery, _ = await run(w)
    assert (delivery.conn, delivery.ended, delivery.body) == (None, True, b": only a comment\n\n")
    assert delivery.pool is w.pool  # the pool it came from, even with no connection left
    assert w.pool.snapshot().idle == 1


async def test_a_stream_silent_while_held_fails_at_the_idle_timeout_and_is_not_resent() -> None:
    w = world({A: [stream(end=False)], B: [stream(CONTENT)]}, commit_seconds=1000.0)
    exc, trace = await failure(w)
    assert isinstance(exc, UpstreamTimeout) and exc.stage is Stage.RESPONSE
    assert outcomes(trace) == [(IDS[A], "timeout")] and len(w.dial.requests) == 1


@pytest.mark.parametrize("case", ["no commit bound", "not a stream", "public"])
async def test_only_a_keyed_stream_is_held(case: str) -> None:
    answer = stream(CONTENT) if case != "not a stream" else [OK]
    w = world({A: [answer], None: [answer]}, commit_seconds=0.0 if case == "no commit bound"
              else 5.0)
    req = request(public=True, method=b"GET", body=b"") if case == "public" else request()
    delivery, _ = await run(w, req)
    assert (delivery.body, delivery.ended) == (b"", False) and delivery.conn is not None
    await take(w, delivery)


def test_a_stream_is_known_by_its_content_type_alone() -> None:
    def head(*headers: tuple[bytes, bytes]) -> h11.Response:
        return h11.Response(status_code=200, headers=list(headers))

    assert _is_stream(head((b"Content-Type", b"Text/Event-Stream ; charset=utf-8")))
    assert _is_stream(head((b"Content-Type", b"text/event-stream;charset=utf-8;x=1")))
    assert not _is_stream(head((b"Content-Type", b"application/json")))
    assert not _is_stream(head((b"X-Content-Type", b"text/event-stream")))
    assert not _is_stream(head())


# --- sticky conversations -----------------------------------------------------------------------


async def test_a_conversation_stays_on_its_key_while_that_key_can_serve() -> None:
    w = world({A: [[OK]], B: [[limited(30)], [OK]], C: [[OK]]})
    w.loop.sticky = StickyMap(clock=w.clock)
    chat = replace(request(), conversation="conv-1")
    await take(w, (await run(w, chat))[0])
    assert w.loop.sticky.get("conv-1") == IDS[A]
    for _ in range(2):  # round-robin alone would move on; the conversation does not
        delivery, trace = await run(w, chat)
        assert outcomes(trace) == [(IDS[A], "ok")]
        await take(w, delivery)
    assert w.loop.sticky_moved == 0
    w.key(A).disabled = True
    delivery, trace = await run(w, chat)  # its key gone: moved, and kept on the new key
    assert outcomes(trace) == [(IDS[B], "key_limited"), (IDS[C], "ok")]
    assert w.loop.sticky_moved == 1 and w.loop.sticky.get("conv-1") == IDS[C]
    await take(w, delivery)
    w.key(C).disabled = True
    w.clock.advance(30)  # B is back
    await take(w, (await run(w, chat))[0])
    assert w.loop.sticky_moved == 2 and w.loop.sticky.get("conv-1") == IDS[B]


@pytest.mark.parametrize("answer", [BAD_REQUEST, limited(30)])
async def test_a_conversation_is_not_kept_on_a_key_that_did_not_answer_it(answer: bytes,
                                                                           ) -> None:
    w = world({A: [[answer]], B: [[answer]], C: [[answer]]}, max_attempts=1)
    w.loop.sticky = StickyMap(clock=w.clock)
    await run(w, replace(request(), conversation="conv-1"))
    assert w.loop.sticky.get("conv-1") is None


async def test_no_conversation_no_sticky_map_or_a_public_request_is_never_sticky() -> None:
    w = world({A: [[OK]], B: [[OK]], None: [[OK]]})
    await take(w, (await run(w, replace(request(), conversation="c")))[0])  # no map yet
    w.loop.sticky = sticky = StickyMap(clock=w.clock)
    await take(w, (await run(w))[0])  # no conversation
    public = replace(request(public=True, method=b"GET", body=b""), conversation="c")
    await take(w, (await run(w, public))[0])
    assert len(sticky) == 0 and sticky.misses == 0


# --- edges the mutation run found unguarded -----------------------------------------------------


async def test_a_failed_attempt_is_logged_with_the_request_id(
        caplog: pytest.LogCaptureFixture) -> None:
    # protects: an attempt that raised is logged like any other (request id, key, outcome)
    w = world({B: [[OK]]}, refuse=1)
    with caplog.at_level(logging.INFO, logger="orproxy.proxy.attempts"):
        await take(w, (await run(w))[0])
    lines = [r.getMessage() for r in caplog.records if r.name == "orproxy.proxy.attempts"]
    assert lines == [f"attempt rid=rid-1 n=1 key={IDS[A]} outcome=connect_error ms=0.0"]


async def test_an_early_model_gone_event_without_a_code_is_counted_as_a_502_model_gone() -> None:
    # protects: a codeless early error is classified as a 502 and counted by its outcome
    event = b'data: {"error":{"message":"gone","availability":{"code":"free_variant_ended"}}}\n\n'
    w = world({A: [stream(event, end=False)]}, commit_seconds=5.0)
    delivery, trace = await run(w)
    assert outcomes(trace) == [(IDS[A], "model_gone")]
    assert delivery.early_error is not None and delivery.early_error[0] is None
    assert w.key(A).stats.errors_by_kind == {"model_gone": 1}
    assert w.key(A).stats.last_error == "502 free_variant_ended"
    assert delivery.conn is not None
    w.pool.discard(delivery.conn)


async def test_a_wait_ending_exactly_at_the_deadline_still_starts_the_next_attempt() -> None:
    # protects: only a wait that would start the next attempt *after* the deadline stops it
    over = json_response(429, json.loads(OVERLOADED.split(b"\r\n\r\n", 1)[1]),
                         [(b"Retry-After", b"50")])
    w = world({A: [[over]], B: [[OK]]}, takes=10.0)
    delivery, trace = await run(w)  # A: 100→110, then 50 s: B starts at 160, the deadline
    assert outcomes(trace) == [(IDS[A], "overloaded"), (IDS[B], "ok")]
    assert w.started == [100.0, 160.0]
    await take(w, delivery)


def big_overload(retry_after: int) -> list[Step]:
    """A provider 429 whose body (JSON, then blank padding) is too large to hold whole."""
    doc = json.loads(OVERLOADED.split(b"\r\n\r\n", 1)[1])
    raw = response(429, json.dumps(doc).encode() + b" " * READ_AHEAD_BYTES,
                   [(b"Content-Type", b"application/json"),
                    (b"Retry-After", str(retry_after).encode())])
    return pieces_of(raw, 16384)


async def test_past_the_deadline_with_nothing_to_fall_back_the_asked_wait_is_named() -> None:
    # protects: the deadline's NoKeyAvailable says when to come back, never "now"
    w = world({A: [[limited(600, FREE_DAILY)]], B: [big_overload(55)]}, keys=(A, B),
              takes=10.0, scope_free_rests=True)
    exc, trace = await failure(w)  # A rests for free models; B: 110→120, then 55 s > 160
    assert outcomes(trace) == [(IDS[A], "key_limited"), (IDS[B], "overloaded")]
    assert isinstance(exc, NoKeyAvailable)
    # B is not resting but asked for 55 s: not sooner than that, in the provider's words
    assert (exc.retry_after, exc.upstream_message) == (55.0, "Provider returned error")
    assert_nothing_held(w)  # the body too large to hold was dropped


async def test_past_the_deadline_with_every_key_disabled_meanwhile_no_time_is_named() -> None:
    # protects: the deadline's NoKeyAvailable with no live key left gives no retry time
    w = world(keys=(A,))

    def script(received: Received) -> Sequence[Step]:
        w.keys.disable(w.key(A), "401 invalid key")  # another request's 401, meanwhile
        w.clock.advance(10.0)
        return big_overload(55)

    w.dial.script = script
    exc, _ = await failure(w)
    assert isinstance(exc, NoKeyAvailable) and exc.retry_after is None


async def test_a_stream_silent_past_the_bound_commits_open_with_nothing_held() -> None:
    # protects: a commit before any body byte leaves the stream open, for the relay to read
    w = world({A: [stream(CONTENT, gap=1.0)]}, commit_seconds=0.5)
    delivery, _ = await run(w)
    assert (delivery.body, delivery.ended) == (b"", False) and delivery.conn is not None
    assert await take(w, delivery) == CONTENT
    assert_nothing_held(w)


@pytest.mark.parametrize("held", ["read-ahead", "commit hold"])
async def test_a_connection_lost_before_the_relay_reads_on_reports_the_body_cut_short(
        held: str) -> None:
    # protects: a paused delivery is detached from its first reader, so the relay sees the loss
    answer = (pieces_of(error_body(400, 100_000), 16384) if held == "read-ahead"
              else stream(CONTENT, CONTENT, gap=1.0))
    w = world({A: [answer]}, commit_seconds=5.0)
    delivery, _ = await run(w)
    assert delivery.conn is not None and not delivery.ended
    w.dial.peers[0].transport.lose()
    await settle()
    with pytest.raises(UpstreamProtocolError) as info:
        await take(w, delivery)
    assert "without sending complete message body" in str(info.value)
