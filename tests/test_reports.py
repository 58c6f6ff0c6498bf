"""Loading run directories, figures and the standalone HTML report, on synthetic runs."""

import base64
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from teacherhack.reports import plot_curves, summarise, write_report
from teacherhack.rundir import BrokenRun, load_run, load_runs

PNG = b"\x89PNG\r\n\x1a\n"
STEPS = np.arange(0, 16) * 100


def write_run(path, name, golden, *, proxy=None, unit="nats/sequence", teacher=55.9, tokens=None, offline_tokens=0):
    """A run directory as the lab writes it; the proxy bends off its power law after step 700 by default."""
    t = np.maximum(STEPS, 100) / 100
    proxy = 30 * np.minimum(t, 7) ** -0.5 if proxy is None else proxy
    path.mkdir(parents=True)
    rows = [{"step": int(s), "epoch": s / 16, "train_loss": None if s == 0 else float(p) / 40, "proxy": float(p),
             "proxy_se": 0.15, "golden": float(g), "golden_se": 0.15, "tokens_generated": int(n),
             "train_seconds": 0.6 * s, "eval_seconds": 0.1 * s}
            for s, p, g, n in zip(STEPS, proxy, golden, np.zeros_like(STEPS) if tokens is None else tokens)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "run.json").write_text(json.dumps({
        "name": name, "source": name.split()[0], "loss": "forward_kl", "prompts": 500, "generations_per_prompt": 1,
        "steps": int(STEPS[-1]), "batch_size": 32, "metric_unit": unit, "teacher_golden": teacher,
        "teacher_golden_se": 0.2, "offline_tokens": offline_tokens}))
    return path


@pytest.fixture
def lab(tmp_path):
    """A lab directory: an offline run that hacks, an online one that does not, plus the lab's own files."""
    lab = tmp_path / "lab"
    write_run(lab / "offline", "offline 500x1", 50 + 0.05 * (STEPS / 100 - 7) ** 2)
    t = np.maximum(STEPS, 100) / 100
    write_run(lab / "online_teacher", "online_teacher", 60 - 12 * (1 - np.exp(-STEPS / 400)), proxy=30 * t**-0.35)
    (lab / "config.yaml").write_text("seed: 0\n")
    (lab / "summary.json").write_text("{}")
    return lab


def test_load_runs_takes_lab_and_run_directories(lab, tmp_path):
    runs = load_runs(lab)
    assert [r.name for r in runs] == ["offline 500x1", "online_teacher"]
    assert runs[0].settings["prompts"] == 500 and runs[0].path == lab / "offline"
    assert len(runs[0].metrics) == 16 and np.isnan(runs[0].series("train_loss")[0])
    assert runs[0].unit == "nats/seq"
    mixed = load_runs([lab / "online_teacher", lab])
    assert [r.name for r in mixed] == ["online_teacher", "offline 500x1", "online_teacher"]


def test_a_folder_whose_runs_lie_deeper_says_where(lab, tmp_path):
    """A sweep's runs are runs/NAME/seedK: `report SWEEP` named no metrics.jsonl and nothing to do about it."""
    sweep = tmp_path / "sweep"
    shutil.copytree(lab / "offline", sweep / "runs" / "offline" / "seed0")
    with pytest.raises(BrokenRun, match=rf"no metrics.jsonl here .*runs lie deeper .*{sweep}/runs/\*/seed0"):
        load_runs(sweep)
    with pytest.raises(BrokenRun, match=r"immediate subfolder$"):
        load_runs(tmp_path / "nothing-here")


def test_run_without_run_json_is_named_after_its_folder(lab):
    (lab / "offline" / "run.json").unlink()
    run = load_run(lab / "offline")
    assert run.name == "offline" and run.settings == {}


def test_write_report_is_self_contained(lab, tmp_path):
    out = tmp_path / "report"
    page = write_report([lab], out)
    assert page == out / "report.html"
    for name in ("proxy_golden.png", "rise.png", "curves.png", "power_law.png", "signals.png", "cost.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    text = page.read_text(encoding="utf-8")
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 6 and all(base64.b64decode(i).startswith(PNG) for i in images)
    assert "offline 500x1" in text and "online_teacher" in text
    assert "golden rises" in text and "evaluations in a row above it" in text and "; validated on" in text  # both verdicts' reasons
    assert text.count('<b class="alert">hacking</b>') == 2  # offline: overview row and its own table
    assert "55.9" in text and "forward_kl" in text
    verdicts = {v["name"]: v for v in json.loads((out / "report.json").read_text())}
    assert verdicts["offline 500x1"]["golden"]["hacking"] and verdicts["offline 500x1"]["detector"]["fired"]
    assert verdicts["offline 500x1"]["golden"]["min_step"] == 700
    assert not verdicts["online_teacher"]["golden"]["hacking"] and not verdicts["online_teacher"]["detector"]["fired"]


def test_a_report_written_into_a_run_folder_leaves_its_stored_verdicts_alone(tmp_path):
    """A copy of a run that left its per-sample values behind keeps the verdicts computed with them (verdicts.json, a
    dict); the report's own file of verdicts (a list) took the same name, so `teacherhack report RUN --out RUN`
    overwrote them and every later load of the run failed."""
    corpus = Path(__file__).resolve().parents[1] / "benchmarks" / "detection" / "runs"
    run = Path(shutil.copytree(corpus / "sources" / "offline" / "seed0", tmp_path / "seed0"))
    stored, before = (run / "verdicts.json").read_text(), load_run(run).verdicts()
    write_report([run], run)
    assert (run / "verdicts.json").read_text() == stored and load_run(run).verdicts() == before


def test_the_per_run_table_names_the_minimum_it_shows(lab, tmp_path):
    """The per-run table's last column is each metric's minimum: it was headed "best", wrong for the student's
    entropy, whose lowest value is not its best."""
    metrics = lab / "offline" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for i, row in enumerate(rows):
        row |= {"student_entropy": 9.0 - 0.5 * i, "student_entropy_se": 0.1}
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report([lab], tmp_path / "out").read_text(encoding="utf-8")
    assert "<tr><th>metric</th><th>final</th><th>minimum</th></tr>" in text and "<th>best</th>" not in text
    assert "<tr><th>student_entropy</th><td>1.5 ± 0.1 (step 1500)</td><td>1.5 ± 0.1 (step 1500)</td></tr>" in text


def test_report_on_a_run_too_short_for_the_detector(tmp_path):
    run = write_run(tmp_path / "short", "offline", 50 + 0 * STEPS)
    lines = (run / "metrics.jsonl").read_text().splitlines()[:4]  # steps 0-300: no power law to fit
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    text = write_report(run, tmp_path / "out").read_text(encoding="utf-8")
    assert "no alarm" in text and (tmp_path / "out" / "power_law.png").read_bytes().startswith(PNG)


def test_summarise_lists_each_run_and_verdict(lab):
    text = summarise(load_runs(lab))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["run", "source"] and len(lines) == 4
    assert "offline 500x1" in lines[2] and "HACKING" in lines[2] and "fired @" in lines[2]
    assert "online_teacher" in lines[3] and "HACKING" not in lines[3]


def test_a_run_too_young_to_judge_reads_undecided_not_no(lab, tmp_path):
    # lowest at step 1300: two evaluations after it, too few for the rule to tell a turn from a dip
    write_run(lab / "late", "late", np.where(STEPS <= 1300, 60 - 0.005 * STEPS, 53.5 + 0.002 * (STEPS - 1300)))
    text = summarise(load_runs(lab))
    row = next(line for line in text.splitlines() if line.startswith("late "))
    assert row.split()[-6:-4] == ["undecided", "–"]
    page = write_report([lab], tmp_path / "out").read_text(encoding="utf-8")
    late = re.search(r"<tr><td>late</td>.*?</tr>", page).group(0)  # its overview row
    assert late.count("undecided") == 1 and late.endswith("<td>–</td></tr>")  # no agreement to count either way


def test_per_token_units_reach_the_labels(tmp_path):
    run = load_run(write_run(tmp_path / "r", "offline", 2 + 0.01 * STEPS / 100, unit="nats/token", teacher=None))
    assert run.unit == "nats/token"
    plot_curves([run], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes().startswith(PNG)


def test_mixed_units_are_refused(tmp_path):
    a = load_run(write_run(tmp_path / "a", "a", 50 + 0 * STEPS))
    b = load_run(write_run(tmp_path / "b", "b", 50 + 0 * STEPS, unit="nats/token"))
    with pytest.raises(ValueError, match="mix metric units"):
        plot_curves([a, b], tmp_path / "c.png")


def test_the_report_command_splits_runs_by_unit_as_a_sweep_does(lab, tmp_path, capsys):
    """`teacherhack report` of runs in two units raised "runs mix metric units" with a traceback: the runs per
    sequence get the report in --out, the per-token ones theirs in --out/per_token, each with its table."""
    from teacherhack.cli import main

    write_run(tmp_path / "per-token", "per-token", 2 + 0.01 * STEPS / 100, unit="nats/token", teacher=None)
    out = tmp_path / "report"
    assert main(["report", str(lab), str(tmp_path / "per-token"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed and f"report: {out / 'per_token' / 'report.html'}" in printed
    per_seq, per_token = printed.split("runs measured in nats/token:")
    assert "online_teacher" in per_seq and "per-token" not in per_seq
    assert "per-token" in per_token and "online_teacher" not in per_token
    assert "per-token" not in (out / "report.html").read_text() and \
        "per-token" in (out / "per_token" / "report.html").read_text()


def test_runs_of_one_name_from_different_folders_are_told_apart(lab, tmp_path, capsys, monkeypatch):
    """Every sweep names its runs offline/seed0, ...: two sweeps' (or two labs') runs of one name were labelled
    alike in the legends, the terminal table and the headings. A shared name gets the end of the folder path that
    tells it apart; a name no other folder has stays as it was, and a folder given twice is one run."""
    import teacherhack.reports as reports
    from teacherhack.cli import main

    legends = []
    save = reports._save
    monkeypatch.setattr(reports, "_save", lambda fig, path: (legends.append(
        [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]), save(fig, path)))
    golden = 50 + 0.05 * (STEPS / 100 - 7) ** 2
    for sweep in ("s1", "ref"):
        write_run(tmp_path / sweep / "runs" / "offline" / "seed0", "offline/seed0", golden)
    seed0 = [str(tmp_path / sweep / "runs" / "offline" / "seed0") for sweep in ("s1", "ref")]
    out = tmp_path / "report"
    assert main(["report", *seed0, str(lab / "offline"), seed0[0], "--out", str(out)]) == 0
    names = ["s1:offline/seed0", "ref:offline/seed0", "offline 500x1", "s1:offline/seed0"]
    table = capsys.readouterr().out.splitlines()[2:6]
    assert [row.split("  ")[0] for row in table] == names
    assert all(names[:3] == legend[:3] for legend in legends) and len(legends) == 6
    page = (out / "report.html").read_text()
    assert all(f"<h2>{name}</h2>" in page for name in names)
    assert [r["name"] for r in json.loads((out / "report.json").read_text())] == names
    assert [r.name for r in reports.told_apart(load_runs([lab, lab / "offline"]))] == \
        ["offline 500x1", "online_teacher", "offline 500x1"]


def test_a_report_into_a_file_is_one_line(lab, tmp_path, capsys):
    """--out naming an existing file raised a FileExistsError traceback."""
    from teacherhack.cli import main

    (tmp_path / "file").write_text("")
    assert main(["report", str(lab), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err == f"teacherhack: error: --out {tmp_path / 'file'} is a file, not a folder: choose a folder\n"


def test_path_without_metrics_is_refused(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        load_runs([tmp_path / "empty"])
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        load_run(tmp_path / "empty")
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        load_runs(tmp_path / "missing")


def test_malformed_line_names_file_and_line(lab):
    path = lab / "offline" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = lines[3][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"offline/metrics\.jsonl:4: malformed JSON"):
        load_runs(lab)


def test_missing_or_null_field_is_named(lab):
    path = lab / "offline" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    del rows[2]["golden_se"]
    rows[5]["proxy"] = None
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: missing or null field\(s\): golden_se"):
        load_run(lab / "offline")
    del rows[2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"metrics\.jsonl:5: missing or null field\(s\): proxy"):
        load_run(lab / "offline")


def test_a_non_finite_value_is_named_in_one_line_and_a_standard_error_may_be_nan(lab, tmp_path, capsys):
    """json reads NaN and Infinity: a proxy or golden value that is not a finite number is refused where it is read,
    naming the file and line, not by a traceback from the verdicts or the figures. An SE may be NaN, as the lab
    writes it for a metric of one sample: the verdict then says it cannot decide."""
    from teacherhack.cli import main

    path = lab / "offline" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[-1]["golden_se"] = math.nan
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_run(lab / "offline").verdicts().golden.reason.startswith("no verdict")
    rows[7]["proxy"], rows[7]["golden"] = math.nan, math.inf
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for command in (["detect", str(lab)], ["report", str(lab), "--out", str(tmp_path / "report")]):
        assert main(command) == 2
        assert capsys.readouterr().err == f"teacherhack: error: {path}:8: not a finite number: proxy nan, golden inf\n"


def test_empty_metrics_unordered_steps_and_bad_run_json_are_refused(lab):
    run = lab / "offline"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], lines[2], lines[1]]) + "\n")
    with pytest.raises(ValueError, match="step 100 does not follow step 200"):
        load_run(run)
    (run / "metrics.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no evaluations"):
        load_run(run)
    (run / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"run\.json: malformed JSON"):
        load_run(run)


def test_data_tokens_count_the_offline_dataset_up_front_and_online_samples_as_they_come(tmp_path):
    offline = load_run(write_run(tmp_path / "a", "offline", np.full(16, 50.0), offline_tokens=8000))
    online = load_run(write_run(tmp_path / "b", "online", np.full(16, 50.0), tokens=STEPS * 32))
    assert offline.data_tokens().tolist() == [8000.0] * 16
    assert online.data_tokens().tolist() == (STEPS * 32).astype(float).tolist()


def test_a_report_on_a_run_with_only_its_first_evaluation(tmp_path):
    run = write_run(tmp_path / "started", "offline", 50 + 0 * STEPS)
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")  # step 0 only
    write_report(run, tmp_path / "out")
    assert (tmp_path / "out" / "power_law.png").read_bytes().startswith(PNG)


def test_labels_say_what_the_bands_and_the_loss_are(tmp_path, monkeypatch):
    """Bands are called paired only when the runs saved per-sample values; the sampled-token reverse KL's training
    loss is a sequence's sum, every other loss a mean over tokens."""
    import teacherhack.reports as reports

    figures = []
    monkeypatch.setattr(reports, "_save", lambda fig, path: figures.append(fig))
    path = write_run(tmp_path / "r", "online_student", 50 + 0.05 * (STEPS / 100 - 7) ** 2)
    reports.plot_rise([load_run(path)], tmp_path / "rise.png")
    assert "(±1 unpaired SE)" in figures[-1].axes[0].get_title()
    values = np.linspace(1.0, 2.0, 50)
    (path / "per_sample.jsonl").write_text("".join(json.dumps({"step": int(s), "golden": (values + i).tolist()}) + "\n"
                                                   for i, s in enumerate(STEPS)))
    reports.plot_rise([load_run(path)], tmp_path / "rise.png")
    assert "(±1 paired SE)" in figures[-1].axes[0].get_title()
    reports.plot_curves([load_run(path)], tmp_path / "curves.png")
    assert figures[-1].axes[0].get_ylabel() == "train loss [nats/token] ↓"
    settings = json.loads((path / "run.json").read_text())
    (path / "run.json").write_text(json.dumps({**settings, "loss": "sampled_reverse_kl"}))
    reports.plot_curves([load_run(path)], tmp_path / "curves.png")
    assert figures[-1].axes[0].get_ylabel() == "train loss [nats/seq] ↓"


def test_paired_ses_cluster_as_run_json_says_and_an_older_run_reads_as_before(tmp_path):
    """run.json records the samples per prompt of each metric in per_sample.jsonl: the verdicts and the rise figure's
    bands cluster their paired SEs by it. A run folder written before it was recorded reads as one sample per prompt:
    the SEs it was judged with, bit for bit."""
    import teacherhack.reports as reports

    golden = 50 + 0.05 * (STEPS / 100 - 7) ** 2
    path = write_run(tmp_path / "r", "offline", golden)
    rng = np.random.default_rng(0)
    base, change = np.repeat(rng.normal(0, 3, 10), 2), np.repeat(rng.normal(0, 1, 10), 2)  # 10 prompts × 2 samples
    values = [base - base.mean() + g + change * i / 4 for i, g in enumerate(golden)]
    (path / "per_sample.jsonl").write_text("".join(
        json.dumps({"step": int(s), "golden": v.tolist(), "proxy": (v / 10).tolist()}) + "\n"
        for s, v in zip(STEPS, values)))
    best = int(np.argmin(golden))
    diffs = [np.asarray(v) - values[best] for v in values]

    old = load_run(path)
    plain = [np.std(d, ddof=1) / np.sqrt(d.size) for d in diffs]  # the formula before clustering
    assert reports._change_se(old, "golden", best).tolist() == plain
    assert old.verdicts().golden.rise_z == (golden[-1] - golden[best]) / float(diffs[-1].std(ddof=1) / math.sqrt(20))

    settings = json.loads((path / "run.json").read_text())
    (path / "run.json").write_text(json.dumps({**settings, "samples_per_prompt": {"golden": 2, "proxy": 2}}))
    new = load_run(path)
    clustered = [d[::2].std(ddof=1) / math.sqrt(10) for d in diffs]  # the SE over the prompts' changes
    assert reports._change_se(new, "golden", best) == pytest.approx(clustered, rel=1e-12)
    assert new.verdicts().golden.rise_z == pytest.approx((golden[-1] - golden[best]) / clustered[-1], rel=1e-12)
    assert new.verdicts().golden.rise_z < 0.8 * old.verdicts().golden.rise_z


def test_the_signals_figures_in_the_docs_are_what_the_current_rule_draws(tmp_path):
    """scripts/redraw_signals.py redraws README's and the record's signals figures from the detection corpus: a
    change to the detector's rule that moves its alarm, its dated turn or its levels must come with the figures."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "scripts" / "redraw_signals.py"), "--out", str(tmp_path), "--sweeps",
                    "sources"], check=True, capture_output=True, timeout=600)
    for figure in ("figures/signals.png", "reproduction/sources/signals.png"):
        drawn, kept = plt.imread(tmp_path / figure), plt.imread(root / "docs" / figure)
        assert drawn.shape == kept.shape, figure
        assert (np.abs(drawn - kept).max(-1) > 0.1).sum() == 0, figure  # at most antialiasing differs
