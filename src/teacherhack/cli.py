"""The ``teacherhack`` command.

A user's mistake (a wrong key, unreadable data, a busy folder, a diverging run) ends with one line naming the
problem and the fix, and exit status 2; Ctrl-C stops cleanly with status 130 (rerun the same command to
resume). Only bugs print a traceback. Building the parser imports neither torch nor matplotlib, so ``--help``
answers at once; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from teacherhack.errors import UserError
from teacherhack.launch import ENGINES, keep_freed_memory
from teacherhack.presets import LAB_PRESETS
from teacherhack.sweeps import SWEEPS
from teacherhack.trackers import TRACKERS

SET_HELP = ("override a config key (repeatable), e.g. --set distill.steps=800; lists as a,b or [a, b], e.g. "
            "--set 'distill.sources=[offline, online_teacher]'; 'teacherhack config' lists every key")


def _engine(args: argparse.Namespace, default_jobs: int):
    from teacherhack.lab import Engine
    from teacherhack.trackers import check_trackers

    report_to = tuple(name for item in args.report_to for name in item.split(",") if name)
    check_trackers(list(report_to))
    options = []
    for item in args.engine_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--engine-option expects KEY=VALUE, got {item!r}")
        options.append((key, value))
    if options and args.engine == "local":
        raise UserError("--engine-option sets the cluster's parameters: it needs --engine submitit")
    return Engine(jobs=default_jobs if args.jobs is None else args.jobs, name=args.engine, options=tuple(options),
                  report_to=report_to)


def _lab(args: argparse.Namespace) -> int:
    from teacherhack import config as cfg
    from teacherhack.cache import default_cache_dir
    from teacherhack.distributed import is_main, launched, log
    from teacherhack.lab import run_lab
    from teacherhack.preflight import preflight
    from teacherhack.reports import summarise, write_report
    from teacherhack.rundir import load_runs

    shortcuts = {"models.oracle": args.oracle, "models.teacher": args.teacher, "models.student": args.student,
                 "task.spec": args.task}
    overrides = {key: value for key, value in shortcuts.items() if value is not None}
    assignments = cfg.parse_assignments(args.set)
    for key in overrides.keys() & assignments.keys():
        if str(overrides[key]) != str(assignments[key]):
            flag = "--task" if key == "task.spec" else f"--{key.split('.')[1]}"
            raise UserError(f"{flag} {overrides[key]} and --set {key}={assignments[key]} contradict each other; "
                            f"give one of them")
    if args.scale == "paper" and args.preset not in (None, "paper"):
        raise UserError(f"--scale paper is the paper preset and contradicts --preset {args.preset}; give one of them")
    config = cfg.resolve("paper" if args.scale == "paper" else args.preset or "default", overrides | assignments)
    out = Path(args.out) if args.out else Path("runs") / f"lab-{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cache = Path(args.cache) if args.cache else default_cache_dir()
    engine = _engine(args, 1 if launched() else len(config.distill.sources))  # all at once: no idle core at the end
    preflight([config], out, cache)
    log(f"preset {config.preset!r} → {out} (cache {cache})")
    summary = run_lab(config, out, cache, engine)
    if not is_main():
        return 0
    report = write_report([out], out)
    print(summarise(load_runs([out])))
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in summary["stage_seconds"].items())
    print(f"\nwall time {summary['wall_seconds']:.0f}s ({stages})")
    for source, run in summary["runs"].items():
        print(f"{source:>15}: hacking={str(run['hacking']).lower():5}  {run['verdict']['reason']}")
    print(f"\nreport: {report}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from teacherhack import config as cfg
    from teacherhack.cache import default_cache_dir
    from teacherhack.lab import run_sweep, stretched
    from teacherhack.preflight import preflight
    from teacherhack.sweeps import check_assignments, format_findings

    assignments = cfg.parse_assignments(args.set)
    base = stretched(cfg.resolve(args.preset, assignments), args.stretch)
    check_assignments(args.sweep, assignments, base.distill.prompts or base.task.n_distill, base.task.n_distill)
    cache = Path(args.cache) if args.cache else default_cache_dir()
    preflight([base], Path(args.out), cache)
    seeds = SWEEPS[args.sweep].seeds if args.seeds is None else args.seeds
    summary = run_sweep(args.sweep, base, Path(args.out), cache, seeds=seeds,
                        engine=_engine(args, 1))
    print(format_findings(args.sweep, summary))
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from teacherhack.preflight import writable_folder
    from teacherhack.reports import summarise, write_reports
    from teacherhack.rundir import load_runs

    writable_folder(Path(args.out), "--out")
    runs = load_runs([Path(p) for p in args.runs])
    reports = write_reports([run.path for run in runs], Path(args.out))
    for unit, report in reports.items():  # runs in another unit (per-token metrics) get a report of their own
        if len(reports) > 1:
            print(f"\nruns measured in {unit}:")
        print(summarise([run for run in runs if run.unit == unit]))
        print(f"report: {report}")
    return 0


def _reproduction(args: argparse.Namespace) -> int:
    from teacherhack.record import write_reproduction

    write_reproduction([Path(p) for p in args.sweeps], Path(args.out))
    print(f"wrote {args.out}")
    return 0


def _detect(args: argparse.Namespace) -> int:
    from teacherhack.oracle_free import (
        DEFAULT_RULE,
        caught_by_rise,
        each_signal,
        format_agreement,
        format_caught_by_rise,
        format_each_signal,
        format_runs,
        format_trade_off,
        format_validation,
        labelled,
        leave_one_preset_out,
        signal_values,
        trade_off,
    )
    from teacherhack.rundir import RunFolder, find_runs, load_run

    found = find_runs([Path(p) for p in args.runs])
    # killed or still running: told apart before load_run, which refuses the line such a run may have cut short
    unfinished = [folder for folder, _ in found if not RunFolder(folder).reached_end()]
    if unfinished:
        print(f"{len(unfinished)} unfinished run(s) left out: {', '.join(map(str, unfinished))}.\n")
    done = [(folder, group) for folder, group in found if folder not in unfinished]
    if not done:
        raise UserError("no finished run to judge")
    runs = [labelled(load_run(folder), group) for folder, group in done]
    print(f"The oracle-free detector: {DEFAULT_RULE.describe()}.\n")
    print(format_runs(runs, DEFAULT_RULE))
    print("\nThe reference verdict (real held-out responses) against the golden one, judged runs:\n")
    print(format_agreement(runs))
    if len({r.preset for r in runs}) > 1:
        print("\nLeave one sweep out: the rule is chosen on every other sweep and scored on the one left out.\n")
        values = signal_values(runs)  # every signal on every run, once for all the tables below
        report = leave_one_preset_out(runs, values=values)
        print(format_validation(report))
        guess, share = ("\nA fixed guess of the golden minimum's evaluation (where it most often lies in the other "
                        "sweeps)"), report["fixed_guess"]
        print(f"{guess}, the bar a dated turn must clear to carry information, cannot be scored here: it needs "
              "hacking runs in at least two sweeps (one held out, the guess from the others)." if math.isnan(share)
              else f"{guess} is within 2 evaluations of it in {share:.2f} of the held-out hacking runs: the bar a "
                   "dated turn must clear to carry information.")
        print("\nThe hacking runs the detector's rule catches, by the size of the golden turn (all runs):\n")
        print(format_caught_by_rise(caught_by_rise(runs, DEFAULT_RULE, values=values)))
        print("\nEach signal alone, left one sweep out (the search restricted to its rules):\n")
        print(format_each_signal(each_signal(runs, values=values)))
        print(f"\nThe detector's rule over its signal's thresholds ({DEFAULT_RULE.signal.replace('_', ' ')}, "
              f"the rest as the rule has it), all runs:\n")
        print(format_trade_off(trade_off(runs, DEFAULT_RULE, values=values)))
    return 0


def _config(args: argparse.Namespace) -> int:
    import yaml

    from teacherhack import config as cfg

    print(yaml.safe_dump(cfg.resolve(args.preset, cfg.parse_assignments(args.set)).to_dict(), sort_keys=False))
    return 0


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a finite number of ``kind`` above 0."""
    what = "an integer" if kind is int else "a finite number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be {what} above 0, got {text}")
        return value
    return parse


def _run_options(parser: argparse.ArgumentParser, jobs_help: str) -> None:
    """Options of the commands that run stage 2 (lab, sweep): where, how, what they report to."""
    parser.add_argument("--preset", default="default", choices=sorted(LAB_PRESETS), help="base lab configuration")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    parser.add_argument("--jobs", type=_positive(int), default=None, help=jobs_help)
    parser.add_argument("--engine", default="local", choices=ENGINES,
                        help="where stage-2 runs execute: local processes, or SLURM through submitit")
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an executor parameter for --engine submitit (repeatable), e.g. slurm_partition=gpu, "
                             "timeout_min=600, gpus_per_node=1; cluster=local runs submitit's local executor")
    parser.add_argument("--report-to", action="append", default=[], metavar="TRACKER",
                        help=f"also log every evaluation to {', '.join(TRACKERS)} (repeatable or comma-separated)")
    parser.add_argument("--cache", help="artifact cache (default: $TEACHERHACK_CACHE or ~/.cache/teacherhack)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="teacherhack", description="Distil language models while watching for "
                                     "teacher hacking: oracle, teacher, student, proxy and golden metrics.",
                                     epilog="Run 'teacherhack COMMAND --help' for a command's options.")
    commands = parser.add_subparsers(dest="command", required=True)

    lab = commands.add_parser("lab", help="oracle → teacher → student on a built-in task, every data source",
                              description="Run stages 0-2 (oracle, SFT of teacher and student, distillation from "
                                          "each source) and write metrics, summary.json and the figures. Rerun the "
                                          "same command with the same --out to resume.")
    lab.add_argument("--out", help="output folder (default: runs/lab-PRESET-TIMESTAMP); rerun to resume")
    _run_options(lab, "stage-2 runs in parallel processes, threads split between them (default: one per source)")
    for role in ("oracle", "teacher", "student"):
        lab.add_argument(f"--{role}", metavar="SIZE|PATH|HUB_ID[@REV]",
                         help=f"the {role}: a size preset, a model folder, or a hub id, at a branch, tag or commit "
                              f"after @ (= --set models.{role}=...)")
    lab.add_argument("--task", metavar="SPEC", help="kjv-rv, debian-descriptions, wordnet, xsum, wmt14, "
                     "natural-instructions (hub, or NAME:PATH for a local copy), jsonl:FILE, hf:NAME_OR_PATH "
                     "(= --set task.spec=...)")
    lab.add_argument("--scale", choices=("laptop", "paper"), default="laptop",
                     help="paper: the paper's Table 1 on GPUs (the same as --preset paper)")
    lab.set_defaults(preset=None)  # so that --scale paper can tell a --preset given from the default one
    lab.set_defaults(func=_lab)

    sweep = commands.add_parser("sweep", help="one of the paper's experiments as a sweep of runs",
                                description="Expand PRESET into stage-2 runs sharing upstream artifacts, run them "
                                            "(in parallel with --jobs), and write findings and a report. Rerun the "
                                            "same command to resume. Presets: " + "; ".join(
                                                f"{name}: {p.about}" for name, p in SWEEPS.items()))
    sweep.add_argument("sweep", choices=SWEEPS, metavar="PRESET", help=f"one of: {', '.join(SWEEPS)}")
    sweep.add_argument("--out", required=True, help="sweep folder")
    sweep.add_argument("--seeds", type=_positive(int), help="seeds per setting (default: as many as fit in an hour on 2 "
                       "cores, 1-3 by preset)")
    sweep.add_argument("--stretch", type=_positive(float), default=1.0,
                       help="multiply the stage-2 steps, the evaluation interval and the distillation pool")
    _run_options(sweep, "runs in parallel processes, threads split between them (default 1)")
    sweep.set_defaults(func=_sweep)

    report = commands.add_parser("report", help="HTML report and figures from run folders",
                                 description="Write report.html and PNG figures for one or more run or lab folders.")
    report.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl) or lab folders")
    report.add_argument("--out", required=True, help="output folder")
    report.set_defaults(func=_report)

    reproduction = commands.add_parser("reproduction", help="regenerate docs/REPRODUCTION.md from sweep folders",
                                       description="Write the reproduction record from finished sweep folders.")
    reproduction.add_argument("sweeps", nargs="+", help="sweep folders")
    reproduction.add_argument("--out", default="docs/REPRODUCTION.md")
    reproduction.set_defaults(func=_reproduction)

    detect = commands.add_parser("detect", help="the oracle-free detector against the golden verdict, per run",
                                 description="Per run: the golden verdict, the reference verdict and when the "
                                             "oracle-free detector would have alarmed; given several sweeps, its "
                                             "leave-one-sweep-out precision, recall and lag.")
    detect.add_argument("runs", nargs="+", help="run, lab or sweep folders, or a folder of sweeps (the corpus: "
                                                "benchmarks/detection/runs)")
    detect.set_defaults(func=_detect)

    config = commands.add_parser("config", help="print the resolved configuration of a preset",
                                 description="Print the fully resolved configuration (YAML) of a preset with "
                                             "overrides: every key --set accepts.")
    config.add_argument("--preset", default="default", choices=sorted(LAB_PRESETS))
    config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    config.set_defaults(func=_config)
    return parser


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started with SIGINT ignored (a background job of a script): an interrupt still means "stop cleanly,
        # resumable", for this process and the workers it spawns
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # `kill`, a job scheduler's stop: the same clean stop as Ctrl-C (the workers are stopped, not orphaned)
    terminate = signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.func(args)
    except UserError as error:
        print(f"teacherhack: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nteacherhack: interrupted; everything written so far is consistent: rerun the same command to resume",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`teacherhack detect ... | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush is silent too
        return 0
    finally:
        signal.signal(signal.SIGTERM, terminate)


if __name__ == "__main__":
    sys.exit(main())
