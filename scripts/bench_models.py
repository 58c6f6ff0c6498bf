"""Training throughput of the lab's architectures at its size presets (forward + backward + AdamW, CPU).

    .venv/bin/python scripts/bench_models.py --sizes xs m l --threads 2 --precision float32 bfloat16

Batch 32 of 48 prompt + 48 response tokens, vocabulary 1,024: the default preset's shapes. ``bfloat16``: the
forward pass under bf16 autocast, as ``training.optimizer_step`` runs it with ``precision=bfloat16`` (weights,
gradients and optimizer state stay float32).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from teacherhack.divergences import response_mask, token_cross_entropy
from teacherhack.models import ARCHITECTURES, LM, build_model, collate_prompts
from teacherhack.training import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["xs", "m", "l"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = collate_prompts([[5] * 47 + [2]] * 32, 0)
    responses = torch.randint(3, 1024, (32, 48))
    responses[:, -1] = 1
    mask = response_mask(responses, 1)
    print(f"threads {args.threads}; batch 32 × (48 + 48) tokens; vocab 1,024")
    for size, arch, precision in itertools.product(args.sizes, ARCHITECTURES, args.precision):
        model = build_model(arch, size, vocab_size=1024, pad_id=0, eos_id=1, max_positions=96, seed=0)
        lm = LM(model, pad_id=0, eos_id=1)
        optimizer = make_optimizer(lm, 1e-3)  # the lab's optimiser
        for step in range(args.steps + 2):
            if step == 2:
                start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                logits = lm.logits(prompts, responses)
            token_cross_entropy(logits, responses, mask).backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds = (time.perf_counter() - start) / args.steps
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{size:>3} {arch:<6} {precision:<8} {params:5.2f}M params  {1000 * seconds:6.0f} ms/step  "
              f"{32 * 96 / seconds:7.0f} tokens/s")


if __name__ == "__main__":
    main()
