"""Checks that run before anything trains, so that a user's mistake fails in seconds rather than after the
oracle has trained for minutes (or hours at paper scale): output and cache folders, and every model folder
(exists, holds safetensors weights, loads its config without running code it ships, shares one tokenizer and
one output size with the others). The task's data are checked just as early, by loading them first."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from teacherhack.config import LabConfig
from teacherhack.errors import UserError
from teacherhack.models import SIZES
from teacherhack.stages import pretrained_roles
from teacherhack.tokenizer import check_tokenizers


def preflight(configs: list[LabConfig], out: Path, cache_root: Path) -> None:
    """Every check, for every configuration a command will run."""
    writable_folder(out, "--out")
    writable_folder(cache_root, "the cache (--cache or $TEACHERHACK_CACHE)")
    seen = set()
    for c in configs:
        key = (c.models.oracle, c.models.teacher, c.models.student, c.models.vocab_size, c.models.trust_remote_code)
        if key not in seen:
            seen.add(key)
            check_models(c)


def writable_folder(path: Path, what: str) -> None:
    """``path`` is, or can become, a folder this process can write into."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder: choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write into {what} {path}: {error.strerror or error}; choose a folder you can "
                        f"write") from None


def check_models(c: LabConfig) -> None:
    """The roles that name model folders or hub ids: each loads, runs no shipped code unless allowed, and all
    share one tokenizer and one output size (or declare the real shared size of padded output layers)."""
    pretrained = pretrained_roles(c.models)
    if not pretrained:
        return
    trust = c.models.trust_remote_code
    widths, tokenizers = {}, {}
    for role, name in pretrained.items():
        where = f"models.{role}={name!r}"
        folder = Path(name).expanduser()
        if folder.exists():
            _check_folder(folder, where, trust)
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust)
            tokenizers[role] = AutoTokenizer.from_pretrained(name, trust_remote_code=trust)
        except ValueError as error:
            if "trust_remote_code" in str(error):
                raise UserError(f"{where} needs to run code it ships; teacherhack runs a model folder's code only "
                                f"with --set models.trust_remote_code=true, for folders you trust") from None
            raise UserError(f"{where} cannot be loaded: {error}") from None
        except OSError as error:
            raise UserError(f"{where} is neither a size preset ({', '.join(SIZES)}) nor a model folder or reachable "
                            f"hub id: {str(error).splitlines()[0]}") from None
        widths[role] = _output_width(config)
    check_tokenizers(tokenizers)
    vocabulary = len(next(iter(tokenizers.values())))
    widths |= {role: vocabulary for role in ("oracle", "teacher", "student") if role not in pretrained}
    declared = c.models.vocab_size
    if declared is None and len(set(widths.values())) > 1:
        raise UserError("the models' output layers differ (" + ", ".join(f"{r} {w}" for r, w in widths.items())
                        + "): token ids would not line up. If they share one tokenizer and some output layers are "
                        f"padded, declare the real shared size, e.g. --set models.vocab_size={vocabulary}")
    if declared is None and min(widths.values()) < vocabulary:
        raise UserError(f"the tokenizer has {vocabulary} tokens but the models' output layers only "
                        f"{min(widths.values())}: the ids beyond could be neither embedded nor predicted; use the "
                        f"models' own tokenizer")
    if declared is not None and not vocabulary <= declared <= min(widths.values()):
        raise UserError(f"models.vocab_size={declared} must lie between the tokenizer's {vocabulary} tokens and the "
                        f"smallest output layer ({min(widths.values())})")


def _check_folder(folder: Path, where: str, trust: bool) -> None:
    if not folder.is_dir():
        raise UserError(f"{where} is a file, not a model folder")
    if not (folder / "config.json").is_file():
        raise UserError(f"{where} holds no config.json: not a Hugging Face model folder (write one with "
                        f"save_pretrained)")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found {', '.join(pickles)})" if pickles else ""
        raise UserError(f"{where} holds no safetensors weights{found}; teacherhack never unpickles weights: convert "
                        f"them with model.save_pretrained(folder, safe_serialization=True)")
    if not trust:
        for file in ("config.json", "tokenizer_config.json"):
            path = folder / file
            if path.is_file() and "auto_map" in json.loads(path.read_text(encoding="utf-8")):
                raise UserError(f"{where} ships its own Python code ('auto_map' in {file}); teacherhack runs a "
                                f"model folder's code only with --set models.trust_remote_code=true, for folders "
                                f"you trust")


def _output_width(config: PretrainedConfig) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)
