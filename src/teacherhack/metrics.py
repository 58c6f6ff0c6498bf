"""Evaluation: the golden metric KL(oracle‖student), the proxy metric KL(teacher‖student) on held-out prompts and
on training prompts, the student's likelihood of the oracle's and of the task's real responses, the reverse KLs
and the student's entropy; each with its standard error.

The fixed samples (the oracle's and the teacher's on the validation prompts, the teacher's on training prompts,
the real responses) are drawn once per validation set and reused at every evaluation, so that successive
evaluations are paired sample by sample: only the student changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from teacherhack import distributed, seeds
from teacherhack.divergences import Estimate, FrozenP, entropy_values, nll_values, response_mask
from teacherhack.models import LM, Prompts, eval_mode


@dataclass(frozen=True)
class SampleSet:
    """Prompts (one row per sample) and one response per row: a model's samples, or real responses."""

    prompts: Prompts
    responses: Tensor

    def __getitem__(self, rows: Tensor) -> "SampleSet":
        return SampleSet(self.prompts[rows], self.responses[rows])


def save_sample_sets(path: Path, sets: dict[str, SampleSet]) -> None:
    tensors = {}
    for name, s in sets.items():
        tensors |= {f"{name}.prompt_ids": s.prompts.ids, f"{name}.prompt_mask": s.prompts.mask.to(torch.uint8),
                    f"{name}.responses": s.responses}
    save_file(tensors, str(path))


def load_sample_sets(path: Path) -> dict[str, SampleSet]:
    t = load_file(str(path))
    names = sorted({key.rsplit(".", 1)[0] for key in t})
    return {n: SampleSet(Prompts(t[f"{n}.prompt_ids"], t[f"{n}.prompt_mask"].bool()), t[f"{n}.responses"])
            for n in names}


def sample_in_batches(model: LM, prompts: Prompts, *, max_new_tokens: int, batch_size: int, seed: int,
                      per_row: bool = False) -> Tensor:
    """Responses for every prompt row, drawn batch by batch, right-padded. The draws come from one seeded generator
    per batch (the lab's, as its recorded results were drawn), or with ``per_row`` one per row: then a row's
    response does not depend on ``batch_size`` (but for the rounding of batched arithmetic, which can flip a token
    whose two candidates are near-tied)."""
    def generator(start: int) -> torch.Generator | list[torch.Generator]:
        rows = range(start, min(start + batch_size, len(prompts)))
        return [seeds.generator(seed, row) for row in rows] if per_row else seeds.generator(seed, start)

    parts = [model.sample(prompts[start:start + batch_size], max_new_tokens=max_new_tokens, generator=generator(start))
             for start in range(0, len(prompts), batch_size)]
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=model.pad_id) for p in parts])


def draw_samples(model: LM, prompts: Prompts, *, samples_per_prompt: int, max_new_tokens: int, batch_size: int,
                 seed: int) -> SampleSet:
    """``samples_per_prompt`` responses of ``model`` to each prompt, drawn once (evaluation references)."""
    prompts = prompts.repeat(samples_per_prompt)
    return SampleSet(prompts, sample_in_batches(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                seed=seed))


class ScoredSamples:
    """A fixed set of responses, in batches, scored against models q. When the responses are samples of a frozen
    model p, p's side of the KL (:class:`teacherhack.divergences.FrozenP`) is kept after the first use if it fits
    in ``cache_bytes`` (the lab's 1k vocabulary: yes; a 150k one: no), so later measurements need only q's
    forward pass and one product."""

    def __init__(self, p: LM | None, samples: SampleSet, *, eos_id: int, batch_size: int, cache_bytes: int = 1 << 30,
                 frozen: Sequence[Tensor] | None = None):
        self.p, self.batches = p, []
        for start in range(0, len(samples.prompts), batch_size):
            rows = slice(start, start + batch_size)
            mask = response_mask(samples.responses[rows], eos_id)
            width = max(int(mask.sum(-1).max()), 1)  # drop columns that are padding in every row
            self.batches.append((samples.prompts[rows], samples.responses[rows, :width], mask[:, :width]))
        # p's log-probabilities and its probabilities at the response positions: two [positions, V] float32 copies
        size = 2 * sum(mask.numel() for _, _, mask in self.batches) * (p.vocab_size if p else 0) * 4
        self.cache: list[FrozenP] | None = [] if size <= cache_bytes else None
        if frozen is not None and self.cache is not None:  # p's log-probabilities, scored before (reference_logprobs)
            if [tuple(f.shape[:2]) for f in frozen] != [tuple(mask.shape) for _, _, mask in self.batches]:
                raise ValueError("the precomputed log-probabilities do not match these samples' batches")
            self.cache = [FrozenP.of(log_p.to(p.device), mask.to(p.device))
                          for log_p, (_, _, mask) in zip(frozen, self.batches)]

    def _frozen(self, index: int) -> FrozenP:
        assert self.p is not None
        if self.cache is not None and index < len(self.cache):
            return self.cache[index]
        prompts, samples, mask = self.batches[index]
        frozen = FrozenP.of(self.p.next_token_logprobs(prompts, samples.to(self.p.device)), mask.to(self.p.device))
        if self.cache is not None:
            self.cache.append(frozen)
        return frozen

    def measure(self, q: LM, *, estimator: str, per_token: bool, entropy: bool = False) -> dict[str, Tensor]:
        """Per-sample values over every process: ``nll`` = −log q(y); ``kl`` = KL(p‖q) when the responses are samples
        of p (estimated as ``estimator`` says); with ``entropy``, q's next-token entropies summed along these
        responses (how sure q is where it is scored, paired across evaluations)."""
        values = self.measure_here(q, estimator=estimator, per_token=per_token, entropy=entropy)
        return {name: distributed.gather(v) for name, v in values.items()}  # every process's shard, in rank order

    @torch.no_grad()
    def measure_here(self, q: LM, *, estimator: str, per_token: bool, entropy: bool = False) -> dict[str, Tensor]:
        """:meth:`measure` on this process's samples only: no collective, so one process may call it alone (the
        upstream stages, which the main process builds while the others wait)."""
        kl, nll, entropies = [], [], []
        for index, (prompts, samples, mask) in enumerate(self.batches):
            samples, mask = samples.to(q.device), mask.to(q.device)
            log_q = q.next_token_logprobs(prompts, samples)
            nll.append(nll_values(log_q, samples, mask, per_token=per_token))
            if entropy:
                entropies.append(entropy_values(log_q, mask, per_token=per_token))
            if self.p is not None:
                kl.append(self._frozen(index).kl_values(log_q, samples, estimator=estimator, per_token=per_token))
        return ({"nll": torch.cat(nll)} | ({"entropy": torch.cat(entropies)} if entropies else {})
                | ({"kl": torch.cat(kl)} if kl else {}))

    @torch.no_grad()
    def entropy(self, *, per_token: bool) -> Tensor:
        """p's entropy, per sample, from these samples of p (over every process)."""
        return distributed.gather(torch.cat([self._frozen(i).entropy_values(per_token=per_token)
                                             for i in range(len(self.batches))]))


def reference_logprobs(models: Mapping[str, LM], references: Mapping[str, SampleSet], *, eos_id: int,
                       batch_size: int) -> dict[str, Tensor]:
    """Each frozen model's log-probabilities on its own reference samples (``models``: the set's name → its
    model), batch by batch as :class:`ScoredSamples` scores them (keys ``name.batch``), for the sets whose
    cache fits: what every stage-2 run of a configuration would otherwise compute again at its start. The same
    bits either way (scoring does not depend on the thread count; tests/test_metrics.py)."""
    out = {}
    for name, model in models.items():
        scored = ScoredSamples(model, references[name], eos_id=eos_id, batch_size=batch_size)
        if scored.cache is not None:
            with torch.no_grad():
                out |= {f"{name}.{i}": scored._frozen(i).log_p.cpu() for i in range(len(scored.batches))}
    return out


def teacher_golden_key(estimator: str, per_token: bool) -> str:
    """Where :func:`teacher_golden_values` are kept among the reference scores: they depend on the estimator."""
    return f"teacher_golden.{estimator}.{'token' if per_token else 'sequence'}"


def teacher_golden_values(oracle: LM, teacher: LM, samples: SampleSet, *, eos_id: int, batch_size: int,
                          estimator: str, per_token: bool, scores: Mapping[str, Tensor] | None = None) -> Tensor:
    """KL(oracle‖teacher) per oracle sample: the teacher's own golden distance, the same for every run of a
    configuration, which the lab computes upstream once (``scores``: :func:`reference_logprobs`, whose oracle
    side it reuses)."""
    scored = ScoredSamples(oracle, samples, eos_id=eos_id, batch_size=batch_size, frozen=_stored(scores, "oracle"))
    return scored.measure_here(teacher, estimator=estimator, per_token=per_token)["kl"]


def _stored(scores: Mapping[str, Tensor] | None, name: str) -> list[Tensor] | None:
    """The batches of reference set ``name``'s log-probabilities among ``scores`` (:func:`reference_logprobs`)."""
    count = sum(key.startswith(f"{name}.") for key in scores or {})
    return [scores[f"{name}.{i}"] for i in range(count)] if count else None


# The per-sample values each evaluation saves (paired across evaluations: the verdicts' SEs of a change)
PAIRED = ("golden", "proxy", "proxy_train", "oracle_nll", "reference_nll")
# The metrics measured on the fixed references: each one's reference set, and which of its values (measure)
ON_REFERENCES = {"golden": ("oracle", "kl"), "proxy": ("teacher", "kl"), "oracle_nll": ("oracle", "nll"),
                 "student_entropy_held_out": ("teacher", "entropy"), "proxy_train": ("train_teacher", "kl"),
                 "reference_nll": ("real", "nll")}


class Evaluator:
    """Computes one metrics row for the current student. The fixed samples are given at construction (``oracle``
    and ``teacher``: their samples on the validation prompts; ``real``: the task's real responses to them;
    ``train_teacher``: the teacher's samples on training prompts) and the frozen models' log-probabilities on
    them are computed once, or given (``frozen``: :func:`reference_logprobs`, with :func:`teacher_golden_values`
    under :func:`teacher_golden_key`, which the lab computes upstream for all its runs). The models' samples are
    ``samples_per_prompt`` consecutive rows per prompt (:func:`draw_samples`), the real responses one: every SE
    is clustered by prompt (:meth:`teacherhack.divergences.Estimate.of`).

    Row keys (each with ``_se``): golden = KL(oracle‖student); proxy = KL(teacher‖student) on held-out prompts;
    proxy_train = the same on training prompts (held-out minus train: how much of the fit is memorisation);
    oracle_nll = −log q(y) on the oracle's samples (moves exactly as golden's log-ratio estimate does);
    reference_nll = −log q(y) on real responses (moves exactly as KL(data‖student) does: a golden stand-in
    that needs no oracle, only held-out real pairs); golden_reverse = KL(student‖oracle), proxy_reverse =
    KL(student‖teacher) and student_entropy = H(student), from fresh student samples at each evaluation;
    student_entropy_held_out = the student's next-token entropies along the teacher's held-out samples (the same
    prefixes every time: a paired, low-noise view of how sharp the student has become).
    """

    def __init__(self, oracle: LM, teacher: LM, references: dict[str, SampleSet], *, samples_per_prompt: int,
                 estimator: str, per_token: bool, reverse_samples: int, batch_size: int, max_new_tokens: int, seed: int,
                 frozen: Mapping[str, Tensor] | None = None):
        self.oracle, self.teacher = oracle, teacher
        self.options = dict(estimator=estimator, per_token=per_token)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.seed = seed + seeds.PROCESS_STRIDE * distributed.rank()  # each process samples its own responses
        # each reference set's samples per prompt, consecutive in its values: measure() gathers every process's
        # values back into the rows' order (distributed.gather), whatever the number of processes
        self.samples_per_prompt = {name: 1 if name == "real" else samples_per_prompt for name in references}
        held_out = references["oracle"].prompts
        n = min(reverse_samples, len(held_out))  # evenly spaced rows: as many distinct prompts as possible
        spaced = torch.arange(n) * len(held_out) // n
        reverse_rows = torch.tensor(distributed.shard(spaced), dtype=torch.long)
        self.reverse_prompts = held_out[reverse_rows] if n else None
        self.reverse_clusters = spaced // samples_per_prompt  # the gathered reverse values come in this order too
        models = {"oracle": oracle, "teacher": teacher, "train_teacher": teacher, "real": None}
        self.scored = {}
        whole = frozen is not None and distributed.world() == 1  # what was scored upstream holds every row
        for name, samples in references.items():
            rows = torch.tensor(distributed.shard(range(len(samples.prompts))), dtype=torch.long)
            self.scored[name] = ScoredSamples(models[name], samples[rows], eos_id=teacher.eos_id, batch_size=batch_size,
                                              frozen=_stored(frozen, name) if whole else None)
        golden = frozen.get(teacher_golden_key(estimator, per_token)) if whole else None
        if golden is None:
            golden = self.scored["oracle"].measure(teacher, **self.options)["kl"]
        elif golden.shape != (len(references["oracle"].prompts),):
            raise ValueError("the precomputed teacher's golden values do not match the oracle's samples")
        self.teacher_golden = self._estimate("oracle", golden)
        # what the student converges towards when it imitates the teacher closely (known without an oracle), and
        # the truth's own entropy (for analysis only)
        self.teacher_entropy = self._estimate("teacher", self.scored["teacher"].entropy(per_token=per_token))
        self.oracle_entropy = self._estimate("oracle", self.scored["oracle"].entropy(per_token=per_token))

    def __call__(self, student: LM, step: int) -> tuple[dict[str, float], dict[str, Estimate]]:
        """The metrics row, and the estimates themselves (their per-sample values pair across steps). The student is
        scored and sampled in eval mode, wherever in training it is called."""
        with eval_mode(student.model):
            return self._row(student, step)

    def _row(self, student: LM, step: int) -> tuple[dict[str, float], dict[str, Estimate]]:
        on = {name: scored.measure(student, **self.options, entropy=name == "teacher")
              for name, scored in self.scored.items()}
        estimates = {metric: self._estimate(name, on[name][value])
                     for metric, (name, value) in ON_REFERENCES.items() if name in on}
        if self.reverse_prompts is not None:
            samples = sample_in_batches(student, self.reverse_prompts, max_new_tokens=self.max_new_tokens,
                                        batch_size=self.batch_size, seed=self.seed + seeds.STEP_STRIDE * step)
            own = ScoredSamples(student, SampleSet(self.reverse_prompts, samples), eos_id=student.eos_id,
                                batch_size=self.batch_size)
            reverse = {"golden_reverse": own.measure(self.oracle, **self.options)["kl"],
                       "proxy_reverse": own.measure(self.teacher, **self.options)["kl"],
                       "student_entropy": own.entropy(per_token=self.options["per_token"])}
            estimates |= {name: Estimate.of(values, self.reverse_clusters) for name, values in reverse.items()}
        row = {}
        for name, estimate in estimates.items():
            row |= {name: estimate.mean, f"{name}_se": estimate.se}
        return row, estimates

    def saved_layout(self) -> dict[str, int]:
        """The samples per prompt of each metric whose per-sample values an evaluation saves (:data:`PAIRED`): what
        run.json records for those who read them back (``teacherhack.rundir.sample_prompts``)."""
        return {metric: self.samples_per_prompt[name] for metric, (name, _) in ON_REFERENCES.items()
                if metric in PAIRED and name in self.samples_per_prompt}

    def _estimate(self, name: str, values: Tensor) -> Estimate:
        """An estimate from values on reference set ``name``, clustered by the prompt of each."""
        return Estimate.of(values, torch.arange(len(values)) // self.samples_per_prompt[name])
