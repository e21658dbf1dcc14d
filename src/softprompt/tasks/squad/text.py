"""The text a T5 model sees for a SQuAD question, exactly as T5's own ``squad`` preprocessor writes it.

T5 (``t5/data/preprocessors.py``: ``squad``, ``_pad_punctuation``, ``_string_join``) writes

* inputs: ``_string_join(["question:", pad(question), "context:", pad(context)])``, i.e. the four pieces
  joined by single spaces with every whitespace run collapsed to one space;
* targets: ``pad(first answer)``, not stripped (``"1843."`` becomes ``"1843 . "``);

where ``pad`` puts a space on both sides of every character of a class and collapses whitespace runs.
The class depends on T5's version, so the formats have names (:class:`Punctuation`). T5 runs its regexes
in RE2, whose ``\\W``, ``[[:punct:]]`` and ``\\s`` are ASCII-only: ``\\s`` is ``[\\t\\n\\f\\r ]``, so a
no-break space is never collapsed, and under ``paper`` it is padded like any other non-word character.

With padding on, the model answers in padded form (``"U . S ."``); :func:`raw_answer` maps such an answer
back to the raw context span it came from, which is what the official SQuAD evaluator expects.

This module imports nothing heavy, so the CLI and the config can use :class:`Punctuation` cheaply.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from softprompt.config.choices import Punctuation, PunctuationName, values

__all__ = [
    "PUNCTUATION_CHOICES",
    "Punctuation",
    "PunctuationName",
    "format_input",
    "format_target",
    "pad_punctuation",
    "padded_gold_answers",
    "raw_answer",
    "source_pieces",
]


#: The names, in the order ``--help`` lists them.
PUNCTUATION_CHOICES: tuple[str, ...] = values(Punctuation)


_CLASS = {
    Punctuation.PAPER: re.compile(r"([^0-9A-Za-z_])"),
    # RE2's [[:punct:]] is ASCII's [!-/:-@[-`{-~].
    Punctuation.CURRENT: re.compile(r"([!-/:-@\[-`{-~])"),
}
_RE2_SPACE = "\t\n\f\r "
_RE2_SPACE_RUN = re.compile(r"[\t\n\f\r ]+")


def _collapse(text: str) -> str:
    return _RE2_SPACE_RUN.sub(" ", text)


def pad_punctuation(text: str, style: Punctuation | str) -> str:
    """T5's ``_pad_punctuation`` in the given version: a space around each matched character, runs collapsed.

    Leading and trailing spaces are kept (one each), exactly as T5 does. ``none`` returns the text unchanged.

    Args:
        text: Any text.
        style: ``paper``, ``current`` or ``none``.

    Returns:
        The padded text, e.g. ``"Hello, world!"`` -> ``"Hello , world ! "``.
    """
    style = Punctuation(style)
    if style is Punctuation.NONE:
        return text
    return _collapse(_CLASS[style].sub(r" \1 ", text))


def source_pieces(question: str, context: str, style: Punctuation | str) -> tuple[str, str]:
    """The input as two pieces, ``"question: ..."`` and ``"context: ..."``, whose join by one space is
    :func:`format_input`'s text (so they can be tokenized, and truncated, separately)."""
    style = Punctuation(style)
    if style is Punctuation.NONE:
        return f"question: {question}", f"context: {context}"
    # _string_join collapses the run between the question and "context:" into the single joining space.
    return _collapse(f"question: {pad_punctuation(question, style)}").rstrip(" "), _collapse(
        f"context: {pad_punctuation(context, style)}"
    )


def format_input(question: str, context: str, style: Punctuation | str = Punctuation.NONE) -> str:
    """The model's input text for one question.

    Args:
        question: The question.
        context: The passage.
        style: ``paper``/``current``: T5's ``squad`` preprocessor at that version, character for
            character; ``none``: ``question: {question} context: {context}`` unchanged.

    Returns:
        The input text.
    """
    return " ".join(source_pieces(question, context, style))


def format_target(answer: str, style: Punctuation | str = Punctuation.NONE) -> str:
    """The model's target text for one answer: ``pad(answer)`` (T5 does not strip it), or the answer as is.

    Args:
        answer: The answer text.
        style: Use the same style as for the inputs.

    Returns:
        The target text.
    """
    return pad_punctuation(answer, style)


def padded_gold_answers(answers: list[str] | tuple[str, ...], style: Punctuation | str) -> list[str]:
    """Every gold answer as T5's ``squad`` task scores against them (its ``answers`` feature): padded."""
    return [pad_punctuation(a, style) for a in answers]


# ------------------------------------------------------------------------------------------------------
# Padded answers back to raw context spans


def _searchable(text: str) -> tuple[str, list[int]]:
    """``text`` in the form a decoded answer is compared in, and the index in ``text`` of each character.

    SentencePiece normalises text (NFKC) before it tokenizes, so a decoded answer may spell a span
    differently than the context (``"…"`` comes back as ``"..."``). Both sides are therefore compared
    after NFKD, which is applied character by character so that each output character keeps the index
    of the character it came from, and after collapsing every whitespace run to one space.
    """
    chars: list[str] = []
    index: list[int] = []
    for i, ch in enumerate(text):
        for out in unicodedata.normalize("NFKD", ch):
            if out.isspace():
                if chars and chars[-1] == " ":
                    continue
                out = " "
            chars.append(out)
            index.append(i)
    return "".join(chars), index


def _padded_with_origin(context: str, style: Punctuation) -> tuple[str, list[int]]:
    """``pad_punctuation(context, style)`` and, per character of it, the index of the raw character it
    comes from (a padding space points at the character it pads)."""
    pattern = _CLASS[style]
    chars: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(context):
        if pattern.fullmatch(ch):
            chars += [" ", ch, " "]
            origin += [i, i, i]
        else:
            chars.append(ch)
            origin.append(i)
    # Collapse RE2 whitespace runs as _pad_punctuation does, keeping each kept character's origin.
    out_chars: list[str] = []
    out_origin: list[int] = []
    for ch, i in zip(chars, origin, strict=True):
        if ch in _RE2_SPACE:
            if out_chars and out_chars[-1] == " ":
                continue
            ch = " "
        out_chars.append(ch)
        out_origin.append(i)
    return "".join(out_chars), out_origin


@lru_cache(maxsize=64)
def _context_index(context: str, style: Punctuation) -> tuple[str, list[int], list[int]]:
    # SQuAD asks about 5 questions per context, in a row: build each context's index once.
    padded, origin = _padded_with_origin(context, style)
    haystack, index = _searchable(padded)
    return haystack, index, origin


def raw_answer(answer: str, context: str, style: Punctuation | str) -> str | None:
    """The raw context span a padded answer was read from, or None when it is not a span of the context.

    The padded context is built with each character's origin in the raw context; the answer is looked up
    in it as a run of whole padded tokens (so ``"S"`` does not match inside ``"Steve"`` while ``"S"``
    stands alone elsewhere), first as written, then ignoring case, and only then anywhere inside a token.
    The first occurrence wins; its first and last characters give the raw span. With ``none`` the answer
    is returned unchanged.

    Args:
        answer: A generated answer, as decoded (e.g. ``"U . S ."``).
        context: The raw context the question was asked about.
        style: The punctuation style the model was trained and prompted with.

    Returns:
        The raw span (``"U.S."``), or None if the answer occurs nowhere in the padded context.
    """
    style = Punctuation(style)
    if style is Punctuation.NONE:
        return answer
    needle, _ = _searchable(answer)
    needle = needle.strip(" ")
    if not needle:
        return None
    haystack, index, origin = _context_index(context, style)
    whole_tokens = rf"(?:^|(?<= )){re.escape(needle)}(?= |$)"
    for pattern, flags in (
        (whole_tokens, 0),
        (whole_tokens, re.IGNORECASE),
        (re.escape(needle), 0),  # inside a token: SQuAD has gold answers like "8" out of "20–18"
        (re.escape(needle), re.IGNORECASE),
    ):
        match = re.search(pattern, haystack, flags)
        if match is not None:
            first = origin[index[match.start()]]
            last = origin[index[match.end() - 1]]
            return context[first : last + 1]
    return None
