"""Data parallelism, sharded evaluation and FSDP on CPU with gloo, through torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cpu_env

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _common(model_dir: Path, train_file: Path, dev_file: Path) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--random_init", "--train_file", str(train_file),
        "--validation_file", str(dev_file), "--dropout", "0", "--max_source_length", "64",
        "--report_to", "none", "--eval_steps", "0", "--save_steps", "0", "--n_tokens", "5",
        "--max_eval_samples", "15",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    # One thread per process: the same float reductions in every process, so results compare exactly.
    return cpu_env()


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc_per_node", str(nproc), "-m", "softprompt", "train", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _single(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "softprompt", "train", *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_ranks_equal_one_rank_with_accumulation_in_prompt_mode(tmp_path, tiny_model_dir, squad_small):
    common = _common(tiny_model_dir, *squad_small)
    two = _torchrun(
        [
            "--output_dir",
            str(tmp_path / "ddp"),
            "--prompt_tuning",
            "--batch_size",
            "2",
            "--max_steps",
            "5",
            *common,
        ]
    )
    _single(["--output_dir", str(tmp_path / "acc"), "--prompt_tuning", "--batch_size", "2", "--grad_accum_steps", "2", "--max_steps", "5", *common])  # fmt: skip
    assert "global batch 4 = 2 per device x 2 device(s) x 1 accumulation" in two.stdout
    a = load_file(str(tmp_path / "ddp" / "last" / "prompt.safetensors"))["prompt"]
    b = load_file(str(tmp_path / "acc" / "last" / "prompt.safetensors"))["prompt"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    from softprompt.model import load_t5
    from softprompt.prompt import initial_prompt

    emb = load_t5(tiny_model_dir, random_init=True, seed=42).shared.weight
    assert (a - initial_prompt("sampled_vocab", 5, emb, seed=42)).abs().max() > 1e-2  # it trained
    # Sharded evaluation: 15 dev questions (odd) over 2 ranks, each scored once, same as 1 rank.
    pa = json.loads((tmp_path / "ddp" / "predictions_step5.json").read_text())
    pb = json.loads((tmp_path / "acc" / "predictions_step5.json").read_text())
    assert len(pa) == 15 and pa == pb
    ra = json.loads((tmp_path / "ddp" / "results.json").read_text())
    rb = json.loads((tmp_path / "acc" / "results.json").read_text())
    assert (ra["exact_match"], ra["f1"], ra["world_size"]) == (rb["exact_match"], rb["f1"], 2)


def test_two_ranks_equal_one_rank_with_accumulation_in_fine_tune_mode(tmp_path, tiny_model_dir, squad_small):
    common = [*_common(tiny_model_dir, *squad_small), "--optimizer", "adafactor", "--lr", "1e-3"]
    _torchrun(["--output_dir", str(tmp_path / "ddp"), "--batch_size", "2", "--max_steps", "5", *common])
    _single(["--output_dir", str(tmp_path / "acc"), "--batch_size", "2", "--grad_accum_steps", "2", "--max_steps", "5", *common])  # fmt: skip
    a = load_file(str(tmp_path / "ddp" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "acc" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    # and training did move the weights
    from softprompt.model import load_t5

    fresh = load_t5(tiny_model_dir, random_init=True, seed=42).state_dict()
    assert any(not torch.equal(a[k], fresh[k]) for k in a if k in fresh)


def test_fsdp_prompt_tuning_resumes_bit_identical(tmp_path, tiny_model_dir, squad_small):
    common = [
        *_common(tiny_model_dir, *squad_small),
        "--fsdp",
        "--prompt_tuning",
        "--batch_size",
        "2",
        "--save_steps",
        "2",
    ]
    _torchrun(["--output_dir", str(tmp_path / "a"), "--max_steps", "3", *common])
    assert (tmp_path / "a" / "last" / "model_rank1.safetensors").exists()
    _torchrun(["--output_dir", str(tmp_path / "a"), "--resume", "--max_steps", "5", *common])
    _torchrun(["--output_dir", str(tmp_path / "b"), "--max_steps", "5", *common])
    a = load_file(str(tmp_path / "a" / "last" / "prompt.safetensors"))["prompt"]
    b = load_file(str(tmp_path / "b" / "last" / "prompt.safetensors"))["prompt"]
    assert torch.equal(a, b)
    state = json.loads((tmp_path / "a" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 5


def test_fsdp_fine_tuning_exports_a_normal_hf_model(tmp_path, tiny_model_dir, squad_small):
    common = [*_common(tiny_model_dir, *squad_small), "--fsdp", "--batch_size", "2", "--lr", "1e-3"]
    _torchrun(["--output_dir", str(tmp_path / "ft"), "--max_steps", "2", "--eval_steps", "2", *common])
    from softprompt.model import load_t5

    best = load_t5(tmp_path / "ft" / "best")  # a plain HF directory, safetensors
    shard0 = load_file(str(tmp_path / "ft" / "last" / "model_rank0.safetensors"))
    full = best.state_dict()
    name = "model.encoder.block.0.layer.0.SelfAttention.q.weight"
    local = shard0[name]
    assert local.shape[0] == full[name.removeprefix("model.")].shape[0] // 2  # really sharded
    torch.testing.assert_close(local, full[name.removeprefix("model.")][: local.shape[0]])
