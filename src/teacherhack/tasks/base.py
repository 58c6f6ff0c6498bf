"""The types every task loader shares, deterministic sampling and splitting, and UTF-8 decoding that
says where a bad byte is."""

from __future__ import annotations

import dataclasses
import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from teacherhack.errors import UserError

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
BUILTIN_TASKS = ("kjv-rv", "debian-descriptions", "wordnet")  # from Debian's archive, no hub
BLANK_PAIR = "blank prompt or response"  # `Task.skipped` reasons, shared by every loader
BLANK_PROMPT = "blank prompt"


class TaskError(UserError, ValueError):
    """A task cannot be loaded or split; the message says what to do about it."""


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str


@dataclass(frozen=True)
class Task:
    """Loaded pairs with what loading dropped, so that no row disappears without a word."""

    pairs: list[Pair]
    skipped: dict[str, int]  # reason → rows dropped while loading; empty when none were
    source: str  # where the pairs came from, for messages


@dataclass(frozen=True)
class Splits:
    """Disjoint (by prompt) parts of a task. Whole pairs are kept: the real responses of every part
    are there for whoever needs them (e.g. reference answers for the held-out prompts)."""

    oracle_train: list[Pair]  # real pairs the oracle trains on
    stage1: list[Pair]  # the oracle samples on these prompts; teacher and student SFT on those samples
    distill: list[Pair]  # stage-2 distillation pool
    validation: list[Pair]  # held-out prompts for proxy/golden metrics
    duplicates: int  # pairs dropped because their prompt repeats an earlier pair's

    @property
    def stage1_prompts(self) -> list[str]:
        return [pair.prompt for pair in self.stage1]

    @property
    def distill_prompts(self) -> list[str]:
        return [pair.prompt for pair in self.distill]

    @property
    def validation_prompts(self) -> list[str]:
        return [pair.prompt for pair in self.validation]


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

    Splits are disjoint by prompt, so no metric is measured on a prompt any model trained on; a
    repeated prompt keeps its first pair and counts in `Splits.duplicates`. The order of carving
    keeps validation fixed when only later counts change. Without `n_oracle`, the oracle takes every
    remaining pair (at least one). A shortfall names the `task.*` settings to lower.
    """
    counts = {"n_stage1": n_stage1, "n_distill": n_distill, "n_validation": n_validation, "n_oracle": n_oracle}
    negative = [f"{name}={count}" for name, count in counts.items() if count is not None and count < 0]
    if negative:
        raise TaskError(f"split sizes must not be negative: {', '.join(negative)}")
    first: dict[str, Pair] = {}
    for pair in pairs:
        first.setdefault(pair.prompt, pair)
    unique = list(first.values())
    duplicates = len(pairs) - len(unique)
    random.Random(seed).shuffle(unique)
    needed = n_validation + n_distill + n_stage1 + (1 if n_oracle is None else n_oracle)
    if needed > len(unique):
        oracle = "at least 1 for the oracle" if n_oracle is None else f"task.n_oracle={n_oracle}"
        lower = ("task.n_stage1 or task.n_distill" if n_oracle is None
                 else "task.n_oracle, task.n_stage1 or task.n_distill")
        repeats = f" ({duplicates:,} more repeat an earlier prompt)" if duplicates else ""
        raise TaskError(
            f"the splits need {needed:,} pairs with distinct prompts (task.n_validation={n_validation} + "
            f"task.n_distill={n_distill} + task.n_stage1={n_stage1} + {oracle}) but the task has "
            f"{len(unique):,}{repeats}: lower {lower} (or task.n_validation), or use a larger data set"
        )
    validation, rest = unique[:n_validation], unique[n_validation:]
    distill, rest = rest[:n_distill], rest[n_distill:]
    stage1, rest = rest[:n_stage1], rest[n_stage1:]
    return Splits(oracle_train=rest if n_oracle is None else rest[:n_oracle], stage1=stage1, distill=distill,
                  validation=validation, duplicates=duplicates)


def no_field_overrides(spec: str, prompt_field: str | None, response_field: str | None) -> None:
    """Refuse field names for tasks whose fields are fixed, rather than ignore them."""
    if prompt_field is not None or response_field is not None:
        raise TaskError(
            f"prompt_field and response_field apply to hf:, jsonl: and file specs; the task {spec!r} "
            "has fixed fields (see TASK_FORMATS)"
        )


def sample_task(task: Task, limit: int | None, seed: int) -> Task:
    """`task` with at most `limit` of its pairs (see `sample_indices`); its skip counts are kept."""
    keep = sample_indices(len(task.pairs), limit, seed)
    return task if keep is None else dataclasses.replace(task, pairs=[task.pairs[i] for i in keep])


def sample_indices(size: int, limit: int | None, seed: int) -> list[int] | None:
    """Sorted indices of a `seed`-fixed sample of `limit` out of `size`, so a slice of a sorted corpus is
    still varied and keeps its order; None to keep everything."""
    if limit is not None and limit < 1:
        raise TaskError(f"limit must be at least 1, got {limit}")
    if limit is None or limit >= size:
        return None
    return sorted(random.Random(seed).sample(range(size), limit))


def decode_utf8(raw: bytes, where: str) -> str:
    """`raw` as text; a byte that is not UTF-8 is a `TaskError` naming `where`, its line and column,
    so the user can find it in an editor (a bare UnicodeDecodeError gives only a file offset)."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark (Excel's "CSV UTF-8") is not text
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - raw.rfind(b"\n", 0, error.start)
        raise TaskError(
            f"{where}, line {line}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None


def valid_text(value: str, where: str, field: str) -> str:
    """``value``, which JSON may hold as a lone surrogate (``"\\ud800"``) that no UTF-8 text can: refused here, with
    where it came from, rather than as a UnicodeEncodeError where the pairs are hashed or tokenized."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise TaskError(f"{where}: field {field!r} holds an unpaired surrogate ({value[error.start]!a}), which is not "
                        f"text; fix the escape in the file") from None
    return value


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) with universal newlines, as a file opened in text mode gives them: unlike
    `str.splitlines`, a U+2028 inside a JSON string (which `json.dumps(ensure_ascii=False)` writes
    as is) does not end a line."""
    return enumerate(io.StringIO(text, newline=None), start=1)
