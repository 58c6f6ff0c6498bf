"""Attention under the lab's bf16 autocast: the CPU's fused attention kernel in bf16 against float32.

    .venv/bin/python scripts/bench_attention.py --threads 2 --repeats 3
    .venv/bin/python scripts/bench_attention.py --threads 1 --repeats 3

First ``scaled_dot_product_attention`` forward + backward (causal) at the lab's shapes: batch 32, 96 positions (48
prompt + 48 response), head dim 32, 4 heads (the oracle and the teacher, size m) or 2 (the student, size xs). Under
``torch.autocast("cpu", dtype=torch.bfloat16)`` Hugging Face's attention runs with bf16 inputs; running it in
float32 instead (the inputs cast up, autocast off around it) is the lever measured here. Then whole training
steps of the lab's GPT-2 sizes under bf16 autocast (SFT loss, as the oracle's and teacher's stage 0-1 run),
with Hugging Face's attention as the lab runs it and with it in float32 (a Hugging Face attention function
registered here), interleaved. Best of ``--repeats`` timings (20 calls or 10 steps each), after a warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from teacherhack.models import LM, build_model, collate_prompts
from teacherhack.sources import Batch
from teacherhack.training import make_optimizer, optimizer_step, prepared, sft_loss


def float32_attention(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN003, ANN201
    """Hugging Face's SDPA attention with its inputs in float32 and autocast off around it."""
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


AttentionInterface.register("float32_sdpa", float32_attention)
AttentionMaskInterface.register("float32_sdpa", sdpa_mask)  # the masks Hugging Face builds for its own SDPA


def seconds(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: SDPBackend, calls: int = 20) -> float:
    with sdpa_kernel(backend):
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        start = time.perf_counter()
        for _ in range(calls):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; ms per forward + backward, best of {args.repeats}")
    print("| heads | bf16 flash | bf16 math | float32 flash | float32 math |")
    print("| --- | --- | --- | --- | --- |")
    for heads in (4, 2):
        cells = []
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(32, heads, 96, 32, dtype=dtype, requires_grad=True) for _ in range(3))
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
                cells.append(min(seconds(q, k, v, backend) for _ in range(args.repeats)) * 1000)
        print(f"| {heads} | " + " | ".join(f"{ms:.1f}" for ms in cells) + " |")
    print("\nseconds per training step (bf16 autocast, batch 32 × (48 + 48), vocabulary 1,024)")
    print("| size | bf16 attention (as the lab runs) | float32 attention | speed-up |")
    print("| --- | --- | --- | --- |")
    for size in ("m", "xs"):
        best = {"sdpa": [], "float32_sdpa": []}
        for _ in range(args.repeats):
            for attention in best:
                best[attention].append(step_seconds(size, attention))
        default, float32 = min(best["sdpa"]), min(best["float32_sdpa"])
        print(f"| {size} | {default:.3f} | {float32:.3f} | {default / float32:.2f}× |")


def step_seconds(size: str, attention: str, steps: int = 10) -> float:
    model = build_model("gpt2", size, vocab_size=1024, pad_id=0, eos_id=1, max_positions=96, seed=0)
    model.set_attn_implementation(attention)
    lm = LM(model, pad_id=0, eos_id=1)
    generator = torch.Generator().manual_seed(0)
    batch = Batch(collate_prompts(torch.randint(3, 1024, (32, 48), generator=generator).tolist(), 0),
                  torch.randint(3, 1024, (32, 48), generator=generator), "bench", None)
    optimizer, loss = make_optimizer(lm, 1e-3), sft_loss(lm)
    with prepared(lm, optimizer) as ready:
        for _ in range(3):
            optimizer_step(lm, ready, batch, loss, lr=1e-3, precision="bfloat16")
        start = time.perf_counter()
        for _ in range(steps):
            optimizer_step(lm, ready, batch, loss, lr=1e-3, precision="bfloat16")
    return (time.perf_counter() - start) / steps


if __name__ == "__main__":
    main()
