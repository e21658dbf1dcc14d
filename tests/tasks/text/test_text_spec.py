"""softprompt.tasks.text.spec: templates, label strings, and a task spec's validation."""

from __future__ import annotations

import pytest

from softprompt.config.choices import TaskMetric
from softprompt.data.records import BadRecord
from softprompt.errors import ConfigError
from softprompt.tasks.text.spec import TaskSpec, fill, template_fields


def test_fill_fields_nested_bools_and_literal_braces():
    row = {"a": "x y", "t": {"s": 3}, "b": True, "c": False}
    assert fill("A {a} | {t.s} | {b}/{c} | {{lit}}", row) == "A x y | 3 | True/False | {lit}"
    assert template_fields("q: {question} {{no}} c: {ctx.text}") == ["question", "ctx.text"]
    with pytest.raises(BadRecord) as err:
        fill("{missing}", row)
    assert err.value.kind == "missing_field" and "'missing'" in err.value.reason
    with pytest.raises(BadRecord) as err:
        fill("{t}", row)
    assert err.value.kind == "bad_row"
    with pytest.raises(ValueError):
        template_fields("open {brace")


def test_label_strings_from_index_string_bool_and_map():
    listed = TaskSpec.from_dict({"input_template": "{x}", "label_field": "l", "labels": ["False", "True"]})
    assert listed.metric is TaskMetric.ACCURACY  # labels without a metric: accuracy
    assert [listed.label_string(v) for v in (0, 1, False, True, "True")] == [
        "False",
        "True",
        "False",
        "True",
        "True",
    ]
    for bad in (2, -1, "true", None):
        with pytest.raises(BadRecord) as err:
            listed.label_string(bad)
        assert err.value.kind == "unknown_label"
    mapped = TaskSpec.from_dict(
        {"input_template": "{x}", "label_field": "l", "labels": {True: "yes", 0: "no", "maybe": "unsure"}}
    )
    assert mapped.classes == ("yes", "no", "unsure")
    assert [mapped.label_string(v) for v in (True, 0, "0", "maybe")] == ["yes", "no", "no", "unsure"]


def test_spec_validation_lists_every_problem_in_one_line():
    with pytest.raises(ConfigError) as err:
        TaskSpec.from_dict(
            {"input_template": "x {a", "labels": "q", "metric": "zz", "colour": 1}, where="t.yaml"
        )
    message = str(err.value)
    assert "\n" not in message and message.startswith("t.yaml: ")
    for clause in ("unknown key 'colour'", "metric 'zz'", "labels must be a list", "unbalanced brace"):
        assert clause in message
    with pytest.raises(ConfigError, match="needs labels"):
        TaskSpec.from_dict({"input_template": "{x}", "target_template": "{y}", "metric": "accuracy"})
    with pytest.raises(ConfigError, match="not both"):
        TaskSpec.from_dict({"input_template": "{x}", "target_template": "{y}", "target_field": "y"})
    spec = TaskSpec.from_dict({"input_template": "{x}", "target_field": "y"})
    assert spec.metric is TaskMetric.EXACT_MATCH and spec.classes is None
    assert TaskSpec.from_dict(spec.to_dict()) == spec  # round trip through prompt_config.json
