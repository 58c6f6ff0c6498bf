"""Benchmark the lab: wall time per stage from a cold cache, evaluation share of each stage-2 run, peak memory.

    .venv/bin/python scripts/bench_lab.py --preset quick
    .venv/bin/python scripts/bench_lab.py --preset default --jobs 2

A fresh temporary cache is used unless --cache is given (the built-in kjv-rv task ships with the package, so a
cold cache needs no download).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from teacherhack import config as cfg
from teacherhack.lab import Engine, run_lab
from teacherhack.launch import keep_freed_memory
from teacherhack.presets import LAB_PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", choices=sorted(LAB_PRESETS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cache", help="use this cache (warm runs) instead of a fresh one")
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does

    config = cfg.resolve(args.preset, cfg.parse_assignments(args.set))
    work = Path(tempfile.mkdtemp(prefix="teacherhack-bench-"))
    cache = Path(args.cache) if args.cache else work / "cache"
    start = time.time()
    summary = run_lab(config, work / "out", cache, Engine(jobs=args.jobs))
    wall = time.time() - start

    print(f"\npreset {args.preset}, jobs {args.jobs}, {'warm' if args.cache else 'cold'} cache: wall {wall:.0f} s")
    for stage, seconds in summary["stage_seconds"].items():
        print(f"  {stage:<24} {seconds:8.1f} s")
    for source, run in summary["runs"].items():
        rows = [json.loads(line) for line in (work / "out" / source / "metrics.jsonl").read_text().splitlines()]
        train_s, eval_s = rows[-1]["train_seconds"], rows[-1]["eval_seconds"]
        steps = rows[-1]["step"]
        print(f"  {source:<16} {steps} steps: train {train_s:.0f} s ({steps / max(train_s, 1e-9):.1f} steps/s), "
              f"eval {eval_s:.0f} s = {100 * eval_s / (train_s + eval_s):.0f}% of the run, "
              f"{rows[-1]['tokens_generated']} tokens generated")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"  peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (this process)"
          + (f", {children / 1024:.0f} MiB (largest worker)" if children else ""))
    print(f"  command: {' '.join(sys.argv)}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
