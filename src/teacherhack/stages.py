"""The lab's upstream stages (stages 0 and 1, and what stage 2 needs from them), each a top-level function that
declares the configuration keys and the parent artifacts it reads. A stage's cache key is derived from those
declarations alone, and its build function sees the configuration only through a view that refuses any key
the stage did not declare, so a key cannot miss an input.

    task ─ splits ─ tokenizer ─┬─ oracle ─ oracle_samples ─┬─ teacher ─┬─ references ─ …
                               └─ pretrain (per size) ──────┴─ student  ├─ offline_data
                                                                        └─ distill_prompts (splits, tokenizer)

The root, ``task``, is keyed by the content of the loaded pairs, so an edited data file is a new task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from teacherhack import seeds
from teacherhack.cache import ArtifactCache
from teacherhack.config import LabConfig, TrainConfig, apply_overrides
from teacherhack.distributed import log
from teacherhack.metrics import (
    SampleSet,
    draw_samples,
    load_sample_sets,
    reference_logprobs,
    sample_in_batches,
    save_sample_sets,
    teacher_golden_key,
    teacher_golden_values,
)
from teacherhack.divergences import response_mask
from teacherhack.models import (
    LM,
    SIZES,
    build_model,
    collate_prompts,
    from_pretrained,
    load_pretrained,
    pad_responses,
    pin,
)
from teacherhack.sources import FixedPairs
from teacherhack.teacher_signals import TeacherSignals, estimate_bytes
from teacherhack.tasks import Pair, Splits, Task, TaskError, load_task, split_task
from teacherhack.tokenizer import (
    check_tokenizers,
    encode_prompts,
    encode_references,
    encode_responses,
    prompt_start,
    special_ids,
    token_ids,
    train_tokenizer,
    truncation_report,
)
from teacherhack.training import sft_loss, train

ROLES = ("oracle", "teacher", "student")
OFFLINE_SOURCES = ("offline", "mixture")  # the sources that read the offline dataset


class UndeclaredRead(AttributeError):
    """A stage read a configuration key it did not declare: a bug in the stage's declaration."""


class ConfigView:
    """A read-only window on a :class:`LabConfig` through which a stage reads only the keys it declared
    (a declared section, e.g. ``"oracle"``, allows every key under it)."""

    def __init__(self, target: Any, allowed: tuple[str, ...], stage: str, prefix: str = "") -> None:
        self._target, self._allowed, self._stage, self._prefix = target, allowed, stage, prefix

    def __getattr__(self, name: str) -> Any:
        key = self._prefix + name
        value = getattr(self._target, name)
        if any(key == a or key.startswith(a + ".") for a in self._allowed):
            return value
        if any(a.startswith(key + ".") for a in self._allowed):
            return ConfigView(value, self._allowed, self._stage, key + ".")
        raise UndeclaredRead(f"stage {self._stage!r} reads {key!r} without declaring it")


@dataclass(frozen=True)
class Stage:
    """A cached stage: ``build(job, out)`` writes the artifact into ``out``."""

    name: str
    build: Callable[["Job", Path], None]
    reads: tuple[str, ...]  # configuration keys (or sections) the artifact depends on: all hashed into its key
    parents: tuple[str, ...] = ()  # stages whose artifacts it reads (their keys are hashed into its key)
    checks: tuple[str, ...] = ()  # keys read to decide something that does not change the artifact
    kind: str = ""  # stages of one kind with equal inputs share one artifact (pre-training, per model size)
    inputs: Callable[[ConfigView], dict[str, Any]] | None = None  # what the key hashes; default: ``reads``
    needed: Callable[[ConfigView], bool] | None = None  # None: always built
    collective: bool = False  # training: under a launcher, every process takes part
    version: int = 1  # raise when the build's output changes for the same inputs (a new file format, a fix)

    def view(self, config: LabConfig) -> ConfigView:
        return ConfigView(config, self.reads + self.checks, self.name)


STAGES: dict[str, Stage] = {}  # in dependency order


def stage(name: str, **declaration: Any) -> Callable[[Callable[["Job", Path], None]], Callable[["Job", Path], None]]:
    """Register a top-level build function as the stage ``name``."""

    def register(build: Callable[[Job, Path], None]) -> Callable[[Job, Path], None]:
        STAGES[name] = Stage(name, build, **declaration)
        return build

    return register


@dataclass
class Job:
    """What a build function gets: its configuration view, its parents' artifacts and shared loaders."""

    config: ConfigView
    parents: dict[str, Path]
    device: str
    task: Task
    trust_remote_code: bool = False  # a policy, not an input: it changes no artifact
    models: dict[Path, torch.nn.Module] = field(default_factory=dict)  # loaded once per upstream preparation

    def path(self, parent: str) -> Path:
        return self.parents[parent]

    def splits(self) -> Splits:
        data = json.loads((self.path("splits") / "splits.json").read_text(encoding="utf-8"))
        pairs = {name: [Pair(*p) for p in data[name]] for name in ("oracle_train", "stage1", "distill", "validation")}
        return Splits(**pairs, duplicates=data["duplicates"])

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.path("tokenizer"), trust_remote_code=self.trust_remote_code)

    def lm(self, parent: str, temperature: float = 1.0) -> LM:
        path = self.path(parent)
        if path not in self.models:
            self.models[path] = load_pretrained(path, trust_remote_code=self.trust_remote_code)
        return wrap(self.models[path], self.tokenizer(), self.device, temperature, self.config.models.vocab_size)

    def initial_model(self, role: str, seed: int) -> LM:
        """The role's starting point: the weights it names (a folder or hub id), the shared pre-trained
        checkpoint of its size, or a fresh model of its size preset."""
        c, tokenizer = self.config, self.tokenizer()
        name, vocab = getattr(c.models, role), c.models.vocab_size
        if name not in SIZES:
            model = load_pretrained(name, dtype=getattr(torch, c.models.dtype), trust_remote_code=self.trust_remote_code)
        elif f"pretrain_{role}" in self.parents:
            model = load_pretrained(self.path(f"pretrain_{role}"), trust_remote_code=self.trust_remote_code)
        else:
            ids = special_ids(tokenizer)
            model = build_model(c.models.arch, name, vocab_size=len(tokenizer), pad_id=ids.pad, eos_id=ids.eos,
                                max_positions=c.task.max_prompt_len + c.task.max_response_len, seed=seed)
        return wrap(model, tokenizer, self.device, vocab_size=vocab)


def wrap(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, device: str, temperature: float = 1.0,
         vocab_size: int | None = None) -> LM:
    ids = special_ids(tokenizer)
    return LM(model.to(device), pad_id=ids.pad, eos_id=ids.eos, temperature=temperature, vocab_size=vocab_size)


def pretrained_roles(models: Any) -> dict[str, str]:
    """The roles that name a model folder or hub id rather than a size preset."""
    return {role: name for role in ROLES if (name := getattr(models, role)) not in SIZES}


def pin_models(config: LabConfig) -> LabConfig:
    """``config`` with every hub id pinned to the commit the local Hugging Face cache holds for it
    (:func:`teacherhack.models.pin`): the names the stages' keys hash and their loads pass on, and what a run's
    ``config.yaml`` records (rerun it to train on exactly those weights). Folders and size presets stay as they are."""
    pins = {f"models.{role}": pinned for role, name in pretrained_roles(config.models).items()
            if (pinned := pin(name)) != name}
    return apply_overrides(config, pins) if pins else config


def save_ids(path: Path, prompts: list[list[int]], responses: list[list[int]] | None = None) -> None:
    """Token ids of prompts (and responses) as one JSON file: the format of the pair artifacts."""
    path.write_text(json.dumps({"prompts": prompts, "responses": responses}))


def load_ids(path: Path) -> tuple[list[list[int]], list[list[int]] | None]:
    data = json.loads(path.read_text())
    return data["prompts"], data["responses"]


def rows_until_eos(responses: torch.Tensor, eos_id: int) -> list[list[int]]:
    """Sampled [B, T] responses back to lists, each cut after its first EOS."""
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in responses.tolist()]


def fit(lm: LM, prompts: list[list[int]], responses: list[list[int]], t: TrainConfig, seed: int, desc: str,
        precision: str) -> None:
    """Supervised training (cross-entropy) on the first ``t.samples`` pairs for ``t.epochs`` epochs."""
    n = len(prompts) if t.samples is None else min(t.samples, len(prompts))
    steps = max(1, math.ceil(n * t.epochs / t.batch_size)) if t.epochs > 0 else 0
    if steps == 0:
        return
    data = FixedPairs(prompts[:n], responses[:n], batch_size=t.batch_size, seed=seed, pad_id=lm.pad_id, origin=desc)
    train(lm, data, sft_loss(lm), steps=steps, lr=t.lr, warmup=t.warmup, schedule=t.schedule, grad_accum=t.grad_accum,
          precision=precision, desc=desc)


# --------------------------------------------------------------------------------------------------
# The stages, in dependency order
# --------------------------------------------------------------------------------------------------

SPLIT_KEYS = ("task.n_validation", "task.n_distill", "task.n_stage1", "task.n_oracle", "task.seed")
LENGTHS = ("task.max_prompt_len", "task.max_response_len")


@stage("splits", reads=SPLIT_KEYS, parents=("task",))
def build_splits(job: Job, out: Path) -> None:
    """Disjoint prompt pools: oracle training pairs, stage-1 prompts, distillation pool, validation."""
    t = job.config.task
    splits = split_task(job.task.pairs, n_stage1=t.n_stage1, n_distill=t.n_distill, n_validation=t.n_validation,
                        n_oracle=t.n_oracle, seed=t.seed)
    data = {name: [[p.prompt, p.response] for p in getattr(splits, name)]
            for name in ("oracle_train", "stage1", "distill", "validation")}
    (out / "splits.json").write_text(json.dumps({**data, "duplicates": splits.duplicates}, ensure_ascii=False),
                                     encoding="utf-8")  # the task's own characters, whatever the locale


def tokenizer_inputs(c: ConfigView) -> dict[str, Any]:
    """What the saved tokenizer is: the first pretrained role's own (its name and, for a folder, its files but the
    weights: config.json can name the tokenizer's class), else a BPE of ``task.vocab_size`` tokens trained on the
    splits. Not the other roles' names or files: preflight refuses, on every command, roles that do not share that
    tokenizer, so another student (or new student weights) keeps the oracle and the teacher built on it."""
    pretrained = list(pretrained_roles(c.models).values())
    if not pretrained:
        return {"vocab_size": c.task.vocab_size, "pretrained": {}}
    return {"tokenizer of": pretrained[0], "files": _model_files(pretrained[0], weights=False)}


@stage("tokenizer", reads=("task.vocab_size", "models.oracle", "models.teacher", "models.student"),
       parents=("splits",), inputs=tokenizer_inputs)
def build_tokenizer(job: Job, out: Path) -> None:
    """The tokenizer all three models share: the first pretrained model's own (:func:`prepare_upstream` checks that
    every role shares it, built or found), or a byte-level BPE trained on the oracle's training text when every
    model is built from a size preset."""
    c = job.config
    pretrained = pretrained_roles(c.models)
    if pretrained:
        first = next(iter(pretrained.values()))
        from_pretrained(AutoTokenizer, first, trust_remote_code=job.trust_remote_code).save_pretrained(out)
        return
    texts = (x for pair in job.splits().oracle_train for x in (pair.prompt, pair.response))
    train_tokenizer(texts, c.task.vocab_size).save_pretrained(out)


def build_pretrain(job: Job, out: Path, role: str) -> None:
    """Shared pre-training of the role's size on unlabelled text of the task's languages (the oracle's training
    pairs, prompts and responses as separate texts): the stand-in for the paper's pre-trained checkpoints."""
    c, tokenizer = job.config, job.tokenizer()
    lm = job.initial_model(role, seed=c.oracle_seed)
    texts = [x for pair in job.splits().oracle_train for x in (pair.prompt, pair.response)]
    log(f"pre-training size {getattr(c.models, role)!r} on {len(texts)} unlabelled texts")
    empty = encode_prompts(tokenizer, [""], c.task.max_prompt_len)[0]  # language modelling: the text is the response
    fit(lm, [empty] * len(texts),
        encode_responses(tokenizer, texts, c.task.max_prompt_len + c.task.max_response_len - len(empty)),
        c.pretrain, c.oracle_seed, f"pretrain {getattr(c.models, role)}", c.precision)
    lm.save(out)


for _role in ROLES:  # one stage per role, one artifact per size: roles of the same size share it
    STAGES[f"pretrain_{_role}"] = Stage(
        f"pretrain_{_role}", partial(build_pretrain, role=_role), kind="pretrain",
        reads=("models.arch", f"models.{_role}", "models.vocab_size", "pretrain", "precision", "oracle_seed",
               *LENGTHS), parents=("splits", "tokenizer"),
        inputs=lambda c, role=_role: {"arch": c.models.arch, "size": getattr(c.models, role), "train": c.pretrain,
                                      "vocab": c.models.vocab_size, "precision": c.precision, "seed": c.oracle_seed,
                                      "lengths": [c.task.max_prompt_len, c.task.max_response_len]},
        needed=lambda c, role=_role: c.pretrain.epochs > 0 and getattr(c.models, role) in SIZES, collective=True)


@stage("oracle", reads=("models.arch", "models.oracle", "models.dtype", "models.vocab_size", "oracle", "precision",
                        "oracle_seed", *LENGTHS), parents=("splits", "tokenizer", "pretrain_oracle"), collective=True)
def build_oracle(job: Job, out: Path) -> None:
    """Stage 0: the oracle, the ground truth, trained on real pairs."""
    c, tokenizer = job.config, job.tokenizer()
    pairs = job.splits().oracle_train
    lm = job.initial_model("oracle", seed=c.oracle_seed)
    log(f"stage 0: training the oracle on {len(pairs)} real pairs")
    fit(lm, encode_prompts(tokenizer, [p.prompt for p in pairs], c.task.max_prompt_len),
        encode_responses(tokenizer, [p.response for p in pairs], c.task.max_response_len),
        c.oracle, c.oracle_seed, "oracle", c.precision)
    lm.save(out)


@stage("oracle_samples", reads=("models.oracle_temperature", "models.vocab_size", "oracle_seed", "sampling_batch",
                                *LENGTHS), parents=("splits", "tokenizer", "oracle"))
def build_oracle_samples(job: Job, out: Path) -> None:
    """Stage 1 data: the oracle answers the stage-1 prompts (at its temperature)."""
    c, tokenizer = job.config, job.tokenizer()
    prompts = encode_prompts(tokenizer, job.splits().stage1_prompts, c.task.max_prompt_len)
    oracle = job.lm("oracle", c.models.oracle_temperature)
    log(f"stage 1: the oracle answers {len(prompts)} prompts")
    responses = sample_in_batches(oracle, collate_prompts(prompts, oracle.pad_id), max_new_tokens=c.task.max_response_len,
                                  batch_size=c.sampling_batch, seed=c.oracle_seed)
    save_ids(out / "pairs.json", prompts, rows_until_eos(responses, oracle.eos_id))


def build_sft(job: Job, out: Path, role: str, init_stream: int) -> None:
    """Stage 1: the teacher or the student, SFT-trained on the oracle's samples."""
    c = job.config
    prompts, responses = load_ids(job.path("oracle_samples") / "pairs.json")
    lm = job.initial_model(role, seed=c.seed + init_stream)
    log(f"stage 1: SFT of the {role} on oracle samples")
    fit(lm, prompts, responses or [], getattr(c, role), c.seed, role, c.precision)
    lm.save(out)


for _role, _stream in (("teacher", seeds.TEACHER_INIT), ("student", seeds.STUDENT_INIT)):
    STAGES[_role] = Stage(
        _role, partial(build_sft, role=_role, init_stream=_stream),
        reads=("models.arch", f"models.{_role}", "models.dtype", "models.vocab_size", _role, "precision", "seed",
               *LENGTHS), parents=("tokenizer", "oracle_samples", f"pretrain_{_role}"),
        collective=True)


@stage("references", reads=("models.oracle_temperature", "models.vocab_size", "eval.prompts", "eval.samples_per_prompt",
                            "eval.batch_size", "seed", *LENGTHS), parents=("splits", "tokenizer", "oracle", "teacher"),
       version=2)
def build_references(job: Job, out: Path) -> None:
    """The evaluation's fixed samples on the validation prompts, drawn once: the oracle's and the teacher's, and
    the task's real responses (cut at the maximum length without an EOS, as a sampled response would be)."""
    c, tokenizer, e = job.config, job.tokenizer(), job.config.eval
    pairs = job.splits().validation[: e.prompts]
    prompts = collate_prompts(encode_prompts(tokenizer, [p.prompt for p in pairs], c.task.max_prompt_len),
                              special_ids(tokenizer).pad)
    log(f"evaluation references: {len(pairs)} prompts × {e.samples_per_prompt} samples of oracle and teacher, "
        f"and their real responses")
    options = dict(samples_per_prompt=e.samples_per_prompt, max_new_tokens=c.task.max_response_len,
                   batch_size=e.batch_size)
    sets = {"oracle": draw_samples(job.lm("oracle", c.models.oracle_temperature), prompts, seed=c.seed, **options),
            "teacher": draw_samples(job.lm("teacher"), prompts, seed=c.seed + 1, **options),
            "real": SampleSet(prompts, pad_responses(encode_references(tokenizer, [p.response for p in pairs],
                                                                       c.task.max_response_len), special_ids(tokenizer).pad))}
    save_sample_sets(out / "references.safetensors", sets)


@stage("train_references", reads=("models.vocab_size", "distill.prompts", "eval.prompts", "eval.samples_per_prompt",
                                  "eval.batch_size", "seed", *LENGTHS), parents=("splits", "tokenizer", "teacher"),
       inputs=lambda c: {"vocab_size": c.models.vocab_size, "samples_per_prompt": c.eval.samples_per_prompt,
                         "batch_size": c.eval.batch_size, "seed": c.seed, "lengths": [c.task.max_prompt_len,
                                                                                      c.task.max_response_len],
                         # the prompts it draws on: pools of any size from eval.prompts up give the same ones
                         "prompts": c.eval.prompts if c.distill.prompts is None
                         else min(c.distill.prompts, c.eval.prompts)})
def build_train_references(job: Job, out: Path) -> None:
    """The teacher's samples on training prompts (the first validation-sized part of the distillation pool),
    drawn once: the proxy measured where the student trains, to set against the held-out proxy."""
    c, tokenizer, e = job.config, job.tokenizer(), job.config.eval
    pool = job.splits().distill_prompts[: c.distill.prompts][: e.prompts]
    prompts = collate_prompts(encode_prompts(tokenizer, pool, c.task.max_prompt_len), special_ids(tokenizer).pad)
    sets = {"train_teacher": draw_samples(job.lm("teacher"), prompts, samples_per_prompt=e.samples_per_prompt,
                                          max_new_tokens=c.task.max_response_len, batch_size=e.batch_size,
                                          seed=c.seed + seeds.TRAIN_REFERENCES)}
    save_sample_sets(out / "references.safetensors", sets)


@stage("reference_scores", reads=("models.oracle_temperature", "models.vocab_size", "eval.batch_size",
                                  "eval.estimator", "eval.per_token"),
       parents=("tokenizer", "oracle", "teacher", "references", "train_references"))
def build_reference_scores(job: Job, out: Path) -> None:
    """The oracle's and the teacher's log-probabilities on their own evaluation references, and the teacher's
    golden distance on the oracle's, computed once: every stage-2 run's evaluator starts from them instead of
    scoring the references again (the same bits)."""
    c, e = job.config, job.config.eval
    references = (load_sample_sets(job.path("references") / "references.safetensors")
                  | load_sample_sets(job.path("train_references") / "references.safetensors"))
    oracle, teacher = job.lm("oracle", c.models.oracle_temperature), job.lm("teacher")
    scores = reference_logprobs({"oracle": oracle, "teacher": teacher, "train_teacher": teacher}, references,
                                eos_id=teacher.eos_id, batch_size=e.batch_size)
    scores[teacher_golden_key(e.estimator, e.per_token)] = teacher_golden_values(
        oracle, teacher, references["oracle"], eos_id=teacher.eos_id, batch_size=e.batch_size,
        estimator=e.estimator, per_token=e.per_token, scores=scores)
    save_file(scores, str(out / "scores.safetensors"))


@stage("offline_data", reads=("models.vocab_size", "distill.prompts", "distill.generations_per_prompt", "seed",
                              "sampling_batch", *LENGTHS),
       checks=("distill.sources",), parents=("splits", "tokenizer", "teacher"),
       needed=lambda c: any(s in OFFLINE_SOURCES for s in c.distill.sources))
def build_offline_data(job: Job, out: Path) -> None:
    """The offline dataset: the teacher's samples on the distillation pool (k per prompt), built once."""
    c, tokenizer, d = job.config, job.tokenizer(), job.config.distill
    pool = encode_prompts(tokenizer, job.splits().distill_prompts[: d.prompts], c.task.max_prompt_len)
    log(f"stage 2 data: the teacher answers {len(pool)} prompts × {d.generations_per_prompt}")
    prompts = [p for p in pool for _ in range(d.generations_per_prompt)]
    teacher = job.lm("teacher")
    responses = sample_in_batches(teacher, collate_prompts(prompts, teacher.pad_id), max_new_tokens=c.task.max_response_len,
                                  batch_size=c.sampling_batch, seed=c.seed + seeds.OFFLINE_SAMPLES)
    save_ids(out / "pairs.json", prompts, rows_until_eos(responses, teacher.eos_id))


@stage("teacher_signals", reads=("models.vocab_size", "distill.top_k", "distill.top_k_dtype", "distill.loss_temperature",
                                 "distill.teacher_cache_mb", "sampling_batch"), checks=("distill.sources",),
       parents=("tokenizer", "teacher", "offline_data"), needed=lambda c: any(s in OFFLINE_SOURCES for s in c.distill.sources),
       inputs=lambda c: ({"dense": True, "budget_mb": c.distill.teacher_cache_mb, "vocab": c.models.vocab_size}
                         if c.distill.top_k is None else
                         {"k": c.distill.top_k, "dtype": c.distill.top_k_dtype, "vocab": c.models.vocab_size,
                          "temperature": c.distill.loss_temperature}))
def build_teacher_signals(job: Job, out: Path) -> None:
    """The teacher's signals on the offline dataset, computed once: its full distributions (exact, when they fit
    in distill.teacher_cache_mb; otherwise none, and the teacher runs at every step) or its top-k log-probs at
    the loss temperature. The teacher is frozen and the dataset fixed, so this is the forward pass that
    distillation on offline data would otherwise repeat every epoch."""
    c, d = job.config, job.config.distill
    prompts, responses = load_ids(job.path("offline_data") / "pairs.json")
    teacher = job.lm("teacher")
    responses = responses or []
    positions = sum(len(r) for r in responses)
    if d.top_k is None and estimate_bytes(positions, len(responses), vocab_size=teacher.vocab_size) > d.teacher_cache_mb * 2**20:
        log(f"stage 2 data: the teacher's distributions on the offline dataset exceed distill.teacher_cache_mb="
            f"{d.teacher_cache_mb}: not kept, the teacher runs at every step")
        (out / "none.json").write_text(json.dumps({"positions": positions, "vocab_size": teacher.vocab_size}))
        return
    parts, rows = [], c.sampling_batch
    for start in range(0, len(responses), rows):
        batch = pad_responses(responses[start:start + rows], teacher.pad_id)
        with torch.no_grad():
            log_p = teacher.next_token_logprobs(collate_prompts(prompts[start:start + rows], teacher.pad_id), batch)
        parts.append(TeacherSignals.from_logprobs(
            log_p, response_mask(batch, teacher.eos_id).to(log_p.device), k=d.top_k,
            dtype=None if d.top_k is None else getattr(torch, d.top_k_dtype),
            temperature=1.0 if d.top_k is None else d.loss_temperature,
            provenance={"teacher": job.path("teacher").name, "dataset": job.path("offline_data").name}))
    signals = TeacherSignals.concat(parts)
    signals.save(out / "signals.safetensors")
    log(f"stage 2 data: the teacher's {signals.kind} signals on the offline dataset, {signals.bytes_per_token:,} bytes "
        f"per token, {signals.n_positions:,} tokens")


@stage("distill_prompts", reads=("distill.prompts", "task.max_prompt_len"), parents=("splits", "tokenizer"))
def build_distill_prompts(job: Job, out: Path) -> None:
    """The distillation pool's prompts (the first ``distill.prompts`` of a shuffled pool: a random subset)."""
    c = job.config
    save_ids(out / "pairs.json", encode_prompts(job.tokenizer(), job.splits().distill_prompts[: c.distill.prompts],
                                                c.task.max_prompt_len))


# --------------------------------------------------------------------------------------------------
# Keys and preparation
# --------------------------------------------------------------------------------------------------


def task_digest(task: Task) -> str:
    """The task's content, as the root of every key: the same pairs, the same artifacts."""
    h = hashlib.sha256()
    for pair in task.pairs:
        h.update(json.dumps([pair.prompt, pair.response], ensure_ascii=False).encode())
    return f"task-{h.hexdigest()[:16]}"


_MODEL_KEYS = ("models.oracle", "models.teacher", "models.student")


# What a model folder's weights are saved as (safetensors, the only ones loaded, and the formats never loaded)
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def _model_files(name: str, weights: bool = True) -> list[tuple[str, int, int]] | None:
    """A local model folder's files (path, size, modification time in ns), without its weights unless ``weights``;
    None for a size preset or a hub id (whose pinned name holds its commit: :func:`pin_models`): a folder whose weights
    are rewritten in place gets new keys, not the artifacts built from its old weights."""
    folder = Path(name).expanduser()
    if name in SIZES or not folder.is_dir():
        return None
    return [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file() and (weights or not p.name.endswith(WEIGHT_FILES))]


# Environment variables that pick oneDNN's or MKL's kernels (and so change the bits): an older instruction set, MKL's
# reproducibility mode (MKL_CBWR=COMPATIBLE takes another sgemm path) or forced CPU type, oneDNN's float32 math mode
# (BF16 lets it run float32 products in bf16)
KERNEL_SETTINGS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
                   "MKL_DEBUG_CPU_TYPE", "ONEDNN_DEFAULT_FPMATH_MODE")


def cpu_kernels() -> str:
    """The CPU's vector kernels, which a training step's bits depend on: its instruction set (bf16 products take AMX
    tiles where the CPU has them and round otherwise than AVX-512's) and any setting the user gave its libraries'
    kernels (an unset one is left out: the keys stay those of before it was named)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()  # private in torch 2.13; absent, not named
    kernels = [torch.backends.cpu.get_cpu_capability() + (" + AMX" if amx else "")]
    kernels += [f"{name}={os.environ[name]}" for name in KERNEL_SETTINGS if os.environ.get(name)]  # set by the user
    return ", ".join(kernels)


def accelerator_kernels(device: str) -> str:
    """What a training step's bits depend on off the CPU: the accelerator's kind and model (a CUDA GPU's compute
    capability) and the software that runs it."""
    kind = torch.device(device).type
    if kind == "cuda":
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return (f"{torch.cuda.get_device_name(index)} (sm {major}.{minor}), torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    return f"{kind}, torch {torch.__version__}"


def stage_specs(config: LabConfig, task_key: str, threads: int | None = None, kernels: str | None = None,
                bos: Sequence[int] = ()) -> dict[str, dict[str, Any] | None]:
    """What each stage's key hashes (None for a stage this configuration does not need), in dependency order.
    ``threads`` and ``kernels``: the CPU threads the training stages run on (None on an accelerator) and the kernels
    they run (:func:`cpu_kernels` with torch's version, or :func:`accelerator_kernels`): a training step's reductions
    and rounding, so the trained models' bits, depend on them, while sampling and scoring give the same bits on any
    thread count. Not the number of processes: a lab's upstream serves its runs on any number of them.
    ``bos``: what the pretrained tokenizer puts before every prompt (:func:`pretrained_bos`), in the tokenizer's key
    when there is any, so in the key of every stage that encodes prompts. Pure:
    computes no artifact, so it is cheap and testable. Hub ids are hashed as ``config`` names them: pin them first
    (:func:`pin_models`, as :func:`prepare_upstream` does), so that their commits are in the keys."""
    keys: dict[str, str | None] = {"task": task_key}
    specs: dict[str, dict[str, Any] | None] = {}
    for s in STAGES.values():
        view = s.view(config)
        if s.needed is not None and not s.needed(view):
            keys[s.name] = specs[s.name] = None
            continue
        later = [key for key in s.reads if _keyed_when_set(*_owner(config, key))]  # hashed by name where set
        inputs = (s.inputs(ConfigView(config, s.reads, s.name)) if s.inputs
                  else {key: _value(config, key) for key in s.reads if key not in later})
        inputs |= {key: _value(config, key) for key in later if not _at_default(*_owner(config, key))}
        if s.collective:  # a training stage starts from its model folder's weights (the tokenizer's key names its
            # own files); a pretrained model trains without its dropout (models.without_dropout): not on artifacts
            # of an older build that trained it with its own
            roles = [key for key in s.reads if key in _MODEL_KEYS]
            inputs |= {f"{key} files": files for key in roles
                       if (files := _model_files(_value(config, key))) is not None}
            inputs |= {f"{key} dropout": 0.0 for key in roles if _value(config, key) not in SIZES}
            if roles and all(_value(config, key) not in SIZES for key in roles):
                inputs.pop("models.arch", None)  # only a size preset is built from it
        if s.name == "tokenizer" and bos:  # prompts start with a pretrained tokenizer's BOS: not on artifacts of an
            # older build that encoded them without it (the tokenizer is a parent of every stage that encodes prompts)
            inputs["prompt start"] = list(bos)
        spec = {"kind": s.kind or s.name, "version": s.version, "inputs": _plain(inputs),
                "parents": {p: keys[p] for p in s.parents if keys[p] is not None}}
        if s.collective:  # a training stage
            spec["threads"] = threads
            if kernels is not None:
                spec["kernels"] = kernels
        blob = json.dumps(spec, sort_keys=True, default=str)
        spec["key"] = keys[s.name] = f"{s.kind or s.name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
        specs[s.name] = spec
    return specs


def pretrained_bos(config: LabConfig) -> list[int]:
    """What the pretrained models' tokenizer puts before every prompt (:func:`prompt_start`: a Llama's BOS), loaded as
    the tokenizer stage loads it (``config``'s hub ids pinned: :func:`pin_models`); nothing when every model is built
    from a size preset (the lab's own tokenizer adds none)."""
    names = list(pretrained_roles(config.models).values())
    if not names:
        return []
    return prompt_start(from_pretrained(AutoTokenizer, names[0], trust_remote_code=config.models.trust_remote_code))


@dataclass(frozen=True)
class Upstream:
    """The artifacts stage 2 needs (plain paths, so that a worker process can load them)."""

    splits: Path
    tokenizer: Path
    oracle: Path
    teacher: Path
    student: Path
    references: Path  # held-out samples: the oracle's, the teacher's, the real responses
    train_references: Path  # the teacher's samples on training prompts
    reference_scores: Path  # the oracle's and the teacher's log-probabilities on their own references
    distill_prompts: Path
    offline: Path | None  # None when no source of the configuration reads the offline dataset
    teacher_signals: Path | None  # the teacher's signals on it, when they were kept
    keys: dict[str, str]  # each stage's cache key: what a resumed stage-2 run checks it continues on


def prepare_upstream(c: LabConfig, cache: ArtifactCache, device: str, timings: dict[str, float],
                     check: Callable[[dict[str, str]], None] | None = None) -> Upstream:
    """Load the task, then build (or find in the cache) every stage this configuration needs, its hub ids pinned to
    their cached commits (:func:`pin_models`); ``check`` sees the stages' cache keys first, before anything is
    built."""
    c = pin_models(c)
    start = time.time()
    task = _load_task(c, cache)
    for reason, count in task.skipped.items():
        log(f"task {task.source}: skipped {count} rows ({reason})")
    timings["data"] = time.time() - start
    specs = _specs(c, task, device)
    if check is not None:
        check(_keys(specs))
    paths: dict[str, Path] = {}
    models: dict[Path, torch.nn.Module] = {}
    for s in STAGES.values():
        spec = specs[s.name]
        if spec is None:
            continue
        job = Job(s.view(c), {p: paths[p] for p in s.parents if p in paths}, device, task,
                  c.models.trust_remote_code, models)
        begun = time.time()
        paths[s.name] = cache.get(s.name, spec["key"], spec, partial(s.build, job), collective=s.collective)
        timings[s.name] = time.time() - begun
        if s.name == "tokenizer":
            # its key names the first pretrained role's tokenizer only: the roles must share it, checked here for
            # every caller (the command line's preflight does too), whether the tokenizer was built or found
            trust = c.models.trust_remote_code
            check_tokenizers({role: from_pretrained(AutoTokenizer, name, trust_remote_code=trust)
                              for role, name in pretrained_roles(c.models).items()})
            tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"], trust_remote_code=trust)
            _report_data(job.splits(), tokenizer, c)
    return Upstream(paths["splits"], paths["tokenizer"], paths["oracle"], paths["teacher"], paths["student"],
                    paths["references"] / "references.safetensors",
                    paths["train_references"] / "references.safetensors",
                    paths["reference_scores"] / "scores.safetensors", paths["distill_prompts"] / "pairs.json",
                    paths["offline_data"] / "pairs.json" if "offline_data" in paths else None,
                    _existing(paths.get("teacher_signals"), "signals.safetensors"),
                    {name: specs[name]["key"] for name in paths})


def upstream_keys(c: LabConfig, cache: ArtifactCache, device: str) -> dict[str, str]:
    """The stages' cache keys :func:`prepare_upstream` would build ``c`` under now, building nothing: what a finished
    run's checkpoint must have been taken on for new runs to stand beside it."""
    c = pin_models(c)
    return _keys(_specs(c, _load_task(c, cache), device))


def _load_task(c: LabConfig, cache: ArtifactCache) -> Task:
    t = c.task
    return load_task(t.spec, cache.root, split=t.split, prompt_field=t.prompt_field, response_field=t.response_field,
                     config=t.hub_config, limit=t.limit, seed=t.seed)


def _specs(c: LabConfig, task: Task, device: str) -> dict[str, dict[str, Any] | None]:
    """The stages' specs on this process's thread count and ``device``'s kernels (``c``'s hub ids pinned)."""
    cpu = torch.device(device).type == "cpu"
    return stage_specs(c, task_digest(task), torch.get_num_threads() if cpu else None,
                       f"{cpu_kernels()}, torch {torch.__version__}" if cpu else accelerator_kernels(device),
                       pretrained_bos(c))


def _keys(specs: dict[str, dict[str, Any] | None]) -> dict[str, str]:
    return {name: spec["key"] for name, spec in specs.items() if spec is not None}


def _existing(folder: Path | None, name: str) -> Path | None:
    return folder / name if folder is not None and (folder / name).exists() else None


def _report_data(splits: Splits, tokenizer: PreTrainedTokenizerBase, c: LabConfig) -> None:
    """Say how many pairs repeat a prompt, how many prompts and responses of each split the maximum lengths cut,
    and how many validation prompts read as training prompts once cut: nothing is dropped, cut or leaked
    silently."""
    if splits.duplicates:
        log(f"{splits.duplicates} pairs repeat an earlier pair's prompt and were left out (each prompt is used once)")
    texts = {"validation prompts": (splits.validation_prompts[: c.eval.prompts], c.task.max_prompt_len),
             "distillation prompts": (splits.distill_prompts[: c.distill.prompts], c.task.max_prompt_len),
             "stage-1 prompts": (splits.stage1_prompts, c.task.max_prompt_len),
             "oracle training prompts": ([p.prompt for p in splits.oracle_train], c.task.max_prompt_len),
             "oracle training responses": ([p.response for p in splits.oracle_train], c.task.max_response_len)}
    ids = {name: token_ids(tokenizer, items) for name, (items, _) in texts.items()}  # tokenized once for both
    start = len(prompt_start(tokenizer))  # tokens before every prompt, within task.max_prompt_len
    for name, (_, limit) in texts.items():
        response = name.endswith("responses")
        key = "task.max_response_len" if response else "task.max_prompt_len"
        try:
            cut, total = truncation_report(ids[name], limit, name.rsplit(" ", 1)[1], 0 if response else start)
        except (TaskError, ValueError) as error:  # ValueError: no room left beside a BOS and SEP
            raise TaskError(f"{name}: {error} ({key}={limit})") from None
        if cut:
            log(f"{cut} of {total} {name} are longer than {key}={limit} and are cut")
    _report_leaks(ids, c, start)


def _report_leaks(ids: dict[str, list[list[int]]], c: LabConfig, start: int) -> None:
    """Say how many validation prompts the models see in training after all (``ids``: each part's tokens, as
    :func:`_report_data` has them; ``start``: the tokens the tokenizer puts before each, its BOS): the splits are
    disjoint by prompt, but two prompts that share their first ``task.max_prompt_len`` - 1 - ``start`` tokens are one
    prompt once cut."""
    kept = c.task.max_prompt_len - 1 - start
    stage1 = ids["stage-1 prompts"]
    sft = max(len(stage1) if n is None else n for n in (c.teacher.samples, c.student.samples))
    trained = {"the oracle's pairs": ids["oracle training prompts"],
               "stage 1": stage1[:sft],  # the prompts of the samples teacher and student train on
               "the distillation prompts": ids["distillation prompts"]}
    seen = {name: {tuple(row[:kept]) for row in rows} for name, rows in trained.items()}
    held_out = [tuple(row[:kept]) for row in ids["validation prompts"]]
    leaked = sum(any(row in pool for pool in seen.values()) for row in held_out)
    if leaked:
        where = ", ".join(f"{sum(row in pool for row in held_out)} in {name}" for name, pool in seen.items())
        log(f"{leaked} of {len(held_out)} validation prompts read as a training prompt once cut at "
            f"task.max_prompt_len={c.task.max_prompt_len} ({where}): their metrics are not held out; a longer "
            f"task.max_prompt_len tells them apart")


def _value(config: Any, key: str) -> Any:
    return getattr(*_owner(config, key))


def _owner(config: Any, key: str) -> tuple[Any, str]:
    """The section that holds ``key`` and the key's name in it."""
    *path, name = key.split(".")
    for part in path:
        config = getattr(config, part)
    return config, name


def _keyed_when_set(owner: Any, name: str) -> bool:
    """Whether setting ``name`` of section ``owner`` was declared :func:`teacherhack.config.keyed_when_set`."""
    return bool(owner.__dataclass_fields__[name].metadata.get("keyed_when_set"))


def _at_default(owner: Any, name: str) -> bool:
    """A :func:`teacherhack.config.keyed_when_set` setting at its default: left out of the keys, which stay those of
    the configurations written before the setting existed (their artifacts and recorded sweeps stay valid)."""
    return _keyed_when_set(owner, name) and getattr(owner, name) == owner.__dataclass_fields__[name].default


def _plain(value: Any) -> Any:
    """Dataclasses to dicts, recursively (without their settings at :func:`_at_default`), so that a spec is JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not _at_default(value, f.name)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
