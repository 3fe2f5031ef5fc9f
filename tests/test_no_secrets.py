"""No secret anywhere: one full run of the proxy, everything it emits searched for keys.

The proxy runs as a user runs it (``python -m orproxy``) at ``log_level: DEBUG`` and
``http_log_level: DEBUG``, with three upstream keys and an access key made fresh for the
run. Traffic covers success, a stream, an upstream failure, 401/402/429 rotation, the
no-key 429, in-band errors, every refusal the proxy makes itself, /health and the three
metrics pages (both expositions); then ``orproxy --check`` reads a bad config with keys in
the wrong fields. Everything collected — stderr, stdout, the files the proxy wrote, every
byte of every response, head and body — must hold no configured key, no 12-character
slice of any key past ``sk-or-v1-``, and no such slice of the access key. The fake
OpenRouter never sends a key back, so anything found is the proxy's doing.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakeor import FakeOpenRouter, rate_limited_body, reset_ms
from tests.procs import CONFIG_NAME, proxy_process, run_orproxy
from tests.rawhttp import connected
from tests.test_accounting import (
    FREE,
    GPT,
    PROVIDER_ERROR,
    Tokens,
    Upstream,
    chat_json,
    chat_stream,
    in_band_json,
    in_band_stream,
    limit_error,
)
from tests.test_observability import error_reply

pytestmark = pytest.mark.anyio

PREFIX = "sk-or-v1-"
SLICE = 12


def fresh_keys() -> tuple[list[str], str]:
    """Three OpenRouter-shaped keys and an access key, new for each run."""
    return [PREFIX + secrets.token_hex(32) for _ in range(3)], secrets.token_urlsafe(32)


def slices(secret: str) -> list[str]:
    """Every 12-character slice of a secret's secret part (past ``sk-or-v1-``)."""
    part = secret.removeprefix(PREFIX)
    return [part[i:i + SLICE] for i in range(len(part) - SLICE + 1)]


def leaks(blobs: list[tuple[str, bytes]], keys: list[str], access: str) -> list[str]:
    """Where a secret, or a slice of one, was found: one line per blob and secret, with the
    text around the first hit."""
    found = []
    for name, blob in blobs:
        text = blob.decode("latin-1")
        for n, secret in enumerate([*keys, access]):
            for piece in [secret, *slices(secret)]:
                at = text.find(piece)
                if at >= 0:
                    who = f"key {n}" if n < len(keys) else "the access key"
                    found.append(f"{name}: {who}: …{text[max(at - 60, 0):at + 72]!r}…")
                    break
    return found


def proxy_files(folder: Path) -> list[tuple[str, bytes]]:
    """Every file the proxy wrote in its working folder (the configs are ours)."""
    return [(path.name, path.read_bytes()) for path in sorted(folder.iterdir())
            if path.name not in (CONFIG_NAME, "bad.yml")]


@dataclass
class Client:
    """Sends raw requests, each on its own connection, and keeps every byte received."""

    port: int
    access: str
    blobs: list[tuple[str, bytes]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    @property
    def auth(self) -> bytes:
        return b"Authorization: Bearer " + self.access.encode() + b"\r\n"

    async def send(self, name: str, data: bytes, method: bytes = b"GET", *,
                   pause: float = 0.0) -> int:
        async with connected(self.port) as client:
            await client.send(data)
            if pause:
                await asyncio.sleep(pause)
            resp = await client.response(method)
            if resp.header(b"connection") == b"close":
                await client.wait_eof(3)
        self.blobs.append((name, bytes(client.raw)))
        self.statuses.append(resp.status)
        return resp.status

    async def post(self, name: str, body: bytes = b'{"model":"m","messages":[]}', *,
                   auth: bytes | None = None, extra: bytes = b"") -> int:
        head = (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body))
        head += self.auth if auth is None else auth
        return await self.send(name, head + extra + b"\r\n" + body, b"POST")

    async def get(self, name: str, target: bytes, *, auth: bytes | None = None,
                  extra: bytes = b"", method: bytes = b"GET") -> int:
        head = method + b" " + target + b" HTTP/1.1\r\nHost: proxy\r\n"
        head += self.auth if auth is None else auth
        return await self.send(name, head + extra + b"\r\n", method)


async def back_in_rotation(client: Client, reset: float) -> None:
    """Wait for the rested key's return; /health (whose answers are collected too) is 200
    again once a key is usable."""
    await asyncio.sleep(max(reset - time.time(), 0))
    deadline = time.monotonic() + 10
    while await client.get("health while waiting", b"/health", auth=b"") != 200:
        assert time.monotonic() < deadline, "the rested key never came back"
        await asyncio.sleep(0.05)


def basic(password: str) -> bytes:
    return b"Authorization: Basic " + base64.b64encode(b"me:" + password.encode()) + b"\r\n"


async def upstream_traffic(client: Client, upstream: Upstream) -> None:
    """Every kind of forwarded request; the fake answers attempt by attempt."""
    upstream.play("reset")  # k0: the upstream drops the connection: 502
    assert await client.post("upstream failure") == 502
    upstream.play(chat_json(GPT, Tokens(9, 3, 0, 0, 0, 0.001)))  # k1
    assert await client.post("success") == 200
    upstream.play(chat_stream(GPT, Tokens(9, 3, 0, 0, 0, 0.001)))  # k2
    assert await client.post("stream", b'{"model":"m","stream":true}') == 200
    # k0: 401 (disabled), then k1 answers with an in-band error in a 200
    upstream.play(error_reply(401, {"error": {"code": 401, "message": "User not found."}}),
                  in_band_json(PROVIDER_ERROR))
    assert await client.post("401 rotation, in-band error") == 200
    # k2: 429 for a second, k1: 402; nothing left: the proxy's no-key 429
    soon = reset_ms(1)
    upstream.play(error_reply(429, rate_limited_body(soon)),
                  error_reply(402, {"error": {"code": 402, "message": "Insufficient credits"}}))
    assert await client.post("429/402 rotation, no key left") == 429
    await back_in_rotation(client, soon / 1000)
    # k2 is back: a stream whose last event is a free-models-per-day limit
    upstream.play(in_band_stream(limit_error(reset_ms(3600))))
    assert await client.post("in-band 429 stream", b'{"model":"%s"}' % FREE.encode()) == 200
    # the free-model limit rests k2 for free models: a free-model request finds no key
    assert await client.post("no key at all", b'{"model":"%s"}' % FREE.encode()) == 429


async def local_traffic(client: Client, keys: list[str]) -> None:
    """The proxy's own pages, each way of asking."""
    access = client.access
    # k2 rests for free models only, the others are out: paid_only, still a 200
    assert await client.get("health", b"/health", auth=b"") == 200
    assert await client.get("health head", b"/health", auth=b"", method=b"HEAD") == 200
    assert await client.get("dashboard", b"/metrics") == 200
    assert await client.get("dashboard basic", b"/metrics", auth=basic(access)) == 200
    assert await client.get("metrics json", b"/metrics/json") == 200
    assert await client.get("metrics text", b"/metrics/raw") == 200
    assert await client.get("metrics openmetrics", b"/metrics/raw",
                            extra=b"Accept: application/openmetrics-text\r\n") == 200
    assert await client.get("metrics head", b"/metrics/raw", method=b"HEAD") == 200
    assert await client.get("metrics no auth", b"/metrics/json", auth=b"") == 401
    assert await client.get("metrics upstream key", b"/metrics/raw",
                            auth=b"Authorization: Bearer " + keys[0].encode() + b"\r\n") == 401
    assert await client.get("metrics wrong basic", b"/metrics", auth=basic(keys[1])) == 401


async def refusals(client: Client, keys: list[str]) -> None:
    """Every 4xx (and the 5xx) the proxy makes itself, each carrying a secret somewhere in
    the request."""
    access = client.access.encode()
    k0, k1, k2 = (k.encode() for k in keys)
    assert await client.post("401 no key", auth=b"") == 401
    assert await client.post("401 upstream key as access key",
                             auth=b"Authorization: Bearer " + k0 + b"\r\n") == 401
    assert await client.post("401 basic on the api", auth=basic(client.access)) == 401
    assert await client.get("404", b"/nope?key=" + access) == 404
    assert await client.send("405", b"POST /health HTTP/1.1\r\nHost: p\r\nContent-Length: "
                             b"%d\r\n\r\n%s" % (len(k1), k1), b"POST") == 405
    assert await client.get("400 bad header name", b"/health",
                            extra=b"Bad Name: " + access + b"\r\n") == 400
    assert await client.get("400 control character", b"/health",
                            auth=b"Authorization: Bearer " + access + b"\x01\r\n") == 400
    assert await client.get("400 bad host", b"/health",
                            extra=b"Host: " + k2 + b" x\r\n") == 400
    # (a secret in the path itself would be the client's own doing: the access log records
    # the path as sent; queries are never logged)
    assert await client.get("400 dot segments", b"/api/v1/../admin?key=" + k0) == 400
    assert await client.send("400 content-length and chunked",
                             b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: p\r\n" + client.auth
                             + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"3\r\nabc\r\n0\r\n\r\n", b"POST") == 400
    assert await client.send("408 head too slow", b"GET /health HTTP/1.1\r\n" + client.auth,
                             pause=0.8) == 408
    assert await client.post("413", auth=client.auth, body=b"x" * 70000) == 413
    assert await client.get("414", b"/api/v1/models?q=" + access + b"a" * 3000) == 414
    assert await client.post("417", extra=b"Expect: " + k1 + b"\r\n") == 417
    assert await client.get("431", b"/health", extra=b"X-Big: " + access * 400 + b"\r\n") == 431
    assert await client.send("501", b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: p\r\n"
                             + client.auth + b"Transfer-Encoding: gzip, chunked\r\n\r\n",
                             b"POST") == 501
    assert await client.send("505", b"GET /health HTTP/2.0\r\nHost: p\r\n" + client.auth
                             + b"\r\n") == 505


def bad_config(keys: list[str], access: str, fake_port: int) -> dict[str, Any]:
    """A config with a key in each setting where one does not belong."""
    return {
        "server": {"access_key": access, "log_level": keys[0], "port": keys[1],
                   "http_log_level": access, "log_format": keys[2]},
        "openrouter": {
            "keys": [keys[2], access, keys[2] + " trailing", {"key": keys[0], "note": "x"}],
            "base_url": f"https://me:{keys[0]}@127.0.0.1:{fake_port}/api/v1",
            "key_selection_strategy": keys[1], "public_endpoints": [keys[2]],
            "ca_file": keys[0], "rate_limit_cooldown": access},
        "requestProxy": {"enabled": True, "url": f"socks5://me:{access}@proxy.invalid"},
        "metrics": {"models": keys[1], "public": access},
        "timeouts": {"client_head_seconds": keys[2]},
        "retry": {"max_attempts": access},
    }


def check(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_orproxy("--config", str(config), "--check", cwd=cwd)


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_key_and_no_access_key_in_anything_the_proxy_emits(
    fake: FakeOpenRouter, ca_file: str, tmp_path: Path, log_format: str,
) -> None:
    keys, access = fresh_keys()
    upstream = Upstream(fake)
    overrides: dict[str, Any] = {
        "server": {"access_key": access, "log_level": "DEBUG", "http_log_level": "DEBUG",
                   "log_format": log_format},
        "openrouter": {"keys": keys, "rate_limit_cooldown": 3600, "quota_check_seconds": 0},
        "limits": {"max_body_bytes": 65536, "max_target_bytes": 2048, "max_head_bytes": 8192},
        "timeouts": {"client_head_seconds": 0.5},
    }
    async with proxy_process(tmp_path, fake.port, ca_file, **overrides) as proxy:
        client = Client(proxy.port, access)
        await upstream_traffic(client, upstream)
        await local_traffic(client, keys)
        await refusals(client, keys)
        assert await proxy.stop() == 0
    stderr, stdout = proxy.stderr.read_bytes(), proxy.stdout.read_bytes()

    config = tmp_path / "bad.yml"
    config.write_text(yaml.safe_dump(bad_config(keys, access, fake.port)))
    checked = check(config, tmp_path)
    assert checked.returncode == 2
    problems = [line for line in checked.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 17, checked.stderr  # one per wrong field

    # the run did what it was meant to: every kind of answer, and DEBUG lines
    expected = {200, 401, 400, 404, 405, 408, 413, 414, 417, 429, 431, 501, 502, 505}
    # /health may also say 503 while every key rests, depending on timing
    assert expected <= set(client.statuses) <= expected | {503}
    assert b"DEBUG" in stderr and b"orproxy.access" in stderr
    assert b"key_disabled" in stderr or b"disabled: 401" in stderr
    assert stderr.count(b" rests ") == 3  # the 429, the 402, the in-band 429
    assert b"in-band error" in stderr
    assert b"upstream failed" in stderr
    # the upstream got its keys: the search below would find them if they leaked
    sent = {r.header(b"authorization") for r in upstream.requests}
    assert sent == {b"Bearer " + k.encode() for k in keys}

    # every file the proxy wrote (the key state file) besides the two configs we wrote
    written = proxy_files(tmp_path)
    assert "orproxy-state.json" in dict(written)
    blobs = [("stderr", stderr), ("stdout", stdout), ("--check stdout", checked.stdout.encode()),
             ("--check stderr", checked.stderr.encode()), *written, *client.blobs]
    assert leaks(blobs, keys, access) == []


def test_leak_search_finds_a_slice() -> None:
    """The search itself: a 12-character slice of a key's secret part is found, an
    11-character one and the bare prefix are not."""
    keys, access = fresh_keys()
    middle = keys[1][len(PREFIX) + 20:len(PREFIX) + 32]
    assert leaks([("x", b"id " + middle.encode())], keys, access) != []
    assert leaks([("x", b"id " + middle[:11].encode() + b"!")], keys, access) == []
    assert leaks([("x", PREFIX.encode() + b"...")], keys, access) == []
    assert leaks([("x", access[5:17].encode())], keys, access) != []


def test_check_never_echoes_a_key_written_as_a_setting_name(tmp_path: Path) -> None:
    """A key pasted where a setting's name goes (a missing ``- ``, a mapping instead of a
    list) is reported as an unknown setting or section: the report must not quote it."""
    keys, access = fresh_keys()
    config = tmp_path / "c.yml"
    config.write_text(
        f"server:\n  access_key: {access}\n  {keys[0]}: true\n"
        f"{keys[1]}: primary\n"
        f"openrouter:\n  keys:\n    - key: {keys[2]}\n      {keys[0]}: second\n")
    checked = check(config, tmp_path)
    assert checked.returncode == 2
    problems = [line for line in checked.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 3, checked.stderr
    assert leaks([("--check", (checked.stdout + checked.stderr).encode())], keys, access) == []
