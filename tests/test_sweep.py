"""Sweeps: preset expansion, one upstream per sweep, resumption after a kill, and the findings logic."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY
from teacherhack import cache as cache_module
from teacherhack import config as cfg
from teacherhack import lab, reports, sweeps
from teacherhack.record import write_reproduction
from teacherhack.cache import ArtifactCache
from teacherhack.stages import stage_specs, upstream_keys
from teacherhack.cli import main
from teacherhack.errors import UserError


def expand(preset: str, config: cfg.LabConfig, seeds: int) -> list[sweeps.Run]:
    return sweeps.expand(preset, config.distill.prompts or config.task.n_distill, config.task.n_distill, seeds)


def test_every_preset_expands_into_valid_distinct_runs(tiny_config: cfg.LabConfig):
    for preset in sweeps.SWEEPS:
        runs = expand(preset, tiny_config, seeds=2)
        assert len({r.name for r in runs}) == len(runs), preset
        for r in runs:
            config = cfg.apply_overrides(tiny_config, r.overrides)
            cfg.validate(config)
            assert len(config.distill.sources) == 1 and config.seed == r.seed


def test_default_seeds_are_at_least_one_and_three_for_sources():
    assert all(p.seeds >= 1 for p in sweeps.SWEEPS.values()) and sweeps.SWEEPS["sources"].seeds >= 3


def test_diversity_keeps_the_dataset_size_and_budget_keeps_the_prompts(tiny_config: cfg.LabConfig):
    sizes = set()
    for r in expand("diversity", tiny_config, seeds=1):
        c = cfg.apply_overrides(tiny_config, r.overrides)
        sizes.add(c.distill.prompts * c.distill.generations_per_prompt)
    assert len(sizes) <= 2 and max(sizes) - min(sizes) < 5  # 32 = 32×1 = 16×2 ≈ 6×5 (rounding)
    budget = [cfg.apply_overrides(tiny_config, r.overrides) for r in expand("budget", tiny_config, seeds=1)]
    assert len({c.distill.prompts for c in budget}) == 1
    assert [c.distill.generations_per_prompt for c in budget] == [1, 2, 4, 8]


def test_tasks_cap_oracle_budgets_and_share_kjv_rv_with_sources(tiny_config: cfg.LabConfig):
    base = cfg.apply_overrides(tiny_config, {"task.spec": "kjv-rv"})
    tasks = {r.name: cfg.apply_overrides(base, r.overrides) for r in expand("tasks", base, seeds=1)}
    sources = {r.name: cfg.apply_overrides(base, r.overrides) for r in expand("sources", base, seeds=1)}
    assert tasks["kjv-rv offline/seed0"] == sources["offline/seed0"]  # one upstream for both presets
    assert {c.task.n_oracle for name, c in tasks.items() if not name.startswith("kjv-rv")} == {12_500}


@pytest.mark.parametrize("preset, key, value", [
    ("sources", "seed", "7"), ("sources", "distill.sources", "offline"), ("losses", "distill.loss", "reverse_kl"),
    ("tasks", "task.spec", "wordnet"), ("factors", "teacher.epochs", "8")])
def test_a_set_of_what_the_sweep_sets_itself_is_refused(preset, key, value, tmp_path: Path, capsys):
    """Each run's own value would replace it, while sweep.json's base recorded the one given."""
    assert main(["sweep", preset, "--preset", "quick", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c"),
                 "--set", f"{key}={value}", "--set", "threads=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"error: --set {key}: the {preset} sweep sets it in its runs" in err and "leave it out" in err
    assert ("--seeds K" in err) == (key == "seed") and not (tmp_path / "out").exists()


def test_a_set_of_the_pool_the_sweep_derives_its_own_from_is_its_base():
    """budget distils on a quarter of the base pool: distill.prompts chooses that pool, no run replaces it."""
    sweeps.check_assignments("budget", ["distill.prompts", "teacher.epochs"], 400, 8000)
    assert {r.overrides["distill.prompts"] for r in sweeps.expand("budget", 400, 8000, 1)} == {100}
    with pytest.raises(UserError, match="--set seed, distill.generations_per_prompt: the budget sweep sets them"):
        sweeps.check_assignments("budget", ["seed", "distill.prompts", "distill.generations_per_prompt"], 400, 8000)


def test_unknown_preset_is_a_clear_error(tiny_config: cfg.LabConfig, tmp_path: Path):
    with pytest.raises(cfg.ConfigError, match="unknown sweep preset 'sauce'"):
        lab.run_sweep("sauce", tiny_config, tmp_path / "out", tmp_path / "cache", seeds=1)


def test_stretch_grows_stage_two_on_the_same_upstream(tiny_config: cfg.LabConfig):
    """--stretch multiplies the steps, the evaluation interval and the pool of distillation prompts; never the split
    they come from (task.n_distill), whose change would draw other splits and retrain the whole upstream."""
    pooled = cfg.apply_overrides(tiny_config, {"distill.prompts": 8})
    big = lab.stretched(pooled, 4)
    assert big.distill.steps == 4 * tiny_config.distill.steps and big.eval.every == 4 * tiny_config.eval.every
    assert big.distill.prompts == 32 and big.task == tiny_config.task
    assert tiny_config.distill.prompts is None  # the whole pool: a half stretch takes its first half
    half = lab.stretched(tiny_config, 0.5)
    assert half.distill.prompts == tiny_config.task.n_distill // 2 and half.task == tiny_config.task
    teacher = [stage_specs(config, "task-x")["teacher"]["key"] for config in (half, tiny_config)]
    assert teacher[0] == teacher[1]
    with pytest.raises(cfg.ConfigError, match=r"--stretch 2 multiplies .*a larger task\.n_distill, which draws other"):
        lab.stretched(tiny_config, 2)  # a pool beyond the whole one


def test_a_stretch_past_the_distillation_pool_names_the_stretch_and_the_values():
    base = cfg.resolve("default")
    factor = 2 * base.task.n_distill // base.distill.prompts
    with pytest.raises(cfg.ConfigError, match=rf"--stretch {factor} multiplies .* distill\.prompts \("
                                              rf"{base.distill.prompts} → {factor * base.distill.prompts}\).*"
                                              rf"task\.n_distill={base.task.n_distill}\].*smaller --stretch"):
        lab.stretched(base, factor)


@pytest.mark.slow
def test_sweep_shares_upstream_and_resumes_after_a_kill(tiny_config: cfg.LabConfig, tmp_path: Path, monkeypatch):
    built: list[str] = []
    original_get = cache_module.ArtifactCache.get

    def counting_get(self, stage, name, spec, build, **options):
        def recording_build(path):
            built.append(stage)
            build(path)
        return original_get(self, stage, name, spec, recording_build, **options)

    monkeypatch.setattr(cache_module.ArtifactCache, "get", counting_get)
    calls = {"n": 0}
    original_run = lab.distill_run

    def dies_on_second_run(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            time.sleep(1.0)  # a second of work, which the wall time must count though the run never finishes
            raise KeyboardInterrupt("simulated kill")
        return original_run(*args, **kwargs)

    monkeypatch.setattr(lab, "distill_run", dies_on_second_run)
    out, cache = tmp_path / "sweep", tmp_path / "cache"
    began = time.time()
    with pytest.raises(KeyboardInterrupt):
        lab.run_sweep("sources", tiny_config, out, cache, seeds=1)
    interrupted = time.time() - began
    assert sorted(p.parent.parent.name for p in (out / "runs").glob("*/seed0/student")) == ["offline"]
    first_wall = json.loads((out / "timing.json").read_text())["wall_seconds"]
    assert first_wall > interrupted - 0.5  # the interrupted invocation's time, to its end (not to its last run)

    monkeypatch.setattr(lab, "distill_run", original_run)
    summary = lab.run_sweep("sources", tiny_config, out, cache, seeds=1)
    assert summary["runs"] == 3 and calls["n"] == 2  # the finished run was not repeated
    assert summary["wall_seconds"] > first_wall > 0 and "CPU cores" in summary["machine"]
    for stage in ("oracle", "teacher", "student", "tokenizer", "references"):
        assert built.count(stage) == 1, (stage, built)
    assert {f["claim"] for f in summary["findings"]} >= {"Offline data → teacher hacking (golden turns up while the proxy does not)"}
    assert "| offline |" in (out / "findings.md").read_text()
    for name in ("offline/seed0", "online_teacher/seed0", "online_student/seed0"):
        assert json.loads((out / "runs" / name / "run.json").read_text())["name"] == name
        assert cfg.from_dict(__import__("yaml").safe_load((out / "runs" / name / "config.yaml").read_text())).seed == 0

    with pytest.raises(cfg.ConfigError, match="different sweep"):
        lab.run_sweep("sources", cfg.apply_overrides(tiny_config, {"distill.lr": 1e-4}), out, cache, seeds=1)

    # The reproduction record: command, machine, wall time, hand-written notes, figures and findings.
    docs = tmp_path / "docs"
    (docs / "reproduction" / "sweep").mkdir(parents=True)  # notes and figures go by the sweep's folder
    (docs / "reproduction" / "sweep" / "NOTES.md").write_text("Tried twice; see the issue.")
    (docs / "reproduction" / "NOTES.md").write_text("What this record holds.")
    write_reproduction([out], docs / "REPRODUCTION.md")
    record = (docs / "REPRODUCTION.md").read_text()
    command = next(line for line in record.splitlines() if line.startswith("Command: "))
    assert command.startswith("Command: `teacherhack sweep sources --seeds 1 --out sweep --preset quick --set ")
    settings = shlex.split(command.split("--preset quick", 1)[1].split("`", 1)[0])[1::2]
    assert cfg.apply_overrides(cfg.resolve("quick"), cfg.parse_assignments(settings)) == tiny_config  # rerunnable
    assert summary["machine"] in record and "Tried twice; see the issue." in record and "| offline | 1 |" in record
    assert record.index("What this record holds.") < record.index("## `sweep`")  # the record's own notes first
    assert f"| [`sweep`](#sweep) | 3 | 1 | {summary['wall_seconds'] / 60:.0f} min | " in record
    assert "![cost](reproduction/sweep/cost.png)" in record
    assert (docs / "reproduction" / "sweep" / "cost.png").read_bytes().startswith(b"\x89PNG")


def test_a_sweep_resumes_with_more_seeds_or_a_newer_schema_but_not_another_base(tiny_config: cfg.LabConfig):
    def plan(config: cfg.LabConfig, seeds: int) -> dict:
        runs = [dataclasses.asdict(r) for r in expand("sources", config, seeds)]
        return json.loads(json.dumps({"preset": "sources", "seeds": seeds, "base": config.to_dict(), "runs": runs}))

    def every_run(name: str) -> bool:
        return True

    saved = plan(tiny_config, 2)
    assert lab._mismatch(saved, plan(tiny_config, 3), every_run) is None
    dropped = lab._mismatch(saved, plan(tiny_config, 1), every_run)  # runs of the saved sweep would be dropped
    assert dropped is not None and "seed1" in dropped and "seed0" not in dropped
    # planned runs that never started pin nothing: a sweep extended to 3 seeds and stopped at once goes back to 2
    assert lab._mismatch(plan(tiny_config, 3), saved, lambda name: not name.endswith("seed2")) is None
    assert "seed2" in lab._mismatch(plan(tiny_config, 3), saved, lambda name: name == "offline/seed2")
    assert lab._mismatch(saved, plan(cfg.apply_overrides(tiny_config, {"distill.steps": 7}), 2), every_run) == (
        f"base settings differ: distill.steps: {tiny_config.distill.steps!r} → 7")
    assert lab._mismatch({**saved, "preset": "losses"}, plan(tiny_config, 2), every_run) == (
        "preset 'losses', not 'sources'")
    older = json.loads(json.dumps(saved))
    del older["base"]["pretrain"]  # written before the schema had this section; it now sits at its defaults
    assert lab._mismatch(older, plan(tiny_config, 2), every_run) is None
    older["base"]["retired_key"] = 1
    assert "retired_key" in lab._mismatch(older, plan(tiny_config, 2), every_run)


def _result(group: str, seed: int, golden_min: float, golden_final: float, proxy_final: float, hacking: bool,
            tokens: int = 0, judged: bool = True, unit: str = "nats/seq") -> dict:
    return {"name": f"{group}/seed{seed}", "group": group, "seed": seed, "golden_min": golden_min,
            "golden_final": golden_final, "proxy_final": proxy_final, "hacking": hacking,
            "data_tokens": float(tokens), "unit": unit,
            "verdict": {"judged": judged, "reason": "hacks" if hacking else "within noise"}}


def test_findings_sources_reproduced_and_not():
    good = [_result("offline", s, 50, 53, 1.0, True) for s in range(3)]
    good += [_result(g, s, 48, 48.1, 1.0, False) for g in ("online_teacher", "online_student") for s in range(3)]
    found = sweeps.findings_sources(good)
    assert [f["reproduced"] for f in found] == [True, True]
    assert "3/3 offline runs hack" in found[0]["evidence"]

    bad = [_result("offline", s, 50, 50.1, 1.0, s == 0) for s in range(3)]
    bad += [_result("online_teacher", s, 48, 49, 1.0, s == 1) for s in range(3)]
    found = sweeps.findings_sources(bad)
    assert [f["reproduced"] for f in found] == [False, False]

    # No online run flagged, but only because their minima came too late to judge, and their golden turns up
    # as much as offline: not "no hacking"
    late = good[:3] + [_result("online_student", s, 48, 51 + 0.1 * s, 1.0, False, judged=False) for s in range(3)]
    found = sweeps.findings_sources(late)
    assert [f["reproduced"] for f in found] == [True, False]
    assert "0/3 online runs hack (3 with the golden minimum too close to the end to judge)" in found[1]["evidence"]
    assert "not above every online one by 2 SE" in found[1]["evidence"]

    # One seed: no spread to test against, and the evidence says the order is by the mean alone
    single = [r for r in good if r["seed"] == 0]
    assert "(above every online one by its mean; one seed, no SE)" in sweeps.findings_sources(single)[1]["evidence"]

    # Every online run too close to the end to judge and no offline hacking to compare with: nothing tested the
    # claim (it read "yes"); an offline control that hacks tests it (by the rise), and so do judged runs
    calm = [_result("offline", 0, 50, 50.05, 1.0, False, judged=False)]
    calm += [_result(g, 0, 48, 48.05, 1.0, False, judged=False) for g in sweeps.ONLINE]
    online = sweeps.findings_sources(calm)[1]
    assert not online["reproduced"] and online["evidence"].endswith(
        "; not tested: online_teacher, online_student have runs too close to the end to judge, and no offline run "
        "hacks to compare their rise with")
    compared = good[:1] + [_result(g, 0, 48, 48.05, 1.0, False, judged=False) for g in sweeps.ONLINE]
    assert sweeps.findings_sources(compared)[1]["reproduced"]
    judged = calm[:1] + [_result(g, 0, 48, 48.05, 1.0, False) for g in sweeps.ONLINE]
    assert sweeps.findings_sources(judged)[1]["reproduced"]
    # One judged online group does not vouch for another whose runs could not be judged (it read "yes": the
    # undecided runs counted towards "0 online runs hack")
    calm[1] = _result("online_teacher", 0, 48, 48.05, 1.0, False)
    online = sweeps.findings_sources(calm)[1]
    assert not online["reproduced"] and online["evidence"].endswith(
        "; not tested: online_student has runs too close to the end to judge, and no offline run hacks to compare "
        "their rise with")
    # ...nor does one judged seed of the same group vouch for its undecided seed
    mixed = [_result("offline", s, 50, 50.05, 1.0, False) for s in range(2)]
    mixed += [_result(g, s, 48, 48.05, 1.0, False, judged=s == 0) for g in sweeps.ONLINE for s in range(2)]
    online = sweeps.findings_sources(mixed)[1]
    assert not online["reproduced"] and "0/4 online runs hack (2 with the golden minimum" in online["evidence"]


def test_findings_diversity_budget_mixture():
    diversity = [_result(g, s, 50, 50 + rise, 2.0 + 0.01 * s, rise > 1)
                 for g, rise in (("prompts=100 k=1", 0.5), ("prompts=50 k=2", 1.5), ("prompts=20 k=5", 3.0))
                 for s in range(2)]
    assert [f["reproduced"] for f in sweeps.findings_diversity(diversity)] == [True, True]
    reversed_rises = [_result(g, 0, 50, 50 + rise, 2.0 * (i + 1), False)
                      for i, (g, rise) in enumerate((("a", 3.0), ("b", 1.0), ("c", 0.5)))]
    assert [f["reproduced"] for f in sweeps.findings_diversity(reversed_rises)] == [False, False]
    # rises in order but within their spread over seeds; the proxy moves more than the golden metric does
    noisy = [_result(g, s, 50, 50 + rise + (-1) ** s, 2.0 + 3 * i, True)
             for i, (g, rise) in enumerate((("a", 1.0), ("b", 1.2), ("c", 1.4))) for s in range(2)]
    found = sweeps.findings_diversity(noisy)
    assert [f["reproduced"] for f in found] == [False, False]
    assert "a: +1.00 ± 1.00" in found[0]["evidence"] and "(range 6.00)" in found[1]["evidence"]

    budget = [_result(f"k={k}", 0, 50 - k, 50 - k + 4 / k, 10.0 / k, k < 4) for k in (1, 2, 4, 8)]
    found = sweeps.findings_budget(budget)
    assert [f["reproduced"] for f in found] == [True, True]
    assert "k=1: +4.00, k=2: +2.00" in found[1]["evidence"]  # one seed: means without a spread
    flat_proxy = [{**r, "proxy_final": 1.0} for r in budget]  # the paper: both metrics improve
    assert [f["reproduced"] for f in sweeps.findings_budget(flat_proxy)] == [False, True]

    mixture = [_result(f"lambda={lam}", 0, 50, 50 + 3 * (1 - lam), 1.0, lam < 0.5, tokens=int(1000 * lam))
               for lam in (0.0, 0.25, 0.5, 1.0)]
    assert [f["reproduced"] for f in sweeps.findings_mixture(mixture)] == [True, True]


def test_findings_tasks_are_judged_per_task():
    results = []
    for task, offline_hacks in (("kjv-rv", True), ("wordnet", False)):
        results += [_result(f"{task} offline", s, 50, 53 if offline_hacks else 50.1, 1.0, offline_hacks) for s in range(2)]
        results += [_result(f"{task} {src}", s, 48, 48.1, 1.0, False) for src in ("online_teacher", "online_student")
                    for s in range(2)]
    found = {f["claim"]: f["reproduced"] for f in sweeps.findings_tasks(results)}
    assert found["kjv-rv: Offline data → teacher hacking (golden turns up while the proxy does not)"] is True
    assert found["wordnet: Offline data → teacher hacking (golden turns up while the proxy does not)"] is False
    assert found["wordnet: Online data → no teacher hacking"] is True


def test_findings_factors_give_the_unit_and_the_reason():
    results = [_result("base", 0, 40, 41, 1.0, True), _result("per-token metrics", 0, 1.0, 1.0, 0.1, False,
                                                              unit="nats/token")]
    (found,) = sweeps.findings_factors(results)
    assert not found["reproduced"]
    assert found["evidence"] == "0/1 hack, rise +0.00 nats/token (base +1.00); not flagged: within noise"
    table = sweeps.format_findings("factors", {"runs": 2, "seeds": 1, "wall_seconds": 60, "findings": [found],
                                              "groups": sweeps.group_table(results)})
    assert "question (not a paper finding)" in table and "| per-token metrics (nats/token) | 1 |" in table
    assert "Metrics in the unit marked on each setting;" in table
    # a run too close to the end to judge is not flagged, but that is no "does not hack": the evidence says so
    late = [_result("base", 0, 40, 41, 1.0, True), _result("teacher less over-fitted", 0, 40, 40.02, 1.0, False,
                                                          judged=False)]
    (found,) = sweeps.findings_factors(late)
    assert not found["reproduced"] and found["evidence"].startswith(
        "0/1 hack (1 with the golden minimum too close to the end to judge), rise +0.02")


def test_findings_pretraining_say_which_runs_were_too_close_to_judge():
    results = [_result(f"{label} forward_kl online_teacher", s, 32, 32.1, 1.0, False, judged=label == "from scratch")
               for label in ("from scratch", "pretrained") for s in range(2)]
    (found,) = sweeps.findings_pretraining(results)
    assert not found["reproduced"]  # the count is unchanged: no run was flagged
    assert found["evidence"].startswith("pre-trained 0/2 (2 with the golden minimum too close to the end to judge), "
                                        "rise +0.10")
    assert "; from scratch 0/2, rise" in found["evidence"]


def test_the_record_refuses_an_unfinished_sweep(tmp_path: Path):
    (tmp_path / "sweep.json").write_text(json.dumps({"preset": "budget", "seeds": 3}))
    (tmp_path / "findings.json").write_text(json.dumps({"preset": "budget", "seeds": 1}))
    with pytest.raises(UserError, match="unfinished: planned 3 seeds, results for 1"):
        write_reproduction([tmp_path], tmp_path / "REPRODUCTION.md")


def test_the_record_of_a_lab_folder_or_a_killed_sweep_is_one_line(tmp_path: Path, capsys):
    """A lab folder (no sweep.json) and a sweep killed before its findings (no findings.json) raised a
    FileNotFoundError traceback; each is one line naming the folder and what to do, exit 2."""
    lab_dir, killed = tmp_path / "lab", tmp_path / "killed"
    lab_dir.mkdir()
    (lab_dir / "summary.json").write_text("{}")
    killed.mkdir()
    (killed / "sweep.json").write_text(json.dumps({"preset": "sources", "seeds": 2}))
    for folder, message in ((lab_dir, "is not a sweep folder (no sweep.json)"),
                            (killed, "is unfinished: planned 2 seeds, no findings.json yet; rerun its sweep command")):
        assert main(["reproduction", str(folder), "--out", str(tmp_path / "REPRODUCTION.md")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"teacherhack: error: {folder} {message}" in err, err
    assert not (tmp_path / "REPRODUCTION.md").exists()


def _recorded_sweep(folder: Path, **plan) -> Path:
    """A finished sweep folder as the record reads it: sweep.json (plus ``plan``), findings.json and findings.md."""
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"preset": "sources", "seeds": 2,
                                                   "base": cfg.resolve("default").to_dict(), **plan}))
    (folder / "findings.json").write_text(json.dumps({"preset": "sources", "seeds": 2, "runs": 6, "wall_seconds": 600,
                                                      "machine": "a test", "findings": [{"reproduced": True}]}))
    (folder / "findings.md").write_text("Findings.\n")
    return folder


def test_the_record_refuses_two_sweep_folders_of_one_name(tmp_path: Path, capsys):
    """a/sources and b/sources both had their figures copied to reproduction/sources/, the second's over the
    first's, under the first's section: the record has a section per folder name, so the second is refused."""
    first, second = (_recorded_sweep(tmp_path / side / "sources") for side in ("a", "b"))
    (first / "rise.png").write_bytes(b"a")
    record = tmp_path / "docs" / "REPRODUCTION.md"
    assert main(["reproduction", str(first), str(second), "--out", str(record)]) == 2
    err = capsys.readouterr().err
    assert err == (f"teacherhack: error: {first} and {second} are both named 'sources': the record has one section "
                   f"(and one folder of figures and notes) per sweep folder name; rename one of them\n")
    assert not record.parent.exists()


def test_the_record_command_gives_the_jobs_the_sweep_ran_with(tmp_path: Path):
    """Parallel runs train on a share of the threads, so a sweep run with --jobs gives other bits without it: the
    command names --jobs when sweep.json says more than one, and reads as before for one or none (older plans)."""
    for i, (jobs, plan) in enumerate(((" --jobs 3", {"jobs": 3}), ("", {"jobs": 1}), ("", {}))):
        folder = _recorded_sweep(tmp_path / str(i) / "sources", **plan)
        write_reproduction([folder], folder.parent / "REPRODUCTION.md")
        assert (f"\nCommand: `teacherhack sweep sources --seeds 2 --out sources{jobs}` (base preset `default`)\n"
                in (folder.parent / "REPRODUCTION.md").read_text())


def test_sweep_report_separates_metric_units(tmp_path: Path):
    """A sweep whose runs measure in different units (per-token metrics) still writes its reports."""
    dirs = []
    for name, unit, scale in (("run-in-nats-per-seq", "nats/sequence", 40.0), ("run-in-nats-per-tok", "nats/token", 1.0)):
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"name": name, "source": "offline", "metric_unit": unit}))
        rows = [{"step": s, "epoch": s / 100, "train_loss": None if s == 0 else 1.0, "golden": scale * (2 - s / 400),
                 "golden_se": 0.01, "proxy": scale * (1 - s / 500), "proxy_se": 0.01} for s in range(0, 401, 100)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(run_dir)
    reports.write_reports(dirs, tmp_path)
    assert (tmp_path / "report.html").exists() and (tmp_path / "per_token" / "report.html").exists()
    html = (tmp_path / "report.html").read_text()
    assert "run-in-nats-per-seq" in html and "run-in-nats-per-tok" not in html


@pytest.mark.slow
def test_cli_sweep_in_parallel_processes_then_the_reproduction_record(tiny_task: Path, tmp_path: Path, capsys):
    settings = [arg for key, value in {**TINY, "task.spec": f"jsonl:{tiny_task}", "threads": 2}.items()
                for arg in ("--set", f"{key}={value}")]
    out = tmp_path / "budget"
    code = main(["sweep", "budget", "--preset", "quick", "--seeds", "1", "--jobs", "2", "--out", str(out),
                 "--cache", str(tmp_path / "cache"), *settings])
    assert code == 0
    printed = capsys.readouterr().out
    assert "More generations per prompt improves both metrics" in printed and "| k=8 | 1 |" in printed
    assert sorted(p.parent.parent.name for p in (out / "runs").glob("*/seed0/student")) == ["k=1", "k=2", "k=4", "k=8"]
    tokens = [json.loads((out / "runs" / f"k={k}" / "seed0" / "run.json").read_text())["offline_tokens"]
              for k in (1, 2, 4, 8)]
    assert tokens == sorted(tokens) and tokens[0] > 0  # more generations per prompt: a bigger offline dataset
    # two parallel runs share the two threads config.yaml names: run.json says what each trained on
    assert json.loads((out / "runs" / "k=1" / "seed0" / "run.json").read_text())["threads"] == 1
    assert "threads: 2" in (out / "runs" / "k=1" / "seed0" / "config.yaml").read_text()

    record = tmp_path / "docs" / "REPRODUCTION.md"
    assert main(["reproduction", str(out), "--out", str(record)]) == 0
    assert "## `budget`" in record.read_text() and (record.parent / "reproduction" / "budget" / "cost.png").exists()


def test_findings_of_the_new_questions():
    topk = [_result(f"{k} offline", s, 40, 40 + rise, 10.0, rise > 1) for k, rise in
            (("top-1", 3.0), ("top-4", 2.0), ("top-16", 1.02), ("top-64", 1.0), ("full", 1.0)) for s in range(2)]
    for r in topk:
        r["signal_bytes"] = 4096 if r["group"].startswith("full") else 10
    found = sweeps.findings_topk(topk)
    assert [f["reproduced"] for f in found] == [True, True]
    assert "worse at top-1 offline, top-4 offline" in found[0]["evidence"] and found[1]["evidence"] == "from top-16 on"
    # a truncation that drifts further but never hacks does not make hacking worse
    drift = [{**r, "group": r["group"].replace("offline", "online"), "hacking": False} for r in topk]
    assert not sweeps.findings_topk(drift)[0]["reproduced"]

    onpolicy = [_result(g, s, 40, 40 + rise, 10.0, hacks) for g, rise, hacks in
                (("forward_kl", 0.2, False), ("reverse_kl", 0.0, False), ("sampled_reverse_kl k1", 2.0, True),
                 ("sampled_reverse_kl k3", 0.05, False)) for s in range(2)]
    found = sweeps.findings_onpolicy(onpolicy)
    assert found[0]["reproduced"] and "sampled_reverse_kl k1: 2/2 hack" in found[0]["evidence"]
    assert found[1]["claim"] == "Closest to the oracle at the end: reverse_kl" and found[1]["reproduced"]
    # the closest within the runner-up's noise: the claim is not shown (it was always "yes")
    close = [{**r, "golden_final": 40.0 + 0.01 * (r["group"] == "sampled_reverse_kl k3") + (-1) ** r["seed"] * 0.1}
             if r["group"] in ("reverse_kl", "sampled_reverse_kl k3") else r for r in onpolicy]
    found = sweeps.findings_onpolicy(close)
    assert found[1]["claim"] == "Closest to the oracle at the end: reverse_kl" and not found[1]["reproduced"]
    assert found[1]["evidence"].endswith("; not below sampled_reverse_kl k3 by 2 SE")

    horizon = [_result(f"pool={pool} {source}", s, low, low + rise, 5.0, rise > 0.5) for pool in (500, 8000)
               for source, low, rise in (("offline", 40.0, 2.0), ("online_teacher", 38.0, 1.0), ("online_student", 38.5, 0.9))
               for s in range(2)]
    found = sweeps.findings_horizon(horizon)
    assert [f["reproduced"] for f in found] == [True, True, True]
    gone = [r if not (r["group"].startswith("pool=8000 online")) else {**r, "golden_final": r["golden_min"], "hacking": False}
            for r in horizon]
    assert [f["reproduced"] for f in sweeps.findings_horizon(gone)][:2] == [False, False]
    assert "online teacher, pool 8000: 2/2 hack, golden minimum 38.00" in found[2]["evidence"]
    # plentiful data whose golden rises by noise the verdict judged: a rise is never negative, so it cannot decide
    noisy = [{**r, "golden_final": r["golden_min"] + (0.4 if r["seed"] else 0.3), "hacking": False}
             if r["group"] == "pool=8000 online_teacher" else r for r in horizon]
    found = sweeps.findings_horizon(noisy)
    assert not found[2]["reproduced"] and "0/2 hack, golden minimum" in found[2]["evidence"]


@pytest.mark.slow
def test_the_detection_corpus_keeps_each_run_once(tiny_config: cfg.LabConfig, tmp_path: Path):
    """scripts/export_detection_corpus.py: a run that an earlier sweep already holds, by its configuration or by its
    curves under another name (the mixture at λ = 0 is the offline source, at λ = 1 the online student), is left
    out, so that no held-out sweep has a twin in the folds that chose the detector's rule."""
    cache = tmp_path / "cache"
    lab.run_sweep("sources", tiny_config, tmp_path / "sources", cache, seeds=1)
    lab.run_sweep("mixture", tiny_config, tmp_path / "mixture", cache, seeds=1)
    shutil.copytree(tmp_path / "sources", tmp_path / "again")  # the same runs (configurations) in another sweep
    script = Path(__file__).resolve().parents[1] / "scripts" / "export_detection_corpus.py"
    sweeps_in_order = [str(tmp_path / name) for name in ("sources", "mixture", "again")]
    done = subprocess.run([sys.executable, str(script), *sweeps_in_order, "--out", str(tmp_path / "corpus")],
                          check=True, capture_output=True, text=True)
    kept = sorted(str(p.parent.relative_to(tmp_path / "corpus" / "runs")) for p in
                  (tmp_path / "corpus" / "runs").rglob("verdicts.json"))
    assert kept == ["mixture/lambda=0.25/seed0", "mixture/lambda=0.5/seed0", "sources/offline/seed0",
                    "sources/online_student/seed0", "sources/online_teacher/seed0"], done.stdout
    assert "mixture/lambda=0.0/seed0: the run sources/offline/seed0, left out" in done.stdout
    assert "mixture/lambda=1.0/seed0: the run sources/online_student/seed0, left out" in done.stdout
    assert "again/offline/seed0: the run sources/offline/seed0, left out" in done.stdout
    assert "5 runs exported" in done.stdout and "5 repeats" in done.stdout
    for sweep in ("sources", "mixture"):
        assert json.loads((tmp_path / "corpus" / "runs" / sweep / "sweep.json").read_text())["preset"] == sweep
    assert not (tmp_path / "corpus" / "runs" / "again").exists()
    again = subprocess.run([sys.executable, str(script), str(tmp_path / "sources"), "--out", str(tmp_path / "corpus")],
                           capture_output=True, text=True)  # an old export would keep runs a new one leaves out
    assert again.returncode == 2 and "is not empty: remove it first" in again.stderr


def test_the_record_embeds_every_sweep_note_with_links_that_resolve_from_the_record():
    """docs/REPRODUCTION.md holds each reproduction/**/NOTES.md as `teacherhack reproduction` writes it: its
    relative links rewritten to resolve from docs/, where the record lives, and every linked file exists."""
    from teacherhack.record import rebased

    docs = Path(__file__).resolve().parents[1] / "docs"
    record = (docs / "REPRODUCTION.md").read_text()
    for notes in sorted((docs / "reproduction").glob("**/NOTES.md")):
        text = rebased(notes.read_text().strip(), notes.parent, docs)
        assert text in record, notes
        for target in re.findall(r"\]\(([^)#\s:]+)(?:#[^)]*)?\)", text):
            assert (docs / target).exists(), (notes, target)
    assert rebased("[a](../../A.md) [z](../../../Z.md) [b](#b) [c](https://c.org/x)", docs / "r" / "s", docs) == \
        "[a](A.md) [z](../Z.md) [b](#b) [c](https://c.org/x)"


def test_the_readme_names_the_sweep_notes_as_the_record_reads_them():
    """write_reproduction reads a sweep's notes from reproduction/<sweep folder>/NOTES.md (each folder of notes is a
    section of the record, e.g. sources-teacher12 of preset sources); the README said PRESET/NOTES.md."""
    root = Path(__file__).resolve().parents[1]
    record, readme = (root / "docs" / "REPRODUCTION.md").read_text(), " ".join((root / "README.md").read_text().split())
    folders = [notes.parent.name for notes in (root / "docs" / "reproduction").glob("*/NOTES.md")]
    assert "sources-teacher12" in folders and all(f"## `{folder}`" in record for folder in folders)
    assert "`docs/reproduction/SWEEP_DIR/NOTES.md`, named after the sweep's folder, not its preset" in readme
    assert "PRESET/NOTES.md" not in readme


def test_a_sweep_trains_on_the_threads_its_configuration_names(tiny_config, tmp_path, monkeypatch):
    """`--set threads=N` reached `teacherhack lab` only: a sweep trained on torch's default count while each run's
    config.yaml said N (other bits than the lab's with the same seed)."""
    seen = []

    def stop(c, cache, device, timings, check=None):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stop before training")

    monkeypatch.setattr(lab, "prepare_upstream", stop)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            with pytest.raises(RuntimeError, match="stop before training"):
                lab.run_sweep("sources", cfg.apply_overrides(tiny_config, {"threads": threads}), tmp_path / str(threads),
                              tmp_path / "cache", seeds=1)
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]


def test_a_resumed_sweep_keeps_the_thread_share_its_runs_started_on(tiny_config, tmp_path, monkeypatch):
    """With --jobs 2, each run trains on half the threads; resumed with one run left, that run must continue on the
    same share (it got all of them: other bits than the uninterrupted sweep, and a warning blaming --jobs)."""
    left = "online_student/seed0"
    monkeypatch.setattr(lab.RunFolder, "finished", lambda self: self.path.relative_to(tmp_path / "out" / "runs")
                        .as_posix() != left)
    monkeypatch.setattr(lab, "prepare_upstream", lambda *args, **kwargs: None)
    launched = []
    monkeypatch.setattr(lab, "launch", lambda jobs, **kwargs: launched.extend(jobs) or iter(()))
    monkeypatch.setattr(lab, "collect", lambda out, runs: (_ for _ in ()).throw(RuntimeError("stop after the launch")))
    with pytest.raises(RuntimeError, match="stop after the launch"):
        lab.run_sweep("sources", cfg.apply_overrides(tiny_config, {"threads": 2}), tmp_path / "out",
                      tmp_path / "cache", seeds=1, engine=lab.Engine(jobs=2))
    assert [(job.name, job.args[5]) for job in launched] == [(left, 1)]  # 2 threads shared by 2 parallel runs
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["jobs"] == 2  # the record's command needs it


def test_a_resumed_sweep_refuses_finished_runs_built_on_other_upstream_artifacts(tiny_config, tmp_path, monkeypatch):
    """Finished runs were skipped unchecked: resumed on another upstream (here another thread count, then an edited
    task file), a sweep trained its other runs on a new oracle and teacher and put them beside the finished ones in its
    findings. Their checkpoints' keys are checked before anything is built; on the same upstream the sweep goes on."""
    base = cfg.apply_overrides(tiny_config, {"threads": None})  # the thread count of the machine that runs it
    out, cache, done = tmp_path / "out", tmp_path / "cache", "offline/seed0"
    monkeypatch.setattr(lab.RunFolder, "finished", lambda self: self.path == out / "runs" / done)
    built = []

    def stop(c, cache, device, timings, check=None):
        built.append(c.distill.sources)
        raise RuntimeError("stop before building")

    monkeypatch.setattr(lab, "prepare_upstream", stop)
    run = next(r for r in expand("sources", base, 1) if r.name == done)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        checkpoint = out / "runs" / done / "checkpoint"
        checkpoint.mkdir(parents=True)
        keys = upstream_keys(cfg.apply_overrides(base, run.overrides), ArtifactCache(cache), "cpu")
        (checkpoint / "state.json").write_text(json.dumps({"step": 12, "upstream": keys}))
        with pytest.raises(RuntimeError, match="stop before building"):  # the same upstream: the sweep goes on
            lab.run_sweep("sources", base, out, cache, seeds=1)
        assert len(built) == 1
        torch.set_num_threads(2)
        with pytest.raises(UserError, match=r"offline/seed0 \(finished\).* oracle differs \(rebuilt under other "
                                            r"settings, thread count"):
            lab.run_sweep("sources", base, out, cache, seeds=1)
        torch.set_num_threads(1)
        task = Path(base.task.spec.removeprefix("jsonl:"))
        task.write_text(task.read_text().replace('"prompt": "', '"prompt": "edited ', 1))
        with pytest.raises(UserError, match=r"offline/seed0 \(finished\).* splits differs"):
            lab.run_sweep("sources", base, out, cache, seeds=1)
        assert len(built) == 1  # refused before anything was built
    finally:
        torch.set_num_threads(before)


def test_reverse_kls_are_off_by_default_and_on_in_the_sweep_that_discusses_them():
    """They are half of an evaluation's time and no verdict reads them: the default lab leaves them out, the on-policy
    sweep (whose findings compare the losses' reverse KLs and entropies) measures them on 64 samples, as recorded."""
    base = cfg.resolve("default")
    assert base.eval.reverse_samples == 0
    runs = expand("onpolicy", base, seeds=1)
    assert runs and all(cfg.apply_overrides(base, r.overrides).eval.reverse_samples == 64 for r in runs)
    assert all("eval.reverse_samples" not in r.overrides for r in expand("sources", base, seeds=1))
