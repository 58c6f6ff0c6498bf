"""One tokenizer for oracle, teacher and student: a small byte-level BPE trained on the task's text,
or the pretrained models' own, checked to be one and the same; and the encoding of prompts and
responses that every stage shares."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from teacherhack.tasks import TaskError

PAD, EOS, SEP = "<pad>", "<eos>", "<sep>"

# The smallest vocabulary `train_tokenizer` can build: every byte, and PAD, EOS, SEP
MIN_VOCAB = len(pre_tokenizers.ByteLevel.alphabet()) + len((PAD, EOS, SEP))
_PROBE = "a b"  # any text: what a tokenizer adds around it, it adds around every text


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the task text, with PAD, EOS, SEP as ids 0, 1, 2.

    Byte level means any text encodes and decodes exactly; a small vocabulary keeps the output
    softmax, which dominates CPU training time, cheap.
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB} (every byte plus 3 special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, SEP],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=EOS,
        sep_token=SEP,
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
        split_special_tokens=True,  # a literal "<sep>" in the data is text, not a control token
    )


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_len: int) -> list[list[int]]:
    """What the tokenizer puts before a text (a pretrained tokenizer's BOS: `prompt_start`), prompt tokens, then SEP,
    which marks where the response starts; a long prompt keeps its start, and all of it fits in ``max_len``.

    A pretrained tokenizer without SEP ends prompts with EOS instead (see `special_ids`).
    """
    start = prompt_start(tokenizer)
    encoded = _encode(tokenizer, prompts, max_len, len(start) + 1)
    end = special_ids(tokenizer).prompt_end if encoded else None
    return [start + ids + [end] for ids in encoded]


def encode_responses(
    tokenizer: PreTrainedTokenizerBase, responses: Sequence[str], max_len: int
) -> list[list[int]]:
    """Response tokens then EOS, so models learn to stop; a long response keeps its start."""
    encoded = _encode(tokenizer, responses, max_len, 1)
    end = special_ids(tokenizer).eos if encoded else None
    return [ids + [end] for ids in encoded]


def encode_references(tokenizer: PreTrainedTokenizerBase, responses: Sequence[str], max_len: int) -> list[list[int]]:
    """Real responses as a model's samples are: tokens then EOS, or the first ``max_len`` tokens without an EOS
    when longer (one outcome of the distribution truncated at that length). Unlike training targets
    (:func:`encode_responses`), a cut response gets no EOS: its likelihood must not include a made-up ending."""
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    eos = special_ids(tokenizer).eos
    return [ids + [eos] if len(ids) < max_len else ids[:max_len]
            for ids in (tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else [])]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int, framing: int) -> list[list[int]]:
    room = _room(max_len, framing)
    return [ids[:room] for ids in token_ids(tokenizer, texts)]


def _room(max_len: int, framing: int) -> int:
    """The tokens of a text that fit in ``max_len`` beside the ``framing`` tokens around it (BOS, SEP or EOS)."""
    if max_len <= framing:
        raise ValueError(f"max_len must be at least {framing + 1} (one token plus the {framing} around it: BOS, SEP "
                         f"or EOS), got {max_len}")
    return max_len - framing


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """The tokens of each text, whole (no special tokens), in batches of 1,000."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), 1000):
        ids += tokenizer(list(texts[start : start + 1000]), add_special_tokens=False)["input_ids"]
    return ids


def prompt_start(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer itself puts before a text's tokens: the BOS of Llama's, Gemma's and Mistral's; nothing for
    GPT-2's, Qwen's, T5's (which appends its EOS instead) or ours. Its model saw its training texts start so (Gemma
    without it produces garbage), so every prompt starts with them; a response, which continues its prompt, never
    does. Read from what the tokenizer does, not from ``bos_token_id``: GPT-2's names a BOS and never adds it."""
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE)["input_ids"]
    return next((full[:i] for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), [])


# --- Pretrained tokenizers: one tokenizer for all roles ----------------------------------------------

SPECIAL_TOKENS = ("pad", "eos", "bos", "sep", "unk")
TOKENIZATION_RULES = ("normalizer", "pre_tokenizer", "model", "added_tokens")


class TokenizerMismatch(TaskError):
    """The roles' tokenizers differ: token ids would mean different things to different models."""


def check_tokenizers(tokenizers: Mapping[str, PreTrainedTokenizerBase]) -> None:
    """Check that every role (oracle, teacher, student, ...) uses one tokenizer.

    Distillation compares next-token distributions id by id, so the roles must agree on the
    vocabulary (token → id map), on the special tokens (pad, eos, bos, sep, unk ids) and, for fast
    tokenizers, on how text becomes tokens (normalizer, pre-tokenizer, model and merges, the added tokens and
    their stripping and normalisation flags, whether special tokens are split). Each role
    is compared with the first; `TokenizerMismatch` says what differs.
    """
    items = list(tokenizers.items())
    problems = []
    for name, tokenizer in items[1:]:
        differences = _tokenizer_differences(items[0][0], items[0][1], name, tokenizer)
        if differences:
            problems.append(f"{items[0][0]} vs {name}: " + "; ".join(differences))
    if problems:
        raise TokenizerMismatch("the tokenizers differ, so token ids would not mean the same to every model: "
                                + " | ".join(problems))


def _special(tokenizer: PreTrainedTokenizerBase, kind: str) -> str:
    token_id = getattr(tokenizer, f"{kind}_token_id", None)
    if token_id is None:
        return "none"
    return f"{getattr(tokenizer, f'{kind}_token')!r} (id {token_id})"


def _tokenizer_differences(name_a: str, a: PreTrainedTokenizerBase, name_b: str, b: PreTrainedTokenizerBase) -> list[str]:
    differences = []
    if len(a) != len(b):
        differences.append(f"vocab sizes {len(a)} vs {len(b)}")
    specials = [
        f"{kind} {_special(a, kind)} vs {_special(b, kind)}"
        for kind in SPECIAL_TOKENS
        if getattr(a, f"{kind}_token_id", None) != getattr(b, f"{kind}_token_id", None)
    ]
    if specials:
        differences.append("special tokens differ: " + ", ".join(specials))
    start_a, start_b = prompt_start(a), prompt_start(b)
    if start_a != start_b:  # e.g. add_bos_token set in one: the roles would read other prompts
        differences.append(f"tokens put before a text {start_a} vs {start_b}")
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if vocab_a != vocab_b:
        moved = sorted((t for t in vocab_a if t in vocab_b and vocab_a[t] != vocab_b[t]), key=vocab_a.__getitem__)
        if moved:
            sample = ", ".join(f"{t!r}: {vocab_a[t]} in {name_a} vs {vocab_b[t]} in {name_b}" for t in moved[:5])
            differences.append(f"{len(moved)} tokens have different ids ({sample})")
        for name, mine, other in ((name_a, vocab_a, vocab_b), (name_b, vocab_b, vocab_a)):
            only = sorted((t for t in mine if t not in other), key=mine.__getitem__)
            if only:
                sample = ", ".join(f"{t!r} (id {mine[t]})" for t in only[:5])
                differences.append(f"{len(only)} tokens only in {name} ({sample})")
    elif isinstance(a, PreTrainedTokenizerFast) and isinstance(b, PreTrainedTokenizerFast):
        rules_a = json.loads(a.backend_tokenizer.to_str())
        rules_b = json.loads(b.backend_tokenizer.to_str())
        changed = [part for part in TOKENIZATION_RULES if rules_a.get(part) != rules_b.get(part)]
        if getattr(a, "split_special_tokens", False) != getattr(b, "split_special_tokens", False):
            changed.append("split_special_tokens")
        if changed:
            differences.append(f"same vocabulary but different tokenization rules ({', '.join(changed)})")
    return differences


@dataclass(frozen=True)
class SpecialIds:
    prompt_end: int  # appended to every prompt
    eos: int  # ends every response
    pad: int  # fills batches


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    """The ids that frame prompts and responses, for our tokenizer or a pretrained one.

    Rule: the prompt ends with `sep_token` when the tokenizer has one (ours: <sep>), else with
    `eos_token`. For a decoder-only model ("prompt <eos> response <eos>") EOS is the usual
    document boundary (GPT-2's <|endoftext|>), so the response position must come from the prompt
    length, never from searching for the separator id. For an encoder-decoder model the prompt is
    the encoder input and needs no separator; ending it with EOS is what T5's tokenizer does to
    every input, so T5 checkpoints see inputs as in their training. Padding uses `pad_token`, else
    EOS (attention masks, not the id, exclude padding). A tokenizer without EOS is an error.
    """
    if tokenizer.eos_token_id is None:
        raise TaskError(
            f"the tokenizer {type(tokenizer).__name__} has no eos_token, so responses cannot end: "
            "set one (tokenizer.eos_token = ...) and save it with the models"
        )
    eos = tokenizer.eos_token_id
    sep = tokenizer.sep_token_id
    pad = tokenizer.pad_token_id
    return SpecialIds(prompt_end=eos if sep is None else sep, eos=eos, pad=eos if pad is None else pad)


def truncation_report(ids: Sequence[Sequence[int]], max_len: int, what: str = "prompts",
                      start: int = 0) -> tuple[int, int]:
    """(texts that `encode_prompts` or `encode_responses` would cut at `max_len`, texts), from their
    :func:`token_ids`: a text keeps at most `max_len` - 1 - `start` tokens, as one more ends it and `start` come before
    it (a prompt's `prompt_start`). Raises `TaskError` when every text would be cut, since then no model sees a whole
    one: `max_len` is wrong for the task (``what``: "prompts" or "responses", for the message).
    """
    kept = _room(max_len, start + 1)
    lengths = [len(row) for row in ids]
    truncated = sum(length > kept for length in lengths)
    if lengths and truncated == len(lengths):
        before = f" and the {start} before it (the tokenizer's BOS)" if start else ""
        raise TaskError(
            f"all {truncated} {what} are longer than {kept} tokens (max_len {max_len} less the token that ends one"
            f"{before}; the shortest has {min(lengths)}, the median {sorted(lengths)[len(lengths) // 2]}): "
            f"raise the maximum {what.rstrip('s')} length"
        )
    return truncated, len(lengths)
