"""Named lab configurations: each is a set of overrides of the defaults in ``teacherhack.config``, so it reads
as "what differs". Kept free of heavy imports: the command line lists them before it loads anything else."""

from __future__ import annotations

from typing import Any

LAB_PRESETS: dict[str, dict[str, Any]] = {
    # The laptop regime (see docs/PHENOMENON.md): a teacher over-fitted on few oracle samples, a small student.
    "default": {},
    # A smoke run of the whole pipeline in about two minutes; it makes no claim about hacking.
    "quick": {
        "task.n_validation": 48, "task.n_distill": 64, "task.n_stage1": 256, "task.n_oracle": 2000,
        "task.max_prompt_len": 32, "task.max_response_len": 32, "task.vocab_size": 512,
        "models.oracle": "s", "models.teacher": "xs", "models.student": "xxs",
        "oracle.epochs": 1.0, "oracle.batch_size": 32, "oracle.warmup": 10,
        "teacher.samples": 256, "teacher.epochs": 2.0, "teacher.warmup": 5,
        "student.samples": 128, "student.epochs": 1.0, "student.warmup": 5,
        "distill.steps": 40, "distill.batch_size": 16, "distill.warmup": 5, "distill.prompts": None,
        "eval.every": 10, "eval.prompts": 32, "eval.samples_per_prompt": 2, "eval.batch_size": 64,
        "eval.reverse_samples": 32,
    },
    # The paper's Table 1 (XSum): T5 v1.1 XL oracle fine-tuned on real pairs, T5-large teacher and T5-base
    # student SFT on oracle samples, distillation for 390,625 steps at batch 32, LR 3e-4, 1024/128 tokens.
    # XSum's 204,045 training documents cannot hold the paper's 100k + 200k prompts as disjoint pools, so the
    # pools here are 50k (stage 1) and 100k (distillation), the oracle taking the ~53k left. Needs GPUs and
    # the hub (or local copies: models.* and task.spec=xsum:PATH); see the README. Memory, estimated from the
    # shapes for one 141 GB H200 (README, "Limits at this scale"): the oracle trains in micro-batches of 8 rows,
    # the teacher in micro-batches of 16, and the datasets are sampled 128 prompts per generation call.
    "paper": {
        "task.spec": "xsum", "task.n_validation": 1000, "task.n_distill": 100_000, "task.n_stage1": 50_000,
        "distill.prompts": None,
        "task.n_oracle": None, "task.max_prompt_len": 1024, "task.max_response_len": 128,
        "models.arch": "t5", "models.oracle": "google/t5-v1_1-xl", "models.teacher": "google/t5-v1_1-large",
        "models.student": "google/t5-v1_1-base", "models.vocab_size": 32_100,  # the output layers' 28 unused ids
        "oracle.epochs": 1.0, "oracle.lr": 3e-4, "oracle.warmup": 100, "oracle.schedule": "constant",
        "oracle.grad_accum": 4, "teacher.grad_accum": 2, "sampling_batch": 128,
        "teacher.samples": None, "teacher.epochs": 1.0, "teacher.lr": 3e-4, "teacher.warmup": 100,
        "student.samples": None, "student.epochs": 1.0, "student.lr": 3e-4, "student.warmup": 100,
        "student.schedule": "constant",
        "distill.steps": 390_625, "distill.batch_size": 32, "distill.lr": 3e-4, "distill.warmup": 100,
        "distill.schedule": "constant", "eval.every": 10_000, "eval.prompts": 1000, "eval.samples_per_prompt": 1,
        "eval.batch_size": 64, "eval.reverse_samples": 256,
    },
}
