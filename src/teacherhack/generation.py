"""Sampling backends for online data: batched Hugging Face generation with a KV cache (always available)
or vLLM (when installed, on a GPU), behind one small interface so the sources do not care which."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from teacherhack import decoding
from teacherhack.distributed import launched
from teacherhack.models import LM, Prompts, pad_responses

BACKENDS: tuple[str, ...] = ("auto", "hf", "vllm")


class Sampler(Protocol):
    """Draws responses for a batch of prompts; ``sync`` brings a sampler's copy of the weights up to date
    with the model being trained (a no-op for a sampler that uses the live model)."""

    name: str
    gives_logprobs: bool  # whether sample(..., return_logprobs=True) also returns each position's distribution
    any_threads: bool  # whether its draws are the same bits on any number of CPU threads (launch.idle_cores)

    def sample(self, prompts: Prompts, *, max_new_tokens: int, generator: torch.Generator,
               return_logprobs: bool = False) -> Tensor | tuple[Tensor, Tensor]: ...

    def sync(self, model: LM) -> None: ...


class HFSampler:
    """The model's own batched sampling (:meth:`LM.sample`: a lean KV-cache decoder for GPT-2 and Llama, the
    Hugging Face forward for the rest), on the live weights."""

    name = "hf"
    gives_logprobs = True

    def __init__(self, model: LM):
        self.model = model
        # the lean decoders: tests/test_sampling.py checks them bit for bit (the generic forward, T5's, is not)
        self.any_threads = decoding.lean_supported(model.model)

    def sample(self, prompts: Prompts, *, max_new_tokens: int, generator: torch.Generator,
               return_logprobs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        return self.model.sample(prompts, max_new_tokens=max_new_tokens, generator=generator,
                                 return_logprobs=return_logprobs)

    def sync(self, model: LM) -> None:
        """Nothing to do: the sampler reads the live model."""


class VLLMSampler:
    """vLLM on a saved copy of the model (token ids in, token ids out; no tokenizer). Sampling matches
    :meth:`LM.sample`: softmax(logits/τ) over the real vocabulary (a padded output layer's extra ids are never
    drawn), in the model's own dtype (vLLM's "auto" would sample a float32 checkpoint in bf16), no top-k or
    top-p, stop at the tokenizer's EOS only (not at other ids a checkpoint's generation_config.json lists), each
    row with a seed of its own. ``sync`` loads the trained model's current weights into the engine in place (vLLM
    ≥ 0.9, ``LLM.apply_model``) and drops its prefix cache, whose keys and values the old weights computed."""

    name = "vllm"
    gives_logprobs = False
    any_threads = False  # it runs on a GPU: CPU threads are not its business

    def __init__(self, path: Path, model: LM, *, gpu_memory_utilization: float = 0.3):
        from vllm import LLM  # imported here: an optional dependency

        self.eos_id, self.pad_id, self.temperature = model.eos_id, model.pad_id, model.temperature
        width = model.model.get_output_embeddings().weight.shape[0]
        self.allowed = list(range(model.vocab_size)) if model.vocab_size < width else None
        dtype = str(next(model.model.parameters()).dtype).removeprefix("torch.")
        self.llm = LLM(model=str(path), skip_tokenizer_init=True, gpu_memory_utilization=gpu_memory_utilization,
                       dtype=dtype, enforce_eager=True)

    def sample(self, prompts: Prompts, *, max_new_tokens: int, generator: torch.Generator,
               return_logprobs: bool = False) -> Tensor:
        from vllm import SamplingParams

        if return_logprobs:
            raise ValueError("the vllm sampler returns tokens only (gives_logprobs is False)")

        # vLLM seeds each request's generator from its own parameters: one seed for all would draw the same noise
        # in every row (identical prompts, identical responses)
        seeds = torch.randint(0, 2**31 - 1, (len(prompts.ids),), generator=generator).tolist()
        # ignore_eos: the engine's own EOS ids (every one the checkpoint's generation config lists) stop nothing;
        # the tokenizer's EOS, our convention, stops a row as a stop token
        params = [SamplingParams(temperature=self.temperature, top_p=1.0, top_k=-1, max_tokens=max_new_tokens,
                                 seed=seed, stop_token_ids=[self.eos_id], ignore_eos=True, detokenize=False,
                                 allowed_token_ids=self.allowed) for seed in seeds]
        requests = [{"prompt_token_ids": ids[mask].tolist()} for ids, mask in zip(prompts.ids, prompts.mask)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows = [_end_at_eos(list(out.outputs[0].token_ids), out.outputs[0].stop_reason, self.eos_id)
                for out in outputs]
        return pad_responses(rows, self.pad_id)

    def sync(self, model: LM) -> None:
        weights = [(name, tensor.detach()) for name, tensor in model.model.state_dict().items()]
        self.llm.apply_model(lambda engine_model: engine_model.load_weights(weights))
        self.llm.reset_prefix_cache()  # vLLM keeps it across weight loads: its prompts' states are the old model's


def _end_at_eos(tokens: list[int], stop_reason: int | str | None, eos_id: int) -> list[int]:
    """Our response convention: cut after the first EOS; a row the EOS stopped without showing it gets it back."""
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens + [eos_id] if stop_reason == eos_id else tokens


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


# Why vLLM does not run under a multi-process launch: each process would build an engine of its own, and nothing
# here places it on the process's GPU or keeps it out of the launcher's process group (TRL's colocate mode needs
# vLLM's external_launcher executor for that); untested, so refused rather than guessed.
UNDER_LAUNCHER = ("distill.generation=vllm runs in a single process: under a multi-process launch (torchrun, "
                  "accelerate) every process would build its own engine, which nothing places on its own GPU; use "
                  "distill.generation=hf (auto does), or run one process")


def make_sampler(model: LM, backend: str, saved_path: Path | None = None) -> Sampler:
    """``hf``, ``vllm`` (a clear error where it cannot run) or ``auto`` (vLLM when installed on a GPU, in a single
    process, and the model is a decoder-only one with a saved copy to start from, else HF). vLLM serves no
    encoder-decoder (T5, BART): it refuses their architectures."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "vllm" and model.encoder_decoder:
        raise ValueError(f"the vllm backend serves decoder-only models; {type(model.model).__name__} is an "
                         f"encoder-decoder: use distill.generation=hf or auto")
    if backend == "vllm" and launched():
        raise ValueError(UNDER_LAUNCHER)
    if backend == "vllm" or (backend == "auto" and vllm_available() and saved_path is not None
                             and not model.encoder_decoder and not launched()):
        if not vllm_available():
            raise RuntimeError("generation backend 'vllm' needs the vllm package and a CUDA GPU; "
                               "install vllm or use distill.generation=hf")
        if saved_path is None:
            raise ValueError("the vllm backend starts from a saved model folder; none was given")
        return VLLMSampler(saved_path, model)
    return HFSampler(model)
