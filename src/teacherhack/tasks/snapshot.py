"""JSON Lines pairs and checksummed snapshots: a built-in task is built once, then always read back
from its snapshot, so a later change upstream (a new Debian release) cannot change a run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from teacherhack.tasks.base import BLANK_PAIR, Pair, Task, TaskError, decode_utf8, numbered_lines, valid_text


def load_jsonl(path: Path, prompt_field: str = "prompt", response_field: str = "response") -> Task:
    """The pairs of a JSON Lines file, one {prompt_field, response_field} object a line (see `parse_jsonl`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    return parse_jsonl(decode_utf8(path.read_bytes(), str(path)), str(path), prompt_field, response_field)


def parse_jsonl(text: str, where: str, prompt_field: str = "prompt", response_field: str = "response") -> Task:
    """Pairs from JSON Lines text: malformed lines are errors naming `where` and the line; blank lines
    are ignored; pairs with a blank side teach nothing, so they are dropped and counted in `skipped`."""
    pairs = []
    blank = 0
    for number, line in numbered_lines(text):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TaskError(f"{where}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise TaskError(f"{where}, line {number}: expected a JSON object")
        fields = []
        for field in (prompt_field, response_field):
            if not isinstance(record.get(field), str):
                raise TaskError(f"{where}, line {number}: field {field!r} is missing or not a string")
            fields.append(valid_text(record[field], f"{where}, line {number}", field))
        if all(value.strip() for value in fields):
            pairs.append(Pair(*fields))
        else:
            blank += 1
    if not pairs:
        raise TaskError(f"{where} holds no pair with a non-empty {prompt_field!r} and {response_field!r}")
    return Task(pairs, {BLANK_PAIR: blank} if blank else {}, where)


def write_jsonl(pairs: Iterable[Pair], path: Path) -> None:
    """Write pairs in the format `load_jsonl` reads (UTF-8, not ASCII-escaped, so it stays readable)."""
    with Path(path).open("w", encoding="utf-8") as out:
        for pair in pairs:
            out.write(json.dumps({"prompt": pair.prompt, "response": pair.response}, ensure_ascii=False) + "\n")


def build_once(cache_dir: Path, name: str, build: Callable[[Path], list[Pair]]) -> Task:
    """The pairs in `cache_dir/tasks/NAME.jsonl` when that snapshot exists (checked against its
    sha256); else `build(work_dir)` in a scratch folder under `tasks/`, snapshotted, and the scratch
    folder (downloads, unpacked files) removed."""
    snapshot = Path(cache_dir) / "tasks" / f"{name}.jsonl"
    checksum = snapshot.with_suffix(".sha256")
    source = f"{name} (snapshot {snapshot})"
    if snapshot.exists():
        return dataclasses.replace(read_snapshot(snapshot, checksum), source=source)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=snapshot.parent, prefix=f"{name}-build-") as work:
        pairs = build(Path(work))
        if not pairs:
            raise TaskError(f"building the {name} task gave no pairs; nothing was snapshotted")
        write_snapshot(pairs, snapshot, checksum, Path(work))
    return Task(pairs, {}, source)


def write_snapshot(pairs: Sequence[Pair], snapshot: Path, checksum: Path, work_dir: Path) -> None:
    """Write the snapshot and its sha256 so that a snapshot never exists without its checksum."""
    staged = work_dir / snapshot.name
    write_jsonl(pairs, staged)
    staged_sum = work_dir / checksum.name
    staged_sum.write_text(f"{sha256(staged.read_bytes())}  {snapshot.name}\n", encoding="utf-8")
    staged_sum.replace(checksum)
    staged.replace(snapshot)


def read_snapshot(snapshot: Path, checksum: Path) -> Task:
    """Read a snapshot after checking it against its sha256, so a damaged one cannot slip into a run."""
    content = snapshot.read_bytes()
    if not checksum_matches(content, checksum):
        raise TaskError(
            f"task snapshot {snapshot} does not match its checksum {checksum}: "
            "delete both files to rebuild it"
        )
    return parse_jsonl(decode_utf8(content, str(snapshot)), str(snapshot))


def checksum_matches(content: bytes, checksum: Path) -> bool:
    """Whether `checksum` exists and its first word is the sha256 of `content` (`sha256sum`'s format)."""
    expected = checksum.read_text(encoding="utf-8").split()[:1] if checksum.is_file() else []
    return expected == [sha256(content)]


def sha256(content: bytes) -> str:
    """The hex digest that `sha256sum` prints, so a checksum file can be checked by hand too."""
    return hashlib.sha256(content).hexdigest()
