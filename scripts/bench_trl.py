"""teacherhack's stage-2 path against TRL's GKDTrainer, on identical models, data and settings.

The peer side is the shared harness ``../shared/bench-trl/bench_gkd.py`` (TRL's GKDTrainer on a tiny Llama teacher
4 × 256 and student 2 × 128, vocabulary 2,048, 512 conversations of 40 prompt + 40 completion tokens). This script
builds those assets once with the harness (``--mode prepare``), runs the harness for TRL's figures, then runs
teacherhack's own stage-2 pieces on the same assets (the data source, ``distill_loss`` and ``optimizer_step``, as
``teacherhack.distill`` composes them) and prints both and their ratios:

- off-policy: forward KL on the dataset's completions. TRL runs the teacher at every step; teacherhack computes the
  teacher's distributions on the fixed dataset once (exact, ``TeacherSignals``) and reuses them. Both steady-state
  rates are printed, and teacherhack's again with that one-time pass charged to a single epoch of the data
  (the lab reuses its offline set for 64 epochs, where the charge vanishes);
- on-policy: the student samples the completion (temperature 1) and is trained on it with forward KL.

teacherhack's side runs in a process set up as a stage-2 run's is (``launch.keep_freed_memory``: glibc keeps freed
memory for the next tensors); TRL's side runs with the C library's defaults, or with ``--trl-keep-freed-memory``
under the same allocator settings (glibc's ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``).

    .venv/bin/python scripts/bench_trl.py --steps 60 --warmup 5 --batch 8 --threads 2
    .venv/bin/python scripts/bench_trl.py --steps 60 --warmup 5 --batch 8 --threads 2 --bf16
    .venv/bin/python scripts/bench_trl.py --steps 60 --warmup 5 --batch 8 --threads 2 --bf16 --fp32-attention
    .venv/bin/python scripts/bench_trl.py --steps 60 --warmup 5 --batch 8 --threads 2 --modes on --teacher-prompt-cache
    .venv/bin/python scripts/bench_trl.py --steps 60 --warmup 5 --batch 8 --threads 2 --trl-keep-freed-memory

``--fp32-attention``: teacherhack's side at ``precision=bfloat16-fp32-attention`` (attention in float32 under the
bf16 autocast; TRL's side stays at its own bf16). ``--teacher-prompt-cache``: on-policy, teacherhack keeps the
teacher's keys and values on the dataset's prompts, computed once (``distill.teacher_prompt_cache``: the same
distributions, not the same bits), and charges that pass as the off-policy mode charges its cached teacher.

One JSON line per measurement, then a table: each pair's ratio (a pair runs back to back; the development
machine's speed drifts by up to 40% between pairs) and the ratio of the medians. TRL's ``trl.experimental``
warning is silenced.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[2] / "shared" / "bench-trl" / "bench_gkd.py"


def trl(args: argparse.Namespace, mode: str) -> dict:
    """TRL's figures from the shared harness, in its own process (so that its peak memory is its own)."""
    command = [sys.executable, str(HARNESS), "--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--threads", str(args.threads), "--assets", str(args.assets),
               "--temperature", "1.0", *(["--bf16"] if args.bf16 else [])]
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    if args.trl_keep_freed_memory:  # what teacherhack's keep_freed_memory sets, through glibc's environment
        env |= {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def ours(args: argparse.Namespace, mode: str) -> dict:
    """teacherhack's stage-2 loop on the harness's assets, in a fresh process (see ``--child``)."""
    command = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--threads", str(args.threads), "--assets", str(args.assets),
               *(["--bf16"] if args.bf16 else []), *(["--fp32-attention"] if args.fp32_attention else []),
               *(["--teacher-prompt-cache"] if args.teacher_prompt_cache else [])]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    from teacherhack.divergences import response_mask
    from teacherhack.generation import HFSampler
    from teacherhack.launch import keep_freed_memory
    from teacherhack.models import LM, collate_prompts, load_pretrained, pad_responses
    from teacherhack.sources import FixedPairs, OnlineSamples
    from teacherhack.teacher_signals import TeacherSignals
    from teacherhack.training import distill_loss, make_optimizer, optimizer_step, prepared

    keep_freed_memory()  # as a stage-2 run's process does
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.assets / "tokenizer")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    teacher, student = (LM(load_pretrained(args.assets / role), pad_id=pad, eos_id=eos) for role in ("teacher", "student"))
    prompts, completions = [], []
    for line in (args.assets / "data.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        prompts.append(list(prompt))
        completions.append(list(full[len(prompt):]))
    assert all(c[-1] == eos for c in completions), "completions end with the end-of-turn token (EOS)"
    precision = "bfloat16-fp32-attention" if args.fp32_attention else "bfloat16" if args.bf16 else "float32"
    cache_seconds, prompt_states = 0.0, None
    if args.child == "off":
        start = time.perf_counter()
        parts = []
        for i in range(0, len(prompts), 64):  # the teacher once over the fixed dataset
            batch = pad_responses(completions[i:i + 64], pad)
            with torch.no_grad():
                log_p = teacher.next_token_logprobs(collate_prompts(prompts[i:i + 64], pad), batch)
            parts.append(TeacherSignals.from_logprobs(log_p, response_mask(batch, eos)))
        signals = TeacherSignals.concat(parts)
        cache_seconds = time.perf_counter() - start
        source = FixedPairs(prompts, completions, batch_size=args.batch, seed=0, pad_id=pad, origin="offline",
                            signals=signals, eos_id=eos)
    else:
        if args.teacher_prompt_cache:  # the teacher's keys and values on every prompt, once
            start = time.perf_counter()
            prompt_states = teacher.prompt_states(collate_prompts(prompts, pad))
            cache_seconds = time.perf_counter() - start
        source = OnlineSamples(prompts, HFSampler(student), batch_size=args.batch, seed=0, pad_id=pad, eos_id=eos,
                               max_new_tokens=40, origin="online_student", sync_from=student)
    loss_fn = distill_loss(student, teacher, loss="forward_kl", beta=0.5, alpha=0.1, temperature=1.0, chunk_size=None,
                           prompt_states=prompt_states)
    optimizer = make_optimizer(student, 1e-4)
    ends, tokens = [], []
    with prepared(student, optimizer) as ready:
        begin = time.perf_counter()
        for step in range(args.steps):
            batch = source.batch(step)
            tokens.append(int(batch.prompts.mask.sum()) + int(response_mask(batch.responses, eos).sum()))
            optimizer_step(student, ready, batch, loss_fn, lr=1e-4, precision=precision)
            ends.append(time.perf_counter())
    w = min(args.warmup, args.steps - 1)
    seconds = ends[-1] - (ends[w - 1] if w > 0 else begin)
    steps = args.steps - w
    epoch_steps = len(prompts) / args.batch
    print(json.dumps({
        "bench": "teacherhack", "mode": args.child, "precision": precision, "steps": steps,
        "steps_per_s": steps / seconds, "tokens_per_s": sum(tokens[w:]) / seconds,
        "teacher_pass_s": cache_seconds,
        "steps_per_s_one_epoch": steps / (seconds + cache_seconds * steps / epoch_steps) if cache_seconds else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides")
    parser.add_argument("--fp32-attention", action="store_true",
                        help="with --bf16: teacherhack's attention in float32 (precision=bfloat16-fp32-attention)")
    parser.add_argument("--trl-keep-freed-memory", action="store_true",
                        help="TRL's side under the allocator settings teacherhack's processes use")
    parser.add_argument("--teacher-prompt-cache", action="store_true",
                        help="on-policy: teacherhack's teacher keeps its keys and values on the prompts")
    parser.add_argument("--modes", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--repeats", type=int, default=4, help="measurements per side and mode (interleaved)")
    parser.add_argument("--assets", type=Path, default=Path("runs/gkd-assets"), help="built by the harness if missing")
    parser.add_argument("--child", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fp32_attention and not args.bf16:
        parser.error("--fp32-attention needs --bf16 (it changes only the attention of the bf16 autocast)")
    if args.child:
        child(args)
        return
    if not (args.assets / "data.jsonl").exists():
        subprocess.run([sys.executable, str(HARNESS), "--mode", "prepare", "--assets", str(args.assets)], check=True,
                       capture_output=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    table = []
    for mode in args.modes:
        runs = {"trl": [], "teacherhack": []}
        for _ in range(args.repeats):  # interleaved, so that a busy moment hurts both sides alike
            for side, run in (("trl", trl), ("teacherhack", ours)):
                record = run(args, mode)
                print(json.dumps(record), flush=True)
                runs[side].append(record)
        rate = {side: [r["steps_per_s"] for r in records] for side, records in runs.items()}
        table.append((mode, rate, [r["steps_per_s_one_epoch"] for r in runs["teacherhack"]],
                      [r["peak_rss_mib"] for side in runs for r in runs[side]]))
    precision = ("bf16, teacherhack attention fp32" if args.fp32_attention else "bf16") if args.bf16 else "fp32"
    precision += ", teacherhack's teacher prompt cache" if args.teacher_prompt_cache else ""
    precision += ", TRL with teacherhack's allocator settings" if args.trl_keep_freed_memory else ""
    print(f"\n{precision}, batch {args.batch}, {args.threads} threads, {args.steps} steps ({args.warmup} warm-up)")
    print("| mode | TRL steps/s | teacherhack steps/s | ratio, pair by pair | ratio of the medians | "
          "teacherhack, teacher pass charged to one epoch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, rate, epoch, _ in table:
        ratios = [ours_rate / trl_rate for ours_rate, trl_rate in zip(rate["teacherhack"], rate["trl"])]
        medians = statistics.median(rate["teacherhack"]) / statistics.median(rate["trl"])
        once = ", ".join(f"{x:.1f}" for x in epoch if x) or "–"
        print(f"| {mode} | {', '.join(f'{x:.1f}' for x in rate['trl'])} | "
              f"{', '.join(f'{x:.1f}' for x in rate['teacherhack'])} | {', '.join(f'{x:.2f}×' for x in ratios)} | "
              f"{medians:.2f}× | {once} |")


if __name__ == "__main__":
    main()
