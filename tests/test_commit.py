"""Commit late: the first real SSE event decides, whatever the split (chat, Responses,
Anthropic)."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orproxy.proxy.commit import Decision, FirstEvent
from orproxy.upstream.classify import Outcome, Scope, classify

HOLD, COMMIT, ERROR = Decision.HOLD, Decision.COMMIT, Decision.ERROR
PROCESSING = b": OPENROUTER PROCESSING\n\n"


def data(doc: Any, *, event: str | None = None, eol: bytes = b"\n") -> bytes:
    head = b"event: " + event.encode() + eol if event else b""
    return head + b"data: " + json.dumps(doc, separators=(",", ":")).encode() + eol + eol


ROLE_DELTA = data({"id": "gen-1", "provider": "OpenAI", "model": "openai/gpt-4o-mini",
                   "object": "chat.completion.chunk", "created": 1788217200,
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None, "native_finish_reason": None,
                                "logprobs": None}]})
CONTENT = data({"id": "gen-1", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]})
RATE_LIMIT_ERROR = {"code": 429, "message": "Rate limit exceeded: free-models-per-day",
                    "metadata": {"headers": {"X-RateLimit-Limit": "50",
                                             "X-RateLimit-Remaining": "0",
                                             "X-RateLimit-Reset": "1788220800000"}}}
ERROR_CHUNK = data({"id": "gen-1", "object": "chat.completion.chunk", "provider": "Chutes",
                    "error": RATE_LIMIT_ERROR,
                    "choices": [{"index": 0, "delta": {"content": ""},
                                 "finish_reason": "error"}]})


def run(stream: bytes, **kwargs: Any) -> FirstEvent:
    first = FirstEvent(**kwargs)
    first.feed(stream)
    return first


def envelope(first: FirstEvent) -> Any:
    assert first.error_envelope is not None
    return json.loads(first.error_envelope)


# --- holding --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [
    b"", PROCESSING, PROCESSING * 20, b": OPENROUTER PROCESSING", b"\n\n\r\n\r\r",
    b"data: {\"choices\":[]}",  # a line not yet ended
    b"data: {\"choices\":[]}\n",  # an event not yet ended
    b"event: message_start\n\n",  # a name without data is no event
    b"id: 7\nretry: 1000\n\n",
    data({"type": "ping"}, event="ping"),  # Anthropic's keep-alive
])
def test_comments_blank_lines_and_partial_events_hold(stream: bytes) -> None:
    first = run(stream)
    assert first.decision is HOLD
    assert first.error_envelope is None and first.error_status is None


# --- committing -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [
    PROCESSING + ROLE_DELTA,
    ROLE_DELTA + ERROR_CHUNK,  # content came first: an error now is mid-stream, not ours
    PROCESSING * 3 + CONTENT,
    b"data: [DONE]\n\n",
    b"data: not json\n\n",
    b"data:\n\n",  # an empty data line still makes an event (WHATWG)
    b'data: ["a"]\n\n',
    b'data: {"error": null, "choices": []}\n\n',
    data({"type": "response.created", "sequence_number": 0,
          "response": {"id": "resp_1", "status": "in_progress", "error": None}},
         event="response.created"),
    data({"type": "message_start", "message": {"id": "msg_1", "role": "assistant",
                                               "content": []}}, event="message_start"),
    data({"type": "ping"}, event="ping") + data({"type": "message_start"}, event="message_start"),
])
def test_any_other_complete_data_event_commits(stream: bytes) -> None:
    first = run(stream)
    assert first.decision is COMMIT
    assert first.error_envelope is None and first.error_status is None


# --- errors before any content -----------------------------------------------------------------


def test_chat_error_chunk_before_content_is_an_error_classify_can_read() -> None:
    first = run(PROCESSING + PROCESSING + ERROR_CHUNK + CONTENT)
    assert first.decision is ERROR and first.error_status == 429
    assert envelope(first) == {"error": RATE_LIMIT_ERROR}
    assert first.error_envelope == json.dumps({"error": RATE_LIMIT_ERROR},
                                              separators=(",", ":")).encode()  # compact
    verdict = classify(first.error_status, [], first.error_envelope, 1788220800.0 - 3600)
    assert verdict.outcome is Outcome.KEY_LIMITED and verdict.scope is Scope.ACCOUNT
    assert verdict.rest_seconds == 3600.0


def test_an_error_key_spelled_with_escapes_is_still_an_error() -> None:
    # The undecoded commit of a plain content event must not skip this one.
    spelled = ERROR_CHUNK.replace(b'"error"', b'"\\u0065rror"')
    assert b'"error"' not in spelled
    first = run(spelled + CONTENT)
    assert first.decision is ERROR and envelope(first) == {"error": RATE_LIMIT_ERROR}


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_line_ends_lf_crlf_and_cr(eol: bytes) -> None:
    stream = PROCESSING.replace(b"\n", eol) + ERROR_CHUNK.replace(b"\n", eol)
    assert run(stream).decision is ERROR
    assert run(ROLE_DELTA.replace(b"\n", eol)).decision is COMMIT


def test_multi_line_data_is_joined_with_lf() -> None:
    stream = (b'data: {"error":\r\ndata: {"code": 502,\ndata:"message":"Provider down"}}\n'
              b"\n")
    first = run(stream)
    assert first.decision is ERROR and first.error_status == 502
    assert envelope(first) == {"error": {"code": 502, "message": "Provider down"}}


def test_multi_line_data_split_inside_a_crlf_is_not_cut_short() -> None:
    stream = b'data: {"error":\r\ndata: {"code": 504}}\r\n\r\n'
    for cut in range(len(stream) + 1):
        first = FirstEvent()
        first.feed(stream[:cut])
        assert first.feed(stream[cut:]) is ERROR, cut
        assert first.error_status == 504


def test_lines_of_an_error_events_text_are_kept_apart() -> None:
    first = run(b"event: error\ndata: upstream\ndata: exploded\n\n")
    assert envelope(first) == {"error": {"message": "upstream\nexploded"}}


def test_data_nested_too_deep_to_decode_commits() -> None:
    assert run(b"data: " + b"[" * 100_000 + b"\n\n", max_hold_bytes=200_000).decision is COMMIT


def test_responses_error_event() -> None:
    first = run(data({"type": "error", "code": "rate_limit_exceeded",
                      "message": "Rate limit exceeded", "param": None, "sequence_number": 0},
                     event="error"))
    assert first.decision is ERROR and first.error_status is None
    assert envelope(first) == {"error": {"code": "rate_limit_exceeded",
                                         "message": "Rate limit exceeded", "param": None}}
    nested = run(data({"type": "error", "error": {"code": 429, "message": "slow down"}}))
    assert nested.error_status == 429
    unnamed = run(data({"type": "error", "code": "server_error", "message": "x"}))  # no event:
    assert unnamed.decision is ERROR
    assert envelope(unnamed) == {"error": {"code": "server_error", "message": "x"}}


def test_responses_failed_before_output() -> None:
    created = data({"type": "response.created", "response": {"id": "r", "status": "queued"}},
                   event="response.created")
    failed = data({"type": "response.failed", "sequence_number": 1,
                   "response": {"id": "r", "status": "failed",
                                "error": {"code": 429, "message": "Rate limit exceeded"}}},
                  event="response.failed")
    # response.created is a real event: commit happens there, as for a role delta
    assert run(created + failed).decision is COMMIT
    first = run(failed)
    assert first.decision is ERROR and first.error_status == 429
    assert envelope(first) == {"error": {"code": 429, "message": "Rate limit exceeded"}}
    bare = run(data({"type": "response.failed", "response": {"status": "failed"}}))
    assert envelope(bare) == {"error": {"message": "response failed"}}


def test_anthropic_error_event() -> None:
    first = run(data({"type": "error", "error": {"type": "overloaded_error",
                                                 "message": "Overloaded"}}, event="error"))
    assert first.decision is ERROR and first.error_status is None
    assert envelope(first) == {"error": {"type": "overloaded_error", "message": "Overloaded"}}


@pytest.mark.parametrize("stream", [b"event: error\ndata: upstream exploded\n\n",
                                    b'event: error\ndata: {"message": "bad"}\n\n',
                                    b"event: error\ndata: [1]\n\n"])
def test_an_event_named_error_is_an_error_whatever_its_data(stream: bytes) -> None:
    first = run(stream)
    assert first.decision is ERROR and first.error_envelope is not None
    assert "error" in envelope(first)


def test_error_status_only_for_an_int_http_status() -> None:
    for code, status in ((429, 429), ("429", None), (True, None), (42, None), (4290, None),
                         (100, 100), (599, 599), (99, None), (600, None)):
        first = run(data({"error": {"code": code, "message": "x"}}))
        assert first.decision is ERROR and first.error_status == status, code


def test_a_utf8_bom_before_the_first_line_is_ignored() -> None:
    assert run(b"\xef\xbb\xbf" + ERROR_CHUNK).decision is ERROR
    assert run(b"\xef\xbb\xbf" + PROCESSING).decision is HOLD


def test_a_bom_is_stripped_only_at_the_very_start() -> None:
    # A BOM after a leading blank line starts an unknown field, so the error is not seen.
    assert run(b"\n\xef\xbb\xbf" + ERROR_CHUNK).decision is HOLD


def test_an_event_name_that_is_not_utf8_does_not_raise() -> None:
    # Event names are decoded leniently: bad bytes neither raise nor make an error.
    assert run(b"event: \xff\xfe\ndata: {}\n\n").decision is COMMIT
    assert run(b'event: \xff\ndata: {"error":null}\n\n').decision is COMMIT


def test_an_error_events_text_that_is_not_utf8_is_replaced() -> None:
    # Non-JSON error text with bad bytes becomes U+FFFD in an ASCII envelope.
    first = run(b"event: error\ndata: bad \xff\n\n")
    assert first.decision is ERROR
    assert first.error_envelope == b'{"error":{"message":"bad \\ufffd"}}'


def test_non_object_json_is_content_unless_the_event_is_an_error() -> None:
    # Lists and strings that merely look like errors commit; under `event: error` they fail.
    for stream in (b'data: ["error"]\n\n', b'data: "\\u0041"\n\n'):
        assert run(stream).decision is COMMIT, stream
    first = run(b"event: error\ndata: [1]\n\n")
    assert envelope(first) == {"error": {"message": "error event"}}


@pytest.mark.parametrize("doc", [{"error": None}, {"text": "\u00e9"}, {"status": "failed"},
                                 {"type": "ping", "index": 0}])
def test_only_a_bare_ping_is_a_keep_alive(doc: dict[str, Any]) -> None:
    # One-key objects and pings with more keys are real events.
    assert run(data(doc, event="ping" if "index" in doc else None)).decision is COMMIT


def test_responses_failed_named_only_by_the_event() -> None:
    # `event: response.failed` without a type reads response.error, not the whole object.
    doc = {"response": {"error": {"code": 429, "message": "slow"}}}
    first = run(data(doc, event="response.failed"))
    assert first.decision is ERROR and first.error_status == 429
    assert envelope(first) == {"error": {"code": 429, "message": "slow"}}
    typed = run(data({"type": "response.output", "message": "m"}, event="response.failed"))
    assert envelope(typed) == {"error": {"message": "m"}}


@pytest.mark.parametrize("response", [None, "gone", [1]])
def test_responses_failed_without_a_response_object(response: Any) -> None:
    # A missing or non-object `response` still gives a generic error, not a crash.
    first = run(data({"type": "response.failed", "response": response}))
    assert envelope(first) == {"error": {"message": "response failed"}}
    assert envelope(run(data({"type": "response.failed"}))) == envelope(first)


@pytest.mark.parametrize("error", ["Rate limited", [1, 2], 7])
def test_an_error_that_is_not_an_object_is_kept_as_is(error: Any) -> None:
    # A chat `error` that is a string, list or number passes through with no status.
    first = run(data({"error": error}))
    assert first.decision is ERROR and first.error_status is None
    assert envelope(first) == {"error": error}


def test_non_ascii_error_text_is_escaped_to_ascii() -> None:
    # The envelope is ASCII JSON even when the upstream message is not.
    first = run(data({"error": {"code": 503, "message": "Überlastet – 过载"}}))
    assert first.decision is ERROR and first.error_status == 503
    assert first.error_envelope is not None and first.error_envelope.isascii()
    assert envelope(first) == {"error": {"code": 503, "message": "Überlastet – 过载"}}


def test_an_error_too_deep_to_re_encode_gets_a_generic_envelope() -> None:
    # Some nesting decodes but cannot be re-encoded one level deeper (on CPython 3.11 about
    # 990 levels): a fixed envelope then.
    seen: set[bytes] = set()
    for depth in range(1, sys.getrecursionlimit() + 10):
        first = run(b"event: error\ndata: " + b'{"a":' * depth + b"1" + b"}" * depth + b"\n\n",
                    max_hold_bytes=1 << 20)
        assert first.decision is ERROR and first.error_envelope is not None
        seen.add(first.error_envelope)
    assert b'{"error":{"message":"upstream error"}}' in seen


# --- the hold limit and stickiness ----------------------------------------------------------


def test_more_than_max_hold_bytes_without_a_decision_commits() -> None:
    first = FirstEvent(max_hold_bytes=100)
    assert first.feed(b":" + b"x" * 98 + b"\n") is HOLD  # exactly 100 bytes: still holding
    assert first.feed(b"\n") is COMMIT
    assert first.error_envelope is None


def test_an_error_event_ending_past_the_limit_is_not_waited_for() -> None:
    pad = b": " + b"p" * 200 + b"\n"
    limit = len(pad) + len(ERROR_CHUNK)
    assert run(pad + ERROR_CHUNK, max_hold_bytes=limit).decision is ERROR
    assert run(pad + ERROR_CHUNK, max_hold_bytes=limit - 1).decision is COMMIT
    assert run(b"data: " + b"x" * 70_000 + b"\n\n").decision is COMMIT  # default 64 KiB


def test_bytes_past_the_limit_in_a_later_feed_are_not_read() -> None:
    # The window shrinks by what was fed: an error completed past the limit commits.
    first = FirstEvent(max_hold_bytes=len(ERROR_CHUNK) - 1)
    assert first.feed(ERROR_CHUNK[:-1]) is HOLD
    assert first.feed(ERROR_CHUNK[-1:]) is COMMIT and first.error_envelope is None


def test_a_decision_sticks() -> None:
    first = FirstEvent()
    assert first.feed(ERROR_CHUNK) is ERROR
    saved = first.error_envelope
    assert first.feed(ROLE_DELTA) is ERROR and first.feed(b"\x00" * 100_000) is ERROR
    assert first.error_envelope == saved
    other = FirstEvent()
    assert other.feed(ROLE_DELTA) is COMMIT and other.feed(ERROR_CHUNK) is COMMIT
    assert other.error_envelope is None and "commit" in repr(other)


def test_bad_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        FirstEvent(max_hold_bytes=0)
    with pytest.raises(ValueError, match=r"^max_hold_bytes must be at least 1$"):  # its message
        FirstEvent(max_hold_bytes=-1)


# --- any split gives the same answer -----------------------------------------------------------


PIECES = st.sampled_from([
    PROCESSING, b": keep-alive\r\n\r\n", b"\n", b"\r\n", b"\r", ROLE_DELTA, CONTENT, ERROR_CHUNK,
    ERROR_CHUNK.replace(b"\n", b"\r\n"), ERROR_CHUNK.replace(b"\n", b"\r"), b"data: [DONE]\n\n",
    b"event: error\n", b"event: ping\n", b'data: {"type":"ping"}\n', b"data: x\n", b"data:",
    b" {\"error\": {\"code\": 503}}\n", b"id: 1\n", b"\xef\xbb\xbf",
    b'data: {"error":\r\n', b'data: {"error":\r', b'data: {"code": 504}}\r\n',
    b'data: {"code": 504}}\r',
    data({"type": "response.failed", "response": {"error": {"code": 402}}}),
    data({"type": "error", "error": {"type": "overloaded_error"}}, event="error"),
])


def feed_in_pieces(stream: bytes, cuts: list[int], limit: int) -> FirstEvent:
    first = FirstEvent(max_hold_bytes=limit)
    last = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        first.feed(stream[last:cut])
        last = cut
    return first


def outcome(first: FirstEvent) -> tuple[Decision, bytes | None, int | None]:
    return first.decision, first.error_envelope, first.error_status


@settings(max_examples=400, database=None, deadline=None)
@given(parts=st.lists(PIECES, max_size=8), data_=st.data(),
       limit=st.sampled_from([64 * 1024, 300, 150, 40, 1]))
def test_any_split_gives_the_same_decision(parts: list[bytes], data_: st.DataObject,
                                           limit: int) -> None:
    stream = b"".join(parts)
    cuts = data_.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    whole = outcome(run(stream, max_hold_bytes=limit))
    assert outcome(feed_in_pieces(stream, cuts, limit)) == whole
    assert outcome(feed_in_pieces(stream, list(range(len(stream))), limit)) == whole


@settings(max_examples=300, database=None, deadline=None)
@given(stream=st.binary(max_size=300), data_=st.data())
def test_hostile_bytes_never_raise_and_split_alike(stream: bytes, data_: st.DataObject) -> None:
    cuts = data_.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    whole = run(stream, max_hold_bytes=200)
    assert outcome(feed_in_pieces(stream, cuts, 200)) == outcome(whole)
    if whole.decision is ERROR:
        assert whole.error_envelope is not None and json.loads(whole.error_envelope)["error"]
