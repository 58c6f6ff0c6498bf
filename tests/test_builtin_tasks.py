"""The built-in tasks "debian-descriptions" and "wordnet": parsers on hand-written inputs in the real
formats, building and reusing snapshots, and errors. Offline: apt is never run (fakes stand in)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import subprocess

import pytest

from teacherhack.tasks import TASK_SPECS, Pair, Task, TaskError, debian, hub, load_prompts, load_task, wordnet
from teacherhack.tasks.debian import description_indices
from teacherhack.tasks.debian_descriptions import (
    _read_index,
    clean_long_description,
    description_pairs,
    parse_descriptions,
)
from teacherhack.tasks.snapshot import sha256, write_jsonl
from teacherhack.tasks.wordnet import parse_wordnet_data, parse_wordnet_index, wordnet_pairs

# --- Debian descriptions: formats ---------------------------------------------------------------------

# A Translation-en file as apt stores it: stanzas with Description-en (synopsis, then the long
# description on continuation lines, " ." for a blank line, list items indented further).
TRANSLATION_EN = """\
Package: alpha
Description-md5: 0123456789abcdef0123456789abcdef
Description-en: command line tool for alpha things
 Alpha is a tool that does many useful things for the people who
 need them every day.
 .
 Features:
  * fast and small
  * written in C, with a long item
    that wraps onto a second line
 .
 This package contains the command line program.

Package: beta
Description-md5: fedcba9876543210fedcba9876543210
Description-en: beta has no long description

Package: gamma
Description-md5: 00000000000000000000000000000000
Description-en: too short to keep
 Only five words are here.

Package: alpha-doc
Description-md5: 11111111111111111111111111111111
Description-en: documentation for alpha
 Alpha is a tool that does many useful things for the people who
 need them every day.
 .
 Features:
  * fast and small
  * written in C, with a long item
    that wraps onto a second line
 .
 This package contains the command line program.
"""

# A Packages file: Debian's own has only the synopsis (long text in Translation-en); other
# repositories put the whole description there. Other folded fields must not leak in.
PACKAGES = """\
Package: delta
Version: 1.0-1
Architecture: amd64
Description: delta synopsis only
Description-md5: 22222222222222222222222222222222
Tag: devel::lang, role::program,
 uitoolkit::gtk

Package: epsilon
Version: 2.0
Description:   an   epsilon  server  \r
 Epsilon serves things over the network, quickly and reliably, to many\r
 clients at once.\r
Tag: network::server,
 role::program
Homepage: https://example.org
"""

ALPHA = Pair(
    "Alpha is a tool that does many useful things for the people who need them every day.\n"
    "Features:\n"
    "* fast and small\n"
    "* written in C, with a long item that wraps onto a second line\n"
    "This package contains the command line program.",
    "command line tool for alpha things",
)
EPSILON = Pair(
    "Epsilon serves things over the network, quickly and reliably, to many clients at once.",
    "an epsilon server",
)


def test_parse_descriptions_reads_synopsis_and_continuation_lines():
    stanzas = list(parse_descriptions(TRANSLATION_EN))
    assert [synopsis for synopsis, _ in stanzas] == [
        "command line tool for alpha things",
        "beta has no long description",
        "too short to keep",
        "documentation for alpha",
    ]
    assert stanzas[0][1][:3] == [" Alpha is a tool that does many useful things for the people who",
                                 " need them every day.", " ."]
    assert stanzas[1][1] == []  # no long description
    packages = list(parse_descriptions(PACKAGES))
    assert packages[0] == ("delta synopsis only", [])  # the folded Tag field is not description
    assert len(packages[1][1]) == 2


def test_clean_long_description_joins_lines_and_keeps_paragraphs_and_items():
    _, lines = next(parse_descriptions(TRANSLATION_EN))
    assert clean_long_description(lines) == ALPHA.prompt
    assert clean_long_description([" one", " .", " ", "  two   words", " .", " ."]) == "one\ntwo words"
    assert clean_long_description([" o first", " o second", " 1. third", " - fourth"]) == (
        "o first\no second\n1. third\n- fourth"
    )
    assert clean_long_description([]) == ""


def test_description_pairs_filters_short_and_duplicate_descriptions():
    # beta: no long description; gamma: under 10 words; alpha-doc: alpha's text again (first wins);
    # delta: synopsis only.
    assert description_pairs([TRANSLATION_EN, PACKAGES]) == [ALPHA, EPSILON]
    assert description_pairs([TRANSLATION_EN], min_words=3) == [
        ALPHA, Pair("Only five words are here.", "too short to keep"),
    ]


def test_description_indices_and_compressed_files(tmp_path):
    lists = tmp_path / "lists"
    (lists / "partial").mkdir(parents=True)
    plain = "example.org_debian_dists_stable_main_i18n_Translation-en"
    (lists / plain).write_text(TRANSLATION_EN, encoding="utf-8")
    (lists / "example.org_debian_dists_stable_main_binary-amd64_Packages.gz").write_bytes(
        gzip.compress(PACKAGES.encode()))
    (lists / "example.org_debian_dists_old_main_i18n_Translation-en.xz").write_bytes(
        lzma.compress(TRANSLATION_EN.encode()))
    (lists / "example.org_debian_dists_older_main_i18n_Translation-en.bz2").write_bytes(
        bz2.compress(TRANSLATION_EN.encode()))
    for other in ("example.org_debian_dists_stable_InRelease", "lock",
                  "example.org_debian_dists_stable_main_i18n_Translation-de"):
        (lists / other).write_text("Package: x\nDescription: nope\n one two three four five six seven eight nine ten\n")
    found = description_indices(lists)
    assert [path.name for path in found] == [
        "example.org_debian_dists_old_main_i18n_Translation-en.xz",
        "example.org_debian_dists_older_main_i18n_Translation-en.bz2",
        "example.org_debian_dists_stable_main_binary-amd64_Packages.gz",
        plain,
    ]
    texts = [_read_index(path) for path in found]
    assert texts == [TRANSLATION_EN, TRANSLATION_EN, PACKAGES, TRANSLATION_EN]
    assert description_pairs(texts) == [ALPHA, EPSILON]


# --- Debian descriptions: fetching and snapshot ----------------------------------------------------


LIST_NAME = "example.org_debian_dists_stable_main_i18n_Translation-en"  # as apt names it in its lists folder


def fake_apt(tmp_path, body: str):
    """An `apt-get` that records its arguments and runs `body` (a shell snippet; $lists is the
    folder given as Dir::State::Lists)."""
    script = tmp_path / "bin" / "apt-get"
    script.parent.mkdir(exist_ok=True)
    args = tmp_path / "apt-args"
    script.write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$@\" > '{args}'\n"
        'for arg; do case "$arg" in Dir::State::Lists=*) lists="${arg#Dir::State::Lists=}";; esac; done\n'
        + body
    )
    script.chmod(0o755)
    return script, args


def test_debian_descriptions_builds_a_snapshot_once_then_reads_it(tmp_path, monkeypatch):
    source = tmp_path / "Translation-en"
    source.write_text(TRANSLATION_EN + "\n" + PACKAGES, encoding="utf-8")
    apt, args = fake_apt(tmp_path, f"cp '{source}' \"$lists/{LIST_NAME}\"\n")
    monkeypatch.setattr("shutil.which", lambda name: str(apt) if name == "apt-get" else None)
    cache = tmp_path / "cache"
    expected = Task([ALPHA, EPSILON], {}, f"debian-descriptions (snapshot {cache / 'tasks' / 'debian-descriptions.jsonl'})")
    assert load_task("debian-descriptions", cache) == expected
    options = args.read_text().split("\n")
    assert options[0] == "update"
    assert "Acquire::Languages=en" in options and "Debug::NoLocking=true" in options
    private = [option for option in options if option.startswith(("Dir::State::Lists=", "Dir::Cache=",
                                                                   "Dir::State::status="))]
    assert len(private) == 3 and all(f"={cache / 'tasks'}" in option for option in private)  # nothing system-wide
    tasks = cache / "tasks"
    assert sorted(p.name for p in tasks.iterdir()) == ["debian-descriptions.jsonl", "debian-descriptions.sha256"]
    args.unlink()
    assert load_task("debian-descriptions", cache) == expected
    assert not args.exists()  # apt was not run again
    assert load_prompts("debian-descriptions", cache).pairs == [ALPHA, EPSILON]


def test_debian_descriptions_reports_a_failed_update(tmp_path, monkeypatch):
    apt, _ = fake_apt(tmp_path, "echo 'E: Could not resolve deb.debian.org' >&2\nexit 100\n")
    monkeypatch.setattr("shutil.which", lambda name: str(apt) if name == "apt-get" else None)
    with pytest.raises(TaskError, match="Could not resolve.*network.*jsonl:PATH"):
        load_task("debian-descriptions", tmp_path / "cache")
    assert list((tmp_path / "cache" / "tasks").iterdir()) == []  # no snapshot, no leftovers


def test_debian_descriptions_reports_an_update_that_fetched_nothing(tmp_path, monkeypatch):
    apt, _ = fake_apt(tmp_path, "echo 'W: Failed to fetch http://deb.debian.org/x' >&2\nexit 0\n")
    monkeypatch.setattr("shutil.which", lambda name: str(apt) if name == "apt-get" else None)
    with pytest.raises(TaskError, match="fetched no package index.*Failed to fetch"):
        load_task("debian-descriptions", tmp_path / "cache")


# --- WordNet: formats --------------------------------------------------------------------------------

LICENSE = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license.  By obtaining, using  \n"
    "  3   \n"
)
DATA_NOUN = LICENSE + (
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is "
    "perceived or known or inferred to have its own distinct existence (living or nonliving)  \n"
    "01935395 05 n 0a earthworm 0 angleworm 0 fishworm 0 fishing_worm 0 wiggler 1 nightwalker 0 nightcrawler 0 "
    "crawler 0 dew_worm 0 red_worm 0 002 @ 01935176 n 0000 #m 01935012 n 0000 | terrestrial worm that burrows "
    "into and helps aerate soil; often surfaces when the ground is cool or wet; used as bait by anglers  \n"
    "08420278 14 n 03 depository_financial_institution 0 bank 0 banking_concern 0 001 @ 08054721 n 0000 | a "
    'financial institution that accepts deposits; "he cashed a check at the bank"; "that bank holds the mortgage"  \n'
    "09213565 17 n 01 bank 0 001 @ 09201998 n 0000 | sloping land (especially the slope beside a body of water); "
    '"they pulled the canoe up on the bank"  \n'
    "09363894 17 n 02 Mars 0 Red_Planet 0 001 @ 09411430 n 0000 | a small reddish planet; the 4th from the sun  \n"
)
INDEX_NOUN = LICENSE + (
    "bank n 2 1 @ 2 1 09213565 08420278  \n"  # most frequent sense first: not the lowest offset
    "depository_financial_institution n 1 1 @ 1 0 08420278  \n"
    "earthworm n 1 2 @ #m 1 0 01935395  \n"
    "entity n 1 1 ~ 1 1 00001740  \n"
    "fishing_worm n 1 2 @ #m 1 0 01935395  \n"
    "ghost n 1 0 1 0 07777777  \n"  # a synset missing from data.noun: skipped
    "mars n 1 1 @ 1 0 09363894  \n"
    "red_planet n 1 1 @ 1 0 09363894  \n"
)
DATA_VERB = LICENSE + (
    "01926311 38 v 01 run 0 001 @ 01904930 v 0000 02 + 01 00 + 02 00 | move fast by using one's feet, with one "
    'foot off the ground at any given time; "Don\'t run--you\'ll be out of breath"; "The children ran to the store"  \n'
)
INDEX_VERB = LICENSE + "run v 1 1 @ 1 1 01926311  \n"
DATA_ADJ = LICENSE + (
    "00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | existing in abundance; "
    '"abounding confidence"; "whiskey galore"  \n'
    '00019731 00 s 02 handy 0 ready_to_hand(p) 0 002 & 00019131 a 0000 + 04718999 n 0101 | easy to reach;'
    '"a handy spot"  \n'
)
INDEX_ADJ = LICENSE + (
    "abounding a 1 1 & 1 0 00014358  \n"
    "galore a 1 1 & 1 0 00014358  \n"
    "ready_to_hand a 1 1 & 1 0 00019731  \n"
)
DATA_ADV = LICENSE + "00085811 02 r 02 quickly 0 rapidly 0 001 \\ 00976085 a 0101 | with rapid movements  \n"
INDEX_ADV = LICENSE + "quickly r 1 1 \\ 1 0 00085811  \nrapidly r 1 1 \\ 1 0 00085811  \n"

WORDNET_FILES = {
    "data.noun": DATA_NOUN, "index.noun": INDEX_NOUN, "data.verb": DATA_VERB, "index.verb": INDEX_VERB,
    "data.adj": DATA_ADJ, "index.adj": INDEX_ADJ, "data.adv": DATA_ADV, "index.adv": INDEX_ADV,
}
WORDNET_PAIRS = [
    Pair("Define: bank (noun)", "sloping land (especially the slope beside a body of water)"),
    Pair("Define: depository financial institution (noun)", "a financial institution that accepts deposits"),
    Pair("Define: earthworm (noun)", "terrestrial worm that burrows into and helps aerate soil; often surfaces "
                                     "when the ground is cool or wet; used as bait by anglers"),
    Pair("Define: entity (noun)", "that which is perceived or known or inferred to have its own distinct "
                                  "existence (living or nonliving)"),
    Pair("Define: fishing worm (noun)", "terrestrial worm that burrows into and helps aerate soil; often surfaces "
                                        "when the ground is cool or wet; used as bait by anglers"),
    Pair("Define: Mars (noun)", "a small reddish planet; the 4th from the sun"),
    Pair("Define: Red Planet (noun)", "a small reddish planet; the 4th from the sun"),
    Pair("Define: run (verb)", "move fast by using one's feet, with one foot off the ground at any given time"),
    Pair("Define: abounding (adjective)", "existing in abundance"),
    Pair("Define: galore (adjective)", "existing in abundance"),
    Pair("Define: ready to hand (adjective)", "easy to reach"),
    Pair("Define: quickly (adverb)", "with rapid movements"),
    Pair("Define: rapidly (adverb)", "with rapid movements"),
]


def test_parse_wordnet_data_reads_words_and_definitions():
    synsets = parse_wordnet_data(DATA_NOUN.splitlines(keepends=True))
    assert sorted(synsets) == [1740, 1935395, 8420278, 9213565, 9363894]  # license header skipped
    worm = synsets[1935395]
    assert len(worm.words) == 10 and worm.words[3] == "fishing_worm"  # w_cnt "0a" is hex
    assert worm.definition.endswith("cool or wet; used as bait by anglers")  # plain semicolons stay
    assert synsets[9213565].definition == "sloping land (especially the slope beside a body of water)"
    adjectives = parse_wordnet_data(DATA_ADJ.splitlines())
    assert adjectives[14358].words == ("abounding", "galore")  # the (ip) marker is dropped
    assert adjectives[19731] == wordnet.Synset(19731, ("handy", "ready_to_hand"), "easy to reach")
    verb = parse_wordnet_data(DATA_VERB.splitlines())[1926311]  # verb frames before the gloss
    assert verb.words == ("run",) and verb.definition.startswith("move fast") and '"' not in verb.definition


def test_parse_wordnet_index_keeps_sense_order():
    index = parse_wordnet_index(INDEX_NOUN.splitlines())
    assert index[0] == ("bank", [9213565, 8420278])
    assert ("earthworm", [1935395]) in index and len(index) == 8


def test_wordnet_pairs_one_per_lemma_with_its_first_sense(tmp_path):
    for name, text in WORDNET_FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert wordnet_pairs(tmp_path) == WORDNET_PAIRS
    (tmp_path / "index.adv").unlink()
    with pytest.raises(TaskError, match="not a WordNet database.*index.adv"):
        wordnet_pairs(tmp_path)


# --- WordNet: fetching and snapshot --------------------------------------------------------------------


def test_wordnet_builds_a_snapshot_once_then_reads_it(tmp_path, monkeypatch):
    calls = []

    def fetch(packages, work_dir, *, task="kjv-rv"):
        calls.append((tuple(packages), task))
        root = work_dir / "root" / wordnet.WORDNET_ROOT
        root.mkdir(parents=True)
        for name, text in WORDNET_FILES.items():
            (root / name).write_text(text, encoding="utf-8")

    monkeypatch.setattr(debian, "fetch_debs", fetch)
    assert load_task("wordnet", tmp_path).pairs == WORDNET_PAIRS
    assert load_task("wordnet", tmp_path).pairs == WORDNET_PAIRS
    assert calls == [(("wordnet-base",), "wordnet")]
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == ["wordnet.jsonl", "wordnet.sha256"]
    assert load_task("wordnet", tmp_path, limit=3, seed=1) == load_task("wordnet", tmp_path, limit=3, seed=1)


# --- Both: snapshot reuse without apt, errors without apt --------------------------------------------


@pytest.mark.parametrize(("spec", "pairs"), [("debian-descriptions", [ALPHA, EPSILON]), ("wordnet", WORDNET_PAIRS)])
def test_a_prewritten_snapshot_is_read_without_apt(tmp_path, monkeypatch, spec, pairs):
    def forbidden(*args, **kwargs):
        raise AssertionError("apt must not be looked for or run when the snapshot exists")

    monkeypatch.setattr(shutil, "which", forbidden)
    monkeypatch.setattr(subprocess, "run", forbidden)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_jsonl(pairs, tasks / f"{spec}.jsonl")
    (tasks / f"{spec}.sha256").write_text(f"{sha256((tasks / f'{spec}.jsonl').read_bytes())}  {spec}.jsonl\n")
    assert load_task(spec, tmp_path).pairs == pairs
    assert [pair.prompt for pair in load_prompts(spec, tmp_path).pairs] == [pair.prompt for pair in pairs]
    (tasks / f"{spec}.jsonl").write_text("{}\n")  # damaged: refused, not rebuilt
    with pytest.raises(TaskError, match="delete both files"):
        load_task(spec, tmp_path)


@pytest.mark.parametrize(("spec", "needs"), [("debian-descriptions", "apt-get"), ("wordnet", "apt-get and dpkg-deb")])
def test_without_apt_the_error_says_what_to_do(tmp_path, monkeypatch, spec, needs):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(TaskError, match=f"the {spec} task needs {needs}.*Debian or Ubuntu.*jsonl:PATH"):
        load_task(spec, tmp_path)
    assert list((tmp_path / "tasks").iterdir()) == []


def test_builtin_tasks_are_listed_and_take_no_field_overrides(tmp_path):
    with pytest.raises(TaskError, match="valid tasks: kjv-rv, jsonl:PATH, .*debian-descriptions, wordnet"):
        load_task("wordnett", tmp_path)
    with pytest.raises(TaskError, match="fixed fields"):
        load_task("wordnet", tmp_path, prompt_field="word")
    assert {"debian-descriptions", "wordnet"} <= set(TASK_SPECS)
    assert "debian-descriptions" in hub.NO_HUB_TASKS and "wordnet" in hub.NO_HUB_TASKS


def test_debian_descriptions_warns_about_sources_apt_could_not_fetch(tmp_path, monkeypatch):
    source = tmp_path / "Translation-en"
    source.write_text(TRANSLATION_EN, encoding="utf-8")
    apt, _ = fake_apt(tmp_path, f"cp '{source}' \"$lists/{LIST_NAME}\"\n"
                                "echo 'W: Failed to fetch http://example.org/other/InRelease' >&2\n")
    monkeypatch.setattr("shutil.which", lambda name: str(apt) if name == "apt-get" else None)
    with pytest.warns(UserWarning, match="could not fetch some indices.*example.org/other"):
        assert load_task("debian-descriptions", tmp_path / "cache").pairs == [ALPHA]
