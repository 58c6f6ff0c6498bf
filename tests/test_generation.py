"""The sampling-backend interface, exercised with the HF backend (vLLM is not installable here)."""

from __future__ import annotations

import pytest
import torch

from teacherhack import generation
from teacherhack.generation import HFSampler, _end_at_eos, make_sampler
from teacherhack.models import LM, build_model, collate_prompts
from teacherhack.sources import OnlineSamples

PAD, EOS = 0, 1


def tiny_lm(seed: int = 0) -> LM:
    return LM(build_model("gpt2", "xxs", vocab_size=40, pad_id=PAD, eos_id=EOS, max_positions=32, seed=seed),
              pad_id=PAD, eos_id=EOS)


def test_hf_sampler_is_the_models_own_kv_cache_sampling():
    lm = tiny_lm()
    prompts = collate_prompts([[5, 6, 2], [7, 2]], PAD)
    a = HFSampler(lm).sample(prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    b = lm.sample(prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_auto_falls_back_to_hf_and_vllm_refuses_clearly_without_a_gpu(monkeypatch):
    lm = tiny_lm()
    assert make_sampler(lm, "auto").name == "hf"
    assert make_sampler(lm, "hf").name == "hf"
    monkeypatch.setattr(generation, "vllm_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the vllm package and a CUDA GPU"):
        make_sampler(lm, "vllm")
    with pytest.raises(ValueError, match="unknown generation backend"):
        make_sampler(lm, "tgi")


def test_an_encoder_decoder_never_goes_to_vllm(monkeypatch, tmp_path):
    """vLLM serves no encoder-decoder (it refuses T5's architecture): auto keeps T5 on Hugging Face's decoder even
    where vLLM could run, and vllm says why it cannot."""
    t5 = LM(build_model("t5", "xxs", vocab_size=40, pad_id=PAD, eos_id=EOS, max_positions=32, seed=0),
            pad_id=PAD, eos_id=EOS)
    monkeypatch.setattr(generation, "vllm_available", lambda: True)
    monkeypatch.setattr(generation, "VLLMSampler", lambda path, model: pytest.fail("T5 was handed to vLLM"))
    assert make_sampler(t5, "auto", tmp_path).name == "hf"
    with pytest.raises(ValueError, match="decoder-only.*encoder-decoder"):
        make_sampler(t5, "vllm", tmp_path)


def test_vllm_stays_out_of_a_multi_process_launch(monkeypatch, tmp_path):
    """Under torchrun every process would build its own vLLM engine, which nothing places on its own GPU: auto
    samples with Hugging Face's decoder there, and vllm is refused with the way out."""
    monkeypatch.setattr(generation, "vllm_available", lambda: True)
    monkeypatch.setattr(generation, "VLLMSampler", lambda path, model: pytest.fail("vLLM under a launcher"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    lm = tiny_lm()
    assert make_sampler(lm, "auto", tmp_path).name == "hf"
    with pytest.raises(ValueError, match="single process.*distill.generation=hf"):
        make_sampler(lm, "vllm", tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: auto takes vLLM where it can run
    monkeypatch.setattr(generation, "VLLMSampler", lambda path, model: "engine")
    assert make_sampler(lm, "auto", tmp_path) == "engine"


class RecordingSampler:
    """A stand-in for a separate engine (like vLLM): records when it receives the student's weights."""

    name = "recording"
    any_threads = False

    def __init__(self, lm: LM):
        self.lm, self.synced_at, self.step = lm, [], None

    def sample(self, prompts, *, max_new_tokens, generator, return_logprobs=False):
        return self.lm.sample(prompts, max_new_tokens=max_new_tokens, generator=generator)

    def sync(self, model):
        self.synced_at.append(self.step)


def test_student_weights_reach_a_separate_sampler_every_n_steps_and_after_resume():
    lm = tiny_lm()
    prompts = [[5, 6, 2], [7, 2], [8, 9, 2], [10, 2]]

    def run(steps):
        sampler = RecordingSampler(lm)
        source = OnlineSamples(prompts, sampler, batch_size=2, seed=0, pad_id=PAD, eos_id=EOS, max_new_tokens=4,
                               origin="online_student", sync_from=lm, sync_every=3)
        for step in steps:
            sampler.step = step
            batch = source.batch(step)
            assert batch.origin == "online_student"
        return sampler.synced_at

    assert run(range(7)) == [0, 3, 6]
    assert run(range(6, 10)) == [6, 9]  # a resumed run (from a block's first step: config.validate) syncs at once


def test_responses_follow_the_eos_convention():
    assert _end_at_eos([4, 5, EOS, 7], None, EOS) == [4, 5, EOS]
    assert _end_at_eos([4, 5], EOS, EOS) == [4, 5, EOS]  # an engine that hides the stop token
    assert _end_at_eos([4, 5], None, EOS) == [4, 5]  # truncated: no EOS
    assert _end_at_eos([4, 5, 7], 7, EOS) == [4, 5, 7]  # another stop (none of ours): no EOS was drawn, none added


def test_the_vllm_sampler_seeds_every_row_and_draws_real_tokens_only(monkeypatch, tmp_path):
    """vLLM itself is not installable here: a stand-in module records what the sampler asks of it. Each request
    gets a seed of its own (one shared seed gives identical prompts identical responses), and with a declared
    real vocabulary smaller than the output layer only its ids may be drawn, as LM.sample does."""
    import sys
    import types

    calls = []

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class Output:
        def __init__(self, tokens, stop_reason):
            self.token_ids, self.stop_reason = tokens, stop_reason

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def generate(self, requests, params, use_tqdm):
            calls.append((requests, params))
            return [types.SimpleNamespace(outputs=[Output([5, 6], EOS)]) for _ in requests]

        def apply_model(self, function):
            calls.append("apply_model")

        def reset_prefix_cache(self):
            calls.append("reset_prefix_cache")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    padded = LM(build_model("gpt2", "xxs", vocab_size=48, pad_id=PAD, eos_id=EOS, max_positions=32, seed=0),
                pad_id=PAD, eos_id=EOS, vocab_size=40)
    sampler = generation.VLLMSampler(tmp_path, padded)
    prompts = collate_prompts([[5, 6, 2], [5, 6, 2], [7, 2]], PAD)
    out = sampler.sample(prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    requests, params = calls[0]
    assert [r["prompt_token_ids"] for r in requests] == [[5, 6, 2], [5, 6, 2], [7, 2]]
    assert len(params) == 3 and len({p.seed for p in params}) == 3
    assert all(p.allowed_token_ids == list(range(40)) and p.temperature == 1.0 for p in params)
    # the tokenizer's EOS alone stops a row (ignore_eos: not the ids of the checkpoint's generation config)
    assert all(p.stop_token_ids == [EOS] and p.ignore_eos for p in params)
    assert sampler.llm.kwargs["dtype"] == "float32"  # the model's own, not "auto" (which samples float32 in bf16)
    assert out.tolist() == [[5, 6, EOS]] * 3  # stopped at EOS: the EOS is put back
    again = sampler.sample(prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    assert [p.seed for p in calls[1][1]] == [p.seed for p in params] and torch.equal(again, out)
    assert generation.VLLMSampler(tmp_path, tiny_lm()).allowed is None  # nothing padded: no restriction
    sampler.sync(padded)  # new weights, and no prompt state the old ones computed
    assert calls[2:] == ["apply_model", "reset_prefix_cache"]
