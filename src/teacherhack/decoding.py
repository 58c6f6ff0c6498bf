"""Exact sampling for :meth:`LM.sample`: one forward per new token through a decoder with its own KV
cache, and one uniform per row and step turned into a token by inverse CDF.

Online data sources sample the teacher or the student every training step, so decoding speed is training
speed. GPT-2 and Llama, the lab's decoder-only families, get a lean decoder: the prompt's keys and values
are computed once into preallocated tensors, each step runs only the new token through the layers, writes
its keys and values in place (no concatenation) and attends under an additive padding mask. It reads the
weights from the Hugging Face modules at every call (the student trains between samples, so copies would
go stale). A configuration it does not implement (rope scaling, cross-attention, another activation, a
subclass, a replaced or hooked layer, …) and every other model (T5, BART, …) take the generic decoder:
the model's own forward with its own cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import partial
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Cache, GPT2LMHeadModel, LlamaForCausalLM, PreTrainedModel
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention, GPT2Block, GPT2Model
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput

from teacherhack.divergences import tempered
from teacherhack.errors import UserError

# Activations the lean decoders implement, by their Hugging Face config names; any other falls back.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


class NonFiniteLogits(UserError):
    """Sampling met logits that are NaN or infinite: the model's weights are, or its inputs overflowed."""


class Decoder(Protocol):
    """Next-token logits [B, V] for a batch of left-padded prompts, one response token at a time."""

    def prefill(self) -> Tensor:
        """Reads the prompts; the logits of the first response token."""
        ...

    def step(self, tokens: Tensor) -> Tensor:
        """Appends ``tokens`` [B]; the logits of the token after them."""
        ...


def prompt_positions(mask: Tensor) -> Tensor:
    """Position ids of left-padded rows: each row's first real token is position 0 (padding gets 0 too)."""
    return (mask.long().cumsum(1) - 1).clamp_min(0)


def right_padded(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Left-padded rows and their mask, each row's real tokens moved to its start: what an encoder gets. Its
    attention is bidirectional and masked, so right padding is exact, also for absolute positions (BART, Marian),
    which number the columns from 0 and take no position ids."""
    order = (~mask.bool()).long().argsort(dim=1, stable=True)
    return ids.gather(1, order), mask.gather(1, order)


class _KVCache:
    """Preallocated keys [layers, B, kv heads, D, P + max_new] (stored transposed, so that a query's scores are
    one contiguous matrix product) and values [layers, B, kv heads, P + max_new, D], written in place, with
    the additive padding mask of their columns."""

    def __init__(self, mask: Tensor, max_new_tokens: int, *, layers: int, heads: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype):
        batch, width = mask.shape[0], mask.shape[1] + max_new_tokens
        self.keys = torch.empty(layers, batch, kv_heads, head_dim, width, dtype=dtype, device=mask.device)
        self.values = torch.empty(layers, batch, kv_heads, width, head_dim, dtype=dtype, device=mask.device)
        real = torch.cat([mask, mask.new_ones(batch, max_new_tokens)], 1)
        self.bias = torch.zeros(batch, 1, 1, width, dtype=dtype, device=mask.device).masked_fill_(
            ~real[:, None, None], float("-inf"))
        self.groups = heads // kv_heads
        self.filled = 0  # columns written by the previous forwards

    def prompt_bias(self, mask: Tensor) -> Tensor:
        """[B, 1, P, P] causal padding mask for the prompt pass. A padding query sees itself, so no row is
        fully masked (a NaN there would reach later layers through its keys); real queries never see padding."""
        width = mask.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
        allowed = (causal & mask[:, None, :]) | torch.eye(width, dtype=torch.bool, device=mask.device)
        return torch.zeros(allowed.shape, dtype=self.bias.dtype, device=mask.device).masked_fill_(
            ~allowed, float("-inf"))[:, None]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
        """Writes k, v [B, Q, kv heads, D] at the next Q columns, attends q [B, Q, heads, D] to every column
        so far under ``bias`` [B, 1, Q, columns]; [B, Q, heads·D].

        Plain matrix products, not ``scaled_dot_product_attention``: a decode step is B·heads tiny products,
        which the fused CPU kernel runs 3-5× slower. The query heads that share a key head (grouped-query
        attention) are stacked as extra query rows, so keys are never repeated."""
        batch, length, heads, dim = q.shape
        end = self.filled + length
        self.keys[layer, :, :, :, self.filled:end] = k.permute(0, 2, 3, 1)
        self.values[layer, :, :, self.filled:end] = v.transpose(1, 2)
        q = q.unflatten(2, (-1, self.groups)).permute(0, 2, 3, 1, 4).flatten(2, 3)  # [B, kv heads, G·Q, D]
        if self.groups > 1 and length > 1:
            bias = bias.repeat(1, 1, self.groups, 1)
        scores = torch.matmul(q, self.keys[layer, ..., :end]).mul_(scale).add_(bias)
        weights = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, self.values[layer, :, :, :end])  # [B, kv heads, G·Q, D]
        return out.unflatten(2, (self.groups, length)).permute(0, 3, 1, 2, 4).reshape(batch, length, heads * dim)


class _LeanDecoder(ABC):
    """The prompt pass and the decode steps of a lean decoder; subclasses run the layers."""

    def __init__(self, ids: Tensor, mask: Tensor, cache: _KVCache):
        self.ids, self.mask, self.cache = ids, mask, cache
        self.lengths = mask.sum(1)  # real prompt tokens per row: the position of the first response token

    def prefill(self) -> Tensor:
        return self._run(self.ids, prompt_positions(self.mask), self.cache.prompt_bias(self.mask))

    def step(self, tokens: Tensor) -> Tensor:
        generated = self.cache.filled - self.ids.shape[1]
        positions = (self.lengths + generated)[:, None]
        return self._run(tokens[:, None], positions, self.cache.bias[..., : self.cache.filled + 1])

    def _run(self, ids: Tensor, positions: Tensor, bias: Tensor) -> Tensor:
        logits = self._logits(ids, positions, bias)
        self.cache.filled += ids.shape[1]
        return logits

    @abstractmethod
    def _logits(self, ids: Tensor, positions: Tensor, bias: Tensor) -> Tensor:
        """Runs ``ids`` [B, Q] at ``positions`` through the layers (filling the cache); the logits of the
        last column."""


def _conv1d(module: torch.nn.Module, x: Tensor) -> Tensor:
    """GPT-2's Conv1D (a linear layer with a transposed weight)."""
    return torch.addmm(module.bias, x.flatten(0, -2), module.weight).unflatten(0, x.shape[:-1])


def _layer_norm(module: torch.nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _joined(*linears: torch.nn.Linear) -> tuple[Tensor, Tensor | None]:
    """The weights (and biases) of linear layers on the same input, stacked: one product computes them all."""
    weight = torch.cat([layer.weight for layer in linears])
    biases = [layer.bias for layer in linears]
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat([b if b is not None else weight.new_zeros(layer.out_features)
                              for b, layer in zip(biases, linears)])


def _linear(module: torch.nn.Linear, x: Tensor) -> Tensor:
    return F.linear(x, module.weight, module.bias)


class GPT2Decoder(_LeanDecoder):
    """``GPT2LMHeadModel``: pre-LayerNorm blocks, learned absolute positions, Conv1D projections."""

    def __init__(self, model: GPT2LMHeadModel, ids: Tensor, mask: Tensor, max_new_tokens: int):
        config = model.config
        cache = _KVCache(mask, max_new_tokens, layers=config.n_layer, heads=config.n_head, kv_heads=config.n_head,
                         head_dim=config.n_embd // config.n_head, dtype=model.lm_head.weight.dtype)
        super().__init__(ids, mask, cache)
        self.model, self.act = model, ACTIVATIONS[config.activation_function]
        self.heads = config.n_head

    def _logits(self, ids: Tensor, positions: Tensor, bias: Tensor) -> Tensor:
        body = self.model.transformer
        x = F.embedding(ids, body.wte.weight) + F.embedding(positions, body.wpe.weight)
        for index, block in enumerate(body.h):
            qkv = _conv1d(block.attn.c_attn, _layer_norm(block.ln_1, x))
            q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(2)
            x = x + _conv1d(block.attn.c_proj, self.cache.attend(index, q, k, v, bias, block.attn.scaling))
            x = x + _conv1d(block.mlp.c_proj, self.act(_conv1d(block.mlp.c_fc, _layer_norm(block.ln_2, x))))
        return _linear(self.model.lm_head, _layer_norm(body.ln_f, x[:, -1]))


def _rms_norm(module: torch.nn.Module, x: Tensor) -> Tensor:
    return F.rms_norm(x, module.weight.shape, module.weight, module.variance_epsilon)


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, -1)
    return torch.cat([-second, first], -1)


class LlamaDecoder(_LeanDecoder):
    """``LlamaForCausalLM``: RMSNorm, rotary positions, SwiGLU, grouped-query attention."""

    def __init__(self, model: LlamaForCausalLM, ids: Tensor, mask: Tensor, max_new_tokens: int):
        attention = model.model.layers[0].self_attn
        config, dtype = model.config, model.lm_head.weight.dtype
        cache = _KVCache(mask, max_new_tokens, layers=config.num_hidden_layers, heads=config.num_attention_heads,
                         kv_heads=config.num_key_value_heads, head_dim=attention.head_dim, dtype=dtype)
        super().__init__(ids, mask, cache)
        self.model, self.act, self.head_dim = model, ACTIVATIONS[config.hidden_act], attention.head_dim
        # cos/sin of every position this call can reach, exactly as LlamaRotaryEmbedding computes them
        rotary = model.model.rotary_emb
        width = ids.shape[1] + max_new_tokens
        freqs = torch.arange(width, device=ids.device).float()[:, None] * rotary.inv_freq.float()
        angles = torch.cat([freqs, freqs], -1)
        self.cos = (angles.cos() * rotary.attention_scaling).to(dtype)
        self.sin = (angles.sin() * rotary.attention_scaling).to(dtype)
        # q, k, v in one product and gate, up in another: fewer, larger products (the weights cannot change
        # during one sampling call, so the joined copies are exact for its length)
        layers = model.model.layers[: config.num_hidden_layers]
        self.qkv = [_joined(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in layers]
        self.gate_up = [_joined(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in layers]
        self.heads = [config.num_attention_heads, config.num_key_value_heads]  # of queries, of keys and values

    def _logits(self, ids: Tensor, positions: Tensor, bias: Tensor) -> Tensor:
        body = self.model.model
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # [B, Q, 1, D]
        x = F.embedding(ids, body.embed_tokens.weight)
        for index, layer in enumerate(body.layers[: self.model.config.num_hidden_layers]):
            attention, mlp = layer.self_attn, layer.mlp
            h = _rms_norm(layer.input_layernorm, x)
            qk, v = F.linear(h, *self.qkv[index]).unflatten(-1, (-1, self.head_dim)).split(
                [self.heads[0] + self.heads[1], self.heads[1]], -2)
            qk = qk * cos + _rotate_half(qk) * sin  # queries and keys rotated together: half the small ops
            q, k = qk.split(self.heads, -2)
            x = x + _linear(attention.o_proj, self.cache.attend(index, q, k, v, bias, attention.scaling))
            h = _rms_norm(layer.post_attention_layernorm, x)
            gate, up = F.linear(h, *self.gate_up[index]).chunk(2, -1)
            x = x + _linear(mlp.down_proj, self.act(gate) * up)
        return _linear(self.model.lm_head, _rms_norm(body.norm, x[:, -1]))


class HFDecoder:
    """Any model, through its own forward and cache (``cache=`` in, ``out.cache`` out); encoder-decoders
    run the encoder once."""

    def __init__(self, model: PreTrainedModel, ids: Tensor, mask: Tensor):
        self.encoder_decoder = bool(model.config.is_encoder_decoder)
        if self.encoder_decoder:
            ids, mask = right_padded(ids, mask)
        self.model, self.ids, self.mask = model, ids, mask.long()
        self.positions = prompt_positions(mask)[:, -1:]
        self.cache: Cache | None = None
        self.encoder: ModelOutput | None = None

    def prefill(self) -> Tensor:
        if self.encoder_decoder:
            self.encoder = self.model.get_encoder()(input_ids=self.ids, attention_mask=self.mask)
            start = torch.full_like(self.ids[:, :1], self.model.config.decoder_start_token_id)
            out = self.model(encoder_outputs=self.encoder, attention_mask=self.mask, decoder_input_ids=start,
                             use_cache=True)
        else:
            out = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=prompt_positions(self.mask),
                             use_cache=True)
        self.cache = out.cache
        return out.logits[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        if self.encoder_decoder:
            out = self.model(encoder_outputs=self.encoder, attention_mask=self.mask, decoder_input_ids=tokens[:, None],
                             cache=self.cache, use_cache=True)
        else:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
            self.positions = self.positions + 1
            out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.positions,
                             cache=self.cache, use_cache=True)
        self.cache = out.cache
        return out.logits[:, -1]


# Every module of a supported model that has parameters or children is one of these exact types: a layer
# replaced in place (LoRA, quantization, …) would otherwise be bypassed silently.
_STOCK_MODULES: frozenset[type[torch.nn.Module]] = frozenset({
    GPT2LMHeadModel, GPT2Model, GPT2Block, GPT2Attention, GPT2MLP, Conv1D,
    LlamaForCausalLM, LlamaModel, LlamaDecoderLayer, LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding,
    torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.ModuleList,
})


def lean_supported(model: PreTrainedModel) -> bool:
    """Whether a lean decoder implements this model exactly (else :class:`HFDecoder` runs it): a stock GPT-2 or
    Llama of a configuration it implements, with no layer replaced and no forward hook (which it would skip)."""
    config = model.config
    if type(model) is GPT2LMHeadModel:
        implemented = (not config.add_cross_attention and not config.reorder_and_upcast_attn
                       and config.activation_function in ACTIVATIONS)
    elif type(model) is LlamaForCausalLM:
        implemented = model.model.rotary_emb.rope_type == "default" and config.hidden_act in ACTIVATIONS
    else:
        return False
    return implemented and all(_untouched(module) for module in model.modules())


def _untouched(module: torch.nn.Module) -> bool:
    """No forward hook, and a stock type or a parameter-free leaf (an activation, a dropout)."""
    hooked = bool(module._forward_hooks or module._forward_pre_hooks)
    leaf = next(module.parameters(), None) is None and next(module.children(), None) is None
    return not hooked and (type(module) in _STOCK_MODULES or leaf)


def decoder_for(model: PreTrainedModel, ids: Tensor, mask: Tensor, max_new_tokens: int) -> Decoder:
    """The lean decoder where one implements the model, else the generic one."""
    if lean_supported(model):
        lean = GPT2Decoder if isinstance(model, GPT2LMHeadModel) else LlamaDecoder
        return lean(model, ids, mask, max_new_tokens)
    return HFDecoder(model, ids, mask)


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Token i of each row with cdf[i−1] ≤ u·total < cdf[i], the cdf summed in float64: exactly
    P(i) = probs[i]/total for u ~ U[0, 1), and a token of probability 0 (cdf[i] = cdf[i−1]) never.
    ``uniforms`` [B] are float64 draws in [0, 1 − 2⁻⁵³], so u·total < total and i < V."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    return torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:], right=True).squeeze(1)


def draw_uniforms(generator: torch.Generator | Sequence[torch.Generator], steps: int, batch: int) -> Tensor:
    """[steps, batch] float64 uniforms, from one generator, or column b from the b-th of one generator per row: then a
    row's draws do not depend on the rows sampled beside it (the monitor's samples, whatever its batch size)."""
    if isinstance(generator, torch.Generator):
        return torch.rand(steps, batch, generator=generator, dtype=torch.float64, device=generator.device)
    if len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for {batch} rows: give one generator, or one per row")
    return torch.stack([torch.rand(steps, generator=g, dtype=torch.float64, device=g.device) for g in generator], 1)


def sample(decoder: Decoder, *, batch: int, vocab_size: int, max_new_tokens: int,
           generator: torch.Generator | Sequence[torch.Generator], temperature: float, eos_id: int, pad_id: int,
           device: torch.device, return_logprobs: bool) -> tuple[Tensor, Tensor | None]:
    """Responses [B, T ≤ max_new_tokens] drawn from softmax(logits[:vocab_size]/temperature), each row cut after its first
    EOS and padded with ``pad_id``, and, when asked, the float32 log-probabilities [B, T, V] each position was
    drawn from. The uniforms come from ``generator`` (usually on the CPU, whatever the model's device), all at
    once: one per row and step, [max_new_tokens, B], whether or not every step runs (:func:`draw_uniforms`)."""
    uniforms = draw_uniforms(generator, max_new_tokens, batch).to(device)
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.empty(batch, max_new_tokens, vocab_size, device=device) if return_logprobs else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    while steps < max_new_tokens:
        logits = (decoder.prefill() if steps == 0 else decoder.step(tokens[:, steps - 1]))[:, :vocab_size]
        logits = tempered(logits, temperature, torch.float32)  # entries past vocab_size pad the output layer
        if logprobs is not None:
            logprobs[:, steps] = torch.log_softmax(logits, -1)
        drawn = inverse_cdf(torch.softmax(logits, -1), uniforms[steps])
        token = drawn.masked_fill(finished, pad_id)
        tokens[:, steps] = token
        finished |= token == eos_id
        steps += 1
        # one synchronisation for both: every row done, or a distribution that was not one (NaN/inf logits give
        # no token below the vocabulary size, which the next step could not embed)
        done, broken = torch.stack((finished.all(), (drawn >= vocab_size).any())).tolist()
        if broken:
            raise NonFiniteLogits(
                "the model's next-token logits are not finite (NaN or inf in its weights), so no token can be drawn: "
                "after a training step, the update diverged (lower the learning rate and rerun: it resumes from the "
                "last checkpoint); else the model's checkpoint is broken")
        if done:
            break
    return tokens[:, :steps], None if logprobs is None else logprobs[:, :steps]
