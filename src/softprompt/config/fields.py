"""The typed fields every subcommand's flags are made of, and the checks the parser runs on them.

A flag dataclass annotates its fields with markers: a `Bound` (the range a number accepts) and a
`PathKind` (what a string path holds). `field_specs` reads them back with the flag's spelling and
aliases; `coerce` reads a value from a config file or the command line as the field's type, the same
way for both; `expand_paths` and `check_numbers` apply the markers after parsing. Imports nothing
heavy (tyro only), so `softprompt COMMAND --help` answers at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

# ---------------------------------------------------------------------------------------------- markers


@dataclass(frozen=True)
class Bound:
    """The range a number field accepts; checked the same way for every subcommand (`check_numbers`).

    Attributes:
        low: smallest allowed value (inclusive).
        above: the value must be greater than this (and finite).
        below: the value must be smaller than this.
    """

    low: float | None = None
    above: float | None = None
    below: float | None = None

    def problem(self, flag: str, value: Any) -> str | None:
        """One phrase saying why `value` is out of range, or None when it is fine."""
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return None
        ok = (
            math.isfinite(value)
            and (self.low is None or value >= self.low)
            and (self.above is None or value > self.above)
            and (self.below is None or value < self.below)
        )
        if ok:
            return None
        if self.low is not None and self.below is not None:
            want = f"in [{self.low:g}, {self.below:g})"
        elif self.above is not None:
            want = f"> {self.above:g} and finite"
        elif self.low is not None:
            want = f">= {self.low:g}"
        else:
            want = f"< {self.below:g}"
        return f"{flag} must be {want}, got {value}"


class PathKind(Enum):
    """What a string field holds, for `~` expansion and resolving a config file's relative paths."""

    PATH = "path"
    """A file or directory: relative paths in a config file resolve from the file's folder."""
    DATA = "data"
    """A data file, or hf:NAME (a Hugging Face dataset), which is left as it is."""
    MODEL = "model"
    """A Hub id or a local directory: resolved from a config file's folder only where that exists."""


Count = Annotated[int, Bound(low=1)]
NonNegative = Annotated[int, Bound(low=0)]
OutputDir = Annotated[str, PathKind.PATH]
OutputFile = Annotated[str, PathKind.PATH]
InputPath = Annotated[str, PathKind.PATH]
DataFile = Annotated[str, PathKind.DATA]
# One spelling per concept in every subcommand; the other common spelling is an alias.
Model = Annotated[str, tyro.conf.arg(name="model", aliases=("--model_name_or_path",)), PathKind.MODEL]
AnswerTokens = Annotated[int, tyro.conf.arg(aliases=("--max_new_tokens",)), Bound(low=1)]
GenerationBatch = Annotated[int, tyro.conf.arg(aliases=("--batch_size",)), Bound(low=1)]

# ---------------------------------------------------------------------------------------------- fields


_POSITIONAL = typing.get_args(tyro.conf.Positional[int])[1:]
_SUPPRESSED = typing.get_args(tyro.conf.Suppress[int])[1:]


@dataclass(frozen=True)
class FieldSpec:
    """What the parser helpers need to know about one dataclass field."""

    name: str
    flag: str
    aliases: tuple[str, ...]
    kind: Any  # the type without Annotated and None
    optional: bool
    bound: Bound | None
    path: PathKind | None
    positional: bool
    config_only: bool = False  # a config file's key with no flag (tyro.conf.Suppress), e.g. train's prompts:
    metavar: str | None = None  # what --help and messages call a positional (RUN_DIR); None: its name


def _unwrap(annotation: Any) -> tuple[Any, list[Any], bool]:
    meta: list[Any] = []
    optional = False
    for _ in range(3):
        if typing.get_origin(annotation) is Annotated:
            annotation, *more = typing.get_args(annotation)
            meta += more
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            if len(args) != 1:
                break
            annotation = args[0]
    return annotation, meta, optional


def field_specs(cls: type) -> dict[str, FieldSpec]:
    """Field name -> FieldSpec for a dataclass of flags."""
    hints = typing.get_type_hints(cls, include_extras=True)
    specs = {}
    for f in dataclasses.fields(cls):
        kind, meta, optional = _unwrap(hints[f.name])
        flag, aliases, metavar = f.name, (), None
        for m in meta:
            if type(m).__name__ == "_ArgConfig":
                flag = m.name or flag
                aliases = tuple(a.lstrip("-") for a in (m.aliases or ()))
                metavar = m.metavar or metavar
        specs[f.name] = FieldSpec(
            name=f.name,
            flag=flag,
            aliases=aliases,
            kind=kind,
            optional=optional,
            bound=next((m for m in meta if isinstance(m, Bound)), None),
            path=next((m for m in meta if isinstance(m, PathKind)), None),
            positional=any(m in _POSITIONAL for m in meta),
            config_only=any(m in _SUPPRESSED for m in meta),
            metavar=metavar,
        )
    return specs


def spellings(specs: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
    """Every spelling (field name, flag, aliases) -> its field."""
    out = {}
    for s in specs.values():
        for n in (s.name, s.flag, *s.aliases):
            out[n] = s
    return out


def closest(word: str, options: typing.Iterable[str], shown: str = "--{}") -> str:
    """' (did you mean --x or --y?)' for the valid spellings nearest a misspelt one, else ''."""
    matches = difflib.get_close_matches(word, sorted(set(options)), n=3, cutoff=0.6)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(shown.format(m) for m in matches) + "?)"


class _ShortRepr(reprlib.Repr):
    """`reprlib.Repr` that also never writes out a huge integer (Python refuses past 4,300 digits)."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 200:
            return f"<an integer of {x.bit_length():,} bits>"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()
_SHORT.maxlevel = 3
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60


def short_repr(value: Any) -> str:
    """`repr(value)`, cut after 60 characters: a value may be anything a user pasted, and a message quotes only its start.

    The repr is bounded as it is built (`reprlib`: a few items per level, three levels), so a value
    that expands to billions of items (a YAML alias bomb) or a huge integer costs nothing to quote.
    """
    text = _SHORT.repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def describe_kind(kind: Any) -> str:
    """What a value of `kind` must be, as a message says it: 'an integer', 'one of \'a\', \'b\''."""
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def coerce(value: Any, kind: Any, optional: bool = False) -> tuple[Any, bool]:
    """Read a value (a word from the command line, or what YAML produced) as `kind`.

    Numbers may be written any way users write them (`1e-3`, `3e-1`, `1_000`, `.5`, `10.0` for an
    integer); a scalar fills a list field as its one item. Returns (value, ok).
    """
    # An optional field is unset by an empty value (`--dataset_name ""`, `dataset_name:` in a file) or
    # None/null, e.g. to drop a preset's value.
    if value is None or (optional and value in ("None", "null", "")):
        return None, optional
    if isinstance(value, Enum):
        value = value.value
    origin = typing.get_origin(kind)
    if origin is list:
        (inner,) = typing.get_args(kind)
        items = []
        for item in value if isinstance(value, list) else [value]:
            item, ok = coerce(item, inner)
            if not ok:
                return None, False
            items.append(item)
        return items, True
    if origin is Literal:
        choices = typing.get_args(kind)
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower(), True
        return None, False
    if isinstance(value, bool) or kind is bool:
        return value, isinstance(value, bool) and kind is bool
    if kind is int:
        if isinstance(value, str):
            try:
                value = float(value.strip()) if re.search(r"[.eE]", value) else int(value.strip(), 10)
            except ValueError:
                return None, False
        if isinstance(value, float):
            return (int(value), True) if value.is_integer() else (None, False)
        return value, isinstance(value, int)
    if kind is float:
        if isinstance(value, str):
            try:
                return float(value.strip()), True
            except ValueError:
                return None, False
        # Check before converting: float() of a list or a mapping raises instead of answering "not ok".
        if not isinstance(value, int | float):
            return None, False
        try:
            return float(value), True
        except OverflowError:  # an integer past a float's range
            return None, False
    if kind is str:
        return (str(value), True) if isinstance(value, str | int | float) else (None, False)
    return value, True


def resolve_path(value: Any, kind: PathKind | None, base: Path | None = None) -> Any:
    """Expand `~` in a path field, and resolve a relative one from `base` (a config file's folder)."""
    if kind is None or not isinstance(value, str) or not value:
        return value
    if kind is PathKind.DATA and value.startswith("hf:"):
        return value
    path = os.path.expanduser(value)
    if base is not None and not os.path.isabs(path):
        candidate = os.path.normpath(base / path)
        if kind is not PathKind.MODEL or os.path.exists(candidate):
            path = candidate
    return path


def expand_paths(obj: Any) -> Any:
    """The dataclass with `~` expanded in every path field (`--output_dir=~/runs` reaches no shell)."""
    changes = {}
    for spec in field_specs(type(obj)).values():
        value = getattr(obj, spec.name)
        if spec.path is not None:
            new = (
                [resolve_path(v, spec.path) for v in value]
                if isinstance(value, list)
                else resolve_path(value, spec.path)
            )
            if new != value:
                changes[spec.name] = new
    return dataclasses.replace(obj, **changes) if changes else obj


def check_numbers(obj: Any) -> list[str]:
    """Every number field outside its `Bound`, as one phrase each (`--eval_batch_size must be >= 1, got 0`)."""
    problems = []
    for spec in field_specs(type(obj)).values():
        if spec.bound is not None:
            problem = spec.bound.problem(f"--{spec.flag}", getattr(obj, spec.name))
            if problem:
                problems.append(problem)
    return problems
