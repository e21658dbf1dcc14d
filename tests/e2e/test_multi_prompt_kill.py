"""A `--num_prompts 3` run killed with SIGKILL after a checkpoint resumes bit-identically (issue 23).

A real `python -m softprompt train` subprocess is killed the moment `last` names a checkpoint past the
first evaluation, then resumed with `--resume`; it must end exactly where an uninterrupted run of the
same flags ends: every prompt's `best/<name>/` and `last` tensors, the optimizer's per-prompt state,
every prompt's data-stream position and best scores, and the log, and `softprompt verify` passes. Dropout
0.1 makes every step draw random numbers, so only restored RNG states reproduce the run; 24 examples in
batches of 4 (6 steps an epoch) over 8 steps cross an epoch boundary, so the streams' positions matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SQUAD_DEV, SQUAD_TRAIN, config_only_t5, cpu_env, squad_subset

MAX_STEPS = 8
NAMES = ("prompt0", "prompt1", "prompt2")
# Wall-clock values, which no two runs share.
TIMINGS = {"time", "examples_per_second", "train_seconds", "train_examples_per_second"}


@dataclass(frozen=True)
class Setup:
    model_dir: Path
    train_file: Path
    dev_file: Path
    reference: Path


def _env() -> dict[str, str]:
    # One thread per process: every run reduces floats in the same order, and the shared box stays usable.
    return cpu_env(MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _train_argv(s: Setup, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "softprompt", "train", "--output_dir", str(out), "--prompt_tuning",
        "--model_name_or_path", str(s.model_dir), "--random_init", "--train_file", str(s.train_file),
        "--validation_file", str(s.dev_file), "--max_source_length", "64", "--max_target_length", "8",
        "--n_tokens", "4", "--batch_size", "4", "--max_steps", str(MAX_STEPS), "--save_steps", "2",
        "--save_total_limit", "10", "--eval_steps", "4", "--logging_steps", "1", "--dropout", "0.1",
        "--report_to", "none", "--num_prompts", "3",
    ]  # fmt: skip


def _run_to_end(argv: list[str], log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run(argv, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]


def _last_step(out: Path) -> int:
    """The step of the checkpoint `last` names, or -1 (no `last` yet, or it is being replaced)."""
    try:
        return int(os.readlink(out / "last").removeprefix("checkpoint-"))
    except (FileNotFoundError, ValueError):
        return -1


def _kill_after_checkpoint(argv: list[str], out: Path, step: int, log: Path) -> None:
    """Start a run and SIGKILL it the moment `last` names checkpoint `step` or a later one."""
    with log.open("w") as f:
        proc = subprocess.Popen(argv, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        try:
            while _last_step(out) < step:
                assert proc.poll() is None, "the run ended before the kill point:\n" + log.read_text()[-2000:]
                assert time.monotonic() < deadline, "the run never reached the kill point"
                time.sleep(0.001)  # a poll interval, not a guess: the condition is what triggers the kill
            proc.kill()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without `start` records (a resume adds one) and timings; a torn last line dropped."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["event"] != "start":
            out.append({k: v for k, v in record.items() if k not in TIMINGS})
    return out


def _prompt(path: Path) -> torch.Tensor:
    return load_file(str(path / "prompt.safetensors"))["prompt"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    """The tiny model, 24 train and 4 dev questions, and one uninterrupted 3-prompt run (subprocess)."""
    root = tmp_path_factory.mktemp("multi-kill")
    model = config_only_t5(root / "tiny-t5")
    s = Setup(
        model_dir=model,
        train_file=squad_subset(SQUAD_TRAIN, root / "train24.json", 24),
        dev_file=squad_subset(SQUAD_DEV, root / "dev4.json", 4),
        reference=root / "reference",
    )
    _run_to_end(_train_argv(s, s.reference), root / "reference.log")
    return s


def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical_for_every_prompt(setup, tmp_path):
    out = tmp_path / "run"
    _kill_after_checkpoint(_train_argv(setup, out), out, 4, tmp_path / "killed.log")
    killed_at = _last_step(out)
    assert 4 <= killed_at < MAX_STEPS and not (out / "results.json").exists()

    _run_to_end(
        [sys.executable, "-m", "softprompt", "train", "--output_dir", str(out), "--resume"],
        tmp_path / "resumed.log",
    )
    ref = setup.reference
    assert os.readlink(out / "last") == os.readlink(ref / "last") == f"checkpoint-{MAX_STEPS:07d}"
    for name in NAMES:
        # Each prompt's best and last tensors, and every checkpoint after the kill, bit for bit.
        for sub in [Path("best") / name, Path("last") / "prompts" / name] + [
            Path(f"checkpoint-{s:07d}") / "prompts" / name for s in range(killed_at, MAX_STEPS + 1, 2)
        ]:
            got, want = _prompt(out / sub), _prompt(ref / sub)
            assert torch.equal(got, want), f"{sub} differs by {(got - want).abs().max().item()}"
        # Its data stream's position, examples seen and best step and scores.
        got, want = (
            json.loads((r / "last" / "prompts" / name / "trainer_state.json").read_text()) for r in (out, ref)
        )
        for key in ("step", "epoch", "batch_in_epoch", "examples_seen", "best_step", "best_scores"):
            assert got[key] == want[key], (name, key)
        assert got["epoch"] == 1  # 8 steps of a 6-step epoch: the stream rolled over
    # The one optimizer: every prompt's Adafactor state and lr, and the schedule.
    opt = [torch.load(r / "last" / "optimizer.pt", weights_only=True) for r in (out, ref)]
    assert len(opt[0]["optimizer"]["state"]) == len(NAMES)
    for sa, sb in zip(
        opt[0]["optimizer"]["state"].values(), opt[1]["optimizer"]["state"].values(), strict=True
    ):
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[key])), key
    assert opt[0]["optimizer"]["param_groups"] == opt[1]["optimizer"]["param_groups"]
    assert opt[0]["scheduler"] == opt[1]["scheduler"]
    # Results and the log are the uninterrupted run's; the steps redone after the kill are logged once.
    got, want = (json.loads((r / "results.json").read_text()) for r in (out, ref))
    for name in NAMES:
        for key in ("best_step", "f1", "exact_match"):
            assert got["prompts"][name][key] == want["prompts"][name][key], (name, key)
    assert _records(out) == _records(ref)
    assert [r["step"] for r in _records(out) if r["event"] == "train"] == [
        s for s in range(1, MAX_STEPS + 1) for _ in NAMES
    ]
    # `softprompt verify` checks every checkpoint and every best/<name>/ of the resumed run.
    verify = subprocess.run(
        [sys.executable, "-m", "softprompt", "verify", str(out)], env=_env(), capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert all(f"best/{name}" in verify.stdout for name in NAMES)
