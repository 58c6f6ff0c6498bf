"""Data layer tests: all offline; the SWORD modules are tiny ones written here."""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from teacherhack import data
from teacherhack.data import (
    EOS,
    PAD,
    SEP,
    Pair,
    TaskError,
    align_verses,
    encode_prompts,
    encode_responses,
    load_jsonl,
    load_task,
    parse_ztext,
    split_task,
    train_tokenizer,
    write_jsonl,
)

# --- SWORD zText ---------------------------------------------------------------------------------


def write_ztext(module_dir: Path, testaments: dict[str, list[list[str]]]) -> None:
    """Write a zText module: for each testament, a list of blocks, each a list of entries."""
    module_dir.mkdir(parents=True, exist_ok=True)
    for testament, blocks in testaments.items():
        bzs, bzz, bzv = b"", b"", b""
        for number, entries in enumerate(blocks):
            raw = b""
            for entry in entries:
                text = entry.encode("utf-8")
                bzv += struct.pack("<IIH", number if text else 0, len(raw) if text else 0, len(text))
                raw += text
            packed = zlib.compress(raw)
            bzs += struct.pack("<III", len(bzz), len(packed), len(raw))
            bzz += packed
        for suffix, content in (("bzs", bzs), ("bzz", bzz), ("bzv", bzv)):
            (module_dir / f"{testament}.{suffix}").write_bytes(content)


ENGLISH = {
    "ot": [
        [
            "",
            '<milestone type="x-importer" n="$Rev: 1 $"/>',
            '<div osisID="Gen" type="book"/> <title type="main">The First Book</title><chapter sID="Gen.1"/>',
            'In the <w lemma="strong:H7225">begin</w>ning God &amp; the earth.<note placement="foot">'
            '<reference type="annotateRef">1.1 </reference>Heb. a note</note> ',
        ],
        [
            "¶   And God<lb/>said, &lt;Let&gt; &#233;",
            '<title type="psalm" canonical="true">A Psalm of David.</title>Blessed <divineName>LORD</divineName>.',
        ],
    ],
    "nt": [["Jesus wept.", "", "Amen."]],
}
SPANISH = {
    "ot": [
        [
            "",
            '<milestone type="x-importer" n="$Rev: 1 $"/>',
            '<chapter sID="Gen.1"/>',
            '<w lemma="strong:H7225">EN el principio</w> hay allí<transChange type="added">también'
            '</transChange><w lemma="strong:H0916">bdelio</w>.',
        ],
        ["Y mirándo<transChange>los</transChange> Jesús", "Bienaventurado"],
    ],
    "nt": [["Y lloró Jesús.", "Sólo en español.", ""]],
}


def test_parse_ztext_decodes_every_entry_exactly(tmp_path):
    write_ztext(tmp_path / "eng", ENGLISH)
    assert parse_ztext(tmp_path / "eng") == [
        "",
        "",
        "",
        "In the beginning God & the earth.",
        "And God said, <Let> é",
        "Blessed LORD.",
        "Jesus wept.",
        "",
        "Amen.",
    ]


def test_parse_ztext_separates_words_glued_by_transchange_but_keeps_enclitics(tmp_path):
    write_ztext(tmp_path / "spa", SPANISH)
    entries = parse_ztext(tmp_path / "spa")
    assert entries[3] == "EN el principio hay allí también bdelio."
    assert entries[4] == "Y mirándolos Jesús"


def test_parse_ztext_rejects_a_directory_without_a_module(tmp_path):
    with pytest.raises(TaskError, match="not a SWORD zText module"):
        parse_ztext(tmp_path)


def test_align_verses_keeps_pairs_with_text_on_both_sides():
    assert align_verses(["a", "", "c", "d"], ["A", "B", "", "D"]) == [Pair("a", "A"), Pair("d", "D")]
    with pytest.raises(TaskError, match="versification"):
        align_verses(["a"], ["A", "B"])


# --- kjv-rv: fetching and snapshot -----------------------------------------------------------------


def fake_fetch(calls):
    """Stand-in for `fetch_debs` that unpacks the tiny modules where the real packages would be."""

    def fetch(packages, work_dir):
        calls.append(tuple(packages))
        modules = work_dir / "root" / data.ZTEXT_ROOT
        write_ztext(modules / data.KJV_MODULE, ENGLISH)
        write_ztext(modules / data.RV_MODULE, SPANISH)
        (work_dir / "sword-text-kjv_1_all.deb").write_bytes(b"deb")

    return fetch


EXPECTED_PAIRS = [
    Pair("In the beginning God & the earth.", "EN el principio hay allí también bdelio."),
    Pair("And God said, <Let> é", "Y mirándolos Jesús"),
    Pair("Blessed LORD.", "Bienaventurado"),
    Pair("Jesus wept.", "Y lloró Jesús."),
]


def test_kjv_rv_builds_a_snapshot_once_then_reads_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(data, "fetch_debs", fake_fetch(calls))
    assert load_task("kjv-rv", tmp_path) == EXPECTED_PAIRS
    assert calls == [("sword-text-kjv", "sword-text-sparv")]
    tasks = tmp_path / "tasks"
    assert sorted(p.name for p in tasks.iterdir()) == ["kjv-rv.jsonl", "kjv-rv.sha256"]  # downloads gone
    assert load_jsonl(tasks / "kjv-rv.jsonl") == EXPECTED_PAIRS
    assert load_task("kjv-rv", tmp_path) == EXPECTED_PAIRS
    assert len(calls) == 1


def test_kjv_rv_reads_a_prewritten_snapshot_without_apt(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_jsonl(EXPECTED_PAIRS, tasks / "kjv-rv.jsonl")
    digest = data._sha256(tasks / "kjv-rv.jsonl")
    (tasks / "kjv-rv.sha256").write_text(f"{digest}  kjv-rv.jsonl\n")
    assert load_task("kjv-rv", tmp_path) == EXPECTED_PAIRS


@pytest.mark.parametrize("damage", ["edit", "no checksum"])
def test_kjv_rv_rejects_a_damaged_snapshot(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(data, "fetch_debs", fake_fetch([]))
    load_task("kjv-rv", tmp_path)
    snapshot = tmp_path / "tasks" / "kjv-rv.jsonl"
    if damage == "edit":
        snapshot.write_text(snapshot.read_text(encoding="utf-8").replace("wept", "slept"), encoding="utf-8")
    else:
        snapshot.with_suffix(".sha256").unlink()
    with pytest.raises(TaskError, match="delete both files"):
        load_task("kjv-rv", tmp_path)


def test_kjv_rv_without_apt_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(TaskError, match="apt-get and dpkg-deb.*Debian or Ubuntu.*jsonl:PATH"):
        load_task("kjv-rv", tmp_path)
    assert list((tmp_path / "tasks").iterdir()) == []


def test_kjv_rv_reports_a_failed_download(tmp_path, monkeypatch):
    apt = tmp_path / "apt-get"
    apt.write_text("#!/bin/sh\necho 'E: Unable to locate package sword-text-kjv' >&2\nexit 100\n")
    apt.chmod(0o755)
    monkeypatch.setattr("shutil.which", lambda name: str(apt) if name == "apt-get" else "/bin/true")
    with pytest.raises(TaskError, match="Unable to locate package.*apt-get update"):
        load_task("kjv-rv", tmp_path / "cache")


def test_unknown_task_lists_the_valid_ones(tmp_path):
    with pytest.raises(TaskError, match="kjv-rv, jsonl:PATH"):
        load_task("nope", tmp_path)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TEACHERHACK_CACHE", str(tmp_path))
    assert data.default_cache_dir() == tmp_path
    monkeypatch.delenv("TEACHERHACK_CACHE")
    assert data.default_cache_dir() == Path.home() / ".cache" / "teacherhack"


# --- JSON Lines ----------------------------------------------------------------------------------


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_task_loads_pairs_and_skips_blank_ones(tmp_path):
    path = write_lines(
        tmp_path / "t.jsonl",
        json.dumps({"prompt": "hola", "response": "hello", "extra": 1}),
        "",
        json.dumps({"prompt": "  ", "response": "nothing to learn"}),
        json.dumps({"prompt": "¿qué?", "response": "what?"}, ensure_ascii=False),
    )
    assert load_task(f"jsonl:{path}", tmp_path) == [Pair("hola", "hello"), Pair("¿qué?", "what?")]


def test_jsonl_custom_fields(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", json.dumps({"document": "long text", "summary": "short"}))
    assert load_jsonl(path, prompt_field="document", response_field="summary") == [Pair("long text", "short")]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a", '], "line 2: not valid JSON"),
        (['{"prompt": "a"}'], "line 1: field 'response' is missing"),
        (['{"prompt": 3, "response": "b"}'], "line 1: field 'prompt' is missing or not a string"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        ([], "no pair"),
        (['{"prompt": "", "response": "b"}'], "no pair"),
    ],
)
def test_jsonl_errors_name_the_problem(tmp_path, lines, message):
    path = write_lines(tmp_path / "t.jsonl", *lines)
    with pytest.raises(TaskError, match=message):
        load_jsonl(path)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        load_task(f"jsonl:{tmp_path / 'nope.jsonl'}", tmp_path)


# --- Splits --------------------------------------------------------------------------------------

PAIRS = [Pair(f"prompt {i}", f"response {i}") for i in range(100)]
SIZES = {"n_stage1": 20, "n_distill": 30, "n_validation": 10}


def prompt_sets(splits):
    return [
        {pair.prompt for pair in splits.oracle_train},
        set(splits.stage1_prompts),
        set(splits.distill_prompts),
        set(splits.validation_prompts),
    ]


def test_splits_are_disjoint_sized_and_cover_the_rest():
    splits = split_task(PAIRS, **SIZES)
    oracle, stage1, distill, validation = prompt_sets(splits)
    assert (len(oracle), len(stage1), len(distill), len(validation)) == (40, 20, 30, 10)
    assert len(oracle | stage1 | distill | validation) == 100
    assert split_task(PAIRS, **SIZES, n_oracle=5).oracle_train == splits.oracle_train[:5]


def test_splits_are_deterministic_and_depend_on_the_seed():
    assert split_task(PAIRS, **SIZES) == split_task(list(PAIRS), **SIZES)
    assert split_task(PAIRS, **SIZES, seed=1) != split_task(PAIRS, **SIZES)


def test_splits_do_not_depend_on_the_hash_seed():
    code = (
        "from teacherhack.data import Pair, split_task;"
        "s = split_task([Pair(f'prompt {i}', f'response {i}') for i in range(100)],"
        " n_stage1=20, n_distill=30, n_validation=10);"
        "print(s.validation_prompts + s.distill_prompts + s.stage1_prompts)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    splits = split_task(PAIRS, **SIZES)
    assert out.stdout.strip() == repr(splits.validation_prompts + splits.distill_prompts + splits.stage1_prompts)


def test_splits_deduplicate_prompts_keeping_the_first_pair():
    pairs = [Pair("same", "first"), Pair("other", "x"), Pair("same", "second"), Pair("third", "y")]
    splits = split_task(pairs, n_stage1=1, n_distill=1, n_validation=0)
    assert sorted(splits.stage1_prompts + splits.distill_prompts + [p.prompt for p in splits.oracle_train]) == [
        "other",
        "same",
        "third",
    ]
    assert Pair("same", "second") not in splits.oracle_train


def test_splits_need_enough_pairs():
    with pytest.raises(TaskError, match="need 101 pairs .* only 100 are available"):
        split_task(PAIRS, n_stage1=40, n_distill=40, n_validation=20)
    with pytest.raises(TaskError, match="need 110 pairs"):
        split_task(PAIRS, **SIZES, n_oracle=50)
    with pytest.raises(TaskError, match="negative: n_distill=-1"):
        split_task(PAIRS, n_stage1=1, n_distill=-1, n_validation=1)


# --- Tokenizer -----------------------------------------------------------------------------------

CORPUS = [
    "In the beginning God created the heaven and the earth.",
    "EN el principio crió Dios los cielos y la tierra.",
    "Y la tierra estaba desordenada y vacía, y las tinieblas estaban sobre la haz del abismo.",
    "¿Dónde estás tú? Y él respondió: Oí tu voz en el huerto, y tuve miedo.",
] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=320)


def test_tokenizer_special_ids_and_vocabulary(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in (PAD, EOS, SEP)] == [0, 1, 2]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id) == (0, 1, 2)
    assert len(tokenizer) == 320
    again = train_tokenizer(CORPUS, vocab_size=320)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_round_trips_any_text_without_adding_tokens(tokenizer):
    text = "  ¿Dónde   estás tú?\nAñadió: «señor» — ü, ç, 漢字 <sep> ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert not {0, 1, 2} & set(ids)  # a literal "<sep>" in the data is plain text
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"] == ids


def test_tokenizer_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    text = CORPUS[2] + " <eos>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.sep_token_id) == (0, 1, 2)
    assert loaded.decode(encode_responses(loaded, [CORPUS[3]], 100)[0][:-1]) == CORPUS[3]


def test_encode_truncates_and_appends_sep_or_eos(tokenizer):
    long, short = CORPUS[2], "y"
    full = tokenizer(long, add_special_tokens=False)["input_ids"]
    assert encode_prompts(tokenizer, [long, short], 6) == [full[:5] + [2], tokenizer("y")["input_ids"] + [2]]
    assert encode_responses(tokenizer, [long], 6) == [full[:5] + [1]]
    assert encode_responses(tokenizer, [long], 1000) == [full + [1]]
    assert encode_prompts(tokenizer, [""], 2) == [[2]]
    assert encode_prompts(tokenizer, [], 8) == []


def test_encode_and_train_reject_impossible_sizes(tokenizer):
    with pytest.raises(ValueError, match="max_len must be at least 2"):
        encode_prompts(tokenizer, ["a"], 1)
    with pytest.raises(ValueError, match="max_len must be at least 2"):
        encode_responses(tokenizer, ["a"], 0)
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        train_tokenizer(CORPUS, vocab_size=100)
