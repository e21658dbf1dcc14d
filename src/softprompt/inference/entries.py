"""A prompt bank's entries and prepared rows, and the checks a prompt passes before it joins a bank."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import torch

from softprompt.data.batching import Features
from softprompt.errors import CheckpointError, UserError
from softprompt.io.checkpoint import PromptConfig, same_model
from softprompt.tasks.base import Task

__all__ = ["BankEntry", "PreparedRow", "check_new_prompt"]


@dataclass(frozen=True)
class BankEntry:
    """One prompt of the bank.

    Attributes:
        name: the task name rows refer to.
        weight: [P, H] float32, on the bank's device.
        config: how the prompt was trained (tokenization settings, base model, dev scores).
        task: the task the prompt was trained on (its saved `task`, else SQuAD in its punctuation).
    """

    name: str
    weight: torch.Tensor
    config: PromptConfig
    task: Task

    def describe(self) -> dict[str, Any]:
        """The prompt's metadata (one item of `GET /v1/tasks`)."""
        c = self.config
        return {
            "name": self.name,
            "n_tokens": int(self.weight.shape[0]),
            "d_model": int(self.weight.shape[1]),
            "base_model": c.base_model,
            "init": c.init,
            "max_source_length": c.max_source_length,
            "punctuation": c.punctuation,
            "dev_f1": number_or_none(c.extra.get("dev_f1")),
            "dev_exact_match": number_or_none(c.extra.get("dev_exact_match")),
            "input_template": (c.task or {}).get("input_template"),
            "labels": list(self.task.classes) or None,
            "extra": dict(c.extra),
        }


def number_or_none(value: Any) -> float | None:
    """A recorded number as a float; None for anything else (a bool, a string, a missing value)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class PreparedRow:
    """One question tokenised for its task (`PromptBank.prepare`), ready to join any batch.

    `serve` prepares requests before they queue, so that the model thread only runs the model and the
    batcher knows each row's length.

    Attributes:
        features: the tokenised input.
        task: the task's position in the bank.
        example: the request as its task's example (`Task.answer_text` reads it: SQuAD's padded-text
            answers map back to its context).
        length: the encoder positions the row takes: its prompt's vectors plus its input tokens.
    """

    features: Features
    task: int
    example: Any
    length: int


def check_new_prompt(
    name: str,
    weight: torch.Tensor,
    config: PromptConfig,
    *,
    taken: Container[str],
    d_model: int,
    base_model: str | None,
) -> None:
    """Refuse a prompt a bank cannot hold: a taken name, a shape other than [P, d_model], another base model.

    Raises:
        UserError: `name` is in `taken`.
        CheckpointError: the weight's shape, or the base model (when `base_model` is given).
    """
    if name in taken:
        raise UserError(f"a prompt named '{name}' is already loaded; give each prompt its own name")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise CheckpointError(f"prompt '{name}' must be a [P, H] tensor, got shape {tuple(weight.shape)}")
    if weight.shape[1] != d_model:
        raise CheckpointError(
            f"prompt '{name}' is {weight.shape[1]} wide but the model's d_model is {d_model}; "
            f"it was trained for {config.base_model}"
        )
    # The recorded fingerprint counts as load_prompt counts it: a renamed copy of the model is the model.
    fingerprint = config.extra.get("base_model_fingerprint")
    if base_model is not None and not same_model(config.base_model, base_model, fingerprint):
        raise CheckpointError(
            f"prompt '{name}' was trained for {config.base_model}, but this bank's model is "
            f"{base_model}; load it with the model it was trained on"
        )
