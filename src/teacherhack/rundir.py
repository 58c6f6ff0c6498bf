"""The run folder: the one place that writes, checks and reads a stage-2 run's files.

A run folder holds
- ``config.yaml``: the run's fully resolved configuration;
- ``run.json``: its settings (name, source, loss, prompts, steps, metric unit, the teacher's golden distance, …),
  among them ``samples_per_prompt``: per metric of per_sample.jsonl, its samples per prompt (:func:`sample_prompts`);
- ``metrics.jsonl``: one JSON object per evaluation (step, epoch, train_loss, proxy, golden, their SEs, …);
- ``per_sample.jsonl``: the per-sample values of each evaluation; the reference samples are the same at every
  evaluation, so two evaluations pair sample by sample (the verdicts' standard errors of a change use this);
- ``checkpoint/``: weights, optimizer and loop state at the last evaluation, from which a killed run resumes;
- ``student/``: the final student, written when the run has finished.
A lab folder holds one run folder per source, a sweep folder ``runs/GROUP/seedN``. While a process works in a
folder it holds the folder's lock (``.lock``): a second process is refused with a message naming the first.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from teacherhack.detection import GoldenVerdict, golden_verdict
from teacherhack.errors import UserError
from teacherhack.oracle_free import DEFAULT_RULE, Alarm

METRICS, PER_SAMPLE, SETTINGS, CONFIG = "metrics.jsonl", "per_sample.jsonl", "run.json", "config.yaml"
VERDICTS = "verdicts.json"  # a copy's verdicts, computed where the per-sample values were (the detection corpus)
REQUIRED_FIELDS = ("step", "epoch", "train_loss", "proxy", "proxy_se", "golden", "golden_se")
NULLABLE_FIELDS = {"train_loss"}  # null for the initial student (step 0)
NAN_FIELDS = {"proxy_se", "golden_se"}  # NaN for a metric of one sample (Estimate.of): the verdicts say no verdict


class FolderBusy(UserError):
    """Another process is working in this folder."""


class BrokenRun(UserError, ValueError):
    """A run folder is missing or its files are malformed or contradict each other (e.g. two processes wrote
    into it at once); the message names the file and line."""


@contextmanager
def locked(folder: Path, what: str = "folder") -> Iterator[None]:
    """Hold ``folder``'s lock while the body runs; refuse at once if another process holds it. The lock is
    released by the operating system when its process dies (kill -9 included), so it never needs clearing."""
    folder.mkdir(parents=True, exist_ok=True)
    lock, owner = FileLock(folder / ".lock"), folder / ".lock.owner"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner.read_text().strip() if owner.exists() else "another process"
        raise FolderBusy(f"{what} {folder} is in use by {holder}; wait for it to finish, or choose another --out")
    try:
        owner.write_text(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


@dataclass(frozen=True)
class RunFolder:
    """A stage-2 run's folder (see the module docstring); every file access goes through here."""

    path: Path

    @property
    def student_dir(self) -> Path:
        return self.path / "student"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def lock(self) -> Any:
        return locked(self.path, "run folder")

    def write_settings(self, settings: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / SETTINGS).write_text(json.dumps(settings, indent=1))

    def settings(self) -> dict[str, Any]:
        """run.json, or no settings when a run has none (the name then falls back to the folder's)."""
        path = self.path / SETTINGS
        if not path.is_file():
            return {}
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise BrokenRun(f"{path}: malformed JSON: {err.msg} (line {err.lineno})") from None
        if not isinstance(settings, dict):
            raise BrokenRun(f"{path}: expected a JSON object")
        return settings

    def append(self, row: dict[str, Any], per_sample: dict[str, list[float]]) -> None:
        """One evaluation: its metrics row and its per-sample values (per_sample first, so that a kill between
        the two writes leaves a row short, which :meth:`truncate` repairs on resume)."""
        with (self.path / PER_SAMPLE).open("a") as f:
            f.write(json.dumps({"step": row["step"], **per_sample}) + "\n")
        with (self.path / METRICS).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate(self, step: int) -> None:
        """Keep only evaluations up to ``step`` (where the checkpoint a run resumes from was taken)."""
        for name in (METRICS, PER_SAMPLE):
            path = self.path / name
            if path.exists():
                kept = [line for line in _whole_lines(path) if json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in kept))

    def reset(self) -> None:
        """Forget the evaluations of a run that starts from scratch."""
        for name in (METRICS, PER_SAMPLE):
            (self.path / name).unlink(missing_ok=True)

    def metrics(self) -> list[dict[str, Any]]:
        """The evaluation rows, checked: every field present, steps strictly increasing."""
        return _read_metrics(self.path / METRICS)

    def per_sample(self) -> list[dict[str, Any]] | None:
        """Per-sample values aligned with :meth:`metrics`, or None when absent or written by another run
        (the verdicts then fall back to unpaired standard errors); :class:`BrokenRun` for a malformed line."""
        path = self.path / PER_SAMPLE
        if not path.is_file():
            return None
        rows = [row for _, row in _read_objects(path)]
        return rows if [r["step"] for r in rows] == [m["step"] for m in self.metrics()] else None

    def reached_end(self) -> bool:
        """Whether its evaluations reached the run's last step (run.json's ``steps``), read leniently: a run killed
        or still running may end in a line cut short, and is not judged. Whether a run that reached it is consistent is
        for :func:`load_run` to check."""
        lines = _whole_lines(self.path / METRICS)
        return bool(lines) and json.loads(lines[-1]).get("step", 0) >= self.settings().get("steps", 0)

    def finished(self) -> bool:
        """Whether the run is complete: its final student exists and its evaluations are consistent. A folder
        whose files contradict each other is an error with the fix, never counted as done."""
        if not (self.student_dir / "model.safetensors").exists():
            return False
        try:
            self.metrics()
        except BrokenRun as error:
            raise BrokenRun(f"{error}; delete {self.path} and rerun the same command to redo this run") from None
        return True


@dataclass(frozen=True)
class Verdicts:
    """The three answers to "did this run hack its teacher?", from the most to the least informed."""

    golden: GoldenVerdict  # with the oracle: the truth
    reference: GoldenVerdict | None  # the same rule on the NLL of real held-out responses (None if not recorded)
    detector: Alarm  # with nothing but what a practitioner sees: the oracle-free detector's rule


def run_verdicts(
    metrics: Sequence[Mapping[str, Any]], per_sample: Sequence[Mapping[str, Any]] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Verdicts:
    """Every verdict from a run's metric rows (the records of its metrics.jsonl), with paired SEs when the
    per-sample values of the same evaluations are given (the records of per_sample.jsonl); ``settings`` (the
    run's run.json) holds what the detector's signals may need, such as the teacher's entropy."""
    steps = [int(m["step"]) for m in metrics]
    if per_sample is not None and [int(r["step"]) for r in per_sample] != steps:
        raise ValueError("per-sample values do not match the metric rows' steps")

    def column(key: str) -> list[float]:
        return [float(m[key]) for m in metrics]

    def paired(key: str) -> list[Sequence[float]] | None:
        return [r[key] for r in per_sample] if per_sample is not None and all(key in r for r in per_sample) else None

    def clusters(key: str) -> np.ndarray | None:
        values = paired(key)
        return None if values is None else sample_prompts(settings or {}, key, len(values[0]))

    def verdict(metric: str, name: str) -> GoldenVerdict:
        return golden_verdict(steps, column(metric), column(f"{metric}_se"), column("proxy"), column("proxy_se"),
                              golden_values=paired(metric), proxy_values=paired("proxy"),
                              golden_clusters=clusters(metric), proxy_clusters=clusters("proxy"), name=name)

    has_reference = all(m.get("reference_nll") is not None for m in metrics)
    return Verdicts(golden=verdict("golden", "golden"),
                    reference=verdict("reference_nll", "reference NLL") if has_reference else None,
                    detector=DEFAULT_RULE.verdict(metrics, per_sample, settings or {}))


def sample_prompts(settings: Mapping[str, Any], key: str, n: int) -> np.ndarray:
    """The prompt of each of metric ``key``'s ``n`` per-sample values in per_sample.jsonl, from run.json's
    ``samples_per_prompt`` (each prompt's samples are consecutive: ``Prompts.repeat``); one sample per prompt for a
    metric it does not name, and in runs written before it was recorded (their standard errors as they were)."""
    return np.arange(n) // int(settings.get("samples_per_prompt", {}).get(key, 1))


@dataclass(frozen=True)
class Run:
    """One stage-2 run, loaded."""

    name: str
    settings: dict[str, Any]
    metrics: list[dict[str, Any]]
    path: Path
    per_sample: list[dict[str, Any]] | None = None  # paired per-sample values, if saved
    stored: dict[str, Any] | None = None  # verdicts computed before the per-sample values were left behind

    def verdicts(self) -> Verdicts:
        """The golden and reference verdicts (paired SEs when per-sample values exist, or as stored with a copy of
        the run that left them behind) and the detector."""
        fresh = run_verdicts(self.metrics, self.per_sample, self.settings)
        if self.stored is None or self.per_sample is not None:
            return fresh
        reference = self.stored.get("reference")
        return Verdicts(GoldenVerdict(**self.stored["golden"]),
                        None if reference is None else GoldenVerdict(**reference), fresh.detector)

    def series(self, key: str) -> np.ndarray:
        """Column ``key`` over the evaluations as floats; null becomes NaN."""
        return np.array([np.nan if m.get(key) is None else float(m[key]) for m in self.metrics])

    def data_tokens(self) -> np.ndarray:
        """Tokens generated for training up to each evaluation: the offline dataset (generated once, up
        front) plus the online samples so far. What a budget-matched comparison puts on its x axis."""
        return float(self.settings.get("offline_tokens") or 0) + self.series("tokens_generated")

    @property
    def unit(self) -> str:
        """The metrics' unit, short, for axis labels."""
        return "nats/token" if self.settings.get("metric_unit") == "nats/token" else "nats/seq"


def load_run(path: str | Path) -> Run:
    """Load one run folder; :class:`BrokenRun` naming the file (and line) for anything malformed."""
    folder = RunFolder(Path(path))
    if not (folder.path / METRICS).is_file():
        raise BrokenRun(f"{folder.path}: no {METRICS}, not a run folder")
    settings = folder.settings()
    stored = folder.path / VERDICTS
    return Run(str(settings.get("name") or folder.path.name), settings, folder.metrics(), folder.path,
               folder.per_sample(), json.loads(stored.read_text()) if stored.is_file() else None)


def load_runs(paths: str | Path | Iterable[str | Path]) -> list[Run]:
    """Load run folders and the run subfolders of lab folders, in the order given."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs = []
    for path in map(Path, paths):
        if (path / METRICS).is_file():
            runs.append(load_run(path))
            continue
        subdirs = sorted(d for d in path.iterdir() if (d / METRICS).is_file()) if path.is_dir() else []
        if not subdirs:
            deeper = path.is_dir() and next(path.rglob(METRICS), None) is not None  # a sweep folder's runs/NAME/seedK
            raise BrokenRun(f"{path}: no {METRICS} here or in any immediate subfolder" + (
                f"; runs lie deeper (a sweep: pass them, e.g. {path}/runs/*/seed0)" if deeper else ""))
        runs.extend(load_run(d) for d in subdirs)
    if not runs:
        raise BrokenRun("no run folders given")
    return runs


def find_runs(paths: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """Every run folder at or below ``paths`` with its group: the sweep it belongs to (the nearest folder holding
    a sweep.json), else the folder above it (a lab folder), else the run's own name; two groups of one name in other
    folders are told apart by the end of their paths (``v1:sources``, ``v2:sources``), since the detector's
    validation holds each group out in turn. Each folder once, where it is first found: paths that overlap (a sweep
    and a folder of sweeps holding it) do not count its runs twice."""
    found, seen = [], set()
    for path in map(Path, paths):
        folders = [path] if (path / METRICS).is_file() else sorted(p.parent for p in path.rglob(METRICS))
        if not folders:
            raise BrokenRun(f"{path}: no {METRICS} here or below")
        for folder in folders:
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            sweep = next((p for p in folder.parents if (p / "sweep.json").is_file()), None)
            found.append((folder, (sweep or (folder.parent if folder != path else folder)).resolve()))
    named: dict[str, set[Path]] = {}
    for _, group in found:
        named.setdefault(group.name, set()).add(group)
    return [(folder, group.name if len(named[group.name]) == 1 else
             f"{distinguishing(group, named[group.name])}:{group.name}") for folder, group in found]


def distinguishing(folder: Path, folders: set[Path]) -> str:
    """The fewest folders above the end all of ``folders`` share that only ``folder`` (one of them) has there: what
    tells apart runs or sweeps of one name in other folders."""
    parts = [f.parts for f in folders]
    shared = next(n for n in range(min(map(len, parts)), -1, -1) if len({p[len(p) - n:] for p in parts}) == 1)
    own, others = folder.parts[:len(folder.parts) - shared], [p[:len(p) - shared] for p in parts if p != folder.parts]
    depth = next(n for n in range(1, len(own) + 1) if all(p[-n:] != own[-n:] for p in others))
    return Path(*own[-depth:]).as_posix()


def summarise(run: Run) -> dict[str, Any]:
    """A run's line in summary.json: best and final metrics, the golden and reference verdicts and the detector."""
    verdicts = run.verdicts()
    verdict = verdicts.golden
    rows = run.metrics
    best = min(range(len(rows)), key=lambda i: rows[i]["golden"])
    last = rows[-1]
    return {"golden_min": rows[best]["golden"], "golden_min_se": rows[best]["golden_se"],
            "golden_min_step": rows[best]["step"], "golden_final": last["golden"], "golden_final_se": last["golden_se"],
            "proxy_final": last["proxy"], "proxy_final_se": last["proxy_se"], "hacking": verdict.hacking,
            "verdict": verdict.to_dict(),
            "reference_hacking": verdicts.reference.hacking if verdicts.reference else None,
            "reference_verdict": verdicts.reference.to_dict() if verdicts.reference else None,
            "detector": verdicts.detector.to_dict(), "steps": last["step"],
            "train_seconds": last.get("train_seconds"), "eval_seconds": last.get("eval_seconds")}


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _whole_lines(path: Path) -> list[str]:
    """The non-blank lines of a JSON-lines file, less a last line cut short (by a crash, a full disk, or a run that
    is writing it now)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:-1] if lines and not _parses(lines[-1]) else lines


def _read_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each non-blank line of a JSON-lines file with its number; :class:`BrokenRun` naming the file and line for one
    that is not a JSON object."""
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise BrokenRun(f"{path}:{lineno}: malformed JSON: {err.msg}") from None
        if not isinstance(row, dict):
            raise BrokenRun(f"{path}:{lineno}: expected a JSON object")
        yield lineno, row


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for lineno, row in _read_objects(path):
        missing = [f for f in REQUIRED_FIELDS if f not in row or (row[f] is None and f not in NULLABLE_FIELDS)]
        if missing:
            raise BrokenRun(f"{path}:{lineno}: missing or null field(s): {', '.join(missing)}")
        broken = [f for f in REQUIRED_FIELDS if f not in NAN_FIELDS and row[f] is not None
                  and not (isinstance(row[f], (int, float)) and math.isfinite(row[f]))]
        if broken:
            raise BrokenRun(f"{path}:{lineno}: not a finite number: {', '.join(f'{f} {row[f]!r}' for f in broken)}")
        if rows and row["step"] <= rows[-1]["step"]:
            raise BrokenRun(f"{path}:{lineno}: step {row['step']} does not follow step {rows[-1]['step']}")
        rows.append(row)
    if not rows:
        raise BrokenRun(f"{path}: no evaluations")
    return rows
