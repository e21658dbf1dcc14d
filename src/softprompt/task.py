"""Tasks beyond SQuAD: a task is data + templates + a metric.

A :class:`TaskSpec` says how one record of a data set (a JSONL/CSV/TSV row, a Hugging Face dataset row,
or an official SuperGLUE record expanded by a layout) becomes :class:`TextExample` records: an input
template over the row's fields, a target template or field, for classification a map from label values
to label strings, and the metric. Named presets live in ``configs/tasks/``. QA data (SQuAD JSON, MRQA
JSONL) keeps its own path (softprompt.data) and is the ``squad`` metric.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TextExample"]


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
    """

    id: str
    inputs: str
    targets: tuple[str, ...]
    label: str | None = None
    group: str | None = None
