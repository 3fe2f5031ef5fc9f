"""Access control, public endpoints, local routes, request ids and secret hygiene, end to end.

Every proxy here runs on the test clock (conftest ``on_clock``): the rests a test needs are
written from its wall clock, so their lengths are exact.
"""

from __future__ import annotations

import base64
import json
import logging
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orproxy.app import App
from orproxy.keys import key_id, mask_key
from tests.conftest import ACCESS_KEY, AUTH, KEYS, ProxyFactory, clocked
from tests.fakeor import (
    FakeOpenRouter,
    Recorded,
    Responder,
    Script,
    completion,
    error_of,
    rate_limited_body,
    reset_ms,
)
from tests.memstream import FakeClock
from tests.rawhttp import Response, connected, roundtrip

pytestmark = pytest.mark.anyio

CHAT_BODY = b'{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
GENERATED_ID = re.compile(rb"[0-9a-f]{24}")
MODELS = {"data": [{"id": "openrouter/free", "name": "Free", "context_length": 8192,
                    "pricing": {"prompt": "0", "completion": "0"}}]}


def request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]] | None = None,
            body: bytes | None = None) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: localhost"]
    lines += [n + b": " + v for n, v in headers or []]
    if body is not None:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


async def chat(port: int, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    hs = [(b"Content-Type", b"application/json"), *(headers if headers is not None else [AUTH])]
    return await roundtrip(port, request(b"POST", b"/api/v1/chat/completions", hs, CHAT_BODY),
                           b"POST")


async def get(port: int, target: bytes, headers: list[tuple[bytes, bytes]] | None = None,
              method: bytes = b"GET") -> Response:
    return await roundtrip(port, request(method, target, headers), method)


def assert_single_standard_headers(resp: Response) -> bytes:
    """Exactly one X-Request-ID, Date and Server; returns the request id."""
    for name in (b"x-request-id", b"date", b"server"):
        assert len(resp.headers_named(name)) == 1, (name, resp.headers)
    rid = resp.header(b"x-request-id")
    assert rid
    return rid


@pytest.fixture
def make_proxy(make_proxy: ProxyFactory, clock: FakeClock) -> ProxyFactory:
    return clocked(make_proxy, clock)


async def cool_every_key(app: App, fake: FakeOpenRouter, clock: FakeClock,
                         seconds: float = 40) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        await resp.json(429, rate_limited_body(reset_ms(seconds, clock.wall())))

    fake.script = script
    resp = await chat(app.port)
    assert resp.status == 429
    assert app.services.keys.counts() == {"available": 0, "free_limited": 0,
                                          "cooling": 3, "disabled": 0}


# --- access key ------------------------------------------------------------------------------

BAD_AUTH: dict[str, list[tuple[bytes, bytes]]] = {
    "missing": [],
    "wrong key": [(b"Authorization", b"Bearer not-the-access-key")],
    "prefix of the key": [(b"Authorization", b"Bearer " + ACCESS_KEY[:-1].encode())],
    "key plus suffix": [(b"Authorization", b"Bearer " + ACCESS_KEY.encode() + b"x")],
    "no scheme": [(b"Authorization", ACCESS_KEY.encode())],
    "basic scheme": [(b"Authorization", b"Basic " + ACCESS_KEY.encode())],
    "bearer without token": [(b"Authorization", b"Bearer")],
    "bearer blank token": [(b"Authorization", b"Bearer    ")],
    "empty": [(b"Authorization", b"")],
    "duplicated": [AUTH, AUTH],
    "duplicated one wrong": [AUTH, (b"Authorization", b"Bearer nope")],
    "upstream key": [(b"Authorization", b"Bearer " + KEYS[0].encode())],
    "x-api-key only": [(b"X-Api-Key", ACCESS_KEY.encode())],
}


@pytest.mark.parametrize("headers", list(BAD_AUTH.values()), ids=list(BAD_AUTH))
async def test_bad_access_key_gets_401(
    proxy: App, fake: FakeOpenRouter, headers: list[tuple[bytes, bytes]]
) -> None:
    resp = await chat(proxy.port, headers)
    assert resp.status == 401
    assert resp.header(b"www-authenticate") == b"Bearer"
    error_of(resp)
    assert_single_standard_headers(resp)
    assert fake.requests == []


def invalid_limited_ok(invalid_message: str, clock: FakeClock) -> Script:
    """Upstream that refuses the first key (401), rate-limits the second, serves the third."""
    async def script(req: Recorded, resp: Responder) -> None:
        auth = req.header(b"authorization")
        if auth == b"Bearer " + KEYS[0].encode():
            await resp.json(401, {"error": {"code": 401, "message": invalid_message}})
        elif auth == b"Bearer " + KEYS[1].encode():
            await resp.json(429, rate_limited_body(reset_ms(30, clock.wall())))
        else:
            await resp.json(200, completion())

    return script


async def test_401_on_get_without_body_keeps_the_connection(
    proxy: App, fake: FakeOpenRouter
) -> None:
    async with connected(proxy.port) as client:
        await client.send(request(b"GET", b"/api/v1/key"))
        first = await client.response()
        assert first.status == 401
        assert first.header(b"connection") is None
        await client.send(request(b"GET", b"/api/v1/key", [AUTH]))
        second = await client.response()
        assert second.status == 200
    assert [r.target for r in fake.requests] == [b"/api/v1/key"]


async def test_401_is_sent_before_an_expected_body(proxy: App, fake: FakeOpenRouter) -> None:
    async with connected(proxy.port) as client:
        await client.send(b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                          b"Authorization: Bearer wrong\r\nContent-Length: 1000\r\n"
                          b"Expect: 100-continue\r\n\r\n")
        resp = await client.response(b"POST")
        assert resp.status == 401
        assert not client.raw.startswith(b"HTTP/1.1 100")  # the body was never asked for
        assert resp.header(b"connection") == b"close"
        await client.wait_eof()
    assert fake.requests == []


@pytest.mark.parametrize("auth", [
    b"Bearer " + ACCESS_KEY.encode(),
    b"bearer " + ACCESS_KEY.encode(),
    b"BEARER  " + ACCESS_KEY.encode() + b" ",
], ids=["canonical", "lowercase scheme", "extra spaces"])
async def test_access_key_is_swapped_for_an_upstream_key(
    proxy: App, fake: FakeOpenRouter, auth: bytes
) -> None:
    resp = await chat(proxy.port, [(b"Authorization", auth)])
    assert resp.status == 200
    assert json.loads(resp.body) == completion()
    [sent] = fake.requests
    assert sent.header(b"authorization") == b"Bearer " + KEYS[0].encode()
    assert sent.header(b"host") == f"127.0.0.1:{fake.port}".encode()
    assert sent.body == CHAT_BODY


async def test_access_key_never_reaches_the_upstream(proxy: App, fake: FakeOpenRouter) -> None:
    marker = ACCESS_KEY.encode()
    await chat(proxy.port)
    await get(proxy.port, b"/api/v1/key", [AUTH])
    await get(proxy.port, b"/api/v1/models", [AUTH])
    await get(proxy.port, b"/api/v1/generation?id=gen-1", [AUTH, (b"Connection", b"close")])
    raw = (b"POST /api/v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: "
           + AUTH[1] + b"\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n"
           b"Proxy-Authorization: Basic " + marker + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert (await roundtrip(proxy.port, raw, b"POST")).status == 200
    assert len(fake.requests) == 5
    for sent in fake.requests:
        assert marker not in sent.target
        assert marker not in sent.body
        for name, value in sent.headers:
            assert marker not in name and marker not in value, (name, value)


# --- public endpoints ------------------------------------------------------------------------


async def models_script(req: Recorded, resp: Responder) -> None:
    await resp.json(200, MODELS, [(b"Cache-Control", b"public, max-age=300")])


@pytest.mark.parametrize("headers", [
    [], [AUTH], [(b"Authorization", b"Bearer wrong")],
], ids=["no key", "access key", "wrong key"])
@pytest.mark.parametrize("target", [
    b"/api/v1/models", b"/api/v1/models/", b"/api/v1/models?supported_parameters=tools",
])
async def test_public_endpoint_is_forwarded_without_authorization(
    proxy: App, fake: FakeOpenRouter, headers: list[tuple[bytes, bytes]], target: bytes
) -> None:
    fake.script = models_script
    resp = await get(proxy.port, target, headers)
    assert resp.status == 200
    assert json.loads(resp.body) == MODELS
    assert resp.header(b"cache-control") == b"public, max-age=300"
    [sent] = fake.requests
    assert sent.target == target
    assert sent.header(b"authorization") is None
    assert all(n.lower() != b"authorization" for n, _ in sent.headers)
    assert [v.uses for v in proxy.services.keys.snapshot()] == [0, 0, 0]


async def test_public_endpoint_works_while_every_key_cools(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    await cool_every_key(proxy, fake, clock)
    fake.script = models_script
    resp = await get(proxy.port, b"/api/v1/models")
    assert resp.status == 200
    assert json.loads(resp.body) == MODELS
    assert fake.requests[-1].header(b"authorization") is None


async def test_public_endpoint_429_cools_no_key(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        await resp.json(429, rate_limited_body(reset_ms(30, clock.wall())))

    fake.script = script
    resp = await get(proxy.port, b"/api/v1/models")
    assert resp.status == 429
    assert len(fake.requests) == 1
    assert proxy.services.keys.counts() == {"available": 3, "free_limited": 0,
                                            "cooling": 0, "disabled": 0}


async def test_other_model_paths_are_not_public(proxy: App, fake: FakeOpenRouter) -> None:
    resp = await get(proxy.port, b"/api/v1/models/openai/gpt-4o/endpoints")
    assert resp.status == 401
    assert fake.requests == []


async def test_configured_public_endpoints(make_proxy: ProxyFactory, fake: FakeOpenRouter
                                           ) -> None:
    app = await make_proxy(openrouter={"public_endpoints": ["/api/v1/providers"]})
    resp = await get(app.port, b"/api/v1/providers")
    assert resp.status == 200
    assert fake.requests[-1].header(b"authorization") is None
    assert (await get(app.port, b"/api/v1/models")).status == 401


# --- request ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("rid", [
    b"abc-123", b"req_01HZX9:part/2@host+x=y.z", b"a" * 128,
])
async def test_sane_request_id_is_echoed_and_sent_upstream(
    proxy: App, fake: FakeOpenRouter, rid: bytes
) -> None:
    resp = await chat(proxy.port, [AUTH, (b"X-Request-ID", rid)])
    assert resp.status == 200
    assert assert_single_standard_headers(resp) == rid
    assert fake.requests[0].header(b"x-request-id") == rid


@pytest.mark.parametrize("rid", [
    b"a" * 129, b"has space", b"semi;colon", b"<script>", b'quo"te', b"caf\xc3\xa9",
    b"tab\tinside", b"comma,separated",
], ids=["too long", "space", "semicolon", "angle brackets", "quote", "non-ascii", "tab",
        "comma"])
async def test_insane_request_id_is_replaced(
    proxy: App, fake: FakeOpenRouter, rid: bytes
) -> None:
    resp = await chat(proxy.port, [AUTH, (b"X-Request-ID", rid)])
    assert resp.status == 200
    got = assert_single_standard_headers(resp)
    assert got != rid
    assert GENERATED_ID.fullmatch(got), got
    assert fake.requests[0].header(b"x-request-id") == got


async def test_generated_request_ids_differ_and_go_upstream(
    proxy: App, fake: FakeOpenRouter
) -> None:
    ids = []
    for _ in range(3):
        resp = await chat(proxy.port)
        ids.append(assert_single_standard_headers(resp))
    assert all(GENERATED_ID.fullmatch(i) for i in ids)
    assert len(set(ids)) == 3
    assert [r.header(b"x-request-id") for r in fake.requests] == ids


async def test_upstream_request_id_and_duplicate_headers_are_not_passed_on(
    proxy: App, fake: FakeOpenRouter
) -> None:
    body = json.dumps(completion()).encode()

    async def script(req: Recorded, resp: Responder) -> None:
        await resp.head(200, [(b"Content-Type", b"application/json"),
                              (b"Content-Length", str(len(body)).encode()),
                              (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
                              (b"Date", b"Tue, 02 Jan 2024 00:00:00 GMT"),
                              (b"Server", b"cloudflare"), (b"Server", b"other"),
                              (b"X-Request-ID", b"upstream-own-id")])
        await resp.data(body)
        await resp.end()

    fake.script = script
    resp = await chat(proxy.port, [AUTH, (b"X-Request-ID", b"mine-1")])
    assert resp.status == 200
    assert assert_single_standard_headers(resp) == b"mine-1"
    assert resp.header(b"server") == b"cloudflare"
    assert resp.header(b"date") == b"Mon, 01 Jan 2024 00:00:00 GMT"
    assert resp.body == body


async def test_every_kind_of_response_has_one_id_date_and_server(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    async def bare(req: Recorded, resp: Responder) -> None:  # no Date, no Server upstream
        if req.target.startswith(b"/api/v1/boom"):
            await resp.head(500, [(b"Content-Length", b"4")])
            await resp.data(b"boom")
        else:
            await resp.head(200, [(b"Content-Length", b"2")])
            await resp.data(b"{}")
        await resp.end()

    fake.script = bare
    responses: dict[str, Response] = {
        "forwarded 200": await chat(proxy.port),
        "forwarded 500": await get(proxy.port, b"/api/v1/boom", [AUTH]),
        "public": await get(proxy.port, b"/api/v1/models"),
        "health": await get(proxy.port, b"/health"),
        "health head": await get(proxy.port, b"/health", method=b"HEAD"),
        "metrics": await get(proxy.port, b"/metrics", [AUTH]),
        "metrics raw": await get(proxy.port, b"/metrics/raw", [AUTH]),
        "401": await chat(proxy.port, []),
        "404": await get(proxy.port, b"/nope"),
        "405": await get(proxy.port, b"/health", method=b"DELETE"),
        "400 dot segment": await get(proxy.port, b"/api/v1/../etc/passwd", [AUTH]),
    }
    await cool_every_key(proxy, fake, clock)
    responses["429 no key"] = await chat(proxy.port)
    responses["503 health"] = await get(proxy.port, b"/health")
    expected = {"forwarded 200": 200, "forwarded 500": 500, "public": 200, "health": 200,
                "health head": 200, "metrics": 200, "metrics raw": 200, "401": 401, "404": 404,
                "405": 405, "400 dot segment": 400, "429 no key": 429, "503 health": 503}
    assert {k: r.status for k, r in responses.items()} == expected
    for name, resp in responses.items():
        rid = assert_single_standard_headers(resp)
        assert GENERATED_ID.fullmatch(rid), (name, rid)
        assert resp.header(b"server") == b"orproxy", name


# --- /health ---------------------------------------------------------------------------------


async def test_health_reports_key_counts(proxy: App, fake: FakeOpenRouter) -> None:
    resp = await get(proxy.port, b"/health")
    assert resp.status == 200
    assert resp.header(b"content-type") == b"application/json"
    assert resp.header(b"retry-after") is None
    doc = json.loads(resp.body)
    assert set(doc) == {"status", "keys", "uptime_seconds", "draining"}
    assert doc["status"] == "ok"
    assert doc["keys"] == {"available": 3, "free_limited": 0,
                           "cooling": 0, "disabled": 0, "total": 3}
    assert isinstance(doc["uptime_seconds"], int | float) and 0 <= doc["uptime_seconds"] < 60
    assert doc["draining"] is False
    assert fake.requests == []


async def test_health_counts_cooling_and_disabled_keys(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    fake.script = invalid_limited_ok("User not found.", clock)
    assert (await chat(proxy.port)).status == 200
    doc = json.loads((await get(proxy.port, b"/health")).body)
    assert doc["status"] == "ok"
    assert doc["keys"] == {"available": 1, "free_limited": 0,
                           "cooling": 1, "disabled": 1, "total": 3}


async def test_health_is_503_when_every_key_cools(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    await cool_every_key(proxy, fake, clock, seconds=25)
    resp = await get(proxy.port, b"/health")
    assert resp.status == 503
    doc = json.loads(resp.body)
    assert doc["status"] == "unavailable"
    assert doc["keys"] == {"available": 0, "free_limited": 0,
                           "cooling": 3, "disabled": 0, "total": 3}
    assert doc["retry_after_seconds"] == 25
    assert resp.header(b"retry-after") == b"25"


async def test_health_is_503_without_retry_after_when_every_key_is_disabled(
    proxy: App, fake: FakeOpenRouter
) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        await resp.json(401, {"error": {"code": 401, "message": "User not found."}})

    fake.script = script
    assert (await chat(proxy.port)).status == 503
    resp = await get(proxy.port, b"/health")
    assert resp.status == 503
    doc = json.loads(resp.body)
    assert doc["status"] == "unavailable"
    assert doc["keys"] == {"available": 0, "free_limited": 0,
                           "cooling": 0, "disabled": 3, "total": 3}
    assert "retry_after_seconds" not in doc
    assert resp.header(b"retry-after") is None


async def test_head_health_has_headers_and_no_body(proxy: App) -> None:
    get_resp = await get(proxy.port, b"/health")
    head = await get(proxy.port, b"/health", method=b"HEAD")
    assert head.status == 200
    assert head.body == b""
    assert head.header(b"content-type") == b"application/json"
    length = head.header(b"content-length")
    assert length is not None and int(length) > 0
    assert abs(int(length) - len(get_resp.body)) <= 3  # uptime digits may differ


async def test_health_trailing_slash_and_query(proxy: App) -> None:
    assert (await get(proxy.port, b"/health/")).status == 200
    assert (await get(proxy.port, b"/health?verbose=1")).status == 200


# --- /metrics --------------------------------------------------------------------------------


def secret_fragments() -> list[str]:
    """Every 7-character window of every upstream key and of the access key: none of them may
    appear in anything the proxy shows (the masked form ``sk-or-…0001`` has no such run)."""
    out = []
    for secret in [*KEYS, ACCESS_KEY]:
        out += [secret[i:i + 7] for i in range(len(secret) - 6)]
    return out


async def make_key_states(proxy: App, fake: FakeOpenRouter, clock: FakeClock) -> None:
    fake.script = invalid_limited_ok("Invalid key " + KEYS[0], clock)
    assert (await chat(proxy.port)).status == 200


async def test_metrics_raw_is_prometheus_text_without_secrets(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    await make_key_states(proxy, fake, clock)
    await get(proxy.port, b"/nope")
    resp = await get(proxy.port, b"/metrics/raw", [AUTH])
    assert resp.status == 200
    ctype = resp.header(b"content-type")
    assert ctype is not None and ctype.startswith(b"text/plain")
    text = resp.body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "orproxy_requests" in families
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("orproxy_requests_total",
                    (("method", "POST"), ("route", "forward"), ("status", "2xx")))] == 1
    assert samples[("orproxy_requests_total",
                    (("method", "GET"), ("route", "not_found"), ("status", "4xx")))] == 1
    keys = {s.labels["state"]: s.value for s in families["orproxy_keys"].samples}
    assert keys == {"available": 1.0, "free_limited": 0.0, "cooling": 1.0, "disabled": 1.0}
    per_key = {s.labels["key_id"]: s.value for s in families["orproxy_key_available"].samples}
    assert per_key == {key_id(KEYS[0]): 0.0, key_id(KEYS[1]): 0.0, key_id(KEYS[2]): 1.0}
    uses = {s.labels["key_id"]: s.value for s in families["orproxy_key_requests"].samples
            if s.name == "orproxy_key_requests_total"}
    assert uses == {key_id(k): 1.0 for k in KEYS}
    attempts = {s.labels["outcome"]: s.value for s in families["orproxy_upstream_attempts"]
                .samples if s.name == "orproxy_upstream_attempts_total"}
    assert attempts == {"key_invalid": 1.0, "key_limited": 1.0, "ok": 1.0}
    assert "sk-or-" not in text
    for fragment in secret_fragments():
        assert fragment not in text, fragment


async def test_metrics_dashboard_is_html_and_its_data_has_masked_keys_only(
    proxy: App, fake: FakeOpenRouter, clock: FakeClock
) -> None:
    await make_key_states(proxy, fake, clock)
    resp = await get(proxy.port, b"/metrics", [AUTH])
    assert resp.status == 200
    assert resp.header(b"content-type") == b"text/html; charset=utf-8"
    assert resp.body.decode().lower().startswith("<!doctype html>")
    data = await get(proxy.port, b"/metrics/json", [AUTH])
    assert data.status == 200 and data.header(b"content-type") == b"application/json"
    doc = json.loads(data.body)
    assert [(k["id"], k["masked"], k["state"]) for k in doc["keys"]] == [
        (key_id(KEYS[0]), mask_key(KEYS[0]), "disabled"),
        (key_id(KEYS[1]), mask_key(KEYS[1]), "cooling"),
        (key_id(KEYS[2]), mask_key(KEYS[2]), "available")]
    for fragment in secret_fragments():
        assert fragment not in data.body.decode(), fragment


@pytest.mark.parametrize("path", [b"/metrics", b"/metrics/json", b"/metrics/raw"])
async def test_metrics_pages_need_the_access_key_bearer_or_basic(proxy: App,
                                                                 path: bytes) -> None:
    refused = await get(proxy.port, path)
    assert refused.status == 401
    assert b'Basic realm="orproxy", charset="UTF-8"' in refused.headers_named(
        b"www-authenticate")
    assert refused.header(b"cache-control") == b"no-store"
    basic = b"Basic " + base64.b64encode(b"anyone:" + ACCESS_KEY.encode())
    assert (await get(proxy.port, path, [(b"Authorization", basic)])).status == 200
    wrong = b"Basic " + base64.b64encode(b"anyone:wrong")
    assert (await get(proxy.port, path, [(b"Authorization", wrong)])).status == 401
    assert (await get(proxy.port, path, [AUTH])).status == 200


async def test_metrics_can_be_public_for_a_scraper(make_proxy: ProxyFactory) -> None:
    app = await make_proxy(metrics={"public": True})
    assert (await get(app.port, b"/metrics/raw")).status == 200
    assert (await get(app.port, b"/metrics/json")).status == 200


async def test_metrics_raw_speaks_openmetrics_when_asked(proxy: App) -> None:
    resp = await get(proxy.port, b"/metrics/raw",
                     [AUTH, (b"Accept", b"application/openmetrics-text; version=1.0.0")])
    assert resp.status == 200
    ctype = resp.header(b"content-type")
    assert ctype is not None and ctype.startswith(b"application/openmetrics-text")
    assert resp.body.endswith(b"# EOF\n")


async def test_metrics_head_and_405(proxy: App) -> None:
    head = await get(proxy.port, b"/metrics/raw", [AUTH], method=b"HEAD")
    assert head.status == 200 and head.body == b""
    resp = await roundtrip(proxy.port, request(b"POST", b"/metrics", [], b"x"), b"POST")
    assert resp.status == 405
    assert resp.header(b"allow") == b"GET, HEAD"


# --- unknown paths and methods ---------------------------------------------------------------


@pytest.mark.parametrize("target", [b"/", b"/nope", b"/api/v1", b"/api/v1/", b"/api/v2/chat",
                                    b"/healthz", b"/metrics/raw/x"])
async def test_unknown_paths_get_404_json(proxy: App, fake: FakeOpenRouter, target: bytes
                                          ) -> None:
    resp = await get(proxy.port, target, [AUTH])
    assert resp.status == 404
    error_of(resp)
    assert fake.requests == []


async def test_post_health_gets_405_with_allow(proxy: App) -> None:
    resp = await roundtrip(proxy.port, request(b"POST", b"/health", [], b'{"a":1}'), b"POST")
    assert resp.status == 405
    assert resp.header(b"allow") == b"GET, HEAD"
    error_of(resp)


async def test_dot_segments_never_reach_the_upstream(proxy: App, fake: FakeOpenRouter) -> None:
    for target in (b"/api/v1/../../secret", b"/api/v1/%2e%2e/x", b"/api/v1/./models"):
        resp = await get(proxy.port, target, [AUTH])
        assert resp.status == 400, target
        error_of(resp)
    assert fake.requests == []


async def test_access_log_counts_local_response_bytes(
    proxy: App, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="orproxy.access"):
        resp = await get(proxy.port, b"/health")
    lines = [r.getMessage() for r in caplog.records if r.name == "orproxy.access"]
    assert len(lines) == 1
    assert f"bytes={len(resp.body)}" in lines[0]


@pytest.mark.parametrize("target", [b"/", b"/v1/chat/completions", b"/chat/completions"])
async def test_a_miss_of_the_base_url_names_the_right_one(proxy: App, target: bytes) -> None:
    resp = await get(proxy.port, target, [AUTH])
    assert resp.status == 404
    message = error_of(resp)["message"]
    assert f"http://127.0.0.1:{proxy.port}/api/v1" in message
