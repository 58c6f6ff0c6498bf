"""A resumed run (restored weights and optimizer, wrapped anew for DDP) against an uninterrupted one, under
torchrun: whether the parameters after the same steps are the same bits (tests/test_distributed.py)."""
import copy
import torch
from teacherhack import distributed, training
from teacherhack.models import LM, build_model
from teacherhack.sources import FixedPairs

torch.set_num_threads(1)
PAD, EOS = 0, 1
g = torch.Generator().manual_seed(0)
def text(n):
    return torch.randint(2, 50, (int(torch.randint(1, n, (1,), generator=g)),), generator=g).tolist() + [EOS]
prompts, responses = [text(6) for _ in range(48)], [text(8) for _ in range(48)]
data = FixedPairs(prompts, responses, batch_size=12, seed=0, pad_id=PAD, origin="sft")

def fresh():
    lm = LM(build_model("gpt2", "xxs", vocab_size=50, pad_id=PAD, eos_id=EOS, max_positions=32, seed=0),
            pad_id=PAD, eos_id=EOS)
    return lm, training.make_optimizer(lm, 1e-2)

def steps(lm, opt, rng):
    with training.prepared(lm, opt) as ready:
        for s in rng:
            training.optimizer_step(lm, ready, data.batch(s), training.sft_loss(lm), lr=1e-2)

a, oa = fresh(); steps(a, oa, range(0, 6))             # uninterrupted
b, ob = fresh(); steps(b, ob, range(0, 3))             # killed after step 3 ...
c, oc = fresh()                                        # ... resumed: weights and optimizer restored, wrapped anew
c.model.load_state_dict(copy.deepcopy(b.model.state_dict())); oc.load_state_dict(copy.deepcopy(ob.state_dict()))
steps(c, oc, range(3, 6))
diff = max(float((p - q).abs().max()) for p, q in zip(a.model.parameters(), c.model.parameters()))
same = all(torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters()))
if distributed.is_main():
    print(f"world {distributed.world()}: resumed == uninterrupted bit for bit: {same} (max abs diff {diff:.3e})", flush=True)
