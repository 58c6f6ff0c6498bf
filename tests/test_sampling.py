"""The sampler behind LM.sample (teacherhack.decoding): lean decoders against the Hugging Face forward,
the inverse-CDF draw, an exact goodness-of-fit test on a model whose sequence distribution is enumerable,
returned log-probabilities, and the fallback to the generic decoder. Transformers' deprecation warnings
are errors here: our calls must use the current cache API."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from teacherhack import decoding
from teacherhack.divergences import response_mask
from teacherhack.models import LM, build_model, collate_prompts

pytestmark = pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")

VOCAB, PAD, EOS = 50, 0, 1
PROMPTS = [[5, 6, 7, 8, 9, 3, 4], [10, 11], [12, 13, 14], [20]]  # left-padded: lengths 7, 2, 3, 1


def randomized(model: PreTrainedModel, scale: float, seed: int = 0) -> PreTrainedModel:
    """Every parameter redrawn with std ``scale``: far from the default init's nearly flat, position-blind
    outputs, which would hide position, padding and head-mapping bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def gpt2(**overrides) -> PreTrainedModel:
    config = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    return GPT2LMHeadModel(GPT2Config(**{**config, **overrides}))


def llama(**overrides) -> PreTrainedModel:
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=64, bos_token_id=EOS, eos_token_id=EOS,
                  pad_token_id=PAD)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides}))


LEAN = {
    "gpt2": lambda: gpt2(),
    "gpt2-inverse-layer-scaling": lambda: gpt2(scale_attn_by_inverse_layer_idx=True, activation_function="relu"),
    "llama": lambda: llama(),
    "llama-gqa-biases": lambda: llama(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "llama-gqa-head-dim": lambda: llama(num_key_value_heads=1, head_dim=16),
}


def with_head_hook(model: PreTrainedModel) -> PreTrainedModel:
    """A forward hook that changes the output (as an adapter or an instrumentation hook might)."""
    model.lm_head.register_forward_hook(lambda module, args, output: 1.5 * output)
    return model


class ScaledLinear(torch.nn.Linear):
    """A layer replaced in place (as LoRA or quantization do), with a different forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(x)


def with_replaced_layer(model: PreTrainedModel) -> PreTrainedModel:
    old = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = ScaledLinear(old.in_features, old.out_features, bias=False)
    return model


FALLBACK = {
    "llama-rope-scaling": lambda: llama(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "gpt2-other-activation": lambda: gpt2(activation_function="quick_gelu"),
    "gpt2-forward-hook": lambda: with_head_hook(gpt2()),
    "llama-replaced-layer": lambda: with_replaced_layer(llama()),
    "t5": lambda: build_model("t5", "s", vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, max_positions=64, seed=0),
}


def check_logprobs(lm: LM, atol: float, seed: int = 0) -> torch.Tensor:
    """Samples with log-probabilities and checks them against the full forward's at every response position
    up to each row's EOS; returns the responses."""
    prompts = collate_prompts(PROMPTS, PAD)
    responses, logprobs = lm.sample(prompts, max_new_tokens=12, generator=torch.Generator().manual_seed(seed),
                                    return_logprobs=True)
    with torch.no_grad():
        expected = lm.next_token_logprobs(prompts, responses)
    assert logprobs.dtype == torch.float32
    assert logprobs.shape == expected.shape == (len(PROMPTS), responses.shape[1], VOCAB)
    mask = response_mask(responses, EOS)
    assert mask.sum() > 20
    torch.testing.assert_close(logprobs[mask], expected[mask], atol=atol, rtol=0)
    return responses


@pytest.mark.parametrize("name", LEAN)
def test_lean_decoder_matches_the_full_forward(name, monkeypatch):
    """Log-probabilities of the lean decoder = the Hugging Face forward on the whole sequence, with left-padded
    prompts of different lengths, and the HF forward is never called while sampling."""
    model = randomized(LEAN[name](), 0.4).eval()
    lm = LM(model, pad_id=PAD, eos_id=EOS, temperature=0.8)
    assert decoding.lean_supported(model)
    with monkeypatch.context() as patch:
        patch.setattr(model, "forward", lambda *args, **kwargs: pytest.fail("the HF forward ran"))
        responses = lm.sample(collate_prompts(PROMPTS, PAD), max_new_tokens=12,
                              generator=torch.Generator().manual_seed(0))
    assert len({tuple(r) for r in responses.tolist()}) == len(PROMPTS)
    check_logprobs(lm, atol=1e-5)


@pytest.mark.parametrize("name", FALLBACK)
def test_other_models_take_the_generic_decoder_and_return_exact_logprobs(name):
    model = randomized(FALLBACK[name](), 0.4).eval()
    lm = LM(model, pad_id=PAD, eos_id=EOS, temperature=0.8)
    assert not decoding.lean_supported(model)
    prompts = collate_prompts(PROMPTS, PAD)
    assert isinstance(decoding.decoder_for(model, prompts.ids, prompts.mask, 4), decoding.HFDecoder)
    check_logprobs(lm, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-biases"])
def test_lean_decoder_reads_the_live_weights(name):
    """The student trains between samples: after an optimizer step the next sample follows the new weights."""
    model = randomized(LEAN[name](), 0.4).eval()  # eval: no dropout in the full forward either
    lm = LM(model, pad_id=PAD, eos_id=EOS)
    prompts = collate_prompts(PROMPTS, PAD)
    responses = check_logprobs(lm, atol=1e-5)
    with torch.no_grad():
        before = lm.next_token_logprobs(prompts, responses)
    (-lm.next_token_logprobs(prompts, responses)[..., 2].mean()).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert (lm.next_token_logprobs(prompts, responses) - before).abs().max() > 0.1  # the step mattered
    check_logprobs(lm, atol=1e-5)


def test_samples_are_the_inverse_cdf_of_the_generators_uniforms():
    """Step t of row b is the inverse CDF, under the model's distribution, of the generator's uniform
    u[t, b] (one float64 uniform per row and step, drawn [max_new_tokens, B] at once)."""
    lm = LM(randomized(gpt2(), 0.4).eval(), pad_id=PAD, eos_id=EOS)
    prompts = collate_prompts(PROMPTS, PAD)
    responses = lm.sample(prompts, max_new_tokens=10, generator=torch.Generator().manual_seed(5))
    uniforms = torch.rand(10, len(PROMPTS), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        probs = lm.next_token_logprobs(prompts, responses).exp()
    expected = torch.stack([decoding.inverse_cdf(probs[:, t], uniforms[t]) for t in range(responses.shape[1])], 1)
    mask = response_mask(responses, EOS)
    assert torch.equal(responses[mask], expected[mask])


def test_one_generator_per_row_draws_each_row_alone():
    """Given one generator per row, a row's response is the same whatever rows are sampled beside it (what makes the
    monitor's samples independent of its batch size)."""
    lm = LM(randomized(gpt2(), 0.4).eval(), pad_id=PAD, eos_id=EOS)
    prompts = collate_prompts(PROMPTS, PAD)
    together = lm.sample(prompts, max_new_tokens=10, generator=[torch.Generator().manual_seed(s) for s in range(4)])
    for row in range(4):
        alone = lm.sample(prompts[row:row + 1], max_new_tokens=10, generator=[torch.Generator().manual_seed(row)])
        assert torch.equal(alone[0], together[row, :alone.shape[1]]) and (together[row, alone.shape[1]:] == PAD).all()
    with pytest.raises(ValueError, match="3 generators for 4 rows"):
        lm.sample(prompts, max_new_tokens=2, generator=[torch.Generator()] * 3)


def test_inverse_cdf_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.5, 0.25, 0.0]]).repeat(6, 1)
    uniforms = torch.tensor([0.0, 0.2499, 0.25, 0.7499, 0.75, 1 - 2**-53], dtype=torch.float64)
    assert decoding.inverse_cdf(probs, uniforms).tolist() == [1, 1, 3, 3, 4, 4]
    # unnormalised rows are drawn in proportion; the largest uniform still stays below the total
    assert decoding.inverse_cdf(3 * probs[:2], uniforms[[0, 5]]).tolist() == [1, 4]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_model_with_non_finite_weights_is_refused_not_sampled(poison):
    """A diverged update leaves NaN or inf weights: their logits are no distribution, and inverse_cdf would return
    the vocabulary size, an id the next step cannot embed. Sampling stops with a user error that says why."""
    lm = LM(randomized(gpt2(), 0.3), pad_id=PAD, eos_id=EOS)
    with torch.no_grad():
        lm.model.lm_head.weight[3, 0] = poison  # one output row: every position's logits hold a NaN or inf
    with pytest.raises(decoding.NonFiniteLogits, match="not finite"):
        lm.sample(collate_prompts(PROMPTS, PAD), max_new_tokens=4, generator=torch.Generator().manual_seed(0))


def test_no_new_tokens():
    lm = LM(randomized(gpt2(), 0.4), pad_id=PAD, eos_id=EOS)
    out, logprobs = lm.sample(collate_prompts(PROMPTS, PAD), max_new_tokens=0, generator=torch.Generator(),
                              return_logprobs=True)
    assert out.shape == (4, 0) and logprobs.shape == (4, 0, VOCAB)


# --- exact goodness of fit -----------------------------------------------------------------------

SMALL_VOCAB, MAX_NEW, DRAWS = 4, 3, 20_000  # tokens 0 (= PAD, a token like any other), 1 (= EOS), 2, 3


def outcomes() -> list[tuple[int, ...]]:
    """Every response: ended by its first EOS within MAX_NEW tokens, or truncated at MAX_NEW (40 in all)."""
    other = [t for t in range(SMALL_VOCAB) if t != EOS]
    ended = [prefix + (EOS,) for n in range(MAX_NEW) for prefix in itertools.product(other, repeat=n)]
    return ended + list(itertools.product(other, repeat=MAX_NEW))


def exact_probabilities(lm: LM, prompt: list[int]) -> torch.Tensor:
    """P(response | prompt) of every outcome, from the full forward's next-token log-probabilities."""
    rows = outcomes()
    responses = torch.tensor([list(r) + [PAD] * (MAX_NEW - len(r)) for r in rows])
    prompts = collate_prompts([prompt] * len(rows), PAD)
    with torch.no_grad():
        logprobs = lm.next_token_logprobs(prompts, responses).double()
    token_logprobs = logprobs.gather(-1, responses[..., None]).squeeze(-1)
    return (token_logprobs * response_mask(responses, EOS)).sum(-1).exp()


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor, constraints: int) -> float:
    """Pearson's test, bins with an expected count under 5 pooled; the survival function of χ²(dof) is the
    regularized upper incomplete gamma Q(dof/2, stat/2)."""
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    expect = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = expect > 0
    stat = (((observed - expect) ** 2)[keep] / expect[keep]).sum()
    dof = int(keep.sum()) - constraints
    assert dof >= 60  # a real test: most of the 2 × 40 outcomes have their own bin
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def goodness_of_fit(lm: LM, *, temperature: float, seed: int) -> float:
    """p-value of DRAWS samples (half per prompt, two prompts of different lengths in one padded batch)
    against the exact distribution of the model at its own temperature."""
    two = [[2, 3, 2], [3]]
    prompts = collate_prompts([two[0]] * (DRAWS // 2) + [two[1]] * (DRAWS // 2), PAD)
    samples = lm.sample(prompts, max_new_tokens=MAX_NEW, generator=torch.Generator().manual_seed(seed),
                        temperature=temperature)
    index = {outcome: i for i, outcome in enumerate(outcomes())}
    counts = torch.zeros(2, len(index), dtype=torch.float64)
    for row, sample in enumerate(samples.tolist()):
        cut = sample.index(EOS) + 1 if EOS in sample else MAX_NEW
        counts[row // (DRAWS // 2), index[tuple(sample[:cut])]] += 1
    exact = torch.stack([exact_probabilities(lm, prompt) for prompt in two])
    torch.testing.assert_close(exact.sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    return chi_square_p_value(counts.flatten(), exact.flatten() * (DRAWS // 2), constraints=2)


def enumerable_lm(arch: str) -> LM:
    """Weights scaled so that all 40 outcomes get their own bin (expected count ≥ 5) and temperature × 1.3
    moves the distribution by a total variation of 0.04-0.16."""
    model = build_model(arch, "xxs", vocab_size=SMALL_VOCAB, pad_id=PAD, eos_id=EOS, max_positions=16, seed=0)
    scale = {"gpt2": 0.3, "llama": 0.3, "t5": 0.8}[arch]
    return LM(randomized(model, scale, seed=3).eval(), pad_id=PAD, eos_id=EOS, temperature=0.9)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_samples_fit_the_exact_sequence_distribution(arch):
    assert goodness_of_fit(enumerable_lm(arch), temperature=1.0, seed=11) > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_the_goodness_of_fit_test_rejects_a_wrong_sampler(arch):
    """The same test on samples drawn at 1.3 × the temperature it scores at: rejected."""
    assert goodness_of_fit(enumerable_lm(arch), temperature=1.3, seed=11) < 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_samples_and_their_logprobs_do_not_depend_on_the_thread_count(arch):
    """What lets a launcher worker sample on the cores its finished siblings left (``launch.idle_cores``, for the
    lean decoders only: T5's generic decoder returns other log-probability bits on 2 threads): the same draws
    and distributions, bit for bit, on 1 and 2 threads, at the lab's model size."""
    lm = LM(randomized(build_model(arch, "m", vocab_size=1024, pad_id=PAD, eos_id=EOS, max_positions=96, seed=0),
                       0.05), pad_id=PAD, eos_id=EOS)
    g = torch.Generator().manual_seed(0)
    prompts = collate_prompts([torch.randint(2, 1024, (int(n),), generator=g).tolist()
                               for n in torch.randint(1, 40, (64,), generator=g)], PAD)
    before, drawn = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            drawn.append(lm.sample(prompts, max_new_tokens=24, generator=torch.Generator().manual_seed(1),
                                   return_logprobs=True))
    finally:
        torch.set_num_threads(before)
    (tokens_1, logprobs_1), (tokens_2, logprobs_2) = drawn
    assert (tokens_1 != PAD).sum() > 64 * 12  # long responses: the draws had many chances to differ
    assert torch.equal(tokens_1, tokens_2) and torch.equal(logprobs_1, logprobs_2)
