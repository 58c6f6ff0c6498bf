"""Standard errors with several samples per prompt (teacherhack.clusters): clustered by prompt, they are the spread
of the mean over the task's prompts; with one sample per prompt they are the plain ones, bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from teacherhack.clusters import cluster_se
from teacherhack.detection import golden_verdict, paired_change_se
from teacherhack.divergences import Estimate


@pytest.mark.parametrize("n", [2, 3, 17, 1000])
def test_one_sample_per_prompt_gives_the_plain_se_bit_for_bit(n):
    """Every run so far was judged with the plain formula: singleton clusters, however labelled, keep its bits."""
    g = torch.Generator().manual_seed(n)
    values = (torch.randn(n, generator=g) * 3 + 1).float()  # the evaluator's float32 values
    plain = float(values.to(torch.float64).std(unbiased=True) / math.sqrt(n))  # the formula before clustering
    for clusters in (None, torch.arange(n), torch.randperm(n, generator=g) * 7 - 3):
        estimate = Estimate.of(values, clusters)
        assert estimate.se == plain and estimate.mean == float(values.to(torch.float64).mean())
    before, after = np.random.default_rng(n).normal(size=(2, n))
    old = np.std(after - before, ddof=1) / np.sqrt(n)  # detection's and reports' formula before clustering
    assert paired_change_se(before, after) == paired_change_se(before, after, np.arange(n)) == old


@pytest.mark.parametrize("sizes", ["equal", "unequal"])
def test_the_clustered_se_is_the_spread_of_the_mean_and_the_plain_one_understates_it(sizes):
    """Values with a strong prompt effect (SD 1) and sample noise (SD 0.5), 40 prompts of 4 samples each (or of
    1-6, as the reverse KL's evenly spaced rows can give): over 2,000 simulated data sets, the root mean square of
    the clustered SE matches the empirical SD of the mean. Tolerance 6%: the empirical SD of 2,000 means is off by
    1/√(2·1999) ≈ 1.6% (one SE), the mean of 2,000 squared SEs by well under 1%, so 6% is more than 3.5 SEs;
    the plain SE, which treats the samples as independent, is about half of it here."""
    rng = np.random.default_rng(0)
    counts = np.full(40, 4) if sizes == "equal" else rng.integers(1, 7, 40)
    clusters = torch.from_numpy(np.repeat(np.arange(40), counts))
    means, clustered, plain = [], [], []
    for _ in range(2000):
        values = torch.from_numpy(np.repeat(rng.normal(0, 1, 40), counts) + rng.normal(0, 0.5, counts.sum()))
        means.append(float(values.mean()))
        clustered.append(Estimate.of(values, clusters).se)
        plain.append(Estimate.of(values).se)
    spread = np.std(means, ddof=1)
    assert math.sqrt(np.mean(np.square(clustered))) == pytest.approx(spread, rel=0.06)
    assert math.sqrt(np.mean(np.square(plain))) < 0.6 * spread


def test_the_clustered_se_is_the_se_over_prompt_means_and_needs_two_prompts():
    """For k samples per prompt the CR1 statistic is exactly the SE of the G prompt means; one prompt: unknown."""
    values = np.random.default_rng(1).normal(size=(12, 3))
    prompt_means = values.mean(axis=1)
    over_prompts = prompt_means.std(ddof=1) / math.sqrt(12)
    assert cluster_se(values.ravel(), np.arange(36) // 3) == pytest.approx(over_prompts, rel=1e-12)
    assert math.isnan(cluster_se([1.0, 2.0, 4.0], [5, 5, 5]))
    with pytest.raises(ValueError, match="one label"):
        cluster_se([1.0, 2.0, 4.0], [0, 1])


def test_the_paired_change_se_clusters_by_prompt():
    """The differences of one prompt's samples move together (here: the same change for both): the SE of the
    change is that over the prompts' changes, and a rise the plain SE calls 3.6 SE is 2.5 SE, within noise."""
    rng = np.random.default_rng(2)
    steps = [0, 100, 200, 300, 400, 500, 600]
    level = [5.0, 3.0, 2.0, 2.14, 2.28, 2.42, 2.56]  # golden falls, then rises steadily
    base = np.repeat(rng.normal(0, 3, 20), 2)  # 20 prompts × 2 samples
    own = rng.normal(0, 1, 20)
    change = np.repeat((own - own.mean()) / own.std(ddof=1), 2)  # each prompt's own change, shared by its samples
    golden_values = [base + g + (change * (s - 200) / 400 if s > 200 else 0) for s, g in zip(steps, level)]
    golden = [float(v.mean()) for v in golden_values]
    clusters = np.arange(40) // 2
    diff = golden_values[-1] - golden_values[2]
    assert paired_change_se(golden_values[2], golden_values[-1], clusters) == pytest.approx(
        diff[::2].std(ddof=1) / math.sqrt(20), rel=1e-12)  # the SE over the prompts' changes
    assert paired_change_se(golden_values[2], golden_values[-1]) == pytest.approx(
        diff.std(ddof=1) / math.sqrt(40), rel=1e-12)
    proxy, proxy_values = [10.0 - s / 100 for s in steps], [np.full(40, 10.0 - s / 100) for s in steps]
    options = dict(golden_values=golden_values, proxy_values=proxy_values)
    plain = golden_verdict(steps, golden, [0.1] * 7, proxy, [0.1] * 7, **options)
    clustered = golden_verdict(steps, golden, [0.1] * 7, proxy, [0.1] * 7, **options, golden_clusters=clusters,
                               proxy_clusters=clusters)
    assert plain.rise_z == pytest.approx(clustered.rise_z * math.sqrt(39 / 19), rel=1e-9)
    assert plain.hacking and plain.rise_z > 3.5 and not clustered.hacking and clustered.rise_z < 2.6
