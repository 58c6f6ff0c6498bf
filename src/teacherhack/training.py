"""Training pieces shared by every stage: the optimiser step (micro-batches, global normalisation, the
non-finite check), the supervised loop of the upstream stages, the losses that plug into them, and the
checkpoint that lets a killed stage-2 run resume exactly."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from teacherhack import distributed
from teacherhack.errors import UserError
from teacherhack.divergences import (
    response_mask,
    sampled_reverse_kl,
    sparse_token_divergence,
    token_cross_entropy,
    token_divergence,
)
from teacherhack.models import LM, PromptStates, float32_attention
from teacherhack.sources import Batch, Source
from teacherhack.teacher_signals import SignalBatch, TeacherSignals

LossFn = Callable[[Batch, float], Tensor]  # (micro-batch, denominator of the accumulation window) → loss


class NonFiniteLoss(UserError):
    """Raised instead of taking an optimiser step on a NaN/inf loss; the last checkpoint stays intact."""


def sft_loss(model: LM) -> LossFn:
    """Cross-entropy of the batch's responses under ``model`` (per-sequence mean over response tokens)."""

    def loss(batch: Batch, denominator: float) -> Tensor:
        mask = response_mask(batch.responses, model.eos_id).to(model.device)
        return token_cross_entropy(model.logits(batch.prompts, batch.responses), batch.responses.to(model.device),
                                   mask, denominator=denominator)

    return loss


def distill_loss(student: LM, teacher: LM, *, loss: str, beta: float, alpha: float, temperature: float,
                 chunk_size: int | None, top_k: int | None = None, convention: str = "tail",
                 kl_estimator: str = "k1", discount: float = 1.0, prompt_states: PromptStates | None = None) -> LossFn:
    """The stage-2 loss along the batch's responses.

    Divergences compare the teacher's and the student's next-token distributions: the full ones, or the
    teacher's top ``top_k`` tokens (``convention``: with a tail bucket, or renormalised). The teacher's side
    comes with the batch when it is known without a forward pass (``Batch.teacher``: the offline dataset's
    signals computed once, or the teacher's own sampling distributions), else from a teacher forward.
    ``hard_ce`` is sequence-level KD with hard labels (cross-entropy on the sampled tokens);
    ``sampled_reverse_kl`` is on-policy distillation on the student's own samples, which needs only the
    teacher's log-probability of each sampled token (``teacherhack.divergences.sampled_reverse_kl``).
    ``prompt_states``: the teacher's keys and values on the online source's prompts, computed once, so that its
    forward runs on the responses alone (``distill.teacher_prompt_cache``)."""
    if loss == "hard_ce":
        return sft_loss(student)

    def compute(batch: Batch, denominator: float) -> Tensor:
        mask = response_mask(batch.responses, student.eos_id).to(student.device)
        responses = batch.responses.to(student.device)
        signals = batch.teacher
        if signals is None or (top_k is not None and signals.ids is None):
            if signals is None:  # the teacher runs: on the responses alone where its prompts' states are kept
                prefix = (None if prompt_states is None or batch.prompt_rows is None
                          else prompt_states.prefix(batch.prompt_rows, batch.prompts))
                with torch.no_grad():
                    log_p = teacher.next_token_logprobs(batch.prompts, batch.responses, prefix)
            else:
                log_p = signals.logprobs.to(teacher.device)
            if loss == "sampled_reverse_kl":
                token = log_p.gather(-1, responses.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                return sampled_reverse_kl(student.logits(batch.prompts, batch.responses), token, responses, mask,
                                          estimator=kl_estimator, discount=discount, temperature=temperature,
                                          denominator=denominator)
            signals = SignalBatch(log_p) if top_k is None else top_k_signals(log_p, mask, top_k, temperature)
        student_logits = student.logits(batch.prompts, batch.responses)
        options = dict(divergence=loss, beta=beta, alpha=alpha, temperature=temperature, denominator=denominator,
                       chunk_size=chunk_size)
        if signals.ids is None:
            return token_divergence(signals.logprobs.to(student.device), student_logits, mask, **options)
        return sparse_token_divergence(signals.ids.to(student.device), signals.logprobs.to(student.device),
                                       None if signals.tail is None else signals.tail.to(student.device),
                                       student_logits, mask, convention=convention, **options)

    return compute


def top_k_signals(log_p: Tensor, mask: Tensor, k: int, temperature: float) -> SignalBatch:
    """The teacher's top-k signals of a batch at the loss temperature, aligned with it (what a sparse-logit cache
    would have stored, without its storage rounding). Selected on the teacher's device: only the k entries per
    position travel to the host, not [B, T, V] (0.5 GB a step at T5's 32k vocabulary and batch 32 × 128)."""
    signals = TeacherSignals.from_logprobs(log_p.detach(), mask.bool(), k=min(k, log_p.shape[-1]),
                                           dtype=torch.float32, temperature=temperature)
    return signals.gather(range(mask.shape[0]), mask.bool().cpu())


def learning_rate(step: int, *, lr: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then constant or cosine decay to 10% at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model: LM, lr: float) -> torch.optim.AdamW:
    """AdamW, fused: one kernel per step instead of one per parameter tensor (16× faster for the lab's sizes)."""
    return torch.optim.AdamW(model.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)


@contextmanager
def prepared(model: LM, optimizer: torch.optim.Optimizer) -> Iterator[distributed.Prepared]:
    """Train mode, wrapped for the launcher if any (scoring goes through the wrapper while inside)."""
    ready = distributed.wrap_for_training(model.model, optimizer)
    model.module = ready.module
    model.model.train()
    try:
        yield ready
    finally:
        model.module = model.model


@dataclass(frozen=True)
class Step:
    """What one optimiser step reports: the global loss and the gradient's norm before clipping."""

    loss: float
    grad_norm: float


def optimizer_step(model: LM, ready: distributed.Prepared, batch: Batch, loss_fn: LossFn, *, lr: float,
                   grad_accum: int = 1, max_grad_norm: float = 1.0, precision: str = "float32",
                   where: str = "train") -> Step:
    """One optimiser step on ``batch`` (this process's shard of the global batch), split into ``grad_accum``
    micro-batches and normalised by the sequence count of the whole global batch: the loss of one big batch,
    whatever the number of processes or micro-batches. Returns the global loss and the gradient norm. A non-finite loss or gradient
    raises :class:`NonFiniteLoss` before any parameter changes. ``precision="bfloat16"``: the forward passes run under
    bf16 autocast (weights, gradients and optimizer state stay float32; the loss itself is computed in float32);
    ``"bfloat16-fp32-attention"``: the same with attention in float32."""
    for group in ready.optimizer.param_groups:
        group["lr"] = lr
    mask = response_mask(batch.responses, model.eos_id)
    denominator = distributed.all_sum(float((mask.sum(-1) > 0).sum()))
    scale = distributed.world()  # DDP averages gradients over processes; the loss is already global
    micro_batches = torch.arange(len(batch.prompts)).chunk(grad_accum)
    total = 0.0
    for index, micro in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        accelerator = ready.accelerator
        with contextlib.nullcontext() if accelerator is None or last else accelerator.no_sync(ready.module):
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=precision != "float32"), \
                    float32_attention(precision == "bfloat16-fp32-attention"):
                loss = loss_fn(batch[micro], denominator)
            (loss * scale).backward() if accelerator is None else accelerator.backward(loss * scale)
        total += float(loss.detach())
    # One collective after the loop, not one per micro-batch: processes whose shards differ in size (a process count
    # that does not divide the batch) split them into different numbers of micro-batches
    if distributed.all_sum(0.0 if math.isfinite(total) else 1.0):  # a non-finite loss makes the sum non-finite
        ready.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"{where}: the loss is not finite (batch from {batch.origin}); no step was taken and the "
                            f"last checkpoint is intact. Lower the learning rate or check the data, then rerun.")
    if ready.accelerator is None:
        norm = torch.nn.utils.clip_grad_norm_(model.model.parameters(), max_grad_norm)
    else:
        norm = ready.accelerator.clip_grad_norm_(ready.module.parameters(), max_grad_norm)
    if not torch.isfinite(torch.as_tensor(norm)):  # a finite loss can still have a NaN or infinite gradient
        ready.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"{where}: the gradient is not finite (batch from {batch.origin}); no step was taken and "
                            f"the last checkpoint is intact. Lower the learning rate or check the data, then rerun.")
    ready.optimizer.step()
    ready.optimizer.zero_grad(set_to_none=True)
    return Step(distributed.all_sum(total), float(norm))


def train(model: LM, source: Source, loss_fn: LossFn, *, steps: int, lr: float, warmup: int, schedule: str,
          grad_accum: int = 1, max_grad_norm: float = 1.0, precision: str = "float32", desc: str = "train") -> None:
    """Supervised training for ``steps`` steps from a fresh optimizer: the oracle, the SFT stages and
    pre-training (stage 2 has its own loop, with evaluations and checkpoints: ``teacherhack.distill``)."""
    optimizer = make_optimizer(model, lr)
    with prepared(model, optimizer) as ready:
        for step in tqdm(range(steps), desc=desc, leave=False, mininterval=2.0, dynamic_ncols=True,
                         disable=not distributed.is_main()):
            optimizer_step(model, ready, source.batch(step), loss_fn, grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                           lr=learning_rate(step, lr=lr, warmup=warmup, total=steps, schedule=schedule),
                           precision=precision, where=f"{desc} step {step + 1}")


def save_checkpoint(path: Path, model: LM, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write model (safetensors), optimiser state and loop state, atomically (:func:`write_folder`): a kill
    mid-write leaves the previous checkpoint intact."""
    def write(folder: Path) -> None:
        model.save(folder)
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        (folder / "state.json").write_text(json.dumps(state))

    write_folder(path, write)


def write_folder(path: Path, write: Callable[[Path], None]) -> None:
    """Fill folder ``path`` with ``write(folder)`` atomically: into a sibling first, then swapped in, so a kill
    mid-write leaves the previous version (``path``, or ``PATH.old`` between the two renames:
    :func:`latest_checkpoint`), never a half-written folder."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # a save killed mid-write
    tmp.mkdir(parents=True)
    write(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)  # left by a save killed after moving its folder in (rename onto it would fail)
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def latest_checkpoint(path: Path) -> Path | None:
    """The checkpoint to resume from: ``path``, or its previous version when a kill struck between the
    two renames of :func:`save_checkpoint`."""
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / "state.json").exists():
            return candidate
    return None


def load_checkpoint(path: Path, model: LM, optimizer: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file

    state_dict = load_file(path / "model.safetensors", device=str(model.device))
    missing, unexpected = model.model.load_state_dict(state_dict, strict=False)
    loaded = {p.data_ptr() for name, p in model.model.named_parameters(remove_duplicate=False) if name not in missing}
    untied = [name for name, p in model.model.named_parameters(remove_duplicate=False)
              if name in missing and p.data_ptr() not in loaded]
    if unexpected or untied:
        raise ValueError(f"checkpoint {path} does not fit the model: unexpected {unexpected}, missing {untied}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())
