"""SQuAD-shaped question-answering data: loading and validation into :class:`QAExample`, and tokenization.

Sources are the official SQuAD v1.1 JSON, MRQA 2019 ``.jsonl``/``.jsonl.gz`` files and, when asked for
explicitly, Hugging Face datasets with SQuAD-style columns. Every loader returns the same
:class:`QAExample` records, so training and evaluation never see the source format.

A broken file always raises :class:`~softprompt.errors.DataError` whose message is one line naming the file,
the place inside it (``data[3].paragraphs[1].qas[0]``, ``line 17``) and what to do. With ``skip_bad=True``
the loaders instead drop the bad record and count it in ``stats`` under a short kind (see ``BAD_KINDS``);
damage to the file as a whole (not UTF-8 JSON, truncated gzip, empty) is never skippable. The generic
file and record helpers are :mod:`softprompt.data.records`'s.

:func:`tokenize_examples` turns examples into :class:`~softprompt.data.batching.Features` in T5's own
``squad`` text (:mod:`softprompt.tasks.squad.text`), cutting only the context when a source is too long.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.data.batching import Features
from softprompt.data.records import (
    HF_PREFIX,
    SNIP,
    BadRecord,
    Collector,
    check_file,
    decode,
    expect,
    field,
    file_error,
    gzip_error,
    one_line,
    open_binary,
    parse_json,
    quote,
    read_bytes,
    type_name,
)
from softprompt.tasks.squad.text import Punctuation, format_target, source_pieces

__all__ = [
    "BAD_KINDS",
    "QAExample",
    "examples_from_rows",
    "load_examples",
    "load_hf_dataset",
    "load_mrqa_jsonl",
    "load_squad_json",
    "tokenize_examples",
]

#: Keys that ``stats`` counts when ``skip_bad=True`` drops a record.
BAD_KINDS = (
    "bad_schema",  # a missing key or a value of the wrong type
    "bad_json",  # an MRQA line that is not JSON
    "bad_encoding",  # an MRQA line that is not UTF-8
    "empty_id",
    "duplicate_id",
    "empty_question",
    "empty_context",
    "empty_answers",
    "empty_answer_text",
    "answer_not_in_context",
)


@dataclass(frozen=True)
class QAExample:
    """One question with its context and every gold answer.

    Attributes:
        id: The question's id, unique within its source.
        question: The question text, as in the source.
        context: The passage the answers come from, as in the source (MRQA markers such as ``[PAR]`` kept).
        answers: All gold answer texts in source order, duplicates kept; the first is the training target.
    """

    id: str
    question: str
    context: str
    answers: tuple[str, ...]


def _normalise_ws(text: str) -> str:
    return " ".join(text.split())


def _make_example(
    qid: object, question: object, context: str, answers: Sequence[str], *, lenient_answers: bool
) -> QAExample:
    """Validate one question's fields (containers already checked) and build the example.

    Args:
        qid: The raw id (a string, or an integer that is turned into one).
        question: The question text.
        context: The passage.
        answers: The gold answer texts.
        lenient_answers: If true (MRQA), one answer found in the context, ignoring case and runs of
            whitespace, is enough; MRQA answer lists carry aliases that its own span detection matched
            case-insensitively. If false (SQuAD), every answer must occur in the context, modulo whitespace.
    """
    qid = str(expect(qid, (str, int), "'id'"))
    if not qid.strip():
        raise BadRecord("empty_id", "the id is empty")
    question = expect(question, str, "'question'")
    if not question.strip():
        raise BadRecord("empty_question", "the question has no text")
    if not context.strip():
        raise BadRecord("empty_context", "the context has no text")
    if not answers:
        raise BadRecord("empty_answers", "the question has no answers")
    for k, text in enumerate(answers):
        if not text.strip():
            raise BadRecord("empty_answer_text", f"answer {k} has no text")
    if lenient_answers:
        if not any(text in context for text in answers):
            folded = _normalise_ws(context).casefold()
            if not any(_normalise_ws(text).casefold() in folded for text in answers):
                raise BadRecord(
                    "answer_not_in_context", f"none of its {len(answers)} answers occurs in the context"
                )
    else:
        normalised: str | None = None
        for k, text in enumerate(answers):
            if text in context:
                continue
            # Exact matching covers all of SQuAD v1.1; the fallback only forgives differing whitespace.
            if normalised is None:
                normalised = _normalise_ws(context)
            if _normalise_ws(text) not in normalised:
                raise BadRecord(
                    "answer_not_in_context", f"answer {k} {quote(text)} does not occur in the context"
                )
    return QAExample(id=qid, question=question, context=context, answers=tuple(answers))


def _place_with_id(place: str, qa: Mapping[str, Any], id_key: str = "id") -> str:
    qid = qa.get(id_key)
    return f"{place} (id {quote(qid)})" if isinstance(qid, str) else place


# --------------------------------------------------------------------------------------------------------
# SQuAD v1.1 JSON


def load_squad_json(
    path: str | Path, *, skip_bad: bool = False, stats: Counter[str] | None = None
) -> list[QAExample]:
    """Load a SQuAD v1.1 file (the official nested JSON, optionally gzip-compressed).

    Each answer's ``text`` is used; ``answer_start`` is ignored because text-to-text training never needs
    it (and rebuilt copies of the train set carry approximate offsets). Every answer must occur in its
    context, compared exactly or, failing that, with runs of whitespace collapsed.

    Args:
        path: The ``.json`` file.
        skip_bad: Drop invalid questions (and broken articles or paragraphs) instead of raising.
        stats: Counts the dropped records by kind (see ``BAD_KINDS``) when ``skip_bad`` is true.

    Returns:
        The questions in file order.

    Raises:
        DataError: The file is missing, unreadable, not UTF-8 JSON, not SQuAD-shaped, holds no questions, or
            (unless ``skip_bad``) holds an invalid question.
    """
    path = Path(path)
    data = read_bytes(path)
    if not data.strip():
        raise file_error(path, "is empty", "give a SQuAD v1.1 JSON file")
    root = parse_json(path, decode(path, data))
    del data
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        found = "an object without a 'data' list" if isinstance(root, dict) else type_name(root)
        raise file_error(
            path,
            f"top level: expected a SQuAD object with a 'data' list, found {found}",
            "give a SQuAD v1.1 file",
        )
    out = Collector(path, skip_bad, stats)
    for a, article in enumerate(root["data"]):
        place = f"data[{a}]"
        try:
            paragraphs = field(expect(article, dict, "an article"), "paragraphs", list)
        except BadRecord as err:
            out.bad(place, err)
            continue
        for p, paragraph in enumerate(paragraphs):
            place = f"data[{a}].paragraphs[{p}]"
            try:
                expect(paragraph, dict, "a paragraph")
                context = field(paragraph, "context", str)
                qas = field(paragraph, "qas", list)
            except BadRecord as err:
                out.bad(place, err)
                continue
            for q, qa in enumerate(qas):
                place = f"data[{a}].paragraphs[{p}].qas[{q}]"
                try:
                    expect(qa, dict, "a question")
                    place = _place_with_id(place, qa)
                    example = _make_example(
                        field(qa, "id", (str, int)),
                        field(qa, "question", str),
                        context,
                        _squad_answer_texts(qa),
                        lenient_answers=False,
                    )
                except BadRecord as err:
                    out.bad(place, err)
                    continue
                out.add(place, example)
    return out.finish()


def _squad_answer_texts(qa: Mapping[str, Any]) -> list[str]:
    if "answers" not in qa:
        raise BadRecord("empty_answers", "has no 'answers' key")
    answers = expect(qa["answers"], list, "'answers'")
    if not answers and qa.get("is_impossible") is True:
        raise BadRecord(
            "empty_answers", "is an unanswerable SQuAD 2.0 question, but this loader reads SQuAD v1.1"
        )
    texts = []
    for k, answer in enumerate(answers):
        texts.append(field(expect(answer, dict, f"answer {k}"), "text", str))
    return texts


# --------------------------------------------------------------------------------------------------------
# MRQA 2019 JSON lines


def load_mrqa_jsonl(
    path: str | Path, *, skip_bad: bool = False, stats: Counter[str] | None = None
) -> list[QAExample]:
    """Load an MRQA 2019 file: a ``{"header": ...}`` line, then one context with its questions per line.

    The file may be gzip-compressed. Question ids come from ``qid`` (or ``id``); answers from ``answers``.
    Contexts are kept verbatim, including MRQA's ``[PAR]``, ``[TLE]``, ``[DOC]`` and ``[SEP]`` markers. A
    question is valid when at least one of its answers occurs in the context, ignoring case and whitespace
    runs, because MRQA's answer lists include aliases. Blank lines are ignored.

    Args:
        path: The ``.jsonl`` or ``.jsonl.gz`` file.
        skip_bad: Drop invalid questions (and undecodable or broken lines) instead of raising.
        stats: Counts the dropped records by kind (see ``BAD_KINDS``) when ``skip_bad`` is true.

    Returns:
        The questions in file order.

    Raises:
        DataError: The file is missing, empty, a damaged gzip file, holds no questions, or (unless
            ``skip_bad``) holds a bad line or question.
    """
    path = Path(path)
    check_file(path)
    out = Collector(path, skip_bad, stats)
    saw_bytes = False
    try:
        with open_binary(path) as f:
            offset = 0
            for lineno, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                saw_bytes = True
                _mrqa_line(out, path, lineno, start, raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise gzip_error(path, err) from None
    except OSError as err:
        raise file_error(path, f"cannot be read ({err.strerror or type(err).__name__})", "check it") from None
    if not saw_bytes:
        raise file_error(path, "is empty", "give an MRQA .jsonl file")
    return out.finish()


def _mrqa_line(out: Collector, path: Path, lineno: int, start: int, raw: bytes) -> None:
    place = f"line {lineno}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        out.bad(
            place,
            BadRecord(
                "bad_encoding",
                f"is not UTF-8 at byte offset {start + err.start:,} (byte 0x{raw[err.start]:02x})",
            ),
        )
        return
    # Without its newline, json's column numbers are columns of this line.
    text = text.rstrip("\r\n")
    if lineno == 1 and text.startswith("\ufeff"):
        text = text[1:]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        out.bad(place, BadRecord("bad_json", f"column {err.colno}: is not valid JSON ({err.msg})"))
        return
    except RecursionError:
        out.bad(place, BadRecord("bad_json", "is not valid JSON (it nests too deeply)"))
        return
    except ValueError as err:
        out.bad(place, BadRecord("bad_json", f"is not valid JSON ({str(err)[:SNIP]})"))
        return
    if isinstance(obj, dict) and "header" in obj and "context" not in obj:
        return
    try:
        context = field(expect(obj, dict, "a line"), "context", str)
        qas = field(obj, "qas", list)
    except BadRecord as err:
        out.bad(place, err)
        return
    for q, qa in enumerate(qas):
        qplace = f"line {lineno}, qas[{q}]"
        try:
            expect(qa, dict, "a question")
            id_key = "qid" if "qid" in qa else "id"
            qplace = _place_with_id(qplace, qa, id_key)
            if id_key not in qa:
                raise BadRecord("bad_schema", "has no 'qid' (or 'id') key")
            if "answers" not in qa:
                raise BadRecord("empty_answers", "has no 'answers' key")
            answers = expect(qa["answers"], list, "'answers'")
            for k, answer in enumerate(answers):
                expect(answer, str, f"answer {k}")
            example = _make_example(
                qa[id_key], field(qa, "question", str), context, answers, lenient_answers=True
            )
        except BadRecord as err:
            out.bad(qplace, err)
            continue
        out.add(qplace, example)


# --------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def examples_from_rows(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    skip_bad: bool = False,
    stats: Counter[str] | None = None,
) -> list[QAExample]:
    """Convert rows with SQuAD-style columns (as in the Hub's ``squad`` dataset) to examples.

    Each row needs ``id``, ``question``, ``context`` and ``answers``, where ``answers`` is either
    ``{"text": [...], ...}`` (the Hub layout) or a plain list of strings. Validation matches
    :func:`load_squad_json`.

    Args:
        rows: The rows, e.g. a ``datasets.Dataset``.
        source: How to name the rows' origin in error messages, e.g. ``"squad [validation]"``.
        skip_bad: Drop invalid rows instead of raising.
        stats: Counts the dropped rows by kind (see ``BAD_KINDS``) when ``skip_bad`` is true.

    Returns:
        The questions in row order.

    Raises:
        DataError: There are no rows, or (unless ``skip_bad``) a row is invalid.
    """
    out = Collector(source, skip_bad, stats)
    for r, row in enumerate(rows):
        place = f"row {r}"
        try:
            expect(row, Mapping, "a row")
            place = _place_with_id(place, row)
            answers = field(row, "answers", (dict, list))
            if isinstance(answers, dict):
                answers = expect(answers.get("text"), list, "'answers.text'")
            for k, answer in enumerate(answers):
                expect(answer, str, f"answer {k}")
            example = _make_example(
                field(row, "id", (str, int)),
                field(row, "question", str),
                field(row, "context", str),
                answers,
                lenient_answers=False,
            )
        except BadRecord as err:
            out.bad(place, err)
            continue
        out.add(place, example)
    return out.finish()


def load_hf_dataset(
    name: str, split: str, *, skip_bad: bool = False, stats: Counter[str] | None = None, **load_kwargs: Any
) -> list[QAExample]:
    """Load a split of a Hugging Face dataset with SQuAD-style columns via ``datasets.load_dataset``.

    This reaches the network unless the dataset is cached; it runs only when the user names a dataset.

    Args:
        name: The dataset, e.g. ``"rajpurkar/squad"``, or a packaged builder such as ``"json"``.
        split: The split, e.g. ``"train"`` or ``"validation"``.
        skip_bad: Drop invalid rows instead of raising.
        stats: Counts the dropped rows by kind (see ``BAD_KINDS``) when ``skip_bad`` is true.
        **load_kwargs: Passed on to ``datasets.load_dataset`` (``data_files``, ``revision``, ``cache_dir``...).

    Returns:
        The questions in row order.

    Raises:
        DataError: The dataset or split cannot be loaded, lacks a SQuAD column, or holds an invalid row.
    """
    import datasets  # deferred: importing datasets costs about a second and most runs read local files

    source = f"{name} [{split}]"
    try:
        dataset = datasets.load_dataset(name, split=split, **load_kwargs)
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as err:
        reason = one_line(str(err))[:SNIP]
        raise file_error(
            source,
            f"cannot load this Hugging Face dataset ({type(err).__name__}: {reason})",
            "check the name, the split and the network, or give a local file",
        ) from None
    missing = [c for c in ("id", "question", "context", "answers") if c not in dataset.column_names]
    if missing:
        raise file_error(
            source,
            f"has no column {', '.join(map(repr, missing))} (it has {', '.join(dataset.column_names)[:SNIP]})",
            "use a dataset with SQuAD-style columns",
        )
    return examples_from_rows(dataset, source=source, skip_bad=skip_bad, stats=stats)


# --------------------------------------------------------------------------------------------------------
# Dispatch


def load_examples(
    source: str | Path, *, split: str = "train", skip_bad: bool = False, stats: Counter[str] | None = None
) -> list[QAExample]:
    """Load questions from a file, chosen by suffix, or from the Hub when ``source`` is ``"hf:NAME"``.

    ``.json`` / ``.json.gz`` is SQuAD v1.1 and ``.jsonl`` / ``.jsonl.gz`` is MRQA. Anything else is a path,
    never silently a dataset name, so a typo in a path fails with "file not found" instead of a download.

    Args:
        source: A file path, or ``"hf:"`` followed by a Hugging Face dataset name.
        split: The split to load; used only for Hugging Face datasets.
        skip_bad: Drop invalid records instead of raising.
        stats: Counts the dropped records by kind (see ``BAD_KINDS``) when ``skip_bad`` is true.

    Returns:
        The questions in source order.

    Raises:
        DataError: The file is missing or of an unknown kind, or its loader rejects it.
    """
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        name = source[len(HF_PREFIX) :]
        if not name:
            raise file_error(
                source, "names no dataset", f"write {HF_PREFIX}NAME, e.g. {HF_PREFIX}rajpurkar/squad"
            )
        return load_hf_dataset(name, split, skip_bad=skip_bad, stats=stats)
    path = Path(source)
    check_file(path)
    lower = path.name.lower()
    if lower.endswith((".jsonl", ".jsonl.gz")):
        return load_mrqa_jsonl(path, skip_bad=skip_bad, stats=stats)
    if lower.endswith((".json", ".json.gz")):
        return load_squad_json(path, skip_bad=skip_bad, stats=stats)
    raise file_error(
        path,
        "has an unknown suffix",
        "use .json for SQuAD v1.1 or .jsonl / .jsonl.gz for MRQA (or hf:NAME for a Hugging Face dataset)",
    )


# --------------------------------------------------------------------------------------------------------
# Tokenization


def tokenize_examples(
    examples: Sequence[QAExample],
    tokenizer: Any,
    *,
    max_source_length: int = 512,
    max_target_length: int = 32,
    punctuation: Punctuation | str = Punctuation.NONE,
) -> list[Features]:
    """Tokenize examples for T5, cutting only the context so the question always survives.

    The source is tokenized as two pieces, ``"question: {q}"`` and ``"context: {c}"`` (see
    :func:`~softprompt.tasks.squad.text.source_pieces`). T5's tokenizer splits
    on whitespace before SentencePiece, so their concatenation equals the tokenization of
    :func:`~softprompt.tasks.squad.text.format_input`'s text. When the source is too long, tokens are dropped from the end of the context
    only; the ``context:`` marker is kept. If even the question does not fit (a tiny ``max_source_length``),
    the question is cut too. Each distinct context is tokenized once.

    Args:
        examples: The examples.
        tokenizer: A fast T5 tokenizer (callable on a list of strings).
        max_source_length: Maximum source length including EOS.
        max_target_length: Maximum target length including EOS; the first answer is the target.
        punctuation: The text format (see :class:`~softprompt.tasks.squad.text.Punctuation`): ``paper`` and
            ``current`` write T5's own ``squad`` inputs and targets at that version, ``none`` raw text.

    Returns:
        One :class:`Features` per example, in order, with ``len(input_ids) <= max_source_length`` and
        ``len(labels) <= max_target_length``.

    Raises:
        ValueError: A maximum length is too small to hold anything but the markers and EOS.
    """
    eos = tokenizer.eos_token_id
    marker = tokenizer("context:", add_special_tokens=False)["input_ids"]
    if max_source_length < len(marker) + 2:
        raise ValueError(
            f"max_source_length={max_source_length} is too small; use at least {len(marker) + 2}"
        )
    if max_target_length < 2:
        raise ValueError(f"max_target_length={max_target_length} is too small; use at least 2")
    if not examples:
        return []

    question_texts: list[str] = []
    context_slot: dict[str, int] = {}
    context_texts: list[str] = []
    example_context: list[int] = []
    for ex in examples:
        question_part, context_part = source_pieces(ex.question, ex.context, punctuation)
        question_texts.append(question_part)
        slot = context_slot.get(context_part)
        if slot is None:
            # SQuAD has ~5 questions per paragraph, so deduplicating contexts saves most of the work.
            slot = context_slot[context_part] = len(context_texts)
            context_texts.append(context_part)
        example_context.append(slot)
    targets = [format_target(ex.answers[0], punctuation) for ex in examples]

    question_ids = tokenizer(question_texts, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context_texts, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]

    budget = max_source_length - 1  # room for EOS
    features = []
    for i, (q_ids, slot, t_ids) in enumerate(zip(question_ids, example_context, target_ids, strict=True)):
        c_ids = context_ids[slot]
        truncated = len(q_ids) + len(c_ids) > budget
        if truncated:
            keep_q = min(len(q_ids), budget - len(marker))
            q_ids = q_ids[:keep_q]
            c_ids = c_ids[: budget - keep_q]
        labels = t_ids[: max_target_length - 1]
        labels.append(eos)
        features.append(
            Features(input_ids=[*q_ids, *c_ids, eos], labels=labels, example_index=i, truncated=truncated)
        )
    return features
