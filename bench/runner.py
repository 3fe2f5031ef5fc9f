"""Orchestration: start servers, run checks, run every workload interleaved, stop servers."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench import checks
from bench.fake_upstream import raise_nofile_limit
from bench.settings import (
    NGINX_PORT,
    ORPROXY_PORT,
    REPO_ROOT,
    UPSTREAM_PORT,
    VARIANT_PORT,
    Pinning,
    Profile,
)
from bench.stats import median
from bench.subjects import Nginx, Orproxy, Service, Subject, Upstream
from bench.variants import Variant
from bench.workloads import Context, Metrics, Workload

# How repeats are combined: worst case for correctness counters, median otherwise.
_AGGREGATE = {"complete": min, "ok": min, "errors": max, "connections": max}
# Total time a run may spend waiting for other processes to go idle.
_QUIET_BUDGET_S = 120.0


@dataclass
class RunData:
    """Everything the report needs."""

    profile: Profile
    pinning: Pinning
    subjects: list[str]
    workloads: list[Workload]
    command: str
    started: str
    machine: dict[str, str]
    variants: list[Variant] = field(default_factory=list)
    results: dict[str, dict[str, list[Metrics]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    checks: dict[str, list[checks.Check]] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    quiet_wait_s: float = 0.0  # max wait for an idle machine before each run
    waited_s: float = 0.0
    noisy_starts: int = 0

    def medians(self, workload: str) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for subject, runs in self.results.get(workload, {}).items():
            keys = {k for run in runs for k in run}
            out[subject] = {
                k: _AGGREGATE.get(k, median)([r[k] for r in runs if k in r]) for k in sorted(keys)
            }
        return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rotate(items: list[Subject], n: int) -> list[Subject]:
    n %= max(1, len(items))
    return items[n:] + items[:n]


def _wait_quiet(max_wait: float, threshold_pct: float = 15.0) -> float:
    """Wait (at most ``max_wait`` s) until the machine is idle between runs.

    Our servers are idle between runs, so any busy CPU is someone else's; returns
    the busy % of one core seen last.
    """
    ncpu = psutil.cpu_count() or 1
    deadline = time.monotonic() + max_wait
    while True:
        busy = float(psutil.cpu_percent(interval=0.5)) * ncpu
        if busy <= threshold_pct or time.monotonic() >= deadline:
            return busy
        time.sleep(0.5)


def _pin_self(pinning: Pinning) -> None:
    if pinning.enabled:
        os.sched_setaffinity(0, set(pinning.loadgen))


def run(data: RunData, workdir_keep: bool = False) -> RunData:
    """Run ``data.workloads`` on ``data.subjects``; fills results, checks, logs."""
    t_start = time.monotonic()
    raise_nofile_limit()  # inherited by every server and client we start
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    _pin_self(data.pinning)
    workdir = Path(tempfile.mkdtemp(prefix="orproxy-bench-"))
    cpus = data.pinning.servers
    services: list[Service] = []
    try:
        upstream = Upstream(UPSTREAM_PORT, workdir, cpus)
        _log(f"starting fake upstream on :{UPSTREAM_PORT}")
        upstream.start()
        services.append(upstream)
        subjects: list[Subject] = []
        for name in data.subjects:
            if name == "direct":
                subjects.append(Subject("direct", UPSTREAM_PORT, upstream))
                continue
            svc = _service(name, data.variants, workdir, cpus)
            _log(f"starting {name} on :{svc.port}")
            svc.start()
            services.append(svc)
            subjects.append(Subject(name, svc.port, svc))
        for s in subjects:
            try:
                data.checks[s.name] = asyncio.run(checks.run_checks(s.name, s.port, UPSTREAM_PORT))
            except Exception as exc:
                data.checks[s.name] = [
                    checks.Check("checks ran", False, f"{type(exc).__name__}: {exc}")
                ]
            for c in data.checks[s.name]:
                _log(f"  check {s.name}: {'ok ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
        ctx = Context(data.profile, data.pinning, workdir, upstream.tree())
        _run_workloads(data, ctx, subjects)
    finally:
        for svc in reversed(services):
            code = svc.stop()
            if svc.name != "upstream":
                data.exit_codes[svc.name] = code
            data.logs[svc.name] = svc.log_text()
        if workdir_keep:
            data.notes.append(f"scratch dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        data.duration_s = time.monotonic() - t_start
    return data


def _service(name: str, variants: list[Variant], workdir: Path, cpus: tuple[int, ...]) -> Service:
    if name == "nginx":
        return Nginx(NGINX_PORT, workdir, cpus, UPSTREAM_PORT)
    if name == "orproxy":
        return Orproxy(ORPROXY_PORT, workdir, cpus, UPSTREAM_PORT)
    index = next(i for i, v in enumerate(variants) if v.subject == name)
    return Orproxy(VARIANT_PORT + index, workdir, cpus, UPSTREAM_PORT, variants[index])


def _run_workloads(data: RunData, ctx: Context, subjects: list[Subject]) -> None:
    for wl in data.workloads:
        _log(f"== {wl.id}: {wl.title}")
        per_subject: dict[str, list[Metrics]] = {s.name: [] for s in subjects}
        data.results[wl.id] = per_subject
        for s in subjects:
            try:
                wl.warmup(ctx, s)
            except Exception as exc:
                data.failures.append(f"{wl.id} warmup on {s.name}: {exc}")
        for rep in range(data.profile.repeats):
            for s in _rotate(subjects, rep):
                if not s.tree().alive():
                    data.failures.append(f"{wl.id} rep {rep + 1}: {s.name} is not running")
                    continue
                t_wait = time.monotonic()
                budget = min(data.quiet_wait_s, _QUIET_BUDGET_S - data.waited_s)
                if budget > 0 and _wait_quiet(budget) > 15.0:
                    data.noisy_starts += 1
                data.waited_s += time.monotonic() - t_wait
                try:
                    metrics = wl.run(ctx, s)
                except Exception as exc:
                    data.failures.append(f"{wl.id} rep {rep + 1} on {s.name}: {exc}")
                    _log(traceback.format_exc())
                    continue
                per_subject[s.name].append(metrics)
                shown = ", ".join(
                    f"{m.key}={metrics[m.key]:.{m.digits}f}"
                    for m in wl.metrics[:4]
                    if m.key in metrics and not math.isnan(metrics[m.key])
                )
                _log(f"  rep {rep + 1} {s.name:12s} {shown}")
                if data.quiet_wait_s <= 0:
                    time.sleep(0.3)
