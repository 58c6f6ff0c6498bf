"""Sampling throughput of LM.sample against the sampler it replaced (CPU).

    .venv/bin/python scripts/bench_sampling.py --threads 1 2 [--clock cpu]

For each model, tokens/s (batch × response columns / seconds, best of ``--repeats``) of:
  baseline  the pre-change LM.sample: Hugging Face forward per token with its DynamicCache, torch.multinomial
            (kept here only, as the reference; the cache kwarg renamed to ``cache=`` so it runs on
            transformers ≥ 5.40)
  generic   the new sampler forced onto the generic decoder (HF forward, inverse-CDF draws)
  lean      LM.sample as shipped (lean decoder with a preallocated KV cache, inverse-CDF draws)
  +logprobs LM.sample(..., return_logprobs=True)
Models are random (the lab's shapes: GPT-2 teacher 3×128 and student 1×64 with a 1,024 vocabulary, batch 32
and 256, 48 prompt + 48 new tokens; Llama 4×256 and 2×128 with 2,048, batch 8, 40 + 40), so EOS is rare and
every row runs to the maximum length in every sampler.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from teacherhack import decoding
from teacherhack.models import LM, Prompts, collate_prompts

PAD, EOS = 0, 1


@torch.no_grad()
def baseline_sample(lm: LM, prompts: Prompts, *, max_new_tokens: int, generator: torch.Generator) -> Tensor:
    """BASELINE: the LM.sample this package had before the lean decoder (decoder-only branch)."""
    model = lm.model
    model.eval()
    batch = len(prompts)
    finished = torch.zeros(batch, dtype=torch.bool)
    tokens: list[Tensor] = []
    mask = prompts.mask.long()
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    out = model(input_ids=prompts.ids, attention_mask=mask, position_ids=positions, use_cache=True)
    for _ in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float() / lm.temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token = torch.where(finished, lm.pad_id, token)
        tokens.append(token)
        finished |= token == lm.eos_id
        if finished.all():
            break
        mask = torch.cat([mask, torch.ones_like(token[:, None])], 1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=out.cache,
                    use_cache=True)
    return torch.stack(tokens, 1)


@torch.no_grad()
def generic_sample(lm: LM, prompts: Prompts, *, max_new_tokens: int, generator: torch.Generator) -> Tensor:
    """The new draws on the generic decoder: what a model without a lean decoder gets."""
    tokens, _ = decoding.sample(decoding.HFDecoder(lm.model, prompts.ids, prompts.mask), batch=len(prompts),
                                vocab_size=lm.vocab_size, max_new_tokens=max_new_tokens, generator=generator,
                                temperature=lm.temperature, eos_id=lm.eos_id, pad_id=lm.pad_id, device=lm.device,
                                return_logprobs=False)
    return tokens


def gpt2(layers: int, width: int, heads: int, vocab: int) -> PreTrainedModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=width, n_layer=layers, n_head=heads,
                                      bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD))


def llama(layers: int, width: int, heads: int, vocab: int) -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 8 // 3,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=heads, max_position_embeddings=128, bos_token_id=EOS,
                                        eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True))


# name, model, batch, prompt length, new tokens
CASES: list[tuple[str, Callable[[], PreTrainedModel], int, int, int]] = [
    ("gpt2 3x128 (teacher)", lambda: gpt2(3, 128, 4, 1024), 32, 48, 48),
    ("gpt2 3x128 (teacher)", lambda: gpt2(3, 128, 4, 1024), 256, 48, 48),
    ("gpt2 1x64 (student)", lambda: gpt2(1, 64, 2, 1024), 32, 48, 48),
    ("gpt2 1x64 (student)", lambda: gpt2(1, 64, 2, 1024), 256, 48, 48),
    ("llama 4x256", lambda: llama(4, 256, 4, 2048), 8, 40, 40),
    ("llama 2x128", lambda: llama(2, 128, 4, 2048), 8, 40, 40),
]


def tokens_per_second(samplers: list[Callable[[torch.Generator], Tensor | tuple[Tensor, Tensor]]], repeats: int,
                      clock: Callable[[], float]) -> list[float]:
    """Each sampler's best rate over ``repeats`` rounds, the samplers interleaved within each round so that
    load from other jobs hits them alike."""
    best = [float("inf")] * len(samplers)
    for seed in range(repeats + 1):
        for index, draw in enumerate(samplers):
            start = clock()
            out = draw(torch.Generator().manual_seed(seed))
            seconds = clock() - start
            tokens = out[0] if isinstance(out, tuple) else out
            if seed > 0:  # round 0 warms up
                best[index] = min(best[index], seconds / tokens.numel())
    return [1 / b for b in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the process's CPU time, which other jobs on a shared machine do not inflate "
                             "by time-slicing (with 1 thread; with more it sums the threads: tokens per CPU-second)")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"threads {threads}; tokens/s ({args.clock} clock), best of {args.repeats}")
        print(f"{'model':<22}{'batch':>6}{'baseline':>10}{'generic':>10}{'lean':>10}{'+logprobs':>11}{'speed-up':>10}")
        for name, build, batch, prompt_len, new in CASES:
            torch.manual_seed(0)
            model = build()
            vocab = model.config.vocab_size
            lm = LM(model, pad_id=PAD, eos_id=EOS)
            prompts = collate_prompts(torch.randint(2, vocab, (batch, prompt_len)).tolist(), PAD)
            rates = tokens_per_second([
                lambda g: baseline_sample(lm, prompts, max_new_tokens=new, generator=g),
                lambda g: generic_sample(lm, prompts, max_new_tokens=new, generator=g),
                lambda g: lm.sample(prompts, max_new_tokens=new, generator=g),
                lambda g: lm.sample(prompts, max_new_tokens=new, generator=g, return_logprobs=True),
            ], args.repeats, clock)
            print(f"{name:<22}{batch:>6}" + "".join(f"{r:>10.0f}" for r in rates[:3])
                  + f"{rates[3]:>11.0f}{rates[2] / rates[0]:>9.2f}x")


if __name__ == "__main__":
    main()
