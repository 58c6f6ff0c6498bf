"""Sequence-level divergences, checked exactly against tiny autoregressive "table models".

Vocabulary {0, 1, 2} plus EOS = 3, responses of at most 4 tokens (EOS counts as a token; 4 tokens
without EOS is a truncated outcome). Every (prompt, prefix) has its own random softmax table, so the
whole response space (1 + 3 + 9 + 27 = 40 EOS-terminated outcomes + 81 truncated ones = 121 per
prompt) can be enumerated and the true sequence-level divergences computed by brute force. The Monte
Carlo estimators of :mod:`teacherhack.divergences` must then land within 4 standard errors of the truth.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from teacherhack.divergences import (
    Estimate,
    FrozenP,
    combine_jsd,
    entropy_values,
    kl_values,
    nll_values,
    response_mask,
    sequence_jsd,
    sequence_kl,
    sequence_logprob,
)

V = 4  # tokens 0, 1, 2 and EOS
EOS = 3
L = 4  # maximum response length (EOS included)
PAD = 0  # padding after EOS: a *real* token id, so that counting it would change the results
BASE = 4
N_CODES = 64  # prefixes y<t (t <= 3) over {0,1,2}, encoded as sum_i (y_i + 1) * 4**i  (max 3*21 = 63)
N_OUTCOMES = 121


class TableModel:
    """p(y_t | x, y<t) = softmax(sharpness * N(0, 1)) drawn once per (prompt, prefix)."""

    def __init__(self, n_prompts: int, seed: int, sharpness: float = 1.0, *, base: "TableModel | None" = None,
                 noise: float = 0.0, garbage_after_eos: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        logits = sharpness * torch.randn(n_prompts, N_CODES, V, generator=g, dtype=torch.float64)
        if base is not None:  # a perturbed copy of another model (a "student" close to its "teacher")
            logits = base.table + noise * logits
        self.table = torch.log_softmax(logits, dim=-1)
        self.garbage_after_eos = garbage_after_eos

    @staticmethod
    def prefix_codes(responses: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L]: the code of y<t at each t (after an EOS the code is meaningless)."""
        digits = (responses.clamp(0, EOS - 1) + 1) * BASE ** torch.arange(L)
        return digits.cumsum(-1) - digits

    def next_token_logprobs(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        out = self.table[prompts[:, None], self.prefix_codes(responses)]  # [B, L, V]
        if self.garbage_after_eos:  # entries after the first EOS may hold anything: make it NaN
            after = (responses == EOS).long().cumsum(-1) - (responses == EOS).long() > 0
            out = out.masked_fill(after[..., None], math.nan)
        return out

    def sample(self, prompts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = prompts.shape[0]
        responses = torch.full((n, L), PAD, dtype=torch.long)
        alive = torch.ones(n, dtype=torch.bool)
        code = torch.zeros(n, dtype=torch.long)
        for t in range(L):
            probs = self.table[prompts, code].exp()
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            responses[:, t] = torch.where(alive, tok, PAD)
            alive &= tok != EOS
            code = code + (tok.clamp_max(EOS - 1) + 1) * BASE**t
        return responses


def all_outcomes() -> tuple[torch.Tensor, torch.Tensor]:
    """Every response: [121, L] (padded with PAD after EOS) and their lengths |y| (EOS included)."""
    rows, lengths = [], []
    for n in range(L):  # n tokens, then EOS
        for body in itertools.product(range(EOS), repeat=n):
            rows.append(list(body) + [EOS] + [PAD] * (L - n - 1))
            lengths.append(n + 1)
    for body in itertools.product(range(EOS), repeat=L):  # truncated: no EOS
        rows.append(list(body))
        lengths.append(L)
    return torch.tensor(rows), torch.tensor(lengths, dtype=torch.float64)


def brute_logprob(model: TableModel, prompt: int, outcomes: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """log p(y|x) of every outcome by walking the table explicitly (independent of the library)."""
    out = torch.zeros(outcomes.shape[0], dtype=torch.float64)
    for i, (row, n) in enumerate(zip(outcomes.tolist(), lengths.long().tolist())):
        code = 0
        for t in range(n):
            out[i] += model.table[prompt, code, row[t]]
            code += (row[t] + 1) * BASE**t
    return out


def log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    return torch.log(w * log_a.exp() + (1 - w) * log_b.exp())


def truths(p: TableModel, q: TableModel, n_prompts: int) -> dict[str, float]:
    """Exact sequence-level quantities, averaged uniformly over prompts."""
    outcomes, lengths = all_outcomes()
    acc: dict[str, float] = {}
    for prompt in range(n_prompts):
        lp, lq = brute_logprob(p, prompt, outcomes, lengths), brute_logprob(q, prompt, outcomes, lengths)
        pp, qq = lp.exp(), lq.exp()
        assert abs(float(pp.sum()) - 1.0) < 1e-12 and abs(float(qq.sum()) - 1.0) < 1e-12
        vals = {
            "kl_pq": (pp * (lp - lq)).sum(),
            "kl_qp": (qq * (lq - lp)).sum(),
            "kl_pq_tok": (pp * (lp - lq) / lengths).sum(),
            "kl_qp_tok": (qq * (lq - lp) / lengths).sum(),
        }
        for beta in (0.5, 0.3):
            lm = log_mix(lp, lq, beta)
            vals[f"jsd{beta}"] = beta * (pp * (lp - lm)).sum() + (1 - beta) * (qq * (lq - lm)).sum()
            vals[f"jsd{beta}_tok"] = (beta * (pp * (lp - lm) / lengths).sum()
                                      + (1 - beta) * (qq * (lq - lm) / lengths).sum())
        for k, v in vals.items():
            acc[k] = acc.get(k, 0.0) + float(v) / n_prompts
    return acc


N_PROMPTS = 3
N_SAMPLES = 3000  # per model, split evenly over the prompts

# (seed, sharpness of p, how q is built): independent tables, or a perturbation of p's table
PAIRS = [
    pytest.param(0, 1.0, ("independent", 1.0), id="indep-s1"),
    pytest.param(1, 2.0, ("independent", 0.5), id="indep-sharp-p"),
    pytest.param(2, 1.5, ("perturbed", 0.3), id="perturbed-0.3"),
    pytest.param(3, 0.5, ("perturbed", 1.0), id="perturbed-flat"),
]


def make_pair(seed: int, sharpness: float, how: tuple[str, float]) -> tuple[TableModel, TableModel]:
    p = TableModel(N_PROMPTS, seed=1000 + seed, sharpness=sharpness)
    kind, scale = how
    if kind == "independent":
        q = TableModel(N_PROMPTS, seed=2000 + seed, sharpness=scale)
    else:
        q = TableModel(N_PROMPTS, seed=3000 + seed, base=p, noise=scale)
    return p, q


def within(est: Estimate, truth: float, k: float = 4.0) -> bool:
    return abs(est.mean - truth) <= k * est.se


def draw(model: TableModel, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = torch.arange(N_PROMPTS).repeat_interleave(N_SAMPLES // N_PROMPTS)
    return prompts, model.sample(prompts, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# The table model itself
# --------------------------------------------------------------------------------------------------


def test_outcome_space_and_sampler_match_enumeration():
    outcomes, lengths = all_outcomes()
    assert outcomes.shape == (N_OUTCOMES, L) and len({tuple(r) for r in outcomes.tolist()}) == N_OUTCOMES
    p = TableModel(N_PROMPTS, seed=7, sharpness=1.0)
    # the vectorised scorer agrees with the explicit walk, padding after EOS excluded
    mask = response_mask(outcomes, EOS)
    assert torch.equal(mask.sum(-1).double(), lengths)
    for prompt in range(N_PROMPTS):
        scored = sequence_logprob(p.next_token_logprobs(torch.full((N_OUTCOMES,), prompt), outcomes), outcomes, mask)
        torch.testing.assert_close(scored, brute_logprob(p, prompt, outcomes, lengths), rtol=0, atol=1e-12)
    # empirical frequencies of the sampler match the enumerated probabilities (chi-square-ish bound)
    prompts = torch.zeros(20000, dtype=torch.long)
    samples = p.sample(prompts, torch.Generator().manual_seed(0))
    after_eos = (samples == EOS).long().cumsum(-1) - (samples == EOS).long() > 0
    assert after_eos.any() and (samples[after_eos] == PAD).all()  # padded with PAD after the first EOS
    index = {tuple(r): i for i, r in enumerate(outcomes.tolist())}
    counts = torch.bincount(torch.tensor([index[tuple(r)] for r in samples.tolist()]), minlength=N_OUTCOMES)
    probs = brute_logprob(p, 0, outcomes, lengths).exp()
    se = (probs * (1 - probs) / 20000).sqrt()
    assert ((counts / 20000 - probs).abs() <= 5 * se + 1e-4).all()


# --------------------------------------------------------------------------------------------------
# Estimators against the exact truth
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample_seed", [0, 1])
@pytest.mark.parametrize("seed,sharpness,how", PAIRS)
def test_estimators_within_4_se_of_truth(seed, sharpness, how, sample_seed):
    p, q = make_pair(seed, sharpness, how)
    truth = truths(p, q, N_PROMPTS)
    prompts_p, samples_p = draw(p, seed=10 + seed + 100 * sample_seed)
    prompts_q, samples_q = draw(q, seed=20 + seed + 100 * sample_seed)

    checks: dict[str, tuple[Estimate, float]] = {}
    for est in ("token_kl", "log_ratio"):
        checks[f"KL(p|q) {est}"] = (sequence_kl(p, q, prompts_p, samples_p, eos_id=EOS, estimator=est), truth["kl_pq"])
        checks[f"KL(q|p) {est}"] = (sequence_kl(q, p, prompts_q, samples_q, eos_id=EOS, estimator=est), truth["kl_qp"])
    checks["KL(p|q) per-token"] = (sequence_kl(p, q, prompts_p, samples_p, eos_id=EOS, estimator="log_ratio",
                                               per_token=True), truth["kl_pq_tok"])
    checks["KL(q|p) per-token"] = (sequence_kl(q, p, prompts_q, samples_q, eos_id=EOS, estimator="log_ratio",
                                               per_token=True), truth["kl_qp_tok"])
    for beta in (0.5, 0.3):
        checks[f"JSD({beta})"] = (sequence_jsd(p, q, prompts_p, samples_p, prompts_q, samples_q, eos_id=EOS,
                                               beta=beta), truth[f"jsd{beta}"])
        checks[f"JSD({beta}) per-token"] = (sequence_jsd(p, q, prompts_p, samples_p, prompts_q, samples_q,
                                                         eos_id=EOS, beta=beta, per_token=True), truth[f"jsd{beta}_tok"])
    failures = []
    for name, (est, value) in checks.items():
        assert est.n >= 2000 and math.isfinite(est.mean) and est.se > 0
        if not within(est, value):
            failures.append(f"{name}: {est.mean:.5f} ± {est.se:.5f} vs truth {value:.5f}")
    assert not failures, failures
    # the truths are not degenerate, and the reverse direction really is a different number
    assert truth["kl_pq"] > 0.05 and abs(truth["kl_pq"] - truth["kl_qp"]) > 1e-3


@pytest.mark.parametrize("seed,sharpness,how", PAIRS)
def test_token_kl_has_smaller_standard_error_than_log_ratio(seed, sharpness, how):
    p, q = make_pair(seed, sharpness, how)
    prompts, samples = draw(p, seed=30 + seed)
    tk = sequence_kl(p, q, prompts, samples, eos_id=EOS, estimator="token_kl")
    lr = sequence_kl(p, q, prompts, samples, eos_id=EOS, estimator="log_ratio")
    print(f"\n[SE ratio] pair={seed} sharpness={sharpness} q={how}: se(token_kl)/se(log_ratio) = "
          f"{tk.se:.5f}/{lr.se:.5f} = {tk.se / lr.se:.3f}")
    assert tk.se < lr.se
    # same samples: the per-sample difference has mean zero (both unbiased for the same quantity)
    diff = Estimate.of(tk.values - lr.values)
    assert abs(diff.mean) <= 4 * diff.se


def test_token_kl_expectation_equals_truth_exactly():
    """Not just statistically: the exact expectation over the enumerated outcome space of both
    single-draw estimators equals the true sequence KL (the Rao-Blackwellisation is exact)."""
    p, q = make_pair(0, 1.0, ("independent", 1.0))
    truth = truths(p, q, N_PROMPTS)
    outcomes, lengths = all_outcomes()
    mask = response_mask(outcomes, EOS)
    for per_token in (False, True):
        for est in ("token_kl", "log_ratio"):
            if per_token and est == "token_kl":
                continue  # not unbiased per token, see the next test
            total = 0.0
            for prompt in range(N_PROMPTS):
                prompts = torch.full((N_OUTCOMES,), prompt)
                lp = p.next_token_logprobs(prompts, outcomes)
                weights = sequence_logprob(lp, outcomes, mask).exp()
                vals = kl_values(lp, q.next_token_logprobs(prompts, outcomes), outcomes, mask,
                                 estimator=est, per_token=per_token)
                total += float((weights * vals.double()).sum()) / N_PROMPTS
            target = truth["kl_pq_tok" if per_token else "kl_pq"]
            assert total == pytest.approx(target, rel=1e-6, abs=1e-7), (est, per_token)


def test_a_frozen_p_gives_the_same_kls_and_entropies_as_the_full_formulas():
    """FrozenP (p's side computed once, then one product per q) against kl_values / entropy_values: exact
    expectation over the enumerated outcomes, and the conventions where a token has probability 0 under p, q or
    both (0·log 0 = 0, p > 0 = q gives +inf)."""
    p, q = make_pair(0, 1.0, ("independent", 1.0))
    truth = truths(p, q, N_PROMPTS)
    outcomes, _ = all_outcomes()
    mask = response_mask(outcomes, EOS)
    for est, per_token in (("token_kl", False), ("log_ratio", False), ("log_ratio", True)):
        total = 0.0
        for prompt in range(N_PROMPTS):
            prompts = torch.full((N_OUTCOMES,), prompt)
            lp, lq = p.next_token_logprobs(prompts, outcomes), q.next_token_logprobs(prompts, outcomes)
            frozen = FrozenP.of(lp, mask)
            fast = frozen.kl_values(lq, outcomes, estimator=est, per_token=per_token)
            torch.testing.assert_close(fast, kl_values(lp, lq, outcomes, mask, estimator=est, per_token=per_token),
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(frozen.entropy_values(), entropy_values(lp, mask), rtol=0, atol=0)
            total += float((sequence_logprob(lp, outcomes, mask).exp() * fast.double()).sum()) / N_PROMPTS
        assert total == pytest.approx(truth["kl_pq_tok" if per_token else "kl_pq"], rel=1e-5, abs=1e-6)
    # zero probabilities: token 0 impossible under p everywhere, token 1 under q on the first row only, token 2
    # under both on the second row
    lp, lq = torch.log_softmax(torch.randn(2, 3, V), -1), torch.log_softmax(torch.randn(2, 3, V), -1)
    lp[..., 0] = -math.inf
    lq[0, :, 1] = -math.inf
    lp[1, :, 2] = lq[1, :, 2] = -math.inf
    lp, lq = lp - lp.logsumexp(-1, keepdim=True), lq - lq.logsumexp(-1, keepdim=True)
    responses, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    fast = FrozenP.of(lp, mask).kl_values(lq, responses)
    assert fast[0] == math.inf and math.isfinite(fast[1])
    torch.testing.assert_close(fast, kl_values(lp, lq, responses, mask))
    brute = -(lp.exp() * lp).nan_to_num(0.0).sum(-1).sum(-1).double()
    torch.testing.assert_close(FrozenP.of(lp, mask).entropy_values(), brute)
    torch.testing.assert_close(entropy_values(lp, mask), brute)


def test_a_nan_in_p_gives_a_nan_kl_for_its_sample_not_a_zero_term():
    """The golden and proxy metrics: a NaN in the oracle's (or teacher's) log-probabilities is a broken model, so
    the sample's KL is NaN, never the KL of a p that gives that token probability 0; the other samples keep theirs."""
    torch.manual_seed(0)
    lp, lq = torch.log_softmax(torch.randn(2, 3, V), -1), torch.log_softmax(torch.randn(2, 3, V), -1)
    responses, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    clean = kl_values(lp, lq, responses, mask)
    lp[0, 1, 2] = math.nan
    for values in (kl_values(lp, lq, responses, mask), FrozenP.of(lp, mask).kl_values(lq, responses)):
        assert math.isnan(values[0]) and values[1] == clean[1]


def test_token_kl_per_token_is_rejected_because_it_would_be_biased():
    """Σ_t KL_t / |y| does not have expectation E_p[(log p(y) − log q(y)) / |y|]: |y| depends on tokens
    sampled after t. Show the bias exactly, and that the library refuses the combination."""
    p, q = make_pair(0, 1.0, ("independent", 1.0))
    truth = truths(p, q, N_PROMPTS)["kl_pq_tok"]
    outcomes, lengths = all_outcomes()
    biased = 0.0
    for prompt in range(N_PROMPTS):
        lp = p.next_token_logprobs(torch.full((N_OUTCOMES,), prompt), outcomes)
        lq = q.next_token_logprobs(torch.full((N_OUTCOMES,), prompt), outcomes)
        weight = brute_logprob(p, prompt, outcomes, lengths).exp()
        mask = response_mask(outcomes, EOS)
        token_kls = torch.where(mask, (lp.exp() * (lp - lq)).nan_to_num(0.0).sum(-1), 0.0)
        biased += float((weight * token_kls.sum(-1) / lengths).sum()) / N_PROMPTS
    assert abs(biased - truth) > 1e-3  # a real, visible bias
    prompts, samples = draw(p, seed=0)
    with pytest.raises(ValueError, match="per-token values need estimator='log_ratio'"):
        sequence_kl(p, q, prompts, samples, eos_id=EOS, estimator="token_kl", per_token=True)


def test_padding_after_eos_is_excluded_and_garbage_ignored():
    """PAD after EOS is a real token id and the models put NaN there: the estimates are unaffected
    and equal those computed on outcomes padded differently."""
    p, q = make_pair(2, 1.5, ("perturbed", 0.3))
    prompts, samples = draw(p, seed=5)
    mask = response_mask(samples, EOS)
    repadded = torch.where(mask, samples, 2)
    for est in ("token_kl", "log_ratio"):
        a = sequence_kl(p, q, prompts, samples, eos_id=EOS, estimator=est)
        b = sequence_kl(p, q, prompts, repadded, eos_id=EOS, estimator=est)
        assert math.isfinite(a.mean) and torch.equal(a.values, b.values)
    a = sequence_jsd(p, q, prompts, samples, prompts, samples, eos_id=EOS)
    b = sequence_jsd(p, q, prompts, repadded, prompts, repadded, eos_id=EOS)
    assert math.isfinite(a.mean) and a.mean == b.mean


def test_identical_models_give_zero():
    p = TableModel(N_PROMPTS, seed=3, sharpness=1.0)
    prompts, samples = draw(p, seed=1)
    for est in ("token_kl", "log_ratio"):
        e = sequence_kl(p, p, prompts, samples, eos_id=EOS, estimator=est)
        assert e.mean == 0.0 and e.se == 0.0
    e = sequence_jsd(p, p, prompts, samples, prompts, samples, eos_id=EOS, beta=0.3)
    assert abs(e.mean) < 1e-12


# --------------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------------


def test_response_mask():
    responses = torch.tensor([
        [1, EOS, 0, 0],      # EOS then padding (padding id 0 is a real token)
        [EOS, EOS, 2, EOS],  # first EOS only
        [0, 1, 2, 0],        # no EOS: truncated, fully counted
        [2, 1, 0, EOS],      # EOS at the last position
    ])
    expected = torch.tensor([
        [True, True, False, False],
        [True, False, False, False],
        [True, True, True, True],
        [True, True, True, True],
    ])
    mask = response_mask(responses, EOS)
    assert mask.dtype == torch.bool and torch.equal(mask, expected)


def test_estimate_of():
    e = Estimate.of(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert e.n == 4 and e.mean == 2.5
    assert e.se == pytest.approx(math.sqrt(((1.5**2 + 0.5**2) * 2) / 3) / 2, rel=1e-12)
    assert e.to_dict() == {"mean": 2.5, "se": e.se, "n": 4}
    one = Estimate.of(torch.tensor([3.0]))
    assert one.n == 1 and one.mean == 3.0 and math.isnan(one.se)
    with pytest.raises(ValueError):
        Estimate.of(torch.empty(0))
    # 2-D input is flattened, low precision upcast
    e2 = Estimate.of(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16))
    assert e2.n == 4 and e2.mean == 2.5


def test_combine_jsd():
    a = Estimate.of(torch.tensor([1.0, 2.0, 3.0]))
    b = Estimate.of(torch.tensor([0.0, 4.0]))
    c = combine_jsd(a, b, 0.3)
    assert c.mean == pytest.approx(0.3 * 2.0 + 0.7 * 2.0)
    assert c.se == pytest.approx(math.sqrt((0.3 * a.se) ** 2 + (0.7 * b.se) ** 2))
    assert c.n == 5


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5])
def test_sequence_jsd_rejects_endpoints(beta):
    p, q = make_pair(0, 1.0, ("independent", 1.0))
    prompts, samples = draw(p, seed=0)
    with pytest.raises(ValueError):
        sequence_jsd(p, q, prompts, samples, prompts, samples, eos_id=EOS, beta=beta)


def test_unknown_estimator():
    p, q = make_pair(0, 1.0, ("independent", 1.0))
    prompts, samples = draw(p, seed=0)
    with pytest.raises(ValueError):
        sequence_kl(p, q, prompts, samples, eos_id=EOS, estimator="k3")


# --------------------------------------------------------------------------------------------------
# Likelihoods and entropy: what the evaluation adds beside the KLs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,sharpness,how", PAIRS)
def test_cross_entropy_and_entropy_estimates_within_4_se_of_truth(seed, sharpness, how):
    """On samples of p: mean −log q(y) is the cross-entropy H(p, q) = KL(p‖q) + H(p); on samples of q, the summed
    token entropies estimate H(q). Both exactly, by enumeration."""
    p, q = make_pair(seed, sharpness, how)
    outcomes, lengths = all_outcomes()
    cross, entropy_q = 0.0, 0.0
    for prompt in range(N_PROMPTS):
        lp, lq = brute_logprob(p, prompt, outcomes, lengths), brute_logprob(q, prompt, outcomes, lengths)
        cross += float(-(lp.exp() * lq).sum()) / N_PROMPTS
        entropy_q += float(-(lq.exp() * lq).sum()) / N_PROMPTS
    prompts_p, samples_p = draw(p, seed=40 + seed)
    mask = response_mask(samples_p, EOS)
    nll = Estimate.of(nll_values(q.next_token_logprobs(prompts_p, samples_p), samples_p, mask))
    assert within(nll, cross) and nll.se > 0
    prompts_q, samples_q = draw(q, seed=50 + seed)
    entropy = Estimate.of(entropy_values(q.next_token_logprobs(prompts_q, samples_q), response_mask(samples_q, EOS)))
    assert within(entropy, entropy_q) and entropy.se > 0


@pytest.mark.parametrize("seed,sharpness,how", PAIRS)
def test_changes_of_the_nll_on_reference_samples_are_changes_of_the_golden_metric(seed, sharpness, how):
    """Between two students q1, q2 scored on the same samples of p: per sample, the change of −log q(y) equals the
    change of the log-ratio KL estimate exactly (log p(y) cancels), and the change of the mean agrees with the
    token_kl estimate's change within its paired standard error."""
    p, q1 = make_pair(seed, sharpness, how)
    q2 = TableModel(N_PROMPTS, seed=4000 + seed, base=q1, noise=0.5)
    prompts, samples = draw(p, seed=60 + seed)
    mask = response_mask(samples, EOS)
    lp = p.next_token_logprobs(prompts, samples)
    logs = [q.next_token_logprobs(prompts, samples) for q in (q1, q2)]
    nll = [nll_values(lq, samples, mask) for lq in logs]
    ratio = [kl_values(lp, lq, samples, mask, estimator="log_ratio") for lq in logs]
    token = [kl_values(lp, lq, samples, mask, estimator="token_kl") for lq in logs]
    torch.testing.assert_close(nll[1] - nll[0], ratio[1] - ratio[0], rtol=0, atol=1e-5)  # float32 rounding
    change = Estimate.of((nll[1] - nll[0]) - (token[1] - token[0]))
    assert abs(change.mean) <= 4 * change.se and change.se > 0
    truth = truths(p, q2, N_PROMPTS)["kl_pq"] - truths(p, q1, N_PROMPTS)["kl_pq"]
    assert within(Estimate.of(nll[1] - nll[0]), truth)
