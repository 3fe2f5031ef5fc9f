"""Renders a run as Markdown, JSON and a console summary, and writes the report files.

Generated reports go to bench/out/ (git-ignored) under a UTC timestamp, with latest.md and
latest.json copies, or where ``--out``/``--json`` say. bench/RESULTS.md is hand-written and
committed: nothing here writes it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from pathlib import Path
from typing import Any

from bench import targets
from bench.runner import RunData
from bench.settings import OUT_DIR, RESULTS_MD, is_orproxy
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


def _target_cell(wl: Workload, metric: MetricSpec, medians: targets.Medians, subject: str) -> str:
    cells = []
    for t in targets.for_workload(wl.id):
        if t.metric == metric.key:
            v = targets.evaluate(t, medians, subject)
            cells.append(f"{v.mark()} {t.text} ({v.shown()})")
    return "; ".join(cells)


def _orproxies(subjects: list[str]) -> list[str]:
    """orproxy and its variants, orproxy first: the subjects the targets are judged for."""
    return sorted((s for s in subjects if is_orproxy(s)), key=lambda s: s != "orproxy")


def _ratio_columns(subjects: list[str]) -> list[tuple[str, str]]:
    """(numerator, denominator) pairs: orproxy against nginx and direct, variants against
    orproxy (or, without orproxy, the first variant against nginx and direct)."""
    mine = _orproxies(subjects)
    if not mine:
        return []
    first, *others = mine
    refs = [(first, ref) for ref in ("nginx", "direct") if ref in subjects]
    return refs + [(other, first) for other in others]


def workload_table(wl: Workload, medians: targets.Medians, subjects: list[str]) -> list[str]:
    ratios = _ratio_columns(subjects)
    judged = _orproxies(subjects)[:1]
    head = ["metric", *subjects, *(f"{a}/{b}" for a, b in ratios)]
    head += [f"target ({s})" for s in judged]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in wl.metrics:
        vals = {s: medians.get(s, {}).get(m.key) for s in subjects}
        if all(v is None for v in vals.values()):
            continue
        row = [m.label, *(_fmt(vals[s], m.digits) for s in subjects)]
        row += [_ratio(vals[a], vals[b]) if m.ratio else "" for a, b in ratios]
        row += [_target_cell(wl, m, medians, s) for s in judged]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _verdicts(data: RunData, subject: str) -> list[tuple[str, targets.Verdict]]:
    out = []
    for wl in data.workloads:
        medians = data.medians(wl.id)
        for t in targets.for_workload(wl.id):
            out.append((wl.id, targets.evaluate(t, medians, subject)))
    return out


def _targets_section(data: RunData) -> list[str]:
    judged = _orproxies(data.subjects)
    if not judged:
        return []
    verdicts = {s: _verdicts(data, s) for s in judged}
    met = ", ".join(
        f"{s} {sum(1 for _, v in vs if v.ok)}/{sum(1 for _, v in vs if v.ok is not None)} met"
        for s, vs in verdicts.items()
    )
    head = ["workload", "target", *(c for s in judged for c in (s, ""))]
    lines = [f"## Targets: {met}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (wid, first) in enumerate(verdicts[judged[0]]):
        cells = [f"{vs[i][1].shown()} | {vs[i][1].mark()}" for vs in verdicts.values()]
        lines.append(f"| {wid} | {first.target.text} | " + " | ".join(cells) + " |")
    return [*lines, ""]


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
        *[f"- Variant {v.subject}: orproxy with {v.describe()}" for v in data.variants],
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
    lines += _targets_section(data)
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
            items += _run_problems(wl.id, subject, runs)
    if data.noisy_starts:
        items.append(
            f"{data.noisy_starts} run(s) started while the machine was still busy "
            f"after waiting {data.quiet_wait_s:g} s"
        )
    for name in (s for s in data.subjects if s != "direct"):
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


def _run_problems(workload: str, subject: str, runs: list[dict[str, float]]) -> list[str]:
    """Errors, noisy runs and dropped keep-alive connections among one subject's repeats."""
    out = []
    errs = sum(r.get("errors", 0.0) for r in runs)
    if errs:
        out.append(f"{workload}: {subject} had {errs:.0f} errors over {len(runs)} run(s)")
    noisy = sum(
        1
        for r in runs
        if r.get("other_cpu_pct", 0.0) > 10.0
        or r.get("other_cpu_s", 0.0) > 0.1 * r.get("wall_s", 1e9)
    )
    if noisy:
        out.append(
            f"{workload}: {noisy}/{len(runs)} run(s) of {subject} had other processes using "
            ">10% of a core (noisy)"
        )
    conns = max((r.get("connections", 1.0) for r in runs), default=1.0)
    if conns > 1:
        out.append(
            f"{workload}: {subject} needed {conns:.0f} connections for sequential requests "
            "(keep-alive not held)"
        )
    return out


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
    judged = _orproxies(data.subjects)[:1]
    for wl in data.workloads:
        out.append(f"{wl.id}: {wl.title}")
        medians = data.medians(wl.id)
        for m in wl.metrics:
            vals = [f"{s}={_fmt(medians.get(s, {}).get(m.key), m.digits)}" for s in data.subjects]
            cell = "; ".join(c for s in judged if (c := _target_cell(wl, m, medians, s)))
            out.append(f"  {m.label:42s} " + "  ".join(vals) + (f"   [{cell}]" if cell else ""))
    for subject in _orproxies(data.subjects):
        for _, v in _verdicts(data, subject):
            if v.ok is False:
                out.append(
                    f"target missed by {subject}: {v.target.workload} {v.target.text} ({v.shown()})"
                )
    for f in data.failures:
        out.append(f"FAILURE: {f}")
    return "\n".join(out)


def raw_json(data: RunData) -> dict[str, Any]:
    """What the JSON file holds: the run's identity, every repeat's figures, checks, failures."""
    return {
        "command": data.command,
        "started": data.started,
        "profile": dataclasses.asdict(data.profile),
        "subjects": data.subjects,
        "variants": {v.subject: v.describe() for v in data.variants},
        "results": data.results,
        "checks": {s: [dataclasses.asdict(c) for c in cs] for s, cs in data.checks.items()},
        "failures": data.failures,
    }


class OutputError(ValueError):
    """A report path that must not be written."""


def check_output(path: Path) -> None:
    """Refuse the committed, hand-written bench/RESULTS.md (also through a symlink)."""
    if path.resolve() == RESULTS_MD.resolve():
        raise OutputError(
            f"{path} is the hand-written bench/RESULTS.md; generated reports go to "
            f"{OUT_DIR} or to another --out/--json path"
        )


def write_reports(
    data: RunData,
    *,
    out: Path | None = None,
    json_out: Path | None = None,
    out_dir: Path = OUT_DIR,
    stamp: str | None = None,
) -> list[Path]:
    """Write the Markdown report (and JSON); returns the paths written.

    Without ``out``: ``out_dir/<stamp>.md`` and ``.json`` (or ``json_out``), each copied to
    ``latest.*``. With ``out``: that file, plus ``json_out`` only if given.
    """
    stamp = stamp or datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%SZ")
    markdown = render(data)
    raw = json.dumps(raw_json(data), indent=1) + "\n"
    files: list[tuple[Path, str]] = []
    if out is not None:
        files.append((out, markdown))
        if json_out is not None:
            files.append((json_out, raw))
    else:
        base = _unique(out_dir, stamp)
        files += [(base.with_suffix(".md"), markdown), (out_dir / "latest.md", markdown)]
        if json_out is not None:
            files.append((json_out, raw))
        else:
            files += [(base.with_suffix(".json"), raw), (out_dir / "latest.json", raw)]
    for path, _ in files:
        check_output(path)
    for path, text in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return [path for path, _ in files]


def _unique(out_dir: Path, stamp: str) -> Path:
    """``out_dir/stamp`` (no suffix), numbered if a report of that second exists already."""
    base, n = out_dir / stamp, 1
    while base.with_suffix(".md").exists() or base.with_suffix(".json").exists():
        n += 1
        base = out_dir / f"{stamp}-{n}"
    return base
