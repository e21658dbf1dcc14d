"""The training loop, in four phases: setup -> train -> save -> cleanup.

One loop serves prompt tuning and full fine-tuning, one process or a torchrun job. Read it top to
bottom; every distributed detail is delegated to `softprompt.runtime.distributed`, the run directory (its
lock, file names, checkpoint publication and verification) to `softprompt.io.rundir`, and the formats
of the files to `softprompt.io.checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softprompt import __version__
from softprompt.data.records import (
    HF_PREFIX,
    BucketBatchSampler,
    Collator,
    Features,
    QAExample,
    load_examples,
    load_hf_dataset,
    tokenize_examples,
)
from softprompt.errors import CheckpointError, ConfigError, UserError
from softprompt.inference.engine import EvalResult, autocast, evaluate_examples
from softprompt.inference.task_eval import evaluate_texts
from softprompt.io import atomic, rundir
from softprompt.io import checkpoint as ckpt
from softprompt.io.rundir import TrainerState
from softprompt.modeling.model import PromptedT5, load_t5, load_tokenizer
from softprompt.modeling.optim import build_optimizer
from softprompt.modeling.prompt import SoftPrompt, initial_prompt
from softprompt.runtime.distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    fsdp_full_state_dict,
    init_distributed,
    no_grad_sync,
    shard_fsdp,
    wrap_ddp,
)
from softprompt.tasks.text.task import (
    TaskSpec,
    TextExample,
    load_task_examples,
    task_from_flags,
    tokenize_texts,
)
from softprompt.training.config import (
    BatchPlan,
    TrainConfig,
    read_yaml_mapping,
    resolve_initial_step,
    resume_changes,
    save_yaml_config,
    validate,
    with_mode_defaults,
)
from softprompt.training.tracking import MetricsLogger, Progress

PAPER_STEPS = 30_000


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is intact."""

    exit_code = 3


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint was saved and the run stopped cleanly."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; continue with --resume")
        self.exit_code = 128 + signum


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
    eval_examples: list[QAExample] | list[TextExample]
    eval_features: list[Features]
    collate: Collator
    max_steps: int
    steps_per_epoch: int
    initial_step: int
    logger: MetricsLogger
    state: TrainerState
    bf16: bool
    base_fingerprint: str | None = None  # what identifies the base model (`ckpt.model_fingerprint`)
    lock: rundir.RunLock | None = None  # rank 0's lock on `out`, held for the run's whole life
    task: TaskSpec | None = None  # a text task; None for SQuAD-shaped QA


# ---------------------------------------------------------------------------------------------- setup


def setup(cfg: TrainConfig, env: DistEnv) -> Run:
    """Validate, claim the output directory, load data and model, build optimizer and sampler, and
    restore state on --resume. The returned run holds the directory's lock (`Run.lock`) until
    `train` releases it; a setup that fails releases it itself."""
    cfg, plan, resumed_changes = _check(cfg, env)
    lock = _claim_output_dir(cfg, env)
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
    task = task_from_flags(cfg)
    train_examples, eval_examples = _load_data(cfg, task, stats)
    train_features, eval_features = _tokenize(cfg, task, tokenizer, train_examples, eval_examples)
    model = _build_model(cfg, env, tokenizer, task)
    engine = shard_fsdp(model, env, bf16=cfg.precision == "bf16") if cfg.fsdp else wrap_ddp(model, env)
    if cfg.compile:
        engine = torch.compile(engine)
    sampler, steps_per_epoch, max_steps = _build_sampler(cfg, plan, env, train_features)
    # Adafactor continues the starting checkpoint's step count, as T5X does (see TrainConfig.initial_step).
    initial_step = resolve_initial_step(cfg)
    optimizer, scheduler = build_optimizer(
        cfg.optimizer,
        model.trainable_parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        total_steps=max_steps,
        initial_step=initial_step,
    )
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
        collate=Collator(pad_token_id=tokenizer.pad_token_id),
        max_steps=max_steps,
        steps_per_epoch=steps_per_epoch,
        initial_step=initial_step,
        logger=MetricsLogger(
            out,
            report_to=cfg.report_to,
            is_main_process=env.is_main,
            run_config=cfg.to_dict(),
            resume_step=state.step if cfg.resume else None,  # a resume without a checkpoint restarts at 0
        ),
        state=state,
        bf16=cfg.precision == "bf16",
        base_fingerprint=None if cfg.random_init else ckpt.model_fingerprint(cfg.model_name_or_path),
        lock=lock,
        task=task,
    )
    _announce(run, len(train_examples), stats, resumed_changes)
    return run


def _check(cfg: TrainConfig, env: DistEnv) -> tuple[TrainConfig, BatchPlan, dict[str, tuple[Any, Any]]]:
    """Everything that can be refused before any work: the config, the resume's changes, the model path."""
    cfg = with_mode_defaults(cfg)
    plan = validate(cfg, env.world_size)
    if cfg.fsdp and not env.distributed:  # FSDP shards over a process group, which only torchrun starts
        raise ConfigError(
            "--fsdp shards the model over the ranks of a torchrun job; launch with torchrun "
            "(`torchrun --nproc_per_node N -m softprompt train ...`, N = 1 works too) or drop --fsdp"
        )
    cfg, resumed_changes = _check_resume_settings(cfg)
    ckpt.refuse_non_model(cfg.model_name_or_path)
    return cfg, plan, resumed_changes


def _check_resume_settings(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, tuple[Any, Any]]]:
    """On --resume: the config with its unset (None) settings taken from the run's config.yaml, and the
    settings changed against it; refuse those a resume cannot honour."""
    saved_file = Path(cfg.output_dir) / rundir.CONFIG_FILE
    if not cfg.resume or not saved_file.is_file():
        return cfg, {}
    saved = read_yaml_mapping(saved_file)
    # A library caller's TrainConfig(resume=True, ...) leaves what it does not mention at None ("the
    # default"); on a resume that means the run's own value, as `softprompt train --resume` reads it.
    unset = {
        f.name: saved[f.name]
        for f in dataclasses.fields(cfg)
        if f.default is None and getattr(cfg, f.name) is None and saved.get(f.name) is not None
    }
    if unset:
        cfg = dataclasses.replace(cfg, **unset)
    allowed, refused = resume_changes(saved, cfg)
    if refused:
        raise ConfigError(
            f"--resume cannot change {', '.join(refused)}: the run in {cfg.output_dir} was trained with the "
            "saved values; drop those flags, or start a new run in another --output_dir"
        )
    return cfg, allowed


def _claim_output_dir(cfg: TrainConfig, env: DistEnv) -> rundir.RunLock | None:
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


def _load_split(
    cfg: TrainConfig, task: TaskSpec | None, which: str, stats: Counter
) -> list[QAExample] | list[TextExample]:
    if task is not None:
        split = cfg.train_split if which == "train" else cfg.validation_split
        path = cfg.train_file if which == "train" else cfg.validation_file
        if cfg.dataset_name is not None:
            path = HF_PREFIX + cfg.dataset_name
        elif path is None and (cfg.train_file is not None or not task.dataset):
            return []  # files without a dev file: no dev set (no files at all: the task's own dataset)
        return load_task_examples(
            task,
            path,
            split=split,
            config=cfg.dataset_config,
            for_training=which == "train",
            skip_bad=cfg.skip_bad_examples,
            stats=stats,
        )
    if cfg.dataset_name is not None:
        split = cfg.train_split if which == "train" else cfg.validation_split
        return load_hf_dataset(cfg.dataset_name, split, skip_bad=cfg.skip_bad_examples, stats=stats)
    path = cfg.train_file if which == "train" else cfg.validation_file
    if path is None:
        return []
    return load_examples(path, skip_bad=cfg.skip_bad_examples, stats=stats)


def _load_data(cfg: TrainConfig, task: TaskSpec | None, stats: Counter) -> tuple[list[Any], list[Any]]:
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


def _tokenize(
    cfg: TrainConfig,
    task: TaskSpec | None,
    tokenizer: Any,
    train_examples: list[Any],
    eval_examples: list[Any],
) -> tuple[list[Features], list[Features]]:
    if task is not None:
        lengths = dict(max_source_length=cfg.max_source_length, max_target_length=cfg.max_target_length)
        train_features = tokenize_texts(train_examples, tokenizer, for_training=True, **lengths)
        return train_features, tokenize_texts(eval_examples, tokenizer, **lengths)
    kwargs = dict(
        max_source_length=cfg.max_source_length,
        max_target_length=cfg.max_target_length,
        punctuation=cfg.punctuation,
    )
    train_features = tokenize_examples(train_examples, tokenizer, **kwargs)
    eval_features = tokenize_examples(eval_examples, tokenizer, **kwargs) if eval_examples else []
    return train_features, eval_features


def _set_dropout(model: nn.Module, rate: float) -> None:
    model.config.dropout_rate = rate
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = rate
        elif isinstance(getattr(m, "dropout", None), float):  # T5Attention keeps its own probability dropout
            m.dropout = rate


def _build_model(cfg: TrainConfig, env: DistEnv, tokenizer: Any, task: TaskSpec | None = None) -> PromptedT5:
    """The T5 (with --dropout applied) and, in prompt mode, its initialised prompt, on this rank's device."""
    t5 = load_t5(
        cfg.model_name_or_path,
        random_init=cfg.random_init,
        seed=cfg.seed,
        attn_implementation=cfg.attn_implementation,
    )
    if cfg.dropout is not None:
        _set_dropout(t5, cfg.dropout)
    prompt = _build_prompt(cfg, env, t5, tokenizer, init_labels(cfg, task)) if cfg.prompt_tuning else None
    model = PromptedT5(t5, prompt, fast_path=cfg.fast_path).to(env.device)
    if cfg.precision == "bf16" and cfg.prompt_tuning and not cfg.fsdp and cfg.bf16_weights:
        # No model weight trains, so keep the matmul weights in bf16 once instead of casting them every
        # step: the same numbers as autocast (tested), half the weight memory, 0.7x peak GPU memory.
        model.freeze_to(torch.bfloat16)
    model.train()
    return model


def init_labels(cfg: TrainConfig, task: TaskSpec | None) -> list[str]:
    """The class labels that start the prompt under --prompt_init class_label: --prompt_init_labels, else
    the task's label strings."""
    if cfg.prompt_init != "class_label" or cfg.prompt_init_labels:
        return list(cfg.prompt_init_labels)
    return list(task.classes or ()) if task is not None else []


def _build_prompt(
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


def _build_sampler(
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
    resume_from = _resume_point(out, env) if cfg.resume else None
    if resume_from is not None:
        state = restore_checkpoint(resume_from, model, optimizer, scheduler, env, cfg.fsdp)
        # The counter the run began with travels in the optimizer state (0 for checkpoints older than it).
        initial_step = int(optimizer.param_groups[0].get("initial_step", initial_step))
    if env.is_main and (resume_from is None or resumed_changes):
        # A resume that changed allowed settings records them: config.yaml says what the run now does.
        save_yaml_config(
            cfg,
            out / rundir.CONFIG_FILE,
            header=f"# softprompt {__version__}: the resolved config of this run\n",
        )
    return state, initial_step


def _resume_point(out: Path, env: DistEnv) -> Path | None:
    """Rank 0 picks the newest checkpoint that verifies (saying which it skipped); every rank learns it."""
    answer: tuple[str | None, str | None] = (None, None)
    if env.is_main:
        try:
            found, skipped = rundir.resume_point(out)
            answer = (str(found) if found is not None else None, None)
            if skipped:
                print(
                    f"softprompt: skipped damaged {'; '.join(skipped)}; resuming from {found.name}",
                    file=sys.stderr,
                    flush=True,
                )
        except CheckpointError as e:
            answer = (None, str(e))
    found, refusal = broadcast_object(answer, env)
    if refusal is not None:
        raise CheckpointError(refusal)
    return Path(found) if found is not None else None


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
        + f") with {cfg.optimizer} at lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}; "
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


# ---------------------------------------------------------------------------------------------- train


class _StopFlag:
    """Turns SIGTERM/SIGINT into a request to checkpoint and stop after the current step."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for s in (signal.SIGTERM, signal.SIGINT):
            # signal() refuses outside the main thread (e.g. a test runner's worker); then no handler.
            with contextlib.suppress(ValueError):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def train_loop(run: Run) -> dict[str, Any]:
    """Optimise until max_steps, evaluating and checkpointing on schedule. Returns results.json's content."""
    cfg, env, st, plan = run.cfg, run.env, run.state, run.plan
    window_loss = window_tokens = 0.0
    window_examples, window_time = 0, 0.0
    due = cfg.eval_steps and st.step and st.step % cfg.eval_steps == 0 and st.step < run.max_steps
    if due and run.eval_examples and st.last_eval_step != st.step:
        # Stopped between this step's checkpoint and its evaluation: evaluate now, as the run would have.
        _evaluate(run)
        _refresh_last(run)
    with (
        _StopFlag() as stop,
        Progress(total=run.max_steps, desc="train", enabled=env.is_main, unit="step", initial=st.step) as bar,
    ):
        while st.step < run.max_steps:
            run.sampler.set_epoch(st.epoch, start_batch=st.batch_in_epoch)
            for local_indices in run.sampler:
                t0 = time.perf_counter()
                # Strided like the sampler's rank slices: micro-step m on rank r holds global[r + m*W :: W*A],
                # so 1 device x A accumulation steps computes exactly what A devices compute.
                micro = [local_indices[m :: plan.grad_accum] for m in range(plan.grad_accum)]
                batches = [run.collate([run.train_features[i] for i in m]) for m in micro]
                step_loss, global_tokens = accumulate_gradients(run.engine, batches, env, run.bf16)
                if not math.isfinite(step_loss):
                    if not cfg.skip_nonfinite:
                        raise TrainingError(
                            f"the loss became {step_loss} at step {st.step + 1}; the last good checkpoint in "
                            f"{run.out / rundir.LAST} is intact (lower --lr, or pass --skip_nonfinite to skip such steps)"
                        )
                    st.skipped_nonfinite += 1
                    run.optimizer.zero_grad(set_to_none=True)
                else:
                    run.optimizer.step()
                    run.scheduler.step()
                    run.optimizer.zero_grad(set_to_none=True)
                st.step += 1
                st.batch_in_epoch += 1
                st.examples_seen += plan.global_batch
                dt = time.perf_counter() - t0
                st.train_seconds += dt
                window_time += dt
                window_examples += plan.global_batch
                if math.isfinite(step_loss):
                    window_loss += step_loss * global_tokens
                    window_tokens += global_tokens

                if (cfg.logging_steps and st.step % cfg.logging_steps == 0) or st.step == run.max_steps:
                    run.logger.log(
                        "train",
                        st.step,
                        epoch=st.epoch + st.batch_in_epoch / run.steps_per_epoch,
                        loss=window_loss / max(window_tokens, 1.0),
                        lr=run.scheduler.get_last_lr()[0],
                        examples_per_second=window_examples / max(window_time, 1e-9),
                        skipped_nonfinite=st.skipped_nonfinite,
                    )
                    window_loss = window_tokens = 0.0
                    window_examples, window_time = 0, 0.0
                saved = bool(cfg.save_steps and st.step % cfg.save_steps == 0 and st.step < run.max_steps)
                if saved:  # before evaluating: an evaluation that fails must not cost this step's checkpoint
                    save_checkpoint(run)
                shown = {"loss": step_loss, "ex_s": plan.global_batch / max(dt, 1e-9)}
                due = cfg.eval_steps and st.step % cfg.eval_steps == 0 and st.step < run.max_steps
                if due and run.eval_examples:
                    shown["dev_f1" if run.task is None else f"dev_{run.task.metric.value}"] = _evaluate(run)
                    if saved:
                        _refresh_last(run)  # the checkpoint just written learns this evaluation's best
                bar.update(1, **shown)  # after the evaluation, so the line shows this step's dev F1
                # A signal seen by any rank stops every rank at the same step.
                stop.signum = int(all_reduce_max(torch.tensor([stop.signum]), env).item())
                if stop.signum:
                    if not saved:  # else this very step's checkpoint was just written; nothing changed since
                        save_checkpoint(run)
                    raise Preempted(stop.signum, st.step)
                if st.step >= run.max_steps:
                    break
            else:
                st.epoch += 1
                st.batch_in_epoch = 0
    # -- the end: checkpoint, evaluate, report. Checkpointing first means a job stopped during a long
    # final evaluation (full SQuAD dev) loses no training: --resume only evaluates again.
    save_checkpoint(run)
    if run.eval_examples:
        _evaluate(run)
        _refresh_last(run)
    _refresh_best_card(run)
    return _results(run)


def accumulate_gradients(
    engine: nn.Module, batches: list[dict[str, torch.Tensor]], env: DistEnv, bf16: bool
) -> tuple[float, float]:
    """Forward and backward over this rank's micro-batches of one global batch.

    The loss is the sum of target-token cross-entropies over the whole global batch divided by the
    global batch's target-token count, so the gradient is the same however the batch is split over
    devices and accumulation steps. The gradient all-reduce runs only on the last micro-step.

    Returns:
        The global batch's mean token loss, and its target-token count.
    """
    local_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    global_tokens = float(all_reduce_sum(torch.tensor([local_tokens]), env).item())
    loss_sum = torch.zeros((), device=env.device)
    for i, b in enumerate(batches):
        with no_grad_sync(engine, skip=i < len(batches) - 1):
            with autocast(env.device, bf16):  # the forward only: backward runs in the forward's dtypes
                token_loss = engine(
                    b["input_ids"].to(env.device),
                    b["attention_mask"].to(env.device),
                    b["labels"].to(env.device),
                    reduction="sum",
                )
            # DDP and FSDP average gradients over ranks; scale back up to a plain sum.
            (token_loss * env.world_size / global_tokens).backward()
        loss_sum += token_loss.detach().float()
    return float(all_reduce_sum(loss_sum, env).item()) / global_tokens, global_tokens


def _evaluate(run: Run) -> float:
    """Score the dev set; keep best/ when the selection score (F1 for QA, a text task's first metric)
    improves. Returns that score (on every rank)."""
    cfg, st = run.cfg, run.state
    gen = dict(
        batch_size=cfg.eval_batch_size,
        max_new_tokens=cfg.max_target_length,
        env=run.env,
        bf16=run.bf16,
        lockstep=cfg.fsdp,
    )
    result: EvalResult
    if run.task is not None:
        result = evaluate_texts(
            run.model, run.tokenizer, run.task, run.eval_examples, run.eval_features, **gen
        )
    else:
        result = evaluate_examples(
            run.model, run.tokenizer, run.eval_examples, run.eval_features, punctuation=cfg.punctuation, **gen
        )
    st.last_eval_step = st.step
    run.logger.log("eval", st.step, **result.scores())
    if run.env.is_main:
        atomic.atomic_write_json(run.out / rundir.predictions_file(st.step), result.predictions)
    if result.score > st.best_score:
        st.best_step = st.step
        if run.task is None:
            st.best_f1, st.best_em = result.f1, result.exact_match
            st.best_t5_em, st.best_t5_f1 = result.t5_exact_match, result.t5_f1
        else:
            st.best_scores = result.scores()
        save_best(run)
        if run.env.is_main:
            atomic.atomic_write_json(run.out / rundir.PREDICTIONS_BEST, result.predictions)
    return result.score


# ---------------------------------------------------------------------------------------------- save


def save_checkpoint(run: Run) -> Path:
    """Write a resumable checkpoint: every rank its part into one temporary directory, which rank 0
    publishes (manifest, rename, `last`, pruning; see `rundir.publish_checkpoint`)."""
    env, st, out = run.env, run.state, run.out
    st.python_rng = _jsonable(random.getstate())
    tmp = Path(broadcast_object(str(rundir.new_checkpoint_dir(out, st.step)) if env.is_main else None, env))
    barrier(env)
    try:
        ckpt.save_train_state(
            tmp,
            run.model,
            run.optimizer,
            run.scheduler,
            env,
            fsdp=run.cfg.fsdp,
            prompt_config=_prompt_config(run) if run.model.prompt is not None else None,
        )
        barrier(env)
        if env.is_main:
            _write_state_and_card(tmp, run, location=out / rundir.checkpoint_name(st.step))
            rundir.publish_checkpoint(tmp, out, st.step, keep=run.cfg.save_total_limit)
    except BaseException:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(env)
    return out / rundir.checkpoint_name(st.step)


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
    ckpt.load_train_state(directory, model, optimizer, scheduler, env, fsdp=fsdp)
    if state.python_rng:
        try:
            v, internal, gauss = state.python_rng
            random.setstate((v, tuple(internal), gauss))
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"{directory / rundir.TRAINER_STATE} is damaged (python_rng: {e})"
            ) from None
    return state


def save_best(run: Run) -> None:
    """Write best/: the trained weights as a usable artefact (a prompt checkpoint or an HF model
    directory) with its model card and manifest, replacing the previous best/ atomically."""
    directory = run.out / rundir.BEST
    # Under FSDP every rank takes part in gathering the full weights; rank 0 writes them.
    state = (
        fsdp_full_state_dict(run.model, trainable_only=run.model.prompt is not None) if run.cfg.fsdp else None
    )
    if run.env.is_main:
        with atomic.atomic_dir(directory) as tmp:
            if run.model.prompt is not None:
                weight = state["prompt.weight"] if state is not None else run.model.prompt.weight
                ckpt.write_prompt_files(tmp, weight, _prompt_config(run))
            else:
                t5_state = (
                    {k.removeprefix("model."): v for k, v in state.items()} if state is not None else None
                )
                ckpt.save_t5(tmp, run.model.model, state_dict=t5_state)
                run.tokenizer.save_pretrained(tmp)
            _write_card(tmp, run, location=directory)
            rundir.write_manifest(tmp)
    barrier(run.env)


def _refresh_last(run: Run) -> None:
    """Record the final evaluation's best-so-far in `last/` (trainer state and model card), atomically."""
    if run.env.is_main:
        last = (run.out / rundir.LAST).resolve()
        with rundir.amend(last) as tmp:
            _write_state_and_card(tmp, run, location=run.out / last.name)


def _refresh_best_card(run: Run) -> None:
    """At the end, best/'s card states the whole run (its steps and epochs), not the run up to the best step."""
    best = run.out / rundir.BEST
    if run.env.is_main and (best / "README.md").is_file():
        with rundir.amend(best) as tmp:
            _write_card(tmp, run, location=best)


def _write_state_and_card(directory: Path, run: Run, location: Path) -> None:
    """trainer_state.json and, for a prompt, its model card naming `location`, the checkpoint's own folder."""
    if run.model.prompt is not None:
        _write_card(directory, run, location=location)
    rundir.write_trainer_state(directory, run.state)


def _write_card(directory: Path, run: Run, location: Path | None = None) -> None:
    """The model card in `directory`, naming `location` (where the files will live) as the path to load."""
    from softprompt.training.modelcard import write_model_card

    write_model_card(directory, _model_card_info(run), location=location)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple | list):
        return [_jsonable(o) for o in obj]
    return obj


def _prompt_config(run: Run) -> ckpt.PromptConfig:
    cfg = run.cfg
    assert run.model.prompt is not None
    return ckpt.PromptConfig(
        base_model=cfg.model_name_or_path,
        n_tokens=cfg.n_tokens,
        d_model=run.model.prompt.d_model,
        init=cfg.prompt_init,
        punctuation=cfg.punctuation,
        max_source_length=cfg.max_source_length,
        max_target_length=cfg.max_target_length,
        extra={
            "step": run.state.step,
            **(
                {"dev_f1": run.state.best_f1, "dev_exact_match": run.state.best_em}
                if run.task is None
                else {f"dev_{k}": v for k, v in run.state.best_scores.items()}
            ),
            "base_model_fingerprint": run.base_fingerprint,
            **({"prompt_init_labels": labels} if (labels := init_labels(cfg, run.task)) else {}),
        },
        task=run.task.to_dict() if run.task is not None else None,
    )


def _model_card_info(run: Run) -> dict[str, Any]:
    cfg, st = run.cfg, run.state
    return {
        "base_model": cfg.model_name_or_path,
        "mode": "prompt" if cfg.prompt_tuning else "finetune",
        "train_file": cfg.dataset_name or cfg.train_file,
        "validation_file": cfg.dataset_name or cfg.validation_file,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "initial_step": run.initial_step if cfg.optimizer == "adafactor" else None,
        "punctuation": cfg.punctuation,
        "n_tokens": cfg.n_tokens,
        "prompt_init": cfg.prompt_init,
        "global_batch_size": run.plan.global_batch,
        "steps": st.step,
        "epochs": cfg.epochs
        if cfg.epochs is not None
        else round(st.examples_seen / max(1, len(run.train_features)), 2),
        "seed": cfg.seed,
        "precision": cfg.precision,
        "exact_match": st.best_em if st.best_step >= 0 else None,
        "f1": st.best_f1 if st.best_step >= 0 else None,
        "t5_exact_match": st.best_t5_em if st.best_step >= 0 else None,
        "t5_f1": st.best_t5_f1 if st.best_step >= 0 else None,
        "best_step": st.best_step if st.best_step >= 0 else None,
        **(
            {
                "task": run.task.name,
                "task_description": run.task.description,
                "input_template": run.task.input_template,
                "metric": run.task.metric.value,
                "scores": st.best_scores if st.best_step >= 0 else None,
            }
            if run.task is not None
            else {}
        ),
    }


def _results(run: Run) -> dict[str, Any]:
    cfg, st = run.cfg, run.state
    results = {
        "exact_match": st.best_em if st.best_step >= 0 else None,
        "f1": st.best_f1 if st.best_step >= 0 else None,
        # T5's own way (generated text vs padded gold answers); None when the text was not padded.
        "t5_exact_match": st.best_t5_em if st.best_step >= 0 else None,
        "t5_f1": st.best_t5_f1 if st.best_step >= 0 else None,
        "best_step": st.best_step if st.best_step >= 0 else None,
        "steps": st.step,
        "train_seconds": st.train_seconds,
        "train_examples_per_second": st.examples_seen / max(st.train_seconds, 1e-9),
        "model_name_or_path": cfg.model_name_or_path,
        "mode": "prompt" if cfg.prompt_tuning else "finetune",
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "initial_step": run.initial_step if cfg.optimizer == "adafactor" else None,
        "punctuation": cfg.punctuation,
        "n_tokens": cfg.n_tokens if cfg.prompt_tuning else 0,
        "global_batch_size": run.plan.global_batch,
        "world_size": run.env.world_size,
        "device": run.env.device.type,
        "precision": cfg.precision,
        "skipped_nonfinite": st.skipped_nonfinite,
        "softprompt_version": __version__,
    }
    if run.task is not None:
        # A text task's own scores at the best step (exact_match/f1 are its own when its metric has them).
        best = st.best_scores if st.best_step >= 0 else {}
        results.update(
            exact_match=best.get("exact_match"), f1=best.get("f1"), t5_exact_match=None, t5_f1=None
        )
        results.update(best, task=run.task.name, metric=run.task.metric.value, scores=best or None)
    if run.env.is_main:
        atomic.atomic_write_json(run.out / rundir.RESULTS_FILE, results)
    run.logger.log("end", st.step, **{k: v for k, v in results.items() if isinstance(v, int | float)})
    return results


# ---------------------------------------------------------------------------------------------- entry


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a whole training job: setup, train, save, cleanup.

    Returns:
        The content of results.json (best dev EM/F1 and timing).

    Raises:
        StorageError: writing into the run directory failed (disk full, I/O error): exit code 74.
    """
    cfg = with_mode_defaults(cfg)
    env = init_distributed()
    out = Path(cfg.output_dir)
    fresh = not out.exists()
    run = None
    try:
        run = setup(cfg, env)
        return train_loop(run)
    except BaseException as e:
        if isinstance(e, OSError) and (run is not None or e.errno in rundir.STORAGE_ERRNOS):
            # Disk full, quota, EIO, a read-only filesystem: the writer has removed its temporary files.
            raise rundir.write_failed(e, out) from None
        # A run that failed while setting up trained nothing: it leaves no directory behind.
        if run is None and fresh and env.is_main and out.is_dir() and not rundir.checkpoints(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if run is not None:
            # After a failed write the log's buffer cannot be flushed either; the error is already on its way.
            with contextlib.suppress(OSError):
                run.logger.close()
            if run.lock is not None:
                run.lock.release()
        cleanup()
