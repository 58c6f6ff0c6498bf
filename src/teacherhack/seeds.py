"""Named random streams: every random choice of a run comes from one of these.

A run has two seeds, ``oracle_seed`` (the ground truth: oracle initialisation, its training order, its samples)
and ``seed`` (everything else). Each stream below is an offset from one of them, so two streams never share
draws and changing one setting does not reshuffle another's randomness. The values are the ones earlier
versions used, so recorded results keep reproducing.
"""

from __future__ import annotations

import torch

# Offsets from the run seed
TEACHER_INIT = 1  # the teacher's initial weights (a fresh model of a size preset)
STUDENT_INIT = 2  # the student's initial weights
OFFLINE_SAMPLES = 3  # the teacher's samples that form the offline dataset
STAGE2 = 11  # stage 2: batch order, then sub-streams below
EVALUATION = 13  # the student's samples drawn at each evaluation (reverse KLs)
TRAIN_REFERENCES = 17  # the teacher's samples on training prompts, drawn once for evaluation
# Sub-streams inside stage 2 and evaluation
ONLINE_SAMPLES = 1 << 20  # fresh online samples, one generator per step (and per process)
MIXTURE_DRAWS = 2 << 20  # which source each mixture batch comes from
PROCESS_STRIDE = 104_729  # separates the evaluation samples of different processes
STEP_STRIDE = 7919  # separates the evaluation samples of different steps


def generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded from several integers (e.g. a stream and a step), stable across Python runs."""
    value = 0
    for s in seeds:
        value = (value * 1_000_003 + int(s) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)
