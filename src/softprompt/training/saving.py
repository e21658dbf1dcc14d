"""Phase three of a training run, save: resumable checkpoints, best/, model cards, results.json.

`save_checkpoint` writes what `--resume` continues from (its tensors through `softprompt.training.state`,
its publication through `softprompt.io.rundir`); `save_best` writes the usable artefact; `write_results`
the run's summary.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from softprompt import __version__
from softprompt.io import atomic, rundir
from softprompt.io import checkpoint as ckpt
from softprompt.runtime.distributed import barrier, broadcast_object, fsdp_full_state_dict
from softprompt.training.setup import Run, init_labels
from softprompt.training.state import python_rng_state, save_train_state


def save_checkpoint(run: Run) -> Path:
    """Write a resumable checkpoint: every rank its part into one temporary directory, which rank 0
    publishes (manifest, rename, `last`, pruning; see `rundir.publish_checkpoint`)."""
    env, st, out = run.env, run.state, run.out
    st.python_rng = python_rng_state()
    tmp = Path(broadcast_object(str(rundir.new_checkpoint_dir(out, st.step)) if env.is_main else None, env))
    barrier(env)
    try:
        save_train_state(
            tmp,
            run.model,
            run.optimizer,
            run.scheduler,
            env,
            fsdp=run.cfg.fsdp,
            prompt_config=prompt_config(run) if run.model.prompt is not None else None,
        )
        barrier(env)
        if env.is_main:
            write_state_and_card(tmp, run, location=out / rundir.checkpoint_name(st.step))
            rundir.publish_checkpoint(tmp, out, st.step, keep=run.cfg.save_total_limit)
    except BaseException:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(env)
    return out / rundir.checkpoint_name(st.step)


def save_best(run: Run, directory: Path | None = None) -> None:
    """Write best/: the trained weights as a usable artefact (a prompt checkpoint or an HF model
    directory) with its model card and manifest, replacing the previous best/ atomically.

    Args:
        run: the run (or one prompt of a multi-prompt run).
        directory: where instead of `best/` (a multi-prompt run's `best/<name>/`).
    """
    directory = directory if directory is not None else run.out / rundir.BEST
    # Under FSDP every rank takes part in gathering the full weights; rank 0 writes them.
    state = (
        fsdp_full_state_dict(run.model, trainable_only=run.model.prompt is not None) if run.cfg.fsdp else None
    )
    if run.env.is_main:
        with atomic.atomic_dir(directory) as tmp:
            if run.model.prompt is not None:
                weight = state["prompt.weight"] if state is not None else run.model.prompt.weight
                ckpt.write_prompt_files(tmp, weight, prompt_config(run))
            else:
                t5_state = (
                    {k.removeprefix("model."): v for k, v in state.items()} if state is not None else None
                )
                ckpt.save_t5(tmp, run.model.model, state_dict=t5_state)
                run.tokenizer.save_pretrained(tmp)
            _write_card(tmp, run, location=directory)
            rundir.write_manifest(tmp)
    barrier(run.env)


def refresh_last(run: Run) -> None:
    """Record the final evaluation's best-so-far in `last/` (trainer state and model card), atomically."""
    if run.env.is_main:
        last = (run.out / rundir.LAST).resolve()
        with rundir.amend(last) as tmp:
            write_state_and_card(tmp, run, location=run.out / last.name)


def refresh_best_card(run: Run, directory: Path | None = None) -> None:
    """At the end, best/'s card (or `directory`'s) states the whole run (its steps and epochs), not the run
    up to the best step."""
    best = directory if directory is not None else run.out / rundir.BEST
    if run.env.is_main and (best / "README.md").is_file():
        with rundir.amend(best) as tmp:
            _write_card(tmp, run, location=best)


def write_state_and_card(directory: Path, run: Run, location: Path) -> None:
    """Write trainer_state.json and, for a prompt, its model card naming `location`, the checkpoint's own folder."""
    if run.model.prompt is not None:
        _write_card(directory, run, location=location)
    rundir.write_trainer_state(directory, run.state)


def _write_card(directory: Path, run: Run, location: Path | None = None) -> None:
    """The model card in `directory`, naming `location` (where the files will live) as the path to load."""
    from softprompt.training.modelcard import write_model_card

    write_model_card(directory, _model_card_info(run), location=location)


def prompt_config(run: Run) -> ckpt.PromptConfig:
    """The `prompt_config.json` of the run's prompt at its current step (its task, scores, base model)."""
    cfg = run.cfg
    assert run.model.prompt is not None
    return ckpt.PromptConfig(
        base_model=cfg.model_name_or_path,
        n_tokens=cfg.n_tokens,
        d_model=run.model.prompt.d_model,
        init=cfg.prompt_init,
        **run.task.text_format(),  # a text task records its own template, not SQuAD's text format
        max_source_length=cfg.max_source_length,
        max_target_length=cfg.max_target_length,
        extra={
            "step": run.state.step,
            **{f"dev_{k}": v for k, v in run.task.dev_scores(run.state.best_scores).items()},
            "base_model_fingerprint": run.base_fingerprint,
            # Random weights have no fingerprint: the seed that built them is their identity.
            **({ckpt.RANDOM_INIT_SEED: run.random_init_seed} if run.random_init_seed is not None else {}),
            **({"prompt_init_labels": labels} if (labels := init_labels(cfg, run.task)) else {}),
        },
        task=run.task.to_dict(),
    )


def _best(run: Run) -> dict[str, float]:
    """The scores at the best step ({} before any evaluation)."""
    return run.state.best_scores if run.state.best_step >= 0 else {}


def _qa_scores(best: dict[str, float]) -> dict[str, float | None]:
    """The QA scores every results.json and card names, None where the task's metric has no such score."""
    return {k: best.get(k) for k in ("exact_match", "f1", "t5_exact_match", "t5_f1")}


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
        "punctuation": run.task.text_format()["punctuation"],
        "n_tokens": cfg.n_tokens,
        "prompt_init": cfg.prompt_init,
        "global_batch_size": run.plan.global_batch,
        "steps": st.step,
        "epochs": cfg.epochs
        if cfg.epochs is not None
        else round(st.examples_seen / max(1, len(run.train_features)), 2),
        "seed": cfg.seed,
        "random_init": cfg.random_init,
        "random_init_seed": run.random_init_seed,
        "precision": cfg.precision,
        **_qa_scores(_best(run)),
        "best_step": st.best_step if st.best_step >= 0 else None,
        **run.task.card_fields(_best(run)),
    }


def write_results(run: Run) -> dict[str, Any]:
    """Write results.json (`results_of`) and log the run's end. Returns what it wrote."""
    results = results_of(run)
    if run.env.is_main:
        atomic.atomic_write_json(run.out / rundir.RESULTS_FILE, results)
    run.logger.log("end", run.state.step, **{k: v for k, v in results.items() if isinstance(v, int | float)})
    return results


def results_of(run: Run) -> dict[str, Any]:
    """The run's summary: best scores and step, timing, and the settings that produced them."""
    cfg, st = run.cfg, run.state
    results = {
        # t5_*: T5's own way (generated text vs padded gold answers); None when the text was not padded.
        **_qa_scores(_best(run)),
        "best_step": st.best_step if st.best_step >= 0 else None,
        "steps": st.step,
        "train_seconds": st.train_seconds,
        "train_examples_per_second": st.examples_seen / max(st.train_seconds, 1e-9),
        "model_name_or_path": cfg.model_name_or_path,
        "mode": "prompt" if cfg.prompt_tuning else "finetune",
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "initial_step": run.initial_step if cfg.optimizer == "adafactor" else None,
        "punctuation": run.task.text_format()["punctuation"],
        "n_tokens": cfg.n_tokens if cfg.prompt_tuning else 0,
        "global_batch_size": run.plan.global_batch,
        "world_size": run.env.world_size,
        "device": run.env.device.type,
        "precision": cfg.precision,
        "skipped_nonfinite": st.skipped_nonfinite,
        "softprompt_version": __version__,
    }
    results.update(run.task.results_fields(_best(run)))
    return results
