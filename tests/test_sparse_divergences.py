"""``sparse_token_divergence`` (top-k teacher signals) against a float64 brute-force reference.

The reference loops over positions and builds the categories by hand: the k stored tokens plus, for the
"tail" convention, one bucket whose student mass is the explicit sum of the student's probabilities of every
other token; the divergences are written on probability vectors from their definitions. It shares no code
with :mod:`teacherhack.divergences`. The top-k signals are built here from teacher logits with plain torch.
"""

from __future__ import annotations

import math

import pytest
import torch

from teacherhack.divergences import sparse_token_divergence, token_divergence

from conftest import CONFIG_IDS, CONFIGS, F32, F32_GRAD, F64, F64_GRAD, INF, REDUCTIONS  # noqa: E402
CONVENTIONS = ["tail", "renormalized"]


# --------------------------------------------------------------------------------------------------
# The independent reference
# --------------------------------------------------------------------------------------------------


def ref_log(m: torch.Tensor) -> torch.Tensor:
    pos = m > 0
    return torch.where(pos, torch.log(torch.where(pos, m, 1.0)), -INF)


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ p·log(p/q) over p > 0 (0·log 0 = 0); p > 0 = q gives +inf."""
    pos = p > 0
    safe_p, safe_q = torch.where(pos, p, 1.0), torch.where(pos, q, 1.0)  # no 0·inf in the unused branch
    return torch.where(pos, p * (ref_log(safe_p) - ref_log(safe_q)), 0.0).sum()


def ref_divergence(p: torch.Tensor, q: torch.Tensor, divergence: str, beta: float, alpha: float) -> torch.Tensor:
    if divergence == "forward_kl":
        return ref_kl(p, q)
    if divergence == "reverse_kl":
        return ref_kl(q, p)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if divergence == "skew_forward_kl":
        return ref_kl(p, alpha * p + (1 - alpha) * q)
    if divergence == "skew_reverse_kl":
        return ref_kl(q, alpha * q + (1 - alpha) * p)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum()
    raise AssertionError(divergence)


def ref_softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max().detach())
    return e / e.sum()


def ref_position(ids, lp, tail, s, *, divergence, beta, alpha, temperature, convention) -> torch.Tensor:
    """One position: explicit categories, explicit probabilities."""
    q_full = ref_softmax(s.to(torch.float64) / temperature)
    chosen = [int(v) for v in ids]
    others = [v for v in range(s.shape[-1]) if v not in chosen]
    p_top = torch.exp(lp.to(torch.float64))
    q_top = torch.stack([q_full[v] for v in chosen])
    if convention == "tail":
        p = torch.cat([p_top, tail.to(torch.float64).clamp_min(0).reshape(1)])
        q_rest = torch.stack([q_full[v] for v in others]).sum() if others else torch.zeros((), dtype=torch.float64)
        q = torch.cat([q_top, q_rest.reshape(1)])
    else:
        p, q = p_top, q_top
    return ref_divergence(p / p.sum(), q / q.sum(), divergence, beta, alpha)


def ref_loss(ids, lp, tail, s, mask, *, divergence="forward_kl", beta=0.5, alpha=0.1, temperature=1.0,
             convention="tail", reduction="sequence_mean", denominator=None) -> torch.Tensor:
    """Explicit loops over sequences and positions; only masked-in positions are touched."""
    total = torch.zeros((), dtype=torch.float64)
    n_seq = n_tok = 0
    for b in range(mask.shape[0]):
        seq, n = torch.zeros((), dtype=torch.float64), 0
        for t in range(mask.shape[1]):
            if mask[b, t]:
                seq = seq + ref_position(ids[b, t], lp[b, t], tail[b, t], s[b, t], divergence=divergence,
                                         beta=beta, alpha=alpha, temperature=temperature, convention=convention)
                n += 1
        n_tok += n
        if n:
            n_seq += 1
            total = total + (seq / n if reduction == "sequence_mean" else seq)
    if reduction == "sum":
        return total / (1.0 if denominator is None else denominator)
    default = n_seq if reduction == "sequence_mean" else n_tok
    return total / max(default if denominator is None else denominator, 1)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def make(B=3, T=5, V=11, scale=2.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t = (scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
    s = (scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
    lengths = [T, 2, 0, min(4, T), 1, min(3, T)][:B]  # one row empty, one full, right padding
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    return t, s, mask


def topk_signals(t: torch.Tensor, k: int, *, temperature: float = 1.0, dtype=torch.float64, shuffle: bool = False):
    """(ids, log-probs rounded to ``dtype``, tail in float64 before rounding) of log_softmax(t / τ)."""
    full = torch.log_softmax(t.to(torch.float64) / temperature, -1)
    lp, ids = full.topk(k, dim=-1)
    if shuffle:  # the order of the ids must not matter
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
        lp, ids = lp[..., perm], ids[..., perm]
    tail = full.exp().scatter(-1, ids, 0.0).sum(-1)  # the mass of the other tokens, summed explicitly
    return ids, lp.to(dtype), tail


def loss_and_grad(fn, s):
    s = s.detach().clone().requires_grad_(True)
    value = fn(s)
    (grad,) = torch.autograd.grad(value, [s])
    return value.detach(), grad


def single_position_values(fn, mask):
    """The per-position divergence of every masked-in position (reduction='sum' on a one-position mask)."""
    out = []
    for b, t in mask.nonzero().tolist():
        one = torch.zeros_like(mask)
        one[b, t] = True
        out.append(fn(one))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
# Values and gradients against the reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_matches_reference_float64(divergence, beta, alpha, reduction, temperature, convention):
    t, s, mask = make(seed=CONFIGS.index((divergence, beta, alpha)))
    ids, lp, tail = topk_signals(t, 4, temperature=temperature, dtype=torch.float16)  # rounded: renormalised
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, temperature=temperature, convention=convention,
              reduction=reduction)
    got, g = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, compute_dtype=torch.float64,
                                                             **kw), s)
    want, w = loss_and_grad(lambda s: ref_loss(ids, lp, tail, s, mask, **kw), s)
    assert got.dtype == torch.float64 and want > 0
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(g, w, **F64_GRAD)
    assert (g[~mask] == 0).all()


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_default_float32_path(divergence, beta, alpha, convention):
    t, s, mask = make(seed=3, dtype=torch.float32)
    ids, lp, tail = topk_signals(t, 3, temperature=0.8, dtype=torch.bfloat16)
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, temperature=0.8, convention=convention)
    got, g = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail.float(), s, mask, **kw), s)
    want, w = loss_and_grad(lambda s: ref_loss(ids, lp, tail, s, mask, **kw), s.double())
    assert got.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **F32)
    torch.testing.assert_close(g.double(), w, **F32_GRAD)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_gradcheck(divergence, beta, alpha, convention):
    t, s, mask = make(B=2, T=3, V=7, seed=5)
    ids, lp, tail = topk_signals(t, 3)
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, convention=convention, temperature=0.9,
              compute_dtype=torch.float64)
    fn = lambda s: sparse_token_divergence(ids, lp, tail, s, mask, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s.clone().requires_grad_(True),), eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradcheck(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, chunk_size=2, **kw),
                                    (s.clone().requires_grad_(True),), eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Edge cases: every token stored, one token stored, −inf logits, a tiny tail
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_every_token_stored_equals_the_full_divergence(divergence, beta, alpha, temperature, convention):
    t, s, mask = make(seed=7)
    V = t.shape[-1]
    ids, lp, tail = topk_signals(t, V, temperature=temperature, shuffle=True)
    assert (tail == 0).all()  # k = V: nothing outside
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, temperature=temperature, compute_dtype=torch.float64)
    got, g = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, convention=convention, **kw), s)
    want, w = loss_and_grad(lambda s: token_divergence(t, s, mask, **kw), s)
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(g, w, **F64_GRAD)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_k_equals_one(divergence, beta, alpha):
    t, s, mask = make(seed=9)
    ids, lp, tail = topk_signals(t, 1)
    kw = dict(divergence=divergence, beta=beta, alpha=alpha)
    got, g = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, compute_dtype=torch.float64,
                                                             **kw), s)
    want, w = loss_and_grad(lambda s: ref_loss(ids, lp, tail, s, mask, **kw), s)
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(g, w, **F64_GRAD)
    assert got > 0
    # renormalised over a single token both sides are certain of it: 0 (exactly for KL and TVD; the
    # mixtures round to within 1e-16), and no gradient at all
    got, g = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, convention="renormalized",
                                                             compute_dtype=torch.float64, **kw), s)
    assert abs(float(got)) <= 1e-16 and (g == 0).all()
    if divergence in ("forward_kl", "reverse_kl", "tvd"):
        assert got == 0


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_minus_inf_logits(divergence, beta, alpha, convention):
    t, s, mask = make(seed=13)
    V = t.shape[-1]
    t[..., 2:] = -INF  # the teacher gives only tokens 0 and 1 mass: k = 4 stores two −inf log-probs, tail 0
    s[..., 1] = -INF  # the student never says token 1 (inside the teacher's ids)
    s[..., 9] = -INF  # nor token 9 (outside them)
    ids, lp, tail = topk_signals(t, 4)
    assert (tail == 0).all() and torch.isinf(lp).any()
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, convention=convention)
    got, g = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, compute_dtype=torch.float64,
                                                             **kw), s)
    if divergence in ("forward_kl", "reverse_kl"):
        # the teacher's token 1 has student probability 0 (forward), the student's other tokens teacher
        # probability 0 (reverse): +inf, the true value (never NaN)
        assert got == INF and ref_loss(ids, lp, tail, s, mask, **kw) == INF
        return
    want, w = loss_and_grad(lambda s: ref_loss(ids, lp, tail, s, mask, **kw), s)
    torch.testing.assert_close(got, want, **F64)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, w, **F64_GRAD)
    assert (g[..., 1] == 0).all() and (g[..., 9] == 0).all()  # no gradient into a −inf logit
    # the student's bucket is −inf-free: it holds mass on tokens 2..8 and 10
    v32 = sparse_token_divergence(ids, lp.float(), tail.float(), s.float(), mask, **kw)
    torch.testing.assert_close(v32.double(), want, **F32)


@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_tiny_tail_is_stable(divergence, beta, alpha):
    """Teacher and student put ~1e-12 outside the ids: log(1 − Σ top-k) would cancel to log 0 (or NaN) in
    float32; the student's bucket is summed over the other tokens instead."""
    t, s, mask = make(seed=17)
    t[..., 3:] -= 30.0
    s = s.clone()
    s[..., 3:] -= 28.0
    ids, lp, tail = topk_signals(t, 3)
    assert (tail > 0).all() and (tail < 1e-9).all()
    kw = dict(divergence=divergence, beta=beta, alpha=alpha)
    want = ref_loss(ids, lp, tail, s, mask, **kw)
    for dtype, tol in ((torch.float64, F64), (torch.float32, dict(rtol=1e-4, atol=1e-6))):
        got, g = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, compute_dtype=dtype, **kw),
                               s.to(dtype))
        assert torch.isfinite(got) and torch.isfinite(g).all()
        torch.testing.assert_close(got.double(), want, **tol)


# --------------------------------------------------------------------------------------------------
# Data processing: the tail convention is a lower bound of the full divergence, renormalised is not
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_tail_convention_never_exceeds_the_full_divergence(divergence, beta, alpha):
    t, s, mask = make(B=4, T=6, V=13, seed=19, scale=1.5)
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, reduction="sum", compute_dtype=torch.float64)
    full = single_position_values(lambda m: token_divergence(t, s, m, **kw), mask)
    for k in (1, 2, 5, 12, 13):
        ids, lp, tail = topk_signals(t, k)
        sparse = single_position_values(lambda m: sparse_token_divergence(ids, lp, tail, s, m, **kw), mask)
        assert (sparse <= full * (1 + 1e-12) + 1e-15).all(), (k, (sparse - full).max())
        if k < 13:
            assert (sparse < full).any()  # and it is a strict loss of information somewhere
        else:
            torch.testing.assert_close(sparse, full, **F64)


def test_renormalized_can_exceed_the_full_forward_kl():
    # P = (.40, .25, .18, .17), Q = (.25, .40, .18, .17): the same mass outside the top 2, swapped inside
    p = torch.tensor([[[0.40, 0.25, 0.18, 0.17]]], dtype=torch.float64).log()
    q = torch.tensor([[[0.25, 0.40, 0.18, 0.17]]], dtype=torch.float64).log()
    mask = torch.ones(1, 1, dtype=torch.bool)
    ids, lp, tail = topk_signals(p, 2)
    kw = dict(compute_dtype=torch.float64)
    full = token_divergence(p, q, mask, **kw)
    renorm = sparse_token_divergence(ids, lp, tail, q, mask, convention="renormalized", **kw)
    with_tail = sparse_token_divergence(ids, lp, tail, q, mask, convention="tail", **kw)
    assert renorm > 1.5 * full and with_tail <= full  # 0.108 vs 0.070
    # at every position of random data where the student agrees with the teacher outside the top k and
    # spreads the same top-k mass differently inside: full KL = P(top k)·renormalised KL < renormalised KL
    t, _, mask = make(B=4, T=6, V=13, seed=23, scale=1.5)
    ids, lp, tail = topk_signals(t, 3)
    s = t.scatter(-1, ids, t.gather(-1, ids.roll(1, dims=-1)))  # the top-3 logits rotated among themselves
    kw = dict(reduction="sum", compute_dtype=torch.float64)
    full = single_position_values(lambda m: token_divergence(t, s, m, **kw), mask)
    renorm = single_position_values(lambda m: sparse_token_divergence(ids, lp, tail, s, m, convention="renormalized",
                                                                      **kw), mask)
    with_tail = single_position_values(lambda m: sparse_token_divergence(ids, lp, tail, s, m, **kw), mask)
    assert (full > 0).all() and (renorm > full).all() and (with_tail <= full * (1 + 1e-12)).all()


# --------------------------------------------------------------------------------------------------
# Masking, chunking, accumulation, vocabulary
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_masked_positions_contribute_nothing(divergence, beta, alpha, convention):
    t, s, mask = make(seed=29, dtype=torch.float32)
    ids, lp, tail = topk_signals(t, 4, dtype=torch.float16)
    tail = tail.float()
    for chunk in (None, 2):
        kw = dict(divergence=divergence, beta=beta, alpha=alpha, convention=convention, chunk_size=chunk)
        clean = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, **kw), s)
        ids_g, lp_g, tail_g, s_g = ids.clone(), lp.clone(), tail.clone(), s.clone()
        ids_g[~mask] = -7  # out of range: must not even be looked up
        lp_g[~mask] = math.nan
        tail_g[~mask] = math.nan
        s_g[~mask] = math.nan
        dirty = loss_and_grad(lambda s: sparse_token_divergence(ids_g, lp_g, tail_g, s, mask, **kw), s_g)
        assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])
        assert torch.isfinite(dirty[0]) and (dirty[1][~mask] == 0).all()


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_chunked_equals_unchunked(divergence, beta, alpha, convention):
    t, s, mask = make(B=4, T=7, seed=31)
    ids, lp, tail = topk_signals(t, 5)
    for reduction in REDUCTIONS:
        kw = dict(divergence=divergence, beta=beta, alpha=alpha, convention=convention, reduction=reduction,
                  compute_dtype=torch.float64)
        base = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, **kw), s)
        for chunk in (1, 3, 7, 12):
            got = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, chunk_size=chunk, **kw), s)
            torch.testing.assert_close(got[0], base[0], rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(got[1], base[1], rtol=1e-13, atol=1e-15)
    # bf16 student logits: the gradient comes back in bf16, identical chunked or not
    sb = s.bfloat16()
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, convention=convention)
    base = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, **kw), sb)
    got = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, chunk_size=2, **kw), sb)
    assert got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], base[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[1], base[1], rtol=0, atol=0)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_gradient_accumulation_denominator(reduction, convention):
    t, s, mask = make(B=6, T=5, seed=37)
    ids, lp, tail = topk_signals(t, 3)
    kw = dict(reduction=reduction, convention=convention, compute_dtype=torch.float64, divergence="jsd")
    big, g_big = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, **kw), s)
    torch.testing.assert_close(big, ref_loss(ids, lp, tail, s, mask, divergence="jsd", convention=convention,
                                             reduction=reduction), **F64)
    denominator = int((mask.sum(-1) > 0).sum()) if reduction == "sequence_mean" else int(mask.sum())
    total, grads = 0.0, []
    for sl in (slice(0, 2), slice(2, 3), slice(3, 6)):
        v, g = loss_and_grad(lambda s: sparse_token_divergence(ids[sl], lp[sl], tail[sl], s, mask[sl],
                                                               denominator=denominator, **kw), s[sl])
        total, grads = total + v, grads + [g]
    torch.testing.assert_close(total, big, rtol=1e-13, atol=0)
    torch.testing.assert_close(torch.cat(grads), g_big, rtol=1e-13, atol=0)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("pad_value", [0.0, 1e4, math.nan])
def test_vocab_size_ignores_padded_student_columns(pad_value, convention):
    t, s, mask = make(seed=41)
    V = t.shape[-1]
    ids, lp, tail = topk_signals(t, 4)
    s_pad = torch.cat([s, torch.full((*s.shape[:-1], 5), pad_value, dtype=s.dtype)], -1)
    kw = dict(convention=convention, divergence="skew_reverse_kl", compute_dtype=torch.float64)
    want, g = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, **kw), s)
    got, g_pad = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, mask, vocab_size=V, **kw), s_pad)
    assert torch.equal(got, want) and torch.equal(g_pad[..., :V], g) and (g_pad[..., V:] == 0).all()
    bad = ids.clone()
    bad[0, 0, 0] = V  # a padded column: a teacher from another tokenizer
    with pytest.raises(ValueError, match="ids must lie in"):
        sparse_token_divergence(bad, lp, tail, s_pad, mask, vocab_size=V, **kw)
    with pytest.raises(ValueError, match="vocab_size"):
        sparse_token_divergence(ids, lp, tail, s, mask, vocab_size=V + 1, **kw)


def test_empty_mask_gives_zero_not_nan():
    t, s, mask = make(seed=43)
    ids, lp, tail = topk_signals(t, 2)
    for convention in CONVENTIONS:
        for chunk in (None, 2):
            v, g = loss_and_grad(lambda s: sparse_token_divergence(ids, lp, tail, s, torch.zeros_like(mask),
                                                                   convention=convention, chunk_size=chunk), s)
            assert v == 0 and (g == 0).all()


# --------------------------------------------------------------------------------------------------
# Invalid arguments
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(divergence="kl"),
    dict(divergence="jsd", beta=1.5),
    dict(divergence="skew_forward_kl", alpha=1.0),
    dict(temperature=0.0),
    dict(convention="top"),
    dict(reduction="mean"),
    dict(chunk_size=0),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_invalid_arguments(kwargs):
    t, s, mask = make(seed=47)
    ids, lp, tail = topk_signals(t, 3)
    with pytest.raises(ValueError):
        sparse_token_divergence(ids, lp, tail, s, mask, **kwargs)


def test_bad_inputs():
    t, s, mask = make(seed=53)
    ids, lp, tail = topk_signals(t, 3)
    with pytest.raises(ValueError, match="tail"):
        sparse_token_divergence(ids, lp, None, s, mask)  # the tail convention needs it
    sparse_token_divergence(ids, lp, None, s, mask, convention="renormalized")  # renormalised does not
    with pytest.raises(ValueError, match="shape"):
        sparse_token_divergence(ids[:, :-1], lp[:, :-1], tail[:, :-1], s, mask)
    with pytest.raises(ValueError, match="shape"):
        sparse_token_divergence(ids, lp[..., :2], tail, s, mask)
    with pytest.raises(ValueError, match="shape"):
        sparse_token_divergence(ids, lp, tail[..., None], s, mask)
    with pytest.raises(ValueError, match="shape"):
        sparse_token_divergence(ids[0], lp[0], tail[0], s[0], mask[0])
    with pytest.raises(ValueError, match="integer"):
        sparse_token_divergence(ids.double(), lp, tail, s, mask)
    with pytest.raises(ValueError, match="ids must lie in"):
        sparse_token_divergence(ids - 1, lp, tail, s, mask)


@pytest.mark.parametrize("convention", ["tail", "renormalized"])
@pytest.mark.parametrize("divergence,beta,alpha", CONFIGS, ids=CONFIG_IDS)
def test_a_nan_teacher_log_prob_or_tail_makes_the_loss_nan(divergence, beta, alpha, convention):
    """A NaN in the stored top-k log-probs (or the tail) is a broken signal: the loss is NaN (training refuses
    it), not the loss of a teacher that gives that token probability 0."""
    torch.manual_seed(0)
    s = torch.randn(1, 3, 6)
    ids = torch.tensor([[[0, 1], [0, 1], [0, 1]]])
    log_p, tail = torch.log(torch.tensor([[[0.5, 0.3]] * 3])), torch.full((1, 3), 0.2)
    mask = torch.ones(1, 3, dtype=torch.bool)
    broken_log_p = log_p.clone()
    broken_log_p[0, 1, 0] = math.nan
    cases = [(broken_log_p, tail)] + ([(log_p, torch.tensor([[0.2, math.nan, 0.2]]))] if convention == "tail" else [])
    for teacher_log_p, teacher_tail in cases:
        loss = sparse_token_divergence(ids, teacher_log_p, teacher_tail, s, mask, divergence=divergence, beta=beta,
                                       alpha=alpha, convention=convention)
        assert torch.isnan(loss)
