"""The lab's recipes: ``run_lab`` (stages 0-2 for every data source of one configuration) and ``run_sweep``
(one of the paper's experiments: many stage-2 runs sharing their upstream artifacts). Both build the upstream
stages here (``teacherhack.stages``), run stage 2 (``teacherhack.distill``) through one launcher, and resume
when rerun with the same command and folder."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
import yaml
from huggingface_hub.utils import disable_progress_bars

from teacherhack import config as cfg
from teacherhack import distributed
from teacherhack.cache import ArtifactCache
from teacherhack.config import LabConfig
from teacherhack.distill import Tracking, check_resumable, distill_run
from teacherhack.distributed import log
from teacherhack.launch import Job, launch
from teacherhack.reports import write_reports
from teacherhack.rundir import RunFolder, locked
from teacherhack.stages import cpu_kernels, pin_models, prepare_upstream, upstream_keys
from teacherhack.sweeps import SWEEPS, collect, expand, format_findings, group_table

transformers.utils.logging.disable_progress_bar()  # our own progress lines say what is happening
transformers.utils.logging.set_verbosity_error()  # library notices are not the user's business here
disable_progress_bars()


@dataclass(frozen=True)
class Engine:
    """How stage-2 runs execute (``teacherhack.launch``): ``jobs`` in parallel on ``name``."""

    jobs: int = 1
    name: str = "local"
    options: tuple[tuple[str, str], ...] = ()
    report_to: tuple[str, ...] = ()  # trackers that receive every evaluation


def resolve_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def run_lab(c: LabConfig, out: Path, cache_root: Path, engine: Engine = Engine()) -> dict[str, Any]:
    """Run the lab into ``out``; rerunning with the same folder and configuration resumes it. Its ``config.yaml``
    names each hub id pinned to the commit it trains on (:func:`pin_models`)."""
    start = time.time()
    c = pin_models(c)
    if distributed.launched() and engine.jobs > 1:
        raise cfg.ConfigError("--jobs runs stage-2 runs in parallel processes; under a distributed launcher the "
                              "processes already share each run: use --jobs 1")
    with locked(out, "lab folder") if distributed.is_main() else contextlib.nullcontext():
        _keep_config(out / "config.yaml", c)
        if c.threads:
            torch.set_num_threads(c.threads)
        cache = ArtifactCache(cache_root)
        cache.clean()
        timings: dict[str, float] = {}

        def resumable(keys: dict[str, str]) -> None:
            for source in c.distill.sources:
                check_resumable(out / source, source, keys)

        up = prepare_upstream(c, cache, resolve_device(c.device), timings, check=resumable)
        log("stage 2: " + ", ".join(c.distill.sources) + (f" ({engine.jobs} parallel jobs)" if engine.jobs > 1 else ""))
        jobs = [_job(s, c, s, up, out / s, out, engine, len(c.distill.sources)) for s in c.distill.sources]
        runs: dict[str, Any] = {}
        for name, (result, seconds) in launch(jobs, parallel=engine.jobs, engine=engine.name,
                                              folder=out / ".engine", options=dict(engine.options)):
            runs[name], timings[f"distill/{name}"] = result, seconds
        runs = {s: runs[s] for s in c.distill.sources}
        summary = {"runs": runs, "wall_seconds": time.time() - start, "stage_seconds": timings,
                   "cache": dict(cache.events), "preset": c.preset}
        if distributed.is_main():
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def stretched(base: LabConfig, factor: float) -> LabConfig:
    """A longer (or shorter) sweep: stage-2 steps, evaluation interval and distillation pool (distill.prompts; unset,
    the whole task.n_distill) times ``factor``, on the same upstream: never task.n_distill, which would draw other
    splits and so another oracle, teacher and student. A configuration that the factor makes invalid (a pool beyond
    task.n_distill) is refused naming --stretch, which the user gave, rather than the setting it changed."""
    if factor == 1:
        return base
    pool = base.distill.prompts or base.task.n_distill
    config = cfg.apply_overrides(base, {
        "distill.steps": max(1, round(base.distill.steps * factor)),
        "eval.every": max(1, round(base.eval.every * factor)),
        "distill.prompts": max(1, round(pool * factor)),
    })
    try:
        cfg.validate(config)
    except cfg.ConfigError as error:
        raise cfg.ConfigError(f"--stretch {factor:g} multiplies distill.steps, eval.every and distill.prompts ({pool} → "
                              f"{config.distill.prompts}), but {error}: use a smaller --stretch (or a larger "
                              f"task.n_distill, which draws other splits: another oracle, teacher and student)") from None
    return config


def run_sweep(preset: str, base: LabConfig, out: Path, cache_root: Path, *, seeds: int, engine: Engine = Engine(),
              progress: Callable[[str], None] = log) -> dict[str, Any]:
    """Run (or resume) every run of ``preset`` into ``out/runs/``; write findings and the report."""
    if preset not in SWEEPS:
        raise cfg.ConfigError(f"unknown sweep preset {preset!r}; choose one of {', '.join(SWEEPS)}")
    runs = expand(preset, base.distill.prompts or base.task.n_distill, base.task.n_distill, seeds)
    # jobs: what the record's command needs to give the same bits (parallel runs train on a share of the threads)
    plan = {"preset": preset, "seeds": seeds, "jobs": engine.jobs, "base": base.to_dict(),
            "runs": [asdict(r) for r in runs]}
    configs = {r.name: cfg.apply_overrides(base, r.overrides) for r in runs}
    for config in configs.values():
        cfg.validate(config)
    configs = {name: pin_models(config) for name, config in configs.items()}  # each run's config.yaml: the commits
    with locked(out, "sweep folder"):
        plan_path = out / "sweep.json"
        mismatch = (_mismatch(json.loads(plan_path.read_text()), plan, lambda name: _started(out / "runs" / name))
                    if plan_path.exists() and _started(out) else None)
        if mismatch:
            raise cfg.ConfigError(f"{out} holds a different sweep ({plan_path}: {mismatch}); choose another --out, or "
                                  f"rerun the same command (more --seeds are fine) to resume it")
        plan_path.write_text(json.dumps(plan, indent=1))
        timing_path = out / "timing.json"  # wall time summed over the invocations that ran this sweep
        before = json.loads(timing_path.read_text())["wall_seconds"] if timing_path.exists() else 0.0
        start = time.time()

        def wall_seconds() -> float:
            total = before + time.time() - start
            timing_path.write_text(json.dumps({"wall_seconds": total}))
            return total

        if base.threads:
            torch.set_num_threads(base.threads)  # as the lab does: the upstream's and the runs' bits depend on it
        cache = ArtifactCache(cache_root)
        cache.clean()
        device = resolve_device(base.device)
        todo = [r for r in runs if not RunFolder(out / "runs" / r.name).finished()]
        progress(f"sweep {preset}: {len(runs)} runs, {len(runs) - len(todo)} already done")
        # before anything is built: runs trained now on other upstream artifacts than the finished ones (another
        # thread count, machine, torch, hub commit, task file) would stand beside them in the findings
        for r in runs if todo else []:
            if r not in todo:
                keys = upstream_keys(configs[r.name], cache, device)
                check_resumable(out / "runs" / r.name, f"{r.name} (finished)", keys)
        try:  # an interrupted invocation's time counts too (Ctrl-C, SIGTERM; a SIGKILL loses it since the last run)
            jobs = []
            for r in todo:  # upstream artifacts first, in this process with all threads; the cache shares them
                run_dir = out / "runs" / r.name
                up = prepare_upstream(configs[r.name], cache, device, {},
                                      check=partial(check_resumable, run_dir, r.name))
                run_dir.mkdir(parents=True, exist_ok=True)
                configs[r.name].dump(RunFolder(run_dir).config_path)
                # the thread share of the whole sweep's runs, not of those left: a resumed run keeps its threads
                jobs.append(_job(r.name, configs[r.name], configs[r.name].distill.sources[0], up, run_dir, out,
                                 engine, len(runs)))
            finished, began = len(runs) - len(todo), time.time()
            for _ in launch(jobs, parallel=engine.jobs, engine=engine.name, folder=out / ".engine",
                            options=dict(engine.options)):
                finished += 1
                wall_seconds()
                done_now = finished - (len(runs) - len(todo))
                eta = (time.time() - began) / done_now * (len(runs) - finished)
                progress(f"sweep {preset}: {finished}/{len(runs)} runs done, ETA {eta / 60:.0f} min")
        finally:
            wall_seconds()

        results = collect(out, runs)
        summary = {"preset": preset, "seeds": seeds, "runs": len(runs), "wall_seconds": wall_seconds(),
                   "machine": machine(), "findings": SWEEPS[preset].findings(results), "groups": group_table(results)}
        (out / "findings.json").write_text(json.dumps(summary, indent=1))
        (out / "findings.md").write_text(format_findings(preset, summary), encoding="utf-8")
        write_reports([out / "runs" / r.name for r in runs], out)
    return summary


def machine() -> str:
    """Where a sweep ran, with the CPU's vector kernels: the bits of a run depend on them (bf16 matrix products take
    AMX tiles where the CPU has them, and round otherwise than AVX-512's), so the same seed gives other numbers on
    another kind of CPU."""
    return f"{platform.machine()} ({cpu_kernels()}), {os.cpu_count()} CPU cores, torch {torch.__version__}"


def _job(name: str, c: LabConfig, source: str, up: Any, run_dir: Path, out: Path, engine: Engine, runs: int) -> Job:
    """A stage-2 run as a launcher job; parallel runs split the machine's threads between them."""
    parallel = min(engine.jobs, runs)
    threads = max(1, (c.threads or torch.get_num_threads()) // parallel) if parallel > 1 else None
    tracking = Tracking(engine.report_to, out.name, out / "tracking") if engine.report_to else None
    return Job(name, _timed_run, (c, source, up, run_dir, resolve_device(c.device), threads, name, tracking))


def _timed_run(*args: Any) -> tuple[dict[str, Any], float]:
    start = time.time()
    return distill_run(*args), time.time() - start


def _keep_config(saved: Path, c: LabConfig) -> None:
    """Write the resolved configuration, or check that a folder being resumed was run with the same one (a folder
    where no run has started yet, e.g. after an error in the data, takes the new one)."""
    if saved.exists() and _started(saved.parent):
        try:
            previous = cfg.from_dict(yaml.safe_load(saved.read_text()))
        except yaml.YAMLError as error:
            raise cfg.ConfigError(f"{saved} is not valid YAML ({getattr(error, 'problem', None) or error}): the folder's "
                                  f"runs cannot be checked against it; choose another --out, or restore the file "
                                  f"to resume them") from None
        except cfg.ConfigError as error:
            raise cfg.ConfigError(f"{saved}: {error} (written by another version of teacherhack?); choose another "
                                  f"--out, or resume it with the version that started it") from None
        if previous.to_dict() != c.to_dict():
            changed = "; ".join(cfg.differences(previous, c))
            raise cfg.ConfigError(f"{saved.parent} holds a run with a different configuration ({saved} → this "
                                  f"command: {changed}); choose another --out or rerun with the same settings to "
                                  f"resume it")
    distributed.barrier()  # every process has compared with the saved config before it is rewritten
    if distributed.is_main():
        c.dump(saved)


def _started(folder: Path) -> bool:
    """Whether a stage-2 run in ``folder`` has evaluated or saved a checkpoint: then its configuration is fixed."""
    return any(folder.rglob("metrics.jsonl")) or any(folder.rglob("checkpoint"))


def _mismatch(saved: dict[str, Any], plan: dict[str, Any], started: Callable[[str], bool]) -> str | None:
    """What keeps ``plan`` from continuing the saved sweep, None when it does: the same preset and base
    configuration (keys added to the schema since then count at their defaults), and every saved run that has
    ``started`` still in it (more seeds extend a sweep; planned runs that never started pin nothing, so a sweep
    extended and stopped at once can go back to its seeds)."""
    if saved["preset"] != plan["preset"]:
        return f"preset {saved['preset']!r}, not {plan['preset']!r}"
    try:
        before = cfg.from_dict(saved["base"])
    except cfg.ConfigError as error:  # a key since removed or renamed
        return f"its base configuration no longer loads ({error})"
    changed = cfg.differences(before, cfg.from_dict(plan["base"]))
    if changed:
        return "base settings differ: " + "; ".join(changed)
    runs = {json.dumps(r, sort_keys=True) for r in json.loads(json.dumps(plan["runs"]))}
    gone = [r["name"] for r in saved["runs"] if json.dumps(r, sort_keys=True) not in runs and started(r["name"])]
    return f"its runs {', '.join(gone)} are not in this sweep's (or differ)" if gone else None
