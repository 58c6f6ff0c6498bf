"""The paper's experiments as sweeps: a preset expands into stage-2 runs that share upstream artifacts, run
in parallel processes, resume after a kill, and end with a findings table that says, for each of the paper's
findings the preset tests, whether it reproduced here."""

from __future__ import annotations

import json
import math
import multiprocessing
import shlex
import shutil
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


# The tasks preset trains the Debian and WordNet oracles on 12.5k pairs each, half the ~25k the default kjv-rv
# oracle gets: at 25k the preset took 71 minutes (WordNet's full 150k alone took 24). kjv-rv keeps the default, so
# its runs are the `sources` runs of the same seeds and reuse the upstream `make lab` leaves in the cache.
TASK_ORACLE_PAIRS: dict[str, dict[str, Any]] = {
    "kjv-rv": {}, "debian-descriptions": {"task.n_oracle": 12_500}, "wordnet": {"task.n_oracle": 12_500}}


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
        settings = [(f"{task} {source}", {"task.spec": task, "distill.sources": source, **oracle_pairs})
                    for task, oracle_pairs in TASK_ORACLE_PAIRS.items() for source in ("offline", *ONLINE)]
    else:
        raise cfg.ConfigError(f"unknown sweep preset {preset!r}; choose one of {', '.join(SWEEPS)}")
    return _runs(seeds, settings)


SWEEPS = ("sources", "diversity", "budget", "losses", "sizes", "mixture", "tasks", "factors")
# Seeds per setting by default: as many as keep the preset within an hour at 2 jobs on 2 CPU cores, from the
# measured stage-2 minutes per run (offline about 4, online student 6.5, online teacher 11, single-threaded);
# `tasks` keeps 2 because one seed has no spread to report.
DEFAULT_SEEDS = {"sources": 3, "diversity": 3, "budget": 3, "losses": 2, "sizes": 2, "mixture": 3, "tasks": 2,
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
                        "data_tokens": float(run.data_tokens()[-1]), "unit": run.unit})
    return results


# --------------------------------------------------------------------------------------------------
# Findings: pure functions of the run summaries (tested on synthetic inputs)
# --------------------------------------------------------------------------------------------------


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error over seeds; no SE from a single seed (its spread is unknown, not zero)."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return statistics.fmean(values), se


def _pm(row: dict[str, Any], key: str, sign: str = "") -> str:
    """``mean ± se`` of a group-table entry, or the bare mean for one seed."""
    se = row[f"{key}_se"]
    return f"{row[key]:{sign}.2f}" + ("" if se is None else f" ± {se:.2f}")


def _below(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """Whether group a's mean is below group b's by more than 2 combined standard errors over seeds (with
    one seed per group there is no spread to test against, and plain order decides)."""
    se = math.hypot(a[f"{key}_se"] or 0.0, b[f"{key}_se"] or 0.0)
    return a[key] + 2 * se < b[key]


def _rise(result: dict[str, Any]) -> float:
    """How far the golden metric ended above its minimum: the size of the hacking effect."""
    return result["golden_final"] - result["golden_min"]


def _minutes(result: dict[str, Any]) -> float:
    return ((result.get("train_seconds") or 0.0) + (result.get("eval_seconds") or 0.0)) / 60


def group_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group, over seeds: hacking count (and runs too close to the end to judge), golden rise, final golden
    and proxy, and what the data cost in generated tokens and stage-2 minutes (mean ± standard error)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    table = []
    for group, members in groups.items():
        row = {"group": group, "seeds": len(members), "hacking": sum(bool(m["hacking"]) for m in members),
               "undecided": sum(not m.get("verdict", {}).get("judged", True) for m in members),
               "unit": members[0].get("unit", "nats/seq"),
               "reason": next((m["verdict"]["reason"] for m in members if not m["hacking"] and "verdict" in m), "")}
        for key, fn in (("rise", _rise), ("golden_final", lambda m: m["golden_final"]),
                        ("golden_min", lambda m: m["golden_min"]), ("proxy_final", lambda m: m["proxy_final"]),
                        ("data_tokens", lambda m: m["data_tokens"]), ("minutes", _minutes)):
            row[key], row[f"{key}_se"] = _mean_se([fn(m) for m in members])
        table.append(row)
    return table


def _finding(claim: str, reproduced: bool, evidence: str) -> dict[str, Any]:
    return {"claim": claim, "reproduced": reproduced, "evidence": evidence}


def _by_group(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["group"]: row for row in group_table(results)}


def _counts(groups: dict[str, dict[str, Any]], names: list[str], kind: str) -> tuple[int, int, str]:
    """Runs that hack, runs in all, and both said in words with the runs too close to the end to judge."""
    hacked, total = sum(groups[g]["hacking"] for g in names), sum(groups[g]["seeds"] for g in names)
    undecided = sum(groups[g]["undecided"] for g in names)
    late = f" ({undecided} with the golden minimum too close to the end to judge)" if undecided else ""
    return hacked, total, f"{hacked}/{total} {kind} runs hack{late}"


def _offline_partner(group: str) -> str:
    """The offline group an online one is compared with: the same setting with offline data."""
    return f"{group.rsplit(' ', 1)[0]} offline" if " " in group else "offline"


def _hacks(row: dict[str, Any]) -> bool:
    return row["hacking"] * 2 > row["seeds"]


def _hacking_findings(groups: dict[str, dict[str, Any]], offline: list[str], online: list[str]) -> list[dict]:
    """Offline: most runs hack. Online: no run hacks and, where the same setting hacks offline, the golden rise
    is below the offline one by 2 standard errors: a verdict cannot judge a run whose golden minimum comes
    in the last few evaluations, but the rise still shows whether the curve turned up as the offline one did."""
    found = []
    if offline:
        hacked, total, counts = _counts(groups, offline, "offline")
        found.append(_finding("Offline data → teacher hacking (golden turns up while the proxy does not)",
                              hacked * 2 > total, counts + ": " + "; ".join(
                                  f"{g}: {groups[g]['hacking']}/{groups[g]['seeds']}, "
                                  f"rise {_pm(groups[g], 'rise', '+')}" for g in offline)))
    if online:
        partners = {g: groups.get(_offline_partner(g)) for g in online}
        compared = [(g, p) for g, p in partners.items() if p is not None and _hacks(p)]
        smaller = all(_below(groups[g], partner, "rise") for g, partner in compared)
        tested = all(None not in (groups[g]["rise_se"], p["rise_se"]) for g, p in compared)
        hacked, _, counts = _counts(groups, online, "online")
        found.append(_finding("Online data → no teacher hacking", hacked == 0 and smaller,
                              counts + ": " + "; ".join(
                                  f"{g}: rise {_pm(groups[g], 'rise', '+')}" for g in online)
                              + ("" if not compared else "; offline rise " + ", ".join(
                                  dict.fromkeys(f"{_pm(p, 'rise', '+')}" for _, p in compared))
                                 + f" ({'' if smaller else 'not '}above every online one "
                                   + ("by 2 SE)" if tested else "by its mean; one seed, no SE)"))))
    return found


def _monotone(values: list[float], increasing: bool) -> bool:
    pairs = list(zip(values, values[1:]))
    return all(b > a for a, b in pairs) if increasing else all(b < a for a, b in pairs)


def findings_sources(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = _by_group(results)
    return _hacking_findings(groups, [g for g in groups if g == "offline"], [g for g in groups if g in ONLINE])


def _spread(groups: list[dict[str, Any]], key: str) -> float:
    return max(g[key] for g in groups) - min(g[key] for g in groups)


def findings_diversity(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Worse hacking: the rise grows with k, and from k = 1 to the last by 2 SE. The proxy "nearly unchanged":
    the settings' final proxies differ by less than their final golden metrics do (both in the run's unit)."""
    groups = list(_by_group(results).values())  # in expansion order: k = 1, 2, 5
    proxy, golden = _spread(groups, "proxy_final"), _spread(groups, "golden_final")
    return [
        _finding("At a fixed dataset size, fewer prompts × more generations makes hacking worse",
                 _monotone([g["rise"] for g in groups], increasing=True) and _below(groups[0], groups[-1], "rise"),
                 "golden rise " + ", ".join(f"{g['group']}: {_pm(g, 'rise', '+')}" for g in groups)),
        _finding("…while the proxy curves stay nearly unchanged", proxy < golden,
                 f"final proxy {', '.join(_pm(g, 'proxy_final') for g in groups)} (range {proxy:.2f}) against final "
                 f"golden {', '.join(_pm(g, 'golden_final') for g in groups)} (range {golden:.2f})"),
    ]


def findings_budget(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = list(_by_group(results).values())  # k = 1, 2, 4, 8
    improves = all(_monotone([g[key] for g in groups], increasing=False) for key in ("golden_final", "proxy_final"))
    return [
        _finding("More generations per prompt improves both metrics", improves,
                 "final golden " + ", ".join(f"{g['group']}: {_pm(g, 'golden_final')}" for g in groups)
                 + "; final proxy " + ", ".join(_pm(g, "proxy_final") for g in groups)),
        _finding("…and weakens hacking", _below(groups[-1], groups[0], "rise"),
                 "golden rise " + ", ".join(f"{g['group']}: {_pm(g, 'rise', '+')}" for g in groups)),
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
    return [
        _finding("More online-student data (higher λ) weakens hacking", _below(groups[-1], groups[0], "rise"),
                 "golden rise " + ", ".join(f"{g['group']}: {_pm(g, 'rise', '+')}" for g in groups)),
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
    """Which single changes to the base keep offline hacking and which remove it, and if not, why not."""
    groups = _by_group(results)
    base = groups.get("base")
    found = []
    for name, g in groups.items():
        if name == "base":
            continue
        unit = "" if base is None or g["unit"] == base["unit"] else f" {g['unit']}"
        found.append(_finding(f"offline still hacks with: {name}", _hacks(g),
                              f"{g['hacking']}/{g['seeds']} hack, rise {_pm(g, 'rise', '+')}{unit}"
                              + (f" (base {_pm(base, 'rise', '+')})" if base else "")
                              + (f"; not flagged: {g['reason']}" if not _hacks(g) and g["reason"] else "")))
    return found


FINDINGS: dict[str, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]] = {
    "factors": findings_factors,
    "tasks": findings_tasks,
    "sources": findings_sources, "diversity": findings_diversity, "budget": findings_budget,
    "losses": findings_losses, "sizes": findings_sizes, "mixture": findings_mixture,
}


# Presets that ask questions of this lab rather than test the paper's findings.
EXPLORATORY = ("factors",)


def format_findings(preset: str, summary: dict[str, Any]) -> str:
    head = ("| question (not a paper finding) | answer |" if preset in EXPLORATORY
            else "| finding (paper) | reproduced here |")
    units = {g["unit"] for g in summary["groups"]}
    unit = next(iter(units)) if len(units) == 1 else "marked"
    lines = [f"### `{preset}`: {summary['runs']} runs, {summary['seeds']} seed(s), "
             f"{summary['wall_seconds'] / 60:.0f} min", "", f"{head} evidence |", "| --- | --- | --- |"]
    lines += [f"| {f['claim']} | {'yes' if f['reproduced'] else '**no**'} | {f['evidence']} |"
              for f in summary["findings"]]
    lines += ["", f"Metrics in {unit}; ± is the standard error over seeds (none with one seed). A run too close to "
              "the end to judge has its golden minimum within the verdict's last 3 evaluations.", "",
              "| setting | seeds | hacking | too close to judge | golden rise | final golden | final proxy "
              "| tokens generated | stage-2 min |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {g['group'] if len(units) == 1 else g['group'] + ' (' + g['unit'] + ')'} | {g['seeds']} | "
              f"{g['hacking']}/{g['seeds']} | {g['undecided']} | {_pm(g, 'rise', '+')} | {_pm(g, 'golden_final')} | "
              f"{_pm(g, 'proxy_final')} | {g['data_tokens']:,.0f} | {g['minutes']:.1f} |" for g in summary["groups"]]
    return "\n".join(lines) + "\n"


def write_reproduction(sweep_dirs: list[Path], path: Path, command_prefix: str = "teacherhack sweep") -> None:
    """docs/REPRODUCTION.md from finished sweeps: per sweep folder the command (with every ``--set`` its base
    configuration needs), machine, wall time, figures and findings, exactly as measured (regenerate it rather
    than edit it). Hand-written notes come from ``reproduction/FOLDER/NOTES.md`` next to the record."""
    figures = path.parent / "reproduction"
    sweeps = [(d, json.loads((d / "sweep.json").read_text()), json.loads((d / "findings.json").read_text()))
              for d in sweep_dirs]
    lines = ["# Reproduction record", "",
             "Generated by `teacherhack reproduction` from the sweep folders; do not edit by hand. A wall time sums "
             "the sweep's invocations; upstream artifacts it found in the artifact cache (trained by an earlier "
             "run or sweep with the same settings) were reused, not retrained, and are not in it.", "",
             "| preset | runs | seeds | wall time | findings reproduced |", "| --- | --- | --- | --- | --- |"]
    for sweep_dir, plan, summary in sweeps:
        if summary["seeds"] != plan["seeds"]:
            raise cfg.ConfigError(f"{sweep_dir} is unfinished: planned {plan['seeds']} seeds, results for "
                                  f"{summary['seeds']}; rerun its sweep command to finish it")
    lines += [f"| [`{sweep_dir.name}`](#{sweep_dir.name}) | {summary['runs']} | {summary['seeds']} | "
              f"{summary['wall_seconds'] / 60:.0f} min | "
              + ("exploratory" if summary["preset"] in EXPLORATORY else
                 f"{sum(f['reproduced'] for f in summary['findings'])}/{len(summary['findings'])}") + " |"
              for sweep_dir, _, summary in sweeps]
    lines.append("")
    for sweep_dir, plan, summary in sweeps:  # a section per folder: a preset may be swept twice (e.g. longer)
        base = cfg.from_dict(plan["base"])
        options = ([f"--preset {base.preset}"] if base.preset != "default" else []) + [
            f"--set {shlex.quote(setting)}" for setting in cfg.assignments(base)]
        command = " ".join([command_prefix, plan["preset"], f"--seeds {plan['seeds']}", f"--out {sweep_dir.name}",
                            *options])
        lines += [f"## `{sweep_dir.name}`", "", f"Command: `{command}` (base preset `{base.preset}`)", "",
                  f"Machine: {summary.get('machine', 'not recorded')}; wall time {summary['wall_seconds'] / 60:.0f} min.",
                  ""]
        notes = figures / sweep_dir.name / "NOTES.md"  # hand-written context: what was tried, what a result means
        if notes.exists():
            lines += [notes.read_text().strip(), ""]
        for png in sorted(sweep_dir.glob("*.png")):
            target = figures / sweep_dir.name / png.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, target)
            lines += [f"![{png.stem}]({target.relative_to(path.parent).as_posix()})", ""]
        lines += [(sweep_dir / "findings.md").read_text(), ""]
    path.write_text("\n".join(lines))
