"""Everything that knows about more than one process lives here.

softprompt runs unchanged under `torchrun`: this module reads torchrun's environment, starts the
process group (NCCL on CUDA, gloo on CPU), wraps the model in DDP or FSDP2 and offers the few
collectives the trainer and evaluator need. With one process every helper is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Join the torchrun job described by the environment, or run as a single process.

    Returns:
        This process's rank, world size and device (cuda:LOCAL_RANK when CUDA is present, else cpu).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over all ranks (returns the input unchanged for one process)."""
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    """Wrap for data parallelism. DDP all-reduces only parameters that require grad, so in prompt
    mode only the [P, H] prompt gradient crosses the network."""
    if not env.distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shard_fsdp(model: nn.Module, env: DistEnv, *, bf16: bool) -> nn.Module:
    """Shard a `PromptedT5` with FSDP2: each T5 block is its own unit, then the whole.

    With bf16 the blocks compute in bf16 and reduce gradients in fp32; the sharded master weights
    (and the prompt) stay fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict[str, Any] = {"mp_policy": mp} if mp is not None else {}
    t5 = model.model  # type: ignore[attr-defined]
    for stack in (t5.encoder, t5.decoder):
        for block in stack.block:
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on non-final accumulation micro-steps."""
    if not skip:
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place, so it needs no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_max(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Max of a tensor over all ranks."""
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


# ------------------------------------------------------------------------------------- FSDP state


def fsdp_full_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Gather an FSDP-sharded model's full weights onto CPU (every rank must call).

    Args:
        model: the FSDP-sharded `PromptedT5`.
        trainable_only: gather only parameters that train (in prompt mode: just the prompt, not
            the frozen 11B model).
    """
    if trainable_only:
        return {
            name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for name, p in model.named_parameters()
            if p.requires_grad
        }
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _trainable_shards(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's shard of every trainable parameter, tied copies of one tensor kept once."""
    seen: set[int] = set()
    shards = {}
    for name, p in model.named_parameters():
        local = _local(p)
        if p.requires_grad and local.data_ptr() not in seen:
            seen.add(local.data_ptr())
            shards[name] = local
    return shards


def save_fsdp_train_state(directory, model: nn.Module, optimizer, scheduler, env: DistEnv) -> None:
    """Write a sharded checkpoint: every rank saves its own shards, as safetensors.

    Only trainable weights are saved (in prompt mode the frozen model reloads from its source).
    Resuming needs the same number of ranks; `best/` holds the gathered, unsharded weights.
    """
    import json

    from softprompt.checkpoint import save_tensors

    save_tensors(directory / f"model_rank{env.rank}.safetensors", _trainable_shards(model))
    optim = optimizer.state_dict()
    flat = {}
    for idx, st in optim["state"].items():
        for key, value in st.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tag = "dtensor" if hasattr(t, "to_local") else "tensor"
            flat[f"{idx}::{key}::{tag}"] = _local(t).detach().cpu().clone()
    save_tensors(directory / f"optimizer_rank{env.rank}.safetensors", flat)
    if env.is_main:
        (directory / "optimizer_groups.json").write_text(json.dumps(optim["param_groups"]))
        (directory / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))


def load_fsdp_train_state(directory, model: nn.Module, optimizer, scheduler, env: DistEnv) -> None:
    """Load a checkpoint written by `save_fsdp_train_state` (same number of ranks)."""
    import json

    from torch.distributed.tensor import DTensor

    from softprompt.checkpoint import load_tensors
    from softprompt.errors import CheckpointError

    saved = load_tensors(directory / f"model_rank{env.rank}.safetensors")
    with torch.no_grad():
        for name, local in _trainable_shards(model).items():
            if name not in saved or saved[name].shape != local.shape:
                raise CheckpointError(
                    f"{directory} was written by a run with another number of ranks or model; resume with the same"
                )
            local.copy_(saved[name])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict = {}
    for key, value in load_tensors(directory / f"optimizer_rank{env.rank}.safetensors").items():
        idx, name, tag = key.split("::")
        p = params[int(idx)]
        if tag == "dtensor":
            value = DTensor.from_local(
                value.to(_local(p).device), p.device_mesh, p.placements, run_check=False
            )
        elif name == "step" and value.dim() == 0 and not value.is_floating_point():
            value = int(value)
        state.setdefault(int(idx), {})[name] = value
    groups = json.loads((directory / "optimizer_groups.json").read_text())
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(json.loads((directory / "scheduler.json").read_text()))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
