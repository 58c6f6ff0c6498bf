"""The evaluator's references scored once upstream (teacherhack.metrics.reference_logprobs): the same metrics, bit
for bit, as scoring them in the run, whatever the thread count of either side."""

from __future__ import annotations

import pytest
import torch

from teacherhack.metrics import Evaluator, SampleSet, draw_samples, reference_logprobs
from teacherhack.models import LM, build_model, collate_prompts, pad_responses

PAD, EOS, VOCAB = 0, 1, 128


def lm(size: str, seed: int, temperature: float = 1.0) -> LM:
    model = build_model("gpt2", size, vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, max_positions=64, seed=seed)
    return LM(model.eval(), pad_id=PAD, eos_id=EOS, temperature=temperature)


@pytest.fixture(scope="module")
def setting():
    oracle, teacher, student = lm("s", 0, temperature=0.9), lm("xxs", 1), lm("xxs", 2)
    g = torch.Generator().manual_seed(0)
    prompts = collate_prompts([torch.randint(2, VOCAB, (int(n),), generator=g).tolist()
                               for n in torch.randint(1, 12, (10,), generator=g)], PAD)
    options = dict(samples_per_prompt=2, max_new_tokens=16, batch_size=6)
    references = {"oracle": draw_samples(oracle, prompts, seed=1, **options),
                  "teacher": draw_samples(teacher, prompts, seed=2, **options),
                  "train_teacher": draw_samples(teacher, prompts, seed=3, **options),
                  "real": SampleSet(prompts, pad_responses([[5, 6, EOS]] * len(prompts), PAD))}
    return oracle, teacher, student, references


def test_references_scored_upstream_give_the_same_metrics_bit_for_bit(setting):
    oracle, teacher, student, references = setting
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # upstream runs on every core, stage-2 workers on one
        frozen = reference_logprobs({"oracle": oracle, "teacher": teacher, "train_teacher": teacher}, references,
                                    eos_id=EOS, batch_size=6)
        torch.set_num_threads(1)
        options = dict(estimator="token_kl", per_token=False, reverse_samples=4, batch_size=6, max_new_tokens=16,
                       seed=0)
        rows = [Evaluator(oracle, teacher, references, frozen=known, **options)(student, 0)[0]
                for known in (None, frozen)]
    finally:
        torch.set_num_threads(before)
    assert sorted(frozen) == [f"{name}.{i}" for name in ("oracle", "teacher", "train_teacher") for i in range(4)]
    assert rows[0] == rows[1] and rows[0]["golden"] > 0


def test_with_the_scores_given_the_oracle_never_scores_its_references(setting, monkeypatch):
    """The stored scores are used, not recomputed: the oracle's forward never runs (no reverse KL here, whose fresh
    student samples it must score)."""
    oracle, teacher, student, references = setting
    frozen = reference_logprobs({"oracle": oracle, "teacher": teacher, "train_teacher": teacher}, references,
                                eos_id=EOS, batch_size=6)
    calls = []
    monkeypatch.setattr(oracle, "next_token_logprobs", lambda *args: calls.append(args))
    evaluator = Evaluator(oracle, teacher, references, frozen=frozen, estimator="token_kl", per_token=False,
                          reverse_samples=0, batch_size=6, max_new_tokens=16, seed=0)
    assert evaluator(student, 0)[0]["golden"] > 0 and not calls


def test_log_probabilities_of_other_samples_are_refused(setting):
    oracle, teacher, student, references = setting
    frozen = reference_logprobs({"oracle": oracle}, references, eos_id=EOS, batch_size=6)
    with pytest.raises(ValueError, match="do not match"):
        Evaluator(oracle, teacher, references, frozen=frozen, estimator="token_kl", per_token=False,
                  reverse_samples=0, batch_size=4, max_new_tokens=16, seed=0)
