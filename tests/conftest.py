"""Shared fixtures: a trustme CA, the fake OpenRouter over TLS, the proxy in-process, and
a test clock to run it on.

Tests run on the asyncio backend of anyio's pytest plugin, on real loopback sockets.
"""

from __future__ import annotations

import contextlib
import copy
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from orproxy.app import App
from orproxy.config import build_config
from tests.fakeor import FakeOpenRouter
from tests.memstream import FakeClock

ACCESS_KEY = "test-access-key"
KEYS = ["sk-or-v1-test-key-aaaaaaaaaaaa0001", "sk-or-v1-test-key-bbbbbbbbbbbb0002",
        "sk-or-v1-test-key-cccccccccccc0003"]
AUTH = (b"Authorization", b"Bearer " + ACCESS_KEY.encode())

ProxyFactory = Callable[..., Awaitable[App]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@contextlib.asynccontextmanager
async def fake_openrouter(tls: ssl.SSLContext) -> AsyncIterator[FakeOpenRouter]:
    server = FakeOpenRouter(tls=tls)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def fake(server_tls: ssl.SSLContext) -> AsyncIterator[FakeOpenRouter]:
    async with fake_openrouter(server_tls) as server:
        yield server


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def proxy_config(fake_port: int, ca_file: str, **overrides: Any) -> dict[str, Any]:
    base = {
        "server": {"host": "127.0.0.1", "port": 0, "access_key": ACCESS_KEY,
                   "log_level": "WARNING", "http_log_level": "WARNING"},
        "openrouter": {"keys": KEYS, "base_url": f"https://127.0.0.1:{fake_port}/api/v1",
                       "ca_file": ca_file, "rate_limit_cooldown": 60,
                       # each of these is tested where it is the subject; elsewhere off, so
                       # the other tests see plain forwarding and round-robin
                       "enable_cache": False, "sticky_sessions": False,
                       "stream_commit_seconds": 0, "quota_check_seconds": 0},
        "state": {"file": None},  # key state in memory: a test opts in to a file
    }
    return merge(base, overrides)


@pytest.fixture
async def make_proxy(fake: FakeOpenRouter, ca_file: str) -> AsyncIterator[ProxyFactory]:
    apps: list[App] = []

    async def factory(**overrides: Any) -> App:
        app = App(build_config(proxy_config(fake.port, ca_file, **overrides), {}))
        await app.start()
        apps.append(app)
        return app

    yield factory
    for app in apps:
        await app.shutdown()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> App:
    return await make_proxy()


@pytest.fixture
def clock() -> FakeClock:
    """A test clock, monotonic and wall, that moves only when the test advances it or the
    proxy waits on it (``on_clock``)."""
    return FakeClock()


def on_clock(app: App, clock: FakeClock) -> App:
    """Run a started proxy on ``clock``: its key pool's monotonic and wall clocks (rests and
    their ends), the wall clock the attempt loop reads OpenRouter's reset times with, the
    quota poller's wall clock and the sticky map's clock; the attempt loop's wait before a
    retry (the overload delay, a Retry-After) is recorded in ``clock.sleeps`` and moves the
    clock, and never waits. So a rest ends when the test moves time past it, and a test
    sees exactly how long it is."""
    services = app.services
    services.keys.clock = clock
    services.keys.wall = clock.wall
    services.attempts.wall = clock.wall
    services.attempts.sleep = clock.sleep
    if services.attempts.sticky is not None:
        services.attempts.sticky.clock = clock
    app.quota.wall = clock.wall
    return app


def clocked(make_proxy: ProxyFactory, clock: FakeClock) -> ProxyFactory:
    """``make_proxy`` whose proxies run on ``clock``: a module overrides its ``make_proxy``
    fixture with this (``proxy`` follows) to put every proxy of its tests on test time."""

    async def factory(**overrides: Any) -> App:
        return on_clock(await make_proxy(**overrides), clock)

    return factory


def sample(app: App, name: str, labels: dict[str, str] | None = None) -> float:
    """One metric sample of a running proxy (tests only: the proxy never reads its registry
    back)."""
    return app.services.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def tmp_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yml"
    path.write_text(text)
    return str(path)
