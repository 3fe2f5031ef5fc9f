"""W1-W5: what each workload sends, with which tool, and which metrics it yields."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench import payloads, wrk
from bench.procstats import ProcTree, run_sampled
from bench.settings import AUTH_HEADERS, CHAT_PATH, HOST, MODELS_PATH, Pinning, Profile
from bench.subjects import Subject, pin_prefix

Metrics = dict[str, float]


@dataclass(frozen=True)
class MetricSpec:
    """How a metric is shown; ``ratio`` adds orproxy/nginx and orproxy/direct columns."""

    key: str
    label: str
    digits: int = 1
    ratio: bool = False


@dataclass
class Context:
    """Shared by all runs: profile, CPU placement, scratch dir and the upstream's tree."""

    profile: Profile
    pinning: Pinning
    workdir: Path
    upstream: ProcTree


_COMMON = [
    MetricSpec("subj_cpu_pct", "subject CPU % (of one core)", 0),
    MetricSpec("up_cpu_pct", "upstream CPU %", 0),
    MetricSpec("gen_cpu_pct", "load generator CPU %", 0),
    MetricSpec("other_cpu_pct", "other processes CPU % (noise)", 0),
    MetricSpec("errors", "errors", 0),
]


@dataclass
class Workload:
    """Base: an id (W1-32 ...), its group (W1 ...), a title and the metrics it reports."""

    id: str
    group: str
    title: str
    what: str
    metrics: list[MetricSpec] = field(default_factory=list)

    def warmup(self, ctx: Context, subject: Subject) -> None:
        """Short unmeasured run (default: none)."""

    def run(self, ctx: Context, subject: Subject) -> Metrics:
        raise NotImplementedError


@dataclass
class WrkWorkload(Workload):
    """A request-rate workload driven by wrk (one thread, pinned on the load-generator CPU)."""

    method: str = "GET"
    path: str = "/"
    body: bytes = b""
    conns: int = 1
    chunks_per_request: int = 0  # >0: SSE streams, report chunk rates

    def _script(self, ctx: Context) -> Path:
        return wrk.write_script(
            ctx.workdir / f"{self.id}.lua", self.method, self.body, AUTH_HEADERS
        )

    def _wrk(
        self, ctx: Context, subject: Subject, duration: float
    ) -> tuple[wrk.WrkResult, Metrics]:
        url = f"http://{HOST}:{subject.port}{self.path}"
        cmd = pin_prefix(ctx.pinning.loadgen) + wrk.command(
            url, self._script(ctx), self.conns, duration
        )
        trees = {"subject": subject.tree(), "upstream": ctx.upstream}
        sampled = run_sampled(cmd, trees, interval=0.5, timeout=duration + 30)
        if sampled.returncode != 0:
            raise RuntimeError(f"wrk failed ({sampled.returncode}): {sampled.stderr[-500:]}")
        res = wrk.parse(sampled.stdout)
        dur = res.duration_s or sampled.wall_s
        subj_cpu = sampled.usage["subject"].cpu_s
        usage = {
            "subj_cpu_pct": 100.0 * subj_cpu / dur,
            "up_cpu_pct": 100.0 * sampled.usage["upstream"].cpu_s / dur,
            "gen_cpu_pct": 100.0 * sampled.loadgen_cpu_s / dur,
            "other_cpu_pct": 100.0 * sampled.other_cpu_s / dur,
            "subj_cpu_s": subj_cpu,
            "errors": float(res.error_total),
        }
        return res, usage

    def warmup(self, ctx: Context, subject: Subject) -> None:
        self._wrk(ctx, subject, ctx.profile.warmup_s)

    def run(self, ctx: Context, subject: Subject) -> Metrics:
        res, m = self._wrk(ctx, subject, ctx.profile.wrk_duration_s)
        n = max(1, res.requests)
        m.update(
            rps=res.rps,
            p50_ms=res.latency_ms.get("p50", float("nan")),
            p99_ms=res.latency_ms.get("p99", float("nan")),
            mb_per_s=res.bytes_per_s / 1e6,
            cpu_us_per_req=1e6 * m["subj_cpu_s"] / n,
            requests=float(res.requests),
        )
        if self.chunks_per_request:
            chunks = n * self.chunks_per_request
            m.update(
                chunks_per_s=res.rps * self.chunks_per_request,
                cpu_us_per_chunk=1e6 * m["subj_cpu_s"] / chunks,
            )
        return m


def _client_cmd(ctx: Context, subject: Subject, args: list[str]) -> list[str]:
    return [
        *pin_prefix(ctx.pinning.loadgen),
        sys.executable,
        "-m",
        "bench.client",
        *args,
        "--host",
        HOST,
        "--port",
        str(subject.port),
    ]


def _client_json(stdout: str, stderr: str, returncode: int) -> dict[str, object]:
    if returncode != 0:
        raise RuntimeError(f"load client failed ({returncode}): {stderr[-800:]}")
    data: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return data


def _num(data: dict[str, object], key: str) -> float:
    value = data[key]
    assert isinstance(value, (int, float))
    return float(value)


@dataclass
class StreamsWorkload(Workload):
    """W4: many concurrent slow streams through the asyncio client."""

    def run(self, ctx: Context, subject: Subject) -> Metrics:
        p = ctx.profile
        args = [
            "streams",
            "--streams",
            str(p.w4_streams),
            "--chunks",
            str(p.w4_chunks),
            "--delay-ms",
            str(p.w4_delay_ms),
            "--stagger-ms",
            str(p.w4_stagger_ms),
        ]
        trees = {"subject": subject.tree(), "upstream": ctx.upstream}
        sampled = run_sampled(_client_cmd(ctx, subject, args), trees, interval=0.1, timeout=120)
        data = _client_json(sampled.stdout, sampled.stderr, sampled.returncode)
        usage = sampled.usage["subject"]
        chunks = max(1.0, _num(data, "chunks_received"))
        errors = data.get("errors")
        if isinstance(errors, dict) and errors:
            print(f"    {subject.name} W4 errors: {errors}", file=sys.stderr)
        return {
            "complete": _num(data, "complete"),
            "streams": _num(data, "streams"),
            "wall_s": _num(data, "wall_s"),
            "ideal_s": p.w4_chunks * p.w4_delay_ms / 1000.0 + p.w4_stagger_ms / 1000.0,
            "delay_p50_ms": _num(data, "delay_p50_ms"),
            "delay_p99_ms": _num(data, "delay_p99_ms"),
            "delay_max_ms": _num(data, "delay_max_ms"),
            "connect_all_s": _num(data, "connect_all_s"),
            "peak_rss_mb": usage.peak_rss / 1e6,
            "cpu_s": usage.cpu_s,
            "cpu_us_per_chunk": 1e6 * usage.cpu_s / chunks,
            "up_cpu_s": sampled.usage["upstream"].cpu_s,
            "gen_cpu_s": sampled.loadgen_cpu_s,
            "other_cpu_s": sampled.other_cpu_s,
            "first_delay_p99_ms": _num(data, "first_delay_p99_ms"),
            "errors": _num(data, "streams") - _num(data, "complete"),
        }


@dataclass
class TtfbWorkload(Workload):
    """W5: sequential streams on one keep-alive connection, time to first byte / event."""

    def run(self, ctx: Context, subject: Subject) -> Metrics:
        p = ctx.profile
        args = [
            "ttfb",
            "--requests",
            str(p.w5_requests),
            "--warmup",
            str(p.w5_warmup),
            "--chunks",
            str(p.w5_chunks),
        ]
        trees = {"subject": subject.tree(), "upstream": ctx.upstream}
        sampled = run_sampled(_client_cmd(ctx, subject, args), trees, interval=0.2, timeout=120)
        data = _client_json(sampled.stdout, sampled.stderr, sampled.returncode)
        return {
            "ttfb_p50_ms": _num(data, "ttfb_p50_ms"),
            "ttfb_p99_ms": _num(data, "ttfb_p99_ms"),
            "ttfe_p50_ms": _num(data, "ttfe_p50_ms"),
            "ttfe_p99_ms": _num(data, "ttfe_p99_ms"),
            "ok": _num(data, "ok"),
            "connections": _num(data, "connections"),
            "errors": _num(data, "requests") - _num(data, "ok"),
        }


_W1_METRICS = [
    MetricSpec("rps", "req/s", 0, True),
    MetricSpec("p50_ms", "p50 latency ms", 3, True),
    MetricSpec("p99_ms", "p99 latency ms", 3, True),
    MetricSpec("cpu_us_per_req", "subject CPU µs/request", 1, True),
    *_COMMON,
]


def build(profile: Profile) -> list[Workload]:
    """All workloads, in run order, sized by ``profile``."""
    p = profile
    stream_path = f"{CHAT_PATH}?chunks={p.w2_chunks}&delay_ms=0"
    return [
        WrkWorkload(
            id="W1-32",
            group="W1",
            title=f"non-stream chat, {p.w1_conns} connections",
            what=f"wrk, {p.w1_conns} keep-alive connections, POST ~300 B JSON -> ~1 KB JSON",
            metrics=_W1_METRICS,
            method="POST",
            path=CHAT_PATH,
            body=payloads.chat_request_body(False),
            conns=p.w1_conns,
        ),
        WrkWorkload(
            id="W1-1",
            group="W1",
            title="non-stream chat, 1 connection",
            what="wrk, 1 connection, sequential requests: latency added per request",
            metrics=_W1_METRICS,
            method="POST",
            path=CHAT_PATH,
            body=payloads.chat_request_body(False),
            conns=1,
        ),
        WrkWorkload(
            id="W2",
            group="W2",
            title=f"streams of {p.w2_chunks} chunks, no delay",
            what=(
                f"wrk, {p.w2_conns} connections, SSE streams of {p.w2_chunks} chunks "
                "sent back-to-back"
            ),
            metrics=[
                MetricSpec("rps", "streams/s", 1, True),
                MetricSpec("chunks_per_s", "chunks/s", 0, True),
                MetricSpec("p50_ms", "p50 stream time ms", 2, True),
                MetricSpec("p99_ms", "p99 stream time ms", 2, True),
                MetricSpec("cpu_us_per_chunk", "subject CPU µs/chunk", 2, True),
                *_COMMON,
            ],
            method="POST",
            path=stream_path,
            body=payloads.chat_request_body(True),
            conns=p.w2_conns,
            chunks_per_request=p.w2_chunks,
        ),
        WrkWorkload(
            id="W3",
            group="W3",
            title=f"GET /api/v1/models ({len(payloads.MODELS_BODY) // 1024} KB)",
            what=f"wrk, {p.w3_conns} connections, GET of a ~350 KB JSON body",
            metrics=[
                MetricSpec("rps", "req/s", 0, True),
                MetricSpec("mb_per_s", "MB/s", 0, True),
                MetricSpec("p50_ms", "p50 latency ms", 3, True),
                MetricSpec("p99_ms", "p99 latency ms", 3, True),
                MetricSpec("cpu_us_per_req", "subject CPU µs/request", 1, True),
                *_COMMON,
            ],
            method="GET",
            path=MODELS_PATH,
            conns=p.w3_conns,
        ),
        StreamsWorkload(
            id="W4",
            group="W4",
            title=(
                f"{p.w4_streams} concurrent streams x {p.w4_chunks} chunks, "
                f"{p.w4_delay_ms} ms apart"
            ),
            what=(
                f"asyncio client, {p.w4_streams} connections opened first, "
                f"stream starts spread over {p.w4_stagger_ms} ms, "
                f"{p.w4_streams * 1000 // p.w4_delay_ms} chunks/s in all"
            ),
            metrics=[
                MetricSpec("complete", "streams complete", 0),
                MetricSpec("streams", "streams started", 0),
                MetricSpec("wall_s", "wall s", 2, True),
                MetricSpec("ideal_s", "ideal wall s", 2),
                MetricSpec("delay_p50_ms", "chunk delay p50 ms", 2, True),
                MetricSpec("delay_p99_ms", "chunk delay p99 ms", 2, True),
                MetricSpec("delay_max_ms", "chunk delay max ms", 1, True),
                MetricSpec("first_delay_p99_ms", "first chunk of a stream: delay p99 ms", 1, True),
                MetricSpec("peak_rss_mb", "subject peak RSS MB", 1, True),
                MetricSpec("cpu_s", "subject CPU s", 2, True),
                MetricSpec("cpu_us_per_chunk", "subject CPU µs/chunk (all work / chunks)", 1, True),
                MetricSpec("up_cpu_s", "upstream CPU s", 2),
                MetricSpec("gen_cpu_s", "load generator CPU s", 2),
                MetricSpec("other_cpu_s", "other processes CPU s (noise)", 2),
                MetricSpec("connect_all_s", "time to open all connections s", 2),
                MetricSpec("errors", "failed streams", 0),
            ],
        ),
        TtfbWorkload(
            id="W5",
            group="W5",
            title=f"time to first byte, {p.w5_requests} sequential streams",
            what=(
                "asyncio client, one keep-alive connection, "
                f"streams of {p.w5_chunks} chunks without delay"
            ),
            metrics=[
                MetricSpec("ttfb_p50_ms", "TTFB p50 ms (first response byte)", 3, True),
                MetricSpec("ttfb_p99_ms", "TTFB p99 ms", 3, True),
                MetricSpec("ttfe_p50_ms", "first SSE event p50 ms", 3, True),
                MetricSpec("ttfe_p99_ms", "first SSE event p99 ms", 3, True),
                MetricSpec("connections", "connections used (1 = keep-alive held)", 0),
                MetricSpec("errors", "errors", 0),
            ],
        ),
    ]
