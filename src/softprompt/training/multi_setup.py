"""Setup of a multi-prompt run: K soft prompts on one frozen model, each with its own data and state.

`setup_multi` loads the model once and, for each `PromptSpec` (`softprompt.training.prompts`), does what
a single-prompt run's setup does with that prompt's own config: its task, data, tokenized features,
initial prompt and sampler (seeded with the prompt's seed). Each prompt is its own `SoftPrompt`
(its own `nn.Parameter`), so the one optimizer keeps separate state per prompt, with one parameter
group per prompt carrying that prompt's lr. The result is a `MultiRun`: the shared parts, and one
`softprompt.training.setup.Run` per prompt (`MultiRun.slots`) whose model is a `PromptedT5` view of the
shared frozen T5 with that prompt, so evaluation, best/<name>/ and model cards are a single run's own.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from softprompt.data.batching import Collator
from softprompt.io import checkpoint as ckpt
from softprompt.io import rundir
from softprompt.io.rundir import TrainerState
from softprompt.modeling.model import PromptedT5, load_tokenizer
from softprompt.modeling.prompt import SoftPrompt
from softprompt.runtime.distributed import DistEnv, shard_fsdp, wrap_ddp
from softprompt.tasks.resolve import resolve_task
from softprompt.training.config import (
    BatchPlan,
    TrainConfig,
    resolve_initial_step,
    with_mode_defaults,
)
from softprompt.training.multi_state import restore_multi
from softprompt.training.prompts import PromptSpec, prompt_specs
from softprompt.training.setup import (
    Run,
    build_prompt,
    build_sampler,
    check_resume_settings,
    claim_output_dir,
    find_resume_point,
    frozen_model,
    init_labels,
    load_base_t5,
    load_data,
    record_config,
    refuse_fsdp_without_group,
    run_logger,
    tokenize_data,
    with_defaults,
)
from softprompt.training.step_parts import run_collator, run_compiled, run_optimizer
from softprompt.training.tracking import MetricsLogger


class PromptStack(nn.Module):
    """The frozen prompted T5 and the K prompts that share it; `forward` runs a mixed batch.

    Args:
        model: the frozen `PromptedT5` (built without a prompt of its own).
        prompts: the K prompts, each its own parameter, possibly of different lengths.
    """

    def __init__(self, model: PromptedT5, prompts: list[SoftPrompt]) -> None:
        super().__init__()
        self.model = model
        self.prompts = nn.ModuleList(prompts)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """Each row's token losses under its own prompt.

        Args:
            input_ids: [B, S].
            attention_mask: [B, S].
            labels: [B, T], -100 where padded.
            rows: [B] each row's prompt index.

        Returns:
            [B * T] token cross-entropies (0 where padded), flat as the model returns them: a view of
            them as [B, T] would be the output of FSDP's root unit, whose backward hook an in-place op on
            a view loses (FSDP warns), so the caller shapes them. A prompt's gradient comes only from its
            rows.
        """
        weights = [p.weight for p in self.prompts]
        p_max = max(w.shape[0] for w in weights)
        # Padded at the end; `join_prompt` masks the padding and puts each row's text right after its
        # own prompt, so a row sees what it would see in a batch of its prompt alone.
        table = torch.stack([F.pad(w, (0, 0, 0, p_max - w.shape[0])) for w in weights])
        lengths = None
        if any(w.shape[0] != p_max for w in weights):
            lengths = torch.tensor([w.shape[0] for w in weights], device=table.device)
        losses = self.model(
            input_ids,
            attention_mask,
            labels,
            reduction="none",
            prompt=table,
            prompt_lengths=lengths,
            prompt_rows=rows,
        )
        return losses


@dataclass
class MultiRun:
    """Everything `setup_multi` builds and the multi-prompt loop uses."""

    cfg: TrainConfig
    env: DistEnv
    plan: BatchPlan  # per prompt: every prompt draws plan.global_batch examples a step
    out: Path
    stack: PromptStack  # unwrapped (under --fsdp the sharded root itself)
    engine: nn.Module  # what the loop calls: DDP-wrapped, or the stack itself (alone, or FSDP-sharded)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    slots: list[Run]  # one per prompt: its config, task, data, sampler, state and model view
    names: list[str]
    collate: Collator
    max_steps: int
    initial_step: int
    logger: MetricsLogger
    state: TrainerState  # the run's: step, time, examples; each prompt's own in its slot
    bf16: bool
    lock: rundir.RunLock | None = None


def setup_multi(cfg: TrainConfig, env: DistEnv) -> MultiRun:
    """Check the prompts (before anything loads), claim the run directory, and build the run.

    Returns:
        The run, holding the directory's lock until the caller releases it.

    Raises:
        ConfigError: one line naming every bad entry (duplicate names, missing data, other widths, ...).
    """
    cfg = with_defaults(cfg)
    resumed_changes = check_resume_settings(cfg)
    specs, plan = prompt_specs(cfg, env.world_size)
    refuse_fsdp_without_group(cfg, env)
    ckpt.refuse_non_model(cfg.model_name_or_path)
    lock = claim_output_dir(cfg, env)
    try:
        return _build(cfg, env, plan, specs, lock, resumed_changes)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _slot_parts(
    cfg: TrainConfig, env: DistEnv, plan: BatchPlan, tokenizer: Any, t5: nn.Module
) -> tuple[Any, list[Any], list[Any], list[Any], list[Any], SoftPrompt, Any, int, int, Counter]:
    """What a single-prompt run with `cfg` builds for its prompt: task, data, features, prompt, sampler."""
    stats: Counter = Counter()
    task = resolve_task(cfg, punctuation=cfg.punctuation)
    train_examples, eval_examples = load_data(cfg, task, stats)
    train_features, eval_features = tokenize_data(cfg, task, tokenizer, train_examples, eval_examples)
    prompt = build_prompt(cfg, env, t5, tokenizer, init_labels(cfg, task))
    sampler, steps_per_epoch, max_steps = build_sampler(cfg, plan, env, train_features)
    return (
        task,
        train_examples,
        eval_examples,
        train_features,
        eval_features,
        prompt,
        sampler,
        steps_per_epoch,
        max_steps,
        stats,
    )


def _build_stack(
    cfg: TrainConfig, env: DistEnv, t5: nn.Module, prompts: list[SoftPrompt]
) -> tuple[PromptedT5, PromptStack, nn.Module]:
    """The frozen prompted T5 (no prompt of its own), the stack of prompts on it, and what the loop calls.

    Under --fsdp the stack is sharded as a single run's model is: each T5 block a unit, and the stack the
    root unit, which holds the embeddings, the final norms and every prompt, each sharded by rows across
    the ranks alike. The optimizer, built afterwards, then holds each prompt's shard (one group per prompt).
    """
    base = frozen_model(cfg, env, t5)
    stack = PromptStack(base, prompts).to(env.device)
    stack.train()
    if cfg.fsdp:
        engine = shard_fsdp(stack, env, bf16=cfg.precision == "bf16", t5=base.model)
    else:
        engine = wrap_ddp(stack, env)
    return base, stack, run_compiled(cfg, env, base, engine)


def _build(
    cfg: TrainConfig,
    env: DistEnv,
    plan: BatchPlan,
    specs: list[PromptSpec],
    lock: rundir.RunLock | None,
    resumed_changes: dict[str, tuple[Any, Any]],
) -> MultiRun:
    """The model once, then each prompt's parts, the optimizer, the restored state and the logger."""
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    t5 = load_base_t5(cfg)
    slot_cfgs = [with_mode_defaults(s.cfg) for s in specs]  # each prompt's own lr and P, resolved once
    parts = [_slot_parts(c, env, plan, tokenizer, t5) for c in slot_cfgs]
    base, stack, engine = _build_stack(cfg, env, t5, [p[5] for p in parts])
    # --max_steps is shared; --epochs counts the passes of the prompt with the most steps per epoch.
    max_steps = max(p[8] for p in parts)
    initial_step = resolve_initial_step(cfg)
    groups = [{"params": [p.weight], "lr": c.lr} for c, p in zip(slot_cfgs, stack.prompts, strict=True)]
    optimizer, scheduler = run_optimizer(cfg, groups, max_steps, initial_step)
    torch.manual_seed(cfg.seed + env.rank)  # each rank its own dropout stream, as a single run
    state, slot_states = TrainerState(), [TrainerState() for _ in specs]
    resume_from = find_resume_point(out, env) if cfg.resume else None
    if resume_from is not None:
        state, slot_states = restore_multi(
            resume_from, stack, optimizer, scheduler, env, [s.name for s in specs], fsdp=cfg.fsdp
        )
        initial_step = int(optimizer.param_groups[0].get("initial_step", initial_step))
    record_config(cfg, env, out, resumed=resume_from is not None, changes=resumed_changes)
    logger = run_logger(cfg, env, out, state, max_steps)
    fingerprint = None if cfg.random_init else ckpt.model_fingerprint(cfg.model_name_or_path)
    collate = run_collator(cfg, env, tokenizer)
    slots = []
    for slot_cfg, part, slot_state in zip(slot_cfgs, parts, slot_states, strict=True):
        task, _, eval_examples, train_features, eval_features, prompt, sampler, spe, _, _ = part
        view = base.with_prompt(prompt)
        slots.append(
            Run(
                cfg=slot_cfg,
                env=env,
                plan=plan,
                out=out,
                tokenizer=tokenizer,
                model=view,
                engine=engine,
                optimizer=optimizer,
                scheduler=scheduler,
                train_features=train_features,
                sampler=sampler,
                eval_examples=eval_examples,
                eval_features=eval_features,
                collate=collate,
                max_steps=max_steps,
                steps_per_epoch=spe,
                initial_step=initial_step,
                logger=logger,
                state=slot_state,
                bf16=cfg.precision == "bf16",
                base_fingerprint=fingerprint,
                # The model was built once with the run's seed; a prompt's own seed only seeds its init.
                random_init_seed=cfg.seed if cfg.random_init else None,
                task=task,
            )
        )
    run = MultiRun(
        cfg=cfg,
        env=env,
        plan=plan,
        out=out,
        stack=stack,
        engine=engine,
        optimizer=optimizer,
        scheduler=scheduler,
        slots=slots,
        names=[s.name for s in specs],
        collate=collate,
        max_steps=max_steps,
        initial_step=initial_step,
        logger=logger,
        state=state,
        bf16=cfg.precision == "bf16",
        lock=lock,
    )
    _announce(run, parts, resumed_changes)
    return run


def _announce(
    run: MultiRun, parts: list[tuple[Any, ...]], resumed_changes: dict[str, tuple[Any, Any]]
) -> None:
    """Log the start event and print one line for the run and one per prompt."""
    cfg, plan, env = run.cfg, run.plan, run.env
    if resumed_changes:
        run.logger.log(
            "resume",
            run.state.step,
            changed={k: {"from": a, "to": b} for k, (a, b) in resumed_changes.items()},
        )
    prompts = {
        name: {
            "task": slot.task.name,
            "n_tokens": slot.cfg.n_tokens,
            "seed": slot.cfg.seed,
            "lr": slot.cfg.lr,
            "train_examples": len(part[1]),
            "eval_examples": len(slot.eval_examples),
            "skipped_examples": dict(part[9]),
        }
        for name, slot, part in zip(run.names, run.slots, parts, strict=True)
    }
    n_trainable = sum(p.numel() for p in run.stack.parameters() if p.requires_grad)
    run.logger.log(
        "start",
        run.state.step,
        mode="prompt tuning",
        trainable_parameters=n_trainable,
        global_batch_size=plan.global_batch,
        per_device_batch_size=plan.per_device,
        grad_accum_steps=plan.grad_accum,
        world_size=env.world_size,
        max_steps=run.max_steps,
        initial_step=run.initial_step,
        resumed=cfg.resume and run.state.step > 0,
        prompts=prompts,
    )
    if not env.is_main:
        return
    print(
        f"softprompt: prompt tuning of {len(run.slots)} prompts on one frozen {cfg.model_name_or_path} "
        f"({n_trainable:,} trainable parameters) with {cfg.optimizer}; global batch {plan.global_batch} per prompt "
        f"= {plan.per_device} per device x {env.world_size} device(s) x {plan.grad_accum} accumulation; "
        f"{run.max_steps:,} steps",
        flush=True,
    )
    for name, info in prompts.items():
        print(
            f"softprompt:   {name}: {info['task']}, {info['n_tokens']} tokens, seed {info['seed']}, lr {info['lr']:g}, "
            f"{info['train_examples']:,} train / {info['eval_examples']:,} dev examples",
            file=sys.stdout,
            flush=True,
        )
