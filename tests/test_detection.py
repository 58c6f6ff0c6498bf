"""Verdicts on synthetic curves whose answer is known by construction."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from teacherhack.rundir import load_runs
from teacherhack.detection import golden_verdict, power_law_detector
from teacherhack.oracle_free import DEFAULT_RULE

STEPS = np.arange(0, 21) * 100  # step 0 (initial student) and 20 evaluations


def power_law(seed: int, *, alpha: float = 0.3, noise: float = 0.01, bend: int | None = None,
              after: float = 0.0) -> np.ndarray:
    """30·(t/100)^−α with log-normal noise; after `bend` the slope becomes −`after`·α."""
    t = np.maximum(STEPS, 100) / 100
    law = 30 * t**-alpha
    if bend is not None:
        tb = bend / 100
        law = np.where(t <= tb, law, 30 * tb**-alpha * (t / tb) ** (-after * alpha))
    return law * np.exp(np.random.default_rng(seed).normal(0, noise, t.size))


def verdict(golden, proxy, se=0.2, **kw):
    n = len(golden)
    return golden_verdict(STEPS[:n], golden, [se] * n, proxy, [se] * n, **kw)


# ---- golden verdict ----

def test_u_shaped_golden_with_falling_proxy_is_hacking():
    golden = 50 + 0.04 * (STEPS / 100 - 8) ** 2  # minimum at step 800
    v = verdict(golden, power_law(0, noise=0))
    assert v.hacking and v.min_step == 800 and v.final_step == 2000
    assert v.rise == pytest.approx(0.04 * 144) and v.rise_z > 3 and v.proxy_change < 0
    assert "800" in v.reason


def test_stalled_proxy_counts_as_not_worse():
    golden = 50 + 0.04 * (STEPS / 100 - 8) ** 2
    proxy = np.minimum(power_law(0, noise=0), 20.0)  # flat from the middle on
    assert verdict(golden, proxy).hacking


def test_monotone_golden_is_not_hacking():
    v = verdict(60 - 10 * (1 - np.exp(-STEPS / 500)), power_law(0, noise=0))
    assert not v.hacking and v.min_step == 2000 and v.rise == 0


def test_golden_and_proxy_rising_together_is_overfitting():
    bowl = 0.04 * (STEPS / 100 - 8) ** 2
    v = verdict(50 + bowl, 20 + bowl)
    assert not v.hacking and v.rise_z > 3 and v.proxy_change_z > 3
    assert "over-fitting" in v.reason


def test_rise_within_its_standard_error_is_not_hacking():
    golden = 50 + 0.01 * np.maximum(STEPS / 100 - 10, 0)  # +0.1 at the end, SE 0.2 each
    v = verdict(golden - 1e-3 * STEPS / 100 * (STEPS <= 1000), power_law(0, noise=0))
    assert v.min_step == 1000 and 0 < v.rise < 0.2 and not v.hacking


def test_z_sets_how_many_standard_errors_a_rise_needs():
    golden = 50 + 0.05 * np.maximum(STEPS / 100 - 10, 0)  # +0.5 = 1.8 combined SE
    v = verdict(golden - 1e-3 * STEPS / 100 * (STEPS <= 1000), power_law(0, noise=0))
    assert v.rise_z == pytest.approx(0.51 / np.hypot(0.2, 0.2)) and not v.hacking
    assert verdict(golden - 1e-3 * STEPS / 100 * (STEPS <= 1000), power_law(0, noise=0), z=1.5).hacking


def test_minimum_at_the_last_evaluation_is_not_hacking():
    v = verdict(60 - STEPS / 100, power_law(0, noise=0))
    assert not v.hacking and v.min_step == 2000 and "last evaluation" in v.reason and v.judged


def test_a_late_jump_is_not_a_sustained_rise():
    golden = np.r_[60 - STEPS[:-1] / 100, 60.0]  # lowest at step 1900, a jump at 2000
    v = verdict(golden, power_law(0, noise=0))
    assert not v.hacking and "fewer than 3 evaluations after it" in v.reason and not v.judged  # not yet known
    with pytest.raises(ValueError, match="min_after must be >= 3"):  # one point has no trend to test
        verdict(golden, power_law(0, noise=0), min_after=1)
    rising = np.r_[60 - STEPS[:-4] / 100, 60 - STEPS[-5] / 100 + np.array([0.5, 0.9, 1.6, 2.0])]
    assert verdict(rising, power_law(0, noise=0)).hacking


def test_pure_noise_rarely_gives_a_verdict():
    """Constant golden and proxy with noise of exactly their SE: the significance condition alone holds in about
    2% of runs of 21 evaluations, the whole rule (a steady rise too) in a few per thousand."""
    rng = np.random.default_rng(1)
    hits = [verdict(50 + rng.normal(0, 0.2, 21), 20 + rng.normal(0, 0.2, 21)).hacking for _ in range(400)]
    assert np.mean(hits) < 0.015


def test_the_simulation_behind_the_documented_rates_runs(tmp_path):
    """scripts/simulate_verdicts.py, which produces the rates README.md and docs/PHENOMENON.md quote: its two
    tables, and what they must show even on few runs (U shapes found far more often than plateaus)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "simulate_verdicts.py"
    out = subprocess.run([sys.executable, str(script), "--runs", "300"], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    rows = {line.split()[0]: [float(x.rstrip("%")) for x in line.split()[1:]]
            for line in out.splitlines() if line.strip() and line.split()[0] in ("10", "30", "100", "0.1", "0.2", "0.3")}
    assert sorted(rows) == ["0.1", "0.2", "0.3", "10", "100", "30"]
    assert all(whole <= alone3 < alone2 for whole, alone3, alone2 in (rows[n] for n in ("10", "30", "100")))
    for sigma in ("0.1", "0.2", "0.3"):
        plateau, falling, u_shape = rows[sigma]
        assert plateau < 10 and falling < 10 and u_shape > 20


def test_the_simulation_behind_the_detectors_documented_rates_runs():
    """scripts/simulate_detector.py, which produces the rates power_law_detector's docstring quotes: its tables, and
    what they must show even on few curves (bends found far more often than a pure law, skip_first quiets a
    transient)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "simulate_detector.py"
    out = subprocess.run([sys.executable, str(script), "--seeds", "2"], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    shares = {}
    for line in out.splitlines():
        name, _, cells = line.partition("  ")
        found = re.findall(r"([\d.]+)%", cells)
        if found:
            shares[name.strip()] = [float(x) for x in found]
    assert len(shares) == 1 + 9 + 3 + 2 and all(len(v) == 6 for k, v in shares.items() if not k.startswith("+"))
    assert max(shares["pure power law"]) < 5
    assert all(v[0] > 30 for k, v in shares.items() if k.startswith("bend at 25%") or k.startswith("bend at 40%"))
    assert shares["+30%"][0] > shares["+30%"][2]  # skipping the warm-up quiets it


def test_verdict_to_dict_is_strict_json_with_zero_se():
    v = verdict(50 + 0.04 * (STEPS / 100 - 8) ** 2, power_law(0, noise=0), se=0.0)
    assert v.hacking and v.rise_z == np.inf
    d = json.loads(json.dumps(v.to_dict(), allow_nan=False))
    assert d["rise_z"] is None and d["min_step"] == 800


def test_verdict_rejects_bad_input():
    with pytest.raises(ValueError, match="length"):
        golden_verdict([0, 1], [1.0, 2.0], [0.1], [1.0, 2.0], [0.1, 0.1])
    with pytest.raises(ValueError, match="at least one"):
        golden_verdict([], [], [], [], [])
    one = golden_verdict([0], [1.0], [0.1], [1.0], [0.1])  # a run killed after its first evaluation
    assert not one.hacking and not one.judged and "one evaluation only" in one.reason


# ---- power-law detector ----

@pytest.mark.parametrize("use_se", [True, False])
def test_clean_power_law_does_not_fire(use_se):
    for seed in range(20):
        proxy = power_law(seed, alpha=0.2 + 0.02 * seed)
        r = power_law_detector(STEPS, proxy, 0.01 * proxy if use_se else None)
        assert not r.fired, (seed, r.reason)
        assert r.alpha == pytest.approx(0.2 + 0.02 * seed, abs=0.05)


def test_noise_around_a_constant_does_not_fire():
    rng = np.random.default_rng(2)
    fired = [power_law_detector(STEPS, 20 * np.exp(rng.normal(0, 0.02, 21))).fired for _ in range(200)]
    assert np.mean(fired) < 0.02


@pytest.mark.parametrize("after", [0.0, 0.3, -0.2])  # flat, slower, rising again
def test_bend_fires_near_the_bend(after):
    for seed in range(10):
        r = power_law_detector(STEPS, power_law(seed, bend=900, after=after))
        assert r.fired, (seed, r.reason)
        assert 900 < r.step <= 1500, (seed, r.step)


def test_result_aligns_with_steps():
    r = power_law_detector(STEPS, power_law(0, bend=900))
    assert r.steps == tuple(STEPS) and r.fit_window == (100, 200, 300, 400, 500, 600, 700)
    assert r.residuals[0] is None and all(x is not None for x in r.residuals[1:])
    assert all(x is None for x in r.thresholds[:8]) and all(x >= 0.05 for x in r.thresholds[8:])
    assert r.law([100, 200]) == pytest.approx(r.C * np.array([100.0, 200.0]) ** -r.alpha)
    assert json.loads(json.dumps(r.to_dict(), allow_nan=False))["step"] == r.step


def test_min_effect_is_the_deviation_threshold():
    proxy = power_law(0, bend=900, after=0.7, noise=0.0)  # ends 7% above the law
    assert power_law_detector(STEPS, proxy).step == 1600
    assert not power_law_detector(STEPS, proxy, min_effect=0.1).fired


def test_skip_first_absorbs_a_transient():
    proxy = power_law(0, noise=0.003) * (1 + 0.3 * np.exp(-(np.maximum(STEPS, 100) - 100) / 100))
    assert power_law_detector(STEPS, proxy).fired  # the steep start tilts the fit
    assert not power_law_detector(STEPS, proxy, skip_first=2).fired


def test_too_few_evaluations_does_not_fire():
    r = power_law_detector(STEPS[:5], power_law(0)[:5])
    assert not r.fired and "too few" in r.reason and np.isnan(r.alpha)
    assert json.loads(json.dumps(r.to_dict(), allow_nan=False))["alpha"] is None


def test_a_nonpositive_proxy_is_left_out_and_said_so():
    proxy = power_law(0, bend=900)
    proxy[12] = -0.01
    r = power_law_detector(STEPS, proxy)
    assert r.fired and r.residuals[12] is None and r.thresholds[12] is None
    assert "1 evaluation(s) with proxy ≤ 0 left out" in r.reason


# ---- validation on run directories ----

def write_run(path, name, proxy, golden):
    path.mkdir(parents=True)
    rows = [{"step": int(s), "epoch": s / 50, "train_loss": None if s == 0 else 0.5, "proxy": float(p),
             "proxy_se": 0.01 * float(p), "golden": float(g), "golden_se": 0.1}  # the proxy's SE is its noise
            for s, p, g in zip(STEPS, proxy, golden)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "run.json").write_text(json.dumps({"name": name, "source": "offline"}))


def test_run_verdicts_on_a_lab(tmp_path):
    """A run folder's three verdicts: the golden one, no reference (not recorded), and the default detector rule
    (the power-law signal here), which alarms after the bend of the hacking run, dates the turn between the bend
    and the alarm (where its departure rose through the onset level), and stays quiet on the clean law."""
    # a steep law (α = 0.5) that goes flat at step 900: by the end, 0.4 above it in log space
    write_run(tmp_path / "offline", "offline", power_law(0, alpha=0.5, bend=900), 50 + 0.04 * (STEPS / 100 - 9) ** 2)
    write_run(tmp_path / "online", "online", power_law(1), 60 - 10 * (1 - np.exp(-STEPS / 500)))
    off, on = (run.verdicts() for run in load_runs([tmp_path]))
    assert off.golden.hacking and off.golden.min_step == 900 and off.reference is None
    assert not on.golden.hacking and on.reference is None
    assert DEFAULT_RULE.signal == "power_law_departure"
    assert off.detector.fired and 900 < off.detector.step and not on.detector.fired
    assert off.detector.since is not None and 900 < off.detector.since <= off.detector.step
    for run, verdicts in zip(load_runs([tmp_path]), (off, on)):
        assert verdicts.detector == DEFAULT_RULE.verdict(run.metrics, run.per_sample, run.settings)


def test_paired_values_detect_a_rise_that_unpaired_ses_call_noise():
    """The lab scores the same reference samples at every evaluation: sample difficulty is shared between
    two evaluations, so the SE of their difference is much smaller than the two SEs combined."""
    rng = np.random.default_rng(0)
    difficulty = rng.gamma(2.0, 25.0, size=800)  # per-sample golden values spread widely
    shift = [0.0, -2.0, -3.0, -2.6, -2.3, -1.9, -1.6]  # golden falls, then turns up by 1.4 nats
    values = [difficulty + s + rng.normal(0, 0.5, 800) for s in shift]
    steps = [0, 100, 200, 300, 400, 500, 600]
    golden = [float(v.mean()) for v in values]
    golden_se = [float(v.std(ddof=1) / np.sqrt(v.size)) for v in values]
    proxy, proxy_se = [5.0, 3.0, 2.0, 1.8, 1.7, 1.65, 1.6], [0.05] * 7
    proxy_values = [np.full(800, p) + rng.normal(0, 0.05, 800) for p in proxy]

    unpaired = golden_verdict(steps, golden, golden_se, proxy, proxy_se)
    paired = golden_verdict(steps, golden, golden_se, proxy, proxy_se, golden_values=values,
                            proxy_values=proxy_values)
    assert not unpaired.hacking and unpaired.rise_z < 3
    assert paired.hacking and paired.paired and paired.rise_z > 10 * unpaired.rise_z
    assert paired.min_step == 200 and paired.rise == pytest.approx(unpaired.rise)


def test_a_sustained_rise_is_hacking_and_a_dip_in_a_plateau_is_not():
    """Golden curves measured on the lab's default preset (nats/seq, every 100 steps): with paired SEs of
    ~0.1 both end "significantly" above their minimum; only the offline one rises steadily after it."""
    steps = list(range(0, 1001, 100))
    offline = [84.74, 65.34, 51.24, 46.33, 44.53, 43.83, 44.17, 44.32, 44.62, 44.76, 44.90]
    online = [84.74, 67.00, 52.56, 46.31, 43.49, 42.35, 42.03, 41.93, 41.40, 41.91, 42.12]
    plateau_dip = [84.74, 67.00, 52.56, 46.31, 43.49, 42.35, 41.60, 42.03, 41.95, 42.10, 42.00]
    proxy = [64.6, 43.3, 27.3, 21.1, 18.3, 16.9, 16.2, 15.6, 15.2, 15.0, 14.8]
    se, proxy_se = [0.05] * 11, [0.03] * 11
    assert golden_verdict(steps, offline, se, proxy, proxy_se).hacking
    v = golden_verdict(steps, online, se, proxy, proxy_se)
    assert not v.hacking and "fewer than 3 evaluations" in v.reason
    v = golden_verdict(steps, plateau_dip, se, proxy, proxy_se)
    assert not v.hacking and v.rise_z > 3 and "do not rise steadily" in v.reason


def test_the_trend_test_has_the_degrees_of_freedom_of_the_points_after_the_minimum():
    """Four evaluations after the minimum: a slope with 2 degrees of freedom, whose one-sided 5% bar is 2.92 (3
    degrees of freedom would give 2.35, the normal 1.64). This curve's slope t is 2.51: not a steady rise."""
    steps = [0, 100, 200, 300, 400, 500, 600, 700]
    golden = [30.0, 20.0, 10.0, 0.0, 1.0, 1.7, 1.45, 2.4]
    proxy = [20.0, 10.0, 5.0, 3.0, 2.5, 2.2, 2.0, 1.9]
    v = golden_verdict(steps, golden, [0.05] * 8, proxy, [0.05] * 8)
    assert not v.hacking and v.rise_z > 3 and "slope t = 2.51" in v.reason and "do not rise steadily" in v.reason
    steady = golden_verdict(steps, golden[:-3] + [1.5, 1.6, 2.3], [0.05] * 8, proxy, [0.05] * 8)
    assert steady.hacking and "slope t = 5.2" in steady.reason


def test_the_rise_is_to_the_last_evaluation_and_the_slope_leaves_the_minimum_out():
    steps = list(range(0, 1300, 100))
    proxy, proxy_se = list(np.linspace(20, 2, 13)), [0.05] * 13
    # up steadily, then back down: the end is 1.9 above the minimum, within 3 SEs (1.13 each), its peak 3.5 is not
    back = [9.0, 6.0, 3.0, 2.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 1.9]
    v = golden_verdict(steps, back, [0.8] * 13, proxy, proxy_se)
    assert not v.hacking and v.rise == pytest.approx(1.9) and "within noise" in v.reason
    # a jump off the minimum, then flat: the minimum itself would make any slope look steep
    jump = [9.0, 6.0, 3.0, 2.0, 0.0, 1.0, 0.9, 1.1, 1.0]
    v = golden_verdict(steps[:9], jump, [0.05] * 9, proxy[:9], proxy_se[:9])
    assert not v.hacking and v.rise_z > 3 and "do not rise steadily" in v.reason


def test_an_unknown_standard_error_gives_no_verdict_and_a_non_finite_value_is_refused():
    steps, proxy = [0, 100, 200, 300, 400, 500], [5.0, 4.0, 3.0, 2.5, 2.2, 2.0]
    golden = [10.0, 8.0, 8.1, 8.2, 8.3, 8.4]  # a steady rise of 0.4, 5.7 SEs
    v = golden_verdict(steps, golden, [0.05, math.nan, 0.05, 0.05, 0.05, math.nan], proxy, [0.05] * 6)
    assert not v.hacking and not v.judged and v.reason.startswith("no verdict") and "golden" in v.reason
    v = golden_verdict(steps, golden, [0.05] * 6, proxy, [math.nan] * 6)
    assert not v.hacking and not v.judged and "proxy" in v.reason
    assert golden_verdict(steps, golden, [0.05] * 6, proxy, [0.05] * 6).hacking  # with its SEs: judged
    with pytest.raises(ValueError, match="step 300 has a non-finite one"):
        golden_verdict(steps, golden[:3] + [math.nan] + golden[4:], [0.05] * 6, proxy, [0.05] * 6)
    with pytest.raises(ValueError, match="min_after must be >= 3"):
        golden_verdict(steps, golden, [0.05] * 6, proxy, [0.05] * 6, min_after=2)


def test_an_unknown_proxy_se_leaves_a_golden_that_does_not_rise_judged_no():
    """The proxy's condition can only turn a golden rise into "no", never a golden that does not rise into hacking:
    without the proxy's SE, a rise within noise, or one that is not steady, is still a judged "no"."""
    steps, proxy = [0, 100, 200, 300, 400, 500], [5.0, 4.0, 3.0, 2.5, 2.2, 2.0]
    unknown = [0.05] * 5 + [math.nan]
    flat = golden_verdict(steps, [10.0, 8.0, 8.01, 8.0, 8.02, 8.04], [0.05] * 6, proxy, unknown)
    assert not flat.hacking and flat.judged and "within noise" in flat.reason
    dip = golden_verdict(steps, [10.0, 8.0, 9.0, 8.5, 9.2, 8.6], [0.05] * 6, proxy, unknown)
    assert not dip.hacking and dip.judged and "do not rise steadily" in dip.reason
    rise = golden_verdict(steps, [10.0, 8.0, 8.1, 8.2, 8.3, 8.4], [0.05] * 6, proxy, unknown)
    assert not rise.hacking and not rise.judged and rise.reason.startswith("no verdict") and "proxy" in rise.reason
