"""The one parser every subcommand's flags and config files go through.

A YAML or JSON file (`--config FILE`) fills the subcommand's dataclass, flags override the file, and
tyro parses the flags. Around tyro: values in a file are read as their field's type (`lr: 1e-3` is a
number), relative paths in a file resolve from the file's folder and `~` expands everywhere, numbers
are range-checked from the field's `Bound`, an unknown key or flag names the closest valid ones, and
every problem is reported together in one line before any work starts. In `--help`, each flag comes
before its aliases and a grouped number (1,100,000) never wraps across lines.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import tyro
import yaml

from softprompt.config.choices import LEGACY_PAD_PUNCTUATION
from softprompt.config.fields import (
    check_numbers,
    closest,
    coerce,
    describe_kind,
    expand_paths,
    field_specs,
    resolve_path,
    short_repr,
    spellings,
)
from softprompt.config.safe_yaml import YamlTooLarge, load_yaml
from softprompt.errors import ConfigError

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------- --help

# A digit-grouping comma ("1,100,000"). tyro's help wrapper breaks a word at a comma, which splits a
# number across lines ("1," / "100,000"); a no-break space groups the digits and keeps it whole.
_GROUPED_DIGITS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NO_BREAK_SPACE = "\u00a0"


def unbroken_numbers(text: str) -> str:
    """Help text whose grouped numbers cannot wrap: ``1,100,000`` is written with no-break spaces."""
    return _GROUPED_DIGITS.sub(_NO_BREAK_SPACE, text)


def _canonical_first(apply_argconf: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """tyro's rule that applies `tyro.conf.arg`, then the flag's own name before its aliases in --help
    (tyro puts the aliases first: `--out, --output_dir`), and its help with unbroken numbers."""

    def rule(arg: Any, lowered: Any) -> None:
        apply_argconf(arg, lowered)
        aliases = tuple(arg.field.argconf.aliases or ())
        flags = tuple(lowered.name_or_flags)
        if aliases and flags[: len(aliases)] == aliases and len(flags) > len(aliases):
            lowered.name_or_flags = flags[len(aliases) :] + aliases
        helptext = arg.field.helptext  # the field's docstring (tyro formats the help from it)
        if isinstance(helptext, str):
            arg.field.helptext = unbroken_numbers(helptext)
        elif callable(helptext) and not hasattr(helptext, "unbroken"):

            def unbroken() -> str | None:
                text = helptext()
                return None if text is None else unbroken_numbers(text)

            unbroken.unbroken = True  # type: ignore[attr-defined]
            arg.field.helptext = unbroken

    rule.wrapped = apply_argconf  # type: ignore[attr-defined]  # marks the rule as installed once
    return rule


def _install_help_rules() -> None:
    # tyro has no setting for either; its rule functions are looked up by name when each flag is
    # lowered, so wrapping the one that applies `tyro.conf.arg` changes only the --help text (argparse
    # gets every spelling either way, and the parsed field is the same).
    from tyro import _arguments

    if not hasattr(_arguments._rule_apply_argconf, "wrapped"):
        _arguments._rule_apply_argconf = _canonical_first(_arguments._rule_apply_argconf)


_install_help_rules()

# ---------------------------------------------------------------------------------------------- files


class _Loader(yaml.SafeLoader):
    """YAML as users write numbers: PyYAML alone reads `1e-3` (no dot) as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (or JSON) config file's mapping of keys to values, with one clear error if it is not one."""
    path = Path(os.path.expanduser(str(path)))
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), _Loader)  # a SafeLoader subclass, bounded
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a YAML file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path} is not valid YAML{at}; fix the syntax") from None
    except YamlTooLarge as e:
        raise ConfigError(f"{path} is refused: {e}; write the values out plainly") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not a {type(raw).__name__}")
    return raw


def config_values(
    raw: dict[str, Any], cls: type, base: Path | None = None
) -> tuple[dict[str, Any], list[str]]:
    """A config mapping's usable values by field name, and one phrase per unknown key or bad value.

    Keys may be field names or any flag spelling (`model` or `model_name_or_path`); relative paths
    resolve from `base` (the file's folder).
    """
    specs = field_specs(cls)
    names = spellings(specs)
    values: dict[str, Any] = {}
    problems = []
    if "pad_punctuation" in raw and "punctuation" in specs:
        # Configs written before the named formats carry the old boolean instead.
        raw = dict(raw)
        old = raw.pop("pad_punctuation")
        if "punctuation" not in raw and isinstance(old, bool):
            raw["punctuation"] = LEGACY_PAD_PUNCTUATION[old]
    for key, value in raw.items():
        spec = names.get(str(key).replace("-", "_"))
        if spec is None or spec.positional:
            problems.append(f"unknown key '{key}'" + closest(str(key), names, "'{}'"))
            continue
        converted, ok = coerce(value, spec.kind, spec.optional)
        if not ok:
            problems.append(f"'{key}' must be {describe_kind(spec.kind)}, got {short_repr(value)}")
            continue
        values[spec.name] = resolve_path(converted, spec.path, base)
    return values, problems


def read_config_file(path: str | os.PathLike, cls: type) -> tuple[dict[str, Any], list[str]]:
    """`config_values` of a YAML/JSON file, relative paths resolved from the file's folder."""
    path = Path(os.path.expanduser(str(path)))
    return config_values(read_yaml_mapping(path), cls, base=path.parent)


# Where the data comes from: a flag naming one source replaces the other source a config file (a
# preset) or a resumed run's saved settings named, instead of losing to it (`--config preset.yaml
# --train_file F` trains on F, not on the preset's dataset_name).
DATA_SOURCES: dict[str, tuple[str, ...]] = {
    "train_file": ("dataset_name", "dataset_config"),
    "validation_file": ("dataset_name", "dataset_config"),
    "dataset_name": ("train_file", "validation_file"),
}


def replaced_sources(values: dict[str, Any], flag_values: dict[str, Any]) -> dict[str, Any]:
    """`values` (from a file or saved settings) without the data sources that the flags' data sources
    replace (`DATA_SOURCES`)."""
    dropped = {
        other
        for name, value in flag_values.items()
        if value is not None
        for other in DATA_SOURCES.get(name, ())
        if other not in flag_values
    }
    return {k: v for k, v in values.items() if k not in dropped}


def _unset_empty(obj: T) -> T:
    """The dataclass with an empty string in an optional field read as unset (tyro keeps `""`)."""
    changes = {
        spec.name: None
        for spec in field_specs(type(obj)).values()
        if spec.optional and getattr(obj, spec.name) == ""
    }
    return dataclasses.replace(obj, **changes) if changes else obj  # type: ignore[type-var]


# Other tools' switches whose meaning softprompt spells as a value of one of its flags (not an alias:
# the shape differs), and what to write instead; offered when the command has that flag.
FLAG_HINTS: dict[str, tuple[str, str]] = {
    "bf16": ("precision", "--precision bf16?"),
    "fp16": ("precision", "--precision bf16? fp16 is not supported"),
    "tf32": ("precision", "--precision fp32?"),
    "do_eval": ("validation_file", "--validation_file FILE? a dev set is evaluated whenever one is given"),
}


def _suggest(key: str, names: dict[str, Any]) -> str:
    """' (did you mean ...?)' for an unknown flag: another tool's switch's own spelling here, else the
    closest valid spellings."""
    hint = FLAG_HINTS.get(key)
    if hint is not None and hint[0] in names:
        return f" (did you mean {hint[1]})"
    return closest(key, names)


# ---------------------------------------------------------------------------------------------- flags


def check_flags(argv: list[str], cls: type) -> tuple[dict[str, Any], list[str], list[str]]:
    """Every unknown flag and unreadable value in `argv`, listed at once (the parser stops at the first).

    tyro parses the flags; this pass only finds what it would refuse, so the user sees all of it in
    one line, each unknown flag with the closest valid spellings. Values are read with `coerce`, the
    same function that reads config files.

    Returns:
        The values that could be read, by field name, one phrase per problem, and the positional words.
    """
    specs = field_specs(cls)
    names = {n: s for n, s in spellings(specs).items() if not s.positional and not s.config_only}
    switches = {f"no_{n}": s for n, s in names.items() if s.kind is bool}
    values: dict[str, Any] = {}
    problems: list[str] = []
    positional = any(s.positional for s in specs.values())
    words: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if not word.startswith("--"):
            if not positional:
                problems.append(f"unexpected argument {short_repr(word)}")
            words.append(word)
            continue
        name, has_value, inline = word[2:].partition("=")
        key = name.replace("-", "_")
        spec = names.get(key) or switches.get(key)
        args = [inline] if has_value else []
        takes = (
            0
            if spec is not None and spec.kind is bool
            else (None if spec is None or typing.get_origin(spec.kind) is list else 1)
        )
        while i < len(argv) and not argv[i].startswith("--") and (takes is None or len(args) < takes):
            args.append(argv[i])
            i += 1
        if spec is None:
            problems.append(f"unknown flag --{name}" + _suggest(key, {**names, **switches}))
        elif spec.kind is bool:
            if args:
                problems.append(f"--{name} is a switch and takes no value, got {short_repr(' '.join(args))}")
            else:
                values[spec.name] = key not in switches
        elif not args:
            problems.append(f"--{name} needs a value")
        else:
            value, ok = coerce(
                args if typing.get_origin(spec.kind) is list else args[0], spec.kind, spec.optional
            )
            if ok:
                values[spec.name] = value
            else:
                shown = " ".join(args)
                problems.append(f"--{name} must be {describe_kind(spec.kind)}, got {short_repr(shown)}")
    return values, problems, words


def pop_config_flag(argv: list[str]) -> tuple[list[str], str | None]:
    """Take `--config FILE` or `--config=FILE` out of argv; the file's values come under the flags."""
    rest: list[str] = []
    path = None
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError("--config needs a YAML or JSON file path")
            path = argv[i + 1]
            i += 2
            continue
        if word.startswith("--config="):
            path = word.split("=", 1)[1]
            if not path:
                raise ConfigError("--config needs a YAML or JSON file path")
        else:
            rest.append(word)
        i += 1
    return rest, path


def reports(environ: typing.Mapping[str, str] | None = None) -> bool:
    """Whether this process tells the user: a lone process, or rank 0 of a torchrun job (every rank
    meets the same bad flag or file, and one line says it once)."""
    return (os.environ if environ is None else environ).get("RANK", "0") == "0"


def _refuse(prog: str, problems: list[str]) -> None:
    # The same exit as the parser's own refusals: one line, status 2.
    error = ConfigError("invalid configuration: " + "; ".join(problems))
    if reports():
        print(f"{prog}: error: {error}", file=sys.stderr)
    raise SystemExit(error.exit_code)


def parse(
    cls: type[T],
    argv: Sequence[str],
    prog: str,
    *,
    defaults: dict[str, Any] | None = None,
    checks: Callable[[T], list[str]] | None = None,
) -> T:
    """Parse a subcommand's flags into `cls`: config file, then flags, then every check at once.

    Args:
        cls: the subcommand's dataclass.
        argv: the words after the subcommand.
        prog: `softprompt COMMAND`, for messages and --help.
        defaults: values under the config file and the flags (a resumed run's saved config).
        checks: more problems to report with the parser's (combinations of settings).

    Returns:
        The parsed dataclass with `~` expanded in its paths.

    Raises:
        SystemExit: 0 after --help; 2 with one line naming every problem when a flag, a config key
            or a required value is wrong (like any parser's refusal).
        ConfigError: the flags parsed but their values are out of range or contradict each other
            (one message listing every problem).
    """
    argv, config_path = pop_config_flag(list(argv))
    values = dict(defaults or {})
    problems: list[str] = []
    if config_path is not None:
        file_values, file_problems = read_config_file(config_path, cls)
        values.update(file_values)
        problems += [f"{config_path}: {p}" for p in file_problems]
    required = {
        f.name: tyro.MISSING
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    if not {"-h", "--help"} & set(argv):
        flag_values, flag_problems, words = check_flags(argv, cls)
        values = replaced_sources(values, flag_values)
        problems += flag_problems
        specs = field_specs(cls)
        given = {**values, **flag_values}
        problems += [
            f"--{specs[n].flag} is required" for n in required if not specs[n].positional and n not in given
        ]
        wanted = [specs[n].metavar or n.upper() for n in required if specs[n].positional and n not in given]
        if len(words) < len(wanted):
            problems.append(f"give {' '.join(wanted)} (see {prog} --help)")
        if problems:
            # What did parse still gets its numbers and combinations checked: everything at once.
            partial = cls(**{**required, **values, **flag_values})
            problems += check_numbers(partial) + (checks(partial) if checks else [])
            _refuse(prog, list(dict.fromkeys(problems)))
    default = cls(**{**required, **values}) if values else None
    description = unbroken_numbers(cls.__doc__ or "")
    args = tyro.cli(cls, args=argv, prog=prog, default=default, use_underscores=True, description=description)
    args = expand_paths(_unset_empty(args))
    problems = check_numbers(args) + (checks(args) if checks else [])
    if problems:
        # Well-formed flags whose values cannot work together: a UserError, reported by `main` in the
        # same one-line form, and returned as its exit status rather than raised.
        raise ConfigError("invalid configuration: " + "; ".join(dict.fromkeys(problems)))
    return args
