"""Redraw the oracle-free signals figures of README.md and of the reproduction record from the detection corpus,
with the current detector's rule (its alarm, the turn it dates, its threshold and onset level).

    .venv/bin/python scripts/redraw_signals.py                 # docs/figures/signals.png, docs/reproduction/*/signals.png
    .venv/bin/python scripts/redraw_signals.py --out /tmp/figs --sweeps sources

A signals figure needs only what the corpus keeps of each run (its metrics.jsonl and run.json), so it can be
redrawn when the rule changes without the sweep folders. A sweep's runs that the corpus export left out as repeats
of an earlier sweep's are drawn from that kept twin under their own name: the twin with the same resolved
configuration, and, for the mixture's λ = 0 and λ = 1, the default's offline and online-student runs (the export
found those by their curves). Twins agree to float32 rounding, so a few antialiased pixels of those sweeps'
figures differ from what the sweep folders give (checked against the record's figures drawn from them: at most 88
pixels, none by more than a tenth of the intensity). The README's figure is the `sources` sweep's seed 0, named as
`teacherhack lab` names its runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from teacherhack import config as cfg
from teacherhack.reports import plot_signals
from teacherhack.rundir import Run, load_run
from teacherhack.sweeps import expand

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "benchmarks" / "detection" / "runs"
# The export's order: a run repeated by a later sweep was kept in the first one that holds it
ORDER = ("sources", "horizon", "topk", "onpolicy", "factors", "sources-teacher4", "sources-teacher8",
         "sources-teacher12", "sources-teacher14", "sources-teacher12-p125", "sources-teacher12-p125-2000",
         "sources-teacher14-2000", "tasks", "pretraining", "diversity", "budget", "mixture", "losses", "sizes",
         "sources-dialogue")


def sweep_runs(sweeps: list[str]) -> dict[str, list[Run]]:
    """The runs of ``sweeps``, each sweep's in its plan's order, under their names in the sweep."""
    kept: dict[str, Path] = {}
    plans: dict[str, list[tuple[str, str, Path]]] = {}
    for sweep in ORDER:
        plan = json.loads((CORPUS / sweep / "sweep.json").read_text())
        base = cfg.from_dict(plan["base"])
        plans[sweep] = []
        for r in expand(plan["preset"], base.distill.prompts or base.task.n_distill, base.task.n_distill,
                        plan["seeds"]):
            key = json.dumps(cfg.apply_overrides(base, r.overrides).to_dict(), sort_keys=True)
            path = CORPUS / sweep / r.name
            if (path / "metrics.jsonl").exists():
                kept.setdefault(key, path)
            plans[sweep].append((r.name, key, path))
    out = {}
    for sweep in sweeps:
        out[sweep] = [dataclasses.replace(load_run(_source(sweep, name, path, kept.get(key))), name=name)
                      for name, key, path in plans[sweep]]
    return out


def _source(sweep: str, name: str, path: Path, twin: Path | None) -> Path:
    if (path / "metrics.jsonl").exists():
        return path
    if twin is not None:
        return twin
    if sweep == "mixture" and name.startswith(("lambda=0.0/", "lambda=1.0/")):
        source = "offline" if name.startswith("lambda=0.0/") else "online_student"
        return CORPUS / "sources" / source / name.split("/")[1]
    raise ValueError(f"{sweep}: run {name} is neither in the corpus nor a repeat of a run that is")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="the docs folder to write into")
    parser.add_argument("--sweeps", nargs="*", default=list(ORDER), choices=ORDER, metavar="SWEEP")
    args = parser.parse_args()
    runs = sweep_runs(sorted({"sources", *args.sweeps}))
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    lab = [dataclasses.replace(run, name=run.name.split("/")[0]) for run in runs["sources"]
           if run.name.endswith("/seed0")]
    plot_signals(sorted(lab, key=lambda run: run.name), args.out / "figures" / "signals.png")
    for sweep in args.sweeps:
        main_unit = [run for run in runs[sweep] if run.unit == "nats/seq"]  # as the sweep's own report draws them
        (args.out / "reproduction" / sweep).mkdir(parents=True, exist_ok=True)
        plot_signals(main_unit, args.out / "reproduction" / sweep / "signals.png")
        print(f"{sweep}: {len(main_unit)} runs")


if __name__ == "__main__":
    main()
