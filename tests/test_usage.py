"""Tier 1: token/cost usage and in-band errors read from relayed bodies (orproxy.observe.usage).

Bodies are shaped like OpenRouter's: chat/completions, the Responses API and Anthropic
messages, each as a JSON body and as an SSE stream with keep-alive comments and ``[DONE]``.
"""

from __future__ import annotations

import gzip
import json
import math
import tracemalloc
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orproxy.observe.usage import (
    ENVELOPE_BYTES,
    HEAD_BYTES,
    MAX_INFLATED_BYTES,
    MESSAGE_CHARS,
    TAIL_BYTES,
    BodySummary,
    InBandError,
    InflatingScanner,
    Usage,
    UsageScanner,
    scanner_for,
    usage_from,
)
from orproxy.upstream.classify import Outcome, classify

KEEPALIVE = b": OPENROUTER PROCESSING\n\n"
GEN_ID = "gen-1788217200-Xq3ZfL0a9bWcK2vN8rTy"
RESET_MS = 1788220800000  # 2026-09-01T00:00:00Z
WALL = RESET_MS / 1000 - 3600.0


def event(data: Any, name: str | None = None) -> bytes:
    line = b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n"
    return (b"event: " + name.encode() + b"\n" if name else b"") + line + b"\n"


def scan(body: bytes, *, sse: bool, pieces: Sequence[int] = (), head_bytes: int = HEAD_BYTES,
         tail_bytes: int = TAIL_BYTES) -> BodySummary:
    """Feed ``body`` cut at the given offsets."""
    scanner = UsageScanner(sse=sse, head_bytes=head_bytes, tail_bytes=tail_bytes)
    for chunk in cut(body, pieces):
        scanner.feed(chunk)
    return scanner.result()


def cut(body: bytes, points: Sequence[int]) -> Iterator[bytes]:
    start = 0
    for point in sorted(set(points)):
        yield body[start:point]
        start = point
    yield body[start:]


# --- chat/completions -----------------------------------------------------------------------------

CHAT_MODEL = "openai/gpt-4o-mini"
CHAT_USAGE = {
    "prompt_tokens": 1234, "completion_tokens": 56, "total_tokens": 1290, "cost": 0.0002187,
    "is_byok": False,
    "prompt_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 64,
                              "audio_tokens": 0},
    "cost_details": {"upstream_inference_cost": None},
    "completion_tokens_details": {"reasoning_tokens": 12, "image_tokens": 0},
}
CHAT_EXPECTED = Usage(prompt_tokens=1234, completion_tokens=56, cached_tokens=1024,
                      cache_write_tokens=64, reasoning_tokens=12, cost=0.0002187)
CHAT_JSON = json.dumps({
    "id": GEN_ID, "provider": "OpenAI", "model": CHAT_MODEL, "object": "chat.completion",
    "created": 1788217200,
    "choices": [{"logprobs": None, "finish_reason": "stop", "native_finish_reason": "stop",
                 "index": 0, "message": {"role": "assistant", "refusal": None, "reasoning": None,
                                         "content": "Bonjour ! Ça va très bien — merci 😊"}}],
    "system_fingerprint": "fp_560af6e559", "usage": CHAT_USAGE,
}, ensure_ascii=False).encode()


def chat_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": GEN_ID, "provider": "OpenAI", "model": CHAT_MODEL,
            "object": "chat.completion.chunk", "created": 1788217200,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                         "native_finish_reason": finish, "logprobs": None}], **extra}


CHAT_USAGE_EVENT = event(chat_chunk({"role": "assistant", "content": ""}, usage=CHAT_USAGE))
WORDS = ["Bonjour", " !", " Ça", " va", " très", " bien", " —", " merci", " 😊", " 日本語", "."]
CHAT_SSE = b"".join([
    KEEPALIVE, KEEPALIVE,
    event(chat_chunk({"role": "assistant", "content": ""})),
    *(event(json.dumps(chat_chunk({"role": "assistant", "content": word}),
                       ensure_ascii=False).encode()) for word in WORDS),
    KEEPALIVE,
    event(chat_chunk({"role": "assistant", "content": ""}, "stop")),
    CHAT_USAGE_EVENT,
    b"data: [DONE]\n\n",
])


# --- Responses API --------------------------------------------------------------------------------

RESP_MODEL = "openai/o4-mini"
RESP_USAGE = {"input_tokens": 812, "input_tokens_details": {"cached_tokens": 512},
              "output_tokens": 240, "output_tokens_details": {"reasoning_tokens": 128},
              "total_tokens": 1052, "cost": 0.00153}
RESP_EXPECTED = Usage(prompt_tokens=812, completion_tokens=240, cached_tokens=512,
                      cache_write_tokens=0, reasoning_tokens=128, cost=0.00153)


def response_object(status: str, text: str = "", usage: Any = None,
                    error: Any = None) -> dict[str, Any]:
    output = [] if not text else [{
        "type": "message", "id": "msg_abc123", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    return {"id": "resp_abc123", "object": "response", "created_at": 1788217200,
            "status": status, "error": error, "incomplete_details": None, "model": RESP_MODEL,
            "output": output, "parallel_tool_calls": True, "temperature": 1.0,
            "usage": usage, "user": None, "metadata": {}}


def responses_sse(text: str, *, final: bytes | None = None, deltas: int = 0) -> bytes:
    pieces = [text[i:i + max(1, len(text) // deltas)] for i in
              range(0, len(text), max(1, len(text) // deltas))] if deltas else [text]
    seq = iter(range(10**6))
    body = [
        event({"type": "response.created", "sequence_number": next(seq),
               "response": response_object("in_progress")}, "response.created"),
        KEEPALIVE,
        event({"type": "response.in_progress", "sequence_number": next(seq),
               "response": response_object("in_progress")}, "response.in_progress"),
        event({"type": "response.output_item.added", "sequence_number": next(seq),
               "output_index": 0, "item": {"type": "message", "id": "msg_abc123",
                                           "status": "in_progress", "role": "assistant",
                                           "content": []}}, "response.output_item.added"),
    ]
    for piece in pieces:
        body.append(event({"type": "response.output_text.delta", "sequence_number": next(seq),
                           "item_id": "msg_abc123", "output_index": 0, "content_index": 0,
                           "delta": piece}, "response.output_text.delta"))
    body.append(event({"type": "response.output_text.done", "sequence_number": next(seq),
                       "item_id": "msg_abc123", "output_index": 0, "content_index": 0,
                       "text": text}, "response.output_text.done"))
    body.append(final if final is not None else event(
        {"type": "response.completed", "sequence_number": next(seq),
         "response": response_object("completed", text, RESP_USAGE)}, "response.completed"))
    return b"".join(body)


RESP_TEXT = "Voilà — the answer is 42. ✅ " * 3
RESP_SSE = responses_sse(RESP_TEXT, deltas=8)
RESP_JSON = json.dumps(response_object("completed", RESP_TEXT, RESP_USAGE)).encode()


# --- Anthropic messages ---------------------------------------------------------------------------

MSG_MODEL = "anthropic/claude-sonnet-4.5"
MSG_START_USAGE = {"input_tokens": 25, "cache_creation_input_tokens": 1500,
                   "cache_read_input_tokens": 3000, "output_tokens": 1}
MSG_EXPECTED = Usage(prompt_tokens=25 + 1500 + 3000, completion_tokens=315, cached_tokens=3000,
                     cache_write_tokens=1500, reasoning_tokens=0, cost=0.0)
MSG_JSON = json.dumps({
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
    "model": MSG_MODEL, "content": [{"type": "text", "text": "Hello! How can I help?"}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {**MSG_START_USAGE, "output_tokens": 315},
}).encode()


def messages_sse(delta_usage: dict[str, Any] | None = None) -> bytes:
    return b"".join([
        event({"type": "message_start", "message": {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
            "model": MSG_MODEL, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": MSG_START_USAGE}}, "message_start"),
        event({"type": "content_block_start", "index": 0,
               "content_block": {"type": "text", "text": ""}}, "content_block_start"),
        event({"type": "ping"}, "ping"),
        KEEPALIVE,
        *(event({"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": word}}, "content_block_delta")
          for word in WORDS),
        event({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        event({"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                  "stop_sequence": None},
               "usage": delta_usage if delta_usage is not None else {"output_tokens": 315}},
              "message_delta"),
        event({"type": "message_stop"}, "message_stop"),
    ])


MSG_SSE = messages_sse()

# (body, sse, expected)
DIALECTS = {
    "chat-json": (CHAT_JSON, False, BodySummary(CHAT_EXPECTED, CHAT_MODEL, None)),
    "chat-sse": (CHAT_SSE, True, BodySummary(CHAT_EXPECTED, CHAT_MODEL, None)),
    "responses-json": (RESP_JSON, False, BodySummary(RESP_EXPECTED, RESP_MODEL, None)),
    "responses-sse": (RESP_SSE, True, BodySummary(RESP_EXPECTED, RESP_MODEL, None)),
    "messages-json": (MSG_JSON, False, BodySummary(MSG_EXPECTED, MSG_MODEL, None)),
    "messages-sse": (MSG_SSE, True, BodySummary(MSG_EXPECTED, MSG_MODEL, None)),
}


@pytest.mark.parametrize("name", DIALECTS)
def test_each_dialect_in_one_piece(name: str) -> None:
    body, sse, expected = DIALECTS[name]
    assert scan(body, sse=sse) == expected


@pytest.mark.parametrize("name", [n for n in DIALECTS if n.endswith("sse")])
@pytest.mark.parametrize("style", ["crlf", "cr", "no-space"])
def test_line_endings_and_data_without_space(name: str, style: str) -> None:
    body, _, expected = DIALECTS[name]
    if style == "crlf":
        body = body.replace(b"\n", b"\r\n")
    elif style == "cr":
        body = body.replace(b"\n", b"\r")
    else:
        body = body.replace(b"data: ", b"data:").replace(b"event: ", b"event:")
    assert scan(body, sse=True) == expected


def test_multi_line_data_is_joined_with_newlines() -> None:
    # The usage event pretty-printed over several data: lines: valid JSON only once the
    # lines are joined with \n, as the SSE spec joins them.
    pretty = json.dumps(chat_chunk({"content": ""}, usage=CHAT_USAGE), indent=1)
    last = b"".join(b"data: " + line.encode() + b"\r\n" for line in pretty.split("\n"))
    body = CHAT_SSE.replace(CHAT_USAGE_EVENT, last + b"\r\n")
    assert body != CHAT_SSE
    assert scan(body, sse=True) == DIALECTS["chat-sse"][2]


def test_data_lines_are_joined_with_a_newline_not_glued() -> None:
    body = b'data: {"model":"m","usage":{"prompt_tokens":12\ndata: 34}}\n\n'
    assert scan(body, sse=True) == BodySummary(None, None, None)  # "12\n34" is no number
    assert scan(body.replace(b"12\ndata: 34", b"12\ndata: "), sse=True).usage == Usage(12)


def test_an_unfinished_last_event_is_not_dispatched() -> None:
    # The spec drops an event the stream ends in before its blank line.
    body = CHAT_SSE[: CHAT_SSE.index(CHAT_USAGE_EVENT)] + CHAT_USAGE_EVENT[:-1]
    assert scan(body, sse=True) == BodySummary(None, CHAT_MODEL, None)


def test_anthropic_usage_merges_start_with_later_non_zero_fields() -> None:
    # message_delta repeats the input fields (here one changed) and zeroes one: non-zero wins
    body = messages_sse({"input_tokens": 30, "cache_creation_input_tokens": 0,
                         "cache_read_input_tokens": 3000, "output_tokens": 315})
    assert scan(body, sse=True).usage == Usage(30 + 1500 + 3000, 315, 3000, 1500, 0, 0.0)
    # usage in every event, cumulative: the last non-zero wins, nothing is summed
    cumulative = b"".join([
        event(chat_chunk({"content": "a"}, usage={"prompt_tokens": 10, "completion_tokens": 1})),
        event(chat_chunk({"content": "b"}, usage={"prompt_tokens": 10, "completion_tokens": 2})),
        event(chat_chunk({"content": ""}, usage={"prompt_tokens": 10, "completion_tokens": 3,
                                                  "cost": 0.5})),
    ])
    assert scan(cumulative, sse=True).usage == Usage(10, 3, cost=0.5)


def test_result_is_idempotent_and_feeding_on_is_seen() -> None:
    scanner = UsageScanner(sse=True)
    usage_at = CHAT_SSE.index(b'"usage"')
    scanner.feed(CHAT_SSE[:usage_at])
    assert scanner.result() == scanner.result() == BodySummary(None, CHAT_MODEL, None)
    scanner.feed(CHAT_SSE[usage_at:])
    assert scanner.result() == scanner.result() == DIALECTS["chat-sse"][2]


def test_no_usage_anywhere() -> None:
    assert scan(b"", sse=True) == BodySummary(None, None, None)
    assert scan(b"", sse=False) == BodySummary(None, None, None)
    assert scan(KEEPALIVE * 3 + b"data: [DONE]\n\n", sse=True) == BodySummary(None, None, None)
    assert scan(b'{"data":[{"id":"x"}]}', sse=False) == BodySummary(None, None, None)


# --- usage_from -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("obj", "expected"), [
    (CHAT_USAGE, CHAT_EXPECTED),
    (RESP_USAGE, RESP_EXPECTED),
    ({**MSG_START_USAGE, "output_tokens": 315}, MSG_EXPECTED),
    ({"prompt_tokens": 5, "cache_write_tokens": 7}, Usage(5, cache_write_tokens=7)),
    ({"input_tokens": 9, "output_tokens": 4}, Usage(9, 4)),
    ({"output_tokens": 315}, Usage(0, 315)),
    ({"cost": 0}, Usage()),
    ({"prompt_tokens": 12.0, "completion_tokens": 1e3}, Usage(12, 1000)),
])
def test_usage_from_each_dialect(obj: dict[str, Any], expected: Usage) -> None:
    assert usage_from(obj) == expected


@pytest.mark.parametrize("obj", [None, [], "usage", 3, {}, {"total": 3}, {"tokens": {"x": 1}}])
def test_usage_from_what_is_not_usage(obj: object) -> None:
    assert usage_from(obj) is None


@pytest.mark.parametrize("bad", ["12", True, False, -1, -0.5, 12.5, math.nan, math.inf,
                                 -math.inf, 10**30, 1e300, None, [], {}, "NaN"])
def test_bad_token_counts_are_zero(bad: object) -> None:
    usage = usage_from({"prompt_tokens": bad, "completion_tokens": 7,
                        "prompt_tokens_details": {"cached_tokens": bad},
                        "completion_tokens_details": bad})
    assert usage == Usage(0, 7)


@pytest.mark.parametrize("bad", ["0.5", True, -1, -0.5, -0.0, math.nan, math.inf, -math.inf,
                                 10**400, 1e300, None, [], {}])
def test_bad_costs_are_zero(bad: object) -> None:
    usage = usage_from({"prompt_tokens": 3, "cost": bad})
    assert usage == Usage(3)
    assert usage is not None and math.copysign(1.0, usage.cost) == 1.0  # never -0.0


def test_good_costs() -> None:
    assert usage_from({"cost": 12.5}) == Usage(cost=12.5)
    assert usage_from({"cost": 2}) == Usage(cost=2.0)
    assert type(usage_from({"cost": 2}).cost) is float  # type: ignore[union-attr]


def test_bad_numbers_in_a_body() -> None:
    body = (b'{"model":"m","usage":{"prompt_tokens":NaN,"completion_tokens":Infinity,'
            b'"cost":1e999,"prompt_tokens_details":{"cached_tokens":"5"},'
            b'"completion_tokens_details":{"reasoning_tokens":' + b"9" * 5000 + b"}}}")
    # 5000 digits are over Python's int-parsing limit: the JSON does not parse, the scan does
    # not decode that value, and nothing raises
    assert scan(body, sse=False).model == "m"
    body = b'{"model":"m","usage":{"prompt_tokens":NaN,"completion_tokens":-3,"cost":1e999}}'
    assert scan(body, sse=False) == BodySummary(Usage(), "m", None)


# --- in-band errors -------------------------------------------------------------------------------

DAILY_LIMIT: dict[str, Any] = {
    "code": 429,
    "message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free "
               "model requests per day",
    "metadata": {"headers": {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0",
                             "X-RateLimit-Reset": str(RESET_MS)},
                 "provider_name": None},
}


def chat_error_chunk(error: dict[str, Any]) -> bytes:
    return event(chat_chunk({"content": ""}, "error", error=error))


def test_chat_stream_rate_limited_before_any_content() -> None:
    body = KEEPALIVE * 3 + chat_error_chunk(DAILY_LIMIT) + b"data: [DONE]\n\n"
    summary = scan(body, sse=True)
    assert summary.model == CHAT_MODEL
    assert summary.usage is None
    error = summary.error
    assert error is not None
    assert (error.code, error.before_content) == (429, True)
    assert error.message == DAILY_LIMIT["message"]
    assert error.envelope is not None
    assert json.loads(error.envelope) == {"error": DAILY_LIMIT}
    assert b" " not in error.envelope.replace(b"Rate limit exceeded", b"").split(b'"message"')[0]
    # the envelope reads as an HTTP error body does: the key's daily quota, reset included
    assert error.code is not None
    verdict = classify(error.code, [], error.envelope, WALL)
    assert verdict.outcome is Outcome.KEY_LIMITED
    assert verdict == classify(429, [], json.dumps({"error": DAILY_LIMIT}).encode(), WALL)


def test_chat_stream_error_after_content_and_usage_after_it() -> None:
    overload = {"code": 502, "message": "Provider returned error",
                "metadata": {"raw": "upstream connect error", "provider_name": "Fireworks"}}
    head = CHAT_SSE[: CHAT_SSE.index(CHAT_USAGE_EVENT)]
    body = head + chat_error_chunk(overload) + chat_error_chunk(DAILY_LIMIT) + CHAT_USAGE_EVENT
    summary = scan(body, sse=True)
    assert summary.usage == CHAT_EXPECTED  # the usage after the error still counts
    assert summary.error is not None
    assert (summary.error.code, summary.error.before_content) == (502, False)  # the first one
    assert summary.error.message == "Provider returned error"


def test_an_error_with_a_comment_between_it_and_the_usage_event_is_seen() -> None:
    # The quick reading looks for an error in the usage event and the two blocks before it.
    head = CHAT_SSE[: CHAT_SSE.index(CHAT_USAGE_EVENT)]
    body = head + chat_error_chunk(DAILY_LIMIT) + KEEPALIVE + CHAT_USAGE_EVENT
    summary = scan(body, sse=True)
    assert summary.usage == CHAT_EXPECTED
    assert summary.error is not None and summary.error.code == 429


def test_the_word_error_in_a_text_is_not_an_error() -> None:
    text = chat_chunk({"content": "error: the error was an \"error\""})
    head = CHAT_SSE[: CHAT_SSE.index(CHAT_USAGE_EVENT)]
    summary = scan(head + event(text) + CHAT_USAGE_EVENT, sse=True)
    assert (summary.usage, summary.error) == (CHAT_EXPECTED, None)


def test_role_chunk_is_content() -> None:
    # By the definition used: any non-error data event other than [DONE] is content.
    body = event(chat_chunk({"role": "assistant", "content": ""})) + chat_error_chunk(DAILY_LIMIT)
    error = scan(body, sse=True).error
    assert error is not None and error.before_content is False


def test_json_body_with_error_under_200() -> None:
    body = json.dumps({"error": DAILY_LIMIT, "user_id": "user_2abc"}).encode()
    summary = scan(body, sse=False)
    assert summary.usage is None and summary.model is None
    assert summary.error == InBandError(
        429, DAILY_LIMIT["message"],
        json.dumps({"error": DAILY_LIMIT}, separators=(",", ":")).encode(), True)


def test_json_body_error_with_string_code_and_long_message() -> None:
    long = "x" * 1000
    summary = scan(json.dumps({"error": {"code": "429", "message": long}}).encode(), sse=False)
    assert summary.error is not None
    assert summary.error.code is None  # a string is not an int
    assert summary.error.message == long[:MESSAGE_CHARS]


def test_oversized_error_has_no_envelope() -> None:
    big = {"code": 429, "message": "limited", "metadata": {"raw": "r" * ENVELOPE_BYTES}}
    summary = scan(json.dumps({"error": big}).encode(), sse=False)
    assert summary.error is not None
    assert (summary.error.code, summary.error.envelope) == (429, None)
    fits = {"code": 429, "message": "limited", "metadata": {"raw": "r" * (ENVELOPE_BYTES - 80)}}
    envelope = scan(json.dumps({"error": fits}).encode(), sse=False).error
    assert envelope is not None and envelope.envelope is not None
    assert len(envelope.envelope) <= ENVELOPE_BYTES


@pytest.mark.parametrize(("kind", "code"), [("rate_limit_error", 429),
                                            ("overloaded_error", 503), ("api_error", None)])
def test_anthropic_error_event(kind: str, code: int | None) -> None:
    error = {"type": kind, "message": "Overloaded" if code != 429 else "Too many requests"}
    start = MSG_SSE[: MSG_SSE.index(b"event: content_block_start")]
    body = start + KEEPALIVE + event({"type": "error", "error": error}, "error")
    summary = scan(body, sse=True)
    assert summary.model == MSG_MODEL
    assert summary.usage == Usage(4525, 1, 3000, 1500)  # message_start's, output so far
    assert summary.error is not None
    assert summary.error.code == code
    assert summary.error.message == error["message"]
    assert summary.error.envelope is not None
    assert json.loads(summary.error.envelope) == {"error": error}
    assert summary.error.before_content is False  # message_start is a data event
    # the same error as a non-stream body
    json_error = scan(json.dumps({"type": "error", "error": error}).encode(), sse=False).error
    assert json_error is not None and json_error.code == code


def test_responses_failed_and_error_events() -> None:
    failed = {"code": "rate_limit_exceeded", "message": "Rate limit reached for o4-mini"}
    final = event({"type": "response.failed", "sequence_number": 99,
                   "response": response_object("failed", error=failed)}, "response.failed")
    summary = scan(responses_sse("partial", final=final), sse=True)
    assert summary.model == RESP_MODEL
    assert summary.error is not None
    assert (summary.error.code, summary.error.message) == (None, failed["message"])
    assert summary.error.envelope is not None
    assert json.loads(summary.error.envelope) == {"error": failed}
    assert summary.error.before_content is False
    # an error event as the first thing in the stream
    flat = {"type": "error", "code": 429, "message": "Rate limit exceeded: limit_rpm/o4-mini",
            "param": None, "sequence_number": 0}
    summary = scan(KEEPALIVE + event(flat, "error"), sse=True)
    assert summary.error is not None
    assert (summary.error.code, summary.error.before_content) == (429, True)
    assert summary.error.envelope is not None
    assert json.loads(summary.error.envelope) == {"error": flat}
    # the non-stream response object of a failed response
    body = json.dumps(response_object("failed", error=failed)).encode()
    assert scan(body, sse=False).error == InBandError(
        None, failed["message"], json.dumps({"error": failed}, separators=(",", ":")).encode(),
        True)


def test_null_errors_are_not_errors() -> None:
    # Every response.* event carries "error": null; chat chunks may too.
    assert scan(RESP_SSE, sse=True).error is None
    assert scan(RESP_JSON, sse=False).error is None
    body = event(chat_chunk({"content": "hi"}, error=None))
    assert scan(body, sse=True).error is None


# --- any split gives the same result --------------------------------------------------------------

VARIANTS = {f"{name}-{style}": (body if style == "lf" else
                                body.replace(b"\n", b"\r\n") if style == "crlf" else
                                body.replace(b"data: ", b"data:"), sse, expected)
            for name, (body, sse, expected) in DIALECTS.items()
            for style in ("lf", "crlf", "nospace")
            if sse or style == "lf"}
ERROR_BODY = (KEEPALIVE + event(chat_chunk({"content": "Ça"})) +
              chat_error_chunk(DAILY_LIMIT)).replace(b"\n", b"\r\n")


@settings(max_examples=150, deadline=None, database=None)
@given(name=st.sampled_from(sorted(VARIANTS)), data=st.data())
def test_any_split_gives_the_same_result(name: str, data: st.DataObject) -> None:
    body, sse, expected = VARIANTS[name]
    points = data.draw(st.lists(st.integers(0, len(body)), max_size=40))
    assert scan(body, sse=sse, pieces=points) == expected


STREAM_DOCS = [chat_chunk({"role": "assistant", "content": ""}),
               *(chat_chunk({"role": "assistant", "content": word}) for word in WORDS),
               chat_chunk({"role": "assistant", "content": ""}, "stop"),
               chat_chunk({"role": "assistant", "content": ""}, usage=CHAT_USAGE)]


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """The chat stream written every way the spec allows: each line ending drawn on its
    own, comments anywhere, the space after "data:" or not, JSON over several data lines."""
    end = st.sampled_from([b"\n", b"\r\n", b"\r"])

    def blank_line() -> bytes:  # a line end, then an empty line's end
        first, second = draw(end), draw(end)
        return first + (b"\r\n" if first == b"\r" and second == b"\n" else second)  # not CRLF

    out = [b"\xef\xbb\xbf"] if draw(st.booleans()) else []
    for doc in [*STREAM_DOCS, "[DONE]"]:
        for _ in range(draw(st.integers(0, 2))):
            out += [b": OPENROUTER PROCESSING", blank_line()]
        if draw(st.booleans()):
            out += [b": a comment inside the event", draw(end)]
        text = doc if isinstance(doc, str) else json.dumps(
            doc, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))
        lines = [b"data:" + draw(st.sampled_from([b"", b" "])) + line.encode()
                 for line in text.split("\n")]
        out += [b"".join(line + draw(end) for line in lines[:-1]), lines[-1], blank_line()]
    return b"".join(out)


@settings(max_examples=150, deadline=None, database=None)
@given(body=sse_streams(), data=st.data())
def test_any_spelling_of_a_stream_gives_the_same_result(body: bytes, data: st.DataObject) -> None:
    points = data.draw(st.lists(st.integers(0, len(body)), max_size=30))
    assert scan(body, sse=True, pieces=points) == DIALECTS["chat-sse"][2]


@pytest.mark.parametrize("caps", [(HEAD_BYTES, TAIL_BYTES), (48, 160), (0, 1)])
def test_every_single_cut_of_a_crlf_stream(caps: tuple[int, int]) -> None:
    # Every cut lands once inside \r\n, inside "data:", inside each multi-byte character,
    # and (with small windows) every window edge against every chunk edge.
    for body, sse in [(ERROR_BODY, True), (VARIANTS["chat-sse-crlf"][0], True),
                      (CHAT_JSON, False)]:
        whole = scan(body, sse=sse, head_bytes=caps[0], tail_bytes=caps[1])
        for point in range(len(body) + 1):
            assert scan(body, sse=sse, pieces=[point], head_bytes=caps[0],
                        tail_bytes=caps[1]) == whole, point
    assert scan(ERROR_BODY, sse=True).error is not None


@settings(max_examples=100, deadline=None, database=None)
@given(name=st.sampled_from(sorted(VARIANTS)), head=st.integers(0, 600),
       tail=st.integers(1, 1500), data=st.data())
def test_any_split_with_small_windows(name: str, head: int, tail: int,
                                      data: st.DataObject) -> None:
    # When the body overflows the window, what is read depends on the body alone.
    body, sse, _ = VARIANTS[name]
    points = data.draw(st.lists(st.integers(0, len(body)), max_size=40))
    whole = scan(body, sse=sse, head_bytes=head, tail_bytes=tail)
    assert scan(body, sse=sse, pieces=points, head_bytes=head, tail_bytes=tail) == whole


@pytest.mark.parametrize("name", [n for n in VARIANTS if "sse" in n])
def test_a_window_holding_first_and_last_events_is_enough(name: str) -> None:
    body, sse, expected = VARIANTS[name]
    summary = scan(body, sse=sse, pieces=range(0, len(body), 7), head_bytes=700, tail_bytes=900)
    assert len(body) > 700 + 900
    assert summary == expected


# --- large bodies ---------------------------------------------------------------------------------


def test_huge_last_event_still_yields_usage() -> None:
    # A response.completed whose response object holds 200 KB of output text: the tail sees
    # only the end of that one event.
    text = ("Le modèle répond longuement — “quoted” \\ \"escaped\" 日本語. " * 4000)[:200_000]
    body = responses_sse(text, deltas=2000)
    assert len(body) > 3 * 200_000
    assert scan(body, sse=True, pieces=range(0, len(body), 4096)) == DIALECTS["responses-sse"][2]
    # the same event over several data: lines
    completed = json.dumps({"type": "response.completed", "sequence_number": 7,
                            "response": response_object("completed", text, RESP_USAGE)},
                           indent=1)
    final = b"event: response.completed\r\n" + b"".join(
        b"data: " + line.encode() + b"\r\n" for line in completed.split("\n")) + b"\r\n"
    body = responses_sse(text, final=final)
    assert scan(body, sse=True, pieces=range(0, len(body), 1000)) == DIALECTS["responses-sse"][2]


def test_escaped_usage_in_strings_is_not_a_key() -> None:
    # After the real usage, metadata whose string values spell a usage object.
    # ... and a key that ends in an escaped quote and "usage": it is not a "usage" key.
    decoy = '"usage": {"input_tokens": 999}, \\"usage\\": {"input_tokens": 9}'
    obj = response_object("completed", "x" * 150_000, RESP_USAGE)
    obj["metadata"] = {"note": decoy, 'a"usage': {"input_tokens": 99}, "usage": "not usage"}
    body = json.dumps(obj).encode()
    assert body.index(b'"usage": {"input_tokens": 812') < body.index(b'"a\\"usage": {')
    assert scan(body, sse=False, pieces=range(0, len(body), 65536)) == BodySummary(
        RESP_EXPECTED, RESP_MODEL, None)


def test_five_megabyte_json_body() -> None:
    obj = json.loads(CHAT_JSON)
    obj["choices"][0]["message"]["content"] = "Ça {\"usage\": [1]} " * 300_000
    body = json.dumps(obj).encode()
    assert len(body) > 5_000_000
    assert scan(body, sse=False, pieces=range(0, len(body), 16384)) == DIALECTS["chat-json"][2]


def test_large_failed_response_object_keeps_its_error() -> None:
    failed = {"code": "server_error", "message": "The model failed mid-answer"}
    obj = response_object("failed", "y" * 300_000, RESP_USAGE, error=failed)
    summary = scan(json.dumps(obj).encode(), sse=False)
    assert summary.usage == RESP_EXPECTED and summary.model == RESP_MODEL
    assert summary.error is not None and summary.error.message == failed["message"]


def test_error_after_long_keepalive_stream_is_before_content() -> None:
    body = KEEPALIVE * 5000 + chat_error_chunk(DAILY_LIMIT)  # 125 KB: beyond the window
    error = scan(body, sse=True).error
    assert error is not None and (error.code, error.before_content) == (429, True)
    body = CHAT_SSE.replace(b"data: [DONE]\n\n", b"") + KEEPALIVE * 5000 + chat_error_chunk(
        DAILY_LIMIT)
    error = scan(body, sse=True).error
    assert error is not None and (error.code, error.before_content) == (429, False)


def test_memory_is_bounded_over_fifty_megabytes() -> None:
    chunk_size = 65536
    events = b"".join(event(chat_chunk({"content": f"word {i} "})) for i in range(400))
    template = bytearray((events * (chunk_size // len(events) + 1))[:chunk_size])
    scanner = UsageScanner(sse=True)
    limit = 16384 + 65536 + chunk_size
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        peak_held = 0
        for _ in range(50 * 1024 * 1024 // chunk_size):
            scanner.feed(bytes(template))  # a fresh object, as each socket read is
            assert scanner.retained_bytes <= limit
            peak_held = max(peak_held, tracemalloc.get_traced_memory()[0] - before)
    finally:
        tracemalloc.stop()
    assert peak_held <= limit + chunk_size + 16384  # + the chunk being made, + bookkeeping
    scanner.feed(b"\n\n" + event(chat_chunk({"content": ""}, usage=CHAT_USAGE)))
    assert scanner.result() == BodySummary(CHAT_EXPECTED, CHAT_MODEL, None)


def test_a_middle_never_seen_is_not_spliced() -> None:
    # The first and last chunks alone would join into one plausible event; the body is
    # larger than the window, so they are read apart whatever the chunking.
    first = b'data: {"usage":{"prompt_tokens":1'
    middle = b'23}}\n\ndata: {"usage":{"prompt_tokens":4'
    last = b"56}}\n\n"
    body = first + middle + last
    whole = scan(body, sse=True, head_bytes=len(first), tail_bytes=len(last))
    assert whole == BodySummary(None, None, None)
    assert scan(body, sse=True, pieces=[len(first), len(first + middle)],
                head_bytes=len(first), tail_bytes=len(last)) == whole


def test_empty_chunks_hold_nothing() -> None:
    scanner = UsageScanner(sse=True)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(100_000):
            scanner.feed(b"")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 4096
    assert scanner.retained_bytes == 0


def test_retained_bytes_is_head_plus_tail_plus_one_chunk() -> None:
    scanner = UsageScanner(sse=False, head_bytes=10, tail_bytes=90)
    scanner.feed(b"a" * 50)
    assert scanner.retained_bytes == 50
    scanner.feed(b"b" * 1000)  # the first chunk leaves the tail; 10 bytes of it stay as head
    assert scanner.retained_bytes == 10 + 1000
    for _ in range(50):
        scanner.feed(b"c" * 30)
        assert scanner.retained_bytes <= 10 + 90 + 1000  # the big chunk is still needed
    # long gone: the tail holds exactly the three 30-byte chunks it needs
    assert scanner.retained_bytes == 10 + 90


# --- hostile input --------------------------------------------------------------------------------


def check_valid(summary: BodySummary) -> None:
    usage = summary.usage
    if usage is not None:
        for count in (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                      usage.cache_write_tokens, usage.reasoning_tokens):
            assert type(count) is int and count >= 0
        assert type(usage.cost) is float and math.isfinite(usage.cost) and usage.cost >= 0
    assert summary.model is None or (isinstance(summary.model, str) and summary.model)
    error = summary.error
    if error is not None:
        assert error.code is None or type(error.code) is int
        assert isinstance(error.message, str) and len(error.message) <= MESSAGE_CHARS
        assert error.envelope is None or len(error.envelope) <= ENVELOPE_BYTES
        assert error.envelope is None or isinstance(json.loads(error.envelope)["error"], dict)


HOSTILE = [
    b"\xff\xfe\x00garbage\r\n\r\n",
    b'data: {"usage":' + b"[" * 100_000 + b"\n\n",
    b'{"usage":' + b"{\"a\":" * 50_000,
    b'{"error":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'data: {"error":' + b'{"e":' * 5000 + b"1" + b"}" * 5001 + b"\n\n",
    b'data: {"model":"\xff\xfe","usage":{"prompt_tokens":"\xc3"}}\n\n',
    b'"usage":{"prompt_tokens":3}' * 10_000,
    b"data: [DONE]\n\n" * 10_000,
    b"\r" * 100_000 + b"\n" * 100_000,
    b"\xef\xbb\xbf" + CHAT_SSE,
    b"\xef\xbb\xbf" + CHAT_JSON,
]


@pytest.mark.parametrize("body", HOSTILE, ids=range(len(HOSTILE)))
@pytest.mark.parametrize("sse", [True, False])
def test_hostile_bodies_never_raise(body: bytes, sse: bool) -> None:
    check_valid(scan(body, sse=sse))
    check_valid(scan(body, sse=sse, pieces=range(0, len(body), 1000), head_bytes=100,
                     tail_bytes=1000))


def test_bom_is_dropped() -> None:
    assert scan(b"\xef\xbb\xbf" + CHAT_SSE, sse=True) == DIALECTS["chat-sse"][2]
    assert scan(b"\xef\xbb\xbf" + CHAT_JSON, sse=False) == DIALECTS["chat-json"][2]


def test_non_utf8_bytes_do_not_hide_usage() -> None:
    body = CHAT_SSE.replace("très".encode(), b"tr\xe8s")  # Latin-1 in a UTF-8 stream
    assert body != CHAT_SSE
    assert scan(body, sse=True) == DIALECTS["chat-sse"][2]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["prompt_tokens", "completion_tokens", "cached_tokens", "cost",
                         "input_tokens", "output_tokens", "reasoning_tokens", "code", "message",
                         "type", "usage", "error", "model", "response", "message",
                         "prompt_tokens_details", "input_tokens_details",
                         "cache_creation_input_tokens", "cache_read_input_tokens"]),
        inner, max_size=6),
    max_leaves=30)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(value=JSON_VALUES, sse=st.booleans(), data=st.data())
@example(value={"usage": {"prompt_tokens": 10**20, "cost": -0.0}}, sse=False, data=None)
def test_any_json_shape_never_raises(value: Any, sse: bool, data: st.DataObject | None) -> None:
    text = json.dumps(value).encode()  # NaN and Infinity included, as Python's json allows
    body = event(text) + event(text, "error") if sse else text
    points = data.draw(st.lists(st.integers(0, len(body)), max_size=5)) if data else []
    check_valid(scan(body, sse=sse, pieces=points))
    usage = usage_from(value)
    if usage is not None:
        check_valid(BodySummary(usage, None, None))


@settings(max_examples=300, deadline=None, database=None)
@given(name=st.sampled_from(sorted(VARIANTS)), data=st.data(),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=6)), max_size=8),
       caps=st.sampled_from([(HEAD_BYTES, TAIL_BYTES), (64, 256)]))
def test_mutated_bodies_never_raise(name: str, data: st.DataObject,
                                    edits: list[tuple[int, bytes]], caps: tuple[int, int]) -> None:
    body = bytearray(VARIANTS[name][0])
    for position, replacement in edits:
        at = position % (len(body) + 1)
        body[at:at + len(replacement) // 2] = replacement
    points = data.draw(st.lists(st.integers(0, len(body)), max_size=10))
    check_valid(scan(bytes(body), sse=VARIANTS[name][1], pieces=points, head_bytes=caps[0],
                     tail_bytes=caps[1]))


@settings(max_examples=200, deadline=None, database=None)
@given(body=st.binary(max_size=3000), sse=st.booleans(),
       points=st.lists(st.integers(0, 3000), max_size=10))
def test_random_bytes_never_raise(body: bytes, sse: bool, points: list[int]) -> None:
    check_valid(scan(body, sse=sse, pieces=[p for p in points if p <= len(body)],
                     head_bytes=50, tail_bytes=200))


# --- scanner_for ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("content_type", "encoding", "kind"), [
    (b"text/event-stream", None, "sse"),
    (b"Text/Event-Stream; charset=utf-8", b"identity", "sse"),
    (b"application/json", None, "json"),
    (b"application/json; charset=utf-8", b"", "json"),
    (b"APPLICATION/JSON", b"Identity", "json"),
    (b"application/json", b"gzip", "json+gzip"),
    (b"text/event-stream", b"x-gzip", "sse+gzip"),
    (b"application/json", b"identity, gzip", "json+gzip"),
    (b"application/json", b"deflate", "json+deflate"),
    (b"text/event-stream", b"br", None),
    (b"application/json", b"zstd", None),
    (b"application/json", b"gzip, gzip", None),
    (b"text/plain", None, None),
    (b"application/x-ndjson", None, None),
    (None, None, None),
])
def test_scanner_for(content_type: bytes | None, encoding: bytes | None,
                     kind: str | None) -> None:
    scanner = scanner_for(content_type, encoding)
    if kind is None:
        assert scanner is None
        return
    assert scanner is not None
    body = CHAT_SSE if kind.startswith("sse") else CHAT_JSON
    if kind.endswith("+gzip"):
        body = gzip.compress(body)
    elif kind.endswith("+deflate"):
        body = zlib.compress(body)
    for i in range(0, len(body), 7):  # inflated piece by piece, as relayed
        scanner.feed(body[i:i + 7])
    assert scanner.result() == BodySummary(CHAT_EXPECTED, CHAT_MODEL, None)


def test_an_encoded_body_that_is_not_what_it_says_is_not_counted() -> None:
    scanner = scanner_for(b"application/json", b"gzip")
    assert scanner is not None
    scanner.feed(b"not gzip at all" + CHAT_JSON)
    assert scanner.result() == BodySummary(None, None, None)


def test_a_compression_bomb_costs_bounded_work() -> None:
    scanner = scanner_for(b"application/json", b"gzip")
    assert isinstance(scanner, InflatingScanner)
    bomb = gzip.compress(b" " * (MAX_INFLATED_BYTES + (1 << 20)) + CHAT_JSON)
    for i in range(0, len(bomb), 65536):
        scanner.feed(bomb[i:i + 65536])
    assert scanner._inflated == MAX_INFLATED_BYTES  # stopped there: the rest is not read
    assert scanner.result().usage is None


def test_bad_window_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="tail_bytes"):
        UsageScanner(sse=True, tail_bytes=0)
    with pytest.raises(ValueError, match="head_bytes"):
        UsageScanner(sse=True, head_bytes=-1)
