"""Where the stage-2 runs of a lab or a sweep execute: in this process, in parallel processes on this machine
(the default), or on a cluster through submitit (SLURM) when a sweep outgrows one machine.

Every engine takes the same jobs and reports each result as it arrives. Work stops being started at the first
failure or Ctrl-C; runs already going finish (a failure) or stop at once (Ctrl-C); every run folder stays
consistent either way, and rerunning the same command resumes.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teacherhack.errors import UserError

ENGINES: tuple[str, ...] = ("local", "submitit")


@dataclass(frozen=True)
class Job:
    """One run: ``fn(*args, **kwargs)``, a top-level function with picklable arguments."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class RunFailed(Exception):
    """A run died in its worker; the message carries the worker's traceback."""


def _died(name: str, exitcode: int) -> Exception:
    """Why a worker ended without a word (no result, no exception): killed by a signal (the OOM killer's SIGKILL,
    ``kill``), the user's one line, since its folder is consistent up to its last checkpoint; any other exit, a bug."""
    if exitcode >= 0:
        return RunFailed(f"run {name} died with exit code {exitcode}")
    try:
        what = signal.Signals(-exitcode).name
    except ValueError:
        what = "an unnamed signal"
    hint = " (out of memory? the kernel's OOM killer sends it)" if -exitcode == signal.SIGKILL else ""
    return UserError(f"run {name} was killed by signal {-exitcode}, {what}{hint}; everything written so far is "
                     f"consistent: rerun the same command to resume it")


def launch(jobs: list[Job], *, parallel: int = 1, engine: str = "local", folder: Path | None = None,
           options: dict[str, str] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, result)`` for each job as it finishes.

    ``local`` with ``parallel`` 1 runs the jobs here, one after the other; with more, each in a fresh process
    (spawned: forking after torch started its threads can hang), at most ``parallel`` at a time. ``submitit``
    submits every job to SLURM (or, with ``options={"cluster": "local"}``, to submitit's local executor) with
    the executor parameters in ``options`` (e.g. slurm_partition=gpu, timeout_min=600, gpus_per_node=1);
    its logs go to ``folder``."""
    if engine == "local":
        yield from _inline(jobs) if parallel <= 1 or len(jobs) <= 1 else _processes(jobs, parallel)
    elif engine == "submitit":
        if folder is None:
            raise ValueError("the submitit engine needs a folder for its logs")
        yield from _submitit(jobs, folder, dict(options or {}))
    else:
        raise UserError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Keep the memory this process frees for its next tensors (glibc's allocator). By default glibc hands large
    buffers back to the kernel when they are freed: those it maps on their own (from 128 KiB, a threshold that follows
    the sizes freed up to 32 MiB; an evaluation's [rows, V] logits are above it) and the free memory piling up at the
    top of its heap (a loss's [320, 2,048] buffers). The next buffer then faults its pages in afresh, zeroed by the
    kernel, at about 1 µs a page: as long as a pass of arithmetic over them. Kept, they are reused. The arithmetic,
    and so every bit, is unchanged; the process keeps its peak memory until it ends, plus the holes that later
    blocks do not fit (BENCHMARKS.md: the default lab's peak RSS 1.26-1.43 against 1.1-1.3 GiB). A buffer grown step
    by step while small tensors stay alive between its copies can leave many such holes; glibc's defaults do the
    same once their threshold has risen.
    Called where teacherhack's work starts: the command line and each launched run. False where the C library has
    no ``mallopt`` or ignores it (macOS, Windows, musl); a preloaded jemalloc or tcmalloc is left as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


_running: Any = None  # in a worker process: the launcher's count of its workers running now (shared memory)


@contextmanager
def idle_cores() -> Iterator[None]:
    """Runs the body on the cores that no other worker of the launcher is using: in a worker, the machine's cores
    divided by the workers running now (all of them once it is the last); elsewhere torch's setting, unchanged.
    Only for work whose result does not depend on the thread count: sampling, which the tests check bit for bit
    (a training step's reductions do depend on it). The lab's online-teacher run, the longest, samples on both
    cores once its siblings are done."""
    import torch  # here: the command line's help must not wait for torch

    before = torch.get_num_threads()
    if _running is not None:
        # the cores this process may run on (macOS has no affinity: all of them)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(before, cores // max(1, _running.value)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inline(jobs: list[Job]) -> Iterator[tuple[str, Any]]:
    for job in jobs:
        yield job.name, job.fn(*job.args, **job.kwargs)


def _child(job: Job, results: Any, running: Any) -> None:
    """A worker process: run one job and send back its result or its exception."""
    global _running
    _running = running
    keep_freed_memory()
    _stop_with_parent()
    # tqdm's default lock holds a named semaphore of this process (it orders nothing across processes); a worker
    # killed with it leaves it to the resource tracker, which warns of a leak at exit. A thread lock does its job.
    from tqdm import tqdm  # the base class: every kind of bar (tqdm.auto's too) takes its lock

    tqdm.set_lock(threading.RLock())
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending Ctrl-C arrives here, inside the try
        results.put((job.name, True, job.fn(*job.args, **job.kwargs)))
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopping already: a second Ctrl-C must not break the exit
        results.put((job.name, False, KeyboardInterrupt()))
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent
        if not isinstance(error, UserError):  # a bug: keep the worker's traceback
            error = RunFailed(f"run {job.name} failed:\n{traceback.format_exc()}")
        results.put((job.name, False, error))


def _stop_with_parent() -> None:
    """In a worker on Linux: a Ctrl-C of its own (a clean, resumable stop) when the launching process dies, even by
    ``kill -9``, so that no orphan goes on training and holding its run folder's lock."""
    parent = multiprocessing.parent_process()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError, TypeError):  # not Linux
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGINT)
    if parent is not None and os.getppid() != parent.pid:  # the parent died before the line above
        os.kill(os.getpid(), signal.SIGINT)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _processes(jobs: list[Job], parallel: int) -> Iterator[tuple[str, Any]]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    count = context.Value("i", 0, lock=False)  # workers running, for idle_cores (written here only)
    waiting, running = list(jobs), {}
    failure: BaseException | None = None
    try:
        while running or (waiting and failure is None):
            while waiting and failure is None and len(running) < parallel:
                job = waiting.pop(0)
                running[job.name] = context.Process(target=_child, args=(job, results, count),
                                                    name=f"teacherhack {job.name}")
                # a Ctrl-C while the worker imports would kill it with a traceback: it starts with SIGINT blocked
                # (pending, not lost) and unblocks it once its job can stop cleanly
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    running[job.name].start()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                count.value = len(running)
            try:
                name, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                for name, process in list(running.items()):
                    if process.exitcode is not None and results.empty():  # died without a word (killed, OOM)
                        time.sleep(0.5)
                        if results.empty():
                            running.pop(name)
                            count.value = len(running)
                            failure = failure or _died(name, process.exitcode)
                continue
            running.pop(name).join()
            count.value = len(running)
            if ok:
                yield name, value
            else:
                failure = failure or value
    except BaseException:
        # Ctrl-C in a terminal reaches the workers too; a worker still going after a moment got none (the signal
        # was sent to this process alone, or the consumer stopped): ask it to stop the same way
        for process in running.values():
            process.join(timeout=5)
            if process.is_alive():
                _interrupt(process)
        for process in running.values():
            process.join()
        raise
    if failure is not None:
        raise failure


def _interrupt(process: Any) -> None:
    """Ask a worker to stop as Ctrl-C would (it raises KeyboardInterrupt; its checkpoints are atomic)."""
    if process.pid is not None:
        try:
            os.kill(process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass


# SLURM's states of a job that has not started: cancelled after a failure, as a local run would not be started
QUEUED = ("PENDING", "REQUEUED", "CONFIGURING", "REQUEUE_HOLD", "REQUEUE_FED")


def _submitit(jobs: list[Job], folder: Path, options: dict[str, str]) -> Iterator[tuple[str, Any]]:
    import submitit

    cluster = options.pop("cluster", None)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**{key: _number(value) for key, value in options.items()})
    submitted = {executor.submit(_run_kept, job.fn, *job.args, **job.kwargs): job.name for job in jobs}
    failure: Exception | None = None
    try:
        while submitted:
            for handle in [h for h in submitted if h.done()]:
                name = submitted.pop(handle)
                try:
                    result = handle.result()  # a failed job raises here with its traceback
                except Exception as error:  # as locally: start no more work, let the runs going finish
                    failure = failure or error
                    for waiting in [h for h in submitted if str(h.state).upper() in QUEUED]:
                        waiting.cancel(check=False)
                        submitted.pop(waiting)
                    continue
                yield name, result
            time.sleep(1.0)
    except BaseException:  # Ctrl-C: stop everything at once
        for handle in submitted:
            handle.cancel(check=False)
        raise
    if failure is not None:
        raise failure


def _run_kept(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A job on a cluster node, in a process of its own: with :func:`keep_freed_memory`, as locally."""
    keep_freed_memory()
    return fn(*args, **kwargs)


def _number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
