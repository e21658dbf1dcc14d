"""Flag groups that several subcommands share, each field and its `--help` text written once.

A subcommand's dataclass inherits the groups it takes (`EvalArgs(ModelFlags, GenerationFlags, TaskFlags)`);
where one command needs another default or wording, it overrides that one field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from softprompt.config.choices import TaskMetricName


@dataclass(kw_only=True)
class TaskFlags:
    """The task's flags, shared by train, eval, predict and format (softprompt.tasks.text.task reads them)."""

    task: str | None = None
    """The task: a preset of configs/tasks (boolq, cb, copa, multirc, record, rte, wic, wsc; squad, the default, is QA on SQuAD JSON / MRQA jsonl) or a task YAML file. The flags below override its fields."""
    input_template: str | None = None
    """A text task's model input over each row's fields (JSONL/CSV/TSV or hf: rows), e.g. 'sst2 sentence: {sentence}'."""
    target_template: str | None = None
    """A text task's target over the row's fields; default: the label string (--label_field/--labels)."""
    label_field: str | None = None
    """The row field holding a classification task's label."""
    labels: list[str] = field(default_factory=list)
    """A classification task's label strings in class order: --labels negative positive (a row's label may be the index, the string, or for two classes a bool)."""
    id_field: str | None = None
    """The row field holding each example's unique id (kept in predictions); default: the row number."""
    metric: TaskMetricName | None = None
    """How answers are scored: accuracy, macro_f1, multirc, record, wsc, exact_match, squad (default: the task's; accuracy with --labels, else exact_match)."""
