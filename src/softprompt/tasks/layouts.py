"""SuperGLUE records as the flat rows T5's preprocessors read: the ``multirc``, ``record`` and ``wsc`` layouts.

Five SuperGLUE tasks (BoolQ, CB, COPA, RTE, WiC) are one row per JSONL line, and a task template reads
their fields as they are. Three are not, and T5 does more to them than join fields with their names.
Each function here takes ONE record, either an official SuperGLUE JSONL line
(https://super.gluebenchmark.com, the files TFDS ``super_glue`` 1.0.2 reads) or a row of the Hugging
Face ``super_glue`` dataset (already flat), tells them apart by their fields, and returns the flat rows
with every text change T5 makes already made, so the template only joins:

- ``multirc``: one row per answer option (TFDS ``_generate_examples``), fields ``paragraph``,
  ``question``, ``answer`` with ``<br>`` made a space and ``<b>``/``</b>`` removed (T5
  ``preprocessors.glue`` for ``benchmark_name == "multirc"``), ``label``, ``id`` ``"p-q-a"`` and
  ``group`` the question's idx alone (the unit MultiRC's exact match scores: T5's
  ``postprocessors.multirc`` groups by ``idx/question``, not by paragraph and question).
- ``record``: one row per query, fields ``passage`` with T5's ``@highlight`` rules (``preprocessors.record``),
  ``query``, ``entities`` (the distinct entity texts ``text[start:end + 1]``, sorted, joined with ", "),
  ``answers`` (the distinct answer texts, sorted; a list, empty for unlabelled rows) and ``id`` ``"p-q"``.
  T5 trains on one example per answer; the caller expands ``answers``.
- ``wsc``: the spans repaired as TFDS ``wsc.fixed`` does (``_fix_wst``), then ``marked_text``, T5's
  ``wsc_simple`` input without its ``"wsc:"`` label (``_wsc_inputs`` blanks the pronoun at
  ``span2_index`` to ``X``, then every ``" X "`` becomes ``" *pronoun* "``); ``span1_text`` is the
  target (the candidate referent), ``label`` says whether it is the referent, ``id`` the record's idx.
  Training keeps only the rows whose label is true (``wsc_simple(correct_referent_only=True)``).

Every row also keeps ``idx`` as the source had it. A record that does not fit raises ``ValueError`` whose
message starts with the field's path (``passage.questions[0].answers[2].text is missing``); the caller
adds the file and line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "LAYOUTS",
    "Row",
    "expand_multirc",
    "expand_record",
    "expand_wsc",
    "fix_wsc_spans",
    "multirc_text",
    "record_passage",
    "wsc_marked_text",
]

Row = dict[str, Any]
"""One flat row: field name -> value, what a task's templates read."""


# ----------------------------------------------------------------------------------------------------------
# Reading fields with one-line errors.


def _field(record: Mapping[str, Any], key: str, path: str) -> Any:
    """``record[key]``, or ValueError naming ``path`` when it is absent or null."""
    value = record.get(key)
    if value is None:
        raise ValueError(f"{path} is missing")
    return value


def _text(record: Mapping[str, Any], key: str, path: str) -> str:
    value = _field(record, key, path)
    if not isinstance(value, str):
        raise ValueError(f"{path} must be a string, not {type(value).__name__} {value!r:.40}")
    return value


def _int(record: Mapping[str, Any], key: str, path: str) -> int:
    value = _field(record, key, path)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{path} must be an integer, not {type(value).__name__} {value!r:.40}")
    return value


def _id(record: Mapping[str, Any], key: str, path: str) -> str:
    """An index field as id text: an integer (SuperGLUE) or a string."""
    value = _field(record, key, path)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{path} must be an integer or a string, not {type(value).__name__} {value!r:.40}")
    return str(value)


def _mapping(record: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = _field(record, key, path)
    if not isinstance(value, Mapping):
        raise ValueError(f"{path} must be an object, not {type(value).__name__} {value!r:.40}")
    return value


def _list(record: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = _field(record, key, path)
    if not isinstance(value, list):
        raise ValueError(f"{path} must be a list, not {type(value).__name__} {value!r:.40}")
    return value


def _strings(record: Mapping[str, Any], key: str, path: str) -> list[str]:
    items = _list(record, key, path)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"{path}[{i}] must be a string, not {type(item).__name__} {item!r:.40}")
    return items


def _objects(record: Mapping[str, Any], key: str, path: str) -> list[Mapping[str, Any]]:
    items = _list(record, key, path)
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"{path}[{i}] must be an object, not {type(item).__name__} {item!r:.40}")
    return items


def _with_label(row: Row, record: Mapping[str, Any]) -> Row:
    """``row`` plus the record's ``label`` when it has one (test rows have none)."""
    if record.get("label") is not None:
        row["label"] = record["label"]
    return row


# ----------------------------------------------------------------------------------------------------------
# MultiRC: T5 preprocessors.glue(benchmark_name="multirc", feature_names=("question", "answer", "paragraph")).


def multirc_text(text: str) -> str:
    """MultiRC text as T5 feeds it: ``<br>`` -> a space, then ``<b>`` and ``</b>`` removed.

    T5 cleans the joined input string; the field names it joins with hold no markup, so cleaning each
    field gives the same input.
    """
    return re.sub(r"</?b>", "", text.replace("<br>", " "))


def expand_multirc(record: Mapping[str, Any], for_training: bool) -> list[Row]:
    """One row per answer option of a MultiRC record (the same for training and evaluation).

    Args:
        record: An official JSONL line ``{"idx", "passage": {"text", "questions": [{"question", "idx",
            "answers": [{"text", "idx", "label"}]}]}}`` or a Hugging Face row ``{"paragraph",
            "question", "answer", "idx": {"paragraph", "question", "answer"}, "label"}``.
        for_training: Unused: MultiRC trains and evaluates on the same rows.

    Returns:
        Rows with ``paragraph``, ``question``, ``answer`` (markup removed), ``label`` (when given),
        ``id`` ``"p-q-a"``, ``group`` ``"q"`` (T5 groups by the question idx alone) and ``idx``.
    """
    del for_training
    if isinstance(record.get("passage"), Mapping):
        passage = record["passage"]
        p = _id(record, "idx", "idx")
        paragraph = multirc_text(_text(passage, "text", "passage.text"))
        rows = []
        for qi, question in enumerate(_objects(passage, "questions", "passage.questions")):
            qpath = f"passage.questions[{qi}]"
            q = _id(question, "idx", f"{qpath}.idx")
            text = multirc_text(_text(question, "question", f"{qpath}.question"))
            for ai, answer in enumerate(_objects(question, "answers", f"{qpath}.answers")):
                apath = f"{qpath}.answers[{ai}]"
                a = _id(answer, "idx", f"{apath}.idx")
                row = {
                    "paragraph": paragraph,
                    "question": text,
                    "answer": multirc_text(_text(answer, "text", f"{apath}.text")),
                    "id": f"{p}-{q}-{a}",
                    "group": str(q),
                    "idx": {"paragraph": record["idx"], "question": question["idx"], "answer": answer["idx"]},
                }
                rows.append(_with_label(row, answer))
        return rows
    if "paragraph" in record:
        idx = _mapping(record, "idx", "idx")
        p, q, a = (_id(idx, k, f"idx.{k}") for k in ("paragraph", "question", "answer"))
        row = {
            "paragraph": multirc_text(_text(record, "paragraph", "paragraph")),
            "question": multirc_text(_text(record, "question", "question")),
            "answer": multirc_text(_text(record, "answer", "answer")),
            "id": f"{p}-{q}-{a}",
            "group": str(q),
            "idx": dict(idx),
        }
        return [_with_label(row, record)]
    raise ValueError(
        "passage is missing: a MultiRC record has passage.questions (official SuperGLUE JSONL) "
        "or paragraph, question and answer (a Hugging Face super_glue row)"
    )


# ----------------------------------------------------------------------------------------------------------
# ReCoRD: TFDS super_glue _generate_examples (entities, answers) and T5 preprocessors.record (passage).


def record_passage(text: str) -> str:
    """A ReCoRD passage as T5 feeds it.

    Each ``"\\n@highlight\\n"`` that follows ``. ? ! " '`` becomes a space, every other one ``". "``:
    the highlights read as sentences.
    """
    text = re.sub(r"([.?!\"'])\n@highlight\n", r"\1 ", text)
    return text.replace("\n@highlight\n", ". ")


def _record_row(passage: str, query: str, entities: list[str], answers: list[str], p: str, q: str) -> Row:
    return {
        "passage": record_passage(passage),
        "query": query,
        "entities": ", ".join(sorted(set(entities))),
        "answers": sorted(set(answers)),
        "id": f"{p}-{q}",
    }


def expand_record(record: Mapping[str, Any], for_training: bool) -> list[Row]:
    """One row per query of a ReCoRD record (the same for training and evaluation).

    Args:
        record: An official JSONL line ``{"idx", "passage": {"text", "entities": [{"start", "end"}]},
            "qas": [{"query", "idx", "answers": [{"start", "end", "text"}]}]}`` (``end`` inclusive) or a
            Hugging Face row ``{"passage", "query", "entities", "answers", "idx": {"passage", "query"}}``,
            whose entities come in set order and are sorted here as TFDS sorts them.
        for_training: Unused: the caller makes one training example per answer, as T5 does.

    Returns:
        Rows with ``passage`` (``@highlight`` rules applied), ``query``, ``entities`` (distinct, sorted,
        joined with ", "), ``answers`` (distinct, sorted list; empty when unlabelled), ``id`` ``"p-q"``
        and ``idx``.
    """
    del for_training
    if "qas" in record:
        passage = _mapping(record, "passage", "passage")
        text = _text(passage, "text", "passage.text")
        p = _id(record, "idx", "idx")
        entities = []
        for i, entity in enumerate(_objects(passage, "entities", "passage.entities")):
            start = _int(entity, "start", f"passage.entities[{i}].start")
            end = _int(entity, "end", f"passage.entities[{i}].end")
            if not 0 <= start <= end < len(text):
                raise ValueError(
                    f"passage.entities[{i}] spans characters {start}..{end} (end inclusive), outside "
                    f"passage.text ({len(text)} characters)"
                )
            entities.append(text[start : end + 1])
        rows = []
        for qi, qa in enumerate(_objects(record, "qas", "qas")):
            path = f"qas[{qi}]"
            answers = [
                _text(answer, "text", f"{path}.answers[{ai}].text")
                for ai, answer in enumerate(
                    _objects(qa, "answers", f"{path}.answers") if qa.get("answers") is not None else []
                )
            ]
            q = _id(qa, "idx", f"{path}.idx")
            row = _record_row(text, _text(qa, "query", f"{path}.query"), entities, answers, p, q)
            row["idx"] = {"passage": record["idx"], "query": qa["idx"]}
            rows.append(row)
        return rows
    if "query" in record:
        idx = _mapping(record, "idx", "idx")
        p, q = (_id(idx, k, f"idx.{k}") for k in ("passage", "query"))
        answers = _strings(record, "answers", "answers") if record.get("answers") is not None else []
        row = _record_row(
            _text(record, "passage", "passage"),
            _text(record, "query", "query"),
            _strings(record, "entities", "entities"),
            answers,
            p,
            q,
        )
        row["idx"] = dict(idx)
        return [row]
    raise ValueError(
        "qas is missing: a ReCoRD record has passage and qas (official SuperGLUE JSONL) "
        "or passage, query, entities and answers (a Hugging Face super_glue row)"
    )


# ----------------------------------------------------------------------------------------------------------
# WSC: TFDS super_glue _fix_wst (config wsc.fixed) and T5 preprocessors._wsc_inputs / wsc_simple.

# The two WSC texts T5's _wsc_inputs writes out by hand (their span2_index does not point at the pronoun
# as a space-separated word), mapped to the blanked text it returns for them.
_WSC_BLANKED_BY_HAND = {
    'The boy continued to whip the pony , and eventually the pony threw him over. John laughed out quite loud. "Good for him," he said. ': (
        'The boy continued to whip the pony , and eventually the pony threw him over. John laughed out quite loud. "Good for X ," he said.'
    ),
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic pebble in an iron safe . Some day they might want to use it , but really for now, what more could they wish for?": (
        "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic pebble in an iron safe . Some day they might want to use X , but really for now, what more could they wish for?"
    ),
}

# Spans of the original data that _fix_wst leaves as they are: the subjects have intervening text.
_WSC_UNFIXABLE = ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin")


def fix_wsc_spans(
    text: str, span1_text: str, span1_index: int, span2_text: str, span2_index: int, prefix: str = ""
) -> tuple[str, str, int]:
    """The spans TFDS's ``wsc.fixed`` config serves (``_fix_wst``): ``(span1_text, span2_text, span2_index)``.

    A span that is not a substring of ``text`` gets the case of the first letter of word
    ``span_index`` (whitespace-split), trailing periods stripped and newlines made spaces; it must then
    be a substring. Spans already in the text come back unchanged, so fixed data stays as it is.

    Args:
        prefix: The path prefix of the span fields in error messages (``"target."`` for official JSONL).

    Raises:
        ValueError: A span that stays outside the text.
    """
    fixed = {"span1": span1_text, "span2": span2_text}
    for name in ("span1", "span2"):
        span = fixed[name]
        index = span1_index if name == "span1" else span2_index
        if span in text or span in _WSC_UNFIXABLE:
            continue
        if "theyscold" in span:
            span2_index = 10  # what TFDS does (its text repair is discarded, so the text stays as it is)
        words = text.split()
        if not 0 <= index < len(words):
            raise ValueError(
                f"{prefix}{name}_index {index} is past the last word of text ({len(words)} words), "
                f"and {prefix}{name}_text {span!r} is not in the text"
            )
        first = span[0].lower() if words[index][0].islower() else span[0].upper()
        span = (first + span[1:]).rstrip(".").replace("\n", " ")
        if span not in text:
            raise ValueError(f"{prefix}{name}_text {span!r} does not occur in text")
        fixed[name] = span
    return fixed["span1"], fixed["span2"], span2_index


def wsc_marked_text(text: str, span2_text: str, span2_index: int, prefix: str = "") -> str:
    """T5's ``wsc_simple`` input without its ``"wsc:"`` label: the pronoun marked with asterisks.

    ``_wsc_inputs`` splits the text on single spaces, checks that word ``span2_index`` is the pronoun
    and writes ``X`` in its place (words joined by single spaces; a pronoun that is the last word
    leaves a trailing space); ``wsc_simple`` then replaces every ``" X "`` by ``" *pronoun* "``.
    """
    blanked = _WSC_BLANKED_BY_HAND.get(text)
    if blanked is None:
        words = text.split(" ")
        if not 0 < span2_index < len(words):
            raise ValueError(
                f"{prefix}span2_index {span2_index} must point at a word of text after the first "
                f"(1..{len(words) - 1}, words split on single spaces)"
            )
        if words[span2_index] != span2_text:
            raise ValueError(
                f"{prefix}span2_text {span2_text!r} is not word {span2_index} of text "
                f"({words[span2_index]!r}, words split on single spaces)"
            )
        blanked = " ".join(words[:span2_index]) + " X " + " ".join(words[span2_index + 1 :])
    return blanked.replace(" X ", f" *{span2_text}* ")


def _is_true(label: Any, path: str) -> bool:
    """A WSC label as a bool: true/false, 1/0 (Hugging Face), or the strings True/False."""
    if isinstance(label, bool):
        return label
    if label in (0, 1) and isinstance(label, int):
        return bool(label)
    if label in ("True", "False"):
        return label == "True"
    raise ValueError(f"{path} must be true or false, not {label!r:.40}")


def expand_wsc(record: Mapping[str, Any], for_training: bool) -> list[Row]:
    """The WSC row of a record; none in training when its candidate is not the referent.

    Args:
        record: An official JSONL line ``{"text", "target": {"span1_index", "span1_text",
            "span2_index", "span2_text"}, "label", "idx"}`` or a Hugging Face row with the span fields
            at the top level (config ``wsc`` or ``wsc.fixed``: the spans are repaired either way).
        for_training: Keep the row only when its label is true (T5 trains on the referent only).

    Returns:
        ``[row]`` or ``[]``: ``text``, ``marked_text``, ``span1_text`` (the target), ``span2_text``,
        ``span1_index``, ``span2_index``, ``label`` (when given), ``id`` and ``idx``.
    """
    if "target" in record:
        spans, prefix = _mapping(record, "target", "target"), "target."
    elif "span2_index" in record:
        spans, prefix = record, ""
    else:
        raise ValueError(
            "target is missing: a WSC record has text and target.span1_text/span1_index/span2_text/"
            "span2_index (official SuperGLUE JSONL), or those span fields at the top level (Hugging Face)"
        )
    label = record.get("label")
    if label == -1 and not isinstance(label, bool):
        label = None  # Hugging Face's unlabelled test rows
    if for_training:
        if label is None:
            raise ValueError("label is missing: WSC trains on the rows whose candidate is the referent")
        if not _is_true(label, "label"):
            return []
    elif label is not None:
        _is_true(label, "label")
    text = _text(record, "text", "text")
    span1_text, span2_text, span2_index = fix_wsc_spans(
        text,
        _text(spans, "span1_text", f"{prefix}span1_text"),
        _int(spans, "span1_index", f"{prefix}span1_index"),
        _text(spans, "span2_text", f"{prefix}span2_text"),
        _int(spans, "span2_index", f"{prefix}span2_index"),
        prefix,
    )
    row = {
        "text": text,
        "marked_text": wsc_marked_text(text, span2_text, span2_index, prefix),
        "span1_text": span1_text,
        "span2_text": span2_text,
        "span1_index": spans["span1_index"],
        "span2_index": span2_index,
        "id": _id(record, "idx", "idx"),
        "idx": record["idx"],
    }
    if label is not None:
        row["label"] = label
    return [row]


LAYOUTS: dict[str, Callable[[Mapping[str, Any], bool], list[Row]]] = {
    "multirc": expand_multirc,
    "record": expand_record,
    "wsc": expand_wsc,
}
"""Layout name (a task preset's ``layout``) -> ``expand(record, for_training) -> rows``."""
