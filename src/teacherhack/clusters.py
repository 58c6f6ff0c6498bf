"""The standard error of a mean over samples drawn several per prompt: the samples of one prompt share it, so they
are correlated, and the SE of a mean over the task's prompts must count each prompt once (the prompt is the
cluster)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def cluster_se(values: Sequence[float] | np.ndarray, clusters: Sequence[int] | np.ndarray) -> float | None:
    """The cluster-robust (CR1) standard error of the mean of ``values``, ``clusters`` giving each value's prompt:
    se² = G/(G−1) · Σ_g (Σ_{i∈g} (x_i − x̄))² / n² over the G prompts. For k values per prompt it is the SE over the
    G prompt means, what the mean over the task's prompts varies by; it also takes prompts with different counts
    (the reverse KL's evenly spaced rows). NaN with one prompt. None when every prompt has one value: it is then
    s/√n, and callers keep their plain formula for it, whose bits every run so far was judged with."""
    x = np.asarray(values, dtype=np.float64).ravel()
    labels = np.unique(np.asarray(clusters), return_inverse=True)[1].ravel()
    if labels.size != x.size:
        raise ValueError(f"{x.size} values but {labels.size} cluster labels: one label (its prompt) per value")
    count = int(labels.max()) + 1 if labels.size else 0
    if count == x.size:
        return None
    if count < 2:
        return math.nan
    sums = np.bincount(labels, weights=x - x.mean(), minlength=count)
    return math.sqrt(count / (count - 1) * float(sums @ sums)) / x.size
