"""Tier 1: header rewriting between client and upstream (RFC 9110 §7.6.1, RFC 9112 §6-7)."""

from __future__ import annotations

import re
import time
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orproxy.headers import (
    HOP_BY_HOP,
    SERVER_NAME,
    Headers,
    client_request_id,
    client_response_headers,
    connection_tokens,
    http_date,
    local_response_headers,
    only_decodable_codings,
    upstream_request_headers,
)

HOP = sorted(HOP_BY_HOP)
IMF_FIXDATE = re.compile(
    rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    rb"\d{4} \d\d:\d\d:\d\d GMT")
RID = b"req-123"


def names(headers: Headers) -> list[bytes]:
    return [n.lower() for n, _ in headers]


def values(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


def up(headers: Headers, *, authorization: bytes | None = b"Bearer sk-or-v1-upstream",
       body_length: int | None = None) -> Headers:
    return upstream_request_headers(headers, host=b"openrouter.ai", authorization=authorization,
                                    request_id=RID, body_length=body_length)


# --- connection_tokens -----------------------------------------------------------------------


def test_connection_tokens() -> None:
    headers = [(b"Connection", b"Keep-Alive, X-Foo ,, "), (b"connection", b"close"),
               (b"X-Foo", b"1")]
    assert connection_tokens(headers) == frozenset({b"keep-alive", b"x-foo", b"close"})
    assert connection_tokens([(b"X-Connection", b"x-foo")]) == frozenset()


# --- upstream request ------------------------------------------------------------------------


def test_upstream_request_replaces_host_auth_length_and_request_id() -> None:
    client = [
        (b"Host", b"localhost:5555"),
        (b"User-Agent", b"openai-python/1.40"),
        (b"Authorization", b"Bearer local-access-key"),
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"999"),
        (b"Expect", b"100-continue"),
        (b"HTTP-Referer", b"https://example.com"),
        (b"X-Title", b"My App"),
        (b"X-Request-ID", b"client-id"),
        (b"Accept", b"text/event-stream"),
    ]
    assert up(client, body_length=42) == [
        (b"Host", b"openrouter.ai"),
        (b"User-Agent", b"openai-python/1.40"),
        (b"Content-Type", b"application/json"),
        (b"HTTP-Referer", b"https://example.com"),
        (b"X-Title", b"My App"),
        (b"Accept", b"text/event-stream"),
        (b"Authorization", b"Bearer sk-or-v1-upstream"),
        (b"Content-Length", b"42"),
        (b"X-Request-ID", RID),
    ]


def test_upstream_request_strips_hop_by_hop_and_connection_listed_names() -> None:
    client = [
        (b"Host", b"proxy"),
        (b"Connection", b"keep-alive, X-Secret-Hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Checksum"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"x-secret-hop", b"drop me"),
        (b"X-Keep", b"1"),
    ]
    assert up(client, authorization=None, body_length=0) == [
        (b"Host", b"openrouter.ai"),
        (b"X-Keep", b"1"),
        (b"Content-Length", b"0"),
        (b"X-Request-ID", RID),
    ]


def test_upstream_request_without_body_or_key_adds_neither() -> None:
    assert up([(b"Accept", b"*/*")], authorization=None) == [
        (b"Host", b"openrouter.ai"), (b"Accept", b"*/*"), (b"X-Request-ID", RID)]


def test_upstream_request_keeps_order_casing_and_repeats() -> None:
    client = [(b"x-b", b"1"), (b"X-A", b"2"), (b"x-b", b"3"), (b"Accept-Encoding", b"gzip")]
    assert up(client, authorization=None)[1:-1] == client


# --- client response -------------------------------------------------------------------------


def test_client_response_keeps_the_upstream_date_and_server() -> None:
    upstream = [
        (b"Date", b"Fri, 13 Jun 2025 01:42:55 GMT"),
        (b"Content-Type", b"application/json"),
        (b"date", b"Fri, 13 Jun 2025 01:42:56 GMT"),
        (b"server", b"uvicorn"),
        (b"Server", b"cloudflare"),
        (b"Content-Length", b"407769"),
        (b"X-Generation-Id", b"gen-1"),
    ]
    assert client_response_headers(upstream, request_id=RID, close=False) == [
        (b"Date", b"Fri, 13 Jun 2025 01:42:55 GMT"),
        (b"Content-Type", b"application/json"),
        (b"server", b"uvicorn"),
        (b"Content-Length", b"407769"),
        (b"X-Generation-Id", b"gen-1"),
        (b"X-Request-ID", RID),
    ]


def test_client_response_drops_content_length_when_upstream_was_chunked() -> None:
    upstream = [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"407769"),
                (b"Content-Type", b"text/event-stream"), (b"Date", b"d"), (b"Server", b"s")]
    assert client_response_headers(upstream, request_id=RID, close=True) == [
        (b"Content-Type", b"text/event-stream"),
        (b"Date", b"d"),
        (b"Server", b"s"),
        (b"X-Request-ID", RID),
        (b"Connection", b"close"),
    ]


def test_client_response_adds_date_and_server_when_missing() -> None:
    out = client_response_headers([(b"Content-Type", b"application/json")], request_id=RID,
                                  close=False)
    assert names(out) == [b"content-type", b"date", b"server", b"x-request-id"]
    assert IMF_FIXDATE.fullmatch(values(out, b"date")[0])
    assert values(out, b"server") == [SERVER_NAME] == [b"orproxy"]


def test_client_response_strips_hop_by_hop_and_listed_names() -> None:
    upstream = [(b"Connection", b"keep-alive, X-Internal, Server"), (b"Keep-Alive", b"max=5"),
                (b"X-Internal", b"1"), (b"Server", b"cloudflare"), (b"Upgrade", b"h2"),
                (b"Proxy-Authenticate", b"Basic"), (b"Trailer", b"x"), (b"X-Request-ID", b"up"),
                (b"Date", b"d"), (b"Vary", b"Accept")]
    assert client_response_headers(upstream, request_id=RID, close=False) == [
        (b"Date", b"d"), (b"Vary", b"Accept"), (b"Server", b"orproxy"), (b"X-Request-ID", RID)]


def test_local_response_headers() -> None:
    out = local_response_headers(b"application/json", RID, close=True,
                                 extra=[(b"Retry-After", b"30")])
    assert names(out) == [b"date", b"server", b"content-type", b"cache-control",
                          b"x-request-id", b"retry-after", b"connection"]
    assert out[1:] == [(b"Server", b"orproxy"), (b"Content-Type", b"application/json"),
                       (b"Cache-Control", b"no-store"), (b"X-Request-ID", RID),
                       (b"Retry-After", b"30"), (b"Connection", b"close")]
    assert local_response_headers(b"text/plain", RID, close=False)[2:] == [
        (b"Content-Type", b"text/plain"), (b"Cache-Control", b"no-store"),
        (b"X-Request-ID", RID)]


def test_http_date_is_now_as_imf_fixdate() -> None:
    before = int(time.time())
    value = http_date()
    after = int(time.time())
    assert IMF_FIXDATE.fullmatch(value)
    assert before <= parsedate_to_datetime(value.decode()).timestamp() <= after


# --- client_request_id -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"X-Request-ID", b"abc-123_x.y:z@w+=/")], b"abc-123_x.y:z@w+=/"),
        ([(b"x-request-id", b"a" * 128)], b"a" * 128),
        ([(b"x-request-id", b"a" * 129)], None),
        ([(b"x-request-id", b"")], None),
        ([(b"x-request-id", b"has space")], None),
        ([(b"x-request-id", b"new\nline")], None),
        ([(b"x-request-id", b"\xc3\xa9")], None),
        ([(b"x-request-id", b"first"), (b"X-Request-Id", b"second")], b"first"),
        ([(b"x-other", b"abc")], None),
        ([], None),
    ],
)
def test_client_request_id(headers: Headers, expected: bytes | None) -> None:
    assert client_request_id(headers) == expected


# --- properties ------------------------------------------------------------------------------


CASES = (bytes.lower, bytes.upper, bytes.title)
SPECIAL = [*HOP, b"date", b"server", b"host", b"authorization", b"expect", b"content-length",
           b"x-request-id", b"content-type", b"x-foo", b"x-bar", b"accept", b"x-title"]
CASED = st.tuples(st.sampled_from(SPECIAL), st.sampled_from(CASES)).map(lambda t: t[1](t[0]))
NAME = st.one_of(CASED, st.text("abcxyz-", min_size=1, max_size=6).map(lambda t: b"x" + t.encode()))
TOKEN_LIST = st.lists(CASED, max_size=4).map(lambda ts: b", ".join(ts))
VALUE = st.text(" !#%*+-./0123456789:;=?ABCXYZabcxyz~", max_size=16).map(str.encode)
HEADER = st.one_of(st.tuples(NAME, VALUE),
                   st.tuples(st.sampled_from([b"Connection", b"connection"]), TOKEN_LIST))
HEADERS = st.lists(HEADER, max_size=12)


@settings(max_examples=75, database=None, deadline=None)
@given(upstream=HEADERS, close=st.booleans())
def test_client_response_properties(upstream: Headers, close: bool) -> None:
    out = client_response_headers(upstream, request_id=RID, close=close)
    lower = names(out)
    listed = connection_tokens(upstream)
    chunked = any(n.lower() == b"transfer-encoding" for n, _ in upstream)
    # our own Connection: close is the only hop-by-hop field, and only when asked for
    hop = [h for h in out if h[0].lower() in HOP_BY_HOP]
    assert hop == ([(b"Connection", b"close")] if close else [])
    if close:
        assert out[-1] == (b"Connection", b"close")
    assert lower.count(b"date") == 1 and lower.count(b"server") == 1
    assert values(out, b"x-request-id") == [RID]
    assert not (listed - {b"date", b"server", b"x-request-id", b"connection"}) & set(lower)
    if chunked:
        assert b"content-length" not in lower
    # end-to-end fields keep their order and casing; only the first Date/Server stays
    drop = HOP_BY_HOP | listed | {b"x-request-id"} | ({b"content-length"} if chunked else set())
    expected: Headers = []
    for name, value in upstream:
        ln = name.lower()
        if ln in drop or (ln in (b"date", b"server") and ln in names(expected)):
            continue
        expected.append((name, value))
    assert out[:len(expected)] == expected


@settings(max_examples=75, database=None, deadline=None)
@given(client=HEADERS, auth=st.one_of(st.none(), st.just(b"Bearer sk-or-v1-k")),
       length=st.one_of(st.none(), st.integers(0, 10**9)))
def test_upstream_request_properties(client: Headers, auth: bytes | None,
                                     length: int | None) -> None:
    out = up(client, authorization=auth, body_length=length)
    lower = names(out)
    listed = connection_tokens(client)
    assert out[0] == (b"Host", b"openrouter.ai") and lower.count(b"host") == 1
    assert not HOP_BY_HOP & set(lower)
    assert b"expect" not in lower
    assert values(out, b"authorization") == ([] if auth is None else [auth])
    assert values(out, b"content-length") == ([] if length is None else [str(length).encode()])
    assert out[-1] == (b"X-Request-ID", RID) and lower.count(b"x-request-id") == 1
    ours = {b"host", b"authorization", b"content-length", b"x-request-id"}
    assert not (listed - ours) & set(lower)
    # everything else passes in order, untouched
    drop = HOP_BY_HOP | listed | ours | {b"expect"}
    assert out[1:1 + len(out) - len(ours & set(lower))] == [
        (n, v) for n, v in client if n.lower() not in drop]


@pytest.mark.parametrize(("value", "sent"), [
    (b"gzip, deflate, br, zstd", b"gzip, deflate"),
    (b"br;q=1.0, gzip;q=0.8, *;q=0.1", b"gzip;q=0.8"),
    (b"br", b"identity"),
    (b"identity", b"identity"),
    (b"GZIP", b"GZIP"),
])
def test_only_decodable_codings_go_upstream(value: bytes, sent: bytes) -> None:
    headers = [(b"Accept", b"*/*"), (b"Accept-Encoding", value), (b"X-Other", b"br")]
    assert only_decodable_codings(headers) == [(b"Accept", b"*/*"), (b"Accept-Encoding", sent),
                                               (b"X-Other", b"br")]
