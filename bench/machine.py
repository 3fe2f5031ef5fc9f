"""Facts about the machine and tools, for the report header."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata

from bench.settings import REPO_ROOT


def _run(cmd: list[str], check: bool = False) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (proc.stdout + proc.stderr).strip()
    if check and proc.returncode != 0:
        return "unavailable"
    return text.splitlines()[0] if text else "unavailable"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _sysctl(name: str) -> str:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return " ".join(f.read().split())
    except OSError:
        return "?"


def describe() -> dict[str, str]:
    """Ordered facts: CPU, cores, kernel, Python, nginx, wrk, libraries, git commit."""
    return {
        "CPU": _cpu_model(),
        "cores": f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "nginx": _run(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": _run(["wrk", "--version"]).split(" [")[0],
        "h11 / psutil": f"{_version('h11')} / {_version('psutil')}",
        "git commit": _run(["git", "rev-parse", "--short", "HEAD"], check=True),
        "sysctl": (
            f"somaxconn={_sysctl('net.core.somaxconn')}, "
            f"tcp_tw_reuse={_sysctl('net.ipv4.tcp_tw_reuse')}, "
            f"ip_local_port_range={_sysctl('net.ipv4.ip_local_port_range')}"
        ),
    }
