"""Teacher signals: building, the file format, validation on load, alignment with batches, and the losses
on cached signals (dense: exactly the full loss; top-k with k = V: the full loss too)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from teacherhack.divergences import DIVERGENCES, sparse_token_divergence, token_divergence
from teacherhack.teacher_signals import (
    SignalsError,
    TeacherSignals,
    bytes_per_position,
    estimate_bytes,
)

INF = math.inf
PROVENANCE = {"teacher": "sha256:aaa", "tokenizer": "sha256:bbb", "dataset": "sha256:ccc"}


def batch(B=4, T=6, V=13, seed=0, scale=2.0):
    """Teacher logits, student logits and a right-padded response mask (one response of length 0)."""
    g = torch.Generator().manual_seed(seed)
    t = scale * torch.randn(B, T, V, generator=g)
    s = scale * torch.randn(B, T, V, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate([T, 3, 0, 5, 1, 2][:B]):
        mask[b, :n] = True
    return t, s, mask


def grads(fn, s):
    s = s.detach().clone().requires_grad_(True)
    v = fn(s)
    (g,) = torch.autograd.grad(v, [s])
    return v.detach(), g


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def test_dense_holds_the_log_softmax_of_the_masked_positions_in_order():
    t, _, mask = batch()
    mask[3] = torch.tensor([False, True, True, False, True, False])  # any layout: kept in order
    signals = TeacherSignals.from_logprobs(t, mask)
    assert signals.kind == "dense" and signals.k is None and len(signals) == 4
    assert signals.offsets.tolist() == [0, 6, 9, 9, 12]
    assert signals.lengths.tolist() == [6, 3, 0, 3]
    assert signals.logprobs.dtype == torch.float32
    assert torch.equal(signals.logprobs, torch.log_softmax(t[mask], -1))
    # log-probabilities in, the same log-probabilities out (up to float32 rounding)
    again = TeacherSignals.from_logprobs(signals.gather(range(4), mask).logprobs.nan_to_num(0.0), mask)
    torch.testing.assert_close(again.logprobs, signals.logprobs, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_topk_ids_logprobs_and_tail(dtype, temperature):
    t, _, mask = batch(V=50)
    signals = TeacherSignals.from_logprobs(t, mask, k=8, dtype=dtype, temperature=temperature)
    full = torch.log_softmax(t[mask].double() / temperature, -1)
    top, ids = full.topk(8, -1)
    assert signals.kind == "topk" and signals.k == 8 and signals.temperature == temperature
    assert signals.ids.dtype == torch.int32 and torch.equal(signals.ids.long(), ids)
    assert signals.logprobs.dtype == dtype
    torch.testing.assert_close(signals.logprobs.double(), top, rtol=0, atol=float(top.abs().max()) * 2**-7)
    assert signals.tail.dtype == torch.float32
    # the tail comes from float32 values before rounding: accurate even where the rounded top-k is not
    torch.testing.assert_close(signals.tail.double(), 1 - top.exp().sum(-1), rtol=1e-5, atol=1e-7)


def test_topk_with_every_token_has_tail_zero_and_allows_minus_inf():
    t, _, mask = batch(V=7)
    t[..., 5:] = -INF  # tokens the teacher never says: stored as −inf log-probabilities
    signals = TeacherSignals.from_logprobs(t, mask, k=7, dtype=torch.float16)
    assert (signals.tail == 0).all()
    assert torch.isneginf(signals.logprobs[:, -2:]).all()
    signals = TeacherSignals.from_logprobs(t, mask, k=5, dtype=torch.float16)
    assert (signals.tail == 0).all() and torch.isfinite(signals.logprobs).all()


def test_built_in_parts_equals_built_at_once():
    t, _, mask = batch(B=6)
    for k in (None, 3):
        whole = TeacherSignals.from_logprobs(t, mask, k=k, provenance=PROVENANCE)
        parts = [TeacherSignals.from_logprobs(t[sl], mask[sl], k=k, provenance=PROVENANCE)
                 for sl in (slice(0, 2), slice(2, 3), slice(3, 6))]
        joined = TeacherSignals.concat(parts)
        assert torch.equal(joined.offsets, whole.offsets) and torch.equal(joined.logprobs, whole.logprobs)
        if k is not None:
            assert torch.equal(joined.ids, whole.ids) and torch.equal(joined.tail, whole.tail)
        assert joined.metadata == whole.metadata
    a = TeacherSignals.from_logprobs(t[:2], mask[:2], k=3)
    for other in (TeacherSignals.from_logprobs(t[2:], mask[2:], k=4),
                  TeacherSignals.from_logprobs(t[2:], mask[2:], k=3, dtype=torch.bfloat16),
                  TeacherSignals.from_logprobs(t[2:], mask[2:], k=3, temperature=0.5),
                  TeacherSignals.from_logprobs(t[2:], mask[2:], k=3, provenance={"teacher": "x"}),
                  TeacherSignals.from_logprobs(t[2:], mask[2:])):
        with pytest.raises(ValueError, match="cannot join"):
            TeacherSignals.concat([a, other])


def test_vocab_size_drops_padded_columns():
    t, _, mask = batch(V=13)
    padded = torch.cat([t, torch.full((*t.shape[:-1], 3), 50.0)], -1)  # padding that would win the top-k
    for k in (None, 4):
        a = TeacherSignals.from_logprobs(t, mask, k=k)
        b = TeacherSignals.from_logprobs(padded, mask, k=k, vocab_size=13)
        assert b.vocab_size == 13 and torch.equal(a.logprobs, b.logprobs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k=0"),
    (dict(k=14), "k=14"),
    (dict(k=3, temperature=math.inf), "temperature"),
    (dict(temperature=0.5), "untempered"),
    (dict(k=3, dtype=torch.int8), "stored as"),
    (dict(dtype=torch.float16), "float32"),
    (dict(k=3, temperature=0.0), "temperature"),
    (dict(vocab_size=20), "vocab_size"),
    (dict(provenance={"k": "3"}), "provenance"),
    (dict(provenance={"teacher": 3}), "provenance"),
])
def test_build_refuses(kwargs, match):
    t, _, mask = batch(V=13)
    with pytest.raises(ValueError, match=match):
        TeacherSignals.from_logprobs(t, mask, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        TeacherSignals.from_logprobs(t, mask[:, :-1])


# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------


def test_bytes_per_token_and_the_estimate_match_the_file(tmp_path):
    t, _, mask = batch(B=6, T=40, V=300)
    n_pos, n_resp = int(mask.sum()), mask.shape[0]
    assert bytes_per_position(32000) == 128000
    assert bytes_per_position(32000, 64, torch.float16) == bytes_per_position(32000, 64, torch.bfloat16) == 64 * 6 + 4
    assert bytes_per_position(32000, 1) == 10  # float16 by default
    for k, dtype in ((None, None), (8, torch.float16), (8, torch.bfloat16), (64, torch.float32)):
        signals = TeacherSignals.from_logprobs(t, mask, k=k, dtype=dtype, provenance=PROVENANCE)
        assert signals.bytes_per_token == bytes_per_position(300, k, dtype)
        estimate = estimate_bytes(n_pos, n_resp, vocab_size=300, k=k, dtype=dtype)
        tensors = sum(x.numel() * x.element_size() for x in (signals.offsets, signals.logprobs, signals.ids,
                                                             signals.tail) if x is not None)
        assert estimate == tensors
        path = tmp_path / f"{k}.safetensors"
        signals.save(path)
        assert estimate < os.path.getsize(path) <= estimate + 2048  # + the JSON header (and its alignment)


# --------------------------------------------------------------------------------------------------
# Gather: alignment with a batch, and nothing silently misaligned
# --------------------------------------------------------------------------------------------------


def test_gather_places_each_response_at_its_mask_positions():
    t, _, mask = batch(B=6)
    for k in (None, 4):
        signals = TeacherSignals.from_logprobs(t, mask, k=k)
        rows = [3, 0, 5, 2]  # any subset, any order, as a shuffled data loader draws them
        width = 8  # the batch's own padding, wider than the build's
        sub = torch.zeros(len(rows), width, dtype=torch.bool)
        sub[:, :mask.shape[1]] = mask[rows]
        got = signals.gather(rows, sub)
        for i, r in enumerate(rows):
            stored = slice(int(signals.offsets[r]), int(signals.offsets[r + 1]))
            assert torch.equal(got.logprobs[i][sub[i]], signals.logprobs[stored])
            assert got.logprobs[i][~sub[i]].isnan().all()
            if k is not None:
                assert torch.equal(got.ids[i][sub[i]], signals.ids[stored].long())
                assert torch.equal(got.tail[i][sub[i]], signals.tail[stored])
                assert got.tail[i][~sub[i]].isnan().all() and (got.ids[i][~sub[i]] == 0).all()
        assert got.logprobs.shape[:2] == (4, width)
        if k is not None:
            assert got.ids.dtype == torch.long and got.ids.shape == (4, width, k) and got.tail.shape == (4, width)
        else:
            assert got.ids is None and got.tail is None
        # a tensor of rows works the same
        assert torch.equal(signals.gather(torch.tensor(rows), sub).logprobs.nan_to_num(), got.logprobs.nan_to_num())


def test_gather_refuses_a_batch_that_is_not_the_dataset():
    t, _, mask = batch(B=6)
    signals = TeacherSignals.from_logprobs(t, mask, k=3)
    longer = mask[[0, 1]].clone()
    longer[1, 3] = True  # response 1 is one token longer in this batch
    with pytest.raises(SignalsError, match=r"response 1 .*batch row 1"):
        signals.gather([0, 1], longer)
    with pytest.raises(SignalsError, match="3 positions for response 1 but the batch's mask marks 6"):
        signals.gather([1], mask[[0]])  # the rows of another batch
    with pytest.raises(IndexError):
        signals.gather([6], mask[[0]])
    with pytest.raises(ValueError, match="mask must be"):
        signals.gather([0, 1], mask[[0]])


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cached_dense_signals_give_the_full_loss(divergence, temperature, chunk_size):
    """token_divergence on cached float32 log-probabilities = on the teacher's logits: value and gradient
    with respect to the student's logits, to float32 rounding (also under a temperature and chunking)."""
    t, s, mask = batch(B=5, T=7, V=40, seed=1)
    signals = TeacherSignals.from_logprobs(t, mask)
    cached = signals.gather(range(5), mask).logprobs
    kw = dict(divergence=divergence, beta=0.3, alpha=0.1, temperature=temperature, chunk_size=chunk_size)
    want, g_want = grads(lambda s: token_divergence(t, s, mask, **kw), s)
    got, g_got = grads(lambda s: token_divergence(cached, s, mask, **kw), s)
    assert want > 0
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-8)
    # and in float64 the identity is exact up to float64 rounding (it is not an approximation)
    t64 = t.double()
    cached64 = torch.log_softmax(t64, -1)
    v1 = token_divergence(cached64, s.double(), mask, compute_dtype=torch.float64, **kw)
    v2 = token_divergence(t64, s.double(), mask, compute_dtype=torch.float64, **kw)
    torch.testing.assert_close(v1, v2, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("convention", ["tail", "renormalized"])
def test_cached_topk_with_every_token_gives_the_full_loss(convention):
    t, s, mask = batch(B=5, T=7, V=40, seed=2)
    signals = TeacherSignals.from_logprobs(t, mask, k=40, dtype=torch.float32, temperature=0.8)
    b = signals.gather(range(5), mask)
    for divergence in DIVERGENCES:
        kw = dict(divergence=divergence, temperature=0.8)
        want, g_want = grads(lambda s: token_divergence(t, s, mask, **kw), s)
        got, g_got = grads(lambda s: sparse_token_divergence(b.ids, b.logprobs, b.tail, s, mask,
                                                             convention=convention, **kw), s)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_rounded_topk_stays_close_to_exact_topk():
    """float16/bfloat16 storage moves the loss by about the dtype's rounding; the tail convention's
    renormalisation keeps it a divergence (never NaN or negative)."""
    t, s, mask = batch(B=5, T=7, V=200, seed=3)
    exact = TeacherSignals.from_logprobs(t, mask, k=16, dtype=torch.float32).gather(range(5), mask)
    want = sparse_token_divergence(exact.ids, exact.logprobs, exact.tail, s, mask)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        b = TeacherSignals.from_logprobs(t, mask, k=16, dtype=dtype).gather(range(5), mask)
        got = sparse_token_divergence(b.ids, b.logprobs, b.tail, s, mask)
        assert torch.isfinite(got) and got > 0
        assert abs(float(got - want)) <= tol * float(want), (dtype, float(got), float(want))


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,dtype", [(None, None), (5, torch.float16), (5, torch.bfloat16), (13, torch.float32)])
def test_save_load_round_trip(tmp_path, k, dtype):
    t, _, mask = batch(V=13)
    temperature = 1.0 if k is None else 0.9
    signals = TeacherSignals.from_logprobs(t, mask, k=k, dtype=dtype, temperature=temperature, provenance=PROVENANCE)
    path = tmp_path / "signals.safetensors"
    signals.save(path)
    assert not (tmp_path / "signals.safetensors.tmp").exists()
    loaded = TeacherSignals.load(path, {**PROVENANCE, "kind": signals.kind, "temperature": str(temperature)})
    assert loaded.metadata == signals.metadata and loaded.provenance == PROVENANCE
    for name in ("offsets", "logprobs", "ids", "tail"):
        a, b = getattr(signals, name), getattr(loaded, name)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))
    # numbers compare as numbers: "1" is the temperature 1.0, "5" the k 5
    TeacherSignals.load(path, {"temperature": "1" if k is None else "0.90", "vocab_size": "13"})


def test_load_refuses_signals_built_for_another_run(tmp_path):
    t, _, mask = batch()
    path = tmp_path / "signals.safetensors"
    TeacherSignals.from_logprobs(t, mask, k=4, temperature=0.7, provenance=PROVENANCE).save(path)
    cases = [
        ({"teacher": "sha256:zzz"}, "built for teacher 'sha256:aaa', this run's teacher is 'sha256:zzz'"),
        ({"dataset": "sha256:ddd"}, "built for dataset"),
        ({"temperature": "1.0"}, "built for temperature '0.7'"),
        ({"k": "8"}, "built for k '4'"),
        ({"kind": "dense"}, "built for kind 'topk'"),
        ({"dtype": "bfloat16"}, "built for dtype 'float16'"),
        ({"oracle": "sha256:eee"}, "records no 'oracle'"),
    ]
    for expect, match in cases:
        with pytest.raises(SignalsError) as info:
            TeacherSignals.load(path, expect)
        message = str(info.value)
        assert match in message and str(path) in message and "delete" in message and "rebuild" in message


def write(path: Path, tensors: dict, **meta) -> Path:
    """A hand-written file, as a user would write it from a serving engine's log-probabilities."""
    metadata = {"format": "teacherhack.teacher_signals", "format_version": "1", "vocab_size": "6",
                "temperature": "1.0", **{k: str(v) for k, v in meta.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={k: v for k, v in metadata.items() if v != "None"})
    return path


def engine_topk():
    """Two responses (3 and 2 positions) over a 6-token vocabulary, top-2, as an engine reports them."""
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02],
                          [0.9, 0.05, 0.02, 0.01, 0.01, 0.01],
                          [0.25, 0.25, 0.2, 0.1, 0.1, 0.1],
                          [0.6, 0.3, 0.04, 0.03, 0.02, 0.01],
                          [0.4, 0.35, 0.1, 0.05, 0.05, 0.05]], dtype=torch.float64)
    order = torch.tensor([[1, 0], [0, 3], [2, 1], [0, 1], [1, 0]])  # ids in any order, ties broken freely
    lp = probs.log().gather(-1, order)
    tail = (1 - lp.exp().sum(-1)).float()
    return {"offsets": torch.tensor([0, 3, 5]), "ids": order.int(), "logprobs": lp.half(), "tail": tail}


def test_a_hand_written_file_loads_and_feeds_the_loss(tmp_path):
    path = write(tmp_path / "engine.safetensors", engine_topk(), kind="topk", k=2, dtype="float16", teacher="m")
    signals = TeacherSignals.load(path, {"teacher": "m"})
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    b = signals.gather([0, 1], mask)
    s = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sparse_token_divergence(b.ids, b.logprobs, b.tail, s, mask))


def corrupt(name: str):
    """engine_topk() with one thing wrong, and the phrase the refusal must contain."""
    t = engine_topk()
    meta = dict(kind="topk", k=2, dtype="float16")
    if name == "k zero":
        t["ids"], t["logprobs"] = t["ids"][:, :0], t["logprobs"][:, :0]
        meta["k"] = 0
        return t, meta, "k = 0 must be >= 1"
    if name == "k metadata":
        meta["k"] = 3
        return t, meta, "metadata k = 3"
    if name == "id too large":
        t["ids"][2, 0] = 6
        return t, meta, "ids must lie in [0, 6)"
    if name == "id negative":
        t["ids"][0, 1] = -1
        return t, meta, "ids must lie in [0, 6)"
    if name == "id repeated":
        t["ids"][3] = torch.tensor([0, 0], dtype=torch.int32)
        return t, meta, "row 3 repeats"
    if name == "logprob positive":
        t["logprobs"][1, 0] = 0.01
        return t, meta, "<= 0 and not NaN; row 1"
    if name == "logprob nan":
        t["logprobs"][4, 1] = math.nan
        return t, meta, "<= 0 and not NaN; row 4"
    if name == "logprob +inf":
        t["logprobs"][4, 1] = INF
        return t, meta, "<= 0 and not NaN; row 4"
    if name == "tail negative":
        t["tail"][2] = -0.01
        return t, meta, "tail mass must lie in [0, 1]; row 2"
    if name == "tail above one":
        t["tail"][2] = 1.01
        return t, meta, "tail mass must lie in [0, 1]; row 2"
    if name == "tail nan":
        t["tail"][0] = math.nan
        return t, meta, "tail mass must lie in [0, 1]; row 0"
    if name == "mass far from one":
        t["tail"][3] = 0.5  # top-2 hold 0.9: 1.4 in all
        return t, meta, "must sum to 1"
    if name == "offsets decreasing":
        t["offsets"] = torch.tensor([0, 4, 3, 5])
        return t, meta, "never decrease"
    if name == "offsets short":
        t["offsets"] = torch.tensor([0, 3, 4])
        return t, meta, "end at the number of rows (5)"
    if name == "offsets start":
        t["offsets"] = torch.tensor([1, 3, 5])
        return t, meta, "start at 0"
    if name == "offsets dtype":
        t["offsets"] = t["offsets"].int()
        return t, meta, "offsets must be int64"
    if name == "ids dtype":
        t["ids"] = t["ids"].long()
        return t, meta, "ids must be int32"
    if name == "dtype metadata":
        meta["dtype"] = "bfloat16"
        return t, meta, "metadata dtype 'bfloat16'"
    if name == "tail missing":
        del t["tail"]
        return t, meta, "found ['ids', 'logprobs', 'offsets']"
    if name == "extra tensor":
        t["mask"] = torch.ones(5)
        return t, meta, "found ['ids', 'logprobs', 'mask', 'offsets', 'tail']"
    if name == "kind unknown":
        meta["kind"] = "sparse"
        return t, meta, "unknown kind 'sparse'"
    if name == "k missing":
        meta["k"] = None
        return t, meta, "missing or malformed metadata"
    if name == "version":
        meta["format_version"] = 2
        return t, meta, "format version '2'"
    if name == "format":
        meta["format"] = "something.else"
        return t, meta, "not a teacher-signals file"
    raise AssertionError(name)


CORRUPTIONS = ["k zero", "k metadata", "id too large", "id negative", "id repeated", "logprob positive",
               "logprob nan", "logprob +inf", "tail negative", "tail above one", "tail nan", "mass far from one",
               "offsets decreasing", "offsets short", "offsets start", "offsets dtype", "ids dtype", "dtype metadata",
               "tail missing", "extra tensor", "kind unknown", "k missing", "version", "format"]


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_load_refuses_corrupt_files(tmp_path, name):
    tensors, meta, phrase = corrupt(name)
    path = write(tmp_path / "bad.safetensors", tensors, **meta)
    with pytest.raises(SignalsError) as info:
        TeacherSignals.load(path)
    message = str(info.value)
    assert phrase in message and str(path) in message and "delete" in message, message


def test_load_refuses_dense_files_that_are_not_distributions(tmp_path):
    lp = torch.log_softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), -1)
    good = {"offsets": torch.tensor([0, 1, 4]), "logprobs": lp}
    TeacherSignals.load(write(tmp_path / "ok.safetensors", good, kind="dense", dtype="float32"))
    for bad, phrase in ((lp + 0.01, "must sum to 1"), (lp.double(), "metadata dtype 'float32'"),
                        (lp[:, :5], "dense logprobs must be float32 [N, 6]"),
                        (torch.full((4, 6), -INF), "must sum to 1")):
        path = write(tmp_path / "bad.safetensors", {"offsets": good["offsets"], "logprobs": bad}, kind="dense",
                     dtype="float32")
        with pytest.raises(SignalsError, match=re.escape(phrase)):
            TeacherSignals.load(path)
    path = write(tmp_path / "tempered.safetensors", good, kind="dense", dtype="float32", temperature=0.5)
    with pytest.raises(SignalsError, match="untempered"):
        TeacherSignals.load(path)


def test_load_refuses_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(SignalsError, match="not a readable safetensors file"):
        TeacherSignals.load(path)
    with pytest.raises(SignalsError, match="not a readable"):
        TeacherSignals.load(tmp_path / "missing.safetensors")
    t, _, mask = batch()
    TeacherSignals.from_logprobs(t, mask, k=3).save(path)
    path.write_bytes(path.read_bytes()[:-20])  # a copy cut short
    with pytest.raises(SignalsError, match="not a readable"):
        TeacherSignals.load(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
def test_no_false_refusals_from_storage_rounding(tmp_path, dtype, scale):
    """Real distributions (flat to sharp), every k, rounded to float16/bfloat16: all load."""
    g = torch.Generator().manual_seed(int(scale * 10))
    V = 1000
    t = scale * torch.randn(3, 20, V, generator=g)
    mask = torch.ones(3, 20, dtype=torch.bool)
    for k in (1, 7, 64, 256, 999, 1000):
        path = tmp_path / f"{k}.safetensors"
        TeacherSignals.from_logprobs(t, mask, k=k, dtype=dtype).save(path)
        TeacherSignals.load(path)


def test_online_top_k_signals_are_those_of_the_batch_aligned_with_it():
    """An online source's teacher signals, selected at each step (training.top_k_signals, on the teacher's device):
    each response position gets its own top-k at the loss temperature, the positions outside the mask none."""
    from teacherhack.training import top_k_signals

    log_p, _, mask = batch()
    mask[1, 3:] = False  # a response that ended early
    signals = top_k_signals(log_p, mask, 5, 2.0)
    rows = torch.log_softmax(log_p[mask] / 2.0, -1)
    top, ids = rows.topk(5, -1)
    assert torch.equal(signals.ids[mask].long(), ids) and torch.equal(signals.logprobs[mask], top)
    assert torch.allclose(signals.tail[mask], 1 - top.exp().sum(-1), atol=1e-6)  # the mass outside the top k
