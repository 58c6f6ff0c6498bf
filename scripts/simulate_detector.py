"""How often the power-law detector (``teacherhack.detection.power_law_detector``) fires on proxy curves whose
answer is known: the figures its docstring quotes.

    .venv/bin/python scripts/simulate_detector.py              # the docstring's figures
    .venv/bin/python scripts/simulate_detector.py --seeds 10   # a quicker, noisier look

Curves: step 0 plus n ∈ {8, 12, 20, 40} evaluations at steps 100, 200, …; a proxy 10·(t/100)^(−α) with
α ∈ {0.1, 0.3, 0.6}, times log-normal noise of σ ∈ {0.3%, 1%, 3%}, its stated SE σ·proxy; 36 cells × ``--seeds``
curves per family (seeded). The families:

* pure power law (the detector should stay quiet);
* a bend after 25%, 40% or 60% of the run, where the log-slope becomes 0, 0.3·α or −0.2·α (the proxy stalls,
  slows down or rises: it should fire, soon after the bend);
* a floor, C·t^(−α) + F, with F 10%, 30% or 50% of the final proxy (a healthy run that converges: firing here is
  the false alarm the docstring warns of);
* a transient: the first evaluation +10% or +30%, decaying e-fold per evaluation (warm-up), with ``skip_first``
  0, 1 and 2.

Prints the share of curves that fire (and for bends the median number of evaluations from the bend to the alarm)
with the defaults and with the variants the docstring compares: τ = 2, ``fit_fraction`` 1/2, k = 3,
``min_effect`` 0.03, and no SEs passed.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Iterator

import numpy as np

from teacherhack.detection import power_law_detector

SIZES, ALPHAS, SIGMAS = (8, 12, 20, 40), (0.1, 0.3, 0.6), (0.003, 0.01, 0.03)
Shape = Callable[[np.ndarray, float, int], np.ndarray]  # (steps, α, n) → the noiseless proxy


def law(steps: np.ndarray, alpha: float) -> np.ndarray:
    return 10 * np.maximum(steps / 100, 1) ** -alpha


def law_shape(steps: np.ndarray, alpha: float, n: int) -> np.ndarray:
    return law(steps, alpha)


def bent(at: float, later: float) -> Shape:
    """The law until evaluation ⌈at·n⌉, then the log-slope ``later``·α."""
    def shape(steps: np.ndarray, alpha: float, n: int) -> np.ndarray:
        bend = steps[int(np.ceil(at * n))]
        t = np.maximum(steps, 100)
        return np.where(t <= bend, law(steps, alpha), law(np.array([bend]), alpha) * (t / bend) ** (-later * alpha))
    return shape


def floored(share: float) -> Shape:
    """C·t^(−α) + F with F = ``share`` of the final proxy."""
    def shape(steps: np.ndarray, alpha: float, n: int) -> np.ndarray:
        pure = law(steps, alpha)
        return pure + share / (1 - share) * pure[-1]
    return shape


def transient(size: float) -> Shape:
    def shape(steps: np.ndarray, alpha: float, n: int) -> np.ndarray:
        return law(steps, alpha) * (1 + size * np.exp(-np.maximum(np.arange(steps.size) - 1, 0)) * (steps > 0))
    return shape


def curves(shape: Shape, seeds: int, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray, float, int]]:
    """Every cell's noisy curves: (steps, proxy, σ, n)."""
    for n, alpha, sigma in itertools.product(SIZES, ALPHAS, SIGMAS):
        steps = np.arange(n + 1) * 100.0
        clean = shape(steps, alpha, n)
        for _ in range(seeds):
            yield steps, clean * np.exp(rng.normal(0.0, sigma, steps.size)), sigma, n


def rate(shape: Shape, seeds: int, seed: int, *, se: bool = True, bend: float | None = None,
         **options: float) -> tuple[float, float]:
    """Share of the family's curves that fire, and the median evaluations from the bend to the alarm."""
    rng = np.random.default_rng(seed)  # the same curves for every variant of a family
    fired, delays = [], []
    for steps, proxy, sigma, n in curves(shape, seeds, rng):
        result = power_law_detector(steps, proxy, sigma * proxy if se else None, **options)
        fired.append(result.fired)
        if result.fired and bend is not None:
            delays.append(int(np.searchsorted(steps, result.step)) - int(np.ceil(bend * n)))
    return float(np.mean(fired)), float(np.median(delays)) if delays else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=40, help="curves per cell (36 cells per family)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    variants = {"default": {}, "tau 2": {"tau": 2.0}, "fit 1/2": {"fit_fraction": 0.5}, "k 3": {"k": 3},
                "effect 0.03": {"min_effect": 0.03}, "no SEs": {"se": False}}
    print("share of curves that fire (median evaluations from the bend to the alarm)")
    print(f"{'family':<28}" + "".join(f"{name:>16}" for name in variants))
    families: list[tuple[str, Shape, float | None]] = [("pure power law", law_shape, None)]
    families += [(f"bend at {at:.0%}, slope {later:g}α", bent(at, later), at)
                 for at in (0.25, 0.4, 0.6) for later in (0.0, 0.3, -0.2)]
    families += [(f"floor {share:.0%}", floored(share), None) for share in (0.1, 0.3, 0.5)]
    for name, shape, bend in families:
        cells = []
        for options in variants.values():
            share, delay = rate(shape, args.seeds, args.seed, bend=bend, **options)
            cells.append(f"{share:.1%}" + ("" if bend is None else f" ({delay:g})"))
        print(f"{name:<28}" + "".join(f"{cell:>16}" for cell in cells))
    print("\ntransient (first evaluation +size, decaying e-fold per evaluation): share that fires, by skip_first")
    print(f"{'size':<28}" + "".join(f"{f'skip {s}':>16}" for s in (0, 1, 2)))
    for size in (0.1, 0.3):
        print(f"{f'+{size:.0%}':<28}" + "".join(f"{rate(transient(size), args.seeds, args.seed, skip_first=s)[0]:>16.1%}"
                                                for s in (0, 1, 2)))
    print(f"\nbends at 25% with skip_first 1: {rate(bent(0.25, 0.0), args.seeds, args.seed, skip_first=1)[0]:.1%} "
          f"fire (slope 0 after the bend)")


if __name__ == "__main__":
    main()
