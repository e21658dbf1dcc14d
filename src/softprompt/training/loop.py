"""The training loop, in four phases: setup -> train -> save -> cleanup.

One loop serves prompt tuning and full fine-tuning, one process or a torchrun job. Read `train` at
the bottom first, then `train_loop`. Setup (data, model, optimizer, --resume) lives in
`softprompt.training.setup`, evaluation during training in `softprompt.training.evaluation`,
checkpoints, best/ and results.json in `softprompt.training.saving`, the resumable tensors in
`softprompt.training.state`. Every distributed detail is delegated to `softprompt.runtime.distributed`,
the run directory (its lock, file names, checkpoint publication and verification) to `softprompt.io.rundir`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softprompt.errors import UserError
from softprompt.inference.engine import autocast
from softprompt.io import rundir
from softprompt.runtime.distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_sum,
    cleanup,
    init_distributed,
    no_grad_sync,
)
from softprompt.runtime.precision import announce, with_precision
from softprompt.runtime.progress import Progress
from softprompt.training.config import TrainConfig
from softprompt.training.evaluation import evaluate_dev
from softprompt.training.saving import refresh_best_card, refresh_last, save_checkpoint, write_results
from softprompt.training.setup import Run, setup, with_defaults


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is intact."""

    exit_code = 3


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint was saved and the run stopped cleanly."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; continue with --resume")
        self.exit_code = 128 + signum


# ---------------------------------------------------------------------------------------------- train


class StopFlag:
    """Turns SIGTERM/SIGINT into a request to checkpoint and stop after the current step."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
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
    due = cfg.eval_steps and st.step and st.step % cfg.eval_steps == 0 and st.step < run.max_steps
    if due and run.eval_examples and st.last_eval_step != st.step:
        # Stopped between this step's checkpoint and its evaluation: evaluate now, as the run would have.
        evaluate_dev(run)
        refresh_last(run)
    stepped = False
    with (
        StopFlag() as stop,
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
                stepped = True
                st.batch_in_epoch += 1
                st.examples_seen += plan.global_batch
                dt = time.perf_counter() - t0
                st.train_seconds += dt
                # The window lives in the trainer state so that a checkpoint carries it (see TrainerState).
                st.window_time += dt
                st.window_examples += plan.global_batch
                if math.isfinite(step_loss):
                    st.window_loss += step_loss * global_tokens
                    st.window_tokens += global_tokens

                if (cfg.logging_steps and st.step % cfg.logging_steps == 0) or st.step == run.max_steps:
                    run.logger.log(
                        "train",
                        st.step,
                        epoch=st.epoch + st.batch_in_epoch / run.steps_per_epoch,
                        loss=st.window_loss / max(st.window_tokens, 1.0),
                        lr=run.scheduler.get_last_lr()[0],
                        examples_per_second=st.window_examples / max(st.window_time, 1e-9),
                        skipped_nonfinite=st.skipped_nonfinite,
                    )
                    st.window_loss = st.window_tokens = st.window_time = 0.0
                    st.window_examples = 0
                final = st.step >= run.max_steps
                # The last step is always checkpointed: a job stopped during a long final evaluation (full
                # SQuAD dev) then loses no training, and --resume only evaluates again.
                saved = final or bool(cfg.save_steps and st.step % cfg.save_steps == 0)
                if saved:  # before evaluating: an evaluation that fails must not cost this step's checkpoint
                    save_checkpoint(run)
                shown = {"loss": step_loss, "ex_s": plan.global_batch / max(dt, 1e-9)}
                due = final or (cfg.eval_steps and st.step % cfg.eval_steps == 0)
                if due and run.eval_examples:
                    shown[f"dev_{run.task.metric}"] = evaluate_dev(run)
                    if saved:
                        refresh_last(run)  # the checkpoint just written learns this evaluation's best
                # After the evaluation, the final one included, so the line shows this step's dev score.
                bar.update(1, **shown)
                # A signal seen by any rank stops every rank at the same step.
                stop.signum = int(all_reduce_max(torch.tensor([stop.signum]), env).item())
                if stop.signum:
                    if not saved:  # else this very step's checkpoint was just written; nothing changed since
                        save_checkpoint(run)
                    # The log says why it ends here: a stopped run, not a crashed one.
                    run.logger.log("stop", st.step, signal=signal.Signals(stop.signum).name)
                    raise Preempted(stop.signum, st.step)
                if st.step >= run.max_steps:
                    break
            else:
                st.epoch += 1
                st.batch_in_epoch = 0
    # -- the end. A run resumed after its last step (stopped during the final evaluation) did no step
    # above: checkpoint and evaluate here, as the last step would have.
    if not stepped:
        save_checkpoint(run)
        if run.eval_examples:
            evaluate_dev(run)
            refresh_last(run)
    refresh_best_card(run)
    return write_results(run)


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


# ---------------------------------------------------------------------------------------------- entry


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a whole training job: setup, train, save, cleanup.

    Returns:
        The content of results.json (best dev EM/F1 and timing).

    Raises:
        StorageError: writing into the run directory failed (disk full, I/O error): exit code 74.
    """
    return run_job(cfg, setup, train_loop)


def run_job(
    cfg: TrainConfig, build: Callable[[TrainConfig, DistEnv], Any], body: Callable[[Any], dict[str, Any]]
) -> dict[str, Any]:
    """The frame of every training job: the process group, `build` (setup), `body` (the loop and the save),
    and the cleanup: a failed write as one line (exit 74), a directory that trained nothing removed, the
    log closed, the lock released. `build`'s result must have `logger` and `lock` (a `Run` or `MultiRun`).

    Returns:
        What `body` returns (results.json's content).
    """
    cfg = with_defaults(cfg)
    env = init_distributed()
    # auto becomes bf16 or fp32 for this rank's device before anything records the config.
    cfg, precision = with_precision(cfg, env.device)
    out = Path(cfg.output_dir)
    fresh = not out.exists()
    run = None
    try:
        run = build(cfg, env)
        if env.is_main:  # after the start line: a refused setup stays one line
            announce(precision)
        return body(run)
    except BaseException as e:
        # The finished frames of the loop and the setup hold the run (its model holds the process group) for
        # as long as the exception lives: their locals go, so that `cleanup` can stop the group's threads on
        # this path too (a preempted run exits through it). The traceback keeps its lines.
        traceback.clear_frames(e.__traceback__)
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
        # The run's DDP/FSDP model and optimizer hold the process group: dropped first, so that `cleanup` can
        # stop the group's threads before the interpreter exits (see `cleanup`).
        run = None
        cleanup()
