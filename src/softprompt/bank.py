"""Many soft prompts on one frozen model: mixed-prompt batches, and majority-vote ensembles.

Prompt tuning keeps the model frozen, so one copy of it can serve any number of tasks at once
(section 1 of Lester et al., 2021): each row of a batch carries its own prompt. Rows are
independent, so row i of a mixed batch gives the answer it gives in a batch of its own prompt; the
same machinery runs a K-prompt ensemble over a data set in one batched pass (the paper's Table 3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from softprompt.checkpoint import PromptConfig, load_prompt, same_model
from softprompt.data import Features, QAExample, tokenize_examples
from softprompt.distributed import DistEnv
from softprompt.errors import CheckpointError, UserError
from softprompt.evaluate import RowPrompts, generate_answers
from softprompt.metrics import normalize_answer, squad_scores, squad_scores_padded
from softprompt.model import PromptedT5
from softprompt.textformat import raw_answer

if TYPE_CHECKING:
    from softprompt.inference import Loaded

__all__ = [
    "PromptBank",
    "UnknownTaskError",
    "ensemble_answers",
    "ensemble_eval",
    "majority_vote",
    "tie_break_order",
]


class UnknownTaskError(UserError):
    """A row asked for a prompt the bank does not hold."""


@dataclass(frozen=True)
class BankEntry:
    """One prompt of the bank.

    Attributes:
        name: the task name rows refer to.
        weight: [P, H] float32, on the bank's device.
        config: how the prompt was trained (tokenization settings, base model, dev scores).
    """

    name: str
    weight: torch.Tensor
    config: PromptConfig


class PromptBank:
    """Named soft prompts for one frozen model, usable together in one batch.

    The prompts live in one padded table [K, Pmax, H] so that a batch's prompts are a single index
    into it; prompts of different lengths are allowed and each row is told its real length.

    Args:
        model: the frozen model (its own prompt, if any, is ignored: every row brings one).
        tokenizer: the model's tokenizer.
        base_model: the model's hub id or path; when given, prompts trained for another model are
            refused. None skips the check (random-init models have no identity to compare).
    """

    def __init__(self, model: PromptedT5, tokenizer: Any, *, base_model: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.d_model: int = model.model.config.d_model
        self.device: torch.device = next(model.parameters()).device
        self._entries: list[BankEntry] = []
        self._index: dict[str, int] = {}
        self._table = torch.zeros(0, 0, self.d_model, device=self.device)  # [K, Pmax, H]
        self._lengths = torch.zeros(0, dtype=torch.long, device=self.device)  # [K]

    @classmethod
    def from_loaded(cls, loaded: Loaded, base_model: str | None = None) -> PromptBank:
        """A bank over the model and every prompt of `inference.load_model_and_prompts`.

        Args:
            loaded: the model, tokenizer and named prompts (already checked against the model).
            base_model: see the class docstring.
        """
        bank = cls(loaded.model, loaded.tokenizer, base_model=base_model)
        for name, (weight, config) in loaded.prompts.items():
            bank.add(name, weight, config)
        return bank

    # ------------------------------------------------------------------------------------------------
    # Contents

    @property
    def names(self) -> list[str]:
        """Task names, in the order they were added (a row's task index is its position here)."""
        return [e.name for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def entry(self, task: str | int) -> BankEntry:
        """The prompt named `task` (or at position `task`)."""
        return self._entries[self.index(task)]

    def index(self, task: str | int) -> int:
        """The position of a task in the bank.

        Raises:
            UnknownTaskError: no prompt has that name; the message lists the loaded ones.
        """
        if isinstance(task, int):
            if not 0 <= task < len(self._entries):
                raise UnknownTaskError(f"task index {task} is out of range: the bank holds {len(self)}")
            return task
        found = self._index.get(task)
        if found is None:
            loaded = ", ".join(self.names) or "none"
            raise UnknownTaskError(f"unknown task '{task}'; loaded tasks: {loaded}")
        return found

    def add(self, name: str, weight: torch.Tensor, config: PromptConfig) -> None:
        """Add a prompt under `name`.

        Args:
            name: the task name rows will use; must be new.
            weight: [P, H] the prompt vectors.
            config: the prompt's config.

        Raises:
            CheckpointError: the prompt is not [P, d_model], or was trained for another base model.
            UserError: `name` is taken.
        """
        if name in self._index:
            raise UserError(f"a prompt named '{name}' is already loaded; give each prompt its own name")
        if weight.dim() != 2 or weight.shape[0] < 1:
            raise CheckpointError(f"prompt '{name}' must be a [P, H] tensor, got shape {tuple(weight.shape)}")
        if weight.shape[1] != self.d_model:
            raise CheckpointError(
                f"prompt '{name}' is {weight.shape[1]} wide but the model's d_model is {self.d_model}; "
                f"it was trained for {config.base_model}"
            )
        if self.base_model is not None and not same_model(config.base_model, self.base_model):
            raise CheckpointError(
                f"prompt '{name}' was trained for {config.base_model}, but this bank's model is "
                f"{self.base_model}; load it with the model it was trained on"
            )
        weight = weight.detach().to(self.device, torch.float32)
        self._entries.append(BankEntry(name=name, weight=weight, config=config))
        self._index[name] = len(self._entries) - 1
        self._rebuild()

    def add_dir(self, name: str, directory: str) -> None:
        """Load a prompt checkpoint directory (safetensors only) and add it under `name`."""
        weight, config = load_prompt(
            directory, expect_d_model=self.d_model, expect_base_model=self.base_model
        )
        self.add(name, weight, config)

    def _rebuild(self) -> None:
        p_max = max(e.weight.shape[0] for e in self._entries)
        table = torch.zeros(len(self._entries), p_max, self.d_model, device=self.device)
        for k, e in enumerate(self._entries):
            table[k, : e.weight.shape[0]] = e.weight
        self._table = table
        self._lengths = torch.tensor([e.weight.shape[0] for e in self._entries], device=self.device)

    # ------------------------------------------------------------------------------------------------
    # Batches

    def stack(self, tasks: torch.Tensor | Sequence[int | str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row prompts for a batch.

        Args:
            tasks: [B] task indices (or names) of the rows.

        Returns:
            prompt: [B, P, H] float32 with P the longest prompt of this batch (not of the bank, so a
            batch of short prompts pays for no padding), and lengths: [B], or None when every row's
            prompt is P long.
        """
        if not isinstance(tasks, torch.Tensor):
            tasks = torch.tensor([self.index(t) for t in tasks], dtype=torch.long)
        if len(self._entries) == 0:
            raise UnknownTaskError("the prompt bank is empty; add a prompt first")
        tasks = tasks.to(self.device)
        lengths = self._lengths[tasks]
        p = int(lengths.max())
        prompt = self._table[tasks, :p]
        return prompt, None if bool((lengths == p).all()) else lengths

    def row_prompts(self, row_tasks: Sequence[int] | torch.Tensor) -> RowPrompts:
        """The `row_prompts` callback of `evaluate.generate_answers` for features whose row i uses
        task `row_tasks[i]`."""
        table = torch.as_tensor(row_tasks, dtype=torch.long)
        return lambda idx: self.stack(table[idx])

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tasks: torch.Tensor | Sequence[int | str],
        max_new_tokens: int = 32,
    ) -> torch.Tensor:
        """Greedy answers for a batch whose rows use different prompts.

        Args:
            input_ids: [B, S].
            attention_mask: [B, S].
            tasks: [B] each row's task index or name.
            max_new_tokens: the longest answer in tokens.

        Returns:
            token ids: [B, <= max_new_tokens + 1].
        """
        prompt, lengths = self.stack(tasks)
        return self.model.generate(
            input_ids.to(self.device),
            attention_mask.to(self.device),
            max_new_tokens=max_new_tokens,
            prompt=prompt,
            prompt_lengths=lengths,
        )

    def tokenize(self, rows: Sequence[tuple[str, str, str]]) -> tuple[list[Features], list[int]]:
        """Tokenize `(task, question, context)` rows, each with its own prompt's settings.

        Returns:
            One `Features` per row, in row order, and each row's task index.

        Raises:
            UnknownTaskError: a row names a task the bank does not hold.
        """
        tasks = [self.index(task) for task, _, _ in rows]
        features: list[Features | None] = [None] * len(rows)
        # Rows whose prompts were trained with the same input settings are tokenized together.
        groups: dict[tuple[int, str], list[int]] = {}
        for i, k in enumerate(tasks):
            config = self._entries[k].config
            groups.setdefault((config.max_source_length, config.punctuation), []).append(i)
        for (max_source, punctuation), members in groups.items():
            examples = [
                QAExample(id=str(i), question=rows[i][1], context=rows[i][2], answers=("",)) for i in members
            ]
            # max_target_length=2, as `inference.predict_answers`: labels are not used to answer.
            group = tokenize_examples(
                examples,
                self.tokenizer,
                max_source_length=max_source,
                max_target_length=2,
                punctuation=punctuation,
            )
            for i, f in zip(members, group, strict=True):
                f.example_index = i
                features[i] = f
        return [f for f in features if f is not None], tasks

    def answer(
        self,
        rows: Sequence[tuple[str, str, str]],
        *,
        batch_size: int = 32,
        max_new_tokens: int = 32,
        bf16: bool = False,
    ) -> list[str]:
        """Answer `(task, question, context)` rows of any mix of tasks.

        Rows are sorted by length and cut into batches of `batch_size` regardless of task, so a
        batch usually mixes prompts; each answer equals `inference.predict_answers` with that row's
        prompt.

        Returns:
            One answer per row, in row order.
        """
        if not rows:
            return []
        features, tasks = self.tokenize(rows)
        answers = generate_answers(
            self.model,
            self.tokenizer,
            features,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            env=DistEnv(device=self.device),
            bf16=bf16,
            row_prompts=self.row_prompts(tasks),
        )
        # Prompts trained on T5's padded text answer "U . S ."; give back the context's own "U.S.".
        out = []
        for answer, row, k in zip(answers, rows, tasks, strict=True):
            span = raw_answer(answer, row[2], self._entries[k].config.punctuation)
            out.append(answer if span is None else span)
        return out

    def describe(self) -> list[dict[str, Any]]:
        """Metadata of every prompt, in bank order (what `GET /v1/tasks` serves)."""
        out = []
        for e in self._entries:
            c = e.config
            out.append(
                {
                    "name": e.name,
                    "n_tokens": int(e.weight.shape[0]),
                    "d_model": int(e.weight.shape[1]),
                    "base_model": c.base_model,
                    "init": c.init,
                    "max_source_length": c.max_source_length,
                    "punctuation": c.punctuation,
                    "dev_f1": _number(c.extra.get("dev_f1")),
                    "dev_exact_match": _number(c.extra.get("dev_exact_match")),
                    "extra": dict(c.extra),
                }
            )
        return out


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ----------------------------------------------------------------------------------------------------
# Ensembles


def tie_break_order(f1: Sequence[float]) -> list[int]:
    """Prompt indices from the best F1 to the worst; equal F1s keep their given order."""
    return sorted(range(len(f1)), key=lambda k: -f1[k])


def majority_vote(answers: Sequence[str], priority: Sequence[int]) -> str:
    """The answer most prompts agree on.

    Answers are compared after SQuAD normalisation, so "The Cat." and "cat" are one vote. When
    several answers have the most votes, the one given by the prompt earliest in `priority` wins; the
    returned text is that of the winning group's highest-priority prompt.

    Args:
        answers: [K] prompt k's answer to one question.
        priority: the K prompt indices, most trusted first (see `tie_break_order`).

    Returns:
        The chosen answer, verbatim as one of the prompts gave it.
    """
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    rank = {k: r for r, k in enumerate(priority)}
    if sorted(rank) != list(range(len(answers))):
        raise ValueError(f"priority must order all {len(answers)} prompts, got {list(priority)}")
    groups: dict[str, list[int]] = {}
    for k, text in enumerate(answers):
        groups.setdefault(normalize_answer(text), []).append(k)
    voters = min(groups.values(), key=lambda ks: (-len(ks), min(rank[k] for k in ks)))
    return answers[min(voters, key=rank.__getitem__)]


def ensemble_answers(
    bank: PromptBank,
    features: Sequence[Features],
    tasks: Sequence[str | int] | None = None,
    **gen: Any,
) -> dict[str, list[str]]:
    """Answer every feature with each of K prompts in one batched pass.

    The features are replicated K times (row k * N + i is feature i under prompt k) and the K * N
    rows go through one length-sorted generation, so an example's K copies, having the same
    length, mostly share a batch.

    Args:
        bank: the prompts and the model.
        features: N tokenized questions (the same tokens for every prompt).
        tasks: the prompts to run (default: all of the bank's).
        **gen: `evaluate.generate_answers` options (batch_size counts rows, not questions).

    Returns:
        Task name -> its N answers in feature order.
    """
    ks = [bank.index(t) for t in (tasks if tasks is not None else bank.names)]
    n = len(features)
    rows = [f for _ in ks for f in features]
    row_tasks = [k for k in ks for _ in range(n)]
    texts = generate_answers(bank.model, bank.tokenizer, rows, row_prompts=bank.row_prompts(row_tasks), **gen)
    return {bank.entry(k).name: texts[j * n : (j + 1) * n] for j, k in enumerate(ks)}


def ensemble_eval(
    loaded: Loaded,
    examples: Sequence[QAExample],
    features: Sequence[Features],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    env: DistEnv | None = None,
    bf16: bool = False,
    show_progress: bool = False,
    punctuation: str = "none",
) -> dict[str, Any]:
    """Score every loaded prompt and their majority vote, from one batched pass (Table 3 of the paper).

    Ties go to the prompt with the best F1 on this evaluation set (the paper's SQuAD numbers are on
    the dev set, which is also where it picks prompts). This rank is always available, even for
    prompts without recorded dev scores; equal F1s fall back to `--prompt` order.

    Args:
        loaded: the frozen model and K >= 1 named prompts.
        examples: the questions with gold answers.
        features: `features[i]` is the tokenized `examples[features[i].example_index]`.
        batch_size: rows per generation batch (K rows per question).
        max_new_tokens: the longest answer in tokens.
        env: the distributed environment (default: one process on the model's device).
        bf16: run under bf16 autocast.
        show_progress: draw a progress bar.
        punctuation: the text format the prompts were trained with; with padded text each answer is
            mapped back to its raw context span before scoring and voting (official scores only).

    Returns:
        `predictions` (the ensemble's {id: answer}), `prompts` ({name: {exact_match, f1}}),
        `prompt_mean` (their mean), `ensemble` ({method, exact_match, f1, tie_break}) and the
        ensemble's `exact_match` / `f1` at the top level, like a single prompt's report.
    """
    bank = PromptBank.from_loaded(loaded)
    if len(bank) == 0:
        raise UserError("an ensemble needs at least one --prompt")
    per_prompt = ensemble_answers(
        bank,
        features,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        env=env or DistEnv(device=bank.device),
        bf16=bf16,
        show_progress=show_progress,
    )
    ids = [examples[f.example_index].id for f in features]
    references = {ex.id: list(ex.answers) for ex in examples}
    predictions = {name: dict(zip(ids, texts, strict=True)) for name, texts in per_prompt.items()}
    if punctuation != "none":
        contexts = {ex.id: ex.context for ex in examples}
        predictions = {
            name: squad_scores_padded(p, references, contexts, punctuation)[1]
            for name, p in predictions.items()
        }
    scores = {name: squad_scores(p, references) for name, p in predictions.items()}
    names = list(per_prompt)
    priority = tie_break_order([scores[name]["f1"] for name in names])
    voted = {
        qid: majority_vote([predictions[name][qid] for name in names], priority) for qid in dict.fromkeys(ids)
    }
    ensemble = squad_scores(voted, references)
    return {
        "predictions": voted,
        "prompt_predictions": predictions,
        "prompts": scores,
        "prompt_mean": _mean(scores),
        "ensemble": {
            "method": "majority",
            "exact_match": ensemble["exact_match"],
            "f1": ensemble["f1"],
            "tie_break": [names[k] for k in priority],
        },
        "exact_match": ensemble["exact_match"],
        "f1": ensemble["f1"],
    }


def _mean(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    values = list(scores.values())
    return {key: math.fsum(s[key] for s in values) / len(values) for key in ("exact_match", "f1")}
