"""Tests for softprompt.data.records: the generic file and record helpers, on their own.

The SQuAD/MRQA loaders (tests/tasks/test_squad_reader.py) and the text-task readers
(tests/tasks/test_text_task.py) exercise them through whole files; these pin each helper's contract.
"""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from softprompt.data.records import (
    GZIP_FLOOR,
    HF_PREFIX,
    SNIP,
    BadRecord,
    Collector,
    check_file,
    decode,
    expect,
    field,
    file_error,
    one_line,
    open_binary,
    parse_json,
    quote,
    read_bytes,
    type_name,
)
from softprompt.errors import DataError


def test_quote_cuts_long_text_and_says_how_long() -> None:
    assert quote("short") == "'short'"
    assert quote("x" * SNIP) == repr("x" * SNIP)
    assert quote("y" * 1234) == repr("y" * SNIP) + "... (1,234 characters)"


def test_one_line_and_file_error() -> None:
    assert one_line("a\nb\rc") == "a\\nb\\rc"
    err = file_error(Path("dir/two\nlines.json"), "is empty", "give a file")
    assert isinstance(err, DataError)
    assert str(err) == "dir/two\\nlines.json: is empty; give a file."


def test_expect_and_field_name_json_types() -> None:
    assert expect("s", str, "'id'") == "s"
    assert field({"n": 3}, "n", (str, int)) == 3
    assert type_name(None) == "null" and type_name([]) == "list"
    cases = [
        (lambda: expect(True, (str, int), "'id'"), "'id' must be a string or integer, not bool"),
        (lambda: expect(None, list, "'answers'"), "'answers' must be a list, not null"),
        (lambda: expect([], dict, "a paragraph"), "a paragraph must be an object, not list"),
        (lambda: field({}, "context", str), "has no 'context' key"),
        (lambda: field({"context": 1}, "context", str), "'context' must be a string, not int"),
    ]
    for call, reason in cases:
        with pytest.raises(BadRecord) as excinfo:
            call()
        assert (excinfo.value.kind, excinfo.value.reason) == ("bad_schema", reason)


def _example(qid: str) -> SimpleNamespace:
    return SimpleNamespace(id=qid)


def test_collector_counts_skipped_records_and_refuses_duplicates() -> None:
    stats: Counter[str] = Counter()
    out = Collector("src.jsonl", skip_bad=True, stats=stats, noun="examples")
    out.add("line 1", _example("a"))
    out.add("line 2", _example("a"))  # a repeated id is a bad record, not a second example
    out.bad("line 3", BadRecord("bad_json", "is not valid JSON"))
    out.add("line 4", _example("b"))
    assert [e.id for e in out.finish()] == ["a", "b"]
    assert stats == Counter(duplicate_id=1, bad_json=1) and out.skipped == 2

    strict = Collector("src.jsonl", skip_bad=False, stats=None)
    strict.add("line 1", _example("a"))
    with pytest.raises(DataError, match=r"^src\.jsonl: line 2: id 'a' was already used at line 1; fix or"):
        strict.add("line 2", _example("a"))

    empty = Collector("src.jsonl", skip_bad=True, stats=None, noun="examples")
    empty.bad("line 1", BadRecord("bad_json", "x"))
    with pytest.raises(DataError, match="contains no examples after dropping 1 bad records"):
        empty.finish()


def test_check_file_hints_at_datasets_only_for_bare_names(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"write {HF_PREFIX}squad"):
        check_file(Path("squad"))
    with pytest.raises(DataError) as excinfo:
        check_file(tmp_path / "squad.json")
    assert HF_PREFIX not in str(excinfo.value)
    with pytest.raises(DataError, match="is not a regular file"):
        check_file(tmp_path)


def test_gzip_is_sniffed_not_taken_from_the_suffix(tmp_path: Path) -> None:
    payload = b'{"a": 1}\n'
    packed, plain = tmp_path / "packed.json", tmp_path / "plain.json.gz"
    packed.write_bytes(gzip.compress(payload))
    plain.write_bytes(payload)
    assert read_bytes(packed) == read_bytes(plain) == payload
    with open_binary(packed) as f:
        assert f.read() == payload
    damaged = tmp_path / "damaged.gz"
    damaged.write_bytes(gzip.compress(payload)[:-6])
    with pytest.raises(DataError, match="is a damaged or truncated gzip file"):
        read_bytes(damaged)


def test_a_gzip_bomb_stops_at_the_bound_with_one_line(tmp_path: Path) -> None:
    import zlib

    from softprompt.tasks.metrics.squad import evaluate_file
    from softprompt.tasks.squad.reader import load_squad_json
    from softprompt.tasks.text.reader import read_records

    # ~80 KB that inflates to 80 MiB (1000x): refused once the floor (64 MiB, > 100x) is passed.
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunks = [packer.compress(b"a,b\n")]
    chunks += [packer.compress(bytes(1 << 20)) for _ in range(80)]
    bomb = b"".join([*chunks, packer.flush()])
    assert len(bomb) * 100 < GZIP_FLOOR < 80 << 20
    for name in ("bomb.csv.gz", "bomb.jsonl.gz", "bomb.json"):
        (tmp_path / name).write_bytes(bomb)
    readers = [
        lambda: read_bytes(tmp_path / "bomb.json"),
        lambda: list(read_records(tmp_path / "bomb.csv.gz")),
        lambda: list(read_records(tmp_path / "bomb.jsonl.gz")),
        lambda: load_squad_json(tmp_path / "bomb.json"),
        lambda: evaluate_file(tmp_path / "bomb.json", tmp_path / "bomb.json"),
    ]
    for read in readers:
        with pytest.raises(DataError) as excinfo:
            read()
        message = str(excinfo.value)
        assert "bomb." in message and f"decompresses to more than {GZIP_FLOOR:,} bytes" in message
        assert "\n" not in message
    # A file under the bound still reads whole.
    ok = tmp_path / "ok.gz"
    ok.write_bytes(gzip.compress(bytes(1 << 20)))
    assert read_bytes(ok) == bytes(1 << 20)


def test_decode_drops_the_bom_and_places_a_bad_byte() -> None:
    assert decode(Path("f"), b"\xef\xbb\xbfcaf\xc3\xa9") == "café"
    # BOM (3) + "ab\n" (3) + "cd" (2): the bad byte is at file offset 8, on line 2.
    with pytest.raises(DataError) as excinfo:
        decode(Path("f"), b"\xef\xbb\xbfab\ncd\xff", where="row 4, ")
    assert str(excinfo.value) == (
        "f: row 4, line 2, byte offset 8: is not UTF-8 (byte 0xff); re-save the file as UTF-8."
    )


def test_parse_json_errors_never_echo_the_input() -> None:
    assert parse_json(Path("f"), '{"a": [1]}') == {"a": [1]}
    secret = "s" * 500
    with pytest.raises(DataError) as excinfo:
        parse_json(Path("f"), '{"k": "' + secret + '" x}')
    assert "line 1, column 510: is not valid JSON" in str(excinfo.value)
    assert "sssss" not in str(excinfo.value)
    with pytest.raises(DataError, match="nests too deeply"):
        parse_json(Path("f"), "[" * 100_000 + "]" * 100_000)
