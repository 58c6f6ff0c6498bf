"""Running the same code on one process or many (``torchrun`` / ``accelerate launch``): which shard of a
global batch this process owns, collective sums and gathers, and which process writes files.

Under a launcher the process group comes from accelerate (gloo on CPU, NCCL on GPUs); alone, every helper
is the identity, so single-process runs pay nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

import torch
from torch import Tensor

from teacherhack.errors import UserError


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# How long a process waits at a barrier for the others. The main process builds some artifacts alone (the oracle's
# answers, the offline set, the teacher's signals: hours at the paper's scale) or waits for another command's build
# of the same artifact, while the others wait; the default process group's timeout (30 minutes for gloo, 10 for
# NCCL) would kill the run in the middle of such a build, and again at every rerun.
WAIT_TIMEOUT = timedelta(days=3)


@cache
def _state():
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # accelerate runs gloo on CPUs only when told
    _waiting_group()  # made now, while every process starts together: making a group is itself a collective
    return state


@cache
def _waiting_group() -> Any:
    """A gloo group of every process with :data:`WAIT_TIMEOUT` for :func:`barrier` (gloo waits on the CPU, also
    beside an NCCL default group)."""
    return torch.distributed.new_group(backend="gloo", timeout=WAIT_TIMEOUT)


def rank() -> int:
    return _state().process_index if launched() else 0


def world() -> int:
    return _state().num_processes if launched() else 1


def is_main() -> bool:
    return rank() == 0


def log(message: str) -> None:
    """A progress line for the user, from the main process only."""
    if is_main():
        print(f"[teacherhack {time.strftime('%H:%M:%S')}] {message}", flush=True)


def barrier() -> None:
    """Wait for every process, however long the main process works alone (:data:`WAIT_TIMEOUT`)."""
    if launched():
        _state()
        torch.distributed.barrier(group=_waiting_group())


def shard(rows: list[int] | range) -> list[int]:
    """This process's rows of a global batch: every world-th row, starting at its rank."""
    return list(rows)[rank():: world()]


def refuse_empty_shards(rows: Mapping[str, int], shared: str, processes: int) -> None:
    """Refuses sets (named, with their row counts) of fewer rows than ``processes``: a process whose :func:`shard`
    is empty failed deep in its first batch or evaluation, the others then in a collective, with a message that
    named neither the set nor the process count."""
    few = [f"{name}={count}" for name, count in rows.items() if count < processes]
    if few:
        raise UserError(f"{processes} processes share {shared}, one row each at least: {', '.join(few)} give some "
                        f"none; raise them to {processes} or more, or launch fewer processes")


def all_sum(value: float) -> float:
    if not launched():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_state().device)
    torch.distributed.all_reduce(tensor)
    return float(tensor)


def gather(values: Tensor) -> Tensor:
    """The 1-D values of every process's :func:`shard` of rows, put back in row order: value i is row i's whatever
    the number of processes (per-sample values pair across evaluations and runs by their index)."""
    if not launched():
        return values
    parts: list[Tensor] = [values] * world()
    torch.distributed.all_gather_object(parts, values.detach().cpu())
    out = torch.empty(sum(len(p) for p in parts), dtype=parts[0].dtype)
    for rank, part in enumerate(parts):
        out[rank:: len(parts)] = part  # the rows shard gave it: every world-th from its rank
    return out


@dataclass(frozen=True)
class Prepared:
    """A model and optimizer ready to train here: wrapped for DDP under a launcher (``accelerate launch`` or
    ``torchrun``; preflight refuses FSDP and DeepSpeed configurations), themselves when alone."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: Any | None = None  # accelerate.Accelerator under a launcher


def wrap_for_training(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Prepared:
    if not launched():
        return Prepared(module, optimizer)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # find_unused_parameters keeps DDP's first bucket layout: by default it rebuilds the buckets after the first step,
    # so a resumed run (wrapped anew) summed its first step's gradients in another order than the uninterrupted run
    # did there, which on 3 or more processes (ring all-reduce) gives other bits
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    wrapped, optimizer = accelerator.prepare(module, optimizer)
    return Prepared(wrapped, optimizer, accelerator)
