"""What a user's mistakes and accidents do: each is fed to the command line as a user would, and must end with
exit status 2 and one line naming the problem and the fix (130 for Ctrl-C), before anything trains, with
nothing lost and no code from a model folder run."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, make_task
from teacherhack import config as cfg
from teacherhack import distill
from teacherhack.cache import ArtifactCache
from teacherhack.cli import build_parser, main
from teacherhack.models import load_pretrained
from teacherhack.rundir import BrokenRun, RunFolder, locked
from test_pretrained_lab import cli_args, save_models


class NoInput(io.StringIO):
    def read(self, *args):  # pragma: no cover - failing here is the test failing
        raise AssertionError("teacherhack read standard input")

    readline = read


@pytest.fixture(autouse=True)
def _no_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", NoInput())


def tiny_args(task: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    sets = {**TINY, "task.spec": f"jsonl:{task}", "distill.sources": "offline"}
    return ["lab", "--preset", "quick", "--out", str(out), "--cache", str(cache), "--jobs", "1",
            *[arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")], *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("teacherhack: error:")]
    assert len(lines) == 1, err
    return lines[0]


def loss_diverging_at(call: int):
    """A stand-in for distill.distill_loss whose loss is NaN at its ``call``-th evaluation: the run stops at its NaN
    guard with its checkpoints kept, as a diverged run would."""
    original, calls = distill.distill_loss, {"n": 0}

    def make(*a, **k):
        loss = original(*a, **k)

        def wrapped(batch, denominator):
            calls["n"] += 1
            return loss(batch, denominator) * (float("nan") if calls["n"] == call else 1.0)

        return wrapped

    return make


def trained_nothing(cache: Path) -> bool:
    return not any(p.name.startswith(("oracle-", "teacher-", "student-")) for p in (cache / "artifacts").glob("*"))


# --- model folders ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["mylm", "llama"])
def test_a_model_folder_that_ships_code_is_refused_and_its_code_never_runs(model_type, tiny_task, tmp_path, capsys):
    folders = save_models(tmp_path, tiny_task, "llama")
    marker = tmp_path / "code-ran"
    config = json.loads((folders["teacher"] / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_mylm.MyConfig",
                                                   "AutoModelForCausalLM": "modeling_mylm.MyModel"})
    (folders["teacher"] / "config.json").write_text(json.dumps(config))
    (folders["teacher"] / "configuration_mylm.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folders["teacher"] / "modeling_mylm.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    start = time.time()
    assert main(cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")) == 2
    error = one_line_error(capsys)
    assert "models.teacher" in error and "models.trust_remote_code=true" in error
    assert not marker.exists() and trained_nothing(tmp_path / "cache") and time.time() - start < 30


def test_a_pickle_only_model_is_refused_before_anything_trains(tiny_task, tmp_path, capsys):
    folders = save_models(tmp_path, tiny_task, "llama")
    from safetensors.torch import load_file

    weights = load_file(folders["student"] / "model.safetensors")
    (folders["student"] / "model.safetensors").unlink()
    torch.save(weights, folders["student"] / "pytorch_model.bin")
    assert main(cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")) == 2
    error = one_line_error(capsys)
    assert "models.student" in error and "no safetensors weights (found pytorch_model.bin)" in error
    assert "safe_serialization=True" in error and trained_nothing(tmp_path / "cache")


def test_output_layers_of_different_sizes_are_refused_unless_the_real_size_is_declared(tiny_task, tmp_path, capsys):
    folders = save_models(tmp_path, tiny_task, "llama")
    padded = save_models(tmp_path / "padded", tiny_task, "llama", vocab_size=320)  # the tokenizer has 300
    folders["student"] = padded["student"]
    assert main(cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")) == 2
    error = one_line_error(capsys)
    assert "output layers differ (oracle 300, teacher 300, student 320)" in error
    assert "--set models.vocab_size=300" in error and trained_nothing(tmp_path / "cache")


def test_output_layers_smaller_than_the_tokenizer_are_refused(tiny_task, tmp_path, capsys):
    folders = save_models(tmp_path, tiny_task, "llama", vocab_size=280)  # the tokenizer has 300
    assert main(cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")) == 2
    error = one_line_error(capsys)
    assert "the tokenizer has 300 tokens but the models' output layers only 280" in error
    assert trained_nothing(tmp_path / "cache")


def test_a_model_with_fewer_positions_than_the_task_s_sequences_is_refused(tiny_task, tmp_path, capsys):
    """GPT-2's table of learned positions ends at n_positions: the oracle's first step would index beyond it."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folders = save_models(tmp_path, tiny_task, "llama")
    lengths = TINY["task.max_prompt_len"] + TINY["task.max_response_len"]
    folders["teacher"] = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2, n_positions=lengths - 1,
                               bos_token_id=1, eos_token_id=1)).save_pretrained(folders["teacher"])
    AutoTokenizer.from_pretrained(folders["oracle"]).save_pretrained(folders["teacher"])
    assert main(cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")) == 2
    error = one_line_error(capsys)
    assert f"models.teacher='{folders['teacher']}' has {lengths - 1} positions" in error
    assert "task.max_prompt_len=16 + task.max_response_len=16" in error and trained_nothing(tmp_path / "cache")


def test_models_without_a_table_of_positions_are_not_held_to_one(tiny_task, tmp_path):
    """T5's relative positions and Llama's rotary ones have no table to run out of: a limit below the task's
    lengths passes preflight."""
    from teacherhack.preflight import check_models

    for arch in ("t5", "llama"):
        folders = save_models(tmp_path / arch, tiny_task, arch)  # Llama's max_position_embeddings: 64
        check_models(cfg.resolve("quick", {**TINY, **{f"models.{r}": str(f) for r, f in folders.items()},
                                           "task.max_prompt_len": 64, "task.max_response_len": 64}))


def test_a_declared_output_size_with_size_presets_only_is_refused(tiny_task, tmp_path, capsys):
    """models.vocab_size is for padded pretrained output layers; presets are built as wide as the tokenizer, and a
    narrower cut would leave ids that no model could predict."""
    assert main(tiny_args(tiny_task, tmp_path / "lab", tmp_path / "cache", "--set", "models.vocab_size=280")) == 2
    error = one_line_error(capsys)
    assert "models.vocab_size=280" in error and "every role is a size preset" in error
    assert "--set models.vocab_size=none" in error and trained_nothing(tmp_path / "cache")


def test_a_tokenizer_without_eos_is_refused_before_anything_runs(tiny_task, tmp_path, capsys):
    from transformers import AutoTokenizer

    folders = save_models(tmp_path, tiny_task, "llama")
    for folder in folders.values():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.eos_token = None
        tokenizer.save_pretrained(folder)
    assert main(cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")) == 2
    error = one_line_error(capsys)
    assert "models.oracle" in error and "has no eos_token" in error
    assert not list((tmp_path / "cache").glob("artifacts/*"))  # not even the task


def test_a_model_folder_without_a_tokenizer_is_refused(tiny_task, tmp_path, capsys):
    """transformers makes an empty tokenizer for such a folder: every text would encode to nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folders = save_models(tmp_path, tiny_task, "llama")
    folders["teacher"] = tmp_path / "gpt2-without-tokenizer"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2, n_positions=64, bos_token_id=1,
                               eos_token_id=1)).save_pretrained(folders["teacher"])
    assert main(cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")) == 2
    error = one_line_error(capsys)
    assert "models.teacher" in error and "holds no tokenizer" in error and "tokenizer.save_pretrained" in error
    assert trained_nothing(tmp_path / "cache")


def test_a_malformed_config_json_is_named(tiny_task, tmp_path, capsys):
    folders = save_models(tmp_path, tiny_task, "llama")
    (folders["student"] / "config.json").write_text('{"model_type": "llama",')
    assert main(cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")) == 2
    error = one_line_error(capsys)
    assert "models.student" in error and "config.json is not valid JSON" in error


def test_a_t5_teacher_folder_with_the_teacher_prompt_cache_is_refused(tiny_task, tmp_path, capsys):
    folders = save_models(tmp_path, tiny_task, "t5")
    args = cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")
    assert main([*args, "--set", "distill.teacher_prompt_cache=true"]) == 2
    error = one_line_error(capsys)
    assert "teacher_prompt_cache" in error and "encoder-decoder" in error and trained_nothing(tmp_path / "cache")


def test_t5_folders_with_vllm_generation_are_refused(tiny_task, tmp_path, capsys, monkeypatch):
    """vLLM serves no encoder-decoder: refused before anything trains, even where vLLM could run."""
    from teacherhack import preflight

    monkeypatch.setattr(preflight, "vllm_available", lambda: True)
    folders = save_models(tmp_path, tiny_task, "t5")
    args = cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")
    assert main([*args, "--set", "distill.generation=vllm"]) == 2
    error = one_line_error(capsys)
    assert "distill.generation=vllm" in error and "encoder-decoder" in error and trained_nothing(tmp_path / "cache")


def test_vllm_under_a_multi_process_launch_is_refused_before_anything_trains(tiny_task, tmp_path, capsys,
                                                                            monkeypatch):
    from teacherhack import preflight

    monkeypatch.setattr(preflight, "vllm_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(tiny_args(tiny_task, tmp_path / "lab", tmp_path / "cache", "--set", "distill.generation=vllm")) == 2
    error = one_line_error(capsys)
    assert "runs in a single process" in error and not (tmp_path / "cache" / "artifacts").exists()


def test_fewer_rows_than_processes_are_refused_before_anything_trains(tiny_task, tmp_path, capsys, monkeypatch):
    """A process whose shard of a batch or an evaluation set is empty failed deep in its first batch (after the whole
    upstream) with a message that named neither the setting nor the process count."""
    from teacherhack import preflight

    monkeypatch.setattr(preflight, "world", lambda: 9)
    assert main(tiny_args(tiny_task, tmp_path / "lab", tmp_path / "cache", "--set", "eval.reverse_samples=4")) == 2
    error = one_line_error(capsys)
    assert error.startswith("teacherhack: error: 9 processes share each batch and") and not (tmp_path / "cache" /
                                                                                        "artifacts").exists()
    assert "distill.batch_size=8, eval.prompts=8, eval.reverse_samples=4 give some none" in error
    assert "oracle.batch_size" not in error  # TINY's oracle batch holds 9 rows or more


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_sharded_launch_is_refused_before_anything_trains(variable, tiny_task, tmp_path, capsys, monkeypatch):
    """FSDP and DeepSpeed through `accelerate config`: unsupported, so refused at once rather than training with
    checkpoints of one shard or steps taken before the gradient check."""
    monkeypatch.setenv(variable, "true")
    assert main(tiny_args(tiny_task, tmp_path / "lab", tmp_path / "cache")) == 2
    assert "is not supported" in one_line_error(capsys) and not (tmp_path / "cache" / "artifacts").exists()


@pytest.mark.parametrize("setting, message", [
    ("device=cuda", "device=cuda: this machine has no cuda device"),
    ("device=cuda:3", "device=cuda:3: this machine has no cuda device"),
    ("device=mps", "device=mps: this machine has no mps device"),
    ("distill.generation=vllm", "distill.generation=vllm needs the vllm package and a CUDA GPU"),
])
def test_a_device_or_backend_the_machine_lacks_is_refused_before_anything_trains(setting, message, tiny_task,
                                                                                 tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main(tiny_args(tiny_task, tmp_path / "lab", tmp_path / "cache", "--set", setting)) == 2
    assert message in one_line_error(capsys) and not (tmp_path / "cache" / "artifacts").exists()


@pytest.mark.slow
def test_a_declared_real_vocabulary_runs_padded_models_end_to_end(tiny_task, tmp_path):
    folders = save_models(tmp_path, tiny_task, "llama")
    folders["student"] = save_models(tmp_path / "padded", tiny_task, "llama", vocab_size=320)["student"]
    args = cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")
    assert main([*args, "--set", "models.vocab_size=300"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "lab" / "offline" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["proxy"] < rows[0]["proxy"]


# --- paths, data, settings -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["out is a file", "out under a file", "cache is a file", "out read-only"])
def test_unusable_output_or_cache_folders_exit_2(case, tiny_task, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    out, cache = tmp_path / "out", tmp_path / "cache"
    if case == "out is a file":
        out = a_file
    elif case == "out under a file":
        out = a_file / "sub"
    elif case == "cache is a file":
        cache = a_file
    else:
        original = Path.mkdir

        def read_only(self, *args, **kwargs):
            if self == out:
                raise OSError(30, "Read-only file system", str(self))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(tiny_args(tiny_task, out, cache)) == 2
    error = one_line_error(capsys)
    assert ("--out" in error) != (case == "cache is a file") and "choose a folder" in error


@pytest.mark.parametrize("saved, message", [
    ("foo: [\n", " is not valid YAML (expected the node content, but found '<stream end>')"),
    ("oldkey: 1\n", ": unknown config key(s) oldkey (written by another version of teacherhack?)")])
def test_an_unreadable_config_yaml_in_out_is_named(saved, message, tiny_task, tmp_path, capsys):
    """A started folder's config.yaml that is not YAML raised a yaml ParserError traceback; one with a key this
    version does not know said 'unknown config key(s)' without naming the file. Both name it, before anything
    trains."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    (out / "offline").mkdir(parents=True)
    (out / "offline" / "metrics.jsonl").write_text("")  # a run has started: the saved configuration binds
    (out / "config.yaml").write_text(saved)
    assert main(tiny_args(tiny_task, out, cache)) == 2
    assert one_line_error(capsys).startswith(f"teacherhack: error: {out / 'config.yaml'}{message}")
    assert trained_nothing(cache) and (out / "config.yaml").read_text() == saved


def test_a_data_file_with_a_bad_byte_names_its_line(tmp_path, capsys):
    task = make_task(tmp_path / "task.jsonl")
    lines = task.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"sun", b"s\xffn", 1) if b"sun" in lines[2] else lines[2][:5] + b"\xff" + lines[2][5:]
    task.write_bytes(b"\n".join(lines))
    assert main(tiny_args(task, tmp_path / "out", tmp_path / "cache")) == 2
    error = one_line_error(capsys)
    assert "task.jsonl, line 3: not valid UTF-8" in error and trained_nothing(tmp_path / "cache")


def test_a_raw_tsv_with_a_stray_quote_names_the_line_where_its_field_starts(tiny_task, tmp_path, capsys):
    """Read as CSV quoting, the quote would have merged the lines after it into one row, silently."""
    pairs = [json.loads(line) for line in tiny_task.read_text().splitlines()]
    lines = ["prompt\tresponse", *(f"{p['prompt']}\t{p['response']}" for p in pairs)]
    lines[4] = '"' + lines[4]  # a raw TSV's sentence that opens a quotation
    task = tmp_path / "task.tsv"
    task.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = tiny_args(task, tmp_path / "out", tmp_path / "cache", "--set", f"task.spec={task}")
    assert main(args) == 2
    error = one_line_error(capsys)
    assert f"{task}, line 5: a field starts with a quote" in error and "convert it to JSON Lines" in error
    assert trained_nothing(tmp_path / "cache")


def test_a_data_set_too_small_for_the_splits_names_the_keys_to_lower(tmp_path, capsys):
    task = make_task(tmp_path / "task.jsonl", n=60)
    assert main(tiny_args(task, tmp_path / "out", tmp_path / "cache")) == 2
    error = one_line_error(capsys)
    assert "lower task.n_oracle, task.n_stage1 or task.n_distill" in error
    # following that advice in the same folder works: no run had started there, so its configuration may change
    smaller = tiny_args(task, tmp_path / "out", tmp_path / "cache", "--set", "task.n_oracle=8", "--set",
                        "task.n_stage1=8", "--set", "task.n_distill=8", "--set", "teacher.samples=8", "--set",
                        "student.samples=8", "--set", "task.n_validation=8", "--set", "eval.prompts=8")
    assert main(smaller) == 0, capsys.readouterr().err


def test_set_takes_yaml_lists_and_the_help_says_so():
    for text in ("[offline, online_teacher]", "offline,online_teacher", "[offline,online_teacher]"):
        config = cfg.resolve("quick", cfg.parse_assignments([f"distill.sources={text}"]))
        assert config.distill.sources == ["offline", "online_teacher"]
    assert cfg.resolve("quick", {"distill.sources": "[offline]"}).distill.sources == ["offline"]
    with pytest.raises(cfg.ConfigError, match="unknown source 'teleport'"):
        cfg.resolve("quick", {"distill.sources": "[offline, teleport]"})
    lab_help = [a for a in build_parser()._subparsers._group_actions[0].choices["lab"]._actions if "--set" in a.option_strings]
    assert "[a, b]" in lab_help[0].help


@pytest.mark.parametrize("argv, message", [
    (["sweep", "sources", "--stretch", "nan"], "--stretch: must be a finite number above 0, got nan"),
    (["sweep", "sources", "--stretch", "-2"], "--stretch: must be a finite number above 0, got -2"),
    (["sweep", "sources", "--seeds", "0"], "--seeds: must be an integer above 0, got 0"),
    (["lab", "--jobs", "-1"], "--jobs: must be an integer above 0, got -1"),
    (["lab", "--jobs", "two"], "--jobs: expected an integer, got 'two'"),
])
def test_run_options_out_of_range_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_shortcut_and_a_set_that_contradict_each_other_are_refused(tmp_path, capsys):
    folder = str(tmp_path / "my-oracle")
    assert main(["lab", "--out", str(tmp_path / "out"), "--oracle", folder, "--set", "models.oracle=xxs"]) == 2
    error = one_line_error(capsys)
    assert f"--oracle {folder} and --set models.oracle=xxs contradict each other" in error
    assert not (tmp_path / "out").exists()
    assert main(["lab", "--out", str(tmp_path / "out"), "--engine-option", "timeout_min=60"]) == 2
    assert "--engine-option sets the cluster's parameters: it needs --engine submitit" in one_line_error(capsys)
    for preset in ("quick", "default"):  # --scale paper silently ran the paper preset
        assert main(["lab", "--out", str(tmp_path / "out"), "--scale", "paper", "--preset", preset]) == 2
        assert f"--scale paper is the paper preset and contradicts --preset {preset}" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dropped_and_cut_rows_are_reported(tmp_path, capsys):
    task = make_task(tmp_path / "task.jsonl")
    with task.open("a") as f:
        for _ in range(5):
            f.write(json.dumps({"prompt": "   ", "response": "SUN"}) + "\n")
    assert main(tiny_args(task, tmp_path / "out", tmp_path / "cache", "--set", "distill.steps=4",
                          "--set", "task.max_prompt_len=10")) == 0
    out = capsys.readouterr().out
    assert "skipped 5 rows (blank prompt or response)" in out
    assert "oracle training prompts are longer than task.max_prompt_len=10 and are cut" in out
    assert "pairs repeat an earlier pair's prompt and were left out" in out


# --- runs that fail, are interrupted, or collide ------------------------------------------------------------


@pytest.mark.slow
def test_a_non_finite_loss_exits_2_with_one_message_keeps_every_checkpoint_and_resumes(tiny_task, tmp_path, capsys,
                                                                                       monkeypatch):
    args = tiny_args(tiny_task, tmp_path / "out", tmp_path / "cache")
    original = distill.distill_loss
    monkeypatch.setattr(distill, "distill_loss", loss_diverging_at(6))
    assert main(args) == 2
    error = one_line_error(capsys)
    assert "offline step 6: the loss is not finite" in error and "the last checkpoint is intact" in error
    run = RunFolder(tmp_path / "out" / "offline")
    assert [r["step"] for r in run.metrics()] == [0, 4]
    assert json.loads((run.checkpoint_dir / "state.json").read_text())["step"] == 4
    monkeypatch.setattr(distill, "distill_loss", original)
    assert main(args) == 0  # the same command resumes from step 4
    assert [r["step"] for r in run.metrics()] == [0, 4, 8, 12] and run.finished()


def test_a_kill_while_the_final_student_is_written_leaves_an_unfinished_run(tiny_task, tmp_path, monkeypatch):
    """The final student is written aside and renamed: a kill mid-write left a truncated model.safetensors that
    counted as a finished run, never rewritten, and that no one could load."""
    args = tiny_args(tiny_task, tmp_path / "out", tmp_path / "cache", "--set", "distill.sources=[offline]")
    original = distill.LM.save

    def killed_mid_write(self, path):
        if path.parent == tmp_path / "out" / "offline" and path.name.startswith("student"):  # not a checkpoint
            path.mkdir(parents=True, exist_ok=True)
            (path / "model.safetensors").write_bytes(b"\x00" * 10)
            raise KeyboardInterrupt("killed while writing")
        original(self, path)

    monkeypatch.setattr(distill.LM, "save", killed_mid_write)
    assert main(args) == 130
    run = RunFolder(tmp_path / "out" / "offline")
    assert not run.finished()
    monkeypatch.setattr(distill.LM, "save", original)
    assert main(args) == 0 and run.finished()
    assert load_pretrained(run.student_dir) is not None and not list(run.path.glob("student.*"))  # nothing left aside


@pytest.mark.slow
def test_a_run_is_not_resumed_on_upstream_models_rebuilt_under_another_thread_count(tiny_task, tmp_path, capsys,
                                                                                    monkeypatch):
    """The thread count is part of the upstream stages' keys (their bits depend on it): a killed run rerun under
    another one would continue on another oracle and teacher, so it is refused and its folder left as it was."""
    args = tiny_args(tiny_task, tmp_path / "out", tmp_path / "cache", "--set", "threads=null")
    original, threads = distill.distill_loss, torch.get_num_threads()
    monkeypatch.setattr(distill, "distill_loss", loss_diverging_at(6))
    try:
        torch.set_num_threads(1)
        assert main(args) == 2
        capsys.readouterr()
        monkeypatch.setattr(distill, "distill_loss", original)
        run = RunFolder(tmp_path / "out" / "offline")
        before = (run.path / "metrics.jsonl").read_text()
        torch.set_num_threads(2)
        oracles = sorted((tmp_path / "cache" / "artifacts").glob("oracle-*"))
        assert main(args) == 2
        error = one_line_error(capsys)
        assert "offline: its checkpoint at step 4 was taken on other upstream artifacts: oracle differs" in error
        assert "thread count" in error and "stage(s) after it" in error
        assert (run.path / "metrics.jsonl").read_text() == before
        assert sorted((tmp_path / "cache" / "artifacts").glob("oracle-*")) == oracles  # refused before building
        torch.set_num_threads(1)
        assert main(args) == 0  # the settings it started with: it resumes
        assert [r["step"] for r in run.metrics()] == [0, 4, 8, 12] and run.finished()
    finally:
        torch.set_num_threads(threads)


def test_a_run_is_not_resumed_on_changed_data_and_nothing_is_rebuilt_first(tiny_task, tmp_path, capsys,
                                                                          monkeypatch):
    """A started run whose task data changed is refused at once, naming the data as the cause, before the upstream
    stages are rebuilt on the new data (minutes here, hours at paper scale)."""
    task = tmp_path / "task.jsonl"
    task.write_text(tiny_task.read_text())
    args = tiny_args(task, tmp_path / "out", tmp_path / "cache")
    original = distill.distill_loss
    monkeypatch.setattr(distill, "distill_loss", loss_diverging_at(6))
    assert main(args) == 2
    capsys.readouterr()
    monkeypatch.setattr(distill, "distill_loss", original)
    built = sorted(p.name for p in (tmp_path / "cache" / "artifacts").iterdir())
    lines = task.read_text().splitlines()
    task.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same pairs in another order: other splits
    assert main(args) == 2
    error = one_line_error(capsys)
    assert "offline: its checkpoint at step 4 was taken on other upstream artifacts: splits differs" in error
    assert "the task's data or its split settings changed" in error
    assert sorted(p.name for p in (tmp_path / "cache" / "artifacts").iterdir()) == built  # nothing built


@pytest.mark.slow
def test_a_lab_with_relative_paths_resumes_from_another_working_directory(tiny_task, tmp_path, capsys, monkeypatch):
    """config.yaml kept `jsonl:data/task.jsonl` as typed: it did not say which file the run read, the same file
    written from another directory was refused as another configuration, and the same command there read another
    file (refused only once the upstream keys were computed, as 'data changed')."""
    here, there = tmp_path / "here", tmp_path / "there"
    (here / "data").mkdir(parents=True)
    (there / "data").mkdir(parents=True)
    (here / "data" / "task.jsonl").write_text(tiny_task.read_text())
    monkeypatch.chdir(here)
    monkeypatch.setattr(distill, "distill_loss", loss_diverging_at(6))  # stops after the checkpoint at step 4
    assert main(tiny_args(Path("data/task.jsonl"), Path("out"), tmp_path / "cache")) == 2
    capsys.readouterr()
    monkeypatch.undo()
    out, task = here / "out", here / "data" / "task.jsonl"
    assert cfg.from_dict(yaml.safe_load((out / "config.yaml").read_text())).task.spec == f"jsonl:{task}"

    monkeypatch.chdir(there)
    make_task(there / "data" / "task.jsonl", seed=1)  # another file of the same name here
    assert main(tiny_args(Path("data/task.jsonl"), out, tmp_path / "cache")) == 2
    assert (f"holds a run with a different configuration ({out / 'config.yaml'} → this command: task.spec: "
            f"'jsonl:{task}' → 'jsonl:{there / 'data' / 'task.jsonl'}')") in one_line_error(capsys)
    assert main(tiny_args(Path("../here/data/task.jsonl"), out, tmp_path / "cache")) == 0  # the same file: resumed
    run = RunFolder(out / "offline")
    assert [r["step"] for r in run.metrics()] == [0, 4, 8, 12] and run.finished()
    assert "offline: resuming from step 4" in capsys.readouterr().out


@pytest.mark.slow
def test_ctrl_c_stops_every_run_exits_130_and_the_same_command_resumes(tiny_task, tmp_path):
    sets = {**TINY, "task.spec": f"jsonl:{tiny_task}", "distill.steps": 400, "distill.sources": "[offline, online_student, online_teacher]"}
    command = [sys.executable, "-m", "teacherhack", "lab", "--preset", "quick", "--out", str(tmp_path / "out"),
               "--cache", str(tmp_path / "cache"), "--jobs", "2",
               *[arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # started as a script's background job is (SIGINT ignored): an interrupt must still stop it cleanly
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 300
    while not (tmp_path / "out" / "offline" / "checkpoint" / "state.json").exists():  # stage 2 is under way
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "rerun the same command to resume" in err
    assert not (tmp_path / "out" / "online_teacher" / "metrics.jsonl").exists()  # queued, never started
    assert RunFolder(tmp_path / "out" / "offline").metrics()[0]["step"] == 0  # consistent: steps strictly increase
    if (tmp_path / "out" / "online_student" / "metrics.jsonl").exists():  # it may not have evaluated yet
        RunFolder(tmp_path / "out" / "online_student").metrics()
    sets["distill.steps"] = 400
    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step" in resumed.stdout
    for source in ("offline", "online_student", "online_teacher"):
        assert RunFolder(tmp_path / "out" / source).finished()


def test_a_run_resumed_on_another_thread_count_says_its_remaining_bits_differ(tmp_path, capsys):
    from test_training import make_lm

    from teacherhack.training import make_optimizer, save_checkpoint

    student, threads = make_lm(), torch.get_num_threads()
    optimizer = make_optimizer(student, 1e-3)
    run = RunFolder(tmp_path / "run")
    save_checkpoint(run.checkpoint_dir, student, optimizer,
                    {"step": 4, "upstream": {"oracle": "oracle-1"}, "threads": threads + 1})
    state = distill._resume(run, student, optimizer, object(), "offline", {"oracle": "oracle-1"}, 8)
    assert state.step == 4 and state.threads == threads
    assert f"offline: warning: started on {threads + 1} CPU threads, resumed on {threads}" in capsys.readouterr().out
    distill._resume(run, student, optimizer, object(), "offline", {"oracle": "oracle-1"}, 4)
    assert "warning" not in capsys.readouterr().out  # a finished run (a lab rerun for its report) has no steps left
    save_checkpoint(run.checkpoint_dir, student, optimizer, {"step": 4, "upstream": {"oracle": "oracle-1"}, "threads": threads})
    distill._resume(run, student, optimizer, object(), "offline", {"oracle": "oracle-1"}, 8)
    assert "warning" not in capsys.readouterr().out


@pytest.mark.slow
def test_after_kill_9_of_the_launcher_no_worker_goes_on_holding_its_run(tiny_task, tmp_path):
    """After `kill -9` of the command its stage-2 workers stop themselves (Linux), as after Ctrl-C: none trains on
    holding its run folder, so rerunning the command can resume at once (the resume itself: the Ctrl-C test)."""
    sets = {**TINY, "task.spec": f"jsonl:{tiny_task}", "distill.steps": 2000, "distill.sources": "[offline, online_student]"}
    command = [sys.executable, "-m", "teacherhack", "lab", "--preset", "quick", "--out", str(tmp_path / "out"),
               "--cache", str(tmp_path / "cache"), "--jobs", "2",
               *[arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]]
    log = tmp_path / "stderr.txt"  # not a pipe: its reader would wait for the workers, which inherit it
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    runs = [tmp_path / "out" / s for s in ("offline", "online_student")]
    deadline = time.time() + 300
    while not all((run / "checkpoint" / "state.json").exists() for run in runs):
        assert process.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.2)
    workers = [int((run / ".lock.owner").read_text().split()[1]) for run in runs]
    process.kill()
    process.wait(timeout=60)
    deadline = time.time() + 10
    while any(_alive(pid) for pid in workers):  # a worker left going would train on for 2,000 steps (about a minute)
        assert time.time() < deadline, "a worker outlived its launcher"
        time.sleep(0.1)
    for run in runs:
        with locked(run, "run folder"):  # free: a rerun is not refused
            assert RunFolder(run).metrics()[0]["step"] == 0


def test_sigterm_stops_a_command_as_ctrl_c_does(monkeypatch, capsys):
    """`kill` (SIGTERM), e.g. a job scheduler's stop: the command stops cleanly (its workers with it) and says how
    to resume, instead of dying with its workers orphaned."""
    import teacherhack.cli as cli

    def unhandled(signum, frame):  # what reaches the test if main does not handle SIGTERM itself
        raise AssertionError("SIGTERM reached the caller's handler")

    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        monkeypatch.setattr(cli, "_config", lambda args: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5) or 0)
        assert cli.main(["config"]) == 130
        assert "interrupted; everything written so far is consistent: rerun the same command" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the caller's handler is back
    finally:
        signal.signal(signal.SIGTERM, before)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_second_process_in_the_same_folder_is_refused_with_who_holds_it(tiny_task, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from teacherhack.rundir import locked\n"
                               f"with locked(Path({str(out)!r}), 'lab folder'):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(tiny_args(tiny_task, out, tmp_path / "cache")) == 2
        error = one_line_error(capsys)
        assert f"lab folder {out} is in use by process {holder.pid} on" in error
    finally:
        holder.kill()
        holder.wait()


def test_a_run_whose_rows_do_not_follow_is_reported_with_the_fix(tmp_path):
    run = RunFolder(tmp_path / "run")
    (run.student_dir).mkdir(parents=True)
    (run.student_dir / "model.safetensors").write_bytes(b"")
    rows = [{"step": s, "epoch": 0.0, "train_loss": None, "proxy": 1.0, "proxy_se": 0.1, "golden": 2.0,
             "golden_se": 0.1} for s in (0, 0, 10)]
    (run.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BrokenRun, match=r"step 0 does not follow step 0; delete .* and rerun the same command"):
        run.finished()


def test_a_line_cut_short_after_the_checkpoint_does_not_block_the_resume(tmp_path):
    """A crash or a full disk can cut the last line written; it always lies past the checkpoint."""
    run = RunFolder(tmp_path / "run")
    run.path.mkdir(parents=True)
    rows = [{"step": s, "epoch": 0.0, "train_loss": None, "proxy": 1.0, "proxy_se": 0.1, "golden": 2.0,
             "golden_se": 0.1} for s in (0, 10, 20)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run.path / "metrics.jsonl").write_text(text[:-25])  # the row of step 20, cut short
    (run.path / "per_sample.jsonl").write_text('{"step": 0, "golden": [1.0, 2.0]}\n{"step": 10, "golden": [1.0')
    run.truncate(10)
    assert [r["step"] for r in run.metrics()] == [0, 10]
    assert [json.loads(line)["step"] for line in (run.path / "per_sample.jsonl").read_text().splitlines()] == [0]


def test_the_cache_cleans_what_killed_builds_left_and_a_failed_build_leaves_nothing(tmp_path):
    cache = ArtifactCache(tmp_path)
    host = os.uname().nodename
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "artifacts" / f"oracle-abc.tmp-{host}-{dead.stdout.strip()}"
    live = tmp_path / "artifacts" / f"oracle-def.tmp-{host}-{os.getpid()}"
    other_host = tmp_path / "artifacts" / f"oracle-ghi.tmp-elsewhere-{dead.stdout.strip()}"
    for folder in (stale, live, other_host):
        folder.mkdir(parents=True)
    assert cache.clean() == [stale] and live.exists() and other_host.exists()

    def fails(path: Path) -> None:
        (path / "half-written").write_text("x")
        raise RuntimeError("the build broke")

    with pytest.raises(RuntimeError):
        cache.get("teacher", "teacher-123", {}, fails)
    assert not list((tmp_path / "artifacts").glob("teacher-123*"))


RACE = """
import sys, time
from pathlib import Path
from teacherhack.cache import ArtifactCache

def build(path: Path) -> None:
    time.sleep(1.0)
    (path / "who").write_text(sys.argv[2])

cache = ArtifactCache(Path(sys.argv[1]))
path = cache.get("oracle", "oracle-race", {}, build)
print(cache.events["oracle"], (path / "who").read_text())
"""


def test_two_commands_sharing_the_cache_build_an_artifact_once(tmp_path):
    """Two commands that need the same missing artifact at once: one builds it while the other waits, then reuses
    it (before, each built its own, the later one deleted the other's under its readers, or crashed renaming)."""
    processes = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), who], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for who in ("a", "b")]
    results = [process.communicate(timeout=60) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err for _, err in results]
    events = sorted(out.splitlines()[-1].split() for out, _ in results)  # the line before: a wait, if it waited
    builder = next(who for event, who in events if event == "built")
    assert [event for event, _ in events] == ["built", "reused"] and all(who == builder for _, who in events)
    assert [p.name for p in (tmp_path / "artifacts").iterdir()] == ["oracle-race"]


def test_a_reader_that_goes_away_ends_the_output_quietly():
    """`teacherhack detect CORPUS | head`: the pipe closes early; no traceback, exit 0."""
    corpus = Path(__file__).resolve().parents[1] / "benchmarks" / "detection" / "runs"
    process = subprocess.Popen([sys.executable, "-m", "teacherhack", "detect", str(corpus)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("The oracle-free detector")
    process.stdout.close()  # the reader goes away with most of the output unread
    error = process.stderr.read()
    assert process.wait(timeout=120) == 0 and "Traceback" not in error, error
