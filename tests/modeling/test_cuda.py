"""The CUDA code paths, on a machine with a GPU: `pytest tests/modeling/test_cuda.py` (skipped without one).

CI has no GPU, so these run where one is lent (bench/gpu/run.sh runs them first). They check what
the CPU suite cannot: transformers' T5 under bf16 autocast on the GPU agrees with fp32; the lean path,
which frozen models take on CUDA too (`softprompt.modeling.lean_t5.DEVICE_TYPES`), computes what transformers
computes there, and under `--compile` (CUDA graphs) still does; `softprompt train` runs on the GPU in bf16, resumes, and runs under torchrun with NCCL;
and a 1-rank torchrun job joins an NCCL group and runs every collective there, preempted and resumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_perf_invariants import _batch, _loss_and_grad, _prompted, _rel, _t5

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
CUDA = torch.device("cuda")


def test_transformers_path_on_cuda_in_bf16_agrees_with_fp32_on_cpu() -> None:
    model = _prompted(_t5())
    batch = _batch()
    ref_loss, ref_grad = _loss_and_grad(model, batch, lean=True)  # CPU, fp32
    model.to(CUDA)
    model.fast_path = False  # transformers' modules, as fine-tuning and FSDP run them
    assert model.fast_path_dtype(CUDA) is None
    loss, grad = _loss_and_grad(model, batch, lean=False, bf16=True)
    assert abs(float(loss - ref_loss)) <= 0.01 * abs(float(ref_loss))
    assert F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) > 0.99


def test_lean_forward_on_cuda_equals_transformers_in_fp32() -> None:
    model = _prompted(_t5()).to(CUDA)
    batch = _batch()
    ref_loss, ref_grad = _loss_and_grad(model, batch, lean=False)
    model.fast_path = True  # the default for a frozen model on CUDA
    assert model.fast_path_dtype(CUDA) == torch.float32
    loss, grad = _loss_and_grad(model, batch, lean=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    assert _rel(grad, ref_grad) < 1e-4


def test_lean_forward_on_cuda_is_close_to_transformers_in_bf16() -> None:
    model = _prompted(_t5()).to(CUDA)
    batch = _batch()
    ref_loss, ref_grad = _loss_and_grad(model, batch, lean=False, bf16=True)
    loss, grad = _loss_and_grad(model, batch, lean=True, bf16=True)
    assert abs(float(loss - ref_loss)) <= 0.005 * abs(float(ref_loss))
    assert F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) > 0.99
    model.freeze_to(torch.bfloat16)  # bf16 weights: the same numbers as fp32 weights under autocast
    frozen, frozen_grad = _loss_and_grad(model, batch, lean=True)
    torch.testing.assert_close(frozen, loss, rtol=1e-3, atol=1e-3)
    assert _rel(frozen_grad, grad) < 1e-2


def test_lean_greedy_on_cuda_equals_generate() -> None:
    model = _prompted(_t5(seed=3)).eval().to(CUDA)
    batch = _batch(n=6, seed=4)
    ids, mask = batch["input_ids"].to(CUDA), batch["attention_mask"].to(CUDA)
    model.fast_path = False
    ref = model.generate(ids, mask, max_new_tokens=10)
    model.fast_path = True
    assert model.fast_path_dtype(CUDA, for_training=False) is not None
    assert torch.equal(model.generate(ids, mask, max_new_tokens=10), ref)


def test_compiled_training_forward_with_cuda_graphs_equals_eager() -> None:
    # --compile on CUDA: the lean forward and backward as CUDA graphs (mode="reduce-overhead"), one per
    # padded shape; dropout masks by PyTorch's own random ops (`fallback_random`), so the eager ones.
    model = _prompted(_t5(dropout_rate=0.1)).to(CUDA).train()
    batches = [
        {k: v.to(CUDA) for k, v in _batch(n=4, seed=seed).items()} for seed in (3, 5)
    ]  # two shapes: a CUDA graph each

    def loss_and_grad(batch: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        model.prompt.weight.grad = None
        loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        return loss.detach().clone(), model.prompt.weight.grad.clone()

    eager = [loss_and_grad(b, 10 + i) for i, b in enumerate(batches)]
    greedy = model.eval().generate(batches[0]["input_ids"], batches[0]["attention_mask"], max_new_tokens=6)
    model.train()
    assert model.compile_training_forward(CUDA)
    for _ in range(3):  # warm-up, recording, then replays of each shape's graph
        for i, batch in enumerate(batches):
            loss, grad = loss_and_grad(batch, 10 + i)
            torch.testing.assert_close(loss, eager[i][0], rtol=1e-5, atol=1e-5)
            assert _rel(grad, eager[i][1]) < 1e-4
    out = model.eval().generate(batches[0]["input_ids"], batches[0]["attention_mask"], max_new_tokens=6)
    assert torch.equal(out, greedy)


# ---------------------------------------------------------------------------------------- the trainer


def _train_args(model_dir: Path, squad: tuple[Path, Path], out: Path, steps: int) -> list[str]:
    train_file, dev_file = squad
    return [
        "train", "--model_name_or_path", str(model_dir), "--random_init", "--train_file", str(train_file),
        "--validation_file", str(dev_file), "--output_dir", str(out), "--prompt_tuning", "--n_tokens", "5",
        "--batch_size", "4", "--max_steps", str(steps), "--save_steps", "2", "--eval_steps", "0",
        "--max_source_length", "64", "--max_eval_samples", "8", "--precision", "bf16", "--report_to", "none", "--logging_steps", "1",
    ]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_on_cuda_in_bf16_resumes_and_runs_under_torchrun_with_nccl(
    tmp_path, tiny_model_dir, squad_small
):
    cli = [sys.executable, "-m", "softprompt"]
    _run([*cli, *_train_args(tiny_model_dir, squad_small, tmp_path / "a", 4)])
    _run([*cli, *_train_args(tiny_model_dir, squad_small, tmp_path / "b", 2)])
    _run([*cli, *_train_args(tiny_model_dir, squad_small, tmp_path / "b", 4), "--resume"])
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "softprompt",
    ]
    _run([*torchrun, *_train_args(tiny_model_dir, squad_small, tmp_path / "c", 4)])

    a, b, c = (load_file(str(tmp_path / x / "last" / "prompt.safetensors"))["prompt"] for x in "abc")
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # resumed == uninterrupted
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)  # torchrun (NCCL, 1 rank) == plain
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert (results["device"], results["world_size"], results["precision"]) == ("cuda", 1, "bf16")
    assert 0.0 <= results["f1"] <= 100.0
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 4 and all(0.0 < x < 100.0 for x in losses)
    assert not list((tmp_path / "a" / "last").glob("model*.safetensors"))  # a prompt-only checkpoint


def _cuda_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def test_one_rank_torchrun_on_cuda_joins_an_nccl_group_preempts_and_resumes(
    tmp_path, tiny_model_dir, squad_small
):
    """The gloo test of tests/test_distributed.py on the GPU: every collective (token counts, the stop
    signal, sharded evaluation, checkpoint barriers) runs in a 1-rank NCCL group, where PyTorch refuses
    CPU tensors, and the preempted-and-resumed job ends where a plain process ends."""
    from test_distributed import _losses, one_rank_preempt_and_resume

    out, plain = one_rank_preempt_and_resume(tmp_path, tiny_model_dir, squad_small, _cuda_env, "nccl")
    assert json.loads((out / "results.json").read_text())["device"] == "cuda"
    for name in ("last", "best"):
        a = load_file(str(out / name / "prompt.safetensors"))["prompt"]
        b = load_file(str(plain / name / "prompt.safetensors"))["prompt"]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    got, want = _losses(out), _losses(plain)
    assert got.keys() == want.keys()
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), step
