"""Stage 2: distil the teacher into the student from one data source, evaluating proxy and golden metrics as
it goes. The whole loop is :func:`distill_run`; a killed run resumes from its last evaluation with the same
results (batches, online samples and evaluations are pure functions of the seed and the step)."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from teacherhack import distributed, seeds
from teacherhack.config import LabConfig
from teacherhack.distributed import log
from teacherhack.errors import UserError
from teacherhack.generation import make_sampler
from teacherhack.metrics import PAIRED, Evaluator, load_sample_sets
from teacherhack.models import LM, PromptStates, Prompts, collate_prompts, load_pretrained
from teacherhack.rundir import RunFolder, load_run, summarise
from teacherhack.sources import FixedPairs, Mixture, OnlineSamples, Source
from teacherhack.teacher_signals import TeacherSignals, bytes_per_position
from teacherhack.stages import OFFLINE_SOURCES, STAGES, Upstream, load_ids, wrap
from teacherhack.trackers import Trackers
from teacherhack.training import (
    distill_loss,
    latest_checkpoint,
    learning_rate,
    load_checkpoint,
    make_optimizer,
    optimizer_step,
    prepared,
    save_checkpoint,
    write_folder,
)


@dataclass
class LoopState:
    """What a checkpoint must carry besides weights and optimizer for a resumed run to continue exactly."""

    step: int = 0
    loss_sum: float = 0.0  # training losses since the last evaluation (their mean is the row's train_loss)
    grad_norm_sum: float = 0.0  # gradient norms (before clipping) since the last evaluation
    loss_count: int = 0
    tokens_generated: int = 0  # online samples so far, over every process
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    upstream: dict[str, str] | None = None  # the upstream stages' cache keys (None: a checkpoint from before them)
    threads: int | None = None  # the CPU threads its training steps ran on (their reductions' bits depend on them)


@dataclass(frozen=True)
class Tracking:
    """Where a run's evaluations also go (``--report-to``): tracker names, the project (lab or sweep folder)."""

    names: tuple[str, ...]
    project: str
    logging_dir: Path


def distill_run(c: LabConfig, source_name: str, up: Upstream, run_dir: Path, device: str,
                threads: int | None = None, name: str | None = None, tracking: Tracking | None = None) -> dict[str, Any]:
    """One stage-2 run into ``run_dir`` (metrics, per-sample values, checkpoints, the final student); resumes
    where a killed run stopped. Returns the run's summary line."""
    if threads:
        torch.set_num_threads(threads)
    folder, d, e = RunFolder(run_dir), c.distill, c.eval
    with folder.lock() if distributed.is_main() else contextlib.nullcontext():  # the main process writes
        trust = c.models.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(up.tokenizer, trust_remote_code=trust)
        oracle, teacher, student = (wrap(load_pretrained(path, trust_remote_code=trust), tokenizer, device, temperature,
                                         c.models.vocab_size)
                                    for path, temperature in ((up.oracle, c.models.oracle_temperature),
                                                              (up.teacher, 1.0), (up.student, 1.0)))
        source, label = make_source(source_name, c, up, teacher, student), name or source_name
        loss_fn = distill_loss(student, teacher, loss=d.loss, beta=d.beta, alpha=d.alpha,
                               temperature=d.loss_temperature, chunk_size=d.chunk_size, top_k=d.top_k,
                               convention=d.top_k_convention, kl_estimator=d.kl_estimator, discount=d.discount,
                               prompt_states=teacher_prompt_states(c, source, teacher, label))
        began = time.time()
        references = load_sample_sets(up.references) | load_sample_sets(up.train_references)
        evaluator = Evaluator(oracle, teacher, references, samples_per_prompt=e.samples_per_prompt,
                              estimator=e.estimator, per_token=e.per_token, reverse_samples=e.reverse_samples,
                              batch_size=e.batch_size, max_new_tokens=c.task.max_response_len,
                              seed=c.seed + seeds.EVALUATION,
                              frozen=load_file(str(up.reference_scores)))
        scoring = time.time() - began  # the one-time scoring of the references, spent again on every resume
        if distributed.is_main():
            folder.write_settings(_settings(c, source_name, name, up, evaluator, _training_threads(student)))
        optimizer = make_optimizer(student, d.lr)
        trackers = (Trackers(list(tracking.names), project=tracking.project, run_name=label,
                             logging_dir=tracking.logging_dir, config=c.to_dict())
                    if tracking and tracking.names and distributed.is_main() else None)
        state = _resume(folder, student, optimizer, source, label, up.keys, d.steps)
        if state is None:  # a fresh run: evaluate the initial student first
            state = LoopState(eval_seconds=scoring, upstream=up.keys, threads=_training_threads(student))
            _evaluate(folder, evaluator, student, source, state, d.steps, label, trackers)
        else:
            state.eval_seconds += scoring
        with prepared(student, optimizer) as ready:
            clock = time.time()
            for step in tqdm(range(state.step, d.steps), desc=source_name, initial=state.step, total=d.steps,
                             leave=False, mininterval=2.0, dynamic_ncols=True, disable=not distributed.is_main()):
                lr = learning_rate(step, lr=d.lr, warmup=d.warmup, total=d.steps, schedule=d.schedule)
                taken = optimizer_step(student, ready, source.batch(step), loss_fn, lr=lr, grad_accum=d.grad_accum,
                                       max_grad_norm=d.max_grad_norm, precision=c.precision,
                                       where=f"{source_name} step {step + 1}")
                state.loss_sum += taken.loss
                state.grad_norm_sum += taken.grad_norm
                state.loss_count += 1
                if (step + 1) % e.every == 0 or step + 1 == d.steps:
                    state.train_seconds += time.time() - clock
                    state.step = step + 1
                    _evaluate(folder, evaluator, student, source, state, d.steps, label, trackers)
                    if distributed.is_main():
                        save_checkpoint(folder.checkpoint_dir, student, optimizer, asdict(state))
                    clock = time.time()
        if distributed.is_main():
            write_folder(folder.student_dir, student.save)  # a kill mid-write leaves no "finished" run
        if trackers is not None:
            trackers.finish()
        distributed.barrier()
    return summarise(load_run(run_dir))


def make_source(name: str, c: LabConfig, up: Upstream, teacher: LM, student: LM) -> Source:
    """The stage-2 data source ``name``: the offline dataset, online samples of the teacher or the student, or
    GKD's mixture of the offline dataset and online-student samples."""
    d, pad, seed = c.distill, teacher.pad_id, c.seed + seeds.STAGE2
    prompts, _ = load_ids(up.distill_prompts)

    def online(model: LM, saved: Path, origin: str) -> OnlineSamples:
        sampler = make_sampler(model, d.generation, saved)
        # the teacher's samples do not depend on training: a block of steps at once, sampling_batch rows per call
        frozen = model is teacher
        block = max(1, c.sampling_batch // d.batch_size) if frozen else 1
        # the teacher's sampling distributions stand in for a second teacher pass when they fit the cache budget
        keep = frozen and sampler.gives_logprobs and (
            block * d.batch_size * c.task.max_response_len * model.vocab_size * 4 <= d.teacher_cache_mb * 2**20)
        log(f"{name}: {origin} samples from the {sampler.name} backend"
            + (f", {block} steps per generation call" if block > 1 else "")
            + (", their distributions reused by the loss" if keep else ""))
        return OnlineSamples(prompts, sampler, batch_size=d.batch_size, seed=seed, pad_id=pad, eos_id=model.eos_id,
                             max_new_tokens=c.task.max_response_len, origin=origin,
                             sync_from=None if frozen else student, sync_every=d.sync_every, block=block,
                             keep_logprobs=keep)

    if name == "online_teacher":
        return online(teacher, up.teacher, "online_teacher")
    if name == "online_student":
        return online(student, up.student, "online_student")
    assert up.offline is not None, "the offline dataset is built for every configuration whose sources need it"
    offline_prompts, offline_responses = load_ids(up.offline)
    signals = None if up.teacher_signals is None else TeacherSignals.load(
        up.teacher_signals, expect={"teacher": up.teacher.name, "dataset": up.offline.parent.name})
    offline = FixedPairs(offline_prompts, offline_responses or [], batch_size=d.batch_size, seed=seed, pad_id=pad,
                         origin="offline", signals=signals, eos_id=teacher.eos_id)
    return offline if name == "offline" else Mixture(offline, online(student, up.student, "online_student"),
                                                     fraction=d.mixture_lambda, seed=seed)


def teacher_prompt_states(c: LabConfig, source: Source, teacher: LM, label: str) -> PromptStates | None:
    """The teacher's keys and values on the source's prompts (``distill.teacher_prompt_cache``) for a source of
    fresh samples whose loss runs the teacher on them (online student, mixture; online teacher when its sampling
    distributions are not kept); None otherwise, or beyond ``distill.teacher_cache_mb``."""
    online = source.online if isinstance(source, Mixture) else source
    if not c.distill.teacher_prompt_cache or not isinstance(online, OnlineSamples) or online.keep_logprobs:
        return None
    prompts = collate_prompts(online.prompts, teacher.pad_id)
    try:  # the size from one prompt's states at the full width
        size = teacher.prompt_states(Prompts(prompts.ids[:1], prompts.mask[:1])).nbytes * len(prompts)
    except ValueError as error:
        raise UserError(f"distill.teacher_prompt_cache: {error}") from error
    if size > c.distill.teacher_cache_mb * 2**20:
        log(f"{label}: the teacher's prompt states ({size / 2**20:.0f} MB) exceed distill.teacher_cache_mb="
            f"{c.distill.teacher_cache_mb}: not kept, the teacher reads the prompts at every step")
        return None
    states = teacher.prompt_states(prompts, batch_size=c.sampling_batch)
    log(f"{label}: the teacher's keys and values on {len(prompts)} prompts kept ({size / 2**20:.0f} MB)")
    return states


def _settings(c: LabConfig, source: str, name: str | None, up: Upstream, evaluator: Evaluator,
              threads: int | None) -> dict[str, Any]:
    """run.json: what a report needs to label and compare runs, and the CPU threads its steps train on (under --jobs
    a share of config.yaml's ``threads``: the bits depend on it)."""
    d = c.distill
    offline = source in OFFLINE_SOURCES
    return {"name": name or source, "source": source, "loss": d.loss, "prompts": len(load_ids(up.distill_prompts)[0]),
            "generations_per_prompt": d.generations_per_prompt if offline else None, "steps": d.steps,
            "batch_size": d.batch_size, "metric_unit": "nats/token" if c.eval.per_token else "nats/sequence",
            "seed": c.seed, "threads": threads, "mixture_lambda": d.mixture_lambda if source == "mixture" else None,
            # the teacher generated the offline dataset once, up front: part of what this run's data cost
            "offline_tokens": sum(map(len, load_ids(up.offline)[1] or [])) if offline and up.offline else 0,
            "teacher_golden": evaluator.teacher_golden.mean, "teacher_golden_se": evaluator.teacher_golden.se,
            "teacher_entropy": evaluator.teacher_entropy.mean, "oracle_entropy": evaluator.oracle_entropy.mean,
            # how per_sample.jsonl's values group by prompt: the paired SEs of those who read them back cluster by it
            "samples_per_prompt": evaluator.saved_layout(),
            # what the teacher's signal costs per response token, stored (the offline dataset) or shipped
            "teacher_signal_bytes": bytes_per_position(evaluator.teacher.vocab_size, d.top_k,
                                                       getattr(torch, d.top_k_dtype) if d.top_k else None)}


def _training_threads(student: LM) -> int | None:
    """The CPU threads a training step runs on (None on an accelerator)."""
    return torch.get_num_threads() if student.device.type == "cpu" else None


def _resume(folder: RunFolder, student: LM, optimizer: torch.optim.Optimizer, source: Source,
            label: str, upstream: dict[str, str], steps: int) -> LoopState | None:
    """The loop state of the last checkpoint (weights and optimizer restored, later evaluations dropped), or
    None for a run that starts afresh (the folder's evaluations cleared). A checkpoint taken on other upstream
    models or data (e.g. rebuilt under another thread count) is refused: its rows and the rest would mix two labs.
    Of ``steps`` in all, those after the checkpoint are taken on this process's threads (a warning if they differ)."""
    checkpoint = latest_checkpoint(folder.checkpoint_dir)
    main = distributed.is_main()
    if checkpoint is None:
        if main:
            folder.reset()
        return None
    state = LoopState(**load_checkpoint(checkpoint, student, optimizer))
    _refuse_other_upstream(label, folder, state.step, state.upstream, upstream)
    state.upstream = upstream
    threads = _training_threads(student)
    if None not in (state.threads, threads) and state.threads != threads and state.step < steps:
        log(f"{label}: warning: started on {state.threads} CPU threads, resumed on {threads} (another --jobs or "
            f"machine): its remaining steps are valid but not bit for bit those of an uninterrupted run")
    state.threads = threads
    if main:
        folder.truncate(state.step)
    if hasattr(source, "tokens_generated"):  # the global count, carried on by the main process
        source.tokens_generated = state.tokens_generated if main else 0  # type: ignore[union-attr]
    log(f"{label}: resuming from step {state.step}")
    return state


def check_resumable(run_dir: Path, label: str, upstream: dict[str, str]) -> None:
    """Refuse, before any upstream stage is built, a started run whose checkpoint was taken on other upstream
    artifacts than ``upstream`` (the stages' cache keys): building them first would cost the whole upstream
    (hours at paper scale) only for the run to be refused then."""
    folder = RunFolder(run_dir)
    checkpoint = latest_checkpoint(folder.checkpoint_dir)
    if checkpoint is not None:
        state = json.loads((checkpoint / "state.json").read_text())
        _refuse_other_upstream(label, folder, state["step"], state.get("upstream"), upstream)


def _refuse_other_upstream(label: str, folder: RunFolder, step: int, taken_on: dict[str, str] | None,
                           upstream: dict[str, str]) -> None:
    """A checkpoint taken on other upstream artifacts cannot be resumed: its rows and the rest would mix two labs.
    The message names the first stage that differs in pipeline order, the cause of every later difference."""
    if taken_on is None or taken_on == upstream:
        return
    changed = [name for name in STAGES if taken_on.get(name) != upstream.get(name)]
    root = changed[0] if changed else sorted(taken_on.keys() ^ upstream.keys())[0]
    cause = ("the task's data or its split settings changed" if root == "splits"
             else "rebuilt under other settings, thread count, CPU kernels or device" if root in STAGES
             and STAGES[root].collective else "built under other settings")
    later = f", and so {len(changed) - 1} stage(s) after it" if len(changed) > 1 else ""
    raise UserError(f"{label}: its checkpoint at step {step} was taken on other upstream artifacts: {root} differs "
                    f"({cause}){later}; resuming would mix two labs. Rerun with the data and settings it started "
                    f"with, or delete {folder.path} to start it over")


def _evaluate(folder: RunFolder, evaluator: Evaluator, student: LM, source: Source, state: LoopState,
              steps: int, label: str, trackers: Trackers | None) -> None:
    """Evaluate the student at ``state.step``, append the row and its per-sample values, reset the loss window."""
    start = time.time()
    metrics, estimates = evaluator(student, state.step)
    state.tokens_generated = int(distributed.all_sum(getattr(source, "tokens_generated", 0)))
    state.eval_seconds += time.time() - start
    row = {"step": state.step, "epoch": source.epoch(state.step),
           "train_loss": state.loss_sum / state.loss_count if state.loss_count else None,
           "grad_norm": state.grad_norm_sum / state.loss_count if state.loss_count else None, **metrics,
           "tokens_generated": state.tokens_generated, "train_seconds": state.train_seconds,
           "eval_seconds": state.eval_seconds}
    if distributed.is_main():  # under several processes, only the main one writes files
        folder.append(row, {name: [float(f"{v:.7g}") for v in estimates[name].values.tolist()]
                            for name in PAIRED if name in estimates})
    if trackers is not None:
        trackers.log(row)
    student.model.train()
    state.loss_sum, state.grad_norm_sum, state.loss_count = 0.0, 0.0, 0
    unit = "nats/token" if evaluator.options["per_token"] else "nats/sequence"
    log(f"{label} step {state.step}/{steps} epoch {row['epoch']:.1f}: proxy {row['proxy']:.2f}±"
        f"{row['proxy_se']:.2f}  golden {row['golden']:.2f}±{row['golden_se']:.2f}  ({unit})")
