"""Data layer: real prompt→response tasks, disjoint splits and a small byte-level BPE tokenizer.

The oracle must learn a real distribution, so tasks are real text. The built-in task needs no hub:
Debian carries two public-domain Bibles with the same versification, so verse i of the King James
Version and verse i of the Reina-Valera 1909 form an English→Spanish translation pair.

The paper's tasks (XSum, WMT-14 en→de, Natural Instructions) load through Hugging Face `datasets`,
from the hub or from a local copy; see `load_task` for the spec grammar and `TASK_FORMATS` for each
task's fields and prompt template. Pretrained tokenizers are checked with `check_tokenizers`.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS, SEP = "<pad>", "<eos>", "<sep>"
TASK_SPECS = (
    "kjv-rv",
    "jsonl:PATH",
    "xsum[:PATH]",
    "wmt14[:PATH]",
    "natural-instructions[:PATH]",
    "hf:NAME_OR_PATH",
    "PATH.{jsonl,json,csv,tsv,parquet}",
)

KJV_RV_PACKAGES = ("sword-text-kjv", "sword-text-sparv")
ZTEXT_ROOT = Path("usr/share/sword/modules/texts/ztext")
KJV_MODULE, RV_MODULE = "engKJV2006eb", "spaRV1909eb"


class TaskError(ValueError):
    """A task cannot be loaded or split; the message says what to do about it."""


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str


@dataclass(frozen=True)
class Splits:
    oracle_train: list[Pair]  # real pairs the oracle trains on
    stage1_prompts: list[str]  # the oracle samples on these; teacher and student SFT on those samples
    distill_prompts: list[str]  # stage-2 distillation pool
    validation_prompts: list[str]  # held-out prompts for proxy/golden metrics


def default_cache_dir() -> Path:
    """`$TEACHERHACK_CACHE`, else `~/.cache/teacherhack`: snapshots outlive the runs that made them."""
    return Path(os.environ.get("TEACHERHACK_CACHE") or Path.home() / ".cache" / "teacherhack").expanduser()


def load_task(
    spec: str,
    cache_dir: Path,
    *,
    split: str = "train",
    prompt_field: str | None = None,
    response_field: str | None = None,
    config: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Pair]:
    """Load the prompt→response pairs named by `spec`.

    Specs:
    - "kjv-rv": the built-in English→Spanish verses (Debian packages, no hub).
    - "jsonl:PATH": one {"prompt", "response"} object a line (other names with `prompt_field` and
      `response_field`); a malformed line is an error.
    - "xsum", "wmt14", "natural-instructions": the paper's tasks from the Hugging Face hub (`split`;
      `config` overrides the hub config, e.g. wmt14's "de-en"). "xsum:PATH" etc.: the same task from
      a local copy in that task's schema (see `TASK_FORMATS`), or from another hub dataset
      ("xsum:OWNER/NAME") when PATH does not exist locally.
    - "hf:NAME_OR_PATH": any dataset, hub or local, with the prompt in `prompt_field` (default
      "prompt") and the response in `response_field` (default "response"), used verbatim (no
      template). A bare PATH ending in .jsonl/.json/.csv/.tsv/.parquet means "hf:PATH".

    A local copy is a `datasets` `save_to_disk` folder (a DatasetDict: `split` picks the split; a
    Dataset: used whole), a folder of data files that `datasets.load_dataset` reads (e.g. a hub
    snapshot; split names come from the file names), or one .jsonl/.json/.csv/.tsv/.parquet file
    (used whole; `split` is ignored, as it is for "kjv-rv" and "jsonl:PATH"). A field may name a key
    inside a dict column with a dot ("translation.en"). Rows with a blank prompt or response field
    are skipped; `limit` keeps a random sample (fixed by `seed`) of at most that many rows, drawn
    before blank rows are dropped, so a slice of a sorted corpus is still varied.
    """
    if spec == "kjv-rv":
        _no_field_overrides(spec, prompt_field, response_field)
        return _sample(load_kjv_rv(Path(cache_dir)), limit, seed)
    if spec.startswith("jsonl:"):
        pairs = load_jsonl(Path(spec.removeprefix("jsonl:")), prompt_field or "prompt", response_field or "response")
        return _sample(pairs, limit, seed)
    return _load_records(spec, Path(cache_dir), split=split, prompt_field=prompt_field, response_field=response_field,
                         config=config, limit=limit, seed=seed, with_response=True)


def load_prompts(
    spec: str,
    cache_dir: Path,
    *,
    split: str = "train",
    prompt_field: str | None = None,
    config: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[str]:
    """The prompts of `spec` (same grammar and options as `load_task`), for data without responses.

    Responses are only needed to train the oracle: stage 2 and evaluation need prompts alone, so
    here the response field may be missing or blank (e.g. a test split whose targets are hidden, or
    a prompt-only file {"prompt": ...} a line). Templates are applied as in `load_task`.
    """
    if spec == "kjv-rv":
        _no_field_overrides(spec, prompt_field, None)
        return [pair.prompt for pair in _sample(load_kjv_rv(Path(cache_dir)), limit, seed)]
    if spec.startswith("jsonl:"):
        spec = "hf:" + spec.removeprefix("jsonl:")
        prompt_field = prompt_field or "prompt"
    pairs = _load_records(spec, Path(cache_dir), split=split, prompt_field=prompt_field, response_field=None,
                          config=config, limit=limit, seed=seed, with_response=False)
    return [pair.prompt for pair in pairs]


def _no_field_overrides(spec: str, prompt_field: str | None, response_field: str | None) -> None:
    if prompt_field is not None or response_field is not None:
        raise TaskError(
            f"prompt_field and response_field apply to hf:, jsonl: and file specs; the task {spec!r} "
            "has fixed fields (see TASK_FORMATS)"
        )


def _sample(items: list, limit: int | None, seed: int) -> list:
    """At most `limit` items, a random sample fixed by `seed`, in their original order."""
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise TaskError(f"limit must be at least 1, got {limit}")
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


# --- JSON Lines -------------------------------------------------------------------------------


def load_jsonl(path: Path, prompt_field: str = "prompt", response_field: str = "response") -> list[Pair]:
    """Read one pair per line: malformed lines are errors; blank lines and pairs with a blank side
    are skipped, as there is nothing to learn from them."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    pairs = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise TaskError(f"{path}, line {number}: expected a JSON object")
            fields = []
            for field in (prompt_field, response_field):
                if not isinstance(record.get(field), str):
                    raise TaskError(f"{path}, line {number}: field {field!r} is missing or not a string")
                fields.append(record[field])
            if all(text.strip() for text in fields):
                pairs.append(Pair(*fields))
    if not pairs:
        raise TaskError(f"{path} holds no pair with a non-empty {prompt_field!r} and {response_field!r}")
    return pairs


def write_jsonl(pairs: Iterable[Pair], path: Path) -> None:
    """Write pairs in the format `load_jsonl` reads (UTF-8, not ASCII-escaped, so it stays readable)."""
    with Path(path).open("w", encoding="utf-8") as out:
        for pair in pairs:
            out.write(json.dumps({"prompt": pair.prompt, "response": pair.response}, ensure_ascii=False) + "\n")


# --- Built-in task: KJV → Reina-Valera ----------------------------------------------------------


def load_kjv_rv(cache_dir: Path) -> list[Pair]:
    """English→Spanish verse pairs, built once from Debian packages and then read from a snapshot.

    The snapshot pins the data: a later Debian release of the packages cannot change a run.
    """
    snapshot = cache_dir / "tasks" / "kjv-rv.jsonl"
    checksum = snapshot.with_suffix(".sha256")
    if snapshot.exists():
        return read_snapshot(snapshot, checksum)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=snapshot.parent, prefix="kjv-rv-build-") as work:
        fetch_debs(KJV_RV_PACKAGES, Path(work))
        modules = Path(work) / "root" / ZTEXT_ROOT
        pairs = align_verses(parse_ztext(modules / KJV_MODULE), parse_ztext(modules / RV_MODULE))
        write_snapshot(pairs, snapshot, checksum, Path(work))
    return pairs


def fetch_debs(packages: Sequence[str], work_dir: Path) -> None:
    """Download `packages` with `apt-get download` into `work_dir` and unpack them into `work_dir/root`.

    Nothing is installed, so root is not needed.
    """
    tools = {name: shutil.which(name) for name in ("apt-get", "dpkg-deb")}
    missing = [name for name, found in tools.items() if found is None]
    if missing:
        raise TaskError(
            f"the kjv-rv task needs {' and '.join(missing)} to fetch {', '.join(packages)}: "
            "run on Debian or Ubuntu, or bring your own pairs with the task jsonl:PATH"
        )
    download = subprocess.run(
        [tools["apt-get"], "download", *packages], cwd=work_dir, capture_output=True, text=True
    )
    if download.returncode != 0:
        raise TaskError(
            f"`apt-get download {' '.join(packages)}` failed "
            f"({download.stderr.strip() or f'exit status {download.returncode}'}); if the packages are "
            "not found, run `apt-get update` (as root) first; without Debian's archive, bring your own "
            "pairs with the task jsonl:PATH"
        )
    for deb in sorted(work_dir.glob("*.deb")):
        unpack = subprocess.run(
            [tools["dpkg-deb"], "-x", str(deb), str(work_dir / "root")], capture_output=True, text=True
        )
        if unpack.returncode != 0:
            raise TaskError(f"`dpkg-deb -x {deb.name}` failed: {unpack.stderr.strip()}")


def parse_ztext(module_dir: Path) -> list[str]:
    """Every entry of a SWORD zText module, as plain text, in versification order ("" where empty).

    Per testament (`ot`, then `nt`): `.bzs` lists the zlib blocks in `.bzz` as 12-byte
    (offset, size, uncompressed size) records; `.bzv` locates each entry as a 10-byte
    (block, offset, size) record inside its decompressed block.
    """
    module_dir = Path(module_dir)
    testaments = [t for t in ("ot", "nt") if (module_dir / f"{t}.bzv").exists()]
    if not testaments:
        raise TaskError(f"{module_dir} is not a SWORD zText module (no ot.bzv or nt.bzv)")
    entries = []
    for testament in testaments:
        blocks_index = (module_dir / f"{testament}.bzs").read_bytes()
        compressed = (module_dir / f"{testament}.bzz").read_bytes()
        blocks = []
        for offset, size, _ in struct.iter_unpack("<III", blocks_index):
            blocks.append(zlib.decompress(compressed[offset : offset + size]))
        verses_index = (module_dir / f"{testament}.bzv").read_bytes()
        for block, offset, size in struct.iter_unpack("<IIH", verses_index):
            raw = blocks[block][offset : offset + size] if size else b""
            entries.append(osis_to_text(raw.decode("utf-8")))
    return entries


_NOTE_OR_TITLE = re.compile(r"<(note|title)\b[^>]*>.*?</\1\s*>", re.DOTALL)
_ENCLITICS = "lo|los|la|las|le|les|me|te|se|nos|os"
# Reina-Valera glues words it marks as supplied to their neighbours ("allí<transChange>también
# </transChange><w>bdelio"), so a transChange boundary between two letters is a word break, unless
# it attaches an enclitic pronoun ("mirándo<transChange>los</transChange>").
_GLUED_CHANGE = re.compile(
    rf"(?<=\w)(?:<[^>]*>)*</?transChange\b[^>]*>(?:<[^>]*>)*(?=\w)(?!(?:{_ENCLITICS})\b)"
)
_MILESTONE = re.compile(r"<[^>]*/>")  # chapter starts, paragraph and line markers: between words
_TAG = re.compile(r"<[^>]*>")  # containers such as <w> may split a word ("afrai</w>d"): no space


def osis_to_text(osis: str) -> str:
    """Plain text of one OSIS entry: no notes, headings, markup, pilcrows or extra whitespace."""
    text = _NOTE_OR_TITLE.sub("", osis)
    text = _GLUED_CHANGE.sub(" ", text)
    text = _TAG.sub("", _MILESTONE.sub(" ", text))
    text = html.unescape(text).replace("¶", " ")
    return " ".join(text.split())


def align_verses(english: Sequence[str], spanish: Sequence[str]) -> list[Pair]:
    """Pair entry i with entry i (same versification); keep pairs where both sides have text."""
    if len(english) != len(spanish):
        raise TaskError(f"the modules disagree on versification ({len(english)} vs {len(spanish)} entries)")
    return [Pair(en, es) for en, es in zip(english, spanish) if en and es]


def write_snapshot(pairs: Sequence[Pair], snapshot: Path, checksum: Path, work_dir: Path) -> None:
    """Write the snapshot and its sha256 so that a snapshot never exists without its checksum."""
    staged = work_dir / snapshot.name
    write_jsonl(pairs, staged)
    staged_sum = work_dir / checksum.name
    staged_sum.write_text(f"{_sha256(staged)}  {snapshot.name}\n", encoding="utf-8")
    staged_sum.replace(checksum)
    staged.replace(snapshot)


def read_snapshot(snapshot: Path, checksum: Path) -> list[Pair]:
    """Read a snapshot after checking it against its sha256, so a damaged one cannot slip into a run."""
    expected = checksum.read_text(encoding="utf-8").split()[:1] if checksum.exists() else []
    if expected != [_sha256(snapshot)]:
        raise TaskError(
            f"task snapshot {snapshot} does not match its checksum {checksum}: "
            "delete both files to rebuild it"
        )
    return load_jsonl(snapshot)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- Splits -------------------------------------------------------------------------------------


def split_task(
    pairs: list[Pair],
    *,
    n_stage1: int,
    n_distill: int,
    n_validation: int,
    n_oracle: int | None = None,
    seed: int = 0,
) -> Splits:
    """Shuffle unique prompts with `seed` and carve validation, distill, stage 1, then oracle.

    Splits are disjoint by prompt, so no metric is measured on a prompt any model trained on. The
    order of carving keeps validation fixed when only later counts change. Without `n_oracle`,
    the oracle takes every remaining pair (at least one).
    """
    counts = {"n_stage1": n_stage1, "n_distill": n_distill, "n_validation": n_validation, "n_oracle": n_oracle}
    negative = [f"{name}={count}" for name, count in counts.items() if count is not None and count < 0]
    if negative:
        raise TaskError(f"split sizes must not be negative: {', '.join(negative)}")
    first: dict[str, Pair] = {}
    for pair in pairs:
        first.setdefault(pair.prompt, pair)
    unique = list(first.values())
    random.Random(seed).shuffle(unique)
    needed = n_validation + n_distill + n_stage1 + (1 if n_oracle is None else n_oracle)
    if needed > len(unique):
        raise TaskError(
            f"the splits need {needed} pairs with distinct prompts "
            f"({n_validation} validation + {n_distill} distill + {n_stage1} stage 1 + "
            f"{'at least 1' if n_oracle is None else n_oracle} oracle), but only {len(unique)} are available"
        )
    validation, rest = unique[:n_validation], unique[n_validation:]
    distill, rest = rest[:n_distill], rest[n_distill:]
    stage1, rest = rest[:n_stage1], rest[n_stage1:]
    return Splits(
        oracle_train=rest if n_oracle is None else rest[:n_oracle],
        stage1_prompts=[pair.prompt for pair in stage1],
        distill_prompts=[pair.prompt for pair in distill],
        validation_prompts=[pair.prompt for pair in validation],
    )


# --- Tokenizer ----------------------------------------------------------------------------------

_BYTES = len(pre_tokenizers.ByteLevel.alphabet())


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the task text, with PAD, EOS, SEP as ids 0, 1, 2.

    Byte level means any text encodes and decodes exactly; a small vocabulary keeps the output
    softmax, which dominates CPU training time, cheap.
    """
    if vocab_size < _BYTES + 3:
        raise ValueError(f"vocab_size must be at least {_BYTES + 3} (every byte plus 3 special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, SEP],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=EOS,
        sep_token=SEP,
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
        split_special_tokens=True,  # a literal "<sep>" in the data is text, not a control token
    )


def encode_prompts(tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], max_len: int) -> list[list[int]]:
    """Prompt tokens then SEP, which marks where the response starts; a long prompt keeps its start."""
    return [ids + [tokenizer.sep_token_id] for ids in _encode(tokenizer, prompts, max_len - 1)]


def encode_responses(
    tokenizer: PreTrainedTokenizerFast, responses: Sequence[str], max_len: int
) -> list[list[int]]:
    """Response tokens then EOS, so models learn to stop; a long response keeps its start."""
    return [ids + [tokenizer.eos_token_id] for ids in _encode(tokenizer, responses, max_len - 1)]


def _encode(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], limit: int) -> list[list[int]]:
    if limit < 1:
        raise ValueError(f"max_len must be at least 2 (one token plus SEP or EOS), got {limit + 1}")
    if not texts:
        return []
    return [ids[:limit] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
