"""Tier 1: request routing, the local access check and request-head validation."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orproxy.errors import ClientRequestError
from orproxy.http.auth import bearer_token, check_access
from orproxy.http.routing import Route, RouteKind, route
from orproxy.http.validate import check_request_head

PUBLIC = frozenset({b"/api/v1/models"})
ACCESS = b"local-access-key-0123456789"

# --- routing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/api/v1/chat/completions", Route(RouteKind.FORWARD, b"/chat/completions")),
        (b"/api/v1/chat/completions?x=1&y=/../", Route(RouteKind.FORWARD,
                                                       b"/chat/completions?x=1&y=/../")),
        (b"/api/v1/models", Route(RouteKind.FORWARD, b"/models", public=True)),
        (b"/api/v1/models/", Route(RouteKind.FORWARD, b"/models/", public=True)),
        (b"/api/v1/models?supported_parameters=tools",
         Route(RouteKind.FORWARD, b"/models?supported_parameters=tools", public=True)),
        (b"/api/v1/models/openai/gpt-4o/endpoints",
         Route(RouteKind.FORWARD, b"/models/openai/gpt-4o/endpoints")),
        (b"/api/v1/Models", Route(RouteKind.FORWARD, b"/Models")),  # paths are case-sensitive
        (b"/api/v1/key", Route(RouteKind.FORWARD, b"/key")),
        (b"/api/v1/generation?id=gen-1", Route(RouteKind.FORWARD, b"/generation?id=gen-1")),
        (b"http://localhost:5555/api/v1/chat/completions?s=1",
         Route(RouteKind.FORWARD, b"/chat/completions?s=1")),
        (b"https://evil.example/api/v1/models", Route(RouteKind.FORWARD, b"/models", public=True)),
        (b"http://localhost:5555", Route(RouteKind.NOT_FOUND)),
        (b"/health", Route(RouteKind.HEALTH)),
        (b"/health/", Route(RouteKind.HEALTH)),
        (b"/health?verbose=1", Route(RouteKind.HEALTH)),
        (b"http://localhost/health", Route(RouteKind.HEALTH)),
        (b"/metrics", Route(RouteKind.METRICS)),
        (b"/metrics/raw", Route(RouteKind.METRICS_RAW)),
        (b"/metrics/raw/", Route(RouteKind.METRICS_RAW)),
        (b"/", Route(RouteKind.NOT_FOUND)),
        (b"/healthz", Route(RouteKind.NOT_FOUND)),
        (b"/api/v1", Route(RouteKind.NOT_FOUND)),
        (b"/api/v1/", Route(RouteKind.NOT_FOUND)),
        (b"/api/v2/chat", Route(RouteKind.NOT_FOUND)),
        (b"/v1/chat/completions", Route(RouteKind.NOT_FOUND)),
        (b"*", Route(RouteKind.BAD_TARGET)),
        (b"api/v1/models", Route(RouteKind.BAD_TARGET)),
        (b"example.com:443", Route(RouteKind.BAD_TARGET)),
        (b"/api/v1/chat#frag", Route(RouteKind.BAD_TARGET)),
        (b"/api/v1/../health", Route(RouteKind.BAD_TARGET)),
        (b"/api/v1/chat/..", Route(RouteKind.BAD_TARGET)),
        (b"/api/v1/./models", Route(RouteKind.BAD_TARGET)),
        (b"/api/v1/%2e%2e/%2e%2e/admin", Route(RouteKind.BAD_TARGET)),
        (b"/api/v1/%2E%2E/key", Route(RouteKind.BAD_TARGET)),
        (b"/api/v1/.%2E/key", Route(RouteKind.BAD_TARGET)),
        (b"/api/v1/%2e./key", Route(RouteKind.BAD_TARGET)),
        (b"/api/v1/%2E/key", Route(RouteKind.BAD_TARGET)),
        (b"http://h/api/v1/../../etc", Route(RouteKind.BAD_TARGET)),
    ],
)
def test_route(target: bytes, expected: Route) -> None:
    assert route(target, PUBLIC) == expected


def test_route_without_public_endpoints() -> None:
    assert route(b"/api/v1/models", frozenset()) == Route(RouteKind.FORWARD, b"/models")


def test_route_label_is_the_kind() -> None:
    assert route(b"/api/v1/chat/completions", PUBLIC).label == "forward"
    assert route(b"/metrics/raw", PUBLIC).label == "metrics_raw"
    assert route(b"/nope", PUBLIC).label == "not_found"


@settings(max_examples=100, database=None, deadline=None)
@given(segments=st.lists(st.sampled_from([b"a", b"chat", b".", b"..", b"%2e", b"%2E%2e", b"",
                                          b"models", b"x.y", b"...", b".a"]), max_size=6),
       query=st.sampled_from([b"", b"?q=1", b"?p=/../x"]))
def test_forwarded_paths_never_hold_dot_segments(segments: list[bytes], query: bytes) -> None:
    """Nothing reaches the upstream outside /api/v1/: a forwarded path has no dot segment."""
    target = b"/api/v1/" + b"/".join(segments) + query
    result = route(target, PUBLIC)
    if result.kind is RouteKind.FORWARD:
        path = result.path.partition(b"?")[0]
        assert not {s.lower() for s in path.split(b"/")} & {
            b".", b"..", b"%2e", b"%2e%2e", b".%2e", b"%2e."}
        assert (b"/api/v1" + result.path) == target
    else:
        assert result.kind in (RouteKind.BAD_TARGET, RouteKind.NOT_FOUND)


# --- auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ([(b"Authorization", b"Bearer abc")], b"abc"),
        ([(b"authorization", b"bearer abc")], b"abc"),
        ([(b"AUTHORIZATION", b"BEARER abc")], b"abc"),
        ([(b"authorization", b"  Bearer   abc  ")], b"abc"),
        ([(b"authorization", b"Bearer")], None),
        ([(b"authorization", b"Bearer ")], None),
        ([(b"authorization", b"")], None),
        ([(b"authorization", b"Basic YWJjOmRlZg==")], None),
        ([(b"authorization", b"Bearerabc")], None),
        ([(b"authorization", b"Bearer abc"), (b"Authorization", b"Bearer abc")], None),
        ([(b"authorization", b"Bearer abc"), (b"authorization", b"Bearer other")], None),
        ([(b"proxy-authorization", b"Bearer abc")], None),
        ([], None),
    ],
)
def test_bearer_token(headers: list[tuple[bytes, bytes]], token: bytes | None) -> None:
    assert bearer_token(headers) == token


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ([(b"authorization", b"Bearer " + ACCESS)], True),
        ([(b"Authorization", b"bearer " + ACCESS)], True),
        ([(b"authorization", b"Bearer " + ACCESS[:-1])], False),
        ([(b"authorization", b"Bearer " + ACCESS + b"0")], False),
        ([(b"authorization", b"Bearer " + ACCESS.upper())], False),
        ([(b"authorization", ACCESS)], False),
        ([(b"authorization", b"Basic " + ACCESS)], False),
        ([(b"authorization", b"Bearer " + ACCESS)] * 2, False),
        ([(b"x-api-key", ACCESS)], False),
        ([], False),
    ],
)
def test_check_access(headers: list[tuple[bytes, bytes]], allowed: bool) -> None:
    assert check_access(headers, ACCESS) is allowed


def test_an_empty_access_key_lets_nobody_in() -> None:
    assert check_access([], b"") is False
    assert check_access([(b"authorization", b"Bearer ")], b"") is False
    assert check_access([(b"authorization", b"Bearer x")], b"") is False


# --- validate --------------------------------------------------------------------------------

LIMITS = {"max_head_bytes": 16384, "max_header_count": 100, "max_target_bytes": 8192}


def parsed(head: bytes) -> h11.Request:
    """The request head as h11 hands it to the handler (lowercase names)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return event


def check(head: bytes, **limits: int) -> None:
    req = parsed(head)
    check_request_head(req.http_version, req.method, req.target, req.headers,
                       **{**LIMITS, **limits})


def status_of(head: bytes, **limits: int) -> tuple[int, str]:
    with pytest.raises(ClientRequestError) as info:
        check(head, **limits)
    return info.value.status, info.value.message


@pytest.mark.parametrize(
    "head",
    [
        b"GET /api/v1/models HTTP/1.1\r\nHost: localhost:5555\r\n\r\n",
        b"GET /health HTTP/1.0\r\n\r\n",
        b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: [::1]:5555\r\n"
        b"Content-Length: 2\r\nX-Title: caf\xc3\xa9\tbar\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: my-host.example.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n",
    ],
)
def test_valid_heads_pass(head: bytes) -> None:
    check(head)


def test_content_length_with_transfer_encoding_is_400() -> None:
    assert status_of(b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
                     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n") == (
        400, "both Content-Length and Transfer-Encoding")
    assert status_of(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Length: 5\r\n\r\n")[0] == 400


@pytest.mark.parametrize("version", [b"2.0", b"0.9", b"1.2", b"3.0"])
def test_other_http_versions_are_505(version: bytes) -> None:
    assert status_of(b"GET / HTTP/" + version + b"\r\nHost: a\r\n\r\n") == (
        505, "HTTP version not supported")


def test_the_version_is_checked_first() -> None:
    head = (b"POST / HTTP/2.0\r\nHost: a b\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    assert status_of(head)[0] == 505


def test_transfer_encoding_on_http_1_0_is_400() -> None:
    assert status_of(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n") == (
        400, "Transfer-Encoding in an HTTP/1.0 request")


@pytest.mark.parametrize("value", [b"a\x01b", b"\x00", b"x\x1fy", b"del\x7f", b"a\x0bb"])
def test_control_characters_in_values_are_400(value: bytes) -> None:
    # h11 already refuses some of these; the check holds for the rest and for any caller
    headers = [(b"host", b"a"), (b"x-test", value)]
    with pytest.raises(ClientRequestError) as info:
        check_request_head(b"1.1", b"GET", b"/", headers, **LIMITS)
    assert (info.value.status, info.value.message) == (
        400, "control character in a header field value")


def test_obs_text_and_tab_are_allowed() -> None:
    check_request_head(b"1.1", b"GET", b"/", [(b"host", b"a"), (b"x", b"\x80\xff\tz")], **LIMITS)


@pytest.mark.parametrize("host", [b"exa mple.com", b"user@host", b"host:port", b"a/b",
                                  b"[::1", b"host:123456", b"h\\x"])
def test_bad_host_is_400(host: bytes) -> None:
    with pytest.raises(ClientRequestError) as info:
        check_request_head(b"1.1", b"GET", b"/", [(b"host", host)], **LIMITS)
    assert (info.value.status, info.value.message) == (400, "invalid Host header")


def test_target_length_limit_is_414() -> None:
    target = b"/api/v1/" + b"a" * (300 - 8)
    check(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n", max_target_bytes=300)
    assert status_of(b"GET " + target + b"b HTTP/1.1\r\nHost: a\r\n\r\n",
                     max_target_bytes=300) == (414, "request target too long")


def test_header_count_limit_is_431() -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(9))  # + Host = 10 fields
    check(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n", max_header_count=10)
    assert status_of(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"X-last: v\r\n\r\n",
                     max_header_count=10) == (431, "too many header fields")


def test_head_size_limit_is_431() -> None:
    # the size counted: method + target + 12, plus name + value + 4 per field
    method, target = b"GET", b"/x"
    headers = [(b"host", b"a"), (b"x-pad", b"p" * 1000)]
    size = len(method) + len(target) + 12 + sum(len(n) + len(v) + 4 for n, v in headers)
    check_request_head(b"1.1", method, target, headers, max_head_bytes=size,
                       max_header_count=100, max_target_bytes=8192)
    with pytest.raises(ClientRequestError) as info:
        check_request_head(b"1.1", method, target, headers, max_head_bytes=size - 1,
                           max_header_count=100, max_target_bytes=8192)
    assert (info.value.status, info.value.message) == (431, "request header section too large")
