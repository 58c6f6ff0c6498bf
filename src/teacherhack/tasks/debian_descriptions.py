"""The built-in summarisation task "debian-descriptions" (XSum-like): a package's long description →
its one-line synopsis, from the archive metadata that `apt-get update` fetches."""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from teacherhack.tasks import debian
from teacherhack.tasks.base import Pair, Task, TaskError
from teacherhack.tasks.snapshot import build_once

DESCRIPTION_MIN_WORDS = 10  # shorter long descriptions are barely longer than their synopsis
DESCRIPTION_FIELDS = ("Description", "Description-en")  # Packages files / Translation-en files
_BULLET = re.compile(r"(?:[*+\-o•]|\d{1,2}[.)])\s")


def load_debian_descriptions(cache_dir: Path) -> Task:
    """Summaries from Debian's archive metadata: a package's long description → its synopsis.

    Built once with `apt-get update` into a private folder (`fetch_archive_metadata`, with the
    machine's own apt sources and English descriptions), parsed with `description_pairs`, and then
    read from the snapshot `tasks/debian-descriptions.jsonl`. The archive metadata changes whenever
    the archive does (new package versions, point releases, security updates), so a rebuild later
    gives somewhat different pairs: the snapshot, with its checksum, is what makes reruns
    reproducible. Keep it (or copy it with the results) to repeat an experiment.
    """

    def build(work: Path) -> list[Pair]:
        lists = debian.fetch_archive_metadata(work)
        return description_pairs(_read_index(path) for path in debian.description_indices(lists))

    return build_once(Path(cache_dir), "debian-descriptions", build)


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
