"""Command line for ``python -m bench``: options, what to run, checks before starting, output.

Everything that can be wrong with a command line (unknown subject, bad ``--variant``, a
missing tool, an output path that is the hand-written bench/RESULTS.md) exits 2 before any
server starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
import tempfile
from pathlib import Path

from bench import machine, report, runner, workloads
from bench.settings import FULL, QUICK, SUBJECTS, Profile, default_pinning, is_orproxy
from bench.subjects import StartError, missing_tools, orproxy_importable, variant_problems
from bench.variants import Variant, parse_variant


class UsageError(Exception):
    """The command line cannot run; the message says why (exit status 2)."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark orproxy against nginx and direct."
    )
    ap.add_argument(
        "--quick", action="store_true", help="short smoke run: 1 repeat, short durations, small W4"
    )
    ap.add_argument(
        "--only", default="", help="workloads to run, e.g. W1,W3 or W1-32 (default: all)"
    )
    ap.add_argument(
        "--subjects",
        default=None,
        help="comma list of direct, nginx, orproxy and orproxy-NAME variants (default: all)",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:section.key=value[,section.key=value...]",
        help="add subject orproxy-NAME: orproxy with these config overrides (YAML values); "
        "repeatable",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Markdown report path (default: bench/out/<UTC time>.md, copied to latest.md)",
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="raw results as JSON (default: next to the default report; with --out only if given)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="override the profile's repeats")
    ap.add_argument("--duration", type=float, default=None, help="override wrk run seconds")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each run wait up to this many s for other processes to go idle "
        "(default 20, quick: 0)",
    )
    ap.add_argument("--keep-tmp", action="store_true", help="keep the scratch dir (configs, logs)")
    return ap.parse_args(argv)


def _profile(args: argparse.Namespace) -> Profile:
    profile = QUICK if args.quick else FULL
    if args.repeats is not None:
        profile = dataclasses.replace(profile, repeats=args.repeats)
    if args.duration is not None:
        profile = dataclasses.replace(profile, wrk_duration_s=args.duration)
    return profile


def _variants(texts: list[str]) -> list[Variant]:
    variants: list[Variant] = []
    for text in texts:
        try:
            variant = parse_variant(text)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if any(v.subject == variant.subject for v in variants):
            raise UsageError(f"--variant: {variant.subject} given twice")
        variants.append(variant)
    return variants


def _subjects(args: argparse.Namespace, variants: list[Variant], notes: list[str]) -> list[str]:
    known = [*SUBJECTS, *(v.subject for v in variants)]
    explicit = args.subjects is not None
    subjects = [s.strip() for s in (args.subjects or ",".join(known)).split(",") if s.strip()]
    unknown = [s for s in subjects if s not in known]
    if unknown:
        raise UsageError(f"unknown subjects {unknown}; known: {', '.join(known)}")
    if not subjects:
        raise UsageError("--subjects names no subject")
    if any(is_orproxy(s) for s in subjects):
        ok, why = orproxy_importable()
        if not ok:
            if explicit:
                raise UsageError(f"orproxy is not importable: {why}")
            print(f"warning: orproxy is not importable ({why}); skipping it", file=sys.stderr)
            notes.append(f"orproxy skipped: not importable ({why})")
            subjects = [s for s in subjects if not is_orproxy(s)]
    return subjects


def _workloads(only_text: str, profile: Profile) -> list[workloads.Workload]:
    only = {w.strip().upper() for w in only_text.split(",") if w.strip()}
    selected = [w for w in workloads.build(profile) if not only or w.id in only or w.group in only]
    if not selected:
        raise UsageError(f"no workload matches --only {only_text}")
    return selected


def _check_tools(subjects: list[str], selected: list[workloads.Workload], pinning: bool) -> None:
    needed = [
        *(["wrk"] if any(isinstance(w, workloads.WrkWorkload) for w in selected) else []),
        *(["nginx"] if "nginx" in subjects else []),
        *(["taskset"] if pinning else []),
    ]
    missing = missing_tools(needed)
    if missing:
        raise UsageError("\n".join(missing))


def _check_variants(variants: list[Variant], subjects: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="orproxy-bench-check-") as tmp:
        for variant in variants:
            if variant.subject not in subjects:
                continue
            problems = variant_problems(variant, Path(tmp))
            if problems:
                raise UsageError(f"{variant.subject} ({variant.describe()}):\n{problems}")


def prepare(argv: list[str]) -> runner.RunData:
    """Everything checked and resolved before a server starts; UsageError if it cannot run."""
    args = _parse(argv)
    for path in (args.out, args.json):
        if path is not None:
            try:
                report.check_output(path)
            except report.OutputError as exc:
                raise UsageError(str(exc)) from exc
    profile = _profile(args)
    variants = _variants(args.variant)
    notes: list[str] = []
    subjects = _subjects(args, variants, notes)
    selected = _workloads(args.only, profile)
    pinning = default_pinning(not args.no_pin)
    _check_tools(subjects, selected, pinning.enabled)
    _check_variants(variants, subjects)
    return runner.RunData(
        profile=profile,
        pinning=pinning,
        subjects=subjects,
        workloads=selected,
        command=shlex.join(["python", "-m", "bench", *argv]),
        started=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        machine=machine.describe(),
        variants=[v for v in variants if v.subject in subjects],
        notes=notes,
        quiet_wait_s=args.quiet_wait
        if args.quiet_wait is not None
        else (0.0 if args.quick else 20.0),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    try:
        data = prepare(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        runner.run(data, workdir_keep=args.keep_tmp)
    except KeyboardInterrupt:
        print("interrupted; writing partial results", file=sys.stderr)
        data.failures.append("run interrupted")
    except StartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    written = report.write_reports(data, out=args.out, json_out=args.json)
    print(report.console_summary(data))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 1 if data.failures else 0
