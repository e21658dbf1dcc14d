"""The seed's checkpoints by Hub id, offline, exactly as a cluster that pre-downloaded them sees them.

../shared/hf-cache/hub is a Hugging Face hub cache holding google/t5-v1_1-base and
google/t5-base-lm-adapt with the files their main branches publish: `pytorch_model.bin` and no
safetensors, `spiece.model` (+ `tokenizer.json` for lm-adapt only), transformers-4-era tokenizer
configs, and an untied `lm_head` (tiny random weights). Every test copies it (it is read-only in CI)
and points HF_HUB_CACHE at the copy with HF_HUB_OFFLINE=1, in this process and in subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import SHARED, SQUAD_DEV, SQUAD_TRAIN, TOKENIZER_DIR, cpu_env, need, tiny_config
from softprompt.cli import main
from softprompt.errors import CheckpointError
from softprompt.io.checkpoint import PICKLE_SUFFIXES

HF_CACHE = SHARED / "hf-cache"
V11 = "google/t5-v1_1-base"
LM_ADAPT = "google/t5-base-lm-adapt"
N_QUESTIONS = 6  # SQuAD dev questions compared against transformers' own generate

pytestmark = pytest.mark.usefixtures("one_thread")


def _copy_cache(dest: Path) -> Path:
    """A writable copy of ../shared/hf-cache (the original's files and folders are read-only)."""
    need(HF_CACHE / "hub")
    shutil.copytree(HF_CACHE, dest, copy_function=shutil.copyfile)
    for root, dirs, _ in os.walk(dest):
        for d in dirs:
            p = Path(root) / d
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    Path(dest).chmod(Path(dest).stat().st_mode | stat.S_IWUSR)
    return dest / "hub"


def _snapshot(hub: Path, repo_id: str) -> Path:
    """The cached snapshot directory of `repo_id`'s main branch."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    return repo / "snapshots" / (repo / "refs" / "main").read_text().strip()


def _go_offline(monkeypatch: pytest.MonkeyPatch, hub: Path) -> None:
    """HF_HUB_CACHE=hub, HF_HUB_OFFLINE=1 for subprocesses and for this process (huggingface_hub reads
    its constants at import, so they are set too)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def _fresh_process_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test counts the weights_only line as a new process would say it (once per process)."""
    from softprompt.io import pretrained

    monkeypatch.setattr(pretrained, "_pickle_notice_given", False)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the hub cache, offline, for one test."""
    path = _copy_cache(tmp_path / "hf-cache")
    _go_offline(monkeypatch, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """`softprompt train --prompt_tuning` by Hub id, offline, for both checkpoints (subprocesses)."""
    root = tmp_path_factory.mktemp("hub-runs")
    hub = _copy_cache(root / "hf-cache")
    env = cpu_env(HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    out: dict = {"hub": hub, "env": env, "root": root}
    for model in (V11, LM_ADAPT):
        run = root / model.split("/")[1]
        cmd = [sys.executable, "-m", "softprompt", "train", "--model_name_or_path", model, "--prompt_tuning"]
        cmd += [
            "--n_tokens",
            "4",
            "--train_file",
            str(need(SQUAD_TRAIN)),
            "--validation_file",
            str(need(SQUAD_DEV)),
        ]
        cmd += ["--max_train_samples", "16", "--max_eval_samples", "4", "--max_steps", "2"]
        cmd += ["--global_batch_size", "8", "--eval_batch_size", "4", "--max_source_length", "128"]
        cmd += ["--output_dir", str(run), "--report_to", "none"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        out[model] = {"run": run, "proc": proc}
    return out


def _reference_answers(hub: Path, repo_id: str, rows: list[dict[str, str]]) -> list[str]:
    """transformers' own model + `generate`: T5ForConditionalGeneration from the cached config and
    the state dict of `torch.load(weights_only=True)`, greedy, on the plain T5 SQuAD input text."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    snap = _snapshot(hub, repo_id)
    config = T5Config.from_pretrained(snap)
    state = torch.load(snap / "pytorch_model.bin", weights_only=True, map_location="cpu")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "both are present ... will NOT tie them": right, and expected
    try:
        model = T5ForConditionalGeneration.from_pretrained(None, config=config, state_dict=state).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])
    tokenizer = AutoTokenizer.from_pretrained(str(snap))
    answers = []
    for row in rows:
        text = f"question: {' '.join(row['question'].split())} context: {' '.join(row['context'].split())}"
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=32, do_sample=False, num_beams=1)
        answers.append(tokenizer.decode(out[0], skip_special_tokens=True).strip())
    return answers


def _dev_rows(n: int) -> list[dict[str, str]]:
    """The first n SQuAD dev questions whose context is short (no truncation on either side)."""
    data = json.loads(need(SQUAD_DEV).read_text())
    rows = []
    for article in data["data"]:
        for para in article["paragraphs"]:
            if len(para["context"]) > 900:
                continue
            qa = para["qas"][0]
            rows.append(
                {
                    "id": qa["id"],
                    "question": qa["question"],
                    "context": para["context"],
                    "answers": qa["answers"],
                }
            )
            if len(rows) == n:
                return rows
    return rows


def _squad_file(rows: list[dict[str, str]], path: Path) -> Path:
    paragraphs = [
        {
            "context": r["context"],
            "qas": [{"id": r["id"], "question": r["question"], "answers": r["answers"]}],
        }
        for r in rows
    ]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def _notices(err: str) -> list[str]:
    return [line for line in err.splitlines() if "torch.load(weights_only=True)" in line]


# ------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("model", [V11, LM_ADAPT])
def test_train_prompt_tuning_by_hub_id_offline(runs: dict, model: str) -> None:
    proc, run = runs[model]["proc"], runs[model]["run"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # one line says the weights came from pytorch_model.bin through the restricted unpickler
    notices = _notices(proc.stderr)
    assert len(notices) == 1 and model in notices[0] and "pytorch_model.bin" in notices[0], proc.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2
    config = json.loads((run / "best" / "prompt_config.json").read_text())
    assert config["base_model"] == model and config["n_tokens"] == 4 and config["d_model"] == 32
    from safetensors.torch import load_file

    prompt = load_file(str(run / "best" / "prompt.safetensors"))["prompt"]
    assert prompt.shape == (4, 32) and torch.isfinite(prompt).all()


# --------------------------------------------------------------------------- loading, in-process


def test_loaded_lm_head_is_the_files_not_the_tied_embedding(hub: Path, capsys, monkeypatch) -> None:
    from softprompt.modeling.model import load_t5

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = load_t5(V11)
    assert len(calls) == 1 and calls[0]["weights_only"] is True  # the .bin, restricted, once
    monkeypatch.setattr(torch, "load", real_load)
    state = torch.load(_snapshot(hub, V11) / "pytorch_model.bin", weights_only=True)
    assert not torch.equal(state["lm_head.weight"], state["shared.weight"])  # the file's head is its own
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert model.config.scale_decoder_outputs is False  # T5 1.1: no d_model**-0.5 rescaling before the head
    loaded = model.state_dict()
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key
    notices = _notices(capsys.readouterr().err)
    assert len(notices) == 1 and V11 in notices[0]


def test_the_weights_only_line_is_said_once_per_process_and_never_for_safetensors(
    hub: Path, tmp_path: Path, capsys
) -> None:
    # Issue 27 item 12: the line repeated whenever a command loaded the model again.
    from conftest import save_tiny_t5
    from softprompt.modeling.model import load_t5

    load_t5(V11)
    load_t5(V11)
    load_t5(LM_ADAPT)
    notices = _notices(capsys.readouterr().err)
    assert len(notices) == 1 and V11 in notices[0] and "pytorch_model.bin" in notices[0]
    from softprompt.io import pretrained

    pretrained._pickle_notice_given = False  # a new process (the fixture restores it after the test)
    safetensors_dir = save_tiny_t5(tmp_path / "tiny")
    assert (safetensors_dir / "model.safetensors").is_file()
    load_t5(safetensors_dir)
    assert not _notices(capsys.readouterr().err)


def test_a_local_copy_of_the_snapshot_loads_the_same(hub: Path, tmp_path: Path) -> None:
    from softprompt.modeling.model import load_t5

    local = tmp_path / "t5-v1_1-base"
    shutil.copytree(_snapshot(hub, V11), local)
    a, b = load_t5(V11), load_t5(local)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.parametrize("model", [V11, LM_ADAPT])
def test_tokenizers_of_both_checkpoints_load_offline_and_match_t5s(hub: Path, model: str) -> None:
    from transformers import AutoTokenizer

    from softprompt.modeling.model import load_tokenizer

    has_json = (_snapshot(hub, model) / "tokenizer.json").exists()
    assert has_json == (model == LM_ADAPT)  # v1_1 publishes spiece.model only
    reference = AutoTokenizer.from_pretrained(str(need(TOKENIZER_DIR)))
    tokenizer = load_tokenizer(model)
    assert len(tokenizer) == len(reference) == 32100
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    for row in _dev_rows(20):
        text = f"question: {row['question']} context: {row['context']} <extra_id_0>"
        assert tokenizer(text).input_ids == reference(text).input_ids


def test_no_conversion_service_and_no_pr_revision_when_online(hub: Path, monkeypatch) -> None:
    """Online with a repo that has no safetensors, transformers would call the Hub's conversion service
    (or take refs/pr/N). With the Hub unreachable, the files come from the cache, and neither happens."""
    import huggingface_hub
    import transformers.modeling_utils as modeling_utils
    import transformers.safetensors_conversion as conversion
    from huggingface_hub import constants
    from huggingface_hub.utils import _http as hub_http

    import softprompt.io.pretrained as pretrained
    from softprompt.modeling.model import load_t5

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    nowhere = "http://127.0.0.1:9"  # nothing listens there: no test touches the network
    monkeypatch.setattr(constants, "ENDPOINT", nowhere)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", nowhere + "/{repo_id}/resolve/{revision}/{filename}"
    )
    # huggingface_hub retries a refused connection with exponential backoff (~45 s in all); skip the waits.
    monkeypatch.setattr(hub_http, "time", SimpleNamespace(sleep=lambda _: None, time=time.time))

    def forbidden(*args, **kwargs):
        raise AssertionError("the Hub's safetensors conversion was called")

    for module, name in (
        (modeling_utils, "auto_conversion"),
        (conversion, "auto_conversion"),
        (conversion, "spawn_conversion"),
    ):
        monkeypatch.setattr(module, name, forbidden)
    seen = []
    real = huggingface_hub.hf_hub_download

    def download(repo_id, filename, **kwargs):
        seen.append((filename, kwargs.get("revision")))
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(pretrained, "hf_hub_download", download)
    model = load_t5(V11)
    state = torch.load(_snapshot(hub, V11) / "pytorch_model.bin", weights_only=True)
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])
    assert [f for f, _ in seen] == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
    ]
    assert all(revision is None for _, revision in seen)  # always main, never refs/pr/N


def test_a_hub_id_missing_from_the_cache_offline_is_one_clear_line(hub: Path, capsys) -> None:
    assert (
        main(["eval", "--model", "google/t5-small-lm-adapt", "--validation_file", str(need(SQUAD_DEV))]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert (
        "google/t5-small-lm-adapt is not a local directory, and not in the Hugging Face cache" in err
        and "HF_HUB_OFFLINE=1" in err
    )


# ---------------------------------------------------------- answers: eval / predict / serve / convert


def test_eval_predict_serve_and_convert_answer_like_transformers(
    runs: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    hub, env = runs["hub"], runs["env"]
    _go_offline(monkeypatch, hub)
    rows = _dev_rows(N_QUESTIONS)
    assert len(rows) == N_QUESTIONS
    dev = _squad_file(rows, tmp_path / "dev.json")
    expected = _reference_answers(hub, V11, rows)
    assert len(set(expected)) > 1, expected  # the tiny model's answers depend on the input

    # softprompt eval by Hub id, no prompt: transformers' own answers
    preds = tmp_path / "eval.json"
    assert main(["eval", "--model", V11, "--validation_file", str(dev), "--output", str(preds)]) == 0
    got = json.loads(preds.read_text())
    assert [got[r["id"]] for r in rows] == expected
    assert len(_notices(capsys.readouterr().err)) == 1

    # softprompt predict (a subprocess, as a user runs it) with the trained prompt, by Hub id
    prompt_dir = runs[V11]["run"] / "best"
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "".join(json.dumps({"question": r["question"], "context": r["context"]}) + "\n" for r in rows)
    )
    out = tmp_path / "answers.jsonl"
    cmd = [sys.executable, "-m", "softprompt", "predict", "--model", V11, "--prompt", str(prompt_dir)]
    cmd += ["--input_file", str(questions), "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted = [json.loads(line)["answer"] for line in out.read_text().splitlines()]
    assert len(predicted) == N_QUESTIONS and len(set(predicted)) > 1, predicted

    # softprompt serve's app, by Hub id, with the same prompt: predict's answers
    from fastapi.testclient import TestClient

    from softprompt.inference.bank import load_model_and_prompts
    from softprompt.serving.server import create_app

    loaded = load_model_and_prompts(V11, [str(prompt_dir)], names=["squad"])
    with TestClient(create_app(loaded)) as client:
        inputs = [{"task": "squad", "question": r["question"], "context": r["context"]} for r in rows]
        r = client.post("/v1/answer", json={"inputs": inputs})
        assert r.status_code == 200, r.text
        assert r.json()["answers"] == predicted

    # softprompt convert: a safetensors directory that loads without any unpickling, same answers
    converted = tmp_path / "t5-v1_1-base"  # the model's own name: its prompts are accepted with it
    assert main(["convert", V11, str(converted)]) == 0
    names = sorted(p.name for p in converted.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "spiece.model"} <= set(names), names
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)], names
    assert json.loads((converted / "config.json").read_text())["tie_word_embeddings"] is False
    assert not list(tmp_path.glob(".tmp-*"))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called to load a converted model")

    monkeypatch.setattr(torch, "load", no_unpickling)
    capsys.readouterr()
    preds2 = tmp_path / "eval2.json"
    assert (
        main(["eval", "--model", str(converted), "--validation_file", str(dev), "--output", str(preds2)]) == 0
    )
    assert json.loads(preds2.read_text()) == got
    out2 = tmp_path / "answers2.jsonl"
    argv = ["predict", "--model", str(converted), "--prompt", str(prompt_dir), "--input_file", str(questions)]
    assert main([*argv, "--output", str(out2)]) == 0
    assert [json.loads(line)["answer"] for line in out2.read_text().splitlines()] == predicted
    assert not _notices(capsys.readouterr().err)
    from softprompt.modeling.model import load_t5

    reloaded, original = load_t5(converted), loaded.model.model
    assert torch.equal(reloaded.lm_head.weight, original.lm_head.weight.cpu())
    for key, tensor in original.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor.cpu()), key
    # converting again into an existing directory is refused in one line; --overwrite replaces it
    assert main(["convert", V11, str(converted)]) == 2
    assert "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ safety


class _Payload:
    """Unpickling this creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_code_running_pickle_is_refused_in_one_line_and_never_run(
    hub: Path, tmp_path: Path, capsys
) -> None:
    import pickle

    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()  # the payload is live
    marker = tmp_path / "PWNED"
    bin_file = _snapshot(hub, V11) / "pytorch_model.bin"
    state = torch.load(bin_file, weights_only=True)
    state["lm_head.weight"] = _Payload(marker)
    bin_file.unlink()
    torch.save(state, bin_file)

    dev = _squad_file(_dev_rows(2), tmp_path / "dev.json")
    for argv in (
        ["eval", "--model", V11, "--validation_file", str(dev)],
        ["convert", V11, str(tmp_path / "out")],
        ["predict", "--model", V11, "--question", "Who?", "--context", "Nobody."],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert (
            err.startswith(f"softprompt {argv[0]}: error: refusing to load ") and "pytorch_model.bin" in err
        ), err
        assert not _notices(err)
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_other_pickles_stay_refused(tmp_path: Path, monkeypatch) -> None:
    from softprompt.modeling.model import load_t5

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a refused pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for name in ("model.pt", "weights.bin", "model.ckpt", "model.pkl"):
        d = tmp_path / name.replace(".", "_")
        tiny_config().save_pretrained(d)
        (d / name).write_bytes(b"not read")
        with pytest.raises(CheckpointError, match="holds only pickle weights"):
            load_t5(d)


def test_sharded_checkpoints_load_every_shard(hub: Path, tmp_path: Path) -> None:
    """`pytorch_model.bin.index.json` shards (restricted unpickler) and safetensors shards load in full."""
    from softprompt.modeling.model import load_t5

    snap = _snapshot(hub, V11)
    state = torch.load(snap / "pytorch_model.bin", weights_only=True)
    pickled = tmp_path / "bin-shards"
    pickled.mkdir()
    shutil.copy(snap / "config.json", pickled)
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, pickled / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (pickled / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_t5(pickled)
    for key, tensor in state.items():
        assert torch.equal(model.state_dict()[key], tensor), key
    safe = tmp_path / "safe-shards"
    model.save_pretrained(safe, max_shard_size="2MB")
    assert (safe / "model.safetensors.index.json").exists() and len(list(safe.glob("*.safetensors"))) > 1
    again = load_t5(safe)
    for key, tensor in state.items():
        assert torch.equal(again.state_dict()[key], tensor), key


def test_index_shards_must_stay_inside_the_model_directory(tmp_path: Path) -> None:
    from softprompt.modeling.model import load_t5

    tiny_config().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../etc/x.bin"}})
    )
    with pytest.raises(CheckpointError, match="shard files inside its directory"):
        load_t5(tmp_path)


@pytest.mark.parametrize("command", ["predict", "train"])
def test_a_bert_config_or_a_mistyped_path_is_one_line_not_a_traceback(
    tmp_path: Path, capsys, command
) -> None:
    """A BERT config.json with --random_init names the architecture; a local path that does not exist
    says so, instead of the Hub client's "Repo id must be in the form"."""
    bert = tmp_path / "bert"
    bert.mkdir()
    shutil.copy(need(TOKENIZER_DIR) / "tokenizer.json", bert / "tokenizer.json")
    (bert / "config.json").write_text(
        json.dumps({"model_type": "bert", "hidden_size": 64, "vocab_size": 100})
    )
    missing = tmp_path / "models" / "t5-smal"
    extra = (
        ["--question", "q?", "--context", "c"]
        if command == "predict"
        else ["--output_dir", str(tmp_path / "run"), "--train_file", str(need(SQUAD_DEV)), "--max_steps", "1"]
    )
    for model, message in (
        (bert, f"{bert / 'config.json'} describes a bert model, not T5"),
        (missing, f"{missing}: no such directory"),
    ):
        assert main([command, "--model", str(model), "--random_init", *extra]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "Repo id" not in err, err
