"""Correctness checks run against each subject before any load: bodies, streams, auth, keys."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from bench import loadclient, payloads
from bench.settings import ACCESS_KEY, CHAT_PATH, HOST, MODELS_PATH, STATS_PATH, UPSTREAM_KEYS


@dataclass
class Check:
    """One check's outcome."""

    name: str
    ok: bool
    detail: str


_AUTH = {"Authorization": f"Bearer {ACCESS_KEY}", "Content-Type": "application/json"}


def _same_body(got: bytes, want: bytes) -> tuple[bool, str]:
    if got == want:
        return True, f"{len(got)} B, byte-identical"
    try:
        if json.loads(got) == json.loads(want):
            return True, f"{len(got)} B, JSON-equal but bytes differ (re-serialized?)"
    except ValueError:
        pass
    return False, f"body differs: got {len(got)} B, want {len(want)} B: {got[:120]!r}"


async def _upstream_auth(upstream_port: int) -> Counter[str]:
    sink = await loadclient.fetch(HOST, upstream_port, "GET", STATS_PATH)
    return Counter(json.loads(sink.body)["authorization"])


async def _check_body(
    port: int, name: str, method: str, path: str, body: bytes, headers: dict[str, str], want: bytes
) -> Check:
    try:
        sink = await loadclient.fetch(HOST, port, method, path, body, headers)
    except Exception as exc:
        return Check(name, False, f"{type(exc).__name__}: {exc}")
    if sink.status != 200:
        return Check(name, False, f"status {sink.status}: {sink.body[:200]!r}")
    ok, detail = _same_body(sink.body, want)
    ctype = sink.headers.get("content-type", "")
    if not ctype.startswith("application/json"):
        ok, detail = False, f"content-type {ctype!r}; {detail}"
    return Check(name, ok, detail)


async def _check_stream(port: int, name: str, chunks: int, delay_ms: int) -> Check:
    rec = await loadclient.fetch_stream(HOST, port, chunks, delay_ms)
    if not rec.ok:
        return Check(name, False, "; ".join(rec.errors) or "incomplete")
    first_ms = (rec.first_event_perf - rec.sent_perf) / 1e6
    detail = f"{rec.next_seq} chunks + [DONE], first event after {first_ms:.1f} ms"
    if delay_ms and first_ms > delay_ms * 2.5:
        return Check(name, False, detail + " (buffered? expected ~" + str(delay_ms) + " ms)")
    return Check(name, True, detail)


async def _check_status(port: int, name: str, headers: dict[str, str], want: set[int]) -> Check:
    try:
        sink = await loadclient.fetch(
            HOST, port, "POST", CHAT_PATH, payloads.chat_request_body(False), headers
        )
    except Exception as exc:
        return Check(name, False, f"{type(exc).__name__}: {exc}")
    return Check(name, sink.status in want, f"status {sink.status}")


async def run_checks(name: str, port: int, upstream_port: int) -> list[Check]:
    """All checks for the subject listening on ``port``."""
    out = [
        await _check_body(
            port, "GET /models (no auth) body", "GET", MODELS_PATH, b"", {}, payloads.MODELS_BODY
        ),
        await _check_body(
            port,
            "POST chat non-stream body",
            "POST",
            CHAT_PATH,
            payloads.chat_request_body(False),
            _AUTH,
            payloads.CHAT_RESPONSE_BODY,
        ),
        await _check_stream(port, "stream 200 chunks (query kept, all chunks)", 200, 0),
        await _check_stream(port, "stream 5x100 ms arrives incrementally", 5, 100),
    ]
    if name != "orproxy":
        return out
    out.append(
        await _check_status(
            port, "no Authorization -> 401", {"Content-Type": "application/json"}, {401}
        )
    )
    out.append(
        await _check_status(
            port,
            "wrong access key -> 401",
            {"Authorization": "Bearer wrong", "Content-Type": "application/json"},
            {401},
        )
    )
    before = await _upstream_auth(upstream_port)
    for _ in range(6):
        await loadclient.fetch(
            HOST, port, "POST", CHAT_PATH, payloads.chat_request_body(False), _AUTH
        )
    used = await _upstream_auth(upstream_port) - before
    want = {f"Bearer {k}" for k in UPSTREAM_KEYS}
    leaked = [k for k in used if k not in want]
    detail = ", ".join(f"{k[-4:]}x{n}" for k, n in sorted(used.items())) or "no requests seen"
    out.append(
        Check(
            "upstream sees only configured keys",
            bool(used) and not leaked,
            detail + (f"; unexpected: {leaked}" if leaked else ""),
        )
    )
    return out
