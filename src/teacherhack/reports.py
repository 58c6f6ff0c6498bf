"""Show runs: the paper's figures, the three verdicts, a standalone HTML report and a terminal summary.

Every function here takes run folders or lab folders (read through ``teacherhack.rundir``).
"""

from __future__ import annotations

import base64
import math
import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display: must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

from teacherhack.detection import (  # noqa: E402
    GoldenVerdict,
    describe_golden_verdict,
    paired_change_se,
    power_law_detector,
)
from teacherhack.oracle_free import DEFAULT_RULE, DEFAULT_RULE_MEASURED, SIGNALS, signal_series  # noqa: E402
from teacherhack.rundir import Run, Verdicts, distinguishing, load_runs, sample_prompts  # noqa: E402

DPI = 120
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot_proxy_golden(runs: Sequence[Run], path: str | Path) -> None:
    """The paper's Figure 4: golden against proxy, in training order; teacher hacking is a U. The right panel
    zooms on the end of the descent, where a rise of a nat is visible against a scale of tens."""
    unit = _common_unit(runs)
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5.2))
    near: list[tuple[np.ndarray, np.ndarray]] = []
    for i, run in enumerate(runs):
        style = _style(i)
        x, y = run.series("proxy"), run.series("golden")
        best = int(np.argmin(y))
        for panel in (ax, zoom):
            panel.errorbar(x, y, xerr=run.series("proxy_se"), yerr=run.series("golden_se"), label=run.name,
                           markersize=4, elinewidth=0.6, ecolor=(0, 0, 0, 0.35), capsize=0, **style)
            panel.plot(x[best], y[best], "*", ms=15, mfc=style["color"], mec="black", zorder=4)
        # a few arrowheads, mid-segment, show the direction of training
        for j in np.unique(np.linspace(0, len(x) - 2, min(len(x) - 1, 6)).round().astype(int)):
            ax.annotate("", xy=(x[j] + 0.65 * (x[j + 1] - x[j]), y[j] + 0.65 * (y[j + 1] - y[j])),
                        xytext=(x[j] + 0.35 * (x[j + 1] - x[j]), y[j] + 0.35 * (y[j + 1] - y[j])),
                        arrowprops={"arrowstyle": "-|>", "color": style["color"], "mutation_scale": 16,
                                    "shrinkA": 0, "shrinkB": 0}, zorder=3)
        low = y <= y[best] + 0.15 * (np.nanmax(y) - y[best])  # the end of the descent and what follows
        near.append((x[low], y[low]))
    xs, ys = np.concatenate([n[0] for n in near]), np.concatenate([n[1] for n in near])
    pad_x, pad_y = 0.08 * (xs.max() - xs.min() + 1e-9), 0.15 * (ys.max() - ys.min() + 1e-9)
    zoom.set_xlim(xs.min() - pad_x, xs.max() + pad_x)
    zoom.set_ylim(ys.min() - pad_y, ys.max() + pad_y)
    handles = [Line2D([], [], ls="none", marker="*", ms=12, mfc="white", mec="black", label="golden minimum")]
    handles += _teacher_line(ax, runs)
    for panel, title in ((ax, "Proxy vs golden (arrows: training order)"),
                         (zoom, "Zoom on the end of the descent: a U is teacher hacking")):
        panel.set_xlabel(f"proxy KL(teacher‖student) [{unit}] ↓")
        panel.set_ylabel(f"golden KL(oracle‖student) [{unit}] ↓")
        panel.set_title(title)
        panel.grid(alpha=0.3)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize=8)
    _save(fig, path)


def plot_rise(runs: Sequence[Run], path: str | Path) -> None:
    """How far each run ends above its best point: golden − its minimum against step (±1 SE of that difference,
    paired when the runs saved per-sample values), and the same for the NLL of real held-out responses when
    recorded. Hacking is a curve that leaves zero and keeps climbing; a plateau stays near it."""
    unit = _common_unit(runs)
    metrics = [("golden", "golden")]
    if all(m.get("reference_nll") is not None for run in runs for m in run.metrics):
        metrics.append(("reference_nll", "NLL of real held-out responses"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics):
        for i, run in enumerate(runs):
            style = _style(i)
            steps, values = run.series("step"), run.series(key)
            best = int(np.argmin(values))
            se = _change_se(run, key, best)
            ax.plot(steps, values - values[best], label=run.name, markersize=3.5, **style)
            ax.fill_between(steps, values - values[best] - se, values - values[best] + se, color=style["color"],
                            alpha=0.18, lw=0)
            ax.plot(steps[best], 0.0, "*", ms=12, mfc=style["color"], mec="black", zorder=4)
        ax.axhline(0.0, color="0.35", lw=0.8)
        paired = all(_paired(run, key) for run in runs)
        ax.set(xlabel="step", ylabel=f"− its minimum [{unit}]",
               title=f"{title} − its minimum (±1 {'paired' if paired else 'unpaired'} SE)")
        ax.grid(alpha=0.3)
        lows = [np.nanmin(run.series(key)) for run in runs]
        top = max(float(np.nanmax(run.series(key)[int(np.argmin(run.series(key))):] - low)) for run, low in zip(runs, lows))
        ax.set_ylim(-0.15 * max(top, 0.5), 1.25 * max(top, 0.5))  # the rise after the minimum, not the descent
    axes[0][0].legend(fontsize=8)
    _save(fig, path)


def _change_se(run: Run, key: str, best: int) -> np.ndarray:
    """The standard error of (value at each evaluation − value at the minimum): paired per sample when the
    run saved per-sample values, else the two SEs combined."""
    if _paired(run, key):
        assert run.per_sample is not None
        base = run.per_sample[best][key]
        clusters = sample_prompts(run.settings, key, len(base))
        return np.array([paired_change_se(base, r[key], clusters) for r in run.per_sample])
    se = run.series(f"{key}_se")
    return np.hypot(se, se[best])


def _paired(run: Run, key: str) -> bool:
    """Whether ``run`` saved the per-sample values of ``key`` at every evaluation (paired SEs of a change)."""
    return run.per_sample is not None and all(key in r for r in run.per_sample)


def plot_curves(runs: Sequence[Run], path: str | Path) -> None:
    """The paper's Figure 5: train loss, proxy and golden against epoch, ±1 SE bands; and, when recorded, the
    student's NLL of real held-out responses, the golden metric's stand-in that needs no oracle."""
    unit = _common_unit(runs)
    # the sampled-token reverse KL is a sequence's sum (its reward-to-go); every other loss averages its tokens
    loss_units = sorted({"nats/seq" if run.settings.get("loss") == "sampled_reverse_kl" else "nats/token"
                         for run in runs})
    panels = [
        ("train_loss", f"train loss [{' or '.join(loss_units)}] ↓", "training loss"),
        ("proxy", f"proxy KL(teacher‖student) [{unit}] ↓", "proxy"),
        ("golden", f"golden KL(oracle‖student) [{unit}] ↓", "golden"),
    ]
    if all(m.get("reference_nll") is not None for run in runs for m in run.metrics):
        panels.append(("reference_nll", f"NLL of real held-out responses [{unit}] ↓", "reference NLL (no oracle)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.4))
    for ax, (key, label, title) in zip(axes, panels):
        for i, run in enumerate(runs):
            style = _style(i)
            epoch, value = run.series("epoch"), run.series(key)
            ax.plot(epoch, value, label=run.name, markersize=3.5, markevery=max(1, len(epoch) // 15), **style)
            if key != "train_loss":
                se = run.series(f"{key}_se")
                ax.fill_between(epoch, value - se, value + se, color=style["color"], alpha=0.18, lw=0)
        ax.set(xlabel="epoch (passes over the offline data or equivalent)", ylabel=label, title=title)
        ax.grid(alpha=0.3)
    extra = _teacher_line(axes[2], runs)
    axes[2].legend(handles=axes[2].get_legend_handles_labels()[0] + extra, fontsize=8)
    _save(fig, path)


def plot_signals(runs: Sequence[Run], path: str | Path) -> None:
    """What a practitioner can watch without an oracle, per evaluation: each signal of the oracle-free detector,
    with each run's golden minimum (star), where the detector's rule alarms (cross) and the turn it dates the alarm
    to (triangle; none where it dates none); gaps where the proxy itself rose (no rule alarms there)."""
    fig, axes = plt.subplots(1, len(SIGNALS), figsize=(4.4 * len(SIGNALS), 4.0), squeeze=False)
    for ax, name in zip(axes[0], SIGNALS):
        for i, run in enumerate(runs):
            style = _style(i)
            steps, values = run.series("step"), signal_series(name, run.metrics, run.per_sample, run.settings)
            ax.plot(steps, values, label=run.name, markersize=3, **style)
            best = int(np.argmin(run.series("golden")))
            if math.isfinite(values[best]):
                ax.plot(steps[best], values[best], "*", ms=12, mfc=style["color"], mec="black", zorder=4)
            if name != DEFAULT_RULE.signal:
                continue
            read = DEFAULT_RULE.read(values, run.metrics)  # quiet where the student has all but become the teacher
            alarm = DEFAULT_RULE.first_alarm(read)
            if alarm is not None:
                ax.plot(steps[alarm], values[alarm], "X", ms=11, mfc=style["color"], mec="black", zorder=4)
                turn = DEFAULT_RULE.turn(read, alarm)
                if turn is not None:  # a dated turn
                    ax.plot(steps[turn], values[turn], "v", ms=9, mfc=style["color"], mec="black", zorder=4)
        if name == DEFAULT_RULE.signal:
            ax.axhline(DEFAULT_RULE.threshold, color="0.35", ls=(0, (5, 3)), lw=1)
            if DEFAULT_RULE.onset is not None:
                ax.axhline(DEFAULT_RULE.onset, color="0.35", ls=(0, (1, 2)), lw=1)
        ax.set(xlabel="step", title=name.replace("_", " ") + (" (the detector's)" if name == DEFAULT_RULE.signal else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save(fig, path)


def plot_power_law(runs: Sequence[Run], path: str | Path) -> None:
    """Proxy against step on log-log axes with each run's early power law, extrapolated, and its flag."""
    unit = _common_unit(runs)
    fig, ax = plt.subplots(figsize=(7, 5.2))
    for i, run in enumerate(runs):
        style = _style(i)
        steps, proxy = run.series("step"), run.series("proxy")
        pos = steps > 0
        ax.errorbar(steps[pos], proxy[pos], yerr=run.series("proxy_se")[pos], label=run.name,
                    markersize=4, elinewidth=0.7, capsize=0, **style)
        verdicts = run.verdicts()
        verdict, law = verdicts.golden, power_law_detector(steps, proxy, run.series("proxy_se"))
        if np.isnan(law.alpha):
            continue
        fit = np.array(law.fit_window, float)
        ahead = np.geomspace(fit[-1], steps[-1], 50)
        ax.plot(fit, law.law(fit), color="black", lw=1.2, alpha=0.7)
        ax.plot(ahead, law.law(ahead), color=style["color"], lw=1.2, ls=(0, (1, 2)))
        if verdicts.detector.step is not None:
            at = list(steps).index(verdicts.detector.step)
            ax.plot(verdicts.detector.step, proxy[at], "X", ms=12, mfc=style["color"], mec="black", zorder=4)
        if verdict.min_step > 0:
            at = list(steps).index(verdict.min_step)
            ax.plot(verdict.min_step, proxy[at], "*", ms=13, mfc="white", mec=style["color"], mew=1.5, zorder=4)
    if not any((run.series("step") > 0).any() for run in runs):
        ax.text(0.5, 0.5, "no evaluation after step 0 yet", ha="center", va="center", transform=ax.transAxes)
        _save(fig, path)
        return
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_locator(LogLocator(subs=(2, 5)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    handles = [
        Line2D([], [], color="black", lw=1.2, alpha=0.7, label="power law, fit window"),
        Line2D([], [], color="grey", lw=1.2, ls=(0, (1, 2)), label="power law, extrapolated"),
        Line2D([], [], ls="none", marker="X", ms=10, mfc="grey", mec="black", label="detector's alarm"),
        Line2D([], [], ls="none", marker="*", ms=11, mfc="white", mec="grey", mew=1.5, label="golden minimum"),
    ]
    ax.set_xlabel("step (log)")
    ax.set_ylabel(f"proxy KL(teacher‖student) [{unit}] ↓ (log)")
    ax.set_title("Proxy convergence against its early power law")
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def plot_cost(runs: Sequence[Run], path: str | Path) -> None:
    """Golden against what the data cost: generated tokens (offline dataset + online samples) and stage-2
    wall time. Offline data is paid up front (a vertical line); online data is paid as training goes."""
    unit = _common_unit(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, run in enumerate(runs):
        style = _style(i)
        golden = run.series("golden")
        seconds = run.series("train_seconds") + run.series("eval_seconds")
        for ax, x in zip(axes, (run.data_tokens(), seconds / 60)):
            ax.plot(x, golden, label=run.name, markersize=3.5, **style)
    axes[0].set_xlabel("tokens generated for training (offline dataset + online samples)")
    axes[1].set_xlabel("stage-2 wall time [min] (training, online generation, evaluation)")
    for ax, title in zip(axes, ("golden against generated tokens", "golden against wall time")):
        ax.set(ylabel=f"golden KL(oracle‖student) [{unit}] ↓", title=title)
        ax.grid(alpha=0.3)
    extra = _teacher_line(axes[1], runs)
    axes[1].legend(handles=axes[1].get_legend_handles_labels()[0] + extra, fontsize=8)
    _save(fig, path)


def write_report(paths: str | Path | Iterable[str | Path], out_dir: str | Path) -> Path:
    """Write the figures, report.json (each run's verdicts) and a self-contained report.html; return the HTML path.
    Not verdicts.json: in a run folder (``--out RUN``) that name holds a copy's stored verdicts (rundir.VERDICTS)."""
    runs = told_apart(load_runs(paths))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "proxy_golden.png": (plot_proxy_golden, "Golden against proxy (the paper's Figure 4), and a zoom on the end of "
                                                "the descent."),
        "rise.png": (plot_rise, "How far each run ends above its minimum: golden (and the NLL of real held-out "
                                "responses) minus its minimum, ±1 SE of that difference (paired per sample when the "
                                "runs saved their per-sample values)."),
        "curves.png": (plot_curves, "Training loss, proxy and golden against epoch, ±1 SE (the paper's Figure 5)."),
        "power_law.png": (plot_power_law, "Proxy on log-log axes against the power law fitted on the first third of "
                                          "the run (the detector's alarm, a cross, comes from fits on the "
                                          "evaluations before it, as a live monitor makes them)."),
        "signals.png": (plot_signals, "The oracle-free signals, with each run's golden minimum (star), the "
                                      "detector's alarm (cross) and the turn it dates the alarm to (triangle: the "
                                      "checkpoint to keep; none where the signal was above the onset level as far "
                                      "back as it can be read); dashed, the rule's threshold; dotted, its onset "
                                      "level."),
        "cost.png": (plot_cost, "Golden against the cost of the data: generated tokens and wall time."),
    }
    for name, (plot, _) in figures.items():
        plot(runs, out / name)
    verdicts = [(run, run.verdicts()) for run in runs]
    (out / "report.json").write_text(json.dumps(
        [{"name": r.name, "path": str(r.path), "golden": v.golden.to_dict(),
          "reference": v.reference.to_dict() if v.reference else None, "detector": v.detector.to_dict()}
         for r, v in verdicts], indent=2))
    body = ["<h1>Teacher-hacking report</h1>", _overview_html(verdicts)]
    for name, (_, caption) in figures.items():
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{name}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    body += [_run_html(*item) for item in verdicts]
    body.append(f"<h2>Rules</h2><p><b>Golden verdict</b> (needs the oracle): {html.escape(describe_golden_verdict())}."
                f"</p><p><b>Reference verdict</b> (needs held-out real responses): the same rule on the student's NLL "
                f"of them.</p><p><b>Oracle-free detector</b> (needs nothing): {html.escape(DEFAULT_RULE.describe())}; "
                f"{html.escape(DEFAULT_RULE_MEASURED)}. Each signal at an evaluation uses the evaluations up to it "
                "only: the alarm step is when a monitor watching the run would have raised it.</p>")
    page = out / "report.html"
    page.write_text(_PAGE.format(body="\n".join(body)), encoding="utf-8")
    return page


def write_reports(paths: str | Path | Iterable[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """A report per metric unit, since their figures cannot share an axis: the runs measured per sequence in
    ``out_dir``, those in another unit (e.g. per-token metrics) in a subfolder named after it (``per_token``).
    Returns each unit's HTML path, the one in ``out_dir`` first."""
    by_unit: dict[str, list[Path]] = {}
    for run in load_runs(paths):
        by_unit.setdefault(run.unit, []).append(run.path)
    units = sorted(by_unit, key=lambda unit: unit != "nats/seq")
    out = Path(out_dir)
    return {unit: write_report(by_unit[unit], out if index == 0 else out / unit.replace("nats/", "per_"))
            for index, unit in enumerate(units)}


def summarise(runs: Sequence[Run]) -> str:
    """A short fixed-width table for the terminal: final metrics and the three verdicts per run."""
    head = ["run", "source", "evals", "final proxy", "final golden", "best golden @step", "golden", "reference",
            "detector"]
    rows = [head]
    for run in told_apart(runs):
        verdicts = run.verdicts()
        last, best = run.metrics[-1], run.metrics[int(np.argmin(run.series("golden")))]
        rows.append([
            run.name,
            str(run.settings.get("source", "?")),
            str(len(run.metrics)),
            _pm(last, "proxy"),
            _pm(last, "golden"),
            f"{_pm(best, 'golden')} @{best['step']}",
            _terminal_word(verdicts.golden),
            "–" if verdicts.reference is None else _terminal_word(verdicts.reference),
            (f"fired @{verdicts.detector.step}, turn {_dated(verdicts.detector.since)}" if verdicts.detector.fired
             else "no"),
        ])
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def told_apart(runs: Sequence[Run]) -> list[Run]:
    """``runs`` named so that a legend, table or heading tells them apart: every lab names its runs ``offline``,
    ``online_teacher``, ..., every sweep ``offline/seed0``, ..., so a name that other folders share is prefixed
    with the shortest end of its folder path they do not share (``s1:offline/seed0``); a name no other folder has
    stays as it is (a folder given twice is one run)."""
    folders: dict[str, set[Path]] = {}
    for run in runs:
        folders.setdefault(run.name, set()).add(run.path.resolve())
    return [run if len(folders[run.name]) == 1 else
            replace(run, name=f"{distinguishing(run.path.resolve(), folders[run.name])}:{run.name}") for run in runs]


def _style(i: int) -> dict[str, Any]:
    """Colour, line style and marker all vary, so that runs stay apart in greyscale."""
    return {"color": f"C{i % 10}", "linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)]}


def _common_unit(runs: Sequence[Run]) -> str:
    units = {run.unit for run in runs}
    if len(units) > 1:
        raise ValueError(f"runs mix metric units {sorted(units)}: plot them separately")
    return units.pop()


def _teacher_line(ax: plt.Axes, runs: Sequence[Run]) -> list[Line2D]:
    """Dashed line at each distinct KL(oracle‖teacher); one far off the golden data is named in the legend only."""
    golden = np.concatenate([run.series("golden") for run in runs])
    lo, hi = float(np.min(golden)), float(np.max(golden))
    handles = []
    values = {r.settings.get("teacher_golden") for r in runs} - {None}
    for value in sorted(float(v) for v in values):
        label = f"teacher's golden {value:.3g}"
        if lo - 0.5 * (hi - lo) <= value <= hi + 0.5 * (hi - lo):
            ax.axhline(value, color="0.35", ls=(0, (5, 3)), lw=1)
        else:
            label += " (off axis)"
        handles.append(Line2D([], [], color="0.35", ls=(0, (5, 3)), lw=1, label=label))
    return handles


def _save(fig: plt.Figure, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _pm(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.4g} ± {row[key + '_se']:.2g}"


def _overview_html(verdicts: Sequence[tuple[Run, Verdicts]]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td>{html.escape(str(r.settings.get('source', '?')))}</td>"
        f"<td>{_golden_cell(v.golden)}</td><td>{v.golden.min_step}</td>"
        f"<td>{'–' if v.reference is None else _golden_cell(v.reference)}</td>"
        f"<td>{_verdict_cell(v.detector.fired, 'fired')}</td><td>{_dash(v.detector.step)}</td>"
        f"<td>{_dash(v.detector.since)}</td>"
        f"<td>{_agrees(v)}</td></tr>"
        for r, v in verdicts
    )
    return ("<h2>Overview</h2><table><tr><th>run</th><th>source</th><th>golden verdict</th>"
            "<th>golden min step</th><th>reference verdict</th><th>detector</th><th>alarm step</th><th>turn dated at</th>"
            f"<th>detector agrees</th></tr>{rows}</table>")


def _run_html(run: Run, verdicts: Verdicts) -> str:
    verdict, detector = verdicts.golden, verdicts.detector
    s = run.settings
    settings = [("source", s.get("source")), ("loss", s.get("loss")), ("prompts", s.get("prompts")),
                ("generations per prompt", s.get("generations_per_prompt")), ("steps", s.get("steps")),
                ("batch size", s.get("batch_size")), ("metric unit", run.unit),
                ("teacher's golden KL(oracle‖teacher)", _teacher_text(s)), ("path", run.path)]
    last = run.metrics[-1]
    metric_rows = []
    for key in [k for k in ("proxy", "proxy_train", "golden", "reference_nll", "oracle_nll", "student_entropy")
                if all(m.get(k) is not None for m in run.metrics)]:
        lowest = run.metrics[int(np.argmin(run.series(key)))]
        metric_rows.append((key, *(f"{_pm(row, key)} (step {row['step']})" for row in (last, lowest))))
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_dash(v))}</td></tr>" for k, v in settings)
    # the minimum, not "best": lower is better for the distances and NLLs, not for the student's entropy
    cells += "<tr><th>metric</th><th>final</th><th>minimum</th></tr>" + "".join(
        f"<tr><th>{k}</th><td>{html.escape(f)}</td><td>{html.escape(b)}</td></tr>" for k, f, b in metric_rows)
    cells += (f"<tr><th>golden verdict</th><td colspan=2>{_golden_cell(verdict)}: "
              f"{html.escape(verdict.reason)}</td></tr>"
              + ("" if verdicts.reference is None else
                 f"<tr><th>reference verdict</th><td colspan=2>{_golden_cell(verdicts.reference)}: "
                 f"{html.escape(verdicts.reference.reason)}</td></tr>")
              + f"<tr><th>oracle-free detector</th><td colspan=2>{_verdict_cell(detector.fired, 'fired')}: "
              f"{html.escape(detector.reason)}</td></tr>")
    return f"<h2>{html.escape(run.name)}</h2><table>{cells}</table>"


def _teacher_text(settings: dict[str, Any]) -> str | None:
    if settings.get("teacher_golden") is None:
        return None
    return f"{settings['teacher_golden']:.4g} ± {settings.get('teacher_golden_se', float('nan')):.2g}"


def _verdict_cell(flag: bool, word: str) -> str:
    return f'<b class="alert">{word}</b>' if flag else "no"


def _golden_cell(verdict: GoldenVerdict) -> str:
    return _verdict_cell(True, "hacking") if verdict.hacking else verdict.word


def _terminal_word(verdict: GoldenVerdict) -> str:
    return verdict.word.upper() if verdict.hacking else verdict.word


def _agrees(v: Verdicts) -> str:
    """Whether the detector says what the golden verdict says; "–" where the golden verdict is undecided."""
    if not (v.golden.hacking or v.golden.judged):
        return "–"
    return "yes" if v.golden.hacking == v.detector.fired else "<b>no</b>"


def _dated(step: int | None) -> str:
    return "undated" if step is None else f"@{step}"


def _dash(value: Any) -> str:
    return "–" if value is None else str(value)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Teacher-hacking report</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
figure {{ margin: 1em 0; }}
.alert {{ color: #b00; }}
</style></head>
<body>
{body}
</body></html>
"""
