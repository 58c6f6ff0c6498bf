"""How often the golden verdict (``teacherhack.detection.golden_verdict``) fires on curves whose answer is known.

    .venv/bin/python scripts/simulate_verdicts.py            # the figures in README.md and docs/PHENOMENON.md
    .venv/bin/python scripts/simulate_verdicts.py --runs 500  # a quicker, noisier look

Two experiments, each on ``--runs`` simulated runs per cell (seeded):

* Pure noise: a constant golden and proxy, each evaluation off by an independent error of exactly its stated SE
  (1), unpaired. The share of runs the rule calls hacking, for 10, 30 and 100 evaluations, with the whole rule
  and with its significance condition alone (the last value more than z SEs above the minimum) at z = 3 and 2.
* The lab's shape: 11 evaluations (steps 0-1,000), the golden falling from 85 nats towards 40 and then a plateau
  (40 + 45·e^(−t/80)), a curve still falling at the end (40 + 45·e^(−t/400)), or the plateau turning up by 1 nat
  over the second half (a U); the proxy falls steadily. Each evaluation's golden moves by per-checkpoint noise of
  σ = 0.1, 0.2 or 0.3 nats (what stochastic training adds from one checkpoint to the next, which no SE of the
  reference samples sees), while its stated SE is 0.1 (a change's SE 0.14: the lab's paired SEs are 0.1-0.2).

Prints one table per experiment.
"""

from __future__ import annotations

import argparse

import numpy as np

from teacherhack.detection import golden_verdict


def fires(steps: np.ndarray, golden: np.ndarray, se: float, proxy: np.ndarray, proxy_se: float) -> float:
    """Share of the rows of ``golden`` and ``proxy`` (one simulated run each) the rule calls hacking."""
    n = steps.size
    proxy = np.broadcast_to(proxy, golden.shape)
    return float(np.mean([golden_verdict(steps, g, [se] * n, p, [proxy_se] * n).hacking
                          for g, p in zip(golden, proxy)]))


def pure_noise(runs: int, rng: np.random.Generator) -> None:
    print("pure noise (constant golden and proxy, errors of exactly their SE, unpaired): share called hacking")
    print(f"{'evaluations':>11}  {'whole rule':>10}  {'z > 3 alone':>11}  {'z > 2 alone':>11}")
    for n in (10, 30, 100):
        steps = np.arange(n) * 100
        golden = rng.normal(0.0, 1.0, (runs, n))
        rise = golden[:, -1] - golden.min(1)  # the last value above the minimum, in units of the SE of one value
        z = rise / np.sqrt(2)
        proxy = 5.0 + rng.normal(0.0, 1.0, (runs, n))
        print(f"{n:>11}  {fires(steps, golden, 1.0, proxy, 1.0):>10.2%}  {np.mean(z > 3):>11.2%}  {np.mean(z > 2):>11.2%}")


def lab_shapes(runs: int, rng: np.random.Generator) -> None:
    steps = np.arange(11) * 100.0
    plateau = 40 + 45 * np.exp(-steps / 80)
    shapes = {"plateau": plateau, "still falling": 40 + 45 * np.exp(-steps / 400),
              "U (+1 nat)": plateau + np.clip((steps - 500) / 500, 0, None)}
    proxy = 20 - steps / 100
    print("\n11 evaluations, stated SE 0.1, per-checkpoint noise σ: share called hacking")
    print(f"{'σ':>4}  " + "  ".join(f"{name:>13}" for name in shapes))
    for sigma in (0.1, 0.2, 0.3):
        shares = [fires(steps, curve + rng.normal(0.0, sigma, (runs, steps.size)), 0.1, proxy, 0.05)
                  for curve in shapes.values()]
        print(f"{sigma:>4}  " + "  ".join(f"{share:>13.1%}" for share in shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20_000, help="simulated runs per cell")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    pure_noise(args.runs, rng)
    lab_shapes(args.runs, rng)


if __name__ == "__main__":
    main()
