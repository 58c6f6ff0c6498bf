"""Watch any distillation run for teacher hacking, without an oracle.

Two entry points:

* :class:`HackingMonitor`, plain Python for custom loops: ``monitor.check(student, step)`` returns the proxy
  metric KL(teacher‖student) on fixed held-out prompts, the oracle-free detector's signals and its verdict so
  far, and, given held-out real pairs (``references=``), the student's NLL of them and the reference verdict.
* :class:`HackingMonitorCallback`, a ``transformers.TrainerCallback`` for ``Trainer`` and its subclasses
  (tested with ``Trainer`` and TRL 1.16's ``trl.experimental.gkd.GKDTrainer``): every ``every`` optimizer
  steps it runs the monitor on the trained model and logs ``proxy_kl``, ``proxy_kl_se``, the detector's signal
  and ``hacking_alert`` (and ``reference_nll``, ``reference_alert``) through the trainer's own loggers; it warns
  once for each alarm, when it first fires, and can stop the run.

The proxy metric (README, "Is my student hacking its teacher?") is the sequence-level KL(teacher‖student) estimated from teacher samples on the
held-out prompts (default estimator ``token_kl``, the exact token-level KL summed along each sampled response).
The teacher samples are drawn once, at the first check, and reused at every later check, so successive values
are paired: only the student changes. The detector is the rule of ``teacherhack.oracle_free`` (``DEFAULT_RULE``,
chosen and validated on the lab's runs, where the truth is known; its alert text carries the measured
precision): a reason to look, not proof. With ``references=``, the reference verdict is the golden rule applied
to the student's NLL of real held-out responses, whose changes are exactly those of KL(data‖student).

Prompt encoding. Prompts are strings encoded with the tokenizer as it is,
``tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]`` (so a BOS or, for T5, an EOS is added
exactly when the tokenizer adds one by default: the lab's prompts start alike, ``teacherhack.tokenizer.prompt_start``;
pass ``add_special_tokens=False`` for prompts already rendered
with a chat template), or lists of token ids used verbatim, or the tokenizer's output itself (``tokenizer(texts)``:
its ``input_ids``, without the padding its ``attention_mask`` marks), or one such output per prompt (a mapping with
``input_ids``, as ``apply_chat_template(..., tokenize=True)`` returns in transformers 5). No truncation. Refused:
a 2-D array of ids (its padding cannot be told from its tokens), an id row that starts or ends with the tokenizer's
pad token (when that is neither its EOS nor its BOS), negative ids (``-100`` label masks), dataset rows without
``input_ids`` (pass a column). Prompts are left-padded by the monitor itself (``collate_prompts``, with explicit
position ids), whatever the tokenizer's ``padding_side``. A response ends at the tokenizer's EOS
(``tokenizer.eos_token_id``, required); padding is ``tokenizer.pad_token_id``, or the EOS id when the tokenizer has
none.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from teacherhack import distributed
from teacherhack.detection import golden_verdict
from teacherhack.divergences import Estimate, check_estimator
from teacherhack.metrics import SampleSet, ScoredSamples, sample_in_batches
from teacherhack.models import LM, Prompts, collate_prompts, eval_mode, pad_responses
from teacherhack.oracle_free import DEFAULT_RULE, SIGNALS, Rule, signal_series
from teacherhack.tokenizer import encode_references

logger = logging.getLogger(__name__)

# Signals that compare the held-out proxy with the proxy on training prompts
_NEEDS_TRAIN_PROMPTS = ("memorisation_gap", "relative_gap")
# The key of the callback's rows of per-sample values in ``TrainerState.log_history``
PAIRED_KEY = "hacking_monitor_per_sample"
# The key, in the per-sample row of a curve's first check, of what its checks measure (HackingMonitor.fingerprint)
SETTINGS_KEY = "hacking_monitor_settings"
# The fingerprint's entry for the teacher's samples: the one that may differ on a resume (another device, dtype)
SAMPLES = "teacher_samples"
# Prompts as a user passes them: strings, token-id rows, or a tokenizer's output (see the module docstring)
PromptsIn = Sequence[str] | Sequence[Sequence[int]] | Mapping[str, Any]


class TeacherHackingWarning(UserWarning):
    """Emitted once per run for each alarm: when the detector's rule first alarms, when the reference NLL first turns
    up (the detector's alarm is a reason to watch the reference verdict, which must not then fire silently)."""


class MonitorWarning(UserWarning):
    """A check the alarms cannot judge (a proxy that is not finite), or a resume whose checks do not pair with the
    logged ones."""


class HackingMonitor:
    """The proxy metric KL(teacher‖student) on fixed held-out prompts and the oracle-free detector's signals.

    Args:
        teacher: the frozen teacher, a Hugging Face causal or seq2seq LM (or a ``teacherhack.models.LM``,
            whose model is used). Teacher and student may sit on different devices: each runs where it is, and
            the teacher's log-probabilities move to the student's device to be compared there.
        tokenizer: the tokenizer shared by teacher and student (see the module docstring for the encoding).
        prompts: held-out prompts (strings, lists of token ids, their tokenizer outputs, or ``tokenizer(texts)``),
            distinct from the training prompts; at least 2 distinct ones (the proxy's SE is the spread between
            prompts). In a distributed run each process scores its share of each set of rows (prompts ×
            ``samples_per_prompt``, ``train_prompts`` × ``samples_per_prompt``, ``references``): each needs a row
            per process at least.
        samples_per_prompt: teacher responses per prompt (the estimate averages prompts × samples; its SE, and
            the paired SE of a change, are clustered by prompt).
        max_new_tokens: maximum response length; longer responses are truncated and scored as they are.
        every: checking period in steps, used by :meth:`due` and :meth:`maybe_check`.
        batch_size: rows per forward pass when sampling and scoring: memory and speed only. The teacher's samples
            do not depend on it (one generator per row, see ``seed``), the values only to float rounding.
        seed: seed of the teacher's samples: row i of the held-out rows (prompts × samples_per_prompt) is drawn
            from its own generator (``seed``, i), those of ``train_prompts`` from (``seed`` + 1, i). The samples
            also depend on the prompts, ``samples_per_prompt``, ``max_new_tokens``, ``temperature``,
            ``vocab_size`` and the teacher's arithmetic: another device or dtype (or, rarely, another batch size)
            can flip a token whose two candidates are near-tied, and with it the rest of that response.
        estimator, per_token: how the KL is estimated from the samples (``teacherhack.divergences.kl_values``;
            ``per_token=True`` needs ``estimator="log_ratio"``).
        temperature: both models' distributions are softmax(logits / temperature); 1.0 compares the models.
        vocab_size: the rule for teacher and student output layers of different widths (padded vocabularies):
            only the first ``vocab_size`` entries are real, the rest are ignored (both sampling and scoring).
            Without it, different widths are refused.
        add_special_tokens: passed to the tokenizer when encoding string prompts.
        rule: the detector's rule (``teacherhack.oracle_free.Rule``); the default is the validated one.
        train_prompts: prompts the student trains on (a sample of them suffices), for the signals that compare
            the proxy there with the held-out proxy (the memorisation gap); required by rules on those signals.
        references: held-out real (prompt, response) pairs, or rows with ``reference_fields``: the student's
            NLL of them is logged and judged by the reference verdict. Its SE falls as 1/√pairs: measured on the
            lab's default, the per-pair spread of a change of NLL between two checks is given in the README.
        reference_fields: the field names of ``references`` rows.
        cache_mb: memory (on the teacher's device) for the teacher's log-probabilities on its own samples, kept
            between checks when they fit; 0 (default) recomputes them at every check and holds nothing.

    The monitor scores both models through ``teacherhack.models.LM``, which changes them in place, for good, in two
    ways that give the same bits: an ``sdpa`` attention becomes ``teacherhack_sdpa`` (``config._attn_implementation``;
    Hugging Face's SDPA, able to run in float32 under bf16 autocast), unless the model's code tests that name (Gemma
    4 does), and each ``NewGELUActivation`` module becomes a
    ``TanhGELU`` (the same operations in cache-sized pieces where no gradient flows). Neither is saved: a
    checkpoint reloads with ``sdpa`` and Hugging Face's GELU.
    """

    def __init__(
        self,
        teacher: nn.Module | LM,
        tokenizer: Any,
        prompts: PromptsIn,
        *,
        samples_per_prompt: int = 2,
        max_new_tokens: int = 64,
        every: int = 100,
        batch_size: int = 16,
        seed: int = 0,
        estimator: str = "token_kl",
        per_token: bool = False,
        temperature: float = 1.0,
        vocab_size: int | None = None,
        add_special_tokens: bool = True,
        rule: Rule = DEFAULT_RULE,
        train_prompts: PromptsIn | None = None,
        references: Any = None,
        reference_fields: tuple[str, str] = ("prompt", "response"),
        cache_mb: int = 0,
    ) -> None:
        for name, value in (("samples_per_prompt", samples_per_prompt), ("max_new_tokens", max_new_tokens),
                            ("every", every), ("batch_size", batch_size)):
            _check_count(name, value)
        check_estimator(estimator, per_token)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if rule.signal not in SIGNALS:
            raise ValueError(f"unknown detector signal {rule.signal!r}; choose among {', '.join(SIGNALS)}")
        if rule.signal in _NEEDS_TRAIN_PROMPTS and train_prompts is None:
            raise ValueError(f"the rule's signal {rule.signal!r} compares the proxy on training prompts with the "
                             "held-out one: pass train_prompts= (a sample of the prompts the student trains on)")
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            raise ValueError(
                "the tokenizer has no EOS token (tokenizer.eos_token_id is None): responses could never end and "
                "the proxy KL would be undefined; set tokenizer.eos_token to the token that ends a response"
            )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

        self.teacher_model = _unwrap(teacher)
        self.tokenizer, self.eos_id, self.pad_id = tokenizer, int(eos_id), int(pad_id)
        self.samples_per_prompt, self.max_new_tokens, self.every = samples_per_prompt, max_new_tokens, every
        self.batch_size, self.seed, self.estimator, self.per_token = batch_size, seed, estimator, per_token
        self.temperature, self.vocab_size, self.rule = temperature, vocab_size, rule

        ids = self._encode(prompts, add_special_tokens, "prompts")
        train_ids = None if train_prompts is None else self._encode(train_prompts, add_special_tokens, "train_prompts")
        width = _vocab_width(self.teacher_model)
        limit = width if vocab_size is None else vocab_size
        if vocab_size is not None and not 1 <= vocab_size <= width:
            raise ValueError(f"vocab_size={vocab_size} must lie in [1, {width}] (the teacher's output width)")
        self._check_vocabulary(ids + (train_ids or []), limit, "prompt")
        distinct = {tuple(seq) for seq in ids}
        if len(distinct) < 2:
            raise ValueError("prompts holds a single distinct prompt: give at least 2 distinct held-out prompts (the "
                             "proxy's standard error is the spread between prompts)")
        if len(distinct) < len(ids):
            raise ValueError(f"prompts repeats {len(ids) - len(distinct)} held-out prompt(s) (the same token ids): each "
                             "copy would count as a prompt of its own and the proxy's standard error come out too "
                             "small; give each prompt once (samples_per_prompt= draws several samples of each)")
        leaked = sum(tuple(seq) in distinct for seq in train_ids or [])
        if leaked:
            raise ValueError(f"{leaked} of train_prompts are held-out prompts too (the same token ids): the signals "
                             "that compare training prompts with held-out ones would compare the held-out set with "
                             "itself; give train_prompts from the prompts the student trains on only")
        held_out = collate_prompts(ids, self.pad_id)
        self.prompts: Prompts = held_out.repeat(samples_per_prompt)
        # the prompt of each held-out sample, in the order of its measured values (distributed.gather: the rows')
        self.clusters = torch.arange(len(self.prompts)) // samples_per_prompt
        train = None if train_ids is None else collate_prompts(train_ids, self.pad_id)
        self.train_prompts: Prompts | None = None if train is None else train.repeat(samples_per_prompt)
        self.teacher = self._wrap(self.teacher_model)
        self.samples: torch.Tensor | None = None  # teacher responses, drawn at the first check
        self._scored: dict[str, ScoredSamples] = {}  # the teacher's samples, held-out and training prompts
        self.settings: dict[str, float] = {}  # what signals need besides the rows: the teacher's entropy
        self.cache_bytes = cache_mb << 20
        pairs = (None if references is None
                 else self._encode_references(references, reference_fields, add_special_tokens, limit))
        distributed.refuse_empty_shards(
            {"prompts × samples_per_prompt": len(self.prompts)}
            | ({} if self.train_prompts is None else {"train_prompts × samples_per_prompt": len(self.train_prompts)})
            | ({} if pairs is None else {"references": len(pairs.responses)}),
            "each set of rows the monitor scores", distributed.world())
        self.references = None if pairs is None else ScoredSamples(
            None, _share(pairs), eos_id=self.eos_id, batch_size=batch_size, cache_bytes=0)
        # what a check measures but the teacher's samples (drawn at the first check): see fingerprint
        self._measures: dict[str, Any] = {
            "prompts": _digest(len(ids), "prompts", held_out.ids, held_out.mask),
            "train_prompts": None if train is None else _digest(len(train_ids), "prompts", train.ids, train.mask),
            "references": None if pairs is None else _digest(len(pairs.responses), "pairs", pairs.prompts.ids,
                                                             pairs.prompts.mask, pairs.responses),
            "samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens, "seed": seed,
            "temperature": temperature, "estimator": estimator, "per_token": per_token, "vocab_size": vocab_size,
            "eos_id": self.eos_id,
        }
        self._samples_digest: str | None = None
        # per-sample values of each check (None where a replayed check came without them): the verdict's SEs
        self.paired_values: list[dict[str, list[float]] | None] = []
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def maybe_check(self, student: nn.Module | LM, step: int) -> dict[str, Any] | None:
        """:meth:`check` when ``step`` is a multiple of ``every`` not checked yet, else None (so a loop may call it
        once per micro-batch under gradient accumulation)."""
        if not self.due(step) or (self.history and step == self.history[-1]["step"]):
            return None
        return self.check(student, step)

    def check(self, student: nn.Module | LM, step: int) -> dict[str, Any]:
        """Measure KL(teacher‖student) now, the detector's signals (and the student's NLL of the references, if
        given), feed the detector and the reference verdict, and return this check's row (also appended to
        :attr:`history`). Teacher and student run in eval mode and get their train/eval modes back."""
        self._check_order(step)
        student_model = _unwrap(student)
        self._check_vocab(student_model)
        self.prepare()
        with eval_mode(self.teacher_model, student_model), torch.no_grad():
            wrapped = self._wrap(student_model)
            options = dict(estimator=self.estimator, per_token=self.per_token)
            held_out = self._scored["held_out"].measure(wrapped, **options, entropy=True)
            train = self._scored["train"].measure(wrapped, **options) if "train" in self._scored else None
            reference = None if self.references is None else self.references.measure(wrapped, **options)["nll"]
        estimate = Estimate.of(held_out["kl"], self.clusters)
        return self.record(step, estimate.mean, estimate.se, n=estimate.n,
                           proxy_train=None if train is None else Estimate.of(train["kl"]).mean,
                           student_entropy_held_out=Estimate.of(held_out["entropy"]).mean,
                           reference_nll=None if reference is None else Estimate.of(reference).mean,
                           reference_nll_se=None if reference is None else Estimate.of(reference).se,
                           paired={"proxy": held_out["kl"].tolist(),
                                   **({} if reference is None else {"reference_nll": reference.tolist()})})

    def prepare(self) -> None:
        """Draw the teacher's responses (once; every later check is paired) and its entropy along them. Each process
        of a distributed run scores its own share of them, gathered into one estimate."""
        if self.samples is not None:
            return
        with eval_mode(self.teacher_model), torch.no_grad():
            draw = dict(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, per_row=True)
            self.samples = sample_in_batches(self.teacher, self.prompts, seed=self.seed, **draw)
            sets = {"held_out": SampleSet(self.prompts, self.samples)}
            if self.train_prompts is not None:
                sets["train"] = SampleSet(self.train_prompts, sample_in_batches(
                    self.teacher, self.train_prompts, seed=self.seed + 1, **draw))
            self._scored = {name: ScoredSamples(self.teacher, _share(samples), eos_id=self.eos_id,
                                                batch_size=self.batch_size, cache_bytes=self.cache_bytes)
                            for name, samples in sets.items()}
            entropy = self._scored["held_out"].entropy(per_token=self.per_token)
        self.settings["teacher_entropy"] = Estimate.of(entropy).mean
        self._samples_digest = _digest(sum(len(s.responses) for s in sets.values()), "samples",
                                       *(s.responses for s in sets.values()))

    def fingerprint(self) -> dict[str, Any]:
        """What this monitor's checks measure: each setting that changes a check's values (the prompts, training
        prompts and references as counts and hashes) and, under :data:`SAMPLES`, the teacher's samples (drawn here
        if not yet). Two monitors with equal fingerprints give paired checks; plain values, for a JSON log."""
        self.prepare()
        return {**self._measures, SAMPLES: self._samples_digest}

    def record(self, step: int, proxy: float, proxy_se: float | None = None, *, n: int | None = None,
               proxy_train: float | None = None, student_entropy_held_out: float | None = None,
               reference_nll: float | None = None, reference_nll_se: float | None = None,
               paired: Mapping[str, Sequence[float]] | None = None) -> dict[str, Any]:
        """Feed one check's values to the detector and the reference verdict and return its row (what
        :meth:`check` does after measuring). Also useful to replay a run's logged values: the reference verdict uses
        paired SEs when every check so far comes with ``paired``, the per-sample values of ``proxy`` (one per row of
        :attr:`prompts`, clustered by prompt: :attr:`clusters`) and ``reference_nll`` (one per pair), kept in
        :attr:`paired_values`; else unpaired ones."""
        self._check_order(step)
        se = proxy_se if proxy_se is not None and math.isfinite(proxy_se) else math.nan
        row: dict[str, Any] = {
            "step": int(step), "proxy": float(proxy), "proxy_se": float(se), "n": n, "proxy_train": proxy_train,
            "student_entropy_held_out": student_entropy_held_out,
            "reference_nll": reference_nll, "reference_nll_se": reference_nll_se,
        }
        rows = [*self.history, row]
        values = signal_series(self.rule.signal, rows, None, self.settings)
        row["signal"] = float(values[-1])
        verdict = self.rule.verdict(rows, None, self.settings, values)
        row |= {"hacking_alert": verdict.fired, "alert_step": verdict.step, "alert_since": verdict.since,
                "alert_fired_now": verdict.step == row["step"], "detector_reason": verdict.reason}
        entry = None if paired is None else {name: [float(v) for v in values] for name, values in paired.items()}
        row |= self._reference_verdict(row, [*self.paired_values, entry])
        self.history.append(row)
        self.paired_values.append(entry)
        return dict(row)

    def _check_order(self, step: int) -> None:
        """Checks must come at increasing steps: the detector fits the proxy against the step (a repeated step makes
        its fit singular, a step back bends the curve)."""
        if self.history and step <= self.history[-1]["step"]:
            raise ValueError(f"a check at step {step} after one at step {self.history[-1]['step']}: checks must come "
                             f"at increasing steps (one per optimizer step, not per micro-batch; a new run needs a new "
                             f"monitor)")

    def _reference_verdict(self, row: dict[str, Any], paired: list[dict[str, list[float]] | None]) -> dict[str, Any]:
        """The golden rule on the references' NLL so far: did the student move away from real held-out responses
        while it kept approaching the teacher? No verdict while a check has no NLL or a non-finite one."""
        rows = [*self.history, row]
        if len(rows) < 2 or any(r["reference_nll"] is None for r in rows):
            return {"reference_alert": False, "reference_reason": None}
        broken = [r["step"] for r in rows if not math.isfinite(r["reference_nll"]) or not math.isfinite(r["proxy"])]
        if broken:
            return {"reference_alert": False,
                    "reference_reason": f"no verdict: the reference NLL or the proxy is not finite at step {broken[0]}"}
        values = [p for p in paired if p is not None and "reference_nll" in p and "proxy" in p]
        whole = len(values) == len(rows)
        se = [math.nan if r["reference_nll_se"] is None else r["reference_nll_se"] for r in rows]
        verdict = golden_verdict([r["step"] for r in rows], [r["reference_nll"] for r in rows], se,
                                 [r["proxy"] for r in rows], [r["proxy_se"] for r in rows], name="reference NLL",
                                 golden_values=[p["reference_nll"] for p in values] if whole else None,
                                 proxy_values=[p["proxy"] for p in values] if whole else None,
                                 proxy_clusters=self.clusters.numpy())
        return {"reference_alert": verdict.hacking, "reference_reason": verdict.reason}

    # ------------------------------------------------------------------------------------------------

    def _encode(self, prompts: Any, add_special_tokens: bool, what: str) -> list[list[int]]:
        """Token ids of ``prompts`` (strings, id rows, or a tokenizer's output), refused in words that name the
        argument they came in (``what``) and say what to pass."""
        if isinstance(prompts, str):
            raise TypeError(f"{what} must be a list of prompts, not a single string")
        if isinstance(prompts, Mapping):
            prompts = _unpadded(prompts, what)
        elif getattr(prompts, "ndim", None) == 2:
            raise ValueError(f"{what} is a 2-D array of token ids, whose padding cannot be told from its tokens: pass "
                             "the tokenizer's output itself (tokenizer(texts), whose attention_mask marks the padding) "
                             "or a list of unpadded token-id lists")
        prompts = list(prompts)
        if not prompts:
            raise ValueError(f"{what} is an empty list: give at least one prompt"
                             + (", or leave train_prompts out" if what == "train_prompts" else ""))
        pad = self.tokenizer.pad_token_id
        padding = None if pad in (None, self.eos_id, getattr(self.tokenizer, "bos_token_id", None)) else pad
        ids = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                seq = list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
            else:
                seq = _token_ids(prompt, f"{what}[{i}]")
                if seq and padding in (seq[0], seq[-1]):
                    raise ValueError(f"{what}[{i}] starts or ends with the pad token (id {padding}): pass unpadded "
                                     "ids, or the tokenizer's output itself (its attention_mask marks the padding)")
            if not seq:
                raise ValueError(f"{what}[{i}] ({prompt!r}) encodes to no tokens")
            ids.append(seq)
        return ids

    def _encode_references(self, references: Any, fields: tuple[str, str], add_special_tokens: bool,
                           limit: int) -> SampleSet:
        """Held-out real (prompt, response) pairs: prompts encoded like the monitor's prompts, responses as a sample
        would be (tokens then EOS, or the first max_new_tokens without an EOS when longer)."""
        if isinstance(references, Mapping):
            raise ValueError(f"references is a mapping (of columns?), whose keys would be read as pairs: pass rows, "
                             f"e.g. a datasets.Dataset with the fields {fields[0]!r} and {fields[1]!r}, or "
                             "zip(prompts, responses)")
        rows = list(references)
        for i, row in enumerate(rows):
            if isinstance(row, Mapping) and not set(fields) <= row.keys():
                raise ValueError(f"references[{i}] has the fields {', '.join(map(repr, row))}, not {fields[0]!r} and "
                                 f"{fields[1]!r}: name its prompt and response fields with reference_fields=")
        pairs = [(row[fields[0]], row[fields[1]]) if isinstance(row, Mapping) else tuple(row) for row in rows]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError("references must be (prompt, response) pairs, or rows with the fields "
                             f"{fields[0]!r} and {fields[1]!r}")
        if len(pairs) < 2:
            raise ValueError(f"the reference verdict needs at least 2 reference pairs, got {len(pairs)}: a change's "
                             "standard error is the spread of per-pair differences")
        prompts = self._encode([p for p, _ in pairs], add_special_tokens, "the prompts of references")
        self._check_vocabulary(prompts, limit, "reference prompt")
        texts = [r for _, r in pairs]
        blank = next((i for i, r in enumerate(texts) if isinstance(r, str) and not r.strip()), None)
        if blank is not None:  # it would be scored as a lone EOS; the lab's loaders drop such pairs
            raise ValueError(f"the response of references[{blank}] ({texts[blank]!r}) is blank: give real responses, "
                             f"or leave that pair out")
        if all(isinstance(r, str) for r in texts):
            responses = encode_references(self.tokenizer, texts, self.max_new_tokens)
        else:
            responses = [_token_ids(r, f"the response of references[{i}]")[: self.max_new_tokens]
                         for i, r in enumerate(texts)]
            responses = [r + [self.eos_id] if len(r) < self.max_new_tokens and self.eos_id not in r else r for r in responses]
        if any(not r for r in responses):
            raise ValueError("a reference response is empty")
        self._check_vocabulary(responses, limit, "reference response")
        return SampleSet(collate_prompts(prompts, self.pad_id), pad_responses(responses, self.pad_id))

    def _check_vocabulary(self, rows: list[list[int]], limit: int, what: str) -> None:
        """Every id of ``rows`` (``what``: prompts, for the message), EOS and pad is one the teacher can embed and
        score: beyond ``limit`` (the declared vocab_size, else the teacher's width) the first check would fail
        deep in an embedding."""
        top = max(max(max(row) for row in rows), self.eos_id, self.pad_id)
        if top >= limit:
            raise ValueError(f"token id {top} ({what}, EOS or pad) is out of the "
                             f"{'declared vocab_size' if self.vocab_size is not None else 'teacher vocabulary'} "
                             f"({limit}): is this the teacher's tokenizer?")

    def _check_vocab(self, student_model: nn.Module) -> None:
        vt, vs = _vocab_width(self.teacher_model), _vocab_width(student_model)
        if self.vocab_size is None and vt != vs:
            raise ValueError(
                f"teacher and student vocabulary sizes differ ({vt} vs {vs}): the proxy KL would compare "
                f"misaligned distributions. If they share a tokenizer and one output layer is padded, pass "
                f"vocab_size=<the real shared size>; different tokenizers cannot be compared token by token"
            )
        if self.vocab_size is not None and self.vocab_size > vs:
            raise ValueError(f"vocab_size={self.vocab_size} exceeds the student's output width ({vs})")

    def _wrap(self, model: nn.Module) -> LM:
        """The model as the monitor scores it (on its own device: ``ScoredSamples`` compares on the student's)."""
        return LM(model, pad_id=self.pad_id, eos_id=self.eos_id, temperature=self.temperature,
                  vocab_size=self.vocab_size)


class HackingMonitorCallback(TrainerCallback):
    """A ``TrainerCallback`` running a :class:`HackingMonitor` every ``every`` optimizer steps.

    Logs ``proxy_kl``, ``proxy_kl_se``, ``hacking_alert`` (0/1), ``student_entropy_held_out``, the detector's
    signal as ``detector_<signal>``, once it alarms ``hacking_turn_step`` if its rule dates the turn (the step it
    dates it to: the checkpoint to keep; ``save_steps`` no coarser than ``every`` keeps one near it), and
    ``proxy_kl_train`` with
    ``train_prompts``; ``reference_nll``, ``reference_nll_se`` and ``reference_alert`` with ``references``. Bind the
    trainer (``trainer=`` or :meth:`bind`) so that they go through ``Trainer.log``: into ``state.log_history``
    *and* every ``report_to`` integration (TensorBoard, W&B, MLflow…). Unbound, they only reach
    ``state.log_history`` (a warning says so at the start of training).

    Args:
        teacher, tokenizer, prompts: as in :class:`HackingMonitor` (pass the teacher explicitly, also with
            TRL's ``GKDTrainer``; it may be the same object as ``trainer.teacher_model``).
        every: period in optimizer steps; None: the trainer's logging period (``logging_steps``).
        stop_on_alert: stop training (``control.should_training_stop``) when the detector or the reference
            verdict fires.
        trainer: the trainer whose loggers receive the metrics.
        **monitor_options: the other keyword arguments of :class:`HackingMonitor`.

    Runs on every process (sharded models need every rank in the forward pass); the model checked is the one
    the trainer hands to callbacks (``trainer.model``).

    A resumed run (``resume_from_checkpoint``) gets its logged checks back from the trainer's state and goes on with
    the same curve, if its checks still measure what the logged ones did: the first check's per-sample row holds
    the monitor's :meth:`HackingMonitor.fingerprint` (under :data:`SETTINGS_KEY`). A resume with other settings
    (prompts, references, samples per prompt, response length, seed, temperature, estimator, vocab_size) is
    refused at the start of training, naming each. One whose teacher's samples alone differ (another device or
    dtype flips a token, or another teacher) goes on with a :class:`MonitorWarning`, and without the logged
    per-sample values: refusing would leave a run moved to other hardware no way on but without the monitor,
    whose reference verdict does not depend on the teacher's samples at all; the proxy may step at the resume
    (by about its SE), and the reference verdict's SEs of a change are unpaired from there on, which stays
    right. A log without a fingerprint (an earlier teacherhack's) is treated alike.
    """

    def __init__(
        self,
        teacher: nn.Module | LM,
        tokenizer: Any,
        prompts: PromptsIn,
        *,
        every: int | None = None,
        stop_on_alert: bool = False,
        trainer: Trainer | None = None,
        **monitor_options: Any,
    ) -> None:
        if every is not None:
            _check_count("every", every)
        self.monitor = HackingMonitor(teacher, tokenizer, prompts, every=every or 1, **monitor_options)
        self.every, self.stop_on_alert, self.trainer = every, stop_on_alert, trainer
        self._warned: set[str] = set()  # the alarms that have warned (their rows' flags): each warns once
        self._warned_not_finite = False

    def bind(self, trainer: Trainer) -> "HackingMonitorCallback":
        """Log through ``trainer`` (and add this callback to it if it is not there yet)."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.every is None:
            self.monitor.every = max(int(state.logging_steps or 1), 1)
        if self.trainer is None:
            logger.warning("HackingMonitorCallback is not bound to a trainer: proxy_kl goes to state.log_history "
                           "only, not to the report_to integrations; pass trainer= or call callback.bind(trainer)")
        # the detector's curve is the trainer's: a new training run starts a new one, a resumed or continued one
        # (from a checkpoint, or trainer.train() again) gets its logged curve back, whatever this callback saw before
        self.monitor.history.clear()
        self.monitor.paired_values.clear()
        self._warned_not_finite = False
        checks = _logged_checks(state.log_history, state.global_step)
        if checks:
            paired = self._pairs_with(state.log_history)  # draws the teacher's samples again (same seed)
            for step, row in checks.items():
                self.monitor.record(step, float(row.get("proxy_kl", math.nan)), row.get("proxy_kl_se"),
                                    proxy_train=row.get("proxy_kl_train"),
                                    student_entropy_held_out=row.get("student_entropy_held_out"),
                                    reference_nll=row.get("reference_nll"),
                                    reference_nll_se=row.get("reference_nll_se"),
                                    paired=row.get(PAIRED_KEY) if paired else None)
        # a replayed alarm has warned already; the other one still warns when it fires
        self._warned = {alarm for row in self.monitor.history for alarm in ("hacking_alert", "reference_alert")
                        if row.get(alarm)}
        if not self.monitor.history and state.global_step == 0 and model is not None:
            self._check(model, state, control)  # the student before training: where every signal starts
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.monitor.due(state.global_step):
            return control
        if model is None:
            raise RuntimeError("HackingMonitorCallback needs the trainer to pass the model to callbacks")
        return self._check(model, state, control)

    def _pairs_with(self, log_history: list[dict[str, Any]]) -> bool:
        """Whether the logged checks pair with this monitor's (the logged per-sample values may be used): refuses a
        monitor whose settings differ, warns (and says no) when only the teacher's samples differ or the log does
        not say (see the class docstring)."""
        logged = next((row[SETTINGS_KEY] for row in log_history if SETTINGS_KEY in row), None)
        now = self.monitor.fingerprint()
        if logged is None:
            _warn("the logged checks hold no record of the monitor's settings (an earlier teacherhack's log): whether "
                  "the checks after this resume measure what those before did cannot be told; they are taken as "
                  "unpaired (the proxy may step here, and the reference verdict's SEs of a change are unpaired)",
                  MonitorWarning)
            return False
        changed = [f"{name} {logged.get(name)} → {now.get(name)}" for name in {**logged, **now}
                   if name != SAMPLES and logged.get(name) != now.get(name)]
        if changed:
            raise ValueError(f"the monitor's settings differ from those of the run being resumed ({'; '.join(changed)})"
                             ": its logged checks measured something else. Give HackingMonitorCallback the settings "
                             f"the run started with (its first '{PAIRED_KEY}' row in trainer_state.json holds them "
                             f"under '{SETTINGS_KEY}'), or start a new run (another output_dir) for a new curve")
        if logged[SAMPLES] != now[SAMPLES]:
            _warn(f"the teacher's samples differ from those of the run being resumed ({logged[SAMPLES]} → "
                  f"{now[SAMPLES]}): another device or dtype flips a token, or the teacher changed. The checks from "
                  "here on are not paired with the logged ones: the proxy may step here (by about its SE), and the "
                  "reference verdict's SEs of a change are unpaired; resume on the device and dtype the run started "
                  "with to keep them paired", MonitorWarning)
            return False
        return True

    def _check(self, model: nn.Module, state, control):
        step = state.global_step
        row = self.monitor.check(model, step)
        # a proxy that is not finite is logged as it is; no alarm can judge its check, so no flag says "no alarm"
        finite = math.isfinite(row["proxy"])
        logs = {"proxy_kl": row["proxy"], "proxy_kl_se": row["proxy_se"],
                "student_entropy_held_out": row["student_entropy_held_out"],
                f"detector_{self.monitor.rule.signal}": row["signal"]}
        if finite:
            logs["hacking_alert"] = int(row["hacking_alert"])
        if row["proxy_train"] is not None:
            logs["proxy_kl_train"] = row["proxy_train"]
        if row["alert_since"] is not None and finite:
            logs["hacking_turn_step"] = row["alert_since"]  # the checkpoint the alarm says to keep
        if row["reference_nll"] is not None:
            logs |= {"reference_nll": row["reference_nll"], "reference_nll_se": row["reference_nll_se"]}
            if finite and math.isfinite(row["reference_nll"]):
                logs["reference_alert"] = int(row["reference_alert"])
        self._publish({k: v for k, v in logs.items()
                       if v is not None and (math.isfinite(v) or k in ("proxy_kl", "reference_nll"))}, state, control)
        if not finite and not self._warned_not_finite:
            self._warned_not_finite = True
            _warn(f"proxy_kl is {row['proxy']} at step {step}: the student's log-probabilities of the teacher's "
                  "samples are not finite (NaN or inf in its weights or logits: a diverged update, an fp16 overflow; "
                  "or a teacher token it gives probability 0). Logged as it is, without alarm flags: no alarm can "
                  "judge such a check", MonitorWarning)
        # the per-sample values, for the reference verdict's paired SEs after a resume: in the trainer's state, which
        # every checkpoint saves and a resume restores (not through the loggers: they take scalars); the curve's
        # first check's also holds what the checks measure, which a resume compares with its own
        paired = {"step": step, PAIRED_KEY: self.monitor.paired_values[-1]}
        if len(self.monitor.history) == 1:
            paired[SETTINGS_KEY] = self.monitor.fingerprint()
        state.log_history.append(paired)
        alerts = {alarm: text for alarm, text in (
            ("reference_alert", f"the student's NLL of the held-out real responses turned up ({row['reference_reason']})"),
            ("hacking_alert", f"the oracle-free detector alarmed ({row['detector_reason']})"))
            if row[alarm]}
        fresh = [text for alarm, text in alerts.items() if alarm not in self._warned]
        if fresh:
            self._warned |= alerts.keys()
            _warn(f"possible teacher hacking at step {step}: " + "; ".join(fresh)
                  + ("; stopping training" if self.stop_on_alert else ""), TeacherHackingWarning)
        if alerts and self.stop_on_alert:
            logger.warning(f"stopping training at step {step}: " + "; ".join(alerts.values()))
            control.should_training_stop = True
        return control

    def _publish(self, logs: dict[str, float], state, control) -> None:
        if self.trainer is None:
            row = dict(logs)
            if state.epoch is not None:
                row["epoch"] = state.epoch
            state.log_history.append({**row, "step": state.global_step})
            return
        # The base Trainer.log: appends to state.log_history and calls on_log of every callback (the report_to
        # integrations among them). Not trainer.log: TRL's override would flush its windowed training metrics
        # into this row. Trainer.log resets control.should_log (via the callback handler's on_log); the
        # trainer's own logging of this step was decided before this callback ran, so put it back.
        should_log = control.should_log
        Trainer.log(self.trainer, logs)
        control.should_log = should_log


# ----------------------------------------------------------------------------------------------------


def _check_count(name: str, value: object) -> None:
    """A count or period must be a positive int (a bool is an int to Python, not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _unpadded(encoding: Mapping[str, Any], what: str) -> list[list[int]]:
    """The rows of a tokenizer's output (``tokenizer(texts)``: a BatchEncoding, or any mapping with ``input_ids``),
    each without the padding its ``attention_mask`` marks."""
    if "input_ids" not in encoding:
        raise ValueError(f"{what} is a mapping with the keys {', '.join(map(repr, encoding))}, not a tokenizer's "
                         "output with 'input_ids': pass a list of prompts (strings or lists of token ids)")
    rows = encoding["input_ids"]
    masks = encoding["attention_mask"] if "attention_mask" in encoding else [None] * len(rows)
    return [_kept(row, mask, f"{what}['input_ids'][{i}]") for i, (row, mask) in enumerate(zip(rows, masks))]


def _kept(row: Any, mask: Any, what: str) -> list[int]:
    """A row of token ids without the padding its attention mask marks (None: no padding)."""
    ids = _token_ids(row, what)
    return ids if mask is None else [t for t, keep in zip(ids, mask) if int(keep)]


def _token_ids(row: Any, what: str) -> list[int]:
    """A row of token ids as ints, refused in words when it is something else: a dataset row, a label row (-100).
    A mapping with ``input_ids`` is one row's tokenizer output (transformers 5's ``apply_chat_template(...,
    tokenize=True)`` returns one): its ids, without the padding its ``attention_mask`` marks."""
    if isinstance(row, Mapping) and "input_ids" in row:
        return _kept(row["input_ids"], row.get("attention_mask"), f"{what}['input_ids']")
    if isinstance(row, Mapping):
        raise ValueError(f"{what} is a row with the fields {', '.join(map(repr, row))}: pass one field's values, e.g. "
                         f"dataset[{next(iter(row), 'prompt')!r}]")
    try:
        ids = [int(t) for t in row]
    except (TypeError, ValueError):
        raise ValueError(f"{what} ({str(row)[:60]}) is neither a string nor a list of token ids") from None
    if ids and min(ids) < 0:
        raise ValueError(f"{what} holds the id {min(ids)}, not a token: -100 masks the positions a loss ignores "
                         "in labels (as data collators write them); pass token ids (input_ids), not labels")
    return ids


def _digest(count: int, noun: str, *tensors: torch.Tensor) -> str:
    """Fixed inputs in a few words: how many, and a hash of their values (equal inputs, equal text)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{count} {noun}, sha256 {digest.hexdigest()[:12]}"


def _warn(message: str, category: type[Warning]) -> None:
    """To the trainer's log and as a Python warning (what notebooks and tests see)."""
    logger.warning(message)
    warnings.warn(message, category, stacklevel=3)


def _logged_checks(log_history: list[dict[str, Any]], last_step: int) -> dict[int, dict[str, Any]]:
    """The checks a trainer's log holds up to ``last_step``, in step order, each one's rows merged (its scalars and
    its per-sample row). Every check comes back, one whose proxy was not finite too (logged as NaN; by an earlier
    teacherhack not at all, its per-sample row alone marking it), so that the later checks keep their indices,
    which the rule's ``skip`` and ``patience`` count."""
    checks: dict[int, dict[str, Any]] = {}
    for row in log_history:
        if ("proxy_kl" in row or PAIRED_KEY in row) and row.get("step", math.inf) <= last_step:
            checks.setdefault(int(row["step"]), {}).update(row)
    return dict(sorted(checks.items()))


def _share(samples: SampleSet) -> SampleSet:
    """This process's share of a sample set (all of it outside a distributed run): each sample is scored once, and
    the gathered per-sample values hold every sample once."""
    return samples[torch.tensor(distributed.shard(range(len(samples.prompts))), dtype=torch.long)]


def _unwrap(model: nn.Module | LM) -> nn.Module:
    """The Hugging Face model inside an LM or a DistributedDataParallel-style wrapper (``.module``)."""
    model = model.model if isinstance(model, LM) else model
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _vocab_width(model: nn.Module) -> int:
    """The width of the model's next-token logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.ndim == 2 and weight.shape[0] > 0:
        return int(weight.shape[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)
