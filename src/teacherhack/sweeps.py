"""The paper's experiments as sweep presets, and what each one concludes.

A preset is a list of settings (overrides of a base lab configuration), each run for several seeds, plus the
findings it tests: pure functions of the finished runs' summaries, each saying whether a finding of the paper
reproduced here, with the evidence. This module is the one registry of presets (``SWEEPS``); running them is
``teacherhack.lab.run_sweep``'s job. Kept free of torch, so the command line can list presets at once.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teacherhack.errors import UserError
from teacherhack.rundir import load_run, summarise

ONLINE = ("online_teacher", "online_student")


@dataclass(frozen=True)
class Run:
    """One run of a sweep."""

    name: str  # folder under runs/, unique in the sweep
    group: str  # the setting measured (a curve label); seeds of one setting share it
    seed: int
    overrides: dict[str, Any]  # on top of the sweep's base configuration


@dataclass(frozen=True)
class Preset:
    """A sweep preset: its settings for a base distillation pool of ``n`` prompts, the findings it tests, the
    seeds it runs by default (as many as keep it within an hour on 2 cores), and whether it asks a question
    of this lab rather than testing one of the paper's findings."""

    about: str
    settings: Callable[[int, int], list[tuple[str, dict[str, Any]]]]  # (prompts used, prompts available)
    findings: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
    seeds: int
    exploratory: bool = False


def expand(preset: str, n: int, available: int, seeds: int) -> list[Run]:
    """The runs of ``preset`` for a base configuration distilling on ``n`` prompts of a pool of ``available``."""
    if preset not in SWEEPS:
        raise KeyError(preset)
    return [Run(f"{group}/seed{seed}", group, seed, {**overrides, "seed": seed})
            for group, overrides in SWEEPS[preset].settings(n, available) for seed in range(seeds)]


# The settings a preset's own pools derive from (its settings' ``n`` and ``available``): a user's value of them is the
# base the sweep's pools are drawn from (budget: a quarter of it), not a value a run replaces
POOLS = ("distill.prompts", "task.n_distill")


def check_assignments(preset: str, keys: Iterable[str], n: int, available: int) -> None:
    """Refuse a user's setting (``--set KEY``) that the runs of ``preset`` set themselves, but for `POOLS`: each
    run's own value would replace it, while sweep.json's base recorded the user's."""
    swept = {key for run in expand(preset, n, available, 1) for key in run.overrides if key not in POOLS}
    clashes = [key for key in keys if key in swept]
    if clashes:
        why = "; ".join(f"{key}: {'each run its own, 0 to K-1 with --seeds K' if key == 'seed' else 'what it compares'}"
                        for key in clashes)
        raise UserError(f"--set {', '.join(clashes)}: the {preset} sweep sets {'it' if len(clashes) == 1 else 'them'} "
                        f"in its runs ({why}), which would replace the value given; leave "
                        f"{'it' if len(clashes) == 1 else 'them'} out, or run one setting with teacherhack lab")


def _split(n: int, parts: int) -> int:
    return max(1, n // parts)


# The tasks preset trains the Debian and WordNet oracles on 12.5k pairs each, half the ~25k the default kjv-rv
# oracle gets: at 25k the preset took 71 minutes (WordNet's full 150k alone took 24). kjv-rv keeps the default, so
# its runs are the `sources` runs of the same seeds and reuse the upstream `make lab` leaves in the cache.
TASK_ORACLE_PAIRS: dict[str, dict[str, Any]] = {
    "kjv-rv": {}, "debian-descriptions": {"task.n_oracle": 12_500}, "wordnet": {"task.n_oracle": 12_500}}

def _factors(n: int) -> dict[str, dict[str, Any]]:
    """One factor at a time around the base (offline data in every setting)."""
    return {
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
               "signal_bytes": members[0].get("signal_bytes"),
               "undecided": sum(not m.get("verdict", {}).get("judged", True) for m in members),
               "unit": members[0].get("unit", "nats/seq"),
               "reason": next((m["verdict"]["reason"] for m in members if not m["hacking"] and "verdict" in m), "")}
        for key, fn in (("rise", _rise), ("golden_final", lambda m: m["golden_final"]),
                        ("golden_min", lambda m: m["golden_min"]), ("proxy_final", lambda m: m["proxy_final"]),
                        ("data_tokens", lambda m: m["data_tokens"]), ("minutes", _minutes),
                        ("seconds_per_step", lambda m: (m.get("train_seconds") or 0.0) / max(m.get("steps") or 1, 1))):
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
    return hacked, total, f"{hacked}/{total} {kind} runs hack{_late(sum(groups[g]['undecided'] for g in names))}"


def _late(undecided: int) -> str:
    """The runs too close to the end to judge, in words: a run the verdict did not judge is no evidence that it
    does not hack, so a count of hacking runs says how many it could not judge."""
    return f" ({undecided} with the golden minimum too close to the end to judge)" if undecided else ""


def _offline_partner(group: str) -> str:
    """The offline group an online one is compared with: the same setting with offline data."""
    return f"{group.rsplit(' ', 1)[0]} offline" if " " in group else "offline"


def _hacks(row: dict[str, Any]) -> bool:
    return row["hacking"] * 2 > row["seeds"]


def _hacking_findings(groups: dict[str, dict[str, Any]], offline: list[str], online: list[str]) -> list[dict]:
    """Offline: most runs hack. Online: no run hacks and, where the same setting hacks offline, the golden rise
    is below the offline one by 2 standard errors: a verdict cannot judge a run whose golden minimum comes
    in the last few evaluations, but the rise still shows whether the curve turned up as the offline one did.
    An online group with runs too close to the end to judge and no hacking offline partner is tested by neither,
    so the claim is not reproduced, and the evidence names those groups."""
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
        hacked, total, counts = _counts(groups, online, "online")
        untested = [g for g in online if groups[g]["undecided"] and not (partners[g] is not None and _hacks(partners[g]))]
        found.append(_finding("Online data → no teacher hacking", hacked == 0 and smaller and not untested,
                              counts + ": " + "; ".join(
                                  f"{g}: rise {_pm(groups[g], 'rise', '+')}" for g in online)
                              + ("" if not compared else "; offline rise " + ", ".join(
                                  dict.fromkeys(f"{_pm(p, 'rise', '+')}" for _, p in compared))
                                 + f" ({'' if smaller else 'not '}above every online one "
                                   + ("by 2 SE)" if tested else "by its mean; one seed, no SE)"))
                              + (f"; not tested: {', '.join(untested)} "
                                 + ("has runs" if len(untested) == 1 else "have runs")
                                 + " too close to the end to judge, and no offline run hacks to compare their rise "
                                   "with" if untested else "")))
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


def findings_offline_vs_online(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sources finding across settings whose group names end with the source ("… offline", "… online_…")."""
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
                              f"{g['hacking']}/{g['seeds']} hack{_late(g['undecided'])}, rise {_pm(g, 'rise', '+')}{unit}"
                              + (f" (base {_pm(base, 'rise', '+')})" if base else "")
                              + (f"; not flagged: {g['reason']}" if not _hacks(g) and g["reason"] else "")))
    return found


def _same(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """Whether two groups' means lie within 2 combined standard errors of each other (plain equality of order
    cannot be tested with one seed: then within 10% of the larger)."""
    se = math.hypot(a[f"{key}_se"] or 0.0, b[f"{key}_se"] or 0.0)
    return abs(a[key] - b[key]) <= (2 * se if se else 0.1 * max(abs(a[key]), abs(b[key])))


def findings_topk(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per source: does truncating the teacher to its top k tokens make hacking worse than the full distribution,
    and from which k on does the truncation stop mattering (rise and final golden both within 2 SE of full)?"""
    groups = _by_group(results)
    found = []
    for source in dict.fromkeys(g.split(" ", 1)[1] for g in groups):
        full = groups[f"full {source}"]
        truncated = [g for name, g in groups.items() if name.endswith(f" {source}") and name != f"full {source}"]
        # worse: it hacks, more often than the full distribution or by a rise 2 SE larger (a larger drift of runs
        # that never hack is not worse hacking)
        worse = [g for g in truncated if g["hacking"] and (g["hacking"] > full["hacking"] or _below(full, g, "rise"))]
        matches = [g for g in truncated if _same(g, full, "rise") and _same(g, full, "golden_final")]
        smallest = next((g for g in truncated if all(h in matches for h in truncated[truncated.index(g):])), None)
        evidence = "; ".join(f"{g['group']}: {g['hacking']}/{g['seeds']} hack, rise {_pm(g, 'rise', '+')}, final golden "
                             f"{_pm(g, 'golden_final')}, {g['signal_bytes']:,} bytes/token"
                             for g in [*truncated, full])
        found.append(_finding(f"{source}: top-k truncation makes hacking worse than the full distribution",
                              bool(worse), (f"worse at {', '.join(g['group'] for g in worse)}; " if worse else "")
                              + evidence))
        found.append(_finding(f"{source}: some k gives the full distribution's result",
                              smallest is not None, f"from {smallest['group'].split(' ')[0]} on" if smallest
                              else "no k does: every truncation changes the rise or the final golden by 2 SE"))
    return found


def findings_onpolicy(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Does on-policy distillation with the sampled-token reverse KL hack or drift where the full-distribution
    reverse KL does not, and which on-policy loss ends closest to the oracle?"""
    groups = _by_group(results)
    full = groups["reverse_kl"]
    sampled = [g for name, g in groups.items() if name.startswith("sampled_reverse_kl")]
    drifts = [g for g in sampled if g["hacking"] > full["hacking"] or _below(full, g, "rise")]
    best, second = sorted(groups.values(), key=lambda g: g["golden_final"])[:2]
    closest = _below(best, second, "golden_final")  # below the runner-up by 2 SE (one seed: by its mean)
    return [
        _finding("The sampled-token reverse KL hacks or drifts where the full-distribution reverse KL does not",
                 bool(drifts), "; ".join(f"{g['group']}: {g['hacking']}/{g['seeds']} hack, rise {_pm(g, 'rise', '+')}, "
                                         f"final golden {_pm(g, 'golden_final')}" for g in [*sampled, full])),
        _finding(f"Closest to the oracle at the end: {best['group']}", closest,
                 ", ".join(f"{g['group']}: {_pm(g, 'golden_final')}" for g in groups.values())
                 + ("" if closest else f"; not below {second['group']} by 2 SE")),
    ]


def findings_horizon(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Why online data turns up late: if it were prompt memorisation, a 16× larger pool would remove it. And the
    mechanism, measured directly: where the student ends up when it fits the teacher on plentiful fresh data,
    against the best the offline student passed through."""
    groups = _by_group(results)
    pools = sorted({int(name.split("=")[1].split(" ")[0]) for name in groups})
    small, large = pools[0], pools[-1]
    found = []
    for source in ONLINE:
        a, b = groups[f"pool={small} {source}"], groups[f"pool={large} {source}"]
        found.append(_finding(f"{source}: the late rise persists with a {large // small}× larger prompt pool "
                              "(not prompt memorisation)", b["hacking"] > 0 and not _below(b, a, "rise"),
                              f"pool {small}: {a['hacking']}/{a['seeds']} hack, rise {_pm(a, 'rise', '+')}; pool {large}: "
                              f"{b['hacking']}/{b['seeds']} hack, rise {_pm(b, 'rise', '+')}"))
    offline = groups[f"pool={small} offline"]
    plentiful = groups[f"pool={large} online_teacher"]
    # the verdict, not the rise: a rise (final less minimum) is never negative and grows with noise alone
    found.append(_finding("With plentiful fresh data the student still ends above its best point: fitting this teacher "
                          "closely leads away from the oracle, whatever the data", _hacks(plentiful),
                          f"online teacher, pool {large}: {plentiful['hacking']}/{plentiful['seeds']} hack"
                          f"{_late(plentiful['undecided'])}, golden minimum {_pm(plentiful, 'golden_min')}, final "
                          f"{_pm(plentiful, 'golden_final')} (rise {_pm(plentiful, 'rise', '+')}); for comparison offline, "
                          f"pool {small}: minimum {_pm(offline, 'golden_min')}, final {_pm(offline, 'golden_final')}"))
    return found


def findings_pretraining(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Does shared pre-training change the regime: does offline still hack and online not, and does hacking
    widen to the settings that did not hack without it?"""
    groups = _by_group(results)
    found = []
    for name, g in groups.items():
        if not name.startswith("pretrained "):
            continue
        plain = groups.get(name.replace("pretrained ", "from scratch ", 1))
        found.append(_finding(f"{name.removeprefix('pretrained ')}: hacks with pre-training", _hacks(g),
                              f"pre-trained {g['hacking']}/{g['seeds']}{_late(g['undecided'])}, rise "
                              f"{_pm(g, 'rise', '+')}, final golden {_pm(g, 'golden_final')}"
                              + (f"; from scratch {plain['hacking']}/{plain['seeds']}{_late(plain['undecided'])}, rise "
                                                           f"{_pm(plain, 'rise', '+')}, final golden "
                                                           f"{_pm(plain, 'golden_final')}" if plain else "")))
    return found


PRETRAINING_SETTINGS: dict[str, dict[str, Any]] = {
    "forward_kl offline": {"distill.sources": "offline"},
    "forward_kl online_teacher": {"distill.sources": "online_teacher"},
    "reverse_kl offline": {"distill.sources": "offline", "distill.loss": "reverse_kl"},
    "jsd offline": {"distill.sources": "offline", "distill.loss": "jsd"},
    "student xxs offline": {"distill.sources": "offline", "models.student": "xxs"},
}


SWEEPS: dict[str, Preset] = {
    "sources": Preset(
        "offline vs online teacher vs online student",
        lambda n, available: [(s, {"distill.sources": s}) for s in ("offline", *ONLINE)], findings_sources, seeds=3),
    "diversity": Preset(
        "a fixed offline dataset of N samples as N prompts × 1, N/2 × 2, N/5 × 5",
        lambda n, available: [(f"prompts={_split(n, k)} k={k}", {"distill.sources": "offline", "distill.prompts": _split(n, k),
                                                      "distill.generations_per_prompt": k}) for k in (1, 2, 5)],
        findings_diversity, seeds=3),
    "budget": Preset(
        "fixed prompts (a quarter of the pool), 1, 2, 4, 8 generations each",
        lambda n, available: [(f"k={k}", {"distill.sources": "offline", "distill.prompts": _split(n, 4),
                               "distill.generations_per_prompt": k}) for k in (1, 2, 4, 8)],
        findings_budget, seeds=3),
    "losses": Preset(
        "forward KL, reverse KL, JSD(0.5), skew KL; offline and online student",
        lambda n, available: [(f"{loss} {source}", {"distill.sources": source, "distill.loss": loss})
                   for loss in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl")
                   for source in ("offline", "online_student")],
        findings_offline_vs_online, seeds=2),
    "sizes": Preset(
        "two teacher × two student sizes; offline and online teacher",
        lambda n, available: [(f"teacher={t} student={s} {source}", {"models.teacher": t, "models.student": s,
                                                          "distill.sources": source})
                   for t in ("s", "m") for s in ("xxs", "xs") for source in ("offline", "online_teacher")],
        findings_offline_vs_online, seeds=2),
    "mixture": Preset(
        "online-student fraction λ ∈ {0, 0.25, 0.5, 1} of GKD's mixture, with what the data costs",
        lambda n, available: [(f"lambda={lam}", {"distill.sources": "mixture", "distill.mixture_lambda": lam})
                   for lam in (0.0, 0.25, 0.5, 1.0)],
        findings_mixture, seeds=3),
    "tasks": Preset(
        "the sources comparison on the three built-in tasks",
        lambda n, available: [(f"{task} {source}", {"task.spec": task, "distill.sources": source, **oracle_pairs})
                   for task, oracle_pairs in TASK_ORACLE_PAIRS.items() for source in ("offline", *ONLINE)],
        findings_tasks, seeds=2),
    "factors": Preset(
        "one change at a time around the base, offline data: what makes hacking here",
        lambda n, available: [(name, {"distill.sources": "offline", **overrides}) for name, overrides in _factors(n).items()],
        findings_factors, seeds=1, exploratory=True),
    "horizon": Preset(
        "2,000 steps from the base pool, 4× and the whole distillation pool (500, 2,000, 8,000 in the default), each "
        "source: why online data turns up late",
        lambda n, available: [(f"pool={pool} {source}", {"distill.sources": source, "distill.prompts": pool,
                                                          "distill.steps": 2000})
                              for pool in sorted({n, min(4 * n, available), available}) for source in ("offline", *ONLINE)],
        findings_horizon, seeds=2, exploratory=True),
    "pretraining": Preset(
        "shared pre-training of every model size on the task's text, against none: does it change the regime?",
        lambda n, available: [(f"{label} {name}", {**overrides, "pretrain.epochs": epochs})
                   for name, overrides in PRETRAINING_SETTINGS.items()
                   for label, epochs in (("from scratch", 0.0), ("pretrained", 1.0))],
        findings_pretraining, seeds=2, exploratory=True),
    "topk": Preset(
        "the teacher's top k ∈ {1, 4, 16, 64} tokens with a tail bucket, or its full distribution; offline and online student",
        lambda n, available: [(f"{'full' if k is None else f'top-{k}'} {source}", {"distill.top_k": k, "distill.sources": source})
                   for source in ("offline", "online_student") for k in (1, 4, 16, 64, None)],
        findings_topk, seeds=2, exploratory=True),
    "onpolicy": Preset(
        "online student with forward KL, full reverse KL, and the sampled-token reverse KL (k1, k3) of on-policy distillation",
        lambda n, available: [(name, {"distill.sources": "online_student", "eval.reverse_samples": 64, **overrides})
                              for name, overrides in {
            "forward_kl": {}, "reverse_kl": {"distill.loss": "reverse_kl"},
            "sampled_reverse_kl k1": {"distill.loss": "sampled_reverse_kl", "distill.kl_estimator": "k1"},
            "sampled_reverse_kl k3": {"distill.loss": "sampled_reverse_kl", "distill.kl_estimator": "k3"}}.items()],
        findings_onpolicy, seeds=2, exploratory=True),
}


def collect(out: Path, runs: list[Run]) -> list[dict[str, Any]]:
    """Each run's summary line with its group and seed, and its metric rows."""
    results = []
    for r in runs:
        run = load_run(out / "runs" / r.name)
        results.append({"name": r.name, "group": r.group, "seed": r.seed, **summarise(run), "rows": run.metrics,
                        "data_tokens": float(run.data_tokens()[-1]), "unit": run.unit,
                        "signal_bytes": run.settings.get("teacher_signal_bytes")})
    return results


def _bytes(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def format_findings(preset: str, summary: dict[str, Any]) -> str:
    head = ("| question (not a paper finding) | answer |" if SWEEPS[preset].exploratory
            else "| finding (paper) | reproduced here |")
    units = {g["unit"] for g in summary["groups"]}
    unit = next(iter(units)) if len(units) == 1 else "the unit marked on each setting"
    lines = [f"### `{preset}`: {summary['runs']} runs, {summary['seeds']} seed(s), "
             f"{summary['wall_seconds'] / 60:.0f} min", "", f"{head} evidence |", "| --- | --- | --- |"]
    lines += [f"| {f['claim']} | {'yes' if f['reproduced'] else '**no**'} | {f['evidence']} |"
              for f in summary["findings"]]
    lines += ["", f"Metrics in {unit}; ± is the standard error over seeds (none with one seed). A run too close to "
              "the end to judge has its golden minimum within the verdict's last 3 evaluations.", "",
              "| setting | seeds | hacking | too close to judge | golden rise | final golden | final proxy "
              "| tokens generated | stage-2 min | s/step | teacher signal bytes/token |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {g['group'] if len(units) == 1 else g['group'] + ' (' + g['unit'] + ')'} | {g['seeds']} | "
              f"{g['hacking']}/{g['seeds']} | {g['undecided']} | {_pm(g, 'rise', '+')} | {_pm(g, 'golden_final')} | "
              f"{_pm(g, 'proxy_final')} | {g['data_tokens']:,.0f} | {g['minutes']:.1f} | "
              f"{g.get('seconds_per_step', 0.0):.3f} | {_bytes(g.get('signal_bytes'))} |"
              for g in summary["groups"]]
    return "\n".join(lines) + "\n"


