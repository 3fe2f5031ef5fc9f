"""Constants shared by the harness: ports, keys, CPU pinning and run profiles."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"  # generated reports (git-ignored)
RESULTS_MD = BENCH_DIR / "RESULTS.md"  # hand-written and committed: never generated

HOST = "127.0.0.1"
UPSTREAM_PORT = 18090
ORPROXY_PORT = 18081
NGINX_PORT = 18082
VARIANT_PORT = 18083  # the first orproxy variant; the next ones count up

ACCESS_KEY = "bench-access-key"
AUTH_HEADERS = {"Authorization": f"Bearer {ACCESS_KEY}", "Content-Type": "application/json"}
UPSTREAM_KEYS = ("sk-or-v1-bench-aaaa", "sk-or-v1-bench-bbbb", "sk-or-v1-bench-cccc")

CHAT_PATH = "/api/v1/chat/completions"
MODELS_PATH = "/api/v1/models"
STATS_PATH = "/_bench/stats"

SUBJECTS = ("direct", "nginx", "orproxy")


def is_orproxy(subject: str) -> bool:
    """orproxy itself or one of its variants (``orproxy-NAME``)."""
    return subject == "orproxy" or subject.startswith("orproxy-")


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the load generator and the servers (subject + upstream) run on."""

    loadgen: tuple[int, ...]
    servers: tuple[int, ...]

    @property
    def enabled(self) -> bool:
        return bool(self.loadgen) and bool(self.servers)

    def describe(self) -> str:
        if not self.enabled:
            return "none (scheduler decides)"
        return (
            f"load generator + runner on CPU {_cpus(self.loadgen)}; "
            f"subject + fake upstream on CPU {_cpus(self.servers)}"
        )


def _cpus(cpus: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cpus)


def default_pinning(enabled: bool = True) -> Pinning:
    """Load generator on the first CPU, subject and upstream share the second."""
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or len(cpus) < 2:
        return Pinning((), ())
    return Pinning((cpus[0],), (cpus[1],))


@dataclass(frozen=True)
class Profile:
    """Durations and sizes of every workload for one kind of run."""

    name: str
    repeats: int
    wrk_duration_s: float
    warmup_s: float
    w1_conns: int = 32
    w2_conns: int = 32
    w2_chunks: int = 200
    w3_conns: int = 16
    w4_streams: int = 2000
    w4_chunks: int = 25
    w4_delay_ms: int = 200
    w4_stagger_ms: int = 200
    w5_requests: int = 200
    w5_warmup: int = 20
    w5_chunks: int = 5


FULL = Profile(name="full", repeats=3, wrk_duration_s=6.0, warmup_s=1.0)
QUICK = Profile(
    name="quick",
    repeats=1,
    wrk_duration_s=2.0,
    warmup_s=0.5,
    w4_streams=300,
    w4_chunks=10,
    w5_requests=50,
    w5_warmup=5,
)
