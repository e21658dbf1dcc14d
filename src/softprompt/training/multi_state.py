"""The checkpoint of a multi-prompt run: what `--resume` needs for every prompt, and its restore.

A multi-prompt checkpoint is a single run's checkpoint directory (`softprompt.io.rundir` publishes and
verifies it the same way: one manifest over every file) holding:

- `trainer_state.json`: the run's step, time and examples, and its Python RNG;
- `optimizer.pt`: the one optimizer (a parameter group per prompt, so each prompt's Adafactor state and
  lr) and its schedule; `rng_rank{r}.safetensors`: each rank's torch RNG;
- `prompts/<name>/`: each prompt as an ordinary prompt directory (`prompt.safetensors`,
  `prompt_config.json`, a model card) with its own `trainer_state.json`: its data stream's epoch and
  batch, its best step and scores.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softprompt.errors import CheckpointError
from softprompt.io import rundir
from softprompt.io.checkpoint import (
    save_tensors,
    write_prompt_files,
)
from softprompt.io.rundir import TrainerState
from softprompt.runtime.distributed import DistEnv, barrier, broadcast_object
from softprompt.training.saving import prompt_config, write_state_and_card
from softprompt.training.setup import Run
from softprompt.training.state import (
    OPTIMIZER_STATE,
    load_optimizer_state,
    load_prompt_into,
    load_torch_rng,
    python_rng_state,
    restore_python_rng,
    rng_file,
)

#: Inside a multi-prompt checkpoint, each prompt's ordinary prompt directory lives in prompts/<name>/.
PROMPTS_DIR = "prompts"


def _write_prompts(directory: Path, names: list[str], slots: list[Run], location: Path) -> None:
    """Each prompt's directory (weights, config, card, its trainer state) under `directory`/prompts/."""
    for name, slot in zip(names, slots, strict=True):
        d = directory / PROMPTS_DIR / name
        d.mkdir(parents=True, exist_ok=True)
        assert slot.model.prompt is not None
        if not (d / "prompt.safetensors").exists():  # `amend` keeps the weights, which did not change
            write_prompt_files(d, slot.model.prompt.weight, prompt_config(slot))
        write_state_and_card(d, slot, location=location / PROMPTS_DIR / name)


def save_multi_checkpoint(
    out: Path,
    env: DistEnv,
    state: TrainerState,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    names: list[str],
    slots: list[Run],
    keep: int,
) -> Path:
    """Write and publish the checkpoint of `state.step` (every rank calls it; rank 0 writes all but its RNG).

    Returns:
        The published checkpoint directory.
    """
    state.python_rng = python_rng_state()
    tmp = Path(
        broadcast_object(str(rundir.new_checkpoint_dir(out, state.step)) if env.is_main else None, env)
    )
    barrier(env)
    name = rundir.checkpoint_name(state.step)
    try:
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state(env.device)
        save_tensors(tmp / rng_file(env.rank), rng)
        barrier(env)
        if env.is_main:
            # Through a file object: torch.save to a path reports a full disk as an opaque RuntimeError.
            with open(tmp / OPTIMIZER_STATE, "wb") as f:
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, f)
            _write_prompts(tmp, names, slots, out / name)
            rundir.write_trainer_state(tmp, state)
            rundir.publish_checkpoint(tmp, out, state.step, keep=keep)
    except BaseException:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(env)
    return out / name


def refresh_multi_last(
    out: Path, env: DistEnv, state: TrainerState, names: list[str], slots: list[Run]
) -> None:
    """Record the latest evaluation's best-so-far of every prompt in `last/`, atomically."""
    if env.is_main:
        last = (out / rundir.LAST).resolve()
        with rundir.amend(last) as tmp:
            for name in names:
                for f in ("trainer_state.json", "README.md"):
                    (tmp / PROMPTS_DIR / name / f).unlink(missing_ok=True)  # hard links: never write through
            (tmp / rundir.TRAINER_STATE).unlink(missing_ok=True)
            _write_prompts(tmp, names, slots, out / last.name)
            rundir.write_trainer_state(tmp, state)


def restore_multi(
    directory: Path,
    stack: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    env: DistEnv,
    names: list[str],
) -> tuple[TrainerState, list[TrainerState]]:
    """Load a multi-prompt checkpoint back into the live prompts, optimizer, schedule and RNGs.

    Returns:
        The run's trainer state and each prompt's (in `names` order).

    Raises:
        CheckpointError: a file is damaged, or the checkpoint holds other prompts than the run trains.
    """
    directory = directory.resolve()
    state = rundir.read_trainer_state(directory)
    prompts = list(stack.prompts)  # type: ignore[arg-type]
    slot_states = []
    for name, prompt in zip(names, prompts, strict=True):
        d = directory / PROMPTS_DIR / name
        if not d.is_dir():
            raise CheckpointError(
                f"{directory} holds no prompt '{name}' ({d} is missing): it belongs to another run"
            )
        slot_states.append(rundir.read_trainer_state(d))
        load_prompt_into(d, prompt)
    load_optimizer_state(directory, optimizer, scheduler)
    load_torch_rng(directory, env)
    restore_python_rng(state, directory)
    return state, slot_states
