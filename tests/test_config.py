"""Configuration: presets, ``key=value`` overrides with typed parsing, validation, YAML round trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from teacherhack import config as cfg
from teacherhack.presets import LAB_PRESETS
from teacherhack.tokenizer import MIN_VOCAB
from teacherhack.config import ConfigError, LabConfig, from_dict, parse_assignments, resolve

TASK = LabConfig().task  # the defaults the validation bounds below are relative to


@pytest.mark.parametrize("preset", sorted(LAB_PRESETS))
def test_every_preset_resolves_and_validates(preset):
    c = resolve(preset)
    assert isinstance(c, LabConfig) and c.preset == preset
    cfg.validate(c)
    for key, value in LAB_PRESETS[preset].items():  # the preset's values are applied
        target = c
        for part in key.split("."):
            target = getattr(target, part)
        assert target == value, key


def test_resolve_does_not_leak_between_calls():
    quick = resolve("quick", {"distill.sources": "offline"})
    default = resolve("default")
    assert quick.distill.steps == 40 and default.distill.steps == LabConfig().distill.steps
    assert default.distill.sources == ["offline", "online_teacher", "online_student"]
    assert LabConfig().distill.sources == ["offline", "online_teacher", "online_student"]
    # the copy is deep: mutating one resolved config changes no other
    default.distill.sources.append("mixture")
    assert resolve("default").distill.sources == ["offline", "online_teacher", "online_student"]


def test_apply_overrides_returns_a_copy():
    base = resolve("default")
    changed = cfg.apply_overrides(base, {"distill.steps": "3", "distill.sources": "offline"})
    assert changed.distill.steps == 3 and changed.distill.sources == ["offline"]
    assert base == resolve("default")


def test_overrides_parse_each_type():
    c = resolve("quick", {
        "distill.steps": "7",
        "distill.lr": "3e-4",
        "distill.beta": "0.25",
        "oracle.epochs": "2",
        "task.n_oracle": "None",
        "distill.chunk_size": "16",
        "threads": "null",
        "eval.per_token": "true",
        "eval.reverse_samples": "0",
        "distill.prompts": "null",
        "distill.sources": "offline,online_teacher",
        "models.arch": "llama",
        "eval.estimator": "log_ratio",
    })
    assert c.distill.steps == 7 and type(c.distill.steps) is int
    assert c.distill.lr == pytest.approx(3e-4) and type(c.distill.lr) is float
    assert c.distill.beta == 0.25
    assert c.oracle.epochs == 2.0 and type(c.oracle.epochs) is float
    assert c.task.n_oracle is None and c.threads is None
    assert c.distill.chunk_size == 16 and type(c.distill.chunk_size) is int
    assert c.eval.per_token is True and c.eval.reverse_samples == 0 and c.distill.prompts is None
    assert c.distill.sources == ["offline", "online_teacher"]
    assert c.models.arch == "llama" and c.eval.estimator == "log_ratio"


@pytest.mark.parametrize("text,expected", [("True", True), ("1", True), ("yes", True), ("FALSE", False),
                                           ("0", False), ("no", False)])
def test_boolean_spellings(text, expected):
    assert resolve("default", {"eval.per_token": text, "eval.estimator": "log_ratio"}).eval.per_token is expected


def test_list_override_strips_spaces_and_empty_items():
    assert resolve("default", {"distill.sources": " offline , mixture,"}).distill.sources == ["offline", "mixture"]


def test_non_string_override_values_are_checked_too():
    assert resolve("default", {"distill.steps": 5, "distill.lr": 1, "eval.per_token": False}).distill.lr == 1.0
    with pytest.raises(ConfigError, match="distill.steps"):
        resolve("default", {"distill.steps": 2.5})
    with pytest.raises(ConfigError, match="distill.steps"):
        resolve("default", {"distill.steps": True})
    with pytest.raises(ConfigError, match="models.arch"):
        resolve("default", {"models.arch": 3})


@pytest.mark.parametrize("key,value", [
    ("distill.steps", "abc"),
    ("distill.steps", "1.5"),
    ("distill.lr", "fast"),
    ("eval.per_token", "maybe"),
    ("task.n_oracle", "many"),
    ("distill.chunk_size", "2.5"),
])
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve("default", {key: value})


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"did you mean .*distill\.steps") as error:
        resolve("default", {"distill.stpes": "3"})
    assert "distill.stpes" in str(error.value)
    with pytest.raises(ConfigError, match="unknown config key"):
        resolve("default", {"zzz": "3"})


def test_unknown_source_loss_preset():
    with pytest.raises(ConfigError, match="source 'bogus'"):
        resolve("default", {"distill.sources": "offline,bogus"})
    with pytest.raises(ConfigError, match="loss 'l2'"):
        resolve("default", {"distill.loss": "l2"})
    with pytest.raises(ConfigError, match="preset 'fast'"):
        resolve("fast")


@pytest.mark.parametrize("overrides,message", [
    ({"distill.batch_size": "10", "distill.grad_accum": "3"}, "multiple of distill.grad_accum"),
    ({"oracle.grad_accum": "0"}, r"oracle\.grad_accum must be > 0 and divide oracle\.batch_size"),
    ({"teacher.batch_size": "10", "teacher.grad_accum": "4"},
     r"teacher\.grad_accum must be > 0 and divide teacher\.batch_size .*got grad_accum=4 for batch_size=10"),
    ({"pretrain.grad_accum": "-2"}, r"pretrain\.grad_accum must be > 0"),
    ({"sampling_batch": "0"}, "sampling_batch must be >= 1"),
    ({"eval.prompts": str(TASK.n_validation + 1)}, "eval.prompts cannot exceed"),
    ({"distill.beta": "1.5"}, "beta"),
    ({"distill.beta": "-0.1"}, "beta"),
    ({"distill.alpha": "1.0"}, "alpha"),
    ({"distill.mixture_lambda": "1.01"}, "mixture_lambda"),
    ({"distill.sources": ""}, "at least one source"),
    ({"distill.sources": "offline,offline"}, "twice"),
    ({"distill.loss": "hard_ce"}, r"hard_ce .*own samples \(online_student\) .*offline or online_teacher"),
    ({"distill.loss": "hard_ce", "distill.sources": "offline,mixture"}, r"own samples \(mixture\)"),
    ({"distill.loss": "hard_ce", "distill.sources": "offline", "distill.loss_temperature": "2"},
     "hard_ce has no teacher distribution to temper"),
    ({"models.arch": "rnn"}, "models.arch"),
    ({"models.teacher": ""}, "models.teacher"),
    ({"models.oracle_temperature": "0"}, "oracle_temperature"),
    ({"teacher.samples": str(TASK.n_stage1 + 1)}, "teacher.samples"),
    ({"distill.schedule": "linear"}, "distill.schedule"),
    ({"eval.estimator": "exact"}, "eval.estimator"),
    ({"distill.chunk_size": "0"}, "chunk_size"),
    ({"task.vocab_size": "10"}, "vocab_size"),
    ({"task.vocab_size": str(MIN_VOCAB - 1)}, rf"task\.vocab_size must be >= {MIN_VOCAB} .*got {MIN_VOCAB - 1}"),
    ({"oracle.lr": "0"}, "oracle"),
    ({"distill.prompts": str(TASK.n_distill + 1)}, "distill.prompts"),
    ({"distill.prompts": "0"}, "distill.prompts"),
    ({"distill.loss": "sampled_reverse_kl", "distill.sources": "online_student", "distill.loss_temperature": "2"},
     "sampled_reverse_kl .* needs distill.loss_temperature=1"),
    ({"threads": "-2"}, "threads must be >= 1"),
    ({"threads": "0"}, "threads must be >= 1"),
    ({"device": "gpu"}, "device must be auto, cpu"),
    ({"distill.max_grad_norm": "-1"}, "distill.max_grad_norm must be > 0"),
    ({"distill.max_grad_norm": "0"}, "distill.max_grad_norm must be > 0"),
    ({"distill.max_grad_norm": "nan"}, "distill.max_grad_norm must be a finite number"),
    ({"distill.lr": "inf"}, "distill.lr must be a finite number"),
    ({"oracle.epochs": "inf"}, "oracle.epochs must be a finite number"),
    ({"models.oracle_temperature": "inf"}, "models.oracle_temperature must be a finite number"),
    ({"task.n_oracle": "0"}, "task.n_oracle must be > 0"),
    ({"task.limit": "0"}, "task.limit must be > 0"),
    ({"preset": "quick"}, "preset is not a setting: choose it with --preset"),
    ({"distill.sync_every": "3", "eval.every": "100"}, r"distill\.sync_every=3 must divide eval\.every=100"),
])
def test_validation_failures(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve("default", overrides)


def test_validation_boundaries_are_accepted():
    c = resolve("default", {"distill.batch_size": "12", "distill.grad_accum": "3",
                            "eval.prompts": str(TASK.n_validation), "distill.beta": "1.0",
                            "distill.mixture_lambda": "0", "models.oracle": "org/model",
                            "student.batch_size": "12", "student.grad_accum": "12", "sampling_batch": "1",
                            "task.vocab_size": str(MIN_VOCAB), "distill.sync_every": "25"})
    assert c.distill.grad_accum == 3 and c.eval.prompts == c.task.n_validation and c.distill.beta == 1.0
    assert c.student.grad_accum == 12 and c.sampling_batch == 1 and c.task.vocab_size == MIN_VOCAB


@pytest.mark.parametrize("preset", sorted(LAB_PRESETS))
def test_dump_yaml_from_dict_round_trip(preset, tmp_path: Path):
    c = resolve(preset, {"task.n_oracle": "None", "distill.chunk_size": "8", "distill.lr": "1e-5",
                         "eval.per_token": "true", "eval.estimator": "log_ratio", "distill.sources": "mixture,offline",
                         "threads": "2",
                         "task.spec": "jsonl:/tmp/x.jsonl", "models.oracle_temperature": "0.7"})
    c.dump(tmp_path / "config.yaml")
    loaded = from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert loaded == c
    assert dataclasses.asdict(loaded) == dataclasses.asdict(c)
    assert type(loaded.distill.lr) is float and type(loaded.distill.chunk_size) is int
    cfg.validate(loaded)


def test_resolved_paths_are_absolute_and_names_stay_names(tmp_path: Path, monkeypatch):
    """A relative path was kept as typed: config.yaml did not say which file a run read, and the same file written
    from another working directory made another configuration."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "xs").mkdir()  # a folder named as a size preset: the preset still
    home = tmp_path / "home"
    specs = {
        "jsonl:data/x.jsonl": f"jsonl:{tmp_path}/data/x.jsonl",  # a path, even before the file exists
        "jsonl:~/x.jsonl": f"jsonl:{home}/x.jsonl",
        "data/x.csv": f"{tmp_path}/data/x.csv",
        "hf:./data": f"hf:{tmp_path}/data",
        "hf:ckpt/../data/x.parquet": f"hf:{tmp_path}/data/x.parquet",
        "xsum:data/xsum.parquet": f"xsum:{tmp_path}/data/xsum.parquet",
        "/abs/x.tsv": "/abs/x.tsv",
        "hf:org/name": "hf:org/name",  # a hub dataset
        "xsum:EdinburghNLP/xsum": "xsum:EdinburghNLP/xsum",
        "xsum": "xsum",
        "kjv-rv": "kjv-rv",
    }
    for spec, resolved in specs.items():
        assert resolve("quick", {"task.spec": spec}).task.spec == resolved, spec
    c = resolve("quick", {"models.oracle": "org/name", "models.teacher": "./ckpt", "models.student": "xs"})
    assert (c.models.oracle, c.models.teacher, c.models.student) == ("org/name", str(tmp_path / "ckpt"), "xs")
    (tmp_path / "org" / "name").mkdir(parents=True)  # a local folder named as a hub id is what transformers loads
    assert resolve("quick", {"models.oracle": "org/name"}).models.oracle == str(tmp_path / "org" / "name")
    assert resolve("quick", {"task.spec": "hf:org/name"}).task.spec == f"hf:{tmp_path}/org/name"
    assert (resolve("paper").task.spec, resolve("paper").models.oracle) == ("xsum", "google/t5-v1_1-xl")  # hub
    with pytest.raises(ConfigError, match="models.teacher must name"):  # blank is still refused, not made "."
        resolve("quick", {"models.teacher": " "})


def test_differences_name_each_setting_that_differs():
    a = resolve("quick")
    b = cfg.apply_overrides(a, {"distill.steps": 7, "task.spec": "jsonl:/b.jsonl"})
    assert cfg.differences(a, b) == ["task.spec: 'kjv-rv' → 'jsonl:/b.jsonl'", f"distill.steps: {a.distill.steps} → 7"]
    assert cfg.differences(a, a) == []


def test_from_dict_rejects_unknown_and_badly_typed_keys():
    data = resolve("default").to_dict()
    data["distill"]["stepz"] = 3
    with pytest.raises(ConfigError, match=r"distill\.stepz"):
        from_dict(data)
    data = resolve("default").to_dict()
    data["distill"]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"distill\.steps"):
        from_dict(data)
    data = resolve("default").to_dict()
    data["eval"] = 5
    with pytest.raises(ConfigError, match="eval"):
        from_dict(data)
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict({"colour": "red"})


def test_parse_assignments():
    assert parse_assignments(["distill.steps=3", " eval.every = 5 ", "task.spec=jsonl:a=b.jsonl"]) == {
        "distill.steps": "3", "eval.every": "5", "task.spec": "jsonl:a=b.jsonl"}
    assert parse_assignments(["threads="]) == {"threads": ""}
    with pytest.raises(ConfigError, match="novalue"):
        parse_assignments(["novalue"])
    with pytest.raises(ConfigError):
        parse_assignments(["=3"])


def test_assignments_are_the_settings_that_rebuild_a_config_from_its_preset():
    assert cfg.assignments(resolve("quick")) == []
    overrides = {"distill.sources": "offline,online_student", "distill.chunk_size": 16, "eval.per_token": True,
                 "eval.estimator": "log_ratio", "models.oracle_temperature": 0.6, "distill.steps": 2000}
    config = resolve("default", overrides)
    settings = cfg.assignments(config)
    assert settings == ["models.oracle_temperature=0.6", "distill.sources=offline,online_student",
                        "distill.steps=2000", "distill.chunk_size=16", "eval.estimator=log_ratio",
                        "eval.per_token=true"]
    assert resolve("default", parse_assignments(settings)) == config
    unset = resolve("default", {"teacher.samples": None})  # the preset's 1,000 back to every sample
    assert cfg.assignments(unset) == ["teacher.samples=none"]
    assert resolve("default", parse_assignments(cfg.assignments(unset))) == unset


def test_all_keys_lists_nested_fields():
    keys = cfg.all_keys()
    assert "distill.steps" in keys and "eval.per_token" in keys and "seed" in keys
    assert "distill" not in keys and len(keys) == len(set(keys))


def test_per_token_metrics_need_the_log_ratio_estimator():
    with pytest.raises(ConfigError, match="per-token values need estimator=.log_ratio."):
        resolve("default", {"eval.per_token": "true"})


def test_weights_are_float32_and_the_paper_preset_trains_under_bf16_autocast():
    """bf16 weights trained AdamW in bf16: an update of lr 3e-4 is below half of bf16's step for any weight above
    about 0.08, so most were rounded away (a review measured 28% of a tiny T5's weights unchanged after 5 steps,
    against 0.1% in float32). The paper preset gets bf16 arithmetic from autocast over float32 weights instead."""
    with pytest.raises(ConfigError, match="models.dtype=bfloat16.*AdamW in bf16.*precision=bfloat16"):
        resolve("quick", {"models.dtype": "bfloat16"})
    paper = resolve("paper")
    assert (paper.models.dtype, paper.precision) == ("float32", "bfloat16")
    assert paper.models.vocab_size == 32_100  # T5 v1.1's tokenizer; its output layers have 28 more, unused ids
    assert {paper.oracle.schedule, paper.teacher.schedule, paper.student.schedule} == {"constant"}
