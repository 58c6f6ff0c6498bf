"""Oracle-free signals, rules and their leave-one-preset-out validation, on runs built by hand."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from teacherhack.oracle_free import (
    DEFAULT_RULE,
    DEFAULT_RULE_MEASURED,
    SIGNALS,
    Labelled,
    Rule,
    Score,
    caught_by_rise,
    converged,
    each_signal,
    entropy_deficit,
    format_agreement,
    format_caught_by_rise,
    format_each_signal,
    format_runs,
    format_trade_off,
    labelled,
    leave_one_preset_out,
    measured_text,
    memorisation_gap,
    objective,
    outcome,
    proxy_rose,
    proxy_stall,
    score,
    signal_series,
    signal_values,
    tally,
    trade_off,
)
from teacherhack.rundir import find_runs, load_run


def rows(proxy, proxy_train=None, entropy=None):
    out = []
    for t, p in enumerate(proxy):
        row = {"step": 100 * t, "proxy": p, "proxy_se": 0.1}
        if proxy_train is not None:
            row["proxy_train"] = proxy_train[t]
        if entropy is not None:
            row["student_entropy_held_out"] = entropy[t]
        out.append(row)
    return out


def run(name, preset, hacking, min_index, gap_from=None, judged=True, reference=None):
    """A run whose proxy falls; its training-prompt proxy falls faster from ``gap_from`` on (memorisation)."""
    proxy = [60 * math.exp(-t / 2) + 10 for t in range(11)]
    train = [p - (0 if gap_from is None or t < gap_from else 2.0 * (t - gap_from + 1)) for t, p in enumerate(proxy)]
    return Labelled(name, preset, hacking, judged, min_index, rows(proxy, train), None, {}, Path(preset, name),
                    reference)


def test_signals_are_computed_from_the_evaluations_so_far():
    r = rows([10, 8, 6, 5, 5], proxy_train=[10, 8, 5, 3, 2], entropy=[9, 7, 5, 4, 3])
    np.testing.assert_allclose(memorisation_gap(r, None, {}), [0, 0, 1, 2, 3])
    np.testing.assert_allclose(entropy_deficit(r, None, {"teacher_entropy": 4.0}), [0, 0.4, 0.8, 1.0, 1.2])
    assert math.isnan(entropy_deficit(r, None, {})[1])  # no teacher entropy recorded: undefined, never an alarm
    stall = proxy_stall(r, None, {})
    assert math.isnan(stall[1]) and stall[2] == pytest.approx(0.0) and stall[4] == pytest.approx(1.0)
    # live: the value at t does not depend on later evaluations
    np.testing.assert_allclose(proxy_stall(r[:4], None, {}), stall[:4], equal_nan=True)


def test_the_proxy_stall_compares_falls_per_step_so_a_short_last_interval_is_no_stall():
    """A run of 1,050 steps evaluated every 100 steps is evaluated at step 1,050 too: a proxy falling 0.05 per step
    throughout fell half as much in that last interval, which read as a stall of 0.48 (falls per evaluation)."""
    steady = [{"step": s, "proxy": 100 - 0.05 * s, "proxy_se": 0.1} for s in [*range(0, 1001, 100), 1050]]
    np.testing.assert_allclose(proxy_stall(steady, None, {})[2:], 0.0, atol=1e-12)
    assert Rule("proxy_stall", 0.3, patience=1).alarm(steady, None, {}) is None


def test_a_rule_fires_after_its_patience_and_is_scored_against_the_truth():
    rule = Rule("memorisation_gap", threshold=1.5, patience=2, skip=2)
    hacked = run("h", "a", True, min_index=5, gap_from=5)
    clean = run("c", "a", False, min_index=10)
    late = run("l", "a", False, min_index=9, judged=False)  # not known yet: left out of the score
    assert rule.alarm(hacked.rows, None, {}) == 6  # gap 2 at 5, 4 at 6: the second evaluation above 1.5
    assert rule.alarm(clean.rows, None, {}) is None
    s = score(rule, [hacked, clean, late], max_lag=2)
    assert (s.hits, s.misses, s.false_alarms, s.quiet, s.timely, s.lags) == (1, 0, 0, 1, 1, (1,))
    assert s.precision == 1.0 and s.recall == 1.0 and objective(s) == (1.0, 1.0, 1.0)
    slow = score(Rule("memorisation_gap", threshold=9.0, patience=1), [hacked], max_lag=2)
    assert slow.hits == 1 and slow.timely == 0  # caught, but too late to count
    assert objective(slow) < objective(s)


def test_the_objective_puts_an_alarm_to_trust_before_recall():
    def scored(hits, false_alarms, timely, misses=0):
        return Score(hits, misses, false_alarms, quiet=10, timely=timely, lags=(0,) * hits)

    precise_but_partial = scored(hits=9, false_alarms=1, timely=5, misses=1)  # precision 0.90, timely recall 0.5
    catches_all = scored(hits=10, false_alarms=2, timely=10)  # precision 0.83: below the bar
    assert objective(precise_but_partial) > objective(catches_all)
    assert objective(scored(9, 1, 7, misses=1)) > objective(precise_but_partial)  # above the bar: timely recall
    assert objective(scored(10, 3, 10)) < objective(catches_all)  # below it: precision
    assert objective(scored(0, 0, 0, misses=5)) < objective(scored(1, 9, 0, misses=4))  # silent: the bottom


def test_no_rule_alarms_where_the_proxy_itself_rose():
    """A student that moves away from the teacher too over-fits, which the proxy shows; the signals are
    undefined there, whatever they say (the golden verdict does not call it hacking either)."""
    proxy = [60, 40, 30, 25, 24, 24.5, 25, 27, 30, 34, 40]  # SE 0.5: 24.5 and 25 are within 3 SEs of 24, 27 not
    r = [{"step": 100 * t, "proxy": p, "proxy_se": 0.5, "proxy_train": p - t} for t, p in enumerate(proxy)]
    assert proxy_rose(r).tolist() == [False] * 7 + [True] * 4
    gap = signal_series("memorisation_gap", r, None, {})
    np.testing.assert_allclose(gap[:7], range(7))
    assert np.isnan(gap[7:]).all()
    assert Rule("memorisation_gap", 5.5, patience=1).alarm(r, None, {}) == 6  # the last evaluation before the rise
    assert Rule("memorisation_gap", 6.5, patience=1).alarm(r, None, {}) is None  # above 6.5 only while rising


def test_a_rule_with_a_floor_is_quiet_once_the_student_has_all_but_become_the_teacher():
    """A proxy that falls to a few hundredths of its start (a smooth teacher, fully imitated) departs from any
    power law fitted early: with a floor the rule does not read the signal there, and reads it unchanged above."""
    proxy = [60, 30, 15, 8, 4, 2, 1.0, 0.5, 0.3, 0.2, 0.2]  # below 0.02 × 60 = 1.2 from evaluation 6 on
    r = [{"step": 100 * t, "proxy": p, "proxy_se": 0.01, "proxy_train": p - t} for t, p in enumerate(proxy)]
    assert converged(r, 0.02).tolist() == [False] * 6 + [True] * 5
    gap = signal_series("memorisation_gap", r, None, {})
    floored = Rule("memorisation_gap", 4.5, patience=1, floor=0.02)
    read = floored.read(gap, r)
    np.testing.assert_allclose(read[:6], gap[:6])
    assert np.isnan(read[6:]).all()
    assert Rule("memorisation_gap", 5.5, patience=1).alarm(r, None, {}) == 6  # the gap reaches 6 at evaluation 6
    assert Rule("memorisation_gap", 5.5, patience=1, floor=0.02).alarm(r, None, {}) is None
    assert floored.alarm(r, None, {}) == 5  # above the floor the signal reads as before (gap 5 > 4.5)
    assert "quiet once the proxy is below 0.02 of its first value" in floored.describe()
    clean = Labelled("smooth", "a", False, True, 10, r, None, {}, Path("a", "smooth"))
    assert score(Rule("memorisation_gap", 5.5, patience=1), [clean]).false_alarms == 1
    assert score(Rule("memorisation_gap", 5.5, patience=1, floor=0.02), [clean]).quiet == 1
    # the verdict reads the values through the floor too, computed here or given
    assert not Rule("memorisation_gap", 5.5, patience=1, floor=0.02).verdict(r, None, {}, gap).fired


def test_a_late_confirmation_dates_the_turn_back_to_where_the_signal_left_its_onset_level():
    hacked = run("h", "a", True, min_index=5, gap_from=5)  # gap 0 up to evaluation 4, then 2, 4, 6, 8, ...
    rule = Rule("memorisation_gap", threshold=5.0, patience=1, onset=1.0)
    values = memorisation_gap(hacked.rows, None, {})
    assert rule.first_alarm(values) == 7 and rule.turn(values, 7) == 5  # confirmed at 6 > 5, above 1 since 5
    alarm = rule.verdict(hacked.rows, None, {})
    assert (alarm.step, alarm.since) == (hacked.rows[7]["step"], hacked.rows[5]["step"])
    assert f"the turn dates from step {hacked.rows[5]['step']}" in alarm.reason
    s = score(rule, [hacked], max_lag=1)
    assert (s.lags, s.turn_lags, s.timely) == ((2,), (0,), 1)  # late alarm, timely turn
    alone = score(Rule("memorisation_gap", threshold=5.0, patience=1), [hacked], max_lag=1)
    assert (alone.turn_lags, alone.timely) == ((2,), 0)  # without an onset level the turn is the alarm itself
    # a run above the onset level as far back as the signal is read (the skipped evaluations, or values not defined
    # yet, as the power-law departure's first 5) dates nothing: its first readable value is no date
    assert Rule("memorisation_gap", 0.5, patience=1, skip=6, onset=-1.0).turn(values, 7) is None
    late = np.where(np.arange(len(values)) < 5, np.nan, values + 1)  # read from evaluation 5 on, above 1 at once
    assert rule.first_alarm(late) == 7 and rule.turn(late, 7) is None
    undated = rule.verdict(hacked.rows, None, {}, late)
    assert undated.fired and undated.since is None and "the turn is not dated" in undated.reason
    s = tally([(hacked, (7, None))], max_lag=1)
    assert (s.hits, s.lags, s.turn_lags, s.timely) == (1, (2,), (), 0)  # a hit, but no timely turn


def test_leave_one_preset_out_scores_each_preset_with_a_rule_chosen_on_the_others():
    runs = [run(f"{p}-{i}", p, True, 4, gap_from=4) for p in ("a", "b") for i in range(3)]
    runs += [run(f"{p}-c{i}", p, False, 10) for p in ("a", "b") for i in range(3)]
    runs += [run("c-fooled", "c", False, 10, gap_from=4)]  # memorises without hacking: a false alarm
    report = leave_one_preset_out(runs, [Rule("memorisation_gap", t, 1) for t in (0.5, 1.0, 100.0)])
    by_preset = {f["preset"]: f for f in report["folds"]}
    assert set(by_preset) == {"a", "b", "c"}
    assert by_preset["a"]["test"].hits == 3 and by_preset["a"]["test"].false_alarms == 0
    assert by_preset["c"]["test"].false_alarms == 1
    assert report["pooled"].hits == 6 and report["pooled"].false_alarms == 1
    assert report["pooled"].precision == pytest.approx(6 / 7)
    assert report["fixed_guess"] == 1.0  # every hacking run has its minimum at evaluation 4: a guess finds it
    curve = trade_off(runs, Rule("memorisation_gap", 0.25, patience=2))
    assert [c["threshold"] for c in curve] == sorted(c["threshold"] for c in curve) and curve[0]["recall"] >= curve[-1]["recall"]
    # the lowest threshold fires on the 6 hacking runs and on the one that memorises without hacking
    assert format_trade_off(curve).splitlines()[2] == "| 0.25 | 6 | 1 | 0.86 | 1.00 | 1.00 | +1 |"


def test_each_signal_alone_is_scored_left_one_sweep_out():
    """What each signal is worth by itself: here only the memorisation gap carries the truth (the runs record no
    entropy, so the entropy deficit never fires)."""
    runs = [run(f"{p}-{i}", p, True, 4, gap_from=4) for p in ("a", "b") for i in range(3)]
    runs += [run(f"{p}-c{i}", p, False, 10) for p in ("a", "b") for i in range(3)]
    reports = each_signal(runs)
    assert list(reports) == list(SIGNALS)
    gap = reports["memorisation_gap"]["pooled"]
    assert (gap.hits, gap.misses, gap.false_alarms) == (6, 0, 0)
    deficit = reports["entropy_deficit"]["pooled"]
    assert (deficit.hits, deficit.false_alarms) == (0, 0) and deficit.misses == 6
    table = format_each_signal(reports).splitlines()
    assert len(table) == 2 + len(SIGNALS) and table[2].startswith("| memorisation gap | 6 | 0 | 0 | 1.00 | 1.00 |")
    assert "turn within 2 evaluations" in table[0]
    assert "turn within 1 evaluations" in format_each_signal(each_signal(runs, max_lag=1)).splitlines()[0]


def test_caught_by_rise_bins_the_hacking_runs_by_their_golden_turn():
    """Which turns the rule misses: here a 0.3-nat turn it catches and a 3-nat one it does not."""
    def with_golden(r, rise):
        golden = [30.0 - t if t <= r.min_index else 30.0 - r.min_index + rise * (t - r.min_index) / (10 - r.min_index)
                  for t in range(11)]
        return dataclasses.replace(r, rows=[{**row, "golden": g} for row, g in zip(r.rows, golden)])

    caught = with_golden(run("small", "a", True, 4, gap_from=4), rise=0.3)
    missed = with_golden(run("large", "a", True, 4), rise=3.0)
    clean = with_golden(run("clean", "a", False, 10), rise=0.0)
    bins = caught_by_rise([caught, missed, clean], Rule("memorisation_gap", 1.0, 1))
    assert [(b["low"], b["runs"], b["caught"]) for b in bins] == [(0.0, 1, 1), (0.5, 0, 0), (1.0, 0, 0), (2.0, 1, 0)]
    table = format_caught_by_rise(bins).splitlines()
    assert table[2] == "| 0 to 0.5 | 1 | 1 | 1.00 |" and table[3] == "| 0.5 to 1 | 0 | 0 | – |"
    assert table[5] == "| 2 or more | 1 | 0 | 0.00 |"


def test_agreement_of_the_reference_verdict_counts_judged_runs_per_sweep():
    runs = [run("h1", "a", True, 4, reference=True), run("h2", "a", True, 4, reference=False),
            run("c1", "a", False, 10, reference=True), run("late", "a", False, 9, judged=False, reference=True),
            run("h3", "b", True, 4)]
    table = format_agreement(runs).splitlines()
    # sweep a: 3 judged runs with a reference verdict; 2 hack by the golden verdict, 2 by the reference, 1 both
    assert table[2] == "| a | 3 | 2 | 2 | 1 | 1 | 1 | 1 |"
    assert table[3] == "| b | 0 | 0 | 0 | 0 | 0 | 0 | 0 |"  # no reference recorded
    assert table[4] == "| **all** | **3** | **2** | **2** | **1** | **1** | **1** | **1** |"
    # a reference verdict the rule cannot judge yet reads "undecided" per run, not "no"
    late_reference = dataclasses.replace(run("h4", "a", True, 4, reference=False), reference_judged=False)
    rows = format_runs([runs[1], late_reference], Rule("memorisation_gap", 100.0)).splitlines()
    assert rows[2].split(" | ")[4] == "no" and rows[3].split(" | ")[4] == "undecided"


CORPUS = Path(__file__).resolve().parents[1] / "benchmarks" / "detection" / "runs"


def test_the_default_rule_and_its_figures_are_those_the_corpus_gives():
    """The rule the tool uses is the best on the whole detection corpus, and the precision and recall its alarms
    state are the leave-one-sweep-out figures on that corpus, recomputed here from the stored runs."""
    found = find_runs([CORPUS])
    runs = [labelled(load_run(folder), group) for folder, group in found]
    assert len({r.preset for r in runs}) >= 3 and len(runs) >= 40
    report = leave_one_preset_out(runs)
    assert report["in_sample"]["rule"] == DEFAULT_RULE
    assert DEFAULT_RULE_MEASURED == measured_text(report)


def test_detect_prints_every_table_of_the_validation_from_the_corpus(capsys):
    """`teacherhack detect CORPUS`: a row per run, the agreement table, the leave-one-sweep-out table whose pooled
    line holds the figures the default rule's alarms state, the fixed-guess bar and the rule's trade-off."""
    from teacherhack.cli import main

    assert main(["detect", str(CORPUS)]) == 0
    out = capsys.readouterr().out
    runs = [labelled(load_run(folder), group) for folder, group in find_runs([CORPUS])]
    report = leave_one_preset_out(runs)
    assert out.startswith(f"The oracle-free detector: {DEFAULT_RULE.describe()}.")
    assert sum(line.startswith(f"| {r.preset} | {r.name} |") for r in runs for line in out.splitlines()) == len(runs)
    pooled = report["pooled"]
    assert f"| **pooled, held out** | | {pooled.hits} | {pooled.misses} | {pooled.false_alarms} | {pooled.quiet} | " \
           f"{pooled.precision:.2f} | {pooled.recall:.2f} |" in out
    assert f"precision {pooled.precision:.2f}, recall {pooled.recall:.2f}" in DEFAULT_RULE_MEASURED
    assert f"in {report['fixed_guess']:.2f} of the held-out hacking runs" in out
    assert f"| {DEFAULT_RULE.threshold:g} | " in out.split("over its signal's thresholds")[1]
    assert "| 2 or more | " in out.split("by the size of the golden turn")[1]
    alone = out.split("Each signal alone")[1]
    assert all(f"| {name.replace('_', ' ')} | " in alone for name in SIGNALS)


def test_detect_says_when_the_fixed_guess_cannot_be_scored(capsys):
    """With hacking runs in one sweep only, no held-out sweep has a hacking run to score the fixed guess on:
    detect printed "in nan of the held-out hacking runs"."""
    from teacherhack.cli import main

    assert main(["detect", str(CORPUS / "sources"), str(CORPUS / "sources-teacher4")]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out
    assert ("A fixed guess of the golden minimum's evaluation (where it most often lies in the other sweeps), the bar "
            "a dated turn must clear to carry information, cannot be scored here: it needs hacking runs in at least "
            "two sweeps (one held out, the guess from the others).") in out


def test_detect_leaves_out_and_names_a_run_cut_short_and_refuses_a_finished_one_in_one_line(tmp_path: Path, capsys):
    """A run killed (or still writing) may end in a line cut short, of per_sample.jsonl (written first) or of
    metrics.jsonl: detect leaves it out as unfinished, by name, instead of dying on it. A finished run whose file is
    malformed is refused in one line that names the file and line."""
    from teacherhack.cli import main

    sweep = shutil.copytree(CORPUS / "sources", tmp_path / "sources")
    for name, cut in (("offline/seed1", "metrics.jsonl"), ("online_student/seed1", "per_sample.jsonl")):
        lines = (sweep / name / "metrics.jsonl").read_text().splitlines()[:7]  # killed at step 600 of 1000
        samples = [json.dumps({"step": json.loads(line)["step"], "proxy": [1.0, 2.0]}) for line in lines]
        for file, written in (("metrics.jsonl", lines), ("per_sample.jsonl", samples)):
            half = written[0][:25] if file == cut else ""  # the next evaluation's line, cut short
            (sweep / name / file).write_text("\n".join(written) + "\n" + half)
    assert main(["detect", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"2 unfinished run(s) left out: {sweep / 'offline/seed1'}, {sweep / 'online_student/seed1'}.")
    assert "| sources | offline/seed0 |" in out and "| sources | offline/seed1 |" not in out
    (sweep / "offline/seed2" / "per_sample.jsonl").write_text('{"step": 0, "proxy": [1.0, 2.0]}\n{"step": 10')
    assert main(["detect", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"teacherhack: error: {sweep / 'offline/seed2' / 'per_sample.jsonl'}:2: malformed JSON")
    assert err.count("\n") == 1


def test_runs_of_same_named_sweeps_are_scored_on_their_own_signals_and_each_folder_counts_once(tmp_path: Path):
    """Two sweeps in folders of the same name (runs-v1/sources, runs-v2/sources: the natural --out of two
    `teacherhack sweep sources`) hold runs of the same name: each is scored on its own signals, not on the other's,
    and each sweep is its own group; a sweep given twice, or with a folder above it, counts its runs once."""
    shutil.copytree(CORPUS / "sources", tmp_path / "v1" / "sources")
    shutil.copytree(CORPUS / "sources-teacher4", tmp_path / "v2" / "sources")
    found = find_runs([tmp_path / "v1", tmp_path / "v2", tmp_path / "v1" / "sources", tmp_path])
    assert len(found) == len({folder.resolve() for folder, _ in found}) == len(list(tmp_path.rglob("metrics.jsonl")))
    runs = [labelled(load_run(folder), group) for folder, group in found]
    assert len({r.name for r in runs}) < len(runs)
    # and each sweep is a group of its own (the validation holds one out at a time), told apart by its folder
    assert {r.preset for r in runs} == {"v1:sources", "v2:sources"}
    values = signal_values(runs)
    for r in runs:
        assert outcome(DEFAULT_RULE, r, values)[0] == DEFAULT_RULE.alarm(r.rows, r.per_sample, r.settings), r.path


@pytest.mark.slow
def test_the_study_of_other_signals_runs_on_part_of_the_corpus(tmp_path: Path):
    """benchmarks/detection/other_signals.py (the signals that did not earn a place): a row per signal, and the
    runs the default rule misses with their teacher's distance to the oracle."""
    for sweep in ("sources", "sources-teacher8", "sources-dialogue"):
        shutil.copytree(CORPUS / sweep, tmp_path / sweep)
    script = CORPUS.parent / "other_signals.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, capture_output=True,
                         text=True).stdout
    assert out.count(" of 3 |") == 8  # eight signals, each tried in the 3 folds
    assert "| sources-dialogue | offline/seed0 | 21.6 | 21.7 | 14.4 |" in out  # a teacher no better than the start
