"""Everything fetched from Debian's archive, with apt and dpkg and without root: packages for the
built-in tasks' text (`fetch_debs`) and the archive metadata with package descriptions
(`fetch_archive_metadata`). Each failure says what to do, including how to do without Debian."""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path

from teacherhack.tasks.base import TaskError

# The index files that hold descriptions, as `apt-get update` names them in its lists folder
# (e.g. deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en), possibly compressed.
_DESCRIPTION_INDEX = re.compile(r"_(?:Packages|i18n_Translation-en)(?:\.(?:gz|xz|bz2|lzma|lz4|zst))?$")


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
