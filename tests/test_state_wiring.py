"""Durable key state through the running proxy: rests, disablements and counters survive a
restart; keys removed from the config leave the state, new keys start fresh, rests that
ended while the proxy was down are over."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from orproxy.app import App
from orproxy.config import build_config
from orproxy.keys import KeyState, key_id
from orproxy.state import FileStore, KeyRecord, Snapshot
from tests.conftest import AUTH, KEYS, proxy_config
from tests.fakeor import (
    FakeOpenRouter,
    Recorded,
    Responder,
    completion,
    rate_limited_body,
    reset_ms,
)
from tests.rawhttp import roundtrip

pytestmark = pytest.mark.anyio

CHAT = (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: " + AUTH[1]
        + b"\r\nContent-Length: 2\r\n\r\n{}")
DAILY = "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000."


async def start(fake: FakeOpenRouter, ca_file: str, state: Path, keys: list[str],
                **overrides: Any) -> App:
    config = proxy_config(fake.port, ca_file, state={"file": str(state)},
                          openrouter={"keys": keys}, **overrides)
    app = App(build_config(config, {}))
    await app.start()
    return app


def key_sent(req: Recorded) -> str:
    value = req.header(b"authorization")
    assert value is not None
    return value.decode().removeprefix("Bearer ")


async def test_a_resting_key_rests_after_a_restart(fake: FakeOpenRouter, ca_file: str,
                                                   tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    reset = reset_ms(3600)

    async def script(req: Recorded, resp: Responder) -> None:
        if key_sent(req) == KEYS[0]:
            await resp.json(429, rate_limited_body(reset, DAILY))
        else:
            await resp.json(200, completion())

    fake.script = script
    app = await start(fake, ca_file, state, KEYS[:2])
    assert (await roundtrip(app.port, CHAT, b"POST")).status == 200
    await app.shutdown()
    saved = json.loads(state.read_text())
    assert "sk-or-" not in state.read_text()
    assert {r["id"] for r in saved["keys"]} == {key_id(KEYS[0]), key_id(KEYS[1])}

    fake.requests.clear()
    again = await start(fake, ca_file, state, KEYS[:2])
    try:
        view = again.services.keys.snapshot()[0]
        assert view.state is KeyState.FREE_LIMITED  # a free-model limit, kept as one
        assert 3500 < view.cooling_seconds <= 3600
        assert view.reason == "429 free-models-per-day" and view.message == DAILY
        assert view.stats.requests == 1 and view.stats.rate_limited == 1
        assert (await roundtrip(again.port, CHAT, b"POST")).status == 200
        assert [key_sent(r) for r in fake.requests] == [KEYS[1]]  # no request spent on it
    finally:
        await again.shutdown()


async def test_config_changes_and_rests_that_ended_while_down(fake: FakeOpenRouter,
                                                              ca_file: str,
                                                              tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    now = time.time()
    records = {
        key_id(KEYS[0]): KeyRecord(key_id(KEYS[0]), now - 5, "all", False, "429 x", "", {
            "requests": 7}, now - 100),  # its rest ended while the proxy was down
        key_id(KEYS[1]): KeyRecord(key_id(KEYS[1]), now + 600, "all", False, "429 y", "",
                                   {}, now),  # removed from the config below
    }
    FileStore(str(state)).save(Snapshot(records, now, "test"))
    app = await start(fake, ca_file, state, [KEYS[0], KEYS[2]])
    try:
        views = {v.id: v for v in app.services.keys.snapshot()}
        assert set(views) == {key_id(KEYS[0]), key_id(KEYS[2])}
        assert views[key_id(KEYS[0])].state is KeyState.AVAILABLE
        assert views[key_id(KEYS[0])].stats.requests == 7  # its counters came back
        assert views[key_id(KEYS[2])].stats.requests == 0  # a new key starts fresh
    finally:
        await app.shutdown()
    ids = {r["id"] for r in json.loads(state.read_text())["keys"]}
    assert ids == {key_id(KEYS[0]), key_id(KEYS[2])}  # the removed key left the state


async def test_a_corrupt_state_file_is_moved_aside_and_the_proxy_starts(
        fake: FakeOpenRouter, ca_file: str, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{ not json")
    app = await start(fake, ca_file, state, KEYS[:1])
    try:
        assert (await roundtrip(app.port, CHAT, b"POST")).status == 200
        aside = [name for name in os.listdir(tmp_path) if name.startswith("state.json.corrupt-")]
        assert len(aside) == 1
    finally:
        await app.shutdown()
