"""Reading a text task's rows: JSONL, CSV and TSV files (``.gz`` too) and Hugging Face datasets.

:func:`read_records` yields each row with its place (``line 3``, ``row 7``); :func:`load_task_examples`
turns a file, ``hf:NAME[/CONFIG]`` or the task's own dataset into softprompt.tasks.text.spec.TextExample
records. Errors name the file, the row and the field, in one line; ``skip_bad`` drops the row instead and
counts it in ``stats`` under one of ``TEXT_BAD_KINDS``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from softprompt.data.records import (
    HF_PREFIX,
    BadRecord,
    check_file,
    decode,
    file_error,
    gzip_error,
    one_line,
    open_binary,
    quote,
    read_bytes,
)
from softprompt.errors import DataError
from softprompt.tasks.text.spec import TaskSpec, TextExample

__all__ = ["TEXT_BAD_KINDS", "load_task_examples", "read_records"]

#: Keys that ``stats`` counts when ``skip_bad=True`` drops a row of a text task.
TEXT_BAD_KINDS = (
    "bad_json",  # a JSONL line that is not JSON
    "bad_encoding",  # a JSONL line that is not UTF-8
    "bad_row",  # a row that is not an object, or a CSV row with the wrong number of values
    "missing_field",  # a template or the label names a field the row lacks
    "empty_input",
    "empty_target",
    "unknown_label",  # a label value outside the task's labels
    "duplicate_id",
)


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                place = f"line {lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError:
                    yield place, BadRecord("bad_encoding", "is not UTF-8")
                    continue
                try:
                    yield place, json.loads(line)
                except (json.JSONDecodeError, RecursionError, ValueError) as err:
                    reason = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
                    yield place, BadRecord("bad_json", f"is not valid JSON ({reason})")
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise gzip_error(path, err) from None


def _csv_records(path: Path, delimiter: str) -> Iterator[tuple[str, Any]]:
    text = decode(path, read_bytes(path))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        if not reader.fieldnames:
            raise file_error(path, "has no header row", "put the column names on the first line")
        for row in reader:
            place = f"line {reader.line_num}"
            if None in row:
                yield (
                    place,
                    BadRecord(
                        "bad_row", f"has more values than the header's {len(reader.fieldnames)} columns"
                    ),
                )
            elif any(v is None for v in row.values()):
                missing = [k for k, v in row.items() if v is None]
                yield place, BadRecord("missing_field", f"has no value for column {quote(missing[0])}")
            else:
                yield place, row
    except csv.Error as err:
        raise file_error(path, f"line {reader.line_num}: is not valid CSV ({err})", "fix the file") from None


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """The records of a JSONL, CSV or TSV file (``.gz`` too), each with its place, in file order.

    A line that cannot be read is yielded as a :class:`BadRecord` so that ``skip_bad`` can drop it.

    Raises:
        DataError: The file is missing, of an unknown kind, damaged as a whole, or empty.
    """
    path = Path(path)
    check_file(path)
    lower = path.name.lower().removesuffix(".gz")
    if lower.endswith(".jsonl"):
        records = _jsonl_records(path)
    elif lower.endswith(".csv"):
        records = _csv_records(path, ",")
    elif lower.endswith((".tsv", ".tab")):
        records = _csv_records(path, "\t")
    else:
        raise file_error(
            path, "has an unknown suffix", "use .jsonl, .csv or .tsv (or hf:NAME for a Hugging Face dataset)"
        )
    empty = True
    for item in records:
        empty = False
        yield item
    if empty:
        raise file_error(path, "is empty", "give a file with at least one row")


def _hf_records(name: str, config: str | None, split: str) -> tuple[str, Iterator[tuple[str, Any]]]:
    import datasets  # deferred: importing datasets costs about a second and most runs read local files

    source = f"{name}{'/' + config if config else ''} [{split}]"
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as err:
        reason = one_line(str(err))[:80]
        raise file_error(
            source,
            f"cannot load this Hugging Face dataset ({type(err).__name__}: {reason})",
            "check the name, the config, the split and the network, or give a local file",
        ) from None
    return source, ((f"row {i}", row) for i, row in enumerate(dataset))


def load_task_examples(
    task: TaskSpec,
    source: str | Path | None,
    *,
    split: str = "train",
    config: str | None = None,
    for_training: bool = False,
    skip_bad: bool = False,
    stats: Counter[str] | None = None,
) -> list[TextExample]:
    """Load a text task's examples from a file, ``hf:NAME[/CONFIG]``, or the task's own dataset.

    Args:
        task: The task (not a QA task: those load through softprompt.tasks.squad.reader).
        source: A JSONL/CSV/TSV file, ``"hf:NAME"``, or None for the task's ``dataset``.
        split: The split of a Hugging Face dataset.
        config: The configuration of a Hugging Face dataset (default: the task's, for its own dataset).
        for_training: Whether the examples train (layouts may keep only training rows).
        skip_bad: Drop bad rows instead of raising.
        stats: Counts dropped rows by kind.

    Raises:
        DataError: The data cannot be read, or (unless ``skip_bad``) a row is bad.
    """
    if source is None or (isinstance(source, str) and source.startswith(HF_PREFIX)):
        own = task.dataset or {}
        name = own.get("name") if source is None else source[len(HF_PREFIX) :]
        if not name:
            raise DataError(f"task {task.name!r} names no dataset; give a data file or hf:NAME")
        if config is None and name == own.get("name"):
            config = own.get("config")
        where, records = _hf_records(name, config, split)
        return task.examples_from_records(
            records, source=where, for_training=for_training, skip_bad=skip_bad, stats=stats
        )
    return task.examples_from_records(
        read_records(source), source=Path(source), for_training=for_training, skip_bad=skip_bad, stats=stats
    )
