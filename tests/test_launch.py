"""The local launcher's parallel workers (teacherhack.launch): the cores a worker may sample on, with its siblings
running and once they are done."""

from __future__ import annotations

import os
import time

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
