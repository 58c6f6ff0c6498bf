"""Every divergence the project reports: token-level training losses and sequence-level metrics.

This is the only module that computes these quantities. Conventions (also in the README):

* Direction. P is the teacher (or, for metrics, the reference model p), Q the student (model q).
  ``forward_kl`` = KL(P‖Q) = Σ P (log P − log Q); ``reverse_kl`` = KL(Q‖P).
* ``jsd`` (generalized JSD, GKD's convention) = β·KL(P‖M) + (1−β)·KL(Q‖M) with M = β·P + (1−β)·Q,
  the mixture formed in probability space (logsumexp of log-probabilities). Near β→0 it behaves like
  β·KL(P‖Q) and near β→1 like (1−β)·KL(Q‖P), i.e. it vanishes at both ends; so β = 0 is *defined* as
  forward KL and β = 1 as reverse KL. The value is discontinuous at the endpoints, by design.
* ``skew_forward_kl`` = KL(P ‖ αP + (1−α)Q), ``skew_reverse_kl`` = KL(Q ‖ αQ + (1−α)P) (DistiLLM, α = 0.1).
* ``tvd`` = ½ Σ |P − Q|.
* Temperature τ divides *both* sets of logits before the softmax; no τ² factor is applied: the value is
  the divergence between the two tempered distributions.
* All arithmetic runs in float32 (or the ``compute_dtype`` given) whatever the input dtype; entries whose
  logit is −inf have probability 0 and contribute exactly 0 (never NaN).
* Reductions: ``sequence_mean`` (default, the paper's): mean over each sequence's response tokens, then mean
  over sequences; ``token_mean``: mean over all response tokens of the batch; ``sum``. Under gradient
  accumulation pass ``denominator`` = the number of sequences (``sequence_mean``) or tokens
  (``token_mean``) of the whole accumulation window, so that the summed micro-batch losses equal the loss
  of one big batch. Sequences without any response token are skipped (they count in no denominator).
* Sequence level: KL(p‖q)(x) = E_{y~p}[log p(y|x) − log q(y|x)], estimated from samples of p either by
  the plain log-ratio (``log_ratio``) or by summing the exact token-level KL(p(·|x,y<t) ‖ q(·|x,y<t)) along
  the sampled prefixes (``token_kl``, unbiased and lower-variance). A response ends at its first EOS
  (included). Responses cut at the maximum length without an EOS are scored as they are: the distance is
  then exactly that between the two models' distributions truncated at that length (every prefix of the
  maximum length is one outcome). Every estimate carries its mean, standard error and sample count.
* Teacher signals (:mod:`teacherhack.teacher_signals`). Cached dense log-probabilities go into
  :func:`token_divergence` as they are (log_softmax of log-probabilities is the same distribution, also
  under a temperature). Top-k signals go into :func:`sparse_token_divergence`: the divergence on the
  teacher's top-k support (k + 1 categories with a tail bucket, or the top k renormalised).
* On-policy sampled loss: :func:`sampled_reverse_kl`, a surrogate whose expected gradient is the gradient
  of the *sequence-level* reverse KL, from the teacher's log-probability of each sampled token only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import torch
from torch import Tensor

from teacherhack.clusters import cluster_se

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
Reduction = Literal["sequence_mean", "token_mean", "sum"]
Estimator = Literal["token_kl", "log_ratio"]
Convention = Literal["tail", "renormalized"]
SampledEstimator = Literal["k1", "k3"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
REDUCTIONS: tuple[str, ...] = ("sequence_mean", "token_mean", "sum")
ESTIMATORS: tuple[str, ...] = ("token_kl", "log_ratio")
CONVENTIONS: tuple[str, ...] = ("tail", "renormalized")
SAMPLED_ESTIMATORS: tuple[str, ...] = ("k1", "k3")


# --------------------------------------------------------------------------------------------------
# Token level: one formula per divergence, on rows of log-probabilities [N, V]
# --------------------------------------------------------------------------------------------------


def _kl_rows(log_p: Tensor, log_q: Tensor, p: Tensor | None = None) -> Tensor:
    """KL(p‖q) per row. Terms with p = 0 are exactly 0, also where log q = −inf (no 0·inf = NaN,
    in values and in gradients); p > 0 with q = 0 gives +inf, the true value. ``p``: exp(log p), where the caller
    has it already.

    Outside autograd, when no log p is −inf or NaN (the usual case: log-softmax of finite logits) and both sides
    are laid out alike (so that every step below lays out its result as the masked formula's does), the masks are
    all true and are skipped: the same bits in five or six passes over [rows, V], two of them reductions, and one
    or two buffers, instead of eleven passes and ten buffers. The two reductions decide on the host (a device
    sync on a GPU)."""
    if (not (torch.is_grad_enabled() and (log_p.requires_grad or log_q.requires_grad)) and log_p.numel()
            and log_p.shape == log_q.shape and log_p.stride() == log_q.stride() and bool(log_p.min() > -math.inf)):
        terms = (log_p - log_q).mul_(log_p.exp() if p is None else p)  # its dtype is the promoted one: no rounding
        if not bool(log_q.min() > -math.inf):  # some q = 0 (or NaN): the +inf convention below
            terms = torch.where(log_q == -math.inf, math.inf, terms)
        return terms.sum(-1)
    support = ~torch.isneginf(log_p)  # only −inf is probability 0: a NaN stays in, and the row is NaN (never dropped)
    log_p = torch.where(support, log_p, 0.0)
    log_q = torch.where(support, log_q, 0.0)
    terms = torch.where(support, log_p.exp(), 0.0) * (log_p - log_q)
    # p > 0 with q = 0 is +inf also where exp(log p) underflows to 0 (else 0·inf = NaN)
    return torch.where(support & (log_q == -math.inf), math.inf, terms).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1−w)·b), formed in probability space through logsumexp (never on log-probabilities).
    Entries where both are 0 stay −inf with a zero (not NaN) gradient."""
    both_zero = (log_a == -math.inf) & (log_b == -math.inf)
    mixed = torch.logaddexp(torch.where(both_zero, 0.0, log_a) + math.log(weight_a),
                            torch.where(both_zero, 0.0, log_b) + math.log1p(-weight_a))
    return torch.where(both_zero, -math.inf, mixed)


def logsumexp_outside(x: Tensor, ids: Tensor) -> Tensor:
    """log Σ_{v ∉ ids} exp(x_v) per row of ``x`` [N, V], ``ids`` [N, k] distinct per row: on log-probabilities,
    the log-mass outside ``ids``. Summed over the complement itself, never as log(1 − Σ_ids), which cancels
    to 0 (or below) when the ids hold nearly all the mass. −inf, with a zero gradient, where the complement
    is empty or all −inf."""
    outside = x.scatter(-1, ids, -math.inf)
    empty = outside.amax(-1) == -math.inf
    lse = torch.logsumexp(outside.masked_fill_(empty.unsqueeze(-1), 0.0), -1)
    return torch.where(empty, -math.inf, lse)


def _divergence_rows(log_p: Tensor, log_q: Tensor, kind: str, beta: float, alpha: float) -> Tensor:
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl_rows(log_p, log_q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl_rows(log_q, log_p)
    if kind == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)
    if kind == "skew_forward_kl":
        return _kl_rows(log_p, _log_mix(log_p, log_q, alpha) if alpha else log_q)
    if kind == "skew_reverse_kl":
        return _kl_rows(log_q, _log_mix(log_q, log_p, alpha) if alpha else log_p)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def _check_params(kind: str, beta: float, alpha: float, temperature: float) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must lie in [0, 1], got {beta}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must lie in [0, 1), got {alpha} (alpha = 1 makes the divergence 0)")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _align_vocab(teacher_logits: Tensor, student_logits: Tensor, vocab_size: int | None) -> tuple[Tensor, Tensor]:
    """Apply the padded-vocabulary rule: entries at or beyond ``vocab_size`` are ignored (as −inf)."""
    vt, vs = teacher_logits.shape[-1], student_logits.shape[-1]
    if vocab_size is None:
        if vt != vs:
            raise ValueError(
                f"teacher and student vocabulary sizes differ ({vt} vs {vs}); if one is padded, pass "
                f"vocab_size=<the real shared size> so that the extra entries are ignored"
            )
        return teacher_logits, student_logits
    if not 1 <= vocab_size <= min(vt, vs):
        raise ValueError(f"vocab_size={vocab_size} must lie in [1, {min(vt, vs)}] ({vt} teacher, {vs} student)")
    return teacher_logits[..., :vocab_size], student_logits[..., :vocab_size]


def _row_weights(mask: Tensor, reduction: str, denominator: float | Tensor | None) -> Tensor:
    """Per-position weights w so that the reduced loss is Σ w·D. One place for every reduction rule."""
    mask = mask.to(torch.float64)
    lengths = mask.sum(-1, keepdim=True)
    if reduction == "sequence_mean":
        weights = mask / lengths.clamp_min(1.0)
        denominator = (lengths > 0).sum() if denominator is None else denominator
    elif reduction == "token_mean":
        weights = mask
        denominator = mask.sum() if denominator is None else denominator
    elif reduction == "sum":
        weights, denominator = mask, 1.0 if denominator is None else denominator
    else:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    return weights / torch.as_tensor(denominator, dtype=torch.float64).clamp_min(1.0)


class _ChunkedDivergence(torch.autograd.Function):
    """Σ_rows w·D over sequence chunks, keeping no [B, T, V] intermediate: backward recomputes each
    chunk. ``compute(weights, *inputs)`` reads [B, T, …] inputs (teacher and student sides), each sliced
    along T; peak extra memory is O(B·chunk·V) (plus the inputs' own gradients)."""

    @staticmethod
    def forward(ctx, weights, chunk_size, compute, out_dtype, *inputs):  # type: ignore[override]
        ctx.save_for_backward(weights, *inputs)
        ctx.chunk_size, ctx.compute = chunk_size, compute
        total = torch.zeros((), dtype=torch.float64, device=weights.device)
        with torch.no_grad():
            for start in range(0, weights.shape[1], chunk_size):
                window = slice(start, start + chunk_size)
                total += compute(weights[:, window], *(x[:, window] for x in inputs))
        return total.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        weights, *inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        grads = [torch.zeros_like(x) if need else None for x, need in zip(inputs, needs)]
        for start in range(0, weights.shape[1], ctx.chunk_size):
            window = slice(start, start + ctx.chunk_size)
            pieces = [x[:, window].detach().requires_grad_(need) for x, need in zip(inputs, needs)]
            with torch.enable_grad():
                value = ctx.compute(weights[:, window], *pieces) * grad_output
                chunk_grads = iter(torch.autograd.grad(value, [x for x, need in zip(pieces, needs) if need],
                                                       allow_unused=True))
            for grad, need in zip(grads, needs):
                if need:
                    g = next(chunk_grads)
                    if g is not None:
                        grad[:, window] = g
        return (None, None, None, None, *grads)


def select_rows(x: Tensor, mask: Tensor) -> Tensor:
    """``x[mask]`` for a boolean ``mask`` over x's leading dimensions (the response positions of [B, T, V]
    logits): the same rows in the same order, taken by ``index_select``, whose backward copies whole rows where
    boolean indexing's accumulates them element by element (forward and backward together 12-13× faster on CPU
    at the lab's shapes; the same bits)."""
    mask = mask.to(x.device)
    return x.flatten(0, mask.dim() - 1).index_select(0, mask.flatten().nonzero().squeeze(1))


def tempered(logits: Tensor, temperature: float, dtype: torch.dtype | None = None) -> Tensor:
    """logits / τ (in ``dtype`` if given); at τ = 1 no [rows, V] copy is made beyond the dtype cast: x / 1 is exact,
    so the values and their gradients are the same bits either way, without a pass over the vocabulary."""
    logits = logits if dtype is None else logits.to(dtype)
    return logits if temperature == 1.0 else logits / temperature


class _ForwardKL(torch.autograd.Function):
    """Σ_rows w · KL(p‖q) with p = softmax(teacher/τ) fixed and q = softmax(student/τ), and its gradient in closed
    form, w·(q − p)/τ per row: the same values as the generic path (same row formula), a third of its passes
    over the [rows, V] logits (forward KL is the main loss, and these passes dominate small models' steps)."""

    @staticmethod
    def forward(ctx, t_logits, s_logits, w, temperature, compute_dtype):  # type: ignore[override]
        log_p = torch.log_softmax(tempered(t_logits, temperature, compute_dtype), dim=-1)
        log_q = torch.log_softmax(tempered(s_logits, temperature, compute_dtype), dim=-1)
        p = log_p.exp()  # once, for the value and the gradient
        ctx.save_for_backward(p, log_q, w)
        ctx.temperature, ctx.dtype = temperature, s_logits.dtype
        return (_kl_rows(log_p, log_q, p).to(torch.float64) * w).sum()

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        p, log_q, w = ctx.saved_tensors
        scale = (w * grad_output / ctx.temperature).to(log_q.dtype)[:, None]
        grad = log_q.exp().sub_(p).mul_(scale)
        return None, grad.to(ctx.dtype), None, None, None


def token_divergence(
    teacher_logits: Tensor,
    student_logits: Tensor,
    mask: Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    reduction: str = "sequence_mean",
    denominator: float | Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Token-level divergence between teacher and student next-token distributions, reduced to a scalar.

    ``teacher_logits``/``student_logits`` are [B, T, V] of any float dtype; ``mask`` [B, T] marks the
    response positions that count (others contribute exactly nothing, whatever their logits hold).
    ``chunk_size`` processes the sequence in chunks of that many positions (same values and gradients,
    O(B·chunk·V) extra memory). ``vocab_size`` declares the real vocabulary when one side is padded.
    """
    _check_params(divergence, beta, alpha, temperature)
    if (teacher_logits.dim() != 3 or teacher_logits.shape[:-1] != student_logits.shape[:-1]
            or teacher_logits.shape[:-1] != mask.shape):
        raise ValueError(
            f"shape mismatch: teacher {tuple(teacher_logits.shape)}, student {tuple(student_logits.shape)}, "
            f"mask {tuple(mask.shape)}; expected [B, T, V], [B, T, V], [B, T]"
        )
    teacher_logits, student_logits = _align_vocab(teacher_logits, student_logits, vocab_size)
    weights = _row_weights(mask.bool(), reduction, denominator)

    forward = divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0)

    def compute(w: Tensor, t_logits: Tensor, s_logits: Tensor) -> Tensor:
        selected = w != 0
        if forward and not t_logits.requires_grad:  # the main loss, with its gradient in closed form
            return _ForwardKL.apply(select_rows(t_logits, selected), select_rows(s_logits, selected), w[selected],
                                    temperature, compute_dtype)
        log_p = torch.log_softmax(tempered(select_rows(t_logits, selected), temperature, compute_dtype), dim=-1)
        log_q = torch.log_softmax(tempered(select_rows(s_logits, selected), temperature, compute_dtype), dim=-1)
        rows = _divergence_rows(log_p, log_q, divergence, beta, alpha)
        return (rows.to(torch.float64) * w[selected]).sum()

    return _reduce_in_chunks(compute, weights, chunk_size, compute_dtype, teacher_logits, student_logits)


def _reduce_in_chunks(compute: Callable[..., Tensor], weights: Tensor, chunk_size: int | None,
                      compute_dtype: torch.dtype, *inputs: Tensor) -> Tensor:
    """``compute(weights, *inputs)`` at once, or chunk by chunk along T (same values and gradients)."""
    if chunk_size is None:
        return compute(weights, *inputs).to(compute_dtype)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedDivergence.apply(weights, chunk_size, compute, compute_dtype, *inputs)


def sparse_token_divergence(
    ids: Tensor,
    teacher_logprobs: Tensor,
    tail: Tensor | None,
    student_logits: Tensor,
    mask: Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    convention: str = "tail",
    reduction: str = "sequence_mean",
    denominator: float | Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Token-level divergence restricted to the teacher's top-k support (top-k teacher signals), reduced
    like :func:`token_divergence`: only k log-probabilities per position are needed, not [B, T, V] logits.

    ``ids`` [B, T, k] (distinct per position, any integer dtype), ``teacher_logprobs`` [B, T, k] (any float
    dtype), ``tail`` [B, T] (the teacher's probability of every other token), ``student_logits`` [B, T, V].
    Conventions (D is any divergence of DIVERGENCES, through the same formulas as the full loss):

    * ``"tail"``: k + 1 categories, the k ids and one bucket for all other tokens. The teacher's vector
      (log p_ids, log tail) is renormalised (log-softmax) to absorb the rounding of stored log-probabilities;
      the student's is the log-softmax of (its logits at the ids, the logsumexp of its logits at every other
      token): exact, and stable also when the bucket is tiny (never log(1 − Σ)). A coarse-graining of both
      distributions, so D never exceeds the full divergence (data processing inequality; the bucket hides
      how the mass outside the ids is spread).
    * ``"renormalized"``: both distributions restricted to the k ids and renormalised (``tail`` is not
      used and may be None). Not a lower bound: it ignores how much mass each side puts outside the ids,
      so it can exceed the full divergence; undefined (NaN) where the student gives all k ids probability 0.

    With k = V (every token stored, tail 0) both equal :func:`token_divergence` on the full distributions.
    Temperature: the stored log-probabilities ARE the teacher's distribution at the loss temperature (build
    the signals at the temperature you train with; a tempered top-k cannot be recovered from an untempered
    one); only the student's logits are divided by ``temperature``. ``vocab_size`` ignores padded student
    columns as in :func:`token_divergence` (every id must be below it); ``chunk_size`` bounds the extra
    memory to O(B·chunk·V) with the same values and gradients.
    """
    _check_params(divergence, beta, alpha, temperature)
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    if convention == "tail" and tail is None:
        raise ValueError("convention='tail' needs the teacher's tail mass; pass tail (or use 'renormalized')")
    if (student_logits.dim() != 3 or mask.shape != student_logits.shape[:-1] or ids.dim() != 3
            or ids.shape[:-1] != mask.shape or teacher_logprobs.shape != ids.shape
            or (tail is not None and tail.shape != mask.shape)):
        raise ValueError(
            f"shape mismatch: ids {tuple(ids.shape)}, teacher_logprobs {tuple(teacher_logprobs.shape)}, tail "
            f"{None if tail is None else tuple(tail.shape)}, student {tuple(student_logits.shape)}, mask "
            f"{tuple(mask.shape)}; expected [B, T, k], [B, T, k], [B, T], [B, T, V], [B, T]"
        )
    if vocab_size is not None:
        if not 1 <= vocab_size <= student_logits.shape[-1]:
            raise ValueError(f"vocab_size={vocab_size} must lie in [1, {student_logits.shape[-1]}] (student)")
        student_logits = student_logits[..., :vocab_size]
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    weights = _row_weights(mask.bool(), reduction, denominator)
    counted = ids[weights != 0]
    vocab = student_logits.shape[-1]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= vocab):
        raise ValueError(f"teacher ids must lie in [0, {vocab}) (the student's vocabulary"
                         f"{'' if vocab_size is None else ', vocab_size'}); got [{int(counted.min())}, "
                         f"{int(counted.max())}]: signals from another tokenizer?")

    def compute(w: Tensor, ids_w: Tensor, lp_w: Tensor, s_logits: Tensor, *tail_w: Tensor) -> Tensor:
        selected = w != 0
        safe_ids = ids_w.long().masked_fill(~selected.unsqueeze(-1), 0)  # ids outside the mask may hold anything
        s_top = s_logits.gather(-1, safe_ids)[selected].to(compute_dtype) / temperature
        t_top = lp_w[selected].to(compute_dtype)
        if convention == "tail":  # the bucket is one more "logit" on each side: log-softmax over k + 1
            s_rest = logsumexp_outside(tempered(select_rows(s_logits, selected), temperature, compute_dtype),
                                        safe_ids[selected])
            s_top = torch.cat([s_top, s_rest.unsqueeze(-1)], -1)
            t_top = torch.cat([t_top, tail_w[0][selected].to(compute_dtype).clamp_min(0.0).log().unsqueeze(-1)], -1)
        rows = _divergence_rows(torch.log_softmax(t_top, -1), torch.log_softmax(s_top, -1), divergence, beta, alpha)
        return (rows.to(torch.float64) * w[selected]).sum()

    inputs = (ids, teacher_logprobs, student_logits) + ((tail,) if convention == "tail" else ())
    return _reduce_in_chunks(compute, weights, chunk_size, compute_dtype, *inputs)


def token_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "sequence_mean",
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Cross-entropy of sampled target tokens (SFT, and sequence-level KD with hard labels), with the
    same reductions and accumulation rule as :func:`token_divergence`."""
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weights = _row_weights(mask.bool(), reduction, denominator)
    selected = weights != 0
    log_q = torch.log_softmax(tempered(select_rows(logits, selected), temperature, torch.float32), dim=-1)
    nll = -log_q.gather(-1, targets[selected].unsqueeze(-1)).squeeze(-1)
    return (nll.to(torch.float64) * weights[selected]).sum().to(torch.float32)


def _reward_to_go(costs: Tensor, discount: float) -> Tensor:
    """R_t = Σ_{s≥t} discount^{s−t}·cost_s along the last dimension (discount 0: R_t = cost_t)."""
    out = torch.empty_like(costs)
    running = torch.zeros_like(costs[..., 0])
    for t in reversed(range(costs.shape[-1])):
        running = costs[..., t] + discount * running if discount else costs[..., t]
        out[..., t] = running
    return out


def sampled_reverse_kl(
    student_logits: Tensor,
    teacher_token_logprobs: Tensor,
    responses: Tensor,
    mask: Tensor,
    *,
    estimator: str = "k1",
    discount: float = 1.0,
    temperature: float = 1.0,
    reduction: str = "sum",
    denominator: float | Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """On-policy reverse KL from sampled tokens: a loss whose gradient, in expectation over the student's
    own samples y ~ q, is the gradient of the SEQUENCE-level KL(q‖p) = E_{y~q}[log q(y|x) − log p(y|x)].

    ``student_logits`` [B, T, V] score the student-sampled ``responses`` [B, T] (the student samples at
    ``temperature``, its logits are divided by it); ``teacher_token_logprobs`` [B, T] hold log p(y_t | x, y<t)
    of the sampled token at that same temperature (no gradient flows into them); ``mask`` marks the response
    tokens (up to and including the first EOS). Entries outside the mask may hold anything.

    Derivation. Write q_t = q(y_t | x, y<t), p_t likewise, δ_t = log p_t − log q_t and per-token costs c_t.
    The score of a token has mean 0 given its prefix, E[∇log q_t | y<t] = 0, so for any costs
    ∇_θ E_q[Σ_s c_s] = E[Σ_t ∇log q_t · Σ_{s≥t} c_s] + E[Σ_s ∇_θ c_s]
    (a cost c_s depends on y≤s only, so the scores of later tokens drop out of its term: reward-to-go).

    * ``k1``: c_t = log q_t − log p_t = −δ_t, so E[Σ c_t] = KL and ∇c_t = ∇log q_t has mean 0: the
      pathwise term vanishes in expectation and the surrogate is Σ_t log q_t · sg(R_t), R_t = Σ_{s≥t} c_s.
    * ``k3``: c_t = e^{δ_t} − 1 − δ_t ≥ 0. E[c_t | y<t] = Σ_v p(v) − 1 + KL_t = KL_t (the token-level reverse
      KL at that prefix; softmax teachers give every token mass), so E[Σ c_t] = KL for every θ, with lower
      variance. But c_t depends on θ: ∇c_t = (1 − e^{δ_t})·∇log q_t, whose mean given y<t is not 0. Both
      terms are needed: surrogate Σ_t [log q_t · sg(R_t) + c_t], R_t = Σ_{s≥t} c_s.

    ``discount`` γ < 1 uses R_t = Σ_{s≥t} γ^{s−t} c_s: no longer unbiased for the sequence-level gradient.
    γ = 0 with k1 is the per-token advantage log p_t − log q_t of Thinking Machines' Tinker on-policy
    distillation recipe. Its expected gradient (and k3's at γ = 0) equals that of :func:`token_divergence`
    with ``divergence="reverse_kl"`` on the same student-sampled responses (same reduction): both are
    E_{prefixes~q}[Σ_t ∇_θ KL(q(·|x,y<t) ‖ p(·|x,y<t))] with the prefix held fixed, the full-distribution loss
    being the Rao-Blackwellised version (the exact expectation over y_t instead of one draw). Neither is the
    sequence-level gradient: both ignore how each token changes the prefixes that follow it (s > t).

    The returned VALUE is the estimate of the reverse KL itself, Σ_t w_t·c_t (undiscounted, for either γ),
    with the surrogate's gradient (value = estimate + surrogate − sg(surrogate)). Reductions: ``"sum"`` with
    ``denominator`` = the number of sequences gives nats per sequence (a mean over sequences of per-sequence
    sums; the lab's training loop passes exactly this denominator); ``"token_mean"`` divides by the tokens
    (pass a fixed denominator: one computed from the samples makes the gradient a ratio estimate).
    ``"sequence_mean"`` is refused: dividing each sequence by its own length, which depends on the sampled
    tokens, breaks the reward-to-go argument. A sampled token the teacher gives probability 0 makes the
    value +inf, the true reverse KL.
    """
    if estimator not in SAMPLED_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(SAMPLED_ESTIMATORS)}")
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must lie in [0, 1], got {discount}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction == "sequence_mean":
        raise ValueError("reduction='sequence_mean' would divide each sequence by its sampled length, which biases "
                         "the gradient; use reduction='sum' with denominator=<number of sequences> (nats per "
                         "sequence) or 'token_mean' with a fixed denominator")
    if (student_logits.dim() != 3 or student_logits.shape[:-1] != mask.shape
            or responses.shape != mask.shape or teacher_token_logprobs.shape != mask.shape):
        raise ValueError(
            f"shape mismatch: student {tuple(student_logits.shape)}, teacher_token_logprobs "
            f"{tuple(teacher_token_logprobs.shape)}, responses {tuple(responses.shape)}, mask {tuple(mask.shape)}; "
            f"expected [B, T, V], [B, T], [B, T], [B, T]"
        )
    mask = mask.bool()
    weights = _row_weights(mask, reduction, denominator)
    x = tempered(select_rows(student_logits, mask), temperature, compute_dtype)
    picked = x.gather(-1, responses[mask].long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, -1)
    log_q = torch.zeros(mask.shape, dtype=compute_dtype, device=x.device).masked_scatter(mask, picked)
    log_p = torch.where(mask, teacher_token_logprobs.detach().to(compute_dtype), 0.0)
    if estimator == "k1":
        costs = log_q - log_p
    else:
        delta = log_p - log_q
        costs = torch.expm1(delta) - delta
    to_go = _reward_to_go(costs.detach().to(torch.float64), discount)
    surrogate = (weights * log_q.to(torch.float64) * to_go).sum()
    if estimator == "k3":
        surrogate = surrogate + (weights * costs.to(torch.float64)).sum()
    estimate = (weights * costs.detach().to(torch.float64)).sum()
    if not torch.isfinite(surrogate):  # a token the teacher rules out: +inf, not inf − inf (no usable gradient)
        return (estimate + 0.0 * log_q.sum()).to(compute_dtype)
    return (estimate + (surrogate - surrogate.detach())).to(compute_dtype)


# --------------------------------------------------------------------------------------------------
# Sequence level: the metrics
# --------------------------------------------------------------------------------------------------


class NextTokenModel(Protocol):
    """Anything that scores responses autoregressively: returns [B, T, V] log-probabilities where entry
    t is log p(· | x, y<t). The project's HF wrappers and the tests' table models both satisfy it."""

    def next_token_logprobs(self, prompts: object, responses: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo estimate: mean, standard error of the mean, sample count, and the per-sample
    values (kept so that estimates on the same samples can be compared pairwise). With several samples of each
    prompt (``clusters``) the SE is the cluster-robust one over the prompts (:func:`teacherhack.clusters.cluster_se`),
    that of the prompts' mean over the task; with one each, the values are independent draws."""

    mean: float
    se: float
    n: int
    values: Tensor = field(repr=False, compare=False, default_factory=lambda: torch.empty(0))

    @staticmethod
    def of(values: Tensor, clusters: Tensor | None = None) -> "Estimate":
        """The estimate from per-sample ``values``; ``clusters``: each value's prompt (None: one value per prompt)."""
        values = values.detach().to(torch.float64).flatten().cpu()
        n = values.numel()
        if n == 0:
            raise ValueError("an estimate needs at least one sample")
        se = None if clusters is None else cluster_se(values.numpy(), clusters.cpu().numpy())
        if se is None:
            se = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
        return Estimate(float(values.mean()), se, n, values)

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "se": self.se, "n": self.n}


def response_mask(responses: Tensor, eos_id: int) -> Tensor:
    """Positions up to and including the first EOS; the whole row if it has none (truncated)."""
    is_eos = responses == eos_id
    before_first_eos = (is_eos.cumsum(-1) - is_eos.long()) == 0
    return before_first_eos


def _per_sequence(values: Tensor, mask: Tensor, per_token: bool) -> Tensor:
    totals = (values.to(torch.float64) * mask).sum(-1)
    return totals / mask.sum(-1).clamp_min(1) if per_token else totals


def _token_logprob(logprobs: Tensor, responses: Tensor, mask: Tensor) -> Tensor:
    picked = logprobs.gather(-1, responses.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, 0.0)


def check_estimator(estimator: str, per_token: bool) -> None:
    """The one rule on estimator choices: ``token_kl`` cannot give per-token values unbiasedly, because dividing
    the sum of exact token-level KLs by a length that depends on later tokens is biased."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if per_token and estimator == "token_kl":
        raise ValueError("per-token values need estimator='log_ratio' (token_kl divided by the response length is "
                         "biased: the length depends on later tokens)")


def kl_values(
    p_logprobs: Tensor, q_logprobs: Tensor, responses: Tensor, mask: Tensor, *,
    estimator: str = "token_kl", per_token: bool = False,
) -> Tensor:
    """Per-sample single-draw estimates of KL(p‖q) for responses sampled from p ([B] values)."""
    check_estimator(estimator, per_token)
    if estimator == "token_kl":
        rows = _kl_rows(select_rows(p_logprobs, mask).float(), select_rows(q_logprobs, mask).float())
        values = torch.zeros(mask.shape, dtype=rows.dtype, device=rows.device)
        values[mask] = rows
    else:
        values = _token_logprob(p_logprobs.float(), responses, mask) - _token_logprob(q_logprobs.float(), responses, mask)
    return _per_sequence(values, mask, per_token)


def nll_values(logprobs: Tensor, responses: Tensor, mask: Tensor, *, per_token: bool = False) -> Tensor:
    """Per-sample negative log-likelihood −log q(y|x) of given responses (nats per sequence, or per token). On
    samples of p, its mean is the cross-entropy H(p, q) = KL(p‖q) + H(p): it moves exactly as KL(p‖q) does when
    only q changes. On real responses it is the golden metric's stand-in against the data distribution."""
    return _per_sequence(-_token_logprob(logprobs.float(), responses, mask), mask, per_token)


def entropy_values(logprobs: Tensor, mask: Tensor, *, per_token: bool = False) -> Tensor:
    """Per-sample estimates of a model's entropy H(q) from its own samples: the exact token-level entropies
    summed along each sampled prefix (unbiased, lower variance than −log q(y)). With ``per_token`` each sum is
    divided by its own response's length, which estimates E[Σₜ Hₜ / |y|], not E[−log q(y) / |y|]: the length
    depends on the tokens drawn (an EOS ends it), so the identity E[−log q(yₜ | y<t)] = E[Hₜ] does not survive the
    division, and per-token cross-entropy minus per-token KL is not this entropy (per-sequence values are)."""
    values = torch.zeros(mask.shape, dtype=torch.float32, device=logprobs.device)
    values[mask] = -_neg_entropy_rows(select_rows(logprobs, mask).float())
    return _per_sequence(values, mask, per_token)


def _neg_entropy_rows(log_p: Tensor) -> Tensor:
    """Σ p log p per row, 0·log 0 = 0: the same terms as ``_kl_rows(log_p, 0)`` (a log-probability of −inf, clamped
    to the lowest float, gives exp(·)·(·) = −0), in three passes over [rows, V] instead of its ten."""
    clamped = log_p.clamp_min(torch.finfo(log_p.dtype).min)
    return (clamped.exp() * clamped).sum(-1)


@dataclass(frozen=True)
class FrozenP:
    """p's side of KL(p‖q) along fixed samples of p, computed once, for a p that does not change between
    measurements (the lab's oracle and teacher on their reference samples): each later KL against a q is one
    product with q's log-probabilities, KL = Σ p log p − Σ p log q per position, instead of the full formula's
    passes over [rows, V]."""

    log_p: Tensor  # [B, T, V]
    mask: Tensor  # [B, T] the response positions that count
    probs: Tensor  # [N, V] p at the N positions of ``mask``
    neg_entropy: Tensor  # [N] Σ p log p there

    @staticmethod
    def of(log_p: Tensor, mask: Tensor) -> "FrozenP":
        rows = select_rows(log_p, mask).float()
        return FrozenP(log_p, mask, rows.exp(), _neg_entropy_rows(rows))

    def kl_values(self, q_logprobs: Tensor, responses: Tensor, *, estimator: str = "token_kl",
                  per_token: bool = False) -> Tensor:
        """:func:`kl_values` of p and q on these samples, to float32 rounding."""
        device = q_logprobs.device  # p's side moves to q's device (no copy when they share one)
        mask = self.mask.to(device)
        if estimator == "token_kl":
            q_rows = select_rows(q_logprobs, mask).float()
            rows = self.neg_entropy.to(device) - (self.probs.to(device) * q_rows).sum(-1)
            if not torch.isnan(rows).any():  # NaN: 0·(−inf), a token both give probability 0: the full conventions
                values = torch.zeros(mask.shape, dtype=rows.dtype, device=device)
                values[mask] = rows
                return _per_sequence(values, mask, per_token)
        return kl_values(self.log_p.to(device), q_logprobs, responses, mask, estimator=estimator, per_token=per_token)

    def entropy_values(self, *, per_token: bool = False) -> Tensor:
        """:func:`entropy_values` of p on these samples (its own)."""
        values = torch.zeros(self.mask.shape, dtype=self.neg_entropy.dtype, device=self.neg_entropy.device)
        values[self.mask] = -self.neg_entropy
        return _per_sequence(values, self.mask, per_token)


def sequence_logprob(logprobs: Tensor, responses: Tensor, mask: Tensor) -> Tensor:
    """log p(y|x) of each response: the sum of its token log-probabilities up to its first EOS."""
    return _token_logprob(logprobs.to(torch.float64), responses, mask).sum(-1)


def jsd_values(
    own_logprobs: Tensor, other_logprobs: Tensor, responses: Tensor, mask: Tensor, *,
    own_weight: float, per_token: bool = False,
) -> Tensor:
    """Per-sample values of log own(y) − log M(y), M = w·own + (1−w)·other at the *sequence* level, for
    responses sampled from ``own``: their mean estimates KL(own‖M)."""
    log_own = sequence_logprob(own_logprobs, responses, mask)
    log_other = sequence_logprob(other_logprobs, responses, mask)
    values = log_own - _log_mix(log_own, log_other, own_weight)
    return values / mask.sum(-1).clamp_min(1) if per_token else values


def sequence_kl(
    p: NextTokenModel, q: NextTokenModel, prompts: object, samples_p: Tensor, *, eos_id: int,
    estimator: str = "token_kl", per_token: bool = False,
) -> Estimate:
    """KL(p‖q) from responses ``samples_p`` [B, T] drawn from p on ``prompts``. Reverse KL is
    ``sequence_kl(q, p, prompts, samples_q)``."""
    mask = response_mask(samples_p, eos_id)
    with torch.no_grad():
        values = kl_values(p.next_token_logprobs(prompts, samples_p), q.next_token_logprobs(prompts, samples_p),
                           samples_p, mask, estimator=estimator, per_token=per_token)
    return Estimate.of(values)


def combine_jsd(from_p: Estimate, from_q: Estimate, beta: float) -> Estimate:
    """β·KL(p‖M) + (1−β)·KL(q‖M) from two independent estimates; SEs add in quadrature."""
    mean = beta * from_p.mean + (1.0 - beta) * from_q.mean
    se = math.sqrt((beta * from_p.se) ** 2 + ((1.0 - beta) * from_q.se) ** 2)
    return Estimate(mean, se, from_p.n + from_q.n)


def sequence_jsd(
    p: NextTokenModel, q: NextTokenModel, prompts_p: object, samples_p: Tensor, prompts_q: object,
    samples_q: Tensor, *, eos_id: int, beta: float = 0.5, per_token: bool = False,
) -> Estimate:
    """Sequence-level generalized JSD(β) = β·KL(p‖M) + (1−β)·KL(q‖M), M = β·p + (1−β)·q over whole
    responses, from samples of both models (β in (0, 1); the endpoints are the KLs, use sequence_kl)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"sequence_jsd needs beta in (0, 1), got {beta}; use sequence_kl for the endpoints")
    estimates = []
    for own, other, prompts, samples, weight in ((p, q, prompts_p, samples_p, beta), (q, p, prompts_q, samples_q, 1.0 - beta)):
        mask = response_mask(samples, eos_id)
        with torch.no_grad():
            values = jsd_values(own.next_token_logprobs(prompts, samples), other.next_token_logprobs(prompts, samples),
                                samples, mask, own_weight=weight, per_token=per_token)
        estimates.append(Estimate.of(values))
    return combine_jsd(estimates[0], estimates[1], beta)
