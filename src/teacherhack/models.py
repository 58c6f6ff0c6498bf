"""Models as distributions: build from size presets or load from a folder or hub id (pinned to a commit of the
local Hugging Face cache: :func:`pin`), sample with a KV cache, score responses.

One wrapper, :class:`LM`, serves the oracle, the teacher and the student, decoder-only (GPT-2, Llama,
…) and encoder-decoder (T5, BART, …) alike. Prompts are left-padded and carry explicit position ids (an encoder
gets them right-padded, which needs none), so a padded batch scores exactly like its rows one by one.
``LM.temperature`` (τ) *defines* the model's distribution as softmax(logits/τ) for sampling and scoring alike:
a sharpened oracle (τ < 1) is an exact ground truth, not just a sampling trick.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import re
import sys

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import Tensor
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoConfig,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.activations import NewGELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from teacherhack import decoding
from teacherhack.divergences import tempered
from teacherhack.errors import UserError

ARCHITECTURES: tuple[str, ...] = ("gpt2", "llama", "t5")

# Inside :func:`float32_attention`, Hugging Face's SDPA attention runs in float32 under bf16 autocast.
_ATTENTION_IN_FLOAT32 = contextvars.ContextVar("attention_in_float32", default=False)
SDPA = "teacherhack_sdpa"


def _sdpa(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN003, ANN202
    """Hugging Face's SDPA attention, the same bits, except inside :func:`float32_attention`: there, under bf16
    autocast, its inputs are cast up to float32 and autocast is off around it (autocast would run the kernel in
    bf16 even on float32 inputs, such as Llama's rotated queries and keys). The CPU's fused attention kernel is
    1.8-3.6× slower in bf16 than in float32 at the lab's shapes (``scripts/bench_attention.py``), and float32 is
    the more exact of the two."""
    if not _ATTENTION_IN_FLOAT32.get():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, _up(query), _up(key), _up(value), _up(attention_mask),
                                      **{name: _up(item) for name, item in kwargs.items()})


def _up(x: object) -> object:
    """A float tensor (queries, keys, values, a float mask, T5's position bias) in float32; anything else as is."""
    return x.float() if isinstance(x, Tensor) and x.is_floating_point() else x


AttentionInterface.register(SDPA, _sdpa)
AttentionMaskInterface.register(SDPA, sdpa_mask)  # the masks Hugging Face builds for its own SDPA


def _renamable(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention may become :data:`SDPA` without changing what it computes: none of its code
    names ``"sdpa"``. Gemma 4 compares ``_attn_implementation == "sdpa"`` to decide whether it may drop query
    positions; under another name it drops them where SDPA's ``is_causal`` then loses their context. Its code:
    the modules of its layers' classes and their bases, torch's and Transformers' shared ones aside (as Hugging
    Face's ``_can_set_attn_implementation`` reads a class's module)."""
    return not any(_names_sdpa(klass.__module__) for module in model.modules() for klass in type(module).__mro__
                   if klass.__module__.startswith("transformers.models.")
                   or not klass.__module__.startswith(("torch.", "transformers.", "builtins")))


@functools.cache
def _names_sdpa(module_name: str) -> bool:
    """Whether the Python module's source holds the string literal "sdpa" (unreadable source: taken as yes)."""
    try:
        return re.search(r"""["']sdpa["']""", inspect.getsource(sys.modules[module_name])) is not None
    except (KeyError, OSError, TypeError):
        return True


@contextlib.contextmanager
def float32_attention(enabled: bool = True) -> Iterator[None]:
    """Every :class:`LM`'s attention in float32 within (training precision ``bfloat16-fp32-attention``)."""
    token = _ATTENTION_IN_FLOAT32.set(enabled)
    try:
        yield
    finally:
        _ATTENTION_IN_FLOAT32.reset(token)


# Elements per piece of TanhGELU: small enough to stay in cache, and a multiple of every vector loop's step
_PIECE = 32768


class TanhGELU(NewGELUActivation):
    """Hugging Face's ``gelu_new`` (GPT-2's and T5 v1.1's activation), the same bits, faster where no gradient
    flows on one CPU thread (scoring, and the frozen teacher's forwards, in the lab's stage-2 runs and sweeps).
    Hugging Face computes it as eight elementwise ops, each a pass through memory over the whole [B, T, 4·width]
    tensor; here the same ops, with the same operands in the same order, run in place on pieces of :data:`_PIECE`
    elements that stay in cache (2.1-2.6× faster at the lab's scoring shapes, BENCHMARKS.md). Each element goes
    through the same arithmetic either way. The pieces start at multiples of the vector loop's step, as a
    precaution for builds whose vector and scalar code round differently: torch 2.13 on x86 does not (the tests
    pass with other piece sizes too). On more threads the whole ops, split among them, are faster at
    a training batch's sizes, so Hugging Face's ops run there, and under autograd, which records them. Not for
    ``torch.func`` transforms or forward-mode AD, which the pieces' ``out=`` ops do not support."""

    def forward(self, input: Tensor) -> Tensor:
        if ((input.requires_grad and torch.is_grad_enabled()) or input.device.type != "cpu"
                or not input.is_contiguous() or not input.is_floating_point() or torch.get_num_threads() > 1):
            return super().forward(input)
        flat = input.view(-1)
        out, half = torch.empty_like(flat), flat.new_empty(min(_PIECE, flat.numel()))
        for start in range(0, flat.numel(), _PIECE):
            x, y = flat[start:start + _PIECE], out[start:start + _PIECE]
            # 0.5 * x * (1 + tanh(√(2/π) · (x + 0.044715 · x³))), each op's operands in Hugging Face's order (x86
            # passes on the first operand's NaN, so a + b and b + a can differ in a NaN's bits)
            torch.pow(x, 3.0, out=y)
            torch.add(x, y.mul_(0.044715), out=y).mul_(math.sqrt(2.0 / math.pi)).tanh_().add_(1.0)
            torch.mul(torch.mul(x, 0.5, out=half[: len(x)]), y, out=y)
        return out.view(input.shape)


@dataclass(frozen=True)
class ModelSize:
    layers: int
    width: int
    heads: int


# Capacity presets, smallest to largest; the lab's oracle > teacher > student picks from these.
SIZES: dict[str, ModelSize] = {
    "xxs": ModelSize(1, 32, 2),
    "xs": ModelSize(1, 64, 2),
    "s": ModelSize(2, 96, 4),
    "m": ModelSize(3, 128, 4),
    "l": ModelSize(4, 192, 4),
    "xl": ModelSize(6, 256, 8),
    "xxl": ModelSize(8, 384, 8),
}


@dataclass(frozen=True)
class Prompts:
    """A batch of prompts, left-padded: ``ids`` [B, P], ``mask`` [B, P] (True on real tokens)."""

    ids: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: slice | Tensor) -> "Prompts":
        ids, mask = self.ids[index], self.mask[index]
        keep = mask.any(0)  # drop columns that are padding in every remaining row
        first = int(keep.float().argmax()) if keep.any() else ids.shape[1] - 1
        return Prompts(ids[:, first:], mask[:, first:])

    def repeat(self, times: int) -> "Prompts":
        """Each prompt ``times`` times in a row (k generations per prompt)."""
        return Prompts(self.ids.repeat_interleave(times, 0), self.mask.repeat_interleave(times, 0))

    def to(self, device: torch.device | str) -> "Prompts":
        return Prompts(self.ids.to(device), self.mask.to(device))


def collate_prompts(sequences: list[list[int]], pad_id: int) -> Prompts:
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("prompts must be a non-empty list of non-empty token sequences")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = True
    return Prompts(ids, mask)


def pad_responses(sequences: list[list[int]], pad_id: int) -> Tensor:
    """Right-pad responses into [B, T]; T = the longest response."""
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), max(width, 1)), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


@dataclass(frozen=True)
class PromptStates:
    """A frozen decoder-only model's keys and values on a fixed list of prompts, every column but the last, computed
    once (:meth:`LM.prompt_states`): scoring responses to those prompts then runs only the last prompt token and
    the responses through the model, not the prompts again at every step. Stored left-padded to the longest
    prompt, so the prefix of a batch of them, left-padded to its own longest, is their last columns. The same
    distribution as the full forward, not the same bits: in float32 about 1e-6 on the logits (attention and matrix
    products of other shapes); under bf16 autocast, where the full forward itself rounds (up to about 1e-2 from float32 at
    the lab's teacher size), the states are what the pass that computed them made (float32 outside autocast) and the
    log-probabilities move by as much as that rounding."""

    ids: Tensor  # [N, P] the prompts, left-padded
    mask: Tensor  # [N, P]
    layers: tuple[tuple[Tensor, Tensor], ...]  # per layer: keys and values [N, key heads, P − 1, head dim]
    config: object  # the model's configuration (the cache object needs it)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    def prefix(self, rows: Tensor, prompts: Prompts) -> DynamicCache | None:
        """The prefix of the batch ``prompts``, which are the stored prompts ``rows`` (checked); None where the
        batch's prompts are one token long (nothing to reuse)."""
        width = prompts.ids.shape[1]
        rows = rows.to(self.ids.device)
        ids, mask = self.ids[rows], self.mask[rows]
        if (width > ids.shape[1] or not torch.equal(mask[:, -width:], prompts.mask.to(mask.device))
                or not torch.equal(mask.sum(1), prompts.mask.sum(1).to(mask.device))
                or not torch.equal(ids[:, -width:][mask[:, -width:]], prompts.ids[prompts.mask].to(ids.device))):
            raise ValueError("these prompts are not the stored prompts of these rows")
        if width == 1:
            return None
        start = ids.shape[1] - width  # the batch's first column among the stored ones
        return DynamicCache(ddp_cache_data=[(keys[rows, :, start:], values[rows, :, start:])
                                            for keys, values in self.layers], config=self.config)


def build_model(arch: str, size: str, *, vocab_size: int, pad_id: int, eos_id: int, max_positions: int,
                seed: int) -> PreTrainedModel:
    """A fresh model of a capacity preset. Dropout is 0 (as in the paper's setup)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=s.width, n_layer=s.layers,
                            n_head=s.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
        return GPT2LMHeadModel(config)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=s.width, intermediate_size=s.width * 8 // 3,
                             num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                             max_position_embeddings=max_positions, bos_token_id=eos_id, eos_token_id=eos_id,
                             pad_token_id=pad_id, tie_word_embeddings=True)
        return LlamaForCausalLM(config)
    if arch == "t5":
        config = T5Config(vocab_size=vocab_size, d_model=s.width, d_kv=s.width // s.heads, d_ff=s.width * 4,
                          num_layers=s.layers, num_decoder_layers=s.layers, num_heads=s.heads, dropout_rate=0.0,
                          pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id)
        return T5ForConditionalGeneration(config)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


class HubModelError(UserError):
    """A model name that is neither a size preset, a local folder nor a usable hub id."""


class NotCached(HubModelError):
    """A hub id (at its revision) that the local Hugging Face cache does not hold."""


def split_revision(name: str) -> tuple[str, str | None]:
    """A model name as ``from_pretrained`` takes it: (folder or hub id, revision or None). A hub id may name a
    revision (a branch, tag or commit) after ``@``: ``ORG/NAME@REVISION``. A folder that exists is a folder, ``@``
    in its name or not. Raises ValueError for a malformed ``ID@REV``."""
    if "@" not in name or Path(name).expanduser().exists():
        return name, None
    repo, _, revision = name.partition("@")  # a hub id holds no @, so the first one starts the revision
    if not revision:
        raise ValueError("nothing after '@': write ID@REVISION (a branch, tag or commit), or the id alone for its "
                         "default branch")
    if revision != revision.strip() or any(c.isspace() for c in revision):
        raise ValueError(f"the revision {revision!r} holds white space")
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ValueError(f"{repo!r} before '@' is not a hub id (ORG/NAME), and no folder {name!r} exists") from None
    return repo, revision


def pin(name: str) -> str:
    """A hub id pinned to a commit, ``ORG/NAME@COMMIT``: the commit the local Hugging Face cache holds for the id's
    revision (its default branch without one), read from the cache alone, never the network. Size presets and
    local folders come back as they are. The one place a hub id is resolved: the stages' keys hash the pinned name
    and every load passes its commit as the revision, so new weights under the same id (a newer download, another
    machine) get new keys, and what loads is what was keyed. Raises :class:`HubModelError` for a name that is no hub
    id and :class:`NotCached` when the cache does not hold it."""
    if name in SIZES or Path(name).expanduser().exists():
        return name
    try:
        repo, revision = split_revision(name)
        validate_repo_id(repo)  # split_revision checks it only before an @
    except ValueError:  # HFValidationError too
        raise HubModelError(f"{name!r} is neither a size preset ({', '.join(SIZES)}), a model folder here, nor a hub "
                            f"id (ORG/NAME or ORG/NAME@REVISION)") from None
    config = try_to_load_from_cache(repo, "config.json", revision=revision)  # every model's first file
    if not isinstance(config, str):
        storage = Path(hub_constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
        refs = sorted(str(p.relative_to(storage / "refs")) for p in (storage / "refs").rglob("*") if p.is_file())
        what = f"revision {revision!r} of hub model {repo!r}" if revision else f"hub model {repo!r}"
        holds = f"; it holds {repo!r} at {', '.join(refs)}" if refs else ""
        raise NotCached(f"{what} is not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}{holds})")
    return f"{repo}@{Path(config).parent.name}"  # snapshots/<commit>/config.json


def from_pretrained(auto: Any, name: str | Path, **kwargs: Any) -> Any:
    """``auto.from_pretrained`` (a model, config or tokenizer class) of a folder or hub id, the revision of an
    ``ID@REV`` passed as ``revision`` (a :func:`pin`-ned name's commit: exactly what was keyed)."""
    path, revision = (name, None) if isinstance(name, Path) else split_revision(name)
    return auto.from_pretrained(path, revision=revision, **kwargs)


def load_pretrained(path_or_id: str | Path, *, dtype: torch.dtype = torch.float32,
                    trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal or seq2seq LM from a local folder or hub id (``ID@REV`` too), as safetensors only (never
    unpickling), without dropout (:func:`without_dropout`)."""
    config = without_dropout(from_pretrained(AutoConfig, path_or_id, trust_remote_code=trust_remote_code))
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return from_pretrained(auto, path_or_id, config=config, dtype=dtype, use_safetensors=True,
                           trust_remote_code=trust_remote_code)


def without_dropout(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` with every dropout probability at 0 (T5's ``dropout_rate``, GPT-2's ``*_pdrop``, BART's
    ``*dropout`` and ``*layerdrop``): the lab trains as the paper does, without dropout (its Table 1), as its size
    presets are built; a checkpoint's own (T5 v1.1's 0.1) would train every stage with it."""
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):  # an encoder-decoder's parts, a multimodal model's text config
            without_dropout(value)
        elif isinstance(value, float) and any(part in name for part in ("dropout", "pdrop", "layerdrop")):
            setattr(config, name, 0.0)
    return config


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside: no dropout, so that a model scored or sampled twice gives the same values (a checkpoint's
    own dropout, T5's 0.1 say, would otherwise blur every evaluation made during training); every submodule gets
    its own train/eval flag back after."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class LM:
    """A model seen as a distribution over responses given prompts (see the module docstring)."""

    def __init__(self, model: PreTrainedModel, *, pad_id: int, eos_id: int, temperature: float = 1.0,
                 vocab_size: int | None = None):
        if temperature <= 0:
            raise ValueError(f"model temperature must be > 0, got {temperature}")
        self.model, self.pad_id, self.eos_id, self.temperature = model, pad_id, eos_id, temperature
        # The same attention, able to run in float32 (never saved); where the class follows Hugging Face's
        # attention interface (else setting it only warns) and its code does not test the name (_renamable)
        if (model.config._attn_implementation == "sdpa" and model._can_set_attn_implementation()
                and _renamable(model)):
            model.set_attn_implementation(SDPA)
        for module in list(model.modules()):  # the same activation, faster where no gradient flows (never saved)
            for name, child in module.named_children():
                if type(child) is NewGELUActivation:
                    setattr(module, name, TanhGELU())
        self.module: torch.nn.Module = model  # what scoring calls: the model, or its DDP wrapper in training
        self.encoder_decoder = bool(model.config.is_encoder_decoder)
        # the output layer then runs on the response positions only (the prompt's would be thrown away)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # The real vocabulary when the output layer is padded beyond it: the entries from here on are not tokens,
        # so scoring and sampling ignore them (the distribution is the softmax over the first vocab_size entries).
        self.vocab_limit = vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        """The distribution's support: the declared real vocabulary, else the output layer's width."""
        return self.vocab_limit or self.model.get_output_embeddings().weight.shape[0]

    def logits(self, prompts: Prompts, responses: Tensor, prefix: DynamicCache | None = None) -> Tensor:
        """[B, T, V] tempered logits; entry t scores response token t given the prompt and y<t. ``prefix``: the
        model's keys and values on the prompts but their last column (:meth:`PromptStates.prefix`), so that only
        the last prompt token and the response run through the model."""
        prompts, responses = prompts.to(self.device), responses.to(self.device)
        if self.encoder_decoder:
            start = torch.full_like(responses[:, :1], self.model.config.decoder_start_token_id)
            ids, mask = decoding.right_padded(prompts.ids, prompts.mask)
            out = self.module(input_ids=ids, attention_mask=mask.long(),
                              decoder_input_ids=torch.cat([start, responses[:, :-1]], 1), use_cache=False)
            return self._tempered(out.logits[..., : self.vocab_limit])
        ids = torch.cat([prompts.ids, responses[:, :-1]], 1)
        mask = torch.cat([prompts.mask, torch.ones_like(responses[:, :-1], dtype=torch.bool)], 1)
        positions = decoding.prompt_positions(mask)
        keep = {"logits_to_keep": responses.shape[1]} if self._keeps_logits else {}
        if prefix is None:
            out = self.module(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=False, **keep)
        else:
            run = slice(prompts.ids.shape[1] - 1, None)  # the columns the prefix does not hold
            out = self.module(input_ids=ids[:, run], attention_mask=mask.long(), position_ids=positions[:, run],
                              cache=prefix, use_cache=True, **keep)
        return self._tempered(out.logits[:, -responses.shape[1]:, : self.vocab_limit])

    def _tempered(self, logits: Tensor) -> Tensor:
        """logits/τ divided in float32, as sampling divides them (one bf16 rounding more would score another
        distribution than the one sampled); at τ = 1 the logits as they are, in their dtype."""
        return tempered(logits, self.temperature, None if self.temperature == 1.0 else torch.float32)

    def next_token_logprobs(self, prompts: Prompts, responses: Tensor, prefix: DynamicCache | None = None) -> Tensor:
        return torch.log_softmax(self.logits(prompts, responses, prefix).float(), dim=-1)

    @torch.no_grad()
    def prompt_states(self, prompts: Prompts, *, batch_size: int = 256) -> "PromptStates":
        """This (frozen) decoder-only model's keys and values on every prompt but its last column, in batches of
        ``batch_size`` rows (:class:`PromptStates`)."""
        if self.encoder_decoder or not self._keeps_logits:
            raise ValueError(f"prompt states need a decoder-only model with logits_to_keep; "
                             f"{type(self.model).__name__} is not one")
        prompts = prompts.to(self.device)
        if prompts.ids.shape[1] == 1:  # one-token prompts: nothing comes before the last token
            return PromptStates(prompts.ids, prompts.mask, (), self.model.config)
        positions = decoding.prompt_positions(prompts.mask)
        parts = []
        with eval_mode(self.model):
            for start in range(0, len(prompts), batch_size):
                rows = slice(start, start + batch_size)
                out = self.model(input_ids=prompts.ids[rows, :-1], attention_mask=prompts.mask[rows, :-1].long(),
                                 position_ids=positions[rows, :-1], use_cache=True, logits_to_keep=1)
                parts.append([(layer.keys, layer.values) for layer in out.cache.layers])
        layers = tuple((torch.cat([part[i][0] for part in parts]), torch.cat([part[i][1] for part in parts]))
                       for i in range(len(parts[0])))
        return PromptStates(prompts.ids, prompts.mask, layers, self.model.config)

    @overload
    def sample(self, prompts: Prompts, *, max_new_tokens: int, generator: torch.Generator | Sequence[torch.Generator],
               temperature: float = 1.0, return_logprobs: Literal[False] = False) -> Tensor: ...

    @overload
    def sample(self, prompts: Prompts, *, max_new_tokens: int, generator: torch.Generator | Sequence[torch.Generator],
               temperature: float = 1.0, return_logprobs: Literal[True]) -> tuple[Tensor, Tensor]: ...

    @torch.no_grad()
    def sample(self, prompts: Prompts, *, max_new_tokens: int, generator: torch.Generator | Sequence[torch.Generator],
               temperature: float = 1.0, return_logprobs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Responses [B, T≤max_new_tokens] drawn from softmax(logits/(τ·temperature)) with a KV cache, by
        inverse CDF from ``generator``, or from one generator per row (:func:`teacherhack.decoding.draw_uniforms`).
        Each row ends at its first EOS (padded with ``pad_id`` after); a row with no EOS was truncated.
        ``return_logprobs``: also the float32 log-probabilities [B, T, V] each position was drawn from (entries after
        a row's EOS are unspecified), so their scoring needs no second forward: at ``temperature`` 1,
        :meth:`next_token_logprobs` of the responses to the rounding of the decoder's other matrix shapes (a few 1e-6
        in float32; as much as bf16 rounds in bf16)."""
        if not temperature > 0:
            raise ValueError(f"sampling temperature must be > 0, got {temperature}")
        with eval_mode(self.model):
            prompts = prompts.to(self.device)
            tokens, logprobs = decoding.sample(
                decoding.decoder_for(self.model, prompts.ids, prompts.mask, max_new_tokens), batch=len(prompts),
                vocab_size=self.vocab_size, max_new_tokens=max_new_tokens, generator=generator,
                temperature=self.temperature * temperature, eos_id=self.eos_id, pad_id=self.pad_id,
                device=self.device, return_logprobs=return_logprobs)
        return (tokens, logprobs) if logprobs is not None else tokens

    def save(self, path: Path) -> None:
        self.model.save_pretrained(path, safe_serialization=True)
