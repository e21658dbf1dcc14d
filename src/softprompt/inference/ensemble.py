"""K-prompt ensembles: every prompt of a bank answers in one batched pass, then a majority vote.

The same machinery as mixed-task serving (`softprompt.inference.bank.PromptBank`) runs K prompts over a
data set: each question is replicated K times, one row per prompt (Table 3 of Lester et al., 2021).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from softprompt.data.batching import Features
from softprompt.errors import UserError
from softprompt.inference.bank import PromptBank
from softprompt.inference.options import GenerationOptions
from softprompt.runtime.distributed import DistEnv
from softprompt.tasks.base import Task
from softprompt.tasks.metrics.squad import normalize_answer

__all__ = ["ensemble_answers", "ensemble_eval", "majority_vote", "tie_break_order"]

_DEFAULT = GenerationOptions()


def tie_break_order(score: Sequence[float]) -> list[int]:
    """Prompt indices from the best selection score (SQuAD: F1) to the worst; equal scores keep their
    given order."""
    return sorted(range(len(score)), key=lambda k: -score[k])


def majority_vote(answers: Sequence[str], priority: Sequence[int]) -> str:
    """The answer most prompts agree on.

    Answers are compared after SQuAD normalisation, so "The Cat." and "cat" are one vote. When
    several answers have the most votes, the one given by the prompt earliest in `priority` wins; the
    returned text is that of the winning group's highest-priority prompt.

    Args:
        answers: [K] prompt k's answer to one question.
        priority: the K prompt indices, most trusted first (see `tie_break_order`).

    Returns:
        The chosen answer, verbatim as one of the prompts gave it.
    """
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    rank = {k: r for r, k in enumerate(priority)}
    if sorted(rank) != list(range(len(answers))):
        raise ValueError(f"priority must order all {len(answers)} prompts, got {list(priority)}")
    groups: dict[str, list[int]] = {}
    for k, text in enumerate(answers):
        groups.setdefault(normalize_answer(text), []).append(k)
    voters = min(groups.values(), key=lambda ks: (-len(ks), min(rank[k] for k in ks)))
    return answers[min(voters, key=rank.__getitem__)]


def ensemble_answers(
    bank: PromptBank,
    features: Sequence[Features],
    tasks: Sequence[str | int] | None = None,
    options: GenerationOptions = _DEFAULT,
) -> dict[str, list[str]]:
    """Answer every feature with each of K prompts in one batched pass.

    The features are replicated K times (row k * N + i is feature i under prompt k) and the K * N
    rows go through one length-sorted generation, so an example's K copies, having the same
    length, mostly share a batch.

    Args:
        bank: the prompts and the model.
        features: N tokenized questions (the same tokens for every prompt).
        tasks: the prompts to run (default: all of the bank's).
        options: how `engine.generate_answers` runs (batch_size counts rows, not questions).

    Returns:
        Task name -> its N answers in feature order.
    """
    ks = [bank.index(t) for t in (tasks if tasks is not None else bank.names)]
    n = len(features)
    rows = [f for _ in ks for f in features]
    row_tasks = [k for k in ks for _ in range(n)]
    texts = bank.generate_answers(rows, row_tasks, options)
    return {bank.entry(k).name: texts[j * n : (j + 1) * n] for j, k in enumerate(ks)}


def ensemble_eval(
    bank: PromptBank,
    task: Task,
    examples: Sequence[Any],
    features: Sequence[Features],
    options: GenerationOptions = _DEFAULT,
) -> dict[str, Any]:
    """Score every prompt of the bank and their majority vote, from one batched pass (Table 3 of the paper).

    Each prompt's answers are scored by the task (`Task.score`); the vote is over the answers as shown
    (SQuAD on padded text: the raw context spans), and the voted answers are scored as shown
    (`Task.score_shown`). Ties go to the prompt with the best selection score (F1 for SQuAD) on this
    evaluation set (the paper's SQuAD numbers are on the dev set, which is also where it picks prompts).
    This rank is always available, even for prompts without recorded dev scores; equal scores fall back
    to `--prompt` order.

    Args:
        bank: the frozen model and K >= 1 named prompts.
        task: the task all the prompts answer (its metric scores them and the vote).
        examples: the examples with gold answers.
        features: `features[i]` is the tokenized `examples[features[i].example_index]`.
        options: how generation runs; `batch_size` counts rows (K rows per example), and `env` defaults
            to one process on the bank's device.

    Returns:
        `predictions` (the ensemble's {id: answer}), `prompt_predictions` ({name: {id: answer}}),
        `prompts` ({name: scores}), `prompt_mean` (their mean), `ensemble` ({method, scores...,
        tie_break}) and the ensemble's scores at the top level, like a single prompt's report.
    """
    if len(bank) == 0:
        raise UserError("an ensemble needs at least one --prompt")
    per_prompt = ensemble_answers(
        bank, features, options=replace(options, env=options.env or DistEnv(device=bank.device))
    )
    ordered = [examples[f.example_index] for f in features]
    results = {name: task.score(ordered, texts) for name, texts in per_prompt.items()}
    predictions = {name: r.predictions for name, r in results.items()}
    scores = {name: r.scores() for name, r in results.items()}
    names = list(per_prompt)
    priority = tie_break_order([results[name].score for name in names])
    ids = [ex.id for ex in ordered]
    voted = {
        qid: majority_vote([predictions[name][qid] for name in names], priority) for qid in dict.fromkeys(ids)
    }
    first = {ex.id: ex for ex in ordered}
    ensemble = task.score_shown(list(first.values()), [voted[qid] for qid in first])
    return {
        "predictions": voted,
        "prompt_predictions": predictions,
        "prompts": scores,
        "prompt_mean": _mean(scores),
        "ensemble": {"method": "majority", **ensemble, "tie_break": [names[k] for k in priority]},
        **ensemble,
    }


def _mean(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    values = list(scores.values())
    return {key: math.fsum(s[key] for s in values) / len(values) for key in values[0]}
