"""Teacher signals cached per response position, so that a frozen teacher runs once over a fixed dataset.

Two kinds, for a set of variable-length responses:

* ``dense``: the teacher's full next-token log-probabilities, float32 [positions, V]. Exact: feed them to
  :func:`teacherhack.divergences.token_divergence` in place of the teacher's logits (log_softmax of
  log-probabilities is the same distribution, also under any loss temperature), and skip the teacher's
  forward pass on an offline dataset reused for many epochs. Dense files hold the UNTEMPERED distribution
  (temperature 1); the loss applies its temperature to them exactly as to logits.
* ``topk``: the teacher's k most likely token ids, their log-probabilities (float16 or bfloat16, or float32)
  and the tail mass (the probability of every other token), for
  :func:`teacherhack.divergences.sparse_token_divergence`. These hold the teacher's distribution AT THE
  LOSS TEMPERATURE: build them at the temperature you train with (a tempered top-k and tail cannot be
  recovered from untempered ones).

Only positions inside a response are stored: from its first token up to and including its first EOS (all
of them when it has none). Row j of response i is the teacher's distribution of token j of that response
given the prompt and the tokens before it, p(· | x, y<j): the row the lab's model returns at position j.

File format (version 1): ONE safetensors file (https://github.com/huggingface/safetensors), tensors:

=============  ===============================  =======================================================
``offsets``    int64 [n + 1]                    offsets[0] = 0, non-decreasing, offsets[n] = N (the rows);
                                                response i owns rows offsets[i]:offsets[i+1]
``logprobs``   dense: float32 [N, V]            log p(v | x, y<j), every v < V, temperature 1
               topk: float16 | bfloat16 |       log p_τ(ids[r, j]) at the file's temperature τ, each ≤ 0
               float32 [N, k]                   (−inf allowed: probability 0)
``ids``        topk only: int32 [N, k]          distinct token ids in [0, V) per row (any order)
``tail``       topk only: float32 [N]           1 − Σ_j p_τ(ids[r, j]), computed in float32 or better
                                                BEFORE the log-probabilities are rounded, in [0, 1]
=============  ===============================  =======================================================

and string metadata (``__metadata__``): ``format`` = ``teacherhack.teacher_signals``, ``format_version`` =
``1``, ``kind`` = ``dense`` | ``topk``, ``vocab_size`` = V (decimal), ``dtype`` = the ``logprobs`` dtype
(``float32``, ``float16``, ``bfloat16``), ``temperature`` = τ (a decimal float, ``1.0`` for dense), ``k``
(topk only, decimal, the width of ``ids``), plus any provenance keys of your own (teacher, tokenizer,
dataset hashes...): :func:`load` compares those it is told to expect.

From a serving engine: submit prompt + response as the prompt and request its prompt log-probabilities
with k alternatives (vLLM: ``prompt_logprobs=k``) at the temperature you will train with (engines differ on
whether reported log-probabilities are tempered: check). Keep, for every response position up to its
first EOS, the k highest-ranked entries exactly (engines may add the actual token as a (k+1)-th: drop it),
write ids as int32 and log-probabilities in the dtype of your choice, tail = max(0, 1 − Σ exp(logprob))
from the float32 values, and the offsets from the response lengths. :func:`load` then checks all of it.

Loading refuses, naming the file and the fix, anything that would train on wrong signals: a different
teacher/tokenizer/dataset than expected, k ≤ 0, ids out of range or repeated, positive or NaN
log-probabilities, a tail outside [0, 1], offsets that do not index the rows, or top-k probabilities that
do not sum with the tail to 1 (beyond what storage rounding explains). :meth:`TeacherSignals.gather`
refuses a batch whose response lengths differ from the stored ones.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from teacherhack.divergences import logsumexp_outside, tempered
from teacherhack.errors import UserError

FORMAT = "teacherhack.teacher_signals"
FORMAT_VERSION = 1
KINDS: tuple[str, ...] = ("dense", "topk")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RESERVED: tuple[str, ...] = ("format", "format_version", "kind", "k", "vocab_size", "dtype", "temperature")
ROUNDING = 1e-4  # slack on log p ≤ 0 and tail ∈ [0, 1]: what float32 arithmetic elsewhere can leave
MASS_SLACK = 1e-3  # |Σ p − 1| allowed on top of the storage dtype's own rounding
_ROWS_PER_CHECK = 4096  # value checks run over row blocks, so that they never copy a whole dense file
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


class SignalsError(UserError, ValueError):
    """Signals that must not be used (corrupt, or built for another run); the message names the fix."""


def bytes_per_position(vocab_size: int, k: int | None = None, dtype: torch.dtype | None = None) -> int:
    """What one stored response position costs, in memory and on disk: 4·V dense; top-k: k int32 ids,
    k log-probabilities in ``dtype`` and one float32 tail."""
    if k is None:
        return 4 * vocab_size
    return k * (4 + _topk_dtype(dtype).itemsize) + 4


def estimate_bytes(n_positions: int, n_responses: int, *, vocab_size: int, k: int | None = None,
                   dtype: torch.dtype | None = None) -> int:
    """Size of the signals for ``n_positions`` response positions in ``n_responses`` responses, before
    building them: compare with a byte budget to fall back to no cache. Building in parts and concatenating
    briefly holds twice this."""
    return n_positions * bytes_per_position(vocab_size, k, dtype) + 8 * (n_responses + 1)


def _topk_dtype(dtype: torch.dtype | None) -> torch.dtype:
    dtype = torch.float16 if dtype is None else dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"top-k log-probabilities are stored as {', '.join(DTYPES)}; got {dtype}")
    return dtype


@dataclass(frozen=True)
class SignalBatch:
    """Signals of a batch of responses, aligned with the batch's [B, W] response mask. Positions outside
    the mask hold NaN log-probabilities and tails (id 0), so that a loss reading them by mistake is loud."""

    logprobs: Tensor  # dense: float32 [B, W, V]; top-k: [B, W, k] in the stored dtype
    ids: Tensor | None = None  # top-k: int64 [B, W, k]
    tail: Tensor | None = None  # top-k: float32 [B, W]


@dataclass(frozen=True, eq=False)
class TeacherSignals:
    """Per-position teacher signals for n responses (see the module docstring for the layout)."""

    offsets: Tensor
    logprobs: Tensor
    ids: Tensor | None
    tail: Tensor | None
    vocab_size: int
    temperature: float = 1.0
    provenance: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = self._structure_problem()
        if problem is not None:
            raise SignalsError(problem)

    # ------------------------------------------------------------------------------------------------
    # Building
    # ------------------------------------------------------------------------------------------------

    @staticmethod
    def from_logprobs(logprobs: Tensor, mask: Tensor, *, k: int | None = None, dtype: torch.dtype | None = None,
                      temperature: float = 1.0, vocab_size: int | None = None,
                      provenance: dict[str, str] | None = None) -> "TeacherSignals":
        """Signals of one batch from the teacher's logits or log-probabilities [B, T, V] and the response
        mask [B, T] (positions up to and including each response's first EOS; any layout, kept in order).
        ``k`` None: dense (float32, temperature 1). ``k``: top-k at ``temperature`` (log-probs stored in
        ``dtype``, float16 by default). ``vocab_size`` drops padded logit columns. Build a large dataset
        batch by batch and join the parts with :meth:`concat`."""
        if logprobs.dim() != 3 or mask.shape != logprobs.shape[:-1]:
            raise ValueError(f"shape mismatch: logprobs {tuple(logprobs.shape)}, mask {tuple(mask.shape)}; "
                             f"expected [B, T, V], [B, T]")
        if vocab_size is not None:
            if not 1 <= vocab_size <= logprobs.shape[-1]:
                raise ValueError(f"vocab_size={vocab_size} must lie in [1, {logprobs.shape[-1]}]")
            logprobs = logprobs[..., :vocab_size]
        if not (math.isfinite(temperature) and temperature > 0.0):
            raise ValueError(f"temperature must be > 0, got {temperature}")
        vocab = logprobs.shape[-1]
        if k is None and temperature != 1.0:
            raise ValueError(f"dense signals hold the untempered distribution (temperature 1); got {temperature}: "
                             f"token_divergence applies the loss temperature to them exactly")
        if k is None and dtype not in (None, torch.float32):
            raise ValueError(f"dense signals are float32 (exact); got dtype={dtype}")
        if k is not None and not 1 <= k <= vocab:
            raise ValueError(f"k={k} must lie in [1, {vocab}] (the vocabulary)")
        stored = torch.float32 if k is None else _topk_dtype(dtype)
        provenance = dict(provenance or {})
        mask = mask.bool()
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(-1).cpu().cumsum(0)])
        with torch.no_grad():
            rows = torch.log_softmax(tempered(logprobs[mask], temperature, torch.float32), dim=-1)
            if k is None:
                return TeacherSignals(offsets, rows.cpu(), None, None, vocab, temperature, provenance)
            top, ids = rows.topk(k, dim=-1)
            tail = logsumexp_outside(rows, ids).exp().clamp_max(1.0)  # in float32, before rounding top
        return TeacherSignals(offsets, top.to(stored).cpu(), ids.to(torch.int32).cpu(), tail.cpu(), vocab, temperature,
                              provenance)

    @staticmethod
    def concat(parts: Sequence["TeacherSignals"]) -> "TeacherSignals":
        """The signals of all responses of ``parts``, in order (parts built alike: same kind, k, vocabulary,
        dtype, temperature and provenance)."""
        if not parts:
            raise ValueError("concat needs at least one part")
        first = parts[0]
        for part in parts[1:]:
            if part.metadata != first.metadata:
                raise ValueError(f"cannot join signals built differently: {part.metadata} vs {first.metadata}")
        shifts = torch.tensor([0] + [p.n_positions for p in parts[:-1]], dtype=torch.long).cumsum(0)
        offsets = torch.cat([first.offsets[:1]] + [p.offsets[1:] + shift for p, shift in zip(parts, shifts)])
        ids = tail = None
        if first.kind == "topk":
            ids = torch.cat([p.ids for p in parts if p.ids is not None])
            tail = torch.cat([p.tail for p in parts if p.tail is not None])
        return TeacherSignals(offsets, torch.cat([p.logprobs for p in parts]), ids, tail, first.vocab_size,
                              first.temperature, dict(first.provenance))

    # ------------------------------------------------------------------------------------------------
    # Shape and size
    # ------------------------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return "dense" if self.ids is None else "topk"

    @property
    def k(self) -> int | None:
        return None if self.ids is None else self.ids.shape[1]

    @property
    def n_positions(self) -> int:
        return self.logprobs.shape[0]

    @property
    def lengths(self) -> Tensor:
        """Stored positions per response, [n]."""
        return self.offsets.diff()

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def bytes_per_token(self) -> int:
        """What one response position costs on disk (and in memory)."""
        return bytes_per_position(self.vocab_size, self.k, self.logprobs.dtype)

    @property
    def metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": self.kind,
                "vocab_size": str(self.vocab_size), "dtype": str(self.logprobs.dtype).removeprefix("torch."),
                "temperature": repr(float(self.temperature))}
        if self.k is not None:
            meta["k"] = str(self.k)
        return {**self.provenance, **meta}

    # ------------------------------------------------------------------------------------------------
    # Use
    # ------------------------------------------------------------------------------------------------

    def gather(self, rows: Sequence[int] | Tensor, mask: Tensor) -> SignalBatch:
        """The signals of responses ``rows`` for a batch whose response mask [len(rows), W] marks each
        response's positions (the lab's batches right-pad to the longest, W): stored position j of row b goes
        to the mask's j-th True entry of row b. Refuses a mask whose response lengths differ from the stored
        ones: the batch is not what the signals were built from. Returns CPU tensors."""
        rows = torch.as_tensor(rows, dtype=torch.long).flatten()
        mask = mask.bool().cpu()
        if mask.dim() != 2 or mask.shape[0] != rows.shape[0]:
            raise ValueError(f"mask must be [len(rows), width] = [{rows.shape[0]}, W], got {tuple(mask.shape)}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise IndexError(f"rows must lie in [0, {len(self)}), got [{int(rows.min())}, {int(rows.max())}]")
        stored, marked = self.lengths[rows], mask.sum(-1)
        wrong = (stored != marked).nonzero().flatten()
        if wrong.numel():
            b = int(wrong[0])
            raise SignalsError(
                f"signals hold {int(stored[b])} positions for response {int(rows[b])} but the batch's mask marks "
                f"{int(marked[b])} (batch row {b}; {wrong.numel()} of {rows.numel()} rows differ): the batch is not "
                f"the dataset the signals were built from (other responses, order, EOS or width?); rebuild them")
        starts = self.offsets[rows]
        index = torch.repeat_interleave(starts - (stored.cumsum(0) - stored), stored) + torch.arange(int(stored.sum()))

        def place(values: Tensor, fill: float) -> Tensor:
            out = torch.full((*mask.shape, *values.shape[1:]), fill, dtype=values.dtype)
            out[mask] = values[index]
            return out

        if self.ids is None or self.tail is None:
            return SignalBatch(place(self.logprobs, math.nan))
        return SignalBatch(place(self.logprobs, math.nan), place(self.ids, 0).long(), place(self.tail, math.nan))

    # ------------------------------------------------------------------------------------------------
    # Files
    # ------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the one-file format (atomically: a kill mid-write leaves no partial file at ``path``)."""
        path = Path(path)
        tensors = {"offsets": self.offsets, "logprobs": self.logprobs}
        if self.ids is not None and self.tail is not None:
            tensors.update(ids=self.ids, tail=self.tail)
        tmp = path.with_name(path.name + ".tmp")
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata=self.metadata)
        os.replace(tmp, path)

    @staticmethod
    def load(path: str | os.PathLike, expect: dict[str, str] | None = None) -> "TeacherSignals":
        """Read and validate a signals file. ``expect`` maps metadata keys (provenance such as teacher,
        tokenizer or dataset hashes; also kind, k, dtype, vocab_size, temperature) to this run's values;
        any difference is refused with the fix. Every value is checked (see the module docstring)."""
        path = Path(path)
        fix = f"delete {path} or rebuild it"
        try:
            handle = safe_open(str(path), framework="pt")
            meta = dict(handle.metadata() or {})
        except Exception as error:  # safetensors raises its own types for truncated or foreign files
            raise SignalsError(f"{path} is not a readable safetensors file ({error}); {fix}") from None
        if meta.get("format") != FORMAT:
            raise SignalsError(f"{path} is not a teacher-signals file (format {meta.get('format')!r}); {fix}")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise SignalsError(f"{path} has format version {meta.get('format_version')!r}, this code reads "
                               f"{FORMAT_VERSION}; {fix}")
        for key, want in (expect or {}).items():
            have = meta.get(key)
            if have is None:
                raise SignalsError(f"{path} records no {key!r} (this run's {key} is {want!r}): it was built "
                                   f"without it; {fix}")
            if not _same(key, have, str(want)):
                raise SignalsError(f"signals in {path} were built for {key} {have!r}, this run's {key} is "
                                   f"{want!r}: {fix}")
        try:  # only now: a file built for another run is refused before its tensors are read
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:
            raise SignalsError(f"{path} is not a readable safetensors file ({error}); {fix}") from None
        kind = meta.get("kind")
        expected = {"dense": {"offsets", "logprobs"}, "topk": {"offsets", "logprobs", "ids", "tail"}}.get(kind or "")
        if expected is None:
            raise SignalsError(f"{path}: unknown kind {kind!r} (expected {' or '.join(KINDS)}); {fix}")
        if set(tensors) != expected:
            raise SignalsError(f"{path}: a {kind} file holds tensors {sorted(expected)}, found {sorted(tensors)}; "
                               f"{fix}")
        try:
            vocab, temperature = int(meta["vocab_size"]), float(meta["temperature"])
            k = int(meta["k"]) if kind == "topk" else None
        except (KeyError, ValueError) as error:
            raise SignalsError(f"{path}: missing or malformed metadata {error}; {fix}") from None
        if k is not None and k <= 0:
            raise SignalsError(f"{path}: k = {k} must be >= 1; {fix}")
        if meta.get("dtype") not in DTYPES or DTYPES[meta["dtype"]] != tensors["logprobs"].dtype:
            raise SignalsError(f"{path}: metadata dtype {meta.get('dtype')!r} but logprobs are "
                               f"{tensors['logprobs'].dtype}; {fix}")
        if k is not None and (tensors["ids"].dim() != 2 or tensors["ids"].shape[1] != k):
            raise SignalsError(f"{path}: metadata k = {k} but ids are {tuple(tensors['ids'].shape)}; {fix}")
        provenance = {key: value for key, value in meta.items() if key not in RESERVED}
        try:
            signals = TeacherSignals(tensors["offsets"], tensors["logprobs"], tensors.get("ids"), tensors.get("tail"),
                                     vocab, temperature, provenance)
        except SignalsError as error:
            raise SignalsError(f"{path}: {error}; {fix}") from None
        problem = signals._value_problem()
        if problem is not None:
            raise SignalsError(f"{path}: {problem}; {fix}")
        return signals

    # ------------------------------------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------------------------------------

    def _structure_problem(self) -> str | None:
        """Shapes, dtypes, offsets and metadata: cheap, checked on every construction."""
        o, lp = self.offsets, self.logprobs
        if o.dtype != torch.long or o.dim() != 1 or o.numel() < 1:
            return f"offsets must be int64 [n + 1], got {o.dtype} {tuple(o.shape)}"
        if lp.dim() != 2:
            return f"logprobs must be [N, V] (dense) or [N, k] (top-k), got {tuple(lp.shape)}"
        if int(o[0]) != 0 or bool((o.diff() < 0).any()) or int(o[-1]) != lp.shape[0]:
            return (f"offsets must start at 0, never decrease and end at the number of rows ({lp.shape[0]}); "
                    f"got {o[:3].tolist()} … {o[-2:].tolist()}")
        if not (isinstance(self.vocab_size, int) and self.vocab_size >= 1):
            return f"vocab_size must be a positive integer, got {self.vocab_size!r}"
        if not (math.isfinite(self.temperature) and self.temperature > 0.0):
            return f"temperature must be > 0, got {self.temperature}"
        for key, value in self.provenance.items():
            if key in RESERVED or not isinstance(key, str) or not isinstance(value, str):
                return f"provenance must map other keys than {', '.join(RESERVED)} to strings; got {key!r}: {value!r}"
        if self.ids is None and self.tail is None:
            if lp.dtype != torch.float32 or lp.shape[1] != self.vocab_size:
                return f"dense logprobs must be float32 [N, {self.vocab_size}], got {lp.dtype} {tuple(lp.shape)}"
            if self.temperature != 1.0:
                return f"dense signals hold the untempered distribution (temperature 1.0), got {self.temperature}"
            return None
        if self.ids is None or self.tail is None:
            return "top-k signals need both ids and tail"
        ids, tail = self.ids, self.tail
        if ids.dtype != torch.int32 or ids.dim() != 2 or ids.shape[1] < 1:
            return f"ids must be int32 [N, k] with k >= 1, got {ids.dtype} {tuple(ids.shape)}"
        if ids.shape[1] > self.vocab_size:
            return f"k = {ids.shape[1]} exceeds the vocabulary ({self.vocab_size})"
        if lp.shape != ids.shape or lp.dtype not in DTYPES.values():
            return (f"top-k logprobs must be [N, k] = {tuple(ids.shape)} in {', '.join(DTYPES)}, got {lp.dtype} "
                    f"{tuple(lp.shape)}")
        if tail.dtype != torch.float32 or tail.shape != (ids.shape[0],):
            return f"tail must be float32 [N] = [{ids.shape[0]}], got {tail.dtype} {tuple(tail.shape)}"
        return None

    def _value_problem(self) -> str | None:
        """Every stored value, block by block: what a corrupt or hand-written file could get wrong."""
        for start in range(0, self.n_positions, _ROWS_PER_CHECK):
            block = slice(start, start + _ROWS_PER_CHECK)
            lp = self.logprobs[block].float()
            bad = lp.isnan() | (lp > ROUNDING)
            if bool(bad.any()):
                row = int(bad.any(-1).nonzero()[0])
                return (f"log-probabilities must be <= 0 and not NaN; row {start + row} holds "
                        f"{lp[row][bad[row]][:3].tolist()}")
            if self.ids is None or self.tail is None:
                total = lp.logsumexp(-1).exp()
                slack = torch.full_like(total, MASS_SLACK)
            else:
                ids, tail = self.ids[block], self.tail[block]
                if bool(((ids < 0) | (ids >= self.vocab_size)).any()):
                    return f"ids must lie in [0, {self.vocab_size}); found [{int(ids.min())}, {int(ids.max())}]"
                ordered = ids.sort(-1).values
                repeated = (ordered.diff(dim=-1) == 0).any(-1)
                if bool(repeated.any()):
                    return f"ids must be distinct within a row; row {start + int(repeated.nonzero()[0])} repeats one"
                if not bool(((tail >= -ROUNDING) & (tail <= 1.0 + ROUNDING)).all()):  # NaN fails too
                    row = int((~((tail >= -ROUNDING) & (tail <= 1.0 + ROUNDING))).nonzero()[0])
                    return f"tail mass must lie in [0, 1]; row {start + row} holds {float(tail[row])}"
                p = lp.exp()
                total = p.sum(-1) + tail
                # rounding a log-probability l by a relative u moves p by about p·|l|·u
                magnitude = torch.where(p > 0, p * lp.abs(), 0.0).sum(-1)
                slack = MASS_SLACK + 1.5 * _UNIT_ROUNDOFF[self.logprobs.dtype] * magnitude
            far = ~((total - 1.0).abs() <= slack)
            if bool(far.any()):
                row = int(far.nonzero()[0])
                what = "the probabilities" if self.ids is None else "the top-k probabilities and the tail"
                return (f"{what} must sum to 1 (within {float(slack[row]):.2g}, storage rounding included); row "
                        f"{start + row} sums to {float(total[row]):.6g}")
        return None


def _same(key: str, have: str, want: str) -> bool:
    """Metadata equality; numeric keys compare as numbers ("1" and "1.0" are the same temperature)."""
    if key in ("temperature", "k", "vocab_size", "format_version"):
        try:
            return float(have) == float(want)
        except ValueError:
            return False
    return have == want
