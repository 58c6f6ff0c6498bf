"""Shared fixtures: a tiny generated task and a lab configuration small enough for seconds-long runs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from teacherhack import config as cfg

WORDS = ("sun moon star sea river stone tree bird wind fire rain snow cloud hill road door king child bread salt").split()


@pytest.fixture(autouse=True)
def _single_thread():
    """Deterministic and light on a shared 2-core machine."""
    torch.set_num_threads(1)


def float_bits(x: torch.Tensor) -> torch.Tensor:
    """A float tensor's bits as integers of its width: equal only where the bits are (NaN payloads, −0.0)."""
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def make_task(path: Path, n: int = 700, seed: int = 0) -> Path:
    """Pairs "w1 w2 …" → the words reversed, upper-cased: learnable, varied, and prompt-dependent."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            words = rng.choices(WORDS, k=rng.randint(2, 5))
            f.write(json.dumps({"prompt": " ".join(words), "response": " ".join(w.upper() for w in reversed(words))}) + "\n")
    return path


TINY = {
    "task.n_validation": 16, "task.n_distill": 32, "task.n_stage1": 96, "task.n_oracle": 400,
    "task.max_prompt_len": 16, "task.max_response_len": 16, "task.vocab_size": 300,
    "models.oracle": "xxs", "models.teacher": "xxs", "models.student": "xxs",
    "oracle.epochs": 1.0, "teacher.samples": 96, "teacher.epochs": 2.0, "student.samples": 64,
    "distill.steps": 12, "distill.batch_size": 8, "distill.warmup": 2, "distill.prompts": None, "eval.every": 4,
    "eval.prompts": 8, "eval.samples_per_prompt": 2, "eval.batch_size": 16, "threads": 1, "precision": "float32",
}


@pytest.fixture
def tiny_task(tmp_path: Path) -> Path:
    return make_task(tmp_path / "task.jsonl")


@pytest.fixture
def tiny_config(tiny_task: Path) -> cfg.LabConfig:
    return cfg.resolve("quick", {**TINY, "task.spec": f"jsonl:{tiny_task}"})


# Shared by the divergence tests: tolerances against the float64 references, and the divergences exercised
INF = math.inf
F64 = dict(rtol=1e-10, atol=1e-12)  # last-digit checks (compute_dtype=float64)
F64_GRAD = dict(rtol=1e-9, atol=1e-13)
F32 = dict(rtol=2e-5, atol=2e-6)  # default float32 compute path against the float64 reference
F32_GRAD = dict(rtol=1e-4, atol=1e-6)
CONFIGS = [  # (divergence, beta, alpha)
    ("forward_kl", 0.5, 0.1),
    ("reverse_kl", 0.5, 0.1),
    ("jsd", 0.1, 0.1),
    ("jsd", 0.5, 0.1),
    ("jsd", 0.9, 0.1),
    ("skew_forward_kl", 0.5, 0.1),
    ("skew_forward_kl", 0.5, 0.5),
    ("skew_reverse_kl", 0.5, 0.1),
    ("skew_reverse_kl", 0.5, 0.5),
    ("tvd", 0.5, 0.1),
]
CONFIG_IDS = [f"{d}-b{b}-a{a}" for d, b, a in CONFIGS]
REDUCTIONS = ["sequence_mean", "token_mean", "sum"]
