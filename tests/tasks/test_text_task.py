"""softprompt.tasks.text.task: task specs, templates, row readers, label strings, errors and tokenization."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from softprompt.config.choices import TaskMetric
from softprompt.data.records import BadRecord
from softprompt.errors import ConfigError, DataError
from softprompt.tasks.text.task import (
    TaskSpec,
    TextExample,
    fill,
    load_task,
    load_task_examples,
    preset_names,
    read_records,
    template_fields,
    tokenize_texts,
)

SENTIMENT = TaskSpec.from_dict(
    {
        "name": "sentiment",
        "input_template": "sentiment review: {text}",
        "label_field": "label",
        "labels": {"pos": "positive", "neg": "negative"},
        "id_field": "id",
    }
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


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


def test_csv_tsv_jsonl_give_the_same_examples(tmp_path):
    rows = [("a1", "great film", "pos"), ("a2", "dull, long", "neg")]
    csv_path = write(
        tmp_path / "d.csv", "id,text,label\n" + "".join(f'{i},"{t}",{lab}\n' for i, t, lab in rows)
    )
    tsv_path = write(
        tmp_path / "d.tsv", "id\ttext\tlabel\n" + "".join(f"{i}\t{t}\t{lab}\n" for i, t, lab in rows)
    )
    jsonl = "".join(json.dumps({"id": i, "text": t, "label": lab}) + "\n" for i, t, lab in rows)
    jsonl_path = write(tmp_path / "d.jsonl", jsonl)
    gz_path = tmp_path / "d.jsonl.gz"
    gz_path.write_bytes(gzip.compress(jsonl.encode()))
    expected = [
        TextExample("a1", "sentiment review: great film", ("positive",), "positive"),
        TextExample("a2", "sentiment review: dull, long", ("negative",), "negative"),
    ]
    for path in (csv_path, tsv_path, jsonl_path, gz_path):
        assert load_task_examples(SENTIMENT, path) == expected, path


@pytest.mark.parametrize(
    ("name", "text", "kind", "place", "clause"),
    [
        (
            "m.csv",
            "id,text,label\n1,ok,pos\n2,fine\n",
            "missing_field",
            "line 3",
            "no value for column 'label'",
        ),
        ("x.csv", "id,text,label\n1,ok,pos,extra\n", "bad_row", "line 2", "more values than the header"),
        ("u.jsonl", '{"id": 1, "text": "ok", "label": "meh"}\n', "unknown_label", "line 1", "label 'meh'"),
        (
            "j.jsonl",
            '{"id": 1, "text": "ok", "label": "pos"}\n{"id": 2, "text"\n',
            "bad_json",
            "line 2",
            "not valid JSON",
        ),
        ("f.jsonl", '{"id": 1, "label": "pos"}\n', "missing_field", "line 1", "no field 'text'"),
        (
            "e.jsonl",
            '{"id": 1, "text": "ok", "label": "pos"}\n{"id": 1, "text": "b", "label": "neg"}\n',
            "duplicate_id",
            "line 2",
            "already used at line 1",
        ),
        ("a.jsonl", "[1, 2]\n", "bad_row", "line 1", "not an object"),
    ],
)
def test_bad_rows_name_file_row_and_field_or_are_skipped(tmp_path, name, text, kind, place, clause):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError) as err:
        load_task_examples(SENTIMENT, path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and place in message and clause in message
    good = text.count("\n") - 1 - name.endswith(".csv")  # one bad row each; a CSV has a header line
    stats: Counter[str] = Counter()
    if good == 0:
        with pytest.raises(DataError, match="contains no examples after dropping 1 bad records"):
            load_task_examples(SENTIMENT, path, skip_bad=True, stats=stats)
    else:
        assert len(load_task_examples(SENTIMENT, path, skip_bad=True, stats=stats)) == good
    assert stats == Counter({kind: 1})


def test_whole_file_problems_are_never_skippable(tmp_path):
    for path, clause in (
        (write(tmp_path / "empty.jsonl", ""), "is empty"),
        (write(tmp_path / "nohead.csv", ""), "has no header row"),
        (write(tmp_path / "d.txt", "x"), "unknown suffix"),
        (tmp_path / "absent.csv", "file not found"),
    ):
        with pytest.raises(DataError, match=clause):
            load_task_examples(SENTIMENT, path, skip_bad=True)
    broken = tmp_path / "b.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"id": 1, "text": "a", "label": "pos"}\n' * 50)[:-12])
    with pytest.raises(DataError, match="damaged or truncated gzip"):
        load_task_examples(SENTIMENT, broken, skip_bad=True)


def test_target_field_with_a_list_and_row_numbers_as_ids(tmp_path):
    spec = TaskSpec.from_dict({"input_template": "q: {q}", "target_field": "golds"})
    path = write(tmp_path / "g.jsonl", '{"q": "a", "golds": ["x", "y"]}\n\n{"q": "b", "golds": "z"}\n')
    assert load_task_examples(spec, path) == [
        TextExample("0", "q: a", ("x", "y")),
        TextExample("1", "q: b", ("z",)),
    ]
    with pytest.raises(DataError, match="the target is empty"):
        load_task_examples(spec, write(tmp_path / "h.jsonl", '{"q": "a", "golds": []}\n'))


def test_read_records_keeps_places_and_drops_bom(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfid,text\n1,a\n")
    assert list(read_records(path)) == [("line 2", {"id": "1", "text": "a"})]


def test_tokenize_texts_truncates_the_input_end_and_trains_every_target(tokenizer):
    examples = [
        TextExample("0", "one two three four five six seven eight", ("yes",)),
        TextExample("1", "short", ("first answer", "second")),
    ]
    eos = tokenizer.eos_token_id
    full = tokenizer(examples[0].inputs, add_special_tokens=False)["input_ids"]
    feats = tokenize_texts(examples, tokenizer, max_source_length=5, max_target_length=8)
    assert [f.example_index for f in feats] == [0, 1]
    assert feats[0].input_ids == [*full[:4], eos] and feats[0].truncated
    assert not feats[1].truncated
    assert feats[1].labels == [*tokenizer("first answer", add_special_tokens=False)["input_ids"], eos]
    train = tokenize_texts(examples, tokenizer, max_source_length=5, max_target_length=2, for_training=True)
    assert [f.example_index for f in train] == [0, 1, 1]
    assert all(len(f.labels) == 2 and f.labels[-1] == eos for f in train)


def test_task_files_and_presets(tmp_path):
    path = write(
        tmp_path / "mine.yaml",
        "# My task: reviews.\n# Launch: softprompt train --task mine.yaml\ninput_template: 'r: {text}'\n"
        "label_field: label\nlabels: [bad, good]\n",
    )
    spec = load_task(path)
    assert spec.name == "mine" and spec.description == "My task: reviews." and spec.classes == ("bad", "good")
    with pytest.raises(ConfigError, match="neither a preset"):
        load_task("no_such_task")
    with pytest.raises(ConfigError, match="not found"):
        load_task(tmp_path / "absent.yaml")
    broken = write(tmp_path / "broken.yaml", "input_template: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_task(broken)
    names = preset_names()
    assert "squad" in names
    assert load_task("squad").is_qa


def test_hugging_face_rows_load_offline_from_a_local_dataset_directory(tmp_path):
    """`hf:NAME` goes through datasets.load_dataset; a local directory of split files needs no network."""
    pytest.importorskip("datasets")
    from softprompt.tasks.text.task import load_task

    data = tmp_path / "rte_flat"
    data.mkdir()
    rows = [  # the Hub's super_glue/rte layout: the label is the class index
        {"premise": "A dog runs.", "hypothesis": "An animal runs.", "idx": 0, "label": 0},
        {"premise": "A cat sleeps.", "hypothesis": "A cat runs.", "idx": 1, "label": 1},
    ]
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_task_examples(load_task("rte"), f"hf:{data}", split="validation")
    assert [(e.id, e.inputs, e.targets) for e in examples] == [
        ("0", "hypothesis: An animal runs. premise: A dog runs.", ("entailment",)),
        ("1", "hypothesis: A cat runs. premise: A cat sleeps.", ("not_entailment",)),
    ]
    with pytest.raises(DataError, match="cannot load this Hugging Face dataset"):
        load_task_examples(load_task("rte"), f"hf:{data}", split="no_such_split")


def test_rank_classification_is_refused_where_targets_are_not_labels():
    from softprompt.inference.task_eval import evaluate_texts

    for name in ("wsc", "record"):  # WSC generates the referent; ReCoRD has no label strings
        with pytest.raises(ConfigError, match="use --classify greedy"):
            evaluate_texts(None, None, load_task(name), [], [], classify="rank")
