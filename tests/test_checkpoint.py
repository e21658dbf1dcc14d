"""Prompt checkpoints: exact round trip, clear refusals, atomic writes, no unpickling."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from softprompt import __version__
from softprompt.checkpoint import (
    PromptConfig,
    atomic_dir,
    load_prompt,
    save_prompt,
    torch_load_safe,
)
from softprompt.errors import CheckpointError


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
    # a local copy of the same model (same folder name) is accepted
    load_prompt(tmp_path / "p", expect_base_model="/models/t5-base-lm-adapt")


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
