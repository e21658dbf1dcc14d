"""The Task seam: everything the rest of softprompt asks of a task, for SQuAD and text tasks alike.

A `Task` reads its records into examples, tokenizes them for T5, scores generated answers with its own
metric, turns a request's fields into a model input and a generated answer back into what the user is
shown, and says what a prompt trained on it records. Training, evaluation, `predict`, `serve` and the
bank hold a `Task` and never ask which kind it is: `softprompt.tasks.squad.qa_task.SquadTask` (SQuAD
v1.1 / MRQA extractive QA, T5's `squad` text) and `softprompt.tasks.text.text_task.TextTask` (a
`TaskSpec`: templates, labels, layouts, a text metric) are the two implementations, and
`softprompt.tasks.resolve.resolve_task` picks one from the flags or a prompt's saved config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from softprompt.data.batching import Features

__all__ = ["EvalResult", "Example", "Submission", "Task", "TaskCard"]


class Example(Protocol):
    """What every task's example has: an id unique within its source."""

    @property
    def id(self) -> str: ...


@dataclass
class EvalResult:
    """A task's scores on a data set and the answers behind them.

    Attributes:
        metrics: The scores to report, in report order (percentages; counts such as
            ``invalid_predictions`` as floats).
        selection: The key of ``metrics`` that chooses the best checkpoint (``f1`` for SQuAD, a text
            task's first metric).
        predictions: Example id to the answer as scored: for SQuAD on padded text, the raw context span
            the generated answer maps back to (the answer as generated when it maps nowhere).
        generated: Example id to the answer as generated, when it differs in kind from ``predictions``
            (padded SQuAD text); None otherwise.
    """

    metrics: dict[str, float]
    selection: str
    predictions: dict[str, str]
    generated: dict[str, str] | None = None

    @property
    def score(self) -> float:
        """The score that chooses the best checkpoint."""
        return self.metrics[self.selection]

    def scores(self) -> dict[str, float]:
        """The scores to report, in report order (a copy)."""
        return dict(self.metrics)

    @property
    def exact_match(self) -> float | None:
        """Exact match, when the task's metric has one (SQuAD: the official v1.1 EM)."""
        return self.metrics.get("exact_match")

    @property
    def f1(self) -> float | None:
        """F1, when the task's metric has one (SQuAD: the official v1.1 F1)."""
        return self.metrics.get("f1")

    @property
    def t5_exact_match(self) -> float | None:
        """EM the way T5's squad task scores (generated text against padded gold answers); None unless
        the SQuAD text was padded."""
        return self.metrics.get("t5_exact_match")

    @property
    def t5_f1(self) -> float | None:
        """F1 likewise."""
        return self.metrics.get("t5_f1")


@dataclass(frozen=True)
class TaskCard:
    r"""What a prompt's model card says about its task, as plain text (the card escapes it for Markdown).

    Attributes:
        tag: The task's tag in the card's front matter.
        subject: What the model was trained for, in a sentence ("extractive question answering").
        title_on: What the title names as the task (``SQuAD``, ``\`rte\```).
        about: The paragraphs of the card's "Task" section; none, no section.
        scores: The dev-result rows before the best step: (label, value); a float is shown as a
            percentage with two decimals, an int as it is, None as a dash.
        score_note: The sentence under the dev results saying what they are.
        predict_args: The input flags of a runnable `softprompt predict` example.
    """

    tag: str
    subject: str
    title_on: str
    about: tuple[str, ...] = ()
    scores: tuple[tuple[str, float | int | None], ...] = ()
    score_note: str = ""
    predict_args: tuple[str, ...] = ()


class Submission(ABC):
    """A leaderboard's file of a test split's answers (`softprompt predict --submission`), made by a task.

    Attributes:
        file_name: The name the leaderboard reads the file by (``RTE.jsonl``).
    """

    file_name: str

    @abstractmethod
    def check(self, record: Mapping[str, Any]) -> None:
        """Refuse a test record the file cannot name an answer for, before any answer is made.

        Raises:
            BadRecord: The record lacks what the leaderboard names its answers by (its ``idx``).
        """

    @abstractmethod
    def lines(self, records: Sequence[Mapping[str, Any]], answers: Sequence[str]) -> list[dict[str, Any]]:
        """The file's JSON lines.

        Args:
            records: The test records, each checked by `check`.
            answers: The answers to their examples (`Task.request_examples` of each record, in order).
        """


class Task(ABC):
    """One task: its data, its model text, its metric, and what a prompt trained on it records.

    Attributes:
        name: The task's name (``squad`` for SQuAD-shaped QA, a preset's or task file's name).
    """

    name: str

    # ---------------------------------------------------------------------------------------- identity

    @property
    @abstractmethod
    def metric(self) -> str:
        """The metric's name as runs show it (``f1`` for SQuAD; a text task's metric, e.g. ``accuracy``)."""

    @property
    def classes(self) -> tuple[str, ...]:
        """The class label strings of a classification task, in class order; () otherwise."""
        return ()

    @property
    def has_own_dataset(self) -> bool:
        """Whether the task names its own data set, used when a run gives no data files."""
        return False

    @property
    @abstractmethod
    def file_kinds(self) -> str:
        """The data files the task reads, for messages (``SQuAD JSON or MRQA jsonl``)."""

    @property
    @abstractmethod
    def example_noun(self) -> str:
        """What one example is called in messages (``questions``, ``examples``)."""

    def to_dict(self) -> dict[str, Any] | None:
        """What a prompt trained on the task saves as its ``task`` (None: the prompt config's own
        settings, such as its punctuation, say everything)."""
        return None

    def text_format(self) -> dict[str, str]:
        """How a prompt trained on the task records its model text (`PromptConfig`'s ``punctuation`` and,
        where the task has its own, ``input_template``); the report and ``/v1/tasks`` show them."""
        return {"punctuation": "none"}

    @abstractmethod
    def dev_scores(self, best: Mapping[str, float]) -> dict[str, float]:
        """The dev scores a prompt's config records (each as ``dev_<name>``), given the scores at the best
        step (``{}`` before any evaluation)."""

    @abstractmethod
    def eval_fields(self) -> dict[str, Any]:
        """What an evaluation report (`softprompt eval`) says about the task: its text format or its name
        and metric."""

    @abstractmethod
    def card(self, facts: Mapping[str, Any]) -> TaskCard:
        """What a model card says about the task, from a run's recorded facts (its config merged with
        results.json: the scores under their names, ``best_step``, ...)."""

    def results_fields(self, best: Mapping[str, float]) -> dict[str, Any]:
        """What a run's results.json records about the task beside the QA scores (``exact_match``,
        ``f1``, ``t5_*``), given the scores at the best step (``{}`` before any)."""
        return {}

    def headline(self, facts: Mapping[str, Any]) -> dict[str, Any]:
        """The scores a finished run is summed up by (`softprompt train`'s last line), from its recorded
        facts (results.json, perhaps merged over its config): the task's own metric's scores, None
        where the run was not evaluated."""
        return {k: facts.get(k) for k in ("exact_match", "f1")}

    def card_fields(self, best: Mapping[str, float]) -> dict[str, Any]:
        """What a run's model card is told about the task beside the QA scores, likewise."""
        return {}

    # -------------------------------------------------------------------------------------------- data

    @abstractmethod
    def load(
        self,
        source: str | Path | None,
        *,
        split: str = "train",
        config: str | None = None,
        for_training: bool = False,
        skip_bad: bool = False,
        stats: Counter[str] | None = None,
    ) -> list[Any]:
        """The task's examples from a file, ``hf:NAME``, or (source None) the task's own data set.

        Args:
            source: A data file, ``hf:NAME`` for a Hugging Face dataset, or None for the task's own.
            split: The split of a Hugging Face dataset.
            config: The configuration of a Hugging Face dataset.
            for_training: Whether the examples train (a layout may keep only training rows).
            skip_bad: Drop bad records (counted in ``stats``) instead of raising.
            stats: Counts dropped records by kind.

        Raises:
            DataError: The data cannot be read, or (unless ``skip_bad``) a record is bad.
        """

    @abstractmethod
    def tokenize(
        self,
        examples: Sequence[Any],
        tokenizer: Any,
        *,
        max_source_length: int,
        max_target_length: int,
        for_training: bool = False,
    ) -> list[Features]:
        """The examples as T5 features (input ids, labels), ``example_index`` pointing into ``examples``.

        Args:
            examples: The task's examples (from `load` or `request_examples`).
            tokenizer: A fast T5 tokenizer.
            max_source_length: Maximum input length including EOS.
            max_target_length: Maximum target length including EOS.
            for_training: A task may train on several targets per example (ReCoRD); else one feature each.
        """

    @abstractmethod
    def format_row(self, example: Any) -> dict[str, str]:
        """The model's text for one example, ``{"id", "inputs", "targets"}`` (`softprompt format`)."""

    # ---------------------------------------------------------------------------------------- scoring

    @abstractmethod
    def score(self, examples: Sequence[Any], answers: Sequence[str]) -> EvalResult:
        """Score generated answers with the task's metric.

        Args:
            examples: The scored examples, with their gold targets.
            answers: ``answers[i]`` is the answer generated for ``examples[i]``.
        """

    def unscored_reason(self, examples: Sequence[Any], source: object) -> str | None:
        """Why these examples get no score (a test split without labels), or None when they are scored.

        Args:
            examples: The loaded examples.
            source: The file or dataset, for messages.

        Raises:
            DataError: Some examples are labelled and some are not: the first unlabelled one is named.
        """
        del examples, source
        return None

    def score_shown(self, examples: Sequence[Any], answers: Sequence[str]) -> dict[str, float]:
        """The scores of answers as the user is shown them (`EvalResult.predictions`, e.g. an ensemble's
        vote), not as generated."""
        return self.score(examples, answers).scores()

    def rank_classes(self) -> tuple[str, ...]:
        """The label strings rank classification chooses among.

        Raises:
            ConfigError: The task's targets are not label strings.
        """
        from softprompt.errors import ConfigError

        raise ConfigError("--classify rank is for classification tasks (--task with labels), not QA")

    def submission(self, kind: str, classify: str) -> Submission:
        """The leaderboard file ``kind`` (``superglue``) of the task's test answers, checked before any work.

        Args:
            kind: The leaderboard (softprompt.config.choices.Leaderboard).
            classify: How the answers are chosen (``greedy`` or ``rank``): a file of labels needs labels.

        Raises:
            ConfigError: The leaderboard has no file for the task, or the answers could be no label.
        """
        from softprompt.errors import ConfigError

        raise ConfigError(
            f"--submission {kind} writes the test answers of a SuperGLUE task preset (--task rte, ...); "
            f"the {self.name} task has no leaderboard file"
        )

    # ---------------------------------------------------------------------------- requests (predict, serve)

    @abstractmethod
    def request_examples(self, record: Mapping[str, Any]) -> list[Any]:
        """The examples of one unlabelled request (a `predict` line, a served request's fields).

        Raises:
            BadRecord: The record lacks a field the task reads (its ``reason`` names it).
        """

    @abstractmethod
    def request_parts(
        self, question: str | None, context: str | None, fields: Mapping[str, Any] | None
    ) -> list[Any]:
        """The examples of one request given in parts (a served request's body, `predict`'s flags): a
        question and a context for QA, a text task's template fields.

        Raises:
            BadRecord: A part the task reads is missing or unusable; the reason starts with the part's
                name (``question: Field required ...``, ``fields: has no field 'x' ...``).
        """

    def answer_text(self, example: Any, generated: str) -> str:
        """What the user is shown for a generated answer (SQuAD on padded text: the context's own span)."""
        return generated
