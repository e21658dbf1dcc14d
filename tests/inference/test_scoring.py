"""softprompt.inference.scoring: a data set answered and scored with its task's metric."""

from __future__ import annotations

import pytest

from softprompt.errors import ConfigError
from softprompt.inference.scoring import evaluate
from softprompt.tasks.squad.qa_task import SquadTask
from softprompt.tasks.text.presets import load_task
from softprompt.tasks.text.text_task import TextTask


def test_rank_classification_is_refused_where_targets_are_not_labels():
    for name in ("wsc", "record"):  # WSC generates the referent; ReCoRD has no label strings
        with pytest.raises(ConfigError, match="use --classify greedy"):
            evaluate(None, None, TextTask(load_task(name)), [], [], classify="rank")
    with pytest.raises(ConfigError, match="not QA"):
        evaluate(None, None, SquadTask(), [], [], classify="rank")
