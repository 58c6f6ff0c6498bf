"""Detecting teacher hacking without an oracle, and measuring how well a detector does it.

What a practitioner sees during distillation, per evaluation (``SIGNALS``): the proxy KL(teacher‖student) on
held-out prompts, the same on training prompts, the training loss, the student's entropy and KL(student‖teacher).
A :class:`Rule` turns one signal into an alarm as the run goes (it reads only the evaluations so far, never alarms
where the proxy itself rose, can stay quiet once the student has all but become the teacher, and can date the turn
back to an earlier evaluation: the checkpoint to keep). Whether a
rule is any good is measured on runs whose truth is known, the lab's, by :func:`leave_one_preset_out`: choose the
rule on every sweep preset but one, test it on the one left out, for each preset in turn, so that no figure comes
from a rule tuned on the runs it is scored on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from teacherhack.detection import power_law_detector, verdict_word

# An oracle-free signal: (metric rows so far, their per-sample values or None, the run's settings) → one value per
# row (NaN where undefined); larger means "more suspicious".
Signal = Callable[[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]] | None, Mapping[str, Any]], np.ndarray]


def column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """Metric ``key`` along a run's rows, NaN where a row lacks it: what a signal is built from."""
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows])


def memorisation_gap(rows, per_sample, settings) -> np.ndarray:
    """Held-out proxy minus proxy on training prompts: it grows when the student fits what it trains on better
    than what it has not seen, the teacher's fixed samples memorised."""
    return column(rows, "proxy") - column(rows, "proxy_train")


def relative_gap(rows, per_sample, settings) -> np.ndarray:
    """The memorisation gap as a fraction of the held-out proxy (scale-free across tasks and sizes; undefined
    where the proxy is not positive)."""
    proxy = column(rows, "proxy")
    positive = proxy > 0
    return np.where(positive, memorisation_gap(rows, per_sample, settings) / np.where(positive, proxy, 1.0), np.nan)


def entropy_deficit(rows, per_sample, settings) -> np.ndarray:
    """How far the student's entropy, along the teacher's fixed held-out samples, has fallen towards the
    teacher's own along them: 0 where it started, 1 at the teacher's. A student that imitates an over-confident
    teacher ever more closely becomes ever sharper."""
    entropy = column(rows, "student_entropy_held_out")
    teacher = settings.get("teacher_entropy")
    if teacher is None or not len(entropy) or not math.isfinite(entropy[0]) or entropy[0] <= teacher:
        return np.full(len(rows), np.nan)  # a student that starts as sharp as the teacher: no deficit to measure
    return (entropy[0] - entropy) / (entropy[0] - teacher)


def proxy_stall(rows, per_sample, settings) -> np.ndarray:
    """How little the held-out proxy still improves: 1 − (its fall per step since the last evaluation ÷ its mean
    fall per step so far). Near 0 while it falls steadily, near 1 once it has stopped. Per step, not per evaluation:
    a last interval shorter than the others (steps not a multiple of the evaluation interval) is no stall."""
    proxy, steps = column(rows, "proxy"), column(rows, "step")
    out = np.full(len(proxy), np.nan)
    for t in range(2, len(proxy)):
        if not np.isfinite(proxy[[0, t - 1, t]]).all():
            continue  # undefined, never an alarm
        mean_fall = (proxy[0] - proxy[t]) / (steps[t] - steps[0])
        last_fall = (proxy[t - 1] - proxy[t]) / (steps[t] - steps[t - 1])
        out[t] = 1.0 - last_fall / mean_fall if mean_fall > 0 else 1.0
    return out


def power_law_departure(rows, per_sample, settings) -> np.ndarray:
    """The paper's sign: how far the held-out proxy sits above the power law C·t^(−α) fitted on the first third of
    the evaluations so far, in log space (the residual of ``teacherhack.detection.power_law_detector``, refitted at
    each evaluation as a live monitor would)."""
    steps, proxy = [int(r["step"]) for r in rows], column(rows, "proxy")
    out = np.full(len(rows), np.nan)
    for t in range(len(rows)):
        result = power_law_detector(steps[: t + 1], proxy[: t + 1])
        if result.residuals and result.residuals[t] is not None and t not in _fit_indices(result, steps):
            out[t] = result.residuals[t]
    return out


def _fit_indices(result: Any, steps: Sequence[int]) -> set[int]:
    return {steps.index(s) for s in result.fit_window}


SIGNALS: dict[str, Signal] = {
    "memorisation_gap": memorisation_gap,
    "relative_gap": relative_gap,
    "entropy_deficit": entropy_deficit,
    "proxy_stall": proxy_stall,
    "power_law_departure": power_law_departure,
}


def proxy_rose(rows: Sequence[Mapping[str, Any]], z: float = 3.0) -> np.ndarray:
    """Where the held-out proxy stands more than ``z`` standard errors above its best so far: the student moves
    away from the teacher too, which is over-fitting that the proxy shows by itself, not teacher hacking (the
    golden verdict's condition on the proxy, seen without an oracle). The SEs are unpaired, as the detection corpus
    keeps them (no per-sample values) and the rules were validated on it: a conservative mask, since the paired SE
    of a change is usually several times smaller."""
    proxy, se = column(rows, "proxy"), column(rows, "proxy_se")
    out = np.zeros(len(rows), dtype=bool)
    for t in range(len(rows)):
        best = int(np.nanargmin(proxy[: t + 1])) if np.isfinite(proxy[: t + 1]).any() else t
        spread = math.hypot(se[t], se[best])
        out[t] = bool(np.isfinite(spread) and proxy[t] - proxy[best] > z * spread)
    return out


def signal_series(name: str, rows: Sequence[Mapping[str, Any]], per_sample: Sequence[Mapping[str, Any]] | None,
                  settings: Mapping[str, Any]) -> np.ndarray:
    """Signal ``name`` at each evaluation as rules read it: undefined (never an alarm) where the proxy rose."""
    values = SIGNALS[name](rows, per_sample, settings)
    return np.where(proxy_rose(rows), np.nan, values)


def converged(rows: Sequence[Mapping[str, Any]], floor: float) -> np.ndarray:
    """Where the held-out proxy has fallen below ``floor`` times its first value: the student has all but become
    the teacher. There the proxy flattens at the student's last small distance to the teacher, which a power law
    fitted to the early descent reads as a departure, whether the teacher is good or bad."""
    proxy = column(rows, "proxy")
    if not len(proxy) or not math.isfinite(proxy[0]) or proxy[0] <= 0:
        return np.zeros(len(proxy), dtype=bool)
    return proxy < floor * proxy[0]


@dataclass(frozen=True)
class Rule:
    """Alarm when ``signal`` exceeds ``threshold`` at ``patience`` consecutive evaluations (after the first
    ``skip`` evaluations, where every signal still moves with the initial descent). The alarm also dates the turn:
    the first evaluation of the unbroken run of values above ``onset`` (the threshold if none) that led to it, when
    the signal was seen at or below that level just before; a run that goes back to the signal's first value (or to
    a gap) dates nothing. A high threshold confirms late but rarely by mistake; the lower onset level points back to
    the checkpoint to keep.
    With ``floor``, the rule stays quiet where the proxy is below that fraction of its first value
    (:func:`converged`)."""

    signal: str
    threshold: float
    patience: int = 2
    skip: int = 2
    onset: float | None = None
    floor: float | None = None

    def read(self, values: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The signal's values (:func:`signal_series`) as this rule reads them: undefined where it is quiet."""
        return values if self.floor is None else np.where(converged(rows, self.floor), np.nan, values)

    def alarm(self, rows: Sequence[Mapping[str, Any]], per_sample: Sequence[Mapping[str, Any]] | None,
              settings: Mapping[str, Any]) -> int | None:
        """The index of the evaluation at which a monitor watching the run would have raised the alarm. Each
        signal at evaluation t depends on evaluations up to t only, so the full-run computation equals the live one."""
        return self.first_alarm(self.read(signal_series(self.signal, rows, per_sample, settings), rows))

    def first_alarm(self, values: np.ndarray) -> int | None:
        """The index at which the rule alarms on its signal's values as it reads them (:meth:`read`), or None."""
        count = 0
        for t, value in enumerate(values):
            count = count + 1 if t >= self.skip and math.isfinite(value) and value > self.threshold else 0
            if count == self.patience:
                return t
        return None

    @property
    def level(self) -> float:
        """The level the turn is dated from: the onset level, else the threshold."""
        return self.threshold if self.onset is None else self.onset

    def turn(self, values: np.ndarray, at: int) -> int | None:
        """The evaluation the alarm at index ``at`` dates the turn to: where the unbroken run of values above the
        onset level (the threshold if none) that ends at ``at`` began, if the evaluation before it was seen at or
        below that level. None when the run reaches back to the first ``skip`` evaluations or to an undefined value
        (the power-law departure is undefined for the first 5): the signal was above the level as far back as it can
        be read, so where it rose through it is not known, and the first defined value is no date (on the detection
        corpus it would have dated 60 of the default rule's 64 alarms to the same 6th evaluation)."""
        start = at
        while start - 1 >= self.skip and math.isfinite(values[start - 1]) and values[start - 1] > self.level:
            start -= 1
        return start if start - 1 >= self.skip and math.isfinite(values[start - 1]) else None

    def describe(self) -> str:
        times = "once" if self.patience == 1 else f"at {self.patience} consecutive evaluations"
        onset = "" if self.onset is None else f", dated back to where it last rose above {self.onset:g}"
        floor = "" if self.floor is None else f", quiet once the proxy is below {self.floor:g} of its first value"
        return (f"{self.signal.replace('_', ' ')} above {self.threshold:g} {times}{onset}{floor} (the first "
                f"{self.skip} evaluations ignored)")

    def verdict(self, rows: Sequence[Mapping[str, Any]], per_sample: Sequence[Mapping[str, Any]] | None,
                settings: Mapping[str, Any], values: np.ndarray | None = None) -> "Alarm":
        """Whether and where the rule alarms on this run, with the reason in words (``values``: the signal's, from
        :func:`signal_series`, if already computed)."""
        values = self.read(signal_series(self.signal, rows, per_sample, settings) if values is None else values, rows)
        at = self.first_alarm(values)
        if at is None:
            return Alarm(False, None, None, self.describe(), f"no alarm: {self.describe()} did not happen")
        step, turn = int(rows[at]["step"]), self.turn(values, at)
        since = None if turn is None else int(rows[turn]["step"])
        reason = f"{self.signal.replace('_', ' ')} {values[at]:.3g} > {self.threshold:g} at step {step}"
        if self.patience > 1:
            reason += f", the last of {self.patience} evaluations in a row above it"
        if since is None:
            reason += (f"; the turn is not dated: the signal has been above {self.level:g} as far back as it can be "
                       f"read (its first values, or where the proxy rose), so keep the last checkpoint you trust "
                       f"from before step {step}")
        elif since < step:
            reason += f"; the turn dates from step {since}: keep the checkpoint from about then"
        return Alarm(True, step, since, self.describe(),
                     reason + (f"; {DEFAULT_RULE_MEASURED}" if self == DEFAULT_RULE else ""))


@dataclass(frozen=True)
class Alarm:
    """The oracle-free detector's answer on one run: did its rule alarm, at which step, and why."""

    fired: bool
    step: int | None
    since: int | None  # the step the alarm dates the turn to (the checkpoint to keep), None if undated: Rule.turn
    rule: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The rule teacherhack uses (the monitor, summary.json, the reports): the best on the whole detection corpus
# (benchmarks/detection), and what leave-one-sweep-out validation measured for the procedure that chose it. A test
# recomputes both from the corpus.
DEFAULT_RULE = Rule("power_law_departure", 0.3, patience=2, onset=0.2, floor=0.1)
DEFAULT_RULE_MEASURED = ("validated on 156 lab runs of 20 sweeps, each left out in turn: precision 0.85, recall 0.62, "
                         "the turn dated within 2 evaluations of the golden minimum in 0.13 of hacking runs (a fixed "
                         "guess of the minimum's evaluation: 0.86), the alarm itself a median +4 evaluations after "
                         "that minimum; an alarm on every run would have precision 0.64")


@dataclass(frozen=True)
class Labelled:
    """A run whose truth is known (the golden verdict), as the validation sees it."""

    name: str
    preset: str
    hacking: bool
    judged: bool  # False: the golden minimum came too late to know; such a run counts only if it hacks
    min_index: int  # evaluation index of the golden minimum
    rows: Sequence[Mapping[str, Any]]
    per_sample: Sequence[Mapping[str, Any]] | None
    settings: Mapping[str, Any]
    path: Path  # its folder, resolved: what tells it apart from a run of the same name in a same-named sweep
    reference: bool | None = None  # the reference verdict (real held-out responses): hacking, not, or not recorded
    reference_judged: bool = True  # False: the reference NLL's minimum came too late to know (it counts as "no")


@dataclass(frozen=True)
class Score:
    """A rule's record on a set of runs. A hit: it fired on a hacking run; a false alarm: on a run that does not
    hack; ``lags`` are evaluations from the golden minimum to the alarm, for hits, and ``turn_lags`` from the
    golden minimum to the turn the alarm dates (the checkpoint it says to keep), for hits that date one; timely: a
    hit whose dated turn is within ``max_lag`` evaluations of the golden minimum, before or after (a checkpoint long
    before it gives up a student that was still improving; one long after it keeps the damage)."""

    hits: int
    misses: int
    false_alarms: int
    quiet: int
    timely: int
    lags: tuple[int, ...]
    turn_lags: tuple[int, ...] = ()

    @property
    def precision(self) -> float:
        return self.hits / (self.hits + self.false_alarms) if self.hits + self.false_alarms else math.nan

    @property
    def recall(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else math.nan

    @property
    def timely_recall(self) -> float:
        return self.timely / (self.hits + self.misses) if self.hits + self.misses else math.nan

    def merge(self, other: "Score") -> "Score":
        return Score(self.hits + other.hits, self.misses + other.misses, self.false_alarms + other.false_alarms,
                     self.quiet + other.quiet, self.timely + other.timely, self.lags + other.lags,
                     self.turn_lags + other.turn_lags)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "timely_recall": self.timely_recall}


def signal_values(runs: Iterable[Labelled]) -> dict[tuple[Path, str], np.ndarray]:
    """Every signal of every run, computed once (a search scores many rules on the same values); keyed by the run's
    folder, since two sweeps in folders of the same name hold runs of the same group and name."""
    return {(run.path, name): signal_series(name, run.rows, run.per_sample, run.settings)
            for run in runs for name in SIGNALS}


def outcome(rule: Rule, run: Labelled,
            values: Mapping[tuple[Path, str], np.ndarray]) -> tuple[int | None, int | None]:
    """Where ``rule`` alarms on ``run`` and the turn it dates the alarm to (evaluation indices; None, None if quiet;
    the turn None if undated)."""
    signal = rule.read(values[run.path, rule.signal], run.rows)
    fired = rule.first_alarm(signal)
    return fired, None if fired is None else rule.turn(signal, fired)


def tally(outcomes: Iterable[tuple[Labelled, tuple[int | None, int | None]]], max_lag: int = 2) -> Score:
    """The score of a rule's (run, :func:`outcome`) pairs against the runs' truth."""
    hits = misses = false_alarms = quiet = timely = 0
    lags: list[int] = []
    turn_lags: list[int] = []
    for run, (fired, turn) in outcomes:
        if not run.hacking and not run.judged:
            continue  # not known yet: neither an alarm nor silence can be scored
        if run.hacking and fired is not None:
            hits += 1
            lags.append(fired - run.min_index)
            if turn is not None:  # an undated turn is not a timely one
                turn_lags.append(turn - run.min_index)
                timely += abs(turn_lags[-1]) <= max_lag
        elif run.hacking:
            misses += 1
        elif fired is not None:
            false_alarms += 1
        else:
            quiet += 1
    return Score(hits, misses, false_alarms, quiet, timely, tuple(lags), tuple(turn_lags))


def score(rule: Rule, runs: Iterable[Labelled], max_lag: int = 2,
          values: Mapping[tuple[Path, str], np.ndarray] | None = None) -> Score:
    """How ``rule`` does on ``runs`` (``values``: their signals from :func:`signal_values`, else computed here)."""
    runs = list(runs)
    values = signal_values(runs) if values is None else values
    return tally(((run, outcome(rule, run, values)) for run in runs), max_lag)


# An alarm worth acting on is right at least this often (the detection issue's target precision)
PRECISION_BAR = 0.9


def objective(s: Score) -> tuple[float, float, float]:
    """What a rule is chosen for (larger is better): an alarm to trust first, then hacking runs caught in time.
    Rules whose precision reaches :data:`PRECISION_BAR` rank above every other, and among themselves by timely
    recall (then precision); the others by precision (then timely recall). Weighing the two equally instead lets a
    low threshold that alarms on every converging run win by a hair: a monitor whose alarms mean little."""
    p, r = (0.0 if math.isnan(v) else v for v in (s.precision, s.timely_recall))
    return (1.0, r, p) if p >= PRECISION_BAR else (0.0, p, r)


# Each signal's threshold grid: the levels the rules search alarm on and date the turn from
GRIDS: dict[str, list[float]] = {
    "memorisation_gap": [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
    "relative_gap": [0.02, 0.05, 0.08, 0.12, 0.16, 0.2, 0.3],
    "entropy_deficit": [0.5, 0.7, 0.8, 0.9, 0.95, 1.0],
    "proxy_stall": [0.3, 0.5, 0.7, 0.8, 0.9],
    "power_law_departure": [0.02, 0.05, 0.1, 0.2, 0.3],
}


def candidates() -> list[Rule]:
    """The rules searched: each signal over its grid of thresholds (:func:`rules_for`)."""
    return [rule for signal, thresholds in GRIDS.items() for rule in rules_for(signal, thresholds)]


def rules_for(signal: str, thresholds: Sequence[float]) -> list[Rule]:
    """The rules on one signal: each threshold, with 1 to 3 consecutive evaluations, alone or dated back to a lower
    level of the same grid, always read or quiet once the proxy has nearly reached 0."""
    return [Rule(signal, threshold, patience, onset=onset, floor=floor) for threshold in thresholds
            for patience in (1, 2, 3) for onset in (None, *(level for level in thresholds if level < threshold))
            for floor in (None, 0.01, 0.02, 0.05, 0.1)]


def leave_one_preset_out(runs: Sequence[Labelled], rules: Sequence[Rule] | None = None, max_lag: int = 2,
                         values: Mapping[tuple[Path, str], np.ndarray] | None = None) -> dict[str, Any]:
    """For each preset: the best rule on the others (by :func:`objective`), scored on that preset. Returns the
    per-preset choices and scores, the pooled score over the held-out presets, the baseline a dated turn must
    beat (``fixed_guess``: the share of held-out hacking runs whose golden minimum lies within ``max_lag`` of the
    evaluation where it most often lies in the other presets), and, for reference, the rule that is best on all
    runs together with its (optimistic, in-sample) score. ``values``: :func:`signal_values` of ``runs``, if
    already computed."""
    rules = candidates() if rules is None else list(rules)
    if not rules:
        raise ValueError("no rules to choose from")
    values = signal_values(runs) if values is None else values
    outcomes = {rule: [outcome(rule, run, values) for run in runs] for rule in rules}  # a rule's alarms, once

    def scored(rule: Rule, chosen: Sequence[bool]) -> Score:
        return tally(((run, o) for run, o, keep in zip(runs, outcomes[rule], chosen) if keep), max_lag)

    presets = sorted({r.preset for r in runs})
    folds, guessed, hacking = [], 0, 0
    for held in presets:
        train = [run.preset != held for run in runs]
        test = [not t for t in train]
        best = max(rules, key=lambda rule: objective(scored(rule, train)))
        folds.append({"preset": held, "rule": best, "train": scored(best, train), "test": scored(best, test)})
        minima = [run.min_index for run, t in zip(runs, train) if t and run.hacking]
        if minima:
            guess = max(set(minima), key=minima.count)
            held_out = [run for run, t in zip(runs, test) if t and run.hacking]
            guessed += sum(abs(run.min_index - guess) <= max_lag for run in held_out)
            hacking += len(held_out)
    pooled = folds[0]["test"]
    for fold in folds[1:]:
        pooled = pooled.merge(fold["test"])
    everything = [True] * len(runs)
    overall = max(rules, key=lambda rule: objective(scored(rule, everything)))
    return {"folds": folds, "pooled": pooled, "fixed_guess": guessed / hacking if hacking else math.nan,
            "in_sample": {"rule": overall, "score": scored(overall, everything)}, "max_lag": max_lag}


def each_signal(runs: Sequence[Labelled], max_lag: int = 2,
                values: Mapping[tuple[Path, str], np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """What each signal is worth by itself: :func:`leave_one_preset_out` with the search restricted to its rules."""
    values, rules = signal_values(runs) if values is None else values, candidates()
    return {name: leave_one_preset_out(runs, [rule for rule in rules if rule.signal == name], max_lag, values)
            for name in SIGNALS}


def format_each_signal(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """:func:`each_signal` as a markdown table: the held-out figures of each signal alone."""
    max_lag = next(iter(reports.values()))["max_lag"]
    lines = [f"| signal | hits | misses | false alarms | precision | recall | turn within {max_lag} evaluations | "
             "rule chosen on all runs |", "|---|---|---|---|---|---|---|---|"]
    for name, report in reports.items():
        s = report["pooled"]
        lines.append(f"| {name.replace('_', ' ')} | {s.hits} | {s.misses} | {s.false_alarms} | {_pct(s.precision)} | "
                     f"{_pct(s.recall)} | {_pct(s.timely_recall)} | {report['in_sample']['rule'].describe()} |")
    return "\n".join(lines)


def caught_by_rise(runs: Sequence[Labelled], rule: Rule, edges: Sequence[float] = (0.0, 0.5, 1.0, 2.0, math.inf),
                   values: Mapping[tuple[Path, str], np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Of the hacking runs, how many ``rule`` catches, by how far the golden metric rose from its minimum to the end
    (between consecutive ``edges``): whether what it misses are small turns or large ones it cannot see. Only the
    runs in the most common metric unit count (nats per sequence in the lab; a per-token rise is another scale)."""
    hacking = [run for run in runs if run.hacking]
    units = [run.settings.get("metric_unit") for run in hacking]
    hacking = [run for run, unit in zip(hacking, units) if unit == max(units, key=units.count)]
    values = signal_values(hacking) if values is None else values
    rises = [column(run.rows, "golden")[-1] - column(run.rows, "golden")[run.min_index] for run in hacking]
    bins = []
    for low, high in zip(edges, edges[1:]):
        members = [run for run, rise in zip(hacking, rises) if low <= rise < high]
        bins.append({"low": low, "high": high, "runs": len(members),
                     "caught": sum(outcome(rule, run, values)[0] is not None for run in members)})
    return bins


def format_caught_by_rise(bins: Sequence[Mapping[str, Any]]) -> str:
    """:func:`caught_by_rise` as a markdown table."""
    lines = ["| golden rise from its minimum to the end | hacking runs | caught | recall |", "|---|---|---|---|"]
    for b in bins:
        span = f"{b['low']:g} or more" if math.isinf(b["high"]) else f"{b['low']:g} to {b['high']:g}"
        recall = b["caught"] / b["runs"] if b["runs"] else math.nan
        lines.append(f"| {span} | {b['runs']} | {b['caught']} | {_pct(recall)} |")
    return "\n".join(lines)


def trade_off(runs: Sequence[Labelled], rule: Rule, max_lag: int = 2,
              values: Mapping[tuple[Path, str], np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Precision against recall and lag for ``rule`` over its signal's threshold grid (:data:`GRIDS`; its patience,
    skip and floor kept, its onset level where it lies below the threshold, else the threshold dates the turn; all
    runs): the curve a user picks an operating point from."""
    values = signal_values(runs) if values is None else values
    others = [dataclasses.replace(rule, threshold=threshold, onset=rule.onset if rule.onset is not None
                                  and rule.onset < threshold else None) for threshold in GRIDS[rule.signal]]
    return [{"threshold": other.threshold, **score(other, runs, max_lag, values).to_dict()} for other in others]


def format_trade_off(curve: Sequence[Mapping[str, Any]], max_lag: int = 2) -> str:
    """:func:`trade_off` as a markdown table: what each threshold buys in precision and costs in recall."""
    lines = [f"| threshold | hits | false alarms | precision | recall | turn within {max_lag} evaluations | "
             "median alarm lag |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['threshold']:g} | {p['hits']} | {p['false_alarms']} | {_pct(p['precision'])} | "
              f"{_pct(p['recall'])} | {_pct(p['timely_recall'])} | {_median(p['lags'])} |" for p in curve]
    return "\n".join(lines)


def labelled(run: Any, group: str) -> Labelled:
    """A finished run (``teacherhack.rundir.Run``) with its golden verdict as the truth to score rules against, and
    its reference verdict."""
    verdicts = run.verdicts()
    verdict, reference = verdicts.golden, verdicts.reference
    steps = [int(r["step"]) for r in run.metrics]
    return Labelled(run.name, group, verdict.hacking, verdict.judged, steps.index(verdict.min_step), run.metrics,
                    run.per_sample, run.settings, run.path.resolve(), None if reference is None else reference.hacking,
                    reference is None or reference.judged)


def format_runs(runs: Sequence[Labelled], rule: Rule) -> str:
    """Per run: the golden verdict (the truth), the reference verdict, and when ``rule`` would have alarmed."""
    lines = ["| sweep | run | golden verdict | golden minimum (evaluation) | reference verdict | alarm (evaluation) "
             "| lag |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        fired = rule.alarm(run.rows, run.per_sample, run.settings)
        golden = verdict_word(run.hacking, run.judged)
        reference = "–" if run.reference is None else verdict_word(run.reference, run.reference_judged)
        lag = fired - run.min_index if fired is not None and run.hacking else None
        lines.append(f"| {run.preset} | {run.name} | {golden} | {run.min_index} | {reference} | "
                     f"{'–' if fired is None else fired} | {'–' if lag is None else f'{lag:+d}'} |")
    return "\n".join(lines)


def format_agreement(runs: Sequence[Labelled]) -> str:
    """Does a student that hacks the oracle also get worse on real held-out text? Per sweep, the judged runs with
    a reference verdict: how often the reference verdict (the golden rule on the NLL of real responses) says the
    same as the golden one. A reference verdict that is undecided at the run's end did not alarm: it counts as "no"
    (for a hacking run, a miss)."""
    lines = ["| sweep | runs | golden: hacking | reference: hacking | both | golden only | reference only | agree |",
             "|---|---|---|---|---|---|---|---|"]
    total = np.zeros(7, int)
    for preset in sorted({r.preset for r in runs}):
        pairs = [(r.hacking, r.reference) for r in runs
                 if r.preset == preset and (r.hacking or r.judged) and r.reference is not None]
        counts = np.array([len(pairs), sum(g for g, _ in pairs), sum(f for _, f in pairs),
                           sum(g and f for g, f in pairs), sum(g and not f for g, f in pairs),
                           sum(f and not g for g, f in pairs), sum(g == f for g, f in pairs)])
        total += counts
        lines.append(f"| {preset} | " + " | ".join(str(int(c)) for c in counts) + " |")
    lines.append("| **all** | " + " | ".join(f"**{int(c)}**" for c in total) + " |")
    return "\n".join(lines)


def format_validation(report: Mapping[str, Any], max_lag: int = 2) -> str:
    """The leave-one-preset-out figures as a markdown table, with the pooled line and the in-sample reference."""

    def cells(s: Score) -> str:
        return (f"{s.hits} | {s.misses} | {s.false_alarms} | {s.quiet} | {_pct(s.precision)} | {_pct(s.recall)} | "
                f"{_pct(s.timely_recall)} | {_median(s.turn_lags)} | {_median(s.lags)}")

    lines = [f"| held-out sweep | rule chosen on the others | hits | misses | false alarms | quiet | precision | "
             f"recall | turn within {max_lag} evaluations | median turn lag | median alarm lag |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {f['preset']} | {f['rule'].describe()} | {cells(f['test'])} |" for f in report["folds"]]
    lines.append(f"| **pooled, held out** | | {cells(report['pooled'])} |")
    best = report["in_sample"]
    lines.append(f"| all (in-sample, optimistic) | {best['rule'].describe()} | {cells(best['score'])} |")
    return "\n".join(lines)


def measured_text(report: Mapping[str, Any], max_lag: int = 2) -> str:
    """What the validation measured, in one line: the text the default rule's alarms carry."""
    s, folds = report["pooled"], report["folds"]
    runs = s.hits + s.misses + s.false_alarms + s.quiet
    return (f"validated on {runs} lab runs of {len(folds)} sweeps, each left out in turn: precision "
            f"{_pct(s.precision)}, recall {_pct(s.recall)}, the turn dated within {max_lag} evaluations of the golden "
            f"minimum in {_pct(s.timely_recall)} of hacking runs (a fixed guess of the minimum's evaluation: "
            f"{_pct(report['fixed_guess'])}), the alarm itself a median {_median(s.lags)} evaluations after that "
            f"minimum; an alarm on every run would have precision {_pct((s.hits + s.misses) / runs if runs else math.nan)}")


def _median(lags: Sequence[int]) -> str:
    return f"{float(np.round(np.median(lags))) + 0.0:+.0f}" if len(lags) else "–"  # + 0.0: −0 reads +0


def _pct(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.2f}"
