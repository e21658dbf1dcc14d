"""Phase one of a training run, setup: everything `train` needs before its first step.

`setup` validates the config, claims the run directory, loads and tokenizes the data, builds the
model, its sampler and optimizer, restores the newest checkpoint on --resume, and announces the run;
it returns a `Run`, which the other phases (`softprompt.training.loop`, `.evaluation`, `.saving`) share.
`Run.task` is the run's `softprompt.tasks.base.Task` (SQuAD or a text task): it loads, tokenizes and
later scores the data, and no phase asks which kind it is.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softprompt import __version__
from softprompt.config.parser import read_yaml_mapping
from softprompt.data.batching import BucketBatchSampler, Collator, Features
from softprompt.data.records import HF_PREFIX
from softprompt.errors import CheckpointError, ConfigError, DataError, UserError
from softprompt.io import checkpoint as ckpt
from softprompt.io import rundir
from softprompt.io.rundir import TrainerState
from softprompt.modeling.model import PromptedT5, load_t5, load_tokenizer
from softprompt.modeling.prompt import SoftPrompt, initial_prompt
from softprompt.runtime.distributed import (
    DistEnv,
    barrier,
    broadcast_object,
    gather_objects,
    shard_fsdp,
    wrap_ddp,
)
from softprompt.tasks.base import Task
from softprompt.tasks.resolve import resolve_task
from softprompt.tasks.squad.qa_task import SquadTask
from softprompt.training.config import (
    BatchPlan,
    TrainConfig,
    resolve_initial_step,
    resume_changes,
    save_yaml_config,
    validate,
    with_mode_defaults,
)
from softprompt.training.state import restore_checkpoint
from softprompt.training.step_parts import run_collator, run_compiled, run_optimizer
from softprompt.training.tracking import MetricsLogger

PAPER_STEPS = 30_000


@dataclass
class Run:
    """Everything `setup` builds and the loop uses."""

    cfg: TrainConfig
    env: DistEnv
    plan: BatchPlan
    out: Path
    tokenizer: Any
    model: PromptedT5  # unwrapped
    engine: nn.Module  # what the loop calls: DDP/FSDP wrapped or the model itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_features: list[Features]
    sampler: BucketBatchSampler
    eval_examples: list[Any]  # the task's examples (`Task.load`)
    eval_features: list[Features]
    collate: Collator
    max_steps: int
    steps_per_epoch: int
    initial_step: int
    logger: MetricsLogger
    state: TrainerState
    bf16: bool
    base_fingerprint: str | None = None  # what identifies the base model (`ckpt.model_fingerprint`)
    random_init_seed: int | None = None  # the seed of the base model's random weights (--random_init)
    lock: rundir.RunLock | None = None  # rank 0's lock on `out`, held for the run's whole life
    task: Task = field(default_factory=SquadTask)  # what the data is and how it is scored


def setup(cfg: TrainConfig, env: DistEnv) -> Run:
    """Validate, claim the output directory, load data and model, build optimizer and sampler, and
    restore state on --resume. The returned run holds the directory's lock (`Run.lock`) until
    `train` releases it; a setup that fails releases it itself."""
    cfg, plan, resumed_changes = _check(cfg, env)
    lock = claim_output_dir(cfg, env)
    try:
        return _build(cfg, env, plan, lock, resumed_changes)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(
    cfg: TrainConfig,
    env: DistEnv,
    plan: BatchPlan,
    lock: rundir.RunLock | None,
    resumed_changes: dict[str, tuple[Any, Any]],
) -> Run:
    """Everything after the directory is claimed: data, model, sampler, optimizer, restored state, logger."""
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    stats: Counter = Counter()
    task = resolve_task(cfg, punctuation=cfg.punctuation)
    train_examples, eval_examples = load_data(cfg, task, stats)
    train_features, eval_features = tokenize_data(cfg, task, tokenizer, train_examples, eval_examples)
    model = _build_model(cfg, env, tokenizer, task)
    engine = shard_fsdp(model, env, bf16=cfg.precision == "bf16") if cfg.fsdp else wrap_ddp(model, env)
    engine = run_compiled(cfg, env, model, engine)
    sampler, steps_per_epoch, max_steps = build_sampler(cfg, plan, env, train_features)
    # Adafactor continues the starting checkpoint's step count, as T5X does (see TrainConfig.initial_step).
    initial_step = resolve_initial_step(cfg)
    optimizer, scheduler = run_optimizer(cfg, model.trainable_parameters(), max_steps, initial_step)
    # Every rank its own dropout stream, as data parallelism should (the model and prompt above were
    # seeded alike on every rank). Rank 0 keeps the seed, so one process draws what it always drew;
    # hence DDP equals gradient accumulation exactly only with --dropout 0. --resume restores each
    # rank's saved stream over this.
    torch.manual_seed(cfg.seed + env.rank)
    state, initial_step = _resume_or_start(
        cfg, env, out, model, optimizer, scheduler, initial_step, resumed_changes
    )
    run = Run(
        cfg=cfg,
        env=env,
        plan=plan,
        out=out,
        tokenizer=tokenizer,
        model=model,
        engine=engine,
        optimizer=optimizer,
        scheduler=scheduler,
        train_features=train_features,
        sampler=sampler,
        eval_examples=eval_examples,
        eval_features=eval_features,
        collate=run_collator(cfg, env, tokenizer),
        max_steps=max_steps,
        steps_per_epoch=steps_per_epoch,
        initial_step=initial_step,
        logger=run_logger(cfg, env, out, state, max_steps),
        state=state,
        bf16=cfg.precision == "bf16",
        base_fingerprint=None if cfg.random_init else ckpt.model_fingerprint(cfg.model_name_or_path),
        random_init_seed=cfg.seed if cfg.random_init else None,
        lock=lock,
        task=task,
    )
    _announce(run, len(train_examples), stats, resumed_changes)
    return run


def run_logger(
    cfg: TrainConfig, env: DistEnv, out: Path, state: TrainerState, max_steps: int
) -> MetricsLogger:
    """metrics.jsonl (and --report_to) of a run that starts, or resumes, at `state`."""
    return MetricsLogger(
        out,
        report_to=cfg.report_to,
        is_main_process=env.is_main,
        run_config=cfg.to_dict(),
        resume_step=state.step if cfg.resume else None,  # a resume without a checkpoint restarts at 0
        redo=logged_again(state, max_steps),  # what the loop logs again at the resume step
    )


def _check(cfg: TrainConfig, env: DistEnv) -> tuple[TrainConfig, BatchPlan, dict[str, tuple[Any, Any]]]:
    """Everything that can be refused before any work: the config, the resume's changes, the model path."""
    cfg = with_defaults(cfg)
    plan = validate(cfg, env.world_size)
    refuse_fsdp_without_group(cfg, env)
    resumed_changes = check_resume_settings(cfg)
    ckpt.refuse_non_model(cfg.model_name_or_path)
    return cfg, plan, resumed_changes


def refuse_fsdp_without_group(cfg: TrainConfig, env: DistEnv) -> None:
    """Refuse --fsdp outside a torchrun job: FSDP shards over a process group, which only torchrun starts.

    Raises:
        ConfigError: --fsdp in a plain process.
    """
    if cfg.fsdp and not env.distributed:
        raise ConfigError(
            "--fsdp shards the model over the ranks of a torchrun job; launch with torchrun "
            "(`torchrun --nproc_per_node N -m softprompt train ...`, N = 1 works too) or drop --fsdp"
        )


def with_defaults(cfg: TrainConfig) -> TrainConfig:
    """The config with its unset (None) settings filled: on --resume from the run's config.yaml first
    (`with_saved_settings`), then with the mode's defaults (`with_mode_defaults`: lr, n_tokens). In that
    order: the mode's defaults first would make a resume's unset lr 0.3 instead of the run's own."""
    return with_mode_defaults(with_saved_settings(cfg))


def with_saved_settings(cfg: TrainConfig) -> TrainConfig:
    """On --resume: the config with its unset (None) settings taken from the run's config.yaml.

    A library caller's TrainConfig(resume=True, ...) leaves what it does not mention at None ("the
    default"); on a resume that means the run's own value, as `softprompt train --resume` reads it.
    """
    saved_file = Path(cfg.output_dir) / rundir.CONFIG_FILE
    if not cfg.resume or not saved_file.is_file():
        return cfg
    saved = read_yaml_mapping(saved_file)
    unset = {
        f.name: saved[f.name]
        for f in dataclasses.fields(cfg)
        if f.default is None and getattr(cfg, f.name) is None and saved.get(f.name) is not None
    }
    return dataclasses.replace(cfg, **unset) if unset else cfg


def check_resume_settings(cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """On --resume: the settings of a config (its unset ones already filled, `with_defaults`) changed
    against the run's config.yaml, as {name: (saved, new)}; refuse those a resume cannot honour."""
    saved_file = Path(cfg.output_dir) / rundir.CONFIG_FILE
    if not cfg.resume or not saved_file.is_file():
        return {}
    saved = read_yaml_mapping(saved_file)
    allowed, refused = resume_changes(saved, cfg)
    if refused:
        raise ConfigError(
            f"--resume cannot change {', '.join(refused)}: the run in {cfg.output_dir} was trained with the "
            "saved values; drop those flags, or start a new run in another --output_dir"
        )
    return allowed


def claim_output_dir(cfg: TrainConfig, env: DistEnv) -> rundir.RunLock | None:
    """Rank 0 takes the run directory's lock for the run's whole life, then tidies the directory;
    every rank learns whether it could (one writer per run directory, see softprompt.io.rundir).

    Returns:
        The lock on rank 0, None on the other ranks.
    """
    out = Path(cfg.output_dir)
    lock, refusal = None, None
    if env.is_main:
        try:
            lock = rundir.lock(out)
            rundir.prepare(out, overwrite=cfg.overwrite_output_dir and not cfg.resume)
        except rundir.RunDirBusy as e:
            refusal = str(e)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    refusal = broadcast_object(refusal, env)
    if refusal is not None:
        raise rundir.RunDirBusy(refusal)
    barrier(env)
    return lock


def _load_split(cfg: TrainConfig, task: Task, which: str, stats: Counter) -> list[Any]:
    split = cfg.train_split if which == "train" else cfg.validation_split
    path = cfg.train_file if which == "train" else cfg.validation_file
    if cfg.dataset_name is not None:
        path = HF_PREFIX + cfg.dataset_name
    elif path is None and (cfg.train_file is not None or not task.has_own_dataset):
        return []  # files without a dev file: no dev set (no files at all: the task's own dataset)
    examples = task.load(
        path,
        split=split,
        config=cfg.dataset_config,
        for_training=which == "train",
        skip_bad=cfg.skip_bad_examples,
        stats=stats,
    )
    unscored = task.unscored_reason(examples, path or task.name) if which != "train" else None
    if unscored:
        # The dev set chooses the best checkpoint by its score: an unlabelled one cannot.
        raise DataError(f"{unscored}; the dev set (--validation_file) needs labels")
    return examples


def load_data(cfg: TrainConfig, task: Task, stats: Counter) -> tuple[list[Any], list[Any]]:
    """The train and dev examples, cut to --max_train_samples / --max_eval_samples."""
    train_examples = _load_split(cfg, task, "train", stats)
    if cfg.max_train_samples is not None:
        train_examples = train_examples[: cfg.max_train_samples]
    eval_examples = _load_split(cfg, task, "validation", stats)
    if cfg.max_eval_samples is not None:
        eval_examples = eval_examples[: cfg.max_eval_samples]
    if not train_examples:
        raise UserError("the training data holds no usable examples; check --train_file / --dataset_name")
    return train_examples, eval_examples


def tokenize_data(
    cfg: TrainConfig, task: Task, tokenizer: Any, train_examples: list[Any], eval_examples: list[Any]
) -> tuple[list[Features], list[Features]]:
    lengths = dict(max_source_length=cfg.max_source_length, max_target_length=cfg.max_target_length)
    train_features = task.tokenize(train_examples, tokenizer, for_training=True, **lengths)
    return train_features, task.tokenize(eval_examples, tokenizer, **lengths)


def set_dropout(model: nn.Module, rate: float) -> None:
    model.config.dropout_rate = rate
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = rate
        elif isinstance(getattr(m, "dropout", None), float):  # T5Attention keeps its own probability dropout
            m.dropout = rate


def load_base_t5(cfg: TrainConfig) -> nn.Module:
    """The run's T5 (random weights seeded by --seed under --random_init), with --dropout applied."""
    t5 = load_t5(
        cfg.model_name_or_path,
        random_init=cfg.random_init,
        seed=cfg.seed,
        attn_implementation=cfg.attn_implementation,
    )
    if cfg.dropout is not None:
        set_dropout(t5, cfg.dropout)
    return t5


def _build_model(cfg: TrainConfig, env: DistEnv, tokenizer: Any, task: Task) -> PromptedT5:
    """The T5 (with --dropout applied) and, in prompt mode, its initialised prompt, on this rank's device."""
    t5 = load_base_t5(cfg)
    prompt = build_prompt(cfg, env, t5, tokenizer, init_labels(cfg, task)) if cfg.prompt_tuning else None
    model = PromptedT5(t5, prompt, fast_path=cfg.fast_path).to(env.device)
    if cfg.precision == "bf16" and cfg.prompt_tuning and not cfg.fsdp and cfg.bf16_weights:
        # No model weight trains, so keep the matmul weights in bf16 once instead of casting them every
        # step: the same numbers as autocast (tested), half the weight memory, 0.7x peak GPU memory.
        model.freeze_to(torch.bfloat16)
    model.train()
    return model


def frozen_model(cfg: TrainConfig, env: DistEnv, t5: nn.Module) -> PromptedT5:
    """The frozen T5 of a multi-prompt run, with no prompt of its own (`PromptedT5.with_prompt` gives each
    prompt's view of it), on this rank's device, its weights in bf16 as `_build_model` keeps them."""
    # Under --fsdp the FSDP root is the stack of prompts around this model, so the model cannot tell it is
    # sharded (a sharded `PromptedT5` of a single run can); the lean T5 would read the blocks' shards
    # outside their forward hooks, so it stays off, as it is for any sharded model.
    model = PromptedT5(t5, None, fast_path=cfg.fast_path and not cfg.fsdp)
    model.model.requires_grad_(False)
    model = model.to(env.device)
    if cfg.precision == "bf16" and not cfg.fsdp and cfg.bf16_weights:
        model.freeze_to(torch.bfloat16)
    return model


def init_labels(cfg: TrainConfig, task: Task) -> list[str]:
    """The class labels that start the prompt under --prompt_init class_label: --prompt_init_labels, else
    the task's label strings."""
    if cfg.prompt_init != "class_label" or cfg.prompt_init_labels:
        return list(cfg.prompt_init_labels)
    return list(task.classes)


def build_prompt(
    cfg: TrainConfig, env: DistEnv, t5: nn.Module, tokenizer: Any, labels: list[str]
) -> SoftPrompt:
    prompt = SoftPrompt(cfg.n_tokens, t5.config.d_model)
    with torch.no_grad():
        prompt.weight.copy_(
            initial_prompt(
                cfg.prompt_init,
                cfg.n_tokens,
                t5.get_input_embeddings().weight,
                seed=cfg.seed,
                text=cfg.prompt_init_text,
                tokenizer=tokenizer,
                path=cfg.prompt_init_file,
                labels=labels,
            )
        )
    if cfg.prompt_init == "from_file" and cfg.prompt_init_file and env.is_main and not cfg.random_init:
        # Starting from another model's prompt (prompt transfer) is allowed, but rarely meant.
        source_config = ckpt.load_prompt_config(cfg.prompt_init_file)
        source = source_config.base_model
        recorded = source_config.extra.get("base_model_fingerprint")
        if not ckpt.same_model(source, cfg.model_name_or_path, recorded):
            print(
                f"softprompt: warning: the initial prompt in {cfg.prompt_init_file} was trained for {source}, "
                f"not {cfg.model_name_or_path}; training starts from it anyway",
                file=sys.stderr,
                flush=True,
            )
    return prompt


def build_sampler(
    cfg: TrainConfig, plan: BatchPlan, env: DistEnv, train_features: list[Features]
) -> tuple[BucketBatchSampler, int, int]:
    """The sampler, the steps in an epoch, and the steps of the run."""
    # Each rank's slice of a global batch holds per_device x grad_accum examples; the global batches
    # themselves do not depend on how they are split, so 2 devices x 2 == 1 device x 2 x 2 accumulation.
    sampler = BucketBatchSampler(
        [len(f.input_ids) for f in train_features],
        plan.per_device * plan.grad_accum,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
        mega_batch_mult=50 if cfg.bucket_by_length else 1,
    )
    steps_per_epoch = len(sampler)
    if cfg.max_steps is not None:
        max_steps = cfg.max_steps
    elif cfg.epochs is not None:
        max_steps = math.ceil(cfg.epochs * steps_per_epoch)
    else:
        max_steps = PAPER_STEPS
    return sampler, steps_per_epoch, max_steps


def _resume_or_start(
    cfg: TrainConfig,
    env: DistEnv,
    out: Path,
    model: PromptedT5,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    initial_step: int,
    resumed_changes: dict[str, tuple[Any, Any]],
) -> tuple[TrainerState, int]:
    """On --resume, restore the newest checkpoint that verifies; record config.yaml when it is new or changed.

    Returns:
        The trainer state to continue from, and the Adafactor step counter the run began with.
    """
    state = TrainerState()
    candidates = _resume_candidates(out, env) if cfg.resume else []
    resume_from = None
    for i, (directory, verified) in enumerate(candidates):
        # Every rank tries; all fall back together when any rank's files of an unverified one are bad.
        error = None
        try:
            state = restore_checkpoint(directory, model, optimizer, scheduler, env, cfg.fsdp)
        except CheckpointError as e:
            error = str(e)
        failed = next((e for e in gather_objects(error, env) if e), None)
        if failed is None:
            resume_from = directory
            break
        if verified or i == len(candidates) - 1:
            raise CheckpointError(failed)
        if env.is_main:
            print(
                f"softprompt: skipped {directory.name} (no manifest, and it does not load: {failed}); "
                f"resuming from {candidates[i + 1][0].name}",
                file=sys.stderr,
                flush=True,
            )
    if resume_from is not None:
        # The counter the run began with travels in the optimizer state (0 for checkpoints older than it).
        initial_step = int(optimizer.param_groups[0].get("initial_step", initial_step))
    record_config(cfg, env, out, resumed=resume_from is not None, changes=resumed_changes)
    return state, initial_step


def record_config(
    cfg: TrainConfig, env: DistEnv, out: Path, *, resumed: bool, changes: dict[str, tuple[Any, Any]]
) -> None:
    """Write config.yaml (rank 0) for a new run, or for a resume that changed allowed settings, so that it
    says what the run now does."""
    if env.is_main and (not resumed or changes):
        save_yaml_config(
            cfg,
            out / rundir.CONFIG_FILE,
            header=f"# softprompt {__version__}: the resolved config of this run\n",
        )


def find_resume_point(out: Path, env: DistEnv) -> Path | None:
    """The newest checkpoint that verifies, for a multi-prompt run (every rank learns it)."""
    return next((directory for directory, verified in _resume_candidates(out, env) if verified), None)


def logged_again(state: TrainerState, max_steps: int) -> tuple[str, ...]:
    """The events a run resumed at `state.step` logs again at that step (`train_loop`, `multi_train_loop`):
    the evaluation its checkpoint was written before, and at the end the final evaluation and `end`."""
    if state.step >= max_steps:
        return ("eval", "end")
    return ("end",) if state.last_eval_step == state.step else ("eval", "end")


def _resume_candidates(out: Path, env: DistEnv) -> list[tuple[Path, bool]]:
    """Rank 0 lists the checkpoints to try, newest first, with whether each verified (saying which damaged
    ones it skipped); every rank learns them."""
    answer: tuple[list[tuple[str, bool]], str | None] = ([], None)
    if env.is_main:
        try:
            found, skipped = rundir.resume_candidates(out)
            answer = ([(str(p), v.status == "ok") for p, v in found], None)
            if skipped:
                print(
                    f"softprompt: skipped damaged {'; '.join(skipped)}; resuming from {found[0][0].name}",
                    file=sys.stderr,
                    flush=True,
                )
        except CheckpointError as e:
            answer = ([], str(e))
    found, refusal = broadcast_object(answer, env)
    if refusal is not None:
        raise CheckpointError(refusal)
    return [(Path(p), verified) for p, verified in found]


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _announce(run: Run, n_examples: int, stats: Counter, resumed_changes: dict[str, tuple[Any, Any]]) -> None:
    """Log the start event and print, before any work, what this run will do."""
    cfg, plan, env, state = run.cfg, run.plan, run.env, run.state
    mode = "prompt tuning" if cfg.prompt_tuning else "full fine-tuning"
    if resumed_changes:
        run.logger.log(
            "resume", state.step, changed={k: {"from": a, "to": b} for k, (a, b) in resumed_changes.items()}
        )
    n_trainable = sum(p.numel() for p in run.model.trainable_parameters())
    run.logger.log(
        "start",
        state.step,
        mode=mode,
        trainable_parameters=n_trainable,
        train_examples=n_examples,
        eval_examples=len(run.eval_examples),
        global_batch_size=plan.global_batch,
        per_device_batch_size=plan.per_device,
        grad_accum_steps=plan.grad_accum,
        world_size=env.world_size,
        max_steps=run.max_steps,
        steps_per_epoch=run.steps_per_epoch,
        initial_step=run.initial_step,
        punctuation=cfg.punctuation,
        resumed=cfg.resume and state.step > 0,
        skipped_examples=dict(stats),
    )
    if not env.is_main:
        return
    what = (
        f"softprompt: {mode} of {cfg.model_name_or_path} ({n_trainable:,} trainable parameters"
        + (
            ", base model frozen"
            if cfg.prompt_tuning
            else ", every weight; pass --prompt_tuning to train a prompt"
        )
        + f") with {cfg.optimizer} at lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}"
        # T5X's Adafactor continues the checkpoint's step count: its decay depends on it.
        + (f", initial step {run.initial_step:,}" if cfg.optimizer == "adafactor" else "")
        + "; "
    )
    print(
        what
        + f"{_plural(n_examples, 'example')}; global batch {plan.global_batch} = {plan.per_device} per device x "
        + f"{env.world_size} device(s) x {plan.grad_accum} accumulation; {_plural(run.max_steps, 'step')}"
        + (f"; skipped {dict(stats)}" if stats else ""),
        flush=True,
    )
    if resumed_changes:
        changed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in resumed_changes.items())
        print(f"softprompt: resuming with changed settings: {changed} (recorded in config.yaml)", flush=True)
    if not run.eval_examples and cfg.eval_steps:
        print(
            "softprompt: no dev set (--validation_file / --dataset_name): no evaluation, no best/ checkpoint; "
            "checkpoints are still written every --save_steps",
            flush=True,
        )
