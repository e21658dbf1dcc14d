"""Rank classification: score every label string under the model and pick the likeliest, instead of generating.

What T5's evaluation calls rank classification: for a classification task with label strings
`labels` (e.g. `["entailment", "not_entailment"]`), each input's answer is the label whose target
sequence (the label's tokens + EOS, exactly as training targets are built) has the highest summed
log-likelihood `sum_t log p(y_t | y_<t, x)` under the model with its prompt. The answer is always one of
the labels, whatever the model would have generated.

Each batch runs the encoder once (`PromptedT5.encode`, the prompt joined in front) and decodes every
label against the same encoder states, teacher-forced (`PromptedT5.label_logits`): the states are
repeated once per label, so all L labels of B inputs are one decoder pass of B * L rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from softprompt.data.batching import Features
from softprompt.inference.engine import RowPrompts, map_batches
from softprompt.inference.options import GenerationOptions
from softprompt.modeling.model import PromptedT5
from softprompt.runtime.distributed import DistEnv

_DEFAULT = GenerationOptions()


def label_targets(tokenizer, labels: Sequence[str]) -> torch.Tensor:
    """The target ids of each label string, as training builds targets: the text's tokens, then EOS.

    Args:
        tokenizer: the model's tokenizer.
        labels: L label strings.

    Returns:
        [L, T] ids, padded with -100 after each label's EOS (T = the longest label's length + 1).
    """
    if len(labels) == 0:
        raise ValueError("rank classification needs at least one label string")
    ids = [
        [*t, tokenizer.eos_token_id] for t in tokenizer(list(labels), add_special_tokens=False)["input_ids"]
    ]
    out = torch.full((len(ids), max(len(t) for t in ids)), -100, dtype=torch.long)
    for row, t in zip(out, ids, strict=True):
        row[: len(t)] = torch.tensor(t)
    return out


def score_batch(
    model: PromptedT5,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    targets: torch.Tensor,
    prompt: torch.Tensor | None = None,
    prompt_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed log-likelihood of every label for every row of one batch: one encoder pass, one decoder pass.

    Args:
        model: the (unwrapped, eval-mode) model.
        input_ids: [B, S].
        attention_mask: [B, S].
        targets: [L, T] label ids from `label_targets`, -100 padded, on the model's device.
        prompt: optional per-row prompts [B, P, H].
        prompt_lengths: optional [B] real prompt lengths.

    Returns:
        [B, L] float32 (summed in fp32, or fp64 for an fp64 model): `sum_t log p(y_t | y_<t, x)` of label l
        for row b.
    """
    states, mask = model.encode(input_ids, attention_mask, prompt, prompt_lengths)  # [B, S', H], [B, S']
    n_labels = targets.shape[0]
    # Row b * L + l of the decoder batch scores label l against row b's encoder states.
    states = states.repeat_interleave(n_labels, dim=0)  # [B * L, S', H]
    mask = mask.repeat_interleave(n_labels, dim=0)
    tiled = targets.repeat(input_ids.shape[0], 1)  # [B * L, T]
    logits = model.label_logits(states, mask, tiled)  # [B * L, T, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: normalise in fp32
    # log_softmax at the target token only: its logit minus the log-partition, no second [B * L, T, V] tensor.
    picked = logits.gather(-1, tiled.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B * L, T]
    token_logp = picked - torch.logsumexp(logits, dim=-1)
    return token_logp.masked_fill(tiled == -100, 0.0).sum(dim=1).view(-1, n_labels).float()


@torch.no_grad()
def same_token_labels(tokenizer, labels: Sequence[str]) -> list[tuple[str, ...]]:
    """Groups of distinct label strings that tokenize to the same ids (e.g. each to `<unk>`): rank
    classification scores them alike, so it cannot tell them apart."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for label, row in zip(labels, label_targets(tokenizer, labels).tolist(), strict=True):
        group = groups.setdefault(tuple(row), [])
        if label not in group:
            group.append(label)
    return [tuple(g) for g in groups.values() if len(g) > 1]


_WARNED: set[tuple[str, ...]] = set()  # a server ranks the same labels on every request: say it once


def warn_same_token_labels(tokenizer, labels: Sequence[str]) -> None:
    """One stderr line per group of `same_token_labels` (once per process): rank accuracy would be
    meaningless."""
    import sys

    for group in same_token_labels(tokenizer, labels):
        if group in _WARNED:
            continue
        _WARNED.add(group)
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(group[0], add_special_tokens=False)["input_ids"])
        print(
            f"softprompt: warning: the labels {', '.join(repr(g) for g in group)} tokenize identically "
            f"({' '.join(tokens)}), so rank classification cannot tell them apart; choose label strings "
            "the tokenizer spells differently",
            file=sys.stderr,
            flush=True,
        )


def label_log_likelihoods(
    model: PromptedT5,
    tokenizer,
    features: Sequence[Features],
    labels: Sequence[str],
    options: GenerationOptions = _DEFAULT,
    *,
    row_prompts: RowPrompts | None = None,
) -> torch.Tensor:
    """Every label's summed log-likelihood for every feature, in feature order, on every rank.

    Sharded and batched like `evaluate.generate_answers` (each rank scores a disjoint shard, longest
    inputs first, and the scores are gathered); each batch runs the encoder once for all labels.

    Args:
        model: the (unwrapped) model.
        tokenizer: tokenizes the labels (the model's tokenizer).
        features: tokenized inputs (their `labels` are not used).
        labels: the L label strings.
        options: `batch_size` inputs per batch on this rank (the decoder runs batch_size * L rows at
            once, with [batch_size * L, T, vocab] logits: lower it for many or long labels), ranks, bf16,
            lockstep, progress bar; `max_new_tokens` is not used (whole labels are scored).
        row_prompts: per-row prompts for mixed-task or ensemble batches.

    Returns:
        [N, L] float32 on the CPU: `log p(label l | feature n)` summed over the label's tokens and EOS.
    """
    env = options.env or DistEnv(device=next(model.parameters()).device)
    if env.is_main:
        warn_same_token_labels(tokenizer, labels)
    # Labels with the same tokens (a label given twice) are scored once, so they tie exactly.
    targets, label_row = torch.unique(label_targets(tokenizer, labels), dim=0, return_inverse=True)
    if not features:
        return torch.zeros(0, len(labels))
    targets = targets.to(env.device)

    def score(input_ids: torch.Tensor, mask: torch.Tensor, prompt, lengths) -> list[list[float]]:
        # Plain lists travel through gather_objects (a tensor row would pickle its whole batch's storage).
        return score_batch(model, input_ids, mask, targets, prompt, lengths).tolist()

    scores = map_batches(
        model,
        tokenizer,
        features,
        score,
        replace(options, env=env),
        row_prompts=row_prompts,
        progress="rank",
    )
    return torch.tensor(scores, dtype=torch.float32)[:, label_row]


def rank_labels(
    model: PromptedT5,
    tokenizer,
    features: Sequence[Features],
    labels: Sequence[str],
    options: GenerationOptions = _DEFAULT,
    *,
    row_prompts: RowPrompts | None = None,
) -> list[int]:
    """Rank classification: for every feature, the index of its likeliest label (ties go to the lower index).

    Args:
        model: the (unwrapped) model.
        tokenizer: the model's tokenizer.
        features: tokenized inputs.
        labels: the L label strings.
        options, row_prompts: as in `label_log_likelihoods`.

    Returns:
        One label index per feature, in feature order, on every rank.
    """
    scores = label_log_likelihoods(model, tokenizer, features, labels, options, row_prompts=row_prompts)
    # torch.argmax returns the first maximal index, so equal scores pick the lower label index.
    return scores.argmax(dim=1).tolist()
