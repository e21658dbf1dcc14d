"""Questions and text-task inputs tokenized for answering, and answers mapped back to their contexts.

`PromptBank.prepare` and `softprompt predict` tokenize through here: each row with its own prompt's
settings (`tokenize_by_settings`), and a padded-text prompt's answers are turned back into the
context's own spans (`context_spans`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from softprompt.data.batching import Features
from softprompt.tasks.squad.reader import QAExample, tokenize_examples
from softprompt.tasks.squad.text import raw_answer
from softprompt.tasks.text.features import tokenize_texts
from softprompt.tasks.text.spec import TextExample

__all__ = ["context_spans", "tokenize_by_settings", "tokenize_questions"]


def tokenize_questions(
    tokenizer: Any, questions: Sequence[tuple[str, str]], *, max_source_length: int, punctuation: str
) -> list[Features]:
    """Tokenize `(question, context)` pairs to answer (no gold answers); row i's `example_index` is i."""
    examples = [
        QAExample(id=str(i), question=q, context=c, answers=("",)) for i, (q, c) in enumerate(questions)
    ]
    # max_target_length=2: labels are not used to answer.
    return tokenize_examples(
        examples, tokenizer, max_source_length=max_source_length, max_target_length=2, punctuation=punctuation
    )


def tokenize_by_settings(
    tokenizer: Any, questions: Sequence[tuple[str, str | None]], settings: Sequence[tuple[int, str]]
) -> list[Features]:
    """Tokenize `(question, context)` pairs, pair i with its own `(max_source_length, punctuation)`.

    Pairs that share settings are tokenized together. A pair whose context is None holds a text task's
    finished model input (its template filled in), tokenized as it is.

    Returns:
        One `Features` per pair, in order; `example_index` is the pair's position.
    """
    features: list[Features | None] = [None] * len(questions)
    groups: dict[tuple[int, str, bool], list[int]] = {}
    for i, (setting, (_, context)) in enumerate(zip(settings, questions, strict=True)):
        groups.setdefault((*setting, context is None), []).append(i)
    for (max_source, punctuation, is_text), members in groups.items():
        if is_text:
            texts = [TextExample(id=str(i), inputs=questions[i][0], targets=("",)) for i in members]
            group = tokenize_texts(texts, tokenizer, max_source_length=max_source, max_target_length=2)
        else:
            group = tokenize_questions(
                tokenizer,
                [questions[i] for i in members],  # type: ignore[misc]
                max_source_length=max_source,
                punctuation=punctuation,
            )
        for i, f in zip(members, group, strict=True):
            f.example_index = i
            features[i] = f
    return [f for f in features if f is not None]


def context_spans(
    answers: Sequence[str], contexts: Sequence[str | None], punctuation: str | Sequence[str]
) -> list[str]:
    """Answers as the contexts write them: a prompt trained on T5's padded text answers "U . S .";
    this gives back the context's own "U.S." (an answer that maps to no span, or a text task's answer,
    context None, is kept as generated)."""
    styles = [punctuation] * len(answers) if isinstance(punctuation, str) else list(punctuation)
    spans = [
        None if c is None else raw_answer(a, c, s) for a, c, s in zip(answers, contexts, styles, strict=True)
    ]
    return [a if s is None else s for a, s in zip(answers, spans, strict=True)]
