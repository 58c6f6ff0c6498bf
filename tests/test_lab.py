"""The whole pipeline on a tiny generated task: files, metric fields, cache reuse, resume, clear errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from conftest import TINY, make_task
from teacherhack import config as cfg
from teacherhack import lab, seeds, stages
from teacherhack.distill import make_source
from teacherhack.cache import ArtifactCache
from teacherhack.cli import main
from teacherhack.divergences import Estimate
from teacherhack.metrics import Evaluator, sample_in_batches
from teacherhack.models import LM, collate_prompts, load_pretrained
from teacherhack.rundir import sample_prompts

pytestmark = pytest.mark.slow
SOURCES = ("offline", "online_teacher", "online_student")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lab_end_to_end_then_cache_reuse(tiny_config: cfg.LabConfig, tmp_path: Path):
    out, cache = tmp_path / "lab", tmp_path / "cache"
    summary = lab.run_lab(tiny_config, out, cache)

    assert set(summary["cache"].values()) == {"built"}
    assert cfg.from_dict(yaml.safe_load((out / "config.yaml").read_text())) == tiny_config
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk["runs"]) == set(SOURCES)
    for source in SOURCES:
        rows = read_metrics(out / source)
        assert [r["step"] for r in rows] == [0, 4, 8, 12]
        for row in rows:
            assert row.keys() >= {"step", "epoch", "train_loss", "tokens_generated", "train_seconds", "eval_seconds"}
            assert row["grad_norm"] is None if row["step"] == 0 else row["grad_norm"] > 0
            for key in ("proxy", "golden", "golden_reverse", "proxy_reverse", "proxy_train", "oracle_nll",
                        "reference_nll", "student_entropy", "student_entropy_held_out"):
                assert math.isfinite(row[key]) and row[f"{key}_se"] > 0, key
            assert math.isfinite(row["golden"]) and row["golden"] >= 0 and row["golden_se"] > 0
            assert math.isfinite(row["proxy"]) and row["proxy"] >= 0
        # the student's NLL of the oracle's samples moves as the golden metric does (paired, within the SE)
        paired = [json.loads(line) for line in (out / source / "per_sample.jsonl").read_text().splitlines()]
        assert set(paired[0]) == {"step", "golden", "proxy", "proxy_train", "oracle_nll", "reference_nll"}
        first, last = paired[0], paired[-1]
        gap = [(nl - nf) - (gl - gf) for nf, nl, gf, gl in zip(first["oracle_nll"], last["oracle_nll"],
                                                              first["golden"], last["golden"])]
        mean, se = sum(gap) / len(gap), (sum((g - sum(gap) / len(gap)) ** 2 for g in gap) / (len(gap) - 1) / len(gap)) ** 0.5
        assert abs(mean) <= 4 * se, (mean, se)
        assert len(first["reference_nll"]) == 8  # one real response per validation prompt
        assert rows[0]["train_loss"] is None and all(r["train_loss"] > 0 for r in rows[1:])
        assert rows[-1]["proxy"] < rows[0]["proxy"], "distillation must bring the student closer to the teacher"
        run = on_disk["runs"][source]
        assert run["golden_final"] == rows[-1]["golden"] and isinstance(run["hacking"], bool)
        assert isinstance(run["reference_hacking"], bool) and "reference NLL" in run["reference_verdict"]["reason"]
        assert run["golden_min"] == min(r["golden"] for r in rows)
        info = json.loads((out / source / "run.json").read_text())
        assert info["source"] == source and info["teacher_golden"] > 0
        # 2 samples per validation prompt, one real response: the SEs and those who read per_sample.jsonl cluster them
        assert info["samples_per_prompt"] == {"golden": 2, "proxy": 2, "proxy_train": 2, "oracle_nll": 2,
                                              "reference_nll": 1}
        for key in ("golden", "proxy", "reference_nll"):  # the stored SEs, from the saved values (to 7 digits)
            values = torch.tensor(last[key], dtype=torch.float64)
            clusters = torch.from_numpy(sample_prompts(info, key, len(values)))
            assert rows[-1][f"{key}_se"] == pytest.approx(Estimate.of(values, clusters).se, rel=1e-4), key
        # the offline dataset's tokens count as this run's data cost (the online ones count as they come)
        (offline_data,) = (cache / "artifacts").glob("offline_data-*/pairs.json")
        offline_tokens = sum(map(len, json.loads(offline_data.read_text())["responses"]))
        assert info["offline_tokens"] == (offline_tokens if source == "offline" else 0) and offline_tokens > 0
        assert (out / source / "student" / "model.safetensors").exists()
    assert read_metrics(out / "online_teacher")[-1]["tokens_generated"] > 0
    assert read_metrics(out / "offline")[-1]["epoch"] == pytest.approx(12 * 8 / 32)
    for stage in ("oracle", "teacher", "student", "references"):
        assert stage in summary["stage_seconds"]

    # A second lab that differs only in stage 2 retrains nothing upstream.
    changed = cfg.apply_overrides(tiny_config, {"distill.loss": "reverse_kl", "distill.sources": "offline"})
    again = lab.run_lab(changed, tmp_path / "lab2", cache)
    assert set(again["cache"].values()) == {"reused"}, again["cache"]
    # … while a change to the teacher retrains the teacher and what depends on it, not the oracle.
    changed = cfg.apply_overrides(tiny_config, {"teacher.epochs": 1.0, "distill.sources": "offline"})
    third = lab.run_lab(changed, tmp_path / "lab3", cache)
    assert third["cache"]["oracle"] == "reused" and third["cache"]["teacher"] == "built"
    assert third["cache"]["student"] == "reused"
    # … and other CPU kernels (a cache shared with another kind of CPU, an ISA limit) retrain the models.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        fourth = lab.run_lab(cfg.apply_overrides(tiny_config, {"distill.sources": "offline"}), tmp_path / "lab4", cache)
    assert fourth["cache"]["oracle"] == fourth["cache"]["teacher"] == fourth["cache"]["student"] == "built"
    assert fourth["cache"]["splits"] == fourth["cache"]["tokenizer"] == "reused"


def test_killed_run_resumes_with_identical_results(tiny_config: cfg.LabConfig, tmp_path: Path, monkeypatch):
    config = cfg.apply_overrides(tiny_config, {"distill.sources": "offline,online_student"})
    cache = tmp_path / "cache"
    reference = lab.run_lab(config, tmp_path / "whole", cache)

    calls = {"n": 0}
    original = Evaluator.__call__

    def dies_on_third_evaluation(self, student, step):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, student, step)

    monkeypatch.setattr(Evaluator, "__call__", dies_on_third_evaluation)
    with pytest.raises(KeyboardInterrupt):
        lab.run_lab(config, tmp_path / "killed", cache)
    monkeypatch.setattr(Evaluator, "__call__", original)
    assert [r["step"] for r in read_metrics(tmp_path / "killed" / "offline")] == [0, 4]

    resumed = lab.run_lab(config, tmp_path / "killed", cache)
    for source in ("offline", "online_student"):
        whole, again = read_metrics(tmp_path / "whole" / source), read_metrics(tmp_path / "killed" / source)
        assert [r["step"] for r in again] == [0, 4, 8, 12]
        for a, b in zip(whole, again):
            for key in ("golden", "proxy", "golden_reverse", "train_loss", "epoch"):
                expected = a[key] if a[key] is None else pytest.approx(a[key], rel=1e-6, abs=1e-9)
                assert b[key] == expected, (source, a["step"], key)
        assert resumed["runs"][source]["golden_final"] == pytest.approx(reference["runs"][source]["golden_final"])


def test_rerun_with_other_settings_into_same_folder_is_refused(tiny_config: cfg.LabConfig, tmp_path: Path):
    config = cfg.apply_overrides(tiny_config, {"distill.sources": "offline", "distill.steps": 4})
    lab.run_lab(config, tmp_path / "lab", tmp_path / "cache")
    with pytest.raises(cfg.ConfigError, match="different configuration"):
        lab.run_lab(cfg.apply_overrides(config, {"distill.steps": 8}), tmp_path / "lab", tmp_path / "cache")


@pytest.mark.parametrize("override, message", [
    ("distil.steps=3", "unknown config key 'distil.steps'; did you mean distill.steps"),
    ("distill.sources=offline,teleport", "unknown source 'teleport'"),
    ("distill.loss=kl_magic", "unknown loss 'kl_magic'"),
    ("distill.steps=many", "distill.steps: expected int"),
])
def test_cli_rejects_bad_config_clearly(override: str, message: str, tmp_path: Path, capsys):
    code = main(["lab", "--preset", "quick", "--out", str(tmp_path / "x"), "--set", override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "nothing is written for a configuration that cannot run"


def test_cli_rejects_empty_dataset(tmp_path: Path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main(["lab", "--preset", "quick", "--out", str(tmp_path / "x"), "--cache", str(tmp_path / "c"),
                 "--set", f"task.spec=jsonl:{empty}"])
    assert code == 2
    assert "empty.jsonl" in capsys.readouterr().err


def test_shared_pretraining_is_built_once_per_size_and_used_by_every_role(tiny_config: cfg.LabConfig, tmp_path: Path):
    config = cfg.apply_overrides(tiny_config, {"pretrain.epochs": 0.5, "models.teacher": "xs",
                                               "distill.sources": "offline", "distill.steps": 4})
    summary = lab.run_lab(config, tmp_path / "lab", tmp_path / "cache")
    assert {"pretrain_oracle", "pretrain_teacher", "pretrain_student"} <= set(summary["cache"])
    artifacts = {p.name: json.loads((p / "spec.json").read_text()) for p in (tmp_path / "cache" / "artifacts").iterdir()}
    pretrained = {name: spec for name, spec in artifacts.items() if name.startswith("pretrain-")}
    assert sorted(spec["inputs"]["size"] for spec in pretrained.values()) == ["xs", "xxs"]  # one per size
    by_kind = {spec["kind"]: spec for spec in artifacts.values()}
    xxs = next(name for name, spec in pretrained.items() if spec["inputs"]["size"] == "xxs")
    xs = next(name for name, spec in pretrained.items() if spec["inputs"]["size"] == "xs")
    assert by_kind["oracle"]["parents"]["pretrain_oracle"] == xxs  # oracle and student are both xxs
    assert by_kind["student"]["parents"]["pretrain_student"] == xxs
    assert by_kind["teacher"]["parents"]["pretrain_teacher"] == xs
    # Without pre-training the upstream keys have no pre-training parent: a different oracle
    plain = cfg.apply_overrides(config, {"pretrain.epochs": 0})
    again = lab.run_lab(plain, tmp_path / "plain", tmp_path / "cache")
    assert again["cache"]["oracle"] == "built" and "pretrain_oracle" not in again["cache"]


def test_trackers_receive_every_evaluation(tiny_config: cfg.LabConfig, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = cfg.apply_overrides(tiny_config, {"distill.sources": "offline"})
    lab.run_lab(config, tmp_path / "lab", tmp_path / "cache", lab.Engine(report_to=("tensorboard",)))
    events = EventAccumulator(str(tmp_path / "lab" / "tracking" / "lab" / "offline"))
    events.Reload()
    rows = read_metrics(tmp_path / "lab" / "offline")
    for key in ("golden", "proxy", "train_loss"):
        logged = events.Scalars(key)
        expected = [(r["step"], r[key]) for r in rows if r[key] is not None]
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in logged] == expected


def test_a_sweep_runs_on_submitit_s_local_executor(tiny_config: cfg.LabConfig, tmp_path: Path):
    config = cfg.apply_overrides(tiny_config, {"distill.steps": 4})
    engine = lab.Engine(jobs=2, name="submitit", options=(("cluster", "local"), ("timeout_min", "10")))
    summary = lab.run_sweep("sources", config, tmp_path / "sweep", tmp_path / "cache", seeds=1, engine=engine)
    assert summary["runs"] == 3
    for source in SOURCES:
        assert [r["step"] for r in read_metrics(tmp_path / "sweep" / "runs" / source / "seed0")] == [0, 4]
    assert list((tmp_path / "sweep" / ".engine").glob("*_log.out"))  # the executor's own logs


def test_top_k_signals_and_on_policy_reverse_kl_run_through_the_lab(tiny_config: cfg.LabConfig, tmp_path: Path):
    from teacherhack.teacher_signals import TeacherSignals

    cache = tmp_path / "cache"
    top = cfg.apply_overrides(tiny_config, {"distill.top_k": 4, "distill.sources": "offline,online_teacher"})
    summary = lab.run_lab(top, tmp_path / "topk", cache)
    (signals,) = (cache / "artifacts").glob("teacher_signals-*/signals.safetensors")
    stored = TeacherSignals.load(signals)
    assert stored.kind == "topk" and stored.k == 4 and stored.bytes_per_token == 4 * 6 + 4
    for source in ("offline", "online_teacher"):
        rows = read_metrics(tmp_path / "topk" / source)
        assert rows[-1]["proxy"] < rows[0]["proxy"] and summary["runs"][source]["steps"] == 12
    on_policy = cfg.apply_overrides(tiny_config, {"distill.loss": "sampled_reverse_kl", "distill.sources": "online_student",
                                                  "distill.kl_estimator": "k3"})
    lab.run_lab(on_policy, tmp_path / "onpolicy", cache)
    rows = read_metrics(tmp_path / "onpolicy" / "online_student")
    assert rows[-1]["proxy_reverse"] < rows[0]["proxy_reverse"]  # the student moves towards the teacher
    assert all(r["train_loss"] is None or math.isfinite(r["train_loss"]) for r in rows)
    with pytest.raises(cfg.ConfigError, match="needs distill.sources=online_student"):
        cfg.validate(cfg.apply_overrides(tiny_config, {"distill.loss": "sampled_reverse_kl"}))


def test_the_teacher_s_prompt_cache_runs_through_the_lab(tiny_config: cfg.LabConfig, tmp_path: Path, capsys):
    """distill.teacher_prompt_cache: the same runs to float rounding; beyond its memory budget, the runs without it."""
    base = cfg.apply_overrides(tiny_config, {"distill.sources": "online_student,mixture"})
    runs = {"plain": base, "cached": cfg.apply_overrides(base, {"distill.teacher_prompt_cache": True}),
            # (the mixture's offline half would lose its cached teacher signals too)
            "over_budget": cfg.apply_overrides(base, {"distill.teacher_prompt_cache": True, "distill.teacher_cache_mb": 0,
                                                      "distill.sources": "online_student"})}
    logs = {}
    for name, config in runs.items():
        capsys.readouterr()
        lab.run_lab(config, tmp_path / name, tmp_path / "cache")
        logs[name] = capsys.readouterr().out
    assert "keys and values" not in logs["plain"] and logs["cached"].count("the teacher's keys and values on ") == 2
    assert logs["over_budget"].count("not kept, the teacher reads the prompts at every step") == 1
    over, plain = ([{key: value for key, value in row.items() if not key.endswith("seconds")}
                    for row in read_metrics(tmp_path / name / "online_student")] for name in ("over_budget", "plain"))
    assert over == plain  # not kept: the very same run
    for source in ("online_student", "mixture"):
        plain, cached = (read_metrics(tmp_path / name / source) for name in ("plain", "cached"))
        for a, b in zip(plain, cached):
            assert b["golden"] == pytest.approx(a["golden"], rel=1e-4)
            assert b["train_loss"] == (None if a["train_loss"] is None else pytest.approx(a["train_loss"], rel=1e-4))
    with pytest.raises(cfg.ConfigError, match="teacher_prompt_cache"):
        cfg.validate(cfg.apply_overrides(tiny_config, {"distill.teacher_prompt_cache": True, "models.arch": "t5"}))
    with pytest.raises(cfg.ConfigError, match="generation=vllm serves decoder-only models"):
        cfg.validate(cfg.apply_overrides(tiny_config, {"distill.generation": "vllm", "models.arch": "t5"}))


def test_bf16_training_runs_the_lab_with_float32_metrics(tiny_config: cfg.LabConfig, tmp_path: Path):
    config = cfg.apply_overrides(tiny_config, {"precision": "bfloat16", "distill.sources": "offline"})
    lab.run_lab(config, tmp_path / "lab", tmp_path / "cache")
    rows = read_metrics(tmp_path / "lab" / "offline")
    assert rows[-1]["proxy"] < rows[0]["proxy"] and all(math.isfinite(r["golden_se"]) for r in rows)
    # the precision is an input of every stage that trains: each gets its own oracle, teacher and student
    for precision in ("float32", "bfloat16-fp32-attention"):
        lab.run_lab(cfg.apply_overrides(config, {"precision": precision}), tmp_path / precision, tmp_path / "cache")
    first = {run: read_metrics(tmp_path / run / "offline")[0]["golden"] for run in ("lab", "float32",
                                                                                     "bfloat16-fp32-attention")}
    assert len(set(first.values())) == 3, first  # other upstream (keyed), other numbers


def test_the_evaluation_benchmark_times_every_part_of_an_evaluation(tiny_task, tmp_path):
    """scripts/bench_eval.py on a tiny lab: one JSON line with the evaluation's time and each part's."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_eval.py"
    options = [f"--set={key}={'null' if value is None else value}" for key, value in TINY.items()]
    out = subprocess.run([sys.executable, str(script), "--preset", "quick", f"--set=task.spec=jsonl:{tiny_task}",
                          *options, "--cache", str(tmp_path / "cache"), "--repeats", "1"],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    parts = ("oracle_s", "teacher_s", "real_s", "train_teacher_s", "reverse_s", "gelu_student_hugging_face_s",
             "gelu_student_s", "gelu_oracle_hugging_face_s", "gelu_oracle_s")
    assert figures["evaluation_s"] > 0 and all(figures[p] > 0 for p in parts)


def test_the_machine_names_the_kernels_that_a_run_s_bits_depend_on(monkeypatch):
    """A sweep's record says which CPU kernels made it: the instruction set, and any limit the user set on it."""
    for name in stages.KERNEL_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert f"({torch.backends.cpu.get_cpu_capability()}" in lab.machine()
    assert "ISA" not in lab.machine()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)" in lab.machine()


def test_the_libraries_kernel_settings_are_keyed_only_when_set(monkeypatch):
    """MKL_CBWR=COMPATIBLE gives a float32 matrix product other bits on an AVX-512 CPU (and oneDNN's BF16 math mode or
    MKL's forced CPU type can on others): set, it is in the training stages' keys; unset, the keys are those of
    before it was named, so the default lab's cached artifacts stay valid."""
    for name in stages.KERNEL_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    base = cfg.resolve("default")

    def keys() -> dict[str, str]:
        specs = stages.stage_specs(base, "task-x", 1, f"{stages.cpu_kernels()}, torch {torch.__version__}")
        return {name: spec["key"] for name, spec in specs.items() if spec is not None}

    default = keys()
    assert "=" not in stages.cpu_kernels()  # the instruction set alone, as before any setting was named
    for name, value in (("MKL_CBWR", "COMPATIBLE"), ("ONEDNN_DEFAULT_FPMATH_MODE", "BF16"),
                        ("MKL_DEBUG_CPU_TYPE", "5")):
        monkeypatch.setenv(name, value)
        assert f"{name}={value}" in stages.cpu_kernels()
        moved = {stage for stage, key in keys().items() if key != default[stage]}
        assert {"oracle", "teacher", "student"} <= moved and "splits" not in moved, name
        monkeypatch.delenv(name)
        assert keys() == default


def test_sampling_batch_bounds_every_call_that_samples_or_scores_a_dataset(tmp_path: Path, monkeypatch):
    """sampling_batch: the rows of each generation call of the oracle's answers, the offline set and stage 2's
    online-teacher blocks, and of each teacher forward of the offline signals. At its default the artifacts are the
    fixed 256-row recipe's of before; another value draws each call from a generator seeded by its first row, as its
    docstring says: other samples, keyed apart."""
    task = make_task(tmp_path / "task.jsonl", n=1200)
    base = cfg.resolve("quick", {**TINY, "task.spec": f"jsonl:{task}", "task.n_stage1": 300})
    building, calls = [], []  # the stage being built; (stage, rows) of every sampling or scoring call
    get = ArtifactCache.get
    monkeypatch.setattr(ArtifactCache, "get", lambda self, stage, *args, **kwargs: building.append(stage)
                        or get(self, stage, *args, **kwargs))
    for method in ("sample", "next_token_logprobs"):
        def spy(self, prompts, *args, real=getattr(LM, method), **kwargs):
            calls.append((building[-1], len(prompts)))
            return real(self, prompts, *args, **kwargs)
        monkeypatch.setattr(LM, method, spy)

    def rows(config: cfg.LabConfig) -> tuple[stages.Upstream, dict[str, list[int]]]:
        calls.clear()
        up = stages.prepare_upstream(config, ArtifactCache(tmp_path / "cache"), "cpu", {})
        made = ("oracle_samples", "offline_data", "teacher_signals")
        return up, {name: [n for stage, n in calls if stage == name] for name in made}

    default, default_rows = rows(base)
    assert default_rows == {"oracle_samples": [256, 44], "offline_data": [32], "teacher_signals": [32]}
    bounded, bounded_rows = rows(cfg.apply_overrides(base, {"sampling_batch": 24}))
    assert bounded_rows == {"oracle_samples": [24] * 12 + [12], "offline_data": [24, 8], "teacher_signals": [24, 8]}
    assert bounded.keys["oracle_samples"] != default.keys["oracle_samples"]

    prompts, responses = stages.load_ids(default.oracle.parent / default.keys["oracle_samples"] / "pairs.json")
    _, bounded_responses = stages.load_ids(bounded.oracle.parent / bounded.keys["oracle_samples"] / "pairs.json")
    oracle = stages.wrap(load_pretrained(default.oracle), AutoTokenizer.from_pretrained(default.tokenizer), "cpu")
    batch = collate_prompts(prompts, oracle.pad_id)
    before = sample_in_batches(oracle, batch, max_new_tokens=base.task.max_response_len, batch_size=256,
                               seed=base.oracle_seed)  # the recipe of every artifact cached before the setting
    assert responses == stages.rows_until_eos(before, oracle.eos_id)
    second = oracle.sample(batch[24:48], max_new_tokens=base.task.max_response_len,
                          generator=seeds.generator(base.oracle_seed, 24))  # rows 24-47: a call of their own
    assert bounded_responses[24:48] == stages.rows_until_eos(second, oracle.eos_id)
    assert bounded_responses != responses  # other draws of the same oracle

    # stage 2's online teacher draws sampling_batch // distill.batch_size steps per call (the paper preset's memory)
    for config, up, block in ((base, default, 256 // 8), (cfg.apply_overrides(base, {"sampling_batch": 24}), bounded, 3)):
        tokenizer = AutoTokenizer.from_pretrained(up.tokenizer)
        teacher, student = (stages.wrap(load_pretrained(path), tokenizer, "cpu") for path in (up.teacher, up.student))
        source = make_source("online_teacher", config, up, teacher, student)
        calls.clear()
        building.append("stage 2")
        assert [source.batch(step).responses.shape[0] for step in range(block + 1)] == [8] * (block + 1)
        assert calls == [("stage 2", block * 8), ("stage 2", block * 8)]  # the second call: the next block's first step
