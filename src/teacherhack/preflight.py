"""Checks that run before anything trains, so that a user's mistake fails in seconds rather than after the
oracle has trained for minutes (or hours at paper scale): output and cache folders, the device and the sampling
backend asked for, and every model folder or hub id (exists, holds safetensors weights and a tokenizer, loads its
config without running code it ships, shares one tokenizer and one output size with the others; a hub id is in
the Hugging Face cache, fetched first where the hub can be reached, and one that is neither cached nor reachable
fails at once). The task's data are checked just as early, by loading them first."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import HfApi, try_to_load_from_cache
from huggingface_hub import constants as hub_constants
from huggingface_hub.file_download import REGEX_COMMIT_HASH
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from teacherhack.config import LabConfig
from teacherhack.distributed import launched, refuse_empty_shards, world
from teacherhack.errors import UserError
from teacherhack.generation import UNDER_LAUNCHER, vllm_available
from teacherhack.models import SIZES, HubModelError, NotCached, from_pretrained, pin, split_revision
from teacherhack.stages import pretrained_roles
from teacherhack.tasks import TaskError
from teacherhack.tasks.hub import hub_reachable
from teacherhack.tokenizer import check_tokenizers, special_ids


def preflight(configs: list[LabConfig], out: Path, cache_root: Path) -> None:
    """Every check, for every configuration a command will run."""
    writable_folder(out, "--out")
    writable_folder(cache_root, "the cache (--cache or $TEACHERHACK_CACHE)")
    seen = set()
    for c in configs:
        check_machine(c)
        key = (c.models.oracle, c.models.teacher, c.models.student, c.models.vocab_size, c.models.trust_remote_code)
        if key not in seen:
            seen.add(key)
            check_models(c)


# Weight files teacherhack never loads (pickles, TensorFlow's, Flax's), named when a model holds no safetensors
UNLOADED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
# What `accelerate launch` sets for a sharded configuration (`accelerate config`: FSDP, DeepSpeed)
SHARDED_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def check_machine(c: LabConfig) -> None:
    """The device and the sampling backend the configuration asks for exist on this machine, and the launcher is one
    the lab runs under (DDP; not FSDP or DeepSpeed, whose optimizer steps and sharded checkpoints it does not
    handle)."""
    for variable, name in SHARDED_LAUNCHES.items():
        if os.environ.get(variable, "false").lower() == "true":
            raise UserError(f"{name} (accelerate launch with {variable}=true) is not supported: the lab saves "
                            f"checkpoints from the main process's module and checks each gradient before its "
                            f"optimizer step, which sharding and DeepSpeed's own step break; launch with DDP "
                            f"(`accelerate config` without FSDP or DeepSpeed, or torchrun)")
    kind, _, index = c.device.partition(":")
    counts = {"cuda": torch.cuda.device_count, "xpu": torch.xpu.device_count,
              "mps": lambda: int(torch.backends.mps.is_available())}
    if kind in counts and (available := counts[kind]()) <= int(index or 0):
        found = f"{available} {kind} device(s)" if available else f"no {kind} device"
        raise UserError(f"device={c.device}: this machine has {found}; use device=auto (a GPU when there is one, "
                        f"else the CPU) or device=cpu")
    if c.distill.generation == "vllm" and launched():
        raise UserError(UNDER_LAUNCHER)
    trained = [s for s in ("pretrain", "oracle", "teacher", "student") if getattr(c, s).epochs > 0] + ["distill"]
    rows = {f"{section}.batch_size": getattr(c, section).batch_size for section in trained}
    rows |= {"eval.prompts": c.eval.prompts} | ({"eval.reverse_samples": c.eval.reverse_samples}
                                                  if c.eval.reverse_samples else {})
    refuse_empty_shards(rows, "each batch and evaluation set", world())  # before the upstream is built
    if c.distill.generation == "vllm" and not vllm_available():
        raise UserError("distill.generation=vllm needs the vllm package and a CUDA GPU, which this machine lacks; "
                        "use distill.generation=hf (or auto: vLLM where it can run)")


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
        if c.models.vocab_size is not None:  # the models are built as wide as the tokenizer: a narrower cut crashes
            raise UserError(f"models.vocab_size={c.models.vocab_size} declares the real size of padded pretrained "
                            f"output layers, but every role is a size preset ({', '.join(SIZES)}), built as wide as "
                            f"the lab's tokenizer: leave it out (--set models.vocab_size=none)")
        return
    trust = c.models.trust_remote_code
    widths, tokenizers = {}, {}
    reachable = functools.cache(hub_reachable)  # probed once, and only for a hub id that needs it
    for role, name in pretrained.items():
        where = f"models.{role}={name!r}"
        folder = Path(name).expanduser()
        try:
            if folder.exists():
                _check_folder(folder, where, trust)
            else:
                name = _cached_hub_model(name, where, trust, reachable)
                _check_hub_weights(name, where)
            config = from_pretrained(AutoConfig, name, trust_remote_code=trust)
            tokenizers[role] = from_pretrained(AutoTokenizer, name, trust_remote_code=trust)
        except ValueError as error:  # a malformed config.json too (json's error is a ValueError)
            if "trust_remote_code" in str(error):
                raise UserError(f"{where} needs to run code it ships; teacherhack runs a model folder's code only "
                                f"with --set models.trust_remote_code=true, for folders you trust") from None
            raise UserError(f"{where} cannot be loaded: {error}") from None
        except OSError as error:
            raise UserError(f"{where} is neither a size preset ({', '.join(SIZES)}) nor a model folder or reachable "
                            f"hub id: {str(error).splitlines()[0]}") from None
        if len(tokenizers[role]) < 2:  # transformers makes an empty one for a folder without tokenizer files
            raise UserError(f"{where} holds no tokenizer ({len(tokenizers[role])} token): save the model's tokenizer "
                            f"next to it (tokenizer.save_pretrained(folder))")
        try:
            special_ids(tokenizers[role])  # the ids that end prompts and responses
        except TaskError as error:
            raise UserError(f"{where}: {error}") from None
        if role == "teacher" and c.distill.teacher_prompt_cache and config.is_encoder_decoder:
            raise UserError(f"distill.teacher_prompt_cache keeps a decoder's keys and values, but {where} is an "
                            f"encoder-decoder; turn the option off")
        if c.distill.generation == "vllm" and config.is_encoder_decoder:
            raise UserError(f"distill.generation=vllm serves decoder-only models, but {where} is an encoder-decoder; "
                            f"use distill.generation=hf or auto")
        _check_positions(config, c, where)
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


def _cached_hub_model(name: str, where: str, trust: bool, reachable: Callable[[], bool]) -> str:
    """A hub id pinned to the commit the Hugging Face cache holds for its revision (``ID@COMMIT``), once the hub,
    where it can be reached, has brought the cache up to date (fetching the config records its revision's newest
    commit). The hub's reachability is probed first (``teacherhack.tasks.hub.hub_reachable``): transformers retries
    an unreachable hub for half a minute and more (for each file of a cached copy); this fails at once, saying to
    name a folder or, for a cached copy, to set HF_HUB_OFFLINE=1. With HF_HUB_OFFLINE=1 nothing touches the
    network."""
    try:
        cached, missing = pin(name), None
    except NotCached as error:
        cached, missing = None, error
    except HubModelError as error:
        raise UserError(f"{where}: {error}") from None
    folder = "name a local model folder (saved with save_pretrained), or download it where the hub can be reached"
    revision = split_revision(name)[1]
    if hub_constants.is_offline_mode():
        if cached is None:
            raise UserError(f"{where}: {missing}, and HF_HUB_OFFLINE=1 forbids downloading it; {folder}")
        return cached
    if not reachable():
        if cached is None:
            raise UserError(f"cannot reach the Hugging Face hub to load {where} (no connection, and no local folder "
                            f"{name!r} either), and {missing}; {folder}, then run with HF_HUB_OFFLINE=1")
        # transformers would try the hub for each of its files, retrying for minutes
        raise UserError(f"cannot reach the Hugging Face hub to check {where} (no connection); the Hugging Face cache "
                        f"holds it at commit {cached.rpartition('@')[2]}: run with HF_HUB_OFFLINE=1 to use that copy")
    if cached is not None and revision is not None and REGEX_COMMIT_HASH.fullmatch(revision):
        return cached  # a commit never changes
    from_pretrained(AutoConfig, name, trust_remote_code=trust)  # downloads it, recording its revision's commit
    try:
        return pin(name)
    except HubModelError as error:
        raise UserError(f"{where}: {error}, though the hub served it") from None


def _check_hub_weights(pinned: str, where: str) -> None:
    """A pinned hub id's commit holds safetensors weights (teacherhack never unpickles), as the hub lists its files,
    or the cache's snapshot with HF_HUB_OFFLINE=1. Many older hub models ship pickles only (google/t5-v1_1-*), their
    safetensors in an open pull request of the hub's conversion bot, which transformers follows for "main" alone:
    without this check the load would fail at the oracle stage, after the task's data were prepared."""
    repo, _, commit = pinned.rpartition("@")
    offline = hub_constants.is_offline_mode()
    if offline:
        files = [p.name for p in Path(try_to_load_from_cache(repo, "config.json", revision=commit)).parent.iterdir()]
    else:
        files = [f for f in HfApi().list_repo_files(repo, revision=commit) if "/" not in f]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(UNLOADED_WEIGHTS))
    if offline and not pickles:  # only what preflight's own pass fetched: the config and the tokenizer
        raise UserError(f"{where}: the Hugging Face cache holds no weights of it at commit {commit}, only "
                        f"{', '.join(sorted(files))}; download them where the hub can be reached (huggingface-cli "
                        f"download {repo} --revision {commit}), then rerun with HF_HUB_OFFLINE=1")
    found = f"{'the Hugging Face cache' if offline else 'the hub'} holds {', '.join(pickles) or 'no weights'} there"
    raise UserError(f"{where} has no safetensors weights at commit {commit} ({found}); teacherhack never unpickles "
                    f"weights: name a revision that has them (the hub's conversion is often an open pull request, "
                    f"{repo}@refs/pr/N), or convert a copy with model.save_pretrained(folder, safe_serialization=True) "
                    f"and name the folder")


def _check_folder(folder: Path, where: str, trust: bool) -> None:
    if not folder.is_dir():
        raise UserError(f"{where} is a file, not a model folder")
    if not (folder / "config.json").is_file():
        raise UserError(f"{where} holds no config.json: not a Hugging Face model folder (write one with "
                        f"save_pretrained)")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(UNLOADED_WEIGHTS))
        found = f" (found {', '.join(pickles)})" if pickles else ""
        raise UserError(f"{where} holds no safetensors weights{found}; teacherhack never unpickles weights: convert "
                        f"them with model.save_pretrained(folder, safe_serialization=True)")
    if not trust:
        for file in ("config.json", "tokenizer_config.json"):
            path = folder / file
            if path.is_file() and "auto_map" in _json(path, where):
                raise UserError(f"{where} ships its own Python code ('auto_map' in {file}); teacherhack runs a "
                                f"model folder's code only with --set models.trust_remote_code=true, for folders "
                                f"you trust")


def _json(path: Path, where: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{where}: {path.name} is not valid JSON ({error}); write it again with save_pretrained") \
            from None


# Config fields of rotary position schemes (Llama, Qwen, Gemma, GPT-NeoX; GPT-J's rotary_dim), whose position limit is
# what the model was trained on, not the size of a table that a longer sequence would index beyond
ROTARY = ("rope_parameters", "rope_theta", "rotary_dim")


def _check_positions(config: PretrainedConfig, c: LabConfig, where: str) -> None:
    """A model with a table of position embeddings (learned: GPT-2, OPT, BART; sinusoidal: Marian) holds the longest
    sequence the lab gives it, or its first step would index beyond the table: a decoder-only model's prompt and
    response together, an encoder-decoder's each on its side (`encode_prompts` and `encode_responses` keep BOS, SEP
    and EOS within task.max_prompt_len and task.max_response_len). Relative (T5) and rotary positions have no table
    and pass."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "n_positions", None) or getattr(text, "max_position_embeddings", None)
    if limit is None or any(getattr(text, field, None) is not None for field in ROTARY):
        return
    prompt, response = c.task.max_prompt_len, c.task.max_response_len
    if config.is_encoder_decoder and max(prompt, response) > limit:
        raise UserError(f"{where} has {limit} positions on each side, but task.max_prompt_len={prompt} and "
                        f"task.max_response_len={response}: lower them to {limit} or less, or use a model with more "
                        f"positions")
    if not config.is_encoder_decoder and prompt + response > limit:
        raise UserError(f"{where} has {limit} positions, but a prompt and its response take up to {prompt + response} "
                        f"(task.max_prompt_len={prompt} + task.max_response_len={response}): lower them to {limit} "
                        f"together, or use a model with more positions")


def _output_width(config: PretrainedConfig) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)
