"""Helpers for tests/test_findings.py: the proxy as a process under resource limits, a fake
upstream that reads request bodies slowly, and a few probes of a running process (CPU time,
resident memory, sockets).

Processes are real (``python -m orproxy --config …``), as a user runs the proxy; limits are
set in the child only (``preexec_fn``), never in the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import h11
import psutil
import yaml

from tests import procs
from tests.conftest import ACCESS_KEY, KEYS, merge
from tests.fakeor import FakeOpenRouter, Recorded
from tests.rawhttp import RawClient, Response

REPO = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 20.0


# --- the proxy as a process --------------------------------------------------------------------


@dataclass
class ProxyProcess:
    proc: asyncio.subprocess.Process
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def process_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENROUTER_KEYS", "ORPROXY_ACCESS_KEY")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def nofile_limit(soft: int, hard: int) -> Callable[[], None]:
    """A preexec_fn that sets the child's open-file limit (soft, hard)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


@contextlib.asynccontextmanager
async def proxy_process(tmp_path: Path, fake: FakeOpenRouter, ca_file: str, *,
                        nofile: tuple[int, int] | None = None, **overrides: Any,
                        ) -> AsyncIterator[ProxyProcess]:
    """``python -m orproxy`` against ``fake``, INFO logging to a file; killed at the end."""
    port = procs.free_port()
    doc = merge({
        "server": {"host": "127.0.0.1", "port": port, "access_key": ACCESS_KEY,
                   "log_level": "INFO", "http_log_level": "WARNING"},
        "openrouter": {"keys": KEYS, "ca_file": ca_file,
                       "base_url": f"https://127.0.0.1:{fake.port}/api/v1",
                       "quota_check_seconds": 0},  # no background /key checks here
    }, overrides)
    config = tmp_path / "proxy.yml"
    config.write_text(yaml.safe_dump(doc))
    log = tmp_path / "proxy.log"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "orproxy", "--config", str(config), cwd=tmp_path,
            env=process_env(), stdout=asyncio.subprocess.DEVNULL, stderr=err,
            preexec_fn=nofile_limit(*nofile) if nofile else None)
    try:
        await procs.wait_listening(port, proc, STARTUP_SECONDS)
        yield ProxyProcess(proc, port, log)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def open_file_limit(pid: int) -> tuple[int, int]:
    """The (soft, hard) open-file limit a running process has."""
    soft, hard = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)
    return int(soft), int(hard)


class PeakSampler:
    """Samples a process's RSS every ``interval`` seconds until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.samples += 1
            await asyncio.sleep(self.interval)

    async def stop(self) -> int:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.peak = max(self.peak, rss_bytes(self.pid))
        return self.peak


# --- a fake upstream that takes request bodies slowly -----------------------------------------


class _SlowReader:
    """A StreamReader stand-in that hands out at most ``piece`` bytes per ``delay``."""

    def __init__(self, reader: asyncio.StreamReader, piece: int, delay: float) -> None:
        self._reader = reader
        self._piece = piece
        self._delay = delay

    async def read(self, n: int) -> bytes:
        await asyncio.sleep(self._delay)
        return await self._reader.read(min(n, self._piece))


@dataclass
class SlowReadingFake(FakeOpenRouter):
    """The fake OpenRouter, reading each request at about ``piece / delay`` bytes a second:
    an upstream that takes a large body slowly, so the proxy must hold it meanwhile."""

    piece: int = 64 * 1024
    delay: float = 0.004

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader,
                            conn_id: int) -> Recorded | None:
        slow = cast(asyncio.StreamReader, _SlowReader(reader, self.piece, self.delay))
        return await super()._read_request(conn, slow, conn_id)


# --- clients ----------------------------------------------------------------------------------


def error_of(resp: Response) -> dict[str, Any]:
    """The ``error`` object of an OpenRouter-shaped JSON error answer (checked)."""
    assert resp.header(b"content-type") == b"application/json", resp.headers
    doc = json.loads(resp.body)
    assert set(doc) == {"error"}, doc
    error = doc["error"]
    assert isinstance(error, dict)
    assert error["code"] == resp.status, doc
    assert isinstance(error["message"], str) and error["message"], doc
    return error


async def exchange(port: int, data: bytes, method: bytes = b"POST",
                   timeout: float = 30.0) -> Response:
    """One request on its own connection; the connection is dropped after the answer (a
    client that lingers would hold a proxy slot)."""
    client = await RawClient.connect(port)
    try:
        await client.send(data)
        return await client.response(method, timeout=timeout)
    finally:
        client.close()


async def wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def events_until_eof(data: bytes) -> list[str]:
    """Parse a response as the client got it, then its end of connection: the names of the
    h11 events, ending in ``EndOfMessage`` for a complete body or ``incomplete`` when the
    connection ended before the body did."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    names: list[str] = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return [*names, "incomplete"]
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return [*names, "incomplete"]
        names.append(type(event).__name__)
        if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return names
