"""Tier 1: the /models cache (single flight, stale-while-revalidate, ETag/304, gzip,
free_only, is_free/drop, bounds), on a scripted async upstream and a fake clock."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orproxy.proxy.models_cache import (
    Answer,
    Fetched,
    ModelsCache,
    accepts_gzip,
    is_free_pricing,
    none_match,
)

JSON = [(b"Content-Type", b"application/json")]
ZERO = {"prompt": "0", "completion": "0", "request": "0", "image": "0"}
PAID = {"prompt": "0.000001", "completion": "0.000002", "request": "0", "image": "0"}


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Upstream:
    """A scripted upstream: each call takes the next scripted item (or repeats the last);
    an item that is an exception is raised. With ``gate`` set, every call waits for it."""

    script: list[Fetched | Exception]
    calls: list[bytes] = field(default_factory=list)
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, query: bytes) -> Fetched:
        self.calls.append(query)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        return item

    def then(self, *items: Fetched | Exception) -> None:
        self.script[:] = list(items)

    def hold(self) -> asyncio.Event:
        """From now on every call waits for the returned event; ``entered`` starts anew."""
        self.gate = asyncio.Event()
        self.entered.clear()
        return self.gate


def model(mid: str, pricing: Any = ZERO, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": mid, "name": mid.title()}
    if pricing is not None:
        out["pricing"] = pricing
    out.update(extra)
    return out


def doc_body(models: list[dict[str, Any]], **top: Any) -> bytes:
    return json.dumps({"data": models, **top}, indent=1).encode()


def ok(body: bytes, headers: Sequence[tuple[bytes, bytes]] = JSON) -> Fetched:
    return Fetched(200, list(headers), body)


MIXED = [
    model("meta/llama:free"),                                        # free
    model("openrouter/free", {"prompt": "0.0", "completion": 0, "request": "0.000"}),
    model("vendor/paid"),                                            # replaced below: paid
    model("vendor/fake:free", PAID),                                 # suffix, but priced
    model("openrouter/auto", {"prompt": "-1", "completion": "-1"}),  # variable router
    model("vendor/no-pricing", None),
    model("vendor/empty-pricing", {}),
]
MIXED[2] = model("vendor/paid", PAID)
MIXED_BODY = doc_body(MIXED, meta={"v": 1})
FREE_IDS = ["meta/llama:free", "openrouter/free"]


def header(answer: Answer, name: bytes) -> bytes | None:
    found = [v for n, v in answer.headers if n.lower() == name]
    assert len(found) <= 1, f"{name!r} repeated"
    return found[0] if found else None


def names(answer: Answer) -> set[bytes]:
    return {n.lower() for n, _ in answer.headers}


def label(answer: Answer | Fetched) -> bytes | None:
    assert isinstance(answer, Answer)
    return header(answer, b"x-orproxy-cache")


def make(upstream: Upstream, clock: FakeClock | None = None, *, ttl: float = 300,
         free_only: bool = False, **kw: Any) -> ModelsCache:
    return ModelsCache(upstream, ttl_seconds=ttl, free_only=free_only,
                       clock=clock or FakeClock(), **kw)


async def get(cache: ModelsCache, query: bytes = b"", *headers: tuple[bytes, bytes],
              head: bool = False) -> Answer:
    answer = await cache.answer(query, list(headers), head_only=head)
    assert isinstance(answer, Answer)
    return answer


pytestmark = pytest.mark.anyio


# --- single flight ----------------------------------------------------------------------


async def test_100_concurrent_misses_make_one_fetch() -> None:
    upstream = Upstream([ok(MIXED_BODY)], gate=asyncio.Event())
    cache = make(upstream)
    tasks = [asyncio.create_task(cache.answer(b"", [])) for _ in range(100)]
    await upstream.entered.wait()
    await asyncio.sleep(0)  # let every task reach the flight
    upstream.gate.set()  # type: ignore[union-attr]
    answers = await asyncio.gather(*tasks)
    assert upstream.calls == [b""]
    assert all(isinstance(a, Answer) and a.body == MIXED_BODY for a in answers)
    assert {label(a) for a in answers} == {b"MISS"}
    assert label(await get(cache)) == b"HIT"
    assert upstream.calls == [b""]
    snap = cache.snapshot()
    assert (snap["misses"], snap["hits"], snap["fetches"], snap["entries"]) == (100, 1, 1, 1)


async def test_a_fetch_exception_reaches_every_waiter_and_caches_nothing() -> None:
    upstream = Upstream([RuntimeError("connect failed"), ok(MIXED_BODY)],
                        gate=asyncio.Event())
    cache = make(upstream)
    tasks = [asyncio.create_task(cache.answer(b"", [])) for _ in range(5)]
    await upstream.entered.wait()
    upstream.gate.set()  # type: ignore[union-attr]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert upstream.calls == [b""]
    assert label(await get(cache)) == b"MISS"  # nothing was kept: a new fetch
    assert len(upstream.calls) == 2


async def test_a_cancelled_waiter_does_not_cancel_the_flight() -> None:
    upstream = Upstream([ok(MIXED_BODY)], gate=asyncio.Event())
    cache = make(upstream)
    first = asyncio.create_task(cache.answer(b"", []))
    second = asyncio.create_task(cache.answer(b"", []))
    await upstream.entered.wait()
    first.cancel()
    upstream.gate.set()  # type: ignore[union-attr]
    answer = await second
    assert isinstance(answer, Answer) and answer.body == MIXED_BODY
    with pytest.raises(asyncio.CancelledError):
        await first
    assert upstream.calls == [b""]


async def test_different_queries_are_different_entries() -> None:
    tools = doc_body([model("a/tools")])
    upstream = Upstream([ok(MIXED_BODY), ok(tools)])
    cache = make(upstream)
    assert (await get(cache)).body == MIXED_BODY
    assert (await get(cache, b"?supported_parameters=tools")).body == tools
    assert upstream.calls == [b"", b"?supported_parameters=tools"]
    assert label(await get(cache, b"?supported_parameters=tools")) == b"HIT"
    assert (await get(cache)).body == MIXED_BODY
    assert cache.snapshot()["entries"] == 2


# --- freshness, stale-while-revalidate ----------------------------------------------------


async def test_expiry_serves_the_old_copy_while_one_refresh_runs() -> None:
    v1, v2 = doc_body([model("a/one")]), doc_body([model("a/two")])
    clock = FakeClock()
    upstream = Upstream([ok(v1), ok(v2)])
    cache = make(upstream, clock, ttl=300)
    await get(cache)
    clock.advance(299.9)
    assert label(await get(cache)) == b"HIT"
    clock.advance(0.2)
    gate = upstream.hold()  # the refresh hangs: serving must not wait for it
    stale = await get(cache)
    assert (stale.body, label(stale)) == (v1, b"STALE")
    assert header(stale, b"cache-control") == b"public, max-age=0"
    assert (await get(cache)).body == v1  # a second stale answer starts no second refresh
    await upstream.entered.wait()
    assert upstream.calls == [b"", b""]
    gate.set()
    await cache.join()
    fresh = await get(cache)
    assert (fresh.body, label(fresh), header(fresh, b"age")) == (v2, b"HIT", b"0")
    snap = cache.snapshot()
    assert (snap["refreshes"], snap["stale_served"], snap["refresh_failures"]) == (1, 2, 0)


async def test_refresh_failures_keep_the_stale_copy_until_the_bound() -> None:
    v1 = doc_body([model("a/one")])
    clock = FakeClock()
    upstream = Upstream([ok(v1)])
    cache = make(upstream, clock, ttl=10, stale_seconds=100, retry_seconds=5)
    await get(cache)
    upstream.then(RuntimeError("down"))
    clock.advance(11)
    stale = await get(cache)
    assert (stale.body, label(stale)) == (v1, b"STALE")
    await cache.join()
    assert cache.snapshot()["refresh_failures"] == 1
    assert label(await get(cache)) == b"STALE"
    await cache.join()
    assert len(upstream.calls) == 2  # no new refresh within retry_seconds of a failure
    upstream.then(Fetched(503, JSON, b'{"error":{"code":503}}'))
    clock.advance(5)
    assert label(await get(cache)) == b"STALE"
    await cache.join()
    assert len(upstream.calls) == 3
    assert cache.snapshot()["refresh_failures"] == 2  # a non-200 is a failure too
    clock.advance(110 - 16 - 0.01)
    assert label(await get(cache)) == b"STALE"  # just inside the bound
    await cache.join()
    clock.advance(0.02)  # 110 s after the fetch: beyond ttl + stale
    passed = await cache.answer(b"", [])
    assert isinstance(passed, Fetched) and passed.status == 503  # a miss, the upstream's answer
    upstream.then(RuntimeError("still down"))
    with pytest.raises(RuntimeError):
        await cache.answer(b"", [])


async def test_default_stale_bound_is_an_hour_at_least() -> None:
    clock = FakeClock()
    upstream = Upstream([ok(MIXED_BODY)])
    cache = make(upstream, clock, ttl=60)
    await get(cache)
    upstream.then(RuntimeError("down"))
    clock.advance(60 + 3600 - 1)
    assert label(await get(cache)) == b"STALE"
    await cache.join()
    clock.advance(2)
    with pytest.raises(RuntimeError):
        await get(cache)


async def test_ttl_zero_keeps_nothing_beyond_its_flight() -> None:
    upstream = Upstream([ok(MIXED_BODY)], gate=asyncio.Event())
    cache = make(upstream, ttl=0)
    tasks = [asyncio.create_task(cache.answer(b"", [])) for _ in range(3)]
    await upstream.entered.wait()
    upstream.gate.set()  # type: ignore[union-attr]
    await asyncio.gather(*tasks)
    assert len(upstream.calls) == 1
    answer = await get(cache)
    assert label(answer) == b"MISS"
    assert header(answer, b"cache-control") == b"public, max-age=0"
    assert len(upstream.calls) == 2


async def test_age_and_max_age_tell_the_truth() -> None:
    clock = FakeClock()
    upstream = Upstream([ok(MIXED_BODY, [*JSON, (b"Age", b"30")])])
    cache = make(upstream, clock, ttl=300)
    first = await get(cache)
    assert header(first, b"age") == b"30"
    # A cache holds a response fresh while max-age > Age: freshness left is their difference.
    assert header(first, b"cache-control") == b"public, max-age=330"
    clock.advance(100.7)
    later = await get(cache)
    assert header(later, b"age") == b"130"
    assert header(later, b"cache-control") == b"public, max-age=329"  # 199.3 s left, floored
    clock.advance(199.2)
    assert header(await get(cache), b"cache-control") == b"public, max-age=329"  # 0.1 s left
    clock.advance(0.2)
    stale = await get(cache)
    assert header(stale, b"cache-control") == b"public, max-age=0"
    assert header(stale, b"age") == b"330"
    await cache.close()


@pytest.mark.parametrize("age", [b"abc", b"-5", b"1.5", b""])
async def test_an_invalid_upstream_age_is_ignored(age: bytes) -> None:
    cache = make(Upstream([ok(MIXED_BODY, [*JSON, (b"Age", age)])]))
    assert header(await get(cache), b"age") == b"0"


# --- what is not cached -------------------------------------------------------------------


@pytest.mark.parametrize("status", [203, 404, 503])
async def test_non_200_is_passed_through_and_never_cached(status: int) -> None:
    # Even one whose body looks like a models list.
    answer = Fetched(status, [*JSON, (b"X-Up", b"1")], MIXED_BODY)
    upstream = Upstream([answer])
    cache = make(upstream)
    assert await cache.answer(b"?q=1", []) is answer
    assert await cache.answer(b"?q=1", []) is answer
    assert len(upstream.calls) == 2
    snap = cache.snapshot()
    assert (snap["entries"], snap["passed_through"]) == (0, 2)


@pytest.mark.parametrize("fetched", [
    ok(b"<html>maintenance</html>", [(b"Content-Type", b"text/html")]),
    ok(b'{"data": {"not": "a list"}}'),
    ok(b'["a list"]'),
    ok(gzip.compress(MIXED_BODY), [*JSON, (b"Content-Encoding", b"gzip")]),
    ok(MIXED_BODY, [*JSON, (b"Content-Encoding", b"br")]),  # whatever it looks like
], ids=["not-json", "data-not-a-list", "not-an-object", "gzip-encoded", "br-encoded"])
async def test_a_200_that_is_not_a_plain_models_list_is_passed_through(
        fetched: Fetched) -> None:
    upstream = Upstream([fetched])
    cache = make(upstream)
    assert await cache.answer(b"", []) is fetched
    assert await cache.answer(b"", []) is fetched
    assert len(upstream.calls) == 2
    assert cache.is_free("meta/llama:free") is None


async def test_an_identity_encoded_body_is_kept() -> None:
    cache = make(Upstream([ok(MIXED_BODY, [*JSON, (b"Content-Encoding", b"Identity")])]))
    assert label(await get(cache)) == b"MISS"
    assert label(await get(cache)) == b"HIT"


async def test_a_body_over_the_bound_is_passed_through() -> None:
    big = ok(MIXED_BODY)
    upstream = Upstream([big])
    cache = make(upstream, max_body_bytes=len(MIXED_BODY) - 1)
    assert await cache.answer(b"", []) is big
    assert cache.snapshot()["entries"] == 0
    fits = make(Upstream([big]), max_body_bytes=len(MIXED_BODY))
    assert label(await get(fits)) == b"MISS"
    assert fits.snapshot()["entries"] == 1


async def test_lru_keeps_at_most_max_entries() -> None:
    upstream = Upstream([ok(MIXED_BODY)])
    cache = make(upstream, max_entries=2)
    await get(cache, b"?a")
    await get(cache, b"?b")
    await get(cache, b"?a")  # a is now the most recent
    await get(cache, b"?c")  # evicts b
    assert cache.snapshot()["entries"] == 2
    assert label(await get(cache, b"?a")) == b"HIT"
    assert label(await get(cache, b"?c")) == b"HIT"
    assert label(await get(cache, b"?b")) == b"MISS"
    assert upstream.calls == [b"?a", b"?b", b"?c", b"?b"]


# --- representation -----------------------------------------------------------------------


async def test_unfiltered_bodies_are_served_byte_for_byte() -> None:
    body = (b'{ "data" : [ {"pricing": {"prompt": "0"}, "id": "z/\\u00e9t\xc3\xa9"} ],\n'
            b'  "zz": 1.50, "aa": null, "dup": 1, "dup": 2 }')
    cache = make(Upstream([ok(body, [(b"content-type", b"application/json; charset=utf-8")])]))
    answer = await get(cache)
    assert answer.body == body
    assert header(answer, b"content-type") == b"application/json; charset=utf-8"
    assert (await get(cache)).body is answer.body


async def test_headers_of_a_cached_answer() -> None:
    cache = make(Upstream([ok(MIXED_BODY, [(b"X-Up", b"1")])]))
    answer = await get(cache)
    assert names(answer) == {b"content-type", b"etag", b"age", b"cache-control", b"vary",
                             b"x-orproxy-cache"}
    assert header(answer, b"content-type") == b"application/json"  # the upstream sent none
    assert header(answer, b"vary") == b"Accept-Encoding"
    assert answer.content_length == len(MIXED_BODY)


async def test_head_has_the_headers_of_get_and_no_body() -> None:
    cache = make(Upstream([ok(MIXED_BODY)]))
    await get(cache)
    got = await get(cache)
    head = await get(cache, head=True)
    assert (head.status, head.body, head.content_length) == (200, b"", len(MIXED_BODY))
    assert head.headers == got.headers
    gz = await get(cache, b"", (b"Accept-Encoding", b"gzip"), head=True)
    assert (gz.body, header(gz, b"content-encoding")) == (b"", b"gzip")
    assert gz.content_length == len((await get(cache, b"", (b"Accept-Encoding", b"gzip"))).body)


# --- ETag and 304 -------------------------------------------------------------------------


async def etag_of(cache: ModelsCache, *headers: tuple[bytes, bytes]) -> bytes:
    etag = header(await get(cache, b"", *headers), b"etag")
    assert etag is not None
    return etag


async def test_strong_etag_and_304() -> None:
    cache = make(Upstream([ok(MIXED_BODY, [*JSON, (b"Age", b"7")])]))
    etag = await etag_of(cache)
    assert etag.startswith(b'"') and etag.endswith(b'"') and b'"' not in etag[1:-1]
    not_modified = await get(cache, b"", (b"If-None-Match", etag))
    assert (not_modified.status, not_modified.body) == (304, b"")
    assert not_modified.content_length is None
    assert names(not_modified) == {b"etag", b"cache-control", b"age", b"vary",
                                   b"x-orproxy-cache"}
    assert header(not_modified, b"etag") == etag
    assert header(not_modified, b"age") == b"7"
    assert cache.snapshot()["not_modified"] == 1


@pytest.mark.parametrize("template", [
    b"{}",
    b'"other", {}',
    b'W/"other",{} , "x"',
    b"W/{}",
    b'"a,b", W/{}',
    b"*",
], ids=["exact", "in-list", "list-no-spaces", "weak", "comma-in-tag", "star"])
async def test_if_none_match_uses_weak_comparison_over_lists(template: bytes) -> None:
    cache = make(Upstream([ok(MIXED_BODY)]))
    etag = await etag_of(cache)
    value = template.replace(b"{}", etag)
    assert (await get(cache, b"", (b"If-None-Match", value))).status == 304
    assert (await get(cache, b"", (b"If-None-Match", value), head=True)).status == 304


async def test_if_none_match_split_over_two_fields() -> None:
    cache = make(Upstream([ok(MIXED_BODY)]))
    etag = await etag_of(cache)
    answer = await get(cache, b"", (b"If-None-Match", b'"x"'), (b"if-none-match", etag))
    assert answer.status == 304


@pytest.mark.parametrize("template", [
    b'"other"',
    b"",
    b"{}x",                # garbage glued to the tag
    b'"a"{}',              # two tags with no comma between
    b'"unterminated, {}',
    b"w/{}",               # W/ is case-sensitive
    b'"a" junk {}',
], ids=["other", "empty", "glued", "glued-tags", "unterminated", "lowercase-weak", "junk"])
async def test_if_none_match_that_does_not_match_gets_the_body(template: bytes) -> None:
    cache = make(Upstream([ok(MIXED_BODY)]))
    etag = await etag_of(cache)
    answer = await get(cache, b"", (b"If-None-Match", template.replace(b"{}", etag)))
    assert (answer.status, answer.body) == (200, MIXED_BODY)


async def test_a_new_body_gets_a_new_etag() -> None:
    clock = FakeClock()
    upstream = Upstream([ok(MIXED_BODY), ok(doc_body(MIXED[:2]))])
    cache = make(upstream, clock, ttl=10)
    old = await etag_of(cache)
    clock.advance(11)
    await get(cache)
    await cache.join()
    assert await etag_of(cache) != old
    assert (await get(cache, b"", (b"If-None-Match", old))).status == 200


# --- gzip ---------------------------------------------------------------------------------


async def test_gzip_is_made_once_per_refresh_and_decompresses_to_the_body() -> None:
    clock = FakeClock()
    v2 = doc_body(MIXED[:3])
    upstream = Upstream([ok(MIXED_BODY), ok(v2)])
    cache = make(upstream, clock, ttl=10)
    plain = await get(cache)
    first = await get(cache, b"", (b"Accept-Encoding", b"gzip, deflate, br"))
    second = await get(cache, b"", (b"accept-encoding", b"br;q=1.0, gzip;q=0.5"))
    assert header(first, b"content-encoding") == b"gzip"
    assert gzip.decompress(first.body) == MIXED_BODY
    assert second.body is first.body  # compressed once, not per request
    assert first.content_length == len(first.body) < len(MIXED_BODY)
    assert header(first, b"vary") == header(plain, b"vary") == b"Accept-Encoding"
    assert header(first, b"etag") != header(plain, b"etag")  # another representation
    assert (await get(cache, b"", (b"If-None-Match", header(first, b"etag") or b""),
                      (b"Accept-Encoding", b"gzip"))).status == 304
    assert (await get(cache, b"", (b"If-None-Match", header(first, b"etag") or b""))
            ).status == 200
    clock.advance(11)
    await get(cache)
    await cache.join()
    renewed = await get(cache, b"", (b"Accept-Encoding", b"gzip"))
    assert renewed.body is not first.body
    assert gzip.decompress(renewed.body) == v2


@pytest.mark.parametrize(("value", "wanted"), [
    (b"gzip", True),
    (b"GZIP", True),
    (b"x-gzip", True),
    (b"deflate, gzip;q=0.001", True),
    (b"gzip ; Q=0.5", True),
    (b"*", True),
    (b"*;q=0.1", True),
    (b"gzip;q=0.", False),
    (b"gzip;q=1.000", True),
    (b"gzip;q=0", False),
    (b"gzip;q=0.000", False),
    (b"gzip;q=0, *", False),  # gzip named: its own q decides
    (b"*;q=0", False),
    (b"gzip, gzip;q=0", False),  # listed twice: any refusal refuses
    (b"identity", False),
    (b"br, deflate", False),
    (b"", False),
    (b"gzip;q=2", False),     # malformed weight: member ignored
    (b"gzip;q=0.5000", False),
    (b"gzip;q=abc", False),
    (b"gzip;q=", False),
    (b"gzip;level=9", True),  # other parameters do not matter
])
def test_accept_encoding(value: bytes, wanted: bool) -> None:
    assert accepts_gzip(value) is wanted


async def test_gzip_q0_gets_identity() -> None:
    cache = make(Upstream([ok(MIXED_BODY)]))
    answer = await get(cache, b"", (b"Accept-Encoding", b"gzip;q=0"))
    assert answer.body == MIXED_BODY
    assert header(answer, b"content-encoding") is None
    assert header(answer, b"vary") == b"Accept-Encoding"
    split = await get(cache, b"", (b"Accept-Encoding", b"br"), (b"Accept-Encoding", b"gzip"))
    assert header(split, b"content-encoding") == b"gzip"


async def test_a_body_gzip_cannot_shrink_is_sent_as_it_is() -> None:
    tiny = b'{"data":[]}'
    cache = make(Upstream([ok(tiny)]))
    answer = await get(cache, b"", (b"Accept-Encoding", b"gzip"))
    assert (answer.body, header(answer, b"content-encoding")) == (tiny, None)
    assert header(answer, b"etag") == await etag_of(cache)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_header_parsers_take_any_bytes(value: bytes) -> None:
    assert isinstance(accepts_gzip(value), bool)
    assert isinstance(none_match(value, b'"abc"'), bool)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='"'),
    max_size=12)), max_size=6), st.integers(min_value=0, max_value=6), st.booleans())
def test_if_none_match_finds_our_tag_anywhere_in_a_list(
        others: list[tuple[bool, str]], position: int, weak: bool) -> None:
    etag = b'"ours-1"'
    tags = [(b"W/" if w else b"") + b'"' + t.encode() + b'"' for w, t in others
            if t != "ours-1"]
    assert not none_match(b", ".join(tags), etag)
    tags.insert(min(position, len(tags)), (b"W/" if weak else b"") + etag)
    assert none_match(b", ".join(tags), etag)


# --- free models --------------------------------------------------------------------------


@pytest.mark.parametrize(("pricing", "free"), [
    ({"prompt": "0", "completion": "0"}, True),
    ({"prompt": "0.0", "completion": "0.000000", "request": 0, "image": 0.0}, True),
    ({"prompt": "0", "completion": "0.0000001"}, False),
    ({"prompt": "-1", "completion": "-1"}, False),
    ({"prompt": "0", "completion": "-0.5"}, False),
    ({}, False),
    (None, False),
    ("0", False),
    ([0, 0], False),
    ({"prompt": None}, False),
    ({"prompt": False}, False),
    ({"prompt": "free"}, False),
    ({"prompt": "NaN"}, False),
    ({"prompt": ""}, False),
    ({"prompt": {"nested": "0"}}, False),
])
def test_is_free_pricing(pricing: object, free: bool) -> None:
    assert is_free_pricing(pricing) is free


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=5), st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
    st.sampled_from(["0", "0.0", "-1", "0.000001", "1e-9", "0e0"]))))
def test_is_free_pricing_takes_any_json(pricing: dict[str, Any]) -> None:
    free = is_free_pricing(pricing)
    assert isinstance(free, bool)
    # An independent reading of the prices (float may round a tiny price to zero, never a
    # non-zero one away from it): free means every price reads as zero; one price that
    # reads as non-zero means not free.
    if free:
        assert pricing and all(_as_float(v) == 0 for v in pricing.values())
    if any(_as_float(v) not in (0, None) for v in pricing.values()):
        assert not free


def _as_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


async def test_free_only_keeps_only_all_zero_pricing_and_the_rest_of_the_document() -> None:
    cache = make(Upstream([ok(MIXED_BODY)]), free_only=True)
    answer = await get(cache)
    doc = json.loads(answer.body)
    assert [m["id"] for m in doc["data"]] == FREE_IDS
    assert doc["data"] == [m for m in MIXED if m["id"] in FREE_IDS]  # models kept whole
    assert list(doc) == ["data", "meta"] and doc["meta"] == {"v": 1}
    assert b"\n" not in answer.body and b", " not in answer.body  # compact
    assert (await get(cache)).body is answer.body
    assert cache.is_free("vendor/paid") is False  # is_free reads the unfiltered list


async def test_free_only_filters_every_query_variant() -> None:
    cache = make(Upstream([ok(MIXED_BODY)]), free_only=True)
    answer = await get(cache, b"?supported_parameters=tools")
    assert [m["id"] for m in json.loads(answer.body)["data"]] == FREE_IDS


async def test_free_only_keeps_top_level_key_order_and_unicode() -> None:
    body = ('{"meta":{"a":1},"data":[{"id":"x/\u00e9","pricing":{"prompt":"0"}},'
            '{"id":"y","pricing":{"prompt":"1"}}],"tail":true}').encode()
    cache = make(Upstream([ok(body)]), free_only=True)
    assert (await get(cache)).body == (
        '{"meta":{"a":1},"data":[{"id":"x/\u00e9","pricing":{"prompt":"0"}}],"tail":true}'
    ).encode()


async def test_is_free_and_ensure_loaded() -> None:
    upstream = Upstream([ok(MIXED_BODY)])
    cache = make(upstream)
    assert cache.is_free("meta/llama:free") is None
    await cache.ensure_loaded()
    await cache.ensure_loaded()  # known already: no second fetch
    assert upstream.calls == [b""]
    expected = {
        "meta/llama:free": True,
        "openrouter/free": True,
        "vendor/paid": False,
        "vendor/fake:free": False,  # the suffix is not enough
        "openrouter/auto": False,
        "vendor/no-pricing": False,
        "vendor/empty-pricing": False,
        "vendor/unknown:free": False,  # not listed
    }
    assert {mid: cache.is_free(mid) for mid in expected} == expected
    assert label(await get(cache)) == b"HIT"  # ensure_loaded filled the cache too


async def test_is_free_comes_from_the_plain_list_only() -> None:
    upstream = Upstream([ok(doc_body([model("a/free")])), ok(MIXED_BODY)])
    cache = make(upstream)
    await get(cache, b"?output_modalities=text")
    assert cache.is_free("a/free") is None
    await cache.ensure_loaded()
    assert (cache.is_free("a/free"), cache.is_free("meta/llama:free")) == (False, True)


async def test_ensure_loaded_survives_failures_and_waits_before_retrying() -> None:
    clock = FakeClock()
    upstream = Upstream([RuntimeError("down")])
    cache = make(upstream, clock, retry_seconds=5)
    await cache.ensure_loaded()
    assert cache.is_free("meta/llama:free") is None
    await cache.ensure_loaded()
    assert len(upstream.calls) == 1
    upstream.then(ok(MIXED_BODY))
    clock.advance(5)
    await cache.ensure_loaded()
    assert cache.is_free("meta/llama:free") is True


async def test_ensure_loaded_joins_a_running_fetch() -> None:
    upstream = Upstream([ok(MIXED_BODY)], gate=asyncio.Event())
    cache = make(upstream)
    request = asyncio.create_task(cache.answer(b"", []))
    loading = asyncio.create_task(cache.ensure_loaded())
    await upstream.entered.wait()
    upstream.gate.set()  # type: ignore[union-attr]
    await asyncio.gather(request, loading)
    assert upstream.calls == [b""]
    assert cache.is_free("openrouter/free") is True


async def test_drop_removes_a_model_everywhere_and_changes_etags() -> None:
    upstream = Upstream([ok(MIXED_BODY)])
    cache = make(upstream)
    plain, tools = await get(cache), await get(cache, b"?supported_parameters=tools")
    zipped = await get(cache, b"", (b"Accept-Encoding", b"gzip"))
    cache.drop("meta/llama:free")
    assert cache.is_free("meta/llama:free") is False
    assert cache.is_free("openrouter/free") is True
    for query, before in ((b"", plain), (b"?supported_parameters=tools", tools)):
        after = await get(cache, query)
        ids = [m["id"] for m in json.loads(after.body)["data"]]
        assert ids == [m["id"] for m in MIXED if m["id"] != "meta/llama:free"]
        assert json.loads(after.body)["meta"] == {"v": 1}
        assert header(after, b"etag") != header(before, b"etag")
        assert (await get(cache, query, (b"If-None-Match", header(before, b"etag") or b""))
                ).status == 200
    rezipped = await get(cache, b"", (b"Accept-Encoding", b"gzip"))
    assert header(rezipped, b"etag") != header(zipped, b"etag")
    assert gzip.decompress(rezipped.body) == (await get(cache)).body
    assert upstream.calls == [b"", b"?supported_parameters=tools"]  # no refetch


async def test_drop_of_an_unlisted_model_changes_nothing() -> None:
    cache = make(Upstream([ok(MIXED_BODY)]))
    before = await get(cache)
    cache.drop("not/listed")
    after = await get(cache)
    assert after.body is before.body
    assert header(after, b"etag") == header(before, b"etag")


# --- lifecycle ----------------------------------------------------------------------------


async def test_close_cancels_a_background_refresh(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    upstream = Upstream([ok(MIXED_BODY)])
    cache = make(upstream, clock, ttl=10)
    await get(cache)
    upstream.hold()  # the refresh never finishes
    clock.advance(11)
    assert label(await get(cache)) == b"STALE"
    await upstream.entered.wait()
    assert cache.snapshot()["in_flight"] == 1
    with caplog.at_level(logging.WARNING):
        await cache.close()
    assert cache.snapshot()["in_flight"] == 0
    assert not caplog.records


async def test_a_failed_refresh_is_logged_without_the_body(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    upstream = Upstream([ok(MIXED_BODY), Fetched(500, JSON, b'{"secret-ish":"body"}')])
    cache = make(upstream, clock, ttl=10)
    await get(cache)
    clock.advance(11)
    with caplog.at_level(logging.WARNING, logger="orproxy.proxy.models_cache"):
        await get(cache)
        await cache.join()
    assert len(caplog.records) == 1
    assert "500" in caplog.text and "secret-ish" not in caplog.text


async def test_snapshot_counts_bytes_of_bodies_and_gzip_forms() -> None:
    cache = make(Upstream([ok(MIXED_BODY)]))
    await get(cache)
    assert cache.snapshot()["bytes"] == len(MIXED_BODY)
    zipped = await get(cache, b"", (b"Accept-Encoding", b"gzip"))
    assert cache.snapshot()["bytes"] == len(MIXED_BODY) + len(zipped.body)


@pytest.mark.parametrize("kw", [{"ttl": -1}, {"stale_seconds": -1}, {"max_entries": 0},
                                {"max_body_bytes": 0}])
def test_bad_settings_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make(Upstream([ok(MIXED_BODY)]), **kw)
