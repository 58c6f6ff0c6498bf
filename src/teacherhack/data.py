"""Data layer: real prompt→response tasks, disjoint splits and a small byte-level BPE tokenizer.

The oracle must learn a real distribution, so tasks are real text. Three built-in tasks need no hub,
one for each kind of task in the paper, all from Debian's archive:
- "kjv-rv" (translation): Debian carries two public-domain Bibles with the same versification, so
  verse i of the King James Version and verse i of the Reina-Valera 1909 form an English→Spanish pair.
- "debian-descriptions" (summarisation, XSum-like): a package's long description → its one-line
  synopsis, from the archive metadata that `apt-get update` fetches.
- "wordnet" (instruction-style generation): "Define: WORD (POS)" → the WordNet 3.0 definition.
Each is built once and then read from a snapshot with a checksum (see `write_snapshot`).

The paper's tasks (XSum, WMT-14 en→de, Natural Instructions) load through Hugging Face `datasets`,
from the hub or from a local copy; see `load_task` for the spec grammar and `TASK_FORMATS` for each
task's fields and prompt template. Pretrained tokenizers are checked with `check_tokenizers`.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import html
import json
import lzma
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
    "debian-descriptions",
    "wordnet",
    "hf:NAME_OR_PATH",
    "PATH.{jsonl,json,csv,tsv,parquet}",
)

KJV_RV_PACKAGES = ("sword-text-kjv", "sword-text-sparv")
ZTEXT_ROOT = Path("usr/share/sword/modules/texts/ztext")
KJV_MODULE, RV_MODULE = "engKJV2006eb", "spaRV1909eb"
BUILTIN_TASKS = ("kjv-rv", "debian-descriptions", "wordnet")  # built from Debian's archive, no hub


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
    - "debian-descriptions": built-in summaries, package long description → synopsis (Debian's
      archive metadata, no hub); see `load_debian_descriptions`.
    - "wordnet": built-in definitions, "Define: WORD (POS)" → WordNet gloss (Debian package, no
      hub); see `load_wordnet`.
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
    (used whole; `split` is ignored, as it is for the built-in tasks and "jsonl:PATH"). A field may name a key
    inside a dict column with a dot ("translation.en"). Rows with a blank prompt or response field
    are skipped; `limit` keeps a random sample (fixed by `seed`) of at most that many rows, drawn
    before blank rows are dropped, so a slice of a sorted corpus is still varied.
    """
    if spec in BUILTIN_TASKS:
        _no_field_overrides(spec, prompt_field, response_field)
        return _sample(_load_builtin(spec, Path(cache_dir)), limit, seed)
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
    if spec in BUILTIN_TASKS:
        _no_field_overrides(spec, prompt_field, None)
        return [pair.prompt for pair in _sample(_load_builtin(spec, Path(cache_dir)), limit, seed)]
    if spec.startswith("jsonl:"):
        spec = "hf:" + spec.removeprefix("jsonl:")
        prompt_field = prompt_field or "prompt"
    pairs = _load_records(spec, Path(cache_dir), split=split, prompt_field=prompt_field, response_field=None,
                          config=config, limit=limit, seed=seed, with_response=False)
    return [pair.prompt for pair in pairs]


def _load_builtin(spec: str, cache_dir: Path) -> list[Pair]:
    """The pairs of a built-in task (one of `BUILTIN_TASKS`), from its snapshot once it exists."""
    if spec == "kjv-rv":
        return load_kjv_rv(cache_dir)
    if spec == "debian-descriptions":
        return load_debian_descriptions(cache_dir)
    return load_wordnet(cache_dir)


def _no_field_overrides(spec: str, prompt_field: str | None, response_field: str | None) -> None:
    if prompt_field is not None or response_field is not None:
        raise TaskError(
            f"prompt_field and response_field apply to hf:, jsonl: and file specs; the task {spec!r} "
            "has fixed fields (see TASK_FORMATS)"
        )


def _sample(items: list, limit: int | None, seed: int) -> list:
    """At most `limit` items, a random sample fixed by `seed`, in their original order."""
    keep = _sample_indices(len(items), limit, seed)
    return items if keep is None else [items[i] for i in keep]


def _sample_indices(size: int, limit: int | None, seed: int) -> list[int] | None:
    """Sorted indices of a `seed`-fixed sample of `limit` out of `size`; None to keep everything."""
    if limit is not None and limit < 1:
        raise TaskError(f"limit must be at least 1, got {limit}")
    if limit is None or limit >= size:
        return None
    return sorted(random.Random(seed).sample(range(size), limit))


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

    def build(work: Path) -> list[Pair]:
        fetch_debs(KJV_RV_PACKAGES, work)
        modules = work / "root" / ZTEXT_ROOT
        return align_verses(parse_ztext(modules / KJV_MODULE), parse_ztext(modules / RV_MODULE))

    return build_once(Path(cache_dir), "kjv-rv", build)


def build_once(cache_dir: Path, name: str, build: Callable[[Path], list[Pair]]) -> list[Pair]:
    """The pairs in `cache_dir/tasks/NAME.jsonl` when that snapshot exists (checked against its
    sha256); else `build(work_dir)` in a scratch folder under `tasks/`, snapshotted, and the scratch
    folder (downloads, unpacked files) removed."""
    snapshot = cache_dir / "tasks" / f"{name}.jsonl"
    checksum = snapshot.with_suffix(".sha256")
    if snapshot.exists():
        return read_snapshot(snapshot, checksum)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=snapshot.parent, prefix=f"{name}-build-") as work:
        pairs = build(Path(work))
        if not pairs:
            raise TaskError(f"building the {name} task gave no pairs; nothing was snapshotted")
        write_snapshot(pairs, snapshot, checksum, Path(work))
    return pairs


def fetch_debs(packages: Sequence[str], work_dir: Path, *, task: str = "kjv-rv") -> None:
    """Download `packages` with `apt-get download` into `work_dir` and unpack them into `work_dir/root`.

    Nothing is installed, so root is not needed. `task` names the task in error messages.
    """
    tools = {name: shutil.which(name) for name in ("apt-get", "dpkg-deb")}
    missing = [name for name, found in tools.items() if found is None]
    if missing:
        raise TaskError(
            f"the {task} task needs {' and '.join(missing)} to fetch {', '.join(packages)}: "
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


# --- Built-in task: Debian package descriptions (summarisation) ------------------------------------

DESCRIPTION_MIN_WORDS = 10  # shorter long descriptions are barely longer than their synopsis
DESCRIPTION_FIELDS = ("Description", "Description-en")  # Packages files / Translation-en files
# The index files that hold descriptions, as `apt-get update` names them in its lists folder
# (e.g. deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en), possibly compressed.
_DESCRIPTION_INDEX = re.compile(r"_(?:Packages|i18n_Translation-en)(?:\.(?:gz|xz|bz2|lzma|lz4|zst))?$")
_BULLET = re.compile(r"(?:[*+\-o•]|\d{1,2}[.)])\s")


def load_debian_descriptions(cache_dir: Path) -> list[Pair]:
    """Summaries from Debian's archive metadata: a package's long description → its synopsis.

    Built once with `apt-get update` into a private folder (`fetch_archive_metadata`, with the
    machine's own apt sources and English descriptions), parsed with `description_pairs`, and then
    read from the snapshot `tasks/debian-descriptions.jsonl`. The archive metadata changes whenever
    the archive does (new package versions, point releases, security updates), so a rebuild later
    gives somewhat different pairs: the snapshot, with its checksum, is what makes reruns
    reproducible. Keep it (or copy it with the results) to repeat an experiment.
    """

    def build(work: Path) -> list[Pair]:
        lists = fetch_archive_metadata(work)
        return description_pairs(_read_index(path) for path in description_indices(lists))

    return build_once(Path(cache_dir), "debian-descriptions", build)


def fetch_archive_metadata(work_dir: Path, *, timeout: float = 900) -> Path:
    """Run `apt-get update` with English translations into `work_dir/lists` and return that folder.

    Everything apt writes stays under `work_dir`: its lists, its cache and an empty dpkg status
    file replace the system's, and locking is off (the folder is private), so the system's package
    lists are left alone and root is not needed. The indices are kept uncompressed
    (`Acquire::GzipIndexes=false`, which Docker images turn on); `description_indices` still reads
    the compressed forms.
    """
    apt = shutil.which("apt-get")
    if apt is None:
        raise TaskError(
            "the debian-descriptions task needs apt-get to fetch Debian's archive metadata (the package "
            "descriptions): run on Debian or Ubuntu, or bring your own pairs with the task jsonl:PATH"
        )
    lists, cache, status = work_dir / "lists", work_dir / "apt-cache", work_dir / "dpkg-status"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    status.touch()
    options = {
        "Acquire::Languages": "en",
        "Acquire::GzipIndexes": "false",
        "Dir::State::Lists": str(lists),
        "Dir::Cache": str(cache),
        "Dir::State::status": str(status),
        "Debug::NoLocking": "true",
    }
    command = [apt, "update"]
    for name, value in options.items():
        command += ["-o", f"{name}={value}"]
    try:
        update = subprocess.run(command, cwd=work_dir, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TaskError(
            f"`apt-get update` did not finish within {timeout:.0f} s: check the network and the apt sources "
            "(/etc/apt/sources.list*), or bring your own pairs with the task jsonl:PATH"
        ) from None
    problem = None
    if update.returncode != 0:
        problem = f"`apt-get update` failed ({_tail(update.stderr) or f'exit status {update.returncode}'})"
    elif not description_indices(lists):
        problem = f"`apt-get update` fetched no package index ({_tail(update.stderr) or 'no apt sources?'})"
    if problem:
        raise TaskError(
            f"{problem}: the debian-descriptions task needs Debian's archive metadata; check the network and "
            "the apt sources (/etc/apt/sources.list*), or bring your own pairs with the task jsonl:PATH"
        )
    failed = [line.strip() for line in update.stderr.splitlines() if "Failed to fetch" in line]
    if failed:  # apt carries on without the sources it could not reach: the task is built from the rest
        warnings.warn(f"`apt-get update` could not fetch some indices, the descriptions will lack them: "
                      f"{' | '.join(failed[:3])}", stacklevel=2)
    return lists


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def description_indices(lists_dir: Path) -> list[Path]:
    """The Packages and Translation-en files in an apt lists folder, sorted by name."""
    return sorted(path for path in Path(lists_dir).iterdir() if path.is_file() and _DESCRIPTION_INDEX.search(path.name))


def _read_index(path: Path) -> str:
    """An index file's text, decompressed: the standard library reads .gz, .xz, .lzma and .bz2;
    .lz4 and .zst (what apt keeps when told to keep indices compressed) go through apt's own
    `apt-helper cat-file`, or the lz4 or zstd tools."""
    suffix = path.suffix
    if suffix == ".gz":
        raw = gzip.decompress(path.read_bytes())
    elif suffix in (".xz", ".lzma"):
        raw = lzma.decompress(path.read_bytes())
    elif suffix == ".bz2":
        raw = bz2.decompress(path.read_bytes())
    elif suffix in (".lz4", ".zst"):
        tool = "lz4" if suffix == ".lz4" else "zstd"
        helper = Path("/usr/lib/apt/apt-helper")
        if helper.exists():
            command = [str(helper), "cat-file", str(path)]
        elif shutil.which(tool):
            command = [str(shutil.which(tool)), "-dc", str(path)]
        else:
            raise TaskError(f"cannot decompress {path.name}: neither apt-helper nor {tool} is installed")
        done = subprocess.run(command, capture_output=True)
        if done.returncode != 0:
            raise TaskError(f"cannot decompress {path.name}: {done.stderr.decode(errors='replace').strip()}")
        raw = done.stdout
    else:
        raw = path.read_bytes()
    return raw.decode("utf-8", errors="replace")  # control files are UTF-8; one bad byte must not stop a build


def parse_descriptions(text: str) -> Iterator[tuple[str, list[str]]]:
    """(synopsis, continuation lines) of each stanza with a Description or Description-en field.

    Stanzas are deb822 paragraphs (separated by blank lines); a field's continuation lines start with
    a space or tab, and are returned as they are. A package without a long description yields [].
    """
    field, synopsis, extended = None, None, []
    for line in text.split("\n") + [""]:
        line = line.rstrip("\r")
        if not line.strip():  # end of a stanza
            if synopsis is not None:
                yield synopsis, extended
            field, synopsis, extended = None, None, []
        elif line[0] in " \t":
            if field in DESCRIPTION_FIELDS:
                extended.append(line)
        else:
            field, _, value = line.partition(":")
            if field in DESCRIPTION_FIELDS:
                synopsis, extended = value.strip(), []


def clean_long_description(lines: Sequence[str]) -> str:
    """Plain text of a long description: " ." lines (blank-line markers) end paragraphs, a
    paragraph's wrapped lines are joined, list items ("* ", "- ", "o ", "1. ") start a line of their
    own, and whitespace is collapsed. Paragraphs and list items are separated by one newline."""
    out: list[str] = []
    new_line = True
    for line in lines:
        body = " ".join(line.split())
        if body == ".":
            new_line = True
        elif body:
            if new_line or not out or _BULLET.match(body):
                out.append(body)
            else:
                out[-1] += " " + body
            new_line = False
    return "\n".join(out)


def description_pairs(texts: Iterable[str], min_words: int = DESCRIPTION_MIN_WORDS) -> list[Pair]:
    """Long description → synopsis pairs from the text of Packages / Translation-en files.

    Kept: a non-empty synopsis and a long description of at least `min_words` words; the first
    pair of each long description wins (many packages share one, e.g. in several suites).
    """
    first: dict[str, Pair] = {}
    for text in texts:
        for synopsis, extended in parse_descriptions(text):
            prompt, response = clean_long_description(extended), " ".join(synopsis.split())
            if response and len(prompt.split()) >= min_words and prompt not in first:
                first[prompt] = Pair(prompt, response)
    return list(first.values())


# --- Built-in task: WordNet definitions (instruction-style generation) -------------------------------

WORDNET_PACKAGES = ("wordnet-base",)
WORDNET_ROOT = Path("usr/share/wordnet")
WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}  # file suffix → name
_ADJECTIVE_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # "galore(ip)": syntactic position, not part of the word
_EXAMPLES = re.compile(r';\s*"')  # the gloss's examples start at the first `; "`


@dataclass(frozen=True)
class Synset:
    offset: int
    words: tuple[str, ...]  # as written in the data file: underscores, no adjective markers
    definition: str  # the gloss without its examples


def load_wordnet(cache_dir: Path) -> list[Pair]:
    """Definitions from WordNet 3.0 (Debian's `wordnet-base`): "Define: WORD (POS)" → definition.

    Built once with `apt-get download` and `dpkg-deb -x`, parsed with `wordnet_pairs`, and then read
    from the snapshot `tasks/wordnet.jsonl`.
    """

    def build(work: Path) -> list[Pair]:
        fetch_debs(WORDNET_PACKAGES, work, task="wordnet")
        return wordnet_pairs(work / "root" / WORDNET_ROOT)

    return build_once(Path(cache_dir), "wordnet", build)


def parse_wordnet_data(lines: Iterable[str]) -> dict[int, Synset]:
    """The synsets of a WordNet `data.POS` file, by byte offset.

    A line: synset offset, lex_filenum, ss_type, w_cnt (2 hex digits), w_cnt × (word, lex_id),
    pointers (and verb frames), then `| gloss`. The license header's lines start with two spaces.
    The definition is the gloss up to its first `; "`, where the quoted examples start; a gloss may
    hold several definitions separated by plain semicolons, which are kept.
    """
    synsets = {}
    for line in lines:
        if line.startswith("  ") or not line.strip():
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        count = int(fields[3], 16)
        words = tuple(_ADJECTIVE_MARKER.sub("", word) for word in fields[4 : 4 + 2 * count : 2])
        definition = " ".join(_EXAMPLES.split(gloss, maxsplit=1)[0].split()).rstrip(" ;")
        synsets[int(fields[0])] = Synset(int(fields[0]), words, definition)
    return synsets


def parse_wordnet_index(lines: Iterable[str]) -> list[tuple[str, list[int]]]:
    """(lemma, synset offsets, most frequent sense first) for each line of a WordNet `index.POS` file.

    A line: lemma, pos, synset_cnt, p_cnt, p_cnt pointer symbols, sense_cnt, tagsense_cnt, then the
    synset_cnt offsets. Lemmas are lower case with underscores; header lines start with two spaces.
    """
    entries = []
    for line in lines:
        if line.startswith("  ") or not line.strip():
            continue
        fields = line.split()
        count = int(fields[2])
        entries.append((fields[0], [int(offset) for offset in fields[len(fields) - count :]]))
    return entries


def wordnet_pairs(wordnet_dir: Path) -> list[Pair]:
    """One pair per (lemma, part of speech): "Define: WORD (POS)" → the definition of its first sense.

    WordNet's index lists each lemma's senses most frequent first, so the pair holds the common
    meaning ("bank (noun)" → "sloping land ..."). WORD is written as in that synset ("Mars", not
    "mars"), with spaces for underscores; POS is noun, verb, adjective or adverb. Synonyms share a
    definition, so a response can repeat, but every prompt is distinct.
    """
    wordnet_dir = Path(wordnet_dir)
    missing = [name for suffix in WORDNET_POS for name in (f"data.{suffix}", f"index.{suffix}")
               if not (wordnet_dir / name).is_file()]
    if missing:
        raise TaskError(f"{wordnet_dir} is not a WordNet database (missing {', '.join(missing)})")
    first: dict[str, Pair] = {}
    for suffix, pos in WORDNET_POS.items():
        with (wordnet_dir / f"data.{suffix}").open(encoding="utf-8", errors="replace") as lines:
            synsets = parse_wordnet_data(lines)
        with (wordnet_dir / f"index.{suffix}").open(encoding="utf-8", errors="replace") as lines:
            index = parse_wordnet_index(lines)
        for lemma, offsets in index:
            for offset in offsets:
                synset = synsets.get(offset)
                if synset is None or not synset.definition:
                    continue
                word = next((w for w in synset.words if w.lower() == lemma.lower()), lemma)
                prompt = f"Define: {word.replace('_', ' ')} ({pos})"
                first.setdefault(prompt, Pair(prompt, synset.definition))
                break
    return list(first.values())


# --- Hugging Face datasets: the paper's tasks ------------------------------------------------------


@dataclass(frozen=True)
class TaskFormat:
    """How one task's records become pairs.

    `slots` maps each slot of the template to the record fields that may hold it, first present
    wins (the choice is made once per dataset, from its columns); `response` is the slot that holds
    the response; `optional` slots may be missing or blank.
    """

    name: str
    hub_name: str
    hub_config: str | None
    slots: Mapping[str, tuple[str, ...]]
    response: str
    template: str  # the prompt, as documentation; `prompt` builds it
    prompt: Callable[[Mapping[str, str]], str]
    optional: frozenset[str] = frozenset()

    def describe_fields(self) -> str:
        parts = []
        for slot, fields in self.slots.items():
            alternatives = " or ".join(fields)
            parts.append(f"{alternatives}{' (optional)' if slot in self.optional else ''}")
        return ", ".join(parts)


def _natural_instructions_prompt(values: Mapping[str, str]) -> str:
    if values.get("input", "").strip():
        return f"Definition: {values['instruction']}\n\nInput: {values['input']}\n\nOutput:"
    return f"Definition: {values['instruction']}\n\nOutput:"


# Prompt prefixes are T5's own ("summarize: ", "translate English to German: "), so pretrained T5
# checkpoints, the paper's model family, see the prompts they were trained with.
TASK_FORMATS: dict[str, TaskFormat] = {
    "xsum": TaskFormat(
        name="xsum",
        hub_name="EdinburghNLP/xsum",
        hub_config=None,
        slots={"document": ("document",), "summary": ("summary",)},
        response="summary",
        template="summarize: {document}",
        prompt=lambda v: f"summarize: {v['document']}",
    ),
    "wmt14": TaskFormat(
        name="wmt14",
        hub_name="wmt/wmt14",
        hub_config="de-en",
        slots={"en": ("translation.en", "en"), "de": ("translation.de", "de")},
        response="de",
        template="translate English to German: {en}",
        prompt=lambda v: f"translate English to German: {v['en']}",
    ),
    "natural-instructions": TaskFormat(
        name="natural-instructions",
        hub_name="Muennighoff/natural-instructions",
        hub_config=None,
        slots={
            "instruction": ("definition", "instruction"),
            "input": ("inputs", "input"),
            "output": ("targets", "output"),
        },
        response="output",
        template="Definition: {definition}\n\nInput: {inputs}\n\nOutput:",  # no Input part when inputs is blank
        prompt=_natural_instructions_prompt,
        optional=frozenset({"input"}),
    ),
}

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
NO_HUB_TASKS = ", ".join((*BUILTIN_TASKS, "jsonl:PATH"))


def _generic_format(prompt_field: str | None, response_field: str | None) -> TaskFormat:
    prompt_field, response_field = prompt_field or "prompt", response_field or "response"
    return TaskFormat(
        name="hf",
        hub_name="",
        hub_config=None,
        slots={"prompt": (prompt_field,), "response": (response_field,)},
        response="response",
        template="{" + prompt_field + "}",
        prompt=lambda v: v["prompt"],
    )


def _load_records(
    spec: str,
    cache_dir: Path,
    *,
    split: str,
    prompt_field: str | None,
    response_field: str | None,
    config: str | None,
    limit: int | None,
    seed: int,
    with_response: bool,
) -> list[Pair]:
    """Resolve a datasets-backed spec to (format, location) and turn its records into pairs."""
    name, colon, location = spec.partition(":")
    if name in TASK_FORMATS:
        _no_field_overrides(spec, prompt_field, response_field)
        fmt = TASK_FORMATS[name]
        task_name = name
        if not colon:
            location = fmt.hub_name
            config = config if config is not None else fmt.hub_config
    elif name == "hf" and colon:
        fmt, task_name = _generic_format(prompt_field, response_field), "hf"
    elif spec.lower().endswith(LOCAL_SUFFIXES):
        fmt, task_name, location = _generic_format(prompt_field, response_field), "hf", spec
    else:
        raise TaskError(f"unknown task {spec!r}; valid tasks: {', '.join(TASK_SPECS)}")
    if not location:
        raise TaskError(f"task {spec!r} names no dataset: write {task_name}:PATH or {task_name}:OWNER/NAME")
    source = _open_source(location, task_name, fmt, split=split, config=config, cache_dir=cache_dir)
    return _records_to_pairs(source, fmt, limit=limit, seed=seed, with_response=with_response)


@dataclass
class _Source:
    """Records from one split of one dataset: a `datasets.Dataset` or a list of dicts."""

    where: str  # for error messages
    rows: Any  # datasets.Dataset | list[dict]

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self) -> list[str]:
        if isinstance(self.rows, list):
            seen: dict[str, None] = {}
            for row in self.rows[:1000]:
                seen.update(dict.fromkeys(row))
            return list(seen)
        return list(self.rows.column_names)

    def head(self, n: int) -> list[dict]:
        if isinstance(self.rows, list):
            return self.rows[:n]
        return self.rows.select(range(min(n, len(self.rows)))).to_list()


def _looks_local(location: str) -> bool:
    """A path when it exists, or when it could only be a path (a data-file suffix, a leading / . ~)."""
    return (
        Path(location).expanduser().exists()
        or location.lower().endswith(LOCAL_SUFFIXES)
        or location.startswith(("/", ".", "~"))
        or location.count("/") > 1
    )


def _open_source(location: str, task_name: str, fmt: TaskFormat, *, split: str, config: str | None,
                 cache_dir: Path) -> _Source:
    if _looks_local(location):
        return _open_local(Path(location).expanduser(), task_name, fmt, split=split, config=config, cache_dir=cache_dir)
    return _open_hub(location, task_name, fmt, split=split, config=config)


def _local_copy_hint(task_name: str, fmt: TaskFormat) -> str:
    return (
        f"use a local copy: {task_name}:PATH, where PATH is a `datasets` save_to_disk folder, a folder "
        f"of data files, or a {'/'.join(LOCAL_SUFFIXES)} file with the fields {fmt.describe_fields()}"
    )


def _open_local(path: Path, task_name: str, fmt: TaskFormat, *, split: str, config: str | None,
                cache_dir: Path) -> _Source:
    if not path.exists():
        raise TaskError(f"task data {path} does not exist; {_local_copy_hint(task_name, fmt)}")
    if path.is_dir():
        import datasets

        if (path / "dataset_dict.json").is_file():
            try:
                splits = datasets.load_from_disk(str(path))
            except Exception as error:  # noqa: BLE001 - any failure to read is the same problem
                raise TaskError(f"cannot read the saved dataset {path}: {error}") from None
            if split not in splits:
                raise TaskError(f"{path} has no split {split!r}; available splits: {', '.join(splits) or 'none'}")
            return _Source(f"{path} (split {split!r})", splits[split])
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            try:
                return _Source(str(path), datasets.load_from_disk(str(path)))
            except Exception as error:  # noqa: BLE001
                raise TaskError(f"cannot read the saved dataset {path}: {error}") from None
        return _load_dataset(str(path), config, split, where=str(path), task_name=task_name, fmt=fmt,
                             cache_dir=cache_dir / "hf-datasets")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            rows = _read_json_records(path)
        elif suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8", newline="") as handle:
                rows = [dict(row) for row in csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")]
        elif suffix == ".parquet":
            import pyarrow.parquet

            rows = pyarrow.parquet.read_table(path).to_pylist()
        else:
            raise TaskError(f"{path}: unknown data format {suffix or '(no suffix)'}; "
                            f"expected a folder or one of {', '.join(LOCAL_SUFFIXES)}")
    except TaskError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as error:  # pyarrow errors are ValueErrors
        raise TaskError(f"cannot read {path} as {suffix.lstrip('.').upper()}: {error}") from None
    return _Source(str(path), rows)


def _read_json_records(path: Path) -> list[dict]:
    """A JSON array of objects, or JSON Lines (one object a line, blank lines skipped)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise TaskError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
        numbered = list(enumerate(records, start=1))
        where = "item"
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise TaskError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        where = "line"
    for number, record in numbered:
        if not isinstance(record, dict):
            raise TaskError(f"{path}, {where} {number}: expected a JSON object")
    return [record for _, record in numbered]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (`HF_ENDPOINT`) opens within `timeout` seconds.

    `datasets` retries an unreachable hub for about 25 s before it gives up; this answers at once.
    Behind a proxy the direct connection says nothing, so the answer is yes and `datasets` decides.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_offline_mode() -> bool:
    return any(
        os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _unreachable(name: str, task_name: str, fmt: TaskFormat, cause: str) -> TaskError:
    return TaskError(
        f"cannot reach the Hugging Face hub to load {name!r} ({cause}); {_local_copy_hint(task_name, fmt)}. "
        f"If the dataset is in the Hugging Face cache already, set HF_HUB_OFFLINE=1. "
        f"Tasks that need no hub: {NO_HUB_TASKS}"
    )


def _open_hub(name: str, task_name: str, fmt: TaskFormat, *, split: str, config: str | None) -> _Source:
    if not _hub_offline_mode() and not hub_reachable():
        raise _unreachable(name, task_name, fmt, f"no connection, and no local file or folder {name!r} either")
    where = f"hub dataset {name!r}" + (f" config {config!r}" if config else "")
    return _load_dataset(name, config, split, where=where, task_name=task_name, fmt=fmt, cache_dir=None)


def _load_dataset(path: str, config: str | None, split: str, *, where: str, task_name: str, fmt: TaskFormat,
                  cache_dir: Path | None) -> _Source:
    """`datasets.load_dataset`, with its failures turned into `TaskError`s that say what to do."""
    import datasets
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

    kwargs = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    try:
        rows = datasets.load_dataset(path, config, split=split, **kwargs)
    except (DatasetNotFoundError, DataFilesNotFoundError, EmptyDatasetError) as error:
        raise TaskError(f"no dataset at {where}: {error}; {_local_copy_hint(task_name, fmt)}") from None
    except ValueError as error:
        message = str(error)
        if "split" in message.lower():
            listed = re.search(r"\[([^\]]*)\]", message)
            available = listed.group(1).replace("'", "") if listed else message
            raise TaskError(f"{where} has no split {split!r}; available splits: {available}") from None
        raise TaskError(f"cannot load {where}: {message}") from None
    except RuntimeError as error:
        if "scripts are no longer supported" in str(error):
            raise TaskError(
                f"{where} is defined by a loading script, which this version of `datasets` no longer runs; "
                f"{_local_copy_hint(task_name, fmt)} (e.g. the hub's Parquet export of it), or name a "
                f"Parquet mirror as {task_name}:OWNER/NAME"
            ) from None
        raise TaskError(f"cannot load {where}: {error}") from None
    except (ConnectionError, TimeoutError, OSError) as error:
        if cache_dir is not None:  # a local folder
            raise TaskError(f"cannot read {where}: {type(error).__name__}: {error}") from None
        raise _unreachable(path, task_name, fmt, f"{type(error).__name__}: {error}") from None
    except Exception as error:  # httpx and other transports raise their own connection errors
        if cache_dir is None and re.search(r"connect|timeout|network", type(error).__name__, re.IGNORECASE):
            raise _unreachable(path, task_name, fmt, f"{type(error).__name__}: {error}") from None
        raise TaskError(f"cannot load {where}: {type(error).__name__}: {error}") from None
    if not isinstance(rows, datasets.Dataset):  # an IterableDataset or a dict of splits: not expected
        raise TaskError(f"cannot load {where}: expected one split, got {type(rows).__name__}")
    return _Source(where, rows)


def _field_names(rows: Sequence[Mapping]) -> list[str]:
    """Every column, and "column.key" for the keys of dict columns, in first-seen order."""
    names: dict[str, None] = {}
    for row in rows:
        for column, value in row.items():
            names[column] = None
            if isinstance(value, Mapping):
                names.update(dict.fromkeys(f"{column}.{key}" for key in value))
    return list(names)


def _get(record: Mapping, field: str) -> Any:
    if field in record:
        return record[field]
    head, dot, rest = field.partition(".")
    if dot and isinstance(record.get(head), Mapping):
        return _get(record[head], rest)
    return None


def _records_to_pairs(source: _Source, fmt: TaskFormat, *, limit: int | None, seed: int,
                      with_response: bool) -> list[Pair]:
    if len(source) == 0:
        raise TaskError(f"{source.where} holds no rows")
    available = _field_names(source.head(100))
    for column in source.columns():  # columns whose first rows are all null still count
        if column not in available:
            available.append(column)
    chosen: dict[str, str] = {}
    for slot, candidates in fmt.slots.items():
        if slot == fmt.response and not with_response:
            continue
        found = next((field for field in candidates if field in available), None)
        if found is None:
            if slot in fmt.optional:
                continue
            raise TaskError(
                f"{source.where} has no field {' or '.join(repr(c) for c in candidates)} "
                f"(the {fmt.name} {'response' if slot == fmt.response else 'prompt'} field); "
                f"available fields: {', '.join(available) or 'none'}"
            )
        chosen[slot] = found
    rows = source.rows
    keep = _sample_indices(len(rows), limit, seed)
    if keep is not None:
        rows = [rows[i] for i in keep] if isinstance(rows, list) else rows.select(keep)
    if not isinstance(rows, list):
        top = list(dict.fromkeys(c if c in rows.column_names else c.partition(".")[0] for c in chosen.values()))
        rows = rows.select_columns(top).to_list()
    pairs = []
    for number, row in enumerate(rows, start=1):
        values: dict[str, str] = {}
        for slot, field in chosen.items():
            value = _get(row, field)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise TaskError(f"{source.where}, row {number}: field {field!r} holds {type(value).__name__}, not text")
            values[slot] = value
        required = [slot for slot in chosen if slot not in fmt.optional]
        if all(values[slot].strip() for slot in required):
            pairs.append(Pair(fmt.prompt(values), values.get(fmt.response, "")))
    if not pairs:
        wanted = " and ".join(repr(chosen[slot]) for slot in chosen if slot not in fmt.optional)
        raise TaskError(f"{source.where}: none of its {len(rows)} rows has a non-empty {wanted}")
    return pairs


# --- Pretrained tokenizers: one tokenizer for all roles ----------------------------------------------

SPECIAL_TOKENS = ("pad", "eos", "bos", "sep", "unk")
TOKENIZATION_RULES = ("normalizer", "pre_tokenizer", "model")


class TokenizerMismatch(TaskError):
    """The roles' tokenizers differ: token ids would mean different things to different models."""


def check_tokenizers(tokenizers: Mapping[str, PreTrainedTokenizerBase]) -> None:
    """Check that every role (oracle, teacher, student, ...) uses one tokenizer.

    Distillation compares next-token distributions id by id, so the roles must agree on the
    vocabulary (token → id map), on the special tokens (pad, eos, bos, sep, unk ids) and, for fast
    tokenizers, on how text becomes tokens (normalizer, pre-tokenizer, model and merges). Each role
    is compared with the first; `TokenizerMismatch` says what differs.
    """
    items = list(tokenizers.items())
    problems = []
    for name, tokenizer in items[1:]:
        differences = _tokenizer_differences(items[0][0], items[0][1], name, tokenizer)
        if differences:
            problems.append(f"{items[0][0]} vs {name}: " + "; ".join(differences))
    if problems:
        raise TokenizerMismatch("the tokenizers differ, so token ids would not mean the same to every model: "
                                + " | ".join(problems))


def _special(tokenizer: PreTrainedTokenizerBase, kind: str) -> str:
    token_id = getattr(tokenizer, f"{kind}_token_id", None)
    if token_id is None:
        return "none"
    return f"{getattr(tokenizer, f'{kind}_token')!r} (id {token_id})"


def _tokenizer_differences(name_a: str, a: PreTrainedTokenizerBase, name_b: str, b: PreTrainedTokenizerBase) -> list[str]:
    differences = []
    if len(a) != len(b):
        differences.append(f"vocab sizes {len(a)} vs {len(b)}")
    specials = [
        f"{kind} {_special(a, kind)} vs {_special(b, kind)}"
        for kind in SPECIAL_TOKENS
        if getattr(a, f"{kind}_token_id", None) != getattr(b, f"{kind}_token_id", None)
    ]
    if specials:
        differences.append("special tokens differ: " + ", ".join(specials))
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if vocab_a != vocab_b:
        moved = sorted((t for t in vocab_a if t in vocab_b and vocab_a[t] != vocab_b[t]), key=vocab_a.__getitem__)
        if moved:
            sample = ", ".join(f"{t!r}: {vocab_a[t]} in {name_a} vs {vocab_b[t]} in {name_b}" for t in moved[:5])
            differences.append(f"{len(moved)} tokens have different ids ({sample})")
        for name, mine, other in ((name_a, vocab_a, vocab_b), (name_b, vocab_b, vocab_a)):
            only = sorted((t for t in mine if t not in other), key=mine.__getitem__)
            if only:
                sample = ", ".join(f"{t!r} (id {mine[t]})" for t in only[:5])
                differences.append(f"{len(only)} tokens only in {name} ({sample})")
    elif isinstance(a, PreTrainedTokenizerFast) and isinstance(b, PreTrainedTokenizerFast):
        rules_a = json.loads(a.backend_tokenizer.to_str())
        rules_b = json.loads(b.backend_tokenizer.to_str())
        changed = [part for part in TOKENIZATION_RULES if rules_a.get(part) != rules_b.get(part)]
        if changed:
            differences.append(f"same vocabulary but different tokenization rules ({', '.join(changed)})")
    return differences


@dataclass(frozen=True)
class SpecialIds:
    prompt_end: int  # appended to every prompt
    eos: int  # ends every response
    pad: int  # fills batches


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    """The ids that frame prompts and responses, for our tokenizer or a pretrained one.

    Rule: the prompt ends with `sep_token` when the tokenizer has one (ours: <sep>), else with
    `eos_token`. For a decoder-only model ("prompt <eos> response <eos>") EOS is the usual
    document boundary (GPT-2's <|endoftext|>), so the response position must come from the prompt
    length, never from searching for the separator id. For an encoder-decoder model the prompt is
    the encoder input and needs no separator; ending it with EOS is what T5's tokenizer does to
    every input, so T5 checkpoints see inputs as in their training. Padding uses `pad_token`, else
    EOS (attention masks, not the id, exclude padding). A tokenizer without EOS is an error.
    """
    if tokenizer.eos_token_id is None:
        raise TaskError(
            f"the tokenizer {type(tokenizer).__name__} has no eos_token, so responses cannot end: "
            "set one (tokenizer.eos_token = ...) and save it with the models"
        )
    eos = tokenizer.eos_token_id
    sep = tokenizer.sep_token_id
    pad = tokenizer.pad_token_id
    return SpecialIds(prompt_end=eos if sep is None else sep, eos=eos, pad=eos if pad is None else pad)


def truncation_report(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_len: int) -> tuple[int, int]:
    """(prompts that `encode_prompts` would cut at `max_len`, prompts): a prompt keeps at most
    `max_len` - 1 tokens, as one more ends it. Raises `TaskError` when every prompt would be cut,
    since then no model sees a whole prompt: `max_len` is wrong for the task.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (one token plus SEP or EOS), got {max_len}")
    lengths: list[int] = []
    for start in range(0, len(prompts), 1000):
        batch = list(prompts[start : start + 1000])
        lengths += [len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]]
    truncated = sum(length > max_len - 1 for length in lengths)
    if lengths and truncated == len(lengths):
        raise TaskError(
            f"all {truncated} prompts are longer than {max_len - 1} tokens (max_len {max_len} less the token "
            f"that ends a prompt; the shortest has {min(lengths)}, the median {sorted(lengths)[len(lengths) // 2]}): "
            "raise the maximum prompt length"
        )
    return truncated, len(lengths)


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


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_len: int) -> list[list[int]]:
    """Prompt tokens then SEP, which marks where the response starts; a long prompt keeps its start.

    A pretrained tokenizer without SEP ends prompts with EOS instead (see `special_ids`).
    """
    encoded = _encode(tokenizer, prompts, max_len - 1)
    end = special_ids(tokenizer).prompt_end if encoded else None
    return [ids + [end] for ids in encoded]


def encode_responses(
    tokenizer: PreTrainedTokenizerBase, responses: Sequence[str], max_len: int
) -> list[list[int]]:
    """Response tokens then EOS, so models learn to stop; a long response keeps its start."""
    encoded = _encode(tokenizer, responses, max_len - 1)
    end = special_ids(tokenizer).eos if encoded else None
    return [ids + [end] for ids in encoded]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], limit: int) -> list[list[int]]:
    if limit < 1:
        raise ValueError(f"max_len must be at least 2 (one token plus SEP or EOS), got {limit + 1}")
    if not texts:
        return []
    return [ids[:limit] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
