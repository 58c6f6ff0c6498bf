"""Where training batches come from: a fixed set of pairs (offline data, SFT data), fresh samples of a
model (online teacher or online student), or a mixture.

Each source's batch is a pure function of the step number and the seed, so a resumed run sees exactly the
batches an uninterrupted one would, and every batch records which source produced it. Under several
processes each one gets its shard of the global batch (and samples only that shard).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from teacherhack import distributed, seeds
from teacherhack.generation import Sampler
from teacherhack.divergences import response_mask
from teacherhack.launch import idle_cores
from teacherhack.models import LM, Prompts, collate_prompts, pad_responses
from teacherhack.teacher_signals import SignalBatch, TeacherSignals


@dataclass(frozen=True)
class Batch:
    prompts: Prompts
    responses: Tensor  # [B, T]: each row ends at its first EOS, padded after (or truncated, no EOS)
    origin: str  # "offline", "online_teacher", "online_student", "real", "oracle"
    teacher: SignalBatch | None = None  # the teacher's distributions at each position, when known without a forward
    prompt_rows: Tensor | None = None  # online sources: each row's index in the source's prompt list

    def __getitem__(self, rows: Tensor) -> "Batch":
        """A micro-batch: these rows, their signals and prompt indices with them."""
        signals = None if self.teacher is None else SignalBatch(
            *(None if t is None else t[rows] for t in (self.teacher.logprobs, self.teacher.ids, self.teacher.tail)))
        return Batch(self.prompts[rows], self.responses[rows], self.origin, signals,
                     None if self.prompt_rows is None else self.prompt_rows[rows])


class _Cycler:
    """Items 0..n−1 in a fresh seeded permutation each epoch; ``take(step, size)`` is the step's slice."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("a source needs at least one item")
        self.n, self.seed = n, seed
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, torch.randperm(self.n, generator=seeds.generator(self.seed, epoch))
        return self._order

    def take(self, step: int, size: int) -> list[int]:
        start = step * size
        return [int(self._permutation(i // self.n)[i % self.n]) for i in range(start, start + size)]

    def epoch(self, steps_done: int, size: int) -> float:
        return steps_done * size / self.n


class FixedPairs:
    """A fixed dataset of (prompt, response) token sequences, reshuffled every epoch; with the teacher's
    signals on it when they were computed once (``signals``, aligned with the responses)."""

    def __init__(self, prompts: list[list[int]], responses: list[list[int]], *, batch_size: int, seed: int,
                 pad_id: int, origin: str, signals: TeacherSignals | None = None, eos_id: int | None = None):
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if signals is not None and (len(signals) != len(responses) or eos_id is None):
            raise ValueError(f"teacher signals for {len(signals)} responses (and the EOS id) are needed for "
                             f"{len(responses)} responses")
        self.prompts, self.responses, self.origin = prompts, responses, origin
        self.batch_size, self.pad_id, self.signals, self.eos_id = batch_size, pad_id, signals, eos_id
        self._cycle = _Cycler(len(prompts), seed)

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, step: int) -> Batch:
        rows = distributed.shard(self._cycle.take(step, self.batch_size))
        responses = pad_responses([self.responses[i] for i in rows], self.pad_id)
        signals = None if self.signals is None else self.signals.gather(rows, response_mask(responses, self.eos_id))
        return Batch(collate_prompts([self.prompts[i] for i in rows], self.pad_id), responses, self.origin, signals)

    def epoch(self, steps_done: int) -> float:
        return self._cycle.epoch(steps_done, self.batch_size)


class OnlineSamples:
    """Fresh responses for every batch from a sampler of the teacher, or of the current student.

    A frozen model's samples (the teacher's) do not depend on training, so they are drawn ``block`` steps at a
    time (more rows per generation call: faster), and with ``keep_logprobs`` each batch carries the
    distribution every token was drawn from (``Batch.teacher``), which spares the loss a second teacher pass.
    A step's samples are a pure function of the seed, the step and the weights sampled from, so a resumed run sees
    exactly what an uninterrupted one saw. ``sync_from``: the model being trained, whose weights the sampler
    receives on the first batch of every block of ``sync_every`` steps (a no-op for the HF sampler, which reads the
    live model), and on the first batch after a resume, which ``config.validate`` puts on a block's first step.
    """

    def __init__(self, prompts: list[list[int]], sampler: Sampler, *, batch_size: int, seed: int, pad_id: int,
                 eos_id: int, max_new_tokens: int, origin: str, sync_from: LM | None = None, sync_every: int = 1,
                 block: int = 1, keep_logprobs: bool = False):
        if sync_from is not None and block != 1:
            raise ValueError("the samples of a model in training cannot be drawn ahead: block must be 1")
        self.prompts, self.sampler, self.origin = prompts, sampler, origin
        self.batch_size, self.pad_id, self.eos_id, self.max_new_tokens = batch_size, pad_id, eos_id, max_new_tokens
        self.seed, self.block, self.keep_logprobs = seed, block, keep_logprobs
        self.sync_from, self.sync_every, self._synced_block = sync_from, sync_every, None
        self._cycle = _Cycler(len(prompts), seed)
        self._drawn: tuple[int, list[Batch]] | None = None  # the block of batches drawn last
        self.tokens_generated = 0

    def batch(self, step: int) -> Batch:
        if self.sync_from is not None and step // self.sync_every != self._synced_block:
            self.sampler.sync(self.sync_from)
            self._synced_block = step // self.sync_every
        index = step // self.block
        if self._drawn is None or self._drawn[0] != index:
            self._drawn = (index, self._draw(index))
        batch = self._drawn[1][step % self.block]
        self.tokens_generated += int((batch.responses != self.pad_id).sum())
        return batch

    def _draw(self, index: int) -> list[Batch]:
        """The batches of steps index·block … (index+1)·block − 1, from one sampler call."""
        steps = [distributed.shard(self._cycle.take(step, self.batch_size))
                 for step in range(index * self.block, (index + 1) * self.block)]
        rows = [row for step_rows in steps for row in step_rows]
        generator = seeds.generator(self.seed, seeds.ONLINE_SAMPLES, index,
                                    *([distributed.rank()] if distributed.launched() else []))
        prompts = collate_prompts([self.prompts[i] for i in rows], self.pad_id)
        with idle_cores() if self.sampler.any_threads else contextlib.nullcontext():
            drawn = self.sampler.sample(prompts, max_new_tokens=self.max_new_tokens, generator=generator,
                                        return_logprobs=self.keep_logprobs)
        responses, logprobs = drawn if self.keep_logprobs else (drawn, None)
        batches, start = [], 0
        for step_rows in steps:
            part = slice(start, start + len(step_rows))
            width = max(int(response_mask(responses[part], self.eos_id).sum(-1).max()), 1)
            signals = None if logprobs is None else SignalBatch(logprobs[part, :width].float())
            batches.append(Batch(collate_prompts([self.prompts[i] for i in step_rows], self.pad_id),
                                 responses[part, :width], self.origin, signals, torch.tensor(step_rows)))
            start += len(step_rows)
        return batches

    def epoch(self, steps_done: int) -> float:
        return self._cycle.epoch(steps_done, self.batch_size)


class Mixture:
    """GKD's mixture: each batch is online-student data with probability λ, else from ``other``."""

    def __init__(self, other: FixedPairs | OnlineSamples, online: OnlineSamples, *, fraction: float, seed: int):
        self.other, self.online, self.fraction, self.seed = other, online, fraction, seed

    def batch(self, step: int) -> Batch:
        draw = float(torch.rand(1, generator=seeds.generator(self.seed, seeds.MIXTURE_DRAWS, step)))
        return (self.online if draw < self.fraction else self.other).batch(step)

    def epoch(self, steps_done: int) -> float:
        """Passes over the data trained on, in expectation: a share 1 − λ of the steps over ``other``'s rows (k
        generations per prompt make k rows each), λ over the online prompts; the two agree where k = 1."""
        offline = self.other.epoch(steps_done)
        return offline + self.fraction * (self.online.epoch(steps_done) - offline)

    @property
    def tokens_generated(self) -> int:
        return self.online.tokens_generated

    @tokens_generated.setter
    def tokens_generated(self, value: int) -> None:
        self.online.tokens_generated = value


Source = FixedPairs | OnlineSamples | Mixture
