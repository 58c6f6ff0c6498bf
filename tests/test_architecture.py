"""The package's shape: no import cycles, a command line that answers --help without heavy imports, and cache
keys derived from each stage's declarations (a changed input changes exactly its stage and what depends on it)."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teacherhack import config as cfg
from teacherhack import stages
from teacherhack.stages import STAGES, ConfigView, UndeclaredRead, stage_specs
from teacherhack.sweeps import SWEEPS, expand

PACKAGE = Path(stages.__file__).parent


def imports_of(path: Path) -> set[str]:
    """The teacherhack modules a file imports, anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("teacherhack"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("teacherhack")}
    return found


def test_no_import_cycles():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("teacherhack", *path.relative_to(PACKAGE).with_suffix("").parts))
        modules[name.removesuffix(".__init__")] = path
    graph = {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}
    # a package's __init__ re-exporting its submodules is not a cycle through the package itself
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " → ".join(trail[trail.index(dep):] + [dep]) if dep in trail
                            else f"import cycle through {dep}")
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_help_imports_neither_torch_nor_matplotlib():
    code = ("import sys; from teacherhack.cli import build_parser; build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'matplotlib', 'transformers') if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-m", "teacherhack", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "lab" in help_text.stdout and "sweep" in help_text.stdout


def changed(value):
    """Another valid-looking value of the same kind (what a user might set instead)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1 if isinstance(value, int) else value * 0.5 + 0.25
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return value + ["online_teacher"] if "offline" in value else value + ["offline"]
    if value is None:
        return 7
    raise TypeError(value)


def leaves(config: cfg.LabConfig, key: str) -> list[str]:
    """The scalar keys under ``key`` (a key itself, or every field of a section)."""
    value = stages._value(config, key)
    if dataclasses.is_dataclass(value):
        return [f"{key}.{f.name}" for f in dataclasses.fields(value)]
    return [key]


def set_value(config: cfg.LabConfig, key: str, value) -> cfg.LabConfig:
    config = cfg.from_dict(config.to_dict())
    *path, name = key.split(".")
    target = config
    for part in path:
        target = getattr(target, part)
    setattr(target, name, value)
    return config


def descendants(names: set[str]) -> set[str]:
    out = set(names)
    grew = True
    while grew:
        grew = False
        for s in STAGES.values():
            if s.name not in out and out & set(s.parents):
                out.add(s.name)
                grew = True
    return out


@pytest.mark.parametrize("pretrain", [0.0, 1.0])
def test_changing_a_declared_key_changes_exactly_its_stage_and_descendants(pretrain: float):
    base = cfg.apply_overrides(cfg.resolve("default"), {"pretrain.epochs": pretrain})
    before = stage_specs(base, "task-x")
    summarised: set[str] = set()
    keys = sorted({leaf for s in STAGES.values() for key in s.reads for leaf in leaves(base, key)})
    assert "eval.batch_size" in keys and "models.dtype" in keys  # the two inputs earlier keys missed
    for key in keys:
        if key == "pretrain.epochs" and pretrain == 0:
            continue  # turning pre-training on adds stages: covered by the other parameter
        after = stage_specs(set_value(base, key, changed(stages._value(base, key))), "task-x")
        moved = {name for name in STAGES if (before[name] or {}).get("key") != (after[name] or {}).get("key")}
        readers = {s.name for s in STAGES.values() if before[s.name] is not None
                   and any(key == r or key.startswith(r + ".") for r in s.reads)}
        # a stage that hashes every key it reads must move; one that hashes a summary of them (e.g. only the
        # keys that matter in this configuration) may stay; nothing else may move
        hashes_all = {name for name in readers if STAGES[name].inputs is None}
        must = {name for name in descendants(hashes_all) if before[name] is not None or after[name] is not None}
        may = {name for name in descendants(readers) if before[name] is not None or after[name] is not None}
        assert must <= moved <= may, (key, sorted(moved), sorted(must), sorted(may))
        if (readers - hashes_all) - moved:
            summarised.add(key)
    # the summarised keys are the model names (a size preset is not a tokenizer), the pre-training settings, the
    # teacher-signal settings that only matter for one kind of signal, and the pool size beyond the part of it the
    # training references draw on
    assert summarised <= {"models.oracle", "models.teacher", "models.student", "distill.loss_temperature",
                          "distill.teacher_cache_mb", "distill.top_k_dtype", "pretrain.epochs", "distill.prompts"} | {
        k for k in keys if k.startswith("pretrain.")}, sorted(summarised)
    # the training references of pools of 500 and 400 prompts are the same first 200 (sweeps over the pool size share
    # them), those of a pool smaller than eval.prompts are not
    pools = {n: stage_specs(set_value(base, "distill.prompts", n), "task-x") for n in (500, 400, 150)}
    assert pools[500]["train_references"]["key"] == pools[400]["train_references"]["key"]
    assert pools[500]["train_references"]["key"] != pools[150]["train_references"]["key"]
    assert pools[500]["offline_data"]["key"] != pools[400]["offline_data"]["key"]
    # and a new task (other pairs) changes everything
    other = stage_specs(base, "task-y")
    assert all((before[n] or {}).get("key") != (other[n] or {}).get("key") for n in STAGES if before[n])


def test_the_training_stages_and_what_they_feed_are_keyed_by_the_cpu_thread_count():
    """A training step's bits depend on the thread count: a cache filled on one count must not serve another."""
    base = cfg.apply_overrides(cfg.resolve("default"), {"pretrain.epochs": 1.0})
    one, two, accelerator = (stage_specs(base, "task-x", threads) for threads in (1, 2, None))
    training = {s.name for s in STAGES.values() if s.collective and one[s.name] is not None}
    assert {"oracle", "teacher", "student", "pretrain_oracle"} <= training
    for other in (two, accelerator):
        moved = {name for name in STAGES if (one[name] or {}).get("key") != (other[name] or {}).get("key")}
        assert moved == {name for name in descendants(training) if one[name] is not None}
    assert stage_specs(base, "task-x", 2) == two  # and the same count, the same keys
    # the CPU's kernels too (AMX or AVX-512, an ISA limit, torch's version): a shared cache on another CPU kind
    amx, avx512 = (stage_specs(base, "task-x", 1, kernels) for kernels in ("avx512 + AMX, torch 2.13.0+cpu",
                                                                           "avx512, torch 2.13.0+cpu"))
    moved = {name for name in STAGES if (amx[name] or {}).get("key") != (avx512[name] or {}).get("key")}
    assert moved == {name for name in descendants(training) if one[name] is not None}
    # the accelerator's kind and model: a cache filled on one GPU served any other
    assert stages.accelerator_kernels("mps") == f"mps, torch {torch.__version__}"
    gpus = [stage_specs(base, "task-x", None, stages.accelerator_kernels("mps")), accelerator]
    moved = {name for name in STAGES if (gpus[0][name] or {}).get("key") != (gpus[1][name] or {}).get("key")}
    assert moved == {name for name in descendants(training) if one[name] is not None}


def test_a_model_folder_rewritten_in_place_gets_new_keys(tmp_path: Path):
    """A model folder is named by its path in the configuration; what the path holds is hashed too (its files'
    sizes and modification times), so new weights saved over old ones never reuse what the old ones built (the
    tokenizer's key hashes the folder's files but the weights: it stays)."""
    folder = tmp_path / "my-teacher"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"old weights")
    base = cfg.apply_overrides(cfg.resolve("default"), {"models.teacher": str(folder)})
    before = stage_specs(base, "task-x")
    assert stage_specs(base, "task-x") == before
    (folder / "model.safetensors").write_bytes(b"new weights, longer")
    after = stage_specs(base, "task-x")
    moved = {name for name in STAGES if (before[name] or {}).get("key") != (after[name] or {}).get("key")}
    readers = {s.name for s in STAGES.values() if "models.teacher" in s.reads and s.collective
               and before[s.name] is not None}
    assert "teacher" in moved and moved == {n for n in descendants(readers) if before[n] is not None}


def model_folder(path: Path) -> str:
    """A model folder as stage_specs sees it: its files' names, sizes and modification times."""
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")
    return str(path)


def moved_keys(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


def test_the_tokenizer_is_keyed_by_the_model_whose_tokenizer_it_saves(tmp_path: Path):
    """With pretrained roles the tokenizer stage saves the first one's tokenizer (preflight refuses roles that do not
    share it). Its key, a parent of every later stage, hashed every role's name and files and task.vocab_size: another
    student, or new student weights, retrained the oracle and the teacher (hours at paper scale). Now those move the
    student's stages only; the first role's tokenizer files move everything."""
    roles = {f"models.{role}": model_folder(tmp_path / role) for role in ("oracle", "teacher", "student")}
    base = cfg.apply_overrides(cfg.resolve("default"), roles)
    before = stage_keys(base)
    student = {n for n in descendants({"student"}) if n in before}
    assert moved_keys(before, stage_keys(cfg.apply_overrides(base, {"models.student": model_folder(
        tmp_path / "other-student")}))) == student
    (tmp_path / "student" / "model.safetensors").write_bytes(b"new weights, longer")
    assert moved_keys(before, stage_keys(base)) == student
    assert stage_keys(cfg.apply_overrides(base, {"task.vocab_size": 4096})) == stage_keys(base)  # not read
    before = stage_keys(base)
    (tmp_path / "oracle" / "model.safetensors").write_bytes(b"new oracle weights")
    assert "tokenizer" not in moved_keys(before, stage_keys(base)) and "oracle" in moved_keys(before, stage_keys(base))
    before = stage_keys(base)
    (tmp_path / "oracle" / "tokenizer.json").write_text('{"model": "another"}')
    assert moved_keys(before, stage_keys(base)) == {n for n in descendants({"tokenizer"}) if n in before}


def test_the_architecture_is_keyed_only_for_the_models_built_from_a_size_preset(tmp_path: Path):
    """models.arch says what a size preset is built as; a pretrained role is loaded as its folder says, yet changing
    the setting retrained it and everything after it."""
    roles = {f"models.{role}": model_folder(tmp_path / role) for role in ("oracle", "teacher")}
    base = cfg.apply_overrides(cfg.resolve("default"), {**roles, "models.student": "xxs"})
    before = stage_keys(base)
    llama = stage_keys(cfg.apply_overrides(base, {"models.arch": "llama"}))
    assert moved_keys(before, llama) == {n for n in descendants({"student"}) if n in before}  # the size preset's
    everything_pretrained = cfg.apply_overrides(base, {"models.student": model_folder(tmp_path / "student")})
    assert stage_keys(cfg.apply_overrides(everything_pretrained, {"models.arch": "llama"})) == stage_keys(
        everything_pretrained)


def test_a_pretrained_model_s_training_is_keyed_as_trained_without_dropout(tmp_path: Path):
    """Since pretrained checkpoints train without their dropout (models.without_dropout), their training stages'
    keys say so: an older build's artifacts, trained with it, are not reused. Size presets, built without dropout
    all along, keep their keys."""
    folder = tmp_path / "my-teacher"
    folder.mkdir()
    specs = stage_specs(cfg.apply_overrides(cfg.resolve("default"), {"models.teacher": str(folder)}), "task-x")
    assert specs["teacher"]["inputs"]["models.teacher dropout"] == 0.0
    assert not any("dropout" in key for name in ("tokenizer", "oracle") for key in specs[name]["inputs"])
    assert not any("dropout" in key for spec in stage_specs(cfg.resolve("default"), "task-x").values() if spec
                   for key in spec["inputs"])


def test_stage_two_settings_change_no_upstream_key_but_the_offline_dataset_and_its_signals():
    base = cfg.resolve("default")
    specs = stage_specs(base, "task-x")
    for key, value in {"distill.loss": "reverse_kl", "distill.steps": 7, "distill.lr": 1e-4, "eval.every": 3,
                       "distill.sources": ["online_teacher"]}.items():
        other = stage_specs(cfg.apply_overrides(base, {key: value}), "task-x")
        assert {n for n in STAGES if (specs[n] or {}).get("key") != (other[n] or {}).get("key")} <= {"offline_data",
                                                                                                 "teacher_signals"}


def test_a_stage_cannot_read_a_key_it_did_not_declare():
    view = ConfigView(cfg.resolve("default"), ("models.arch", "oracle"), "oracle")
    assert view.models.arch == "gpt2" and view.oracle.epochs == 1.3
    with pytest.raises(UndeclaredRead, match="stage 'oracle' reads 'models.teacher' without declaring it"):
        view.models.teacher
    with pytest.raises(UndeclaredRead):
        view.seed


def test_each_build_reads_only_what_it_declares(tiny_config: cfg.LabConfig, tmp_path: Path):
    """Every stage's build ran in the lab tests; here each stage's build function is checked for reads of
    undeclared keys by running the whole upstream with views (the default path of prepare_upstream)."""
    from teacherhack.cache import ArtifactCache

    up = stages.prepare_upstream(cfg.apply_overrides(tiny_config, {"pretrain.epochs": 0.5}),
                                 ArtifactCache(tmp_path / "cache"), "cpu", {})
    assert up.offline is not None and up.references.exists()


def test_top_k_signals_are_keyed_by_what_they_depend_on():
    base = cfg.apply_overrides(cfg.resolve("default"), {"distill.top_k": 16})
    specs = stage_specs(base, "task-x")
    for key, value in {"distill.loss_temperature": 2.0, "distill.top_k_dtype": "bfloat16", "distill.top_k": 4}.items():
        other = stage_specs(cfg.apply_overrides(base, {key: value}), "task-x")
        assert specs["teacher_signals"]["key"] != other["teacher_signals"]["key"], key
    dense = stage_specs(cfg.resolve("default"), "task-x")
    cooler = stage_specs(cfg.resolve("default", {"distill.loss_temperature": 2.0}), "task-x")
    assert dense["teacher_signals"]["key"] == cooler["teacher_signals"]["key"]  # full distributions: temperature-free


# The stage keys of the default and quick presets as the code computed them before any keyed_when_set setting
# existed (the artifacts cached under them and the recorded sweeps are valid while these hold), and a digest of
# every sweep preset's runs' keys on both presets
RECORDED_KEYS = {
    "default": {
        "splits": "splits-5f80674683ca714e", "tokenizer": "tokenizer-a8f34bb82959da79",
        "oracle": "oracle-2ce7f3edaa880253", "oracle_samples": "oracle_samples-cc85ee27d1c26248",
        "teacher": "teacher-6d22ca6db610ecc0", "student": "student-ee8d95372adc3b04",
        "references": "references-4f29f37da3abc3d5", "train_references": "train_references-97b02f41e98717b2",
        "reference_scores": "reference_scores-48e80369e1595c3a", "offline_data": "offline_data-e599c16a7322bed8",
        "teacher_signals": "teacher_signals-e5004e05409251ef", "distill_prompts": "distill_prompts-84b8f8e5cb83f58a"},
    "quick": {
        "splits": "splits-865fbf53c7db50d1", "tokenizer": "tokenizer-1cf626743169f4a4",
        "oracle": "oracle-99388e9da2463366", "oracle_samples": "oracle_samples-a2c76bfc07255c3b",
        "teacher": "teacher-e3943f7dbe40059f", "student": "student-c64f17f3baeafa9e",
        "references": "references-7076e0488597e336", "train_references": "train_references-4674bf760093cfe3",
        "reference_scores": "reference_scores-b77b56302cd0b641", "offline_data": "offline_data-812c44da66fd1eb6",
        "teacher_signals": "teacher_signals-7399dc8992b01768", "distill_prompts": "distill_prompts-b2846cf32ed4fea2"},
}
RECORDED_SWEEP_KEYS = (324, "fab76ae36b756b30d6d20109c501691cc77f8128d7b431512b02ba9c59c531a0")


def stage_keys(config: cfg.LabConfig) -> dict[str, str]:
    return {name: spec["key"] for name, spec in stage_specs(config, "task-x").items() if spec is not None}


def test_settings_added_since_keep_every_recorded_key_at_their_defaults():
    """grad_accum of the supervised stages and sampling_batch came after artifacts were cached and sweeps recorded:
    at their defaults the keys are those the code computed before them; set, they are keys of their own."""
    runs = {}
    for preset, recorded in RECORDED_KEYS.items():
        base = cfg.resolve(preset)
        assert stage_keys(base) == recorded, preset
        for sweep, spec in SWEEPS.items():
            for r in expand(sweep, base.distill.prompts or base.task.n_distill, base.task.n_distill, spec.seeds):
                runs[f"{preset} {sweep} {r.name}"] = stage_keys(cfg.apply_overrides(base, r.overrides))
    digest = hashlib.sha256(json.dumps(runs, sort_keys=True).encode()).hexdigest()
    assert (len(runs), digest) == RECORDED_SWEEP_KEYS
    default = stage_keys(cfg.resolve("default"))
    assert stage_keys(cfg.resolve("default", {"sampling_batch": 256, "oracle.grad_accum": 1})) == default
    written = cfg.resolve("default").to_dict()  # a config.yaml or sweep.json written before the settings existed
    del written["sampling_batch"]
    for section in ("pretrain", "oracle", "teacher", "student"):
        del written[section]["grad_accum"]
    assert cfg.from_dict(written) == cfg.resolve("default")  # resumes as the same configuration, on the same keys
    for key, stage in {"sampling_batch": "oracle_samples", "oracle.grad_accum": "oracle",
                       "student.grad_accum": "student"}.items():
        assert stage_keys(cfg.resolve("default", {key: 2}))[stage] != default[stage], key
