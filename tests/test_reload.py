"""Live reload, end to end: ``python -m orproxy`` as a process, its config file rewritten,
then SIGHUP sent exactly as the systemd unit's ``ExecReload=/bin/kill -HUP $MAINPID`` does.

Under load (keep-alive clients in a loop, slow SSE streams in flight) a reload that changes
the keys, the strategy, the retry budget and a timeout drops nothing, and what follows uses
the new settings while a resting kept key keeps resting. An invalid config is refused with
every problem logged at ERROR and the old config kept; settings a process cannot change are
named as waiting for a restart; a new upstream takes new requests while a stream on the old
one finishes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from orproxy.keys import key_id, mask_key
from tests.conftest import ACCESS_KEY, KEYS, fake_openrouter, merge
from tests.fakeor import (
    OVERLOAD_BODY,
    FakeOpenRouter,
    Recorded,
    Responder,
    completion,
    key_info,
    rate_limited_body,
    reset_ms,
)
from tests.procs import CONFIG_NAME, ProxyProcess, free_port, proxy_process
from tests.rawhttp import RawClient, Response, refused, roundtrip
from tests.streamhelpers import eventually

pytestmark = pytest.mark.anyio

NEW_KEY = "sk-or-v1-test-key-dddddddddddd0004"
BAD_KEY = "not-a-key-1234567890abcdef"
# the key's own limit, for every model (a free-models-per-* limit would rest it for free
# models only)
KEY_LIMIT = "Rate limit exceeded."
REST_SECONDS = 3600.0  # how long a limited key is told to rest
STREAM_EVENTS = 20
STREAM_GAP_SECONDS = 0.15
SLOW_SECONDS = 2.5  # a model that thinks longer than the reloaded first-byte timeout
NEW_FIRST_BYTE_SECONDS = 0.8
CLIENTS = 20
LOAD_SECONDS = 0.5  # of load before the reload, and again after it
STREAMS = 5


# --- the fake upstream ------------------------------------------------------------------------


def key_sent(req: Recorded) -> str:
    value = req.header(b"authorization")
    assert value is not None
    return value.decode().removeprefix("Bearer ")


def stream_events(stream: int) -> list[bytes]:
    """What the fake sends for stream ``stream``: distinct per stream, so a byte that
    strays from one stream into another is seen."""
    events = [f'data: {{"stream":{stream},"i":{i},"pad":"{"x" * (40 + i)}"}}\n\n'.encode()
              for i in range(STREAM_EVENTS)]
    return [*events, b"data: [DONE]\n\n"]


@dataclass
class Upstream:
    """Answers by key and by model: keys in ``limited`` get a 429 resting them an hour
    (REST_SECONDS);
    model ``stream`` a slow SSE stream, ``overloaded`` a provider's overload 429 (not the
    key's fault: retried on the next key while the budget lasts), ``slow`` an answer after
    SLOW_SECONDS; anything else a completion naming the request's ``n``."""

    limited: set[str] = field(default_factory=set)
    streams_started: int = 0

    async def script(self, req: Recorded, resp: Responder) -> None:
        if not is_chat(req):  # the proxy's own questions about a key, if it asks
            await resp.json(200, key_info())
            return
        if key_sent(req) in self.limited:
            await resp.json(429, rate_limited_body(reset_ms(REST_SECONDS), KEY_LIMIT))
            return
        body = req.json()
        model = body.get("model")
        if model == "stream":
            self.streams_started += 1
            await resp.head(200, [(b"Content-Type", b"text/event-stream")])
            for event in stream_events(body["stream"]):
                await resp.data(event)
                await asyncio.sleep(STREAM_GAP_SECONDS)
            await resp.end()
        elif model == "overloaded":
            await resp.json(429, OVERLOAD_BODY)
        elif model == "slow":
            # thinks for SLOW_SECONDS, unless the proxy gives up and hangs up first
            deadline = time.monotonic() + SLOW_SECONDS
            while time.monotonic() < deadline:
                if resp.writer.transport.is_closing():
                    return
                await asyncio.sleep(0.05)
            await resp.json(200, completion("slow"))
        else:
            await resp.json(200, completion(f"answer {body.get('n')}"))


def is_chat(req: Recorded) -> bool:
    return req.method == b"POST" and req.target == b"/api/v1/chat/completions"


def chats(fake: FakeOpenRouter) -> list[Recorded]:
    """What the fake was asked on the clients' behalf."""
    return [r for r in fake.requests if is_chat(r)]


def n_of(req: Recorded) -> int:
    n = req.json().get("n")
    return n if isinstance(n, int) else -1


# --- the proxy process, its config and its log -------------------------------------------------


def chat(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: proxy.test\r\n"
            b"Authorization: Bearer " + ACCESS_KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(data)).encode() + b"\r\n\r\n" + data)


METRICS_JSON = (b"GET /metrics/json HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer "
                + ACCESS_KEY.encode() + b"\r\n\r\n")


async def dashboard(port: int) -> dict[str, Any]:
    """The running proxy's dashboard document (GET /metrics/json)."""
    resp = await roundtrip(port, METRICS_JSON, b"GET")
    assert resp.status == 200, resp.body
    doc = json.loads(resp.body)
    assert isinstance(doc, dict)
    return doc


async def key_states(port: int) -> dict[str, dict[str, Any]]:
    """The running proxy's keys by id."""
    return {k["id"]: k for k in (await dashboard(port))["keys"]}


def edit_config(path: Path, change: dict[str, Any]) -> None:
    """Rewrite the config file with ``change`` merged in (lists are replaced whole)."""
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), change)))


async def hup(pid: int) -> None:
    """SIGHUP the way the systemd unit's ExecReload does: /bin/kill -HUP $MAINPID."""
    kill = await asyncio.create_subprocess_exec("/bin/kill", "-HUP", str(pid))
    assert await kill.wait() == 0


RELOAD_DONE = re.compile(r"(reloaded: .*|reload refused.*)$", re.MULTILINE)


async def reload(proxy: ProxyProcess, seconds: float = 10.0) -> str:
    """Send SIGHUP and wait until the proxy logged the outcome; the log written since."""
    since = len(proxy.log())
    await hup(proxy.pid)
    await eventually(lambda: RELOAD_DONE.search(proxy.log()[since:]) is not None, seconds,
                     "the reload's outcome in the log")
    return proxy.log()[since:]


def log_lines(text: str, level: str) -> list[str]:
    """Lines of the text log that open a record at ``level`` (a continuation line of a
    multi-line record carries no level)."""
    opening = re.compile(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} {level} ")
    return [line for line in text.splitlines() if opening.match(line)]


def assert_clean_log(text: str) -> None:
    assert "Traceback" not in text
    for secret in (*KEYS, NEW_KEY, ACCESS_KEY):
        assert secret not in text


@pytest.fixture
def upstream(fake: FakeOpenRouter) -> Upstream:
    behaviour = Upstream()
    fake.script = behaviour.script
    return behaviour


@pytest.fixture
async def second_fake(server_tls: ssl.SSLContext) -> AsyncIterator[FakeOpenRouter]:
    async with fake_openrouter(server_tls) as server:
        yield server


# --- load -------------------------------------------------------------------------------------


@dataclass
class Load:
    """CLIENTS keep-alive clients sending numbered requests in a loop, each checking it got
    its own whole answer, until ``stop`` is set; any failure is kept in ``errors``."""

    port: int
    numbers: Callable[[], int]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    answered: int = 0
    errors: list[str] = field(default_factory=list)
    connections: int = 0

    async def client(self) -> None:
        try:
            conn = await RawClient.connect(self.port)
        except OSError as exc:
            self.errors.append(f"connect: {exc!r}")
            return
        self.connections += 1
        try:
            while not self.stop.is_set():
                n = self.numbers()
                await conn.send(chat({"model": "test/model", "n": n}))
                resp = await conn.response(b"POST", timeout=15.0)
                if resp.status != 200 or answer_of(resp) != f"answer {n}":
                    self.errors.append(f"request {n}: {resp.status} {resp.body[:200]!r}")
                    return
                if (resp.header(b"connection") or b"").lower() == b"close":
                    self.errors.append(f"request {n}: the proxy closed a keep-alive connection")
                    return
                self.answered += 1
        except Exception as exc:  # a reset, a cut body, a timeout: all are failures here
            self.errors.append(f"client: {exc!r}")
        finally:
            conn.close()


def answer_of(resp: Response) -> str:
    content = json.loads(resp.body)["choices"][0]["message"]["content"]
    assert isinstance(content, str)
    return content


async def sse(port: int, stream: int) -> Response:
    return await roundtrip(port, chat({"model": "stream", "stream": stream}), timeout=20.0)


def assert_stream_whole(resp: Response, stream: int) -> None:
    assert resp.status == 200
    assert resp.header(b"content-type") == b"text/event-stream"
    assert resp.body == b"".join(stream_events(stream))


# --- tests ------------------------------------------------------------------------------------


async def test_a_reload_under_load_drops_nothing_and_takes_the_new_settings(
        fake: FakeOpenRouter, upstream: Upstream, ca_file: str, tmp_path: Path) -> None:
    k0, k1, k2 = KEYS
    upstream.limited = {k1}
    async with proxy_process(tmp_path, fake.port, ca_file, openrouter={"keys": [k0, k1, k2]},
                             state={"file": None}) as proxy:
        # k1 rests for an hour before the reload
        for n in range(3):
            assert (await roundtrip(proxy.port, chat({"n": n}))).status == 200
        before = await key_states(proxy.port)
        assert before[key_id(k1)]["state"] == "cooling"
        rest_until = before[key_id(k1)]["rest_until"]
        assert rest_until > time.time() + 3500

        counter = itertools.count(100)
        load = Load(proxy.port, lambda: next(counter))
        streams = [asyncio.create_task(sse(proxy.port, s)) for s in range(STREAMS)]
        clients = [asyncio.create_task(load.client()) for _ in range(CLIENTS)]
        await eventually(lambda: (upstream.streams_started == STREAMS and load.answered > 40)
                         or bool(load.errors), 10, "the load to run")
        await asyncio.sleep(LOAD_SECONDS)
        assert not load.errors

        # k2 removed, a new key added first, k1 kept (resting) before k0; strategy, retry
        # budget and first-byte timeout changed; all while streams are mid-flight
        edit_config(tmp_path / CONFIG_NAME, {
            "openrouter": {"keys": [k1, NEW_KEY, k0], "key_selection_strategy": "first"},
            "retry": {"max_attempts": 1},
            "timeouts": {"upstream_first_byte_seconds": NEW_FIRST_BYTE_SECONDS}})
        logged = await reload(proxy)
        after_reload = next(counter)  # every request numbered above this was sent after it
        answered_then = load.answered
        assert "reloaded: 3 key(s) (1 added, 1 removed); strategy first" in logged
        assert not [s for s in streams if s.done()], "the streams should still be in flight"

        await asyncio.sleep(LOAD_SECONDS)
        await eventually(lambda: load.answered > answered_then + 100 or bool(load.errors), 15,
                         "traffic after the reload")
        load.stop.set()
        await asyncio.gather(*clients)
        assert load.errors == []
        assert load.connections == CLIENTS
        for stream, resp in enumerate(await asyncio.gather(*streams)):
            assert_stream_whole(resp, stream)

        # what was sent after the reload went to the new key only: k1 still rests (with
        # strategy first it would be tried first otherwise), k2 is gone, k0 comes after
        later = [r for r in chats(fake) if n_of(r) > after_reload]
        assert len(later) > 50  # (a client has at most one request in flight)
        assert {key_sent(r) for r in later} == {NEW_KEY}
        states = await key_states(proxy.port)
        assert (await dashboard(proxy.port))["strategy"] == "first"
        assert set(states) == {key_id(k1), key_id(NEW_KEY), key_id(k0)}
        assert states[key_id(k1)]["state"] == "cooling"
        assert abs(states[key_id(k1)]["rest_until"] - rest_until) < 2.0

        # retry budget 1: an overload 429 is passed on after one attempt (it was 2 before:
        # the new key, then k0)
        fake.requests.clear()
        resp = await roundtrip(proxy.port, chat({"model": "overloaded"}))
        assert resp.status == 429
        assert [key_sent(r) for r in chats(fake)] == [NEW_KEY]
        # the first-byte timeout is the new one
        started = time.monotonic()
        resp = await roundtrip(proxy.port, chat({"model": "slow"}))
        took = time.monotonic() - started
        assert resp.status == 504
        assert NEW_FIRST_BYTE_SECONDS * 0.9 < took < SLOW_SECONDS - 0.5, took
        assert_clean_log(proxy.log())
        assert log_lines(proxy.log(), "ERROR") == []


async def test_an_invalid_config_is_refused_and_the_old_one_stays(
        fake: FakeOpenRouter, upstream: Upstream, ca_file: str, tmp_path: Path) -> None:
    k0, k1, k2 = KEYS
    async with proxy_process(tmp_path, fake.port, ca_file, openrouter={"keys": [k0, k1]},
                             state={"file": None}) as proxy:
        config = tmp_path / CONFIG_NAME
        edit_config(config, {"server": {"colour": "blue"},
                             "openrouter": {"keys": [k2, BAD_KEY]}})
        logged = await reload(proxy)
        assert "reload refused; the running configuration stays in force" in logged
        assert "reloaded:" not in logged
        errors = log_lines(logged, "ERROR")
        # every problem on a line of its own logged at ERROR (a line-based reader such as
        # journald sees each line as a record: a problem on a continuation line loses the
        # level and the logger)
        for problem in ("server.colour: unknown setting",
                        f"openrouter.keys[1]: not an OpenRouter key (must start with 'sk-or-'): "
                        f"{mask_key(BAD_KEY)}"):
            assert [line for line in errors if problem in line], (problem, logged)
        assert BAD_KEY not in proxy.log()
        assert_clean_log(proxy.log())

        # the old keys serve on, the refused one is never used
        for n in range(6):
            assert (await roundtrip(proxy.port, chat({"n": n}))).status == 200
        assert {key_sent(r) for r in chats(fake)} == {k0, k1}
        assert set(await key_states(proxy.port)) == {key_id(k0), key_id(k1)}

        # a valid config afterwards is taken
        doc = yaml.safe_load(config.read_text())
        del doc["server"]["colour"]
        doc["openrouter"]["keys"] = [k2]
        config.write_text(yaml.safe_dump(doc))
        logged = await reload(proxy)
        assert "reloaded: 1 key(s) (1 added, 2 removed); strategy round-robin" in logged
        fake.requests.clear()
        for n in range(3):
            assert (await roundtrip(proxy.port, chat({"n": n}))).status == 200
        assert {key_sent(r) for r in chats(fake)} == {k2}


async def test_settings_that_need_a_restart_are_named_and_the_port_stays(
        fake: FakeOpenRouter, upstream: Upstream, ca_file: str, tmp_path: Path) -> None:
    k0, k1, _ = KEYS
    async with proxy_process(tmp_path, fake.port, ca_file, openrouter={"keys": [k0]},
                             state={"file": None}) as proxy:
        other_port = free_port()
        edit_config(tmp_path / CONFIG_NAME,
                    {"server": {"port": other_port}, "openrouter": {"keys": [k1]}})
        logged = await reload(proxy)
        [warning] = [line for line in log_lines(logged, "WARNING") if "server.port" in line]
        assert warning.endswith("reload: server.port changed; it takes effect after a restart")
        assert "reloaded: 1 key(s) (1 added, 1 removed)" in logged  # the rest was applied
        # still where it was, not on the new port
        fake.requests.clear()
        assert (await roundtrip(proxy.port, chat({"n": 1}))).status == 200
        assert [key_sent(r) for r in chats(fake)] == [k1]
        assert await refused(other_port)


async def test_a_new_upstream_takes_new_requests_while_a_stream_on_the_old_one_ends(
        fake: FakeOpenRouter, second_fake: FakeOpenRouter, upstream: Upstream, ca_file: str,
        tmp_path: Path) -> None:
    second_fake.script = upstream.script
    async with proxy_process(tmp_path, fake.port, ca_file, state={"file": None}) as proxy:
        assert (await roundtrip(proxy.port, chat({"n": 0}))).status == 200  # one idle conn
        stream = asyncio.create_task(sse(proxy.port, 7))
        await eventually(lambda: upstream.streams_started == 1, 10, "the stream to start")

        edit_config(tmp_path / CONFIG_NAME, {"openrouter": {
            "base_url": f"https://127.0.0.1:{second_fake.port}/api/v1"}})
        logged = await reload(proxy)
        assert "reloaded: 3 key(s) (0 added, 0 removed)" in logged
        doc = await dashboard(proxy.port)
        assert doc["upstream"] == f"https://127.0.0.1:{second_fake.port}/api/v1"
        for n in range(1, 5):
            resp = await roundtrip(proxy.port, chat({"n": n}))
            assert resp.status == 200
            assert answer_of(resp) == f"answer {n}"
        assert sorted(n_of(r) for r in chats(second_fake)) == [1, 2, 3, 4]
        assert not stream.done()
        assert_stream_whole(await stream, 7)
        assert [n_of(r) for r in chats(fake)] == [0, -1]  # nothing new on the old upstream
        # the old upstream's connections, idle and busy, are all closed once the stream ended
        await eventually(lambda: fake.open_connections == 0, 5,
                         "the old upstream's connections to be closed")
        assert_clean_log(proxy.log())
