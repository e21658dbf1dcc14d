"""Greedy answers for a data set: length-sorted batches, sharded over ranks, gathered in order."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from softprompt.data.batching import Collator, Features, length_sorted_indices, shard_indices
from softprompt.inference.options import GenerationOptions
from softprompt.modeling.model import PromptedT5
from softprompt.runtime.distributed import DistEnv, gather_objects, unsharded
from softprompt.runtime.progress import Progress

T = TypeVar("T")
_DEFAULT = GenerationOptions()
# (feature indices [B]) -> (prompts [B, P, H], lengths [B] or None): per-row prompts for mixed batches.
RowPrompts = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU (AMX) or GPU; a no-op for fp32."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def eval_batches(
    features: Sequence[Features], batch_size: int, env: DistEnv, lockstep: bool = False
) -> tuple[list[list[int]], int]:
    """This rank's evaluation batches: a disjoint shard of the features, longest first, cut into batches.

    Each rank takes a disjoint shard (no padding duplicates, so nothing is counted twice) in length order:
    similar lengths share a batch, which wastes little on padding.

    Args:
        features: every feature (all ranks').
        batch_size: features per batch.
        env: the distributed environment.
        lockstep: every rank runs as many batches as the busiest (an FSDP-sharded model gathers weights
            inside forward, so ranks must run the same forwards): the extra ones repeat the first batch
            (or feature 0 on a rank with none) and their results are to be dropped.

    Returns:
        batches: lists of feature indices to run, in order, and how many of them are this rank's own (the
        first ones; the rest are lockstep filler).
    """
    mine = shard_indices(len(features), env.rank, env.world_size)
    order = [mine[i] for i in length_sorted_indices([len(features[i].input_ids) for i in mine])]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    own = len(batches)
    if lockstep and env.distributed:
        filler = batches[0] if batches else [0]
        batches += [filler] * (max(gather_objects(own, env)) - own)
    return batches, own


def decode_answers(tokenizer, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
    """The text of generated ids as T5 decodes them: SentencePiece's ``DecodeIds``, spaces kept.

    T5 evaluates the string that ``seqio.SentencePieceVocabulary.decode`` returns (the ids up to the first
    EOS, through SentencePiece's ``DecodeIds``) and compares it as it is: ``[10998, 3]`` ("▁True", "▁")
    is ``"True "``, which T5's ``string_label_to_class_id`` finds in no label class. transformers' decoder
    gives the same text except at the start: it drops the "▁" of the first token only, while SentencePiece
    drops each piece's leading "▁" for as long as the text is still empty, so ``[3, 10998]`` is
    ``" True"`` in transformers and ``"True"`` in SentencePiece. Removing the leading spaces, and only
    those, gives SentencePiece's text (no T5 piece decodes to anything else SentencePiece would write at
    the start). One difference is kept: an ``<unk>`` or sentinel id is dropped here, where SentencePiece
    writes " ⁇ ".

    Args:
        tokenizer: the T5 tokenizer (transformers).
        ids: [B, T] generated ids; pad and EOS are skipped.

    Returns:
        One answer string per row, with any trailing space the model generated.
    """
    return [text.lstrip(" ") for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@torch.no_grad()
def generate_answers(
    model: PromptedT5,
    tokenizer,
    features: Sequence[Features],
    options: GenerationOptions = _DEFAULT,
    *,
    row_prompts: RowPrompts | None = None,
) -> list[str]:
    """Greedy answers for every feature, in feature order, on every rank.

    Each rank takes a disjoint shard (no padding duplicates, so nothing is counted twice) and
    decodes it longest-first: similar lengths share a batch, which wastes little on padding.

    Args:
        model: the (unwrapped) model.
        tokenizer: decodes the generated ids.
        features: tokenized inputs.
        options: batch size (questions per generation batch on this rank), answer length, ranks,
            precision, lockstep, progress bar.
        row_prompts: per-row prompts for mixed-task or ensemble batches.

    Returns:
        One answer string per feature.
    """
    synced = options.lockstep and options.env is not None and options.env.distributed

    def answer(input_ids: torch.Tensor, mask: torch.Tensor, prompt, lengths) -> list[str]:
        out = model.generate(
            input_ids,
            mask,
            max_new_tokens=options.max_new_tokens,
            prompt=prompt,
            prompt_lengths=lengths,
            synced_gpus=synced,
        )
        return decode_answers(tokenizer, out)

    return map_batches(
        model,
        tokenizer,
        features,
        answer,
        options,
        row_prompts=row_prompts,
        progress="eval",
    )


@torch.no_grad()
def map_batches(
    model: PromptedT5,
    tokenizer,
    features: Sequence[Features],
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], list[T]],
    options: GenerationOptions = _DEFAULT,
    *,
    row_prompts: RowPrompts | None = None,
    progress: str = "",
) -> list[T]:
    """One result per feature, in feature order, on every rank, from `run` over this rank's batches.

    The one evaluation pass of greedy answers and rank classification: the model in eval mode (restored
    after), the FSDP root's own weights gathered for the pass (generate() and encode() bypass its
    forward hooks), this rank's `eval_batches` padded by the `Collator`, bf16 autocast, per-row prompts,
    a progress bar, and every rank's results gathered.

    Args:
        model: the (unwrapped) model.
        tokenizer: gives the pad id.
        features: tokenized inputs.
        run: `(input_ids [B, S], mask [B, S], prompt [B, P, H] or None, prompt_lengths [B] or None)` ->
            one result per row, plain Python values (they travel through `gather_objects`).
        options: batch size (features per batch on this rank), ranks, bf16, lockstep, and whether to
            draw the progress bar (`max_new_tokens` is `run`'s business).
        row_prompts: per-row prompts for mixed-task or ensemble batches.
        progress: the progress bar's label (rank 0 only, when `options.show_progress`).
    """
    env = options.env or DistEnv(device=next(model.parameters()).device)
    bf16 = options.bf16
    was_training = model.training
    model.eval()
    batches, own = eval_batches(features, options.batch_size, env, options.lockstep)
    collate = Collator(pad_token_id=tokenizer.pad_token_id)
    results: dict[int, T] = {}
    bar = Progress(
        total=len(batches), desc=progress, enabled=options.show_progress and env.is_main, unit="batch"
    )
    # `unsharded` is the one owner of gathering an FSDP root outside its forward: it also initialises the
    # root when this pass comes before any training forward (a resumed run that evaluates first).
    with unsharded(model), bar:
        for b, idx in enumerate(batches):
            batch = collate([features[i] for i in idx])
            prompt = lengths = None
            if row_prompts is not None:
                prompt, lengths = row_prompts(torch.tensor(idx))
            with autocast(env.device, bf16):
                out = run(
                    batch["input_ids"].to(env.device), batch["attention_mask"].to(env.device), prompt, lengths
                )
            if b < own:
                results.update(zip(idx, out, strict=True))
            bar.update(1)
    model.train(was_training)
    merged: dict[int, T] = {}
    for part in gather_objects(results, env):
        merged.update(part)
    return [merged[i] for i in range(len(features))]
