"""Evaluation during training: score the dev set on schedule and keep best/ when the score improves."""

from __future__ import annotations

from softprompt.inference.options import GenerationOptions
from softprompt.inference.scoring import evaluate
from softprompt.io import atomic, rundir
from softprompt.training.saving import save_best
from softprompt.training.setup import Run


def evaluate_dev(run: Run) -> float:
    """Score the dev set with the run's task; keep best/ when its selection score (F1 for SQuAD, a text
    task's first metric) improves. Returns that score (on every rank)."""
    cfg, st = run.cfg, run.state
    gen = GenerationOptions(
        batch_size=cfg.eval_batch_size,
        max_new_tokens=cfg.max_target_length,
        env=run.env,
        bf16=run.bf16,
        lockstep=cfg.fsdp,
    )
    result = evaluate(run.model, run.tokenizer, run.task, run.eval_examples, run.eval_features, gen)
    st.last_eval_step = st.step
    run.logger.log("eval", st.step, **result.scores())
    if run.env.is_main:
        atomic.atomic_write_json(run.out / rundir.predictions_file(st.step), result.predictions)
    if result.score > st.best_score:
        st.record_best(st.step, result.scores(), result.selection)
        save_best(run)
        if run.env.is_main:
            atomic.atomic_write_json(run.out / rundir.PREDICTIONS_BEST, result.predictions)
    return result.score
