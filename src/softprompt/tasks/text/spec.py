"""What a text-to-text task is: :class:`TaskSpec`, its templates, and the examples it makes.

A :class:`TaskSpec` says how one record of a data set (a JSONL/CSV/TSV row, a Hugging Face dataset row,
or an official SuperGLUE record expanded by a layout) becomes :class:`TextExample` records: an input
template over the row's fields, a target template or field, for classification the label strings, and
the metric. Where a spec comes from (presets, task YAML files, flags) is softprompt.tasks.text.presets;
reading the rows is softprompt.tasks.text.reader. QA data (SQuAD JSON, MRQA JSONL) keeps its own path
(softprompt.tasks.squad.reader): the ``squad`` task.

Templates are ``{field}`` (``{a.b}`` reaches into a nested object; ``{{`` and ``}}`` are literal braces).
A field's text is used as it is; booleans are written ``True`` / ``False`` as T5 writes them.

A row that does not fit raises :class:`BadRecord` with its kind (one of
softprompt.tasks.text.reader.TEXT_BAD_KINDS), which :meth:`TaskSpec.examples_from_records` turns into a
one-line error naming the source, the row and the field, or with ``skip_bad`` drops and counts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from softprompt.config.choices import TaskMetric
from softprompt.data.records import BadRecord, Collector, quote
from softprompt.errors import ConfigError

__all__ = ["UNLABELLED_TARGET", "TaskSpec", "TextExample", "fill", "template_fields"]

UNLABELLED_TARGET = "<unk>"
"""The target of a row without its label (a test split): T5 writes ``<unk>`` for label -1
(``preprocessors.glue``) and for a ReCoRD query without answers (``preprocessors.record``)."""

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_QA_LAYOUT = "squad"


@dataclass(frozen=True)
class TextExample:
    """One example of a text-to-text task.

    Attributes:
        id: Unique within its source (the row's id field, else its row number).
        inputs: The model's input text, the template filled in.
        targets: Every gold target string; the first is the training target (ReCoRD has several).
        label: The gold class label string of a classification task (equal to ``targets[0]`` except for
            WSC, whose target is the referent and whose label says whether the candidate is it); None
            for generation tasks.
        group: The unit some metrics score together (MultiRC: one question's answer options); None
            otherwise.
        labelled: False for a row without its label or answers (a test split): its target is
            :data:`UNLABELLED_TARGET` (WSC's stays the referent, as T5's) and it cannot be scored.
    """

    id: str
    inputs: str
    targets: tuple[str, ...]
    label: str | None = None
    group: str | None = None
    labelled: bool = True


# --------------------------------------------------------------------------------------------------------
# Templates


def _lookup(row: Mapping[str, Any], name: str) -> Any:
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            # Name what is there (a CSV file's header columns): a typo in the template or the header shows.
            keys = [str(k) for k in value] if isinstance(value, Mapping) else []
            shown = (
                f" (its fields: {', '.join(keys[:12])}{', ...' if len(keys) > 12 else ''})" if keys else ""
            )
            raise BadRecord("missing_field", f"has no field {quote(name)}{shown}")
        value = value[part]
    return value


def _text(value: Any, name: str) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (str, int, float)):
        return str(value)
    if value is None:
        raise BadRecord("missing_field", f"field {quote(name)} is empty (null)")
    raise BadRecord("bad_row", f"field {quote(name)} is a {type(value).__name__}, not text")


def template_fields(template: str) -> list[str]:
    """The field names a template uses, in order of appearance.

    Raises:
        ValueError: A brace is unbalanced or a field name is empty.
    """
    names = []
    for m in _FIELD.finditer(template):
        token = m.group(0)
        if token in ("{{", "}}"):
            continue
        if m.group(1) is None or not m.group(1).strip():
            raise ValueError(f"template {template!r} has an unbalanced brace or an empty {{}}")
        names.append(m.group(1).strip())
    return names


def fill(template: str, row: Mapping[str, Any]) -> str:
    """The template with each ``{field}`` replaced by the row's text for it.

    Args:
        template: E.g. ``"rte hypothesis: {hypothesis} premise: {premise}"``.
        row: The record; ``{a.b}`` reads ``row["a"]["b"]``.

    Raises:
        BadRecord: The row lacks a field or holds a non-text value there.
    """

    def one(m: re.Match[str]) -> str:
        token = m.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = m.group(1).strip()
        return _text(_lookup(row, name), name)

    return _FIELD.sub(one, template)


# --------------------------------------------------------------------------------------------------------
# The task


def _label_key(value: Any) -> str:
    """How label values compare: booleans as true/false (YAML and JSON agree), numbers and text as text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass
class TaskSpec:
    """How a data set's records become model inputs and targets, and how answers are scored.

    Attributes:
        name: The task's name (a preset's file name, or ``custom``).
        input_template: The model input, e.g. ``"rte hypothesis: {hypothesis} premise: {premise}"``.
        target_template: The target; default: the label string.
        target_field: A field holding the target string or a list of target strings (instead of a
            template).
        label_field: The field holding the class label.
        labels: The class label strings in class order (a row's label may be the index, the string, or
            for two classes a boolean: False is the first), or a map from label values to strings.
        metric: How answers are scored (softprompt.config.choices.TaskMetric).
        id_field: The field holding a unique id; default: the row number.
        layout: How one record becomes rows: ``rows`` (as it is), ``squad`` (the QA path), or a layout of
            softprompt.tasks.layouts (``multirc``, ``record``, ``wsc``).
        dataset: The Hugging Face dataset the task's data comes from (``{name: super_glue, config: rte}``),
            used when a run names no files.
        description: Where the format comes from (a preset's header, for the model card).
        source: The YAML file the task was read from, if any.
    """

    name: str = "custom"
    input_template: str | None = None
    target_template: str | None = None
    target_field: str | None = None
    label_field: str | None = None
    labels: list[str] | dict[str, str] | None = None
    metric: TaskMetric = TaskMetric.EXACT_MATCH
    id_field: str | None = None
    layout: str = "rows"
    dataset: dict[str, str] | None = None
    description: str = ""
    source: str | None = field(default=None, compare=False)

    @property
    def is_qa(self) -> bool:
        """Whether this is the SQuAD-shaped QA path (softprompt.tasks.squad.reader), not a text task."""
        return self.layout == _QA_LAYOUT or self.metric == TaskMetric.SQUAD

    @property
    def classes(self) -> tuple[str, ...] | None:
        """The label strings, each once, in class order; None for generation tasks."""
        if self.labels is None:
            return None
        strings = self.labels if isinstance(self.labels, list) else list(self.labels.values())
        return tuple(dict.fromkeys(strings))

    def problems(self) -> list[str]:
        """Every inconsistency of the spec, each a clause; empty when the spec is usable."""
        out = []
        if self.is_qa:
            return out
        if self.layout not in ("rows", *_layouts()):
            out.append(f"layout {self.layout!r} is not one of rows, {', '.join(_layouts())}, squad")
        if not self.input_template:
            out.append("input_template is missing")
        for key in ("input_template", "target_template"):
            template = getattr(self, key)
            if template:
                try:
                    template_fields(template)
                except ValueError as err:
                    out.append(f"{key}: {err}")
        if self.target_template and self.target_field:
            out.append("give target_template or target_field, not both")
        if self.labels is not None and not self.label_field:
            out.append("labels are given but label_field is not")
        if self.label_field and self.labels is None:
            out.append(f"label_field {self.label_field!r} is given but labels are not")
        if self.labels is not None:
            strings = self.labels if isinstance(self.labels, list) else list(self.labels.values())
            if not strings:
                out.append("labels is empty")
            if any(not isinstance(s, str) or not s.strip() for s in strings):
                out.append("every label string must be non-empty text")
        if not (self.target_template or self.target_field or self.labels is not None):
            out.append("say what the target is: target_template, target_field or label_field + labels")
        needs_classes = (TaskMetric.ACCURACY, TaskMetric.MACRO_F1, TaskMetric.MULTIRC, TaskMetric.WSC)
        if self.metric in needs_classes and self.labels is None:
            out.append(f"metric {self.metric.value} needs labels")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-able values (for prompt_config.json and the run's config)."""
        out = asdict(self)
        out["metric"] = self.metric.value
        out.pop("source")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "the task") -> TaskSpec:
        """Build and validate a spec from a mapping (a preset's YAML, a saved prompt's config).

        Raises:
            ConfigError: One line naming ``where`` and every problem.
        """
        known = {f for f in cls.__dataclass_fields__ if f != "source"}
        problems = [f"unknown key {k!r}" for k in data if k not in known]
        values = {k: v for k, v in data.items() if k in known}
        metric = values.get("metric")
        if metric is None:
            values["metric"] = (
                TaskMetric.ACCURACY if values.get("labels") is not None else TaskMetric.EXACT_MATCH
            )
        else:
            try:
                values["metric"] = TaskMetric(metric)
            except ValueError:
                choices = ", ".join(m.value for m in TaskMetric)
                problems.append(f"metric {metric!r} is not one of {choices}")
                values.pop("metric")
        labels = values.get("labels")
        if isinstance(labels, Mapping):
            values["labels"] = {_label_key(k): v for k, v in labels.items()}
        elif isinstance(labels, (list, tuple)):
            values["labels"] = list(labels)
        elif labels is not None:
            problems.append("labels must be a list of label strings or a map from values to strings")
            values.pop("labels")
        if values.get("dataset") is not None and not isinstance(values["dataset"], Mapping):
            problems.append("dataset must be a map like {name: super_glue, config: rte}")
            values.pop("dataset")
        spec = cls(**values)
        problems += spec.problems()
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))
        return spec

    # ----------------------------------------------------------------------------------------------------
    # From rows to examples

    def label_string(self, value: Any) -> str:
        """The label string of a row's label value.

        Raises:
            BadRecord: The value is no label of this task.
        """
        labels = self.labels
        if isinstance(labels, dict):
            key = _label_key(value)
            if key in labels:
                return labels[key]
        elif labels is not None:
            if isinstance(value, bool) and len(labels) == 2:
                return labels[int(value)]
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
                return labels[value]
            if isinstance(value, str) and value in labels:
                return value
        allowed = ", ".join(self.classes or ())
        raise BadRecord(
            "unknown_label", f"label {quote(str(value))} is not one of the task's labels ({allowed})"
        )

    def example_from_row(self, row: Mapping[str, Any], number: int) -> TextExample:
        """One flat row as an example.

        Args:
            row: The row (after the layout, if any).
            number: Its position, the id when the task has no ``id_field``.

        Raises:
            BadRecord: A field is missing or empty, or the label is unknown.
        """
        if not isinstance(row, Mapping):
            raise BadRecord("bad_row", f"is a {type(row).__name__}, not an object with fields")
        qid = _text(_lookup(row, self.id_field), self.id_field) if self.id_field else str(number)
        inputs = fill(self.input_template or "", row)
        if not inputs.strip():
            raise BadRecord("empty_input", "the input is empty")
        label, labelled = None, True
        if self.label_field:
            value = _unlabelled_or(row, self.label_field)
            labelled = value is not _NO_LABEL
            label = self.label_string(value) if labelled else None
        if self.target_template:
            targets: tuple[str, ...] = (fill(self.target_template, row),)
        elif self.target_field:
            value = _lookup(row, self.target_field)
            items = value if isinstance(value, (list, tuple)) else [value]
            targets = tuple(_text(v, self.target_field) for v in items)
            if not targets and self.layout == "record":
                # ReCoRD's test queries have no answers: T5's preprocessors.record writes <unk>. (Elsewhere
                # an empty list stays an empty target: only this layout says "none" means unlabelled.)
                labelled, targets = False, (UNLABELLED_TARGET,)
        else:
            targets = (label,) if label is not None else (UNLABELLED_TARGET,)
        if not targets or not all(t.strip() for t in targets):
            raise BadRecord("empty_target", "the target is empty")
        group = row.get("group") if isinstance(row.get("group"), str) else None
        return TextExample(
            id=qid, inputs=inputs, targets=targets, label=label, group=group, labelled=labelled
        )

    def input_texts(self, record: Mapping[str, Any]) -> list[tuple[str | None, str]]:
        """The model inputs of one unlabelled record (predict, serve): ``(id or None, text)`` per row.

        Raises:
            BadRecord: The record does not fit the layout or lacks a field of the input template.
        """
        if not isinstance(record, Mapping):
            raise BadRecord("bad_row", f"is a {type(record).__name__}, not an object with fields")
        out = []
        for row in self.rows(record, for_training=False):
            qid = row.get(self.id_field) if self.id_field else None
            text = fill(self.input_template or "", row)
            if not text.strip():
                raise BadRecord("empty_input", "the input is empty")
            out.append((None if qid is None else _text(qid, self.id_field or "id"), text))
        return out

    def rows(self, record: Mapping[str, Any], for_training: bool) -> list[Mapping[str, Any]]:
        """The flat rows of one record: itself, or what the task's layout expands it to."""
        if self.layout == "rows":
            return [record]
        try:
            return list(_layouts()[self.layout](record, for_training))
        except (ValueError, KeyError, TypeError) as err:
            raise BadRecord("bad_row", f"does not fit the {self.layout} layout ({err})") from None

    def examples_from_records(
        self,
        records: Iterable[tuple[str, Any]],
        *,
        source: object,
        for_training: bool = False,
        skip_bad: bool = False,
        stats: Counter[str] | None = None,
    ) -> list[TextExample]:
        """Examples from ``(place, record)`` pairs, e.g. from softprompt.tasks.text.reader.read_records.

        A record that could not be read arrives as a :class:`BadRecord` instead of a mapping.

        Args:
            records: Each record with its place (``line 3``, ``row 7``) for messages.
            source: The file or dataset, for messages.
            for_training: Layouts may keep only training rows (WSC keeps the true referents).
            skip_bad: Drop bad rows (counted in ``stats``) instead of raising.
            stats: Counts dropped rows by kind (softprompt.tasks.text.reader.TEXT_BAD_KINDS).

        Raises:
            DataError: One line naming the source, the row and the problem (unless ``skip_bad``), or
                there are no examples.
        """
        out = Collector(source, skip_bad, stats, noun="examples")
        number = 0
        for place, record in records:
            try:
                if isinstance(record, BadRecord):
                    raise record
                if not isinstance(record, Mapping):
                    raise BadRecord("bad_row", f"is a {type(record).__name__}, not an object with fields")
                flat = self.rows(record, for_training)
            except BadRecord as err:
                out.bad(place, err)
                continue
            for row in flat:
                try:
                    example = self.example_from_row(row, number)
                    if for_training and not example.labelled:
                        raise BadRecord(
                            "missing_field",
                            f"has no {quote(self.label_field or self.target_field or 'label')}: "
                            "training needs labelled rows (a test split is for predict or eval --output)",
                        )
                except BadRecord as err:
                    out.bad(place, err)
                    continue
                finally:
                    number += 1
                out.add(place, example)
        return out.finish()


_NO_LABEL = object()


def _unlabelled_or(row: Mapping[str, Any], name: str) -> Any:
    """The row's label value, or ``_NO_LABEL`` when the row has none: the field absent (official
    SuperGLUE test files), null, or -1 (Hugging Face's test splits, as T5's ``glue`` reads them)."""
    if isinstance(row, Mapping) and "." not in name and row.get(name) is None:
        return _NO_LABEL
    value = _lookup(row, name)
    if value is None or (value == -1 and isinstance(value, int) and not isinstance(value, bool)):
        return _NO_LABEL
    return value


def _layouts() -> dict[str, Callable[[Mapping[str, Any], bool], list[dict[str, Any]]]]:
    from softprompt.tasks.layouts import LAYOUTS  # deferred: a plain rows task never needs the layouts

    return LAYOUTS
