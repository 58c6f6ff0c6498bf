"""The training loop shared by every stage (oracle on real pairs, SFT on oracle samples, distillation),
with the losses that plug into it and the checkpoint that lets a killed run resume exactly."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from teacherhack import distributed
from teacherhack.divergences import response_mask, token_cross_entropy, token_divergence
from teacherhack.models import LM
from teacherhack.sources import Batch, Source

LossFn = Callable[[Batch, float], Tensor]  # (micro-batch, denominator of the accumulation window) → loss


class NonFiniteLoss(RuntimeError):
    """Raised instead of taking an optimiser step on a NaN/inf loss; the last checkpoint stays intact."""


def sft_loss(model: LM) -> LossFn:
    """Cross-entropy of the batch's responses under ``model`` (per-sequence mean over response tokens)."""

    def loss(batch: Batch, denominator: float) -> Tensor:
        mask = response_mask(batch.responses, model.eos_id).to(model.device)
        return token_cross_entropy(model.logits(batch.prompts, batch.responses), batch.responses.to(model.device),
                                   mask, denominator=denominator)

    return loss


def distill_loss(student: LM, teacher: LM, *, loss: str, beta: float, alpha: float, temperature: float,
                 chunk_size: int | None) -> LossFn:
    """The stage-2 loss on the teacher's and the student's full next-token distributions along the batch's
    responses; ``hard_ce`` is sequence-level KD with hard labels (cross-entropy on the sampled tokens)."""
    if loss == "hard_ce":
        return sft_loss(student)
    vocab = min(student.vocab_size, teacher.vocab_size) if student.vocab_size != teacher.vocab_size else None

    def compute(batch: Batch, denominator: float) -> Tensor:
        mask = response_mask(batch.responses, student.eos_id).to(student.device)
        with torch.no_grad():
            teacher_logits = teacher.logits(batch.prompts, batch.responses)
        return token_divergence(teacher_logits, student.logits(batch.prompts, batch.responses), mask,
                                divergence=loss, beta=beta, alpha=alpha, temperature=temperature,
                                denominator=denominator, vocab_size=vocab, chunk_size=chunk_size)

    return compute


def learning_rate(step: int, *, lr: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then constant or cosine decay to 10% at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model: LM, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def train(model: LM, source: Source, loss_fn: LossFn, *, steps: int, lr: float, warmup: int, schedule: str,
          grad_accum: int = 1, max_grad_norm: float = 1.0, start_step: int = 0,
          optimizer: torch.optim.Optimizer | None = None, desc: str = "train",
          on_step: Callable[[int, float], None] | None = None) -> torch.optim.Optimizer:
    """Run optimiser steps ``start_step+1 … steps``. Each step takes ``source.batch(step)`` (this process's
    shard of the global batch), splits it into ``grad_accum`` micro-batches and normalises the loss by the
    sequence count of the whole global batch: the loss of one big batch, whatever the number of processes
    or micro-batches. ``on_step(step, loss)`` runs after each step (evaluation, checkpoints)."""
    optimizer = optimizer or make_optimizer(model, lr)
    module, wrapped_optimizer, accelerator = distributed.wrap_for_training(model.model, optimizer)
    model.module = module
    scale = distributed.world()  # DDP averages gradients over processes; the loss is already global
    model.model.train()
    try:
        for step in tqdm(range(start_step, steps), desc=desc, initial=start_step, total=steps, leave=False,
                         mininterval=2.0, dynamic_ncols=True, disable=not distributed.is_main()):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, lr=lr, warmup=warmup, total=steps, schedule=schedule)
            batch = source.batch(step)
            mask = response_mask(batch.responses, model.eos_id)
            denominator = distributed.all_sum(float((mask.sum(-1) > 0).sum()))
            micro_batches = torch.arange(len(batch.prompts)).chunk(grad_accum)
            total = 0.0
            for index, micro in enumerate(micro_batches):
                last = index == len(micro_batches) - 1
                with contextlib.nullcontext() if accelerator is None or last else accelerator.no_sync(module):
                    loss = loss_fn(Batch(batch.prompts[micro], batch.responses[micro], batch.origin), denominator)
                    if distributed.all_sum(0.0 if torch.isfinite(loss) else 1.0):
                        raise NonFiniteLoss(f"{desc}: loss is not finite at step {step + 1} (batch from "
                                            f"{batch.origin}); no step was taken. Lower the learning rate or check "
                                            f"the data.")
                    (loss * scale).backward() if accelerator is None else accelerator.backward(loss * scale)
                total += float(loss.detach())
            if accelerator is None:
                torch.nn.utils.clip_grad_norm_(model.model.parameters(), max_grad_norm)
            else:
                accelerator.clip_grad_norm_(module.parameters(), max_grad_norm)
            wrapped_optimizer.step()
            wrapped_optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(step + 1, distributed.all_sum(total))
    finally:
        model.module = model.model
    return optimizer


def save_checkpoint(path: Path, model: LM, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write model (safetensors), optimiser state and loop state, atomically: a kill mid-write leaves the
    previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # a save killed mid-write
    tmp.mkdir(parents=True)
    model.save(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
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
