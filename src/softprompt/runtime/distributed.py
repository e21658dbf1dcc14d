"""Everything that knows about more than one process lives here.

softprompt runs unchanged under `torchrun`: this module reads torchrun's environment, joins the
process group (NCCL on CUDA, gloo on CPU), wraps the model in DDP or FSDP2 and offers the few
collectives the trainer and evaluator need: `all_reduce_sum`, `all_reduce_max`, `gather_objects`,
`broadcast_object` and `barrier`. No other module calls `torch.distributed` collectives
(tests/test_distributed.py checks). Under torchrun the group is joined even with one rank, so a
1-GPU job runs every collective a 64-GPU job runs; a plain `softprompt` process joins none, and
then every helper is a no-op.

Collective tensors live on `env.device`, the device the group's one backend serves (a CUDA device
for NCCL, the CPU for gloo); the helpers move them there. A group made for both backends
(`"cpu:gloo,cuda:nccl"`) would let CPU tensors through too, but it would make a multi-node GPU job
depend on a second transport: gloo's own TCP connections between all ranks, which on clusters wired
for NCCL can pick the wrong network interface unless `GLOO_SOCKET_IFNAME` is set. One backend per
job keeps the launch as simple as torchrun's; moving a few scalars to the GPU costs nothing next to
a training step.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

TRACE_ENV = "SOFTPROMPT_TRACE_COLLECTIVES"
"""When set to a path prefix, every rank appends one line per group join, collective and group leave to
`<prefix>.rank<R>` (how the tests prove a 1-rank torchrun job really runs its collectives, and that a rank
stopped the group's threads before exiting)."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: bool = False  # in a process group (always under torchrun, even with one rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether collectives run (and the model is DDP/FSDP wrapped): a torchrun job of any size."""
        return self.group


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher that sets its environment) started this process.

    Either variable counts, so that a half-set environment fails loudly in `init_process_group`
    instead of training alone on a slice of the data.
    """
    return "RANK" in os.environ or "WORLD_SIZE" in os.environ


def init_distributed() -> DistEnv:
    """Join the torchrun job described by the environment, or run as a single process.

    Under torchrun the process group is joined whatever the world size; without torchrun's
    environment no group is made.

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
    if launched_by_torchrun() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # device_id binds NCCL to this rank's GPU at once (barriers and object collectives then need
        # no guess of the device); gloo takes none.
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=30),
            device_id=device if device.type == "cuda" else None,
        )
        _trace(
            f"init_process_group {backend} world_size={dist.get_world_size()} rank={dist.get_rank()}", rank
        )
    group = dist.is_initialized()
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device, group=group)


# The device meshes `shard_fsdp` made. Each holds the process group (DeviceMesh's `_pg_registry`), and DTensor's
# sharding caches keep every mesh alive after its model is gone: `cleanup` takes the group back from them.
_meshes: list[Any] = []


def cleanup() -> None:
    """Leave the process group, if any, and stop its background threads before this function returns.

    Call it after dropping every DDP/FSDP model and optimizer of the job: they hold the group too.

    `destroy_process_group` only unregisters the group; its backend (gloo's worker threads among it) lives
    until the last reference to it goes. A gloo worker frees each finished collective's tensors itself,
    which takes the GIL when Python already dropped them; if that happens once the interpreter is finalizing,
    Python ends the thread inside a C++ destructor and the process aborts ("terminate called without an
    active exception", SIGABRT) after a run that succeeded. So the group is released here (the models by the
    caller, the meshes below) and collected while Python still runs: its destructor joins the workers.
    """
    if not dist.is_initialized():
        return
    rank = dist.get_rank()
    dist.destroy_process_group()
    for mesh in _meshes:
        registry = getattr(mesh, "_pg_registry", None)
        if isinstance(registry, dict):
            registry.clear()
    _meshes.clear()
    gc.collect()  # FSDP's state and hooks hold the group in reference cycles
    if os.environ.get(TRACE_ENV):
        _trace(f"destroy_process_group threads_left={len(gloo_threads())}", rank)


def gloo_threads() -> list[str]:
    """The names of this process's threads that belong to a gloo process group (its workers and its transport
    loop); empty where `/proc` does not list threads (not Linux)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for tid in os.listdir(tasks):
        # OSError: the thread ended while listed.
        with contextlib.suppress(OSError), open(f"{tasks}/{tid}/comm", encoding="utf-8") as f:
            names.append(f.read().strip())
    return [n for n in names if n.startswith(("pt_gloo", "gloo_"))]


# ------------------------------------------------------------------------------------- collectives


def _trace(event: str, rank: int) -> None:
    prefix = os.environ.get(TRACE_ENV)
    if prefix:
        with open(f"{prefix}.rank{rank}", "a", encoding="utf-8") as f:
            f.write(event + "\n")


def barrier(env: DistEnv) -> None:
    """Wait until every rank gets here."""
    if env.distributed:
        _trace("barrier", env.rank)
        dist.barrier(device_ids=[env.device.index] if env.device.type == "cuda" else None)


def _all_reduce(value: torch.Tensor, env: DistEnv, op: dist.ReduceOp.RedOpType, name: str) -> torch.Tensor:
    if not env.distributed:
        return value
    _trace(name, env.rank)
    # A copy on the device the group's backend serves (NCCL refuses CPU tensors, gloo CUDA ones).
    value = value.to(env.device, copy=True)
    dist.all_reduce(value, op=op)
    return value


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over all ranks, as a new tensor on `env.device` (the input itself without a group)."""
    return _all_reduce(value, env, dist.ReduceOp.SUM, "all_reduce_sum")


def all_reduce_max(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Max of a tensor over all ranks, as a new tensor on `env.device` (the input itself without a group)."""
    return _all_reduce(value, env, dist.ReduceOp.MAX, "all_reduce_max")


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj` (any picklable value), in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    _trace("gather_objects", env.rank)
    out: list[Any] = [None] * env.world_size
    # The pickled bytes travel on the current CUDA device under NCCL, which init_distributed set.
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    _trace("broadcast_object", env.rank)
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=env.device)
    return box[0]


# ------------------------------------------------------------------------------------- wrapping


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    """Wrap for data parallelism. DDP all-reduces only parameters that require grad, so in prompt
    mode only the [P, H] prompt gradient crosses the network."""
    if not env.distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shard_fsdp(model: nn.Module, env: DistEnv, *, bf16: bool, t5: nn.Module | None = None) -> nn.Module:
    """Shard a model with FSDP2: each T5 block is its own unit, then the whole (the root unit holds the
    rest: embeddings, final norms, the prompts).

    With bf16 the blocks compute in bf16 and reduce gradients in fp32; the sharded master weights
    (and the prompts) stay fp32.

    Args:
        model: a `PromptedT5`, or a module holding one and its prompts (a multi-prompt run's stack).
        env: the distributed environment.
        bf16: compute in bf16.
        t5: the T5 whose blocks become units; default `model.model` (a `PromptedT5`'s T5).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    # One mesh over all ranks (what fully_shard would make by default), kept so `cleanup` can release its group.
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    _meshes.append(mesh)
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mp is not None:
        kwargs["mp_policy"] = mp
    t5 = t5 if t5 is not None else model.model  # type: ignore[attr-defined]
    for stack in (t5.encoder, t5.decoder):
        for block in stack.block:
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Hold an FSDP2 root unit's own weights gathered (every rank must enter), for work that bypasses its
    forward hooks: generation, or reading the prompts outside forward. Unsharded models pass through.

    The T5 blocks stay units of their own and gather their weights in their own forward, so every rank
    must run as many of them (lockstep evaluation).
    """
    if not hasattr(model, "unshard"):
        yield
        return
    # FSDP2 makes the first unit whose forward runs the root. When this pass comes before any training
    # step (a resume that evaluates first), a block would claim that role and the next training forward
    # fail ("FSDP requires running forward through the root module first"): initialise the root now, as
    # its own first forward would (a no-op once it has run).
    model._get_fsdp_state()._lazy_init()  # type: ignore[operator]
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


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


# ------------------------------------------------------------------------------------- FSDP state


def fsdp_full_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Gather an FSDP-sharded model's full weights onto CPU (every rank must call).

    Args:
        model: the FSDP-sharded `PromptedT5`.
        trainable_only: gather only parameters that train (in prompt mode: just the prompt, not
            the frozen 11B model).
    """
    if trainable_only:
        return {name: full_weight(p) for name, p in model.named_parameters() if p.requires_grad}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_weight(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value on CPU, detached: gathered from every rank when FSDP shards it (then every
    rank must call), else the tensor itself."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()


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


def fsdp_train_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict[str, Any]]]:
    """This rank's part of an FSDP run's trainable state, as flat tensors a checkpoint file can hold.

    Only trainable weights are included (in prompt mode the frozen model reloads from its source).
    Resuming needs the same number of ranks.

    Returns:
        The trainable weight shards by name, the optimizer state flattened to `"{param}::{key}::{kind}"`
        tensors, and the optimizer's param_groups (plain JSON values).
    """
    optim = optimizer.state_dict()
    flat = {}
    for idx, st in optim["state"].items():
        for key, value in st.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tag = "dtensor" if hasattr(t, "to_local") else "tensor"
            flat[f"{idx}::{key}::{tag}"] = _local(t).detach().cpu().clone()
    return _trainable_shards(model), flat, optim["param_groups"]


def load_fsdp_train_tensors(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    shards: dict[str, torch.Tensor],
    optim_flat: dict[str, torch.Tensor],
    param_groups: list[dict[str, Any]],
    *,
    where: Any,
) -> None:
    """Put what `fsdp_train_tensors` returned (on the same number of ranks) back into the live objects.

    Raises:
        CheckpointError: the tensors come from another number of ranks or another model (`where` names them).
    """
    from torch.distributed.tensor import DTensor

    from softprompt.errors import CheckpointError

    with torch.no_grad():
        for name, local in _trainable_shards(model).items():
            if name not in shards or shards[name].shape != local.shape:
                raise CheckpointError(
                    f"{where} was written by a run with another number of ranks or model; resume with the same"
                )
            local.copy_(shards[name])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict = {}
    try:
        for key, value in optim_flat.items():
            idx, name, tag = key.split("::")
            p = params[int(idx)]
            if tag == "dtensor":
                value = DTensor.from_local(
                    value.to(_local(p).device), p.device_mesh, p.placements, run_check=False
                )
            elif name == "step" and value.dim() == 0 and not value.is_floating_point():
                value = int(value)
            state.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    except (ValueError, IndexError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"the optimizer state in {where} is damaged ({type(e).__name__}: {e})"
        ) from None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
