"""Question-answering data: loading and validation, text-to-text formatting, tokenization and batching.

Sources are the official SQuAD v1.1 JSON, MRQA 2019 ``.jsonl``/``.jsonl.gz`` files and, when asked for
explicitly, Hugging Face datasets with SQuAD-style columns. Every loader returns the same
:class:`QAExample` records, so training and evaluation never see the source format.

A broken file always raises :class:`~softprompt.errors.DataError` whose message is one line naming the file,
the place inside it (``data[3].paragraphs[1].qas[0]``, ``line 17``) and what to do. With ``skip_bad=True``
the loaders instead drop the bad record and count it in ``stats`` under a short kind (see ``BAD_KINDS``);
damage to the file as a whole (not UTF-8 JSON, truncated gzip, empty) is never skippable.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import Sampler

from softprompt.errors import DataError
from softprompt.tasks.squad.text import (
    Punctuation,
    format_input,
    format_target,
    pad_punctuation,
    source_pieces,
)

__all__ = [
    "BAD_KINDS",
    "HF_PREFIX",
    "BucketBatchSampler",
    "Collator",
    "Features",
    "Punctuation",
    "QAExample",
    "examples_from_rows",
    "format_input",
    "format_target",
    "length_sorted_indices",
    "load_examples",
    "load_hf_dataset",
    "load_mrqa_jsonl",
    "load_squad_json",
    "pad_punctuation",
    "shard_indices",
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

#: ``load_examples("hf:NAME")`` loads the Hugging Face dataset NAME; a bare name is always a file path.
HF_PREFIX = "hf:"

# Longest piece of user data quoted in an error message: enough to recognise, never a 50 MB line.
_SNIP = 80
_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"


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


# --------------------------------------------------------------------------------------------------------
# Error helpers


class BadRecord(Exception):
    """One record is unusable; ``kind`` is its ``stats`` key, ``reason`` a clause for the message."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def quote(text: str) -> str:
    """A repr of ``text`` cut to about 80 characters, so a message stays one short line."""
    if len(text) <= _SNIP:
        return repr(text)
    return repr(text[:_SNIP]) + f"... ({len(text):,} characters)"


def one_line(message: str) -> str:
    # A path or a dataset name may itself hold a newline; the CLI prints exactly one line per error.
    return message.replace("\r", "\\r").replace("\n", "\\n")


def file_error(source: object, reason: str, advice: str) -> DataError:
    return DataError(one_line(f"{source}: {reason}; {advice}."))


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _expect(value: object, kind: type | tuple[type, ...], what: str) -> Any:
    """Return ``value`` if it has the JSON type ``kind``, else raise a ``bad_schema`` record error."""
    # bool is an int subclass, but true/false is never a valid string, list or object here.
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BadRecord(
            "bad_schema", f"{what} must be {_JSON_NAMES.get(names, names)}, not {_type_name(value)}"
        )
    return value


_JSON_NAMES = {
    "str": "a string",
    "list": "a list",
    "dict": "an object",
    "str or int": "a string or integer",
    "Mapping": "an object",
}


def _field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise BadRecord("bad_schema", f"has no {key!r} key")
    return _expect(obj[key], kind, repr(key))


class Collector:
    """Gathers the examples of one source, applying the ``skip_bad`` policy and the unique-id rule."""

    def __init__(
        self, source: object, skip_bad: bool, stats: Counter[str] | None, noun: str = "questions"
    ) -> None:
        self.source = source
        self.noun = noun
        self.skip_bad = skip_bad
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.examples: list[Any] = []
        self._first_place: dict[str, str] = {}
        self.skipped = 0

    def bad(self, place: str, err: BadRecord) -> None:
        """Count and drop the record at ``place`` if skipping, else raise the user-facing error."""
        if self.skip_bad:
            self.stats[err.kind] += 1
            self.skipped += 1
            return
        raise DataError(
            one_line(
                f"{self.source}: {place}: {err.reason}; fix or remove it, or pass --skip_bad_examples to drop and count bad records."
            )
        )

    def add(self, place: str, example: Any) -> None:
        first = self._first_place.get(example.id)
        if first is not None:
            # Predictions are keyed by id, so a repeated id would silently merge two questions in eval.
            self.bad(place, BadRecord("duplicate_id", f"id {quote(example.id)} was already used at {first}"))
            return
        self._first_place[example.id] = place
        self.examples.append(example)

    def finish(self) -> list[Any]:
        if not self.examples:
            skipped = f" after dropping {self.skipped:,} bad records" if self.skipped else ""
            raise file_error(
                self.source, f"contains no {self.noun}{skipped}", "check that it is the right file"
            )
        return self.examples


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
    qid = str(_expect(qid, (str, int), "'id'"))
    if not qid.strip():
        raise BadRecord("empty_id", "the id is empty")
    question = _expect(question, str, "'question'")
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
# Reading files


def check_file(path: Path) -> None:
    if not path.exists():
        hint = ""
        if len(path.parts) == 1 and not path.suffix:
            hint = f" (to load a Hugging Face dataset, write {HF_PREFIX}{path})"
        raise file_error(path, "file not found", f"check the path{hint}")
    if not path.is_file():
        raise file_error(path, "is not a regular file", "give the path of a data file")


def _is_gzip(path: Path) -> bool:
    # Sniff the magic number rather than trust the suffix: both mislabelled directions occur in the wild.
    with path.open("rb") as f:
        return f.read(2) == _GZIP_MAGIC


def open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if _is_gzip(path) else path.open("rb")


def gzip_error(path: Path, err: BaseException) -> DataError:
    return file_error(
        path, f"is a damaged or truncated gzip file ({type(err).__name__})", "download or compress it again"
    )


def read_bytes(path: Path) -> bytes:
    check_file(path)
    try:
        with open_binary(path) as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise gzip_error(path, err) from None
    except OSError as err:
        raise file_error(path, f"cannot be read ({err.strerror or type(err).__name__})", "check it") from None


def decode(path: Path, data: bytes, where: str = "") -> str:
    """Decode UTF-8 (a leading BOM is dropped) or raise a DataError naming the first bad byte."""
    skip = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = skip + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise file_error(
            path,
            f"{where}line {line}, byte offset {offset:,}: is not UTF-8 (byte 0x{data[offset]:02x})",
            "re-save the file as UTF-8",
        ) from None


def _parse_json(path: Path, text: str) -> Any:
    """``json.loads`` with every failure turned into a one-line DataError that never echoes the input."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        # err.msg is json's fixed phrase; str(err) and err.doc are avoided since doc is the whole input.
        raise file_error(
            path, f"line {err.lineno}, column {err.colno}: is not valid JSON ({err.msg})", "fix the file"
        ) from None
    except RecursionError:
        raise file_error(path, "is not valid JSON (it nests too deeply)", "fix the file") from None
    except ValueError as err:  # e.g. an integer literal longer than Python's digit limit
        raise file_error(path, f"is not valid JSON ({str(err)[:_SNIP]})", "fix the file") from None


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
    root = _parse_json(path, decode(path, data))
    del data
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        found = "an object without a 'data' list" if isinstance(root, dict) else _type_name(root)
        raise file_error(
            path,
            f"top level: expected a SQuAD object with a 'data' list, found {found}",
            "give a SQuAD v1.1 file",
        )
    out = Collector(path, skip_bad, stats)
    for a, article in enumerate(root["data"]):
        place = f"data[{a}]"
        try:
            paragraphs = _field(_expect(article, dict, "an article"), "paragraphs", list)
        except BadRecord as err:
            out.bad(place, err)
            continue
        for p, paragraph in enumerate(paragraphs):
            place = f"data[{a}].paragraphs[{p}]"
            try:
                _expect(paragraph, dict, "a paragraph")
                context = _field(paragraph, "context", str)
                qas = _field(paragraph, "qas", list)
            except BadRecord as err:
                out.bad(place, err)
                continue
            for q, qa in enumerate(qas):
                place = f"data[{a}].paragraphs[{p}].qas[{q}]"
                try:
                    _expect(qa, dict, "a question")
                    place = _place_with_id(place, qa)
                    example = _make_example(
                        _field(qa, "id", (str, int)),
                        _field(qa, "question", str),
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
    answers = _expect(qa["answers"], list, "'answers'")
    if not answers and qa.get("is_impossible") is True:
        raise BadRecord(
            "empty_answers", "is an unanswerable SQuAD 2.0 question, but this loader reads SQuAD v1.1"
        )
    texts = []
    for k, answer in enumerate(answers):
        texts.append(_field(_expect(answer, dict, f"answer {k}"), "text", str))
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
        out.bad(place, BadRecord("bad_json", f"is not valid JSON ({str(err)[:_SNIP]})"))
        return
    if isinstance(obj, dict) and "header" in obj and "context" not in obj:
        return
    try:
        context = _field(_expect(obj, dict, "a line"), "context", str)
        qas = _field(obj, "qas", list)
    except BadRecord as err:
        out.bad(place, err)
        return
    for q, qa in enumerate(qas):
        qplace = f"line {lineno}, qas[{q}]"
        try:
            _expect(qa, dict, "a question")
            id_key = "qid" if "qid" in qa else "id"
            qplace = _place_with_id(qplace, qa, id_key)
            if id_key not in qa:
                raise BadRecord("bad_schema", "has no 'qid' (or 'id') key")
            if "answers" not in qa:
                raise BadRecord("empty_answers", "has no 'answers' key")
            answers = _expect(qa["answers"], list, "'answers'")
            for k, answer in enumerate(answers):
                _expect(answer, str, f"answer {k}")
            example = _make_example(
                qa[id_key], _field(qa, "question", str), context, answers, lenient_answers=True
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
            _expect(row, Mapping, "a row")
            place = _place_with_id(place, row)
            answers = _field(row, "answers", (dict, list))
            if isinstance(answers, dict):
                answers = _expect(answers.get("text"), list, "'answers.text'")
            for k, answer in enumerate(answers):
                _expect(answer, str, f"answer {k}")
            example = _make_example(
                _field(row, "id", (str, int)),
                _field(row, "question", str),
                _field(row, "context", str),
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
        reason = one_line(str(err))[:_SNIP]
        raise file_error(
            source,
            f"cannot load this Hugging Face dataset ({type(err).__name__}: {reason})",
            "check the name, the split and the network, or give a local file",
        ) from None
    missing = [c for c in ("id", "question", "context", "answers") if c not in dataset.column_names]
    if missing:
        raise file_error(
            source,
            f"has no column {', '.join(map(repr, missing))} (it has {', '.join(dataset.column_names)[:_SNIP]})",
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
# Text-to-text formatting

# The text itself (T5's exact SQuAD formats and their names) lives in softprompt.tasks.squad.text, which
# imports nothing heavy; it is re-exported here for the loaders' users.


# --------------------------------------------------------------------------------------------------------
# Tokenization


@dataclass(slots=True)
class Features:
    """One tokenized example.

    Attributes:
        input_ids: Source token ids ``[S_i]``, ending with EOS.
        labels: Target token ids ``[T_i]``, ending with EOS.
        example_index: Position of the example in the list given to :func:`tokenize_examples`.
        truncated: Whether the context (or, in degenerate settings, the question) was cut to fit.
    """

    input_ids: list[int]
    labels: list[int]
    example_index: int
    truncated: bool = False


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
    :func:`format_input`'s text. When the source is too long, tokens are dropped from the end of the context
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


# --------------------------------------------------------------------------------------------------------
# Batching


@dataclass
class Collator:
    """Pads a list of :class:`Features` to the batch's own longest source and target.

    Attributes:
        pad_token_id: Source padding id (T5's pad, 0).
        label_pad_token_id: Label padding id, ignored by the loss (-100).
        pad_to_multiple_of: Round the padded lengths up to a multiple of this (e.g. 8 for tensor cores).
    """

    pad_token_id: int = 0
    label_pad_token_id: int = -100
    pad_to_multiple_of: int | None = None

    def _width(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return longest if not m else -(-longest // m) * m

    def __call__(self, features: Sequence[Features]) -> dict[str, torch.Tensor]:
        """Pad and stack a batch.

        Args:
            features: ``B >= 1`` tokenized examples.

        Returns:
            ``input_ids [B, S]``, ``attention_mask [B, S]`` (1 on real tokens), ``labels [B, T]`` (-100 on
            padding) and ``example_index [B]``, all int64, where S and T are the batch's longest source and
            target (rounded up to ``pad_to_multiple_of``).
        """
        if not features:
            raise ValueError("cannot collate an empty batch")
        width_s = self._width(max(len(f.input_ids) for f in features))
        width_t = self._width(max(len(f.labels) for f in features))
        batch = len(features)
        input_ids = torch.full((batch, width_s), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width_s), dtype=torch.long)
        labels = torch.full((batch, width_t), self.label_pad_token_id, dtype=torch.long)
        for row, f in enumerate(features):
            input_ids[row, : len(f.input_ids)] = torch.tensor(f.input_ids, dtype=torch.long)
            attention_mask[row, : len(f.input_ids)] = 1
            labels[row, : len(f.labels)] = torch.tensor(f.labels, dtype=torch.long)
        example_index = torch.tensor([f.example_index for f in features], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "example_index": example_index,
        }


class BucketBatchSampler(Sampler[list[int]]):
    """Shuffled training batches of similar-length examples, sharded over data-parallel ranks.

    Per epoch: shuffle all indices (seeded by ``(seed, epoch)``), make the count a multiple of the global
    batch ``batch_size * world_size`` (see ``drop_last``), cut into mega-chunks of ``mega_batch_mult`` global
    batches, sort each chunk by length (longest first), cut it into global batches, shuffle the order of all
    global batches, and give rank ``r`` the strided slice ``global_batch[r::world_size]``. Striding spreads
    each global batch's lengths evenly over ranks so no rank waits for another.

    Every rank computes the same permutation from the same seed, so ranks are disjoint within an epoch and
    together visit every index.

    Args:
        lengths: Per-example lengths (e.g. source token counts), ``[N]``.
        batch_size: Examples per rank per batch.
        seed: Base seed; the same seed and epoch always give the same batches.
        rank: This process's rank.
        world_size: Number of data-parallel ranks.
        drop_last: If false (default), the last incomplete global batch is completed with examples repeated
            from the start of the epoch's permutation, like ``DistributedSampler``, so every example is seen
            and a few are seen twice. If true, the ``N % (batch_size * world_size)`` examples at the end of
            the permutation are left out of that epoch.
        mega_batch_mult: Global batches per sorted chunk; larger groups lengths more tightly but makes batch
            composition less random.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        mega_batch_mult: int = 50,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if mega_batch_mult < 1:
            raise ValueError(f"mega_batch_mult must be >= 1, got {mega_batch_mult}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("lengths must be a non-empty 1-D sequence")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0
        self.start_batch = 0

    @property
    def num_batches(self) -> int:
        """Batches per rank in a whole epoch."""
        global_batch = self.batch_size * self.world_size
        n = len(self.lengths)
        return n // global_batch if self.drop_last else -(-n // global_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch to iterate, and the batch to start from when resuming mid-epoch.

        Args:
            epoch: The epoch number; it reseeds the shuffle.
            start_batch: Batches of this epoch already consumed; iteration skips them.
        """
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def global_batches(self) -> np.ndarray:
        """All global batches of the current epoch, in order, ``[num_batches, batch_size * world_size]``."""
        global_batch = self.batch_size * self.world_size
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        total = self.num_batches * global_batch
        # np.resize repeats the permutation cyclically: padding comes from the start, even when N < total.
        order = np.resize(order, total)
        chunk = global_batch * self.mega_batch_mult
        for begin in range(0, total, chunk):
            part = order[begin : begin + chunk]
            order[begin : begin + chunk] = part[np.argsort(-self.lengths[part], kind="stable")]
        batches = order.reshape(self.num_batches, global_batch)
        return batches[rng.permutation(self.num_batches)]

    def __iter__(self) -> Iterator[list[int]]:
        """Yield this rank's batches of the current epoch from ``start_batch`` on, each ``[batch_size]``."""
        for batch in self.global_batches()[self.start_batch :]:
            yield batch[self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        """Batches the next iteration yields: ``num_batches - start_batch``."""
        return self.num_batches - self.start_batch


def length_sorted_indices(lengths: Sequence[int], descending: bool = True) -> list[int]:
    """Indices ordering examples by length, for evaluation batches with little padding.

    Longest first by default so that an out-of-memory batch shows up at once. Ties keep index order.

    Args:
        lengths: Per-example lengths, ``[N]``.
        descending: Longest first if true.

    Returns:
        A permutation of ``range(N)``.
    """
    keys = np.asarray(lengths, dtype=np.int64)
    return np.argsort(-keys if descending else keys, kind="stable").tolist()


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """This rank's positions out of ``range(n)`` for evaluation: strided, never padded.

    Each position goes to exactly one rank, so each question is scored exactly once; shards differ in size
    by at most one. Applied to a length-sorted order, striding also gives every rank a similar workload.

    Args:
        n: Number of items.
        rank: This process's rank.
        world_size: Number of ranks.

    Returns:
        ``[rank, rank + world_size, ...]`` below ``n``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(rank, n, world_size))
