"""The outgoing proxy (``requestProxy``): real SOCKS5 (microsocks) and HTTP CONNECT
(tinyproxy) servers from Debian between orproxy and the fake OpenRouter, TLS end to end."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from orproxy.app import App
from tests.conftest import AUTH, KEYS, ProxyFactory
from tests.fakeor import FakeOpenRouter
from tests.procs import free_port, wait_listening
from tests.rawhttp import roundtrip

pytestmark = pytest.mark.anyio

REQUEST = (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: " + AUTH[1]
           + b"\r\nContent-Length: 2\r\n\r\n{}")


Launch = Callable[[list[str], int], Awaitable[None]]


@pytest.fixture
async def servers() -> AsyncIterator[Launch]:
    procs: list[asyncio.subprocess.Process] = []

    async def launch(argv: list[str], port: int) -> None:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL)
        procs.append(proc)
        await wait_listening(port, proc)

    yield launch
    for proc in procs:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 5)


async def check_through(app: App, fake: FakeOpenRouter) -> None:
    for _ in range(2):
        resp = await roundtrip(app.port, REQUEST, b"POST")
        assert resp.status == 200
        assert json.loads(resp.body)["object"] == "chat.completion"
    assert len(fake.requests) == 2
    assert fake.requests[0].header(b"authorization") == b"Bearer " + KEYS[0].encode()
    assert fake.opened == 1  # the tunnelled connection is kept alive and reused


@pytest.mark.parametrize("credentials", [False, True])
async def test_socks5(servers: Launch, make_proxy: ProxyFactory,
                      fake: FakeOpenRouter, credentials: bool) -> None:
    port = free_port()
    argv = ["microsocks", "-i", "127.0.0.1", "-p", str(port)]
    user = ""
    if credentials:
        argv += ["-u", "alice", "-P", "s3cret"]
        user = "alice:s3cret@"
    await servers(argv, port)
    url = f"socks5://{user}127.0.0.1:{port}"
    app = await make_proxy(requestProxy={"enabled": True, "url": url})
    await check_through(app, fake)


async def test_socks5_wrong_password_is_a_502(servers: Launch,
                                              make_proxy: ProxyFactory,
                                              fake: FakeOpenRouter) -> None:
    port = free_port()
    await servers(["microsocks", "-i", "127.0.0.1", "-p", str(port), "-u", "alice", "-P",
                   "s3cret"], port)
    app = await make_proxy(requestProxy={"enabled": True,
                                         "url": f"socks5://alice:wrong@127.0.0.1:{port}"},
                           retry={"max_attempts": 2})
    resp = await roundtrip(app.port, REQUEST, b"POST")
    assert resp.status == 502
    assert json.loads(resp.body)["error"]["code"] == 502
    assert fake.requests == []


@pytest.mark.parametrize("credentials", [False, True])
async def test_http_connect(servers: Launch, make_proxy: ProxyFactory,
                            fake: FakeOpenRouter, tmp_path: Path, credentials: bool) -> None:
    port = free_port()
    conf = tmp_path / "tinyproxy.conf"
    lines = [f"Port {port}", "Listen 127.0.0.1", "Timeout 60", "MaxClients 20",
             "Allow 127.0.0.1", "LogLevel Critical"]
    user = ""
    if credentials:
        lines.append("BasicAuth bob hunter2")
        user = "bob:hunter2@"
    conf.write_text("\n".join(lines) + "\n")
    await servers(["tinyproxy", "-d", "-c", str(conf)], port)
    url = f"http://{user}127.0.0.1:{port}"
    app = await make_proxy(requestProxy={"enabled": True, "url": url})
    await check_through(app, fake)


async def test_unreachable_proxy_is_a_502(make_proxy: ProxyFactory, fake: FakeOpenRouter) -> None:
    app = await make_proxy(requestProxy={"enabled": True,
                                         "url": f"socks5://127.0.0.1:{free_port()}"},
                           retry={"max_attempts": 2})
    resp = await roundtrip(app.port, REQUEST, b"POST")
    assert resp.status == 502
    assert fake.requests == []
