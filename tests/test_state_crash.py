"""Durable key state under ``kill -9``: the proxy as a process with its state file in tmp,
killed at random moments while it saves under load, and started again each time.

It must always start (a state file is never a reason to refuse), the file must always load
(nothing moved aside as ``.corrupt-``, every record restored, no temp file left behind), and
a key whose rest had been saved — the saver writes a key's change within ~50 ms — must
still rest after the restart, until the time OpenRouter gave.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orproxy.keys import key_id
from tests.fakeor import FakeOpenRouter, Recorded, Responder
from tests.procs import proxy_process
from tests.rawhttp import RawClient
from tests.streamhelpers import eventually
from tests.test_reload import REST_SECONDS, chat, is_chat, key_sent, key_states
from tests.test_reload import Upstream as ReloadUpstream

pytestmark = pytest.mark.anyio

ROUNDS = 15
KEYS = [f"sk-or-v1-crash-test-key-{i:012d}" for i in range(ROUNDS + 4)]
SAVED_AFTER = 0.3  # the rest is saved within ~50 ms; this much later it surely is
CLIENTS = 6


@dataclass
class Upstream(ReloadUpstream):
    """test_reload's upstream: keys in ``limited`` get a 429 resting them fully for
    REST_SECONDS; the first such answer to each key is timed (``limited_at``, wall clock)
    and announced (``hit``)."""

    limited_at: dict[str, float] = field(default_factory=dict)
    hit: asyncio.Event = field(default_factory=asyncio.Event)

    async def script(self, req: Recorded, resp: Responder) -> None:
        key = key_sent(req) if is_chat(req) else ""
        limited, now = key in self.limited, time.time()  # as the answer is made
        await super().script(req, resp)
        if limited and key not in self.limited_at:
            self.limited_at[key] = now
            self.hit.set()


async def load(port: int, answered: list[int]) -> None:
    """One keep-alive client in a loop until cancelled or cut (the kill cuts it)."""
    n = 0
    with contextlib.suppress(Exception):
        client = await RawClient.connect(port)
        try:
            while True:
                n += 1
                await client.send(chat({"model": "test/model", "n": n}))
                await client.response(b"POST", timeout=10.0)
                answered[0] += 1
        finally:
            client.close()


def leftovers(directory: Path, infix: str) -> list[str]:
    names = os.listdir(directory) if directory.exists() else []  # made by the first save
    return sorted(name for name in names if infix in name)


async def until_saving(directory: Path, seconds: float) -> None:
    """Until a save's temp file is there (a write in progress), or ``seconds`` pass. Polls
    without sleeping, yielding to the loop between looks (the fake runs on it)."""
    deadline = time.monotonic() + seconds
    while True:
        if leftovers(directory, ".tmp-") or time.monotonic() >= deadline:
            return
        await asyncio.sleep(0)


@dataclass(frozen=True)
class Kind:
    """How a round rests its key and when it kills."""

    name: str
    counters_interval: float  # 0: the saver writes again and again under load
    delay: tuple[float, float]  # the kill, this long after the 429 (random within)
    aim: bool  # then wait for a save in progress (its temp file) and kill during it
    saved: bool  # the rest is surely saved by the kill

    def config(self, state: Path) -> dict[str, Any]:
        return {"openrouter": {"keys": KEYS},
                "state": {"file": str(state), "counters_interval_seconds":
                          self.counters_interval}}


KINDS = (
    # killed during a save, once the rest has surely been saved
    Kind("while saving", 0.0, (SAVED_AFTER, 0.6), aim=True, saved=True),
    # killed right after the 429: the rest may or may not be saved, the file must load
    Kind("right after the rest", 0.0, (0.0, 0.05), aim=False, saved=False),
    # counters saved once a minute: only the rest's own prompt write can have saved it
    Kind("rest write only", 60.0, (SAVED_AFTER, 0.6), aim=False, saved=True),
)


async def test_kill_9_while_saving_never_loses_a_saved_rest_or_the_file(
        fake: FakeOpenRouter, ca_file: str, tmp_path: Path) -> None:
    upstream = Upstream()
    fake.script = upstream.script
    state = tmp_path / "state" / "state.json"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    surely_saved: set[str] = set()  # keys whose rest was saved before the kill
    mid_save = 0  # kills that left a save's temp file: they landed while it was writing

    for round_ in range(ROUNDS + 1):
        kind = KINDS[round_ % len(KINDS)]
        where = tmp_path / f"round{round_}"
        where.mkdir()
        async with proxy_process(where, fake.port, ca_file, **kind.config(state)) as proxy:
            context = (f"seed {seed}, round {round_}, after a kill ({KINDS[(round_ - 1) % 3].name})"
                       if round_ else f"seed {seed}, first start")
            await check_start(proxy.port, proxy.log(), state, upstream, surely_saved,
                              first=round_ == 0, context=context)
            if round_ == ROUNDS:
                break
            victim = KEYS[round_]
            await rest_and_kill(proxy.port, proxy.pid, proxy.proc, state.parent, upstream,
                                victim, kind, rng)
            if kind.saved:
                surely_saved.add(victim)
            mid_save += bool(leftovers(state.parent, ".tmp-"))
    # the aimed kills must have found saves in progress, or this tested much less
    assert mid_save >= 1, f"seed {seed}: no kill landed during a save"
    print(f"seed {seed}: {mid_save} of {ROUNDS} kills landed during a save")


async def check_start(port: int, log: str, state: Path, upstream: Upstream,
                      surely_saved: set[str], *, first: bool, context: str) -> None:
    """The proxy started (proxy_process waited for it to listen) and the state file loaded
    whole; every key whose rest was saved rests until OpenRouter's reset."""
    assert "is unusable" not in log and "Traceback" not in log, (context, log)
    assert leftovers(state.parent, ".corrupt-") == [], context
    if not first:
        assert f"key state: {state} ({len(KEYS)} key(s) restored)" in log, (context, log)
        assert leftovers(state.parent, ".tmp-") == [], context  # the crash's temp removed
    states = await key_states(port)
    for key in surely_saved:
        view = states[key_id(key)]
        assert view["state"] == "cooling", (context, view)
        expected = upstream.limited_at[key] + REST_SECONDS
        assert abs(view["rest_until"] - expected) < 5.0, (context, view)
    for key in set(KEYS) - upstream.limited:
        assert states[key_id(key)]["state"] == "available", (context, key)


async def rest_and_kill(port: int, pid: int, proc: asyncio.subprocess.Process,
                        state_dir: Path, upstream: Upstream, victim: str, kind: Kind,
                        rng: random.Random) -> None:
    """Under load, have the fake answer ``victim`` with a 429 an hour long; kill -9 the
    proxy as ``kind`` says."""
    answered = [0]
    clients = [asyncio.create_task(load(port, answered)) for _ in range(CLIENTS)]
    try:
        await eventually(lambda: answered[0] > 20, 10, "load")
        upstream.limited.add(victim)
        upstream.hit.clear()
        await asyncio.wait_for(upstream.hit.wait(), 10)
        delay = rng.uniform(*kind.delay)
        await asyncio.sleep(upstream.limited_at[victim] + delay - time.time())
        if kind.aim:
            await until_saving(state_dir, 0.3)
        os.kill(pid, signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
    finally:
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
