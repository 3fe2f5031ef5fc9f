"""Command line for ``python -m bench``: options, subject/workload selection, writing results."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
from pathlib import Path

from bench import machine, report, runner, workloads
from bench.settings import BENCH_DIR, FULL, QUICK, SUBJECTS, default_pinning
from bench.subjects import StartError, orproxy_importable


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
        "--subjects", default=None, help="comma list of direct,nginx,orproxy (default: all)"
    )
    ap.add_argument(
        "--out", type=Path, default=BENCH_DIR / "RESULTS.md", help="Markdown report path"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write raw results as JSON")
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


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    profile = QUICK if args.quick else FULL
    if args.repeats is not None:
        profile = dataclasses.replace(profile, repeats=args.repeats)
    if args.duration is not None:
        profile = dataclasses.replace(profile, wrk_duration_s=args.duration)
    explicit = args.subjects is not None
    subjects = [s.strip() for s in (args.subjects or ",".join(SUBJECTS)).split(",") if s.strip()]
    unknown = set(subjects) - set(SUBJECTS)
    if unknown:
        print(f"unknown subjects: {sorted(unknown)}", file=sys.stderr)
        return 2
    notes = []
    if "orproxy" in subjects:
        ok, why = orproxy_importable()
        if not ok:
            if explicit:
                print(f"orproxy is not importable: {why}", file=sys.stderr)
                return 2
            print(f"warning: orproxy is not importable ({why}); skipping it", file=sys.stderr)
            notes.append(f"orproxy skipped: not importable ({why})")
            subjects.remove("orproxy")
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    selected = [w for w in workloads.build(profile) if not only or w.id in only or w.group in only]
    if not selected:
        print(f"no workload matches --only {args.only}", file=sys.stderr)
        return 2
    data = runner.RunData(
        profile=profile,
        pinning=default_pinning(not args.no_pin),
        subjects=subjects,
        workloads=selected,
        command=shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        started=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine.describe(),
        notes=notes,
        quiet_wait_s=args.quiet_wait
        if args.quiet_wait is not None
        else (0.0 if args.quick else 20.0),
    )
    try:
        runner.run(data, workdir_keep=args.keep_tmp)
    except KeyboardInterrupt:
        print("interrupted; writing partial results", file=sys.stderr)
        data.failures.append("run interrupted")
    except StartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.write_text(report.render(data))
    if args.json:
        args.json.write_text(
            json.dumps({"results": data.results, "failures": data.failures}, indent=1)
        )
    print(report.console_summary(data))
    print(f"\nwrote {args.out}")
    return 1 if data.failures else 0
