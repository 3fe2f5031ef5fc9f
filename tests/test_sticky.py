"""Conversation ids from real-shaped requests (chat, Responses, Anthropic) and the sticky map."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orproxy.proxy.sticky import FULL_PARSE_BYTES, StickyMap, conversation_id

SYSTEM = {"role": "system", "content": "You are a careful assistant."}
USER = {"role": "user", "content": "What is the capital of Mongolia?"}
ASSISTANT = {"role": "assistant", "content": "Ulaanbaatar."}
FOLLOW_UP = {"role": "user", "content": "And its population?"}


def chat(*messages: dict[str, Any], model: str = "openai/gpt-4o-mini", **extra: Any) -> bytes:
    return json.dumps({"model": model, "messages": list(messages), **extra}).encode()


def cid(body: bytes, headers: list[tuple[bytes, bytes]] | None = None, *,
        scan: bool = False) -> str | None:
    """The id, either parsed whole or scanned (as bodies over FULL_PARSE_BYTES are)."""
    return conversation_id(headers or [], body, full_parse_bytes=0 if scan else FULL_PARSE_BYTES)


both = pytest.mark.parametrize("scan", [False, True], ids=["parsed", "scanned"])


# --- explicit names -------------------------------------------------------------------------


@both
def test_session_id_then_header_then_prompt_cache_key(scan: bool) -> None:
    full = chat(SYSTEM, USER, session_id="sess-1", prompt_cache_key="pck-1")
    header = [(b"X-Session-Id", b"sess-2")]
    assert cid(full, header, scan=scan) == cid(chat(USER, session_id="sess-1"), scan=scan)
    assert cid(chat(USER, prompt_cache_key="pck-1"), header, scan=scan) == cid(
        chat(SYSTEM, session_id="sess-2"), scan=scan)  # the header, by the same name
    assert cid(chat(USER, prompt_cache_key="pck-1"), scan=scan) == cid(
        chat(SYSTEM, prompt_cache_key="pck-1"), scan=scan)
    ids = {cid(full, scan=scan), cid(chat(USER, prompt_cache_key="pck-1"), scan=scan),
           cid(chat(USER, prompt_cache_key="sess-1"), scan=scan), cid(chat(USER), scan=scan)}
    assert len(ids) == 4  # session, cache and content names never collide


@both
def test_ids_are_short_and_bounded_whatever_the_client_sends(scan: bool) -> None:
    for body in (chat(USER, session_id="s" * 100_000), chat(USER, prompt_cache_key="k" * 5000),
                 chat(SYSTEM, {"role": "user", "content": "x" * 200_000})):
        name = cid(body, scan=scan)
        assert name is not None and len(name) <= 40, name
    name = cid(chat(USER), [(b"x-session-id", b"\xff" * 10_000)], scan=scan)
    assert name is not None and name.startswith("session:") and len(name) <= 40


@both
def test_empty_or_odd_names_fall_through(scan: bool) -> None:
    plain = cid(chat(SYSTEM, USER), scan=scan)
    assert plain is not None and plain.startswith("content:")
    assert cid(chat(SYSTEM, USER, session_id="", prompt_cache_key=""), [(b"x-session-id", b"  ")],
               scan=scan) == plain
    assert cid(chat(SYSTEM, USER, session_id=12, prompt_cache_key=None), scan=scan) == plain


# --- content names: stable across the turns of one conversation -----------------------------


@both
def test_a_conversation_keeps_its_name_as_it_grows(scan: bool) -> None:
    first = cid(chat(SYSTEM, USER), scan=scan)
    assert first == cid(chat(SYSTEM, USER, ASSISTANT, FOLLOW_UP), scan=scan)
    # a developer note later in the conversation does not rename it
    later = {"role": "developer", "content": "Answer in French from now on."}
    assert first == cid(chat(SYSTEM, USER, ASSISTANT, later, FOLLOW_UP), scan=scan)
    # nor do cache_control marks, which clients move to the latest messages
    marked = {"role": "user", "content": [{"type": "text", "text": USER["content"],
                                           "cache_control": {"type": "ephemeral"}}]}
    unmarked = {"role": "user", "content": [{"type": "text", "text": USER["content"]}]}
    assert cid(chat(SYSTEM, marked), scan=scan) == cid(
        chat(SYSTEM, unmarked, ASSISTANT, FOLLOW_UP), scan=scan)


@both
def test_model_system_and_first_user_message_each_name_the_conversation(scan: bool) -> None:
    base = cid(chat(SYSTEM, USER), scan=scan)
    others = [
        chat(SYSTEM, USER, model="anthropic/claude-sonnet-4"),
        chat({"role": "system", "content": "You are terse."}, USER),
        chat(SYSTEM, FOLLOW_UP),
        chat(USER),
        chat(SYSTEM),
        chat(SYSTEM, {"role": "user", "content": [{"type": "text", "text": USER["content"]}]}),
    ]
    names = [cid(body, scan=scan) for body in others]
    assert base not in names and len(set(names)) == len(names)
    assert cid(chat({"role": "developer", "content": "You are terse."}, USER), scan=scan) == cid(
        chat({"role": "system", "content": "You are terse."}, USER), scan=scan)
    # the first system message counts
    terse = {"role": "system", "content": "You are terse."}
    assert cid(chat(SYSTEM, terse, USER), scan=scan) == base
    assert cid(chat(terse, SYSTEM, USER), scan=scan) != base


@both
def test_responses_api_requests(scan: bool) -> None:
    def responses(**fields: Any) -> bytes:
        return json.dumps({"model": "openai/gpt-4o", "stream": True, **fields}).encode()

    text = responses(instructions="Be brief.", input="Hello")
    listed = responses(instructions="Be brief.",
                       input=[{"type": "message", "role": "user", "content": "Hello"}])
    assert cid(text, scan=scan) is not None and cid(listed, scan=scan) is not None
    assert cid(text, scan=scan) != cid(responses(instructions="Be long.", input="Hello"), scan=scan)
    assert cid(text, scan=scan) != cid(responses(instructions="Be brief.", input="Bye"), scan=scan)
    assert cid(responses(input="Hello"), scan=scan) not in (None, cid(text, scan=scan))
    # a later turn of the listed form keeps the name
    turn2 = responses(instructions="Be brief.", input=[
        {"type": "message", "role": "user", "content": "Hello"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text",
                                                               "text": "Hi!"}]},
        {"type": "message", "role": "user", "content": "Bye"}])
    assert cid(turn2, scan=scan) == cid(listed, scan=scan)
    # the system prompt may also ride in the input list, before the first user item
    dev = responses(input=[{"role": "developer", "content": "Be brief."},
                           {"role": "user", "content": "Hello"}])
    assert cid(dev, scan=scan) == cid(responses(instructions="Be brief.", input=[
        {"role": "user", "content": "Hello"}]), scan=scan)


@both
def test_anthropic_messages_requests(scan: bool) -> None:
    def messages(system: Any, *msgs: dict[str, Any]) -> bytes:
        return json.dumps({"model": "anthropic/claude-sonnet-4", "max_tokens": 1024,
                           "system": system, "messages": list(msgs)}).encode()

    blocks = [{"type": "text", "text": "You are a pirate.",
               "cache_control": {"type": "ephemeral"}}]
    first = cid(messages(blocks, USER), scan=scan)
    assert first is not None
    assert first == cid(messages([{"type": "text", "text": "You are a pirate."}], USER, ASSISTANT,
                                 FOLLOW_UP), scan=scan)
    assert first != cid(messages("You are a pirate.", USER), scan=scan)  # string ≠ blocks
    assert first != cid(messages(blocks, FOLLOW_UP), scan=scan)


@both
@pytest.mark.parametrize("body", [
    b"", b"not json", b"[1, 2]", b'"text"', b"null", b"{}",
    b'{"model": "openai/text-embedding-3-small", "input": ["a", "b"]}',
    b'{"model": "x", "messages": []}', b'{"model": "x", "messages": "hi"}',
    b'{"model": "x", "messages": [1, "a", null, {"role": "tool", "content": "r"}]}',
    b'{"model": "x", "prompt": "legacy completion"}',
    b'[{"model": "x", "messages": [{"role": "user", "content": "a batch?"}]}]',
])
def test_bodies_that_name_no_conversation(body: bytes, scan: bool) -> None:
    assert cid(body, scan=scan) is None


@pytest.mark.parametrize("body", [
    b'{"model": "x", "messages": [{"role": "user", "content": "hi"}',  # truncated
    b'{"model": "x" "messages": []}', b'{"model": "x",}', b'{"a": [}', b'{"a": "\\',
    b"[" * 50_000, b'{"messages": [' + b"[" * 50_000, b'{"messages": [{"role": "user", '
    b'"content": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}", b"\xff\xfe{}", b"{" + b" " * 10,
])
def test_malformed_bodies_never_raise(body: bytes) -> None:
    for full_parse_bytes in (0, FULL_PARSE_BYTES):
        result = conversation_id([], body, full_parse_bytes=full_parse_bytes)
        assert result is None or result.startswith("content:")


def test_utf8_bom_and_non_ascii_scan_like_a_full_parse() -> None:
    body = "\ufeff" + json.dumps({"model": "m", "messages": [
        {"role": "system", "content": "Sé breve 🙂"}, {"role": "user", "content": "¿Qué tal?"}]},
        ensure_ascii=False)
    raw = body.encode("utf-8")
    assert cid(raw) is not None and cid(raw) == cid(raw, scan=True)


def test_a_5mb_body_beyond_the_bound_is_named_like_its_small_twin() -> None:
    image = base64.b64encode(bytes(range(256)) * 12_000).decode()  # ~4 MB of base64
    big = chat(SYSTEM, {"role": "user", "content": [
        {"type": "text", "text": "Describe this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]},
        ASSISTANT, {"role": "user", "content": "z" * 1_000_000},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"messages": {"type": "array"},
                                             "model": {"type": "string"}}}}}])
    assert len(big) > 5_000_000
    scanned = conversation_id([], big)  # over FULL_PARSE_BYTES: scanned
    assert scanned is not None
    assert scanned == conversation_id([], big, full_parse_bytes=len(big))
    # the model placed after the messages, as the OpenAI SDK writes it, still counts
    reordered = json.dumps({"messages": json.loads(big)["messages"],
                            "model": "other/model"}).encode()
    assert conversation_id([], reordered) not in (None, scanned)
    assert conversation_id([], reordered) == conversation_id([], reordered,
                                                             full_parse_bytes=len(reordered))


def test_a_scanned_body_is_decoded_only_up_to_its_first_user_message() -> None:
    """Beyond the bound, later messages are scanned, not decoded: even one nested too deep
    for any JSON decoder costs a scan and names nothing wrong."""
    later = {"role": "user", "content": "PLACEHOLDER"}
    body = chat(SYSTEM, USER, ASSISTANT, later).replace(b'"PLACEHOLDER"',
                                                        b"[" * 600_000 + b"]" * 600_000)
    assert len(body) > FULL_PARSE_BYTES
    assert conversation_id([], body) == cid(chat(SYSTEM, USER))
    assert conversation_id([], body, full_parse_bytes=len(body)) is None  # json.loads gives up


def test_scanning_skips_same_named_keys_whose_values_are_not_the_fields_type() -> None:
    """Tool schemas name properties `model`, `system`, `messages`, `input`: objects, never
    the strings and lists the request fields are. Placed before the real fields, the scan
    still finds the real ones."""
    schema = {"type": "object", "properties": {
        "model": {"type": "string"}, "system": {"type": "string"}, "input": {"type": "object"},
        "messages": {"type": "array"}, "session_id": {"type": "string"}}}
    body = json.dumps({"tools": [{"type": "function", "function": {"name": "f",
                                                                   "parameters": schema}}],
                       "messages": [SYSTEM, USER], "model": "m", "pad": "x" * 100}).encode()
    assert cid(body, scan=True) == cid(body) is not None


def test_keys_inside_a_value_found_are_not_the_requests() -> None:
    part = {"type": "input_json", "json": {"model": "nested", "system": "nested",
                                           "session_id": "nested"}}
    body = json.dumps({"messages": [SYSTEM, {"role": "user", "content": [part]}],
                       "model": "top"}).encode()
    assert cid(body, scan=True) == cid(body) is not None
    assert cid(body) != cid(body.replace(b'"top"', b'"nested"'))


def test_a_hostile_body_cannot_make_the_scan_long() -> None:
    """Candidates without a usable value are bounded: past MAX_REJECTED the scan stops."""
    junk = b'"model": 1, ' * 200_000
    body = b'{' + junk + b'"messages": [{"role": "user", "content": "hi"}]}'
    assert conversation_id([], body) is None  # given up before reaching the messages
    few = b'{' + b'"model": 1, ' * 10 + b'"messages": [{"role": "user", "content": "hi"}]}'
    assert cid(few, scan=True) is not None


@both
def test_long_strings_are_named_by_their_head_and_length(scan: bool) -> None:
    head = "A" * (64 * 1024)

    def with_image(data: str) -> bytes:
        return chat(SYSTEM, {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data}}]})

    same = cid(with_image(head + "B" * 1000), scan=scan)
    assert same == cid(with_image(head + "C" * 1000), scan=scan)
    assert same != cid(with_image(head + "B" * 1001), scan=scan)
    assert same != cid(with_image("Z" + head[1:] + "B" * 1000), scan=scan)


# scanned and parsed agree on any request-shaped body, whatever the formatting and the junk
# around it (junk that avoids the field names: the scan does not track nesting)
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(alphabet='ab{}[]",:\\ \n\u00e9\U0001f600', max_size=12),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["role", "content", "x", "type", "models", "user"]),
                      inner, max_size=3),
    max_leaves=10,
)
CONTENT = st.one_of(st.text(max_size=20), st.lists(st.fixed_dictionaries(
    {"type": st.just("text"), "text": st.text(max_size=10)},
    optional={"cache_control": st.just({"type": "ephemeral"})}), max_size=2))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user",
                                                          "assistant", "tool"]),
                                 "content": CONTENT})
REQUEST = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["openai/gpt-4o", "x/y:free"]),
    "messages": st.lists(MESSAGE, max_size=5),
    "input": st.one_of(st.text(max_size=10), st.lists(MESSAGE, max_size=3)),
    "system": CONTENT, "instructions": st.text(max_size=10),
    "session_id": st.text(max_size=5), "prompt_cache_key": st.text(max_size=5),
    "tools": JUNK, "zzz": JUNK, "provider": JUNK,
})


@settings(max_examples=400, database=None, deadline=None)
@given(request=REQUEST, indent=st.sampled_from([None, 0, 2]), ascii_only=st.booleans(),
       seed=st.randoms(use_true_random=False))
def test_scanning_agrees_with_a_full_parse(
    request: dict[str, Any], indent: int | None, ascii_only: bool, seed: Any
) -> None:
    keys = list(request)
    seed.shuffle(keys)
    body = json.dumps({k: request[k] for k in keys}, indent=indent,
                      ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assert cid(body, scan=True) == cid(body)


# --- the map ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_get_put_hits_and_misses() -> None:
    clock = Clock()
    sticky = StickyMap(clock=clock)
    assert sticky.get("c1") is None and sticky.misses == 1
    sticky.put("c1", "k-aaaa")
    assert sticky.get("c1") == "k-aaaa" and sticky.hits == 1
    sticky.put("c1", "k-bbbb")  # the conversation moved (its key went cold)
    assert sticky.get("c1") == "k-bbbb" and len(sticky) == 1
    assert (sticky.hits, sticky.misses, sticky.evictions) == (2, 1, 0)
    assert "1/10000" in repr(sticky)


def test_idle_ttl_slides_on_each_hit_and_expires_after_ten_idle_minutes() -> None:
    clock = Clock()
    sticky = StickyMap(clock=clock)
    assert sticky.ttl_seconds == 600.0
    sticky.put("c", "k1")
    for _ in range(5):  # used every 599 s: kept for much longer than one TTL
        clock.now += 599.0
        assert sticky.get("c") == "k1"
    clock.now += 600.0
    assert sticky.get("c") is None
    assert (sticky.evictions, sticky.misses, len(sticky)) == (1, 1, 0)


def test_capacity_evicts_the_least_recently_used() -> None:
    clock = Clock()
    sticky = StickyMap(capacity=3, clock=clock)
    for name in "abc":
        sticky.put(name, "k-" + name)
    assert sticky.get("a") == "k-a"  # a is now the most recent
    sticky.put("d", "k-d")
    assert sticky.get("b") is None and sticky.evictions == 1
    assert [sticky.get(name) for name in "acd"] == ["k-a", "k-c", "k-d"]
    assert len(sticky) == 3


def test_idle_entries_are_dropped_on_put_so_memory_follows_the_live_set() -> None:
    clock = Clock()
    sticky = StickyMap(ttl_seconds=10.0, capacity=1_000_000, clock=clock)
    for i in range(10_000):
        clock.now += 0.01  # 100 new conversations a second, each seen once
        sticky.put(f"c{i}", "k")
    assert len(sticky) <= 1001
    assert sticky.evictions == 10_000 - len(sticky)


def test_forget_key_drops_its_conversations_only() -> None:
    sticky = StickyMap(clock=Clock())
    sticky.put("a", "k1")
    sticky.put("b", "k2")
    sticky.put("c", "k1")
    sticky.forget_key("k1")
    assert len(sticky) == 1 and sticky.get("b") == "k2"
    assert sticky.get("a") is None and sticky.get("c") is None
    assert sticky.evictions == 0


@pytest.mark.parametrize("kwargs", [{"ttl_seconds": 0}, {"ttl_seconds": -1.0},
                                    {"ttl_seconds": float("nan")}, {"capacity": 0}])
def test_bad_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        StickyMap(**kwargs)


OPS = st.lists(st.tuples(st.sampled_from(["get", "put", "forget"]), st.sampled_from("abcdef"),
                         st.sampled_from(["k1", "k2", "k3"]), st.sampled_from([0.0, 1.0, 4.0])),
               max_size=60)


@settings(max_examples=300, database=None, deadline=None)
@given(ops=OPS)
def test_the_map_behaves_like_a_plain_lru_with_idle_ttl(
    ops: list[tuple[str, str, str, float]]
) -> None:
    """Against a naive model: entries (key, last used, recency order), TTL 5 s, capacity 3."""
    clock = Clock()
    sticky = StickyMap(ttl_seconds=5.0, capacity=3, clock=clock)
    model: dict[str, tuple[str, float]] = {}  # insertion order = recency
    for op, conv, key, dt in ops:
        clock.now += dt
        now = clock.now
        if op == "get":
            entry = model.pop(conv, None)
            expected = entry[0] if entry and now - entry[1] < 5.0 else None
            if expected is not None:
                model[conv] = (expected, now)
            assert sticky.get(conv) == expected
        elif op == "put":
            model.pop(conv, None)
            model[conv] = (key, now)
            for name in [c for c, (_, used) in model.items() if now - used >= 5.0]:
                del model[name]
            while len(model) > 3:
                del model[next(iter(model))]
            sticky.put(conv, key)
        else:
            model = {c: e for c, e in model.items() if e[0] != key}
            sticky.forget_key(key)
        assert len(sticky) <= 3
    live = {c for c, (_, used) in model.items() if clock.now - used < 5.0}
    assert {c for c in "abcdef" if sticky.get(c) is not None} == live
