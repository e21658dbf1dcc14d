"""Unlabelled rows (issue 25 item 3): test splits read as T5 reads them, target ``<unk>``, never scored."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from softprompt.commands.format import write_formatted
from softprompt.errors import DataError
from softprompt.tasks.text.presets import load_task
from softprompt.tasks.text.spec import UNLABELLED_TARGET
from softprompt.tasks.text.text_task import TextTask

# One official SuperGLUE test-file record per preset (the test files have no "label" / no answers).
TEST_RECORDS: dict[str, Mapping[str, Any]] = {
    "boolq": {"question": "is it", "passage": "P", "idx": 0},
    "cb": {"premise": "P", "hypothesis": "H", "idx": 0},
    "copa": {"premise": "P", "choice1": "a", "choice2": "b", "question": "cause", "idx": 0},
    "rte": {"premise": "P", "hypothesis": "H", "idx": 0},
    "wic": {"word": "w", "sentence1": "a w", "sentence2": "b w", "idx": 0},
    "multirc": {
        "idx": 0,
        "passage": {
            "text": "T<br>x",
            "questions": [{"question": "Q", "idx": 0, "answers": [{"text": "A", "idx": 0}]}],
        },
    },
    "record": {
        "idx": 0,
        "passage": {"text": "Alice went.\n@highlight\nBob", "entities": [{"start": 0, "end": 4}]},
        "qas": [{"query": "@placeholder went", "idx": 0}],
    },
    "wsc": {
        "text": "Mark told Pete he was late .",
        "target": {"span1_index": 0, "span1_text": "Mark", "span2_index": 3, "span2_text": "he"},
        "idx": 0,
    },
}


@pytest.mark.parametrize("name", sorted(TEST_RECORDS))
def test_every_superglue_preset_reads_an_unlabelled_test_record(name):
    spec = load_task(name)
    [example] = spec.examples_from_records([("line 1", TEST_RECORDS[name])], source="test.jsonl")
    assert not example.labelled and example.label is None
    # T5: glue writes <unk> for label -1, record for a query without answers; wsc_simple the referent.
    assert example.targets == (("Mark",) if name == "wsc" else (UNLABELLED_TARGET,))
    assert [text for _, text in spec.input_texts(TEST_RECORDS[name])] == [example.inputs]


def test_hugging_face_label_minus_one_is_unlabelled_and_a_real_label_still_is_read():
    spec = load_task("rte")
    rows = [("row 0", {"premise": "P", "hypothesis": "H", "idx": 0, "label": -1}),
            ("row 1", {"premise": "P", "hypothesis": "H", "idx": 1, "label": 1})]  # fmt: skip
    a, b = spec.examples_from_records(rows, source="hf:rte")
    assert (a.labelled, a.targets) == (False, ("<unk>",))
    assert (b.labelled, b.targets, b.label) == (True, ("not_entailment",), "not_entailment")


def test_training_refuses_an_unlabelled_row_with_one_line():
    spec = load_task("cb")
    with pytest.raises(DataError) as err:
        spec.examples_from_records([("line 1", TEST_RECORDS["cb"])], source="test.jsonl", for_training=True)
    assert "test.jsonl" in str(err.value) and "'label'" in str(err.value) and "training" in str(err.value)


def test_unscored_reason_predicts_a_test_split_and_names_the_first_unlabelled_row_of_a_mixed_one():
    task = TextTask(load_task("rte"))
    labelled = {"premise": "P", "hypothesis": "H", "idx": 7, "label": 0}
    unlabelled = [
        ("line 1", {**TEST_RECORDS["rte"], "idx": 3}),
        ("line 2", {**TEST_RECORDS["rte"], "idx": 4}),
    ]
    test = task.spec.examples_from_records(unlabelled, source="t.jsonl")
    reason = task.unscored_reason(test, "t.jsonl")
    assert reason is not None and "t.jsonl" in reason and "no score" in reason
    result = task.score(test, ["entailment", "x"])
    assert result.metrics == {} and result.predictions == {"3": "entailment", "4": "x"}
    mixed = task.spec.examples_from_records([("line 0", labelled), *unlabelled], source="m.jsonl")
    with pytest.raises(DataError, match="example '3' has no 'label'"):
        task.unscored_reason(mixed, "m.jsonl")
    dev = task.spec.examples_from_records([("line 0", labelled)], source="d.jsonl")
    assert task.unscored_reason(dev, "d.jsonl") is None
    assert task.score(dev, ["entailment"]).metrics["accuracy"] == 100.0


def test_format_writes_the_unk_target_of_a_test_file(tmp_path: Path):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(TEST_RECORDS[n]) + "\n" for n in ("boolq",)))
    out = tmp_path / "formatted.jsonl"
    n, skipped = write_formatted(TextTask(load_task("boolq")), str(data), out)
    assert n == 1 and not skipped
    assert json.loads(out.read_text()) == {
        "id": "0",
        "inputs": "passage: P question: is it",
        "targets": "<unk>",
    }
