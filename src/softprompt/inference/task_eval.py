"""A text task's answers, greedy or by rank classification, scored with the task's metric."""

from __future__ import annotations

from collections.abc import Sequence

from softprompt.config.choices import RankMode
from softprompt.data.batching import Features
from softprompt.errors import ConfigError
from softprompt.inference.engine import EvalResult, RowPrompts, generate_answers
from softprompt.inference.options import GenerationOptions
from softprompt.inference.rank import rank_labels
from softprompt.modeling.model import PromptedT5
from softprompt.tasks.metrics.text import score_texts
from softprompt.tasks.text.spec import TaskSpec, TextExample

__all__ = ["evaluate_texts"]

_DEFAULT = GenerationOptions()


def evaluate_texts(
    model: PromptedT5,
    tokenizer,
    task: TaskSpec,
    examples: Sequence[TextExample],
    features: Sequence[Features],
    options: GenerationOptions = _DEFAULT,
    *,
    classify: str = "greedy",
    row_prompts: RowPrompts | None = None,
) -> EvalResult:
    """Answer every example of a text task and score it with the task's metric.

    Args:
        model: the (unwrapped) model.
        tokenizer: decodes (and, for rank classification, encodes the labels).
        task: the task (its metric and label strings).
        examples: the examples with gold targets.
        features: one per example, `features[i].example_index` pointing into `examples`.
        classify: `greedy` generates freely; `rank` picks the label string with the highest summed
            log-likelihood (classification tasks only).
        options: how `generate_answers` (or rank classification, which ignores `max_new_tokens`) runs.
        row_prompts: per-row prompts for mixed-task or ensemble batches.

    Returns:
        The task's scores (`EvalResult.metrics`) and the answers by example id.
    """
    if classify == RankMode.RANK:
        if not task.classes or task.target_template or task.target_field:
            raise ConfigError(
                f"--classify rank scores label strings, but the {task.name} task's targets are not its labels; "
                "use --classify greedy"
            )
        picks = rank_labels(model, tokenizer, features, task.classes, options, row_prompts=row_prompts)
        texts = [task.classes[k] for k in picks]
    else:
        texts = generate_answers(model, tokenizer, features, options, row_prompts=row_prompts)
    ordered = [examples[f.example_index] for f in features]
    scores = score_texts(task.metric, ordered, texts, task.classes)
    predictions = {ex.id: t for ex, t in zip(ordered, texts, strict=True)}
    return EvalResult(
        exact_match=scores.get("exact_match"),
        f1=scores.get("f1"),
        predictions=predictions,
        metrics=scores,
    )
