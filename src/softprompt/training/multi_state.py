"""The checkpoint of a multi-prompt run: what `--resume` needs for every prompt, and its restore.

A multi-prompt checkpoint is a single run's checkpoint directory (`softprompt.io.rundir` publishes and
verifies it the same way: one manifest over every file) holding:

- `trainer_state.json`: the run's step, time and examples, and its Python RNG;
- `optimizer.pt`: the one optimizer (a parameter group per prompt, so each prompt's Adafactor state and
  lr) and its schedule; `rng_rank{r}.safetensors`: each rank's torch RNG;
- `prompts/<name>/`: each prompt as an ordinary prompt directory (`prompt.safetensors`,
  `prompt_config.json`, a model card) with its own `trainer_state.json`: its data stream's epoch and
  batch, its best step and scores.

Under `--fsdp` the prompts and their optimizer state are sharded by rows across the ranks, so, as in a
single FSDP run's checkpoint (`softprompt.training.state`), each rank writes its own shards
(`model_rank{r}.safetensors`: every prompt's rows; `optimizer_rank{r}.safetensors`) in place of
`optimizer.pt`, rank 0 the param groups and schedule as JSON, and the ranks gather every prompt whole for
`prompts/<name>/`, which stay ordinary prompt directories. Resuming reads the shards (the same number of
ranks, as for any FSDP checkpoint).
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
from softprompt.runtime.distributed import DistEnv, barrier, broadcast_object, full_weight
from softprompt.training.saving import prompt_config, write_state_and_card
from softprompt.training.setup import Run
from softprompt.training.state import (
    OPTIMIZER_STATE,
    load_optimizer_state,
    load_prompt_into,
    load_torch_rng,
    load_train_state,
    python_rng_state,
    restore_python_rng,
    rng_file,
    save_train_state,
)

#: Inside a multi-prompt checkpoint, each prompt's ordinary prompt directory lives in prompts/<name>/.
PROMPTS_DIR = "prompts"


def _write_prompts(
    directory: Path, names: list[str], slots: list[Run], location: Path, weights: list[torch.Tensor] | None
) -> None:
    """Each prompt's directory (weights, config, card, its trainer state) under `directory`/prompts/.

    Args:
        directory: the checkpoint being written.
        names: the prompts' names.
        slots: the prompts' runs.
        location: where `directory` will live (the model cards name it).
        weights: each prompt's whole weight; None when amending a checkpoint, which keeps its weights
            (they did not change).
    """
    for k, (name, slot) in enumerate(zip(names, slots, strict=True)):
        d = directory / PROMPTS_DIR / name
        d.mkdir(parents=True, exist_ok=True)
        if weights is not None:
            write_prompt_files(d, weights[k], prompt_config(slot))
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
    *,
    stack: nn.Module,
    fsdp: bool,
) -> Path:
    """Write and publish the checkpoint of `state.step` (every rank calls it; rank 0 writes all but its RNG,
    and under FSDP all but its shards).

    Args:
        out: the run directory.
        env: the distributed environment.
        state: the run's trainer state.
        optimizer: the one optimizer (a group per prompt).
        scheduler: its schedule.
        names: the prompts' names.
        slots: the prompts' runs.
        keep: how many checkpoints to keep (`--save_total_limit`).
        stack: the module that holds the prompts (FSDP's root under `fsdp`).
        fsdp: whether the prompts are FSDP-sharded.

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
        if fsdp:
            # A single FSDP run's tensors: this rank's RNG and its shards of every prompt and of the
            # optimizer state; rank 0 the groups and schedule. The stack has no prompt of its own to
            # gather: every prompt is gathered below, into its own directory.
            save_train_state(tmp, stack, optimizer, scheduler, env, fsdp=True, prompt_config=None)
        else:
            rng = {"torch_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["torch_cuda"] = torch.cuda.get_rng_state(env.device)
            save_tensors(tmp / rng_file(env.rank), rng)
        # Under FSDP every rank takes part in gathering each prompt; rank 0 writes them.
        weights = [full_weight(_prompt_weight(slot)) for slot in slots]
        barrier(env)
        if env.is_main:
            if not fsdp:
                # Through a file object: torch.save to a path reports a full disk as an opaque RuntimeError.
                with open(tmp / OPTIMIZER_STATE, "wb") as f:
                    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, f)
            _write_prompts(tmp, names, slots, out / name, weights)
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
            _write_prompts(tmp, names, slots, out / last.name, None)
            rundir.write_trainer_state(tmp, state)


def restore_multi(
    directory: Path,
    stack: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    env: DistEnv,
    names: list[str],
    *,
    fsdp: bool = False,
) -> tuple[TrainerState, list[TrainerState]]:
    """Load a multi-prompt checkpoint back into the live prompts, optimizer, schedule and RNGs.

    Under `fsdp` the prompts and the optimizer state come from this rank's shards (the prompt
    directories' weights are their gathered copies).

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
        if not fsdp:
            load_prompt_into(d, prompt)
    if fsdp:
        load_train_state(directory, stack, optimizer, scheduler, env, fsdp=True)
    else:
        load_optimizer_state(directory, optimizer, scheduler)
        load_torch_rng(directory, env)
    restore_python_rng(state, directory)
    return state, slot_states


def _prompt_weight(slot: Run) -> torch.Tensor:
    assert slot.model.prompt is not None
    return slot.model.prompt.weight
