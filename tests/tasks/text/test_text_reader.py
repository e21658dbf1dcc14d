"""softprompt.tasks.text.reader: JSONL/CSV/TSV and Hugging Face rows, bad rows named or skipped."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from softprompt.errors import DataError
from softprompt.tasks.text.presets import load_task
from softprompt.tasks.text.reader import load_task_examples, read_records
from softprompt.tasks.text.spec import TaskSpec, TextExample

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


def test_hugging_face_rows_load_offline_from_a_local_dataset_directory(tmp_path):
    """`hf:NAME` goes through datasets.load_dataset; a local directory of split files needs no network."""
    pytest.importorskip("datasets")
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


def test_a_missing_template_field_lists_the_rows_fields(tmp_path):
    """A CSV whose header lacks the template's field: the error lists the header's columns, so the typo
    shows (not only "line 2")."""
    path = write(tmp_path / "typo.csv", "id,txt,label\n1,ok,pos\n")
    with pytest.raises(DataError) as err:
        load_task_examples(SENTIMENT, path)
    assert "line 2: has no field 'text' (its fields: id, txt, label)" in str(err.value)
