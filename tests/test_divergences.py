"""Token-level divergences against an independent float64 brute-force reference.

The reference below is written from the definitions only (plain softmax, explicit per-divergence
formulas, 0·log 0 = 0, the JSD/skew mixtures formed from probabilities, explicit loops for the
reductions); it shares no code with :mod:`teacherhack.divergences`.
"""

from __future__ import annotations

import math

import pytest
import torch

from teacherhack.divergences import _kl_rows, select_rows, tempered, token_cross_entropy, token_divergence

from conftest import CONFIG_IDS, CONFIGS, F32, F32_GRAD, F64, F64_GRAD, INF, REDUCTIONS, float_bits  # noqa: E402


# --------------------------------------------------------------------------------------------------
# The independent reference
# --------------------------------------------------------------------------------------------------


def ref_softmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax in float64, and its log computed explicitly (exact also for ±1e4 logits)."""
    x = x.to(torch.float64)
    shifted = x - x.max(-1, keepdim=True).values.detach()  # the shift cancels exactly; no gradient through it
    e = torch.exp(shifted)
    z = e.sum(-1, keepdim=True)
    return e / z, shifted - torch.log(z)


def ref_kl(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ_v p·log(p/q) with 0·log 0 = 0 (and 0·log(0/0) = 0); p > 0 = q gives +inf."""
    pos = p > 0
    lp = torch.where(pos, logp, 0.0)
    lq = torch.where(pos, logq, 0.0)
    return torch.where(pos, p * (lp - lq), 0.0).sum(-1)


def ref_log(m: torch.Tensor) -> torch.Tensor:
    pos = m > 0
    return torch.where(pos, torch.log(torch.where(pos, m, 1.0)), -INF)


def ref_rows(t: torch.Tensor, s: torch.Tensor, divergence: str, beta: float = 0.5, alpha: float = 0.1,
             temperature: float = 1.0) -> torch.Tensor:
    p, logp = ref_softmax(t.to(torch.float64) / temperature)
    q, logq = ref_softmax(s.to(torch.float64) / temperature)
    if divergence == "forward_kl":
        return ref_kl(p, logp, logq)
    if divergence == "reverse_kl":
        return ref_kl(q, logq, logp)
    if divergence == "jsd":
        if beta == 0.0:
            return ref_kl(p, logp, logq)
        if beta == 1.0:
            return ref_kl(q, logq, logp)
        logm = ref_log(beta * p + (1 - beta) * q)
        return beta * ref_kl(p, logp, logm) + (1 - beta) * ref_kl(q, logq, logm)
    if divergence == "skew_forward_kl":
        return ref_kl(p, logp, ref_log(alpha * p + (1 - alpha) * q))
    if divergence == "skew_reverse_kl":
        return ref_kl(q, logq, ref_log(alpha * q + (1 - alpha) * p))
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(divergence)


def ref_reduce(rows: torch.Tensor, mask: torch.Tensor, reduction: str, denominator: float | None = None) -> torch.Tensor:
    """Explicit loops over sequences and positions; only masked-in positions are ever touched."""
    mask = mask.bool()
    total = torch.zeros((), dtype=torch.float64)
    n_seq, n_tok = 0, 0
    for b in range(rows.shape[0]):
        seq_sum, seq_len = torch.zeros((), dtype=torch.float64), 0
        for t in range(rows.shape[1]):
            if mask[b, t]:
                seq_sum = seq_sum + rows[b, t]
                seq_len += 1
        n_tok += seq_len
        if seq_len == 0:
            continue
        n_seq += 1
        total = total + (seq_sum / seq_len if reduction == "sequence_mean" else seq_sum)
    if reduction == "sum":
        return total / (1.0 if denominator is None else denominator)
    default = n_seq if reduction == "sequence_mean" else n_tok
    return total / max(default if denominator is None else denominator, 1)


def ref_loss(t, s, mask, *, divergence="forward_kl", beta=0.5, alpha=0.1, temperature=1.0,
             reduction="sequence_mean", denominator=None) -> torch.Tensor:
    return ref_reduce(ref_rows(t, s, divergence, beta, alpha, temperature), mask, reduction, denominator)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def make(B=3, T=5, V=11, scale=2.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t = (scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
    s = (scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
    # response lengths per row (one row empty, one full); odd rows end one position early (right padding)
    lengths = [T, 2, 0, min(4, T), 1, min(3, T)][:B]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        end = T - (b % 2 if n < T else 0)
        mask[b, end - n:end] = True  # prompt positions before, padding after
    return t, s, mask


def loss_and_grads(fn, t, s, *, grad_teacher=False):
    """Value and gradients (student, teacher-or-None) of fn(t, s)."""
    t = t.detach().clone().requires_grad_(grad_teacher)
    s = s.detach().clone().requires_grad_(True)
    value = fn(t, s)
    grads = torch.autograd.grad(value, [s, t] if grad_teacher else [s], allow_unused=True)
    return value.detach(), grads[0], (grads[1] if grad_teacher else None)


def lib(**kw):
    return lambda t, s, mask: token_divergence(t, s, mask, **kw)


# --------------------------------------------------------------------------------------------------
# Values and gradients against the reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_value_and_gradients_match_reference_float64(divergence, beta, alpha, reduction, temperature):
    t, s, mask = make(seed=CONFIGS.index((divergence, beta, alpha)))
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, temperature=temperature, reduction=reduction)
    got, gs, gt = loss_and_grads(lambda t, s: token_divergence(t, s, mask, compute_dtype=torch.float64, **kw),
                                 t, s, grad_teacher=True)
    want, ws, wt = loss_and_grads(lambda t, s: ref_loss(t, s, mask, **kw), t, s, grad_teacher=True)
    assert got.dtype == torch.float64 and want > 0
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(gs, ws, **F64_GRAD)
    torch.testing.assert_close(gt, wt, **F64_GRAD)
    assert (gs[~mask] == 0).all() and (gt[~mask] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_default_float32_path(divergence, beta, alpha, reduction, temperature):
    t, s, mask = make(seed=3, dtype=torch.float32)
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, temperature=temperature, reduction=reduction)
    got, gs, gt = loss_and_grads(lambda t, s: token_divergence(t, s, mask, **kw), t, s, grad_teacher=True)
    want, ws, wt = loss_and_grads(lambda t, s: ref_loss(t, s, mask, **kw), t, s, grad_teacher=True)
    assert got.dtype == torch.float32 and gs.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **F32)
    torch.testing.assert_close(gs.double(), ws.double(), **F32_GRAD)
    torch.testing.assert_close(gt.double(), wt.double(), **F32_GRAD)


@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_temperature_applies_to_both_sides(divergence, beta, alpha):
    t, s, mask = make(seed=5)
    kw = dict(divergence=divergence, beta=beta, alpha=alpha)
    got = token_divergence(t, s, mask, temperature=2.0, compute_dtype=torch.float64, **kw)
    # equivalent: temperature 1 on logits divided beforehand (both sides), no tau^2 factor
    torch.testing.assert_close(got, token_divergence(t / 2, s / 2, mask, compute_dtype=torch.float64, **kw), **F64)
    # one-sided temperature would be a different number
    one_sided = ref_reduce(ref_rows(t, s / 2.0, divergence, beta, alpha), mask, "sequence_mean")
    assert abs(float(got - one_sided)) > 1e-3


@pytest.mark.parametrize("case", ["ragged", "non_contiguous", "every_row", "no_row", "mask_as_wide_as_x"])
def test_select_rows_is_boolean_indexing_bit_for_bit(case):
    """The same rows in the same order, and the same gradient (a row copy instead of an accumulation)."""
    generator = torch.Generator().manual_seed(3)
    leaf = torch.randn(5, 7, 40, generator=generator).requires_grad_()
    x, mask = leaf, torch.arange(7)[None] < torch.tensor([7, 0, 3, 5, 1])[:, None]
    if case == "non_contiguous":  # a slice of the vocabulary, as a padded output layer gives
        x = leaf[..., :33]
        assert not x.is_contiguous()
    elif case == "every_row":
        mask = torch.ones_like(mask)
    elif case == "no_row":
        mask = torch.zeros_like(mask)
    elif case == "mask_as_wide_as_x":
        x = leaf[..., 0]
    picked, reference = select_rows(x, mask), x[mask]
    assert picked.shape == reference.shape and torch.equal(picked, reference)
    upstream = torch.randn(reference.shape, generator=generator)
    (grad,) = torch.autograd.grad(picked, leaf, upstream)
    (grad_reference,) = torch.autograd.grad(reference, leaf, upstream)
    assert torch.equal(grad, grad_reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tempered_at_one_skips_the_division_with_the_same_bits(dtype):
    """τ = 1 returns the logits themselves (no pass over [rows, V]); values and gradients are those of x / 1."""
    x = (torch.randn(4, 7, 33) * 30).to(dtype).requires_grad_()
    assert tempered(x, 1.0) is x
    weights = torch.randn(4, 7, 33)
    for cast in (None, torch.float32):
        divided = x.to(cast or dtype) / 1.0
        skipped = tempered(x, 1.0, cast)
        assert skipped.dtype == (cast or dtype) and torch.equal(skipped, divided)
        (grad_divided,) = torch.autograd.grad((divided.float() * weights).sum(), x)
        (grad_skipped,) = torch.autograd.grad((skipped.float() * weights).sum(), x)
        assert torch.equal(grad_skipped, grad_divided)
    torch.testing.assert_close(tempered(x, 0.5, torch.float64), x.double() / 0.5, rtol=0, atol=0)


@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_extreme_logits(divergence, beta, alpha):
    g = torch.Generator().manual_seed(11)
    t = 1e4 * (2 * torch.rand(3, 5, 11, generator=g, dtype=torch.float64) - 1)
    s = 1e4 * (2 * torch.rand(3, 5, 11, generator=g, dtype=torch.float64) - 1)
    s[0, 0] = t[0, 0]  # some rows identical, some sharing the argmax
    s[1, 1, t[1, 1].argmax()] = 2e4
    mask = torch.ones(3, 5, dtype=torch.bool)
    kw = dict(divergence=divergence, beta=beta, alpha=alpha)
    got, gs, gt = loss_and_grads(lambda t, s: token_divergence(t, s, mask, compute_dtype=torch.float64, **kw),
                                 t, s, grad_teacher=True)
    want, ws, wt = loss_and_grads(lambda t, s: ref_loss(t, s, mask, **kw), t, s, grad_teacher=True)
    assert torch.isfinite(got) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(gs, ws, **F64_GRAD)
    torch.testing.assert_close(gt, wt, **F64_GRAD)
    got32, gs32, _ = loss_and_grads(lambda t, s: token_divergence(t, s, mask, **kw), t.float(), s.float())
    assert torch.isfinite(got32) and torch.isfinite(gs32).all()
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_near_one_hot(divergence, beta, alpha):
    t, s, mask = make(scale=40.0, seed=8)
    kw = dict(divergence=divergence, beta=beta, alpha=alpha)
    got, gs, gt = loss_and_grads(lambda t, s: token_divergence(t, s, mask, compute_dtype=torch.float64, **kw),
                                 t, s, grad_teacher=True)
    want, ws, wt = loss_and_grads(lambda t, s: ref_loss(t, s, mask, **kw), t, s, grad_teacher=True)
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(gs, ws, **F64_GRAD)
    torch.testing.assert_close(gt, wt, **F64_GRAD)
    got32 = token_divergence(t.float(), s.float(), mask, **kw)
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


FINITE_WITH_TEACHER_ZEROS = [c for c in CONFIGS if c[0] != "reverse_kl"]


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_minus_inf_on_teacher_side(divergence, beta, alpha, chunk_size):
    t, s, mask = make(seed=13)
    t[..., 3] = -INF  # the teacher gives token 3 probability 0 everywhere
    t[0, :, 5] = -INF
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, compute_dtype=torch.float64, chunk_size=chunk_size)
    got, gs, gt = loss_and_grads(lambda t, s: token_divergence(t, s, mask, **kw), t, s, grad_teacher=True)
    assert not torch.isnan(got)
    if divergence == "reverse_kl":  # KL(Q‖P) with P = 0 < Q: +inf is the true value
        assert got == INF
        return
    want, ws, wt = loss_and_grads(lambda t, s: ref_loss(t, s, mask, **{k: v for k, v in kw.items()
                                                                       if k in ("divergence", "beta", "alpha")}),
                                  t, s, grad_teacher=True)
    assert torch.isfinite(got) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(gs, ws, **F64_GRAD)
    torch.testing.assert_close(gt, wt, **F64_GRAD)
    assert (gt[..., 3] == 0).all()  # no gradient into a logit that is -inf
    # float32 path: no NaN either
    v32, g32, t32 = loss_and_grads(lambda t, s: token_divergence(t, s, mask, divergence=divergence, beta=beta,
                                                                  alpha=alpha, chunk_size=chunk_size),
                                   t.float(), s.float(), grad_teacher=True)
    assert torch.isfinite(v32) and torch.isfinite(g32).all() and torch.isfinite(t32).all()


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_a_nan_on_the_teacher_side_makes_the_loss_nan_never_a_zero_probability(divergence, beta, alpha, chunk_size):
    """Only −inf means probability 0: a NaN teacher entry (a broken forward or signal file) must reach the loss,
    which training then refuses (NonFiniteLoss), not drop out of the support and leave a plausible finite loss."""
    t, s, mask = make(seed=13)
    t = torch.log_softmax(t.float(), -1)
    t[0, 1, 2] = math.nan
    for dtype in (None, torch.float64):  # the shortcut of the float32 path outside autograd, and the masked formula
        kw = dict(divergence=divergence, beta=beta, alpha=alpha, chunk_size=chunk_size, compute_dtype=dtype)
        with torch.no_grad():
            assert torch.isnan(token_divergence(t, s.float(), mask, **{k: v for k, v in kw.items() if v is not None}))
        assert torch.isnan(token_divergence(t, s.float().requires_grad_(), mask,
                                            **{k: v for k, v in kw.items() if v is not None}))


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_minus_inf_on_both_sides_same_entry(divergence, beta, alpha, chunk_size):
    t, s, mask = make(seed=17)
    t[..., 4] = -INF
    s[..., 4] = -INF
    t[1, :, 7] = s[1, :, 7] = -INF
    kw = dict(divergence=divergence, beta=beta, alpha=alpha)
    got, gs, gt = loss_and_grads(lambda t, s: token_divergence(t, s, mask, compute_dtype=torch.float64,
                                                                chunk_size=chunk_size, **kw), t, s, grad_teacher=True)
    want, ws, wt = loss_and_grads(lambda t, s: ref_loss(t, s, mask, **kw), t, s, grad_teacher=True)
    assert torch.isfinite(got) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(gs, ws, **F64_GRAD)
    torch.testing.assert_close(gt, wt, **F64_GRAD)
    assert (gs[..., 4] == 0).all() and (gt[..., 4] == 0).all()
    # a column that is -inf on both sides everywhere is the same as no column at all
    keep = [v for v in range(t.shape[-1]) if v != 4]
    dropped = token_divergence(t[..., keep], s[..., keep], mask, compute_dtype=torch.float64, **kw)
    torch.testing.assert_close(got, dropped, **F64)
    v32, g32, t32 = loss_and_grads(lambda t, s: token_divergence(t, s, mask, chunk_size=chunk_size, **kw),
                                   t.float(), s.float(), grad_teacher=True)
    assert torch.isfinite(v32) and torch.isfinite(g32).all() and torch.isfinite(t32).all()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
def test_minus_inf_on_student_side_only(compute_dtype):
    mask = torch.ones(1, 1, dtype=torch.bool)
    s = torch.tensor([[[0.0, 0.0, -INF]]], dtype=torch.float64)
    # teacher mass at the student's impossible token: KL(P‖Q) = +inf, the true value, never NaN,
    # also where the teacher probability underflows to 0 in the compute dtype (exp(-800) in float64)
    for teacher_logit in (0.0, -200.0, -800.0):
        t = torch.tensor([[[0.0, 0.0, teacher_logit]]], dtype=torch.float64)
        assert token_divergence(t, s, mask, compute_dtype=compute_dtype) == INF
        # reverse direction: Q puts no mass there, finite
        got = token_divergence(t, s, mask, divergence="reverse_kl", compute_dtype=compute_dtype)
        torch.testing.assert_close(got.double(), ref_loss(t, s, mask, divergence="reverse_kl"), **F32)
        for div in ("jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"):
            v = token_divergence(t, s, mask, divergence=div, compute_dtype=compute_dtype)
            assert torch.isfinite(v), div


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_bf16_inputs(divergence, beta, alpha, reduction):
    t, s, mask = make(seed=19, dtype=torch.bfloat16)
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, reduction=reduction, temperature=0.8)
    want, ws, wt = loss_and_grads(lambda t, s: ref_loss(t, s, mask, **kw), t.double(), s.double(), grad_teacher=True)
    got, gs, gt = loss_and_grads(lambda t, s: token_divergence(t, s, mask, compute_dtype=torch.float64, **kw),
                                 t, s, grad_teacher=True)
    assert gs.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, **F64)
    # the gradient is rounded to bf16 on its way out
    torch.testing.assert_close(gs.double(), ws, rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(gt.double(), wt, rtol=1e-2, atol=1e-5)
    got32 = token_divergence(t, s, mask, **kw)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, **F32)


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_nonnegative_zero_iff_equal(divergence, beta, alpha):
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, reduction="sum", compute_dtype=torch.float64)
    for seed in range(3):
        t, s, mask = make(seed=100 + seed, scale=0.5 + 1.5 * seed)
        rows_mask = torch.zeros_like(mask)
        for b in range(mask.shape[0]):
            for tt in range(mask.shape[1]):
                rows_mask.zero_()
                rows_mask[b, tt] = True
                v = token_divergence(t, s, rows_mask, **kw)
                assert v > 0, (seed, b, tt)  # different distributions: strictly positive
                # equal distributions: zero (exactly for KL/TVD; the mixtures round to within 1e-15)
                same = token_divergence(t, t, rows_mask, **kw)
                shifted = token_divergence(t, t + 3.0, rows_mask, **kw)  # same softmax
                assert abs(float(same)) <= 1e-14 and abs(float(shifted)) <= 1e-13
                if divergence in ("forward_kl", "reverse_kl", "tvd"):
                    assert same == 0.0
    # barely different: still strictly positive, and float32 never negative
    t, s, mask = make(seed=7)
    s2 = t.clone()
    s2[0, -1, 0] += 1e-3
    assert token_divergence(t, s2, mask, **kw) > 0
    t32, s32, _ = make(seed=8, dtype=torch.float32, scale=0.01)
    assert token_divergence(t32, s32, mask, divergence=divergence, beta=beta, alpha=alpha) >= 0


def test_jsd_half_is_symmetric():
    for seed in range(4):
        t, s, mask = make(seed=200 + seed)
        a = token_divergence(t, s, mask, divergence="jsd", beta=0.5, compute_dtype=torch.float64)
        b = token_divergence(s, t, mask, divergence="jsd", beta=0.5, compute_dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
        # and JSD(β) with the roles swapped is JSD(1−β)
        a = token_divergence(t, s, mask, divergence="jsd", beta=0.3, compute_dtype=torch.float64)
        b = token_divergence(s, t, mask, divergence="jsd", beta=0.7, compute_dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    # but the KLs are not symmetric
    f = token_divergence(t, s, mask, compute_dtype=torch.float64)
    r = token_divergence(s, t, mask, compute_dtype=torch.float64)
    torch.testing.assert_close(r, token_divergence(t, s, mask, divergence="reverse_kl", compute_dtype=torch.float64),
                               **F64)
    assert abs(float(f - r)) > 1e-3


def test_jsd_endpoints_are_the_kls_and_the_documented_discontinuity():
    t, s, mask = make(seed=21)
    kw = dict(compute_dtype=torch.float64)
    fkl = token_divergence(t, s, mask, divergence="forward_kl", **kw)
    rkl = token_divergence(t, s, mask, divergence="reverse_kl", **kw)
    assert torch.equal(token_divergence(t, s, mask, divergence="jsd", beta=0.0, **kw), fkl)
    assert torch.equal(token_divergence(t, s, mask, divergence="jsd", beta=1.0, **kw), rkl)
    for b in (0, 1):  # gradients too
        _, g_jsd, _ = loss_and_grads(lambda t, s: token_divergence(t, s, mask, divergence="jsd", beta=float(b), **kw), t, s)
        _, g_kl, _ = loss_and_grads(lambda t, s: token_divergence(
            t, s, mask, divergence="forward_kl" if b == 0 else "reverse_kl", **kw), t, s)
        assert torch.equal(g_jsd, g_kl)
    eps = 1e-6
    near0 = token_divergence(t, s, mask, divergence="jsd", beta=eps, **kw)
    near1 = token_divergence(t, s, mask, divergence="jsd", beta=1 - eps, **kw)
    assert fkl > 0.1 and near0 < 1e-5 * fkl and near1 < 1e-5 * rkl  # tiny: it vanishes at both ends
    torch.testing.assert_close(near0, eps * fkl, rtol=1e-4, atol=0)  # ≈ β·KL(P‖Q)
    torch.testing.assert_close(near1, eps * rkl, rtol=1e-4, atol=0)  # ≈ (1−β)·KL(Q‖P)
    torch.testing.assert_close(near0, ref_loss(t, s, mask, divergence="jsd", beta=eps), rtol=1e-8, atol=0)


# --------------------------------------------------------------------------------------------------
# Masking, chunking, accumulation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [math.nan, -INF, 1e30])
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_masked_positions_contribute_nothing(divergence, beta, alpha, chunk_size, garbage):
    t, s, mask = make(seed=23, dtype=torch.float32)
    for reduction in REDUCTIONS:
        kw = dict(divergence=divergence, beta=beta, alpha=alpha, chunk_size=chunk_size, reduction=reduction)
        clean = loss_and_grads(lambda t, s: token_divergence(t, s, mask, **kw), t, s, grad_teacher=True)
        tg, sg = t.clone(), s.clone()
        tg[~mask] = garbage
        sg[~mask] = garbage
        dirty = loss_and_grads(lambda t, s: token_divergence(t, s, mask, **kw), tg, sg, grad_teacher=True)
        for a, b in zip(clean, dirty):
            assert torch.equal(a, b)
        assert (dirty[1][~mask] == 0).all() and (dirty[2][~mask] == 0).all()
        assert torch.isfinite(dirty[0]) and torch.isfinite(dirty[1]).all()


def test_mask_dtypes_are_equivalent():
    t, s, mask = make(seed=24)
    want = token_divergence(t, s, mask)
    for m in (mask.long(), mask.float(), mask.to(torch.uint8)):
        assert torch.equal(token_divergence(t, s, m), want)


@pytest.mark.parametrize("with_inf", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_chunked_equals_unchunked(divergence, beta, alpha, reduction, with_inf):
    T = 7
    t, s, mask = make(B=4, T=T, seed=29)
    if with_inf:
        t[..., 2] = -INF
        s[..., 2] = -INF
        if divergence != "reverse_kl":
            t[1, :, 6] = -INF
    for dtype in (torch.float64, torch.float32) if reduction == "sequence_mean" else (torch.float64,):
        kw = dict(divergence=divergence, beta=beta, alpha=alpha, reduction=reduction, compute_dtype=dtype)
        tol = dict(rtol=1e-13, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
        base = loss_and_grads(lambda t, s: token_divergence(t, s, mask, **kw), t, s, grad_teacher=True)
        for chunk in (1, 3, T, T + 5):
            got = loss_and_grads(lambda t, s: token_divergence(t, s, mask, chunk_size=chunk, **kw), t, s,
                                 grad_teacher=True)
            assert got[0].dtype == base[0].dtype
            for a, b in zip(got, base):
                torch.testing.assert_close(a, b, **tol)
    # student-only gradient (teacher frozen, the usual case) and bf16 logits
    tb, sb = t.bfloat16(), s.bfloat16()
    base = loss_and_grads(lambda t, s: token_divergence(t, s, mask, divergence=divergence, beta=beta, alpha=alpha), tb, sb)
    got = loss_and_grads(lambda t, s: token_divergence(t, s, mask, divergence=divergence, beta=beta, alpha=alpha,
                                                       chunk_size=2), tb, sb)
    assert got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], base[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[1], base[1], rtol=0, atol=0)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_chunked_gradient_scales_with_the_upstream_gradient(divergence):
    """The chunked backward must multiply by the incoming gradient (loss weights, combined losses)."""
    t, s, mask = make(B=4, T=7, seed=30)
    targets = torch.randint(0, t.shape[-1], mask.shape, generator=torch.Generator().manual_seed(0))
    kw = dict(divergence=divergence, compute_dtype=torch.float64)

    def combined(chunk):
        return lambda t, s: (2.5 * token_divergence(t, s, mask, chunk_size=chunk, **kw)
                             + 0.3 * token_cross_entropy(s, targets, mask).double())

    base = loss_and_grads(combined(None), t, s, grad_teacher=True)
    unscaled = loss_and_grads(lambda t, s: token_divergence(t, s, mask, **kw), t, s, grad_teacher=True)
    torch.testing.assert_close(base[2], 2.5 * unscaled[2], **F64_GRAD)
    for chunk in (1, 3):
        got = loss_and_grads(combined(chunk), t, s, grad_teacher=True)
        for a, b in zip(got, base):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_gradient_accumulation_denominator(divergence, reduction, chunk_size):
    B, T = 6, 5
    t, s, mask = make(B=B, T=T, seed=31)
    kw = dict(divergence=divergence, reduction=reduction, chunk_size=chunk_size, compute_dtype=torch.float64)
    big, g_big, _ = loss_and_grads(lambda t, s: token_divergence(t, s, mask, **kw), t, s)
    torch.testing.assert_close(big, ref_loss(t, s, mask, divergence=divergence, reduction=reduction), **F64)
    # the window's denominator: sequences with a response token, or response tokens
    denominator = int((mask.sum(-1) > 0).sum()) if reduction == "sequence_mean" else int(mask.sum())
    splits = [slice(0, 2), slice(2, 3), slice(3, 6)]  # uneven micro-batches (one holds the empty row)
    total, naive_sum, naive_mean, grads = 0.0, 0.0, 0.0, []
    for sl in splits:
        v, g, _ = loss_and_grads(lambda t, s: token_divergence(t, s, mask[sl], denominator=denominator, **kw),
                                 t[sl], s[sl])
        total = total + v
        grads.append(g)
        nv = token_divergence(t[sl], s[sl], mask[sl], **kw)  # normalised per micro-batch: the bug
        naive_sum = naive_sum + nv
        naive_mean = naive_mean + nv / len(splits)
    torch.testing.assert_close(total, big, rtol=1e-13, atol=0)
    torch.testing.assert_close(torch.cat(grads), g_big, rtol=1e-13, atol=0)
    # a tensor denominator works the same
    v0 = token_divergence(t[:2], s[:2], mask[:2], denominator=torch.tensor(denominator), **kw)
    torch.testing.assert_close(v0, token_divergence(t[:2], s[:2], mask[:2], denominator=denominator, **kw), **F64)
    # without the window's denominator, neither summing nor averaging micro-batch losses is right
    assert abs(float(naive_sum - big)) > 1e-2 * float(big)
    assert abs(float(naive_mean - big)) > 1e-3 * float(big)


def test_sum_reduction_with_denominator():
    t, s, mask = make(seed=33)
    a = token_divergence(t, s, mask, reduction="sum", denominator=4, compute_dtype=torch.float64)
    torch.testing.assert_close(a, ref_loss(t, s, mask, reduction="sum") / 4, **F64)


def test_empty_mask_gives_zero_not_nan():
    t, s, mask = make(seed=34)
    for reduction in REDUCTIONS:
        for chunk in (None, 2):
            v, g, _ = loss_and_grads(lambda t, s: token_divergence(t, s, torch.zeros_like(mask), reduction=reduction,
                                                                   chunk_size=chunk), t, s)
            assert v == 0 and (g == 0).all()


# --------------------------------------------------------------------------------------------------
# Vocabulary alignment
# --------------------------------------------------------------------------------------------------


def test_vocab_mismatch_is_an_error():
    t, s, mask = make(seed=37)
    s_pad = torch.cat([s, torch.zeros(*s.shape[:-1], 5, dtype=s.dtype)], -1)
    with pytest.raises(ValueError, match="vocab"):
        token_divergence(t, s_pad, mask)
    with pytest.raises(ValueError, match="vocab"):
        token_divergence(s_pad, t, mask)
    for bad in (s.shape[-1] + 1, 0, -1):
        with pytest.raises(ValueError, match="vocab_size"):
            token_divergence(t, s_pad, mask, vocab_size=bad)


@pytest.mark.parametrize("pad_value", [0.0, 1e4, -INF, math.nan])
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_vocab_size_ignores_padding_columns(divergence, beta, alpha, pad_value):
    t, s, mask = make(seed=41)
    V = t.shape[-1]
    s_pad = torch.cat([s, torch.full((*s.shape[:-1], 6), pad_value, dtype=s.dtype)], -1)
    t_pad = torch.cat([t, torch.full((*t.shape[:-1], 2), 7.0, dtype=t.dtype)], -1)
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, compute_dtype=torch.float64)
    for chunk in (None, 2):
        want, gs, gt = loss_and_grads(lambda t, s: token_divergence(t, s, mask, chunk_size=chunk, **kw), t, s,
                                      grad_teacher=True)
        for tt in (t, t_pad):
            got, gsp, gtp = loss_and_grads(
                lambda a, b: token_divergence(a, b, mask, vocab_size=V, chunk_size=chunk, **kw), tt, s_pad,
                grad_teacher=True)
            assert torch.equal(got, want)
            assert torch.equal(gsp[..., :V], gs) and (gsp[..., V:] == 0).all()
            assert torch.equal(gtp[..., :V], gt) and (gtp[..., V:] == 0).all()
    # same sizes, vocab_size = V: a no-op
    assert torch.equal(token_divergence(t, s, mask, vocab_size=V, **kw), token_divergence(t, s, mask, **kw))


# --------------------------------------------------------------------------------------------------
# Cross-entropy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_token_cross_entropy(reduction, temperature):
    t, s, mask = make(seed=43, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, s.shape[-1], mask.shape, generator=g)
    targets[~mask] = -100  # ignored positions may hold anything
    s_dirty = s.clone()
    s_dirty[~mask] = math.nan

    def ref(s):
        _, logq = ref_softmax(s.double() / temperature)
        rows = -logq.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return ref_reduce(rows, mask, reduction)

    got, gs, _ = loss_and_grads(lambda t, s: token_cross_entropy(s, targets, mask, temperature=temperature,
                                                                 reduction=reduction), t, s_dirty)
    want, ws, _ = loss_and_grads(lambda t, s: ref(s), t, s)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **F32)
    torch.testing.assert_close(gs.double(), ws.double(), **F32_GRAD)
    assert (gs[~mask] == 0).all()
    # accumulation rule shared with token_divergence
    denominator = int((mask.sum(-1) > 0).sum()) if reduction == "sequence_mean" else int(mask.sum())
    if reduction != "sum":
        parts = sum(token_cross_entropy(s[sl], targets[sl], mask[sl], temperature=temperature, reduction=reduction,
                                        denominator=denominator) for sl in (slice(0, 1), slice(1, 3)))
        torch.testing.assert_close(parts, got, rtol=1e-6, atol=0)
    # hard-label CE equals forward KL against a one-hot teacher
    one_hot = torch.full_like(s, -INF).scatter(-1, targets.clamp_min(0).unsqueeze(-1), 0.0)
    fkl = token_divergence(one_hot, s, mask, temperature=temperature, reduction=reduction)
    # (the teacher's -inf / temperature stays -inf; its one-hot is unchanged by the temperature)
    torch.testing.assert_close(fkl, got, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Invalid arguments
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(divergence="kl"),
    dict(divergence="js"),
    dict(divergence="jsd", beta=-0.1),
    dict(divergence="jsd", beta=1.1),
    dict(divergence="jsd", beta=math.nan),
    dict(divergence="skew_forward_kl", alpha=1.0),
    dict(divergence="skew_reverse_kl", alpha=1.0),
    dict(divergence="skew_forward_kl", alpha=-0.1),
    dict(temperature=0.0),
    dict(temperature=-1.0),
    dict(temperature=math.nan),
    dict(reduction="mean"),
    dict(chunk_size=0),
    dict(chunk_size=-2),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_invalid_arguments(kwargs):
    t, s, mask = make(seed=47)
    with pytest.raises(ValueError):
        token_divergence(t, s, mask, **kwargs)


def test_bad_shapes():
    t, s, mask = make(seed=53)
    with pytest.raises(ValueError, match="shape"):
        token_divergence(t, s[:, :-1], mask)  # T differs
    with pytest.raises(ValueError, match="shape"):
        token_divergence(t, s[:-1], mask)  # B differs
    with pytest.raises(ValueError, match="shape"):
        token_divergence(t, s, mask[:, :-1])  # mask differs
    with pytest.raises(ValueError, match="shape"):
        token_divergence(t, s, mask.T)
    with pytest.raises(ValueError, match="shape"):
        token_divergence(t[0], s[0], mask[0])  # [T, V]: a batch dimension is required
    with pytest.raises(ValueError, match="shape"):
        token_divergence(t[0], s[0], mask[0], chunk_size=2)
    with pytest.raises(ValueError, match="shape"):
        token_divergence(t[None], s[None], mask[None])


def test_cross_entropy_invalid_arguments():
    t, s, mask = make(seed=59)
    targets = torch.zeros(mask.shape, dtype=torch.long)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError):
            token_cross_entropy(s, targets, mask, temperature=temperature)
    with pytest.raises(ValueError):
        token_cross_entropy(s, targets, mask, reduction="avg")


# --------------------------------------------------------------------------------------------------
# The checks above catch the bugs peer systems shipped
# --------------------------------------------------------------------------------------------------


def _mutant_rows(kind: str, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    p, logp = ref_softmax(t)
    q, logq = ref_softmax(s)
    beta = 0.1
    if kind == "jsd mixture of log-probabilities":
        logm = beta * logp + (1 - beta) * logq
        return beta * ref_kl(p, logp, logm) + (1 - beta) * ref_kl(q, logq, logm)
    if kind == "jsd mixture weights swapped":
        logm = ref_log((1 - beta) * p + beta * q)
        return beta * ref_kl(p, logp, logm) + (1 - beta) * ref_kl(q, logq, logm)
    if kind == "forward kl as soft cross-entropy":
        return -(p * logq).sum(-1)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsd mixture of log-probabilities", "jsd mixture weights swapped",
                                  "forward kl as soft cross-entropy"])
def test_known_bugs_would_be_caught(kind):
    t, s, mask = make(seed=61)
    divergence, beta = ("forward_kl", 0.5) if "forward" in kind else ("jsd", 0.1)
    got = token_divergence(t, s, mask, divergence=divergence, beta=beta, compute_dtype=torch.float64)
    mutant = ref_reduce(_mutant_rows(kind, t, s), mask, "sequence_mean")
    assert not torch.allclose(got, mutant, **F64)
    assert abs(float(got - mutant)) > 1e-3


def test_jsd_endpoint_bug_would_be_caught():
    """A JSD(β) that merely tends to 0 at β = 0 (the formula evaluated at the endpoint) is not forward KL."""
    t, s, mask = make(seed=67)
    fkl = token_divergence(t, s, mask, divergence="jsd", beta=0.0, compute_dtype=torch.float64)
    assert fkl > 0.1  # whereas the unguarded formula gives 0·KL(P‖Q) + 1·KL(Q‖Q) = 0


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_kl_in_closed_form_equals_the_generic_path(temperature, masked):
    """The main loss takes a closed-form gradient when the teacher is frozen; the generic path (teacher logits that
    require a gradient) must give the same value and the same student gradient."""
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    if masked:
        teacher[0, 0, 2] = -math.inf  # a masked entry: exactly 0, never NaN
    student = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3
    grads, values = [], []
    for frozen in (True, False):
        s = student.clone().requires_grad_()
        t = teacher.clone().requires_grad_(not frozen)
        loss = token_divergence(t, s, mask, temperature=temperature, compute_dtype=torch.float64)
        loss.backward()
        values.append(loss.item())
        grads.append(s.grad)
    assert values[0] == pytest.approx(values[1], rel=1e-12) and torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_kl_in_closed_form_equals_the_generic_path_on_what_training_feeds_it(chunk_size, dtype):
    """The closed form is the path every stage-2 step takes: the same value and student gradient as the generic
    path with chunks, bf16 logits, padded vocabulary columns and garbage (NaN) outside the mask."""
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(3, 6, 12, generator=g)
    student = torch.randn(3, 6, 12, generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.3
    mask[0, 0] = True
    teacher[0, 0, 2] = -math.inf  # a token the teacher rules out
    teacher[..., 11] = student[..., 11] = math.nan  # a padded column beyond vocab_size
    teacher[~mask] = student[~mask] = math.nan  # positions that do not count
    grads, values = [], []
    for frozen in (True, False):
        s = student.to(dtype).requires_grad_()
        t = teacher.to(dtype).requires_grad_(not frozen)
        loss = token_divergence(t, s, mask, temperature=0.7, vocab_size=11, chunk_size=chunk_size)
        loss.backward()
        values.append(loss.item())
        grads.append(s.grad.float())
    assert math.isfinite(values[0]) and values[0] == pytest.approx(values[1], rel=1e-6)
    assert torch.isfinite(grads[0][mask][..., :11]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6, equal_nan=True)


def masked_kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``_kl_rows``' masked formula, written out: what its shortcut must reproduce bit for bit."""
    support = log_p > -math.inf
    log_p = torch.where(support, log_p, 0.0)
    log_q = torch.where(support, log_q, 0.0)
    terms = torch.where(support, log_p.exp(), 0.0) * (log_p - log_q)
    return torch.where(support & (log_q == -math.inf), math.inf, terms).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["finite", "q has zeros", "q has NaN", "strided", "column-major", "mixed layouts",
                                  "mixed dtypes", "p has zeros"])
def test_kl_rows_shortcut_gives_the_bits_of_the_masked_formula(dtype, case):
    """Without autograd, with every p > 0 and both sides laid out alike, ``_kl_rows`` skips its masks; it must give
    exactly the masked formula's values in every case, also where the +inf convention for q = 0 applies."""
    g = torch.Generator().manual_seed(5)
    log_p = torch.log_softmax(torch.randn(37, 300, generator=g, dtype=torch.float64) * 6, -1).to(dtype)
    log_q = torch.log_softmax(torch.randn(37, 300, generator=g, dtype=torch.float64) * 6, -1).to(dtype)
    if case in ("q has zeros", "strided", "column-major", "mixed layouts"):
        log_q[3, :7] = -math.inf
    if case == "q has NaN":
        log_q[4, 9] = math.nan
    if case == "p has zeros":
        log_p[2, 5] = -math.inf
    if case == "strided":
        log_p, log_q = log_p[:, ::3], log_q[:, ::3]
    if case == "column-major":
        log_p, log_q = log_p.t().contiguous().t(), log_q.t().contiguous().t()
    if case == "mixed layouts":
        log_q = log_q.t().contiguous().t()
    if case == "mixed dtypes":
        log_q = log_q.to(torch.float64 if dtype != torch.float64 else torch.float32)
    reference = masked_kl_rows(log_p, log_q)
    for got in (_kl_rows(log_p, log_q), _kl_rows(log_p, log_q, log_p.exp())):
        assert got.dtype == reference.dtype and torch.equal(got.isnan(), reference.isnan())
        assert torch.equal(float_bits(got.nan_to_num()), float_bits(reference.nan_to_num()))
    if case == "q has zeros":
        assert reference[3] == math.inf
