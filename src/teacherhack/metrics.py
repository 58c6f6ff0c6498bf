"""Evaluation on held-out prompts: the golden metric KL(oracle‖student) and the proxy metric
KL(teacher‖student), each with its standard error, plus the reverse KLs.

The frozen oracle and teacher are sampled once per validation set (``ReferenceSamples``) and those samples
are reused at every evaluation, so successive evaluations are paired: only the student changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from teacherhack.divergences import Estimate, kl_values, response_mask
from teacherhack.models import LM, Prompts
from teacherhack.sources import seeded_generator


@dataclass(frozen=True)
class ReferenceSamples:
    """Validation prompts (each repeated k times) with one oracle and one teacher response per row."""

    prompts: Prompts
    oracle: Tensor
    teacher: Tensor

    def save(self, path: Path) -> None:
        save_file({"prompt_ids": self.prompts.ids, "prompt_mask": self.prompts.mask.to(torch.uint8),
                   "oracle": self.oracle, "teacher": self.teacher}, str(path))

    @staticmethod
    def load(path: Path) -> "ReferenceSamples":
        t = load_file(str(path))
        return ReferenceSamples(Prompts(t["prompt_ids"], t["prompt_mask"].bool()), t["oracle"], t["teacher"])


def sample_in_batches(model: LM, prompts: Prompts, *, max_new_tokens: int, batch_size: int, seed: int) -> Tensor:
    """Responses for every prompt row, drawn batch by batch with seeded generators, right-padded."""
    parts = [model.sample(prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                          generator=seeded_generator(seed, start))
             for start in range(0, len(prompts), batch_size)]
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=model.pad_id) for p in parts])


def draw_references(oracle: LM, teacher: LM, prompts: Prompts, *, samples_per_prompt: int, max_new_tokens: int,
                    batch_size: int, seed: int) -> ReferenceSamples:
    prompts = prompts.repeat(samples_per_prompt)
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    return ReferenceSamples(prompts, sample_in_batches(oracle, prompts, seed=seed, **kwargs),
                            sample_in_batches(teacher, prompts, seed=seed + 1, **kwargs))


@torch.no_grad()
def kl_estimate(p: LM, q: LM, prompts: Prompts, samples: Tensor, *, estimator: str, per_token: bool,
                batch_size: int) -> Estimate:
    """KL(p‖q) on responses ``samples`` drawn from p, scored batch by batch."""
    values = []
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        sub_prompts, sub_samples = prompts[rows], samples[rows]
        mask = response_mask(sub_samples, p.eos_id)
        width = max(int(mask.sum(-1).max()), 1)  # drop columns that are padding in every row
        sub_samples, mask = sub_samples[:, :width], mask[:, :width]
        values.append(kl_values(p.next_token_logprobs(sub_prompts, sub_samples),
                                q.next_token_logprobs(sub_prompts, sub_samples),
                                sub_samples.to(p.device), mask.to(p.device), estimator=estimator, per_token=per_token))
    return Estimate.of(torch.cat(values))


class Evaluator:
    """Computes one metrics row for the current student; the references are fixed at construction."""

    def __init__(self, oracle: LM, teacher: LM, references: ReferenceSamples, *, estimator: str, per_token: bool,
                 reverse: bool, batch_size: int, max_new_tokens: int, seed: int):
        self.oracle, self.teacher, self.refs = oracle, teacher, references
        self.kwargs = dict(estimator=estimator, per_token=per_token, batch_size=batch_size)
        self.reverse, self.max_new_tokens, self.seed = reverse, max_new_tokens, seed
        self.teacher_golden = kl_estimate(oracle, teacher, references.prompts, references.oracle, **self.kwargs)

    def __call__(self, student: LM, step: int) -> dict[str, float]:
        golden = kl_estimate(self.oracle, student, self.refs.prompts, self.refs.oracle, **self.kwargs)
        proxy = kl_estimate(self.teacher, student, self.refs.prompts, self.refs.teacher, **self.kwargs)
        row = {"golden": golden.mean, "golden_se": golden.se, "proxy": proxy.mean, "proxy_se": proxy.se}
        if self.reverse:
            samples = sample_in_batches(student, self.refs.prompts, max_new_tokens=self.max_new_tokens,
                                        batch_size=self.kwargs["batch_size"], seed=self.seed + 7919 * step)
            golden_r = kl_estimate(student, self.oracle, self.refs.prompts, samples, **self.kwargs)
            proxy_r = kl_estimate(student, self.teacher, self.refs.prompts, samples, **self.kwargs)
            row |= {"golden_reverse": golden_r.mean, "golden_reverse_se": golden_r.se,
                    "proxy_reverse": proxy_r.mean, "proxy_reverse_se": proxy_r.se}
        return row
