"""The evaluator's references scored once upstream (teacherhack.metrics.reference_logprobs): the same metrics, bit
for bit, as scoring them in the run, whatever the thread count of either side."""

from __future__ import annotations

import math

import pytest
import torch

from teacherhack.divergences import Estimate
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
        options = dict(samples_per_prompt=2, estimator="token_kl", per_token=False, reverse_samples=4, batch_size=6,
                       max_new_tokens=16, seed=0)
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
    evaluator = Evaluator(oracle, teacher, references, frozen=frozen, samples_per_prompt=2, estimator="token_kl",
                          per_token=False, reverse_samples=0, batch_size=6, max_new_tokens=16, seed=0)
    assert evaluator(student, 0)[0]["golden"] > 0 and evaluator.teacher_golden.mean > 0 and not calls


def test_the_teacher_s_golden_is_stored_per_estimator(setting):
    """Values stored for another estimator are not taken for this one: they are computed afresh."""
    oracle, teacher, student, references = setting
    frozen = stored_scores(oracle, teacher, references, estimator="log_ratio")
    options = dict(samples_per_prompt=2, reverse_samples=0, batch_size=6, max_new_tokens=16, seed=0)
    golden = {estimator: Evaluator(oracle, teacher, references, frozen=frozen, estimator=estimator, per_token=False,
                                   **options).teacher_golden for estimator in ("token_kl", "log_ratio")}
    assert golden["token_kl"] == Evaluator(oracle, teacher, references, estimator="token_kl", per_token=False,
                                           **options).teacher_golden
    assert golden["token_kl"] != golden["log_ratio"]


def test_scores_of_other_samples_are_refused(setting):
    oracle, teacher, student, references = setting
    options = dict(samples_per_prompt=2, estimator="token_kl", per_token=False, reverse_samples=0, max_new_tokens=16,
                   seed=0)
    frozen = reference_logprobs({"oracle": oracle}, references, eos_id=EOS, batch_size=6)
    with pytest.raises(ValueError, match="log-probabilities do not match"):
        Evaluator(oracle, teacher, references, frozen=frozen, batch_size=4, **options)
    frozen = stored_scores(oracle, teacher, references)
    frozen[teacher_golden_key("token_kl", False)] = frozen[teacher_golden_key("token_kl", False)][:-1]
    with pytest.raises(ValueError, match="golden values do not match"):
        Evaluator(oracle, teacher, references, frozen=frozen, batch_size=6, **options)


def test_the_evaluator_clusters_every_se_by_prompt(setting):
    """Three identical copies of each sample hold what one does: clustered by prompt, every SE is that of the one-copy
    references (the real responses are one per prompt in both), while treating the copies as independent would shrink
    it by √((G−1)/(Gk−1)) ≈ 1/√3. The reverse KL's evenly spaced rows cluster by their prompts too."""
    oracle, teacher, student, references = setting
    first = {name: s[torch.arange(0, len(s.prompts), 2)] for name, s in references.items() if name != "real"}
    one = first | {"real": references["real"]}
    copies = {name: s[torch.arange(len(s.prompts)).repeat_interleave(3)] for name, s in first.items()}
    copies["real"] = references["real"]
    options = dict(estimator="token_kl", per_token=False, batch_size=6, max_new_tokens=16, seed=0)
    single = Evaluator(oracle, teacher, one, samples_per_prompt=1, reverse_samples=0, **options)
    tripled = Evaluator(oracle, teacher, copies, samples_per_prompt=3, reverse_samples=20, **options)
    (row, _), (row3, estimates) = single(student, 0), tripled(student, 0)
    prompts = len(references["real"].prompts)
    for metric in ("golden", "proxy", "oracle_nll", "proxy_train", "student_entropy_held_out", "reference_nll"):
        assert row3[metric] == pytest.approx(row[metric], rel=1e-5)
        assert row3[f"{metric}_se"] == pytest.approx(row[f"{metric}_se"], rel=1e-4), metric
        if metric != "reference_nll":
            plain = Estimate.of(estimates[metric].values).se
            assert plain == pytest.approx(row[f"{metric}_se"] * math.sqrt((prompts - 1) / (3 * prompts - 1)), rel=1e-4)
    for name in ("teacher_golden", "teacher_entropy", "oracle_entropy"):
        ours, theirs = getattr(tripled, name), getattr(single, name)
        assert ours.se == pytest.approx(theirs.se, rel=1e-4) and ours.n == 3 * theirs.n
    assert tripled.saved_layout() == {"golden": 3, "proxy": 3, "proxy_train": 3, "oracle_nll": 3, "reference_nll": 1}
    spaced = torch.arange(20) * 3 * prompts // 20  # 20 of the 30 held-out rows: each prompt twice
    assert torch.equal(tripled.reverse_clusters, spaced // 3)
    for metric in ("golden_reverse", "proxy_reverse", "student_entropy"):
        values = estimates[metric].values
        assert row3[f"{metric}_se"] == Estimate.of(values, spaced // 3).se != Estimate.of(values).se


def test_the_evaluator_scores_a_student_in_training_without_its_dropout(setting):
    """A checkpoint's own dropout (T5 v1.1's 0.1) must not blur evaluations made during training: the same weights
    give the same row in train mode as in eval mode, every time, and the student is left training."""
    from transformers import GPT2Config, GPT2LMHeadModel

    oracle, teacher, _, references = setting
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                       resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3, pad_token_id=PAD,
                                       eos_token_id=EOS))
    student = LM(model, pad_id=PAD, eos_id=EOS)
    evaluator = Evaluator(oracle, teacher, references, samples_per_prompt=2, estimator="token_kl", per_token=False,
                          reverse_samples=4, batch_size=6, max_new_tokens=16, seed=0)
    model.eval()
    resting = evaluator(student, 0)[0]
    model.train()
    assert [evaluator(student, 0)[0] for _ in range(2)] == [resting, resting]
    assert model.training and all(m.training for m in model.modules())
