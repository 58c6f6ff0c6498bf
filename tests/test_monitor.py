"""The teacher-hacking monitor: plain API, detector wiring, and the TrainerCallback with a plain
``transformers.Trainer`` and TRL's ``GKDTrainer``. Offline: tiny models, a word-level tokenizer and an
in-memory dataset, all built here."""

from __future__ import annotations

import copy
import json
import math
import random
import re
import warnings

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from teacherhack.detection import golden_verdict
from teacherhack.divergences import Estimate
from teacherhack.metrics import sample_in_batches
from teacherhack.models import LM, build_model, collate_prompts
from teacherhack.monitor import (
    PAIRED_KEY,
    SAMPLES,
    SETTINGS_KEY,
    HackingMonitor,
    HackingMonitorCallback,
    MonitorWarning,
    TeacherHackingWarning,
)
from teacherhack.oracle_free import DEFAULT_RULE, DEFAULT_RULE_MEASURED, Rule

WORDS = "sun moon star sea river stone tree bird wind fire rain snow cloud hill road door king child bread salt".split()
PAD, EOS = 0, 1
VOCAB = 3 + len(WORDS)  # [PAD] [EOS] [UNK] + words
HELD_OUT = ["sun moon star", "river stone", "tree bird wind fire", "rain", "snow cloud hill", "king child"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %} [EOS]{% endif %} "
                 "{% endfor %}")


def make_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": PAD, "[EOS]": EOS, "[UNK]": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"pad_token": "[PAD]", "unk_token": "[UNK]"} | ({"eos_token": "[EOS]"} if eos else {})
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    if not eos:
        tok.add_special_tokens({"additional_special_tokens": ["[EOS]"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(seed: int, *, init: float = 0.02, vocab: int = VOCAB, dropout: float = 0.0) -> GPT2LMHeadModel:
    """A 1-layer GPT-2; ``init`` large gives a peaked (teacher-like) distribution, 0.02 a nearly flat one."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=1, n_head=2, initializer_range=init,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    return GPT2LMHeadModel(config)


def make_bart(seed: int) -> BartForConditionalGeneration:
    """A 1-layer BART, peaked: an encoder-decoder whose encoder has absolute (learned) positions."""
    torch.manual_seed(seed)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, decoder_start_token_id=EOS, forced_eos_token_id=None,
        init_std=0.5)).eval()


def perturbed(model: GPT2LMHeadModel, noise: float = 0.3, seed: int = 1, dropout: float = 0.0) -> GPT2LMHeadModel:
    """A student that starts as a noisy copy of the teacher: distillation visibly closes the gap in a few steps."""
    student = copy.deepcopy(model)
    student.config.resid_pdrop = student.config.embd_pdrop = student.config.attn_pdrop = dropout
    for m in student.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return student.train()


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def teacher() -> GPT2LMHeadModel:
    return make_model(0, init=0.5).eval()


def teacher_texts(teacher: GPT2LMHeadModel, n: int, *, seed: int = 1, max_new_tokens: int = 8,
                  prompts: list[list[int]] | None = None) -> list[list[int]]:
    """Training sequences prompt + teacher response (up to its EOS), on random prompts other than HELD_OUT, or on
    ``n`` prompts drawn from ``prompts``."""
    rng = random.Random(seed)
    prompts = ([rng.choice(prompts) for _ in range(n)] if prompts else
               [[3 + rng.randrange(len(WORDS)) for _ in range(rng.randint(1, 4))] for _ in range(n)])
    responses = sample_in_batches(LM(teacher, pad_id=PAD, eos_id=EOS), collate_prompts(prompts, PAD),
                                  max_new_tokens=max_new_tokens, batch_size=n, seed=seed)
    out = []
    for prompt, response in zip(prompts, responses.tolist()):
        end = response.index(EOS) + 1 if EOS in response else len(response)
        out.append(prompt + response[:end])
    return out


def lm_batch(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([s + [PAD] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# --------------------------------------------------------------------------------------------------
# Plain API
# --------------------------------------------------------------------------------------------------


def test_proxy_falls_as_the_student_learns_the_teacher(tok, teacher):
    mon = HackingMonitor(teacher, tok, HELD_OUT, samples_per_prompt=2, max_new_tokens=8, batch_size=8, every=5)
    student = perturbed(teacher, dropout=0.1)
    teacher.train()  # the check must switch both to eval mode and give the modes back
    first = mon.check(student, 0)
    samples = mon.samples
    kept = samples.clone()
    assert student.training and all(m.training for m in student.modules()) and teacher.training
    again = mon.check(student, 1)  # no training in between: same samples, dropout off -> identical value
    assert again["proxy"] == first["proxy"]
    teacher.eval()

    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for step in range(20):  # online teacher data: the proxy keeps falling
        loss = student(**lm_batch(teacher_texts(teacher, 16, seed=100 + step))).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon.due(step + 1):
            mon.maybe_check(student, step + 1)
    assert mon.maybe_check(student, 21) is None  # not due

    rows = mon.history
    assert [r["step"] for r in rows] == [0, 1, 5, 10, 15, 20]
    assert all(r["proxy_se"] > 0 and r["n"] == 2 * len(HELD_OUT) for r in rows)
    proxies = [r["proxy"] for r in rows[1:]]
    assert proxies == sorted(proxies, reverse=True) and proxies[-1] < 0.5 * proxies[0], proxies
    assert mon.samples is samples and torch.equal(mon.samples, kept)  # drawn once, reused: paired checks
    assert set(first) >= {"proxy", "proxy_se", "hacking_alert", "alert_step", "signal", "detector_reason",
                          "student_entropy_held_out"}
    assert isinstance(rows[-1]["hacking_alert"], bool)
    # the student sharpens towards the teacher along the teacher's samples: the entropy deficit's inputs
    assert mon.settings["teacher_entropy"] > 0 and rows[-1]["student_entropy_held_out"] != first["student_entropy_held_out"]


def test_train_prompts_give_the_memorisation_gap(tok, teacher):
    """With the prompts the student trains on, the monitor measures the proxy there too; a student trained on the
    teacher's samples of those prompts only fits them better than the held-out ones: the gap grows."""
    train = ["sun moon", "river stone tree", "bird wind"]
    # 4 samples per prompt: with 2, the gap's rise over 3 training prompts varies from 0.5 to 6 nats with the seed
    mon = HackingMonitor(teacher, tok, HELD_OUT, train_prompts=train, samples_per_prompt=4, max_new_tokens=8,
                         batch_size=8, rule=Rule("memorisation_gap", 1e9))
    student = perturbed(teacher, noise=0.3)
    first = mon.check(student, 0)
    fixed = teacher_texts(teacher, 16, seed=7, prompts=[tok(p)["input_ids"] for p in train])
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(30):  # memorise the teacher's samples of the training prompts
        loss = student(**lm_batch(fixed)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = mon.check(student, 30)
    assert last["proxy_train"] < first["proxy_train"]
    assert last["signal"] == pytest.approx(last["proxy"] - last["proxy_train"])
    assert last["signal"] > first["signal"] + 0.5
    with pytest.raises(ValueError, match="train_prompts="):
        HackingMonitor(teacher, tok, HELD_OUT, rule=Rule("relative_gap", 0.1))


@pytest.mark.parametrize("estimator", ["token_kl", "log_ratio"])
def test_student_identical_to_teacher_gives_exactly_zero(tok, teacher, estimator):
    mon = HackingMonitor(LM(teacher, pad_id=PAD, eos_id=EOS), tok, HELD_OUT, max_new_tokens=8, estimator=estimator)
    row = mon.check(copy.deepcopy(teacher), 10)
    assert row["proxy"] == 0.0 and row["proxy_se"] == 0.0
    assert not row["hacking_alert"] and not math.isfinite(row["signal"])  # no power law through zero


def test_encoder_decoder_teacher(tok):
    t5 = build_model("t5", "xxs", vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, max_positions=64, seed=0).eval()
    mon = HackingMonitor(t5, tok, HELD_OUT, max_new_tokens=6)
    assert mon.check(copy.deepcopy(t5), 1)["proxy"] == 0.0
    other = build_model("t5", "xxs", vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, max_positions=64, seed=1)
    row = mon.check(other, 2)
    assert row["proxy"] > 0 and row["proxy_se"] > 0 and other.training


def test_vocab_mismatch_is_refused_unless_a_rule_is_declared(tok, teacher):
    padded = make_model(2, vocab=VOCAB + 7)
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        HackingMonitor(teacher, tok, HELD_OUT, max_new_tokens=4).check(padded, 1)
    # the teacher with 7 padded output rows that would carry probability mass if they were not ignored
    state = teacher.state_dict()
    extra = torch.randn(7, 32) * 3
    for key in ("transformer.wte.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], extra])
    padded.load_state_dict(state)
    ruled = HackingMonitor(teacher, tok, HELD_OUT, max_new_tokens=4, vocab_size=VOCAB)
    assert ruled.check(padded, 1)["proxy"] == 0.0
    with pytest.raises(ValueError, match="exceeds the student"):
        HackingMonitor(padded, tok, HELD_OUT, vocab_size=VOCAB + 7).check(teacher, 1)


def test_clear_errors(tok, teacher):
    with pytest.raises(ValueError, match="no EOS"):
        HackingMonitor(teacher, make_tokenizer(eos=False), HELD_OUT)
    with pytest.raises(ValueError, match="^prompts is an empty list: give at least one prompt$"):
        HackingMonitor(teacher, tok, [])
    with pytest.raises(ValueError, match="^train_prompts is an empty list: give at least one prompt, or leave "
                                         "train_prompts out$"):  # it said "held-out prompt", naming prompts
        HackingMonitor(teacher, tok, HELD_OUT, train_prompts=[])
    with pytest.raises(TypeError, match="single string"):
        HackingMonitor(teacher, tok, "sun moon")
    with pytest.raises(ValueError, match=r"prompts\[1\] \('   '\) encodes to no tokens"):
        HackingMonitor(teacher, tok, ["sun", "   "])
    with pytest.raises(ValueError, match="out of the teacher vocabulary"):
        HackingMonitor(teacher, tok, [[3, 4, VOCAB + 5]])
    with pytest.raises(ValueError, match="unknown detector signal"):
        HackingMonitor(teacher, tok, HELD_OUT, rule=Rule("loss_spikes", 1.0))
    with pytest.raises(ValueError, match="log_ratio"):
        HackingMonitor(teacher, tok, HELD_OUT, per_token=True)
    with pytest.raises(ValueError, match="every"):
        HackingMonitorCallback(teacher, tok, HELD_OUT, every=0)
    for every in (True, 2.0):  # True was taken as 1
        with pytest.raises(ValueError, match=f"^every must be a positive integer, got {every}$"):
            HackingMonitor(teacher, tok, HELD_OUT, every=every)
        with pytest.raises(ValueError, match=f"^every must be a positive integer, got {every}$"):
            HackingMonitorCallback(teacher, tok, HELD_OUT, every=every)
    with pytest.raises(ValueError, match="^prompts holds a single distinct prompt: give at least 2"):  # SE was NaN
        HackingMonitor(teacher, tok, ["sun moon", [3 + WORDS.index("sun"), 3 + WORDS.index("moon")]])
    # a repeated held-out prompt counted as a prompt of its own (too small an SE); a training prompt that is a
    # held-out one made the training-gap signals compare the held-out set with itself
    with pytest.raises(ValueError, match=r"^prompts repeats 2 held-out prompt\(s\)"):
        HackingMonitor(teacher, tok, HELD_OUT + HELD_OUT[:2])
    with pytest.raises(ValueError, match="^1 of train_prompts are held-out prompts too"):
        HackingMonitor(teacher, tok, HELD_OUT, train_prompts=["river", HELD_OUT[0]])


def test_prompts_from_a_tokenizer_and_the_forms_refused(tok, teacher):
    """tokenizer(texts), padded or not, gives the prompts the texts give; what cannot be read as prompts is refused
    with what to pass (a BatchEncoding was taken as the two prompts 'input_ids' and 'attention_mask', a padded
    tensor's padding as prompt tokens, -100 failed deep in the embedding)."""
    from datasets import Dataset

    plain = HackingMonitor(teacher, tok, HELD_OUT).prompts
    for side in ("right", "left"):
        tok.padding_side = side
        for encoding in (tok(HELD_OUT), tok(HELD_OUT, padding=True, return_tensors="pt")):
            prompts = HackingMonitor(teacher, tok, encoding).prompts
            assert torch.equal(prompts.ids, plain.ids) and torch.equal(prompts.mask, plain.mask)
    # one tokenizer output per prompt: transformers 5's apply_chat_template(..., tokenize=True), or a padded row
    chat = [tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            for text in HELD_OUT]
    encoding = tok(HELD_OUT)
    rows = [{"input_ids": [PAD, *ids], "attention_mask": [0, *mask]}
            for ids, mask in zip(encoding["input_ids"], encoding["attention_mask"])]
    for encodings in (chat, rows):
        prompts = HackingMonitor(teacher, tok, encodings).prompts
        assert torch.equal(prompts.ids, plain.ids) and torch.equal(prompts.mask, plain.mask)
    padded = tok(HELD_OUT, padding=True)["input_ids"]
    for prompts, message in (
        (torch.tensor(padded), "^prompts is a 2-D array of token ids, whose padding cannot be told from its tokens: "
                               r"pass the tokenizer's output itself \(tokenizer\(texts\)"),
        (padded, r"^prompts\[0\] starts or ends with the pad token \(id 0\): pass unpadded ids"),
        ({"text": HELD_OUT}, "^prompts is a mapping with the keys 'text', not a tokenizer's output with 'input_ids'"),
        (Dataset.from_dict({"prompt": HELD_OUT}), r"^prompts\[0\] is a row with the fields 'prompt': pass one "
                                                  r"field's values, e.g. dataset\['prompt'\]$"),
        ([[3, 4], [-100, 5, 6]], r"^prompts\[1\] holds the id -100, not a token: -100 masks the positions a loss "
                                 "ignores in labels"),
        ([["sun"], ["moon"]], r"^prompts\[0\] \(\['sun'\]\) is neither a string nor a list of token ids$"),
    ):
        with pytest.raises(ValueError, match=message):
            HackingMonitor(teacher, tok, prompts)
    labels = [-100, -100, 5, 6, EOS]  # a response as a collator's labels row: its prompt masked
    with pytest.raises(ValueError, match=r"^the response of references\[0\] holds the id -100, not a token"):
        HackingMonitor(teacher, tok, HELD_OUT, references=[("sun moon", labels), ("river", [7, EOS])])
    with pytest.raises(ValueError, match=r"^references is a mapping \(of columns\?\), whose keys would be read as "
                                         "pairs: pass rows"):
        HackingMonitor(teacher, tok, HELD_OUT, references={"prompt": ["sun", "moon"], "response": ["a", "b"]})


def test_a_set_of_fewer_rows_than_processes_is_refused(tok, teacher, monkeypatch):
    """Each process scores its share of each set of rows: one with none crashed at the first check (torch.cat of
    nothing), and the others then failed or hung in the gather."""
    from teacherhack import distributed
    from teacherhack.errors import UserError

    monkeypatch.setattr(distributed, "world", lambda: 5)
    pairs = [("sun", [4, EOS]), ("moon", [5, EOS])]
    with pytest.raises(UserError, match="^5 processes share each set of rows the monitor scores, one row each at "
                                        "least: train_prompts × samples_per_prompt=4, references=2 give some none; "
                                        "raise them to 5 or more, or launch fewer processes$"):
        HackingMonitor(teacher, tok, HELD_OUT, train_prompts=["sun moon", "bird"], references=pairs)
    HackingMonitor(teacher, tok, HELD_OUT[:5], samples_per_prompt=1, references=pairs * 2 + pairs[:1])


@pytest.mark.parametrize("arch", ["gpt2", "bart"])  # BART: an encoder with absolute positions (no position ids)
def test_the_teacher_samples_do_not_depend_on_the_batch_size(tok, teacher, arch):
    """Each row is drawn from its own generator: the monitor's batch size (lowered after running out of memory, say)
    changes neither its samples nor, beyond float rounding, its values; its seed does."""
    teacher = teacher if arch == "gpt2" else make_bart(0)
    options = dict(samples_per_prompt=3, max_new_tokens=8, train_prompts=["sun moon", "bird"],
                   references=[("sun", [4, 5, EOS]), ("tree bird wind", [6, EOS]), ("rain snow", [7, 8, 9])])
    monitors = [HackingMonitor(teacher, tok, HELD_OUT, batch_size=size, **options) for size in (16, 5, 1)]
    student = perturbed(teacher)
    rows = [monitor.check(student, 0) for monitor in monitors]
    assert all(torch.equal(monitor.samples, monitors[0].samples) for monitor in monitors)
    assert all(monitor.fingerprint() == monitors[0].fingerprint() for monitor in monitors)
    assert all(row["proxy"] == pytest.approx(rows[0]["proxy"], rel=1e-6) for row in rows)
    assert all(row["proxy_train"] == pytest.approx(rows[0]["proxy_train"], rel=1e-6) for row in rows)
    assert all(row["reference_nll"] == pytest.approx(rows[0]["reference_nll"], rel=1e-6) for row in rows)
    other = HackingMonitor(teacher, tok, HELD_OUT, seed=1, **options)
    assert other.fingerprint()[SAMPLES] != monitors[0].fingerprint()[SAMPLES]


def test_the_student_may_sit_on_another_device_than_the_teacher(tok, teacher):
    """Simulated on one device: once the teacher's log-probabilities are cached, the teacher reports another device
    ("meta", where no value can be read), as a teacher on another GPU would. A check compares the models on the
    student's device, and never sends the student's values to the teacher's (it did: a device mismatch at the first
    check)."""
    options = dict(max_new_tokens=8, cache_mb=1, references=real_pairs(tok, make_model(7, init=0.5).eval(), 4))
    student = perturbed(teacher)
    expected = HackingMonitor(teacher, tok, HELD_OUT, **options).check(student, 0)
    monitor = HackingMonitor(teacher, tok, HELD_OUT, **options)
    monitor.prepare()
    assert all(len(scored.cache) == len(scored.batches) for scored in monitor._scored.values())

    class Elsewhere(type(monitor.teacher)):
        device = property(lambda self: torch.device("meta"))

    monitor.teacher.__class__ = Elsewhere
    row = monitor.check(student, 0)
    assert (row["proxy"], row["reference_nll"]) == (expected["proxy"], expected["reference_nll"])


# --------------------------------------------------------------------------------------------------
# Detector wiring, with proxy values we control
# --------------------------------------------------------------------------------------------------


def bent_curve(step: int) -> float:
    """A power law 10·t^(−1/2) (10 at step 0) that goes flat after step 6."""
    return 10.0 * min(max(step, 1), 6) ** -0.5


# The proxy stops improving: 1 − (last fall ÷ mean fall so far) is 0.38-0.67 along the power law (steps 3-6) and
# exactly 1 once it is flat (steps 7, 8, ...): with patience 2 the rule must fire at step 8
STALL = Rule("proxy_stall", 0.9, patience=2)


@pytest.fixture
def scripted_proxy(monkeypatch):
    """Replace the measurement by the bent curve, keyed on the check's step."""
    steps: list[int] = []

    def check(self, student, step):
        steps.append(step)
        return self.record(step, bent_curve(step), 0.01 * bent_curve(step))

    monkeypatch.setattr(HackingMonitor, "check", check)
    return steps


def test_record_fires_on_a_bend(tok, teacher):
    mon = HackingMonitor(teacher, tok, HELD_OUT, rule=STALL)
    rows = [mon.record(t, bent_curve(t), 0.01 * bent_curve(t)) for t in range(1, 12)]
    fired = [r["step"] for r in rows if r["alert_fired_now"]]
    assert fired == [8]
    assert [r["hacking_alert"] for r in rows] == [False] * 7 + [True] * 4
    assert all(r["alert_step"] == 8 for r in rows[7:])
    assert rows[2]["signal"] == pytest.approx(1 - (10 * 2**-0.5 - 10 * 3**-0.5) / ((10 - 10 * 3**-0.5) / 2))
    assert rows[7]["signal"] == 1.0 and "proxy stall 1 > 0.9 at step 8, the last of 2" in rows[7]["detector_reason"]
    assert all(r["alert_since"] == 7 for r in rows[7:])  # the first of the two evaluations above 0.9
    # a lower onset level dates the turn back to where the stall began to exceed it, the reason says so
    dated = HackingMonitor(teacher, tok, HELD_OUT, rule=Rule("proxy_stall", 0.9, patience=2, onset=0.5))
    rows = [dated.record(t, bent_curve(t), 0.01 * bent_curve(t)) for t in range(1, 12)]
    signals = [r["signal"] for r in rows]
    since = next(t for t in range(3, 8) if all(v > 0.5 for v in signals[t - 1:8]))  # steps are 1, 2, ...
    assert rows[7]["alert_since"] == since < 8 and f"the turn dates from step {since}" in rows[7]["detector_reason"]


def test_checks_come_at_increasing_steps(tok, teacher, scripted_proxy):
    """A step checked twice (a loop that calls maybe_check per micro-batch) is checked once; a step repeated or gone
    back through record or check is refused with a clear error, not a singular fit three checks later."""
    mon = HackingMonitor(teacher, tok, HELD_OUT, every=2)
    for step in (0, 0, 1, 2, 2, 2, 4):
        mon.maybe_check(None, step)
    assert scripted_proxy == [0, 2, 4] and [r["step"] for r in mon.history] == [0, 2, 4]
    for step in (4, 3):
        with pytest.raises(ValueError, match=f"a check at step {step} after one at step 4: checks must come at "
                                             "increasing steps"):
            mon.record(step, 1.0, 0.1)
        with pytest.raises(ValueError, match="increasing steps"):
            mon.check(None, step)
    assert len(mon.history) == 3


def test_the_default_rule_says_how_often_it_is_right(tok, teacher):
    """The monitor's default is the validated rule, and its alarm carries the precision measured for it."""
    mon = HackingMonitor(teacher, tok, HELD_OUT)
    assert mon.rule == DEFAULT_RULE
    rows = [mon.record(t, 10.0 * min(t, 3) ** -0.5, 0.01) for t in range(1, 12)]
    assert rows[-1]["hacking_alert"] and DEFAULT_RULE_MEASURED in rows[-1]["detector_reason"]


class Recorder(TrainerCallback):
    """Stands for a report_to integration: those are callbacks that receive every log through on_log."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**logs, "step": state.global_step})


def tiny_trainer(tmp_path, student, teacher, tok, *, max_steps, callbacks=(), logging_steps=2) -> Trainer:
    data = teacher_texts(teacher, 32)
    from datasets import Dataset

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=logging_steps, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return Trainer(model=student, args=args, train_dataset=Dataset.from_dict({"input_ids": data}),
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=list(callbacks))


@pytest.mark.parametrize("stop", [True, False])
def test_callback_warns_once_and_stops_a_trainer_on_alert(tmp_path, tok, teacher, scripted_proxy, stop):
    callback = HackingMonitorCallback(teacher, tok, HELD_OUT, every=1, stop_on_alert=stop, max_new_tokens=4, rule=STALL)
    trainer = tiny_trainer(tmp_path, make_model(1), teacher, tok, max_steps=11, callbacks=[callback])  # unbound
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    hacking = [w for w in caught if issubclass(w.category, TeacherHackingWarning)]
    assert len(hacking) == 1 and "step 8" in str(hacking[0].message)
    assert trainer.state.global_step == (8 if stop else 11)
    rows = [r for r in trainer.state.log_history if "proxy_kl" in r]  # unbound: still in log_history
    # the student is checked before training (step 0) too: every signal starts there, as in the lab's runs
    assert [r["step"] for r in rows] == list(range(0, trainer.state.global_step + 1))
    assert [r["hacking_alert"] for r in rows] == [0] * 8 + [1] * (len(rows) - 8)
    # from the alarm on, the step the rule dates the turn to (its two evaluations above the threshold began at 7)
    assert [r.get("hacking_turn_step") for r in rows] == [None] * 8 + [7] * (len(rows) - 8)
    assert rows[0]["proxy_kl"] == pytest.approx(10.0)


def test_each_alarm_warns_on_its_first_firing_and_a_replayed_one_does_not_again(tok, teacher, monkeypatch):
    """One flag covered both alarms: once the detector had warned, the reference verdict (the more precise alarm,
    which the detector's says to watch) fired without a warning. The bent proxy fires the detector at step 8; the
    reference NLL falls to step 6, then rises, and its verdict fires later."""
    from transformers import TrainerControl, TrainerState

    def check(self, student, step):
        nll = 30.0 - step if step <= 6 else 24.0 + 0.8 * (step - 6)
        return self.record(step, bent_curve(step), 0.01 * bent_curve(step), reference_nll=nll, reference_nll_se=0.05)

    monkeypatch.setattr(HackingMonitor, "check", check)

    def run(callback: HackingMonitorCallback, state: TrainerState, steps: range) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            callback.on_train_begin(None, state, TrainerControl(), model=teacher)
            for step in steps:
                state.global_step = step
                callback.on_step_end(None, state, TrainerControl(), model=teacher)
        return [str(w.message) for w in caught if issubclass(w.category, TeacherHackingWarning)]

    def callback() -> HackingMonitorCallback:
        return HackingMonitorCallback(teacher, tok, HELD_OUT, every=1, max_new_tokens=4, rule=STALL)

    first = callback()
    state = TrainerState(global_step=0, logging_steps=1)
    warned = run(first, state, range(1, 16))
    history = first.monitor.history
    detector = next(r["step"] for r in history if r["hacking_alert"])
    reference = next(r["step"] for r in history if r["reference_alert"])
    assert detector == 8 < reference
    assert len(warned) == 2 and f"at step {detector}: the oracle-free detector alarmed" in warned[0]
    assert f"at step {reference}: the student's NLL of the held-out real responses turned up" in warned[1]
    # resumed between the two alarms: the detector's replayed alarm does not warn again, the reference's still warns
    state.log_history = [row for row in state.log_history if row["step"] <= detector]
    state.global_step = detector
    warned = run(callback(), state, range(detector + 1, 16))
    assert len(warned) == 1 and f"at step {reference}: the student's NLL" in warned[0]


def test_callback_replays_the_logged_curve_on_resume(tok, teacher):
    from transformers import TrainerControl, TrainerState

    callback = HackingMonitorCallback(teacher, tok, HELD_OUT, every=1, rule=STALL, max_new_tokens=4)
    state = TrainerState(global_step=9, logging_steps=1)
    state.log_history = [{"loss": 1.0, "step": 1}] + [
        {"proxy_kl": bent_curve(t), "proxy_kl_se": 0.01 * bent_curve(t), "step": t} for t in range(1, 12)]
    with warnings.catch_warnings(), pytest.warns(MonitorWarning, match="hold no record of the monitor's settings"):
        warnings.simplefilter("error", TeacherHackingWarning)  # a replayed alarm does not warn again
        callback.on_train_begin(None, state, TrainerControl())
    assert [r["step"] for r in callback.monitor.history] == list(range(1, 10))
    assert callback.monitor.settings["teacher_entropy"] > 0  # drawn again at resume: entropy signals are defined
    assert callback.monitor.history[-1]["alert_step"] == 8 and callback._warned
    # the same callback on a new training run (trainer.train() from scratch) starts a new curve, not the old one's
    callback.on_train_begin(None, TrainerState(global_step=0, logging_steps=1), TrainerControl())
    assert callback.monitor.history == [] and not callback._warned
    callback.monitor.record(0, 10.0, 0.1)  # its checks from step 0 again: not refused as going back


# --------------------------------------------------------------------------------------------------
# End to end with real trainers
# --------------------------------------------------------------------------------------------------


def test_trainer_end_to_end_logs_reach_history_and_integrations(tmp_path, tok, teacher):
    recorder = Recorder()
    callback = HackingMonitorCallback(teacher, tok, HELD_OUT, every=3, max_new_tokens=8)
    trainer = tiny_trainer(tmp_path, perturbed(teacher), teacher, tok, max_steps=6, callbacks=[recorder, callback])
    callback.bind(trainer)
    assert trainer.callback_handler.callbacks.count(callback) == 1
    trainer.train()

    history = trainer.state.log_history
    rows = [r for r in history if "proxy_kl" in r]
    assert [r["step"] for r in rows] == [0, 3, 6]
    assert all(r["proxy_kl_se"] > 0 and r["hacking_alert"] == 0 for r in rows)
    assert rows[2]["proxy_kl"] < rows[1]["proxy_kl"] < rows[0]["proxy_kl"]  # the student learns the teacher's samples
    assert [r["step"] for r in history if "loss" in r] == [2, 4, 6]  # the trainer's own logs are untouched
    seen = [r for r in recorder.logs if "proxy_kl" in r]  # what a report_to integration receives
    assert [(r["step"], r["proxy_kl"]) for r in seen] == [(r["step"], r["proxy_kl"]) for r in rows]
    assert [r["step"] for r in callback.monitor.history] == [0, 3, 6]


# TRL's GKD configuration itself sets transformers' gradient_checkpointing, deprecated there: not our call
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning",
                            "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_trl_gkd_trainer_end_to_end(tmp_path, tok, teacher):
    pytest.importorskip("trl")
    from datasets import Dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental announces itself
        try:  # TRL 1.x moved GKD to trl.experimental
            from trl.experimental.gkd import GKDConfig, GKDTrainer
        except ImportError:
            from trl import GKDConfig, GKDTrainer

    rng = random.Random(0)
    rows = [{"messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=3))},
                          {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=3))}]} for _ in range(16)]
    args = GKDConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     gradient_checkpointing=False, disable_tqdm=True, max_length=32, max_new_tokens=6,
                     lmbda=0.5, beta=0.5, temperature=1.0, seed=0)
    recorder = Recorder()
    trainer = GKDTrainer(model=perturbed(teacher), teacher_model=teacher, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(rows), callbacks=[recorder])
    # every=None: the trainer's logging period (2)
    callback = HackingMonitorCallback(trainer.teacher_model, tok, HELD_OUT, max_new_tokens=6).bind(trainer)
    trainer.train()

    history = trainer.state.log_history
    rows = [r for r in history if "proxy_kl" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all(math.isfinite(r["proxy_kl"]) and r["proxy_kl"] > 0 and r["proxy_kl_se"] > 0 for r in rows)
    assert [r["step"] for r in recorder.logs if "proxy_kl" in r] == [0, 2, 4]
    assert [r["step"] for r in history if "loss" in r] == [2, 4]
    assert callback.monitor.samples is not None and not teacher.training


# --------------------------------------------------------------------------------------------------
# Real held-out references
# --------------------------------------------------------------------------------------------------


def real_pairs(tok, truth: GPT2LMHeadModel, n: int) -> list[tuple[str, list[int]]]:
    """n "real" (prompt, response) pairs: the responses drawn from ``truth``."""
    prompts = [[3 + (i * 5) % len(WORDS), 3 + (i * 3) % len(WORDS)] for i in range(n)]
    responses = sample_in_batches(LM(truth, pad_id=PAD, eos_id=EOS), collate_prompts(prompts, PAD), max_new_tokens=8,
                                  batch_size=n, seed=5)
    return [(tok.decode(p), [t for t in r if t != PAD]) for p, r in zip(prompts, responses.tolist())]


def distil(student, teacher, mon, steps: int, every: int, lr: float) -> None:
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    for step in range(steps):
        loss = student(**lm_batch(teacher_texts(teacher, 16, seed=300 + step))).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % every == 0:
            mon.check(student, step + 1)


@pytest.mark.parametrize("truth_is_teacher", [False, True])
def test_references_tell_a_student_moving_away_from_real_responses(tok, teacher, truth_is_teacher):
    """The student starts near the truth (the model whose samples are the "real" responses) and is distilled from
    a different teacher: its NLL of the real responses rises while the proxy falls, and the reference verdict
    says so. When the truth is the teacher itself, the same training lowers the NLL: no alert."""
    truth = teacher if truth_is_teacher else make_model(7, init=0.5).eval()
    pairs = real_pairs(tok, truth, 24)
    mon = HackingMonitor(teacher, tok, HELD_OUT, max_new_tokens=8, batch_size=8, references=pairs)
    student = perturbed(truth, noise=0.05)
    mon.check(student, 0)
    distil(student, teacher, mon, steps=40, every=5, lr=1e-3)  # slowly: a steady drift, not a jump
    rows = mon.history
    assert all(r["reference_nll_se"] > 0 for r in rows) and rows[-1]["proxy"] < rows[0]["proxy"]
    if truth_is_teacher:
        assert rows[-1]["reference_nll"] < rows[0]["reference_nll"] and not rows[-1]["reference_alert"]
    else:
        assert rows[-1]["reference_nll"] > rows[0]["reference_nll"] + 3.0
        assert rows[-1]["reference_alert"] and "reference NLL rises" in rows[-1]["reference_reason"]
        assert not rows[2]["reference_alert"]  # not before three checks after the minimum


def test_references_from_a_dataset_with_fields_and_bad_references(tok, teacher):
    rows = [{"question": "sun moon", "answer": "star sea"}, {"question": "river", "answer": "stone tree bird"}]
    mon = HackingMonitor(teacher, tok, HELD_OUT, max_new_tokens=8, references=rows, reference_fields=("question", "answer"))
    row = mon.check(perturbed(teacher), 0)
    assert row["reference_nll"] > 0 and not row["reference_alert"]
    with pytest.raises(ValueError, match="references must be"):
        HackingMonitor(teacher, tok, HELD_OUT, references=[("only a prompt",)])
    with pytest.raises(ValueError, match=r"^references\[0\] has the fields 'question', 'answer', not 'prompt' and "
                                         "'response': name its prompt and response fields with reference_fields=$"):
        HackingMonitor(teacher, tok, HELD_OUT, references=rows)  # was a bare KeyError: 'prompt'
    # the checks prompts get: ids beyond the vocabulary failed the first check deep in the embedding
    with pytest.raises(ValueError, match=rf"^token id {VOCAB + 5} \(reference prompt, EOS or pad\) is out of the "
                                         "teacher vocabulary"):
        HackingMonitor(teacher, tok, HELD_OUT, references=[([5, VOCAB + 5], [5]), ([6], [7])])
    for blank in ("", "   "):  # was scored as a lone EOS
        with pytest.raises(ValueError, match=rf"^the response of references\[1\] \({blank!r}\) is blank"):
            HackingMonitor(teacher, tok, HELD_OUT, references=[("sun moon", "star"), ("river", blank)])


def test_the_reference_verdict_stays_paired_across_a_resume(tok, teacher):
    """The callback keeps each check's per-sample values in the trainer's state (which checkpoints save): a
    resumed run judges the reference NLL with the same paired SEs as the run that was never interrupted."""
    from transformers import TrainerControl, TrainerState

    truth = make_model(7, init=0.5).eval()
    options = dict(every=5, max_new_tokens=8, batch_size=8, references=real_pairs(tok, truth, 24))
    callback = HackingMonitorCallback(teacher, tok, HELD_OUT, **options)
    state, student = TrainerState(global_step=0, logging_steps=5), perturbed(truth, noise=0.05)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    warnings.simplefilter("ignore", TeacherHackingWarning)
    for step in range(31):
        if step:
            loss = student(**lm_batch(teacher_texts(teacher, 16, seed=300 + step))).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        state.global_step = step
        callback.on_step_end(None, state, TrainerControl(), model=student)
    uninterrupted = callback.monitor.history
    assert "reference NLL rises" in uninterrupted[-1]["reference_reason"]

    saved = json.loads(json.dumps(state.log_history))  # as trainer_state.json holds it
    for kept in (saved, [row for row in saved if PAIRED_KEY not in row]):  # the second: a log without them
        resumed = HackingMonitorCallback(teacher, tok, HELD_OUT, **options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed.on_train_begin(None, TrainerState(global_step=30, logging_steps=5, log_history=kept),
                                   TrainerControl())
        reasons = [row["reference_reason"] for row in resumed.monitor.history]
        unpaired = [w for w in caught if issubclass(w.category, MonitorWarning)]
        if kept is saved:
            assert reasons == [row["reference_reason"] for row in uninterrupted] and not unpaired
        else:  # unpaired SEs: other z values, and a warning that the log cannot say whether the checks pair
            assert reasons[-1] != uninterrupted[-1]["reference_reason"] and len(unpaired) == 1


def test_a_reference_nll_without_se_or_not_finite_gives_no_verdict(tok, teacher):
    mon = HackingMonitor(teacher, tok, HELD_OUT, max_new_tokens=8, references=real_pairs(tok, make_model(7, init=0.5).eval(), 4))
    rising = [5.0, 4.0, 4.1, 4.2, 4.3, 4.4]
    for step, nll in enumerate(rising):  # replayed without SEs: nothing says a rise of 0.4 is more than noise
        row = mon.record(step, 10.0 - step, 0.01, reference_nll=nll)
    assert not row["reference_alert"] and row["reference_reason"].startswith("no verdict")
    mon = HackingMonitor(teacher, tok, HELD_OUT, max_new_tokens=8, references=real_pairs(tok, make_model(7, init=0.5).eval(), 4))
    for step, nll in enumerate(rising):
        row = mon.record(step, 10.0 - step, 0.01, reference_nll=nll, reference_nll_se=0.01)
    assert row["reference_alert"]  # the same curve, its noise known
    row = mon.record(6, 3.0, 0.01, reference_nll=math.nan, reference_nll_se=0.01)
    assert not row["reference_alert"] and "not finite at step 6" in row["reference_reason"]
    with pytest.raises(ValueError, match="at least 2 reference pairs"):
        HackingMonitor(teacher, tok, HELD_OUT, references=real_pairs(tok, make_model(7, init=0.5).eval(), 4)[:1])


def test_the_proxy_se_and_its_paired_change_are_clustered_by_prompt(tok, teacher):
    """The samples of one held-out prompt are correlated: the proxy's SE is clustered by prompt, and so is the paired
    SE of its change in the reference verdict. Replayed here: the reference NLL rises steadily while the proxy
    rises by 2.5 SE over the prompts (each prompt's change shared by its samples), which treating the samples as
    independent would call 3.7 SE and so over-fitting, not hacking."""
    mon = HackingMonitor(teacher, tok, HELD_OUT, samples_per_prompt=3, max_new_tokens=8, batch_size=8,
                         references=real_pairs(tok, make_model(7, init=0.5).eval(), 4))
    row = mon.check(perturbed(teacher), 0)
    values = torch.tensor(mon.paired_values[0]["proxy"], dtype=torch.float64)
    prompts = torch.arange(len(HELD_OUT)).repeat_interleave(3)
    assert row["proxy_se"] == Estimate.of(values, prompts).se > 1.2 * Estimate.of(values).se

    mon = HackingMonitor(teacher, tok, HELD_OUT, samples_per_prompt=2, max_new_tokens=8,
                         references=real_pairs(tok, make_model(7, init=0.5).eval(), 4))
    own = torch.tensor([0.3, -1.2, 0.8, 1.5, -0.4, -0.2], dtype=torch.float64)
    change = ((own - own.mean()) / own.std()).repeat_interleave(2)  # each prompt's own, SD 1 over the prompts
    rise = 2.5 / math.sqrt(len(HELD_OUT))  # 2.5 SE over the 6 prompts
    pairs = torch.tensor([-1.0, 0.0, 0.4, 0.6])
    for step, (nll, proxy) in enumerate(zip([5.0, 4.0, 3.0, 3.1, 3.2, 3.3, 3.4], [9.0, 8.0, 7.0, 7.0, 7.0, 7.0, 7.0])):
        proxies = torch.full((2 * len(HELD_OUT),), proxy, dtype=torch.float64) + (rise + change if step == 6 else 0)
        nlls = nll + pairs * (1 + 0.01 * step)  # a per-pair spread, which the paired SE of a change leaves out
        row = mon.record(step, float(proxies.mean()), 0.1, reference_nll=nll, reference_nll_se=0.1,
                         paired={"proxy": proxies.tolist(), "reference_nll": nlls.tolist()})
    assert row["reference_alert"] and "reference NLL rises" in row["reference_reason"]
    naive = golden_verdict([r["step"] for r in mon.history], [r["reference_nll"] for r in mon.history], [0.1] * 7,
                           [r["proxy"] for r in mon.history], [0.1] * 7,
                           golden_values=[p["reference_nll"] for p in mon.paired_values],
                           proxy_values=[p["proxy"] for p in mon.paired_values])
    assert not naive.hacking and "the proxy rises too (3.7 SE)" in naive.reason


def logged_checks(tok, teacher, student, steps: int, prompts=HELD_OUT, *, log=None, **options):
    """A callback checking ``student`` at steps 0 to ``steps`` − 1 (every=1, no training) and the trainer's log, as
    trainer_state.json holds it; given a ``log``, the callback first resumes from it at its last step."""
    from transformers import TrainerControl, TrainerState

    callback = HackingMonitorCallback(teacher, tok, prompts, every=1, **options)
    state = TrainerState(global_step=0, logging_steps=1, log_history=list(log or []))
    if log:
        state.global_step = max(row["step"] for row in log)
        callback.on_train_begin(None, state, TrainerControl(), model=student)
    for step in range(state.global_step + 1 if log else 0, steps):
        state.global_step = step
        callback.on_step_end(None, state, TrainerControl(), model=student)
    return callback, json.loads(json.dumps(state.log_history))


def test_a_resume_with_other_settings_is_refused_naming_each(tok, teacher):
    """The curve's first check logs what the checks measure (HackingMonitor.fingerprint). A resume whose monitor
    measures something else is refused at its start, naming each setting that differs (it gave a curve that steps at
    the resume, taken as paired, or an error about cluster labels); another batch size is only memory."""
    options = dict(max_new_tokens=8, batch_size=8, references=real_pairs(tok, make_model(7, init=0.5).eval(), 4))
    student = perturbed(teacher)
    uninterrupted, log = logged_checks(tok, teacher, student, 5, **options)
    assert [row["step"] for row in log if SETTINGS_KEY in row] == [0]
    upto3 = [row for row in log if row["step"] <= 3]
    for other in ({}, {"batch_size": 3}):  # the same checks after the resume, paired with those before
        with warnings.catch_warnings():
            warnings.simplefilter("error", MonitorWarning)
            resumed, _ = logged_checks(tok, teacher, student, 5, log=upto3, **options | other)
        assert resumed.monitor.paired_values[:4] == uninterrupted.monitor.paired_values[:4]
        assert resumed.monitor.history[4]["proxy"] == pytest.approx(uninterrupted.monitor.history[4]["proxy"], rel=1e-6)
    for prompts, other, named in (
        (HELD_OUT, {"samples_per_prompt": 3}, "samples_per_prompt 2 → 3"),
        (HELD_OUT, {"max_new_tokens": 6}, "max_new_tokens 8 → 6"),
        (HELD_OUT, {"seed": 1, "temperature": 0.8, "vocab_size": VOCAB},
         f"seed 0 → 1; temperature 1.0 → 0.8; estimator token_kl → log_ratio; vocab_size None → {VOCAB}"),
        (HELD_OUT[:4], {}, "prompts 6 prompts, sha256 "),
        (HELD_OUT, {"references": options["references"][:3]}, "references 4 pairs, sha256 "),
        (HELD_OUT, {"train_prompts": ["sun moon", "bird"]}, "train_prompts None → 2 prompts, sha256 "),
    ):
        if "seed" in other:
            other["estimator"] = "log_ratio"
        with pytest.raises(ValueError, match="^the monitor's settings differ from those of the run being resumed "
                                             rf"\(.*{re.escape(named)}.*\): its logged checks measured something "
                                             "else. Give HackingMonitorCallback the settings the run started with"):
            logged_checks(tok, teacher, student, 5, prompts, log=upto3, **options | other)


def test_a_resume_whose_teacher_samples_differ_warns_and_drops_the_pairing(tok, teacher):
    """The same settings, other teacher samples (here a bfloat16 teacher, which flips tokens in 6 of the 12 rows; as
    another device can): the run goes on, warned, and no verdict pairs values across the change."""
    options = dict(max_new_tokens=8, references=real_pairs(tok, make_model(7, init=0.5).eval(), 4))
    student = perturbed(teacher)
    _, log = logged_checks(tok, teacher, student, 4, **options)
    with pytest.warns(MonitorWarning, match=r"^the teacher's samples differ from those of the run being resumed "
                                            r"\(12 samples, sha256 \w+ → 12 samples, sha256 \w+\): another device"):
        resumed, _ = logged_checks(tok, copy.deepcopy(teacher).to(torch.bfloat16), student, 5, log=log, **options)
    assert resumed.monitor.paired_values[:4] == [None] * 4 and resumed.monitor.paired_values[4] is not None
    logged = [row["proxy_kl"] for row in log if "proxy_kl" in row]
    assert [row["proxy"] for row in resumed.monitor.history[:4]] == logged  # replayed as logged, then measured anew


def test_a_proxy_that_is_not_finite_is_logged_warned_once_and_replayed(tok, teacher):
    """A student whose weights turn NaN: its proxy and reference NLL are logged as NaN (they were left out, under
    flags that read "no alarm"), with no alarm flags, and one warning; a resume gets each such check back, so that
    the later checks keep their indices (the rule's skip and patience count them)."""
    options = dict(max_new_tokens=8, references=real_pairs(tok, make_model(7, init=0.5).eval(), 4))
    student = perturbed(teacher)
    callback, log = logged_checks(tok, teacher, student, 5, **options)
    with torch.no_grad():
        student.transformer.h[0].mlp.c_fc.weight[0, 0] = math.nan
    with pytest.warns(MonitorWarning, match="^proxy_kl is nan at step 5: the student's log-probabilities") as caught:
        _, log = logged_checks(tok, teacher, student, 8, log=log, **options)
    assert len([w for w in caught if issubclass(w.category, MonitorWarning)]) == 1
    rows = [row for row in log if "proxy_kl" in row]
    assert [row["step"] for row in rows] == list(range(8))
    assert all(math.isnan(row["proxy_kl"]) and math.isnan(row["reference_nll"]) for row in rows[5:])
    assert all("hacking_alert" in row and "reference_alert" in row for row in rows[:5])
    assert not any("hacking_alert" in row or "reference_alert" in row for row in log if row["step"] >= 5)
    earlier = [row for row in log if not ("proxy_kl" in row and math.isnan(row["proxy_kl"]))]  # as logged before
    for kept in (log, earlier):
        resumed, _ = logged_checks(tok, teacher, student, 8, log=kept, **options)
        assert [row["step"] for row in resumed.monitor.history] == list(range(8))
        assert all(math.isnan(row["proxy"]) for row in resumed.monitor.history[5:])
