"""The local launcher's parallel workers (teacherhack.launch): the cores a worker may sample on, with its siblings
running and once they are done, and the memory a worker keeps for its next tensors."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import sys
import time

import pytest
import torch

from teacherhack import launch


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
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mapped_apart_and_kept() -> tuple[int, int]:
    """What glibc does with a 64 MiB tensor: the bytes it maps apart for it while it lives (returned to the kernel
    when it is freed), and the bytes its heap still holds once it is freed."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    before = mallinfo2()
    tensor = torch.ones(16 << 20)
    during = mallinfo2()
    del tensor
    after = mallinfo2()
    return during.hblkhd - before.hblkhd, after.arena - before.arena


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_worker_keeps_the_memory_it_frees_where_a_plain_process_returns_it():
    size = 64 << 20
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # glibc's defaults
        mapped, kept = pool.apply(mapped_apart_and_kept)
    assert mapped >= size and kept < size
    results = dict(launch.launch([launch.Job("worker", mapped_apart_and_kept), launch.Job("sibling", sibling)],
                                 parallel=2))
    mapped, kept = results["worker"]
    assert mapped == 0 and kept >= size
