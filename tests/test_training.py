"""The training loop and the batch sources: schedules, epoch shuffling, online samples, mixtures,
gradient accumulation, the NaN guard and checkpoints. Tiny random models only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from teacherhack import stages, training
from teacherhack.config import TrainConfig
from teacherhack.divergences import response_mask, token_cross_entropy
from teacherhack.generation import HFSampler
from teacherhack.models import ARCHITECTURES, LM, build_model, collate_prompts, load_pretrained
from teacherhack.seeds import generator as seeded_generator
from teacherhack.sources import Batch, FixedPairs, Mixture, OnlineSamples
from teacherhack.training import (
    LossFn,
    NonFiniteLoss,
    Step,
    distill_loss,
    learning_rate,
    load_checkpoint,
    make_optimizer,
    optimizer_step,
    prepared,
    save_checkpoint,
    sft_loss,
    train,
)

VOCAB, PAD, EOS = 50, 0, 1


def make_lm(arch: str = "gpt2", size: str = "xxs", seed: int = 0) -> LM:
    model = build_model(arch, size, vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, max_positions=32, seed=seed)
    return LM(model, pad_id=PAD, eos_id=EOS)


def params(lm: LM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def pairs(n: int) -> tuple[list[list[int]], list[list[int]]]:
    """Item i: a prompt of 1–3 tokens, a response whose first token is i + 2 (so items can be identified)
    and whose length varies (1–4 tokens, the last an EOS)."""
    prompts = [[2 + (i * 7) % 40] * (1 + i % 3) for i in range(n)]
    responses = [[i + 2] + [3 + (i + j) % 40 for j in range(i % 3)] + [EOS] for i in range(n)]
    return prompts, responses


def run_steps(lm: LM, source, loss_fn, *, steps: int, lr: float, warmup: int = 0, schedule: str = "constant",
              grad_accum: int = 1, max_grad_norm: float = 1.0, start: int = 0, stop: int | None = None,
              optimizer: torch.optim.Optimizer | None = None) -> tuple[torch.optim.Optimizer, list[float]]:
    """Optimiser steps ``start+1 … stop`` of a ``steps``-step schedule, as stage 2 takes them; the optimizer (to
    resume with) and the losses."""
    optimizer = optimizer or make_optimizer(lm, lr)
    losses = []
    with prepared(lm, optimizer) as ready:
        for step in range(start, steps if stop is None else stop):
            losses.append(optimizer_step(lm, ready, source.batch(step), loss_fn, grad_accum=grad_accum,
                                         max_grad_norm=max_grad_norm,
                                         lr=learning_rate(step, lr=lr, warmup=warmup, total=steps, schedule=schedule)).loss)
    return optimizer, losses


def item_ids(batch: Batch) -> list[int]:
    return [int(t) - 2 for t in batch.responses[:, 0]]


# --- learning rate ---------------------------------------------------------------------------------


def test_learning_rate_warmup_is_linear_then_constant():
    got = [learning_rate(s, lr=2.0, warmup=4, total=20, schedule="constant") for s in range(8)]
    assert got == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0])
    assert learning_rate(100, lr=2.0, warmup=4, total=20, schedule="constant") == 2.0
    assert learning_rate(0, lr=2.0, warmup=0, total=20, schedule="constant") == 2.0


def test_learning_rate_cosine_decays_to_ten_percent():
    lr = lambda s: learning_rate(s, lr=1.0, warmup=4, total=20, schedule="cosine")  # noqa: E731
    assert [lr(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # warm-up first
    assert lr(4) == pytest.approx(1.0)
    assert lr(12) == pytest.approx(0.55)  # half-way: 0.1 + 0.9 · 0.5
    assert lr(20) == pytest.approx(0.1) and lr(50) == pytest.approx(0.1)
    decay = [lr(s) for s in range(4, 21)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert min(decay) == pytest.approx(0.1)


# --- fixed pairs -----------------------------------------------------------------------------------


def test_fixed_pairs_visit_every_item_once_per_epoch():
    n, size = 10, 3  # batches straddle epoch boundaries
    source = FixedPairs(*pairs(n), batch_size=size, seed=1, pad_id=PAD, origin="offline")
    order = [i for step in range(10) for i in item_ids(source.batch(step))]  # 30 items = 3 epochs
    epochs = [order[k * n : (k + 1) * n] for k in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # reshuffled every epoch
    assert epochs[0] != list(range(n))  # and shuffled at all
    assert source.epoch(10) == pytest.approx(3.0) and source.epoch(5) == pytest.approx(1.5)
    assert len(source) == n


def test_fixed_pairs_batch_contents_and_origin():
    prompts, responses = pairs(6)
    source = FixedPairs(prompts, responses, batch_size=4, seed=0, pad_id=PAD, origin="real")
    batch = source.batch(0)
    assert batch.origin == "real" and len(batch.prompts) == 4
    for row, i in enumerate(item_ids(batch)):
        real = batch.prompts.ids[row][batch.prompts.mask[row]].tolist()
        assert real == prompts[i]
        assert batch.responses[row, : len(responses[i])].tolist() == responses[i]
        assert (batch.responses[row, len(responses[i]):] == PAD).all()


def test_fixed_pairs_are_a_pure_function_of_step_and_seed():
    a = FixedPairs(*pairs(10), batch_size=4, seed=7, pad_id=PAD, origin="offline")
    b = FixedPairs(*pairs(10), batch_size=4, seed=7, pad_id=PAD, origin="offline")
    c = FixedPairs(*pairs(10), batch_size=4, seed=8, pad_id=PAD, origin="offline")
    in_order = [item_ids(a.batch(s)) for s in range(8)]
    reverse = [item_ids(b.batch(s)) for s in reversed(range(8))][::-1]  # out of order, as after a resume
    assert in_order == reverse
    assert in_order != [item_ids(c.batch(s)) for s in range(8)]
    assert torch.equal(a.batch(5).responses, b.batch(5).responses)


def test_fixed_pairs_length_mismatch():
    prompts, responses = pairs(4)
    with pytest.raises(ValueError, match="4 prompts but 3 responses"):
        FixedPairs(prompts, responses[:3], batch_size=2, seed=0, pad_id=PAD, origin="offline")
    with pytest.raises(ValueError):
        FixedPairs([], [], batch_size=2, seed=0, pad_id=PAD, origin="offline")


def test_seeded_generator_is_stable_and_distinguishes_seed_tuples():
    draw = lambda *s: torch.randint(0, 2**30, (4,), generator=seeded_generator(*s)).tolist()  # noqa: E731
    assert draw(1, 2) == draw(1, 2)
    assert len({tuple(draw(*s)) for s in [(1, 2), (2, 1), (1, 3), (1,), (1, 2, 0)]}) == 5


# --- online samples --------------------------------------------------------------------------------


def eos_prone_lm(seed: int = 0) -> LM:
    """A random model that ends a response early often (EOS boosted) and never samples PAD."""
    lm = make_lm(seed=seed)

    def hook(module, inputs, output):
        output = output.clone()
        output[..., EOS] += 3.0
        output[..., PAD] = -1e4
        return output

    lm.model.get_output_embeddings().register_forward_hook(hook)
    return lm


def test_online_samples_are_a_pure_function_of_step():
    lm = eos_prone_lm()
    prompts = pairs(12)[0]

    def make() -> OnlineSamples:
        return OnlineSamples(prompts, HFSampler(lm), batch_size=4, seed=5, pad_id=PAD, eos_id=EOS, max_new_tokens=6,
                             origin="online_teacher")

    source = make()
    first = source.batch(3)
    assert first.origin == "online_teacher" and first.responses.shape[0] == 4
    source.batch(0)
    again = source.batch(3)
    assert torch.equal(first.prompts.ids, again.prompts.ids) and torch.equal(first.responses, again.responses)
    fresh = make().batch(3)
    assert torch.equal(first.responses, fresh.responses)
    assert source.epoch(6) == pytest.approx(2.0)


def test_a_frozen_model_s_samples_drawn_in_blocks_are_a_pure_function_of_step_and_carry_its_distributions():
    lm = eos_prone_lm()
    prompts = pairs(12)[0]

    def make(**options) -> OnlineSamples:
        return OnlineSamples(prompts, HFSampler(lm), batch_size=4, seed=5, pad_id=PAD, eos_id=EOS, max_new_tokens=6,
                             origin="online_teacher", **options)

    blocked = make(block=3, keep_logprobs=True)
    steps = [blocked.batch(step) for step in range(7)]
    resumed = make(block=3, keep_logprobs=True).batch(4)  # a run resumed mid-block sees the same batch
    assert torch.equal(resumed.responses, steps[4].responses) and torch.equal(resumed.prompts.ids, steps[4].prompts.ids)
    assert len({tuple(map(tuple, b.responses.tolist())) for b in steps}) == 7  # fresh samples every step
    for batch in steps:
        mask = response_mask(batch.responses, EOS)
        assert int(mask.sum(-1).max()) == batch.responses.shape[1]  # trimmed to the step's longest response
        with torch.no_grad():
            scored = lm.next_token_logprobs(batch.prompts, batch.responses)
        assert batch.teacher is not None and batch.teacher.ids is None
        torch.testing.assert_close(batch.teacher.logprobs[mask], scored[mask], atol=1e-4, rtol=0)
    assert make().batch(0).teacher is None  # without keep_logprobs the loss runs the teacher itself
    # the loss on these distributions is the loss with a teacher forward
    student = make_lm(seed=3)
    loss_fn = distill_loss(student, lm, loss="forward_kl", beta=0.5, alpha=0.1, temperature=1.0, chunk_size=None)
    plain = Batch(steps[2].prompts, steps[2].responses, "online_teacher")
    assert loss_fn(steps[2], 4.0).item() == pytest.approx(loss_fn(plain, 4.0).item(), rel=1e-5)
    with pytest.raises(ValueError, match="block must be 1"):
        make(block=2, sync_from=lm)


@pytest.mark.parametrize("loss_name", ["forward_kl", "sampled_reverse_kl"])
def test_the_teacher_s_prompt_states_give_the_loss_and_gradient_of_its_full_forward(loss_name):
    """distill.teacher_prompt_cache: online batches carry their prompts' rows, the loss runs the teacher on the
    responses alone, and the loss and the student's gradient are those of the full teacher forward."""
    teacher, prompts = eos_prone_lm(), pairs(12)[0]
    source = OnlineSamples(prompts, HFSampler(teacher), batch_size=4, seed=5, pad_id=PAD, eos_id=EOS, max_new_tokens=6,
                           origin="online_student")
    batch = source.batch(2)
    assert batch.prompt_rows is not None and batch[torch.tensor([1, 3])].prompt_rows.tolist() == \
        batch.prompt_rows[[1, 3]].tolist()
    states = teacher.prompt_states(collate_prompts(prompts, PAD))
    calls = []
    teacher.model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                        with_kwargs=True)
    gradients = []
    for prompt_states in (None, states):
        student = make_lm(seed=3)
        loss_fn = distill_loss(student, teacher, loss=loss_name, beta=0.5, alpha=0.1, temperature=1.0,
                               chunk_size=None, prompt_states=prompt_states)
        loss = loss_fn(batch, 4.0)
        loss.backward()
        gradients.append((loss.detach(), [p.grad.clone() for p in student.model.parameters()]))
    assert calls[1][1] == batch.responses.shape[1] < calls[0][1]  # the prompts ran only once, up front
    (plain, plain_grads), (cached, cached_grads) = gradients
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(cached_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_online_samples_draw_afresh_at_every_step():
    lm = eos_prone_lm()
    source = OnlineSamples([[5, 6]] * 4, HFSampler(lm), batch_size=4, seed=5, pad_id=PAD, eos_id=EOS, max_new_tokens=6,
                           origin="online_student")
    draws = [source.batch(step).responses for step in range(3)]
    assert all(torch.equal(source.batch(s).responses, d) for s, d in enumerate(draws))
    distinct = {tuple(map(tuple, d.tolist())) for d in draws}
    assert len(distinct) == 3  # same prompts, different step: different samples


def test_online_samples_count_generated_tokens():
    lm = eos_prone_lm()
    source = OnlineSamples(pairs(12)[0], HFSampler(lm), batch_size=4, seed=5, pad_id=PAD, eos_id=EOS, max_new_tokens=6,
                           origin="online_student")
    assert source.tokens_generated == 0
    expected, padded = 0, 0
    for step in range(4):
        responses = source.batch(step).responses
        expected += int(response_mask(responses, EOS).sum())  # tokens up to and including the first EOS
        padded += int((responses == PAD).sum())
        assert source.tokens_generated == expected
    assert padded > 0  # some rows ended early, so counting padding too would be caught


class CountingSampler:
    name = "stub"
    any_threads = False

    def __init__(self):
        self.synced, self.sampled = [], 0

    def sample(self, prompts, *, max_new_tokens, generator, return_logprobs=False):
        self.sampled += 1
        return torch.tensor([[7, EOS]]).repeat(len(prompts), 1)

    def sync(self, model):
        self.synced.append((self.sampled, model))


def test_online_samples_sync_the_sampler_once_per_block():
    student = make_lm()
    sampler = CountingSampler()
    source = OnlineSamples(pairs(6)[0], sampler, batch_size=2, seed=0, pad_id=PAD, eos_id=EOS, max_new_tokens=2,
                           origin="online_student", sync_from=student, sync_every=3)
    for step in range(7):
        source.batch(step)
    # synced before the batches of steps 0, 3 and 6, each time from the student being trained
    assert [n for n, _ in sampler.synced] == [0, 3, 6]
    assert all(model is student for _, model in sampler.synced)
    resumed = OnlineSamples(pairs(6)[0], sampler, batch_size=2, seed=0, pad_id=PAD, eos_id=EOS, max_new_tokens=2,
                            origin="online_student", sync_from=student, sync_every=3)
    sampler.synced.clear()
    for step in range(4, 7):  # a resumed run syncs on its first batch whatever the step
        resumed.batch(step)
    assert [n for n, _ in sampler.synced] == [7, 9]


# --- mixture ---------------------------------------------------------------------------------------


class StubSource:
    def __init__(self, origin: str):
        self.origin, self.steps, self.tokens_generated = origin, [], 17

    def batch(self, step: int) -> Batch:
        self.steps.append(step)
        return Batch(collate_prompts([[2, 3]], PAD), torch.tensor([[step % 40 + 2, EOS]]), self.origin)

    def epoch(self, steps_done: int) -> float:
        return steps_done / 10


def mixture_origins(fraction: float, seed: int = 0, steps: int = 2000) -> list[str]:
    other, online = StubSource("offline"), StubSource("online_student")
    mixture = Mixture(other, online, fraction=fraction, seed=seed)
    origins = []
    for step in range(steps):
        batch = mixture.batch(step)
        origins.append(batch.origin)
        assert int(batch.responses[0, 0]) == step % 40 + 2  # the chosen source got this very step
    assert sorted(other.steps + online.steps) == list(range(steps))
    return origins


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_mixture_online_fraction(fraction):
    origins = mixture_origins(fraction)
    assert set(origins) == {"offline", "online_student"}
    assert origins.count("online_student") / len(origins) == pytest.approx(fraction, abs=0.04)
    assert mixture_origins(fraction) == origins  # deterministic
    assert mixture_origins(fraction, seed=1) != origins


def test_mixture_extremes():
    assert set(mixture_origins(0.0, steps=300)) == {"offline"}
    assert set(mixture_origins(1.0, steps=300)) == {"online_student"}


def test_mixture_with_real_sources():
    lm = eos_prone_lm()
    prompts, responses = pairs(8)
    offline = FixedPairs(prompts, responses, batch_size=2, seed=0, pad_id=PAD, origin="offline")
    online = OnlineSamples(prompts, HFSampler(lm), batch_size=2, seed=0, pad_id=PAD, eos_id=EOS, max_new_tokens=4,
                           origin="online_student")
    mixture = Mixture(offline, online, fraction=0.5, seed=3)
    origins = [mixture.batch(step).origin for step in range(16)]
    assert set(origins) == {"offline", "online_student"}
    assert mixture.tokens_generated == online.tokens_generated > 0
    assert mixture.epoch(8) == pytest.approx(2.0)
    # two generations per prompt: the offline rows are twice the prompts, so its share of the steps passes over
    # them half as often; at λ = 0 the mixture trains exactly as the offline source and counts as it does
    twice = FixedPairs(prompts + prompts, responses + responses, batch_size=2, seed=0, pad_id=PAD, origin="offline")
    for fraction, passes in ((0.0, 1.0), (0.5, 1.5), (1.0, 2.0)):
        assert Mixture(twice, online, fraction=fraction, seed=3).epoch(8) == pytest.approx(passes)
    assert Mixture(twice, online, fraction=0.0, seed=3).epoch(8) == twice.epoch(8)


# --- losses and gradient accumulation ----------------------------------------------------------------


def accumulation_batch() -> FixedPairs:
    prompts, responses = pairs(4)  # responses of 1–3 tokens + EOS: micro-batches hold different token counts
    return FixedPairs(prompts, responses, batch_size=4, seed=0, pad_id=PAD, origin="offline")


def one_step(loss_name: str, grad_accum: int, *, wrong: bool = False, chunk_size: int | None = None) -> dict:
    student, teacher = make_lm(seed=0), make_lm(seed=1)
    if loss_name == "sft":
        loss_fn = sft_loss(student)
    else:
        loss_fn = distill_loss(student, teacher, loss=loss_name, beta=0.5, alpha=0.1, temperature=1.0,
                               chunk_size=chunk_size)
    if wrong:  # normalise each micro-batch by its own sequence count instead of the window's
        right = loss_fn
        loss_fn = lambda batch, denominator: right(batch, float(len(batch.prompts)))  # noqa: E731
    # plain SGD, no clipping: the update is proportional to the gradient, so any scale error shows
    # (AdamW's first step is nearly sign(g) and would hide one)
    optimizer = torch.optim.SGD(student.model.parameters(), lr=1.0)
    with torch.no_grad():  # the loss of the whole batch at once, normalised by its own sequence count
        big = (sft_loss(student) if loss_name == "sft" else loss_fn)(accumulation_batch().batch(0), 4.0).item()
    _, reported = run_steps(student, accumulation_batch(), loss_fn, steps=1, lr=1.0, grad_accum=grad_accum,
                            max_grad_norm=1e9, optimizer=optimizer)
    if not wrong:  # the summed micro-batch losses are the big batch's loss
        assert reported == [pytest.approx(big, rel=1e-5)]
    return params(student)


@pytest.mark.parametrize("loss_name,chunk_size", [("sft", None), ("forward_kl", None), ("forward_kl", 2)])
def test_gradient_accumulation_matches_one_big_batch(loss_name, chunk_size):
    start = params(make_lm(seed=0))
    full = one_step(loss_name, 1, chunk_size=chunk_size)
    assert max_diff(full, start) > 1e-3  # a real step was taken
    for accum in (2, 4):
        assert max_diff(one_step(loss_name, accum, chunk_size=chunk_size), full) < 1e-6
    # sensitivity: the classic mistake (each micro-batch normalised on its own) moves the parameters elsewhere
    assert max_diff(one_step(loss_name, 2, wrong=True, chunk_size=chunk_size), full) > 1e-4


def supervised_steps(monkeypatch, grad_accum: int, loss=sft_loss) -> tuple[dict, list[Step], list[int]]:
    """Two steps of a supervised stage (``stages.fit``, batch 4 of 8 pairs) from one start, under plain SGD: its
    update is proportional to the gradient (AdamW's first step is nearly sign(g), which would hide a wrong scale).
    The parameters after, each step's loss and gradient norm (before clipping: a wrong scale shows there too), and
    the rows of each forward. ``loss``: the SFT loss, or a wrong one to show the comparison catches it."""
    steps, rows = [], []
    monkeypatch.setattr(training, "make_optimizer", lambda model, lr: torch.optim.SGD(model.model.parameters(), lr=lr))
    monkeypatch.setattr(training, "optimizer_step", lambda *a, **k: steps.append(optimizer_step(*a, **k)) or steps[-1])

    def counted(model: LM) -> LossFn:
        inner = loss(model)
        return lambda batch, denominator: rows.append(len(batch.prompts)) or inner(batch, denominator)

    monkeypatch.setattr(stages, "sft_loss", counted)
    lm = make_lm(seed=0)
    stages.fit(lm, *pairs(8), TrainConfig(batch_size=4, grad_accum=grad_accum, epochs=1.0, lr=0.5, warmup=0,
                                          schedule="constant"), seed=0, desc="sft", precision="float32")
    return params(lm), steps, rows


def gap(a: tuple[dict, list[Step], list[int]], b: tuple[dict, list[Step], list[int]]) -> float:
    """How far two runs of :func:`supervised_steps` end apart: parameters, and each step's loss and norm (relative)."""
    relative = [abs(x - y) / abs(y) for s, t in zip(a[1], b[1], strict=True)
                for x, y in ((s.loss, t.loss), (s.grad_norm, t.grad_norm))]
    return max(max_diff(a[0], b[0]), *relative)


def own_count(model: LM) -> LossFn:
    """Wrong: each micro-batch normalised by its own sequence count, then summed (grad_accum times the step)."""
    right = sft_loss(model)
    return lambda batch, denominator: right(batch, float(len(batch.prompts)))


def token_mean(model: LM) -> LossFn:
    """A token-mean loss; under accumulation wrongly averaged as the mean of each micro-batch's own tokens."""
    def loss(batch: Batch, denominator: float) -> torch.Tensor:
        mask = response_mask(batch.responses, model.eos_id)
        mean = token_cross_entropy(model.logits(batch.prompts, batch.responses), batch.responses, mask,
                                   reduction="token_mean")
        return mean * len(batch.prompts) / denominator

    return loss


def test_a_supervised_stage_in_micro_batches_takes_the_full_batch_step(monkeypatch):
    """oracle/teacher/student.grad_accum: batch_size rows per step in grad_accum micro-batches that hold different
    numbers of response tokens, and the step of the whole batch, to float32 rounding."""
    batch = FixedPairs(*pairs(8), batch_size=4, seed=0, pad_id=PAD, origin="sft").batch(0)  # fit's first batch
    tokens = [int(response_mask(batch.responses[rows], EOS).sum()) for rows in torch.arange(4).chunk(2)]
    assert tokens[0] != tokens[1]
    start, full = params(make_lm(seed=0)), supervised_steps(monkeypatch, 1)
    assert max_diff(full[0], start) > 0.1 and full[2] == [4, 4]
    for accum in (2, 4):
        accumulated = supervised_steps(monkeypatch, accum)
        assert accumulated[2] == [4 // accum] * accum * 2  # micro-batches were taken
        assert gap(accumulated, full) < 1e-6
    # the comparison catches the two classic mistakes, by far: a sum of micro-batch means, and (for a token-mean
    # loss) each micro-batch's mean over its own tokens instead of the batch's
    assert gap(supervised_steps(monkeypatch, 2, own_count), full) > 0.5
    assert gap(supervised_steps(monkeypatch, 2, token_mean), supervised_steps(monkeypatch, 1, token_mean)) > 1e-3


def test_hard_ce_is_sft():
    student, teacher = make_lm(seed=0), make_lm(seed=1)
    batch = accumulation_batch().batch(0)
    hard = distill_loss(student, teacher, loss="hard_ce", beta=0.5, alpha=0.1, temperature=1.0, chunk_size=None)
    a, b = hard(batch, 4.0), sft_loss(student)(batch, 4.0)
    assert a.item() == pytest.approx(b.item(), abs=1e-7) and a.item() > 0
    ga = torch.autograd.grad(a, list(student.model.parameters()))
    gb = torch.autograd.grad(b, list(student.model.parameters()))
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    soft = distill_loss(student, teacher, loss="forward_kl", beta=0.5, alpha=0.1, temperature=1.0, chunk_size=None)
    with torch.no_grad():
        assert abs(soft(batch, 4.0).item() - b.item()) > 1e-3  # a different loss does differ


def test_sft_loss_is_mean_nll_of_response_tokens_up_to_eos():
    lm = make_lm()
    batch = accumulation_batch().batch(0)
    with torch.no_grad():
        logprobs = lm.next_token_logprobs(batch.prompts, batch.responses)
        loss = sft_loss(lm)(batch, float(len(batch.prompts)))
    mask = response_mask(batch.responses, EOS)
    nll = -logprobs.gather(-1, batch.responses[..., None])[..., 0]
    expected = ((nll * mask).sum(-1) / mask.sum(-1)).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_steps_resumed_from_a_step_are_exact_and_train_takes_the_same_steps():
    source = FixedPairs(*pairs(6), batch_size=2, seed=0, pad_id=PAD, origin="offline")
    schedule = dict(steps=4, lr=1e-2, warmup=2, schedule="cosine")
    a = make_lm(seed=0)
    _, losses = run_steps(a, source, sft_loss(a), **schedule)
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    b = make_lm(seed=0)
    optimizer, _ = run_steps(b, source, sft_loss(b), stop=2, **schedule)
    run_steps(b, source, sft_loss(b), start=2, optimizer=optimizer, **schedule)
    assert max_diff(params(a), params(b)) < 1e-7
    c = make_lm(seed=0)
    train(c, source, sft_loss(c), **schedule)  # the upstream stages' loop takes the very same steps
    assert max_diff(params(a), params(c)) < 1e-7


# --- precision -------------------------------------------------------------------------------------


def precision_step(lm: LM, precision: str, loss_fn=None) -> tuple[float, dict[str, torch.Tensor]]:
    """One SFT step (or ``loss_fn``'s) at ``precision``: its loss and the gradients before the step."""
    source = FixedPairs(*pairs(4), batch_size=4, seed=0, pad_id=PAD, origin="offline")
    optimizer = make_optimizer(lm, 0.0)  # lr 0: the gradients are what the step leaves to compare
    with prepared(lm, optimizer) as ready:
        grads = {}
        hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad.clone()))
                 for n, p in lm.model.named_parameters()]
        loss = optimizer_step(lm, ready, source.batch(0), loss_fn or sft_loss(lm), lr=0.0, precision=precision).loss
        for hook in hooks:
            hook.remove()
    return loss, grads


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fp32_attention_precision_runs_attention_in_float32_and_changes_nothing_else(arch, monkeypatch):
    """Under bf16 autocast the attention kernel computes in bf16; with ``bfloat16-fp32-attention``, in float32, which
    changes the loss. Outside that precision, the LM's attention function is Hugging Face's own, bit for bit."""
    seen: list[torch.dtype] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):  # the dtype the kernel computes in: autocast casts to bf16
        device = query.device.type
        seen.append(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else value.dtype)
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    kinds = {}
    for precision in ("float32", "bfloat16", "bfloat16-fp32-attention"):
        seen.clear()
        kinds[precision] = (precision_step(make_lm(arch), precision), set(seen))
    assert [dtypes for _, dtypes in kinds.values()] == [{torch.float32}, {torch.bfloat16}, {torch.float32}]
    (bf16_loss, bf16_grads), (fp32_attention_loss, _) = kinds["bfloat16"][0], kinds["bfloat16-fp32-attention"][0]
    assert bf16_loss != fp32_attention_loss
    hugging_face = make_lm(arch)
    hugging_face.model.set_attn_implementation("sdpa")
    loss, grads = precision_step(hugging_face, "bfloat16")
    assert loss == bf16_loss and all(torch.equal(grads[n], bf16_grads[n]) for n in grads)


def test_fp32_attention_reaches_the_frozen_teacher_s_forward_in_the_loss():
    """The online-student loss runs the teacher's forward inside the training step's autocast: its attention is
    float32 too, and the teacher's scores move with the precision as the student's do."""
    student, teacher = make_lm(seed=0), make_lm(seed=1)
    loss_fn = distill_loss(student, teacher, loss="forward_kl", beta=0.5, alpha=0.1, temperature=1.0,
                           chunk_size=None)
    bf16, _ = precision_step(student, "bfloat16", loss_fn)
    mixed, _ = precision_step(student, "bfloat16-fp32-attention", loss_fn)
    teacher.model.set_attn_implementation("sdpa")  # Hugging Face's attention: blind to the precision's switch
    blind, _ = precision_step(student, "bfloat16-fp32-attention", loss_fn)
    assert len({bf16, mixed, blind}) == 3


def test_the_lm_s_attention_is_never_saved(tmp_path: Path):
    lm = make_lm()
    assert lm.model.config._attn_implementation == "teacherhack_sdpa"
    lm.save(tmp_path)
    assert "teacherhack" not in (tmp_path / "config.json").read_text()
    assert load_pretrained(tmp_path).config._attn_implementation == "sdpa"


# --- NaN guard -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("bad_call", [0, 1])  # the first or the second micro-batch of the window
def test_non_finite_loss_takes_no_step(bad, bad_call):
    lm = make_lm()
    before = params(lm)
    base, calls = sft_loss(lm), []

    def loss_fn(batch: Batch, denominator: float) -> torch.Tensor:
        calls.append(1)
        value = base(batch, denominator)
        return value * bad if len(calls) - 1 == bad_call else value

    optimizer = make_optimizer(lm, 1e-2)
    with pytest.raises(NonFiniteLoss, match="no step was taken"):
        run_steps(lm, accumulation_batch(), loss_fn, steps=3, lr=1e-2, grad_accum=2, optimizer=optimizer)
    assert max_diff(params(lm), before) == 0.0
    assert not optimizer.state  # AdamW never stepped


def test_a_non_finite_gradient_of_a_finite_loss_takes_no_step():
    lm = make_lm()
    before = params(lm)
    base = sft_loss(lm)

    def loss_fn(batch: Batch, denominator: float) -> torch.Tensor:  # finite, but d sqrt(x)/dx at 0 is infinite
        return base(batch, denominator) + torch.sqrt(0.0 * next(lm.model.parameters()).sum())

    optimizer = make_optimizer(lm, 1e-2)
    with pytest.raises(NonFiniteLoss, match="the gradient is not finite.*no step was taken"):
        run_steps(lm, accumulation_batch(), loss_fn, steps=1, lr=1e-2, optimizer=optimizer)
    assert max_diff(params(lm), before) == 0.0
    assert not optimizer.state


# --- checkpoints -----------------------------------------------------------------------------------


def trained(steps: int, seed: int = 0, arch: str = "gpt2") -> tuple[LM, torch.optim.Optimizer, FixedPairs]:
    lm = make_lm(arch, seed=seed)
    source = FixedPairs(*pairs(6), batch_size=2, seed=0, pad_id=PAD, origin="offline")
    optimizer, _ = run_steps(lm, source, sft_loss(lm), steps=steps, lr=1e-2, warmup=1, schedule="cosine")
    return lm, optimizer, source


def tied(lm: LM) -> bool:
    return lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoint_round_trip_resumes_exactly(arch, tmp_path: Path):
    lm, optimizer, source = trained(2, arch=arch)
    assert tied(lm)  # all three tie their embeddings (GPT-2 always): only one copy is saved
    save_checkpoint(tmp_path / "ckpt", lm, optimizer, {"step": 2, "note": "x"})

    fresh = make_lm(arch, seed=9)
    fresh_optimizer = make_optimizer(fresh, 1e-2)
    assert max_diff(params(fresh), params(lm)) > 1e-3
    state = load_checkpoint(tmp_path / "ckpt", fresh, fresh_optimizer)
    assert state == {"step": 2, "note": "x"}
    assert max_diff(params(fresh), params(lm)) == 0.0
    assert tied(fresh)  # still tied
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys() and saved["state"]
    for k in saved["state"]:
        for name, value in saved["state"][k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(loaded["state"][k][name])), name

    # two more steps from the checkpoint = two more steps of the uninterrupted run
    run_steps(lm, source, sft_loss(lm), steps=4, lr=1e-2, warmup=1, schedule="cosine", start=2, optimizer=optimizer)
    run_steps(fresh, source, sft_loss(fresh), steps=4, lr=1e-2, warmup=1, schedule="cosine", start=2,
          optimizer=fresh_optimizer)
    assert max_diff(params(fresh), params(lm)) < 1e-7


def test_checkpoint_folder_holds_no_pickled_model(tmp_path: Path):
    lm, optimizer, _ = trained(1)
    path = tmp_path / "ckpt"
    save_checkpoint(path, lm, optimizer, {"step": 1})
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "optimizer.pt", "state.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pth", ".pkl", ".pickle"))]
    assert torch.load(path / "optimizer.pt", weights_only=True)["state"]
    assert json.loads((path / "state.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .tmp / .old left behind


def test_checkpoint_overwrite_replaces_the_previous_one(tmp_path: Path):
    path = tmp_path / "ckpt"
    lm, optimizer, source = trained(1)
    save_checkpoint(path, lm, optimizer, {"step": 1})
    run_steps(lm, source, sft_loss(lm), steps=2, lr=1e-2, warmup=1, schedule="cosine", start=1, optimizer=optimizer)
    save_checkpoint(path, lm, optimizer, {"step": 2})
    fresh = make_lm(seed=9)
    assert load_checkpoint(path, fresh, make_optimizer(fresh, 1e-2)) == {"step": 2}
    assert max_diff(params(fresh), params(lm)) == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_survives_leftovers_of_a_killed_save(tmp_path: Path):
    """A kill after the new folder was moved in but before the old one was deleted leaves ``ckpt.old``
    (and one mid-write leaves ``ckpt.tmp``); the next save must still succeed and be clean."""
    path = tmp_path / "ckpt"
    lm, optimizer, _ = trained(1)
    save_checkpoint(path, lm, optimizer, {"step": 1})
    for leftover in ("ckpt.old", "ckpt.tmp"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "stale.txt").write_text("stale")
    save_checkpoint(path, lm, optimizer, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert not (path / "stale.txt").exists()
    fresh = make_lm(seed=9)
    assert load_checkpoint(path, fresh, make_optimizer(fresh, 1e-2)) == {"step": 2}


def test_checkpoint_with_extra_tensors_is_refused(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    lm, optimizer, _ = trained(1)
    save_checkpoint(tmp_path / "ckpt", lm, optimizer, {"step": 1})
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    tensors["transformer.h.1.attn.c_attn.weight"] = torch.zeros(2, 2)
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    fresh = make_lm(seed=0)
    with pytest.raises(ValueError, match="unexpected"):
        load_checkpoint(tmp_path / "ckpt", fresh, make_optimizer(fresh, 1e-2))


def test_checkpoint_from_another_architecture_is_refused(tmp_path: Path):
    lm, optimizer, _ = trained(1)
    save_checkpoint(tmp_path / "ckpt", lm, optimizer, {"step": 1})
    other = make_lm("llama")
    before = params(other)
    with pytest.raises(ValueError, match="does not fit the model"):
        load_checkpoint(tmp_path / "ckpt", other, make_optimizer(other, 1e-2))
    assert max_diff(params(other), before) == 0.0


def test_resume_falls_back_to_the_previous_checkpoint_after_a_kill_between_renames(tmp_path):
    from teacherhack.training import latest_checkpoint

    path = tmp_path / "checkpoint"
    assert latest_checkpoint(path) is None
    old = tmp_path / "checkpoint.old"
    old.mkdir()
    (old / "state.json").write_text("{}")
    assert latest_checkpoint(path) == old
    path.mkdir()
    (path / "state.json").write_text("{}")
    assert latest_checkpoint(path) == path


# --- the teacher's signals computed once ------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ["forward_kl", "reverse_kl", "jsd"])
def test_the_cached_teacher_path_gives_the_losses_and_gradients_of_the_teacher_forward(loss_name):
    from teacherhack.teacher_signals import TeacherSignals

    student, teacher = make_lm(seed=0), make_lm(seed=1)
    prompts, responses = pairs(10)
    with torch.no_grad():
        padded = pad_responses_for(responses)
        log_p = teacher.next_token_logprobs(collate_prompts(prompts, PAD), padded)
    signals = TeacherSignals.from_logprobs(log_p, response_mask(padded, EOS))
    plain = FixedPairs(prompts, responses, batch_size=4, seed=0, pad_id=PAD, origin="offline")
    cached = FixedPairs(prompts, responses, batch_size=4, seed=0, pad_id=PAD, origin="offline", signals=signals,
                        eos_id=EOS)
    loss_fn = distill_loss(student, teacher, loss=loss_name, beta=0.5, alpha=0.1, temperature=1.3, chunk_size=None)
    for step in range(3):  # different batches, rows in another order than the signals were built in
        a, b = plain.batch(step), cached.batch(step)
        assert b.teacher is not None and a.teacher is None
        la, lb = loss_fn(a, 4.0), loss_fn(b, 4.0)
        assert lb.item() == pytest.approx(la.item(), rel=1e-5, abs=1e-7)
        ga = torch.autograd.grad(la, list(student.model.parameters()))
        gb = torch.autograd.grad(lb, list(student.model.parameters()))
        assert max(float((x - y).abs().max()) for x, y in zip(ga, gb)) < 1e-5
    # sensitivity: signals of another teacher give another loss
    other = make_lm(seed=2)
    with torch.no_grad():
        wrong = TeacherSignals.from_logprobs(other.next_token_logprobs(collate_prompts(prompts, PAD), padded),
                                             response_mask(padded, EOS))
    bad = FixedPairs(prompts, responses, batch_size=4, seed=0, pad_id=PAD, origin="offline", signals=wrong, eos_id=EOS)
    right, wrong_loss = loss_fn(plain.batch(0), 4.0).item(), loss_fn(bad.batch(0), 4.0).item()
    assert abs(wrong_loss - right) > 0.02 * right


def test_top_k_losses_on_the_fly_equal_stored_top_k_and_full_k_equals_the_full_loss():
    from teacherhack.teacher_signals import TeacherSignals

    student, teacher = make_lm(seed=0), make_lm(seed=1)
    prompts, responses = pairs(8)
    padded = pad_responses_for(responses)
    with torch.no_grad():
        log_p = teacher.next_token_logprobs(collate_prompts(prompts, PAD), padded)
    stored = TeacherSignals.from_logprobs(log_p, response_mask(padded, EOS), k=4, dtype=torch.float32, temperature=1.0)
    source = FixedPairs(prompts, responses, batch_size=8, seed=0, pad_id=PAD, origin="offline", signals=stored, eos_id=EOS)
    on_the_fly = FixedPairs(prompts, responses, batch_size=8, seed=0, pad_id=PAD, origin="offline")
    options = dict(loss="forward_kl", beta=0.5, alpha=0.1, temperature=1.0, chunk_size=None)
    for convention in ("tail", "renormalized"):
        loss_fn = distill_loss(student, teacher, top_k=4, convention=convention, **options)
        assert loss_fn(source.batch(0), 8.0).item() == pytest.approx(loss_fn(on_the_fly.batch(0), 8.0).item(), rel=1e-5)
    full = distill_loss(student, teacher, **options)(on_the_fly.batch(0), 8.0)
    everything = distill_loss(student, teacher, top_k=VOCAB, **options)(on_the_fly.batch(0), 8.0)
    assert everything.item() == pytest.approx(full.item(), rel=1e-5)
    coarse = distill_loss(student, teacher, top_k=1, **options)(on_the_fly.batch(0), 8.0)
    assert coarse.item() < full.item()  # a tail bucket loses information: never above the full forward KL


def pad_responses_for(responses: list[list[int]]) -> torch.Tensor:
    from teacherhack.models import pad_responses

    return pad_responses(responses, PAD)
