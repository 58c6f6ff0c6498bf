"""Tasks: real prompt→response pairs, and disjoint splits of them.

The oracle must learn a real distribution, so tasks are real text. Three built-in tasks need no hub,
one for each kind of task in the paper, all from Debian's archive:
- "kjv-rv" (translation): Debian carries two public-domain Bibles with the same versification, so
  verse i of the King James Version and verse i of the Reina-Valera 1909 form an English→Spanish pair.
  Its pairs ship with the package (`kjv_rv`), so it needs neither apt nor a network.
- "debian-descriptions" (summarisation, XSum-like): a package's long description → its one-line
  synopsis, from the archive metadata that `apt-get update` fetches.
- "wordnet" (instruction-style generation): "Define: WORD (POS)" → the WordNet 3.0 definition.
The last two are built once with apt and then read from a snapshot with a checksum (`snapshot`).

The paper's tasks (XSum, WMT-14 en→de, Natural Instructions) load through Hugging Face `datasets`,
from the hub or from a local copy (`hub`). Spec grammar (`load_task`):
- "kjv-rv", "debian-descriptions", "wordnet": the built-in tasks above.
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
(used whole; `split` is ignored, as it is for the built-in tasks and "jsonl:PATH"). A field may name
a key inside a dict column with a dot ("translation.en").

No row of a data set is dropped silently: a loaded `Task` counts the rows it skipped, by reason, and
`Splits` counts the pairs whose prompt repeats. (What a built-in task's parser leaves out, such as
verses missing from one translation, is part of that task's definition, documented with the parser.)
"""

from __future__ import annotations

from pathlib import Path

from teacherhack.tasks.base import (
    BUILTIN_TASKS,
    TASK_SPECS,
    Pair,
    Splits,
    Task,
    TaskError,
    no_field_overrides,
    sample_task,
    split_task,
)
from teacherhack.tasks.debian_descriptions import load_debian_descriptions
from teacherhack.tasks.hub import TASK_FORMATS, absolute_location, absolute_path, load_records
from teacherhack.tasks.kjv_rv import load_kjv_rv
from teacherhack.tasks.snapshot import load_jsonl
from teacherhack.tasks.wordnet import load_wordnet

__all__ = [
    "BUILTIN_TASKS",
    "TASK_FORMATS",
    "TASK_SPECS",
    "Pair",
    "Splits",
    "Task",
    "TaskError",
    "absolute_path",
    "absolute_spec",
    "load_prompts",
    "load_task",
    "split_task",
]


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
) -> Task:
    """The prompt→response pairs named by `spec` (see the module docstring for the grammar).

    `cache_dir` holds the snapshots of the apt-built tasks and the `datasets` cache of local
    folders. Rows with a blank prompt or response are dropped and counted in `Task.skipped`;
    `limit` keeps a random sample (fixed by `seed`) of at most that many pairs, in their order
    (for datasets-backed specs drawn before blank rows are dropped).
    """
    if spec in BUILTIN_TASKS:
        no_field_overrides(spec, prompt_field, response_field)
        return sample_task(_load_builtin(spec, Path(cache_dir)), limit, seed)
    if (prompt_field or "prompt") == (response_field or "response"):  # every response would copy its prompt
        raise TaskError(f"prompt_field and response_field are both {prompt_field or 'prompt'!r}: "
                        "name two different fields")
    if spec.startswith("jsonl:"):
        task = load_jsonl(Path(spec.removeprefix("jsonl:")), prompt_field or "prompt", response_field or "response")
        return sample_task(task, limit, seed)
    return load_records(spec, Path(cache_dir), split=split, prompt_field=prompt_field, response_field=response_field,
                        config=config, limit=limit, seed=seed, with_response=True)


def absolute_spec(spec: str) -> str:
    """`spec` with the local path it names made absolute (`~` expanded, links resolved), so that it names the same
    data from any working directory; a built-in task or a hub dataset stays as it is."""
    if spec in BUILTIN_TASKS:
        return spec
    if spec.startswith("jsonl:"):
        path = spec.removeprefix("jsonl:")
        return f"jsonl:{absolute_path(path)}" if path else spec
    return absolute_location(spec)


def load_prompts(
    spec: str,
    cache_dir: Path,
    *,
    split: str = "train",
    prompt_field: str | None = None,
    config: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> Task:
    """The prompts of `spec` (same grammar and options as `load_task`), for data without responses.

    Responses are only needed to train the oracle: stage 2 and evaluation need prompts alone, so
    here the response field is not read and may be missing or blank (e.g. a test split whose
    targets are hidden, or a prompt-only file {"prompt": ...} a line): the pairs' responses are
    blank, except for the built-in tasks, whose pairs are whole. Templates are applied as in
    `load_task`; rows with a blank prompt are counted in `Task.skipped`.
    """
    if spec in BUILTIN_TASKS:
        no_field_overrides(spec, prompt_field, None)
        return sample_task(_load_builtin(spec, Path(cache_dir)), limit, seed)
    if spec.startswith("jsonl:"):
        spec = "hf:" + spec.removeprefix("jsonl:")
        prompt_field = prompt_field or "prompt"
    return load_records(spec, Path(cache_dir), split=split, prompt_field=prompt_field, response_field=None,
                        config=config, limit=limit, seed=seed, with_response=False)


def _load_builtin(spec: str, cache_dir: Path) -> Task:
    """The pairs of a built-in task (one of `BUILTIN_TASKS`)."""
    if spec == "kjv-rv":
        return load_kjv_rv()
    if spec == "debian-descriptions":
        return load_debian_descriptions(cache_dir)
    return load_wordnet(cache_dir)
