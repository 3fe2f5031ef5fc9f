"""orproxy's performance targets, and how each is evaluated on a run's medians.

The targets are the project's own (W1 CPU per request ≤ 300 µs, W4 chunk delay p99 ≤ 20 ms
…); each is judged for orproxy and for every orproxy variant of the run alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Medians = dict[str, dict[str, float]]  # subject -> metric -> median


@dataclass(frozen=True)
class Target:
    """One target on ``workload``/``metric`` for orproxy.

    kind: ``min_ratio`` (orproxy/nginx >= t), ``max_ratio`` (orproxy/nginx <= t),
    ``max_added`` (orproxy - direct <= t), ``max`` (orproxy <= t),
    ``all`` (orproxy == its ``streams`` metric).
    """

    workload: str
    metric: str
    kind: str
    threshold: float
    text: str
    unit: str = ""  # of the shown value for kind ``max``


TARGETS = [
    Target("W1-32", "rps", "min_ratio", 0.5, "≥ 50% of nginx req/s"),
    Target("W1-32", "cpu_us_per_req", "max", 300.0, "≤ 300 µs CPU/request", " µs"),
    Target("W1-1", "p50_ms", "max_added", 0.5, "added p50 ≤ 0.5 ms over direct"),
    Target("W2", "rps", "min_ratio", 0.7, "≥ 70% of nginx streams/s"),
    Target("W2", "cpu_us_per_chunk", "max", 40.0, "≤ 40 µs CPU/chunk", " µs"),
    Target("W3", "rps", "min_ratio", 0.5, "≥ 50% of nginx req/s"),
    Target("W4", "complete", "all", 0.0, "all streams complete"),
    Target("W4", "wall_s", "max_ratio", 1.2, "wall ≤ 1.2× nginx"),
    Target("W4", "delay_p99_ms", "max", 20.0, "chunk delay p99 ≤ 20 ms", " ms"),
    Target("W4", "peak_rss_mb", "max", 60.0, "peak RSS ≤ 60 MB", " MB"),
    Target("W5", "ttfb_p50_ms", "max_added", 0.5, "added TTFB p50 ≤ 0.5 ms over direct"),
    Target("W5", "ttfe_p50_ms", "max_added", 0.5, "added first-event p50 ≤ 0.5 ms over direct"),
]


@dataclass
class Verdict:
    """A target's evaluated value (``None`` when not measurable) and outcome."""

    target: Target
    value: float | None
    ok: bool | None

    def mark(self) -> str:
        return "–" if self.ok is None else ("✓" if self.ok else "✗")

    def shown(self) -> str:
        t = self.target
        if self.value is None:
            return "n/a"
        if t.kind in ("min_ratio", "max_ratio"):
            return f"{self.value:.2f}× nginx"
        if t.kind == "max_added":
            return f"{self.value:+.3f} ms vs direct"
        if t.kind == "all":
            return f"{self.value:.0f} failed"
        return f"{self.value:.1f}{t.unit}"


def _get(medians: Medians, subject: str, metric: str) -> float | None:
    value = medians.get(subject, {}).get(metric)
    return None if value is None or math.isnan(value) else value


def evaluate(target: Target, medians: Medians, subject: str = "orproxy") -> Verdict:
    """Evaluate ``target`` for ``subject`` (orproxy or a variant) on one workload's medians."""
    o = _get(medians, subject, target.metric)
    if o is None:
        return Verdict(target, None, None)
    t = target.threshold
    if target.kind in ("min_ratio", "max_ratio"):
        n = _get(medians, "nginx", target.metric)
        if not n:
            return Verdict(target, None, None)
        r = o / n
        return Verdict(target, r, r >= t if target.kind == "min_ratio" else r <= t)
    if target.kind == "max_added":
        d = _get(medians, "direct", target.metric)
        if d is None:
            return Verdict(target, None, None)
        return Verdict(target, o - d, o - d <= t)
    if target.kind == "all":
        total = _get(medians, subject, "streams") or 0.0
        return Verdict(target, total - o, o >= total > 0)
    return Verdict(target, o, o <= t)


def for_workload(workload: str) -> list[Target]:
    return [t for t in TARGETS if t.workload == workload]
