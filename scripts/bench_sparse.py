"""Benchmark: top-k teacher signals against the full teacher distribution, at real vocabulary sizes (CPU).

For every vocabulary size and configuration a *fresh subprocess* builds synthetic inputs (student logits
[B, T, V] that require grad; for the full loss the teacher's [B, T, V] logits; for the sparse loss the
teacher's top-k signals, built from teacher logits that are then freed), then runs one warm-up and
``--repeats`` timed forward+backward passes of

* ``full``: ``token_divergence(teacher_logits, student_logits, mask, divergence="forward_kl")``, or
* ``tail`` / ``renormalized``: ``sparse_token_divergence(ids, logprobs, tail, student_logits, mask, ...)``,
* ``ce``: ``token_cross_entropy(student_logits, targets, mask)``, the floor of any loss on the student's
  softmax (one logsumexp over V per position, no teacher at all),

optionally with ``chunk_size`` (full and tail). Reported per configuration: the median time; the peak extra memory (peak
RSS, ``VmHWM`` reset through ``/proc/self/clear_refs``, minus the RSS once the inputs exist, as in
``scripts/bench_divergence.py``; the student's gradient, one [B, T, V] float32 tensor, is included); the
memory the teacher side needs (the full loss's teacher logits, or the signals); and, for the sparse
losses, how far storing the top-k log-probabilities in float16 or bfloat16 moves the loss from float32
storage. A second table gives what one response position costs on disk, from the stored files.

Usage: python scripts/bench_sparse.py [--vocabs 32000 152064 --batch 8 --seq 256 --ks 1 8 64 256 --repeats 3]
       [--chunk 16] [--full-unchunked-max-vocab 160000] [--losses full tail renormalized ce] [--no-disk]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench_divergence import _reset_peak, _status_kib


def worker(args: argparse.Namespace) -> None:
    import torch

    from teacherhack.divergences import sparse_token_divergence, token_cross_entropy, token_divergence
    from teacherhack.teacher_signals import TeacherSignals

    torch.manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    mask = torch.ones(args.batch, args.seq, dtype=torch.bool)
    student = torch.empty(shape).normal_(0.0, 2.0).requires_grad_(True)
    teacher = torch.empty(shape).normal_(0.0, 2.0)
    chunk = None if args.chunk == 0 else args.chunk
    result: dict = {"loss": args.loss, "k": args.k, "chunk": chunk, "vocab": args.vocab}
    if args.loss == "full":
        result["teacher_mib"] = teacher.numel() * teacher.element_size() / 2**20

        def loss() -> torch.Tensor:
            return token_divergence(teacher, student, mask, divergence="forward_kl", chunk_size=chunk)
    elif args.loss == "ce":
        targets = teacher.argmax(-1)
        del teacher
        result["teacher_mib"] = targets.numel() * targets.element_size() / 2**20

        def loss() -> torch.Tensor:
            return token_cross_entropy(student, targets, mask)
    else:
        built = {dtype: TeacherSignals.from_logprobs(teacher, mask, k=args.k, dtype=getattr(torch, dtype))
                 for dtype in ("float32", "float16", "bfloat16")}
        del teacher  # the point: only the signals remain
        batches = {dtype: s.gather(range(args.batch), mask) for dtype, s in built.items()}
        fp16 = batches["float16"]
        result["teacher_mib"] = sum(x.numel() * x.element_size() for x in (fp16.ids, fp16.logprobs, fp16.tail)) / 2**20
        with torch.no_grad():
            values = {dtype: float(sparse_token_divergence(b.ids, b.logprobs, b.tail, student, mask,
                                                           convention=args.loss)) for dtype, b in batches.items()}
        exact = values["float32"]  # 0 for renormalized at k = 1 (one token, renormalised: no signal at all)
        result["rel_err_fp16"] = abs(values["float16"] - exact) / exact if exact else None
        result["rel_err_bf16"] = abs(values["bfloat16"] - exact) / exact if exact else None
        del built, batches

        def loss() -> torch.Tensor:
            return sparse_token_divergence(fp16.ids, fp16.logprobs, fp16.tail, student, mask, convention=args.loss,
                                           chunk_size=chunk)

    def step() -> float:
        student.grad = None
        start = time.perf_counter()
        value = loss()
        value.backward()
        elapsed = time.perf_counter() - start
        assert torch.isfinite(value)
        return elapsed

    baseline_kib = _status_kib("VmRSS")
    reset = _reset_peak()
    step()  # warm-up
    times = [step() for _ in range(args.repeats)]
    result.update(median_s=statistics.median(times), times_s=times,
                  peak_extra_mib=(_status_kib("VmHWM") - baseline_kib) / 1024, peak_reset=reset,
                  threads=torch.get_num_threads(), torch=torch.__version__)
    print(json.dumps(result))


def disk_table(vocabs: list[int], ks: list[int]) -> None:
    """Bytes per position of stored files (64 positions each, header excluded by difference of two sizes)."""
    import torch

    from teacherhack.teacher_signals import TeacherSignals, bytes_per_position

    print("\n| V | signals | bytes per token (formula) | bytes per token (file) | vs dense |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in vocabs:
            logits = torch.randn(1, 128, vocab)
            configs = [(None, None)] + [(k, dtype) for k in ks for dtype in (torch.float16, torch.bfloat16)]
            for k, dtype in configs:
                sizes = []
                for n in (64, 128):  # the difference of two file sizes cancels the JSON header
                    mask = torch.zeros(1, 128, dtype=torch.bool)
                    mask[0, :n] = True
                    path = os.path.join(tmp, "s.safetensors")
                    TeacherSignals.from_logprobs(logits, mask, k=k, dtype=dtype).save(path)
                    sizes.append(os.path.getsize(path))
                measured = (sizes[1] - sizes[0]) / 64
                formula = bytes_per_position(vocab, k, dtype)
                name = "dense float32" if k is None else f"top-{k} {str(dtype).removeprefix('torch.')}"
                print(f"| {vocab:,} | {name} | {formula:,} | {measured:,.0f} | 1/{4 * vocab / formula:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 152064])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--chunk", type=int, default=16, help="chunk size of the chunked variants (0: none)")
    parser.add_argument("--full-unchunked-max-vocab", type=int, default=160000,
                        help="skip the unchunked full loss above this vocabulary (it holds ~8 [B,T,V] tensors)")
    parser.add_argument("--losses", nargs="+", default=["full", "tail", "renormalized", "ce"],
                        choices=["full", "tail", "renormalized", "ce"])
    parser.add_argument("--no-disk", action="store_true", help="skip the bytes-per-token table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # --chunk is then this run's chunk size
        worker(args)
        return

    b, t = args.batch, args.seq
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    sys.path.insert(0, src)  # this checkout's package, also for the disk table computed here
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    print(f"forward-KL family, forward+backward, CPU; B={b} T={t} ({b * t} positions, all in the mask); student "
          f"logits float32 require grad; top-k log-probabilities stored in float16 for the timings")
    print(f"time: median of {args.repeats} repeats after 1 warm-up; memory: peak RSS minus RSS once the inputs exist "
          f"(fresh subprocess per row; includes the student's gradient); teacher MiB: what the loss reads from the "
          f"teacher (its [B,T,V] logits, or the gathered signals)")
    print("\n| V | loss | k | chunk | median s | peak extra MiB | teacher MiB | loss rel. change fp16 / bf16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    notes = set()
    for vocab in args.vocabs:
        runs = [("ce", 0, 0)]
        runs += [("full", 0, 0)] if vocab <= args.full_unchunked_max_vocab else []
        runs += [("full", 0, args.chunk)] if args.chunk else []
        for k in args.ks:
            runs += [("tail", k, 0)] + ([("tail", k, args.chunk)] if args.chunk else []) + [("renormalized", k, 0)]
        for loss, k, chunk in [run for run in runs if run[0] in args.losses]:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--loss", loss, "--k", str(k),
                   "--chunk", str(chunk), "--vocab", str(vocab), "--batch", str(b), "--seq", str(t),
                   "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"| {vocab:,} | {loss} | {k or '-'} | {chunk or 'none'} | FAILED: "
                      f"{(out.stderr.strip().splitlines() or ['killed'])[-1]} | | | |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if not r["peak_reset"]:
                notes.add("clear_refs refused: peaks include the input set-up")
            notes.add(f"torch {r['torch']}, {r['threads']} intra-op threads")
            err = ("-" if loss in ("full", "ce") else "loss is 0" if r["rel_err_fp16"] is None
                   else f"{r['rel_err_fp16']:.1e} / {r['rel_err_bf16']:.1e}")
            print(f"| {vocab:,} | {loss} | {k or '-'} | {chunk or 'none'} | {r['median_s']:.2f} | "
                  f"{r['peak_extra_mib']:,.0f} | {r['teacher_mib']:,.1f} | {err} |", flush=True)
    if not args.no_disk:
        disk_table(args.vocabs, args.ks)
    for note in sorted(notes):
        print(f"note: {note}")


if __name__ == "__main__":
    main()
