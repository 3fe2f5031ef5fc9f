"""The proxy, and other servers, as processes: for the tests that run them as a user does.

``run_orproxy`` runs ``python -m orproxy`` once (``--check``, a config that is refused);
``orproxy_process`` keeps it running while the test talks to it, its stdout and stderr in
files, and stops it at the end with SIGTERM, as systemd does (``kill`` only when the test
failed); ``proxy_process`` is that with ``--config`` written for the fake OpenRouter. The
child's environment never carries this one's OPENROUTER_KEYS / ORPROXY_ACCESS_KEY (a test
sets them where they are its subject); an open-file limit is set in the child only
(``preexec_fn``), never in the test process. ``free_port`` and ``wait_listening`` serve
any server; ``cpu_seconds``, ``rss_bytes``, ``open_file_limit`` and ``PeakSampler`` look at
a running process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.conftest import ACCESS_KEY, KEYS, merge

REPO = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 20.0
STOP_SECONDS = 15.0
CONFIG_NAME = "proxy.yml"  # what proxy_process writes in its folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_listening(port: int, proc: asyncio.subprocess.Process,
                         seconds: float = STARTUP_SECONDS) -> None:
    """Until something accepts on ``port``; fails if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.returncode is None, f"server exited early with {proc.returncode}"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError(f"nothing listens on {port}")


# --- python -m orproxy ------------------------------------------------------------------------


def orproxy_env(**extra: str) -> dict[str, str]:
    """This environment without the proxy's own variables, plus ``extra``; the repository
    importable, output unbuffered."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENROUTER_KEYS", "ORPROXY_ACCESS_KEY")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_orproxy(*args: str, cwd: Path, env: dict[str, str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
    """``python -m orproxy *args`` to its end, its output captured."""
    return subprocess.run([sys.executable, "-m", "orproxy", *args], cwd=cwd,
                          env=env or orproxy_env(), capture_output=True, text=True, timeout=30)


@dataclass
class ProxyProcess:
    proc: asyncio.subprocess.Process
    port: int
    stdout: Path
    stderr: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """What it wrote to stderr so far."""
        return self.stderr.read_text(errors="replace")

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """``sig`` (SIGTERM, as systemd stops it), then its exit status."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), STOP_SECONDS)


def nofile_limit(soft: int, hard: int) -> Callable[[], None]:
    """A preexec_fn that sets the child's open-file limit (soft, hard)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


@contextlib.asynccontextmanager
async def orproxy_process(*args: str, cwd: Path, port: int, env: dict[str, str] | None = None,
                          nofile: tuple[int, int] | None = None,
                          ) -> AsyncIterator[ProxyProcess]:
    """``python -m orproxy *args`` in ``cwd`` (stdout.log and stderr.log there), once it
    listens on ``port``; stopped at the end (its exit status in ``proc.returncode``)."""
    out, err = cwd / "stdout.log", cwd / "stderr.log"
    with out.open("wb") as out_file, err.open("wb") as err_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "orproxy", *args, cwd=cwd, env=env or orproxy_env(),
            stdout=out_file, stderr=err_file,
            preexec_fn=nofile_limit(*nofile) if nofile else None)
    running = ProxyProcess(proc, port, out, err)
    passed = False
    try:
        await wait_listening(port, proc)
        yield running
        passed = True
    finally:
        if passed and proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await running.stop()
        if proc.returncode is None:  # a failed test has no shutdown grace to wait for
            proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def proxy_process(tmp_path: Path, fake_port: int, ca_file: str, *,
                        nofile: tuple[int, int] | None = None, **overrides: Any,
                        ) -> AsyncIterator[ProxyProcess]:
    """``orproxy_process`` against the fake OpenRouter on ``fake_port``: KEYS, the access
    key, INFO logs but no access lines (a test that reads them asks for them), no background
    quota checks; ``overrides`` merged into that config, which is written to
    ``tmp_path / CONFIG_NAME``."""
    port = free_port()
    doc = merge({
        "server": {"host": "127.0.0.1", "port": port, "access_key": ACCESS_KEY,
                   "log_level": "INFO", "http_log_level": "WARNING"},
        "openrouter": {"keys": KEYS, "ca_file": ca_file,
                       "base_url": f"https://127.0.0.1:{fake_port}/api/v1",
                       "quota_check_seconds": 0},
    }, overrides)
    config = tmp_path / CONFIG_NAME
    config.write_text(yaml.safe_dump(doc))
    async with orproxy_process("--config", str(config), cwd=tmp_path, port=port,
                               nofile=nofile) as running:
        yield running


# --- looking at a running process ---------------------------------------------------------------


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
