"""Attention under the lab's bf16 autocast: the CPU's fused attention kernel in bf16 against float32.

    .venv/bin/python scripts/bench_attention.py --threads 2 --repeats 3
    .venv/bin/python scripts/bench_attention.py --threads 1 --repeats 3

First ``scaled_dot_product_attention`` forward + backward (causal) at the lab's shapes: batch 32, 96 positions (48
prompt + 48 response), head dim 32, 4 heads (the oracle and the teacher, size m) or 2 (the student, size xs). Under
``torch.autocast("cpu", dtype=torch.bfloat16)`` Hugging Face's attention runs with bf16 inputs; running it in
float32 instead (the inputs cast up, autocast off around it: ``precision=bfloat16-fp32-attention``) is the lever
measured here. Then whole training steps of the lab's GPT-2 sizes (SFT loss, as the oracle's and teacher's stage
0-1 run) at ``precision`` ``bfloat16`` (the lab's default) and ``bfloat16-fp32-attention``, interleaved. Best of
``--repeats`` timings (20 calls or 10 steps each), after a warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from teacherhack.models import LM, build_model, collate_prompts
from teacherhack.sources import Batch
from teacherhack.training import make_optimizer, optimizer_step, prepared, sft_loss


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
    print("\nseconds per training step (batch 32 × (48 + 48), vocabulary 1,024)")
    print("| size | precision bfloat16 (the default) | bfloat16-fp32-attention | speed-up |")
    print("| --- | --- | --- | --- |")
    for size in ("m", "xs"):
        best = {"bfloat16": [], "bfloat16-fp32-attention": []}
        for _ in range(args.repeats):
            for precision in best:
                best[precision].append(step_seconds(size, precision))
        default, float32 = min(best["bfloat16"]), min(best["bfloat16-fp32-attention"])
        print(f"| {size} | {default:.3f} | {float32:.3f} | {default / float32:.2f}× |")


def step_seconds(size: str, precision: str, steps: int = 10) -> float:
    model = build_model("gpt2", size, vocab_size=1024, pad_id=0, eos_id=1, max_positions=96, seed=0)
    lm = LM(model, pad_id=0, eos_id=1)
    generator = torch.Generator().manual_seed(0)
    batch = Batch(collate_prompts(torch.randint(3, 1024, (32, 48), generator=generator).tolist(), 0),
                  torch.randint(3, 1024, (32, 48), generator=generator), "bench", None)
    optimizer, loss = make_optimizer(lm, 1e-3), sft_loss(lm)
    with prepared(lm, optimizer) as ready:
        for _ in range(3):
            optimizer_step(lm, ready, batch, loss, lr=1e-3, precision=precision)
        start = time.perf_counter()
        for _ in range(steps):
            optimizer_step(lm, ready, batch, loss, lr=1e-3, precision=precision)
    return (time.perf_counter() - start) / steps


if __name__ == "__main__":
    main()
