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


async def test_http_connect_refused_credentials_is_a_502(
        servers: Launch, make_proxy: ProxyFactory, fake: FakeOpenRouter,
        tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(f"Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nLogLevel Critical\n"
                    "BasicAuth bob hunter2\n")
    await servers(["tinyproxy", "-d", "-c", str(conf)], port)
    app = await make_proxy(requestProxy={"enabled": True,
                                         "url": f"http://bob:wrong@127.0.0.1:{port}"},
                           retry={"max_attempts": 1})
    resp = await roundtrip(app.port, REQUEST, b"POST")
    assert resp.status == 502
    assert json.loads(resp.body)["error"]["message"] == "upstream unreachable"
    assert fake.requests == []


class RecordingSocks:
    """A SOCKS5 server that records the CONNECT request's address and refuses it (reply 4,
    host unreachable): enough to see what the client sent."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _, count = await reader.readexactly(2)
            await reader.readexactly(count)
            writer.write(b"\x05\x00")
            head = await reader.readexactly(4)
            atyp = head[3]
            if atyp == 3:
                length = await reader.readexactly(1)
                address = length + await reader.readexactly(length[0])
            else:
                address = await reader.readexactly(4 if atyp == 1 else 16)
            port = await reader.readexactly(2)
            self.requests.append(head + address + port)
            writer.write(b"\x05\x04\x00\x01\x00\x00\x00\x00\x00\x00")
            await writer.drain()
        finally:
            writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.mark.parametrize(("scheme", "sent"), [
    # we resolved "localhost": an address (IPv4 or IPv6, as the resolver orders them)
    ("socks5", {b"\x01\x7f\x00\x00\x01", b"\x04" + bytes(15) + b"\x01"}),
    ("socks5h", {b"\x03\x09localhost"}),  # the proxy resolves: the name itself
])
async def test_socks5_resolves_here_and_socks5h_lets_the_proxy_resolve(
        make_proxy: ProxyFactory, fake: FakeOpenRouter, scheme: str, sent: set[bytes]) -> None:
    socks = RecordingSocks()
    port = await socks.start()
    try:
        app = await make_proxy(
            openrouter={"base_url": f"https://localhost:{fake.port}/api/v1"},
            requestProxy={"enabled": True, "url": f"{scheme}://127.0.0.1:{port}"},
            retry={"max_attempts": 1})
        resp = await roundtrip(app.port, REQUEST, b"POST")
        assert resp.status == 502  # the recording proxy refuses every CONNECT
        [request] = socks.requests
        assert request[:3] == b"\x05\x01\x00"
        assert request[3:-2] in sent
        assert request[-2:] == fake.port.to_bytes(2, "big")
    finally:
        socks.close()
