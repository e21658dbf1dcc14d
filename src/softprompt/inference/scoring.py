"""A data set answered and scored with its task's metric: greedy generation or rank classification."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from softprompt.config.choices import RankMode
from softprompt.data.batching import Features
from softprompt.inference.engine import RowPrompts, generate_answers
from softprompt.inference.options import GenerationOptions
from softprompt.inference.rank import rank_labels
from softprompt.modeling.model import PromptedT5
from softprompt.modeling.prompt_table import PromptTable
from softprompt.tasks.base import EvalResult, Task

__all__ = ["PromptEval", "evaluate", "evaluate_mixed"]

_DEFAULT = GenerationOptions()


def evaluate(
    model: PromptedT5,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Any],
    features: Sequence[Features],
    options: GenerationOptions = _DEFAULT,
    *,
    classify: str = "greedy",
    row_prompts: RowPrompts | None = None,
) -> EvalResult:
    """Answer every example and score the answers with the task's metric (`Task.score`).

    Args:
        model: the (unwrapped) model.
        tokenizer: decodes (and, for rank classification, encodes the labels).
        task: the task: its metric, and for rank classification its label strings.
        examples: the examples with gold targets.
        features: one per scored example, `features[i].example_index` pointing into `examples`.
        options: how `generate_answers` (or rank classification, which ignores `max_new_tokens`) runs.
        classify: `greedy` generates freely; `rank` picks the label string with the highest summed
            log-likelihood (`Task.rank_classes`: classification tasks only).
        row_prompts: per-row prompts for mixed-task or ensemble batches.

    Returns:
        The task's scores and the answers by example id.

    Raises:
        ConfigError: `rank` for a task whose targets are not its label strings.
    """
    if classify == RankMode.RANK:
        classes = task.rank_classes()
        picks = rank_labels(model, tokenizer, features, classes, options, row_prompts=row_prompts)
        texts = [classes[k] for k in picks]
    else:
        texts = generate_answers(model, tokenizer, features, options, row_prompts=row_prompts)
    return task.score([examples[f.example_index] for f in features], texts)


@dataclass(frozen=True)
class PromptEval:
    """One prompt's share of a mixed evaluation: its prompt, its task and its dev set.

    Attributes:
        prompt: the prompt's vectors [P, H] (prompts of one evaluation may differ in length P).
        task: the task whose metric scores this prompt's answers.
        examples: its examples with gold targets.
        features: `features[i]` is the tokenized `examples[features[i].example_index]`.
        max_new_tokens: the longest answer to generate for this prompt.
    """

    prompt: torch.Tensor
    task: Task
    examples: Sequence[Any]
    features: Sequence[Features]
    max_new_tokens: int


def evaluate_mixed(
    model: PromptedT5, tokenizer: Any, parts: Sequence[PromptEval], options: GenerationOptions = _DEFAULT
) -> list[EvalResult]:
    """Answer every prompt's dev set in shared mixed batches and score each with its own task's metric.

    All prompts' features go through one `generate_answers` pass (per answer length), length-sorted
    regardless of prompt, each row driven by its own prompt (the `row_prompts` callback, as the prompt
    bank serves mixed tasks): K small dev sets fill the batches that one of them alone leaves half empty.
    Prompts asking for different answer lengths get one pass per length, so each prompt's answers are
    the ones `evaluate` with that prompt alone generates.

    Args:
        model: the frozen (unwrapped) model; its own prompt, if any, is not used.
        tokenizer: decodes the answers.
        parts: the prompts to evaluate, each with its task, data and answer length.
        options: how generation runs (`batch_size` counts rows of any prompt; `max_new_tokens` is each
            part's own).

    Returns:
        Each part's `EvalResult`, in `parts` order (as `evaluate` would return it for that part alone).
    """
    texts: list[list[str]] = [[] for _ in parts]
    for length in sorted({p.max_new_tokens for p in parts}):
        ks = [k for k, p in enumerate(parts) if p.max_new_tokens == length]
        table = PromptTable(parts[ks[0]].prompt.shape[-1], next(model.parameters()).device)
        rows: list[Features] = []
        owner: list[int] = []  # each row's index into `table`
        for j, k in enumerate(ks):
            table.append(parts[k].prompt.detach().float().to(table.table.device))
            rows += parts[k].features
            owner += [j] * len(parts[k].features)
        row_table = torch.tensor(owner, dtype=torch.long)
        answers = generate_answers(
            model,
            tokenizer,
            rows,
            replace(options, max_new_tokens=length),
            row_prompts=lambda idx, t=table, r=row_table: t.stack(r[idx]),
        )
        start = 0
        for k in ks:
            n = len(parts[k].features)
            texts[k], start = answers[start : start + n], start + n
    return [
        p.task.score([p.examples[f.example_index] for f in p.features], t)
        for p, t in zip(parts, texts, strict=True)
    ]
