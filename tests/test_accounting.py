"""Issue 7, "see the keys": tokens and cost by key, by model and in total, and in-band
errors, end to end.

The proxy runs in-process against the fake OpenRouter on loopback; each test reads what a
user reads: ``/metrics/raw`` (parsed with prometheus_client's own parser), ``/metrics/json``
and the log. Every answer the client gets is compared byte for byte with what the fake
sent: the scan beside the relay reads the body, it never changes it.

The helpers at the top (``Reply``, ``Upstream``, ``Scrape``, the body builders) are shared
with test_observability.py, test_no_secrets.py and test_contrib.py.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from orproxy.app import App
from orproxy.keys import key_id
from tests.conftest import AUTH, KEYS, ProxyFactory, sample
from tests.fakeor import FakeOpenRouter, Recorded, Responder, reset_ms
from tests.rawhttp import Response, roundtrip

pytestmark = pytest.mark.anyio

CHAT = b"/api/v1/chat/completions"
RESPONSES = b"/api/v1/responses"
MESSAGES = b"/api/v1/messages"
JSON = b"application/json"
SSE = b"text/event-stream"
KEEPALIVE = b": OPENROUTER PROCESSING\n\n"
KEY_IDS = [key_id(k) for k in KEYS]
BY_AUTH = {b"Bearer " + k.encode(): key_id(k) for k in KEYS}
KINDS = ("prompt", "completion", "cached", "cache_write", "reasoning")


# --- what the upstream says, and what it should count for ------------------------------------


@dataclass(frozen=True)
class Tokens:
    """Expected accounting of one answer, in the proxy's terms (OpenAI's meaning: the prompt
    counts cached and cache-write tokens, the completion counts reasoning tokens)."""

    prompt: int = 0
    completion: int = 0
    cached: int = 0
    cache_write: int = 0
    reasoning: int = 0
    cost: float = 0.0

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.prompt + other.prompt, self.completion + other.completion,
                      self.cached + other.cached, self.cache_write + other.cache_write,
                      self.reasoning + other.reasoning, self.cost + other.cost)

    def kinds(self) -> dict[str, int]:
        return dict(zip(KINDS, (self.prompt, self.completion, self.cached, self.cache_write,
                                self.reasoning), strict=True))


NONE = Tokens()


@dataclass
class Reply:
    """One upstream answer: its body in the pieces the fake writes, and what the proxy
    should make of it (``model``: the label it is counted under; ``tokens``)."""

    pieces: list[bytes]
    ctype: bytes = JSON
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunked: bool = False  # else Content-Length
    model: str | None = None
    tokens: Tokens = NONE
    delay: float = 0.0  # before the head
    gate: asyncio.Event | None = None  # after the first piece, wait for the test to open it

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)


class Upstream:
    """The fake OpenRouter's script: plays the queued replies in order, one per upstream
    request, and notes the key id each request carried (``-`` for none)."""

    def __init__(self, fake: FakeOpenRouter) -> None:
        self.replies: deque[Reply | str] = deque()
        self.keys: list[str] = []
        self.requests: list[Recorded] = []
        fake.script = self._script

    def play(self, *replies: Reply | str) -> None:
        """Queue replies; the string ``"reset"`` drops the connection with a TCP RST."""
        self.replies.extend(replies)

    async def _script(self, req: Recorded, resp: Responder) -> None:
        self.requests.append(req)
        self.keys.append(BY_AUTH.get(req.header(b"authorization") or b"", "-"))
        reply = self.replies.popleft()
        if reply == "reset":
            resp.reset()
            return
        assert isinstance(reply, Reply)
        await send_reply(reply, resp)


async def send_reply(reply: Reply, resp: Responder) -> None:
    if reply.delay:
        await asyncio.sleep(reply.delay)
    headers = [(b"Content-Type", reply.ctype), (b"X-Generation-Id", b"gen-test"),
               *reply.headers]
    if not reply.chunked:
        headers.append((b"Content-Length", str(len(reply.body)).encode()))
    await resp.head(reply.status, headers)
    for i, piece in enumerate(reply.pieces):
        if piece:
            await resp.data(piece)
            await asyncio.sleep(0)
        if i == 0 and reply.gate is not None:
            await asyncio.wait_for(reply.gate.wait(), 10)
    await resp.end()


def cut(body: bytes, size: int) -> list[bytes]:
    """``body`` in pieces of ``size`` bytes: events and their line ends split everywhere."""
    return [body[i:i + size] for i in range(0, len(body), size)]


def event(doc: Any, name: str | None = None) -> bytes:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return (b"event: " + name.encode() + b"\n" if name else b"") + b"data: " + data + b"\n\n"


# --- the three dialects, as JSON bodies and as streams --------------------------------------


def chat_usage(t: Tokens) -> dict[str, Any]:
    return {"prompt_tokens": t.prompt, "completion_tokens": t.completion,
            "total_tokens": t.prompt + t.completion, "cost": t.cost, "is_byok": False,
            "prompt_tokens_details": {"cached_tokens": t.cached,
                                      "cache_write_tokens": t.cache_write, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": t.reasoning}}


def chat_json(model: str, t: Tokens, content: str = "Hello there") -> Reply:
    doc = {"id": "gen-1", "provider": "OpenAI", "model": model, "object": "chat.completion",
           "created": 1788217200,
           "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                        "message": {"role": "assistant", "content": content}}],
           "usage": chat_usage(t)}
    return Reply(cut(json.dumps(doc).encode(), 97), model=model, tokens=t)


def chat_chunk(model: str, delta: dict[str, Any], finish: str | None = None,
               **extra: Any) -> dict[str, Any]:
    return {"id": "gen-2", "provider": "OpenAI", "model": model,
            "object": "chat.completion.chunk", "created": 1788217200,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def chat_stream(model: str, t: Tokens) -> Reply:
    body = b"".join([
        KEEPALIVE,
        event(chat_chunk(model, {"role": "assistant", "content": "Hel"})),
        KEEPALIVE,
        event(chat_chunk(model, {"content": "lo"})),
        event(chat_chunk(model, {}, "stop", usage=chat_usage(t))),
        event(b"[DONE]"),
    ])
    return Reply(cut(body, 41), SSE, chunked=True, model=model, tokens=t)


def responses_usage(t: Tokens) -> dict[str, Any]:
    return {"input_tokens": t.prompt, "input_tokens_details": {"cached_tokens": t.cached},
            "output_tokens": t.completion,
            "output_tokens_details": {"reasoning_tokens": t.reasoning},
            "total_tokens": t.prompt + t.completion, "cost": t.cost}


def responses_doc(model: str, status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    output = [] if status != "completed" else [
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hi", "annotations": []}]}]
    return {"id": "resp_1", "object": "response", "created_at": 1788217200, "status": status,
            "model": model, "output": output, "usage": usage}


def responses_json(model: str, t: Tokens) -> Reply:
    body = json.dumps(responses_doc(model, "completed", responses_usage(t))).encode()
    return Reply(cut(body, 113), model=model, tokens=t)


def responses_stream(model: str, t: Tokens) -> Reply:
    body = b"".join([
        event({"type": "response.created", "sequence_number": 0,
               "response": responses_doc(model, "in_progress", None)}, "response.created"),
        KEEPALIVE,
        event({"type": "response.output_text.delta", "sequence_number": 1,
               "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "Hi"},
              "response.output_text.delta"),
        event({"type": "response.completed", "sequence_number": 2,
               "response": responses_doc(model, "completed", responses_usage(t))},
              "response.completed"),
    ])
    return Reply(cut(body, 53), SSE, chunked=True, model=model, tokens=t)


def messages_usage(input_tokens: int, read: int, write: int, output: int,
                   cost: float | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {"input_tokens": input_tokens, "cache_creation_input_tokens": write,
                             "cache_read_input_tokens": read, "output_tokens": output}
    if cost is not None:
        usage["cost"] = cost
    return usage


def messages_json(model: str) -> Reply:
    doc = {"id": "msg_01", "type": "message", "role": "assistant", "model": model,
           "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
           "stop_sequence": None, "usage": messages_usage(12, 200, 100, 30, 0.0042)}
    # Anthropic's input_tokens leaves out the cache: the prompt is 12 + 200 + 100
    return Reply(cut(json.dumps(doc).encode(), 71), model=model,
                 tokens=Tokens(312, 30, 200, 100, 0, 0.0042))


def messages_stream(model: str) -> Reply:
    start = {"type": "message_start", "message": {
        "id": "msg_02", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": messages_usage(20, 50, 0, 1)}}
    body = b"".join([
        event(start, "message_start"),
        event({"type": "content_block_start", "index": 0,
               "content_block": {"type": "text", "text": ""}}, "content_block_start"),
        event({"type": "ping"}, "ping"),
        event({"type": "content_block_delta", "index": 0,
               "delta": {"type": "text_delta", "text": "Hi"}}, "content_block_delta"),
        event({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        event({"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                  "stop_sequence": None},
               "usage": {"output_tokens": 42}}, "message_delta"),
        event({"type": "message_stop"}, "message_stop"),
    ])
    # input from message_start (20 + 50 read + 0 written), output from message_delta
    return Reply(cut(body, 29), SSE, chunked=True, model=model,
                 tokens=Tokens(70, 42, 50, 0, 0, 0.0))


GPT, MINI, CLAUDE = "openai/gpt-4o", "openai/o4-mini", "anthropic/claude-sonnet-4"


def six_dialects() -> list[tuple[bytes, Reply]]:
    """(client path, upstream reply): chat, Responses and Anthropic messages, each as JSON
    and as a stream, every usage field set somewhere."""
    return [
        (CHAT, chat_json(GPT, Tokens(120, 45, 80, 16, 20, 0.00123))),
        (CHAT, chat_stream(GPT, Tokens(300, 12, 0, 0, 5, 0.0005))),
        (RESPONSES, responses_json(MINI, Tokens(50, 25, 20, 0, 10, 0.002))),
        (RESPONSES, responses_stream(MINI, Tokens(64, 128, 0, 0, 96, 0.0031))),
        (MESSAGES, messages_json(CLAUDE)),
        (MESSAGES, messages_stream(CLAUDE)),
    ]


# --- the client side ------------------------------------------------------------------------


async def ask(port: int, target: bytes = CHAT, body: bytes = b'{"model":"m","messages":[]}',
              headers: Iterable[tuple[bytes, bytes]] = (), auth: bool = True) -> Response:
    """One POST on its own connection (framed by hand, parsed by h11)."""
    lines = [b"POST " + target + b" HTTP/1.1", b"Host: proxy.test",
             b"Content-Type: application/json", b"Content-Length: " + str(len(body)).encode()]
    if auth:
        lines.append(AUTH[0] + b": " + AUTH[1])
    lines += [n + b": " + v for n, v in headers]
    return await roundtrip(port, b"\r\n".join(lines) + b"\r\n\r\n" + body, b"POST")


async def get(port: int, target: bytes, headers: Iterable[tuple[bytes, bytes]] = (AUTH,),
              ) -> Response:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: proxy.test"]
    lines += [n + b": " + v for n, v in headers]
    return await roundtrip(port, b"\r\n".join(lines) + b"\r\n\r\n")


async def relay(port: int, target: bytes, reply: Reply, body: bytes | None = None,
                ) -> Response:
    """Ask for ``reply`` (already queued) and check the client got it byte for byte."""
    resp = await ask(port, target) if body is None else await ask(port, target, body)
    assert resp.status == reply.status, resp.body[:300]
    assert resp.body == reply.body
    assert resp.header(b"content-type") == reply.ctype
    return resp


class Scrape:
    """One ``/metrics/raw`` text exposition, parsed by prometheus_client's parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in self.families.values():
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                assert key not in self.samples, f"duplicate sample {key}"
                self.samples[key] = s.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; KeyError if the series does not exist."""
        return self.samples[(name, frozenset(labels.items()))]

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for labels in self.series(name)}


async def scrape(port: int, headers: Sequence[tuple[bytes, bytes]] = (AUTH,)) -> Scrape:
    resp = await get(port, b"/metrics/raw", headers)
    assert resp.status == 200
    return Scrape(resp.body.decode())


async def metrics_json(port: int) -> dict[str, Any]:
    resp = await get(port, b"/metrics/json")
    assert resp.status == 200
    doc = json.loads(resp.body)
    assert isinstance(doc, dict)
    return doc


def keys_by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k["id"]: k for k in doc["keys"]}


def assert_tokens(scraped: Scrape, name: str, expected: Tokens, **labels: str) -> None:
    for kind, count in expected.kinds().items():
        assert scraped.value(name, kind=kind, **labels) == count, (name, labels, kind)


# --- 1. accounting --------------------------------------------------------------------------


async def test_tokens_and_cost_are_counted_by_key_by_model_and_in_total(
    proxy: App, fake: FakeOpenRouter, caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = Upstream(fake)
    cases = six_dialects()
    with caplog.at_level(logging.INFO, logger="orproxy.access"):
        for target, reply in cases:
            upstream.play(reply)
            await relay(proxy.port, target, reply)
    assert sorted(upstream.keys) == sorted(KEY_IDS * 2)  # round robin: two answers each

    by_key: dict[str, Tokens] = {k: NONE for k in KEY_IDS}
    by_model: dict[str, Tokens] = {}
    total = NONE
    for kid, (_, reply) in zip(upstream.keys, cases, strict=True):
        assert reply.model is not None
        by_key[kid] += reply.tokens
        by_model[reply.model] = by_model.get(reply.model, NONE) + reply.tokens
        total += reply.tokens

    scraped = await scrape(proxy.port)
    for kid, expected in by_key.items():
        assert_tokens(scraped, "orproxy_key_tokens_total", expected, key_id=kid)
        assert scraped.value("orproxy_key_cost_usd_total", key_id=kid) == pytest.approx(
            expected.cost)
        assert scraped.value("orproxy_key_successes_total", key_id=kid) == 2
        assert scraped.value("orproxy_key_requests_total", key_id=kid) == 2
    assert scraped.label_values("orproxy_model_requests_total", "model") == set(by_model)
    for model, expected in by_model.items():
        assert scraped.value("orproxy_model_requests_total", model=model) == 2
        assert_tokens(scraped, "orproxy_model_tokens_total", expected, model=model)
        assert scraped.value("orproxy_model_cost_usd_total", model=model) == pytest.approx(
            expected.cost)
    assert_tokens(scraped, "orproxy_tokens_total", total)
    assert scraped.value("orproxy_cost_usd_total") == pytest.approx(total.cost)

    doc = await metrics_json(proxy.port)
    for kid, view in keys_by_id(doc).items():
        expected = by_key[kid]
        assert (view["requests"], view["successes"], view["rate_limited"], view["errors"]) == (
            2, 2, 0, 0)
        assert (view["prompt_tokens"], view["completion_tokens"]) == (
            expected.prompt, expected.completion)
        assert view["cost"] == pytest.approx(expected.cost)
    assert {m["model"]: (m["requests"], m["prompt_tokens"], m["completion_tokens"])
            for m in doc["models"]} == {
        model: (2, t.prompt, t.completion) for model, t in by_model.items()}
    for m in doc["models"]:
        assert m["cost"] == pytest.approx(by_model[m["model"]].cost)
    totals = doc["totals"]
    assert totals["requests"] == len(cases)
    assert (totals["prompt_tokens"], totals["completion_tokens"], totals["cached_tokens"],
            totals["reasoning_tokens"]) == (total.prompt, total.completion, total.cached,
                                            total.reasoning)
    assert totals["cost"] == pytest.approx(total.cost)

    # the access line of each answer names its model, tokens and cost
    lines = [r.getMessage() for r in caplog.records
             if r.name == "orproxy.access" and "route=forward" in r.getMessage()]
    assert len(lines) == len(cases)
    for line, (kid, (_, reply)) in zip(lines, zip(upstream.keys, cases, strict=True),
                                       strict=True):
        assert f" key={kid} " in line, line
        assert f" model={reply.model} prompt_tokens={reply.tokens.prompt} " in line, line
        assert f" completion_tokens={reply.tokens.completion} " in line, line
        assert f" cost={round(reply.tokens.cost, 8)}" in line, line


@pytest.mark.parametrize(("metrics", "sent", "labels"), [
    # an allow-list: those models by name, every other one as "other"
    ({"models": [MINI]}, [GPT, MINI, CLAUDE, GPT], {MINI: [1], "other": [0, 2, 3]}),
    # no list: the first N distinct models by name, the rest as "other"
    ({"models_top_n": 2}, [GPT, MINI, CLAUDE, GPT, "x/y", MINI],
     {GPT: [0, 3], MINI: [1, 5], "other": [2, 4]}),
], ids=["allow-list", "top-n"])
async def test_model_labels_are_bounded(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, metrics: dict[str, Any], sent: list[str],
    labels: dict[str, list[int]],
) -> None:
    app = await make_proxy(metrics=metrics)
    upstream = Upstream(fake)
    replies = [chat_json(model, Tokens(10 + i, 1 + i, i, 0, 0, 0.001 * (i + 1)))
               for i, model in enumerate(sent)]
    for reply in replies:
        upstream.play(reply)
        await relay(app.port, CHAT, reply)
    scraped = await scrape(app.port)
    assert scraped.label_values("orproxy_model_requests_total", "model") == set(labels)
    assert scraped.label_values("orproxy_model_tokens_total", "model") == set(labels)
    for label, indexes in labels.items():
        expected = sum((replies[i].tokens for i in indexes), NONE)
        assert scraped.value("orproxy_model_requests_total", model=label) == len(indexes)
        assert_tokens(scraped, "orproxy_model_tokens_total", expected, model=label)
        assert scraped.value("orproxy_model_cost_usd_total", model=label) == pytest.approx(
            expected.cost)
    doc = await metrics_json(app.port)
    assert {m["model"]: m["requests"] for m in doc["models"]} == {
        label: len(indexes) for label, indexes in labels.items()}
    # the totals count every answer, whatever label it got
    assert_tokens(scraped, "orproxy_tokens_total", sum((r.tokens for r in replies), NONE))


async def test_token_counting_off_counts_nothing_and_relays_the_same_bytes(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app = await make_proxy(metrics={"enable_token_counting": False})
    upstream = Upstream(fake)
    for target, reply in six_dialects():
        upstream.play(reply)
        await relay(app.port, target, reply)
    scraped = await scrape(app.port)
    assert_tokens(scraped, "orproxy_tokens_total", NONE)
    assert scraped.value("orproxy_cost_usd_total") == 0
    for kid in KEY_IDS:
        assert_tokens(scraped, "orproxy_key_tokens_total", NONE, key_id=kid)
        assert scraped.value("orproxy_key_cost_usd_total", key_id=kid) == 0
    # no body was read, so no model was learnt from one
    assert not {GPT, MINI, CLAUDE} & scraped.label_values("orproxy_model_requests_total",
                                                         "model")
    doc = await metrics_json(app.port)
    assert (doc["totals"]["prompt_tokens"], doc["totals"]["cost"]) == (0, 0)


# Content codings: the body is relayed as it came, whatever the coding. usage.py inflates a
# copy of a gzip or deflate body for the scan (InflatingScanner); a coding it cannot undo
# (br) is not read at all.
@pytest.mark.parametrize(("coding", "counted"), [(b"gzip", True), (b"br", False)])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_an_encoded_body_is_relayed_untouched(
    proxy: App, fake: FakeOpenRouter, coding: bytes, counted: bool, stream: bool,
) -> None:
    upstream = Upstream(fake)
    plain = chat_stream(GPT, Tokens(7, 3, 0, 0, 0, 0.25)) if stream else chat_json(
        GPT, Tokens(7, 3, 0, 0, 0, 0.25))
    # gzip.compress for br too: the proxy must not look, so the coding's name is enough
    encoded = Reply(cut(gzip.compress(plain.body), 50), plain.ctype,
                    headers=[(b"Content-Encoding", coding)], chunked=stream)
    upstream.play(encoded)
    resp = await relay(proxy.port, CHAT, encoded)
    assert resp.header(b"content-encoding") == coding
    assert resp.header(b"content-length") == (None if stream else str(len(encoded.body)).encode())
    expected = plain.tokens if counted else NONE
    scraped = await scrape(proxy.port)
    assert_tokens(scraped, "orproxy_tokens_total", expected)
    assert_tokens(scraped, "orproxy_key_tokens_total", expected, key_id=upstream.keys[0])
    assert scraped.value("orproxy_cost_usd_total") == expected.cost


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(points=st.lists(st.integers(min_value=1, max_value=2000), max_size=12))
async def test_a_stream_cut_anywhere_is_relayed_whole_and_counted_once(
    proxy: App, fake: FakeOpenRouter, points: list[int],
) -> None:
    upstream = Upstream(fake)
    whole = chat_stream(GPT, Tokens(1000, 10, 500, 3, 2, 0.5)).body
    edges = sorted({p % len(whole) for p in points} | {0, len(whole)})
    reply = Reply([whole[a:b] for a, b in itertools.pairwise(edges)], SSE,
                  chunked=True, model=GPT, tokens=Tokens(1000, 10, 500, 3, 2, 0.5))
    before = {kind: sample(proxy, "orproxy_tokens_total", {"kind": kind}) for kind in KINDS}
    upstream.play(reply)
    await relay(proxy.port, CHAT, reply)
    for kind, count in reply.tokens.kinds().items():
        assert sample(proxy, "orproxy_tokens_total", {"kind": kind}) - before[kind] == count


# --- 2. in-band errors ----------------------------------------------------------------------

FREE = "google/gemma-3-27b-it:free"
DAILY = ("Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model "
         "requests per day")
ACCOUNTS = [{"key": KEYS[0], "account": "acct-a"}, {"key": KEYS[1], "account": "acct-a"},
            {"key": KEYS[2], "account": "acct-b"}]


def limit_error(reset: int, message: str = DAILY) -> dict[str, Any]:
    return {"code": 429, "message": message, "metadata": {
        "headers": {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": str(reset)}, "provider_name": None}}


PROVIDER_ERROR = {"code": 502, "message": "Provider returned error",
                  "metadata": {"raw": "upstream connect error", "provider_name": "Example"}}
OVERLOAD_ERROR = {"code": 429, "message": "Provider returned error", "metadata": {
    "raw": f"{FREE} is temporarily rate-limited upstream. Please retry shortly.",
    "provider_name": "Google AI Studio"}}


def in_band_json(error: dict[str, Any]) -> Reply:
    doc = {"id": "gen-e1", "object": "chat.completion", "model": FREE, "choices": [],
           "error": error, "user_id": "user_2abc"}
    return Reply(cut(json.dumps(doc).encode(), 89), model=FREE)


def in_band_stream(error: dict[str, Any]) -> Reply:
    body = b"".join([
        KEEPALIVE,
        event(chat_chunk(FREE, {"role": "assistant", "content": "Hi"})),
        event(chat_chunk(FREE, {"content": ""}, "error", error=error)),
    ])
    return Reply(cut(body, 64), SSE, chunked=True, model=FREE)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_an_in_band_rate_limit_is_counted_and_rests_the_account(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, caplog: pytest.LogCaptureFixture,
    stream: bool,
) -> None:
    app = await make_proxy(openrouter={"keys": ACCOUNTS})
    upstream = Upstream(fake)
    reset = reset_ms(3600)
    error = limit_error(reset)
    bad = in_band_stream(error) if stream else in_band_json(error)
    upstream.play(bad)
    with caplog.at_level(logging.WARNING):
        await relay(app.port, CHAT, bad)  # the client gets the 200 as it was sent
    k0, k1, k2 = KEY_IDS
    assert upstream.keys == [k0]

    scraped = await scrape(app.port)
    assert scraped.value("orproxy_key_errors_total", key_id=k0, kind="in_band_429") == 1
    assert scraped.value("orproxy_key_rate_limited_total", key_id=k0) == 1
    assert scraped.value("orproxy_key_successes_total", key_id=k0) == 0
    assert scraped.value("orproxy_key_requests_total", key_id=k0) == 1
    assert scraped.series("orproxy_key_errors_total").keys() == {
        frozenset({("key_id", k0), ("kind", "in_band_429")})}
    [stats] = [v.stats for v in app.services.keys.snapshot() if v.id == k0]
    assert stats.errors_by_kind == {"in_band_429": 1}
    assert stats.last_error and "free-models-per-day" in stats.last_error
    # the whole account rests (for free models: it is a free-model limit) until
    # OpenRouter's reset; the other account serves
    for kid in (k0, k1):
        assert scraped.value("orproxy_key_state", key_id=kid, state="free_limited") == 1
        assert scraped.value("orproxy_key_rest_until_timestamp_seconds",
                             key_id=kid) == pytest.approx(reset / 1000, abs=2)
    assert scraped.value("orproxy_key_state", key_id=k2, state="available") == 1
    doc = keys_by_id(await metrics_json(app.port))
    assert doc[k0]["state"] == "free_limited" and doc[k0]["rate_limited"] == 1
    assert doc[k0]["rest_until"] == pytest.approx(reset / 1000, abs=2)
    assert doc[k0]["message"] == DAILY

    warnings = [(r.name, r.getMessage()) for r in caplog.records if r.levelno == logging.WARNING]
    rests = [m for n, m in warnings if n == "orproxy.keys"]
    assert len(rests) == 2, warnings
    for kid, line in zip((k0, k1), rests, strict=True):
        assert line.startswith(f"key {kid} ")
        assert " rests " in line and "with every key of account 'acct-a'" in line
        assert "429 free-models-per-day" in line and DAILY in line
    assert any(n == "orproxy.proxy.forward" and "in-band error" in m and f"key={k0}" in m
               and "code=429" in m for n, m in warnings), warnings

    ok = chat_json(FREE, Tokens(1, 1))
    upstream.play(ok)
    await relay(app.port, CHAT, ok, body=json.dumps({"model": FREE, "messages": []}).encode())
    assert upstream.keys == [k0, k2]  # k1 shares k0's account: it rests too (for free models)
    paid = chat_json(GPT, Tokens(1, 1))
    upstream.play(paid)
    await relay(app.port, CHAT, paid, body=json.dumps({"model": GPT, "messages": []}).encode())
    assert upstream.keys[2] in (k0, k1)  # a paid model may use the account's keys again


@pytest.mark.parametrize(("error", "kind", "limited"), [
    (PROVIDER_ERROR, "in_band_502", False),
    (OVERLOAD_ERROR, "in_band_429", True),  # a provider's 429: counted, nobody's fault
], ids=["provider-502", "provider-overload-429"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_an_in_band_error_that_is_not_the_keys_limit_rests_nothing(
    proxy: App, fake: FakeOpenRouter, caplog: pytest.LogCaptureFixture, stream: bool,
    error: dict[str, Any], kind: str, limited: bool,
) -> None:
    upstream = Upstream(fake)
    bad = in_band_stream(error) if stream else in_band_json(error)
    upstream.play(bad)
    with caplog.at_level(logging.INFO):
        await relay(proxy.port, CHAT, bad)
    [k0] = upstream.keys
    scraped = await scrape(proxy.port)
    assert scraped.value("orproxy_key_errors_total", key_id=k0, kind=kind) == 1
    assert scraped.value("orproxy_key_rate_limited_total", key_id=k0) == int(limited)
    assert scraped.value("orproxy_key_successes_total", key_id=k0) == 0
    assert scraped.value("orproxy_keys", state="available") == 3
    assert scraped.value("orproxy_key_rest_until_timestamp_seconds", key_id=k0) == 0
    doc = keys_by_id(await metrics_json(proxy.port))
    assert doc[k0]["errors"] == int(not limited)
    assert doc[k0]["rate_limited"] == int(limited)
    assert doc[k0]["last_error"] is not None
    assert not [r for r in caplog.records if r.name == "orproxy.keys"]
    assert any("in-band error" in r.getMessage() and f"key={k0}" in r.getMessage()
               for r in caplog.records)
