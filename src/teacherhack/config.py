"""The lab's configuration: plain typed dataclasses, ``key=value`` overrides on a named preset, validation.

Every run writes its fully resolved configuration (``config.yaml``) next to its results; the artifact cache
keys each stage by the parts of this configuration it declares it reads (``teacherhack.stages``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from teacherhack.divergences import DIVERGENCES, ESTIMATORS, check_estimator
from teacherhack.errors import UserError
from teacherhack.generation import BACKENDS
from teacherhack.models import ARCHITECTURES, SIZES, split_revision
from teacherhack.presets import LAB_PRESETS
from teacherhack.tasks import absolute_path, absolute_spec
from teacherhack.tokenizer import MIN_VOCAB

SOURCES: tuple[str, ...] = ("offline", "online_teacher", "online_student", "mixture")
# The token-level divergences on the teacher's distribution, hard-label cross-entropy on the sampled tokens
# (sequence-level KD), and on-policy distillation's reverse KL on the student's sampled tokens
LOSSES: tuple[str, ...] = DIVERGENCES + ("hard_ce", "sampled_reverse_kl")
CONVENTIONS: tuple[str, ...] = ("tail", "renormalized")
SIGNAL_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3")
SCHEDULES: tuple[str, ...] = ("constant", "cosine")
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "bfloat16-fp32-attention")
SAMPLING_BATCH = 256  # rows per generation call: sampling_batch's default


class ConfigError(UserError, ValueError):
    """A configuration the lab cannot run; the message says which key and what is allowed."""


def keyed_when_set(default: Any) -> Any:
    """A setting added after artifacts were cached and sweeps recorded: the stages' keys hash it only where it differs
    from ``default`` (``teacherhack.stages.stage_specs``), so every configuration written before it keeps its keys."""
    return field(default=default, metadata={"keyed_when_set": True})


@dataclass
class TaskConfig:
    # built in: "kjv-rv" (translation), "debian-descriptions" (summarisation), "wordnet" (definitions); "jsonl:PATH", "xsum", "wmt14", "natural-instructions" (hub, or "xsum:PATH" for a
    # local copy), "hf:NAME_OR_PATH" or a .jsonl/.csv/.parquet path (with prompt_field/response_field)
    spec: str = "kjv-rv"
    split: str = "train"
    hub_config: str | None = None  # the hub dataset's configuration (e.g. "de-en" for wmt14)
    prompt_field: str | None = None  # for generic datasets; named tasks have their own mapping
    response_field: str | None = None
    limit: int | None = None  # keep a fixed random sample of at most this many pairs
    n_validation: int = 200
    n_distill: int = 8000  # the distillation pool carved from the task; distill.prompts of it are used
    n_stage1: int = 5000
    n_oracle: int | None = None  # oracle training pairs; None = all that remain
    max_prompt_len: int = 48
    max_response_len: int = 48
    vocab_size: int = 1024
    seed: int = 0


@dataclass
class ModelsConfig:
    arch: str = "gpt2"
    # a size preset, or a local folder / hub id with from_pretrained (ORG/NAME@REVISION: a branch, tag or commit);
    # a run pins each hub id to the commit the Hugging Face cache holds for it, and its config.yaml records that
    oracle: str = "m"
    teacher: str = "m"
    student: str = "xs"
    oracle_temperature: float = 1.0  # τ < 1 sharpens the ground truth (exactly, for sampling and scoring)
    # weights of the models as they load: "float32" only. bf16 weights trained AdamW in bf16 (moments and updates
    # below bf16's resolution rounded away); bf16 speed comes from precision=bfloat16, autocast over float32 weights
    dtype: str = "float32"
    # Run the Python code a model or tokenizer folder ships (an ``auto_map`` in its config)? Off: such a folder is
    # refused before anything runs. Turn it on only for folders you trust.
    trust_remote_code: bool = False
    # The real vocabulary the three models share when their output layers are padded to different sizes (e.g.
    # 152,064 vs 151,936 for one tokenizer): entries at or beyond it are ignored. Different sizes are refused
    # unless this is declared.
    vocab_size: int | None = None


@dataclass
class TrainConfig:
    """One supervised stage (oracle on real pairs, teacher or student SFT on oracle samples)."""

    samples: int | None = None  # training pairs used; None = all available
    epochs: float = 1.0
    batch_size: int = 32  # rows per optimizer step
    # Micro-batches per step (memory): batch_size / grad_accum rows per forward and backward, normalised so that the
    # step is the whole batch's, to float rounding (so a value other than 1 has artifacts of its own)
    grad_accum: int = keyed_when_set(1)
    lr: float = 1e-3
    warmup: int = 50
    schedule: str = "cosine"


@dataclass
class DistillConfig:
    sources: list[str] = field(default_factory=lambda: ["offline", "online_teacher", "online_student"])
    loss: str = "forward_kl"
    beta: float = 0.5  # JSD(β)
    alpha: float = 0.1  # skew KL
    loss_temperature: float = 1.0
    # The teacher's signal: None = its full next-token distribution; k = its k most likely tokens' log-probs (what
    # sparse-logit caches store), with the rest as one tail bucket ("tail") or dropped and renormalised
    # ("renormalized"); stored for the offline dataset as top_k_dtype
    top_k: int | None = None
    top_k_convention: str = "tail"
    top_k_dtype: str = "float16"
    # The offline dataset's full teacher distributions are computed once and kept (exact) when they fit in this
    # many MB; otherwise the teacher runs again at every step. 0: never keep them
    teacher_cache_mb: int = 1024
    # Online sources whose loss runs the teacher (online_student, mixture): its keys and values on the distillation
    # prompts are computed once and reused, so that its forward runs on the responses alone (decoder-only teachers;
    # within teacher_cache_mb). The same distributions, not the same bits (in float32 about 1e-6 on the logits; under
    # bf16 autocast up to bf16's own rounding, about 1e-2), so off by default: the recorded results were made without it
    teacher_prompt_cache: bool = False
    # sampled_reverse_kl (online_student only): the per-token estimator of KL(student‖teacher) and the discount
    # of its reward-to-go (1: the unbiased sequence-level gradient; 0: the per-token advantage of Tinker's recipe)
    kl_estimator: str = "k1"
    discount: float = 1.0
    prompts: int | None = 500  # distillation prompts used, the first n of the task's pool; None = all
    generations_per_prompt: int = 1  # k, for the offline dataset
    mixture_lambda: float = 0.5  # online-student fraction of batches for the "mixture" source
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 100
    schedule: str = "constant"
    chunk_size: int | None = None  # chunk the loss along the sequence (memory)
    generation: str = "auto"  # online sampling: "hf", "vllm" (decoder-only models), or "auto" (vLLM where it can run)
    sync_every: int = 1  # steps between student-weight syncs into a separate sampler (vLLM)
    max_grad_norm: float = 1.0


@dataclass
class EvalConfig:
    every: int = 100
    prompts: int = 200  # validation prompts used (≤ task.n_validation)
    # > 1: the samples of one prompt are correlated, so every SE is clustered by prompt (that of the mean over the
    # task's prompts; run.json records the layout for those who read per_sample.jsonl back)
    samples_per_prompt: int = 1
    estimator: str = "token_kl"
    per_token: bool = False  # nats per token instead of nats per sequence (needs estimator=log_ratio)
    # fresh student samples per evaluation for KL(student‖oracle), KL(student‖teacher) and H(student); 0 = off (the
    # default lab: they are half of each evaluation's time, and no verdict or detector reads them)
    reverse_samples: int = 0
    batch_size: int = 200


@dataclass
class LabConfig:
    preset: str = "default"
    seed: int = 0  # the run's seed: teacher and student initialisation, data order, samples, references
    oracle_seed: int = 0  # the ground truth's own seed, kept apart so that run seeds share one oracle
    device: str = "auto"
    threads: int | None = None  # torch threads; None = torch's default
    # Arithmetic of the training passes (every stage): "float32", or "bfloat16" autocast (CPUs with AVX-512 BF16,
    # GPUs): faster, with float32 weights, gradients and optimizer state; "bfloat16-fp32-attention": the same with
    # attention in float32, 1.11-1.36x faster training steps on CPU (BENCHMARKS.md). Sampling and evaluation stay
    # float32.
    precision: str = "bfloat16"
    # Rows per generation call when the upstream stages sample a dataset (the oracle's answers, the offline set) and
    # when stage 2's online-teacher source draws its block of steps (sampling_batch // distill.batch_size of them), and
    # per teacher forward of the offline signals or the prompt states: their memory (T5-XL's float32 cross-attention
    # cache at 1,024 prompt tokens: about 0.4 GB a row). Each call draws from its own generator, so another value
    # draws other samples of the same distributions (other artifacts: keyed)
    sampling_batch: int = keyed_when_set(SAMPLING_BATCH)
    task: TaskConfig = field(default_factory=TaskConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    # Shared pre-training of each model size on unlabelled text of the task's languages, the stand-in for the
    # paper's pre-trained T5 checkpoints; epochs = 0 turns it off.
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=0.0))
    oracle: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.3, lr=1.5e-3, warmup=100))
    # An imperfect teacher: few oracle samples, many epochs, constant learning rate (see docs/PHENOMENON.md).
    teacher: TrainConfig = field(default_factory=lambda: TrainConfig(samples=1000, epochs=16.0, schedule="constant"))
    student: TrainConfig = field(default_factory=lambda: TrainConfig(samples=5000, epochs=1.0))
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Parse a command-line string (or check a YAML value) against a field's type annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: cannot read {value!r} as {annotation}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        items = _list_text(value, key) if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v.strip() if isinstance(v, str) else v, item, key) for v in items if v != ""]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _list_text(text: str, key: str) -> list[Any]:
    """A list written on the command line: YAML (``[offline, online_teacher]``) or comma-separated."""
    if text.strip().startswith("["):
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{key}: cannot read {text!r} as a YAML list ({error.problem})") from None
        if isinstance(items, list):
            return [str(item) if isinstance(item, (int, float)) and not isinstance(item, bool) else item for item in items]
    return text.split(",")


def _floats(config: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float setting, by its dotted key."""
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            found += _floats(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            found.append((f"{prefix}{f.name}", value))
    return found


def all_keys(cls: type = LabConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, annotation in _field_types(cls).items():
        if dataclasses.is_dataclass(annotation):
            keys += all_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def apply_overrides(config: LabConfig, overrides: dict[str, Any]) -> LabConfig:
    """A copy of ``config`` with dotted ``key: value`` overrides applied (strings are parsed)."""
    config = _copy(config)
    known = all_keys()
    for key, value in overrides.items():
        if key == "preset":
            raise ConfigError("preset is not a setting: choose it with --preset (a --set applies on top of it)")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        *path, name = key.split(".")
        target = config
        for part in path:
            target = getattr(target, part)
        setattr(target, name, _coerce(value, _field_types(type(target))[name], key))
    return config


def _copy(config: LabConfig) -> LabConfig:
    return from_dict(config.to_dict())


def from_dict(data: dict[str, Any], cls: type = LabConfig, prefix: str = "") -> Any:
    """Rebuild a config from nested dicts (e.g. a saved config.yaml), checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in sorted(unknown))}")
    values = {}
    for name, value in data.items():
        annotation = types_[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = from_dict(value, annotation, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, annotation, prefix + name)
    return cls(**values)


def resolve(preset: str = "default", overrides: dict[str, Any] | None = None) -> LabConfig:
    """The configuration a run uses: defaults, then the preset, then the user's overrides; validated."""
    if preset not in LAB_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(LAB_PRESETS)}")
    config = apply_overrides(LabConfig(preset=preset), LAB_PRESETS[preset])
    config = apply_overrides(config, overrides or {})
    _absolute_paths(config)
    validate(config)
    return config


def _absolute_paths(c: LabConfig) -> None:
    """Make the local paths of ``c`` absolute (``~`` expanded): its config.yaml then says which files a run read,
    and resuming it from another working directory reads the same files or is refused, naming the path. A built-in
    task, a size preset and a hub id stay as they are (a model is a path only where that folder exists)."""
    c.task.spec = absolute_spec(c.task.spec)
    for role in ("oracle", "teacher", "student"):
        name = getattr(c.models, role)
        if name.strip() and name not in SIZES and Path(name).expanduser().exists():
            setattr(c.models, role, absolute_path(name))


def _flat(c: LabConfig) -> dict[str, Any]:
    """Every setting of ``c`` by its dotted key, in the order of `all_keys`."""
    values = {}
    for key in all_keys():
        target: Any = c
        for part in key.split("."):
            target = getattr(target, part)
        values[key] = target
    return values


def assignments(config: LabConfig) -> list[str]:
    """The ``key=value`` settings (as ``--set`` takes them) that turn ``config.preset`` into ``config``."""
    def text(value: Any) -> str:
        if isinstance(value, list):
            return ",".join(text(v) for v in value)
        return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    preset = _flat(resolve(config.preset))
    return [f"{key}={text(value)}" for key, value in _flat(config).items() if value != preset[key]]


def differences(before: LabConfig, after: LabConfig) -> list[str]:
    """``key: before → after`` for each setting that differs, to name what makes two configurations differ."""
    old = _flat(before)
    return [f"{key}: {old[key]!r} → {value!r}" for key, value in _flat(after).items() if value != old[key]]


def parse_assignments(assignments: list[str]) -> dict[str, str]:
    overrides = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def validate(c: LabConfig) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    require(c.preset in LAB_PRESETS, f"unknown preset {c.preset!r}; choose one of {', '.join(LAB_PRESETS)}")
    for key, value in _floats(c):
        require(math.isfinite(value), f"{key} must be a finite number, got {value}")
    require(c.threads is None or c.threads >= 1, f"threads must be >= 1 (or null: torch's default), got {c.threads}")
    require(c.sampling_batch >= 1, f"sampling_batch must be >= 1 (rows per generation call), got {c.sampling_batch}")
    require(bool(re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", c.device)),
            f"device must be auto, cpu, mps, cuda or cuda:N, got {c.device!r}")
    require(c.models.arch in ARCHITECTURES, f"models.arch must be one of {', '.join(ARCHITECTURES)}, got {c.models.arch!r}")
    for role in ("oracle", "teacher", "student"):
        value = getattr(c.models, role)
        require(bool(value.strip()), f"models.{role} must name a size preset ({', '.join(SIZES)}) or a model folder / hub id")
        try:
            split_revision(value)
        except ValueError as error:
            raise ConfigError(f"models.{role}={value!r}: {error}") from None
    require(c.models.oracle_temperature > 0, "models.oracle_temperature must be > 0")
    require(c.models.dtype == "float32",
            f"models.dtype={c.models.dtype}: the models' weights are float32 (bf16 weights would train AdamW in bf16, "
            f"rounding most updates away); for bf16 arithmetic use precision=bfloat16, autocast over float32 weights")
    require(c.models.vocab_size is None or c.models.vocab_size >= 2, "models.vocab_size must be >= 2")
    require(c.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {c.precision!r}")
    require(bool(c.distill.sources), "distill.sources must name at least one source")
    for source in c.distill.sources:
        require(source in SOURCES, f"unknown source {source!r} in distill.sources; choose from {', '.join(SOURCES)}")
    require(len(set(c.distill.sources)) == len(c.distill.sources), "distill.sources lists a source twice")
    require(c.distill.loss in LOSSES, f"unknown loss {c.distill.loss!r}; choose one of {', '.join(LOSSES)}")
    require(0.0 <= c.distill.beta <= 1.0, "distill.beta must lie in [0, 1]")
    require(0.0 <= c.distill.alpha < 1.0, "distill.alpha must lie in [0, 1)")
    require(0.0 <= c.distill.mixture_lambda <= 1.0, "distill.mixture_lambda must lie in [0, 1]")
    require(c.distill.loss_temperature > 0, "distill.loss_temperature must be > 0")
    d = c.distill
    require(d.top_k is None or d.top_k >= 1, f"distill.top_k must be >= 1 (or none: the full distribution), got {d.top_k}")
    require(d.top_k_convention in CONVENTIONS, f"distill.top_k_convention must be one of {', '.join(CONVENTIONS)}")
    require(d.top_k_dtype in SIGNAL_DTYPES, f"distill.top_k_dtype must be one of {', '.join(SIGNAL_DTYPES)}")
    require(d.top_k is None or d.loss in DIVERGENCES,
            f"distill.top_k applies to the divergences on the teacher's distribution, not to loss {d.loss}")
    require(d.teacher_cache_mb >= 0, "distill.teacher_cache_mb must be >= 0")
    require(not d.teacher_prompt_cache or c.models.arch != "t5",
            "distill.teacher_prompt_cache keeps a decoder's keys and values: it needs models.arch gpt2 or llama")
    require(d.generation != "vllm" or c.models.arch != "t5",
            "distill.generation=vllm serves decoder-only models: it needs models.arch gpt2 or llama (auto and hf "
            "sample T5 with Hugging Face's decoder)")
    require(d.kl_estimator in KL_ESTIMATORS, f"distill.kl_estimator must be one of {', '.join(KL_ESTIMATORS)}")
    require(0.0 <= d.discount <= 1.0, "distill.discount must lie in [0, 1]")
    require(d.loss != "sampled_reverse_kl" or d.sources == ["online_student"],
            "distill.loss=sampled_reverse_kl is on-policy: it needs distill.sources=online_student (the student's "
            "own samples) and no other source")
    require(d.loss != "sampled_reverse_kl" or d.loss_temperature == 1.0,
            "distill.loss=sampled_reverse_kl estimates KL(student‖teacher) from the student's samples, which are drawn "
            "at temperature 1: it needs distill.loss_temperature=1")
    own = sorted({"online_student", "mixture"} & set(d.sources))
    require(d.loss != "hard_ce" or not own,
            f"distill.loss=hard_ce trains on the sampled tokens as labels and reads no teacher distribution: on the "
            f"student's own samples ({', '.join(own)}) it would learn from itself alone; use it with offline or "
            f"online_teacher")
    require(d.loss != "hard_ce" or d.loss_temperature == 1.0,
            "distill.loss=hard_ce has no teacher distribution to temper: it needs distill.loss_temperature=1")
    require(c.eval.estimator in ESTIMATORS, f"eval.estimator must be one of {', '.join(ESTIMATORS)}")
    for section in ("pretrain", "oracle", "teacher", "student"):
        t: TrainConfig = getattr(c, section)
        require(t.epochs >= 0 and t.batch_size > 0 and t.lr > 0 and t.warmup >= 0,
                f"{section}: batch_size and lr must be > 0, epochs and warmup >= 0 (epochs 0: no training)")
        require(t.grad_accum > 0 and t.batch_size % t.grad_accum == 0,
                f"{section}.grad_accum must be > 0 and divide {section}.batch_size into equal micro-batches, got "
                f"grad_accum={t.grad_accum} for batch_size={t.batch_size}")
        require(t.schedule in SCHEDULES, f"{section}.schedule must be one of {', '.join(SCHEDULES)}")
        require(t.samples is None or t.samples > 0, f"{section}.samples must be > 0")
    require(d.steps > 0 and d.batch_size > 0 and d.grad_accum > 0 and d.lr > 0 and d.warmup >= 0,
            "distill: steps, batch_size, grad_accum, lr must be > 0 and warmup >= 0")
    require(d.max_grad_norm > 0, f"distill.max_grad_norm must be > 0 (the gradient norm it clips to), got "
                                 f"{d.max_grad_norm}")
    require(d.batch_size % d.grad_accum == 0, "distill.batch_size must be a multiple of distill.grad_accum")
    require(d.schedule in SCHEDULES, f"distill.schedule must be one of {', '.join(SCHEDULES)}")
    require(d.prompts is None or 0 < d.prompts <= c.task.n_distill,
            f"distill.prompts must lie in [1, task.n_distill={c.task.n_distill}], got {d.prompts}")
    require(d.generations_per_prompt >= 1, "distill.generations_per_prompt must be >= 1")
    require(d.chunk_size is None or d.chunk_size >= 1, "distill.chunk_size must be >= 1")
    require(d.generation in BACKENDS, f"distill.generation must be one of {', '.join(BACKENDS)}")
    require(d.sync_every >= 1, "distill.sync_every must be >= 1")
    # a run resumes from an evaluation's checkpoint, and only at a sync can a separate sampler (vLLM) be given the
    # weights the uninterrupted run sampled from: elsewhere it would get the newer ones, other samples from then on
    require(c.eval.every % d.sync_every == 0,
            f"distill.sync_every={d.sync_every} must divide eval.every={c.eval.every}: a killed run resumes from an "
            f"evaluation's checkpoint, and only at a sync does its sampler get the weights the uninterrupted run used")
    t = c.task
    require(min(t.n_validation, t.n_distill, t.n_stage1) > 0, "task: n_validation, n_distill and n_stage1 must be > 0")
    require(t.n_oracle is None or t.n_oracle > 0, "task.n_oracle must be > 0 (or null: every pair left)")
    require(t.limit is None or t.limit > 0, "task.limit must be > 0 (or null: every pair)")
    require(t.max_prompt_len >= 2 and t.max_response_len >= 2, "task: max_prompt_len and max_response_len must be >= 2")
    require(t.vocab_size >= MIN_VOCAB, f"task.vocab_size must be >= {MIN_VOCAB} (the lab's byte-level tokenizer holds "
                                       f"every byte and 3 special tokens), got {t.vocab_size}")
    require(c.teacher.samples is None or c.teacher.samples <= t.n_stage1, "teacher.samples cannot exceed task.n_stage1")
    require(c.student.samples is None or c.student.samples <= t.n_stage1, "student.samples cannot exceed task.n_stage1")
    e = c.eval
    require(e.reverse_samples >= 0, "eval.reverse_samples must be >= 0")
    try:
        check_estimator(e.estimator, e.per_token)
    except ValueError as error:
        raise ConfigError(f"eval.estimator={e.estimator} with eval.per_token={str(e.per_token).lower()}: {error}") from None
    require(e.every > 0 and e.prompts > 0 and e.samples_per_prompt > 0 and e.batch_size > 0, "eval: every, prompts, samples_per_prompt, batch_size must be > 0")
    require(e.prompts <= t.n_validation, "eval.prompts cannot exceed task.n_validation")
