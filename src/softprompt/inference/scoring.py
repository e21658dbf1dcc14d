"""A data set answered and scored with its task's metric: greedy generation or rank classification."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from softprompt.config.choices import RankMode
from softprompt.data.batching import Features
from softprompt.inference.engine import RowPrompts, generate_answers
from softprompt.inference.options import GenerationOptions
from softprompt.inference.rank import rank_labels
from softprompt.modeling.model import PromptedT5
from softprompt.tasks.base import EvalResult, Task

__all__ = ["evaluate"]

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
