"""Which `Task` a run, an evaluation or a prompt means: a text task when one is named, else SQuAD."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from softprompt.config.choices import TaskMetric
from softprompt.tasks.base import Task
from softprompt.tasks.squad.qa_task import SquadTask
from softprompt.tasks.text.presets import task_from_flags
from softprompt.tasks.text.spec import TaskSpec
from softprompt.tasks.text.text_task import TextTask

__all__ = ["resolve_task", "task_from_facts", "task_from_saved"]


def resolve_task(flags: Any, saved: Mapping[str, Any] | None = None, *, punctuation: str = "none") -> Task:
    """The task that ``--task`` and the template flags name, else the one a prompt saved, else SQuAD.

    Args:
        flags: An object with softprompt.config.groups.TaskFlags' fields (TrainConfig, EvalArgs, ...).
        saved: The ``task`` a prompt's config recorded (`Task.to_dict`), used when ``--task`` is not given.
        punctuation: SQuAD's text format, when the task is SQuAD-shaped QA.

    Raises:
        ConfigError: The preset or file is unknown, or the resulting task is invalid (every problem).
    """
    spec = task_from_flags(flags, saved)
    return SquadTask(punctuation=punctuation) if spec is None else TextTask(spec)


def task_from_saved(
    saved: Mapping[str, Any] | None, *, punctuation: str = "none", where: str = "the task"
) -> Task:
    """The task a prompt's config recorded: its ``task`` (`Task.to_dict`), or SQuAD in its punctuation
    when it recorded none.

    Raises:
        ConfigError: The recorded task is invalid; the message starts with ``where``.
    """
    if not saved:
        return SquadTask(punctuation=punctuation)
    spec = TaskSpec.from_dict(saved, where=where)
    return SquadTask(punctuation=punctuation) if spec.is_qa else TextTask(spec)


def task_from_facts(facts: Mapping[str, Any]) -> Task:
    """The task a run's recorded facts name (its config merged with results.json, as a model card
    reads them): a text task by its recorded name, template, metric and description, else SQuAD in the
    recorded punctuation."""
    if not facts.get("task"):
        return SquadTask(punctuation=str(facts.get("punctuation") or "none"))
    return TextTask(
        TaskSpec(
            name=str(facts["task"]),
            input_template=facts.get("input_template"),
            metric=TaskMetric(facts.get("metric") or TaskMetric.EXACT_MATCH),
            description=str(facts.get("task_description") or ""),
        )
    )
