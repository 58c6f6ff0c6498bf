"""The built-in translation task "kjv-rv": English→Spanish Bible verses, shipped with the package.

Debian carries two public-domain Bibles with the same versification, so verse i of the King James
Version and verse i of the Reina-Valera 1909 form a pair. The pairs are built from Debian's
`sword-text-kjv` and `sword-text-sparv` packages (`rebuild_kjv_rv`) and shipped, xz-compressed, as
`data/kjv-rv.jsonl.xz` with the sha256 of the uncompressed JSON Lines: loading needs no apt (macOS,
conda), and every machine reads the same pairs in the same order.
"""

from __future__ import annotations

import html
import lzma
import re
import struct
import tempfile
import zlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from teacherhack.tasks import debian
from teacherhack.tasks.base import Pair, Task, TaskError, decode_utf8
from teacherhack.tasks.snapshot import checksum_matches, parse_jsonl, sha256, write_jsonl

KJV_RV_PACKAGES = ("sword-text-kjv", "sword-text-sparv")
ZTEXT_ROOT = Path("usr/share/sword/modules/texts/ztext")
KJV_MODULE, RV_MODULE = "engKJV2006eb", "spaRV1909eb"
SHIPPED_DIR = resources.files(__package__) / "data"  # package data (see pyproject.toml)
SHIPPED_SNAPSHOT, SHIPPED_CHECKSUM = "kjv-rv.jsonl.xz", "kjv-rv.sha256"


def load_kjv_rv() -> Task:
    """The shipped pairs, after checking the sha256 of their uncompressed JSON Lines."""
    raw = lzma.decompress((SHIPPED_DIR / SHIPPED_SNAPSHOT).read_bytes())
    if not checksum_matches(raw, SHIPPED_DIR / SHIPPED_CHECKSUM):
        raise TaskError(
            f"the shipped kjv-rv snapshot {SHIPPED_DIR / SHIPPED_SNAPSHOT} does not match its checksum "
            f"{SHIPPED_DIR / SHIPPED_CHECKSUM}: reinstall teacherhack"
        )
    source = "kjv-rv (shipped snapshot)"
    return parse_jsonl(decode_utf8(raw, source), source)


def rebuild_kjv_rv(work_dir: Path) -> list[Pair]:
    """The pairs built from Debian's packages (`apt-get download` and `dpkg-deb -x` into `work_dir`):
    the way to regenerate the shipped file, with `write_shipped(rebuild_kjv_rv(work), data_dir)`.
    A rebuild from the same package versions gives the shipped sha256 (a test checks it)."""
    debian.fetch_debs(KJV_RV_PACKAGES, Path(work_dir))
    modules = Path(work_dir) / "root" / ZTEXT_ROOT
    return align_verses(parse_ztext(modules / KJV_MODULE), parse_ztext(modules / RV_MODULE))


def write_shipped(pairs: Sequence[Pair], data_dir: Path) -> None:
    """Write `kjv-rv.jsonl.xz` and `kjv-rv.sha256` into `data_dir`: the bytes `write_jsonl` writes,
    compressed, and their sha256 in `sha256sum`'s format."""
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "kjv-rv.jsonl"
        write_jsonl(pairs, staged)
        raw = staged.read_bytes()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / SHIPPED_SNAPSHOT).write_bytes(lzma.compress(raw))
    (data_dir / SHIPPED_CHECKSUM).write_text(f"{sha256(raw)}  kjv-rv.jsonl\n", encoding="utf-8")


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
