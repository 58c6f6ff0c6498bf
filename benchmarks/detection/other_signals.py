"""Signals that did not earn a place in the detector: each measured as the package's own are, left one sweep out.

The detector's signals (``teacherhack.oracle_free.SIGNALS``) read the student against its teacher. These are the
other things a practitioner's metrics carry (the student's entropies, KL(student‖teacher) on its own samples, the
training loss, the slope of the proxy's descent), each written as a live monitor would compute it (from the
evaluations so far). For each, the script prints what it does alone and whether the search picks it when it is
added to the package's candidates. Then, for the hacking runs the default rule misses, how far the teacher is from
the oracle against the untrained student: why no teacher-student signal can see those runs.

    .venv/bin/python benchmarks/detection/other_signals.py [benchmarks/detection/runs]
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from teacherhack import oracle_free
from teacherhack.oracle_free import column, proxy_stall
from teacherhack.rundir import RunFolder, find_runs, load_run


def entropy_sharpening(rows, per_sample, settings) -> np.ndarray:
    """How far the student's entropy along the teacher's held-out samples has fallen below the teacher's own, as a
    fraction of it: a student sharper than its teacher over-imitates its confident errors."""
    teacher = settings.get("teacher_entropy")
    if not teacher:
        return np.full(len(rows), np.nan)
    return (teacher - column(rows, "student_entropy_held_out")) / teacher


def reverse_excess(rows, per_sample, settings) -> np.ndarray:
    """log(KL(student‖teacher) / KL(teacher‖student)): the student's own samples scored worse by the teacher than
    the teacher's samples by the student (mode-seeking errors the forward proxy does not see)."""
    return np.log(column(rows, "proxy_reverse") / column(rows, "proxy"))


def reverse_rise(rows, per_sample, settings) -> np.ndarray:
    """KL(student‖teacher) above its best so far, in standard errors."""
    reverse, se = column(rows, "proxy_reverse"), column(rows, "proxy_reverse_se")
    out = np.full(len(rows), np.nan)
    for t in range(len(rows)):
        if np.isfinite(reverse[: t + 1]).any():
            best = int(np.nanargmin(reverse[: t + 1]))
            spread = math.hypot(se[t], se[best])
            out[t] = (reverse[t] - reverse[best]) / spread if spread > 0 else np.nan
    return out


def gap_growth(rows, per_sample, settings) -> np.ndarray:
    """The growth of the relative memorisation gap over the last evaluation."""
    gap = oracle_free.relative_gap(rows, per_sample, settings)
    return np.concatenate([[np.nan], np.diff(gap)])


def slope_ratio(rows, per_sample, settings) -> np.ndarray:
    """1 − the proxy's log-log slope over the last evaluation ÷ its slope over evaluations 1-3: 0 on a power law, 1
    once flat."""
    log_proxy, log_step = np.log(column(rows, "proxy")), np.log(np.maximum(column(rows, "step"), 1.0))
    out = np.full(len(rows), np.nan)
    if len(rows) > 4:
        early = (log_proxy[3] - log_proxy[1]) / (log_step[3] - log_step[1])
        if early < 0:
            out[4:] = 1 - (np.diff(log_proxy) / np.diff(log_step))[3:] / early  # the slope over (t − 1, t]
    return out


def proxy_per_train_loss(rows, per_sample, settings) -> np.ndarray:
    """1 − the held-out proxy's fall per fall of the training loss (in logs) over the last evaluation, relative to
    the same over evaluations 1-3: the student still fits its training signal, but it no longer carries over."""
    log_proxy, log_loss = np.log(column(rows, "proxy")), np.log(column(rows, "train_loss"))
    out = np.full(len(rows), np.nan)
    if len(rows) > 4 and log_loss[3] != log_loss[1]:
        early = (log_proxy[3] - log_proxy[1]) / (log_loss[3] - log_loss[1])
        if early > 0:
            with np.errstate(divide="ignore", invalid="ignore"):
                out[4:] = 1 - np.diff(log_proxy)[3:] / np.diff(log_loss)[3:] / early
    return out


def held_out_per_train(rows, per_sample, settings) -> np.ndarray:
    """1 − the held-out proxy's fall per fall of the proxy on training prompts (in logs), over the last evaluation."""
    log_proxy, log_train = np.log(column(rows, "proxy")), np.log(column(rows, "proxy_train"))
    out = np.full(len(rows), np.nan)
    fall = np.diff(log_train)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[1:] = np.where(fall < 0, 1 - np.diff(log_proxy) / fall, np.nan)
    return out


def stall_far(rows, per_sample, settings) -> np.ndarray:
    """The proxy's stall weighted by how far it still is from the teacher: a student that stops approaching its
    teacher while far from it."""
    proxy = column(rows, "proxy")
    return proxy_stall(rows, per_sample, settings) * proxy / proxy[0] if proxy[0] > 0 else np.full(len(rows), np.nan)


OTHER = {  # signal: its threshold grid (set from the signal's range over the corpus, as the package's are)
    entropy_sharpening: [-0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1],
    reverse_excess: [0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
    reverse_rise: [0.5, 1.0, 1.5, 2.0, 3.0],
    gap_growth: [0.01, 0.02, 0.03, 0.04, 0.05],
    slope_ratio: [0.3, 0.5, 0.7, 0.9, 1.1, 1.5, 2.0],
    proxy_per_train_loss: [0.3, 0.5, 0.7, 0.9, 1.1, 1.5],
    held_out_per_train: [0.3, 0.5, 0.7, 1.0, 1.5, 3.0],
    stall_far: [0.2, 0.4, 0.6, 0.8, 1.0, 1.5],
}


def main(corpus: Path) -> None:
    runs = [oracle_free.labelled(load_run(folder), group) for folder, group in find_runs([corpus])
            if RunFolder(folder).reached_end()]
    package = oracle_free.candidates()
    for signal in OTHER:
        oracle_free.SIGNALS[signal.__name__] = signal  # this process only
    values = oracle_free.signal_values(runs)
    base = oracle_free.leave_one_preset_out(runs, package, values=values)["pooled"]
    judged = sum(run.hacking or run.judged for run in runs)
    print(f"{len(runs)} runs, {judged} judged. The package's search, left one sweep out: precision "
          f"{base.precision:.2f}, recall {base.recall:.2f}, turn within 2 evaluations {base.timely_recall:.2f}.\n")
    print("| signal | alone: precision | recall | turn within 2 | added to the package's search: precision | recall "
          "| turn within 2 | folds that pick it |")
    print("|---|---|---|---|---|---|---|---|")
    for signal, grid in OTHER.items():
        rules = oracle_free.rules_for(signal.__name__, grid)
        alone = oracle_free.leave_one_preset_out(runs, rules, values=values)["pooled"]
        added = oracle_free.leave_one_preset_out(runs, package + rules, values=values)
        picked = sum(fold["rule"].signal == signal.__name__ for fold in added["folds"])
        s = added["pooled"]
        print(f"| {signal.__name__.replace('_', ' ')} | {alone.precision:.2f} | {alone.recall:.2f} | "
              f"{alone.timely_recall:.2f} | {s.precision:.2f} | {s.recall:.2f} | {s.timely_recall:.2f} | "
              f"{picked} of {len(added['folds'])} |")

    rule = oracle_free.DEFAULT_RULE
    missed = [run for run in runs if run.hacking and rule.alarm(run.rows, run.per_sample, run.settings) is None]
    print(f"\nThe {len(missed)} hacking runs the default rule misses, by sweep: "
          + ", ".join(f"{sweep} {n}" for sweep, n in sorted(Counter(run.preset for run in missed).items())))
    print("\n| sweep | run | teacher's golden distance | the untrained student's | the student's best |")
    print("|---|---|---|---|---|")
    for run in missed:
        golden = [row["golden"] for row in run.rows]
        print(f"| {run.preset} | {run.name} | {run.settings['teacher_golden']:.1f} | {golden[0]:.1f} | "
              f"{min(golden):.1f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "runs")
