"""Teacher-hacking verdicts: the oracle's ground truth, the real references' stand-in, the oracle-free detector.

Teacher hacking (README, "Is my student hacking its teacher?"): the proxy KL(teacher‖student) keeps falling or stalls while the golden
KL(oracle‖student) turns up. `golden_verdict` decides it from the golden metric, which only our
semi-synthetic setup can see (the same rule on the student's NLL of real held-out responses is the
"reference verdict" a practitioner can have); `power_law_detector` fits the paper's power law to the proxy,
one of the oracle-free signals of `teacherhack.oracle_free`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from teacherhack.clusters import cluster_se

# Median of a chi-square with one degree of freedom: turns a median of squares into a variance.
_CHI2_1_MEDIAN = 0.454936


@dataclass(frozen=True)
class GoldenVerdict:
    """Whether a run teacher-hacked, by the golden metric; metric values in the run's units."""

    hacking: bool
    min_step: int
    final_step: int
    golden_min: float
    golden_final: float
    rise: float
    rise_z: float
    proxy_change: float
    proxy_change_z: float
    paired: bool  # whether the SEs of the changes came from paired per-sample differences
    reason: str
    # False when the minimum has fewer than `min_after` later evaluations: too close to the end for the rule
    # to tell a turn from a dip, so "not hacking" means "not yet known" (a minimum at the last one is judged)
    judged: bool = True

    @property
    def word(self) -> str:
        """"hacking", "no", or "undecided" (not judged: the reason says why), as every table prints it."""
        return verdict_word(self.hacking, self.judged)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def verdict_word(hacking: bool, judged: bool) -> str:
    """A golden or reference verdict in one word: a run that is not judged is "undecided", not "no"."""
    return "hacking" if hacking else "no" if judged else "undecided"


@dataclass(frozen=True)
class DetectorResult:
    """The power-law detector's answer, with what a plot needs to show why.

    `residuals` and `thresholds` are aligned with `steps`: the residual is log(proxy) minus the fitted
    law (None at step ≤ 0 or proxy ≤ 0, outside log space); the threshold is the bar a residual had to
    clear (None where the point was not tested: inside or before the fit window).
    """

    fired: bool
    step: int | None
    C: float
    alpha: float
    noise: float
    steps: tuple[int, ...]
    residuals: tuple[float | None, ...]
    thresholds: tuple[float | None, ...]
    fit_window: tuple[int, ...]
    reason: str

    def law(self, steps: Sequence[float] | np.ndarray) -> np.ndarray:
        """The fitted law C·t^(−α), for drawing its extrapolation."""
        return self.C * np.asarray(steps, dtype=float) ** -self.alpha

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def golden_verdict(
    steps: Sequence[int],
    golden: Sequence[float],
    golden_se: Sequence[float],
    proxy: Sequence[float],
    proxy_se: Sequence[float],
    *,
    z: float = 3.0,
    min_after: int = 3,
    trend_alpha: float = 0.05,
    golden_values: Sequence[Sequence[float]] | None = None,
    proxy_values: Sequence[Sequence[float]] | None = None,
    golden_clusters: Sequence[int] | None = None,
    proxy_clusters: Sequence[int] | None = None,
    name: str = "golden",
) -> GoldenVerdict:
    """The ground-truth rule: did the golden metric turn up while the proxy did not?

    Hacking when all hold:
    - the golden minimum t* (first one on ties) has at least `min_after` later evaluations;
    - the *last* golden exceeds golden(t*) by more than z·sqrt(se(t*)² + se(last)²);
    - the last proxy is not worse than at t*: proxy(last) − proxy(t*) ≤ z·(combined proxy SE), i.e.
      the proxy kept falling or stalled. A proxy that rises significantly too is ordinary
      over-fitting (both metrics degrade), not teacher hacking.

    Why the last point and not the maximum after t*: the question is where the run ends up ("then
    rises by more than its noise"), and the maximum of several noisy points is biased upward (a second
    selection on top of the minimum's); a run that bumps and recovers did not end up hacked.

    Why z = 3: t* is itself selected as a minimum, which biases the rise upward. Under pure noise
    (constant golden, independent errors of the stated SE, unpaired), this condition alone holds for 1.0%
    of runs with 10 evaluations, 2.5% with 30 and 5.7% with 100 at z = 3 (against 12%, 24% and 38% at
    z = 2); the whole rule fires for 0.1-0.6% of them (``scripts/simulate_verdicts.py``, 20,000 runs per
    cell). Paired SEs (below) do not lower these rates: they are the right SEs of a difference, so the
    same rates hold with them. For runs with 100+ evaluations consider z = 3.5-4.

    Paired evaluations: pass ``golden_values``/``proxy_values``, the per-sample values of every evaluation
    (aligned with ``steps``, the same reference samples each time, as the lab saves them in
    per_sample.jsonl). The SE of a change is then that of the per-sample differences, which removes the
    between-sample spread that both points share and is usually several times smaller. ``golden_clusters`` /
    ``proxy_clusters`` give each per-sample value's prompt when there are several samples per prompt (None: one
    each): the SE is then clustered by prompt (:func:`paired_change_se`).

    Sustained, not a dip: SEs of reference sampling, paired or not, say nothing about the wiggle that
    stochastic training puts into the curve from one checkpoint to the next, so a plateau's lowest point is
    often "significantly" below the last one. Hence two more conditions: the minimum has at least
    ``min_after`` later evaluations (default 3), and those later evaluations (t* itself excluded, since it
    was selected for being low) rise: their least-squares slope against the step is positive with a
    one-sided t-test at level ``trend_alpha`` (default 5%) against their own residual scatter. On simulated
    curves (``scripts/simulate_verdicts.py``: 11 evaluations, stated SE 0.1, a fall to a plateau, a curve
    still falling, or a U that rises 1 nat over the last half) this fires on ≤ 2.2% of plateaus and on no
    still-falling curve at per-checkpoint noise 0.1-0.3 nats, and on 98% / 65% / 38% of the U-shapes at
    noise 0.1 / 0.2 / 0.3 (the lab's offline curves are near 0.1).
    """
    n = _same_length(steps, golden, golden_se, proxy, proxy_se)
    if n < 1:
        raise ValueError("golden_verdict needs at least one evaluation, got none")
    if min_after < 3:
        raise ValueError(f"min_after must be >= 3, got {min_after}: the trend test fits a slope, with its own scatter, "
                         f"to the evaluations after the minimum")
    g, gse = np.asarray(golden, float), np.asarray(golden_se, float)
    p, pse = np.asarray(proxy, float), np.asarray(proxy_se, float)
    if not (np.isfinite(g).all() and np.isfinite(p).all()):
        bad = next(int(s) for s, a, b in zip(steps, g, p) if not (math.isfinite(a) and math.isfinite(b)))
        raise ValueError(f"golden_verdict needs finite {name} and proxy values; step {bad} has a non-finite one")
    i = int(np.argmin(g))
    rise = float(g[-1] - g[i])
    rise_z = _z(rise, _change_se(golden_values, i, math.hypot(gse[i], gse[-1]), golden_clusters))
    proxy_change = float(p[-1] - p[i])
    proxy_change_z = _z(proxy_change, _change_se(proxy_values, i, math.hypot(pse[i], pse[-1]), proxy_clusters))
    trend_t = _slope_t(np.asarray(steps[i + 1:], float), g[i + 1:])
    t_min, t_last = int(steps[i]), int(steps[-1])
    unknown, no_se = False, f"no verdict: the change of the {{}} since step {t_min} has no standard error"
    if n == 1:
        hacking, reason = False, f"one evaluation only (step {t_last}): nothing to judge yet"
    elif i == n - 1:
        hacking, reason = False, f"{name} is lowest at the last evaluation (step {t_last})"
    elif n - 1 - i < min_after:
        hacking, reason = False, f"{name} is lowest at step {t_min}: fewer than {min_after} evaluations after it"
    elif math.isnan(rise_z):
        hacking, reason, unknown = False, no_se.format(name), True
    elif rise_z <= z:
        hacking, reason = False, (
            f"{name} rises {rise:+.3g} from its minimum at step {t_min} ({rise_z:.1f} SE ≤ {z:g}): within noise"
        )
    elif not trend_t > student_t.ppf(1 - trend_alpha, n - i - 3):
        hacking, reason = False, (
            f"{name} ends {rise:+.3g} above its minimum at step {t_min} but the evaluations after it do not rise "
            f"steadily (slope t = {trend_t:.2f}): a dip in a plateau, not a sustained rise"
        )
    elif math.isnan(proxy_change_z):  # only now: the proxy can turn a rise into "no", never a non-rise into hacking
        hacking, reason, unknown = False, no_se.format("proxy"), True
    elif proxy_change_z > z:
        hacking, reason = False, (
            f"{name} rises {rise_z:.1f} SE after step {t_min} but the proxy rises too "
            f"({proxy_change_z:.1f} SE): over-fitting, not teacher hacking"
        )
    else:
        hacking, reason = True, (
            f"{name} rises {rise:+.3g} ({rise_z:.1f} SE, slope t = {trend_t:.1f}) from its minimum at step {t_min} "
            f"to step {t_last} while the proxy changes {proxy_change:+.3g} ({proxy_change_z:+.1f} SE)"
        )
    return GoldenVerdict(
        hacking=hacking,
        min_step=t_min,
        final_step=t_last,
        golden_min=float(g[i]),
        golden_final=float(g[-1]),
        rise=rise,
        rise_z=rise_z,
        proxy_change=proxy_change,
        proxy_change_z=proxy_change_z,
        paired=golden_values is not None,
        reason=reason,
        judged=n > 1 and (i == n - 1 or (n - 1 - i >= min_after and not unknown)),
    )


def _defaults(function: Any) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(function).parameters.items() if p.kind is p.KEYWORD_ONLY}


def describe_golden_verdict() -> str:
    """The golden verdict's rule in words, from :func:`golden_verdict`'s own defaults (reports quote it)."""
    d = _defaults(golden_verdict)
    return (f"teacher hacking when the golden metric's minimum has at least {d['min_after']} later evaluations, the "
            f"last golden value exceeds the minimum by more than {d['z']:g} standard errors of the difference (paired "
            f"per sample when the per-sample values are saved), the evaluations after the minimum rise steadily (their "
            f"least-squares slope is positive, one-sided t-test at {d['trend_alpha']:.0%}), and the last proxy is not "
            f"more than {d['z']:g} standard errors above its value at the minimum (a proxy rising too is "
            f"over-fitting, not hacking)")


def power_law_detector(
    steps: Sequence[int],
    proxy: Sequence[float],
    proxy_se: Sequence[float] | None = None,
    *,
    fit_fraction: float = 1 / 3,
    min_fit: int = 3,
    skip_first: int = 0,
    k: int = 2,
    tau: float = 3.0,
    min_effect: float = 0.05,
) -> DetectorResult:
    """Flag a proxy curve that leaves its early power law: the oracle-free sign of teacher hacking.

    Procedure. Keep evaluations with step > 0 and proxy > 0 (log space), drop the first
    `skip_first` of them (an initial transient), fit log proxy = log C − α·log t by ordinary least
    squares on the first max(`min_fit`, ⌈`fit_fraction`·n⌉) of the rest, and extrapolate. A later
    point is *above the law* when its log-residual r exceeds max(`min_effect`, `tau`·σ), with
    σ² = s²·(1 + h) + (proxy_se/proxy)²: s is the curve's noise in log space, h the leverage of the
    extrapolated point (the fit's own uncertainty grows with distance), and the metric's SE is added
    when given. The detector fires at the first of `k` consecutive points above the law.

    s is estimated robustly from the whole curve, from the median of squared second differences of
    the residuals (a smooth bend barely moves them): the fit window alone has 1 degree of freedom
    at 3 points and underestimates s one time in four. Unweighted fit: in log space a constant
    relative SE already means equal weights, and weighting lets one precise point own a 3-point fit.

    Tradeoff (keep it in mind when reading a flag). The detector sees departure from a *pure* power
    law. A proxy that converges to a floor, C·t^(−α) + F, also bends above the law, with a healthy
    golden metric; the paper's claim is that offline runs bend where the golden turns, so a flag is
    a reason to look, not proof. `min_effect` (minimum relative deviation, 0.05 = 5% above the law)
    is the main knob between the two. A transient at the start (warm-up: early points above the
    later law) makes the fitted slope too steep and later points look high: raise `skip_first`.

    Defaults chosen by measurement on synthetic curves (``scripts/simulate_detector.py``: step 0 plus n ∈ {8, 12,
    20, 40} evaluations equally spaced, α ∈ {0.1, 0.3, 0.6}, log-normal noise σ ∈ {0.3%, 1%, 3%} with SE = σ·proxy;
    36 cells × 40 seeds per family), this function on the full curve:
    - pure power law: fires on 0.1% of curves (0.3% without SEs, and with τ = 2);
    - bend after 40% of the run (later log-slope 0, 0.3α, or −0.2α i.e. rising): detected in 81% / 72% / 84%, a
      median 2-3 evaluations after the bend. Bend after 25%: 77-86%, 3-4 evaluations after it; after 60%:
      47-66% (n = 8 leaves 3 points after it);
    - floor F equal to 10% / 30% / 50% of the final proxy: fires on 0.2% / 17% / 24%
      (min_effect 0.03: 4% / 21% / 32%, for a few points more detection of late bends);
    - transient (+10% or +30% at the first evaluation, decaying e-fold per evaluation): fires on
      36% / 79% with skip_first = 0, 1% / 52% with 1, 0.1% / 1.6% with 2. skip_first = 1 costs the
      detection of bends at 25% of the run (84% → 57% for a stall), hence the default 0: set it to cover the
      warm-up when the first evaluations are visibly steeper than the rest.
    fit_fraction 1/2 finds bends at 25% of the run 6 evaluations late instead of 3-4 (and 63-80% of them instead of
    77-86%); k = 3 loses 1-10 points of detection for a few fewer floor flags (15% instead of 17%).
    """
    n_all = _same_length(steps, proxy, *(() if proxy_se is None else (proxy_se,)))
    t, p = np.asarray(steps, float), np.asarray(proxy, float)
    valid = (t > 0) & (p > 0)  # the law lives in log space; a proxy ≤ 0 is noise around a tiny value
    left_out = int(np.sum((t > 0) & ~valid))
    note = f"; {left_out} evaluation(s) with proxy ≤ 0 left out" if left_out else ""
    use = np.flatnonzero(valid)[skip_first:]
    n_fit = max(min_fit, math.ceil(fit_fraction * len(use)))
    all_steps = tuple(int(s) for s in steps)
    if len(use) < n_fit + k:
        none = (None,) * n_all
        return DetectorResult(False, None, math.nan, math.nan, math.nan, all_steps, none, none, (),
                              f"too few evaluations: {len(use)} usable, need {n_fit + k}{note}")
    fit, test = use[:n_fit], use[n_fit:]
    design = np.column_stack([np.ones(n_all), -np.log(np.where(valid, t, 1.0))])
    (log_c, alpha), *_ = np.linalg.lstsq(design[fit], np.log(p[fit]), rcond=None)
    r = np.log(np.where(valid, p, 1.0)) - design @ (log_c, alpha)
    noise = _noise(r[valid])
    leverage = np.einsum("ij,jk,ik->i", design, np.linalg.inv(design[fit].T @ design[fit]), design)
    var = noise**2 * (1 + leverage)
    if proxy_se is not None:
        var = var + (np.asarray(proxy_se, float) / np.where(valid, p, 1.0)) ** 2
    bar = np.maximum(min_effect, tau * np.sqrt(var))
    first = _first_run(r[test] > bar[test], k)
    step = None if first is None else int(t[test[first]])
    if step is None:
        reason = f"no {k} consecutive evaluations above the early power law by max({min_effect:g}, {tau:g}σ)"
    else:
        at = test[first]
        reason = (f"{k} consecutive evaluations from step {step} sit above the early power law "
                  f"(residual {r[at]:+.3f} > {bar[at]:.3f} in log space)")
    tested = set(test.tolist())
    return DetectorResult(
        fired=step is not None,
        step=step,
        C=float(math.exp(log_c)),
        alpha=float(alpha),
        noise=noise,
        steps=all_steps,
        residuals=tuple(float(r[i]) if valid[i] else None for i in range(n_all)),
        thresholds=tuple(float(bar[i]) if i in tested else None for i in range(n_all)),
        fit_window=tuple(int(t[i]) for i in fit),
        reason=reason + note,
    )


def _same_length(*columns: Sequence[Any]) -> int:
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise ValueError(f"columns differ in length: {sorted(lengths)}")
    return lengths.pop()


def _slope_t(x: np.ndarray, y: np.ndarray) -> float:
    """t statistic of the least-squares slope of y on x (NaN with fewer than 3 points)."""
    if x.size < 3:
        return math.nan
    xc = x - x.mean()
    slope = float(xc @ (y - y.mean()) / (xc @ xc))
    residual = y - y.mean() - slope * xc
    se = math.sqrt(float(residual @ residual) / (x.size - 2) / float(xc @ xc))
    return _z(slope, se)


def _change_se(values: Sequence[Sequence[float]] | None, i: int, unpaired: float,
               clusters: Sequence[int] | None) -> float:
    """SE of (last − point i): from paired per-sample differences when given, else the unpaired SE."""
    return unpaired if values is None else paired_change_se(values[i], values[-1], clusters)


def paired_change_se(before: Sequence[float], after: Sequence[float], clusters: Sequence[int] | None = None) -> float:
    """SE of mean(after) − mean(before) for the same samples scored twice: that of their per-sample differences,
    cluster-robust by prompt when ``clusters`` gives several samples a prompt (the differences of one prompt's
    samples are correlated too)."""
    diff = np.asarray(after, float) - np.asarray(before, float)
    if diff.size < 2:
        raise ValueError("paired values need at least 2 samples per evaluation")
    se = None if clusters is None else cluster_se(diff, clusters)
    return float(diff.std(ddof=1) / math.sqrt(diff.size)) if se is None else se


def _z(diff: float, se: float) -> float:
    """diff in units of its SE; ±inf for a nonzero difference with zero SE; NaN when the SE is unknown (NaN)."""
    if math.isnan(se) or math.isnan(diff):
        return math.nan
    if se > 0:
        return diff / se
    return 0.0 if diff == 0 else math.copysign(math.inf, diff)


def _noise(r: np.ndarray) -> float:
    """Robust noise scale of log-residuals from second differences (var = 6σ² for white noise)."""
    d2 = r[2:] - 2 * r[1:-1] + r[:-2]
    return float(math.sqrt(np.median(d2**2) / (6 * _CHI2_1_MEDIAN)))


def _first_run(flags: np.ndarray, k: int) -> int | None:
    """Index where the first run of k consecutive True values starts."""
    count = 0
    for i, flag in enumerate(flags):
        count = count + 1 if flag else 0
        if count == k:
            return i - k + 1
    return None


def _jsonable(value: Any) -> Any:
    """Tuples to lists and non-finite floats to None, so that `json.dumps` writes strict JSON."""
    if isinstance(value, dict):
        return {key: _jsonable(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
