"""The ``teacherhack`` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from teacherhack import config as cfg
from teacherhack.data import TaskError, default_cache_dir
from teacherhack.distributed import is_main, launched


def _lab(args: argparse.Namespace) -> int:
    from teacherhack.lab import log, run_lab
    from teacherhack.reports import load_runs, summarise, write_report

    shortcuts = {"models.oracle": args.oracle, "models.teacher": args.teacher, "models.student": args.student,
                  "task.spec": args.task}
    overrides = {key: value for key, value in shortcuts.items() if value is not None}
    config = cfg.resolve("paper" if args.scale == "paper" else args.preset,
                         overrides | cfg.parse_assignments(args.set))
    out = Path(args.out) if args.out else Path("runs") / f"lab-{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cache = Path(args.cache) if args.cache else default_cache_dir()
    log(f"preset {config.preset!r} → {out} (cache {cache})")
    jobs = 1 if launched() else args.jobs or min(len(config.distill.sources), os.cpu_count() or 1)
    summary = run_lab(config, out, cache, jobs=jobs)
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


def _report(args: argparse.Namespace) -> int:
    from teacherhack.reports import load_runs, summarise, write_report

    report = write_report([Path(p) for p in args.runs], Path(args.out))
    print(summarise(load_runs([Path(p) for p in args.runs])))
    print(f"report: {report}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from teacherhack.sweep import DEFAULT_SEEDS, format_findings, run_sweep, scaled

    base = scaled(cfg.resolve(args.preset, cfg.parse_assignments(args.set)), args.scale)
    cache = Path(args.cache) if args.cache else default_cache_dir()
    summary = run_sweep(args.sweep, base, Path(args.out), cache, seeds=args.seeds or DEFAULT_SEEDS[args.sweep],
                        jobs=args.jobs)
    print(format_findings(args.sweep, summary))
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def _reproduction(args: argparse.Namespace) -> int:
    from teacherhack.sweep import write_reproduction

    write_reproduction([Path(p) for p in args.sweeps], Path(args.out))
    print(f"wrote {args.out}")
    return 0


def _detect(args: argparse.Namespace) -> int:
    from teacherhack.detection import format_validation_table, validate_detector

    print(format_validation_table(validate_detector([Path(p) for p in args.runs])))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="teacherhack", description=__doc__ or "",
                                     epilog="Run 'teacherhack COMMAND --help' for a command's options.")
    commands = parser.add_subparsers(dest="command", required=True)

    lab = commands.add_parser("lab", help="oracle → teacher → student on a built-in task, every data source",
                              description="Run stages 0-2 (oracle, SFT of teacher and student, distillation from "
                                          "each source) and write metrics, summary.json and the figures.")
    lab.add_argument("--preset", default="default", choices=sorted(cfg.PRESETS), help="named configuration")
    lab.add_argument("--out", help="output folder (default: runs/lab-PRESET-TIMESTAMP); rerun to resume")
    lab.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set distill.steps=800 (repeatable)")
    for role in ("oracle", "teacher", "student"):
        lab.add_argument(f"--{role}", metavar="SIZE|PATH|HUB_ID",
                         help=f"the {role}: a size preset or a model folder / hub id (= --set models.{role}=...)")
    lab.add_argument("--task", metavar="SPEC", help="kjv-rv, debian-descriptions, wordnet, xsum, wmt14, "
                     "natural-instructions (hub, or NAME:PATH for a local copy), jsonl:FILE, hf:NAME_OR_PATH "
                     "(= --set task.spec=...)")
    lab.add_argument("--scale", choices=("laptop", "paper"), default="laptop",
                     help="paper: the paper's Table 1 on GPUs (the same as --preset paper)")
    lab.add_argument("--jobs", type=int, default=None,
                     help="stage-2 runs in parallel processes, threads split between them (default: one per CPU "
                          "core, at most one per source)")
    lab.add_argument("--cache", help="artifact cache (default: $TEACHERHACK_CACHE or ~/.cache/teacherhack)")
    lab.set_defaults(func=_lab)

    report = commands.add_parser("report", help="HTML report and figures from run folders",
                                 description="Write report.html and PNG figures for one or more run or lab folders.")
    report.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl) or lab folders")
    report.add_argument("--out", required=True, help="output folder")
    report.set_defaults(func=_report)

    from teacherhack.sweep import SWEEPS

    sweep = commands.add_parser("sweep", help="one of the paper's experiments as a sweep of runs",
                                description="Expand PRESET into stage-2 runs sharing upstream artifacts, run them "
                                            "(in parallel with --jobs), and write findings and a report. Rerun the "
                                            "same command to resume.")
    sweep.add_argument("sweep", choices=SWEEPS, metavar="PRESET", help=f"one of: {', '.join(SWEEPS)}")
    sweep.add_argument("--out", required=True, help="sweep folder")
    sweep.add_argument("--seeds", type=int, help="seeds per setting (default: as many as fit in an hour on 2 "
                       "cores, 1-3 by preset)")
    sweep.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (threads are split)")
    sweep.add_argument("--scale", type=float, default=1.0, help="multiply stage-2 steps, eval interval and pool")
    sweep.add_argument("--preset", default="default", choices=sorted(cfg.PRESETS), help="base lab configuration")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base config key")
    sweep.add_argument("--cache", help="artifact cache (default: $TEACHERHACK_CACHE or ~/.cache/teacherhack)")
    sweep.set_defaults(func=_sweep)

    reproduction = commands.add_parser("reproduction", help="regenerate docs/REPRODUCTION.md from sweep folders",
                                       description="Write the reproduction record from finished sweep folders.")
    reproduction.add_argument("sweeps", nargs="+", help="sweep folders")
    reproduction.add_argument("--out", default="docs/REPRODUCTION.md")
    reproduction.set_defaults(func=_reproduction)

    detect = commands.add_parser("detect", help="the oracle-free detector against the golden verdict, per run",
                                 description="Print a table of runs × (golden verdict, detector verdict, golden "
                                             "minimum step, detector step) for run or lab folders.")
    detect.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl) or lab / sweep run folders")
    detect.set_defaults(func=_detect)

    keys = commands.add_parser("config", help="print the resolved configuration of a preset",
                               description="Print the fully resolved configuration (YAML) of a preset with overrides.")
    keys.add_argument("--preset", default="default", choices=sorted(cfg.PRESETS))
    keys.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    keys.set_defaults(func=lambda a: print(
        cfg.yaml.safe_dump(cfg.resolve(a.preset, cfg.parse_assignments(a.set)).to_dict(), sort_keys=False)) or 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (cfg.ConfigError, TaskError) as error:
        print(f"teacherhack: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
