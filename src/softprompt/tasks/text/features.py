"""A text task's examples tokenized for T5: :func:`tokenize_texts` into softprompt.data.batching.Features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from softprompt.data.batching import Features
from softprompt.tasks.text.spec import TextExample

__all__ = ["tokenize_texts"]


def tokenize_texts(
    examples: Sequence[TextExample],
    tokenizer: Any,
    *,
    max_source_length: int = 512,
    max_target_length: int = 32,
    for_training: bool = False,
) -> list[Features]:
    """Tokenize text examples for T5: the input cut at its end to fit, EOS appended to both sides.

    Args:
        examples: The examples.
        tokenizer: A fast T5 tokenizer.
        max_source_length: Maximum input length including EOS.
        max_target_length: Maximum target length including EOS.
        for_training: One feature per target (ReCoRD's several answers each train, as T5 does); else one
            per example, with the first target.

    Returns:
        Features whose ``example_index`` points into ``examples``.
    """
    if max_source_length < 2 or max_target_length < 2:
        raise ValueError("max_source_length and max_target_length must be at least 2")
    if not examples:
        return []
    eos = tokenizer.eos_token_id
    pairs = [
        (i, target)
        for i, ex in enumerate(examples)
        for target in (ex.targets if for_training else ex.targets[:1])
    ]
    input_ids = tokenizer([ex.inputs for ex in examples], add_special_tokens=False)["input_ids"]
    target_ids = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    features = []
    for (i, _), t_ids in zip(pairs, target_ids, strict=True):
        ids = input_ids[i]
        truncated = len(ids) > max_source_length - 1
        features.append(
            Features(
                input_ids=[*ids[: max_source_length - 1], eos],
                labels=[*t_ids[: max_target_length - 1], eos],
                example_index=i,
                truncated=truncated,
            )
        )
    return features
