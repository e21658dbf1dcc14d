"""Tests for softprompt.tasks.squad.reader: the SQuAD/MRQA/Hugging Face loaders and their validation, and
tokenization."""

from __future__ import annotations

import gzip
import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MRQA_RE, SQUAD_DEV, SQUAD_TRAIN, need
from softprompt.data.batching import Features
from softprompt.errors import DataError, UserError
from softprompt.tasks.squad.reader import (
    BAD_KINDS,
    QAExample,
    examples_from_rows,
    load_examples,
    load_hf_dataset,
    load_mrqa_jsonl,
    load_squad_json,
    tokenize_examples,
)
from softprompt.tasks.squad.text import format_input, format_target

# --------------------------------------------------------------------------------------------------------
# Helpers


def squad_doc(*paragraphs: dict) -> dict:
    return {"version": "1.1", "data": [{"title": "T", "paragraphs": list(paragraphs)}]}


def para(context: str, *qas: dict) -> dict:
    return {"context": context, "qas": list(qas)}


def qa(qid: str, question: str, *answers: str) -> dict:
    return {"id": qid, "question": question, "answers": [{"text": a, "answer_start": 0} for a in answers]}


GOOD = squad_doc(
    para("Paris is the capital of France.", qa("q1", "What is the capital?", "Paris", "Paris")),
    para(
        "The sky is blue.", qa("q2", "What colour is the sky?", "blue"), qa("q3", "What is blue?", "The sky")
    ),
)


def write_json(tmp_path: Path, obj: object, name: str = "squad.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def mrqa_lines(*records: dict, header: bool = True) -> str:
    lines = [json.dumps({"header": {"dataset": "Test", "split": "dev"}})] if header else []
    lines += [json.dumps(r) for r in records]
    return "\n".join(lines) + "\n"


def mrqa_record(context: str, *qas: tuple[str, str, list[str]]) -> dict:
    return {
        "context": context,
        "qas": [
            {"qid": qid, "question": q, "answers": answers, "detected_answers": []} for qid, q, answers in qas
        ],
    }


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, DataError) and isinstance(excinfo.value, UserError)
    assert "\n" not in message and "\r" not in message
    assert len(message) < 400, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --------------------------------------------------------------------------------------------------------
# The real data in ../shared


@pytest.fixture(scope="module")
def dev() -> list[QAExample]:
    return load_examples(need(SQUAD_DEV))


@pytest.mark.shared
def test_squad_dev_counts_and_first_example(dev: list[QAExample]) -> None:
    assert len(dev) == 10_570
    assert len({e.id for e in dev}) == 10_570
    assert sum(len(e.answers) for e in dev) == 34_726
    assert len({e.context for e in dev}) == 2_067
    first = dev[0]
    assert first.id == "56be4db0acb8001400a502ec"
    assert first.question == "Which NFL team represented the AFC at Super Bowl 50?"
    assert first.answers == ("Denver Broncos",) * 3
    assert first.context.startswith("Super Bowl 50 was an American football game")
    # Verbatim: 344 dev questions carry outer whitespace and must not be stripped by the loader.
    assert sum(e.question != e.question.strip() for e in dev) == 344


@pytest.mark.shared
def test_squad_train_counts() -> None:
    stats: Counter = Counter()
    train = load_squad_json(need(SQUAD_TRAIN), skip_bad=True, stats=stats)
    assert len(train) == 87_599
    assert stats == Counter()  # nothing in the real file is bad
    assert len({e.id for e in train}) == 87_599
    assert sum(e.id.startswith("explorer_train_") for e in train) == 75_722
    assert train[0].answers == ("Saint Bernadette Soubirous",)


@pytest.mark.shared
def test_mrqa_relation_extraction_counts() -> None:
    examples = load_examples(need(MRQA_RE))
    assert len(examples) == 2_948
    assert len({e.id for e in examples}) == 2_948
    assert examples[0] == QAExample(
        id="5b704e92b4d34957b69ef29110871144",
        question="Why did Ray Eberle die?",
        context="Ray Eberle died of a heart attack in Douglasville, Georgia on August 25, 1979, aged 60.",
        answers=("heart attack",),
    )


@pytest.mark.shared
def test_mrqa_gzip_matches_plain(tmp_path: Path) -> None:
    raw = need(MRQA_RE).read_bytes()
    gz = tmp_path / "re.jsonl.gz"
    gz.write_bytes(gzip.compress(raw))
    assert load_examples(gz) == load_examples(MRQA_RE)


# --------------------------------------------------------------------------------------------------------
# Loaders on small files


def test_squad_good_file(tmp_path: Path) -> None:
    examples = load_examples(write_json(tmp_path, GOOD))
    assert examples == [
        QAExample("q1", "What is the capital?", "Paris is the capital of France.", ("Paris", "Paris")),
        QAExample("q2", "What colour is the sky?", "The sky is blue.", ("blue",)),
        QAExample("q3", "What is blue?", "The sky is blue.", ("The sky",)),
    ]


def test_squad_gzip_and_bom_and_int_id(tmp_path: Path) -> None:
    doc = squad_doc(para("Ten is 10.", {"id": 7, "question": "What?", "answers": [{"text": "10"}]}))
    gz = tmp_path / "s.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(doc).encode()))
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())
    expected = [QAExample("7", "What?", "Ten is 10.", ("10",))]
    assert load_examples(gz) == expected
    assert load_squad_json(bom) == expected


def test_answer_check_forgives_only_whitespace(tmp_path: Path) -> None:
    doc = squad_doc(para("New  York\nCity is big.", qa("a", "Where?", "New York City")))
    assert load_squad_json(write_json(tmp_path, doc))[0].answers == ("New York City",)
    doc = squad_doc(para("New York City is big.", qa("a", "Where?", "new york city")))
    with pytest.raises(DataError) as excinfo:
        load_squad_json(write_json(tmp_path, doc))
    assert_one_line_error(excinfo, "data[0].paragraphs[0].qas[0]", "'new york city' does not occur")


def test_mrqa_keeps_markers_and_accepts_id_and_aliases(tmp_path: Path) -> None:
    context = "[TLE] Title [SEP] First part. [PAR] [DOC] Barack Obama was born in Hawaii."
    record = {
        "context": context,
        "qas": [
            {"id": "x1", "question": "Where?", "answers": ["Honolulu", "HAWAII"]},
            {"qid": "x2", "question": "Who?", "answers": ["Barack  Obama"]},
        ],
    }
    path = tmp_path / "m.jsonl"
    path.write_text(mrqa_lines(record), encoding="utf-8")
    examples = load_mrqa_jsonl(path)
    assert [e.id for e in examples] == ["x1", "x2"]
    assert examples[0].context == context  # markers untouched
    assert examples[0].answers == ("Honolulu", "HAWAII")  # aliases kept, first is the target


def test_mrqa_without_header_and_with_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("\n" + mrqa_lines(mrqa_record("a b c", ("1", "q?", ["b"])), header=False) + "\n\n")
    assert load_mrqa_jsonl(path) == [QAExample("1", "q?", "a b c", ("b",))]


# --------------------------------------------------------------------------------------------------------
# Hostile input: every case raises a one-line DataError naming the file and the place


def _squad_variant(mutate) -> dict:
    doc = json.loads(json.dumps(GOOD))
    mutate(doc)
    return doc


SQUAD_BAD = {
    "missing_paragraphs": (lambda d: d["data"][0].pop("paragraphs"), "data[0]: has no 'paragraphs' key"),
    "context_not_str": (
        lambda d: d["data"][0]["paragraphs"][1].update(context=5),
        "data[0].paragraphs[1]: 'context' must be a string, not int",
    ),
    "qas_not_list": (
        lambda d: d["data"][0]["paragraphs"][1].update(qas={}),
        "data[0].paragraphs[1]: 'qas' must be a list, not dict",
    ),
    "missing_question": (
        lambda d: d["data"][0]["paragraphs"][1]["qas"][1].pop("question"),
        "data[0].paragraphs[1].qas[1] (id 'q3'): has no 'question' key",
    ),
    "question_not_str": (
        lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(question=None),
        "qas[0] (id 'q1'): 'question' must be a string, not null",
    ),
    "missing_answers": (
        lambda d: d["data"][0]["paragraphs"][1]["qas"][0].pop("answers"),
        "qas[0] (id 'q2'): has no 'answers' key",
    ),
    "empty_answers": (
        lambda d: d["data"][0]["paragraphs"][1]["qas"][0].update(answers=[]),
        "data[0].paragraphs[1].qas[0] (id 'q2'): the question has no answers",
    ),
    "squad2_impossible": (
        lambda d: d["data"][0]["paragraphs"][1]["qas"][0].update(answers=[], is_impossible=True),
        "unanswerable SQuAD 2.0 question",
    ),
    "answer_text_missing": (
        lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][1].pop("text"),
        "qas[0] (id 'q1'): has no 'text' key",
    ),
    "answer_not_object": (
        lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"].append("Paris"),
        "answer 2 must be an object, not str",
    ),
    "empty_answer_text": (
        lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][1].update(text=" "),
        "qas[0] (id 'q1'): answer 1 has no text",
    ),
    "whitespace_question": (
        lambda d: d["data"][0]["paragraphs"][1]["qas"][1].update(question=" \t\u3000"),
        "data[0].paragraphs[1].qas[1] (id 'q3'): the question has no text",
    ),
    "answer_not_in_context": (
        lambda d: d["data"][0]["paragraphs"][1]["qas"][1]["answers"][0].update(text="the sky"),
        "qas[1] (id 'q3'): answer 0 'the sky' does not occur in the context",
    ),
    "empty_context": (
        lambda d: d["data"][0]["paragraphs"][1].update(context="  "),
        "data[0].paragraphs[1].qas[0] (id 'q2'): the context has no text",
    ),
    "duplicate_id": (
        lambda d: d["data"][0]["paragraphs"][1]["qas"][1].update(id="q1"),
        "qas[1] (id 'q1'): id 'q1' was already used at data[0].paragraphs[0].qas[0] (id 'q1')",
    ),
    "empty_id": (lambda d: d["data"][0]["paragraphs"][1]["qas"][1].update(id=""), "the id is empty"),
    "bool_id": (lambda d: d["data"][0]["paragraphs"][1]["qas"][1].update(id=True), "not bool"),
}


@pytest.mark.parametrize("case", sorted(SQUAD_BAD))
def test_squad_bad_records(tmp_path: Path, case: str) -> None:
    mutate, fragment = SQUAD_BAD[case]
    path = write_json(tmp_path, _squad_variant(mutate))
    with pytest.raises(DataError) as excinfo:
        load_examples(path)
    message = assert_one_line_error(excinfo, str(path), fragment, "skip_bad")
    assert message.count(".") >= 1 and message.endswith(".")


def test_skip_bad_counts_each_kind(tmp_path: Path) -> None:
    doc = json.loads(json.dumps(GOOD))
    qas = doc["data"][0]["paragraphs"][0]["qas"]
    qas.append(qa("e1", "Q?"))  # empty_answers
    qas.append(qa("e2", "  ", "Paris"))  # empty_question
    qas.append(qa("e3", "Q?", "Lyon"))  # answer_not_in_context
    qas.append(qa("q2", "Q?", "Paris"))  # duplicate_id (q2 comes later, so this one is kept and q2 dropped)
    qas.append({"id": "e4", "answers": []})  # bad_schema (missing question)
    doc["data"][0]["paragraphs"].append(
        para("", qa("e5", "Q?", "x"), qa("e6", "Q?", "y"))
    )  # 2 x empty_context
    doc["data"].append({"title": "no paragraphs"})  # bad_schema
    stats: Counter = Counter()
    examples = load_squad_json(write_json(tmp_path, doc), skip_bad=True, stats=stats)
    assert [e.id for e in examples] == ["q1", "q2", "q3"]
    assert examples[1].context == "Paris is the capital of France."  # the first q2 wins
    assert stats == Counter(
        empty_answers=1,
        empty_question=1,
        answer_not_in_context=1,
        duplicate_id=1,
        bad_schema=2,
        empty_context=2,
    )
    assert set(stats) <= set(BAD_KINDS)


def test_skip_bad_everything_bad_is_still_an_error(tmp_path: Path) -> None:
    doc = squad_doc(para("ctx", qa("a", "Q?", "nope")))
    stats: Counter = Counter()
    with pytest.raises(DataError) as excinfo:
        load_squad_json(write_json(tmp_path, doc), skip_bad=True, stats=stats)
    assert_one_line_error(excinfo, "contains no questions after dropping 1 bad records")
    assert stats == Counter(answer_not_in_context=1)


FILE_BAD = {
    "malformed_json": (b'{"version": "1.1",\n  "data": [}', "line 2, column 12: is not valid JSON"),
    "top_level_list": (b"[1, 2]", "top level: expected a SQuAD object with a 'data' list, found list"),
    "no_data_key": (b'{"version": "1.1"}', "found an object without a 'data' list"),
    "no_questions": (b'{"data": []}', "contains no questions"),
    "empty": (b"", "is empty"),
    "whitespace_only": (b"  \n\t", "is empty"),
    "non_utf8": (b'{"data": [\n "caf\xe9"]}', "line 2, byte offset 16: is not UTF-8 (byte 0xe9)"),
    "deep_nesting": (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    "huge_integer": (b'{"data": ' + b"9" * 5000 + b"}", "is not valid JSON"),
    "nan_context": (
        b'{"data": [{"paragraphs": [{"context": NaN, "qas": []}]}]}',
        "'context' must be a string",
    ),
}


@pytest.mark.parametrize("case", sorted(FILE_BAD))
def test_squad_bad_files(tmp_path: Path, case: str) -> None:
    content, fragment = FILE_BAD[case]
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        load_squad_json(path, skip_bad=case != "nan_context")  # file-level damage is never skippable
    assert_one_line_error(excinfo, str(path), fragment)


def test_missing_directory_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_examples(tmp_path / "nope.json")
    assert_one_line_error(excinfo, "nope.json: file not found")
    with pytest.raises(DataError) as excinfo:
        load_examples("squad")  # a bare name is a path, never a silent download
    assert_one_line_error(excinfo, "squad: file not found", "write hf:squad")
    with pytest.raises(DataError) as excinfo:
        load_examples(tmp_path)
    assert_one_line_error(excinfo, "is not a regular file")
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    with pytest.raises(DataError) as excinfo:
        load_examples(odd)
    assert_one_line_error(excinfo, "data.csv: has an unknown suffix", ".jsonl.gz")
    with pytest.raises(DataError) as excinfo:
        load_examples("hf:")
    assert_one_line_error(excinfo, "names no dataset")
    with pytest.raises(DataError) as excinfo:
        load_examples(tmp_path / "two\nlines.json")
    assert_one_line_error(excinfo, "two\\nlines.json")


MRQA_OK = mrqa_record("Alice met Bob in Paris.", ("m1", "Who met Bob?", ["Alice"]))
MRQA_BAD = {
    "malformed_line": (mrqa_lines(MRQA_OK).encode() + b'{"context": "x", "qas": [\n', "line 3: column 26"),
    "non_utf8_line": (
        mrqa_lines(MRQA_OK).encode() + b'{"context": "\xff"}\n',
        "line 3: is not UTF-8 at byte",
    ),
    "missing_qid": (
        mrqa_lines({"context": "a b", "qas": [{"question": "q?", "answers": ["a"]}]}).encode(),
        "line 2, qas[0]: has no 'qid' (or 'id') key",
    ),
    "answers_not_list": (
        mrqa_lines({"context": "a b", "qas": [{"qid": "z", "question": "q?", "answers": "a"}]}).encode(),
        "line 2, qas[0] (id 'z'): 'answers' must be a list, not str",
    ),
    "answer_not_str": (
        mrqa_lines(
            {"context": "a b", "qas": [{"qid": "z", "question": "q?", "answers": [{"text": "a"}]}]}
        ).encode(),
        "answer 0 must be a string, not dict",
    ),
    "no_answer_in_context": (
        mrqa_lines(mrqa_record("a b", ("z", "q?", ["c", "d"]))).encode(),
        "line 2, qas[0] (id 'z'): none of its 2 answers occurs in the context",
    ),
    "empty_context": (mrqa_lines(mrqa_record("", ("z", "q?", ["c"]))).encode(), "the context has no text"),
    "line_not_object": (
        mrqa_lines(MRQA_OK).encode() + b"[1]\n",
        "line 3: a line must be an object, not list",
    ),
    "duplicate": (
        mrqa_lines(MRQA_OK, MRQA_OK).encode(),
        "line 3, qas[0] (id 'm1'): id 'm1' was already used",
    ),
    "header_only": (mrqa_lines().encode(), "contains no questions"),
    "empty": (b"", "is empty"),
}


@pytest.mark.parametrize("case", sorted(MRQA_BAD))
def test_mrqa_bad_input(tmp_path: Path, case: str) -> None:
    content, fragment = MRQA_BAD[case]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        load_examples(path)
    assert_one_line_error(excinfo, str(path), fragment)


def test_mrqa_skip_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        mrqa_lines(MRQA_OK, mrqa_record("x y", ("m2", "q?", ["z"])), {"qas": []}).encode()
        + b"{broken\n\xff\xfe\n"
        + json.dumps(mrqa_record("p q", ("m3", "q?", ["q"]))).encode()
    )
    stats: Counter = Counter()
    assert [e.id for e in load_mrqa_jsonl(path, skip_bad=True, stats=stats)] == ["m1", "m3"]
    assert stats == Counter(answer_not_in_context=1, bad_schema=1, bad_json=1, bad_encoding=1)


def test_mrqa_non_utf8_reports_file_byte_offset(tmp_path: Path) -> None:
    head = mrqa_lines(MRQA_OK).encode()
    path = tmp_path / "m.jsonl"
    path.write_bytes(head + b'{"context": "ab\x80"}\n')
    with pytest.raises(DataError) as excinfo:
        load_mrqa_jsonl(path)
    assert_one_line_error(excinfo, f"line 3: is not UTF-8 at byte offset {len(head) + 15} (byte 0x80)")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad_crc"])
def test_damaged_gzip(tmp_path: Path, damage: str) -> None:
    packed = gzip.compress(mrqa_lines(*[MRQA_OK] * 1, mrqa_record("u v", ("m9", "q?", ["v"]))).encode() * 50)
    if damage == "truncated":
        packed = packed[: len(packed) // 2]
    elif damage == "garbage":
        packed = packed[:10] + bytes(range(256)) * 4
    else:
        packed = packed[:-8] + b"\0\0\0\0" + packed[-4:]
    for loader, name in ((load_mrqa_jsonl, "m.jsonl.gz"), (load_squad_json, "s.json.gz")):
        path = tmp_path / name
        path.write_bytes(packed)
        with pytest.raises(DataError) as excinfo:
            loader(path, skip_bad=True)
        assert_one_line_error(excinfo, str(path), "is a damaged or truncated gzip file")


# --------------------------------------------------------------------------------------------------------
# 50 MB single lines

BIG = 50 * 1024 * 1024


def test_huge_valid_mrqa_line_loads(tmp_path: Path) -> None:
    context = "word " * (BIG // 5) + "needle"
    path = tmp_path / "big.jsonl"
    path.write_text(mrqa_lines(mrqa_record(context, ("b", "Where is it?", ["needle"]))))
    (example,) = load_mrqa_jsonl(path)
    assert len(example.context) == len(context) and example.answers == ("needle",)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_huge_invalid_line_gives_short_error(tmp_path: Path, suffix: str) -> None:
    prefix = '{"data": [{"context": "'
    junk = prefix + "x" * BIG + '" "oops"}]}'
    path = tmp_path / f"big{suffix}"
    path.write_text(junk)
    with pytest.raises(DataError) as excinfo:
        load_examples(path)
    message = assert_one_line_error(excinfo, str(path), "is not valid JSON")
    assert (
        f"column {len(prefix) + BIG + 3}: " in message
    )  # the exact place (the stray quote), not the content
    assert "xxxxxxxxxx" not in message


def test_huge_answer_is_quoted_short(tmp_path: Path) -> None:
    answer = "y" * 100_000
    path = write_json(tmp_path, squad_doc(para("short", qa("h", "Q?", answer))))
    with pytest.raises(DataError) as excinfo:
        load_squad_json(path)
    assert_one_line_error(excinfo, "'" + "y" * 80 + "'... (100,000 characters) does not occur")


# --------------------------------------------------------------------------------------------------------
# Property tests over the loaders

_text = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() != "")


@st.composite
def squad_documents(draw) -> tuple[dict, list[QAExample]]:
    articles, expected, counter = [], [], 0
    for _ in range(draw(st.integers(1, 3))):
        paragraphs = []
        for _ in range(draw(st.integers(1, 3))):
            context = draw(st.text(min_size=1, max_size=60).filter(lambda s: s.strip() != ""))
            qas = []
            for _ in range(draw(st.integers(0, 3))):
                answers = []
                for _ in range(draw(st.integers(1, 3))):
                    i = draw(st.integers(0, len(context) - 1))
                    j = draw(st.integers(i + 1, len(context)))
                    answers.append(context[i:j])
                # Slices may be blank; keep only those the loader accepts, then ensure one survives.
                answers = [a for a in answers if a.strip()] or [context]
                question = draw(_text)
                qid = f"id{counter}-" + draw(st.text(max_size=5))
                counter += 1
                qas.append({"id": qid, "question": question, "answers": [{"text": a} for a in answers]})
                expected.append(QAExample(qid, question, context, tuple(answers)))
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": draw(st.text(max_size=5)), "paragraphs": paragraphs})
    return {"version": "1.1", "data": articles}, expected


@settings(max_examples=60, deadline=None)
@given(squad_documents(), st.booleans())
def test_valid_squad_round_trips_through_both_formats(doc_expected, ascii_only: bool) -> None:
    doc, expected = doc_expected
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gen.json"
        path.write_text(json.dumps(doc, ensure_ascii=ascii_only), encoding="utf-8")
        if not expected:
            with pytest.raises(DataError):
                load_examples(path)
            return
        assert load_examples(path) == expected
        # The same questions as MRQA lines (gzip-compressed) come back identical.
        lines = mrqa_lines(
            *(
                {
                    "context": p["context"],
                    "qas": [
                        {
                            "qid": q["id"],
                            "question": q["question"],
                            "answers": [a["text"] for a in q["answers"]],
                        }
                        for q in p["qas"]
                    ],
                }
                for art in doc["data"]
                for p in art["paragraphs"]
            )
        )
        gz = Path(tmp) / "gen.jsonl.gz"
        gz.write_bytes(gzip.compress(lines.encode()))
        assert load_examples(gz) == expected


# Starts that steer random bytes into the interesting paths: gzip headers, JSON openings, a whole valid file.
_VALID_GZ = gzip.compress(json.dumps(GOOD).encode())
_PREFIXES = [b"", b"\x1f\x8b", _VALID_GZ[:10], b'{"data": [', b'{"context": "a", "qas": [', b"\xef\xbb\xbf"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_PREFIXES),
    st.binary(max_size=300),
    st.sampled_from(["a.json", "a.jsonl", "a.json.gz"]),
    st.booleans(),
)
def test_arbitrary_bytes_raise_only_data_error(
    prefix: bytes, content: bytes, name: str, skip_bad: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(prefix + content)
        try:
            result = load_examples(path, skip_bad=skip_bad)
        except DataError as err:
            assert "\n" not in str(err)
        else:
            assert all(isinstance(e, QAExample) for e in result)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, len(_VALID_GZ) - 1), st.sampled_from(["a.json.gz", "a.jsonl.gz"]))
def test_every_truncation_of_a_gzip_file_is_a_data_error(cut: int, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(_VALID_GZ[:cut])
        with pytest.raises(DataError) as excinfo:
            load_examples(path)
        assert "\n" not in str(excinfo.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["root", "article", "paragraph", "qa", "answer", "line", "mrqa_qa"]),
    _json,
    st.booleans(),
)
def test_arbitrary_json_in_any_slot_raises_only_data_error(slot: str, value: object, skip_bad: bool) -> None:
    """Whatever JSON sits where a structure is expected, the loaders answer with examples or a DataError."""
    answer = {"text": "b"}
    qa_obj = {"id": "i", "question": "q?", "answers": [answer]}
    if slot == "answer":
        qa_obj["answers"] = [value]
    paragraph = {"context": "a b", "qas": [value if slot == "qa" else qa_obj]}
    article = {"paragraphs": [value if slot == "paragraph" else paragraph]}
    root = value if slot == "root" else {"data": [value if slot == "article" else article]}
    mrqa_obj = {
        "context": "a b",
        "qas": [value if slot == "mrqa_qa" else {"qid": "i", "question": "q", "answers": ["a"]}],
    }
    with tempfile.TemporaryDirectory() as tmp:
        if slot in ("line", "mrqa_qa"):
            path = Path(tmp) / "x.jsonl"
            path.write_text(mrqa_lines(value if slot == "line" else mrqa_obj))
        else:
            path = Path(tmp) / "x.json"
            path.write_text(json.dumps(root))
        try:
            result = load_examples(path, skip_bad=skip_bad)
        except DataError as err:
            assert "\n" not in str(err) and len(str(err)) < 400
        else:
            assert len(result) == 1 and result[0].context == "a b"


# --------------------------------------------------------------------------------------------------------
# Hugging Face datasets, always from local data


HF_ROWS = {
    "id": ["h1", "h2"],
    "title": ["t", "t"],
    "question": ["Who?", "Where?"],
    "context": ["Ada wrote it in London.", "Ada wrote it in London."],
    "answers": [
        {"text": ["Ada"], "answer_start": [0]},
        {"text": ["London", "in London"], "answer_start": [16, 13]},
    ],
}
HF_EXPECTED = [
    QAExample("h1", "Who?", "Ada wrote it in London.", ("Ada",)),
    QAExample("h2", "Where?", "Ada wrote it in London.", ("London", "in London")),
]


def test_examples_from_rows_on_a_dataset() -> None:
    import datasets

    assert examples_from_rows(datasets.Dataset.from_dict(HF_ROWS), source="mem") == HF_EXPECTED
    rows = [dict(zip(HF_ROWS, values, strict=True)) for values in zip(*HF_ROWS.values(), strict=True)]
    rows[1]["answers"] = {"text": []}
    stats: Counter = Counter()
    assert examples_from_rows(rows, source="mem", skip_bad=True, stats=stats) == HF_EXPECTED[:1]
    assert stats == Counter(empty_answers=1)
    rows[1]["answers"] = ["London"]  # a plain list of strings also works
    assert examples_from_rows(rows, source="mem")[1].answers == ("London",)
    rows[1]["answers"] = {"answer_start": [0]}
    with pytest.raises(DataError) as excinfo:
        examples_from_rows(rows, source="squad [validation]")
    assert_one_line_error(
        excinfo, "squad [validation]: row 1 (id 'h2'): 'answers.text' must be a list, not null"
    )


def test_load_hf_dataset_from_local_json(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(
            json.dumps(dict(zip(HF_ROWS, v, strict=True))) + "\n" for v in zip(*HF_ROWS.values(), strict=True)
        )
    )
    examples = load_hf_dataset("json", "train", data_files=str(path), cache_dir=str(tmp_path / "cache"))
    assert examples == HF_EXPECTED


def test_load_hf_dataset_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def not_found(name: str, split: str, **kwargs: object) -> None:
        raise datasets.exceptions.DatasetNotFoundError(
            f"Dataset '{name}' doesn't exist on the Hub\nor cannot be accessed."
        )

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(DataError) as excinfo:
        load_examples("hf:nobody/nothing", split="validation")
    assert_one_line_error(excinfo, "nobody/nothing [validation]: cannot load", "DatasetNotFoundError")

    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, split, **kw: datasets.Dataset.from_dict({"x": [1]})
    )
    with pytest.raises(DataError) as excinfo:
        load_hf_dataset("odd", "train")
    assert_one_line_error(
        excinfo, "odd [train]: has no column 'id', 'question', 'context', 'answers' (it has x)"
    )

    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, split, **kw: datasets.Dataset.from_dict(HF_ROWS)
    )
    assert load_examples("hf:squad", split="validation") == HF_EXPECTED


# --------------------------------------------------------------------------------------------------------
# Tokenization


@pytest.fixture(scope="module")
def dev_features(dev: list[QAExample], tokenizer) -> list[Features]:
    return tokenize_examples(dev, tokenizer)


@pytest.mark.shared
def test_tokenization_equals_whole_string_tokenization(dev: list[QAExample], tokenizer) -> None:
    sample = dev[::40]
    for style in ("none", "paper", "current"):
        features = tokenize_examples(
            sample, tokenizer, max_source_length=4096, max_target_length=512, punctuation=style
        )
        sources = tokenizer([format_input(e.question, e.context, style) for e in sample])["input_ids"]
        targets = tokenizer([format_target(e.answers[0], style) for e in sample])["input_ids"]
        assert [f.input_ids for f in features] == sources
        assert [f.labels for f in features] == targets
        assert [f.example_index for f in features] == list(range(len(sample)))
        assert not any(f.truncated for f in features)
    assert tokenizer.decode(features[0].input_ids, skip_special_tokens=True).startswith(
        "question: Which NFL team"
    )


@pytest.mark.shared
def test_truncation_keeps_question_and_respects_length(
    dev: list[QAExample], dev_features: list[Features], tokenizer
) -> None:
    assert all(len(f.input_ids) <= 512 and f.input_ids[-1] == 1 for f in dev_features)
    assert all(len(f.labels) <= 32 and f.labels[-1] == 1 for f in dev_features)
    truncated = [f for f in dev_features if f.truncated]
    assert len(truncated) == 85  # dev questions whose full source exceeds 512 tokens
    assert all(len(f.input_ids) == 512 for f in truncated)

    marker = tokenizer("context:", add_special_tokens=False)["input_ids"]
    longest = sorted(range(len(dev)), key=lambda i: -len(dev[i].context))[:30]
    subset = [dev[i] for i in longest]
    short = tokenize_examples(subset, tokenizer, max_source_length=48)
    question_ids = tokenizer([f"question: {e.question}" for e in subset], add_special_tokens=False)[
        "input_ids"
    ]
    for example, feature, q_ids in zip(subset, short, question_ids, strict=True):
        assert feature.truncated and len(feature.input_ids) == 48
        assert feature.input_ids[: len(q_ids) + len(marker)] == q_ids + marker
        text = tokenizer.decode(feature.input_ids, skip_special_tokens=True)
        assert text.startswith(f"question: {example.question.strip()} context: ")
        assert example.context.startswith(text.split(" context: ", 1)[1][:20])


def test_degenerate_lengths(tokenizer) -> None:
    example = QAExample(
        "x", "a very long question " * 20, "and its context", ("an answer that is long " * 5,)
    )
    (feature,) = tokenize_examples([example], tokenizer, max_source_length=6, max_target_length=3)
    marker = tokenizer("context:", add_special_tokens=False)["input_ids"]
    assert len(feature.input_ids) == 6 and feature.input_ids[-3:] == [*marker, 1]
    assert len(feature.labels) == 3 and feature.labels[-1] == 1
    with pytest.raises(ValueError, match="max_source_length=3"):
        tokenize_examples([example], tokenizer, max_source_length=3)
    with pytest.raises(ValueError, match="max_target_length=1"):
        tokenize_examples([example], tokenizer, max_target_length=1)
    assert tokenize_examples([], tokenizer) == []
