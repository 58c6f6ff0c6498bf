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

from teacherhack import distributed, seeds
from teacherhack.divergences import Estimate, kl_values, response_mask
from teacherhack.models import LM, Prompts


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
                          generator=seeds.generator(seed, start))
             for start in range(0, len(prompts), batch_size)]
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=model.pad_id) for p in parts])


def draw_references(oracle: LM, teacher: LM, prompts: Prompts, *, samples_per_prompt: int, max_new_tokens: int,
                    batch_size: int, seed: int) -> ReferenceSamples:
    prompts = prompts.repeat(samples_per_prompt)
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    return ReferenceSamples(prompts, sample_in_batches(oracle, prompts, seed=seed, **kwargs),
                            sample_in_batches(teacher, prompts, seed=seed + 1, **kwargs))


class ScoredSamples:
    """Samples of a frozen model p, in batches. p's next-token log-probabilities are kept after the first
    use when they fit in ``cache_bytes`` (the lab's 1k vocabulary: yes; a 150k one: no), so later
    KL(p‖q) estimates need only q's forward pass; otherwise each estimate recomputes them batch by batch."""

    def __init__(self, p: LM, prompts: Prompts, samples: Tensor, *, batch_size: int, cache_bytes: int = 1 << 30):
        self.p, self.batches = p, []
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            mask = response_mask(samples[rows], p.eos_id)
            width = max(int(mask.sum(-1).max()), 1)  # drop columns that are padding in every row
            self.batches.append((prompts[rows], samples[rows, :width].to(p.device), mask[:, :width].to(p.device)))
        size = sum(mask.numel() for _, _, mask in self.batches) * p.vocab_size * 4
        self.cache: list[Tensor] | None = [] if size <= cache_bytes else None

    @torch.no_grad()
    def kl_to(self, q: LM, *, estimator: str, per_token: bool) -> Estimate:
        """KL(p‖q) from these samples of p."""
        values = []
        for index, (prompts, samples, mask) in enumerate(self.batches):
            if self.cache is not None and index < len(self.cache):
                log_p = self.cache[index]
            else:
                log_p = self.p.next_token_logprobs(prompts, samples)
                if self.cache is not None:
                    self.cache.append(log_p)
            values.append(kl_values(log_p, q.next_token_logprobs(prompts, samples), samples, mask,
                                    estimator=estimator, per_token=per_token))
        return Estimate.of(distributed.gather(torch.cat(values)))  # every process's shard, in rank order


def kl_estimate(p: LM, q: LM, prompts: Prompts, samples: Tensor, *, estimator: str, per_token: bool,
                batch_size: int) -> Estimate:
    """KL(p‖q) on responses ``samples`` drawn from p, scored batch by batch (nothing kept)."""
    return ScoredSamples(p, prompts, samples, batch_size=batch_size, cache_bytes=0).kl_to(
        q, estimator=estimator, per_token=per_token)


class Evaluator:
    """Computes one metrics row for the current student; the references are fixed at construction and
    the frozen models' log-probabilities on them are computed once."""

    def __init__(self, oracle: LM, teacher: LM, references: ReferenceSamples, *, estimator: str, per_token: bool,
                 reverse_samples: int, batch_size: int, max_new_tokens: int, seed: int):
        self.oracle, self.teacher = oracle, teacher
        self.options = dict(estimator=estimator, per_token=per_token)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.seed = seed + seeds.PROCESS_STRIDE * distributed.rank()  # each process samples its own responses
        n = min(reverse_samples, len(references.prompts))  # evenly spaced rows: as many distinct prompts as possible
        reverse_rows = torch.tensor(distributed.shard(torch.arange(n) * len(references.prompts) // n), dtype=torch.long)
        self.reverse_prompts = references.prompts[reverse_rows] if n else None
        rows = torch.tensor(distributed.shard(range(len(references.prompts))), dtype=torch.long)
        references = ReferenceSamples(references.prompts[rows], references.oracle[rows], references.teacher[rows])
        self.from_oracle = ScoredSamples(oracle, references.prompts, references.oracle, batch_size=batch_size)
        self.from_teacher = ScoredSamples(teacher, references.prompts, references.teacher, batch_size=batch_size)
        self.teacher_golden = self.from_oracle.kl_to(teacher, **self.options)

    def __call__(self, student: LM, step: int) -> tuple[dict[str, float], dict[str, Estimate]]:
        """The metrics row, and the estimates themselves (their per-sample values pair across steps)."""
        estimates = {"golden": self.from_oracle.kl_to(student, **self.options),
                     "proxy": self.from_teacher.kl_to(student, **self.options)}
        if self.reverse_prompts is not None:
            samples = sample_in_batches(student, self.reverse_prompts, max_new_tokens=self.max_new_tokens,
                                        batch_size=self.batch_size, seed=self.seed + seeds.STEP_STRIDE * step)
            from_student = ScoredSamples(student, self.reverse_prompts, samples, batch_size=self.batch_size)
            estimates["golden_reverse"] = from_student.kl_to(self.oracle, **self.options)
            estimates["proxy_reverse"] = from_student.kl_to(self.teacher, **self.options)
        row = {}
        for name, estimate in estimates.items():
            row |= {name: estimate.mean, f"{name}_se": estimate.se}
        return row, estimates
