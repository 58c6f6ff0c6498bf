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
    assert run(range(4, 8)) == [4, 6]  # a resumed run syncs at once, then on the block boundary


def test_responses_follow_the_eos_convention():
    assert _end_at_eos([4, 5, EOS, 7], "stop", EOS) == [4, 5, EOS]
    assert _end_at_eos([4, 5], "stop", EOS) == [4, 5, EOS]  # an engine that hides the stop token
    assert _end_at_eos([4, 5], "length", EOS) == [4, 5]  # truncated: no EOS
