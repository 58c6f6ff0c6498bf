"""The local launcher's parallel workers (teacherhack.launch): the cores a worker may sample on, with its siblings
running and once they are done, and the memory a worker keeps for its next tensors."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from teacherhack import cli, launch


def until(condition, wait_s: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + wait_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def threads_shared_then_alone() -> tuple[int, int]:
    """Torch's threads inside ``idle_cores`` while the sibling runs, then once this worker is alone; outside, one
    thread each, as the lab gives parallel runs."""
    torch.set_num_threads(1)
    until(lambda: launch._running.value == 2)
    with launch.idle_cores():
        shared = torch.get_num_threads()
    until(lambda: launch._running.value == 1)
    with launch.idle_cores():
        alone = torch.get_num_threads()
    assert torch.get_num_threads() == 1  # restored after the body
    return shared, alone


def sibling() -> str:
    time.sleep(3.0)
    return "done"


def test_a_worker_samples_on_its_share_of_the_cores_then_on_all_of_them_once_alone():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jobs = [launch.Job("sampler", threads_shared_then_alone), launch.Job("sibling", sibling)]
    results = dict(launch.launch(jobs, parallel=2))
    assert results["sibling"] == "done"
    assert results["sampler"] == (max(1, cores // 2), cores)


def test_outside_a_worker_the_thread_setting_is_left_alone():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with launch.idle_cores():
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")  # glibc >= 2.33
    except (OSError, TypeError):
        return False


def mapped_apart_and_kept() -> tuple[int, int, int]:
    """What glibc does with large blocks: the bytes it maps apart (outside its heap, back to the kernel when freed)
    for a 64 MiB tensor while it lives, then for a 96 MiB block, and the bytes its heap gives back to the kernel
    once that block is freed (trimmed from the heap's top by default, were it there)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2()
    tensor = torch.ones(16 << 20)
    tensor_mapped = libc.mallinfo2().hblkhd - before.hblkhd
    del tensor
    before = libc.mallinfo2()
    block = libc.malloc(96 << 20)
    ctypes.memset(block, 1, 96 << 20)
    during = libc.mallinfo2()
    libc.free(block)
    return tensor_mapped, during.hblkhd - before.hblkhd, during.arena - libc.mallinfo2().arena


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc's allocator (>= 2.33 for mallinfo2)")
def test_workers_keep_the_memory_they_free_where_a_plain_process_returns_it():
    mib = 1 << 20
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:  # glibc's defaults: both mapped apart
        tensor_mapped, block_mapped, _ = pool.apply(mapped_apart_and_kept)
    assert tensor_mapped >= 64 * mib and block_mapped >= 96 * mib
    with context.Pool(1) as pool:  # a job on a cluster node (submitit)
        on_a_node = pool.apply(launch._run_kept, (mapped_apart_and_kept,))
    results = dict(launch.launch([launch.Job("worker", mapped_apart_and_kept), launch.Job("sibling", sibling)],
                                 parallel=2))
    for tensor_mapped, block_mapped, returned in (on_a_node, results["worker"]):
        assert tensor_mapped == 0 and block_mapped == 0 and returned < mib  # both in the heap, and kept there


def test_the_command_line_sets_its_process_up_to_keep_freed_memory(monkeypatch: pytest.MonkeyPatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    assert cli.main(["config"]) == 0 and calls == [True]
    assert "seed:" in capsys.readouterr().out


def writes_after_a_while(marker: str) -> str:
    time.sleep(4.0)
    Path(marker).write_text("done")
    return "finished"


def fails_at_once() -> None:
    raise RuntimeError("this run broke")


@pytest.mark.parametrize("engine", ["local", "submitit"])
def test_a_failing_run_lets_the_runs_going_finish_on_every_engine(engine, tmp_path, monkeypatch):
    """The first failure stops new work; runs already going finish (on a cluster they held hours of work: the
    submitit engine cancelled them), then the failure is raised."""
    if engine == "submitit":
        pytest.importorskip("submitit")
        # its local executor's processes unpickle this module's jobs: they import it from here
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    marker = tmp_path / "marker"
    jobs = [launch.Job("long", writes_after_a_while, (str(marker),)), launch.Job("broken", fails_at_once)]
    options = (dict(folder=tmp_path / "logs", options={"cluster": "local", "timeout_min": "5"})
               if engine == "submitit" else dict(parallel=2))
    finished = []
    with pytest.raises(Exception, match="this run broke"):
        for name, result in launch.launch(jobs, engine=engine, **options):
            finished.append((name, result))
    assert finished == [("long", "finished")] and marker.read_text() == "done"


def killed_after_a_progress_bar() -> None:
    """A run that shows its progress (tqdm), then is killed as the kernel's OOM killer kills."""
    from tqdm.auto import tqdm

    for _ in tqdm(range(2)):
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def exits_without_a_word() -> None:
    os._exit(3)


def test_a_worker_killed_by_a_signal_is_one_line_and_leaks_nothing():
    """A worker killed by SIGKILL (no result, no exception) raised RunFailed, a traceback, and the resource tracker
    warned of the semaphore tqdm's lock had left; now the user's one line naming the run, the signal and the resume,
    and no warning. A worker that exits with a code of its own is still a bug (RunFailed)."""
    code = ("import test_launch\nfrom teacherhack import launch\ntry:\n"
            "    list(launch.launch([launch.Job('offline', test_launch.killed_after_a_progress_bar), "
            "launch.Job('online', test_launch.sibling)], parallel=2))\n"
            "except launch.UserError as error:\n    print(error)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout == ("run offline was killed by signal 9, SIGKILL (out of memory? the kernel's OOM killer sends "
                           "it); everything written so far is consistent: rerun the same command to resume it\n"), done
    assert "leaked" not in done.stderr, done.stderr
    with pytest.raises(launch.RunFailed, match="run broken died with exit code 3"):
        list(launch.launch([launch.Job("broken", exits_without_a_word), launch.Job("sibling", sibling)], parallel=2))
