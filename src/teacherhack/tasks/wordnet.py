"""The built-in instruction-style task "wordnet": "Define: WORD (POS)" → the WordNet 3.0 definition,
from Debian's `wordnet-base` package."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from teacherhack.tasks import debian
from teacherhack.tasks.base import Pair, Task, TaskError
from teacherhack.tasks.snapshot import build_once

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


def load_wordnet(cache_dir: Path) -> Task:
    """Definitions from WordNet 3.0 (Debian's `wordnet-base`): "Define: WORD (POS)" → definition.

    Built once with `apt-get download` and `dpkg-deb -x`, parsed with `wordnet_pairs`, and then read
    from the snapshot `tasks/wordnet.jsonl`.
    """

    def build(work: Path) -> list[Pair]:
        debian.fetch_debs(WORDNET_PACKAGES, work, task="wordnet")
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
