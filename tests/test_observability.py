"""Issue 7, "see the keys": the metrics a scraper reads, the logs an operator reads, and
the timing headers a client reads, end to end.

Metrics: after traffic of every kind (success, stream, 429 and 401 rotation, an in-band
error, local pages), every metric the dashboard and the Grafana board rely on is in
``/metrics/raw``, with the values the traffic implies, named by Prometheus conventions
(read with prometheus_client's parsers, text and OpenMetrics), with no key in any label.

Timing: ``Server-Timing`` (upstream, proxy) and ``X-Process-Time`` on proxied answers,
streams too, the upstream's share covering every attempt and never more than the whole.

Logs: ``python -m orproxy`` with ``server.log_format: json``, as a user runs it: each
stderr line one JSON object, the request id on every line of a request, each change of a
key's state one line saying what, until when and why.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from orproxy.app import App
from orproxy.keys import key_id
from orproxy.observe.metrics import LATENCY_BUCKETS
from tests.conftest import ACCESS_KEY, AUTH, KEYS, ProxyFactory
from tests.fakeor import FakeOpenRouter, rate_limited_body, reset_ms
from tests.procs import proxy_process
from tests.rawhttp import connected
from tests.test_accounting import (
    CHAT,
    CLAUDE,
    GPT,
    MESSAGES,
    MINI,
    PROVIDER_ERROR,
    RESPONSES,
    Reply,
    Scrape,
    Tokens,
    Upstream,
    ask,
    chat_json,
    chat_stream,
    get,
    in_band_json,
    messages_stream,
    relay,
    responses_json,
    scrape,
)

pytestmark = pytest.mark.anyio

REQUEST_BODY = b'{"model":"m","messages":[]}'  # what ``ask`` sends


# --- traffic of every kind ------------------------------------------------------------------


def error_reply(status: int, error: dict[str, Any],
                headers: list[tuple[bytes, bytes]] | None = None) -> Reply:
    return Reply([json.dumps(error).encode()], status=status, headers=headers or [])


INVALID = {"error": {"code": 401, "message": "User not found."}}


@dataclass
class Traffic:
    upstream: Upstream
    reset: int  # the X-RateLimit-Reset (epoch ms) the limited key got
    forwarded: int  # requests forwarded (each answered 2xx in the end)
    delivered_bytes: int  # body bytes of the answers the clients got


async def traffic(app: App, fake: FakeOpenRouter) -> Traffic:
    """Success (JSON and a stream), a 429 with a reset then another key, an in-band error,
    a 401 then another key, /health and a 404."""
    upstream = Upstream(fake)
    reset = reset_ms(600)
    limited = error_reply(429, rate_limited_body(reset))
    exchanges = [
        (CHAT, [chat_json(GPT, Tokens(10, 5, 2, 1, 1, 0.01))]),
        (CHAT, [chat_stream(GPT, Tokens(20, 6, 0, 0, 2, 0.02))]),
        (RESPONSES, [limited, responses_json(MINI, Tokens(30, 7, 4, 0, 3, 0.03))]),
        (CHAT, [in_band_json(PROVIDER_ERROR)]),
        (MESSAGES, [error_reply(401, INVALID), messages_stream(CLAUDE)]),
    ]
    delivered = 0
    for target, replies in exchanges:
        upstream.play(*replies)
        await relay(app.port, target, replies[-1])
        delivered += len(replies[-1].body)
    assert (await get(app.port, b"/health", ())).status == 200
    assert (await get(app.port, b"/nope", ())).status == 404
    return Traffic(upstream, reset, len(exchanges), delivered)


# --- 3. metrics -----------------------------------------------------------------------------

# The metrics the dashboard, the Grafana board and the docs rely on, with their types.
EXPECTED = {
    "orproxy_requests": "counter",
    "orproxy_request_duration_seconds": "histogram",
    "orproxy_upstream_first_byte_seconds": "histogram",
    "orproxy_upstream_attempts": "counter",
    "orproxy_request_body_bytes": "counter",
    "orproxy_response_body_bytes": "counter",
    "orproxy_client_connections": "gauge",
    "orproxy_client_connections_accepted": "counter",
    "orproxy_keys": "gauge",
    "orproxy_key_state": "gauge",
    "orproxy_key_available": "gauge",
    "orproxy_key_cooldown_seconds": "gauge",
    "orproxy_key_rest_until_timestamp_seconds": "gauge",
    "orproxy_key_requests": "counter",
    "orproxy_key_successes": "counter",
    "orproxy_key_rate_limited": "counter",
    "orproxy_key_errors": "counter",
    "orproxy_key_tokens": "counter",
    "orproxy_key_cost_usd": "counter",
    "orproxy_model_requests": "counter",
    "orproxy_model_tokens": "counter",
    "orproxy_model_cost_usd": "counter",
    "orproxy_tokens": "counter",
    "orproxy_cost_usd": "counter",
    "orproxy_upstream_connections": "gauge",
    "orproxy_upstream_connections_opened": "counter",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "process_start_time_seconds": "gauge",
}
LABELS = {  # label names per family (le aside)
    "orproxy_requests": {"route", "method", "status"},
    "orproxy_request_duration_seconds": {"route"},
    "orproxy_upstream_first_byte_seconds": set(),
    "orproxy_upstream_attempts": {"outcome"},
    "orproxy_keys": {"state"},
    "orproxy_key_state": {"key_id", "state"},
    "orproxy_key_rest_until_timestamp_seconds": {"key_id"},
    "orproxy_key_requests": {"key_id"},
    "orproxy_key_errors": {"key_id", "kind"},
    "orproxy_key_tokens": {"key_id", "kind"},
    "orproxy_key_cost_usd": {"key_id"},
    "orproxy_model_tokens": {"model", "kind"},
    "orproxy_upstream_connections": {"state"},
}
NAME = re.compile(r"(orproxy|process)_[a-z0-9]+(_[a-z0-9]+)*")
# units as Prometheus wants them: base units, spelled out, at the end of the name
BAD_UNITS = re.compile(r"_(ms|msec|milliseconds|us|microseconds|minutes|hours|days|kb|mb|gb|"
                       r"kib|mib|percent|pct)(_|$)")
UNIT_WORDS = ("seconds", "bytes", "ratio", "usd", "fds", "info")


def secret_pieces() -> list[str]:
    """Every 12-character slice of each key past ``sk-or-v1-``, and of the access key."""
    pieces = []
    for secret in [k[len("sk-or-v1-"):] for k in KEYS] + [ACCESS_KEY]:
        pieces += [secret[i:i + 12] for i in range(max(len(secret) - 11, 1))]
    return pieces


def assert_conventions(scraped: Scrape) -> None:
    histograms = {n for n, f in scraped.families.items() if f.type == "histogram"}
    for name, family in scraped.families.items():
        assert NAME.fullmatch(name), name
        assert not BAD_UNITS.search(name), f"{name}: not a base unit"
        base = name.removesuffix("_created")
        created = base != name and scraped.families.get(base) is not None
        if created:  # prometheus_client's creation time of a counter or histogram
            assert scraped.families[base].type in ("counter", "histogram"), name
            continue
        if family.type == "counter":
            assert {s.name for s in family.samples} <= {f"{name}_total"}, name
            assert not name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), f"{name}: _total is for counters"
        if family.type == "histogram":
            assert name.endswith(("_seconds", "_bytes")), f"{name}: a histogram needs a unit"
            assert {s.name for s in family.samples} <= {
                f"{name}_bucket", f"{name}_count", f"{name}_sum"}, name
        if "timestamp" in name:
            assert name.endswith("_timestamp_seconds"), name
        if "duration" in name or "cooldown" in name or "seconds" in family.documentation:
            assert "_seconds" in name, f"{name}: time in seconds, named so"
    for name in histograms:
        for s in scraped.families[name].samples:
            if s.name.endswith("_bucket"):
                assert set(s.labels) - {"le"} == LABELS.get(name, set(s.labels) - {"le"})


def assert_no_key_in_labels(scraped: Scrape) -> None:
    pieces = secret_pieces()
    ids = {key_id(k) for k in KEYS}
    for (name, labels), _ in scraped.samples.items():
        for label, value in labels:
            assert "sk-or" not in value, (name, label)
            assert not any(p in value for p in pieces), (name, label)
            if label == "key_id":
                assert value in ids, (name, value)
        assert "key" not in dict(labels) and "api_key" not in dict(labels), name


async def test_every_metric_is_there_after_traffic_with_the_values_it_implies(
    proxy: App, fake: FakeOpenRouter,
) -> None:
    done = await traffic(proxy, fake)
    k0, k1, k2 = (key_id(k) for k in KEYS)
    assert done.upstream.keys == [k0, k1, k2, k0, k1, k0, k1]
    resp = await get(proxy.port, b"/metrics/raw")
    assert resp.header(b"content-type") == b"text/plain; version=1.0.0; charset=utf-8"
    scraped = Scrape(resp.body.decode())

    for name, kind in EXPECTED.items():
        assert name in scraped.families, name
        assert scraped.families[name].type == kind, name
        assert scraped.families[name].samples, f"{name} has no sample"
        assert scraped.families[name].documentation, f"{name} has no help"
    for name, labels in LABELS.items():
        for s in scraped.families[name].samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
    assert_conventions(scraped)
    assert_no_key_in_labels(scraped)

    # requests by route, method and status class; latency by route
    value = scraped.value
    assert value("orproxy_requests_total", route="forward", method="POST",
                 status="2xx") == done.forwarded
    assert value("orproxy_requests_total", route="health", method="GET", status="2xx") == 1
    assert value("orproxy_requests_total", route="not_found", method="GET", status="4xx") == 1
    assert value("orproxy_request_duration_seconds_count", route="forward") == done.forwarded
    # buckets from 1 ms to 10 min, then +Inf, for both histograms
    where: dict[str, str]
    for hist, where in (("orproxy_request_duration_seconds", {"route": "forward"}),
                        ("orproxy_upstream_first_byte_seconds", {})):
        bounds = sorted(float(dict(ls)["le"]) for ls in scraped.series(f"{hist}_bucket")
                        if dict(ls).items() >= where.items())
        assert bounds[0] == 0.001 and bounds[-2] == 600.0 and math.isinf(bounds[-1]), hist
        assert bounds[:-1] == list(LATENCY_BUCKETS)
        assert value(f"{hist}_bucket", le="+Inf", **where) == value(f"{hist}_count", **where)
    # every attempt that got a head: 5 answers, a 429, a 401
    assert value("orproxy_upstream_first_byte_seconds_count") == 7
    assert {dict(ls)["outcome"]: v for ls, v in
            scraped.series("orproxy_upstream_attempts_total").items()} == {
        "ok": 5, "key_limited": 1, "key_invalid": 1}
    assert value("orproxy_request_body_bytes_total") == done.forwarded * len(REQUEST_BODY)
    assert value("orproxy_response_body_bytes_total") == done.delivered_bytes

    # per key: attempts, whole answers, 429s, errors by kind, state, rest end
    assert {k: value("orproxy_key_requests_total", key_id=k) for k in (k0, k1, k2)} == {
        k0: 3, k1: 3, k2: 1}
    assert {k: value("orproxy_key_successes_total", key_id=k) for k in (k0, k1, k2)} == {
        k0: 2, k1: 2, k2: 0}  # k1's in-band error is no success
    assert {k: value("orproxy_key_rate_limited_total", key_id=k) for k in (k0, k1, k2)} == {
        k0: 0, k1: 0, k2: 1}
    assert {tuple(sorted(ls)): v for ls, v in
            scraped.series("orproxy_key_errors_total").items()} == {
        (("key_id", k0), ("kind", "401")): 1, (("key_id", k1), ("kind", "in_band_502")): 1,
        (("key_id", k2), ("kind", "429")): 1}
    for kid, state in ((k0, "disabled"), (k1, "available"), (k2, "cooling")):
        assert {dict(ls)["state"]: v for ls, v in scraped.series("orproxy_key_state").items()
                if dict(ls)["key_id"] == kid} == {
            "available": 0, "free_limited": 0, "cooling": 0, "disabled": 0, state: 1}
    assert {dict(ls)["state"]: v for ls, v in scraped.series("orproxy_keys").items()} == {
        "available": 1, "free_limited": 0, "cooling": 1, "disabled": 1}
    # the rest ends when OpenRouter said (its reset is epoch milliseconds)
    assert value("orproxy_key_rest_until_timestamp_seconds", key_id=k2) == pytest.approx(
        done.reset / 1000, abs=2)
    assert value("orproxy_key_cooldown_seconds", key_id=k2) == pytest.approx(
        done.reset / 1000 - time.time(), abs=2)
    assert value("orproxy_key_rest_until_timestamp_seconds", key_id=k1) == 0
    assert value("orproxy_key_rest_until_timestamp_seconds", key_id=k0) == 0  # disabled
    for kid in (k0, k1, k2):
        assert {dict(ls)["kind"] for ls in scraped.series("orproxy_key_tokens_total")
                if dict(ls)["key_id"] == kid} == {
            "prompt", "completion", "cached", "cache_write", "reasoning"}
    # the process itself
    assert value("process_resident_memory_bytes") > 1 << 20
    assert value("process_open_fds") > 0
    assert 0 < value("process_start_time_seconds") <= time.time()


async def test_openmetrics_exposition_has_the_same_metrics(proxy: App,
                                                           fake: FakeOpenRouter) -> None:
    await traffic(proxy, fake)
    text = Scrape((await get(proxy.port, b"/metrics/raw")).body.decode())
    resp = await get(proxy.port, b"/metrics/raw", [
        AUTH, (b"Accept", b"application/openmetrics-text; version=1.0.0; charset=utf-8")])
    assert resp.status == 200
    assert resp.header(b"content-type") == (
        b"application/openmetrics-text; version=1.0.0; charset=utf-8")
    body = resp.body.decode()
    assert body.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(body)}  # type: ignore[no-untyped-call]
    plain = {n for n in text.families
             if not (n.endswith("_created") and n.removesuffix("_created") in text.families)}
    assert set(families) == plain
    for name, family in families.items():
        assert family.type == text.families[name].type, name
        if family.type == "counter":
            assert {s.name for s in family.samples} <= {f"{name}_total", f"{name}_created"}


async def test_connection_gauges_follow_client_and_upstream_connections(
    proxy: App, fake: FakeOpenRouter,
) -> None:
    upstream = Upstream(fake)
    gate = asyncio.Event()
    reply = chat_stream(GPT, Tokens(1, 1))
    upstream.play(Reply(reply.pieces, reply.ctype, chunked=True, gate=gate))
    async with connected(proxy.port) as client:
        await client.request()
        head = await client.head()
        assert head.status_code == 200
        first = await client.data()  # the first piece: the stream is open both sides
        scraped = await scrape(proxy.port)
        assert scraped.value("orproxy_client_connections") == 2  # the stream and this scrape
        assert scraped.value("orproxy_upstream_connections", state="active") == 1
        assert scraped.value("orproxy_upstream_connections", state="idle") == 0
        gate.set()
        assert first is not None and first + await client.body() == reply.body

    async def settled() -> Scrape:
        async with asyncio.timeout(5):
            while True:
                scraped = await scrape(proxy.port)
                if scraped.value("orproxy_client_connections") == 1:
                    return scraped
                await asyncio.sleep(0.02)

    scraped = await settled()
    assert scraped.value("orproxy_upstream_connections", state="active") == 0
    assert scraped.value("orproxy_upstream_connections", state="idle") == 1
    assert fake.open_connections == 1  # the idle one, kept for the next request
    assert scraped.value("orproxy_upstream_connections_opened_total") == 1
    assert scraped.value("orproxy_client_connections_accepted_total") >= 3


@pytest.mark.parametrize("enabled", [False, True], ids=["default", "enabled"])
async def test_system_metrics_only_when_enabled(make_proxy: ProxyFactory,
                                                enabled: bool) -> None:
    app = await make_proxy(metrics={"enable_system_metrics": enabled})
    scraped = await scrape(app.port)
    system = {n for n in scraped.families if n.startswith("orproxy_system_")}
    if not enabled:
        assert system == set()
        return
    assert system == {"orproxy_system_cpu_utilization_ratio", "orproxy_system_memory_used_bytes",
                      "orproxy_system_memory_total_bytes"}
    assert all(scraped.families[n].type == "gauge" for n in system)
    assert 0 <= scraped.value("orproxy_system_cpu_utilization_ratio") <= 1
    used = scraped.value("orproxy_system_memory_used_bytes")
    assert 0 < used < scraped.value("orproxy_system_memory_total_bytes")
    assert_conventions(scraped)


# --- 4. Server-Timing and X-Process-Time ----------------------------------------------------

UPSTREAM_DELAY = 0.05


def timing(resp_headers: Iterable[tuple[bytes, bytes]]) -> tuple[float, float, float]:
    """(upstream ms, proxy ms, total ms) from Server-Timing and X-Process-Time."""
    headers = [(n.lower(), v) for n, v in resp_headers]
    [server_timing] = [v for n, v in headers if n == b"server-timing"]
    [process_time] = [v for n, v in headers if n == b"x-process-time"]
    metrics: dict[str, float] = {}
    for entry in server_timing.decode().split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        assert re.fullmatch(r"[A-Za-z0-9_-]+", name), entry
        [dur] = [float(p.partition("=")[2]) for p in params if p.startswith("dur=")]
        metrics[name] = dur
    assert list(metrics) == ["upstream", "proxy"]
    assert re.fullmatch(rb"\d+\.\d{4}", process_time), process_time
    return metrics["upstream"], metrics["proxy"], float(process_time) * 1000


@pytest.mark.parametrize("kind", ["json", "sse", "after-a-429"])
async def test_server_timing_and_process_time_on_proxied_responses(
    proxy: App, fake: FakeOpenRouter, kind: str,
) -> None:
    upstream = Upstream(fake)
    reply = chat_stream(GPT, Tokens(1, 1)) if kind == "sse" else chat_json(GPT, Tokens(1, 1))
    reply.delay = UPSTREAM_DELAY
    tries = 1
    if kind == "after-a-429":
        upstream.play(Reply([json.dumps(rate_limited_body(reset_ms(60))).encode()],
                            status=429, delay=UPSTREAM_DELAY))
        tries = 2
    upstream.play(reply)
    started = time.monotonic()
    resp = await relay(proxy.port, CHAT, reply)
    elapsed_ms = (time.monotonic() - started) * 1000
    up, own, total = timing(resp.headers)
    # the upstream's part is every attempt's wait, never more than the whole
    assert up >= tries * UPSTREAM_DELAY * 1000 - 1
    assert up <= total + 0.1
    assert own >= 0
    assert up + own == pytest.approx(total, abs=0.2)
    assert total <= elapsed_ms


# --- 4. logs: the proxy as a process, JSON lines ---------------------------------------------


ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
ACCESS_FIELDS = {"rid", "method", "path", "route", "status", "ms", "key", "attempts",
                 "outcome", "bytes"}


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every stderr line as a JSON object with the four fields every line has."""
    lines = []
    for line in text.splitlines():
        doc = json.loads(line)  # not JSON: fails here, naming the line
        assert isinstance(doc, dict), line
        assert {"timestamp", "level", "logger", "message"} <= set(doc), line
        assert ISO_UTC.fullmatch(doc["timestamp"]), line
        assert doc["level"] in LEVELS, line
        assert isinstance(doc["logger"], str) and isinstance(doc["message"], str), line
        lines.append(doc)
    return lines


def when(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def rested_line(stderr: Path) -> dict[str, Any] | None:
    for line in stderr.read_text().splitlines():
        doc = json.loads(line)
        if doc.get("event") == "key_rested":
            assert isinstance(doc, dict)
            return doc
    return None


async def rest_left(stderr: Path) -> float:
    """Seconds until the rest announced by the first ``key_rested`` line ends (its time plus
    its length), waiting for the line to reach the file."""
    deadline = time.monotonic() + 5
    while (doc := rested_line(stderr)) is None:
        assert time.monotonic() < deadline, "no key_rested line"
        await asyncio.sleep(0.02)
    return max(when(doc["timestamp"]) + float(doc["seconds"]) - time.time(), 0.0)


async def test_json_logs_carry_request_ids_and_one_line_per_key_change(
    fake: FakeOpenRouter, ca_file: str, tmp_path: Path,
) -> None:
    upstream = Upstream(fake)
    k0, k1, k2 = (key_id(k) for k in KEYS)
    started = time.time()
    async with proxy_process(tmp_path, fake.port, ca_file,
                             server={"log_format": "json", "http_log_level": "INFO"}) as proxy:
        # an upstream failure: the request id in, out, upstream, and on its warning
        upstream.play("reset")
        resp = await ask(proxy.port, headers=[(b"X-Request-ID", b"abc-123")])
        assert resp.status == 502
        assert resp.header(b"x-request-id") == b"abc-123"
        assert upstream.requests[-1].header(b"x-request-id") == b"abc-123"
        # a 429 that rests its key a second, a 401 that disables one, then an answer
        reset = reset_ms(1)
        message = "Rate limit exceeded: limit_rpm/openai/gpt-4o/abc. High demand."
        answer = chat_json(GPT, Tokens(11, 4, 0, 0, 0, 0.007))
        upstream.play(error_reply(429, rate_limited_body(reset, message)),
                      error_reply(401, INVALID), answer)
        resp = await ask(proxy.port, headers=[(b"X-Request-ID", b"lim-1")])
        assert resp.status == 200 and resp.body == answer.body
        assert resp.header(b"x-request-id") == b"lim-1"
        assert upstream.keys == [k0, k1, k2, k0]
        assert [r.header(b"x-request-id") for r in upstream.requests[1:]] == [b"lim-1"] * 3
        # the rest's end, from the line that announced it (nothing else may look at the key
        # before the next request does: a look is what announces a return)
        await asyncio.sleep(await rest_left(proxy.stderr) + 0.1)
        # the rest is over: the next request brings the key back, and says so
        upstream.play(chat_json(GPT, Tokens(1, 1)))
        resp = await ask(proxy.port, headers=[(b"X-Request-ID", b"back-1")])
        assert resp.status == 200
        assert await proxy.stop() == 0
    lines = json_lines(proxy.stderr.read_text())
    assert proxy.stdout.read_text() == ""

    by_rid: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_rid.setdefault(line.get("request_id", ""), []).append(line)
    unrelated = by_rid.pop("")
    assert any(line["message"].startswith("listening on") for line in unrelated)
    assert any(line["message"] == "stopped" for line in unrelated)
    assert not [line for line in unrelated if line["logger"] == "orproxy.access"]

    # the failed request: its attempt, its warning and its access line, all with its id
    failed = by_rid["abc-123"]
    assert {(line["logger"], line["level"]) for line in failed} == {
        ("orproxy.proxy.attempts", "INFO"), ("orproxy.proxy.forward", "WARNING"),
        ("orproxy.access", "INFO")}
    [warning] = [line for line in failed if line["level"] == "WARNING"]
    assert warning["message"].startswith("upstream failed")
    [access] = [line for line in failed if line["logger"] == "orproxy.access"]
    assert set(access) >= ACCESS_FIELDS
    assert (access["rid"], access["status"], access["outcome"], access["key"],
            access["attempts"], access["method"], access["path"], access["route"]) == (
        "abc-123", 502, "upstream_error", k0, 1, "POST", "/api/v1/chat/completions",
        "forward")

    # the rotated request: one line per key change, each with the request's id
    rotated = by_rid["lim-1"]
    [rested] = [line for line in lines if line.get("event") == "key_rested"]
    [disabled] = [line for line in lines if line.get("event") == "key_disabled"]
    [returned] = [line for line in lines if line.get("event") == "key_returned"]
    assert rested in rotated and disabled in rotated
    assert (rested["logger"], rested["level"], rested["key"]) == ("orproxy.keys", "WARNING", k1)
    assert rested["reason"] == "429 limit_rpm/openai/gpt-4o/abc"
    assert when(rested["until"]) == pytest.approx(reset / 1000, abs=1.5)
    assert rested["until"] in rested["message"]  # until when
    assert "429 limit_rpm/openai/gpt-4o/abc" in rested["message"]  # why
    assert message in rested["message"]  # OpenRouter's words
    assert (disabled["logger"], disabled["level"], disabled["key"]) == (
        "orproxy.keys", "WARNING", k2)
    assert disabled["reason"] == "401 invalid key"
    assert "disabled: 401 invalid key" in disabled["message"]
    assert (returned["logger"], returned["level"], returned["key"]) == ("orproxy.keys", "INFO", k1)
    assert "back in rotation" in returned["message"]
    assert returned["request_id"] == "back-1"
    assert when(returned["timestamp"]) >= reset / 1000 - 0.01
    [access] = [line for line in rotated if line["logger"] == "orproxy.access"]
    assert (access["status"], access["attempts"], access["key"], access["outcome"]) == (
        200, 3, k0, "ok")
    assert (access["model"], access["prompt_tokens"], access["completion_tokens"],
            access["cost"]) == (GPT, 11, 4, 0.007)
    assert ACCESS_FIELDS | {"model", "prompt_tokens", "completion_tokens", "cost"} <= set(access)
    assert all(started - 1 <= when(line["timestamp"]) <= time.time() + 1 for line in lines)
    # nothing else came from this run's requests
    assert set(by_rid) == {"abc-123", "lim-1", "back-1"}
