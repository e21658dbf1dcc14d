"""A text-to-text task as a `Task`: a `TaskSpec`'s templates, labels and layouts, scored by its metric."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.data.batching import Features
from softprompt.data.records import BadRecord
from softprompt.errors import ConfigError, DataError
from softprompt.tasks.base import EvalResult, Submission, Task, TaskCard
from softprompt.tasks.metrics.text import score_texts
from softprompt.tasks.text.features import tokenize_texts
from softprompt.tasks.text.reader import load_task_examples
from softprompt.tasks.text.spec import TaskSpec, TextExample, template_fields

__all__ = ["TextTask"]


@dataclass(frozen=True)
class TextTask(Task):
    """A text-to-text task defined by a `TaskSpec` (a preset such as ``rte``, or a task file).

    Attributes:
        spec: The task's definition: input/target templates, label strings, layout, metric, dataset.
    """

    spec: TaskSpec

    @property
    def name(self) -> str:  # type: ignore[override]
        """The spec's name (a preset's file name, or ``custom``)."""
        return self.spec.name

    @property
    def metric(self) -> str:
        """The spec's metric (``accuracy``, ``macro_f1``, ``multirc``, ...)."""
        return self.spec.metric.value

    @property
    def classes(self) -> tuple[str, ...]:
        """The spec's label strings; () for a generation task."""
        return tuple(self.spec.classes or ())

    @property
    def has_own_dataset(self) -> bool:
        """Whether the spec names a Hugging Face dataset of its own."""
        return bool(self.spec.dataset)

    @property
    def file_kinds(self) -> str:
        """The row files a text task reads."""
        return f"the {self.name} task's JSONL/CSV/TSV"

    @property
    def example_noun(self) -> str:
        """A text task's unit is an example."""
        return "examples"

    def to_dict(self) -> dict[str, Any]:
        """The spec, as a prompt's config saves it (`TaskSpec.to_dict`)."""
        return self.spec.to_dict()

    def text_format(self) -> dict[str, str]:
        """The task's own input template; no SQuAD punctuation padding (a text task's text is its
        template's, as written)."""
        return {"input_template": self.spec.input_template or "", "punctuation": "none"}

    def eval_fields(self) -> dict[str, Any]:
        """The task's name and metric."""
        return {"task": self.name, "metric": self.metric}

    def card(self, facts: Mapping[str, Any]) -> TaskCard:
        """The task (its description, template and metric), its metric's scores, and a ``--fields`` example
        of its template's fields; the recorded facts first, the spec where they say nothing."""
        template = facts.get("input_template") or self.spec.input_template
        metric = facts.get("metric") or self.metric
        scores = facts.get("scores") or {}
        return TaskCard(
            tag=self.name,
            subject=f"the text-to-text task {self.name}",
            title_on=f"`{self.name}`",
            about=(
                f"`{self.name}`: {facts.get('task_description') or self.spec.description or 'a text-to-text task'}",
                f"Input template: `{template or '—'}`; metric: {metric}.",
            ),
            scores=tuple((k, int(v) if k == "invalid_predictions" else v) for k, v in scores.items()),
            score_note=(
                f"Scores are the task's metric ({metric}; percentages, `invalid_predictions` a count of "
                "answers that are no label string) on the validation file, at the step with the best first score."
            ),
            predict_args=(
                "--fields",
                json.dumps(dict.fromkeys(template_fields(template or "") or ["text"], "...")),
            ),
        )

    def dev_scores(self, best: Mapping[str, float]) -> dict[str, float]:
        """Every score of the task's metric at the best step."""
        return dict(best)

    def results_fields(self, best: Mapping[str, float]) -> dict[str, Any]:
        """Every score at the best step under its own name, and the task, metric and scores."""
        return {**best, "task": self.name, "metric": self.metric, "scores": dict(best) or None}

    def headline(self, facts: Mapping[str, Any]) -> dict[str, Any]:
        """The task, its metric, and every score of the metric at the best step (none before any
        evaluation), under their own names (MultiRC: ``score``, ``f1a``, ``exact_match``, ...)."""
        scores = facts.get("scores")
        return {"task": self.name, "metric": self.metric, **(scores if isinstance(scores, Mapping) else {})}

    def card_fields(self, best: Mapping[str, float]) -> dict[str, Any]:
        """The task, where its format comes from, its input template, metric and scores."""
        return {
            "task": self.name,
            "task_description": self.spec.description,
            "input_template": self.spec.input_template,
            "metric": self.metric,
            "scores": dict(best) or None,
        }

    def load(
        self,
        source: str | Path | None,
        *,
        split: str = "train",
        config: str | None = None,
        for_training: bool = False,
        skip_bad: bool = False,
        stats: Counter[str] | None = None,
    ) -> list[TextExample]:
        """Rows of a JSONL/CSV/TSV file, ``hf:NAME``, or the spec's own dataset (`load_task_examples`)."""
        return load_task_examples(
            self.spec,
            source,
            split=split,
            config=config,
            for_training=for_training,
            skip_bad=skip_bad,
            stats=stats,
        )

    def tokenize(
        self,
        examples: Sequence[TextExample],
        tokenizer: Any,
        *,
        max_source_length: int,
        max_target_length: int,
        for_training: bool = False,
    ) -> list[Features]:
        """`tokenize_texts`: training keeps every target of an example (ReCoRD), as T5 does."""
        return tokenize_texts(
            examples,
            tokenizer,
            max_source_length=max_source_length,
            max_target_length=max_target_length,
            for_training=for_training,
        )

    def format_row(self, example: TextExample) -> dict[str, str]:
        """The filled input template and the first target."""
        return {"id": example.id, "inputs": example.inputs, "targets": example.targets[0]}

    def score(self, examples: Sequence[TextExample], answers: Sequence[str]) -> EvalResult:
        """The spec's metric (`score_texts`); its first score chooses the best checkpoint."""
        predictions = {ex.id: a for ex, a in zip(examples, answers, strict=True)}
        if any(not ex.labelled for ex in examples):
            # A test split (`unscored_reason` has refused a mixed one): the answers, and no score.
            return EvalResult({}, "", predictions)
        scores = score_texts(self.spec.metric, examples, answers, self.spec.classes)
        predictions = {ex.id: a for ex, a in zip(examples, answers, strict=True)}
        return EvalResult(scores, next(iter(scores)), predictions)

    def unscored_reason(self, examples: Sequence[TextExample], source: object) -> str | None:
        """A sentence when no example is labelled (a test split: predictions only); None when all are.

        Raises:
            DataError: Labelled and unlabelled examples mixed: a score over part of the file would
                mislead, so the first unlabelled example is named.
        """
        unlabelled = [ex for ex in examples if not ex.labelled]
        if not unlabelled:
            return None
        field = self.spec.label_field or self.spec.target_field or "label"
        if len(unlabelled) < len(examples):
            raise DataError(
                f"{source}: example {unlabelled[0].id!r} has no {field!r} but others have one; "
                "a score needs every row labelled: label it, or drop the labelled rows to predict only"
            )
        return f"{source} has no {field!r} in any row (a test split): predictions only, no score"

    def rank_classes(self) -> tuple[str, ...]:
        """The label strings, when they are the targets.

        Raises:
            ConfigError: The task has no labels, or its targets come from a template or field.
        """
        spec = self.spec
        if not spec.classes or spec.target_template or spec.target_field:
            raise ConfigError(
                f"--classify rank scores label strings, but the {spec.name} task's targets are not its labels; "
                "use --classify greedy"
            )
        return tuple(spec.classes)

    def submission(self, kind: str, classify: str) -> Submission:
        """The SuperGLUE leaderboard's file of a preset's test answers (`superglue_submission`).

        Raises:
            ConfigError: The task is no SuperGLUE preset, or its labels would come from generation.
        """
        from softprompt.tasks.text.submission import superglue_submission  # deferred: predict only

        del kind  # superglue is the one leaderboard (softprompt.config.choices.Leaderboard)
        return superglue_submission(self.spec, classify)

    def request_examples(self, record: Mapping[str, Any]) -> list[TextExample]:
        """The model inputs of one unlabelled record, each an example without targets
        (`TaskSpec.input_texts`; a layout may expand one record to several).

        Raises:
            BadRecord: The record does not fit the layout or lacks a field of the input template.
        """
        if isinstance(record, BadRecord):
            raise record
        return [
            TextExample(id="" if qid is None else qid, inputs=text, targets=("",))
            for qid, text in self.spec.input_texts(record)
        ]

    def request_parts(
        self, question: str | None, context: str | None, fields: Mapping[str, Any] | None
    ) -> list[TextExample]:
        """The model inputs of a request's fields (its question and context are not read).

        Raises:
            BadRecord: No fields, or fields that do not fill the template (the reason names the template).
        """
        template = self.spec.input_template
        if fields is None:
            raise BadRecord(
                "missing_field",
                f"the {self.name} task reads its fields: send fields for its template {template!r}",
            )
        try:
            return self.request_examples(fields)
        except BadRecord as err:
            raise BadRecord(err.kind, f"fields: {err.reason} (the template is {template!r})") from None
