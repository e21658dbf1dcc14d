"""Prompt checkpoints: exact round trip, clear refusals, atomic writes, no unpickling."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softprompt import __version__
from softprompt.errors import CheckpointError
from softprompt.io.atomic import atomic_dir
from softprompt.io.checkpoint import (
    PromptConfig,
    load_prompt,
    save_prompt,
    torch_load_safe,
)


def _cfg(p=5, h=8, base="google/t5-base-lm-adapt"):
    return PromptConfig(base_model=base, n_tokens=p, d_model=h, init="uniform")


def test_round_trip_is_bit_exact_and_files_follow_the_format(tmp_path):
    w = torch.randn(5, 8, dtype=torch.float32) * 1e-3 + 1 / 3
    save_prompt(tmp_path / "p", w, _cfg())
    assert sorted(os.listdir(tmp_path / "p")) == ["prompt.safetensors", "prompt_config.json"]
    raw = load_file(str(tmp_path / "p" / "prompt.safetensors"))
    assert list(raw) == ["prompt"] and raw["prompt"].dtype == torch.float32 and raw["prompt"].shape == (5, 8)
    meta = json.loads((tmp_path / "p" / "prompt_config.json").read_text())
    assert meta["base_model"] == "google/t5-base-lm-adapt" and meta["n_tokens"] == 5 and meta["d_model"] == 8
    assert meta["softprompt_version"] == __version__ and meta["input_template"].startswith(
        "question: {question}"
    )
    back, cfg = load_prompt(tmp_path / "p")
    assert torch.equal(back, w)
    assert cfg == _cfg()


def test_width_mismatch_names_both_widths(tmp_path):
    save_prompt(tmp_path / "p", torch.zeros(5, 8), _cfg())
    with pytest.raises(CheckpointError, match=r"is 8 wide but the model's d_model is 768"):
        load_prompt(tmp_path / "p", expect_d_model=768)


def test_base_model_mismatch_names_both_models(tmp_path):
    save_prompt(tmp_path / "p", torch.zeros(5, 8), _cfg())
    with pytest.raises(
        CheckpointError, match="trained for google/t5-base-lm-adapt, not google/t5-large-lm-adapt"
    ):
        load_prompt(tmp_path / "p", expect_base_model="google/t5-large-lm-adapt")
    # A folder that merely shares the Hub model's name is no longer taken for it (issue 14).
    with pytest.raises(CheckpointError, match="--allow_other_base_model"):
        load_prompt(tmp_path / "p", expect_base_model="/models/t5-base-lm-adapt")


def _model_dir(path, seed: int, **config):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        **{"vocab_size": 64, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_heads": 2, **config}
    )
    T5ForConditionalGeneration(cfg).save_pretrained(path, safe_serialization=True)
    return path


def test_base_model_identity_is_config_and_weights_not_folder_names(tmp_path, capsys):
    import shutil

    from softprompt.io.checkpoint import model_fingerprint, same_model

    base = _model_dir(tmp_path / "a" / "t5", seed=0)
    renamed = tmp_path / "copy-with-another-name"
    shutil.copytree(base, renamed)
    other_weights = _model_dir(tmp_path / "b" / "t5", seed=1)  # same folder name, other weights
    other_config = _model_dir(tmp_path / "c" / "t5", seed=0, d_ff=32)
    assert model_fingerprint(str(base)) == model_fingerprint(str(renamed)) is not None
    assert same_model(str(base), str(renamed))
    assert not same_model(str(base), str(other_weights)) and not same_model(str(base), str(other_config))
    assert model_fingerprint("google/surely-not-cached-here") is None
    # A prompt records its base model's fingerprint; a renamed copy drives it, the look-alike does not.
    cfg = PromptConfig(
        base_model=str(base),
        n_tokens=5,
        d_model=8,
        extra={"base_model_fingerprint": model_fingerprint(str(base))},
    )
    save_prompt(tmp_path / "p", torch.zeros(5, 8), cfg)
    load_prompt(tmp_path / "p", expect_base_model=str(renamed))
    with pytest.raises(
        CheckpointError, match=r"trained for .*a/t5, not .*b/t5 \(their config or weights differ\)"
    ):
        load_prompt(tmp_path / "p", expect_base_model=str(other_weights))
    # ... unless the user insists, which they are told about.
    weight, _ = load_prompt(tmp_path / "p", expect_base_model=str(other_weights), allow_other=True)
    assert weight.shape == (5, 8)
    assert "warning:" in capsys.readouterr().err


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_only_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "evil"
    d.mkdir()
    (d / "prompt.bin").write_bytes(pickle.dumps(_Boom()))
    (d / "prompt_config.json").write_text(json.dumps({"base_model": "x", "n_tokens": 1, "d_model": 1}))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_prompt(d)
    (d / "optimizer.pt").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError, match="refusing to load"):
        torch_load_safe(d / "optimizer.pt")
    assert not (tmp_path / "PWNED").exists()


def test_corrupt_safetensors_gives_clear_error(tmp_path):
    save_prompt(tmp_path / "p", torch.zeros(2, 3), _cfg(2, 3))
    (tmp_path / "p" / "prompt.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_prompt(tmp_path / "p")


def test_atomic_dir_keeps_the_old_checkpoint_when_the_write_fails(tmp_path):
    save_prompt(tmp_path / "p", torch.ones(2, 3), _cfg(2, 3))
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "p") as tmp:
        (tmp / "prompt.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    back, _ = load_prompt(tmp_path / "p")
    assert torch.equal(back, torch.ones(2, 3))
    assert sorted(os.listdir(tmp_path)) == ["p"]  # no temporary left behind


def test_a_hub_id_and_its_local_snapshot_are_the_same_model(tmp_path):
    import subprocess
    import sys

    from conftest import SHARED, cpu_env, need

    hub = need(SHARED / "hf-cache" / "hub")
    snapshot = next((hub / "models--google--t5-v1_1-base" / "snapshots").iterdir())
    probe = (
        "import sys\n"
        "from softprompt.io.checkpoint import model_fingerprint, same_model\n"
        "snap = sys.argv[1]\n"
        "print(model_fingerprint('google/t5-v1_1-base') == model_fingerprint(snap) is not None)\n"
        "print(same_model('google/t5-v1_1-base', snap), same_model('google/t5-base-lm-adapt', snap))\n"
    )
    env = cpu_env(
        HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[2] / "src")
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(snapshot)], capture_output=True, text=True, env=env, check=True
    )
    # pytorch_model.bin only (as these checkpoints publish): its bytes are read, never unpickled.
    assert out.stdout.split() == ["True", "True", "False"]


def test_save_t5_records_an_untied_head_so_any_reader_keeps_it_untied(tmp_path):
    """T5 1.1 checkpoints have an lm_head of their own; config.json must say so (transformers 5 writes
    `tie_word_embeddings: true` for every T5, which transformers 4 would act on)."""
    from torch import nn
    from transformers import T5ForConditionalGeneration

    from conftest import tiny_config
    from softprompt.io.checkpoint import save_t5
    from softprompt.modeling.model import load_t5

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(tiny_config())
    t5.lm_head.weight = nn.Parameter(t5.lm_head.weight.detach().clone() * 3)
    save_t5(tmp_path / "untied", t5)
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = load_t5(str(tmp_path / "untied"))
    torch.testing.assert_close(loaded.lm_head.weight, t5.lm_head.weight, rtol=0, atol=0)
    assert not torch.equal(loaded.lm_head.weight, loaded.shared.weight)

    tied = T5ForConditionalGeneration(tiny_config())
    assert tied.lm_head.weight is tied.shared.weight
    save_t5(tmp_path / "tied", tied)
    assert json.loads((tmp_path / "tied" / "config.json").read_text()).get("tie_word_embeddings", True)
