"""The soft prompt: P trainable vectors, and how they are initialised.

The prompt knows nothing about T5; `softprompt.modeling.model` decides how it is combined with the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from softprompt.config.choices import PromptInit
from softprompt.errors import ConfigError

# T5's SentencePiece ids are ordered by frequency; the official prompt-tuning code samples the init
# from this many most-common pieces rather than from the whole (noisier) table.
SAMPLED_VOCAB_ROWS = 5000
# prompt_tuning/configs/models/t5_1_1_prompt.gin: `prompt_init/linen.initializers.uniform.scale = 0.5`.
UNIFORM_SCALE = 0.5


class SoftPrompt(nn.Module):
    """P learnable vectors of width d_model, always held in float32.

    The prompt stays float32 even when the model runs in bf16 so that Adafactor's tiny updates
    are not rounded away; it is cast to the model's dtype only when it is prepended.

    Args:
        n_tokens: P, the prompt length.
        d_model: the model's embedding width H.
    """

    def __init__(self, n_tokens: int, d_model: int) -> None:
        super().__init__()
        if n_tokens < 1 or d_model < 1:
            raise ConfigError(
                f"a soft prompt needs n_tokens >= 1 and d_model >= 1, got {n_tokens} and {d_model}"
            )
        self.weight = nn.Parameter(torch.zeros(n_tokens, d_model, dtype=torch.float32))

    @property
    def n_tokens(self) -> int:
        return self.weight.shape[0]

    @property
    def d_model(self) -> int:
        return self.weight.shape[1]

    def forward(self, batch_size: int) -> torch.Tensor:
        """The prompt broadcast over a batch.

        Returns:
            prompt: [B, P, H] float32 (a view, no copy).
        """
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


def initial_prompt(
    init: PromptInit | str,
    n_tokens: int,
    embedding: torch.Tensor,
    *,
    seed: int = 0,
    text: str | None = None,
    tokenizer=None,
    path: str | Path | None = None,
    labels: Sequence[str] = (),
) -> torch.Tensor:
    """Compute the starting values of a prompt.

    Args:
        init: one of `PromptInit`.
        n_tokens: P.
        embedding: the model's input embedding table, [V, H].
        seed: seeds the sampling, so the same seed gives the same prompt.
        text: the string for `text` init.
        tokenizer: needed for `text` init.
        path: a prompt checkpoint directory for `from_file` init.
        labels: the class label strings for `class_label` init (needs `tokenizer`).

    Returns:
        prompt: [P, H] float32.
    """
    init = PromptInit(init)
    vocab, width = embedding.shape
    table = embedding.detach().float()
    gen = torch.Generator().manual_seed(seed)
    if init in (PromptInit.SAMPLED_VOCAB, PromptInit.CLASS_LABEL):
        rows = min(SAMPLED_VOCAB_ROWS, vocab)
        if n_tokens > rows:
            raise ConfigError(
                f"{init.value} init samples without replacement from {rows} rows, so n_tokens must be <= {rows}"
            )
        ids = torch.randperm(rows, generator=gen)[:n_tokens]
        prompt = table[ids].clone()
        if init is PromptInit.CLASS_LABEL:
            # As the official code: the whole prompt from the fallback init, then the first rows replaced.
            prompt[: len(labels)] = label_embeddings(labels, n_tokens, table, tokenizer)
        return prompt
    if init is PromptInit.UNIFORM:
        # flax's uniform(scale) draws U[0, scale), not a symmetric range (t5_1_1_prompt.gin sets scale 0.5).
        return torch.rand(n_tokens, width, generator=gen) * UNIFORM_SCALE
    if init is PromptInit.TEXT:
        if not text or tokenizer is None:
            raise ConfigError("prompt_init 'text' needs a non-empty prompt_init_text")
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise ConfigError(f"prompt_init_text {text!r} tokenizes to nothing; give some words")
        reps = -(-n_tokens // len(ids))
        return table[torch.tensor((ids * reps)[:n_tokens])].clone()
    # FROM_FILE: import here to keep the prompt module free of I/O.
    from softprompt.io.checkpoint import load_prompt

    if path is None:
        raise ConfigError("prompt_init 'from_file' needs prompt_init_file, a prompt checkpoint directory")
    weight, _ = load_prompt(path, expect_d_model=width)
    if weight.shape[0] != n_tokens:
        raise ConfigError(f"the prompt in {path} has {weight.shape[0]} tokens but n_tokens is {n_tokens}")
    return weight


def label_embeddings(
    labels: Sequence[str], n_tokens: int, embedding: torch.Tensor, tokenizer
) -> torch.Tensor:
    """The embedding of each class label string: the mean of its tokens' rows.

    Args:
        labels: K label strings, K <= n_tokens.
        n_tokens: P (labels beyond it have no vector to start).
        embedding: the input embedding table, [V, H].
        tokenizer: tokenizes each label without special tokens.

    Returns:
        labels: [K, H] float32.
    """
    if not labels or tokenizer is None:
        raise ConfigError("prompt_init 'class_label' needs the class labels: --prompt_init_labels yes no ...")
    if len(labels) > n_tokens:
        raise ConfigError(f"{len(labels)} class labels do not fit in n_tokens={n_tokens} prompt vectors")
    rows = []
    for label in labels:
        ids = tokenizer(label, add_special_tokens=False).input_ids
        if not ids:
            raise ConfigError(f"the class label {label!r} tokenizes to nothing; give a label with words")
        rows.append(embedding[torch.tensor(ids)].float().mean(dim=0))
    return torch.stack(rows)
