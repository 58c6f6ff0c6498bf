"""The evaluator's references scored once upstream (teacherhack.metrics.reference_logprobs): the same metrics, bit
for bit, as scoring them in the run, whatever the thread count of either side."""

from __future__ import annotations

import pytest
import torch

from teacherhack.metrics import (
    Evaluator,
    SampleSet,
    draw_samples,
    reference_logprobs,
    teacher_golden_key,
    teacher_golden_values,
)
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
        frozen = stored_scores(oracle, teacher, references)
        torch.set_num_threads(1)
        options = dict(estimator="token_kl", per_token=False, reverse_samples=4, batch_size=6, max_new_tokens=16,
                       seed=0)
        evaluators = [Evaluator(oracle, teacher, references, frozen=known, **options) for known in (None, frozen)]
        rows = [evaluator(student, 0)[0] for evaluator in evaluators]
    finally:
        torch.set_num_threads(before)
    assert sorted(frozen) == sorted([f"{name}.{i}" for name in ("oracle", "teacher", "train_teacher") for i in range(4)]
                                    + [teacher_golden_key("token_kl", False)])
    assert rows[0] == rows[1] and rows[0]["golden"] > 0
    golden = [evaluator.teacher_golden for evaluator in evaluators]
    assert golden[0] == golden[1] and torch.equal(golden[0].values, golden[1].values) and golden[0].mean > 0


def stored_scores(oracle: LM, teacher: LM, references: dict[str, SampleSet], **options) -> dict[str, torch.Tensor]:
    """What the lab's ``reference_scores`` stage stores (its options: the token-KL estimator, per sequence)."""
    options = dict(estimator="token_kl", per_token=False) | options
    scores = reference_logprobs({"oracle": oracle, "teacher": teacher, "train_teacher": teacher}, references,
                                eos_id=EOS, batch_size=6)
    scores[teacher_golden_key(**options)] = teacher_golden_values(oracle, teacher, references["oracle"], eos_id=EOS,
                                                                  batch_size=6, scores=scores, **options)
    return scores


def test_with_the_scores_given_neither_frozen_model_scores_its_references(setting, monkeypatch):
    """The stored scores are used, not recomputed: neither the oracle's forward nor the teacher's runs (no reverse
    KL here, whose fresh student samples they must score)."""
    oracle, teacher, student, references = setting
    frozen = stored_scores(oracle, teacher, references)
    calls = []
    for model in (oracle, teacher):
        monkeypatch.setattr(model, "next_token_logprobs", lambda *args: calls.append(args))
    evaluator = Evaluator(oracle, teacher, references, frozen=frozen, estimator="token_kl", per_token=False,
                          reverse_samples=0, batch_size=6, max_new_tokens=16, seed=0)
    assert evaluator(student, 0)[0]["golden"] > 0 and evaluator.teacher_golden.mean > 0 and not calls


def test_the_teacher_s_golden_is_stored_per_estimator(setting):
    """Values stored for another estimator are not taken for this one: they are computed afresh."""
    oracle, teacher, student, references = setting
    frozen = stored_scores(oracle, teacher, references, estimator="log_ratio")
    options = dict(reverse_samples=0, batch_size=6, max_new_tokens=16, seed=0)
    golden = {estimator: Evaluator(oracle, teacher, references, frozen=frozen, estimator=estimator, per_token=False,
                                   **options).teacher_golden for estimator in ("token_kl", "log_ratio")}
    assert golden["token_kl"] == Evaluator(oracle, teacher, references, estimator="token_kl", per_token=False,
                                           **options).teacher_golden
    assert golden["token_kl"] != golden["log_ratio"]


def test_scores_of_other_samples_are_refused(setting):
    oracle, teacher, student, references = setting
    options = dict(estimator="token_kl", per_token=False, reverse_samples=0, max_new_tokens=16, seed=0)
    frozen = reference_logprobs({"oracle": oracle}, references, eos_id=EOS, batch_size=6)
    with pytest.raises(ValueError, match="log-probabilities do not match"):
        Evaluator(oracle, teacher, references, frozen=frozen, batch_size=4, **options)
    frozen = stored_scores(oracle, teacher, references)
    frozen[teacher_golden_key("token_kl", False)] = frozen[teacher_golden_key("token_kl", False)][:-1]
    with pytest.raises(ValueError, match="golden values do not match"):
        Evaluator(oracle, teacher, references, frozen=frozen, batch_size=6, **options)
