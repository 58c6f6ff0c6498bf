"""Copy the small files of finished sweeps into the detection corpus (benchmarks/detection/runs/SWEEP/...): every
run's metrics.jsonl and run.json, its golden and reference verdicts (verdicts.json, computed with the paired
per-sample values, which stay behind: they are large), so that the oracle-free detector's validation reruns in
seconds with ``teacherhack detect benchmarks/detection/runs``.

    .venv/bin/python scripts/export_detection_corpus.py /work/sw/sources /work/sw/horizon ... --out benchmarks/detection
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from teacherhack.rundir import METRICS, SETTINGS, find_runs, load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", type=Path, help="finished sweep folders")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/detection"))
    args = parser.parse_args()
    count = 0
    for sweep in args.sweeps:
        plan = json.loads((sweep / "sweep.json").read_text())
        for folder, group in find_runs([sweep]):
            target = args.out / "runs" / sweep.name / folder.relative_to(sweep / "runs")
            target.mkdir(parents=True, exist_ok=True)
            for name in (METRICS, SETTINGS):
                shutil.copyfile(folder / name, target / name)
            verdicts = load_run(folder).verdicts()
            (target / "verdicts.json").write_text(json.dumps(
                {"golden": verdicts.golden.to_dict(),
                 "reference": verdicts.reference.to_dict() if verdicts.reference else None}, indent=1))
            count += 1
        (args.out / "runs" / sweep.name / "sweep.json").write_text(json.dumps(
            {"preset": plan["preset"], "seeds": plan["seeds"], "base": plan["base"]}, indent=1))
    print(f"{count} runs exported to {args.out / 'runs'}")


if __name__ == "__main__":
    main()
