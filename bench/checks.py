"""Correctness checks run against each subject before any load: bodies, streams, auth, keys."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from bench import client, payloads
from bench.settings import (
    AUTH_HEADERS,
    CHAT_PATH,
    HOST,
    MODELS_PATH,
    STATS_PATH,
    UPSTREAM_KEYS,
    is_orproxy,
)


@dataclass
class Check:
    """One check's outcome."""

    name: str
    ok: bool
    detail: str


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
    resp = await client.fetch(HOST, upstream_port, "GET", STATS_PATH)
    if not resp.ok:
        raise RuntimeError(f"upstream stats: {'; '.join(resp.errors) or resp.status}")
    return Counter(json.loads(resp.body)["authorization"])


async def _check_body(
    port: int, name: str, method: str, path: str, body: bytes, headers: dict[str, str], want: bytes
) -> Check:
    resp = await client.fetch(HOST, port, method, path, headers=headers, body=body)
    if resp.errors:
        return Check(name, False, "; ".join(resp.errors))
    if resp.status != 200:
        return Check(name, False, f"status {resp.status}: {resp.body[:200]!r}")
    ok, detail = _same_body(resp.body, want)
    ctype = resp.headers.get("content-type", "")
    if not ctype.startswith("application/json"):
        ok, detail = False, f"content-type {ctype!r}; {detail}"
    return Check(name, ok, detail)


async def _check_stream(port: int, name: str, chunks: int, delay_ms: int) -> Check:
    rec = await client.fetch_stream(HOST, port, chunks, delay_ms)
    if not rec.ok:
        return Check(name, False, "; ".join(rec.errors) or "incomplete")
    first_ms = (rec.first_event_perf - rec.sent_perf) / 1e6
    detail = f"{rec.next_seq} chunks + [DONE], first event after {first_ms:.1f} ms"
    if delay_ms and first_ms > delay_ms * 2.5:
        return Check(name, False, detail + " (buffered? expected ~" + str(delay_ms) + " ms)")
    return Check(name, True, detail)


async def _check_status(port: int, name: str, headers: dict[str, str], want: set[int]) -> Check:
    body = payloads.chat_request_body(False)
    resp = await client.fetch(HOST, port, "POST", CHAT_PATH, headers=headers, body=body)
    if resp.errors:
        return Check(name, False, "; ".join(resp.errors))
    return Check(name, resp.status in want, f"status {resp.status}")


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
            AUTH_HEADERS,
            payloads.CHAT_RESPONSE_BODY,
        ),
        await _check_stream(port, "stream 200 chunks (query kept, all chunks)", 200, 0),
        await _check_stream(port, "stream 5x100 ms arrives incrementally", 5, 100),
    ]
    if not is_orproxy(name):
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
    body = payloads.chat_request_body(False)
    for _ in range(6):
        await client.fetch(HOST, port, "POST", CHAT_PATH, headers=AUTH_HEADERS, body=body)
    used = await _upstream_auth(upstream_port) - before
    want = {f"Bearer {k}" for k in UPSTREAM_KEYS}
    # only the last 4 characters are shown: an unexpected value may be a real key or the
    # access key, and neither may reach the report
    detail = ", ".join(f"…{k[-4:]}x{n}" for k, n in sorted(used.items())) or "no requests seen"
    unexpected = sum(n for k, n in used.items() if k not in want)
    if unexpected:
        detail += f"; {unexpected} request(s) with an Authorization not in the bench's keys"
    out.append(Check("upstream sees only configured keys", bool(used) and not unexpected, detail))
    return out
