"""Run by tests/test_distributed.py under torchrun: the default process group times out after 2 s, and the main
process works alone for 6 s (as it builds an artifact the others wait for) before the barrier."""

import sys
import time
from datetime import timedelta

import torch.distributed

torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=2))

from teacherhack import distributed  # noqa: E402  (after the group, which accelerate then adopts)

assert distributed.world() == 2  # every process starts together
if distributed.is_main():
    time.sleep(6)
distributed.barrier()
print(f"rank {distributed.rank()} waited", flush=True)
sys.exit(0)
