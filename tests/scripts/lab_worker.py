"""Run the lab in this process; launched by tests under torchrun. Usage: lab_worker.py OUT CACHE OVERRIDES_JSON"""

import json
import sys
from pathlib import Path

import torch

from teacherhack import config as cfg
from teacherhack.lab import run_lab

torch.set_num_threads(1)
out, cache, overrides = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
run_lab(cfg.resolve("quick", overrides), out, cache)
