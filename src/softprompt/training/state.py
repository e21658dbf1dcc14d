"""The trainer's resumable state: the tensors of a checkpoint (weights, optimizer, RNG) and their restore.

`softprompt.io.rundir` owns the checkpoint directory around these files (trainer_state.json, the
manifest, publication); `save_train_state` fills it on every rank, `restore_checkpoint` reads it all back.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from softprompt.errors import CheckpointError
from softprompt.io import rundir
from softprompt.io.atomic import atomic_write_text
from softprompt.io.checkpoint import (
    PromptConfig,
    load_prompt,
    load_tensors,
    refuse_pickles,
    save_t5,
    save_tensors,
    torch_load_safe,
    write_prompt_files,
)
from softprompt.io.rundir import TrainerState
from softprompt.modeling.model import PromptedT5
from softprompt.runtime.distributed import (
    DistEnv,
    fsdp_full_state_dict,
    fsdp_train_tensors,
    load_fsdp_train_tensors,
)

OPTIMIZER_STATE = "optimizer.pt"
MODEL_WEIGHTS = "model.safetensors"
FSDP_OPTIMIZER_GROUPS = "optimizer_groups.json"
FSDP_SCHEDULER = "scheduler.json"


def rng_file(rank: int) -> str:
    """Each rank's torch RNG state (dropout differs per rank)."""
    return f"rng_rank{rank}.safetensors"


def fsdp_model_file(rank: int) -> str:
    """A rank's shards of the trainable weights under FSDP."""
    return f"model_rank{rank}.safetensors"


def fsdp_optimizer_file(rank: int) -> str:
    """A rank's shards of the optimizer state under FSDP."""
    return f"optimizer_rank{rank}.safetensors"


def save_train_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    env: DistEnv,
    *,
    fsdp: bool,
    prompt_config: PromptConfig | None,
) -> None:
    """Write this rank's part of a resumable checkpoint into `directory` (every rank calls it).

    Every rank writes its RNG state. Unsharded, rank 0 writes the trainable weights (in prompt mode a
    usable prompt checkpoint, else a Hugging Face model directory) and `optimizer.pt`, which holds
    only tensors and numbers and is read back with `weights_only=True`. Under FSDP each rank writes
    its own shards (resuming needs the same number of ranks) and rank 0 the gathered prompt.
    """
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state(env.device)
    save_tensors(directory / rng_file(env.rank), rng)
    prompt = getattr(model, "prompt", None)
    if fsdp:
        shards, optim_flat, groups = fsdp_train_tensors(model, optimizer)
        save_tensors(directory / fsdp_model_file(env.rank), shards)
        save_tensors(directory / fsdp_optimizer_file(env.rank), optim_flat)
        # Every rank takes part in gathering the prompt; rank 0 keeps the checkpoint usable as a prompt.
        weight = (
            fsdp_full_state_dict(model, trainable_only=True)["prompt.weight"] if prompt is not None else None
        )
        if env.is_main:
            atomic_write_text(directory / FSDP_OPTIMIZER_GROUPS, json.dumps(groups))
            atomic_write_text(directory / FSDP_SCHEDULER, json.dumps(scheduler.state_dict()))
            if weight is not None:
                assert prompt_config is not None
                write_prompt_files(directory, weight, prompt_config)
        return
    if not env.is_main:
        return
    if prompt is not None:
        assert prompt_config is not None
        write_prompt_files(directory, prompt.weight, prompt_config)
    else:
        save_t5(directory, model.model)
    # Through a file object: torch.save to a path reports a full disk as an opaque RuntimeError.
    with open(directory / OPTIMIZER_STATE, "wb") as f:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, f)


def load_train_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    env: DistEnv,
    *,
    fsdp: bool,
) -> None:
    """Load what `save_train_state` wrote back into live objects; a damaged file is one `CheckpointError`."""
    prompt = getattr(model, "prompt", None)
    if fsdp:
        groups_file, scheduler_file = directory / FSDP_OPTIMIZER_GROUPS, directory / FSDP_SCHEDULER
        try:
            groups = json.loads(groups_file.read_text(encoding="utf-8"))
            scheduler_state = json.loads(scheduler_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{groups_file} or {scheduler_file} is damaged ({e})") from None
        shards = load_tensors(directory / fsdp_model_file(env.rank))
        optim_flat = load_tensors(directory / fsdp_optimizer_file(env.rank))
        load_fsdp_train_tensors(model, optimizer, shards, optim_flat, groups, where=directory)
        load_into(scheduler, scheduler_state, scheduler_file)
    else:
        if prompt is not None:
            load_prompt_into(directory, prompt)
        else:
            refuse_pickles(directory, MODEL_WEIGHTS)
            state = load_tensors(directory / MODEL_WEIGHTS)
            missing, unexpected = model.model.load_state_dict(state, strict=False)
            tied = {"lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
            if unexpected or set(missing) - tied:
                raise CheckpointError(
                    f"{directory / MODEL_WEIGHTS} does not match the model (missing {sorted(set(missing) - tied)[:3]}, "
                    f"unexpected {sorted(unexpected)[:3]})"
                )
        load_optimizer_state(directory, optimizer, scheduler)
    load_torch_rng(directory, env)


def load_prompt_into(directory: Path, prompt: Any) -> None:
    """Copy the prompt saved in `directory` into the live `prompt` (a `SoftPrompt`), which must have its shape.

    Raises:
        CheckpointError: the saved prompt is damaged, or has another number of vectors.
    """
    weight, _ = load_prompt(directory, expect_d_model=prompt.d_model)
    if weight.shape != prompt.weight.shape:
        raise CheckpointError(
            f"the prompt in {directory} has {weight.shape[0]} vectors, the run trains {prompt.weight.shape[0]}"
        )
    with torch.no_grad():
        prompt.weight.copy_(weight)


def load_optimizer_state(directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Load `directory`'s optimizer and schedule state (a weights-only pickle) into the live objects.

    Raises:
        CheckpointError: the file is missing, unsafe, damaged or from another run.
    """
    refuse_pickles(directory, OPTIMIZER_STATE)
    saved = torch_load_safe(directory / OPTIMIZER_STATE)
    if not isinstance(saved, dict) or not {"optimizer", "scheduler"} <= set(saved):
        raise CheckpointError(f"{directory / OPTIMIZER_STATE} is damaged (no optimizer and scheduler state)")
    load_into(optimizer, saved["optimizer"], directory / OPTIMIZER_STATE)
    load_into(scheduler, saved["scheduler"], directory / OPTIMIZER_STATE)


def load_torch_rng(directory: Path, env: DistEnv) -> None:
    """Restore this rank's torch RNG streams (CPU, and CUDA where there is one) from `directory`.

    Raises:
        CheckpointError: the rank's RNG file is missing or damaged.
    """
    path = directory / rng_file(env.rank)
    rng = load_tensors(path)
    if "torch_cpu" not in rng:
        raise CheckpointError(f"{path} is damaged (no torch_cpu state)")
    try:
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"], env.device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged ({e})") from None


def python_rng_state() -> list[Any]:
    """Python's `random` state as JSON can hold it (tuples as lists), for `TrainerState.python_rng`."""

    def jsonable(obj: Any) -> Any:
        return [jsonable(o) for o in obj] if isinstance(obj, tuple | list) else obj

    return jsonable(random.getstate())


def restore_python_rng(state: TrainerState, directory: Path) -> None:
    """Put back the Python `random` state a checkpoint's trainer state holds (none: left as it is).

    Raises:
        CheckpointError: the recorded state is damaged.
    """
    if state.python_rng:
        try:
            v, internal, gauss = state.python_rng
            random.setstate((v, tuple(internal), gauss))
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"{directory / rundir.TRAINER_STATE} is damaged (python_rng: {e})"
            ) from None


def load_into(obj: Any, state: Any, path: Path) -> None:
    """`obj.load_state_dict(state)`, with a state that does not fit reported as a damaged `path`."""
    try:
        obj.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        raise CheckpointError(
            f"{path} is damaged or belongs to another run ({type(e).__name__}: {e})"
        ) from None


def restore_checkpoint(
    directory: Path,
    model: PromptedT5,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    env: DistEnv,
    fsdp: bool,
) -> TrainerState:
    """Load a checkpoint written by `save_checkpoint` back into the live objects (every rank)."""
    directory = directory.resolve()
    state = rundir.read_trainer_state(directory)
    load_train_state(directory, model, optimizer, scheduler, env, fsdp=fsdp)
    restore_python_rng(state, directory)
    return state
