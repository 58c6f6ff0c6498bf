"""The lab with pretrained models from local folders (tiny T5 and Llama made here with save_pretrained) and
local task files in the paper's formats, through the command line, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from teacherhack import config as cfg
from teacherhack.cache import ArtifactCache
from teacherhack.cli import main
from teacherhack.stages import prepare_upstream
from teacherhack.tasks.snapshot import load_jsonl
from teacherhack.tokenizer import TokenizerMismatch, train_tokenizer

from conftest import TINY

pytestmark = pytest.mark.slow


def save_models(root: Path, task: Path, arch: str, vocab_size: int | None = None) -> dict[str, Path]:
    """Oracle, teacher and student folders (model + the shared tokenizer), as a user's checkpoints would be."""
    pairs = load_jsonl(task).pairs
    tokenizer = train_tokenizer([x for p in pairs for x in (p.prompt, p.response)], 300)
    vocab = vocab_size or len(tokenizer)
    folders = {}
    for role, width in (("oracle", 48), ("teacher", 32), ("student", 16)):
        if arch == "t5":
            model = T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=width, d_ff=2 * width, d_kv=8,
                                                        num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                                                        decoder_start_token_id=0))
        else:
            model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                 max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                                 eos_token_id=1))
        folders[role] = root / f"{arch}-{role}"
        model.save_pretrained(folders[role])
        tokenizer.save_pretrained(folders[role])
    return folders


def cli_args(folders: dict[str, Path], task_spec: str, out: Path, cache: Path) -> list[str]:
    overrides = {k: v for k, v in TINY.items() if not k.startswith("models.")}
    sets = [f"{k}={v}" for k, v in overrides.items()] + ["distill.sources=offline,online_student", "distill.lr=3e-4"]
    return ["lab", "--oracle", str(folders["oracle"]), "--teacher", str(folders["teacher"]), "--student",
            str(folders["student"]), "--task", task_spec, "--out", str(out), "--cache", str(cache), "--jobs", "1",
            *[arg for s in sets for arg in ("--set", s)]]


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_lab_runs_pretrained_local_models_end_to_end(arch: str, tiny_task: Path, tmp_path: Path):
    folders = save_models(tmp_path, tiny_task, arch)
    assert main(cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")) == 0
    summary = json.loads((tmp_path / "lab" / "summary.json").read_text())
    assert set(summary["runs"]) == {"offline", "online_student"}
    rows = [json.loads(line) for line in (tmp_path / "lab" / "offline" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]  # the distillation loss falls on these models too
    assert (tmp_path / "lab" / "offline" / "student" / "model.safetensors").exists()
    assert not list((tmp_path / "cache").rglob("*.bin")), "checkpoints are safetensors only"


def test_local_copy_of_a_paper_task_in_its_own_format(tiny_task: Path, tmp_path: Path):
    xsum = tmp_path / "xsum.jsonl"
    with xsum.open("w") as f:
        for pair in load_jsonl(tiny_task).pairs:
            f.write(json.dumps({"document": pair.prompt, "summary": pair.response, "id": "x"}) + "\n")
    folders = save_models(tmp_path, tiny_task, "t5")
    assert main(cli_args(folders, f"xsum:{xsum}", tmp_path / "lab", tmp_path / "cache")) == 0


def test_models_that_do_not_share_a_tokenizer_are_refused(tiny_task: Path, tmp_path: Path, capsys):
    folders = save_models(tmp_path, tiny_task, "llama")
    other = train_tokenizer(["completely different text " * 20, "zzz qqq"], 270)
    other.save_pretrained(folders["student"])
    assert main(cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")) == 2
    error = capsys.readouterr().err
    assert "student" in error and "vocab" in error.lower()


def test_a_cached_tokenizer_is_not_served_to_a_model_that_does_not_share_it(tiny_task: Path, tmp_path: Path):
    """The tokenizer's key names the first pretrained role's tokenizer only, so a student with another one finds it
    cached: the upstream refuses it there too, for a caller that skips the command line's preflight."""
    folders = save_models(tmp_path, tiny_task, "llama")
    assert main(cli_args(folders, f"jsonl:{tiny_task}", tmp_path / "lab", tmp_path / "cache")) == 0
    train_tokenizer(["completely different text " * 20, "zzz qqq"], 270).save_pretrained(folders["student"])
    config = cfg.resolve("default", {**{k: v for k, v in TINY.items() if not k.startswith("models.")},
                                     **{f"models.{role}": str(folder) for role, folder in folders.items()},
                                     "task.spec": f"jsonl:{tiny_task}"})
    with pytest.raises(TokenizerMismatch, match="student"):
        prepare_upstream(config, ArtifactCache(tmp_path / "cache"), "cpu", {})
