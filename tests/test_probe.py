"""``orproxy check --probe``: OpenRouter asked about each key (GET /api/v1/key), a table
printed, the exit status saying whether every key is usable."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
import pytest
import yaml

from orproxy.keys import key_id, mask_key
from orproxy.upstream.keyinfo import parse_key_info
from tests.conftest import ACCESS_KEY, KEYS
from tests.fakeor import FakeOpenRouter, Recorded, Responder, key_info
from tests.procs import run_orproxy

pytestmark = pytest.mark.anyio


async def probe(tmp_path: Path, fake: FakeOpenRouter, ca_file: str) -> tuple[int, str, str]:
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({
        "server": {"access_key": ACCESS_KEY},
        "openrouter": {"keys": KEYS, "base_url": f"https://127.0.0.1:{fake.port}/api/v1",
                       "ca_file": ca_file}}))
    # in a thread: the fake it asks runs on this loop
    result = await anyio.to_thread.run_sync(functools.partial(
        run_orproxy, "check", "--probe", "--config", str(config), cwd=tmp_path))
    return result.returncode, result.stdout, result.stderr


def by_key(req: Recorded) -> int:
    return KEYS.index((req.header(b"authorization") or b"").decode().removeprefix("Bearer "))


async def test_every_key_usable(tmp_path: Path, fake: FakeOpenRouter, ca_file: str) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        assert req.target == b"/api/v1/key" and req.method == b"GET"
        await resp.json(200, key_info(label=f"key {by_key(req)}", free_left=7))

    fake.script = script
    status, out, err = await probe(tmp_path, fake, ca_file)
    assert status == 0, err
    table = out.split("\n\n")[-1].splitlines()
    assert table[0].split()[:4] == ["id", "key", "label", "account"]
    for i, key in enumerate(KEYS):
        row = table[i + 1]
        assert row.startswith(f"{key_id(key)}  {mask_key(key)}  key {i}")
        assert "7/1000" in row and row.endswith("ok")
    assert all(key not in out + err for key in KEYS)
    assert len(fake.requests) == 3


async def test_a_bad_key_makes_the_exit_status_1(tmp_path: Path, fake: FakeOpenRouter,
                                                 ca_file: str) -> None:
    async def script(req: Recorded, resp: Responder) -> None:
        index = by_key(req)
        if index == 0:
            await resp.json(401, {"error": {"code": 401, "message": "No auth credentials"}})
        elif index == 1:
            await resp.json(200, key_info(limit=5.0, remaining=0.0))
        else:
            await resp.json(200, key_info(free_left=0))

    fake.script = script
    status, out, _ = await probe(tmp_path, fake, ca_file)
    assert status == 1
    rows = out.split("\n\n")[-1].splitlines()[1:]
    assert rows[0].endswith("HTTP 401 (invalid key)")
    assert rows[1].endswith("spending limit used up")
    assert rows[2].endswith("no free-model requests left today")


def test_key_info_is_read_leniently() -> None:
    info = parse_key_info(b'{"data": {"label": "x", "limit": null, "limit_remaining": null,'
                          b' "expires_at": "2026-01-01T00:00:00Z", "creator_user_id": "u1",'
                          b' "free_model_daily_requests": {"remaining": 0, "limit": 50},'
                          b' "is_free_tier": "yes", "usage": "lots"}}')
    assert info is not None
    assert (info.label, info.account, info.limit, info.usage, info.is_free_tier) == (
        "x", "u1", None, None, None)
    assert info.expires_at == 1767225600.0 and info.expired(1767225600.0)
    assert info.free_exhausted() and not info.exhausted()
    assert parse_key_info(b"[]") is None and parse_key_info(b"\xff") is None
