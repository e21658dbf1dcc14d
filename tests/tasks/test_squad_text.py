"""T5's exact SQuAD text (the paper's and the current preprocessor), and padded answers mapped back to raw spans."""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED, SQUAD_DEV, need
from softprompt.tasks.squad.reader import load_squad_json
from softprompt.tasks.squad.text import (
    PUNCTUATION_CHOICES,
    Punctuation,
    format_input,
    format_target,
    pad_punctuation,
    raw_answer,
    source_pieces,
)
from softprompt.tasks.squad.text import _padded_with_origin as padded_with_origin

T5_FORMAT = SHARED / "data" / "t5_format"


@pytest.fixture(scope="module")
def dev():
    return load_squad_json(need(SQUAD_DEV))


def test_choices_are_the_three_named_formats() -> None:
    assert PUNCTUATION_CHOICES == ("paper", "current", "none")
    assert Punctuation("paper") is Punctuation.PAPER and Punctuation.PAPER == "paper"


# ------------------------------------------------------------------------------------------------ the text


def test_format_input_and_target_exact() -> None:
    # none: the seed's raw text, unchanged. T5's own formats are tested below.
    assert format_input("Who?", "Ada wrote it.") == "question: Who? context: Ada wrote it."
    assert format_input("Who?", "Ada, 1843.", "paper") == "question: Who ? context: Ada , 1843 . "
    assert format_target("Ada Lovelace") == "Ada Lovelace"
    assert format_target("St. Mary's", "current") == "St . Mary ' s"
    assert format_target("St. Mary's", Punctuation.PAPER) == pad_punctuation("St. Mary's", "paper")


@pytest.mark.shared
@pytest.mark.parametrize("style", ["paper", "current"])
def test_every_dev_line_equals_t5s_own_preprocessor(dev, style: str) -> None:
    """All 10,570 {id, inputs, targets} written by T5's `squad` (TensorFlow) at that version, exactly."""
    with gzip.open(need(T5_FORMAT / f"squad_dev_{style}.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == len(dev) == 10_570
    mismatched = [
        r["id"]
        for r, ex in zip(rows, dev, strict=True)
        if (r["id"], r["inputs"], r["targets"])
        != (ex.id, format_input(ex.question, ex.context, style), format_target(ex.answers[0], style))
    ]
    assert mismatched == []


@pytest.mark.parametrize(
    ("text", "paper", "current"),
    [
        ("Hello, world!", "Hello , world ! ", "Hello , world ! "),
        ("don't", "don ' t", "don ' t"),
        # "_" is a word character (\W leaves it) but ASCII punctuation ([[:punct:]] pads it).
        ("snake_case 1,000.5", "snake_case 1 , 000 . 5", "snake _ case 1 , 000 . 5"),
        # \W is ASCII-only in RE2: a non-ASCII letter is padded by the paper's class, not by [[:punct:]].
        ("Beyoncé's", "Beyonc é ' s", "Beyoncé ' s"),
        ("(1990–2000)", " ( 1990 – 2000 ) ", " ( 1990–2000 ) "),
        ("北京。", " 北  京  。 ".replace("  ", " "), "北京。"),
        ("  a \n\t b  ", " a b ", " a b "),
        # RE2's \s excludes the no-break space: never collapsed, and padded only as a non-word character.
        ("x\u00a0y", "x \u00a0 y", "x\u00a0y"),
        ("$5 + 2^3", " $ 5 + 2 ^ 3", " $ 5 + 2 ^ 3"),
        ("", "", ""),
    ],
)
def test_pad_punctuation_per_version(text: str, paper: str, current: str) -> None:
    assert pad_punctuation(text, "paper") == paper
    assert pad_punctuation(text, Punctuation.CURRENT) == current
    assert pad_punctuation(text, "none") == text


def test_input_joins_pieces_with_one_space_and_target_is_not_stripped() -> None:
    # T5's _string_join collapses the space after a padded "?" into the joining one.
    assert format_input("Who?", "Ada, 1843.", "paper") == "question: Who ? context: Ada , 1843 . "
    assert format_target("1843.", "paper") == "1843 . "
    assert format_target("St. Mary's", "current") == "St . Mary ' s"
    # none is the seed's raw text, untouched (no whitespace collapsing either).
    assert format_input("Who?", "Ada  wrote it.") == "question: Who? context: Ada  wrote it."
    assert format_target("Ada Lovelace") == "Ada Lovelace"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.text(max_size=60), st.sampled_from(PUNCTUATION_CHOICES))
def test_source_pieces_join_to_the_input(question: str, context: str, style: str) -> None:
    q, c = source_pieces(question, context, style)
    assert f"{q} {c}" == format_input(question, context, style)
    assert q.startswith("question:") and c.startswith("context:")
    if style != "none":
        assert not q.endswith(" ") and "  " not in q + " " + c


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.sampled_from(["paper", "current"]))
def test_pad_properties(text: str, style: str) -> None:
    padded = pad_punctuation(text, style)
    assert pad_punctuation(padded, style) == padded  # idempotent
    strip = str.maketrans("", "", "\t\n\f\r ")
    assert padded.translate(strip) == text.translate(strip)  # only RE2 whitespace is added or removed
    assert "  " not in padded
    # The alignment used to map answers back builds the very same padded text.
    aligned, origin = padded_with_origin(text, Punctuation(style))
    assert aligned == padded and len(origin) == len(padded)
    assert all(padded[k] == text[origin[k]] for k in range(len(padded)) if padded[k] != " ")


# ------------------------------------------------------------------------------- padded answers -> raw spans


@pytest.mark.parametrize(
    ("answer", "context", "style", "expected"),
    [
        # punctuation inside the answer
        ("U . S .", "Made in the U.S. in 1990.", "paper", "U.S."),
        ("U . S .", "Made in the U.S. in 1990.", "current", "U.S."),
        ("St . Mary ' s", "He went to St. Mary's school.", "current", "St. Mary's"),
        ("24 – 10", "They won 24–10 at home.", "paper", "24–10"),
        ("$ 1 , 000", "It cost $1,000 in all.", "paper", "$1,000"),
        # non-ASCII letters: padded apart by the paper's class, kept whole by the current one
        ("Beyonc é ' s", "It was Beyoncé's tour.", "paper", "Beyoncé's"),
        ("Beyoncé ' s", "It was Beyoncé's tour.", "current", "Beyoncé's"),
        ("Fran ç ois", "Fran\u00e7ois said so.", "paper", "François"),
        # SentencePiece hands back NFKC text: "…" decodes as "...", a no-break space as a space
        ("wait ...", "Then wait… and see.", "paper", "wait…"),
        ("10 km", "A 10\u00a0km run.", "current", "10\u00a0km"),
        # case differs from the context: matched ignoring case, the raw span keeps the context's case
        ("the u . s .", "Made in The U.S. today.", "paper", "The U.S."),
        # whole padded tokens first: "S" is the standalone S, not the one inside "Steve"
        ("S", "Steve met S. Jones.", "paper", "S"),
        # a gold-style answer inside a token (SQuAD has "8" out of "20–18")
        ("8", "They won 20–18.", "paper", "8"),
        # newlines in the context are one space in the padded text
        ("New York", "in New\nYork city", "paper", "New\nYork"),
    ],
)
def test_raw_answer_hand_made(answer: str, context: str, style: str, expected: str) -> None:
    assert raw_answer(answer, context, style) == expected


@pytest.mark.parametrize(
    ("answer", "context"),
    [
        ("Paris", "The capital of France is large."),  # not in the context at all
        ("U . K .", "Made in the U.S. in 1990."),
        ("", "Anything."),
        ("   ", "Anything."),
    ],
)
def test_raw_answer_not_in_context_is_none(answer: str, context: str) -> None:
    assert raw_answer(answer, context, "paper") is None


def test_raw_answer_with_none_is_the_answer_itself() -> None:
    assert raw_answer("U . S .", "the U.S.", "none") == "U . S ."


@pytest.mark.shared
@pytest.mark.parametrize("style", ["paper", "current"])
def test_every_padded_dev_target_maps_back_to_its_raw_answer(dev, style: str) -> None:
    """T5's target for each dev question, mapped back, is exactly the raw first gold answer (10,570 of 10,570)."""
    wrong = [
        ex.id
        for ex in dev
        if raw_answer(format_target(ex.answers[0], style).strip(), ex.context, style) != ex.answers[0]
    ]
    assert wrong == []
