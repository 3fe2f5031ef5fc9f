"""The bench's own client, variant parser and report writer (bench/client.py, variants.py,
report.py): real loopback sockets against the bench's fake upstream, started in-process."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import cli, client, payloads, report, workloads
from bench.client import FramingError, Response, ResponseReader, StreamRecorder
from bench.fake_upstream import Stats, UpstreamProtocol
from bench.runner import RunData
from bench.settings import (
    AUTH_HEADERS,
    BENCH_DIR,
    CHAT_PATH,
    HOST,
    MODELS_PATH,
    OUT_DIR,
    QUICK,
    RESULTS_MD,
    Pinning,
    default_pinning,
)
from bench.subjects import variant_problems
from bench.variants import parse_variant

Upstream = tuple[int, Stats]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(stats), HOST, 0)
    yield server.sockets[0].getsockname()[1], stats
    server.close()
    await server.wait_closed()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def raw_server(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, HOST, 0)
    return server, server.sockets[0].getsockname()[1]


def replying(*replies: bytes, close: bool = True) -> Handler:
    """A server that answers each request head with the next reply, then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in replies:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
        if not close:
            await reader.read()  # hold the connection until the client goes
        writer.close()

    return handle


# --- against the fake upstream ------------------------------------------------------------


@pytest.mark.anyio
async def test_non_stream_response(upstream: Upstream) -> None:
    port, _ = upstream
    body = payloads.chat_request_body(False)
    resp = await client.fetch(HOST, port, "POST", CHAT_PATH, headers=AUTH_HEADERS, body=body)
    assert resp.ok, resp.errors
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.body == payloads.CHAT_RESPONSE_BODY
    assert resp.first_byte_perf >= resp.sent_perf > 0
    models = await client.fetch(HOST, port, "GET", MODELS_PATH)  # ~350 KB: many reads
    assert models.ok and models.body == payloads.MODELS_BODY


@pytest.mark.anyio
async def test_stream_chunks_are_stamped_as_they_arrive(upstream: Upstream) -> None:
    # 4 chunks 100 ms apart: a client that stamped them when the response ended would
    # give the first chunk a delay of ~300 ms
    rec = await client.fetch_stream(HOST, upstream[0], chunks=4, delay_ms=100)
    assert rec.ok, rec.errors
    assert rec.next_seq == 4 and rec.done
    assert len(rec.delays_ns) == 4
    assert all(0 <= d < 150e6 for d in rec.delays_ns), rec.delays_ns
    first_event_ms = (rec.first_event_perf - rec.sent_perf) / 1e6
    assert 90 <= first_event_ms < 250, first_event_ms


@pytest.mark.anyio
async def test_stream_of_many_chunks_without_delay(upstream: Upstream) -> None:
    rec = await client.fetch_stream(HOST, upstream[0], chunks=200, delay_ms=0)
    assert rec.ok, rec.errors
    assert rec.next_seq == 200


@pytest.mark.anyio
async def test_keep_alive_connection_is_reused(upstream: Upstream) -> None:
    port, stats = upstream
    conn = client.Client(HOST, port)
    try:
        for _ in range(3):
            resp = await conn.request("GET", MODELS_PATH, Response())
            assert resp.ok, resp.errors
    finally:
        conn.close()
    assert conn.connects == 1
    assert stats.connections == 1 and stats.requests == 3
    ttfb = await client.run_ttfb(HOST, port, requests=5, warmup=2, chunks=3, timeout=5.0)
    assert ttfb.ok == 5 and ttfb.connections == 1 and not ttfb.errors


@pytest.mark.anyio
async def test_connection_close_makes_the_client_reconnect() -> None:
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    server, port = await raw_server(replying(closing))
    conn = client.Client(HOST, port)
    try:
        for _ in range(2):
            resp = await conn.request("GET", "/", Response())
            assert resp.ok and resp.body == b"hi", resp.errors
    finally:
        conn.close()
        server.close()
    assert conn.connects == 2


@pytest.mark.anyio
async def test_w4_streams_against_the_fake(upstream: Upstream) -> None:
    res = await client.run_streams(
        HOST, upstream[0], streams=20, chunks=3, delay_ms=20, stagger_ms=20, timeout=5.0
    )
    assert res.complete == 20 and not res.errors
    assert res.chunks_received == 60
    assert 0 <= res.delay_p50_ms <= res.delay_p99_ms <= res.delay_max_ms


# --- failures are reported, never raised --------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket is closed


@pytest.mark.anyio
async def test_connection_refused_is_reported() -> None:
    port = _closed_port()
    resp = await client.fetch(HOST, port, "GET", "/")
    assert not resp.ok
    assert resp.errors and resp.errors[0].startswith("connect: ConnectionRefusedError")
    rec = await client.fetch_stream(HOST, port, chunks=3, delay_ms=0)
    assert not rec.ok and rec.errors[0].startswith("connect:")
    res = await client.run_streams(HOST, port, 3, 2, 0, 0, timeout=2.0)
    assert res.complete == 0 and sum(res.errors.values()) == 3


@pytest.mark.anyio
async def test_close_mid_response_is_reported() -> None:
    short = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b"
    server, port = await raw_server(replying(short))
    try:
        resp = await client.fetch(HOST, port, "GET", "/")
    finally:
        server.close()
    assert not resp.ok and resp.status == 200
    assert any("connection closed mid-response" in e for e in resp.errors), resp.errors


@pytest.mark.anyio
async def test_silent_server_times_out() -> None:
    server, port = await raw_server(replying(close=False))  # reads, never answers
    try:
        t0 = time.monotonic()
        resp = await client.fetch(HOST, port, "GET", "/", timeout=0.2)
    finally:
        server.close()
    assert time.monotonic() - t0 < 2.0
    assert resp.errors == ["timeout after 0.2 s"]


@pytest.mark.anyio
async def test_bytes_after_the_response_are_an_error() -> None:
    long = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi-and-more"
    server, port = await raw_server(replying(long, close=False))
    try:
        resp = await client.fetch(HOST, port, "GET", "/")
    finally:
        server.close()
    assert resp.body == b"hi"
    assert resp.errors == ["9 bytes after the end of the response"]


# --- the reader, without sockets ----------------------------------------------------------

_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def _sse_response(chunks: int) -> bytes:
    events = [payloads.sse_event(i, chunks, 1_000 + i) for i in range(chunks)]
    body = b"".join(payloads.http_chunk(e) for e in [*events, payloads.DONE_EVENT])
    return _SSE_HEAD + body + payloads.LAST_HTTP_CHUNK


def _read(raw: bytes, cuts: list[int], into: Response) -> bool:
    reader = ResponseReader()
    reader.start(into)
    bounds = [0, *sorted(set(cuts)), len(raw)]
    done = False
    for a, b in itertools.pairwise(bounds):
        if a < b:
            into.now_ns = 10_000 + a  # what the wire does: stamp the bytes being fed
            done = reader.feed(raw[a:b])
    into.complete = done
    into.on_end()
    return done and reader.leftover == 0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, len(_sse_response(6)) - 1), max_size=30))
def test_sse_stream_survives_any_split(cuts: list[int]) -> None:
    rec = StreamRecorder(6)
    assert _read(_sse_response(6), cuts, rec)
    assert rec.ok, rec.errors
    assert rec.next_seq == 6 and len(rec.delays_ns) == 6


_PLAIN = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello world"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, len(_PLAIN) - 1), max_size=10))
def test_content_length_body_survives_any_split(cuts: list[int]) -> None:
    resp = Response()
    assert _read(_PLAIN, cuts, resp)
    assert resp.ok and resp.body == b"hello world"
    assert resp.headers["x-a"] == "1, 2"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX", "CRLF"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", "both"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "status line"),
        (b"HTTP/2 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "header line"),
    ],
)
def test_bad_framing_is_refused(raw: bytes, problem: str) -> None:
    reader = ResponseReader()
    reader.start(Response())
    with pytest.raises(FramingError, match=problem):
        reader.feed(raw)


def test_close_delimited_body_ends_at_eof() -> None:
    reader, resp = ResponseReader(), Response()
    reader.start(resp)
    assert not reader.feed(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
    assert reader.eof() and not reader.keep_alive
    assert resp.body == b"until close"


def test_interim_response_is_skipped() -> None:
    reader, resp = ResponseReader(), Response()
    reader.start(resp)
    assert reader.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert resp.status == 204


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"data: [DONE]\n\n", "[DONE] after 0/1 chunks"),
        (b"event: x\n\n", "unexpected SSE line"),
        (b"data: {nope}\n\n", "bad chunk JSON"),
    ],
)
def test_bad_streams_are_not_ok(body: bytes, error: str) -> None:
    raw = _SSE_HEAD + payloads.http_chunk(body) + payloads.LAST_HTTP_CHUNK
    rec = StreamRecorder(1)
    _read(raw, [], rec)
    assert not rec.ok
    assert any(error in e for e in rec.errors), rec.errors


@pytest.mark.parametrize(
    ("events", "error"),
    [
        ([(1, 2), (0, 2)], "chunk seq 1, expected 0"),
        ([(0, 3), (1, 3)], "last chunk lacks usage or finish_reason=stop"),  # not a final one
    ],
)
def test_out_of_order_or_unfinished_streams_are_not_ok(
    events: list[tuple[int, int]], error: str
) -> None:
    sse = [payloads.sse_event(seq, total, 5) for seq, total in events] + [payloads.DONE_EVENT]
    raw = _SSE_HEAD + b"".join(map(payloads.http_chunk, sse)) + payloads.LAST_HTTP_CHUNK
    rec = StreamRecorder(2)
    _read(raw, [], rec)
    assert not rec.ok
    assert error in rec.errors


# --- variants -----------------------------------------------------------------------------


def test_variant_parses_yaml_values_in_order() -> None:
    v = parse_variant(
        "acct:openrouter.enable_cache=true, limits.max_connections=100,"
        "openrouter.public_endpoints=[/api/v1/models, /api/v1/x],server.log_level=INFO"
    )
    assert v.subject == "orproxy-acct"
    assert v.overrides == (
        ("openrouter.enable_cache", True),
        ("limits.max_connections", 100),
        ("openrouter.public_endpoints", ["/api/v1/models", "/api/v1/x"]),
        ("server.log_level", "INFO"),
    )
    assert v.describe() == (
        "openrouter.enable_cache=true, limits.max_connections=100, "
        "openrouter.public_endpoints=[/api/v1/models, /api/v1/x], server.log_level=INFO"
    )


def test_variant_applies_to_a_copy() -> None:
    base: dict[str, object] = {"server": {"port": 1}, "openrouter": {"enable_cache": False}}
    v = parse_variant("x:openrouter.enable_cache=on,retry.max_attempts=2")
    out = v.apply(base)
    assert out == {
        "server": {"port": 1},
        "openrouter": {"enable_cache": True},
        "retry": {"max_attempts": 2},
    }
    assert base == {"server": {"port": 1}, "openrouter": {"enable_cache": False}}
    with pytest.raises(ValueError, match="not a mapping"):
        parse_variant("x:server.log_level.deeper=1").apply({"server": {"log_level": "INFO"}})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("openrouter.enable_cache=true", "expected NAME:"),
        ("Big:openrouter.enable_cache=true", "expected NAME:"),
        ("x:", "is not section.key=value"),
        ("x:enable_cache=true", "is not section.key=value"),
        ("x:openrouter.enable_cache", "is not section.key=value"),
        ("x:server.port=9999", "set by the bench"),
        ("x:openrouter.keys=[sk-or-v1-real]", "set by the bench"),
        ("x:server.access_key=secret", "set by the bench"),
        ("x:a.b=1,a.b=2", "given twice"),
        ("x:a.b=[1, 2", "not a YAML value"),
    ],
)
def test_bad_variants_are_refused(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_variant(text)


def test_orproxy_checks_a_variant_before_the_run(tmp_path: Path) -> None:
    assert variant_problems(parse_variant("ok:openrouter.enable_cache=true"), tmp_path) is None
    problems = variant_problems(parse_variant("bad:server.no_such_setting=1"), tmp_path)
    assert problems is not None and "server.no_such_setting: unknown setting" in problems


@pytest.mark.parametrize(
    "argv",
    [
        ["--subjects", "direct,orproxy-x"],  # a variant that was not defined
        ["--variant", "x:a.b=1", "--variant", "x:c.d=2"],
        ["--variant", "x:server.port=1"],
        ["--out", str(RESULTS_MD)],
        ["--json", str(BENCH_DIR / "RESULTS.md")],
    ],
)
def test_cli_refuses_before_starting_anything(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_missing_tools_are_named_with_their_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no wrk, nginx or taskset in here
    assert cli.main(["--subjects", "direct,nginx", "--only", "W1-1,W4"]) == 2
    lines = capsys.readouterr().err.removeprefix("error: ").splitlines()
    packages = {"wrk": "wrk", "nginx": "nginx-light", "taskset": "util-linux"}
    if not default_pinning().enabled:  # one CPU: nothing to pin, taskset not needed
        del packages["taskset"]
    assert len(lines) == len(packages)
    for line, (tool, package) in zip(lines, packages.items(), strict=True):
        assert line.startswith(f"missing tool: {tool} ")
        assert line.endswith(f"apt-get install -y {package}")
    # W4 alone on direct without pinning needs none of them
    argv = ["--subjects", "direct", "--only", "W4", "--no-pin"]
    assert cli.prepare(argv).subjects == ["direct"]


# --- reports ------------------------------------------------------------------------------


def _run_data() -> RunData:
    wls = [w for w in workloads.build(QUICK) if w.id in ("W1-32", "W4")]
    subjects = ["direct", "nginx", "orproxy", "orproxy-acct"]
    data = RunData(
        profile=QUICK,
        pinning=Pinning((0,), (1,)),
        subjects=subjects,
        workloads=wls,
        command="python -m bench --quick",
        started="2030-01-01 00:00:00 UTC",
        machine={"CPU": "test"},
        variants=[parse_variant("acct:openrouter.enable_cache=true")],
    )
    cpu = {"direct": 20.0, "nginx": 26.0, "orproxy": 480.0, "orproxy-acct": 240.0}
    data.results["W1-32"] = {
        s: [{"rps": 1000.0, "cpu_us_per_req": cpu[s], "errors": 0.0}] for s in subjects
    }
    data.results["W4"] = {
        s: [{"complete": 300.0, "streams": 300.0, "delay_p99_ms": 5.0}] for s in subjects
    }
    return data


def test_report_names_targets_not_issues() -> None:
    data = _run_data()
    text = report.render(data) + report.console_summary(data)
    assert "≤ 300 µs CPU/request" in text
    assert "orproxy-acct/orproxy" in text
    assert "Variant orproxy-acct: orproxy with openrouter.enable_cache=true" in text
    assert "| W1-32 | ≤ 300 µs CPU/request | 480.0 µs | ✗ | 240.0 µs | ✓ |" in text
    for word in ("issue", "[2/5]", "#3"):
        assert word not in text.lower()


def test_reports_go_to_the_out_dir_never_to_results_md(tmp_path: Path) -> None:
    results_before = RESULTS_MD.read_bytes()
    data = _run_data()
    written = report.write_reports(data, out_dir=tmp_path, stamp="20300101-000000Z")
    names = sorted(p.name for p in written)
    assert names == ["20300101-000000Z.json", "20300101-000000Z.md", "latest.json", "latest.md"]
    assert all(p.parent == tmp_path for p in written)
    assert (tmp_path / "latest.md").read_text().startswith("# orproxy benchmark results")
    again = report.write_reports(data, out_dir=tmp_path, stamp="20300101-000000Z")
    assert tmp_path / "20300101-000000Z-2.md" in again  # a second report never overwrites

    link = tmp_path / "sneaky.md"
    link.symlink_to(RESULTS_MD)
    for kwargs in ({"out": RESULTS_MD}, {"out": link}, {"json_out": RESULTS_MD}):
        with pytest.raises(report.OutputError):
            report.write_reports(data, out_dir=tmp_path / "none", stamp="x", **kwargs)
    assert not (tmp_path / "none").exists()
    assert RESULTS_MD.read_bytes() == results_before
    assert OUT_DIR == BENCH_DIR / "out"
    assert "bench/out/" in (BENCH_DIR.parent / ".gitignore").read_text().split()


def test_explicit_out_writes_only_there(tmp_path: Path) -> None:
    out = tmp_path / "r.md"
    written = report.write_reports(_run_data(), out=out, out_dir=tmp_path / "default")
    assert written == [out] and out.exists()
    assert not (tmp_path / "default").exists()

