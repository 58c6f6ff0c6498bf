"""Two processes (torchrun, gloo on CPU) give the metrics of one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from teacherhack import config as cfg
from teacherhack.lab import run_lab

from conftest import TINY

pytestmark = pytest.mark.slow
WORKER = Path(__file__).parent / "scripts" / "lab_worker.py"
WAIT_WORKER = Path(__file__).parent / "scripts" / "wait_worker.py"
RESUME_WORKER = Path(__file__).parent / "scripts" / "resume_worker.py"
ACCUM_WORKER = Path(__file__).parent / "scripts" / "accum_worker.py"
# Float sums run in another order on two processes (gradients all-reduced, values gathered), and AdamW
# carries the differences over 12 steps: agreement to 1e-4 relative is the stated tolerance.
TOLERANCE = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, cache: Path, overrides: dict) -> None:
    run_two(WORKER, str(out), str(cache), json.dumps(overrides))


def run_two(script: Path, *args: str, processes: int = 2) -> str:
    """``script`` on two (or ``processes``) processes under torchrun; its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
               "127.0.0.1",
               "--master_port", str(free_port()), str(script), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_process_distillation_matches_one_process(tiny_task: Path, tmp_path: Path):
    overrides = {**TINY, "task.spec": f"jsonl:{tiny_task}", "distill.sources": "offline,online_student"}
    cache = tmp_path / "cache"
    run_lab(cfg.resolve("quick", overrides), tmp_path / "one", cache)
    torchrun(tmp_path / "two", cache, overrides)  # upstream reused: stage 2 runs on two processes

    one, two = rows(tmp_path / "one" / "offline"), rows(tmp_path / "two" / "offline")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 4, 8, 12]
    for a, b in zip(one, two):
        for key in ("golden", "proxy", "golden_se", "proxy_se", "proxy_train_se", "oracle_nll_se", "train_loss"):
            if a[key] is None:
                assert b[key] is None
            else:
                assert b[key] == pytest.approx(a[key], rel=TOLERANCE), (a["step"], key)
    per_sample = {n: [json.loads(line) for line in (tmp_path / n / "offline" / "per_sample.jsonl").read_text().splitlines()]
                  for n in ("one", "two")}
    # the evaluation's 8 prompts × 2 samples, gathered from both in row order: the SEs above cluster them alike
    assert len(per_sample["two"][0]["golden"]) == 16
    for a, b in zip(per_sample["one"], per_sample["two"]):  # sample by sample, in the same order
        for key in ("golden", "proxy", "oracle_nll"):
            assert b[key] == pytest.approx(a[key], rel=TOLERANCE, abs=1e-6), (a["step"], key)
    # Online-student samples are drawn per process (other seeds), so only the distribution matches.
    online_one, online_two = rows(tmp_path / "one" / "online_student"), rows(tmp_path / "two" / "online_student")
    assert online_two[-1]["proxy"] < online_two[0]["proxy"]
    assert online_two[-1]["tokens_generated"] > 0 and online_one[-1]["tokens_generated"] > 0


def test_two_processes_build_the_upstream_together(tiny_task: Path, tmp_path: Path):
    overrides = {**TINY, "task.spec": f"jsonl:{tiny_task}", "distill.sources": "offline", "distill.steps": 4}
    torchrun(tmp_path / "lab", tmp_path / "cache", overrides)
    summary = json.loads((tmp_path / "lab" / "summary.json").read_text())
    assert set(summary["cache"].values()) == {"built"}
    artifacts = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "artifacts").iterdir())
    assert "oracle" in artifacts and not any(".tmp-" in p.name for p in (tmp_path / "cache" / "artifacts").iterdir())
    assert rows(tmp_path / "lab" / "offline")[-1]["step"] == 4


def test_processes_wait_for_the_main_one_longer_than_the_default_timeout():
    # the main process builds some artifacts alone (hours at the paper's scale) while the others wait at a barrier
    out = run_two(WAIT_WORKER)
    assert "rank 0 waited" in out and "rank 1 waited" in out


def test_shards_that_split_into_different_numbers_of_micro_batches_train_together():
    """9 rows on 2 processes are shards of 5 and 4, which grad_accum=3 splits into 3 and 2 micro-batches: the
    processes ran different numbers of collectives (one non-finite check per micro-batch) and gloo aborted. They
    now take the step of one process on the whole batch."""
    out = run_two(ACCUM_WORKER, "3")
    assert "5 rows in 3 micro-batches" in out and "4 rows in 2 micro-batches" in out
    alone = subprocess.run([sys.executable, str(ACCUM_WORKER), "1"], capture_output=True, text=True, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    two, one = ([float(x) for x in next(line for line in text.splitlines() if line.startswith("params")).split()[1:]]
                for text in (out, alone))
    assert two == pytest.approx(one, rel=TOLERANCE, abs=1e-6)


def test_a_run_resumed_on_three_processes_continues_bit_for_bit():
    """DDP rebuilt its gradient buckets after the first step; a resumed run, wrapped anew, summed its first step in
    the first layout where the uninterrupted run used the rebuilt one: on 3 processes (ring all-reduce: the order of
    the sums depends on the layout) other bits from the resume on. 2 processes cannot show it (a + b = b + a)."""
    out = run_two(RESUME_WORKER, processes=3)
    assert "world 3: resumed == uninterrupted bit for bit: True" in out, out
