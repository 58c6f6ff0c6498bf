"""The artifact cache: every upstream stage's output, stored once under a key derived from all it depends on.

An artifact lives in ``ROOT/artifacts/NAME-KEY`` (``spec.json`` inside records what the key hashes). It is
built in a temporary folder and renamed into place, so a killed build leaves no artifact, only a temporary
folder that the next run removes (:meth:`ArtifactCache.clean`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from teacherhack import distributed

TMP_MARK = ".tmp-"


def default_cache_dir() -> Path:
    """``$TEACHERHACK_CACHE``, else ``~/.cache/teacherhack``: artifacts outlive the runs that made them."""
    return Path(os.environ.get("TEACHERHACK_CACHE") or Path.home() / ".cache" / "teacherhack").expanduser()


@dataclass
class ArtifactCache:
    root: Path
    events: dict[str, str] = field(default_factory=dict)  # stage → "built" | "reused"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def get(self, stage: str, name: str, spec: dict[str, Any], build: Callable[[Path], None], *,
            collective: bool = False) -> Path:
        """The artifact ``name`` (``KIND-KEY``), built first if missing. Under several processes a ``collective``
        build (training) runs on every process and the main one keeps its result; any other build runs on the
        main process alone while the others wait. Two commands that share the cache take turns: the main process
        holds ``ROOT/locks/NAME.lock`` while it looks for the artifact and builds it, so the second finds the first's
        artifact instead of building it again over it."""
        path = self.artifacts / name
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.root / "locks" / f"{name}.lock")
        if distributed.is_main():  # the lock is released by the operating system if its process dies
            try:
                lock.acquire(timeout=0)
            except Timeout:
                distributed.log(f"{stage}: another process is building {name}; waiting for it")
                lock.acquire()
        try:
            distributed.barrier()  # every process looks only once the main one holds the lock: they agree
            if (path / "spec.json").exists():
                self.events[stage] = "reused"
                return path
            tmp = path.with_name(f"{path.name}{TMP_MARK}{_owner()}")
            if collective or distributed.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                try:
                    build(tmp)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)  # a failed or interrupted build leaves nothing
                    raise
            distributed.barrier()
            if distributed.is_main():
                (tmp / "spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True, default=str))
                shutil.rmtree(path, ignore_errors=True)  # a folder without spec.json: never a finished artifact
                tmp.rename(path)
            elif collective:
                shutil.rmtree(tmp, ignore_errors=True)
            distributed.barrier()
            self.events[stage] = "built"
            return path
        finally:
            if distributed.is_main():
                lock.release()

    def clean(self) -> list[Path]:
        """Remove the temporary folders left by builds of this machine whose process was killed; return them.
        (A build that fails with an exception removes its own.)"""
        removed = []
        host = socket.gethostname()
        for tmp in self.artifacts.glob(f"*{TMP_MARK}*") if self.artifacts.is_dir() else ():
            owner_host, _, pid = tmp.name.rsplit(TMP_MARK, 1)[1].rpartition("-")
            if owner_host == host and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        return removed


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
