"""Evaluation during training: score the dev set on schedule and keep best/ when the score improves."""

from __future__ import annotations

from softprompt.inference.engine import EvalResult, evaluate_examples
from softprompt.inference.options import GenerationOptions
from softprompt.inference.task_eval import evaluate_texts
from softprompt.io import atomic, rundir
from softprompt.training.saving import save_best
from softprompt.training.setup import Run


def evaluate_dev(run: Run) -> float:
    """Score the dev set; keep best/ when the selection score (F1 for QA, a text task's first metric)
    improves. Returns that score (on every rank)."""
    cfg, st = run.cfg, run.state
    gen = GenerationOptions(
        batch_size=cfg.eval_batch_size,
        max_new_tokens=cfg.max_target_length,
        env=run.env,
        bf16=run.bf16,
        lockstep=cfg.fsdp,
    )
    result: EvalResult
    if run.task is not None:
        result = evaluate_texts(run.model, run.tokenizer, run.task, run.eval_examples, run.eval_features, gen)
    else:
        result = evaluate_examples(
            run.model, run.tokenizer, run.eval_examples, run.eval_features, gen, punctuation=cfg.punctuation
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
