"""Prompts start with the BOS a pretrained tokenizer adds (Llama's, Gemma's), as its model saw every text of its
training start, and with nothing where the tokenizer adds none (GPT-2, Qwen, T5, ours); responses never get it; the
BOS counts within task.max_prompt_len; and artifacts built so are keyed apart from older ones. Tiny tokenizers of
the real classes, built here from a vocabulary, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    GemmaTokenizer,
    GPT2Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    Qwen2Tokenizer,
    T5Tokenizer,
)

from teacherhack import config as cfg
from teacherhack import stages
from teacherhack.cache import ArtifactCache
from teacherhack.monitor import HackingMonitor
from teacherhack.tasks import Pair, Splits, TaskError
from teacherhack.tokenizer import (
    encode_prompts,
    encode_references,
    encode_responses,
    token_ids,
    train_tokenizer,
    truncation_report,
)

from conftest import TINY, WORDS
from test_architecture import descendants

TEXT = "sun moon river"
CHARS = sorted(set("".join(WORDS)) | {" "})


def word_pieces(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A SentencePiece-style BPE vocabulary and merges in which each task word (lower and upper case) is one token."""
    vocab, merges = {token: i for i, token in enumerate(specials)}, []
    for word in WORDS + [w.upper() for w in WORDS]:
        piece = "▁"
        vocab.setdefault(piece, len(vocab))
        for ch in word:
            vocab.setdefault(ch, len(vocab))
            if piece + ch not in vocab:
                merges.append((piece, ch))
                vocab[piece + ch] = len(vocab)
            piece += ch
    return vocab, merges


def llama(add_bos_token: bool = True) -> LlamaTokenizer:
    """Llama's tokenizer: BOS <s> (id 1) added at the start of every text, EOS </s> (id 2), no SEP, no pad."""
    return LlamaTokenizer(*word_pieces(["<unk>", "<s>", "</s>"]), add_bos_token=add_bos_token)


def gemma() -> GemmaTokenizer:
    return GemmaTokenizer(*word_pieces(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]), add_bos_token=True)


def gpt2() -> GPT2Tokenizer:
    """GPT-2's: <|endoftext|> is its BOS and EOS, and it adds neither."""
    return GPT2Tokenizer(vocab={"<|endoftext|>": 0, **{c: 1 + i for i, c in enumerate(CHARS[1:] + ["Ġ"])}}, merges=[])


def qwen() -> Qwen2Tokenizer:
    return Qwen2Tokenizer(vocab={"<|endoftext|>": 0, **{c: 1 + i for i, c in enumerate(CHARS[1:] + ["Ġ"])}}, merges=[])


def t5() -> T5Tokenizer:
    """T5's: no BOS; it appends its EOS </s> to every text."""
    pieces = [(f"▁{w}", -1.0) for w in WORDS] + [("▁", -2.0)] + [(c, -3.0) for c in CHARS[1:]]
    return T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces], extra_ids=0)


def plain(tokenizer, text: str = TEXT) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompts_start_with_the_bos_the_tokenizer_adds_and_nothing_else():
    """Exactly what the tokenizer puts before a text: a BOS it defines but never adds (GPT-2's, a Llama tokenizer's
    with add_bos_token=False) stays out; T5's own encoding (its EOS appended) is the prompt, as it was."""
    for tokenizer in (llama(), gemma()):
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        assert encode_prompts(tokenizer, [TEXT], 32) == [[bos, *plain(tokenizer), eos]], type(tokenizer).__name__
        assert encode_prompts(tokenizer, [TEXT], 32)[0] == tokenizer(TEXT)["input_ids"] + [eos]  # as it encodes
    for tokenizer in (llama(add_bos_token=False), gpt2(), qwen()):
        assert encode_prompts(tokenizer, [TEXT], 32) == [[*plain(tokenizer), tokenizer.eos_token_id]], tokenizer
    assert gpt2().bos_token_id is not None and llama(add_bos_token=False).bos_token_id is not None
    encoder_decoder = t5()
    assert encode_prompts(encoder_decoder, [TEXT], 32) == [encoder_decoder(TEXT)["input_ids"]]
    assert encode_prompts(encoder_decoder, [TEXT], 32) == [[*plain(encoder_decoder), encoder_decoder.eos_token_id]]
    ours = train_tokenizer([TEXT] * 4, 300)
    assert encode_prompts(ours, [TEXT], 32) == [[*plain(ours), ours.sep_token_id]]


def test_the_bos_starts_the_prompt_never_the_response():
    """A response continues its prompt: training targets and real references get no BOS."""
    tokenizer = llama()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert encode_prompts(tokenizer, [TEXT], 32)[0][0] == bos
    assert encode_responses(tokenizer, [TEXT], 32) == [[*plain(tokenizer), eos]]
    assert encode_references(tokenizer, [TEXT], 32) == [[*plain(tokenizer), eos]]


def test_the_prompt_length_limit_counts_the_bos():
    """BOS + tokens + EOS fit in max_len, a long prompt keeps its start, and the truncation report counts as cut a
    prompt that fits only without the BOS."""
    tokenizer = llama()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    long = " ".join(WORDS[:8])
    assert encode_prompts(tokenizer, [long], 6) == [[bos, *plain(tokenizer, long)[:4], eos]]
    with pytest.raises(ValueError, match="max_len must be at least 3"):
        encode_prompts(tokenizer, [TEXT], 2)
    ids = token_ids(tokenizer, [TEXT, "sun"])  # 3 tokens and 1
    assert truncation_report(ids, 5, start=1) == (0, 2)  # BOS + 3 + EOS
    assert truncation_report(ids, 4, start=1) == (1, 2)
    assert len(encode_prompts(tokenizer, [TEXT], 4)[0]) == 4


def test_the_data_report_and_the_leak_check_count_the_bos(capsys):
    """With a BOS, a prompt keeps max_prompt_len - 2 tokens: the report counts one of max_prompt_len - 1 tokens as
    cut, and two validation prompts equal in their first max_prompt_len - 2 tokens read as a training prompt."""
    tokenizer = llama()

    def pairs(prompts: list[str]) -> list[Pair]:
        return [Pair(p, "SUN") for p in prompts]

    splits = Splits(oracle_train=pairs(["sun moon river stone", "tree"]), stage1=pairs(["bird"]),
                    distill=pairs(["wind"]), validation=pairs(["sun moon river king", "fire"]), duplicates=0)
    c = cfg.resolve("quick", {"task.max_prompt_len": 5, "eval.prompts": 2, "distill.prompts": 1,
                              "task.n_validation": 2})  # BOS + 3 tokens + EOS
    stages._report_data(splits, tokenizer, c)
    out = capsys.readouterr().out
    assert "1 of 2 oracle training prompts are longer than task.max_prompt_len=5" in out
    assert "1 of 2 validation prompts read as a training prompt once cut at task.max_prompt_len=5" in out
    with pytest.raises(TaskError, match=r"max_len must be at least 3 .*\(task.max_prompt_len=2\)"):
        stages._report_data(splits, tokenizer, cfg.resolve("quick", {"task.max_prompt_len": 2, "eval.prompts": 2,
                                                                     "distill.prompts": 1, "task.n_validation": 2}))


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id))


def test_the_monitor_and_the_lab_start_prompts_alike():
    """The monitor encodes a string prompt as its tokenizer does (add_special_tokens=True): it starts as the lab's
    prompt does, with the BOS, and a reference's response gets none."""
    tokenizer = llama()
    monitor = HackingMonitor(tiny_llama(tokenizer), tokenizer, [TEXT, "sun"], samples_per_prompt=1,
                             references=[(TEXT, "SUN MOON"), ("sun", "SUN")])
    lab = encode_prompts(tokenizer, [TEXT, "sun"], 32)
    prompts, responses, _ = monitor.references.batches[0]
    for batch in (monitor.prompts, prompts):
        assert [ids[mask].tolist()[0] for ids, mask in zip(batch.ids, batch.mask)] == [p[0] for p in lab]
    assert lab[0][0] == tokenizer.bos_token_id
    assert responses[:, 0].tolist() == [tokenizer.convert_tokens_to_ids("▁SUN")] * 2


def save_llama(folder: Path, tokenizer, seed: int) -> str:
    tiny_llama(tokenizer, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


class Keyed(Exception):
    """Raised by the check of :func:`upstream_keys`: the keys are all it wants, nothing is built."""


def upstream_keys(config: cfg.LabConfig, tmp_path: Path) -> dict[str, str]:
    """The keys prepare_upstream computes (and hands to its check) before it builds anything."""
    seen = {}

    def stop(keys: dict[str, str]) -> None:
        seen.update(keys)
        raise Keyed

    with pytest.raises(Keyed):
        stages.prepare_upstream(config, ArtifactCache(tmp_path / "cache"), "cpu", {}, check=stop)
    return seen


def test_only_a_tokenizer_that_adds_a_bos_gets_new_keys(tiny_task: Path, tmp_path: Path):
    """The tokenizer's key, a parent of every stage that encodes prompts, says what starts a prompt when a pretrained
    tokenizer adds a BOS: those artifacts are not the ones an older build made without it. A tokenizer that adds none
    (GPT-2's, ours) keeps the keys it had."""
    for name, tokenizer, moves in (("llama", llama(), True), ("gpt2", gpt2(), False), ("sizes", None, False)):
        models = {} if tokenizer is None else {"models.teacher": save_llama(tmp_path / name, tokenizer, 0),
                                               "models.arch": "llama"}
        config = cfg.resolve("quick", {**TINY, "task.spec": f"jsonl:{tiny_task}", **models})
        keys = upstream_keys(config, tmp_path)
        # the keys without a prompt start: those of a build before prompts had one
        specs = stages.stage_specs(config, stages.task_digest(stages.load_task(f"jsonl:{tiny_task}", tmp_path)),
                                   torch.get_num_threads(), f"{stages.cpu_kernels()}, torch {torch.__version__}")
        moved = {stage for stage, key in keys.items() if key != specs[stage]["key"]}
        assert moved == (descendants({"tokenizer"}) & set(keys) if moves else set()), name


@pytest.mark.slow
def test_a_pretrained_llama_trains_on_prompts_that_start_with_its_bos(tiny_task: Path, tmp_path: Path, monkeypatch):
    """The upstream of a lab whose oracle and teacher are Llama checkpoints with a BOS-adding tokenizer and whose
    student is a size preset pre-trained on the task's text: every training prompt, and every prompt of the
    artifacts stage 2 reads, starts with the BOS and fits task.max_prompt_len; the texts a model learns to write
    never start with it."""
    tokenizer = llama()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    config = cfg.resolve("quick", {**TINY, "task.spec": f"jsonl:{tiny_task}", "models.arch": "llama",
                                   "models.oracle": save_llama(tmp_path / "oracle", tokenizer, 1),
                                   "models.teacher": save_llama(tmp_path / "teacher", tokenizer, 2),
                                   "pretrain.epochs": 0.1, "task.max_prompt_len": 6})
    fits = []
    real_fit = stages.fit

    def spy(lm, prompts, responses, t, seed, desc, precision):
        fits.append((desc, prompts, responses))
        real_fit(lm, prompts, responses, t, seed, desc, precision)

    monkeypatch.setattr(stages, "fit", spy)
    up = stages.prepare_upstream(config, ArtifactCache(tmp_path / "cache"), "cpu", {})
    assert [desc for desc, _, _ in fits] == ["pretrain xxs", "oracle", "teacher", "student"]
    for desc, prompts, responses in fits:
        assert all(p[0] == bos and 2 <= len(p) <= 6 for p in prompts), desc
        assert any(len(p) == 6 for p in prompts) or desc == "pretrain xxs", desc  # some prompts were cut to fit
    pretrain, oracle = fits[0], fits[1]
    assert all(p == [bos, eos] for p in pretrain[1])  # language modelling: an empty prompt, the text the response
    assert all(r[0] != bos and len(r) <= 6 + 16 - 2 for r in pretrain[2])
    assert all(r[0] != bos for r in oracle[2])
    prompts, _ = stages.load_ids(up.distill_prompts)
    assert prompts and all(p[0] == bos and len(p) <= 6 for p in prompts)
    for path in (up.references, up.train_references):
        for name, sample_set in stages.load_sample_sets(path).items():
            first = sample_set.prompts.mask.int().argmax(1)  # each row's first real token (left padding)
            assert (sample_set.prompts.ids[torch.arange(len(first)), first] == bos).all(), name
    assert json.loads((up.tokenizer / "spec.json").read_text())["inputs"]["prompt start"] == [bos]


def test_roles_whose_tokenizers_differ_only_in_adding_a_bos_are_refused():
    from teacherhack.tokenizer import TokenizerMismatch, check_tokenizers

    check_tokenizers({"oracle": llama(), "teacher": llama()})
    with pytest.raises(TokenizerMismatch, match=r"oracle vs teacher: tokens put before a text \[1\] vs \[\]"):
        check_tokenizers({"oracle": llama(), "teacher": llama(add_bos_token=False)})
