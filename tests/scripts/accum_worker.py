"""Run by tests/test_distributed.py, under torchrun or alone: two supervised steps of 9 rows in 3 micro-batches
(``training.train``, as ``stages.fit`` calls it). Two processes take shards of 5 and 4 rows, which split into 3
and 2 micro-batches; the main process prints the trained parameters' sum of squares and a checksum."""

import sys

import torch

from teacherhack import distributed, training
from teacherhack.models import LM, build_model
from teacherhack.sources import FixedPairs

PAD, EOS = 0, 1
torch.set_num_threads(1)
grad_accum = int(sys.argv[1])
lm = LM(build_model("gpt2", "xxs", vocab_size=50, pad_id=PAD, eos_id=EOS, max_positions=32, seed=0),
        pad_id=PAD, eos_id=EOS)
g = torch.Generator().manual_seed(0)


def text(longest: int) -> list[int]:
    return torch.randint(2, 50, (int(torch.randint(1, longest, (1,), generator=g)),), generator=g).tolist() + [EOS]


prompts, responses = [text(6) for _ in range(18)], [text(6) for _ in range(18)]
data = FixedPairs(prompts, responses, batch_size=9, seed=0, pad_id=PAD, origin="sft")
shard = len(data.batch(0).prompts)
print(f"rank {distributed.rank()}: {shard} rows in {len(torch.arange(shard).chunk(grad_accum))} micro-batches", flush=True)
training.train(lm, data, training.sft_loss(lm), steps=2, lr=1e-2, warmup=0, schedule="constant", grad_accum=grad_accum)
if distributed.is_main():
    print("params", " ".join(f"{float(p.double().sum()):.10e}" for p in lm.model.parameters()), flush=True)
