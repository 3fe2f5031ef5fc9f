"""Processes under test: the fake upstream, nginx and orproxy (start, readiness, stop).

Every server is started with ``taskset`` on the servers' CPU set so that all
three subjects get the same placement.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench import client, nginx_conf
from bench.procstats import ProcTree
from bench.settings import (
    ACCESS_KEY,
    HOST,
    MODELS_PATH,
    REPO_ROOT,
    STATS_PATH,
    UPSTREAM_KEYS,
)
from bench.variants import Variant


class StartError(RuntimeError):
    """A server did not come up."""


def http_status(port: int, path: str, timeout: float = 1.0) -> int:
    """GET ``path`` on loopback; returns the status of a complete response, else 0."""
    resp = asyncio.run(client.fetch(HOST, port, "GET", path, timeout=timeout))
    return resp.status if resp.ok else 0


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((HOST, port)) == 0


def pin_prefix(cpus: tuple[int, ...]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []


class Service:
    """A long-running server process with a log file."""

    name = "service"
    ready_path = "/"

    def __init__(
        self, port: int, workdir: Path, cpus: tuple[int, ...], name: str | None = None
    ) -> None:
        self.name = name or type(self).name  # orproxy variants are named orproxy-NAME
        self.port = port
        self.workdir = workdir
        self.cpus = cpus
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout: float = 30.0) -> None:
        if port_in_use(self.port):
            raise StartError(f"{self.name}: port {self.port} already in use")
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                pin_prefix(self.cpus) + self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env=self.env(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if http_status(self.port, self.ready_path) == 200:
                return
            time.sleep(0.1)
        self.stop()
        raise StartError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def tree(self) -> ProcTree:
        assert self.proc is not None
        return ProcTree([self.proc.pid])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class Upstream(Service):
    """The fake OpenRouter (bench.fake_upstream), one process."""

    name = "upstream"
    ready_path = STATS_PATH

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench.fake_upstream",
            "--host",
            HOST,
            "--port",
            str(self.port),
        ]


class Nginx(Service):
    """Debian's nginx-light with a generated config under the temp dir."""

    name = "nginx"
    ready_path = MODELS_PATH

    def __init__(self, port: int, workdir: Path, cpus: tuple[int, ...], upstream_port: int) -> None:
        super().__init__(port, workdir, cpus)
        self.prefix = workdir / "nginx"
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(nginx_conf.render(self.prefix, port, HOST, upstream_port))

    def command(self) -> list[str]:
        return [
            "nginx",
            "-p",
            str(self.prefix),
            "-c",
            str(self.conf),
            "-e",
            str(self.prefix / "error.log"),
        ]

    def log_text(self) -> str:
        try:
            return (self.prefix / "error.log").read_text(errors="replace") + super().log_text()
        except OSError:
            return super().log_text()


class Orproxy(Service):
    """``python -m orproxy --config PATH`` with a generated bench config (plus a variant's)."""

    name = "orproxy"
    ready_path = "/health"

    def __init__(
        self,
        port: int,
        workdir: Path,
        cpus: tuple[int, ...],
        upstream_port: int,
        variant: Variant | None = None,
    ) -> None:
        super().__init__(port, workdir, cpus, variant.subject if variant else None)
        self.config = workdir / f"{self.name}.yaml"
        write_orproxy_config(self.config, port, upstream_port, variant)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "orproxy", "--config", str(self.config)]

    def env(self) -> dict[str, str]:
        return orproxy_env()


def orproxy_env() -> dict[str, str]:
    """The environment for orproxy: the repo importable, and the variables that would override
    the bench's keys and access key removed (real keys must never meet the fake upstream)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("OPENROUTER_KEYS", "ORPROXY_ACCESS_KEY")
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def orproxy_config(port: int, upstream_port: int) -> dict[str, object]:
    return {
        "server": {
            "host": HOST,
            "port": port,
            "access_key": ACCESS_KEY,
            "log_level": "WARNING",
            "http_log_level": "WARNING",
        },
        "openrouter": {
            "keys": list(UPSTREAM_KEYS),
            "base_url": f"http://{HOST}:{upstream_port}/api/v1",
            "enable_cache": False,
            "quota_check_seconds": 0,  # the fake upstream has no /key
        },
        "state": {"file": None},  # nothing written into the checkout
    }


def write_orproxy_config(
    path: Path, port: int, upstream_port: int, variant: Variant | None = None
) -> Path:
    config = orproxy_config(port, upstream_port)
    if variant is not None:
        config = variant.apply(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _run_orproxy(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=orproxy_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def orproxy_importable() -> tuple[bool, str]:
    """Whether ``import orproxy.__main__`` works from the repo root."""
    proc = _run_orproxy(["-c", "import orproxy.__main__"])
    return proc.returncode == 0, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def variant_problems(variant: Variant, workdir: Path) -> str | None:
    """What ``orproxy --check`` says against the variant's config, or ``None`` if it is valid."""
    path = write_orproxy_config(workdir / f"{variant.subject}.yaml", 0, 1, variant)
    proc = _run_orproxy(["-m", "orproxy", "--check", "--config", str(path)])
    if proc.returncode == 0:
        return None
    return (proc.stderr or proc.stdout).strip() or f"orproxy --check exited {proc.returncode}"


# What each tool is for, and the Debian package that has it.
TOOLS = {
    "wrk": ("load generator of W1-W3", "wrk"),
    "nginx": ("the nginx subject", "nginx-light"),
    "taskset": ("CPU pinning (or run with --no-pin)", "util-linux"),
}


def missing_tools(needed: list[str]) -> list[str]:
    """One line per tool in ``needed`` that is not on PATH, saying how to install it."""
    return [
        f"missing tool: {tool} (needed for {TOOLS[tool][0]}); "
        f"install it with: apt-get install -y {TOOLS[tool][1]}"
        for tool in needed
        if shutil.which(tool) is None
    ]


class Subject:
    """What a workload talks to: a port, and the process tree charged for the work."""

    def __init__(self, name: str, port: int, service: Service) -> None:
        self.name = name
        self.port = port
        self.service = service  # for "direct", the upstream itself

    @property
    def is_proxy(self) -> bool:
        return self.name != "direct"

    def tree(self) -> ProcTree:
        return self.service.tree()
