"""The parts of the training step that the single-prompt and the multi-prompt setup build alike from a
run's config: its optimizer and schedule, what the loop calls under --compile, and its batches' padding."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from softprompt.data.batching import Collator
from softprompt.modeling import compiled
from softprompt.modeling.model import PromptedT5
from softprompt.modeling.optim import build_optimizer
from softprompt.runtime.distributed import DistEnv
from softprompt.training.config import TrainConfig


def run_optimizer(
    cfg: TrainConfig, params: Any, max_steps: int, initial_step: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The run's optimizer and schedule over `params` (the trainable parameters, or one group per prompt)."""
    return build_optimizer(
        cfg.optimizer,
        params,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        total_steps=max_steps,
        initial_step=initial_step,
    )


def run_compiled(cfg: TrainConfig, env: DistEnv, model: PromptedT5, engine: nn.Module) -> nn.Module:
    """What the loop calls under --compile: the model's lean training forward compiled (CUDA graphs on a GPU,
    `modeling.compiled`) where the lean path trains it, else the whole wrapped model under `torch.compile`.

    Args:
        cfg: the run's config (`compile`).
        env: where it runs.
        model: the unwrapped model (the frozen model under a stack of prompts).
        engine: the model as wrapped for the run (DDP, FSDP or itself).

    Returns:
        The engine the loop calls: `engine` itself, or `engine` compiled.
    """
    if not cfg.compile or model.compile_training_forward(env.device):
        return engine
    return torch.compile(engine)


def run_collator(cfg: TrainConfig, env: DistEnv, tokenizer: Any) -> Collator:
    """The training batches' padding: to each batch's longest row, or under --compile on a GPU up to the
    next length bucket (`modeling.compiled.SOURCE_MULTIPLE`, `TARGET_MULTIPLE`), so that a few CUDA graphs
    cover every batch (padding changes no loss: padded positions are masked, padded labels ignored)."""
    if cfg.compile and env.device.type == "cuda":
        return Collator(
            pad_token_id=tokenizer.pad_token_id,
            pad_to_multiple_of=compiled.SOURCE_MULTIPLE,
            target_multiple_of=compiled.TARGET_MULTIPLE,
        )
    return Collator(pad_token_id=tokenizer.pad_token_id)
