"""Reading data files with one-line errors: the helpers every record reader shares.

A reader (the SQuAD/MRQA loaders in :mod:`softprompt.tasks.squad.reader`, the text-task rows in
:mod:`softprompt.tasks.text.reader`) opens a file with :func:`read_bytes` or :func:`open_binary` (gzip is
sniffed, not trusted from the suffix), decodes it with :func:`decode`, parses JSON with :func:`parse_json`
and checks each record's fields with :func:`expect` and :func:`field`. A record it cannot use raises
:class:`BadRecord`; a :class:`Collector` either turns that into a one-line
:class:`~softprompt.errors.DataError` naming the file and the place, or, with ``skip_bad``, drops the
record and counts it by kind. Damage to the file as a whole is a :func:`file_error`, never skippable.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from softprompt.errors import DataError

__all__ = [
    "HF_PREFIX",
    "SNIP",
    "BadRecord",
    "Collector",
    "check_file",
    "decode",
    "expect",
    "field",
    "file_error",
    "gunzip_bytes",
    "gunzip_limit",
    "gzip_error",
    "one_line",
    "open_binary",
    "parse_json",
    "quote",
    "read_bytes",
    "type_name",
]

#: A source written ``"hf:NAME"`` names the Hugging Face dataset NAME (the QA and the text-task readers);
#: a bare name is always a file path.
HF_PREFIX = "hf:"

# Longest piece of user data quoted in an error message: enough to recognise, never a 50 MB line.
SNIP = 80
_GZIP_MAGIC = b"\x1f\x8b"
#: A gzip file may decompress to at most GZIP_RATIO times its own size, or GZIP_FLOOR bytes if that is more.
#: Text compresses 3-10x (a repetitive CSV perhaps 30x); a gzip bomb compresses ~1000x. The bound is
#: checked as the bytes stream out, so a bomb costs at most the bound in memory and never a MemoryError.
GZIP_RATIO = 100
GZIP_FLOOR = 64 << 20
_UTF8_BOM = b"\xef\xbb\xbf"


# --------------------------------------------------------------------------------------------------------
# Error helpers


class BadRecord(Exception):
    """One record is unusable; ``kind`` is its ``stats`` key, ``reason`` a clause for the message.

    Attributes:
        kind: The short key :class:`Collector` counts it under when ``skip_bad`` drops it.
        reason: What is wrong, as a clause that follows the record's place in the message.
    """

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def quote(text: str) -> str:
    """A repr of ``text`` cut to about 80 characters, so a message stays one short line.

    Args:
        text: User data to show in a message.

    Returns:
        ``repr(text)``, or the repr of its first ``SNIP`` characters followed by its length.
    """
    if len(text) <= SNIP:
        return repr(text)
    return repr(text[:SNIP]) + f"... ({len(text):,} characters)"


def one_line(message: str) -> str:
    """``message`` with carriage returns and newlines escaped, so it prints as one line.

    Args:
        message: An error message, possibly holding user-chosen names.

    Returns:
        The message with ``\\r`` and ``\\n`` written out.
    """
    # A path or a dataset name may itself hold a newline; the CLI prints exactly one line per error.
    return message.replace("\r", "\\r").replace("\n", "\\n")


def file_error(source: object, reason: str, advice: str) -> DataError:
    """The one-line error for damage to a whole source: ``"{source}: {reason}; {advice}."``.

    Args:
        source: The file path or dataset name.
        reason: What is wrong with it.
        advice: What the user should do.

    Returns:
        The error, for the caller to raise.
    """
    return DataError(one_line(f"{source}: {reason}; {advice}."))


def type_name(value: object) -> str:
    """The name a message uses for a parsed JSON value's type: ``null`` for None, else the Python type."""
    return "null" if value is None else type(value).__name__


def expect(value: object, kind: type | tuple[type, ...], what: str) -> Any:
    """Return ``value`` if it has the JSON type ``kind``, else raise a ``bad_schema`` record error.

    Args:
        value: A parsed JSON value.
        kind: The Python type(s) it must have; a JSON boolean never passes.
        what: How the message names the value, e.g. ``"'answers'"`` or ``"a paragraph"``.

    Returns:
        ``value`` unchanged.

    Raises:
        BadRecord: ``value`` has another type.
    """
    # bool is an int subclass, but true/false is never a valid string, list or object here.
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BadRecord(
            "bad_schema", f"{what} must be {_JSON_NAMES.get(names, names)}, not {type_name(value)}"
        )
    return value


_JSON_NAMES = {
    "str": "a string",
    "list": "a list",
    "dict": "an object",
    "str or int": "a string or integer",
    "Mapping": "an object",
}


def field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """``obj[key]``, checked to exist and to have the JSON type ``kind`` (see :func:`expect`).

    Args:
        obj: A parsed JSON object.
        key: The key to read.
        kind: The Python type(s) the value must have.

    Returns:
        The value.

    Raises:
        BadRecord: The key is missing or its value has another type (kind ``bad_schema``).
    """
    if key not in obj:
        raise BadRecord("bad_schema", f"has no {key!r} key")
    return expect(obj[key], kind, repr(key))


class Collector:
    """Gathers the examples of one source, applying the ``skip_bad`` policy and the unique-id rule.

    Args:
        source: The file path or dataset name that messages start with.
        skip_bad: Drop and count bad records instead of raising.
        stats: Where the dropped records are counted by kind; a fresh Counter if None.
        noun: What the examples are called in "contains no ..." (``questions``, ``examples``).
    """

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
        """Keep ``example`` (anything with an ``id``), or treat it as bad if its id was seen before."""
        first = self._first_place.get(example.id)
        if first is not None:
            # Predictions are keyed by id, so a repeated id would silently merge two questions in eval.
            self.bad(place, BadRecord("duplicate_id", f"id {quote(example.id)} was already used at {first}"))
            return
        self._first_place[example.id] = place
        self.examples.append(example)

    def finish(self) -> list[Any]:
        """The kept examples in order; raises a DataError (never skippable) if there are none."""
        if not self.examples:
            skipped = f" after dropping {self.skipped:,} bad records" if self.skipped else ""
            raise file_error(
                self.source, f"contains no {self.noun}{skipped}", "check that it is the right file"
            )
        return self.examples


# --------------------------------------------------------------------------------------------------------
# Reading files


def check_file(path: Path) -> None:
    """Raise the one-line DataError for a missing path or one that is not a regular file.

    A bare name without a suffix gets a hint that ``hf:NAME`` loads a Hugging Face dataset.
    """
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


def gunzip_limit(compressed_size: int) -> int:
    """The most bytes a gzip file of ``compressed_size`` bytes may decompress to (see ``GZIP_RATIO``)."""
    return max(GZIP_FLOOR, GZIP_RATIO * compressed_size)


def too_large(path: Path, limit: int) -> DataError:
    """The one-line error for a gzip file that decompresses past ``gunzip_limit``."""
    return file_error(
        path,
        f"decompresses to more than {limit:,} bytes, the most softprompt reads from a gzip file of its "
        f"size ({GZIP_RATIO}x, at least {GZIP_FLOOR >> 20} MiB; a gzip bomb?)",
        "decompress it yourself and give the plain file if it really is that large",
    )


class _CappedGzip(io.RawIOBase):
    """A gzip file's decompressed bytes that raise `too_large` once more than ``limit`` have come out."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.limit = gunzip_limit(os.path.getsize(path))
        self.inner = gzip.open(path, "rb")  # noqa: SIM115 - closed by close(), as the reader's own file
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.inner.readinto(buffer)
        self.total += n
        if self.total > self.limit:
            raise too_large(self.path, self.limit)
        return n

    def close(self) -> None:
        self.inner.close()
        super().close()


def open_binary(path: Path) -> IO[bytes]:
    """Open ``path`` for reading bytes, decompressing it if it is gzip (by its magic number).

    A gzip file's output is bounded by ``gunzip_limit``: past it, reading raises a one-line DataError.
    """
    return io.BufferedReader(_CappedGzip(path), 1 << 20) if _is_gzip(path) else path.open("rb")


def gunzip_bytes(path: Path, raw: bytes) -> bytes:
    """Decompress the gzip bytes ``raw`` read from ``path``, bounded by ``gunzip_limit`` as `open_binary` is.

    Raises:
        DataError: past the bound (damage is left to the caller: zlib.error, EOFError, BadGzipFile).
    """
    limit = gunzip_limit(len(raw))
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
        out = f.read(limit + 1)
    if len(out) > limit:
        raise too_large(path, limit)
    return out


def gzip_error(path: Path, err: BaseException) -> DataError:
    """The one-line error for a damaged or truncated gzip file, naming the exception's type only."""
    return file_error(
        path, f"is a damaged or truncated gzip file ({type(err).__name__})", "download or compress it again"
    )


def read_bytes(path: Path) -> bytes:
    """The whole content of ``path``, decompressed if gzip; every failure is a one-line DataError."""
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


def parse_json(path: Path, text: str) -> Any:
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
        raise file_error(path, f"is not valid JSON ({str(err)[:SNIP]})", "fix the file") from None
