"""Measure the step times of the paper's configuration on this device and extrapolate its wall time.

    .venv/bin/python scripts/estimate_paper_scale.py --device cuda                       # on a GPU
    .venv/bin/python scripts/estimate_paper_scale.py --device cpu --batch 2 --repeats 1   # anywhere (slow)

Models are T5 v1.1 base (student) and large (teacher) built from their published shapes with random weights
(no hub needed: the cost of a step does not depend on the values). Measured: one offline distillation step
(teacher forward + student forward and backward, full-vocabulary forward KL) at 1024 input / 128 output
tokens, and one batched teacher generation of 128 tokens with a KV cache (the extra cost of online-teacher
data), in the lab's arithmetic: float32 weights, the training step under ``--precision`` (bf16 autocast by default,
as ``--scale paper`` trains), generation in float32 (sampling and evaluation stay float32). Times measured at a
smaller batch are scaled linearly to the paper's batch of 32 (generation is memory-bound: an upper bound).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import T5Config, T5ForConditionalGeneration

from teacherhack.divergences import token_divergence
from teacherhack.models import LM, collate_prompts

T5_V1_1 = {  # d_model, d_ff, layers, heads (d_kv = 64)
    "base": (768, 2048, 12, 12),
    "large": (1024, 2816, 24, 16),
}
PAPER_STEPS, PAPER_BATCH, SOURCE_LEN, TARGET_LEN = 390_625, 32, 1024, 128


def build(size: str, device: str) -> LM:
    d_model, d_ff, layers, heads = T5_V1_1[size]
    config = T5Config(vocab_size=32128, d_model=d_model, d_ff=d_ff, num_layers=layers, num_heads=heads, d_kv=64,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return LM(T5ForConditionalGeneration(config).to(device=device), pad_id=0, eos_id=1)


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bfloat16", choices=("float32", "bfloat16"),
                        help="the training step's arithmetic, as the lab's precision setting (default: its default)")
    parser.add_argument("--batch", type=int, default=PAPER_BATCH)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    teacher, student = build("large", args.device), build("base", args.device)
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,
                              enabled=args.precision != "float32")
    optimizer = torch.optim.AdamW(student.model.parameters(), lr=3e-4)
    prompts = collate_prompts([[5] * (SOURCE_LEN - 1) + [1]] * args.batch, 0)
    responses = torch.randint(2, 32000, (args.batch, TARGET_LEN), device=args.device)
    mask = torch.ones_like(responses, dtype=torch.bool)

    def distill_step() -> None:
        with autocast:
            with torch.no_grad():
                teacher_logits = teacher.logits(prompts, responses)
            loss = token_divergence(teacher_logits, student.logits(prompts, responses), mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def generate() -> None:
        teacher.sample(prompts, max_new_tokens=TARGET_LEN, generator=torch.Generator().manual_seed(0))

    scale = PAPER_BATCH / args.batch
    step = timed(distill_step, args.repeats, args.device) * scale
    generation = timed(generate, args.repeats, args.device) * scale  # an untrained model rarely stops early
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}, precision {args.precision}, measured at batch {args.batch} (scaled ×{scale:g} to {PAPER_BATCH})")
    print(f"offline distillation step: {step:.3f} s  → {PAPER_STEPS:,} steps: {step * PAPER_STEPS / 3600:,.0f} h")
    print(f"teacher generation (128 tokens): {generation:.3f} s/step → online teacher adds "
          f"{generation * PAPER_STEPS / 3600:,.0f} h (online student: the student's generation, cheaper)")
    print(f"one GPU-equivalent, offline + online teacher + online student ≈ "
          f"{(3 * step + 2 * generation) * PAPER_STEPS / 3600:,.0f} h before evaluation and stages 0-1")


if __name__ == "__main__":
    main()
