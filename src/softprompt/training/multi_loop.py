"""The loop of a multi-prompt run: K prompts trained in mixed batches on one frozen model.

Per step every prompt draws its next global batch from its own stream (its own sampler, shuffled with
its own seed, its own epoch and position); the rows of all prompts go through the model together, each
with its own prompt (`multi_setup.PromptStack`). Each prompt's loss is normalised over its own target
tokens and the step minimises the sum, so prompt i's gradient is exactly its own loss's, and with one
parameter group per prompt its Adafactor update is the one a single-prompt run would make. In fp32
with dropout 0 each prompt therefore follows its single-prompt run up to float summation order
(tests/training/test_multi_prompt.py). Evaluation runs every prompt's dev set in shared mixed batches and
scores each with its own task; best/<name>/ and results are each prompt's own. The loss windows live in
the trainer states, so a resumed run logs what the uninterrupted one does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from softprompt import __version__
from softprompt.data.batching import Features
from softprompt.inference.engine import autocast
from softprompt.inference.options import GenerationOptions
from softprompt.inference.scoring import PromptEval, evaluate_mixed
from softprompt.io import atomic, rundir
from softprompt.runtime.distributed import DistEnv, all_reduce_max, all_reduce_sum, no_grad_sync, unsharded
from softprompt.runtime.progress import Progress
from softprompt.training.config import TrainConfig
from softprompt.training.loop import Preempted, StopFlag, TrainingError, run_job
from softprompt.training.multi_setup import MultiRun, setup_multi
from softprompt.training.multi_state import refresh_multi_last, save_multi_checkpoint
from softprompt.training.saving import refresh_best_card, results_of, save_best
from softprompt.training.setup import Run


def train_multi(cfg: TrainConfig) -> dict[str, Any]:
    """Run a whole multi-prompt job: setup, train, save, cleanup (as `softprompt.training.loop.train`).

    Returns:
        The content of results.json: the run's timing and, under `prompts`, each prompt's results.
    """
    return run_job(cfg, setup_multi, multi_train_loop)


def predictions_file(name: str, step: int) -> str:
    """The dev predictions of prompt `name` at `step`."""
    return f"predictions_{name}_step{step}.json"


def best_predictions_file(name: str) -> str:
    """The dev predictions of prompt `name` at its best step."""
    return f"predictions_best_{name}.json"


def _stream(slot: Run) -> Iterator[list[int]]:
    """A prompt's batches, epoch after epoch, from where its state says it stands (as `train_loop` draws)."""
    st = slot.state
    while True:
        slot.sampler.set_epoch(st.epoch, start_batch=st.batch_in_epoch)
        yield from slot.sampler
        st.epoch += 1
        st.batch_in_epoch = 0


def mixed_batches(
    run: MultiRun, indices: list[list[int]]
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """One step's micro-batches: micro-step m holds every prompt's m-th slice, with each row's prompt index.

    Args:
        run: the run.
        indices: per prompt, this rank's examples of its global batch.

    Returns:
        Per micro-step, the collated rows and their prompt indices [B].
    """
    a = run.plan.grad_accum
    out = []
    for m in range(a):
        rows: list[int] = []
        feats: list[Features] = []
        for k, (slot, idx) in enumerate(zip(run.slots, indices, strict=True)):
            # Strided like `train_loop`, so each prompt's micro-batches are its single run's.
            mine = idx[m::a]
            feats += [slot.train_features[i] for i in mine]
            rows += [k] * len(mine)
        out.append((run.collate(feats), torch.tensor(rows)))
    return out


def accumulate_mixed(
    engine: torch.nn.Module,
    batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]],
    k: int,
    env: DistEnv,
    bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over this rank's mixed micro-batches of one step.

    The step's loss is sum_i (prompt i's summed token loss / prompt i's target tokens over the global
    batch); prompt i's gradient is that of its own term alone, as in its single-prompt run.

    Returns:
        Each prompt's mean token loss [K] and target-token count [K] over the global batch.
    """
    local = torch.zeros(k, dtype=torch.float64)
    for b, rows in batches:
        local.index_add_(0, rows, (b["labels"] != -100).sum(1).to(torch.float64))
    tokens = all_reduce_sum(local.to(env.device), env).cpu().clamp(min=1.0)
    scale = (env.world_size / tokens).to(env.device, torch.float32)  # DDP averages over ranks; undo it
    loss_sum = torch.zeros(k, device=env.device)
    for i, (b, rows) in enumerate(batches):
        rows_d = rows.to(env.device)
        with no_grad_sync(engine, skip=i < len(batches) - 1):
            with autocast(env.device, bf16):
                token_loss = engine(
                    b["input_ids"].to(env.device),
                    b["attention_mask"].to(env.device),
                    b["labels"].to(env.device),
                    rows_d,
                ).view(b["labels"].shape)
            per_prompt = torch.zeros(k, device=env.device).index_add(0, rows_d, token_loss.float().sum(1))
            (per_prompt * scale).sum().backward()
        loss_sum += per_prompt.detach()
    return all_reduce_sum(loss_sum, env).cpu() / tokens, tokens


def evaluate_prompts(run: MultiRun) -> dict[str, float]:
    """Score every prompt on its own dev set with its own task's metric, all prompts' dev examples in
    shared mixed batches (`inference.scoring.evaluate_mixed`); keep best/<name>/ when a prompt's selection
    score improves. Returns each prompt's selection score by name.

    Under --fsdp the root unit's weights (the prompts among them) are gathered for the pass, and every
    rank runs as many batches (lockstep), since each T5 block gathers its weights in its own forward."""
    st, scores = run.state, {}
    evaluated = [(name, slot) for name, slot in zip(run.names, run.slots, strict=True) if slot.eval_examples]
    gen = GenerationOptions(
        batch_size=run.cfg.eval_batch_size, env=run.env, bf16=run.bf16, lockstep=run.cfg.fsdp
    )
    with unsharded(run.stack):
        parts = []
        for _, slot in evaluated:
            assert slot.model.prompt is not None
            parts.append(
                PromptEval(
                    prompt=slot.model.prompt.weight,
                    task=slot.task,
                    examples=slot.eval_examples,
                    features=slot.eval_features,
                    max_new_tokens=slot.cfg.max_target_length,
                )
            )
        results = evaluate_mixed(run.stack.model, run.slots[0].tokenizer, parts, gen)
    for (name, slot), result in zip(evaluated, results, strict=True):
        slot.state.last_eval_step = st.step
        run.logger.log("eval", st.step, prompt=name, **result.scores())
        if run.env.is_main:
            atomic.atomic_write_json(run.out / predictions_file(name, st.step), result.predictions)
        if result.score > slot.state.best_score:
            slot.state.record_best(st.step, result.scores(), result.selection)
            save_best(slot, run.out / rundir.BEST / name)
            if run.env.is_main:
                atomic.atomic_write_json(run.out / best_predictions_file(name), result.predictions)
        scores[name] = result.score
    st.last_eval_step = st.step
    return scores


def _save(run: MultiRun) -> None:
    for slot in run.slots:
        slot.state.step = run.state.step
        slot.state.train_seconds = run.state.train_seconds
    save_multi_checkpoint(
        run.out,
        run.env,
        run.state,
        run.optimizer,
        run.scheduler,
        run.names,
        run.slots,
        run.cfg.save_total_limit,
        stack=run.stack,
        fsdp=run.cfg.fsdp,
    )


def _refresh_last(run: MultiRun) -> None:
    refresh_multi_last(run.out, run.env, run.state, run.names, run.slots)


def _has_dev(run: MultiRun) -> bool:
    return any(slot.eval_examples for slot in run.slots)


def _log_train(run: MultiRun) -> None:
    """One `train` record per prompt, under its name (loss: its token mean over the logging window), and
    a fresh window. The window lives in the trainer states (each prompt's loss in its own), so a
    checkpoint carries it and a resumed run logs what an uninterrupted one does."""
    st = run.state
    examples_per_second = st.window_examples / max(st.window_time, 1e-9)
    for k, (name, slot) in enumerate(zip(run.names, run.slots, strict=True)):
        run.logger.log(
            "train",
            st.step,
            prompt=name,
            epoch=slot.state.epoch + slot.state.batch_in_epoch / max(slot.steps_per_epoch, 1),
            loss=slot.state.window_loss / max(slot.state.window_tokens, 1.0),
            lr=run.scheduler.get_last_lr()[k],
            examples_per_second=examples_per_second,
            skipped_nonfinite=st.skipped_nonfinite,
        )
        slot.state.window_loss = slot.state.window_tokens = 0.0
    st.window_time, st.window_examples = 0.0, 0


def _step(run: MultiRun, streams: list[Iterator[list[int]]]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step over every prompt's next batch. Returns the losses [K], tokens [K], and whether it applied."""
    indices = [next(s) for s in streams]
    loss, tokens = accumulate_mixed(
        run.engine, mixed_batches(run, indices), len(run.slots), run.env, run.bf16
    )
    finite = bool(torch.isfinite(loss).all())
    if not finite:
        if not run.cfg.skip_nonfinite:
            bad = [n for n, v in zip(run.names, loss.tolist(), strict=True) if not math.isfinite(v)]
            raise TrainingError(
                f"the loss of prompt {', '.join(bad)} became non-finite at step {run.state.step + 1}; the last good "
                f"checkpoint in {run.out / rundir.LAST} is intact (lower its lr, or pass --skip_nonfinite)"
            )
        run.state.skipped_nonfinite += 1
    else:
        run.optimizer.step()
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    for slot in run.slots:
        slot.state.batch_in_epoch += 1
        slot.state.examples_seen += run.plan.global_batch
        slot.state.step = run.state.step + 1
    run.state.step += 1
    run.state.examples_seen += run.plan.global_batch * len(run.slots)
    return loss, tokens, finite


def multi_train_loop(run: MultiRun) -> dict[str, Any]:
    """Optimise every prompt until max_steps, evaluating and checkpointing on schedule.

    Returns:
        results.json's content.
    """
    cfg, env, st = run.cfg, run.env, run.state
    k = len(run.slots)
    due = cfg.eval_steps and st.step and st.step % cfg.eval_steps == 0 and st.step < run.max_steps
    if due and _has_dev(run) and st.last_eval_step != st.step:
        evaluate_prompts(run)  # stopped between this step's checkpoint and its evaluation
        _refresh_last(run)
    streams = [_stream(slot) for slot in run.slots]
    with (
        StopFlag() as stop,
        Progress(total=run.max_steps, desc="train", enabled=env.is_main, unit="step", initial=st.step) as bar,
    ):
        while st.step < run.max_steps:
            t0 = time.perf_counter()
            loss, tokens, finite = _step(run, streams)
            dt = time.perf_counter() - t0
            st.train_seconds += dt
            st.window_time += dt
            st.window_examples += run.plan.global_batch * k
            if finite:
                for slot, n, t in zip(run.slots, loss.tolist(), tokens.tolist(), strict=True):
                    slot.state.window_loss += n * t
                    slot.state.window_tokens += t
            if (cfg.logging_steps and st.step % cfg.logging_steps == 0) or st.step == run.max_steps:
                _log_train(run)
            saved = bool(cfg.save_steps and st.step % cfg.save_steps == 0 and st.step < run.max_steps)
            if saved:
                _save(run)
            shown: dict[str, float] = {
                "loss": float(loss.sum()),
                "ex_s": run.plan.global_batch * k / max(dt, 1e-9),
            }
            due = cfg.eval_steps and st.step % cfg.eval_steps == 0 and st.step < run.max_steps
            if due and _has_dev(run):
                scores = evaluate_prompts(run)
                # Each prompt's own selection score: their tasks' metrics need not be alike, so no mean.
                shown.update({f"dev_{name}": score for name, score in scores.items()})
                if saved:
                    _refresh_last(run)
            bar.update(1, **shown)
            stop.signum = int(all_reduce_max(torch.tensor([stop.signum]), env).item())
            if stop.signum:
                if not saved:
                    _save(run)
                raise Preempted(stop.signum, st.step)
    _save(run)
    if _has_dev(run):
        evaluate_prompts(run)
        _refresh_last(run)
    for name, slot in zip(run.names, run.slots, strict=True):
        refresh_best_card(slot, run.out / rundir.BEST / name)
    return write_multi_results(run)


def write_multi_results(run: MultiRun) -> dict[str, Any]:
    """results.json of a multi-prompt run: the run's timing, and each prompt's own results under its name."""
    st = run.state
    prompts = {}
    for name, slot in zip(run.names, run.slots, strict=True):
        slot.state.train_seconds = st.train_seconds
        prompts[name] = {**results_of(slot), "best_dir": str(run.out / rundir.BEST / name)}
    results = {
        "steps": st.step,
        "train_seconds": st.train_seconds,
        "train_examples_per_second": st.examples_seen / max(st.train_seconds, 1e-9),
        "num_prompts": len(run.slots),
        "global_batch_size": run.plan.global_batch,
        "model_name_or_path": run.cfg.model_name_or_path,
        "world_size": run.env.world_size,
        "device": run.env.device.type,
        "precision": run.cfg.precision,
        "skipped_nonfinite": st.skipped_nonfinite,
        "softprompt_version": __version__,
        "prompts": prompts,
    }
    if run.env.is_main:
        atomic.atomic_write_json(run.out / rundir.RESULTS_FILE, results)
    for name, r in prompts.items():
        numbers = {k: v for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        run.logger.log("end", st.step, prompt=name, **numbers)
    return results
