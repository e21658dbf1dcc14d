"""Unlabelled rows (issue 25 item 3): test splits read as T5 reads them, target ``<unk>``, never scored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from superglue_records import TEST_RECORDS

from softprompt.commands.format import write_formatted
from softprompt.errors import DataError
from softprompt.tasks.text.presets import load_task
from softprompt.tasks.text.spec import UNLABELLED_TARGET
from softprompt.tasks.text.text_task import TextTask


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


# --------------------------------------------------------------------------------------------------------
# The SuperGLUE leaderboard's files (issue 27 item 4): jiant's write_preds(strict_glue_format) lines.

# Each preset's test record, the answer given, and the line the leaderboard reads.
SUBMISSIONS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "boolq": ("BoolQ.jsonl", "True", {"idx": 0, "label": "true"}),
    "cb": ("CB.jsonl", "neutral", {"idx": 0, "label": "neutral"}),
    "copa": ("COPA.jsonl", "choice2", {"idx": 0, "label": 1}),
    "rte": ("RTE.jsonl", "not_entailment", {"idx": 0, "label": "not_entailment"}),
    "wic": ("WiC.jsonl", "False", {"idx": 0, "label": "false"}),
    "multirc": ("MultiRC.jsonl", "True", {"idx": 0, "passage": {"questions": [{"idx": 0, "answers": [{"idx": 0, "label": 1}]}]}}),
    "record": ("ReCoRD.jsonl", "Alice", {"idx": 0, "label": "Alice"}),
    "wsc": ("WSC.jsonl", "mark", {"idx": 0, "label": "True"}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SUBMISSIONS))
def test_each_superglue_preset_writes_the_leaderboards_line_for_a_test_record(name):
    file_name, answer, line = SUBMISSIONS[name]
    task = TextTask(load_task(name))
    record = {**TEST_RECORDS[name], "idx": 7}
    submission = task.submission("superglue", "greedy" if name in ("record", "wsc") else "rank")
    submission.check(record)
    assert submission.file_name == file_name
    [written] = submission.lines([record], [answer])
    # The record's own idx names the answer: ReCoRD's query idx (0 here), MultiRC's paragraph's (7).
    expected = {**line, "idx": 0 if name == "record" else 7}
    assert written == expected
    assert json.loads(json.dumps(written)) == expected  # plain JSON: ints, strings, nothing else


def test_multirc_answers_nest_under_their_question_and_paragraph_and_wsc_asks_for_the_referent():
    task = TextTask(load_task("multirc"))

    def answers(q: int, *ids: int) -> dict[str, Any]:
        return {"question": f"Q{q}", "idx": q, "answers": [{"text": f"A{a}", "idx": a} for a in ids]}

    records = [
        {"idx": 4, "passage": {"text": "T", "questions": [answers(0, 0, 1), answers(1, 2)]}},
        {"idx": 5, "passage": {"text": "U", "questions": [answers(2, 3)]}},
    ]
    submission = task.submission("superglue", "rank")
    assert submission.lines(records, ["True", "False", "True", "False"]) == [
        {"idx": 4, "passage": {"questions": [
            {"idx": 0, "answers": [{"idx": 0, "label": 1}, {"idx": 1, "label": 0}]},
            {"idx": 1, "answers": [{"idx": 2, "label": 1}]},
        ]}},
        {"idx": 5, "passage": {"questions": [{"idx": 2, "answers": [{"idx": 3, "label": 0}]}]}},
    ]  # fmt: skip
    # WSC: True when the answer names the candidate (T5's wsc_simple: determiners and case ignored).
    wsc = TextTask(load_task("wsc")).submission("superglue", "greedy")
    record = TEST_RECORDS["wsc"]
    labels = [wsc.lines([record], [a])[0]["label"] for a in ("The Mark", "Pete", "")]
    assert labels == ["True", "False", "False"]


def test_a_submission_is_refused_in_one_line_where_the_leaderboard_cannot_read_it():
    from softprompt.data.records import BadRecord
    from softprompt.errors import ConfigError
    from softprompt.tasks.squad.qa_task import SquadTask
    from softprompt.tasks.text.spec import TaskSpec

    rte = TextTask(load_task("rte"))
    no_idx = {k: v for k, v in TEST_RECORDS["rte"].items() if k != "idx"}
    with pytest.raises(BadRecord, match="has no 'idx', an integer, which a SuperGLUE submission names"):
        rte.submission("superglue", "rank").check(no_idx)
    with pytest.raises(BadRecord, match=r"has 'q' as idx\.query"):
        TextTask(load_task("record")).submission("superglue", "greedy").check(
            {**TEST_RECORDS["record"], "qas": [{"query": "@placeholder went", "idx": "q"}]}
        )
    with pytest.raises(ConfigError, match="add --classify rank"):
        rte.submission("superglue", "greedy")
    relabelled = TaskSpec.from_dict({**load_task("rte").to_dict(), "labels": ["yes", "no"]})
    with pytest.raises(ConfigError, match="this task's are yes, no; use --task rte"):
        TextTask(relabelled).submission("superglue", "rank")
    custom = TaskSpec.from_dict({**load_task("rte").to_dict(), "name": "mine"})
    with pytest.raises(ConfigError, match="the mine task is none of them"):
        TextTask(custom).submission("superglue", "rank")
    with pytest.raises(ConfigError, match="the squad task has no leaderboard file"):
        SquadTask().submission("superglue", "greedy")
    # A non-label answer (rank never gives one) is one line, not a KeyError.
    with pytest.raises(DataError, match="is none of the labels"):
        rte.submission("superglue", "rank").lines([TEST_RECORDS["rte"]], ["maybe"])
