"""softprompt.inference.task_eval: evaluating a text task's answers."""

from __future__ import annotations

import pytest

from softprompt.errors import ConfigError
from softprompt.inference.task_eval import evaluate_texts
from softprompt.tasks.text.presets import load_task


def test_rank_classification_is_refused_where_targets_are_not_labels():
    for name in ("wsc", "record"):  # WSC generates the referent; ReCoRD has no label strings
        with pytest.raises(ConfigError, match="use --classify greedy"):
            evaluate_texts(None, None, load_task(name), [], [], classify="rank")
