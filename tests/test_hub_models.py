"""Models named by hub id, offline: a Hugging Face cache is laid out here as huggingface_hub lays out a download
(``models--ORG--NAME/refs/BRANCH`` naming a commit, ``snapshots/COMMIT/`` linking to ``blobs/``), with tiny Llama
models and a tokenizer. A hub id is pinned to the commit the cache holds for its revision: the commit is in the
stages' keys and every load asks for it, so a newer download under the same id gets new keys."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from teacherhack import config as cfg
from teacherhack import lab, preflight
from teacherhack.cli import main
from teacherhack.errors import UserError
from teacherhack.models import HubModelError, NotCached, load_pretrained, pin
from teacherhack.stages import STAGES, Job, pin_models, stage_specs
from teacherhack.tasks.snapshot import load_jsonl
from teacherhack.tokenizer import train_tokenizer

from conftest import TINY, WORDS
from test_architecture import descendants

ONE, TWO = "1" * 40, "2" * 40  # two commits of one repo


def tiny_llama(tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1))


def publish(cache: Path, repo: str, commit: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> None:
    """``folder``'s files as huggingface_hub caches ``repo`` at ``commit``: each file's content in ``blobs/``, the
    snapshot's files linking to them, and each ref (branch or tag) naming the commit."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        move(cache, repo, ref, commit)


def move(cache: Path, repo: str, ref: str, commit: str) -> None:
    """Point ``ref`` at ``commit``, as a download of a newer commit of that branch does."""
    path = cache / f"models--{repo.replace('/', '--')}" / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(commit)  # huggingface_hub writes the bare hash


def save(tmp_path: Path, name: str, seed: int, vocab_size: int = 300) -> tuple[Path, LlamaForCausalLM]:
    folder = tmp_path / name
    tokenizer = train_tokenizer([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4, vocab_size)
    model = tiny_llama(tokenizer, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture
def hub(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline: huggingface_hub (and transformers through it) read both settings at
    import, so its constants are set here and the environment for any process started from the test."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def no_network(monkeypatch) -> list[object]:
    """Every attempt to open a network connection or look up a host, refused and recorded (local sockets stay)."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is off in this test")

    for method in ("connect", "connect_ex"):
        local = getattr(socket.socket, method)
        monkeypatch.setattr(socket.socket, method, lambda self, address, local=local: (
            refuse(address) if self.family in (socket.AF_INET, socket.AF_INET6) else local(self, address)))
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture
def published(hub: Path, tmp_path: Path) -> dict[str, LlamaForCausalLM]:
    """``org/tiny`` at commit ONE on main; commit TWO (other weights and a smaller tokenizer) cached, not yet main."""
    one, model_one = save(tmp_path / "src", "one", seed=1)
    two, model_two = save(tmp_path / "src", "two", seed=2, vocab_size=290)
    publish(hub, "org/tiny", ONE, one, refs=("main", "v1"))
    publish(hub, "org/tiny", TWO, two, refs=())
    return {ONE: model_one, TWO: model_two}


def teacher_config(name: str) -> cfg.LabConfig:
    return cfg.resolve("quick", {**TINY, "task.spec": "jsonl:unused.jsonl", "models.teacher": name})


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    b_state = b.state_dict()
    return all(torch.equal(value, b_state[key]) for key, value in a.state_dict().items())


def keys(config: cfg.LabConfig) -> dict[str, str | None]:
    return {name: spec and spec["key"] for name, spec in stage_specs(pin_models(config), "task-x").items()}


def test_a_hub_id_loads_offline_from_the_cache_pinned_to_its_commit(published, no_network):
    assert pin("org/tiny") == f"org/tiny@{ONE}"
    assert pin(f"org/tiny@{ONE}") == f"org/tiny@{ONE}"  # pinning a pinned name changes nothing
    assert same_weights(load_pretrained(pin("org/tiny")), published[ONE])
    assert len(AutoTokenizer.from_pretrained("org/tiny", revision=ONE)) == 300
    assert pin("xs") == "xs"  # size presets are no hub ids
    assert no_network == []


def test_the_commit_is_in_the_keys_and_a_moved_branch_changes_keys_and_weights(published, hub, no_network):
    config = teacher_config("org/tiny")
    assert pin_models(config).models.teacher == f"org/tiny@{ONE}"
    specs = stage_specs(pin_models(config), "task-x")
    assert ONE in json.dumps(specs["teacher"]["inputs"]) and ONE in json.dumps(specs["tokenizer"]["inputs"])
    before = keys(config)
    assert keys(config) == before
    move(hub, "org/tiny", "main", TWO)  # a newer commit downloaded: main moves
    after = keys(config)
    moved = {name for name in STAGES if before[name] != after[name]}
    readers = {s.name for s in STAGES.values() if "models.teacher" in s.reads and before[s.name] is not None}
    assert {"tokenizer", "teacher"} <= moved and moved == {n for n in descendants(readers) if before[n] is not None}
    assert same_weights(load_pretrained(pin("org/tiny")), published[TWO])
    assert no_network == []


def test_id_at_a_commit_or_a_branch_pins_that_commit(published, hub, no_network):
    move(hub, "org/tiny", "main", TWO)  # v1 stays at ONE
    assert pin("org/tiny@v1") == pin(f"org/tiny@{ONE}") == f"org/tiny@{ONE}"
    assert pin("org/tiny@main") == pin("org/tiny") == f"org/tiny@{TWO}"
    assert keys(teacher_config("org/tiny@v1")) == keys(teacher_config(f"org/tiny@{ONE}"))
    assert keys(teacher_config("org/tiny@v1")) != keys(teacher_config("org/tiny"))
    assert same_weights(load_pretrained(pin("org/tiny@v1")), published[ONE])
    assert no_network == []


def test_every_stage_loads_the_pinned_commit_even_once_the_branch_has_moved(published, hub, tmp_path, no_network):
    """Keyed on ONE, built from ONE: the tokenizer stage and the teacher's initial weights ask for the commit."""
    config = pin_models(teacher_config("org/tiny"))
    move(hub, "org/tiny", "main", TWO)  # between the keys and the builds
    out = tmp_path / "tokenizer"
    out.mkdir()
    STAGES["tokenizer"].build(Job(STAGES["tokenizer"].view(config), {}, "cpu", task=None), out)
    assert len(AutoTokenizer.from_pretrained(out)) == 300  # ONE's tokenizer (TWO's has 290 tokens)
    job = Job(STAGES["teacher"].view(config), {"tokenizer": out}, "cpu", task=None)
    assert same_weights(job.initial_model("teacher", seed=0).model, published[ONE])
    assert no_network == []


def test_an_unknown_revision_or_an_uncached_id_is_one_line(published, no_network):
    with pytest.raises(NotCached, match=r"revision 'v9' of hub model 'org/tiny' is not in the Hugging Face cache "
                                        r"\(.*hf-cache; it holds 'org/tiny' at main, v1\)") as error:
        pin("org/tiny@v9")
    assert "\n" not in str(error.value)
    with pytest.raises(NotCached, match="hub model 'org/absent' is not in the Hugging Face cache"):
        pin("org/absent")
    with pytest.raises(NotCached):
        pin("org/tiny@" + "3" * 40)  # a commit this cache does not hold
    with pytest.raises(HubModelError, match="is neither a size preset .* a model folder here, nor a hub id"):
        pin("/no/such/folder")
    for name in ("org/tiny@v9", "org/absent"):  # what the command says: one line, the fix, nothing fetched
        with pytest.raises(UserError, match=r"models.teacher=.*HF_HUB_OFFLINE=1 forbids downloading it; name a "
                                            r"local model folder") as error:
            preflight.check_models(teacher_config(name))
        assert "\n" not in str(error.value)
    assert no_network == []


@pytest.mark.parametrize(("name", "message"), [
    ("org/tiny@", "nothing after '@'"),
    ("@v1", "'' before '@' is not a hub id"),
    ("./models/tiny@v1", "'./models/tiny' before '@' is not a hub id .*no folder './models/tiny@v1' exists"),
    ("org/tiny@v 1", "the revision 'v 1' holds white space"),
])
def test_a_malformed_revision_is_refused_by_the_configuration(name, message):
    with pytest.raises(cfg.ConfigError, match=f"models.teacher={name!r}: {message}") as error:
        teacher_config(name)
    assert "\n" not in str(error.value)


def test_a_folder_with_an_at_in_its_name_is_a_folder(tmp_path, hub, no_network):
    folder, model = save(tmp_path, "tiny@v2", seed=3)
    config = teacher_config(str(folder))
    assert pin(str(folder)) == str(folder) and pin_models(config) == config
    assert "models.teacher files" in stage_specs(config, "task-x")["teacher"]["inputs"]
    assert same_weights(load_pretrained(str(folder)), model)
    preflight.check_models(config)
    assert no_network == []


def test_preflight_checks_a_cached_hub_id_offline_without_the_network_or_the_probe(published, monkeypatch,
                                                                                    no_network):
    monkeypatch.setattr(preflight, "hub_reachable", lambda timeout=3.0: pytest.fail("offline: no probe"))
    asked = []
    real = AutoTokenizer.from_pretrained.__func__

    def tokenizer(cls, name, *args, **kwargs):
        asked.append((name, kwargs.get("revision")))
        return real(cls, name, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(tokenizer))
    preflight.check_models(teacher_config("org/tiny@v1"))
    assert asked == [("org/tiny", ONE)]  # the pinned commit, not the branch
    assert no_network == []


def test_preflight_fails_at_once_on_an_uncached_hub_id_when_the_probe_finds_no_hub(hub, monkeypatch):
    """What took transformers half a minute of retries: the probe (a closed local port here) answers at once and
    transformers is never asked."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # closed now: refused at once
    probes = []
    probe = preflight.hub_reachable
    monkeypatch.setattr(preflight, "hub_reachable", lambda timeout=3.0: probes.append(timeout) or probe(timeout))
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("transformers must not be asked"))
    config = cfg.apply_overrides(teacher_config("org/absent"), {"models.student": "org/absent-too"})
    with pytest.raises(UserError, match=r"cannot reach the Hugging Face hub to load models.teacher='org/absent' \(no "
                                        r"connection.*hub model 'org/absent' is not in the Hugging Face cache.*name a "
                                        r"local model folder.*HF_HUB_OFFLINE=1") as error:
        preflight.check_models(config)
    assert probes == [3.0] and "\n" not in str(error.value)


@pytest.mark.parametrize(("name", "commit"), [("org/tiny", TWO), ("org/new", ONE)])
def test_where_the_hub_is_reachable_preflight_fetches_first_and_pins_what_it_fetched(name, commit, published, hub,
                                                                                   tmp_path, monkeypatch, no_network):
    """Online, preflight's load brings the cache up to date (a stand-in hub here: it moves org/tiny's main to TWO,
    and downloads org/new, not cached before), and the resolution comes after it: what the hub served is pinned."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    probes = []
    monkeypatch.setattr(preflight, "hub_reachable", lambda timeout=3.0: probes.append(timeout) or True)
    new, _ = save(tmp_path / "src", "new", seed=4)
    fetched = []
    real = AutoConfig.from_pretrained.__func__

    def hub_download(cls, repo, *args, revision=None, **kwargs):
        if revision is None:  # the hub serves the id's default branch: its newest commit is now cached
            fetched.append(repo)
            move(hub, "org/tiny", "main", TWO)
            publish(hub, "org/new", ONE, new)
            monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # all downloaded: the stand-in goes away
        return real(cls, repo, *args, revision=revision, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(hub_download))
    preflight.check_models(teacher_config(name))
    assert probes == [3.0] and fetched == [name] and pin(name) == f"{name}@{commit}"
    assert no_network == []


def test_an_unreachable_hub_with_a_cached_copy_says_to_go_offline(published, monkeypatch):
    """Not offline, the hub out of reach: transformers would try it for every file of the cached copy (minutes of
    retries), so preflight stops at once and names HF_HUB_OFFLINE=1, with the commit it would use."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(preflight, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("transformers must not be asked"))
    with pytest.raises(UserError, match=f"cannot reach the Hugging Face hub to check models.teacher='org/tiny'.*"
                                        f"holds it at commit {ONE}.*HF_HUB_OFFLINE=1"):
        preflight.check_models(teacher_config("org/tiny"))


def test_resuming_after_the_branch_moved_names_the_commits(published, hub, tmp_path):
    out = tmp_path / "lab"
    (out / "offline").mkdir(parents=True)
    lab._keep_config(out / "config.yaml", pin_models(teacher_config("org/tiny")))
    (out / "offline" / "metrics.jsonl").write_text("{}\n")  # a run has started
    move(hub, "org/tiny", "main", TWO)
    with pytest.raises(cfg.ConfigError, match=f"different configuration .*models.teacher: 'org/tiny@{ONE}' → "
                                              f"'org/tiny@{TWO}'"):
        lab._keep_config(out / "config.yaml", pin_models(teacher_config("org/tiny")))


@pytest.mark.slow
def test_the_lab_trains_a_hub_teacher_offline_and_records_its_commit(hub, tiny_task, tmp_path, no_network):
    pairs = load_jsonl(tiny_task).pairs
    tokenizer = train_tokenizer([x for p in pairs for x in (p.prompt, p.response)], 300)
    for role, seed in (("oracle", 0), ("teacher", 1), ("student", 2)):
        tiny_llama(tokenizer, seed).save_pretrained(tmp_path / role)
        tokenizer.save_pretrained(tmp_path / role)
    publish(hub, "org/teacher", ONE, tmp_path / "teacher")
    sets = {**{k: v for k, v in TINY.items() if not k.startswith("models.")}, "distill.sources": "offline",
            "distill.steps": 4, "eval.every": 2}
    args = ["lab", "--oracle", str(tmp_path / "oracle"), "--teacher", "org/teacher", "--student",
            str(tmp_path / "student"), "--task", f"jsonl:{tiny_task}", "--out", str(tmp_path / "lab"), "--cache",
            str(tmp_path / "cache"), "--jobs", "1", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    assert main(args) == 0
    saved = yaml.safe_load((tmp_path / "lab" / "config.yaml").read_text())
    assert saved["models"]["teacher"] == f"org/teacher@{ONE}"  # rerun it to train on exactly these weights
    assert (tmp_path / "lab" / "offline" / "metrics.jsonl").exists()
    assert no_network == []


def test_a_hub_id_without_safetensors_weights_is_refused_before_anything_runs(hub, tmp_path, monkeypatch):
    """google/t5-v1_1-* ship pickles only on main (their safetensors are an open pull request of the hub's bot):
    preflight says so, offline from the cached snapshot and online from the hub's list of files."""
    folder, model = save(tmp_path / "src", "pickled", seed=5)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    publish(hub, "org/pickled", ONE, folder)
    message = (r"models.teacher='org/pickled' has no safetensors weights at commit 1{40} \(the Hugging Face cache "
               r"holds pytorch_model.bin there\).*org/pickled@refs/pr/N.*safe_serialization=True")
    with pytest.raises(UserError, match=message):
        preflight.check_models(teacher_config("org/pickled"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(preflight, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(
        lambda cls, repo, *a, **k: LlamaConfig.from_pretrained(folder)))  # a stand-in hub serving the config
    listed = []
    monkeypatch.setattr(preflight.HfApi, "list_repo_files", lambda self, repo, revision=None: listed.append(
        (repo, revision)) or ["config.json", "pytorch_model.bin", "tokenizer.json", "onnx/model.safetensors"])
    with pytest.raises(UserError, match=message.replace("the Hugging Face cache", "the hub")):
        preflight.check_models(teacher_config("org/pickled"))
    assert listed == [("org/pickled", ONE)]


def test_an_offline_cache_without_the_weights_says_to_download_them(hub, tmp_path):
    """Preflight's own pass online fetches the config and the tokenizer only: offline later, a cache that holds no
    weights at all needs a download, not another revision."""
    folder, _ = save(tmp_path / "src", "bare", seed=6)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    publish(hub, "org/bare", ONE, folder)
    with pytest.raises(UserError, match=r"holds no weights of it at commit 1{40}, only config.json.*huggingface-cli "
                                        r"download org/bare --revision 1{40}.*HF_HUB_OFFLINE=1"):
        preflight.check_models(teacher_config("org/bare"))
