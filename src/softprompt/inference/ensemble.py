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
from softprompt.tasks.metrics.squad import normalize_answer, squad_scores, squad_scores_padded
from softprompt.tasks.squad.reader import QAExample

__all__ = ["ensemble_answers", "ensemble_eval", "majority_vote", "tie_break_order"]

_DEFAULT = GenerationOptions()


def tie_break_order(f1: Sequence[float]) -> list[int]:
    """Prompt indices from the best F1 to the worst; equal F1s keep their given order."""
    return sorted(range(len(f1)), key=lambda k: -f1[k])


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
    examples: Sequence[QAExample],
    features: Sequence[Features],
    options: GenerationOptions = _DEFAULT,
    *,
    punctuation: str = "none",
) -> dict[str, Any]:
    """Score every prompt of the bank and their majority vote, from one batched pass (Table 3 of the paper).

    Ties go to the prompt with the best F1 on this evaluation set (the paper's SQuAD numbers are on
    the dev set, which is also where it picks prompts). This rank is always available, even for
    prompts without recorded dev scores; equal F1s fall back to `--prompt` order.

    Args:
        bank: the frozen model and K >= 1 named prompts.
        examples: the questions with gold answers.
        features: `features[i]` is the tokenized `examples[features[i].example_index]`.
        options: how generation runs; `batch_size` counts rows (K rows per question), and `env` defaults
            to one process on the bank's device.
        punctuation: the text format the prompts were trained with; with padded text each answer is
            mapped back to its raw context span before scoring and voting (official scores only).

    Returns:
        `predictions` (the ensemble's {id: answer}), `prompts` ({name: {exact_match, f1}}),
        `prompt_mean` (their mean), `ensemble` ({method, exact_match, f1, tie_break}) and the
        ensemble's `exact_match` / `f1` at the top level, like a single prompt's report.
    """
    if len(bank) == 0:
        raise UserError("an ensemble needs at least one --prompt")
    per_prompt = ensemble_answers(
        bank, features, options=replace(options, env=options.env or DistEnv(device=bank.device))
    )
    ids = [examples[f.example_index].id for f in features]
    references = {ex.id: list(ex.answers) for ex in examples}
    predictions = {name: dict(zip(ids, texts, strict=True)) for name, texts in per_prompt.items()}
    if punctuation != "none":
        contexts = {ex.id: ex.context for ex in examples}
        predictions = {
            name: squad_scores_padded(p, references, contexts, punctuation)[1]
            for name, p in predictions.items()
        }
    scores = {name: squad_scores(p, references) for name, p in predictions.items()}
    names = list(per_prompt)
    priority = tie_break_order([scores[name]["f1"] for name in names])
    voted = {
        qid: majority_vote([predictions[name][qid] for name in names], priority) for qid in dict.fromkeys(ids)
    }
    ensemble = squad_scores(voted, references)
    return {
        "predictions": voted,
        "prompt_predictions": predictions,
        "prompts": scores,
        "prompt_mean": _mean(scores),
        "ensemble": {
            "method": "majority",
            "exact_match": ensemble["exact_match"],
            "f1": ensemble["f1"],
            "tie_break": [names[k] for k in priority],
        },
        "exact_match": ensemble["exact_match"],
        "f1": ensemble["f1"],
    }


def _mean(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    values = list(scores.values())
    return {key: math.fsum(s[key] for s in values) / len(values) for key in ("exact_match", "f1")}
