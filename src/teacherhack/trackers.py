"""Experiment trackers: every evaluation row of a stage-2 run goes to TensorBoard, Weights & Biases, MLflow or
trackio when asked (``--report-to``), through accelerate's tracker classes, the ones ``Accelerator(log_with=…)``
uses. The run folder stays the record; trackers are a live view of it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from teacherhack.errors import UserError

TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "mlflow", "trackio")


def check_trackers(names: list[str]) -> None:
    """Refuse an unknown or uninstalled tracker before anything runs."""
    from accelerate.tracking import get_available_trackers

    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"unknown tracker(s) {', '.join(unknown)} in --report-to; choose from {', '.join(TRACKERS)}")
    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        raise UserError(f"--report-to {', '.join(missing)}: not installed; pip install {' '.join(missing)}")


class Trackers:
    """The trackers of one run. ``project`` groups runs (a lab or sweep folder's name); ``run_name`` names this
    one; TensorBoard and MLflow write under ``logging_dir``."""

    def __init__(self, names: list[str], *, project: str, run_name: str, logging_dir: Path,
                 config: dict[str, Any]) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.trackers = []
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if name == "tensorboard":  # events under logging_dir/PROJECT/RUN: `tensorboard --logdir` shows every run
                tracker = cls(f"{project}/{run_name}", logging_dir)
            elif name == "mlflow":
                tracker = cls(project, str(logging_dir), run_name=run_name)
            else:  # wandb, trackio: a project with one named run per stage-2 run
                tracker = cls(project, name=run_name)
            tracker.start()
            tracker.store_init_configuration(_flat(config))
            self.trackers.append(tracker)

    def log(self, row: dict[str, Any]) -> None:
        """One evaluation row (numbers only; nulls and non-finite values left out)."""
        values = {k: float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(values, step=int(row["step"]))

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys with scalar values (what every tracker accepts as hyperparameters)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
