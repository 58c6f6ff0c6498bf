"""Tasks, splits and our tokenizer: offline except the one test that rebuilds the shipped kjv-rv pairs
with apt; the SWORD modules are tiny ones written here."""

import dataclasses
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from teacherhack.tasks import Pair, Task, TaskError, debian, kjv_rv, load_task, split_task
from teacherhack.tasks.kjv_rv import align_verses, parse_ztext, rebuild_kjv_rv, write_shipped
from teacherhack.tasks.snapshot import load_jsonl, sha256, write_jsonl
from teacherhack.tokenizer import EOS, PAD, SEP, encode_prompts, encode_responses, train_tokenizer

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


# --- kjv-rv: the shipped pairs, and rebuilding them with apt -------------------------------------------


def fake_fetch(calls):
    """Stand-in for `fetch_debs` that unpacks the tiny modules where the real packages would be."""

    def fetch(packages, work_dir):
        calls.append(tuple(packages))
        modules = work_dir / "root" / kjv_rv.ZTEXT_ROOT
        write_ztext(modules / kjv_rv.KJV_MODULE, ENGLISH)
        write_ztext(modules / kjv_rv.RV_MODULE, SPANISH)
        (work_dir / "sword-text-kjv_1_all.deb").write_bytes(b"deb")

    return fetch


EXPECTED_PAIRS = [
    Pair("In the beginning God & the earth.", "EN el principio hay allí también bdelio."),
    Pair("And God said, <Let> é", "Y mirándolos Jesús"),
    Pair("Blessed LORD.", "Bienaventurado"),
    Pair("Jesus wept.", "Y lloró Jesús."),
]
SHIPPED_PAIRS = 31_084  # KJV verses with a Reina-Valera counterpart, both non-empty


def test_kjv_rv_rebuild_then_ship_then_load(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(debian, "fetch_debs", fake_fetch(calls))
    (tmp_path / "work").mkdir()
    assert rebuild_kjv_rv(tmp_path / "work") == EXPECTED_PAIRS
    assert calls == [("sword-text-kjv", "sword-text-sparv")]
    write_shipped(EXPECTED_PAIRS, tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["kjv-rv.jsonl.xz", "kjv-rv.sha256"]
    monkeypatch.setattr(kjv_rv, "SHIPPED_DIR", tmp_path / "data")
    assert load_task("kjv-rv", tmp_path / "cache") == Task(EXPECTED_PAIRS, {}, "kjv-rv (shipped snapshot)")
    assert not (tmp_path / "cache").exists()  # nothing to build, nothing cached
    assert len(calls) == 1


def test_the_shipped_kjv_rv_loads_without_apt(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("apt must not be looked for or run for the shipped task")

    monkeypatch.setattr(shutil, "which", forbidden)
    monkeypatch.setattr(subprocess, "run", forbidden)
    task = load_task("kjv-rv", tmp_path)
    assert len(task.pairs) == SHIPPED_PAIRS and task.skipped == {} and task.source == "kjv-rv (shipped snapshot)"
    assert task.pairs[0] == Pair("In the beginning God created the heaven and the earth.",
                                 "EN el principio crió Dios los cielos y la tierra.")
    assert task.pairs[-1].prompt.startswith("The grace of our Lord Jesus Christ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                    reason="rebuilding kjv-rv needs apt-get and dpkg-deb (Debian or Ubuntu)")
def test_rebuilding_kjv_rv_with_apt_gives_the_shipped_checksum(tmp_path):
    pairs = rebuild_kjv_rv(tmp_path)
    write_jsonl(pairs, tmp_path / "kjv-rv.jsonl")
    shipped = (kjv_rv.SHIPPED_DIR / kjv_rv.SHIPPED_CHECKSUM).read_text(encoding="utf-8")
    assert f"{sha256((tmp_path / 'kjv-rv.jsonl').read_bytes())}  kjv-rv.jsonl\n" == shipped
    assert len(pairs) == SHIPPED_PAIRS


@pytest.mark.parametrize("damage", ["edit", "no checksum"])
def test_kjv_rv_rejects_a_damaged_shipped_file(tmp_path, monkeypatch, damage):
    write_shipped(EXPECTED_PAIRS, tmp_path)
    monkeypatch.setattr(kjv_rv, "SHIPPED_DIR", tmp_path)
    shipped = tmp_path / "kjv-rv.jsonl.xz"
    if damage == "edit":
        text = lzma.decompress(shipped.read_bytes()).decode("utf-8")
        shipped.write_bytes(lzma.compress(text.replace("wept", "slept").encode("utf-8")))
    else:
        (tmp_path / "kjv-rv.sha256").unlink()
    with pytest.raises(TaskError, match="shipped kjv-rv snapshot .* does not match its checksum .*reinstall"):
        load_task("kjv-rv", tmp_path)


def test_kjv_rv_rebuild_without_apt_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(TaskError, match="apt-get and dpkg-deb.*Debian or Ubuntu.*jsonl:PATH"):
        rebuild_kjv_rv(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_kjv_rv_rebuild_reports_a_failed_download(tmp_path, monkeypatch):
    apt = tmp_path / "apt-get"
    apt.write_text("#!/bin/sh\necho 'E: Unable to locate package sword-text-kjv' >&2\nexit 100\n")
    apt.chmod(0o755)
    monkeypatch.setattr("shutil.which", lambda name: str(apt) if name == "apt-get" else "/bin/true")
    (tmp_path / "work").mkdir()
    with pytest.raises(TaskError, match="Unable to locate package.*apt-get update"):
        rebuild_kjv_rv(tmp_path / "work")


def test_unknown_task_lists_the_valid_ones(tmp_path):
    with pytest.raises(TaskError, match="kjv-rv, jsonl:PATH"):
        load_task("nope", tmp_path)


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
    task = load_task(f"jsonl:{path}", tmp_path)
    assert task == Task([Pair("hola", "hello"), Pair("¿qué?", "what?")], {"blank prompt or response": 1}, str(path))


def test_jsonl_blank_pairs_are_counted_and_a_sample_keeps_the_counts(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    rows += [{"prompt": "", "response": "r"}, {"prompt": " \t", "response": "r"}, {"prompt": "p", "response": "\n"}]
    path = write_lines(tmp_path / "t.jsonl", *(json.dumps(row) for row in rows))
    assert load_jsonl(path).skipped == {"blank prompt or response": 3}
    sample = load_task(f"jsonl:{path}", tmp_path, limit=4, seed=2)
    assert len(sample.pairs) == 4 and sample.skipped == {"blank prompt or response": 3}
    clean = write_lines(tmp_path / "clean.jsonl", *(json.dumps(row) for row in rows[:10]))
    assert load_task(f"jsonl:{clean}", tmp_path).skipped == {}


def test_jsonl_custom_fields(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", json.dumps({"document": "long text", "summary": "short"}))
    assert load_jsonl(path, prompt_field="document", response_field="summary").pairs == [Pair("long text", "short")]


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


def test_jsonl_bytes_that_are_not_utf8_are_located(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"prompt": "ñ", "response": "n"}, ensure_ascii=False).encode("utf-8")
    path.write_bytes(good + b"\n" + good + b"\r\n" + b'{"pr\xffompt": "a", "response": "b"}\n')
    with pytest.raises(TaskError, match=r"data.jsonl, line 3: not valid UTF-8 \(byte 0xff at column 5\)"):
        load_task(f"jsonl:{path}", tmp_path)


def test_jsonl_line_separators_inside_strings_do_not_split_lines(tmp_path):
    pairs = [Pair("a\u2028b", "c\u2029d"), Pair("e\x85f", "g")]
    write_jsonl(pairs, tmp_path / "t.jsonl")
    assert load_jsonl(tmp_path / "t.jsonl").pairs == pairs
    assert load_task(str(tmp_path / "t.jsonl"), tmp_path).pairs == pairs  # the datasets-style reader too


def test_jsonl_path_under_the_home_folder(tmp_path, monkeypatch):
    """``--set task.spec=jsonl:~/data.jsonl``: the shell does not expand ``~`` inside an argument; teacherhack does."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_lines(tmp_path / "t.jsonl", json.dumps({"prompt": "hola", "response": "hello"}))
    assert load_task("jsonl:~/t.jsonl", tmp_path).pairs == [Pair("hola", "hello")]


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
        "from teacherhack.tasks import Pair, split_task;"
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
    assert splits.duplicates == 1


def test_splits_keep_whole_pairs_and_count_duplicates():
    pairs = PAIRS + [Pair("prompt 3", "again"), Pair("prompt 7", "again"), Pair("prompt 3", "and again")]
    splits = split_task(pairs, **SIZES)
    assert splits.duplicates == 3
    assert dataclasses.replace(splits, duplicates=0) == split_task(PAIRS, **SIZES)  # later repeats change nothing
    for part in (splits.validation, splits.distill, splits.stage1, splits.oracle_train):
        assert all(pair == PAIRS[int(pair.prompt.split()[1])] for pair in part)  # real responses, the first kept
    assert splits.validation_prompts == [pair.prompt for pair in splits.validation]
    assert split_task(PAIRS, **SIZES).duplicates == 0


def test_splits_are_the_ones_earlier_versions_made():
    """Refactoring must not move a run's data: seed 0's validation prompts, as the first version drew them."""
    assert split_task(PAIRS, **SIZES).validation_prompts == [
        "prompt 23", "prompt 8", "prompt 11", "prompt 7", "prompt 48", "prompt 13", "prompt 1", "prompt 91",
        "prompt 94", "prompt 54",
    ]


def test_splits_need_enough_pairs():
    with pytest.raises(TaskError, match="need 101 pairs with distinct prompts .* but the task has 100:"):
        split_task(PAIRS, n_stage1=40, n_distill=40, n_validation=20)
    with pytest.raises(TaskError, match="need 110 pairs"):
        split_task(PAIRS, **SIZES, n_oracle=50)
    with pytest.raises(TaskError, match="negative: n_distill=-1"):
        split_task(PAIRS, n_stage1=1, n_distill=-1, n_validation=1)


def test_too_few_pairs_name_the_settings_to_lower():
    pairs = [Pair(f"prompt {i}", "response") for i in range(3000)]
    with pytest.raises(TaskError) as caught:
        split_task(pairs, n_stage1=5000, n_distill=500, n_validation=200)
    assert str(caught.value) == (
        "the splits need 5,701 pairs with distinct prompts (task.n_validation=200 + task.n_distill=500 + "
        "task.n_stage1=5000 + at least 1 for the oracle) but the task has 3,000: lower task.n_stage1 or "
        "task.n_distill (or task.n_validation), or use a larger data set"
    )
    with pytest.raises(TaskError, match=r"need 1,050 pairs .*task.n_stage1=500 \+ task.n_oracle=500\) but the task "
                       r"has 1,000 \(2 more repeat an earlier prompt\): lower task.n_oracle, task.n_stage1 or "):
        split_task(pairs[:1000] + pairs[:2], n_stage1=500, n_distill=50, n_validation=0, n_oracle=500)


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


LOCALE_SPLITS = """
import locale
import sys
from pathlib import Path
from teacherhack import config as cfg
from teacherhack.stages import STAGES, Job, build_splits
from teacherhack.tasks import Pair, Task

assert locale.getpreferredencoding(False).lower() not in ("utf-8", "utf8")  # the locale this test is about
pairs = [Pair(f"\\u00bfD\\u00f3nde est\\u00e1 {i}?", f"Aqu\\u00ed \\u2014 {i} \\u2016 \\u00f1") for i in range(400)]
c = cfg.resolve("quick", {"task.n_distill": 8, "task.n_oracle": 8})
out = Path(sys.argv[1])
build_splits(Job(STAGES["splits"].view(c), {}, "cpu", Task(pairs, {}, "test")), out)
splits = Job(STAGES["splits"].view(c), {"splits": out}, "cpu", Task(pairs, {}, "test")).splits()
print(ascii(splits.validation[0].prompt))
"""


def test_splits_keep_the_tasks_characters_under_an_ascii_locale(tmp_path):
    """A machine whose locale is not UTF-8 (LANG=C without Python's UTF-8 mode) wrote and read splits.json in its
    own encoding: a UnicodeEncodeError for kjv-rv's Spanish, or, in latin-1, other characters without an error."""
    script = tmp_path / "splits_in_c_locale.py"
    script.write_text(LOCALE_SPLITS, encoding="ascii")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("'\\xbfD\\xf3nde est\\xe1 ")
