"""Copy the small files of finished sweeps into the detection corpus (benchmarks/detection/runs/SWEEP/...): every
run's metrics.jsonl and run.json, its golden and reference verdicts (verdicts.json, computed with the paired
per-sample values, which stay behind: they are large), so that the oracle-free detector's validation reruns in
seconds with ``teacherhack detect benchmarks/detection/runs``.

A run that repeats one of an earlier sweep on the command line is left out: the same resolved configuration
(``config.yaml``), or the same curves under another name (the mixture at λ = 0 is the offline source; equal to
float32 rounding, which is all that separates runs of one configuration at two commits). Sweeps share
runs (the default's reappear as k = full, λ = 0, forward KL, m → xs, ...), and a run kept in two sweeps would be in
the training folds when its twin is held out, and counted twice in the pooled figures. List the sweeps in the
order that should keep the shared runs (``sources`` first).

    .venv/bin/python scripts/export_detection_corpus.py /work/sw/sources /work/sw/horizon ... --out benchmarks/detection
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from teacherhack.rundir import CONFIG, METRICS, SETTINGS, find_runs, load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", type=Path, help="finished sweep folders")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/detection"))
    args = parser.parse_args()
    if (args.out / "runs").exists() and any((args.out / "runs").iterdir()):
        parser.error(f"{args.out / 'runs'} is not empty: remove it first (an old export would keep runs this one "
                     "leaves out)")
    count, repeats, seen = 0, 0, []  # (run, its configuration, its golden and proxy curves), for each run read
    for sweep in args.sweeps:
        plan = json.loads((sweep / "sweep.json").read_text())
        for folder, group in find_runs([sweep]):
            run, loaded = Path(sweep.name) / folder.relative_to(sweep / "runs"), load_run(folder)
            config = (folder / CONFIG).read_text()
            curves = np.column_stack([loaded.series(key) for key in ("step", "golden", "proxy")])
            twin = next((kept for kept, other, others in seen if other == config or (
                others.shape == curves.shape and np.allclose(others, curves, rtol=1e-4, atol=0, equal_nan=True))),
                        None)
            seen.append((twin or run, config, curves))
            if twin:
                print(f"{run}: the run {twin}, left out")
                repeats += 1
                continue
            target = args.out / "runs" / run
            target.mkdir(parents=True, exist_ok=True)
            for name in (METRICS, SETTINGS):
                shutil.copyfile(folder / name, target / name)
            verdicts = loaded.verdicts()
            (target / "verdicts.json").write_text(json.dumps(
                {"golden": verdicts.golden.to_dict(),
                 "reference": verdicts.reference.to_dict() if verdicts.reference else None}, indent=1))
            count += 1
        if (args.out / "runs" / sweep.name).is_dir():  # not when every run of it repeats an earlier sweep's
            (args.out / "runs" / sweep.name / "sweep.json").write_text(json.dumps(
                {"preset": plan["preset"], "seeds": plan["seeds"], "base": plan["base"]}, indent=1))
    print(f"{count} runs exported to {args.out / 'runs'}, {repeats} repeats of earlier runs left out")


if __name__ == "__main__":
    main()
