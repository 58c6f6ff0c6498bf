"""The model wrapper: padding invariance, KV-cache sampling vs full-forward scoring, tempering, EOS
handling, seeding, prompt batches, building and saving models. All models here are tiny and random."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers.activations import NewGELUActivation

from conftest import float_bits
from teacherhack import decoding, models
from teacherhack.models import (
    ARCHITECTURES,
    LM,
    Prompts,
    build_model,
    collate_prompts,
    load_pretrained,
    pad_responses,
)

VOCAB, PAD, EOS = 50, 0, 1
PROMPTS = [[5, 6, 7, 8, 9, 3, 4], [10, 11], [12, 13, 14], [20]]


def make_lm(arch: str = "gpt2", size: str = "xxs", *, seed: int = 0, scale: float | None = 0.3,
            temperature: float = 1.0) -> LM:
    """A random model. ``scale`` re-draws every parameter with that std so that attention, positions and
    the output distribution are far from uniform (default init gives nearly flat, position-blind models,
    which would hide padding/position bugs and make argmax ties likely)."""
    model = build_model(arch, size, vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, max_positions=64, seed=seed)
    if scale is not None:
        g = torch.Generator().manual_seed(seed + 1234)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.eval()
    return LM(model, pad_id=PAD, eos_id=EOS, temperature=temperature)


def greedy_full_forward(lm: LM, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding of one unpadded prompt with a full forward (no cache) for every token."""
    prompts = collate_prompts([prompt], PAD)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            responses = torch.tensor([out + [PAD]], dtype=torch.long)  # the last entry is a placeholder
            token = int(lm.logits(prompts, responses)[0, -1].argmax())
            out.append(token)
            if token == EOS:
                break
    return out


def argmax_draw(probs, uniforms):
    """Stands in for the inverse-CDF draw: greedy decoding."""
    return probs.argmax(-1)


# --- padding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padded_batch_scores_like_each_row_alone(arch):
    lm = make_lm(arch, "s")  # two layers: padding garbage must not leak through a second layer either
    prompts = collate_prompts(PROMPTS, PAD)
    assert prompts.ids.shape == (4, 7) and not prompts.mask[1, :5].any()
    responses = torch.tensor([[3, 4, 5, 6], [6, 7, 8, 9], [9, 10, 11, 12], [2, 2, 30, 31]])
    with torch.no_grad():
        batch = lm.logits(prompts, responses)
        assert batch.shape == (4, 4, VOCAB)
        assert torch.isfinite(batch).all()
        for row, prompt in enumerate(PROMPTS):
            alone = lm.logits(collate_prompts([prompt], PAD), responses[row : row + 1])
            torch.testing.assert_close(batch[row], alone[0], atol=1e-5, rtol=0)
        # the check is sensitive: the responses actually depend on the prompt (and on positions)
        other = lm.logits(collate_prompts([PROMPTS[0][1:]], PAD), responses[:1])
        assert (other[0] - batch[0]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_entry_t_depends_only_on_prefix(arch):
    """Entry t scores y_t given y<t: changing y_t (or later tokens) leaves entries ≤ t unchanged."""
    lm = make_lm(arch)
    prompts = collate_prompts(PROMPTS[:2], PAD)
    a = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    b = a.clone()
    b[:, 2:] = torch.tensor([40, 41])
    with torch.no_grad():
        la, lb = lm.logits(prompts, a), lm.logits(prompts, b)
    torch.testing.assert_close(la[:, :3], lb[:, :3], atol=1e-5, rtol=0)
    assert (la[:, 3] - lb[:, 3]).abs().max() > 1e-4


def test_an_encoder_with_absolute_positions_scores_and_samples_a_prompt_as_it_does_alone():
    """BART numbers its encoder's columns from 0 and takes no position ids: a left-padded prompt's tokens sat at
    other positions in a batch than alone, so its scores and samples depended on the batch it was in."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    lm = LM(BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, decoder_start_token_id=EOS, forced_eos_token_id=None,
        init_std=0.5)).eval(), pad_id=PAD, eos_id=EOS)
    prompts = collate_prompts(PROMPTS, PAD)
    responses = torch.tensor([[3, 4, 5, 6], [6, 7, 8, 9], [9, 10, 11, 12], [2, 2, 30, 31]])

    def generators(rows: range) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(row) for row in rows]

    with torch.no_grad():
        batch = lm.logits(prompts, responses)
        samples = lm.sample(prompts, max_new_tokens=8, generator=generators(range(len(PROMPTS))))
        for row, prompt in enumerate(PROMPTS):
            alone = collate_prompts([prompt], PAD)
            torch.testing.assert_close(batch[row], lm.logits(alone, responses[row: row + 1])[0], atol=1e-5, rtol=1e-5)
            sample = lm.sample(alone, max_new_tokens=8, generator=generators(range(row, row + 1)))[0]
            assert samples[row, : len(sample)].tolist() == sample.tolist()
            assert (samples[row, len(sample):] == PAD).all()


# --- KV-cache sampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_greedy_sampling_matches_full_forward(arch, monkeypatch):
    lm = make_lm(arch, "s")
    monkeypatch.setattr(decoding, "inverse_cdf", argmax_draw)
    max_new = 8
    sampled = lm.sample(collate_prompts(PROMPTS, PAD), max_new_tokens=max_new,
                        generator=torch.Generator().manual_seed(0))
    expected = [greedy_full_forward(lm, prompt, max_new) for prompt in PROMPTS]
    width = max(len(e) for e in expected)
    assert sampled.shape == (len(PROMPTS), width)
    assert sampled.tolist() == pad_responses(expected, PAD).tolist()
    # the greedy continuations are prompt-dependent, so a mixed-up row or position would show
    assert len({tuple(e) for e in expected}) > 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sampling_leaves_training_mode_as_it_was(arch):
    lm = make_lm(arch)
    lm.model.train()
    lm.sample(collate_prompts(PROMPTS[:1], PAD), max_new_tokens=2, generator=torch.Generator().manual_seed(0))
    assert lm.model.training
    lm.model.eval()
    lm.sample(collate_prompts(PROMPTS[:1], PAD), max_new_tokens=2, generator=torch.Generator().manual_seed(0))
    assert not lm.model.training


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eos_pads_rows_and_stops_early(arch, monkeypatch):
    """Scripted draws: each row's tokens after its first EOS become pad_id, and sampling stops (no more
    draws) as soon as every row has finished."""
    script = [  # draw t for rows 0, 1, 2
        [7, 8, EOS],
        [EOS, 8, 5],
        [9, 8, 5],
        [9, EOS, 5],
        [9, 9, 9],
    ]
    calls = []

    def scripted(probs, uniforms):
        assert probs.shape == (3, VOCAB) and uniforms.shape == (3,)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3), atol=1e-5, rtol=0)
        calls.append(len(calls))
        return torch.tensor(script[len(calls) - 1])

    monkeypatch.setattr(decoding, "inverse_cdf", scripted)
    lm = make_lm(arch)
    out = lm.sample(collate_prompts(PROMPTS[:3], PAD), max_new_tokens=10, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 4
    assert out.tolist() == [[7, EOS, PAD, PAD], [8, 8, 8, EOS], [EOS, PAD, PAD, PAD]]

    # a row that never draws EOS runs to max_new_tokens (truncated, no EOS)
    calls.clear()
    script[:] = [[EOS, 3, 4]] * 5
    out = lm.sample(collate_prompts(PROMPTS[:3], PAD), max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 5
    assert out.tolist() == [[EOS] + [PAD] * 4, [3] * 5, [4] * 5]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eos_forced_by_output_bias(arch):
    """With the real sampler: an output layer biased towards EOS ends every row after one token."""
    lm = make_lm(arch)

    def bias(module, inputs, output):
        output = output.clone()
        output[..., EOS] += 1e4
        return output

    handle = lm.model.get_output_embeddings().register_forward_hook(bias)
    try:
        out = lm.sample(collate_prompts(PROMPTS, PAD), max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert out.tolist() == [[EOS]] * len(PROMPTS)


def test_sampling_follows_tempered_softmax():
    """First tokens for one prompt ~ softmax(logits/(τ·temperature)), τ = 0.5 given to LM."""
    n = 4000
    lm = make_lm("gpt2", scale=0.6, temperature=0.5)
    prompt = collate_prompts([[5, 6, 7]], PAD)
    with torch.no_grad():
        p = torch.softmax(lm.logits(prompt, torch.tensor([[PAD]]))[0, 0].double(), -1)
        untempered = LM(lm.model, pad_id=PAD, eos_id=EOS)
        raw = torch.softmax(untempered.logits(prompt, torch.tensor([[PAD]]))[0, 0].double(), -1)

    def frequencies(seed: int, temperature: float) -> torch.Tensor:
        first = lm.sample(prompt.repeat(n), max_new_tokens=1, generator=torch.Generator().manual_seed(seed),
                          temperature=temperature)
        assert first.shape == (n, 1)
        return torch.bincount(first[:, 0], minlength=VOCAB).double() / n

    def worst_z(freq: torch.Tensor, q: torch.Tensor) -> float:  # largest standardised deviation
        return float(((freq - q).abs() / ((q * (1 - q) / n).sqrt() + 1.0 / n)).max())

    def chi2(freq: torch.Tensor, q: torch.Tensor) -> tuple[float, int]:  # bins with expected count < 5 pooled
        big = q * n >= 5
        observed = torch.cat([freq[big] * n, (freq[~big].sum() * n).reshape(1)])
        expected = torch.cat([q[big] * n, (q[~big].sum() * n).reshape(1)])
        keep = expected > 0
        return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1

    # the distribution is far from uniform and from the untempered one, so the test can tell them apart
    assert 0.2 < float(p.max()) < 0.9
    assert 0.5 * (p - raw).abs().sum() > 0.2
    freq = frequencies(3, 1.0)
    stat, dof = chi2(freq, p)
    assert dof >= 5 and stat < dof + 6 * math.sqrt(2 * dof)  # p-value ~1e-5
    assert worst_z(freq, p) < 5.0
    assert worst_z(freq, raw) > 8.0  # sampling untempered would fail
    # the sampling temperature multiplies τ: τ = 0.5 with temperature 2 samples the raw distribution
    freq = frequencies(4, 2.0)
    assert worst_z(freq, raw) < 5.0 and worst_z(freq, p) > 8.0


def test_lm_temperature_and_sampling_temperature_compose_exactly():
    a = make_lm("gpt2", temperature=0.5)
    b = LM(a.model, pad_id=PAD, eos_id=EOS, temperature=1.0)
    prompts = collate_prompts(PROMPTS, PAD)
    ya = a.sample(prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(9))
    yb = b.sample(prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(9), temperature=0.5)
    assert torch.equal(ya, yb)


# --- tempering and scoring -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tempered_logits_and_logprobs(arch):
    raw = make_lm(arch)
    tempered = LM(raw.model, pad_id=PAD, eos_id=EOS, temperature=0.25)
    prompts, responses = collate_prompts(PROMPTS, PAD), torch.tensor([[3, 4, EOS]] * len(PROMPTS))
    with torch.no_grad():
        r, t = raw.logits(prompts, responses), tempered.logits(prompts, responses)
        torch.testing.assert_close(t, r / 0.25, atol=1e-5, rtol=1e-5)
        logprobs = tempered.next_token_logprobs(prompts, responses)
    assert logprobs.dtype == torch.float32 and logprobs.shape == (len(PROMPTS), 3, VOCAB)
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(len(PROMPTS), 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(logprobs, torch.log_softmax(r / 0.25, -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_invalid_temperature(temperature):
    model = build_model("gpt2", "xxs", vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, max_positions=16, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        LM(model, pad_id=PAD, eos_id=EOS, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):  # softmax(−logits), or NaN probabilities, else
        LM(model, pad_id=PAD, eos_id=EOS).sample(collate_prompts(PROMPTS, PAD), max_new_tokens=2,
                                                 generator=torch.Generator().manual_seed(0), temperature=temperature)


def test_a_bf16_model_is_scored_from_the_distribution_it_is_sampled_from():
    """τ ≠ 1 divides the logits in float32 for scoring as for sampling: one bf16 rounding more (l/τ in bf16)
    would score another distribution than the one the samples come from."""
    lm = make_lm("gpt2", scale=0.6)
    lm.model.to(torch.bfloat16)
    tempered = LM(lm.model, pad_id=PAD, eos_id=EOS, temperature=0.3)
    prompts, responses = collate_prompts(PROMPTS, PAD), torch.tensor([[3, 4, EOS]] * len(PROMPTS))
    with torch.no_grad():
        raw = lm.logits(prompts, responses)
        scored = tempered.next_token_logprobs(prompts, responses)
    assert raw.dtype == torch.bfloat16  # τ = 1: the logits as the model made them
    exact = torch.log_softmax(raw.float() / 0.3, -1)
    assert torch.equal(scored, exact)
    assert not torch.equal(torch.log_softmax((raw / 0.3).float(), -1), exact)  # what bf16 division gave


def test_vocab_size_and_encoder_decoder_flags():
    assert make_lm("gpt2").vocab_size == VOCAB and not make_lm("gpt2").encoder_decoder
    assert make_lm("t5").vocab_size == VOCAB and make_lm("t5").encoder_decoder


# --- seeding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_same_seed_same_samples_different_seed_different(arch):
    lm = make_lm(arch)
    prompts = collate_prompts(PROMPTS, PAD)

    def draw(seed: int) -> torch.Tensor:
        return lm.sample(prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


# --- prompt batches ------------------------------------------------------------------------------


def test_collate_prompts_left_pads():
    p = collate_prompts([[1, 2, 3], [4], [5, 6]], pad_id=9)
    assert p.ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 5, 6]]
    assert p.mask.tolist() == [[True, True, True], [False, False, True], [False, True, True]]
    assert p.ids.dtype == torch.long and p.mask.dtype == torch.bool and len(p) == 3


@pytest.mark.parametrize("bad", [[], [[1, 2], []], [[]]])
def test_collate_prompts_rejects_empty(bad):
    with pytest.raises(ValueError):
        collate_prompts(bad, pad_id=0)


def test_pad_responses_right_pads():
    out = pad_responses([[1, 2, 3], [4], [5, 6]], pad_id=9)
    assert out.tolist() == [[1, 2, 3], [4, 9, 9], [5, 6, 9]] and out.dtype == torch.long
    assert pad_responses([[], []], pad_id=9).tolist() == [[9], [9]]
    assert pad_responses([], pad_id=9).shape == (0, 1)


def test_prompts_getitem_drops_all_padding_columns():
    p = collate_prompts([[1, 2, 3, 4], [5], [6, 7]], pad_id=0)
    tail = p[1:]
    assert tail.ids.tolist() == [[0, 5], [6, 7]]
    assert tail.mask.tolist() == [[False, True], [True, True]]
    one = p[torch.tensor([1])]
    assert one.ids.tolist() == [[5]] and one.mask.tolist() == [[True]]
    picked = p[torch.tensor([2, 0])]
    assert picked.ids.tolist() == [[0, 0, 6, 7], [1, 2, 3, 4]]
    boolean = p[torch.tensor([False, True, True])]
    assert torch.equal(boolean.ids, tail.ids) and torch.equal(boolean.mask, tail.mask)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prompts_getitem_keeps_results(arch):
    lm = make_lm(arch)
    p = collate_prompts(PROMPTS, PAD)
    responses = torch.tensor([[3, 4, 5]] * len(PROMPTS))
    with torch.no_grad():
        full = lm.logits(p, responses)
        for index in (slice(1, 3), torch.tensor([3, 1]), slice(0, 1)):
            part = p[index]
            torch.testing.assert_close(lm.logits(part, responses[index]), full[index], atol=1e-5, rtol=0)
    assert p[1:3].ids.shape[1] == 3  # the sub-batch really was narrowed (7 → 3 columns)


def test_prompts_repeat():
    p = collate_prompts([[1, 2], [3]], pad_id=0).repeat(3)
    assert p.ids.tolist() == [[1, 2]] * 3 + [[0, 3]] * 3
    assert p.mask.tolist() == [[True, True]] * 3 + [[False, True]] * 3
    assert isinstance(p, Prompts) and len(p) == 6


# --- building, saving, loading -------------------------------------------------------------------


def test_build_model_rejects_unknown_size_and_arch():
    with pytest.raises(ValueError, match="size"):
        build_model("gpt2", "huge", vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, max_positions=16, seed=0)
    with pytest.raises(ValueError, match="architecture"):
        build_model("mamba", "xxs", vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, max_positions=16, seed=0)


def test_build_model_is_seeded_and_sized():
    a = build_model("llama", "xs", vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, max_positions=16, seed=3)
    b = build_model("llama", "xs", vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, max_positions=16, seed=3)
    c = build_model("llama", "xs", vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, max_positions=16, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.config.hidden_size == models.SIZES["xs"].width
    assert a.config.num_hidden_layers == models.SIZES["xs"].layers


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_and_load_pretrained_round_trip(arch, tmp_path: Path):
    lm = make_lm(arch)
    lm.save(tmp_path / "m")
    names = {f.name for f in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    loaded = LM(load_pretrained(tmp_path / "m"), pad_id=PAD, eos_id=EOS)
    assert type(loaded.model) is type(lm.model)
    prompts, responses = collate_prompts(PROMPTS, PAD), torch.tensor([[3, 4, EOS]] * len(PROMPTS))
    with torch.no_grad():
        assert torch.equal(loaded.logits(prompts, responses), lm.logits(prompts, responses))
    out_a = lm.sample(prompts, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    out_b = loaded.sample(prompts, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out_a, out_b)


# --- a frozen decoder's prompt states ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompt_states_score_responses_as_the_full_forward_does(arch):
    """Keys and values kept for every prompt (stored left-padded to the longest) serve any batch of them, in any
    order and at its own width: the logits of the full forward, to float32 rounding."""
    lm = make_lm(arch, "s")
    prompts = [[int(t) for t in torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (7, 1, 12, 3, 9, 2)]
    states = lm.prompt_states(collate_prompts(prompts, PAD), batch_size=4)  # two batches of the prompt pass
    size = models.SIZES["s"]  # keys and values of every layer, 6 prompts × 11 columns (the longest prompt but its last token)
    assert states.nbytes == size.layers * 2 * 6 * size.heads * 11 * (size.width // size.heads) * 4
    responses = torch.randint(2, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    for rows in ([4, 0, 3], [3, 5, 1], [2, 2, 0]):
        batch = collate_prompts([prompts[i] for i in rows], PAD)
        prefix = states.prefix(torch.tensor(rows), batch)
        with torch.no_grad():
            full, cached = lm.logits(batch, responses), lm.logits(batch, responses, prefix)
        torch.testing.assert_close(cached, full, atol=2e-5, rtol=0)
    one_token = collate_prompts([prompts[1], prompts[1]], PAD)
    assert states.prefix(torch.tensor([1, 1]), one_token) is None  # nothing before the last prompt token
    only_one_token = lm.prompt_states(one_token)
    assert only_one_token.nbytes == 0 and only_one_token.prefix(torch.tensor([1, 0]), one_token) is None
    with pytest.raises(ValueError, match="not the stored prompts"):
        states.prefix(torch.tensor([0, 3, 4]), collate_prompts([prompts[i] for i in (4, 0, 3)], PAD))


def test_prompt_states_under_bf16_autocast_stay_within_its_rounding():
    """As distill.teacher_prompt_cache runs them when the lab trains in bf16: the states computed in float32, the
    responses' forward under autocast. The cached log-probabilities are not those of the full forward under
    autocast, but no farther from float32 than the autocast's own rounding takes the full forward."""
    lm = make_lm("gpt2", "s")
    prompts = [[int(t) for t in torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (7, 12, 3, 9)]
    batch = collate_prompts(prompts, PAD)
    states = lm.prompt_states(batch)
    responses = torch.randint(2, VOCAB, (4, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = lm.next_token_logprobs(batch, responses)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = lm.next_token_logprobs(batch, responses)
            cached = lm.next_token_logprobs(batch, responses, states.prefix(torch.arange(4), batch))
    assert states.layers[0][0].dtype == torch.float32
    rounding = float((full - exact).abs().max())
    assert 1e-4 < rounding < 0.1  # bf16's rounding, not float32's
    assert float((cached - exact).abs().max()) <= 1.5 * rounding


def test_prompt_states_refuse_an_encoder_decoder():
    with pytest.raises(ValueError, match="decoder-only"):
        make_lm("t5").prompt_states(collate_prompts(PROMPTS, PAD))


# --- the attention's name ------------------------------------------------------------------------


def test_a_model_whose_code_tests_the_attention_s_name_keeps_it_and_scores_as_its_full_forward():
    """Gemma 4 keeps every query position of its KV-shared layers under ``logits_to_keep`` only when its
    attention is named "sdpa" and the causal mask is None (SDPA's ``is_causal``: an unpadded batch); renamed, it
    dropped them and scored each response token without most of its context."""
    from transformers import Gemma4ForCausalLM
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

    torch.manual_seed(0)
    model = Gemma4ForCausalLM(Gemma4TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=32, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2, vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS,
        attn_implementation="sdpa", initializer_range=0.5)).eval()
    lm = LM(model, pad_id=PAD, eos_id=EOS)
    prompt, response = [5, 9, 7, 12], torch.tensor([[4, 8, 3, 6, EOS]])
    with torch.no_grad():
        scored = lm.next_token_logprobs(collate_prompts([prompt], PAD), response)
        full = torch.log_softmax(model(torch.tensor([prompt + response[0, :-1].tolist()])).logits, -1)
    torch.testing.assert_close(scored[0], full[0, len(prompt) - 1:], atol=1e-5, rtol=0)
    assert model.config._attn_implementation == "sdpa"


# --- the tanh GELU, faster where no gradient flows ------------------------------------------------


def test_tanh_gelu_is_hugging_face_s_bit_for_bit():
    """On one thread, in pieces: every bf16 and float16 value (NaN payloads, infinities and subnormals included),
    and random values in float32 and float64 at sizes below, at and above one piece, the bits of Hugging Face's
    eight ops."""
    hugging_face, fast = NewGELUActivation(), models.TanhGELU()
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.bfloat16, torch.float16):
        x = every.view(dtype)
        assert torch.equal(float_bits(fast(x)), float_bits(hugging_face(x))), dtype
    g = torch.Generator().manual_seed(0)
    for shape in [(0, 4), (1,), (7, 13, 33), (1, 32768), (1, 32769), (3, 65537), (16, 45, 384)]:
        for dtype in (torch.float32, torch.float64):
            x = (torch.randn(shape, generator=g) * 4).to(dtype)
            specials = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, -0.0, torch.finfo(dtype).tiny / 4],
                                    dtype=dtype)
            tail = min(len(specials), x.numel())  # in the last piece's last elements
            x.view(-1)[x.numel() - tail:] = specials[:tail]
            got = fast(x)
            assert got.dtype == dtype and got.shape == x.shape
            assert torch.equal(float_bits(got), float_bits(hugging_face(x))), (shape, dtype)


def test_the_lm_s_gelu_scores_the_same_bits_and_trains_as_hugging_face_s(monkeypatch):
    """The LM swaps GPT-2's activation for :class:`TanhGELU`: on one thread, scoring (a batch of 64 × up to 46
    positions, whose activations span several pieces) runs its pieces; autograd's forward, and scoring on two
    threads, run Hugging Face's ops. The logits, with and without a gradient, and the gradients are those of the
    stock model, bit for bit."""
    lm = make_lm("gpt2", "s")
    blocks = lm.model.transformer.h
    assert all(type(block.mlp.act) is models.TanhGELU for block in blocks)
    g = torch.Generator().manual_seed(0)
    prompts = collate_prompts([torch.randint(2, VOCAB, (int(n),), generator=g).tolist()
                               for n in torch.randint(1, 20, (64,), generator=g)], PAD)
    responses = torch.randint(2, VOCAB, (64, 28), generator=g)
    hugging_face_calls = []
    hugging_face = NewGELUActivation.forward
    monkeypatch.setattr(NewGELUActivation, "forward",
                        lambda self, x: hugging_face_calls.append(x.requires_grad) or hugging_face(self, x))

    def scores_and_gradients() -> list[torch.Tensor]:
        with torch.no_grad():
            scores = lm.logits(prompts, responses)
        lm.model.zero_grad(set_to_none=True)
        trained = lm.logits(prompts, responses)
        trained.square().mean().backward()
        return [scores, trained.detach()] + [p.grad for p in lm.model.parameters()]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fast = scores_and_gradients()
        assert hugging_face_calls == [True] * len(blocks)  # only the forward that autograd records
        torch.set_num_threads(2)
        with torch.no_grad():
            lm.logits(prompts, responses)
        assert hugging_face_calls[len(blocks):] == [False] * len(blocks)  # more threads: the whole ops
        torch.set_num_threads(1)
        for block in blocks:
            block.mlp.act = NewGELUActivation()
        stock = scores_and_gradients()
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(float_bits(a), float_bits(b)) for a, b in zip(fast, stock, strict=True))


@pytest.mark.parametrize("arch", ["t5", "gpt2", "bart"])
def test_pretrained_checkpoints_load_without_their_dropout(arch: str, tmp_path: Path):
    """The lab trains without dropout, as the paper does; T5 v1.1, GPT-2 and BART checkpoints ship 0.1."""
    from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

    made = {"t5": lambda: models.T5ForConditionalGeneration(models.T5Config(
                vocab_size=32, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, dropout_rate=0.1,
                decoder_start_token_id=0)),
            "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)),
            "bart": lambda: BartForConditionalGeneration(BartConfig(
                vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16,
                dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, encoder_layerdrop=0.1))}[arch]()
    ids = torch.tensor([[2, 3, 4, 5]])

    def two_training_forwards(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        model.train()
        extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
        return model(input_ids=ids, **extra).logits, model(input_ids=ids, **extra).logits

    assert not torch.equal(*two_training_forwards(made))  # its dropout draws other masks each time
    made.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    rates = {k: v for k, v in loaded.config.to_dict().items() if "drop" in k and isinstance(v, float)}
    assert rates and set(rates.values()) == {0.0}
    assert torch.equal(*two_training_forwards(loaded))  # no dropout left anywhere


def test_without_dropout_reaches_the_configs_inside_a_config():
    """An encoder-decoder assembled from two configs keeps each part's dropout in its own config."""
    from transformers import BertConfig, EncoderDecoderConfig

    config = models.without_dropout(EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(), BertConfig()))
    for part in (config.encoder, config.decoder):
        assert part.hidden_dropout_prob == part.attention_probs_dropout_prob == 0.0
        assert part.layer_norm_eps == 1e-12  # other floats stay as they are
