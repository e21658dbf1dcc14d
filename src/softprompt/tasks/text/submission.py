"""A SuperGLUE task's test answers as the leaderboard takes them (`softprompt predict --submission superglue`).

The SuperGLUE leaderboard (https://super.gluebenchmark.com) reads one JSONL file per task, named as in
`SUPERGLUE_FORMATS`, with one line per record of the official test file, as jiant (the benchmark's
baseline, ``jiant/evaluate.py`` ``write_preds`` with ``strict_glue_format``) writes them:

- BoolQ, CB, COPA, RTE, WiC, WSC: ``{"idx": <the record's idx>, "label": ...}``; the label is the
  leaderboard's spelling of the preset's label string: RTE ``entailment``/``not_entailment``, CB
  ``entailment``/``contradiction``/``neutral``, BoolQ and WiC ``"true"``/``"false"``, COPA ``0``/``1``
  (``choice1``/``choice2``), WSC ``"True"``/``"False"`` (whether the answer names the candidate referent,
  as T5's ``wsc_simple`` decides).
- MultiRC: one line per paragraph, ``{"idx": p, "passage": {"questions": [{"idx": q, "answers":
  [{"idx": a, "label": 0 | 1}]}]}}``.
- ReCoRD: one line per query, ``{"idx": <the query's idx>, "label": "<the answer entity's text>"}``.

The rows a layout makes keep the source's ``idx`` (softprompt.tasks.layouts), so every answer is named
by the record it came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from softprompt.config.choices import RankMode
from softprompt.data.records import BadRecord
from softprompt.errors import ConfigError, DataError
from softprompt.tasks.base import Submission
from softprompt.tasks.metrics.text import wsc_predicts_referent
from softprompt.tasks.text.spec import TaskSpec

__all__ = ["SUPERGLUE_FORMATS", "SuperGlueFormat", "SuperGlueSubmission", "superglue_submission"]


@dataclass(frozen=True)
class SuperGlueFormat:
    """What the leaderboard reads for one task.

    Attributes:
        file_name: The file's name in the submission.
        layout: The preset's layout (``rows``, ``multirc``, ``record``, ``wsc``): how lines are made.
        labels: The preset's label string -> the leaderboard's label; None where the label is the answer's
            text (ReCoRD) or decided from it (WSC).
    """

    file_name: str
    layout: str
    labels: Mapping[str, Any] | None = None


_TRUE_FALSE = {"False": "false", "True": "true"}

SUPERGLUE_FORMATS: dict[str, SuperGlueFormat] = {
    "boolq": SuperGlueFormat("BoolQ.jsonl", "rows", _TRUE_FALSE),
    "cb": SuperGlueFormat(
        "CB.jsonl",
        "rows",
        {"entailment": "entailment", "contradiction": "contradiction", "neutral": "neutral"},
    ),
    "copa": SuperGlueFormat("COPA.jsonl", "rows", {"choice1": 0, "choice2": 1}),
    "multirc": SuperGlueFormat("MultiRC.jsonl", "multirc", {"False": 0, "True": 1}),
    "record": SuperGlueFormat("ReCoRD.jsonl", "record"),
    "rte": SuperGlueFormat(
        "RTE.jsonl", "rows", {"entailment": "entailment", "not_entailment": "not_entailment"}
    ),
    "wic": SuperGlueFormat("WiC.jsonl", "rows", _TRUE_FALSE),
    "wsc": SuperGlueFormat("WSC.jsonl", "wsc"),
}
"""A SuperGLUE preset's name -> its leaderboard file."""


def superglue_submission(spec: TaskSpec, classify: str) -> SuperGlueSubmission:
    """The leaderboard file of a SuperGLUE preset's test answers, refused before any work where it cannot be.

    Args:
        spec: The task (a SuperGLUE preset, or a prompt's recorded copy of one).
        classify: ``greedy`` or ``rank``; a task whose file holds labels needs ``rank``, which always
            answers with a label (a generated answer may be none).

    Raises:
        ConfigError: The task is no SuperGLUE preset, its layout or labels are not the preset's, or its
            labels would come from free generation.
    """
    fmt = SUPERGLUE_FORMATS.get(spec.name)
    if fmt is None:
        raise ConfigError(
            f"--submission superglue writes the SuperGLUE tasks ({', '.join(sorted(SUPERGLUE_FORMATS))}); "
            f"the {spec.name} task is none of them"
        )
    if spec.layout != fmt.layout:
        raise ConfigError(
            f"--submission superglue: the {spec.name} task reads the {spec.layout} layout, not the "
            f"preset's {fmt.layout}; use --task {spec.name}"
        )
    if fmt.labels is not None and set(spec.classes or ()) != set(fmt.labels):
        raise ConfigError(
            f"--submission superglue maps the {spec.name} preset's labels ({', '.join(fmt.labels)}) to the "
            f"leaderboard's, but this task's are {', '.join(spec.classes or ()) or 'none'}; use --task {spec.name}"
        )
    if fmt.labels is not None and classify != RankMode.RANK:
        raise ConfigError(
            f"--submission superglue needs a label for every {spec.name} test record: add --classify rank "
            "(a generated answer may be no label)"
        )
    return SuperGlueSubmission(spec, fmt)


def _int_idx(value: Any, what: str) -> int:
    """An idx as the leaderboard writes it: an integer (a CSV file's digits too).

    Raises:
        BadRecord: ``value`` is no integer.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    shown = "has no" if value is None else f"has {value!r:.40} as"
    raise BadRecord(
        "missing_field",
        f"{shown} {what}, an integer, which a SuperGLUE submission names its answer by "
        "(the official test files have it)",
    )


@dataclass(frozen=True)
class SuperGlueSubmission(Submission):
    """One SuperGLUE task's leaderboard file.

    Attributes:
        spec: The task.
        fmt: Its file's name, layout and label spellings.
    """

    spec: TaskSpec
    fmt: SuperGlueFormat

    @property
    def file_name(self) -> str:  # type: ignore[override]
        """The name the leaderboard reads the file by (``RTE.jsonl``)."""
        return self.fmt.file_name

    def _rows(self, record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        return self.spec.rows(record, for_training=False)

    def _ids(self, row: Mapping[str, Any]) -> tuple[int, ...]:
        """The row's idx as the file names it: (idx,), MultiRC's (p, q, a), ReCoRD's (query,)."""
        idx = row.get("idx")
        if self.fmt.layout == "multirc":
            parts = idx if isinstance(idx, Mapping) else {}
            return tuple(_int_idx(parts.get(k), f"idx.{k}") for k in ("paragraph", "question", "answer"))
        if self.fmt.layout == "record":
            return (_int_idx(idx.get("query") if isinstance(idx, Mapping) else None, "idx.query"),)
        return (_int_idx(idx, "'idx'"),)

    def check(self, record: Mapping[str, Any]) -> None:
        """Refuse a record whose rows lack an integer idx (MultiRC: paragraph, question and answer).

        Raises:
            BadRecord: The record does not fit the layout, or names no idx.
        """
        for row in self._rows(record):
            self._ids(row)

    def _label(self, answer: str, row: Mapping[str, Any]) -> Any:
        if self.fmt.layout == "wsc":
            return str(wsc_predicts_referent(answer, str(row.get("span1_text", ""))))
        if self.fmt.labels is None:
            return answer  # ReCoRD: the entity's text
        if answer not in self.fmt.labels:
            raise DataError(
                f"the answer {answer!r:.40} to {self.spec.name} idx {row.get('idx')!r:.40} is none of the labels "
                f"{', '.join(self.fmt.labels)}; answer with --classify rank"
            )
        return self.fmt.labels[answer]

    def lines(self, records: Sequence[Mapping[str, Any]], answers: Sequence[str]) -> list[dict[str, Any]]:
        """One line per record (MultiRC: per paragraph), in the order of the test file.

        Raises:
            DataError: An answer is no label of the task.
            ValueError: There are not as many answers as the records' rows.
        """
        rows = [row for record in records for row in self._rows(record)]
        if len(rows) != len(answers):
            raise ValueError(f"{len(answers)} answers for {len(rows)} rows")
        if self.fmt.layout != "multirc":
            return [
                {"idx": self._ids(row)[0], "label": self._label(a, row)}
                for row, a in zip(rows, answers, strict=True)
            ]
        # MultiRC: answers nested under their question under their paragraph, each in first-seen order
        # (a Hugging Face file's rows, one per answer, group the same way).
        paragraphs: dict[int, dict[int, list[dict[str, Any]]]] = {}
        for row, a in zip(rows, answers, strict=True):
            p, q, ai = self._ids(row)
            paragraphs.setdefault(p, {}).setdefault(q, []).append({"idx": ai, "label": self._label(a, row)})
        return [
            {"idx": p, "passage": {"questions": [{"idx": q, "answers": ans} for q, ans in questions.items()]}}
            for p, questions in paragraphs.items()
        ]
