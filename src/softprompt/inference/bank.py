"""The one inference path: a frozen model and its named soft prompts, answering in mixed batches.

Prompt tuning keeps the model frozen, so one copy of it can serve any number of tasks at once
(section 1 of Lester et al., 2021): each row of a batch carries its own prompt. Rows are
independent, so row i of a mixed batch gives the answer it gives in a batch of its own prompt; the
same machinery runs a K-prompt ensemble over a data set in one batched pass (the paper's Table 3).

Everything that answers questions goes through here: `eval`, `predict` and ensembles
(`softprompt.commands.eval`, `softprompt.commands.predict`), `serve`, the demo's scoring and the bench. `load_model_and_prompts` is the one
place that loads a model with its prompts; `PromptBank.generate_answers` is the one place that runs
generation with a prompt. Every prompt drives the one loaded model through per-row prompts, so no
second model wrapper (and no second copy of its frozen-weight state) ever exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from softprompt.config.choices import RankMode
from softprompt.data.batching import Features
from softprompt.data.records import BadRecord
from softprompt.errors import ConfigError, UserError
from softprompt.inference.engine import RowPrompts, generate_answers
from softprompt.inference.entries import BankEntry, PreparedRow, check_new_prompt
from softprompt.inference.options import GenerationOptions
from softprompt.inference.rank import rank_labels
from softprompt.inference.scoring import evaluate
from softprompt.io.checkpoint import PromptConfig, load_prompt, refuse_non_model
from softprompt.modeling.model import PromptedT5, load_t5, load_tokenizer
from softprompt.modeling.prompt_table import PromptTable
from softprompt.runtime.distributed import DistEnv
from softprompt.tasks.base import EvalResult, Task
from softprompt.tasks.resolve import task_from_saved

__all__ = [
    "PromptBank",
    "UnknownTaskError",
    "default_device",
    "load_model_and_prompts",
    "prompt_names",
]

# One task for every row (a name or a bank index), one per row, or None for the bare model.
Tasks = str | int | Sequence[str | int] | torch.Tensor | None
# One request: the prompt it asks for (name or index) and its input: an example of the prompt's task, or
# a record of it (`{question, context}` for a QA prompt, the template's fields for a text task's; see
# `Task.request_examples`).
Request = tuple[str | int, Any]


_DEFAULT = GenerationOptions()


class UnknownTaskError(UserError):
    """A row asked for a prompt the bank does not hold."""


# ----------------------------------------------------------------------------------------------------
# Loading


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def prompt_names(prompt_dirs: Sequence[str]) -> list[str]:
    """Short, distinct names for prompt directories: the folder name, or more of the path when
    folder names clash (`runs/a/best` and `runs/b/best` become `a/best` and `b/best`)."""
    parts = [Path(p).resolve().parts for p in prompt_dirs]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in prompt_dirs]


def load_model_and_prompts(
    model_name_or_path: str,
    prompt_dirs: Sequence[str | Path] = (),
    *,
    random_init: bool = False,
    seed: int = 42,
    names: Sequence[str] | None = None,
    bf16: bool = False,
    allow_other: bool = False,
    fast_path: bool = True,
    device: torch.device | str | None = None,
) -> PromptBank:
    """Load a frozen T5 and any number of prompt checkpoints checked against it, as a `PromptBank`.

    Args:
        model_name_or_path: hub id or directory.
        prompt_dirs: prompt checkpoint directories.
        random_init: build the model with random weights from its config.
        seed: seed for random weights.
        names: names for the prompts (default: their directory names).
        bf16: store the frozen matmul weights in bf16 (`PromptedT5.freeze_to`), for bf16 runs.
        allow_other: warn instead of refusing prompts trained for another base model.
        fast_path: decode with softprompt's lean T5 (see `PromptedT5`); False runs transformers' modules.
        device: where the model runs (default: `default_device()`).

    Returns:
        The bank: the model in eval mode on `device`, its tokenizer, and the prompts in the given order.
        It refuses later additions trained for another model, unless `random_init` (a random model has
        no identity to compare) or `allow_other`.
    """
    refuse_non_model(model_name_or_path)
    names = list(names) if names is not None else prompt_names([str(d) for d in prompt_dirs])
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two prompts are named '{twice}'; give them distinct names")
    tokenizer = load_tokenizer(model_name_or_path)
    t5 = load_t5(model_name_or_path, random_init=random_init, seed=seed)
    model = PromptedT5(t5, fast_path=fast_path).to(device or default_device()).eval()
    if bf16:
        model.freeze_to(torch.bfloat16)
    checked = not (random_init or allow_other)
    bank = PromptBank(model, tokenizer, base_model=model_name_or_path if checked else None)
    for name, directory in zip(names, prompt_dirs, strict=True):
        weight, config = load_prompt(
            directory,
            expect_d_model=bank.d_model,
            expect_base_model=None if random_init else model_name_or_path,
            allow_other=allow_other,
            random_init_seed=seed if random_init else None,
        )
        bank.add(name, weight, config)
    return bank


# ----------------------------------------------------------------------------------------------------
# The bank


class PromptBank:
    """Named soft prompts for one frozen model, usable together in one batch.

    Args:
        model: the frozen model (its own prompt, if any, is ignored when rows bring theirs).
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
        # A removed prompt leaves an empty slot (None) that a later `add` reuses: indices never shift, so
        # rows that hold an index keep meaning the same prompt while they wait or run.
        self._entries: list[BankEntry | None] = []
        self._free: list[int] = []
        self._index: dict[str, int] = {}
        self._prompts = PromptTable(self.d_model, self.device)

    # ------------------------------------------------------------------------------------------------
    # Contents

    @property
    def names(self) -> list[str]:
        """Task names, in slot order (the order they were added, while nothing was removed)."""
        return [e.name for e in self._entries if e is not None]

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def entry(self, task: str | int) -> BankEntry:
        """The prompt named `task` (or at position `task`)."""
        found = self._entries[self.index(task)]
        assert found is not None  # `index` refuses empty slots
        return found

    def index(self, task: str | int) -> int:
        """The position of a task in the bank.

        Raises:
            UnknownTaskError: no prompt has that name; the message lists the loaded ones.
        """
        if isinstance(task, int):
            if not 0 <= task < len(self._entries) or self._entries[task] is None:
                raise UnknownTaskError(f"task index {task} holds no prompt: the bank holds {len(self)}")
            return task
        found = self._index.get(task)
        if found is None:
            loaded = ", ".join(self.names) or "none"
            raise UnknownTaskError(f"unknown task '{task}'; loaded tasks: {loaded}")
        return found

    def describe(self) -> list[dict[str, Any]]:
        """Metadata of every prompt, in bank order (what `GET /v1/tasks` serves)."""
        return [e.describe() for e in self._entries if e is not None]

    def add(self, name: str, weight: torch.Tensor, config: PromptConfig) -> int:
        """Add a prompt under `name`, in the oldest empty slot a `remove` left, else in a new one.

        The padded table is replaced, never written in place (copy-on-write), and the name is published
        last, so a batch being stacked on another thread sees either table, both right for its rows.

        Args:
            name: the task name rows will use; must be new.
            weight: [P, H] the prompt vectors.
            config: the prompt's config.

        Raises:
            CheckpointError: the prompt is not [P, d_model], or was trained for another base model.
            UserError: `name` is taken.

        Returns:
            The prompt's index (its slot), which rows use until it is removed.
        """
        check_new_prompt(
            name, weight, config, taken=self._index, d_model=self.d_model, base_model=self.base_model
        )
        task = task_from_saved(config.task, punctuation=config.punctuation, where=f"prompt {name}")
        weight = weight.detach().to(self.device, torch.float32)
        entry = BankEntry(name=name, weight=weight, config=config, task=task)
        if self._free:
            k = self._free.pop(0)
            self._prompts = _with_row(self._prompts, k, weight)
            self._entries[k] = entry
        else:
            k = len(self._entries)
            prompts = _with_row(self._prompts, k, weight)
            self._entries.append(entry)
            self._prompts = prompts
        self._index[name] = k
        return k

    def remove(self, name: str) -> int:
        """Unload the prompt `name`: the name is free at once, its slot empty until an `add` reuses it.

        Other prompts keep their indices. The caller makes sure no row waiting or running still holds
        this prompt's index (`serve` pins the prompts of every request in flight); its vectors stay in the
        table until the slot is reused, so a batch already stacked is unaffected either way.

        Returns:
            The freed slot.

        Raises:
            UnknownTaskError: no prompt has that name.
        """
        k = self.index(name)
        del self._index[name]
        self._entries[k] = None
        self._free.append(k)
        return k

    def add_dir(self, name: str, directory: str | Path) -> None:
        """Load a prompt checkpoint directory (safetensors only) and add it under `name`."""
        weight, config = load_prompt(
            directory, expect_d_model=self.d_model, expect_base_model=self.base_model
        )
        self.add(name, weight, config)

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
        return self._prompts.stack(tasks)

    def row_prompts(self, row_tasks: Sequence[int | str] | torch.Tensor) -> RowPrompts:
        """The `row_prompts` callback of `evaluate.generate_answers` for features whose row i uses
        task `row_tasks[i]`."""
        if not isinstance(row_tasks, torch.Tensor):
            row_tasks = [self.index(t) for t in row_tasks]
        table = torch.as_tensor(row_tasks, dtype=torch.long)
        return lambda idx: self.stack(table[idx])

    def _row_prompts_for(self, features: Sequence[Features], tasks: Tasks) -> RowPrompts | None:
        if tasks is None:
            return None  # the bare model (or its own prompt)
        if isinstance(tasks, (str, int)):
            tasks = [self.index(tasks)] * len(features)
        if len(tasks) != len(features):
            raise ValueError(f"{len(tasks)} tasks for {len(features)} features; give one per feature")
        return self.row_prompts(tasks)

    # ------------------------------------------------------------------------------------------------
    # Answers

    def generate_answers(
        self, features: Sequence[Features], tasks: Tasks = None, options: GenerationOptions = _DEFAULT
    ) -> list[str]:
        """Greedy answers for tokenized questions, every row driven by its task's prompt.

        Rows are sorted by length and cut into batches regardless of task, so a batch may mix prompts;
        row i answers as it would in a batch of its own prompt.

        Args:
            features: tokenized questions.
            tasks: one task (name or index) for every row, one per row, or None for the bare model.
            options: how `engine.generate_answers` runs (batch size, answer length, ranks, precision, ...).

        Returns:
            One answer per feature, in feature order, as generated.
        """
        row_prompts = self._row_prompts_for(features, tasks)
        return generate_answers(self.model, self.tokenizer, features, options, row_prompts=row_prompts)

    def rank_answers(
        self,
        features: Sequence[Features],
        classes: Sequence[str],
        tasks: Tasks = None,
        options: GenerationOptions = _DEFAULT,
    ) -> list[str]:
        """Rank classification of tokenized inputs: each row's likeliest label string
        (`inference.rank.rank_labels`), every row driven by its task's prompt as in `generate_answers`."""
        picks = rank_labels(
            self.model,
            self.tokenizer,
            features,
            classes,
            options,
            row_prompts=self._row_prompts_for(features, tasks),
        )
        return [classes[k] for k in picks]

    def ranked_classes(self, task: str | int, classify: str) -> tuple[str, ...] | None:
        """The label strings a prompt's rows are ranked among under `classify` (`Task.rank_classes`);
        None where they are generated: ``greedy``, or a prompt whose task has no label targets (a QA
        prompt served beside classifiers answers greedily)."""
        if classify != RankMode.RANK:
            return None
        try:
            return self.entry(task).task.rank_classes()
        except ConfigError:
            return None

    def evaluate(
        self,
        task: Task,
        examples: Sequence[Any],
        features: Sequence[Features],
        tasks: Tasks = None,
        options: GenerationOptions = _DEFAULT,
        *,
        classify: str = "greedy",
    ) -> EvalResult:
        """Answer and score with the task's metric (`scoring.evaluate`).

        Args:
            task: the task whose metric scores the answers.
            examples: the examples with gold answers.
            features: `features[i]` is the tokenized `examples[features[i].example_index]`.
            tasks: the prompt(s), as in `generate_answers`.
            options: how generation (or rank classification) runs.
            classify: greedy generation, or rank classification over the task's labels.
        """
        row_prompts = self._row_prompts_for(features, tasks)
        return evaluate(
            self.model,
            self.tokenizer,
            task,
            examples,
            features,
            options,
            classify=classify,
            row_prompts=row_prompts,
        )

    def request_example(self, task: str | int, request: Any) -> Any:
        """A request's input as one example of its prompt's task: an example as it is, a record through
        `Task.request_examples`.

        Raises:
            UnknownTaskError: no prompt has that name.
            BadRecord: the record does not make exactly one model input (the reason says why).
        """
        if not isinstance(request, Mapping):
            return request
        examples = self.entry(task).task.request_examples(request)
        if len(examples) != 1:
            raise BadRecord("bad_row", f"make {len(examples)} inputs; send one example per input")
        return examples[0]

    def tokenize(self, rows: Sequence[Request]) -> tuple[list[Features], list[int]]:
        """Tokenize requests, each with its own prompt's task and settings.

        Returns:
            One `Features` per row, in row order (`example_index` is the row's position), and each row's
            task index.

        Raises:
            UnknownTaskError: a row names a task the bank does not hold.
            BadRecord: a row's fields do not fit its task.
        """
        features, tasks, _ = self._tokenize([(self.index(t), self.request_example(t, r)) for t, r in rows])
        return features, tasks

    def _tokenize(self, rows: Sequence[tuple[int, Any]]) -> tuple[list[Features], list[int], list[Any]]:
        """Tokenize `(task index, example)` rows, those of one prompt together."""
        features: list[Features | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, (k, _) in enumerate(rows):
            groups.setdefault(k, []).append(i)
        for k, members in groups.items():
            entry = self.entry(k)
            # max_target_length=2: labels are not used to answer.
            group = entry.task.tokenize(
                [rows[i][1] for i in members],
                self.tokenizer,
                max_source_length=entry.config.max_source_length,
                max_target_length=2,
            )
            for i, f in zip(members, group, strict=True):
                f.example_index = i
                features[i] = f
        return [f for f in features if f is not None], [k for k, _ in rows], [ex for _, ex in rows]

    def prepare(self, rows: Sequence[Request]) -> list[PreparedRow]:
        """Tokenise requests for `answer_prepared`, each with its prompt's task and settings.

        Raises:
            UnknownTaskError: a row names a task the bank does not hold.
            BadRecord: a row's fields do not fit its task.
        """
        features, tasks, examples = self._tokenize(
            [(self.index(t), self.request_example(t, r)) for t, r in rows]
        )
        return [
            PreparedRow(f, k, ex, int(self.entry(k).weight.shape[0]) + len(f.input_ids))
            for f, k, ex in zip(features, tasks, examples, strict=True)
        ]

    def answer_prepared(
        self,
        rows: Sequence[PreparedRow],
        *,
        batch_size: int = 32,
        max_new_tokens: int = 32,
        bf16: bool = False,
        classify: str = "greedy",
    ) -> list[str]:
        """Answer prepared rows of any mix of tasks (see `answer`); with ``classify="rank"``, the rows of
        each prompt whose task has label targets are rank-classified among them (`ranked_classes`)."""
        if not rows:
            return []
        options = GenerationOptions(
            batch_size=batch_size, max_new_tokens=max_new_tokens, env=DistEnv(device=self.device), bf16=bf16
        )
        answers: list[str] = [""] * len(rows)
        groups: dict[tuple[str, ...] | None, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(self.ranked_classes(r.task, classify), []).append(i)
        for classes, members in groups.items():
            features, tasks = [rows[i].features for i in members], [rows[i].task for i in members]
            if classes is None:
                got = self.generate_answers(features, tasks, options)
            else:
                got = self.rank_answers(features, classes, tasks, options)
            for i, a in zip(members, got, strict=True):
                answers[i] = a
        return [
            self._entries[r.task].task.answer_text(r.example, a) for a, r in zip(answers, rows, strict=True)
        ]

    def answer(
        self,
        rows: Sequence[Request],
        *,
        batch_size: int = 32,
        max_new_tokens: int = 32,
        bf16: bool = False,
        classify: str = "greedy",
    ) -> list[str]:
        """Answer `(task, fields)` requests of any mix of tasks (QA fields: question and context).

        Rows are sorted by length and cut into batches of `batch_size` regardless of task, so a
        batch usually mixes prompts; each answer equals `inference.predict_answers` with that row's
        prompt.

        Returns:
            One answer per row, in row order.
        """
        return self.answer_prepared(
            self.prepare(rows),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            bf16=bf16,
            classify=classify,
        )


def _with_row(prompts: PromptTable, k: int, weight: torch.Tensor) -> PromptTable:
    """A new table: `prompts` with row `k` (an empty slot, or the next one) set to `weight` [P, H]."""
    old, lengths = prompts.table, prompts.lengths
    rows, width = max(len(prompts), k + 1), max(old.shape[1], weight.shape[0])
    table = old.new_zeros(rows, width, old.shape[2])
    table[: old.shape[0], : old.shape[1]] = old
    table[k] = 0
    table[k, : weight.shape[0]] = weight
    out = PromptTable(old.shape[2], old.device)
    out.table = table
    out.lengths = torch.cat([lengths, lengths.new_zeros(rows - len(lengths))])
    out.lengths[k] = weight.shape[0]
    return out
