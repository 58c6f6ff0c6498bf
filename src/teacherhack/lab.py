"""The lab recipe: stage 0 (oracle on real pairs) → stage 1 (oracle samples; teacher and student SFT) →
stage 2 (distil the teacher into the student from each data source), with proxy and golden metrics.

Every upstream artifact is cached under a key derived from everything it depends on, so runs that differ
only in stage 2 share them; a stage-2 run checkpoints at every evaluation and resumes where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from huggingface_hub.utils import disable_progress_bars
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from teacherhack import config as cfg
from teacherhack import distributed
from teacherhack.config import LabConfig
from teacherhack.data import (
    Splits,
    check_tokenizers,
    encode_prompts,
    encode_responses,
    load_task,
    special_ids,
    split_task,
    train_tokenizer,
    truncation_report,
)
from teacherhack.generation import make_sampler
from teacherhack.metrics import Evaluator, ReferenceSamples, draw_references, sample_in_batches
from teacherhack.reports import Run, load_run
from teacherhack.models import LM, SIZES, build_model, collate_prompts, load_pretrained
from teacherhack.sources import FixedPairs, Mixture, OnlineSamples, Source
from teacherhack.training import distill_loss, latest_checkpoint, load_checkpoint, make_optimizer, save_checkpoint, sft_loss, train


transformers.utils.logging.disable_progress_bar()  # our own progress lines say what is happening
disable_progress_bars()


def log(message: str) -> None:
    if distributed.is_main():
        print(f"[teacherhack {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# The artifact cache
# --------------------------------------------------------------------------------------------------


@dataclass
class ArtifactCache:
    """Stage outputs under ``root/artifacts/STAGE-KEY``; KEY hashes the stage's full dependency spec.
    An artifact is built in a temporary folder and renamed into place, so a killed build leaves nothing."""

    root: Path
    events: dict[str, str] = field(default_factory=dict)  # stage → "built" | "reused"

    def key(self, stage: str, spec: dict[str, Any]) -> str:
        blob = json.dumps({"stage": stage, **spec}, sort_keys=True, default=str)
        return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def get(self, stage: str, spec: dict[str, Any], build: Callable[[Path], None], *, collective: bool = False) -> Path:
        """The artifact's folder, built first if missing. Under several processes a ``collective`` build
        (training) runs on every process and the main one keeps its result; any other build runs on the
        main process alone while the others wait."""
        path = self.root / "artifacts" / self.key(stage, spec)
        if (path / "spec.json").exists():
            self.events[stage] = "reused"
            return path
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        if collective or distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            build(tmp)
        distributed.barrier()
        if distributed.is_main():
            (tmp / "spec.json").write_text(json.dumps({"stage": stage, **spec}, indent=1, sort_keys=True, default=str))
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        elif collective:
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()
        self.events[stage] = "built"
        return path


# --------------------------------------------------------------------------------------------------
# Upstream stages
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """Paths of the cached artifacts stage 2 needs (plain paths, so a worker process can load them)."""

    tokenizer: Path
    teacher: Path
    student: Path
    oracle: Path
    references: Path
    offline: Path
    distill_prompts: Path


def _steps(samples: int, epochs: float, batch_size: int) -> int:
    return max(1, math.ceil(samples * epochs / batch_size)) if epochs > 0 else 0


def _wrap(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str, temperature: float = 1.0) -> LM:
    ids = special_ids(tokenizer)
    return LM(model.to(device), pad_id=ids.pad, eos_id=ids.eos, temperature=temperature)


def _load_lm(path: Path, tokenizer: PreTrainedTokenizerBase, device: str, temperature: float = 1.0) -> LM:
    return _wrap(load_pretrained(path), tokenizer, device, temperature)


def _new_or_loaded(c: LabConfig, role: str, tokenizer: PreTrainedTokenizerBase, device: str, seed: int,
                   init: Path | None = None) -> LM:
    """The role's starting point: the weights it names (hub id or folder), the shared pre-trained checkpoint
    of its size (``init``), or a fresh model of its size preset."""
    name = getattr(c.models, role)
    if name not in SIZES:
        dtype = getattr(torch, c.models.dtype)
        return _wrap(_pretrained(role, name, lambda n: load_pretrained(n, dtype=dtype)), tokenizer, device)
    if init is not None:
        return _load_lm(init, tokenizer, device)
    ids = special_ids(tokenizer)
    return _wrap(build_model(c.models.arch, name, vocab_size=len(tokenizer), pad_id=ids.pad, eos_id=ids.eos,
                             max_positions=c.task.max_prompt_len + c.task.max_response_len, seed=seed),
                 tokenizer, device)


def _pretrained(role: str, name: str, load: Callable[[str], Any]) -> Any:
    try:
        return load(name)
    except OSError as error:
        raise cfg.ConfigError(f"models.{role}={name!r} is neither a size preset ({', '.join(SIZES)}) nor a model "
                              f"folder or reachable hub id: {error}") from error


def _pretrained_roles(c: LabConfig) -> dict[str, str]:
    return {role: name for role in ("oracle", "teacher", "student") if (name := getattr(c.models, role)) not in SIZES}


def _build_tokenizer(c: LabConfig, splits: Splits, path: Path) -> None:
    """The tokenizer all three models share: the pretrained models' own (checked to be one and the same),
    or a byte-level BPE trained on the task's text when every model is built from a size preset."""
    pretrained = _pretrained_roles(c)
    if pretrained:
        tokenizers = {role: _pretrained(role, name, AutoTokenizer.from_pretrained) for role, name in pretrained.items()}
        check_tokenizers(tokenizers)
        next(iter(tokenizers.values())).save_pretrained(path)
        return
    texts = (x for pair in splits.oracle_train for x in (pair.prompt, pair.response))
    train_tokenizer(texts, c.task.vocab_size).save_pretrained(path)


def _fit(lm: LM, prompts: list[list[int]], responses: list[list[int]], t: cfg.TrainConfig, seed: int,
         desc: str) -> None:
    """Supervised training (cross-entropy) on the first ``t.samples`` pairs for ``t.epochs`` epochs."""
    n = len(prompts) if t.samples is None else min(t.samples, len(prompts))
    steps = _steps(n, t.epochs, t.batch_size)
    if steps == 0:
        return
    data = FixedPairs(prompts[:n], responses[:n], batch_size=t.batch_size, seed=seed, pad_id=lm.pad_id, origin=desc)
    train(lm, data, sft_loss(lm), steps=steps, lr=t.lr, warmup=t.warmup, schedule=t.schedule, desc=desc)


def _save_ids(path: Path, prompts: list[list[int]], responses: list[list[int]] | None = None) -> None:
    path.write_text(json.dumps({"prompts": prompts, "responses": responses}))


def _load_ids(path: Path) -> tuple[list[list[int]], list[list[int]] | None]:
    data = json.loads(path.read_text())
    return data["prompts"], data["responses"]


def _rows(responses: torch.Tensor, eos_id: int) -> list[list[int]]:
    """Sampled [B, T] responses back to lists, cut after the first EOS."""
    out = []
    for row in responses.tolist():
        out.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return out


def prepare_upstream(c: LabConfig, cache: ArtifactCache, device: str, timings: dict[str, float]) -> Upstream:
    """Stages 0 and 1 and the evaluation references, each built once and cached."""
    t0 = time.time()
    t = c.task
    pairs = load_task(t.spec, cache.root, split=t.split, prompt_field=t.prompt_field,
                      response_field=t.response_field, config=t.hub_config, limit=t.limit, seed=t.seed)
    splits: Splits = split_task(pairs, n_stage1=t.n_stage1, n_distill=t.n_distill, n_validation=t.n_validation,
                                n_oracle=t.n_oracle, seed=t.seed)
    task_spec = {"task": cfg.dataclasses.asdict(t), "pairs": len(pairs), "pretrained": _pretrained_roles(c)}
    timings["data"] = time.time() - t0

    def timed(stage: str, spec: dict[str, Any], build: Callable[[Path], None], collective: bool = False) -> Path:
        start = time.time()
        path = cache.get(stage, spec, build, collective=collective)
        timings[stage] = time.time() - start
        return path

    tok_path = timed("tokenizer", task_spec, lambda p: _build_tokenizer(c, splits, p))
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    cut, total = truncation_report(tokenizer, splits.validation_prompts, t.max_prompt_len)
    if cut:
        log(f"{cut} of {total} validation prompts are longer than task.max_prompt_len={t.max_prompt_len} and are cut")
    ids = special_ids(tokenizer)

    def encode(prompts: list[str]) -> list[list[int]]:
        return encode_prompts(tokenizer, prompts, t.max_prompt_len)

    def pretrained_init(role: str) -> dict[str, Any]:
        """Shared pre-training of the role's size on unlabelled text of the task's languages (the oracle's
        training pairs, prompts and responses as separate texts), built once per size; {} when off."""
        size = getattr(c.models, role)
        if c.pretrain.epochs == 0 or size not in SIZES:
            return {}
        spec = {**task_spec, "arch": c.models.arch, "size": size, "train": cfg.dataclasses.asdict(c.pretrain),
                "seed": c.oracle_seed}

        def build(path: Path) -> None:
            lm = _new_or_loaded(c, role, tokenizer, device, seed=c.oracle_seed)
            texts = [x for pair in splits.oracle_train for x in (pair.prompt, pair.response)]
            log(f"pre-training size {size!r} on {len(texts)} unlabelled texts")
            empty_prompts = [[ids.prompt_end]] * len(texts)  # plain language modelling: the text is the response
            _fit(lm, empty_prompts, encode_responses(tokenizer, texts, t.max_prompt_len + t.max_response_len - 1),
                 c.pretrain, c.oracle_seed, f"pretrain {size}")
            lm.save(path)

        return {"init": timed(f"pretrain_{size}", spec, build, collective=True)}

    oracle_init = pretrained_init("oracle")
    oracle_spec = {**task_spec, "arch": c.models.arch, "size": c.models.oracle,
                   "train": cfg.dataclasses.asdict(c.oracle), "seed": c.oracle_seed,
                   **{k: v.name for k, v in oracle_init.items()}}

    def build_oracle(path: Path) -> None:
        lm = _new_or_loaded(c, "oracle", tokenizer, device, seed=c.oracle_seed, **oracle_init)
        log(f"stage 0: training the oracle on {len(splits.oracle_train)} real pairs")
        _fit(lm, encode([p.prompt for p in splits.oracle_train]),
             encode_responses(tokenizer, [p.response for p in splits.oracle_train], t.max_response_len),
             c.oracle, c.oracle_seed, "oracle")
        lm.save(path)

    oracle_path = timed("oracle", oracle_spec, build_oracle, collective=True)
    oracle = functools.cache(lambda: _load_lm(oracle_path, tokenizer, device, c.models.oracle_temperature))
    samples_spec = {"oracle": oracle_path.name, "temperature": c.models.oracle_temperature, "seed": c.oracle_seed}
    stage1_prompts = encode(splits.stage1_prompts)

    def build_oracle_samples(path: Path) -> None:
        log(f"stage 1: the oracle answers {len(stage1_prompts)} prompts")
        responses = sample_in_batches(oracle(), collate_prompts(stage1_prompts, ids.pad),
                                      max_new_tokens=t.max_response_len, batch_size=256, seed=c.oracle_seed)
        _save_ids(path / "pairs.json", stage1_prompts, _rows(responses, ids.eos))

    samples_path = timed("oracle_samples", samples_spec, build_oracle_samples)
    _, oracle_responses = _load_ids(samples_path / "pairs.json")

    def sft_artifact(role: str) -> Path:
        init = pretrained_init(role)
        spec = {"samples": samples_path.name, "arch": c.models.arch, "size": getattr(c.models, role),
                "train": cfg.dataclasses.asdict(getattr(c, role)), "seed": c.seed,
                **{k: v.name for k, v in init.items()}}

        def build(path: Path) -> None:
            lm = _new_or_loaded(c, role, tokenizer, device, seed=c.seed + (1 if role == "teacher" else 2), **init)
            log(f"stage 1: SFT of the {role} on oracle samples")
            _fit(lm, stage1_prompts, oracle_responses, getattr(c, role), c.seed, role)
            lm.save(path)

        return timed(role, spec, build, collective=True)

    teacher_path, student_path = sft_artifact("teacher"), sft_artifact("student")
    teacher = functools.cache(lambda: _load_lm(teacher_path, tokenizer, device))

    e = c.eval
    refs_spec = {"oracle": oracle_path.name, "temperature": c.models.oracle_temperature, "teacher": teacher_path.name,
                 "prompts": e.prompts, "samples_per_prompt": e.samples_per_prompt, "seed": c.seed,
                 "validation": splits.validation_prompts[: e.prompts]}

    def build_references(path: Path) -> None:
        log(f"evaluation references: {e.prompts} prompts × {e.samples_per_prompt} samples of oracle and teacher")
        refs = draw_references(oracle(), teacher(), collate_prompts(encode(splits.validation_prompts[: e.prompts]),
                                                                ids.pad),
                               samples_per_prompt=e.samples_per_prompt, max_new_tokens=t.max_response_len,
                               batch_size=e.batch_size, seed=c.seed)
        refs.save(path / "references.safetensors")

    refs_path = timed("references", refs_spec, build_references)
    d = c.distill
    pool = splits.distill_prompts[: d.prompts]  # the first n of a shuffled pool: a random subset
    distill_prompts = encode(pool)
    offline_spec = {"teacher": teacher_path.name, "prompts": pool, "k": d.generations_per_prompt, "seed": c.seed}

    def build_offline(path: Path) -> None:
        log(f"stage 2 data: the teacher answers {len(distill_prompts)} prompts × {d.generations_per_prompt}")
        prompts = [p for p in distill_prompts for _ in range(d.generations_per_prompt)]
        responses = sample_in_batches(teacher(), collate_prompts(prompts, ids.pad),
                                      max_new_tokens=t.max_response_len, batch_size=256, seed=c.seed + 3)
        _save_ids(path / "pairs.json", prompts, _rows(responses, ids.eos))

    offline_path = timed("offline_data", offline_spec, build_offline) if _needs_offline(d.sources) else Path()
    prompts_path = timed("distill_prompts", {"prompts": pool, "tokenizer": tok_path.name},
                         lambda p: _save_ids(p / "pairs.json", distill_prompts))
    return Upstream(tok_path, teacher_path, student_path, oracle_path, refs_path / "references.safetensors",
                    offline_path / "pairs.json", prompts_path / "pairs.json")


def _needs_offline(sources: list[str]) -> bool:
    return any(s in ("offline", "mixture") for s in sources)


# --------------------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------------------


def _make_source(name: str, c: LabConfig, up: Upstream, teacher: LM, student: LM) -> Source:
    d, pad = c.distill, teacher.pad_id
    seed = c.seed + 11
    prompts, _ = _load_ids(up.distill_prompts)

    def online(model: LM, saved: Path, origin: str) -> OnlineSamples:
        sampler = make_sampler(model, d.generation, saved)
        log(f"{name}: {origin} samples from the {sampler.name} backend")
        return OnlineSamples(prompts, sampler, batch_size=d.batch_size, seed=seed, pad_id=pad,
                             max_new_tokens=c.task.max_response_len, origin=origin,
                             sync_from=student if model is student else None, sync_every=d.sync_every)

    if name == "online_teacher":
        return online(teacher, up.teacher, "online_teacher")
    if name == "online_student":
        return online(student, up.student, "online_student")
    offline_prompts, offline_responses = _load_ids(up.offline)
    offline = FixedPairs(offline_prompts, offline_responses, batch_size=d.batch_size, seed=seed, pad_id=pad,
                         origin="offline")
    return offline if name == "offline" else Mixture(offline, online(student, up.student, "online_student"),
                                                     fraction=d.mixture_lambda, seed=seed)


def distill_run(c: LabConfig, source_name: str, up: Upstream, run_dir: Path, device: str,
                threads: int | None = None, name: str | None = None) -> dict[str, Any]:
    """One stage-2 run into ``run_dir``: metrics.jsonl, run.json, the final student; resumes if killed.
    (Process pools use the spawn start method: forking after torch started its threads can hang.)"""
    if threads:
        torch.set_num_threads(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(up.tokenizer)
    oracle = _load_lm(up.oracle, tokenizer, device, c.models.oracle_temperature)
    teacher = _load_lm(up.teacher, tokenizer, device)
    student = _load_lm(up.student, tokenizer, device)
    d, e = c.distill, c.eval
    source = _make_source(source_name, c, up, teacher, student)
    loss_fn = distill_loss(student, teacher, loss=d.loss, beta=d.beta, alpha=d.alpha,
                           temperature=d.loss_temperature, chunk_size=d.chunk_size)
    t_eval = time.time()
    evaluator = Evaluator(oracle, teacher, ReferenceSamples.load(up.references), estimator=e.estimator,
                          per_token=e.per_token, reverse_samples=e.reverse_samples, batch_size=e.batch_size,
                          max_new_tokens=c.task.max_response_len, seed=c.seed + 13)
    unit = "nats/token" if e.per_token else "nats/sequence"
    prompts_n = len(_load_ids(up.distill_prompts)[0])
    # the teacher generated the offline dataset once, up front: part of what this run's data cost
    offline_tokens = sum(map(len, _load_ids(up.offline)[1] or [])) if _needs_offline([source_name]) else 0
    main = distributed.is_main()  # under several processes, only the main one writes files
    if main:
        (run_dir / "run.json").write_text(json.dumps({
            "name": name or source_name, "source": source_name, "loss": d.loss, "prompts": prompts_n,
            "generations_per_prompt": d.generations_per_prompt if _needs_offline([source_name]) else None,
            "steps": d.steps, "batch_size": d.batch_size, "metric_unit": unit, "seed": c.seed,
            "mixture_lambda": d.mixture_lambda if source_name == "mixture" else None, "offline_tokens": offline_tokens,
            "teacher_golden": evaluator.teacher_golden.mean, "teacher_golden_se": evaluator.teacher_golden.se}, indent=1))

    optimizer = make_optimizer(student, d.lr)
    metrics_path, checkpoint = run_dir / "metrics.jsonl", run_dir / "checkpoint"
    state = {"step": 0, "loss_sum": 0.0, "loss_count": 0, "tokens_generated": 0, "train_seconds": 0.0,
             "eval_seconds": 0.0}
    resume_from = latest_checkpoint(checkpoint)
    if resume_from is not None:
        state = load_checkpoint(resume_from, student, optimizer)
        for path in (metrics_path, run_dir / "per_sample.jsonl") if main else ():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= state["step"]))
        if hasattr(source, "tokens_generated"):  # the global count, carried on by the main process
            source.tokens_generated = state["tokens_generated"] if main else 0  # type: ignore[union-attr]
        log(f"{source_name}: resuming from step {state['step']}")
    elif main:
        metrics_path.unlink(missing_ok=True)
        (run_dir / "per_sample.jsonl").unlink(missing_ok=True)
    state["eval_seconds"] += time.time() - t_eval
    clock = {"last": time.time()}

    def evaluate(step: int) -> None:
        start = time.time()
        state["train_seconds"] += start - clock["last"]
        metrics, estimates = evaluator(student, step)
        row = {"step": step, "epoch": source.epoch(step),
               "train_loss": state["loss_sum"] / state["loss_count"] if state["loss_count"] else None,
               **metrics, "tokens_generated": int(distributed.all_sum(getattr(source, "tokens_generated", 0)))}
        state["tokens_generated"] = row["tokens_generated"]
        student.model.train()
        state["eval_seconds"] += time.time() - start
        row |= {"train_seconds": state["train_seconds"], "eval_seconds": state["eval_seconds"]}
        if main:
            with (run_dir / "per_sample.jsonl").open("a") as f:  # paired values, for the verdict's rise SE
                f.write(json.dumps({"step": step, "golden": estimates["golden"].values.tolist(),
                                    "proxy": estimates["proxy"].values.tolist()}) + "\n")
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        log(f"{source_name} step {step}/{d.steps} epoch {row['epoch']:.1f}: proxy {row['proxy']:.2f}±{row['proxy_se']:.2f}"
            f"  golden {row['golden']:.2f}±{row['golden_se']:.2f}  ({unit})")
        state.update(step=step, loss_sum=0.0, loss_count=0)
        if main:
            save_checkpoint(checkpoint, student, optimizer, state)
        clock["last"] = time.time()

    def on_step(step: int, loss: float) -> None:
        state["loss_sum"] += loss
        state["loss_count"] += 1
        if step % e.every == 0 or step == d.steps:
            evaluate(step)

    if resume_from is None:
        evaluate(0)
    if state["step"] < d.steps:
        train(student, source, loss_fn, steps=d.steps, lr=d.lr, warmup=d.warmup, schedule=d.schedule,
              grad_accum=d.grad_accum, max_grad_norm=d.max_grad_norm, start_step=state["step"],
              optimizer=optimizer, desc=source_name, on_step=on_step)
    if main:
        student.save(run_dir / "student")
    distributed.barrier()
    return summarise_run(run_dir)


def summarise_run(run_dir: Path) -> dict[str, Any]:
    """The run's line in summary.json (see :func:`summarise`)."""
    return summarise(load_run(run_dir))


def summarise(run: Run) -> dict[str, Any]:
    """Best and final metrics with the golden verdict (paired SEs) and the oracle-free detector."""
    verdict, detector = run.verdicts()
    rows = run.metrics
    best = min(range(len(rows)), key=lambda i: rows[i]["golden"])
    last = rows[-1]
    return {"golden_min": rows[best]["golden"], "golden_min_se": rows[best]["golden_se"],
            "golden_min_step": rows[best]["step"], "golden_final": last["golden"], "golden_final_se": last["golden_se"],
            "proxy_final": last["proxy"], "proxy_final_se": last["proxy_se"], "hacking": verdict.hacking,
            "verdict": verdict.to_dict(), "detector": detector.to_dict(), "steps": last["step"],
            "train_seconds": last.get("train_seconds"), "eval_seconds": last.get("eval_seconds")}


# --------------------------------------------------------------------------------------------------
# The whole lab
# --------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def run_lab(c: LabConfig, out_dir: Path, cache_root: Path, *, jobs: int = 1) -> dict[str, Any]:
    """Run the lab into ``out_dir``; rerunning with the same directory and config resumes it."""
    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    if distributed.launched() and jobs > 1:
        raise cfg.ConfigError("--jobs runs stage-2 runs in parallel processes; under a distributed launcher the "
                              "processes already share each run: use --jobs 1")
    saved = out_dir / "config.yaml"
    if saved.exists():
        import yaml

        previous = cfg.from_dict(yaml.safe_load(saved.read_text()))
        if previous.to_dict() != c.to_dict():
            raise cfg.ConfigError(f"{out_dir} holds a run with a different configuration ({saved}); "
                                  f"choose another --out or rerun with the same settings to resume it")
    distributed.barrier()  # every process has compared with the saved config before it is rewritten
    if distributed.is_main():
        c.dump(saved)
    if c.threads:
        torch.set_num_threads(c.threads)
    device = resolve_device(c.device)
    cache = ArtifactCache(cache_root)
    timings: dict[str, float] = {}
    up = prepare_upstream(c, cache, device, timings)
    log("stage 2: " + ", ".join(c.distill.sources) + (f" ({jobs} parallel jobs)" if jobs > 1 else ""))
    runs: dict[str, Any] = {}
    if jobs > 1 and len(c.distill.sources) > 1:
        threads = max(1, (c.threads or torch.get_num_threads()) // min(jobs, len(c.distill.sources)))
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {s: pool.submit(_timed_run, c, s, up, out_dir / s, device, threads) for s in c.distill.sources}
            for s, future in futures.items():
                runs[s], timings[f"distill/{s}"] = future.result()
    else:
        for s in c.distill.sources:
            runs[s], timings[f"distill/{s}"] = _timed_run(c, s, up, out_dir / s, device, None)
    summary = {"runs": runs, "wall_seconds": time.time() - start, "stage_seconds": timings,
               "cache": dict(cache.events), "preset": c.preset}
    if distributed.is_main():
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _timed_run(c: LabConfig, source: str, up: Upstream, run_dir: Path, device: str,
               threads: int | None) -> tuple[dict[str, Any], float]:
    start = time.time()
    return distill_run(c, source, up, run_dir, device, threads), time.time() - start
