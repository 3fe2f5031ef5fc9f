"""CPU seconds and RSS of a subject's process tree (psutil), sampled during runs."""

from __future__ import annotations

import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass

import psutil


class ProcTree:
    """Root processes plus all their descendants, re-listed at every sample."""

    def __init__(self, pids: list[int]) -> None:
        self.roots = [psutil.Process(pid) for pid in pids]

    def processes(self) -> list[psutil.Process]:
        procs: dict[int, psutil.Process] = {}
        for root in self.roots:
            try:
                procs[root.pid] = root
                for child in root.children(recursive=True):
                    procs[child.pid] = child
            except psutil.Error:
                continue
        return list(procs.values())

    def cpu_seconds(self) -> float:
        """User + system CPU of the live tree (incl. reaped children's times)."""
        total = 0.0
        for proc in self.processes():
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def rss_bytes(self) -> int:
        total = 0
        for proc in self.processes():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total

    def alive(self) -> bool:
        try:
            return all(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in self.roots)
        except psutil.Error:
            return False


@dataclass
class Usage:
    """What a tree consumed during one measured run."""

    cpu_s: float
    peak_rss: int


@dataclass
class Sampled:
    """Outcome of :func:`run_sampled`."""

    stdout: str
    stderr: str
    returncode: int
    wall_s: float
    loadgen_cpu_s: float
    other_cpu_s: float
    usage: dict[str, Usage]


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _system_busy() -> float:
    """Machine-wide user+nice+system seconds (irq/softirq excluded: not charged to tasks)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system)


def run_sampled(
    cmd: list[str], trees: dict[str, ProcTree], interval: float = 0.1, timeout: float = 300.0
) -> Sampled:
    """Run ``cmd`` (the load generator) to completion, sampling CPU and peak RSS of each tree.

    The load generator's own CPU comes from RUSAGE_CHILDREN (it is the only
    child reaped meanwhile). ``other_cpu_s`` is machine-wide busy time not
    accounted to the trees, the load generator or this process: noise from
    whatever else runs on the machine.
    """
    start_cpu = {name: tree.cpu_seconds() for name, tree in trees.items()}
    peak = {name: tree.rss_bytes() for name, tree in trees.items()}
    gen0 = _children_cpu()
    self0 = _self_cpu()
    busy0 = _system_busy()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        deadline = t0 + timeout
        while proc.poll() is None:
            if time.perf_counter() > deadline:
                proc.kill()
                proc.wait()
                break
            time.sleep(interval)
            for name, tree in trees.items():
                peak[name] = max(peak[name], tree.rss_bytes())
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    usage = {
        name: Usage(cpu_s=tree.cpu_seconds() - start_cpu[name], peak_rss=peak[name])
        for name, tree in trees.items()
    }
    loadgen = _children_cpu() - gen0
    distinct = {tuple(r.pid for r in tree.roots): usage[name].cpu_s for name, tree in trees.items()}
    ours = sum(distinct.values()) + loadgen + _self_cpu() - self0
    return Sampled(
        stdout=stdout,
        stderr=stderr,
        returncode=proc.returncode,
        wall_s=wall,
        loadgen_cpu_s=loadgen,
        other_cpu_s=max(0.0, _system_busy() - busy0 - ours),
        usage=usage,
    )
