"""The paper's experiments as sweeps: a preset expands into stage-2 runs that share upstream artifacts, run
in parallel processes, resume after a kill, and end with a findings table that says, for each of the paper's
findings the preset tests, whether it reproduced here."""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from teacherhack import config as cfg
from teacherhack.config import LabConfig
from teacherhack.reports import load_run, write_report
from teacherhack.lab import ArtifactCache, distill_run, log, prepare_upstream, resolve_device, summarise


@dataclass(frozen=True)
class Run:
    name: str  # folder name, unique in the sweep
    group: str  # the setting measured (a curve label); seeds of one setting share it
    seed: int
    overrides: dict[str, Any]  # on top of the sweep's base configuration


ONLINE = ("online_teacher", "online_student")


def _runs(seeds: int, settings: list[tuple[str, dict[str, Any]]]) -> list[Run]:
    return [Run(f"{group}/seed{seed}", group, seed, {**overrides, "seed": seed})
            for group, overrides in settings for seed in range(seeds)]


def _split(n: int, parts: int) -> int:
    return max(1, n // parts)


def expand(preset: str, base: LabConfig, seeds: int) -> list[Run]:
    """The runs of a preset. Sizes derive from the base configuration so ``--set`` and ``--scale`` apply."""
    n = base.distill.prompts or base.task.n_distill
    if preset == "sources":
        settings = [(s, {"distill.sources": s}) for s in ("offline", *ONLINE)]
    elif preset == "diversity":  # a fixed dataset size n: fewer prompts, more generations each
        settings = [(f"prompts={_split(n, k)} k={k}", {"distill.sources": "offline", "distill.prompts": _split(n, k),
                                                       "distill.generations_per_prompt": k}) for k in (1, 2, 5)]
    elif preset == "budget":  # fixed prompts, a growing offline dataset
        settings = [(f"k={k}", {"distill.sources": "offline", "distill.prompts": _split(n, 4),
                                "distill.generations_per_prompt": k}) for k in (1, 2, 4, 8)]
    elif preset == "losses":
        settings = [(f"{loss} {source}", {"distill.sources": source, "distill.loss": loss})
                    for loss in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl")
                    for source in ("offline", "online_student")]
    elif preset == "sizes":
        settings = [(f"teacher={t} student={s} {source}",
                     {"models.teacher": t, "models.student": s, "distill.sources": source})
                    for t in ("s", "m") for s in ("xxs", "xs") for source in ("offline", "online_teacher")]
    elif preset == "mixture":
        settings = [(f"lambda={lam}", {"distill.sources": "mixture", "distill.mixture_lambda": lam})
                    for lam in (0.0, 0.25, 0.5, 1.0)]
    elif preset == "factors":  # one factor at a time around the base, offline data: what makes hacking here
        variants = {
            "base": {},
            "teacher less over-fitted (4 epochs)": {"teacher.epochs": 4.0},
            "teacher more over-fitted (32 epochs)": {"teacher.epochs": 32.0},
            "hard-label loss": {"distill.loss": "hard_ce"},
            "bigger student (s)": {"models.student": "s"},
            "student starts better (3 SFT epochs)": {"student.epochs": 3.0},
            "sharper oracle (tau 0.6)": {"models.oracle_temperature": 0.6},
            "smaller pool (half)": {"distill.prompts": _split(n, 2)},
            "lower learning rate (3e-4)": {"distill.lr": 3e-4},
            "per-token metrics": {"eval.per_token": True, "eval.estimator": "log_ratio"},
        }
        settings = [(name, {"distill.sources": "offline", **overrides}) for name, overrides in variants.items()]
    elif preset == "tasks":  # the paper's three task families, from text the package registries carry
        settings = [(f"{task} {source}", {"task.spec": task, "distill.sources": source})
                    for task in ("kjv-rv", "debian-descriptions", "wordnet") for source in ("offline", *ONLINE)]
    else:
        raise cfg.ConfigError(f"unknown sweep preset {preset!r}; choose one of {', '.join(SWEEPS)}")
    return _runs(seeds, settings)


SWEEPS = ("sources", "diversity", "budget", "losses", "sizes", "mixture", "tasks", "factors")
# Seeds per setting by default: as many as keep the preset within an hour at 2 jobs on 2 CPU cores, from the
# measured stage-2 minutes per run (offline about 4, online student 6.5, online teacher 11, single-threaded).
DEFAULT_SEEDS = {"sources": 3, "diversity": 3, "budget": 3, "losses": 2, "sizes": 2, "mixture": 3, "tasks": 1,
                 "factors": 1}


def scaled(base: LabConfig, scale: float) -> LabConfig:
    """A bigger (or smaller) sweep: stage-2 steps, evaluation interval and distillation pool times ``scale``."""
    if scale == 1:
        return base
    return cfg.apply_overrides(base, {
        "distill.steps": max(1, round(base.distill.steps * scale)),
        "eval.every": max(1, round(base.eval.every * scale)),
        "task.n_distill": max(1, round(base.task.n_distill * scale)),
    })


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _done(run_dir: Path) -> bool:
    return (run_dir / "student" / "model.safetensors").exists()


def run_sweep(preset: str, base: LabConfig, out: Path, cache_root: Path, *, seeds: int, jobs: int = 1,
              progress: Callable[[str], None] = log) -> dict[str, Any]:
    """Run (or resume) every run of ``preset`` into ``out/runs/``; write findings and the report."""
    runs = expand(preset, base, seeds)
    plan = {"preset": preset, "seeds": seeds, "base": base.to_dict(), "runs": [asdict(r) for r in runs]}
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "sweep.json"
    if plan_path.exists() and not _extends(json.loads(plan_path.read_text()), plan):
        raise cfg.ConfigError(f"{out} holds a different sweep ({plan_path}); choose another --out, or rerun the "
                              f"same command (more --seeds are fine) to resume it")
    plan_path.write_text(json.dumps(plan, indent=1))
    timing_path = out / "timing.json"  # wall time summed over the invocations that ran this sweep
    before = json.loads(timing_path.read_text())["wall_seconds"] if timing_path.exists() else 0.0
    configs = {r.name: cfg.apply_overrides(base, r.overrides) for r in runs}
    for config in configs.values():
        cfg.validate(config)
    device = resolve_device(base.device)
    cache = ArtifactCache(cache_root)
    start = time.time()

    todo = [r for r in runs if not _done(out / "runs" / r.name)]
    progress(f"sweep {preset}: {len(runs)} runs, {len(runs) - len(todo)} already done")
    upstream, timings = {}, {}
    for r in todo:  # upstream artifacts first, in this process with all threads; the cache shares them
        upstream[r.name] = prepare_upstream(configs[r.name], cache, device, timings)
        run_dir = out / "runs" / r.name
        run_dir.mkdir(parents=True, exist_ok=True)
        configs[r.name].dump(run_dir / "config.yaml")

    threads = max(1, torch.get_num_threads() // max(1, min(jobs, len(todo) or 1)))
    finished, began = len(runs) - len(todo), time.time()

    def wall_seconds() -> float:
        total = before + time.time() - start
        timing_path.write_text(json.dumps({"wall_seconds": total}))
        return total

    def report_progress() -> None:
        wall_seconds()
        done_now = finished - (len(runs) - len(todo))
        eta = (time.time() - began) / done_now * (len(runs) - finished) if done_now else float("nan")
        progress(f"sweep {preset}: {finished}/{len(runs)} runs done, ETA {eta / 60:.0f} min")

    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending = {pool.submit(distill_run, configs[r.name], configs[r.name].distill.sources[0], upstream[r.name],
                                   out / "runs" / r.name, device, threads, r.name) for r in todo}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
                    finished += 1
                    report_progress()
    else:
        for r in todo:
            distill_run(configs[r.name], configs[r.name].distill.sources[0], upstream[r.name], out / "runs" / r.name,
                        device, name=r.name)
            finished += 1
            report_progress()

    results = collect(out, runs)
    found = FINDINGS[preset](results)
    summary = {"preset": preset, "seeds": seeds, "runs": len(runs), "wall_seconds": wall_seconds(),
               "machine": _machine(), "findings": found, "groups": group_table(results)}
    (out / "findings.json").write_text(json.dumps(summary, indent=1))
    (out / "findings.md").write_text(format_findings(preset, summary))
    write_reports([out / "runs" / r.name for r in runs], out)
    return summary


def _extends(saved: dict[str, Any], plan: dict[str, Any]) -> bool:
    """Whether ``plan`` continues the saved sweep: the same preset and base configuration (keys added to the
    schema since then count at their defaults), and every saved run still in it (e.g. more seeds)."""
    try:
        same_base = cfg.from_dict(saved["base"]) == cfg.from_dict(plan["base"])
    except cfg.ConfigError:  # a key since removed or renamed
        return False
    runs = {json.dumps(r, sort_keys=True) for r in json.loads(json.dumps(plan["runs"]))}
    return (saved["preset"] == plan["preset"] and same_base
            and all(json.dumps(r, sort_keys=True) in runs for r in saved["runs"]))


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def write_reports(run_dirs: list[Path], out: Path) -> None:
    """The sweep's report; runs measured in another unit (e.g. per-token metrics) get their own, in a subfolder."""
    by_unit: dict[str, list[Path]] = {}
    for run_dir in run_dirs:
        unit = json.loads((run_dir / "run.json").read_text()).get("metric_unit", "nats/sequence")
        by_unit.setdefault(unit, []).append(run_dir)
    for index, (unit, dirs) in enumerate(sorted(by_unit.items(), key=lambda item: item[0] != "nats/sequence")):
        write_report(dirs, out if index == 0 else out / unit.replace("/", "_per_").replace("nats_per_", "per_"))


def collect(out: Path, runs: list[Run]) -> list[dict[str, Any]]:
    """Each run's summary line with its group and seed, and its metric rows."""
    results = []
    for r in runs:
        run = load_run(out / "runs" / r.name)
        results.append({"name": r.name, "group": r.group, "seed": r.seed, **summarise(run), "rows": run.metrics,
                        "data_tokens": float(run.data_tokens()[-1])})
    return results


# --------------------------------------------------------------------------------------------------
# Findings: pure functions of the run summaries (tested on synthetic inputs)
# --------------------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _rise(result: dict[str, Any]) -> float:
    """How far the golden metric ended above its minimum: the size of the hacking effect."""
    return result["golden_final"] - result["golden_min"]


def _minutes(result: dict[str, Any]) -> float:
    return ((result.get("train_seconds") or 0.0) + (result.get("eval_seconds") or 0.0)) / 60


def group_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group, over seeds: hacking count, golden rise, final golden and proxy, and what the data cost in
    generated tokens and stage-2 minutes (mean ± sd)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    table = []
    for group, members in groups.items():
        row = {"group": group, "seeds": len(members), "hacking": sum(bool(m["hacking"]) for m in members)}
        for key, fn in (("rise", _rise), ("golden_final", lambda m: m["golden_final"]),
                        ("golden_min", lambda m: m["golden_min"]), ("proxy_final", lambda m: m["proxy_final"]),
                        ("data_tokens", lambda m: m["data_tokens"]), ("minutes", _minutes)):
            row[key], row[f"{key}_sd"] = _mean_sd([fn(m) for m in members])
        table.append(row)
    return table


def _finding(claim: str, reproduced: bool, evidence: str) -> dict[str, Any]:
    return {"claim": claim, "reproduced": reproduced, "evidence": evidence}


def _by_group(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["group"]: row for row in group_table(results)}


def _hacking_findings(groups: dict[str, dict[str, Any]], offline: list[str], online: list[str]) -> list[dict]:
    found = []
    if offline:
        hacked = sum(groups[g]["hacking"] for g in offline)
        total = sum(groups[g]["seeds"] for g in offline)
        found.append(_finding("Offline data → teacher hacking (golden turns up while the proxy does not)",
                              hacked * 2 > total, f"{hacked}/{total} offline runs hack: " + "; ".join(
                                  f"{g}: {groups[g]['hacking']}/{groups[g]['seeds']}, rise {groups[g]['rise']:+.2f}"
                                  f" ± {groups[g]['rise_sd']:.2f}" for g in offline)))
    if online:
        hacked = sum(groups[g]["hacking"] for g in online)
        total = sum(groups[g]["seeds"] for g in online)
        found.append(_finding("Online data → no teacher hacking", hacked == 0, f"{hacked}/{total} online runs hack: "
                              + "; ".join(f"{g}: rise {groups[g]['rise']:+.2f} ± {groups[g]['rise_sd']:.2f}"
                                          for g in online)))
    return found


def _monotone(values: list[float], increasing: bool) -> bool:
    pairs = list(zip(values, values[1:]))
    return all(b > a for a, b in pairs) if increasing else all(b < a for a, b in pairs)


def findings_sources(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = _by_group(results)
    return _hacking_findings(groups, [g for g in groups if g == "offline"], [g for g in groups if g in ONLINE])


def findings_diversity(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = list(_by_group(results).values())  # in expansion order: k = 1, 2, 5
    rises = [g["rise"] for g in groups]
    proxies = [g["proxy_final"] for g in groups]
    spread = (max(proxies) - min(proxies)) / max(abs(statistics.fmean(proxies)), 1e-12)
    return [
        _finding("At a fixed dataset size, fewer prompts × more generations makes hacking worse",
                 _monotone(rises, increasing=True),
                 "golden rise " + ", ".join(f"{g['group']}: {g['rise']:+.2f} ± {g['rise_sd']:.2f}" for g in groups)),
        _finding("…while the proxy curves stay nearly unchanged", spread < 0.25,
                 f"final proxy {', '.join(f'{p:.2f}' for p in proxies)} (spread {100 * spread:.0f}% of the mean)"),
    ]


def findings_budget(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = list(_by_group(results).values())  # k = 1, 2, 4, 8
    finals = [g["golden_final"] for g in groups]
    rises = [g["rise"] for g in groups]
    return [
        _finding("More generations per prompt improves the golden metric", _monotone(finals, increasing=False),
                 "final golden " + ", ".join(f"{g['group']}: {g['golden_final']:.2f} ± {g['golden_final_sd']:.2f}"
                                             for g in groups)),
        _finding("…and weakens hacking", rises[-1] < rises[0],
                 "golden rise " + ", ".join(f"{g['group']}: {g['rise']:+.2f}" for g in groups)),
    ]


def findings_losses(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = _by_group(results)
    return _hacking_findings(groups, [g for g in groups if g.endswith(" offline")],
                             [g for g in groups if not g.endswith(" offline")])


def findings_sizes(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = _by_group(results)
    return _hacking_findings(groups, [g for g in groups if g.endswith(" offline")],
                             [g for g in groups if not g.endswith(" offline")])


def findings_mixture(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = list(_by_group(results).values())  # λ = 0, 0.25, 0.5, 1
    rises = [g["rise"] for g in groups]
    return [
        _finding("More online-student data (higher λ) weakens hacking", rises[-1] < rises[0],
                 "golden rise " + ", ".join(f"{g['group']}: {g['rise']:+.2f} ± {g['rise_sd']:.2f}" for g in groups)),
        _finding("…at the price of generated tokens", _monotone([g["data_tokens"] for g in groups], True),
                 "tokens generated (offline dataset + online samples) " + ", ".join(
                     f"{g['group']}: {g['data_tokens']:,.0f}, {g['minutes']:.1f} min" for g in groups)),
    ]


def findings_tasks(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sources finding on each task separately (the paper: it holds across tasks)."""
    groups = _by_group(results)
    found = []
    for task in dict.fromkeys(g.split(" ")[0] for g in groups):
        for finding in _hacking_findings(groups, [f"{task} offline"],
                                         [g for g in groups if g.startswith(f"{task} ") and not g.endswith(" offline")]):
            found.append({**finding, "claim": f"{task}: {finding['claim']}"})
    return found


def findings_factors(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Which single changes to the base keep offline hacking and which remove it."""
    groups = _by_group(results)
    base = groups.get("base")
    found = []
    for name, g in groups.items():
        if name == "base":
            continue
        keeps = g["hacking"] * 2 > g["seeds"]
        found.append(_finding(f"offline still hacks with: {name}", keeps,
                              f"{g['hacking']}/{g['seeds']} hack, rise {g['rise']:+.2f} ± {g['rise_sd']:.2f}"
                              + (f" (base {base['rise']:+.2f})" if base else "")))
    return found


FINDINGS: dict[str, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]] = {
    "factors": findings_factors,
    "tasks": findings_tasks,
    "sources": findings_sources, "diversity": findings_diversity, "budget": findings_budget,
    "losses": findings_losses, "sizes": findings_sizes, "mixture": findings_mixture,
}


def format_findings(preset: str, summary: dict[str, Any]) -> str:
    lines = [f"### `{preset}`: {summary['runs']} runs, {summary['seeds']} seed(s), "
             f"{summary['wall_seconds'] / 60:.0f} min", "",
             "| finding (paper) | reproduced here | evidence |", "| --- | --- | --- |"]
    lines += [f"| {f['claim']} | {'yes' if f['reproduced'] else '**no**'} | {f['evidence']} |"
              for f in summary["findings"]]
    lines += ["", "| setting | seeds | hacking | golden rise | final golden | final proxy | tokens generated "
              "| stage-2 min |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {g['group']} | {g['seeds']} | {g['hacking']}/{g['seeds']} | {g['rise']:+.2f} ± {g['rise_sd']:.2f} | "
              f"{g['golden_final']:.2f} ± {g['golden_final_sd']:.2f} | {g['proxy_final']:.2f} ± {g['proxy_final_sd']:.2f} "
              f"| {g['data_tokens']:,.0f} | {g['minutes']:.1f} |" for g in summary["groups"]]
    return "\n".join(lines) + "\n"


def write_reproduction(sweep_dirs: list[Path], path: Path, command_prefix: str = "teacherhack sweep") -> None:
    """docs/REPRODUCTION.md from finished sweeps: per preset the command, machine, wall time, figures and
    findings, exactly as measured (regenerate it rather than edit it)."""
    import shutil

    figures = path.parent / "reproduction"
    sweeps = [(d, json.loads((d / "sweep.json").read_text()), json.loads((d / "findings.json").read_text()))
              for d in sweep_dirs]
    lines = ["# Reproduction record", "",
             "Generated by `teacherhack reproduction` from the sweep folders; do not edit by hand.", "",
             "| preset | runs | seeds | wall time | findings reproduced |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| [`{plan['preset']}`](#{plan['preset']}) | {summary['runs']} | {plan['seeds']} | "
              f"{summary['wall_seconds'] / 60:.0f} min | "
              f"{sum(f['reproduced'] for f in summary['findings'])}/{len(summary['findings'])} |"
              for _, plan, summary in sweeps]
    lines.append("")
    for sweep_dir, plan, summary in sweeps:
        preset = plan["preset"]
        lines += [f"## `{preset}`", "", f"Command: `{command_prefix} {preset} --seeds {plan['seeds']} "
                  f"--out {sweep_dir.name}` (base preset `{plan['base']['preset']}`)", "",
                  f"Machine: {summary.get('machine', 'not recorded')}; wall time {summary['wall_seconds'] / 60:.0f} min.",
                  ""]
        notes = figures / preset / "NOTES.md"  # hand-written context: what was tried, what a result means
        if notes.exists():
            lines += [notes.read_text().strip(), ""]
        for png in sorted(sweep_dir.glob("*.png")):
            target = figures / preset / png.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, target)
            lines += [f"![{png.stem}]({target.relative_to(path.parent).as_posix()})", ""]
        lines += [(sweep_dir / "findings.md").read_text(), ""]
    path.write_text("\n".join(lines))
