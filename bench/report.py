"""Renders a run as Markdown (bench/RESULTS.md) and a short console summary."""

from __future__ import annotations

import math

from bench import targets
from bench.runner import RunData
from bench.workloads import MetricSpec, Workload

PLACEMENT_RATIONALE = (
    "The load generator (wrk or the asyncio client) and the runner run on one CPU; the "
    "subject and the fake upstream share the other. The load generator gets a core of its "
    "own so that its timestamps (latency, TTFB, chunk arrival) are not delayed by the "
    "servers and so that it is never what limits a run (see *load generator CPU %*). "
    "Subject and upstream share the remaining core for every subject alike, so for "
    "`direct` the upstream has that core alone and for nginx/orproxy the proxy competes "
    "with the upstream: req/s figures of the proxies are capacity of *one core shared with "
    "the upstream*, which compresses orproxy/nginx ratios towards 1 when nginx is far "
    "cheaper than the upstream. The per-request/per-chunk CPU figures (psutil CPU time of "
    "the subject's own processes divided by work done) do not have that bias and are the "
    "ones to compare for cost. *upstream CPU %* shows how much of the shared core the "
    "upstream used."
)


def _fmt(value: float | None, digits: int) -> str:
    if value is None or math.isnan(value):
        return "–"
    if digits == 0 and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def _target_cell(wl: Workload, metric: MetricSpec, medians: targets.Medians) -> str:
    cells = []
    for t in targets.for_workload(wl.id):
        if t.metric == metric.key:
            v = targets.evaluate(t, medians)
            cells.append(f"{v.mark()} {t.text} ({v.shown()})")
    return "; ".join(cells)


def workload_table(wl: Workload, medians: targets.Medians, subjects: list[str]) -> list[str]:
    head = ["metric", *subjects]
    show_ratios = "orproxy" in subjects
    if show_ratios:
        head += ["orproxy/nginx", "orproxy/direct"]
    head.append("target (orproxy)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in wl.metrics:
        row = [m.label]
        vals = {s: medians.get(s, {}).get(m.key) for s in subjects}
        if all(v is None for v in vals.values()):
            continue
        row += [_fmt(vals[s], m.digits) for s in subjects]
        if show_ratios:
            o = vals.get("orproxy")
            row += (
                [_ratio(o, vals.get("nginx")), _ratio(o, vals.get("direct"))]
                if m.ratio
                else ["", ""]
            )
        row.append(_target_cell(wl, m, medians))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _verdicts(data: RunData) -> list[tuple[str, targets.Verdict]]:
    out = []
    for wl in data.workloads:
        medians = data.medians(wl.id)
        for t in targets.for_workload(wl.id):
            out.append((wl.id, targets.evaluate(t, medians)))
    return out


def render(data: RunData) -> str:
    p = data.profile
    lines = [
        "# orproxy benchmark results",
        "",
        f"- Date: {data.started}",
        f"- Command: `{data.command}`",
        f"- Profile: **{p.name}** — {p.repeats} repeat(s) per subject, interleaved "
        f"(subject order rotated every repeat), wrk runs of {p.wrk_duration_s:g} s after a "
        f"{p.warmup_s:g} s warm-up; figures are medians of the repeats (completions: worst, "
        "errors: worst).",
        f"- Subjects: {', '.join(data.subjects)}",
        f"- Run took {data.duration_s / 60:.1f} min"
        + (
            f" (of which {data.waited_s:.0f} s waiting for an idle machine)"
            if data.waited_s > 1
            else ""
        ),
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in data.machine.items()],
        "",
        "## CPU placement",
        "",
        f"Pinning: {data.pinning.describe()}.",
        "",
    ]
    if data.pinning.enabled:
        lines += [PLACEMENT_RATIONALE, ""]
    verdicts = _verdicts(data)
    if "orproxy" in data.subjects:
        passed = sum(1 for _, v in verdicts if v.ok)
        known = sum(1 for _, v in verdicts if v.ok is not None)
        lines += [
            f"## Targets for orproxy: {passed}/{known} met",
            "",
            "| workload | target | orproxy | |",
            "|---|---|---|---|",
        ]
        for wid, v in verdicts:
            lines.append(f"| {wid} | {v.target.text} | {v.shown()} | {v.mark()} |")
        lines.append("")
    lines += ["## Results", ""]
    for wl in data.workloads:
        lines += [f"### {wl.id}: {wl.title}", "", wl.what + ".", ""]
        lines += workload_table(wl, data.medians(wl.id), data.subjects)
        lines.append("")
    lines += _checks_section(data)
    lines += _problems_section(data)
    lines += _raw_section(data)
    lines += ["See bench/README.md for what each workload and column means.", ""]
    return "\n".join(lines)


def _checks_section(data: RunData) -> list[str]:
    lines = [
        "## Correctness checks (before load)",
        "",
        "| subject | check | | detail |",
        "|---|---|---|---|",
    ]
    for subject, results in data.checks.items():
        for c in results:
            lines.append(f"| {subject} | {c.name} | {'✓' if c.ok else '✗'} | {c.detail} |")
    return [*lines, ""]


def _problems_section(data: RunData) -> list[str]:
    lines = ["## Problems seen", ""]
    items = list(data.failures)
    for name, code in data.exit_codes.items():
        if code not in (0, None):
            items.append(f"{name} exited with code {code} after SIGTERM (expected 0)")
    for wl in data.workloads:
        for subject, runs in data.results.get(wl.id, {}).items():
            errs = sum(r.get("errors", 0.0) for r in runs)
            if errs:
                items.append(f"{wl.id}: {subject} had {errs:.0f} errors over {len(runs)} run(s)")
    for wl in data.workloads:
        for subject, runs in data.results.get(wl.id, {}).items():
            noisy = [
                r
                for r in runs
                if r.get("other_cpu_pct", 0.0) > 10.0
                or r.get("other_cpu_s", 0.0) > 0.1 * r.get("wall_s", 1e9)
            ]
            if noisy:
                items.append(
                    f"{wl.id}: {len(noisy)}/{len(runs)} run(s) of {subject} had other "
                    "processes using >10% of a core (noisy)"
                )
    if data.noisy_starts:
        items.append(
            f"{data.noisy_starts} run(s) started while the machine was still busy "
            f"after waiting {data.quiet_wait_s:g} s"
        )
    for name in ("orproxy", "nginx"):
        text = data.logs.get(name, "").strip()
        if text:
            log_lines = text.splitlines()
            items.append(
                f"{name} log has {len(log_lines)} line(s); last ones:\n\n```\n"
                + "\n".join(log_lines[-15:])
                + "\n```"
            )
    lines += [f"- {item}" for item in items] or ["- none"]
    lines += [f"- note: {n}" for n in data.notes]
    return [*lines, ""]


def _raw_section(data: RunData) -> list[str]:
    lines = ["## Raw runs", "", "Every repeat, in run order per subject.", ""]
    for wl in data.workloads:
        keys = [m for m in wl.metrics if m.ratio][:4] or wl.metrics[:3]
        lines.append(f"- **{wl.id}**")
        for subject, runs in data.results.get(wl.id, {}).items():
            parts = []
            for m in keys:
                vals = [_fmt(r.get(m.key), m.digits) for r in runs]
                parts.append(f"{m.label}: {' / '.join(vals)}")
            lines.append(f"  - {subject}: " + "; ".join(parts))
    return [*lines, ""]


def console_summary(data: RunData) -> str:
    """Compact text for the terminal."""
    out = []
    for wl in data.workloads:
        out.append(f"{wl.id}: {wl.title}")
        medians = data.medians(wl.id)
        for m in wl.metrics:
            vals = [f"{s}={_fmt(medians.get(s, {}).get(m.key), m.digits)}" for s in data.subjects]
            cell = _target_cell(wl, m, medians)
            out.append(f"  {m.label:42s} " + "  ".join(vals) + (f"   [{cell}]" if cell else ""))
    for _, v in _verdicts(data):
        if v.ok is False:
            out.append(f"target missed: {v.target.workload} {v.target.text} ({v.shown()})")
    for f in data.failures:
        out.append(f"FAILURE: {f}")
    return "\n".join(out)
