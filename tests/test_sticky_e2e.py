"""Conversations kept on one key, end to end (``openrouter.sticky_sessions``, round-robin).

A conversation is named by the body's ``session_id``, the ``x-session-id`` header, the
body's ``prompt_cache_key``, or else by its model, system prompt and first user message
(the same over growing turns). Each test interleaves one conversation with others and
checks, from the Authorization the fake received, which key each request went out on.
The sticky map and the key pool run on the test clocks of ``take_time``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from orproxy.app import App
from tests.conftest import AUTH, ProxyFactory
from tests.fakeor import (
    FakeOpenRouter,
    Recorded,
    Responder,
    Script,
    completion,
    rate_limited_body,
)
from tests.rawhttp import roundtrip
from tests.test_accounting import scrape
from tests.test_limits_e2e import Clocks, content_of, take_time
from tests.test_rotation import chat_request, key_index, states, used_keys

pytestmark = pytest.mark.anyio

MODEL = "anthropic/claude-sonnet-4.5"
SYSTEM = "You are a careful assistant. Answer briefly."
OPENING = "Which river runs through Ulaanbaatar?"
HOWS = ["session_id", "x-session-id", "prompt_cache_key", "content"]
Headers = list[tuple[bytes, bytes]]


def turn(conversation: str, n: int, how: str) -> tuple[bytes, Headers]:
    """Turn ``n`` (1, 2, …) of ``conversation``: the body grows by one exchange per turn.
    Named conversations all open with the same words, so only their name tells them apart;
    content-named ones differ in their first user message."""
    opening = f"{OPENING} ({conversation})" if how == "content" else OPENING
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": opening}]
    for k in range(1, n):
        messages += [{"role": "assistant", "content": f"answer {k}"},
                     {"role": "user", "content": f"follow-up {k} ✓"}]
    doc: dict[str, Any] = {"model": MODEL, "messages": messages, "temperature": 0.2}
    headers: Headers = []
    if how == "session_id":
        doc["session_id"] = f"sess-{conversation}"
    elif how == "prompt_cache_key":
        doc["prompt_cache_key"] = f"pck-{conversation}"
    elif how == "x-session-id":
        headers.append((b"X-Session-Id", f"sess-{conversation}".encode()))
    return json.dumps(doc, ensure_ascii=False).encode(), headers


async def say(app: App, conversation: str, n: int, how: str = "session_id") -> bytes:
    """Send turn n; returns the body sent, to compare with what the fake received."""
    body, headers = turn(conversation, n, how)
    extra = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    resp = await roundtrip(app.port, chat_request(body, extra), b"POST")
    assert content_of(resp).startswith("from key ")
    return body


def serve(limited: set[int] | None = None, clocks: Clocks | None = None) -> Script:
    """A completion naming the key; a key in ``limited`` answers one 429 (resting 60 s)
    and leaves the set."""
    limited = limited if limited is not None else set()

    async def run(req: Recorded, resp: Responder) -> None:
        i = key_index(req)
        if i in limited:
            limited.discard(i)
            assert clocks is not None
            await resp.json(429, rate_limited_body(clocks.reset_ms(60), "Rate limit exceeded: "
                                                   "limit_rpm/anthropic/claude-sonnet-4.5/1"))
        else:
            await resp.json(200, completion(f"from key {i}"))

    return run


async def sticky_proxy(make_proxy: ProxyFactory, **openrouter: Any) -> tuple[App, Clocks]:
    app = await make_proxy(openrouter={"sticky_sessions": True, **openrouter})
    return app, take_time(app)


async def counts(app: App) -> tuple[float, float, float, float]:
    """(hits, misses, moved, conversations) as /metrics/raw shows them."""
    scraped = await scrape(app.port)
    return (scraped.value("orproxy_sticky_lookups_total", result="hit"),
            scraped.value("orproxy_sticky_lookups_total", result="miss"),
            scraped.value("orproxy_sticky_moved_total"),
            scraped.value("orproxy_sticky_conversations"))


# --- a conversation stays; the others rotate -------------------------------------------------


@pytest.mark.parametrize("how", HOWS)
async def test_a_conversation_stays_on_its_first_key_while_others_rotate(
    make_proxy: ProxyFactory, fake: FakeOpenRouter, how: str,
) -> None:
    app, _ = await sticky_proxy(make_proxy)
    fake.script = serve()
    sent = []
    for conversation, n in [("A", 1), ("B", 1), ("A", 2), ("C", 1), ("A", 3), ("D", 1),
                            ("B", 2), ("A", 4)]:
        sent.append(await say(app, conversation, n, how))
    assert used_keys(fake) == [0, 1, 0, 2, 0, 0, 1, 0]
    # each body reaches the upstream byte for byte, the session header with it
    assert [r.body for r in fake.requests] == sent
    for r, conversation in zip(fake.requests, "ABACADBA", strict=True):
        assert r.header(b"x-session-id") == (
            f"sess-{conversation}".encode() if how == "x-session-id" else None)
    assert await counts(app) == (4.0, 4.0, 0.0, 4.0)  # A2 A3 B2 A4 hit; A B C D missed


async def test_requests_naming_no_conversation_are_not_looked_up(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app, _ = await sticky_proxy(make_proxy)
    fake.script = serve()
    for body in (b'{"model":"m"}', b"[1, 2]", b"not json at all"):
        resp = await roundtrip(app.port, chat_request(body), b"POST")
        assert resp.status == 200
    assert used_keys(fake) == [0, 1, 2]
    assert await counts(app) == (0.0, 0.0, 0.0, 0.0)


# --- its key rests: it moves, and stays where it moved --------------------------------------


async def rest_under_it(app: App, clocks: Clocks, fake: FakeOpenRouter) -> None:
    """A1, B1; A2 meets its key's limit and goes on the next key; A3, then A4 after the
    old key is back; C1."""
    limited: set[int] = set()
    fake.script = serve(limited, clocks)
    await say(app, "A", 1)
    await say(app, "B", 1)
    limited.add(0)  # A's next turn meets its key's limit
    await say(app, "A", 2)
    assert used_keys(fake) == [0, 1, 0, 2]
    assert states(app)[0].value == "cooling"
    await say(app, "A", 3)
    clocks.advance(60)  # its old key is back: the conversation stays where it went
    await say(app, "A", 4)
    await say(app, "C", 1)


async def test_when_its_key_rests_under_it_the_conversation_moves_and_stays(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app, clocks = await sticky_proxy(make_proxy)
    await rest_under_it(app, clocks, fake)
    assert used_keys(fake, 4) == [2, 2, 0]
    hits, misses, _, conversations = await counts(app)
    assert (hits, misses, conversations) == (3.0, 3.0, 3.0)


async def test_a_move_under_a_request_is_counted(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app, clocks = await sticky_proxy(make_proxy)
    await rest_under_it(app, clocks, fake)
    # A's key could not serve it and another took over: orproxy_sticky_moved_total's own
    # words ("conversations whose key could not serve them, moved to another key")
    assert (await counts(app))[2] == 1.0


async def test_when_its_key_rests_for_another_request_the_conversation_moves_and_stays(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app, clocks = await sticky_proxy(make_proxy)
    limited: set[int] = set()
    fake.script = serve(limited, clocks)
    for conversation in "ABC":
        await say(app, conversation, 1)
    limited.add(0)
    await say(app, "D", 1)  # key 0 rests while answering D
    assert used_keys(fake) == [0, 1, 2, 0, 1]
    await say(app, "A", 2)  # A's key rests: the next in turn takes it over
    await say(app, "A", 3)
    clocks.advance(60)
    await say(app, "A", 4)
    assert used_keys(fake, 5) == [2, 2, 2]
    assert await counts(app) == (3.0, 4.0, 1.0, 4.0)


# --- forgetting -----------------------------------------------------------------------------


async def test_an_idle_conversation_is_forgotten_after_the_ttl(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app, clocks = await sticky_proxy(make_proxy, sticky_ttl_seconds=60)
    fake.script = serve()
    await say(app, "A", 1)
    clocks.advance(59)
    await say(app, "A", 2)
    clocks.advance(59)  # each turn slides the idle time: 118 s after the start, 59 idle
    await say(app, "A", 3)
    assert used_keys(fake) == [0, 0, 0]
    clocks.advance(60)  # idle as long as the TTL: forgotten, round-robin decides again
    await say(app, "A", 4)
    await say(app, "A", 5)
    assert used_keys(fake, 3) == [1, 1]
    assert await counts(app) == (3.0, 2.0, 0.0, 1.0)


# --- the body is the client's ------------------------------------------------------------------


async def test_bodies_reach_the_upstream_byte_for_byte_whatever_their_shape(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app, _ = await sticky_proxy(make_proxy)
    fake.script = serve()
    image = "data:image/png;base64," + "iVBORw0KGgo" * 20_000
    trailer = "z" * (1 << 20)  # the whole body over 1 MiB: scanned, not parsed
    bodies = []
    for n in (1, 2):
        later = ', {"role":"assistant","content":"It is a river."}, {"role":"user",' \
                '"content":"Spell it\\u0021"}' if n == 2 else ""
        text = ('{\r\n  "model" : "openai/gpt-4o",\n\t"messages": [ {"role":"system",'
                '"content":"Réponds en français \\ud83d\\ude00"}, {"role": "user", "content": '
                '[{"type":"text","text":"Quelle rivière ?"},{"type":"image_url","image_url":'
                '{"url":"' + image + '"}}]}' + later + '],\n  "provider": {"order": ["x"]},'
                ' "plugins": [], "x_unknown": {"a": [1, 2.50, null], "pad": "' + trailer
                + '"}  }\n')
        bodies.append(text.encode())
    body_a = bodies[0]
    chunks = [body_a[:7], body_a[7:70000], body_a[70000:]]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    raw = (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: "
           + AUTH[1] + b"\r\nContent-Type: application/json; charset=utf-8\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    assert (await roundtrip(app.port, raw, b"POST")).status == 200
    await say(app, "B", 1)
    resp = await roundtrip(app.port, chat_request(bodies[1]), b"POST")
    assert resp.status == 200
    assert used_keys(fake) == [0, 1, 0]  # the later turn found its conversation
    assert fake.requests[0].body == bodies[0]
    assert fake.requests[2].body == bodies[1]
    assert fake.requests[0].header(b"content-length") == str(len(bodies[0])).encode()


# --- with sticky off, `same` means what it always meant ---------------------------------------


async def test_same_keeps_its_meaning_with_sticky_off(
    make_proxy: ProxyFactory, fake: FakeOpenRouter,
) -> None:
    app = await make_proxy(openrouter={"key_selection_opts": ["same"]})
    clocks = take_time(app)
    assert app.services.attempts.sticky is None
    limited: set[int] = set()
    fake.script = serve(limited, clocks)
    for conversation in "ABC":
        await say(app, conversation, 1)
    assert used_keys(fake) == [0, 0, 0]  # every request on the last key used
    limited.add(0)
    for conversation in "ABC":
        await say(app, conversation, 2)
    assert used_keys(fake, 3) == [0, 1, 1, 1]
    assert await counts(app) == (0.0, 0.0, 0.0, 0.0)
