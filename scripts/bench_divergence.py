"""Benchmark: chunked vs unchunked token-level forward-KL loss on CPU (forward + backward).

For every configuration (input dtype x chunk size) a *fresh subprocess* builds the inputs, then runs
one warm-up and ``--repeats`` timed forward+backward passes of
``token_divergence(teacher, student, mask, divergence="forward_kl", chunk_size=...)`` with the student
logits requiring grad (the teacher is frozen, as in distillation). Reported:

* time: the median wall-clock of the timed repeats (``time.perf_counter``);
* peak extra memory: the process's peak resident set size (``VmHWM`` in ``/proc/self/status``) during
  the warm-up and repeats, minus its resident size (``VmRSS``) just before them, when the inputs already
  exist. The peak is reset with ``echo 5 > /proc/self/clear_refs`` right before the measured phase
  (where the kernel refuses that, the peak since process start is used and the output says so). This
  counts every allocation, torch's included (``tracemalloc`` sees none of them), and includes the
  student logits' gradient (B*T*V*itemsize), which both variants must allocate.

Usage: python scripts/bench_divergence.py [--batch 8 --seq 256 --vocab 32000 --chunks 16 64 --repeats 3]
       [--dtypes float32 bf16] [--mmap-threshold BYTES]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DTYPES = {"float32": "float32", "bf16": "bfloat16"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> None:
    import torch

    from teacherhack.divergences import token_divergence

    torch.manual_seed(0)
    dtype = getattr(torch, DTYPES[args.dtype])
    chunk = None if args.chunk == 0 else args.chunk
    shape = (args.batch, args.seq, args.vocab)
    teacher = torch.empty(shape, dtype=dtype).normal_(0.0, 2.0)
    student = torch.empty(shape, dtype=dtype).normal_(0.0, 2.0).requires_grad_(True)
    mask = torch.ones(args.batch, args.seq, dtype=torch.bool)

    def step() -> float:
        student.grad = None
        start = time.perf_counter()
        loss = token_divergence(teacher, student, mask, divergence="forward_kl", chunk_size=chunk)
        loss.backward()
        elapsed = time.perf_counter() - start
        assert torch.isfinite(loss)
        return elapsed

    baseline_kib = _status_kib("VmRSS")
    reset = _reset_peak()
    step()  # warm-up
    times = [step() for _ in range(args.repeats)]
    peak_kib = _status_kib("VmHWM")
    print(json.dumps({
        "dtype": args.dtype, "chunk": chunk, "median_s": statistics.median(times), "times_s": times,
        "peak_extra_mib": (peak_kib - baseline_kib) / 1024, "peak_reset": reset,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 64], help="chunk sizes to compare")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ in the workers, so that freed blocks above it go "
                             "back to the OS at once: the peak then counts live tensors, not allocator caching")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    b, t, v = args.batch, args.seq, args.vocab
    print(f"forward-KL loss, forward+backward, CPU; B={b} T={t} V={v}; student requires grad, teacher frozen; "
          f"all {b * t} positions in the mask")
    print(f"time: median of {args.repeats} repeats after 1 warm-up; memory: peak RSS (VmHWM, reset via "
          f"/proc/self/clear_refs) minus RSS before the measured phase, fresh subprocess per configuration")
    print(f"one [B,T,V] tensor: {b * t * v * 4 / 2**20:.0f} MiB in float32, {b * t * v * 2 / 2**20:.0f} MiB in "
          f"bf16 (the student gradient alone is one of these)")
    env = dict(os.environ)
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        print(f"glibc MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}: peaks count live memory, not malloc's cache")
    else:
        print("glibc malloc defaults: the peaks include blocks malloc keeps cached after torch frees them")
    header = f"{'inputs':>8} {'chunk':>9} {'median s':>9} {'all repeats (s)':>24} {'peak extra MiB':>15}"
    print(header)
    print("-" * len(header))
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    notes = set()
    for dtype in args.dtypes:
        for chunk in [0, *args.chunks]:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--dtype", dtype, "--chunk", str(chunk),
                   "--batch", str(b), "--seq", str(t), "--vocab", str(v), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"{dtype:>8} {chunk or 'none':>9}  FAILED: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if not r["peak_reset"]:
                notes.add("clear_refs refused: peaks include the input set-up")
            notes.add(f"torch {r['torch']}, {r['threads']} intra-op threads")
            reps = " ".join(f"{x:.2f}" for x in r["times_s"])
            print(f"{dtype:>8} {('none' if r['chunk'] is None else r['chunk']):>9} {r['median_s']:>9.2f} "
                  f"{reps:>24} {r['peak_extra_mib']:>15.0f}")
    for note in sorted(notes):
        print(f"note: {note}")


if __name__ == "__main__":
    main()
