"""End-to-end tests for the ten defects found from outside (issue 6), one section each.

Each test drives the proxy as a client would (raw HTTP over loopback, against the fake
OpenRouter), or as a user runs it (``python -m orproxy`` under resource limits), and fails
on the code before the fix:
1. no resend of a request the upstream may have received; the access line names the key;
2. descriptor exhaustion: no spin, no log flood, /health served, max_connections lowered;
3. public endpoints public for reading only; a large body held once;
4. impossible chunk sizes refused at once;
5. idle upstream connections closed by the upstream dropped at once (no CLOSE-WAIT);
6. the shutdown grace running out: 503 before the head, a cut after it;
7. error answers and config errors in our own words, never the client's bytes or secrets;
8. dot segments however encoded;
9. local pages never cached;
10. OpenRouter's words on every no-key 429.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import ssl
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from orproxy.app import App
from orproxy.config import ConfigError, build_config
from orproxy.errors import ClientRequestError
from orproxy.http.chunks import ChunkedGuard
from orproxy.keys import key_id
from tests.conftest import ACCESS_KEY, AUTH, KEYS, ProxyFactory
from tests.fakeor import (
    FakeOpenRouter,
    Recorded,
    Responder,
    SlowReadingFake,
    completion,
    error_of,
    rate_limited_body,
    reset_ms,
)
from tests.procs import (
    PeakSampler,
    cpu_seconds,
    open_file_limit,
    proxy_process,
    rss_bytes,
    run_orproxy,
)
from tests.rawhttp import LAST_CHUNK, RawClient, Response, connected, roundtrip
from tests.streamhelpers import eventually

AUTH_LINE = b"Authorization: " + AUTH[1] + b"\r\n"
CHAT_BODY = b'{"model":"google/gemma-3-27b-it:free","messages":[{"role":"user","content":"hi"}]}'


def post(path: bytes = b"/api/v1/chat/completions", body: bytes = CHAT_BODY, *,
         auth: bool = True, extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: proxy\r\n" + (AUTH_LINE if auth else b"")
            + b"Content-Type: application/json\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def get(path: bytes, *, auth: bool = True) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: proxy\r\n" + (AUTH_LINE if auth else b"") + b"\r\n"


def key_used(req: Recorded) -> str:
    """The upstream key the proxy put on ``req``, as one of KEYS."""
    auth = req.header(b"authorization")
    assert auth is not None and auth.startswith(b"Bearer "), auth
    secret = auth[len(b"Bearer "):].decode()
    assert secret in KEYS
    return secret


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "orproxy.access"]


def access_fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


class Gate:
    """Holds fake-upstream scripts until the test lets them go (bounded, so no task is left
    waiting after a test)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self, seconds: float = 20.0) -> None:
        await asyncio.wait_for(self.event.wait(), seconds)

    def open(self) -> None:
        self.event.set()


# --- 1. a request the upstream may have received is never sent again --------------------------


FAILURES = {"no_answer_in_time": (504, "upstream timed out"),
            "no_answer_in_time_on_a_reused_connection": (504, "upstream timed out"),
            "closed_without_answer": (502, "upstream sent an invalid or incomplete response")}


@pytest.mark.anyio
@pytest.mark.parametrize("failure", sorted(FAILURES))
async def test_request_the_upstream_may_have_received_is_sent_once(
    failure: str, make_proxy: ProxyFactory, fake: FakeOpenRouter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RFC 9110 §9.2.2: a POST that timed out waiting for its first byte (on a new or a
    pooled connection), or whose connection closed after it was written whole, may be
    running upstream: no other key and no other connection gets it. The client gets 504 /
    502 in OpenRouter's shape; the access line shows the one attempt and its key."""
    caplog.set_level(logging.INFO, logger="orproxy.access")
    gate = Gate()
    warm = failure.endswith("reused_connection")  # one good exchange first: a pooled conn

    async def script(req: Recorded, resp: Responder) -> None:
        if warm and len(fake.requests) == 1:
            await resp.json(200, completion())
        elif failure == "closed_without_answer":
            resp.abort()  # the whole request was read (it is recorded): no answer at all
        else:
            await gate.wait()

    fake.script = script
    app = await make_proxy(timeouts={"upstream_first_byte_seconds": 0.5})
    if warm:
        assert (await roundtrip(app.port, post())).status == 200
    try:
        resp = await roundtrip(app.port, post(), timeout=10)
    finally:
        gate.open()
    status, message = FAILURES[failure]
    await asyncio.sleep(0.2)  # a resend, if any, would have reached the fake by now
    sent = fake.requests[warm:]
    assert len(sent) == 1
    assert sent[0].body == CHAT_BODY
    assert sent[0].conn_id == 1  # on the pooled connection, when there was one
    assert resp.status == status
    assert error_of(resp)["message"] == message
    line = access_lines(caplog)[-1]
    fields = access_fields(line)
    assert fields["path"] == "/api/v1/chat/completions"
    assert fields["status"] == str(status)
    assert fields["attempts"] == "1"
    assert fields["key"] == key_id(key_used(sent[0]))
    assert fields["outcome"] == "upstream_error"
    assert all(k not in line for k in KEYS)
    assert resp.header(b"cache-control") == b"no-store"  # an error of ours: never cached


# --- 2. descriptor exhaustion ---------------------------------------------------------------

LIMIT_WORDS = re.compile(r"descriptor|open-file|connection cap|accept|too many open files",
                         re.IGNORECASE)
CAP_LINE = re.compile(r"max_connections lowered from 4096 to (\d+): the open-file limit is 256")


@pytest.mark.anyio
async def test_descriptor_exhaustion_is_served_within_a_budget(
    fake: FakeOpenRouter, ca_file: str, tmp_path: Path
) -> None:
    """Under ``ulimit -n 256`` and 300 clients at once on a slow upstream: the proxy caps
    its connections (and says so at start), every client it takes gets a proper answer
    (forwarded, or a quick 503 from the reserve; never "upstream unreachable" for want of a
    descriptor), it neither spins nor floods its log while clients wait in the backlog,
    and /health answers while it is saturated."""
    gate = Gate()

    async def slow(req: Recorded, resp: Responder) -> None:
        await gate.wait()
        await resp.json(200, completion())

    fake.script = slow
    async with proxy_process(tmp_path, fake.port, ca_file, nofile=(256, 256)) as proxy:
        match = CAP_LINE.search(proxy.log())
        assert match, proxy.log()
        cap = int(match.group(1))
        assert 8 <= cap <= 128  # two descriptors a connection, within 256 less a reserve

        clients = [asyncio.ensure_future(roundtrip(proxy.port, post())) for _ in range(300)]
        idle: list[RawClient] = []
        queued: list[asyncio.Future[Response]] = []
        try:
            # the first `cap` clients are forwarded and wait on the upstream; the others
            # are taken from the backlog onto the reserve and told to come back
            await eventually(lambda: len(fake.requests) == cap and
                             sum(c.done() for c in clients) == 300 - cap, 15,
                             "the forwarded clients to wait and the rest to be answered")
            assert len(fake.requests) == cap  # the cap holds: no forwarding beyond it
            early = [c.result() for c in clients if c.done()]
            for resp in early:
                assert resp.status == 503, resp
                assert error_of(resp)["message"] == "proxy at its connection limit; retry shortly"
                assert resp.header(b"retry-after") == b"1"

            # fill the reserve with silent clients, so the next ones stay in the backlog:
            # the listening socket is readable all along, and the proxy must not spin on it
            idle += [await RawClient.connect(proxy.port) for _ in range(8)]
            queued += [asyncio.ensure_future(roundtrip(proxy.port, post())) for _ in range(10)]
            await asyncio.sleep(0.3)
            assert not any(q.done() for q in queued)  # not accepted: at the cap and reserve
            before = cpu_seconds(proxy.pid)
            await asyncio.sleep(2.0)
            spent = cpu_seconds(proxy.pid) - before
            print(f"saturated at cap {cap}: {spent:.2f}s of CPU in 2s")
            assert spent < 0.3, f"{spent:.2f}s of CPU in 2s while saturated"

            for client in idle:  # reserve slots free again: the backlog moves on
                client.close()
            for resp in await asyncio.wait_for(asyncio.gather(*queued), 10):
                assert resp.status == 503
            health = await roundtrip(proxy.port, get(b"/health", auth=False), timeout=5)
            assert health.status == 200, health
            assert json.loads(health.body)["status"] == "ok"
            assert len(fake.requests) == cap  # still saturated: nothing more went up
        except BaseException:
            for task in [*clients, *queued]:
                task.cancel()
            raise
        finally:
            gate.open()
            for client in idle:
                client.close()
        answers = await asyncio.wait_for(asyncio.gather(*clients), 15)
        assert sum(a.status == 200 for a in answers) == cap
        assert sorted({a.status for a in answers}) == [200, 503]  # never a 502
        stderr = proxy.log()
    assert "Traceback" not in stderr
    assert "upstream unreachable" not in stderr and "Too many open files" not in stderr
    about_limit = [line for line in stderr.splitlines() if LIMIT_WORDS.search(line)]
    assert len(about_limit) <= 4, about_limit  # the start-up lines and one note: no flood
    assert ACCESS_KEY not in stderr and all(k not in stderr for k in KEYS)


@pytest.mark.anyio
async def test_soft_open_file_limit_is_raised_to_the_hard_one(
    fake: FakeOpenRouter, ca_file: str, tmp_path: Path
) -> None:
    async with proxy_process(tmp_path, fake.port, ca_file, nofile=(128, 512)) as proxy:
        assert open_file_limit(proxy.pid) == (512, 512)
        resp = await roundtrip(proxy.port, post())
        assert resp.status == 200
        stderr = proxy.log()
    assert re.search(r"listening on .* up to \d+ connections \(open-file limit 512\)", stderr), \
        stderr


# --- 3. public endpoints are public for reading; a large body is held once --------------------


@pytest.mark.anyio
async def test_public_endpoint_is_public_for_reading_only(
    proxy: App, fake: FakeOpenRouter
) -> None:
    async with connected(proxy.port) as client:
        # a large body (within max_body_bytes) announced, a little sent: the 401 must not
        # wait for the rest
        await client.send(b"POST /api/v1/models HTTP/1.1\r\nHost: proxy\r\n"
                          b"Content-Length: 20000000\r\n\r\n" + b"x" * 1000)
        resp = await client.response(b"POST", timeout=3)
        assert resp.status == 401
        assert error_of(resp)["message"] == "missing or invalid access key"
        assert resp.header(b"www-authenticate") == b"Bearer"
        assert resp.header(b"connection") == b"close"
        await client.wait_eof(timeout=3)
    assert fake.requests == []

    resp = await roundtrip(proxy.port, post(b"/api/v1/models", b'{"q":1}'))
    assert resp.status == 200
    [sent] = fake.requests
    assert sent.method == b"POST" and sent.body == b'{"q":1}'
    key_used(sent)  # forwarded with an upstream key

    resp = await roundtrip(proxy.port, get(b"/api/v1/models", auth=False), b"GET")
    assert resp.status == 200
    assert fake.requests[1].header(b"authorization") is None  # reading stays public


BIG_BODY_BYTES = 24 * 1024 * 1024


@pytest.mark.anyio
async def test_large_body_is_held_once(ca_file: str, server_tls: ssl.SSLContext,
                                      tmp_path: Path) -> None:
    """A 24 MB POST to an upstream that reads it slowly: the proxy's resident memory grows
    by at most 1.6× the body (it held 3.7× before: joined copies and a whole-body write)."""
    fake = SlowReadingFake(tls=server_tls)
    await fake.start()
    try:
        async with proxy_process(tmp_path, fake.port, ca_file) as proxy:
            warm = await roundtrip(proxy.port, post(body=b'{"x":' + b"1" * 300_000 + b"}"))
            assert warm.status == 200
            await asyncio.sleep(0.2)
            baseline = rss_bytes(proxy.pid)
            sampler = PeakSampler(proxy.pid)
            sampler.start()
            started = time.monotonic()
            body = b"y" * BIG_BODY_BYTES
            resp = await roundtrip(proxy.port, post(body=body), timeout=60)
            peak = await sampler.stop()
            took = time.monotonic() - started
        assert resp.status == 200
        assert len(fake.requests) == 2 and len(fake.requests[1].body) == BIG_BODY_BYTES
        growth = peak - baseline
        print(f"24 MB body: peak RSS growth {growth / 2**20:.1f} MiB "
              f"({growth / BIG_BODY_BYTES:.2f}x), {sampler.samples} samples in {took:.1f}s")
        assert sampler.samples >= 20  # the upstream took its time: the sampling saw it
        assert growth <= 1.6 * BIG_BODY_BYTES, f"{growth / BIG_BODY_BYTES:.2f}x"
    finally:
        await fake.stop()


# --- 4. impossible chunk sizes ---------------------------------------------------------------

CHUNKED_HEAD = (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n" + AUTH_LINE
                + b"Transfer-Encoding: chunked\r\n\r\n")


@pytest.mark.anyio
@pytest.mark.parametrize(("line", "status", "message"), [
    (b"000000000000000001\r\n", 400, "bad chunked framing (chunk size too long)"),
    (b"000000000000000001", 400, "bad chunked framing (chunk size too long)"),
    (b"10000\r\n", 413, "request body too large"),
    (b"5\r\nhello\r\n10000", 413, "request body too large"),
], ids=["18_digits", "18_digits_no_crlf", "over_limit", "second_chunk_over_limit"])
async def test_impossible_chunk_size_is_refused_at_once(
    line: bytes, status: int, message: str, make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    """The chunk-size line alone decides: the answer comes while the client sends nothing
    more (h11 would wait for bytes that can never come)."""
    app = await make_proxy(limits={"max_body_bytes": 1000})
    async with connected(app.port) as client:
        await client.send(CHUNKED_HEAD + line)
        resp = await client.response(b"POST", timeout=1.0)
        assert resp.status == status
        assert error_of(resp)["message"] == message
        assert resp.header(b"connection") == b"close"
        await client.wait_eof(timeout=1.0)
    assert fake.requests == []


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.sets(st.integers(1, max(len(data) - 1, 1)), max_size=6)))
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)]) if data[a:b]]


GOOD_CHUNKED = b"3;ext=1\r\nabc\r\n1F4\r\n" + b"z" * 500 + b"\r\n0\r\nX-T: 1\r\n\r\n"


@given(st.data())
def test_chunk_guard_decides_the_same_however_the_bytes_are_split(data: st.DataObject) -> None:
    """The guard beside h11 sees the body in whatever pieces TCP gives: a good body passes
    whole, an impossible size is refused by the time its line has arrived."""
    guard = ChunkedGuard(1000)
    for piece in data.draw(split(GOOD_CHUNKED)):
        guard.feed(piece)
    assert guard.done

    bad, status = data.draw(st.sampled_from([
        (b"3\r\nabc\r\n" + b"0" * 17 + b"\r\n", 400),
        (b"3\r\nabc\r\n3E6\r\n", 413),  # 998 + 3 > 1000
        (b"3\r\nabc\r\n" + b"0" * 16 + b"3E8\r\n", 400),  # too many digits, small value
    ]))
    guard = ChunkedGuard(1000)
    with pytest.raises(ClientRequestError) as info:
        for piece in data.draw(split(bad)):
            guard.feed(piece)
    assert info.value.status == status


# --- 5. idle upstream connections closed by the upstream --------------------------------------


def sockets_to(port: int) -> list[str]:
    """The states of this process's TCP sockets to ``port`` (a socket the peer closed and
    we did not shows as CLOSE_WAIT)."""
    return [c.status for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port]


@pytest.mark.anyio
async def test_idle_connection_closed_by_upstream_leaves_the_pool_at_once(
    proxy: App, fake: FakeOpenRouter
) -> None:
    gate = Gate()
    closers: set[asyncio.Task[None]] = set()

    async def close_later(resp: Responder) -> None:
        await gate.wait()
        resp.writer.close()  # an orderly close of the kept-alive connection

    async def script(req: Recorded, resp: Responder) -> None:
        await resp.json(200, completion())
        if len(fake.requests) == 1:
            task = asyncio.get_running_loop().create_task(close_later(resp))
            closers.add(task)

    fake.script = script
    pool = proxy.services.upstream
    try:
        assert (await roundtrip(proxy.port, post())).status == 200
        await eventually(lambda: pool.snapshot().idle == 1, 2, "the connection to be pooled")
        assert sockets_to(fake.port) == [psutil.CONN_ESTABLISHED]
    finally:
        gate.open()
    await eventually(lambda: pool.snapshot().idle == 0, 1, "the closed connection to leave")
    # our side is closed too: no socket left behind in CLOSE_WAIT
    await eventually(lambda: sockets_to(fake.port) == [], 1, "our side to be closed")
    assert pool.snapshot().dropped_idle == 1

    assert (await roundtrip(proxy.port, post())).status == 200
    assert fake.opened == 2  # a fresh connection, not the dead one
    assert [r.conn_id for r in fake.requests] == [1, 2]
    await asyncio.gather(*closers)


# --- 6. the shutdown grace running out --------------------------------------------------------


@pytest.mark.anyio
async def test_grace_running_out_before_the_head_answers_503(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    gate = Gate()

    async def slow(req: Recorded, resp: Responder) -> None:
        await gate.wait()

    fake.script = slow
    app = await make_proxy(timeouts={"shutdown_grace_seconds": 0.5})
    client = await RawClient.connect(app.port)
    try:
        await client.send(post())
        await eventually(lambda: len(fake.requests) == 1, 5, "the request to go up")
        shutdown = asyncio.ensure_future(app.shutdown())
        resp = await client.response(b"POST", timeout=5)
        assert resp.status == 503
        assert error_of(resp)["message"] == "proxy shutting down; retry shortly"
        assert resp.header(b"connection") == b"close"
        assert resp.header(b"retry-after") == b"1"
        await client.wait_eof(timeout=3)
        client.close()
        await asyncio.wait_for(shutdown, 10)
        assert sockets_to(fake.port) == []  # the upstream request was dropped
    finally:
        client.close()
        gate.open()


@pytest.mark.anyio
async def test_grace_running_out_mid_stream_cuts_without_a_final_chunk(
    make_proxy: ProxyFactory, fake: FakeOpenRouter
) -> None:
    gate = Gate()

    async def stream(req: Recorded, resp: Responder) -> None:
        await resp.head(200, [(b"Content-Type", b"text/event-stream")])
        await resp.data(b'data: {"n":1}\n\n')
        await gate.wait()

    fake.script = stream
    app = await make_proxy(timeouts={"shutdown_grace_seconds": 0.5})
    first = b'data: {"n":1}\n\n'
    client = await RawClient.connect(app.port)
    try:
        await client.send(post())
        assert (await client.head(method=b"POST")).status_code == 200
        assert await client.read_exactly(len(first)) == first
        shutdown = asyncio.ensure_future(app.shutdown())
        # the connection ends with nothing more, and not as a complete response would
        assert await client.truncated_body(timeout=5) == b""
        await asyncio.wait_for(shutdown, 10)
    finally:
        client.close()
        gate.open()
    assert not client.raw.endswith(LAST_CHUNK)


# --- 7. our words only: malformed requests and config errors ----------------------------------

MARK = b"ZQXJ7781"  # sent by the client; must never come back
OUR_MESSAGES = {
    "malformed request", "HTTP version not supported", "request target too long",
    "request header section too large", "too many header fields", "invalid Host header",
    "control character in a header field value", "request body too large",
    "both Content-Length and Transfer-Encoding", "Transfer-Encoding in an HTTP/1.0 request",
    "bad chunked framing (bare LF)", "bad chunked framing (chunk size too long)",
    "bad chunked framing (line too long)", "invalid request target",
}
MALFORMED = {
    "header_name": (b"GET /health HTTP/1.1\r\nHost: a\r\nX-" + MARK + b"(bad): v\r\n\r\n",
                    400, "malformed request"),
    "chunked_framing": (CHUNKED_HEAD + b"3\r\nabc\r\n" + MARK + b"\r\n", 400,
                        "malformed request"),
    "content_length": (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: a\r\n" + AUTH_LINE
                       + b"Content-Length: 12" + MARK + b"\r\n\r\n", 400, "malformed request"),
    "request_line": (b"GET /a " + MARK + b" HTTP/1.1\r\nHost: a\r\n\r\n", 400,
                     "malformed request"),
    "request_line_ctl": (b"G\x01T /" + MARK + b" HTTP/1.1\r\nHost: a\r\n\r\n", 400,
                         "malformed request"),
    "http_2_0": (b"GET /api/v1/" + MARK + b" HTTP/2.0\r\nHost: a\r\n" + AUTH_LINE + b"\r\n",
                 505, "HTTP version not supported"),
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_malformed_request_is_answered_in_our_words(
    name: str, proxy: App, fake: FakeOpenRouter
) -> None:
    data, status, message = MALFORMED[name]
    async with connected(proxy.port) as client:
        await client.send(data)
        resp = await client.response(timeout=5)
        await client.wait_eof(timeout=3)
    assert resp.status == status
    error = error_of(resp)
    assert error["message"] == message
    assert error["message"] in OUR_MESSAGES
    assert set(error) == {"code", "message"}
    answer = bytes(client.raw)
    assert MARK not in answer and MARK.lower() not in answer.lower()
    for h11_wording in (b"h11", b"Illegal", b"illegal", b"b'", b'b"', b"\\x", b"Traceback"):
        assert h11_wording not in answer, h11_wording
    assert fake.requests == []


SECRET = "Qm7Zt9Wx4Lp2Rk8Vn3Hd6Fj1Bc5Ys0Tg"  # an access key pasted in the wrong place
SECRET_KEY = "sk-or-v1-" + SECRET[::-1] + "e1d2c3b4a5"  # an OpenRouter key, likewise
CONFIG_CASES = [
    ("server", "log_level", SECRET),
    ("server", "http_log_level", SECRET_KEY),
    ("server", "port", SECRET),
    ("openrouter", "cache_ttl", SECRET_KEY),
    ("openrouter", "enable_cache", SECRET),
    ("openrouter", "ca_file", SECRET_KEY),
    ("openrouter", "public_endpoints", ["/api/v1/models", SECRET]),
    ("openrouter", "public_endpoints", SECRET_KEY),
    ("openrouter", "key_selection_opts", [SECRET]),
    ("openrouter", "key_selection_opts", SECRET_KEY),
    ("openrouter", "key_selection_strategy", SECRET_KEY),
]


def leaked(text: str) -> list[str]:
    """Any 6-character piece of either secret's random part found in ``text``."""
    pieces = []
    for secret in (SECRET, SECRET_KEY[len("sk-or-v1-"):]):
        pieces += [secret[i:i + 6] for i in range(len(secret) - 5)]
    return [p for p in pieces if p in text]


def bad_config(section: str, name: str, value: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"server": {"access_key": ACCESS_KEY}, "openrouter": {"keys": KEYS}}
    doc[section][name] = value
    return doc


@pytest.mark.parametrize(("section", "name", "value"), CONFIG_CASES,
                         ids=[f"{s}.{n}-{type(v).__name__}" for s, n, v in CONFIG_CASES])
def test_config_error_never_echoes_a_secret(section: str, name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(bad_config(section, name, value), {})
    [problem] = info.value.problems
    assert problem.startswith(f"{section}.{name}: "), problem
    assert leaked(problem) == [], problem


def test_check_never_echoes_a_secret(tmp_path: Path) -> None:
    """``orproxy --check`` on a file with a secret in every such setting at once."""
    doc: dict[str, Any] = {"server": {"access_key": ACCESS_KEY}, "openrouter": {"keys": KEYS}}
    seen: set[tuple[str, str]] = set()
    for section, name, value in CONFIG_CASES:
        if (section, name) not in seen:
            seen.add((section, name))
            doc[section][name] = value
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(doc))
    result = run_orproxy("--config", str(config), "--check", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == len(seen), result.stderr
    assert leaked(result.stdout + result.stderr) == []


# --- 8. dot segments however they are written -------------------------------------------------

DOT_TARGETS = [
    b"/api/v1/%2e%2e%2f%2e%2e%2fadmin",
    b"/api/v1/..%2fadmin",
    b"/api/v1/%252e%252e/admin",
    b"/api/v1/..%5cadmin",
    b"/api/v1/.%2E/x",
    b"/api/v1/x/%2E%2e",
    b"/api/v1/x/..\\..\\admin",
    b"/api/v1/%2e/models",
]


@pytest.mark.anyio
@pytest.mark.parametrize("target", DOT_TARGETS, ids=[t.decode() for t in DOT_TARGETS])
async def test_encoded_dot_segments_are_refused(target: bytes, proxy: App,
                                                fake: FakeOpenRouter) -> None:
    for method in (b"GET", b"POST"):
        data = get(target) if method == b"GET" else post(target)
        resp = await roundtrip(proxy.port, data, method, timeout=5)
        assert resp.status == 400, method
        assert error_of(resp)["message"] == "invalid request target"
    assert fake.requests == []


@pytest.mark.anyio
async def test_dots_inside_names_pass(proxy: App, fake: FakeOpenRouter) -> None:
    for target in (b"/api/v1/models/a.b/endpoints", b"/api/v1/models/x..y/endpoints",
                   b"/api/v1/models/.well/a%2Eb", b"/api/v1/models?x=..%2f"):
        resp = await roundtrip(proxy.port, get(target), b"GET", timeout=5)
        assert resp.status == 200, target
    assert [r.target for r in fake.requests] == [
        b"/api/v1/models/a.b/endpoints", b"/api/v1/models/x..y/endpoints",
        b"/api/v1/models/.well/a%2Eb", b"/api/v1/models?x=..%2f"]


# --- 9. local pages are never cached ----------------------------------------------------------


@pytest.mark.anyio
async def test_local_pages_are_not_cacheable_and_proxied_ones_keep_theirs(
    proxy: App, fake: FakeOpenRouter
) -> None:
    local = {
        b"/health": (get(b"/health", auth=False), 200),
        b"/metrics": (get(b"/metrics"), 200),
        b"/metrics/raw": (get(b"/metrics/raw"), 200),
        b"/metrics/json": (get(b"/metrics/json"), 200),
        b"/nope": (get(b"/nope"), 404),
        b"401": (post(auth=False), 401),
        b"401 /metrics": (get(b"/metrics", auth=False), 401),
    }
    for name, (data, status) in local.items():
        method = data.split(b" ", 1)[0]
        resp = await roundtrip(proxy.port, data, method, timeout=5)
        assert resp.status == status, name
        assert resp.headers_named(b"cache-control") == [b"no-store"], name

    async def cacheable(req: Recorded, resp: Responder) -> None:
        if req.target.endswith(b"/models"):
            await resp.json(200, {"data": []}, [(b"Cache-Control", b"public, max-age=60")])
        else:
            await resp.json(200, completion())

    fake.script = cacheable
    resp = await roundtrip(proxy.port, get(b"/api/v1/models", auth=False), b"GET")
    assert resp.status == 200
    assert resp.headers_named(b"cache-control") == [b"public, max-age=60"]
    resp = await roundtrip(proxy.port, post())
    assert resp.status == 200
    assert resp.headers_named(b"cache-control") == []  # none of ours added to theirs


# --- 10. OpenRouter's words on every no-key 429 ----------------------------------------------

DAILY_MESSAGE = ("Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free "
                 "model requests per day")


@pytest.mark.anyio
async def test_every_no_key_429_carries_openrouters_message(
    proxy: App, fake: FakeOpenRouter
) -> None:
    reset = reset_ms(3600)

    async def daily_limit(req: Recorded, resp: Responder) -> None:
        await resp.json(429, rate_limited_body(reset, DAILY_MESSAGE))

    fake.script = daily_limit
    answers: list[Response] = []
    for _ in range(4):
        answers.append(await roundtrip(proxy.port, post()))
    assert len(fake.requests) == len(KEYS)  # the first request rested every key
    assert sorted(key_used(r) for r in fake.requests) == sorted(KEYS)
    for resp in answers:
        assert resp.status == 429
        error = error_of(resp)
        assert error["metadata"]["upstream_message"] == DAILY_MESSAGE
        retry_after = error["metadata"]["retry_after_seconds"]
        assert 3500 < retry_after <= 3601
        assert resp.header(b"retry-after") == str(retry_after).encode()
