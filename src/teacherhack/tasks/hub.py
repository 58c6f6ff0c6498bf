"""Tasks read through Hugging Face `datasets` or from local data files: the paper's tasks (XSum,
WMT-14 en→de, Natural Instructions; `TASK_FORMATS` gives each one's fields and prompt template) and
any dataset with a prompt and a response field (`hf:NAME_OR_PATH`, or a bare .jsonl/.json/.csv/.tsv/
.parquet path)."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
import re
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from teacherhack.tasks.base import (
    BLANK_PAIR,
    BLANK_PROMPT,
    BUILTIN_TASKS,
    TASK_SPECS,
    Pair,
    Task,
    TaskError,
    decode_utf8,
    no_field_overrides,
    numbered_lines,
    sample_indices,
    valid_text,
)

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
# the compressions `datasets` reads a data file through: the standard library's are read here too, the others refused
DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {".gz": gzip.decompress, ".bz2": bz2.decompress,
                                                   ".xz": lzma.decompress}
COMPRESSIONS = (*DECOMPRESS, ".zst", ".lz4")
DATA_NAMES = tuple(suffix + compression for suffix in LOCAL_SUFFIXES for compression in ("", *COMPRESSIONS))
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


def load_records(
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
) -> Task:
    """Resolve a datasets-backed spec to (format, location) and turn its records into pairs."""
    name, colon, location = spec.partition(":")
    if name in TASK_FORMATS:
        no_field_overrides(spec, prompt_field, response_field)
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
    labels: list[str] | None = None  # where each row is in its file ("line 4"), for error messages; else "row N"

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


def absolute_location(spec: str) -> str:
    """A `load_records` spec with its location made absolute (see `absolute_path`) where it is a local path, as
    `_looks_local` tells: a hub id (OWNER/NAME) stays as it is, unless a folder of that name exists here."""
    name, colon, location = spec.partition(":")
    if name in TASK_FORMATS or name == "hf" and colon:
        return f"{name}:{absolute_path(location)}" if location and _looks_local(location) else spec
    return absolute_path(spec) if spec.lower().endswith(LOCAL_SUFFIXES) else spec


def absolute_path(path: str) -> str:
    """``path`` absolute, ``~`` expanded and links resolved: the same file from any working directory."""
    return str(Path(path).expanduser().resolve())


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
        files = _split_files(path, config, split, cache_dir / "hf-datasets")
        if files and all(_file_kind(file)[0] != ".parquet" for file in files):  # read as each file alone is
            rows, labels = [], []
            for file in files:
                file_rows, file_labels = _read_file(file)
                rows += file_rows
                name = file.resolve().relative_to(path.resolve()).as_posix()  # `datasets` names it absolute
                labels += [f"{name}, {label}" for label in file_labels or
                           (f"row {number}" for number in range(1, len(file_rows) + 1))]
            return _Source(str(path), rows, labels)
        return _load_dataset(str(path), config, split, where=str(path), task_name=task_name, fmt=fmt,
                             cache_dir=cache_dir / "hf-datasets")
    rows, labels = _read_file(path)
    return _Source(str(path), rows, labels)


def _file_kind(path: Path) -> tuple[str, str]:
    """A data file's format and compression, by its name: (".csv", ".gz") for train.csv.gz, ("", "") if neither is
    known."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    name = name.removesuffix(compression)
    return next((suffix for suffix in LOCAL_SUFFIXES if name.endswith(suffix)), ""), compression


def _read_file(path: Path) -> tuple[list[dict], list[str] | None]:
    """The records of one data file, decompressed first where its name says so, and where each is in the file ("line
    4"; None where the rows are named "row N"). Tables' values are all text."""
    suffix, compression = _file_kind(path)
    if not suffix or compression and suffix == ".parquet":
        raise TaskError(f"{path}: unknown data format {''.join(path.suffixes) or '(no suffix)'}; "
                        f"expected a folder or one of {', '.join(LOCAL_SUFFIXES)} (.csv.gz and the like for text)")
    if compression and compression not in DECOMPRESS:
        raise TaskError(f"{path}: cannot read {compression} compression; decompress it first "
                        f"(or compress it with {', '.join(DECOMPRESS)})")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet

            return pyarrow.parquet.read_table(path).to_pylist(), None
        data = path.read_bytes()
        if compression:
            data = DECOMPRESS[compression](data)
        if suffix in (".jsonl", ".json"):
            return _read_json_records(data, path)
        return _read_table(data, path, tsv=suffix == ".tsv"), None
    except TaskError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, ValueError, lzma.LZMAError) as error:  # pyarrow's are ValueErrors
        raise TaskError(f"cannot read {path} as {suffix.lstrip('.').upper()}{compression}: {error}") from None


def _split_files(folder: Path, config: str | None, split: str, cache_dir: Path) -> list[Path]:
    """The files that `datasets` takes for ``split`` of ``folder``, to be read as each file alone is (`_read_file`):
    `datasets` reads tables with pandas, which merges rows at a stray quote and makes the texts NA, null and nan
    missing, and JSON with pyarrow, which makes date-like texts timestamps and names no line of an error. Empty
    where `datasets` cannot resolve the split: then `_load_dataset` meets the same failure and words it.

    `datasets` reads one format of a folder (its most common) and, where some files are named for splits, only
    those: a folder with any other data file is refused, naming it, so that no file's rows are left out unsaid."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(folder), config, cache_dir=str(cache_dir))
    except Exception:  # noqa: BLE001 - `_load_dataset` meets the same failure and words it
        return []
    splits = {str(name): [Path(file) for file in files] for name, files in (builder.config.data_files or {}).items()}
    taken = {file.resolve() for files in splits.values() for file in files}
    formats = sorted({_file_kind(file)[0] for file in taken})
    left = [file for file in _data_files(folder) if file.resolve() not in taken]
    if left:
        reasons = {file.relative_to(folder).as_posix(): "named for no split" if _file_kind(file)[0] in formats
                   else "another format" for file in left}
        raise TaskError(
            f"{folder}: `datasets` would read only its {'/'.join(formats)} files, as the split(s) "
            f"{', '.join(splits)}, leaving out {', '.join(f'{name} ({why})' for name, why in reasons.items())}; keep "
            f"one format in a folder and name every file for its split (train*, validation*, test*), or name a file "
            f"itself as the task (hf:PATH/FILE)")
    return splits.get(split, [])


def _data_files(folder: Path) -> list[Path]:
    """The data files under ``folder`` that `datasets` could read, compressed or not: not hidden, not its own
    metadata."""
    return sorted(p for p in folder.rglob("*") if p.name.lower().endswith(DATA_NAMES) and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                  and p.name not in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _read_table(data: bytes, path: Path, *, tsv: bool) -> list[dict]:
    """The rows of a CSV or a TSV, quoted as Python's csv module and pandas write them (a quoted field may hold the
    delimiter, quotes and newlines).

    A field that starts with a quote but is not quoted so (a raw TSV's `"Hello`, or `"Hi," he said.`) is refused at
    the line where it starts: csv, pandas and `datasets` read it on to the next quote, merging rows, or drop its
    quotes. Reading such a file raw instead would be a guess: a raw `"Hi"` and a quoted one are the same bytes.
    """
    text = decode_utf8(data, str(path))
    delimiter = "\t" if tsv else ","
    read: list[str] = []  # the lines read since the last row (with a blank line before it, and the header first)

    def kept(lines: Iterable[str]) -> Iterator[str]:
        for line in lines:
            read.append(line)
            yield line

    reader = csv.DictReader(kept(io.StringIO(text, newline="")), delimiter=delimiter, strict=True)
    limit = csv.field_size_limit(sys.maxsize)  # a long document is a field like any other (csv's default: 128 KiB)
    rows = []
    try:
        header = reader.fieldnames or []
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:  # a row would keep only the last of its values
            raise TaskError(f"{path}, line {reader.line_num}: the header names the column(s) "
                            f"{', '.join(map(repr, repeated))} more than once; give each column its own name")
        for row in reader:
            if None in row:  # DictReader's key for the values beyond the header's columns
                raise TaskError(f"{path}, line {reader.line_num}: {len(row[None])} more value(s) than the "
                                f"header's {len(reader.fieldnames or [])} columns (an unquoted comma or tab?)")
            if None in row.values():  # fewer values, which csv never writes: a blank side, unless a stray quote
                line = _stray_quote_line(read, reader.line_num, delimiter, spans_lines=True)
                if line is not None:
                    values = sum(value is not None for value in row.values())
                    raise _stray_quote(path, line, f"and runs on to line {reader.line_num}, where its row ends "
                                                   f"with {values} of the header's {len(row)} values", delimiter)
            rows.append(dict(row))
            read.clear()
    except csv.Error as error:
        last = reader.reader.line_num  # the DictReader's own count is its last row's
        line = _stray_quote_line(read, last, delimiter)
        if line is not None:
            raise _stray_quote(path, line, "that no quote closes as csv closes one (a quote, then "
                                           f"{'a tab' if tsv else 'a comma'} or the line's end)", delimiter) from None
        kind = "TSV" if tsv else "CSV"
        raise TaskError(f"{path}, line {last}: cannot read it as {kind}: {error}") from None
    finally:
        csv.field_size_limit(limit)
    return rows


def _stray_quote_line(lines: list[str], last: int, delimiter: str, *, spans_lines: bool = False) -> int | None:
    """The line number where, in ``lines`` (CSV from a row's start on, ending at line ``last``), the first field
    opens with a quote that no quote closes as csv writes them (a quote, then the delimiter, a line's end or the
    end of the text), or with ``spans_lines`` the first quoted field that holds a line break; None if none does."""
    region = "".join(lines)
    separators = re.escape(delimiter) + r"\r\n"
    quoted, unquoted = re.compile(rf'"(?:[^"]|"")*"(?=[{separators}]|\Z)'), re.compile(rf"[^{separators}]*")
    position = 0
    while position < len(region):
        if region[position] == '"':
            field = quoted.match(region, position)
            if field is None or spans_lines and re.search(r"[\r\n]", field.group()):
                # csv's line numbers: \r, \n and \r\n each end a line
                return last - len(lines) + 1 + len(re.findall(r"\r\n|\r|\n", region[:position]))
            position = field.end()
        else:
            position = unquoted.match(region, position).end()
        position += 1  # the separator after the field
    return None


def _stray_quote(path: Path, line: int, why: str, delimiter: str) -> TaskError:
    """A field that starts with a quote but is not quoted as csv writes it: what to do, for a raw file or a quoted
    one."""
    return TaskError(
        f"{path}, line {line}: a field starts with a quote {why}: it is not quoted as csv writes it, so the rows from "
        f"there on cannot be read as written. If the file's quotes are part of its text (it is not quoted), convert "
        f"it to JSON Lines: pandas.read_csv({str(path)!r}, sep={delimiter!r}, quoting=csv.QUOTE_NONE, dtype=str, "
        f"keep_default_na=False).to_json({str(path.with_suffix('.jsonl'))!r}, orient='records', lines=True, "
        f"force_ascii=False); if it is quoted, quote that field as csv does (all of it in quotes, each quote inside "
        f"doubled)")


def _read_json_records(data: bytes, path: Path) -> tuple[list[dict], list[str]]:
    """A JSON array of objects, or JSON Lines (one object a line, blank lines skipped), and where each is ("line 4",
    "item 2")."""
    text = decode_utf8(data, str(path))
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise TaskError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
        numbered = list(enumerate(records, start=1))
        where = "item"
    else:
        numbered = []
        for number, line in numbered_lines(text):
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
    return [record for _, record in numbered], [f"{where} {number}" for number, _ in numbered]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (`HF_ENDPOINT`) opens within `timeout` seconds.

    `datasets` retries an unreachable hub for about 25 s before it gives up (transformers, for a model, about
    33 s); this answers at once. Behind a proxy the direct connection says nothing, so the answer is yes and the
    library decides. Used for hub datasets here and for hub models by `teacherhack.preflight`.
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
                      with_response: bool) -> Task:
    """The pairs of `source` (at most `limit`, drawn before blank rows are dropped, so a slice of a sorted
    corpus is still varied); rows with a blank required field are counted in `skipped`."""
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
    keep = sample_indices(len(rows), limit, seed)
    if keep is not None:
        rows = [rows[i] for i in keep] if isinstance(rows, list) else rows.select(keep)
    if not isinstance(rows, list):
        top = list(dict.fromkeys(c if c in rows.column_names else c.partition(".")[0] for c in chosen.values()))
        rows = rows.select_columns(top).to_list()
    pairs = []
    blank = 0
    places = range(len(source)) if keep is None else keep  # the source's own rows, named as its file numbers them
    labels = [source.labels[i] if source.labels else f"row {i + 1}" for i in places]
    for label, row in zip(labels, rows):
        values: dict[str, str] = {}
        for slot, field in chosen.items():
            value = _get(row, field)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise TaskError(f"{source.where}, {label}: field {field!r} holds {type(value).__name__}, not text")
            values[slot] = valid_text(value, f"{source.where}, {label}", field)
        required = [slot for slot in chosen if slot not in fmt.optional]
        if all(values[slot].strip() for slot in required):
            pairs.append(Pair(fmt.prompt(values), values.get(fmt.response, "")))
        else:
            blank += 1
    if not pairs:
        wanted = " and ".join(repr(chosen[slot]) for slot in chosen if slot not in fmt.optional)
        raise TaskError(f"{source.where}: none of its {len(rows)} rows has a non-empty {wanted}")
    return Task(pairs, {BLANK_PAIR if with_response else BLANK_PROMPT: blank} if blank else {}, source.where)
