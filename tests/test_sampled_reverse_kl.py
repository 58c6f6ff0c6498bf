"""``sampled_reverse_kl``: per-sample values and gradients against a brute-force loop, and unbiasedness
for the SEQUENCE-level reverse KL on an enumerable autoregressive model.

The model: tokens {0, 1} and EOS = 2, responses of at most 3 tokens (EOS counts; 3 tokens without EOS is a
truncated outcome), so 1 + 2 + 4 EOS-terminated outcomes + 8 truncated ones = 15. The student's logits are
a learnable table θ indexed by the prefix; the teacher is a fixed table. Every sequence probability is
exact, so ∇_θ KL(q_θ‖p) is computed by enumeration with autograd, and so is the exact expectation of each
surrogate's gradient Σ_y q(y)·∇loss(y). Monte Carlo over sampled batches must land within 4 standard
errors of the truth for the unbiased estimators, and far from it for the discount-0 one.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from teacherhack.divergences import response_mask, sampled_reverse_kl, token_divergence

V, EOS, L = 3, 2, 3
PAD = 0  # a real token after EOS: counting it would change the results
N_CODES = 13  # prefixes over {0, 1} of length <= 2, coded Σ (y_i + 1)·3^i (max 2 + 2·3 = 8); 13 leaves spare rows


def prefix_codes(responses: torch.Tensor) -> torch.Tensor:
    digits = (responses.clamp(0, EOS - 1) + 1) * 3 ** torch.arange(responses.shape[-1])
    return digits.cumsum(-1) - digits


def all_outcomes() -> torch.Tensor:
    rows = []
    for n in range(L):
        for body in itertools.product(range(EOS), repeat=n):
            rows.append(list(body) + [EOS] + [PAD] * (L - n - 1))
    rows += [list(body) for body in itertools.product(range(EOS), repeat=L)]
    return torch.tensor(rows)


OUTCOMES = all_outcomes()
MASK = response_mask(OUTCOMES, EOS)


def tables(seed: int, student_scale: float = 1.0, teacher_scale: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta = student_scale * torch.randn(N_CODES, V, generator=g, dtype=torch.float64)
    phi = teacher_scale * torch.randn(N_CODES, V, generator=g, dtype=torch.float64)
    return theta, phi


def logits_of(table: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    return table[prefix_codes(responses)]  # [B, L, V]


def token_logprobs(table: torch.Tensor, responses: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits_of(table, responses) / temperature, -1).gather(-1, responses[..., None])[..., 0]


def sequence_logprob(table, responses, temperature):
    """log of the sequence probability, walking the table explicitly."""
    out = torch.zeros(responses.shape[0], dtype=torch.float64)
    logp = torch.log_softmax(table / temperature, -1)
    for i, row in enumerate(responses.tolist()):
        code, total = 0, torch.zeros((), dtype=torch.float64)
        for t, tok in enumerate(row):
            total = total + logp[code, tok]
            if tok == EOS:
                break
            code += (tok + 1) * 3**t
        out = out.index_put((torch.tensor([i]),), total.reshape(1))
    return out


def exact_kl_and_grad(theta, phi, temperature=1.0):
    theta = theta.detach().clone().requires_grad_(True)
    log_q = sequence_logprob(theta, OUTCOMES, temperature)
    log_p = sequence_logprob(phi, OUTCOMES, temperature)
    assert abs(float(log_q.detach().exp().sum()) - 1.0) < 1e-12 and abs(float(log_p.exp().sum()) - 1.0) < 1e-12
    kl = (log_q.exp() * (log_q - log_p)).sum()
    (grad,) = torch.autograd.grad(kl, [theta])
    return float(kl.detach()), grad


def loss_on(theta, phi, responses, *, temperature=1.0, denominator=None, **kw):
    """sampled_reverse_kl on responses scored by the tables (the student's logits from θ)."""
    mask = response_mask(responses, EOS)
    return sampled_reverse_kl(logits_of(theta, responses), token_logprobs(phi, responses, temperature), responses,
                              mask, temperature=temperature, reduction="sum",
                              denominator=responses.shape[0] if denominator is None else denominator,
                              compute_dtype=torch.float64, **kw)


def expected(fn, theta, temperature=1.0):
    """Σ_y q(y)·(value(y), ∇_θ value(y)), exactly, by enumeration (q(y) as a constant weight)."""
    weights = sequence_logprob(theta, OUTCOMES, temperature).exp().detach()
    value, grad = 0.0, torch.zeros_like(theta)
    for y, w in zip(OUTCOMES, weights):
        th = theta.detach().clone().requires_grad_(True)
        v = fn(th, y[None])
        (g,) = torch.autograd.grad(v, [th])
        value, grad = value + float(w) * float(v.detach()), grad + w * g
    return value, grad


def sample(theta, n, generator, temperature=1.0):
    responses = torch.full((n, L), PAD, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    code = torch.zeros(n, dtype=torch.long)
    for t in range(L):
        tok = torch.multinomial(torch.softmax(theta[code] / temperature, -1), 1, generator=generator)[:, 0]
        responses[:, t] = torch.where(alive, tok, PAD)
        alive &= tok != EOS
        code = code + (tok.clamp_max(EOS - 1) + 1) * 3**t
    return responses


# --------------------------------------------------------------------------------------------------
# Per-sample values and gradients against a brute-force loop
# --------------------------------------------------------------------------------------------------


def ref_loss(student_logits, teacher_lp, responses, mask, *, estimator, discount, temperature, denominator):
    """Explicit loops: costs, reward-to-go by its definition, surrogate, value = estimate + surrogate − sg."""
    estimate = torch.zeros((), dtype=torch.float64)
    surrogate = torch.zeros((), dtype=torch.float64)
    for b in range(mask.shape[0]):
        steps = [t for t in range(mask.shape[1]) if mask[b, t]]
        log_q = {t: torch.log_softmax(student_logits[b, t].double() / temperature, -1)[responses[b, t]] for t in steps}
        cost = {}
        for t in steps:
            delta = teacher_lp[b, t].double() - log_q[t]
            cost[t] = -delta if estimator == "k1" else math.exp(1) ** delta - 1 - delta
        for t in steps:
            to_go = sum(discount ** (u - t) * cost[u].detach() for u in steps if u >= t)
            surrogate = surrogate + log_q[t] * to_go + (cost[t] if estimator == "k3" else 0.0)
            estimate = estimate + cost[t].detach()
    return (estimate + surrogate - surrogate.detach()) / denominator


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("discount", [1.0, 0.9, 0.0])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_matches_brute_force_loop(estimator, discount, temperature):
    g = torch.Generator().manual_seed(0)
    B, T, Vb = 4, 6, 9
    logits = 2 * torch.randn(B, T, Vb, generator=g, dtype=torch.float64)
    teacher_lp = torch.log_softmax(2 * torch.randn(B, T, Vb, generator=g, dtype=torch.float64), -1)
    responses = torch.randint(0, Vb, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate([6, 3, 0, 1]):
        mask[b, :n] = True
    teacher_tok = teacher_lp.gather(-1, responses[..., None])[..., 0]
    kw = dict(estimator=estimator, discount=discount, temperature=temperature, denominator=3)
    s = logits.clone().requires_grad_(True)
    got = sampled_reverse_kl(s, teacher_tok, responses, mask, compute_dtype=torch.float64, **kw)
    (g_got,) = torch.autograd.grad(got, [s])
    s = logits.clone().requires_grad_(True)
    want = ref_loss(s, teacher_tok, responses, mask, **kw)
    (g_want,) = torch.autograd.grad(want, [s])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    # outside the mask: anything (NaN logits and teacher log-probs, out-of-range tokens), same result
    dirty_logits, dirty_tok, dirty_resp = logits.clone(), teacher_tok.clone(), responses.clone()
    dirty_logits[~mask] = math.nan
    dirty_tok[~mask] = math.nan
    dirty_resp[~mask] = -100
    s = dirty_logits.clone().requires_grad_(True)
    dirty = sampled_reverse_kl(s, dirty_tok, dirty_resp, mask, compute_dtype=torch.float64, **kw)
    (g_dirty,) = torch.autograd.grad(dirty, [s])
    assert torch.equal(dirty, got) and torch.equal(g_dirty, g_got)
    # the default float32 path
    s32 = logits.float().requires_grad_(True)
    v32 = sampled_reverse_kl(s32, teacher_tok.float(), responses, mask, **kw)
    (g32,) = torch.autograd.grad(v32, [s32])
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g32.double(), g_want, rtol=1e-4, atol=1e-5)


def test_value_is_the_kl_estimate_and_k3_is_nonnegative():
    theta, phi = tables(1)
    responses = sample(theta, 200, torch.Generator().manual_seed(0))
    mask = response_mask(responses, EOS)
    log_q = token_logprobs(theta, responses, 1.0)
    log_p = token_logprobs(phi, responses, 1.0)
    for discount in (1.0, 0.0):  # the value never depends on the discount
        k1 = loss_on(theta, phi, responses, estimator="k1", discount=discount)
        torch.testing.assert_close(k1, (torch.where(mask, log_q - log_p, 0.0).sum(-1)).mean(), rtol=1e-12, atol=0)
    per_sequence = torch.stack([loss_on(theta, phi, y[None], estimator="k3") for y in responses])
    assert (per_sequence >= 0).all()
    # token_mean: the same sum over the batch's tokens
    tm = sampled_reverse_kl(logits_of(theta, responses), log_p, responses, mask, reduction="token_mean",
                            compute_dtype=torch.float64)
    torch.testing.assert_close(tm, torch.where(mask, log_q - log_p, 0.0).sum() / mask.sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_a_token_the_teacher_rules_out_gives_plus_infinity(estimator):
    theta, phi = tables(1)
    responses = sample(theta, 8, torch.Generator().manual_seed(0))
    mask = response_mask(responses, EOS)
    log_p = token_logprobs(phi, responses, 1.0)
    log_p[0, 0] = -math.inf  # the teacher gives the first sampled token probability 0
    logits = logits_of(theta, responses).requires_grad_()
    value = sampled_reverse_kl(logits, log_p, responses, mask, estimator=estimator, compute_dtype=torch.float64)
    assert value.item() == math.inf
    value.backward()
    assert torch.isfinite(logits.grad).all()


# --------------------------------------------------------------------------------------------------
# Exact expectations by enumeration
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_expectations(seed, temperature):
    theta, phi = tables(seed)
    kl, grad_kl = exact_kl_and_grad(theta, phi, temperature)
    assert kl > 0.05 and grad_kl.abs().max() > 1e-2
    kw = dict(temperature=temperature)
    # unbiased: discount 1, k1 and k3, value and gradient
    for estimator in ("k1", "k3"):
        value, grad = expected(lambda th, y: loss_on(th, phi, y, estimator=estimator, **kw), theta, temperature)
        assert abs(value - kl) < 1e-12
        torch.testing.assert_close(grad, grad_kl, rtol=1e-10, atol=1e-12)
    # Rao-Blackwell: the discount-0 estimators' expected gradient equals the full-distribution reverse-KL
    # loss's on the same student-sampled responses (prefix held fixed) ...
    rb_value, rb_grad = expected(lambda th, y: token_divergence(
        logits_of(phi, y), logits_of(th, y), response_mask(y, EOS), divergence="reverse_kl", temperature=temperature,
        reduction="sum", denominator=1, compute_dtype=torch.float64), theta, temperature)
    assert abs(rb_value - kl) < 1e-12  # its value's expectation is the sequence KL too (chain rule)
    for estimator in ("k1", "k3"):
        _, grad0 = expected(lambda th, y: loss_on(th, phi, y, estimator=estimator, discount=0.0, **kw), theta,
                            temperature)
        torch.testing.assert_close(grad0, rb_grad, rtol=1e-10, atol=1e-12)
    # ... which is not the sequence-level gradient
    assert (rb_grad - grad_kl).abs().max() > 0.1 * grad_kl.abs().max()
    # a discount in between is biased too
    _, grad_half = expected(lambda th, y: loss_on(th, phi, y, estimator="k1", discount=0.5, **kw), theta, temperature)
    assert (grad_half - grad_kl).abs().max() > 1e-3


def test_dropping_the_pathwise_term_of_k3_is_biased():
    """The k3 surrogate needs both terms: its score-function term alone has another expectation."""
    theta, phi = tables(0)
    _, grad_kl = exact_kl_and_grad(theta, phi)

    def score_only(th, y):
        mask = response_mask(y, EOS)
        log_q = token_logprobs(th, y, 1.0)
        delta = (token_logprobs(phi, y, 1.0) - log_q).detach()
        cost = torch.where(mask, delta.exp() - 1 - delta, 0.0)
        to_go = cost.flip(-1).cumsum(-1).flip(-1)
        return (torch.where(mask, log_q, 0.0) * to_go).sum()

    _, grad = expected(score_only, theta)
    assert (grad - grad_kl).abs().max() > 0.1 * grad_kl.abs().max()


# --------------------------------------------------------------------------------------------------
# Monte Carlo: 20,000 sampled sequences, per-coordinate standard errors from 400 batch means
# --------------------------------------------------------------------------------------------------


N_BATCHES, BATCH = 400, 50


def monte_carlo(theta, phi, seed, **kw):
    """Batch-mean gradients of the surrogate over 400 independent batches of 50 samples: their mean and
    per-coordinate standard error, and the mean value."""
    g = torch.Generator().manual_seed(seed)
    grads, values = [], []
    for _ in range(N_BATCHES):
        responses = sample(theta, BATCH, g)
        th = theta.detach().clone().requires_grad_(True)
        value = loss_on(th, phi, responses, **kw)
        (grad,) = torch.autograd.grad(value, [th])
        grads.append(grad.flatten())
        values.append(float(value.detach()))
    grads = torch.stack(grads)
    values = torch.tensor(values, dtype=torch.float64)
    root_n = math.sqrt(N_BATCHES)
    return grads.mean(0), grads.std(0) / root_n, float(values.mean()), float(values.std()) / root_n


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_monte_carlo_gradient_within_4_se_of_the_sequence_gradient(estimator):
    theta, phi = tables(0)
    kl, grad_kl = exact_kl_and_grad(theta, phi)
    mean, se, value, value_se = monte_carlo(theta, phi, seed=10, estimator=estimator)
    used = se > 0  # table rows no response reaches have exactly zero gradient in every batch
    assert used.sum() >= 18 and (mean[~used] == 0).all() and (grad_kl.flatten()[~used] == 0).all()
    z = (mean - grad_kl.flatten())[used] / se[used]
    assert z.abs().max() <= 4.0, z
    assert abs(value - kl) <= 4.0 * value_se
    print(f"\n[{estimator}] max |z| = {float(z.abs().max()):.2f}; mean SE = {float(se[used].mean()):.4f}; "
          f"value {value:.4f} ± {value_se:.4f} vs KL {kl:.4f}")


def test_monte_carlo_discount_zero_is_biased_and_matches_rao_blackwell():
    theta, phi = tables(0)
    _, grad_kl = exact_kl_and_grad(theta, phi)
    mean, se, _, _ = monte_carlo(theta, phi, seed=11, estimator="k1", discount=0.0)
    used = se > 0
    z_seq = ((mean - grad_kl.flatten())[used] / se[used]).abs()
    assert z_seq.max() > 10.0, z_seq  # clearly not the sequence-level gradient
    _, rb_grad = expected(lambda th, y: token_divergence(
        logits_of(phi, y), logits_of(th, y), response_mask(y, EOS), divergence="reverse_kl", reduction="sum",
        denominator=1, compute_dtype=torch.float64), theta)
    z_rb = ((mean - rb_grad.flatten())[used] / se[used]).abs()
    assert z_rb.max() <= 4.0, z_rb  # but the expected gradient of the full-distribution token-level loss
    print(f"\n[k1, discount 0] max |z| vs sequence gradient {float(z_seq.max()):.1f}, vs Rao-Blackwell "
          f"{float(z_rb.max()):.2f}")


def test_k3_has_lower_variance_than_k1_here():
    theta, phi = tables(0, student_scale=0.5, teacher_scale=0.5)  # close models: where k3 pays off
    _, se1, _, vse1 = monte_carlo(theta, phi, seed=12, estimator="k1")
    _, se3, _, vse3 = monte_carlo(theta, phi, seed=12, estimator="k3")
    print(f"\n[variance] value SE k1 {vse1:.5f} vs k3 {vse3:.5f}; mean gradient SE k1 {float(se1.mean()):.5f} "
          f"vs k3 {float(se3.mean()):.5f}")
    assert vse3 < vse1


# --------------------------------------------------------------------------------------------------
# Invalid arguments
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(estimator="k2"), "estimator"),
    (dict(discount=1.5), "discount"),
    (dict(discount=-0.1), "discount"),
    (dict(temperature=0.0), "temperature"),
    (dict(reduction="sequence_mean"), "sequence_mean"),
    (dict(reduction="mean"), "reduction"),
])
def test_invalid_arguments(kwargs, match):
    responses = OUTCOMES[:4]
    theta, phi = tables(0)
    with pytest.raises(ValueError, match=match):
        sampled_reverse_kl(logits_of(theta, responses), token_logprobs(phi, responses, 1.0), responses,
                           response_mask(responses, EOS), **kwargs)


def test_bad_shapes():
    responses = OUTCOMES[:4]
    theta, phi = tables(0)
    logits, lp, mask = logits_of(theta, responses), token_logprobs(phi, responses, 1.0), response_mask(responses, EOS)
    for args in ((logits[:, :-1], lp, responses, mask), (logits, lp[:, :-1], responses, mask),
                 (logits, lp, responses[:, :-1], mask), (logits[0], lp[0], responses[0], mask[0])):
        with pytest.raises(ValueError, match="shape"):
            sampled_reverse_kl(*args)
