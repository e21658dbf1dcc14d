"""Greedy answers for a data set, sharded over ranks, scored with the official SQuAD metric or a text
task's metric."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from softprompt.choices import RankMode
from softprompt.data import Collator, Features, QAExample, length_sorted_indices, shard_indices
from softprompt.distributed import DistEnv, gather_objects
from softprompt.errors import ConfigError
from softprompt.metrics import squad_scores, squad_scores_padded
from softprompt.model import PromptedT5
from softprompt.task import TaskSpec, TextExample
from softprompt.tracking import Progress

# (feature indices [B]) -> (prompts [B, P, H], lengths [B] or None): per-row prompts for mixed batches.
RowPrompts = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class EvalResult:
    """Scores and the answers behind them.

    Attributes:
        exact_match: Official SQuAD v1.1 EM of ``predictions`` against the raw gold answers (a text task:
            its exact match if its metric has one, else None).
        f1: Official SQuAD v1.1 F1, likewise.
        predictions: Question id to the answer scored officially: with padded text, the raw context span
            the generated answer maps back to (the answer as generated when it maps nowhere).
        t5_exact_match: EM the way T5's squad task scores: generated text against padded gold answers
            (None when the text was not padded).
        t5_f1: F1 likewise.
        generated: Question id to the answer as generated, when it differs in kind from ``predictions``
            (padded text); None otherwise.
    """

    exact_match: float | None
    f1: float | None
    predictions: dict[str, str]
    t5_exact_match: float | None = None
    t5_f1: float | None = None
    generated: dict[str, str] | None = None
    metrics: dict[str, float] | None = None
    """A text task's scores (softprompt.task_metrics.score_texts), the selection metric first."""

    @property
    def score(self) -> float:
        """The score that chooses the best checkpoint: F1 for QA, a text task's first metric."""
        if self.metrics is not None:
            return next(iter(self.metrics.values()))
        assert self.f1 is not None
        return self.f1

    def scores(self) -> dict[str, float]:
        """The scores to report: a text task's metrics; for QA exact_match, f1, and with padded text
        t5_exact_match, t5_f1."""
        if self.metrics is not None:
            return dict(self.metrics)
        assert self.exact_match is not None and self.f1 is not None
        out = {"exact_match": self.exact_match, "f1": self.f1}
        if self.t5_exact_match is not None and self.t5_f1 is not None:
            out.update(t5_exact_match=self.t5_exact_match, t5_f1=self.t5_f1)
        return out


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU (AMX) or GPU; a no-op for fp32."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def generate_answers(
    model: PromptedT5,
    tokenizer,
    features: Sequence[Features],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    env: DistEnv | None = None,
    bf16: bool = False,
    row_prompts: RowPrompts | None = None,
    lockstep: bool = False,
    show_progress: bool = False,
) -> list[str]:
    """Greedy answers for every feature, in feature order, on every rank.

    Each rank takes a disjoint shard (no padding duplicates, so nothing is counted twice) and
    decodes it longest-first: similar lengths share a batch, which wastes little on padding.

    Args:
        model: the (unwrapped) model.
        tokenizer: decodes the generated ids.
        features: tokenized inputs.
        batch_size: questions per generation batch on this rank.
        max_new_tokens: the longest answer in tokens.
        env: the distributed environment (default: one process on the model's device).
        bf16: run under bf16 autocast.
        row_prompts: per-row prompts for mixed-task or ensemble batches.
        lockstep: every rank runs the same number of batches (needed when the model is FSDP-sharded).
        show_progress: draw a progress bar (rank 0 only).

    Returns:
        One answer string per feature.
    """
    env = env or DistEnv(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    mine = shard_indices(len(features), env.rank, env.world_size)
    order = [mine[i] for i in length_sorted_indices([len(features[i].input_ids) for i in mine])]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    n_batches = len(batches)
    if lockstep and env.distributed:
        # FSDP gathers weights inside forward, so every rank must run as many forwards as the busiest.
        n_batches = max(gather_objects(len(batches), env))
    collate = Collator(pad_token_id=tokenizer.pad_token_id)
    # generate() bypasses the FSDP root's forward hooks, so gather the root's own (non-block)
    # weights, such as the embedding and the prompt, for the whole pass.
    if hasattr(model, "unshard"):
        model.unshard()
    answers: dict[int, str] = {}
    with Progress(total=n_batches, desc="eval", enabled=show_progress and env.is_main, unit="batch") as bar:
        for b in range(n_batches):
            idx = batches[b] if b < len(batches) else batches[0] if batches else [0]
            batch = collate([features[i] for i in idx])
            input_ids = batch["input_ids"].to(env.device)
            mask = batch["attention_mask"].to(env.device)
            prompt = lengths = None
            if row_prompts is not None:
                prompt, lengths = row_prompts(torch.tensor(idx))
            with autocast(env.device, bf16):
                out = model.generate(
                    input_ids,
                    mask,
                    max_new_tokens=max_new_tokens,
                    prompt=prompt,
                    prompt_lengths=lengths,
                    synced_gpus=lockstep and env.distributed,
                )
            if b < len(batches):
                for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True), strict=True):
                    answers[i] = text.strip()
            bar.update(1)
    if hasattr(model, "reshard"):
        model.reshard()
    model.train(was_training)
    merged: dict[int, str] = {}
    for part in gather_objects(answers, env):
        merged.update(part)
    return [merged[i] for i in range(len(features))]


def evaluate_examples(
    model: PromptedT5,
    tokenizer,
    examples: Sequence[QAExample],
    features: Sequence[Features],
    *,
    punctuation: str = "none",
    **kwargs,
) -> EvalResult:
    """Answer every example and score with the official SQuAD v1.1 EM/F1 (max over gold answers).

    `features[i]` must be the tokenized `examples[features[i].example_index]`; kwargs go to
    `generate_answers`. With padded text (`punctuation` paper or current), answers are mapped back to raw
    context spans for the official scores, and T5's own scores are added (see `squad_scores_padded`).
    """
    texts = generate_answers(model, tokenizer, features, **kwargs)
    predictions = {examples[f.example_index].id: t for f, t in zip(features, texts, strict=True)}
    references = {ex.id: list(ex.answers) for ex in examples}
    if punctuation == "none":
        scores = squad_scores(predictions, references)
        return EvalResult(exact_match=scores["exact_match"], f1=scores["f1"], predictions=predictions)
    contexts = {ex.id: ex.context for ex in examples}
    scores, raw = squad_scores_padded(predictions, references, contexts, punctuation)
    return EvalResult(
        exact_match=scores["exact_match"],
        f1=scores["f1"],
        predictions=raw,
        t5_exact_match=scores["t5_exact_match"],
        t5_f1=scores["t5_f1"],
        generated=predictions,
    )


def evaluate_texts(
    model: PromptedT5,
    tokenizer,
    task: TaskSpec,
    examples: Sequence[TextExample],
    features: Sequence[Features],
    *,
    classify: str = "greedy",
    **kwargs,
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
        **kwargs: `generate_answers` options (batch_size, max_new_tokens, env, bf16, row_prompts, ...).

    Returns:
        The task's scores (`EvalResult.metrics`) and the answers by example id.
    """
    from softprompt.task_metrics import score_texts  # deferred: QA runs never need it

    if classify == RankMode.RANK:
        if not task.classes:
            raise ConfigError(f"--classify rank needs a classification task; {task.name} has no labels")
        from softprompt.rank import rank_labels

        kwargs.pop("max_new_tokens", None)
        picks = rank_labels(model, tokenizer, features, task.classes, **kwargs)
        texts = [task.classes[k] for k in picks]
    else:
        texts = generate_answers(model, tokenizer, features, **kwargs)
    ordered = [examples[f.example_index] for f in features]
    scores = score_texts(task.metric, ordered, texts, task.classes)
    predictions = {ex.id: t for ex, t in zip(ordered, texts, strict=True)}
    return EvalResult(
        exact_match=scores.get("exact_match"),
        f1=scores.get("f1"),
        predictions=predictions,
        metrics=scores,
    )
