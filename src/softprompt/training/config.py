"""The run configuration and the machinery every subcommand's flags and config files go through.

`TrainConfig` is one dataclass whose field docstrings are also the `--help` text. A YAML or JSON
file (`--config FILE`) fills it, flags override the file, and tyro parses the flags. Around the
parser: values in a file are read as their field's type (`lr: 1e-3` is a number), relative paths in
a file resolve from the file's folder and `~` expands everywhere, numbers are range-checked from the
field's `Bound`, an unknown key or flag names the closest valid ones, and every problem is reported
together in one line before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro
import yaml

from softprompt.config.choices import (
    AttentionName,
    InitName,
    OptimizerName,
    PrecisionName,
    PunctuationName,
    ReportToName,
    TaskMetricName,
)
from softprompt.errors import ConfigError
from softprompt.io.rundir import CONFIG_FILE, LAST
from softprompt.tasks.squad.text import LEGACY_PAD_PUNCTUATION

# The names other modules imported before the choices moved to softprompt.config.choices.
Optimizer = OptimizerName
Precision = PrecisionName
Init = InitName


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


@dataclass(kw_only=True)
class TaskFlags:
    """The task's flags, shared by train, eval, predict and format (softprompt.tasks.text.task reads them)."""

    task: str | None = None
    """The task: a preset of configs/tasks (boolq, cb, copa, multirc, record, rte, wic, wsc; squad, the default, is QA on SQuAD JSON / MRQA jsonl) or a task YAML file. The flags below override its fields."""
    input_template: str | None = None
    """A text task's model input over each row's fields (JSONL/CSV/TSV or hf: rows), e.g. 'sst2 sentence: {sentence}'."""
    target_template: str | None = None
    """A text task's target over the row's fields; default: the label string (--label_field/--labels)."""
    label_field: str | None = None
    """The row field holding a classification task's label."""
    labels: list[str] = field(default_factory=list)
    """A classification task's label strings in class order: --labels negative positive (a row's label may be the index, the string, or for two classes a bool)."""
    id_field: str | None = None
    """The row field holding each example's unique id (kept in predictions); default: the row number."""
    metric: TaskMetricName | None = None
    """How answers are scored: accuracy, macro_f1, multirc, record, wsc, exact_match, squad (default: the task's; accuracy with --labels, else exact_match)."""


@dataclass
class TrainConfig(TaskFlags):
    """Everything a training run needs. Defaults follow the paper (Lester et al., 2021)."""

    # --- where things are
    output_dir: OutputDir = "runs/softprompt"
    """Directory the run writes: config.yaml, metrics.jsonl, checkpoints, best/, last/, results.json."""
    model_name_or_path: Model = "google/t5-base-lm-adapt"
    """Hub id or local directory of the T5 model (config.json + tokenizer, and safetensors weights unless --random_init). Alias: --model_name_or_path."""
    random_init: bool = False
    """Build the model from its config with random weights instead of loading weights (tests, benchmarks, offline smoke runs)."""
    train_file: DataFile | None = None
    """Training data: SQuAD v1.1 JSON, MRQA .jsonl(.gz), or hf:NAME (a Hugging Face dataset). Ignored when --dataset_name is given."""
    validation_file: DataFile | None = None
    """Dev data for evaluation and checkpoint selection: SQuAD v1.1 JSON, MRQA .jsonl(.gz) or hf:NAME. Without it (and without --dataset_name) nothing is evaluated and best/ is not written."""
    dataset_name: str | None = None
    """A Hugging Face dataset, used instead of the files (needs the internet): SQuAD columns (e.g. 'squad'), or any rows a --task reads (e.g. super_glue with --dataset_config rte)."""
    dataset_config: str | None = None
    """The configuration of --dataset_name (e.g. rte); default: the task preset's."""
    train_split: str = "train"
    """Split of --dataset_name to train on."""
    validation_split: str = "validation"
    """Split of --dataset_name to evaluate on."""

    # --- method
    prompt_tuning: bool = False
    """Freeze the model and train only a soft prompt (the paper's method). Without it, every weight is fine-tuned (at a fine-tuning --lr: see there)."""
    n_tokens: Count = 100
    """P, the number of prompt vectors (the paper uses 100)."""
    prompt_init: InitName = "sampled_vocab"
    """Prompt init: sampled_vocab (first 5,000 vocabulary rows, the paper's best), uniform (U[0, 0.5), the official default: flax uniform(0.5)), text, from_file, class_label (one label per vector, then sampled_vocab)."""
    prompt_init_labels: list[str] = field(default_factory=list)
    """The class label strings whose embeddings (mean over their tokens) start the first prompt vectors, with --prompt_init class_label: --prompt_init_labels yes no."""
    prompt_init_text: str | None = None
    """The string whose token embeddings start the prompt, with --prompt_init text."""
    prompt_init_file: InputPath | None = None
    """A prompt checkpoint directory to start from, with --prompt_init from_file."""
    punctuation: PunctuationName = "paper"
    """Input/target text: paper (T5's squad preprocessor as the paper ran it: RE2 \\W padded, i.e. every char but ASCII [0-9A-Za-z_]), current (T5 since 2022-04: ASCII punctuation padded), none (raw text, as the seed replication fed it)."""
    max_source_length: Count = 512
    """Input text tokens kept (only the context is truncated); the prompt's P positions come on top."""
    max_target_length: AnswerTokens = 32
    """Answer tokens kept for training, and the most tokens generated at evaluation."""

    # --- optimisation
    optimizer: OptimizerName = "adafactor"
    """adafactor (T5X semantics, weight decay not scaled by lr), adafactor_hf (transformers' Adafactor), adamw (alias: adam)."""
    lr: Annotated[float, Bound(above=0)] | None = None
    """Learning rate, constant for Adafactor. Default: 0.3 with --prompt_tuning (the paper), 5e-5 for full fine-tuning (the paper's best baseline; 1e-3 also reported)."""
    weight_decay: Annotated[float, Bound(low=0, below=1)] = 1e-5
    """Weight decay; our Adafactor applies p <- (1 - wd) p, unscaled by lr, as the paper's code did."""
    initial_step: NonNegative | None = None
    """adafactor only: the step count of the starting checkpoint, which T5X's Adafactor continues (decay 1 - (N+k)^-0.8 at update k). Default: 1,100,000 for *-lm-adapt models, 1,000,000 for t5-v1_1 ones (their released steps), else 0."""
    warmup_steps: NonNegative = 0
    """Linear warmup steps (adamw only; Adafactor runs at a constant lr)."""
    global_batch_size: Count | None = None
    """Examples per optimizer step over all devices and accumulation steps (the paper: 32). Default: derived, else 32."""
    batch_size: Count | None = None
    """Examples per device per forward pass. Default: global_batch_size / (devices x grad_accum_steps)."""
    grad_accum_steps: Count | None = None
    """Forward passes accumulated per optimizer step. Default: global_batch_size / (devices x batch_size), else 1."""
    epochs: Annotated[float, Bound(above=0)] | None = None
    """Train for this many passes over the training data (the seed used 40)."""
    max_steps: Count | None = None
    """Train for this many optimizer steps; overrides --epochs. Default 30,000 (the paper) when neither is set."""
    seed: int = 42
    """Seeds the prompt init, data order, dropout and random model weights."""
    dropout: Annotated[float, Bound(low=0, below=1)] | None = None
    """Override the model's dropout rate (T5 1.1 ships 0.1; 0 makes runs exactly comparable across device counts)."""
    max_train_samples: Count | None = None
    """Use only the first N training examples."""
    bucket_by_length: bool = True
    """Group examples of similar length into batches (same examples per epoch, less padding)."""
    skip_bad_examples: bool = False
    """Skip malformed examples (counted in the log) instead of stopping at the first one."""
    skip_nonfinite: bool = False
    """Skip an optimizer step whose loss is NaN or inf (counted) instead of stopping the run."""

    # --- evaluation, logging, checkpoints
    eval_steps: NonNegative = 1000
    """Evaluate on the dev set every N optimizer steps (and at the end); 0 evaluates only at the end."""
    max_eval_samples: Count | None = None
    """Evaluate on only the first N dev questions."""
    eval_batch_size: Count = 64
    """Questions per device per generation batch."""
    save_steps: NonNegative = 1000
    """Write a resumable checkpoint every N optimizer steps (and at the end)."""
    save_total_limit: Count = 2
    """Keep this many recent resumable checkpoints (best/ is kept separately)."""
    logging_steps: NonNegative = 50
    """Log train loss, lr and examples/s every N optimizer steps."""
    report_to: list[ReportToName] = field(default_factory=lambda: ["tensorboard"])
    """Where to log besides metrics.jsonl: tensorboard, wandb, none."""

    # --- hardware
    precision: PrecisionName = "fp32"
    """fp32, or bf16 autocast (the prompt, master weights and optimizer state stay fp32)."""
    attn_implementation: AttentionName = "sdpa"
    """Attention kernel: PyTorch SDPA (T5's position bias as an additive mask) or transformers' eager code."""
    fsdp: bool = False
    """Shard the model with FSDP2 (fully_shard) across devices: for models that do not fit one device."""
    compile: bool = False
    """torch.compile the model's forward."""
    fast_path: bool = True
    """Use softprompt's lean T5 kernels for frozen models on CPU/CUDA; off = transformers' modules (the same results up to float rounding, slower)."""
    bf16_weights: bool = True
    """With --precision bf16 in prompt mode (not FSDP), store the frozen matmul weights in bf16 once (the numbers autocast computes, half the weight memory); off = fp32 weights cast by autocast every step."""
    resume: bool = False
    """Continue the run in --output_dir from its last checkpoint with its saved config; only the settings in RESUMABLE (max_steps, epochs, eval/save/logging steps, report_to, ...) may change."""
    overwrite_output_dir: bool = False
    """Start afresh even if --output_dir already holds a run (its checkpoints are replaced)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Settings `--resume` may change: they decide how long and how visibly the run goes on, not what it
# computes. Everything else is fixed by the run's config.yaml, and a change is refused.
RESUMABLE = frozenset(
    {
        "max_steps",
        "epochs",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "logging_steps",
        "report_to",
        "eval_batch_size",
        "skip_nonfinite",
        "compile",
        "resume",
        "overwrite_output_dir",
        "output_dir",
    }
)

PROMPT_TUNING_LR = 0.3
FINE_TUNING_LR = 5e-5


def with_mode_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the settings whose default depends on the mode: lr is 0.3 for a prompt, 5e-5 for all weights."""
    if cfg.lr is not None:
        return cfg
    return dataclasses.replace(cfg, lr=PROMPT_TUNING_LR if cfg.prompt_tuning else FINE_TUNING_LR)


# ---------------------------------------------------------------------------------------------- fields


_POSITIONAL = typing.get_args(tyro.conf.Positional[int])[1:]


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
        flag, aliases = f.name, ()
        for m in meta:
            if type(m).__name__ == "_ArgConfig":
                flag = m.name or flag
                aliases = tuple(a.lstrip("-") for a in (m.aliases or ()))
        specs[f.name] = FieldSpec(
            name=f.name,
            flag=flag,
            aliases=aliases,
            kind=kind,
            optional=optional,
            bound=next((m for m in meta if isinstance(m, Bound)), None),
            path=next((m for m in meta if isinstance(m, PathKind)), None),
            positional=any(m in _POSITIONAL for m in meta),
        )
    return specs


def _names(specs: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
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


def _short_repr(value: Any) -> str:
    # A value may be anything a user pasted; an error message quotes only its start.
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def coerce(value: Any, kind: Any, optional: bool = False) -> tuple[Any, bool]:
    """Read a value (a word from the command line, or what YAML produced) as `kind`.

    Numbers may be written any way users write them (`1e-3`, `3e-1`, `1_000`, `.5`, `10.0` for an
    integer); a scalar fills a list field as its one item. Returns (value, ok).
    """
    if value is None or (optional and value in ("None", "null")):
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
        return float(value), isinstance(value, int | float)
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
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a YAML file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path} is not valid YAML{at}; fix the syntax") from None
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
    names = _names(specs)
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
            problems.append(f"'{key}' must be {_describe(spec.kind)}, got {_short_repr(value)}")
            continue
        values[spec.name] = resolve_path(converted, spec.path, base)
    return values, problems


def read_config_file(path: str | os.PathLike, cls: type) -> tuple[dict[str, Any], list[str]]:
    """`config_values` of a YAML/JSON file, relative paths resolved from the file's folder."""
    path = Path(os.path.expanduser(str(path)))
    return config_values(read_yaml_mapping(path), cls, base=path.parent)


def load_yaml_config(path: str | os.PathLike, cls: type = TrainConfig) -> Any:
    """Read a YAML config file into `cls`, listing every unknown key and wrong value at once."""
    values, problems = read_config_file(path, cls)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return cls(**values)


def save_yaml_config(cfg: Any, path: str | os.PathLike, header: str = "") -> None:
    """Write the fully resolved config (what `--config` reads back)."""
    from softprompt.io.atomic import atomic_write_text

    atomic_write_text(path, header + yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


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
    names = {n: s for n, s in _names(specs).items() if not s.positional}
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
                problems.append(f"unexpected argument {_short_repr(word)}")
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
            problems.append(f"unknown flag --{name}" + closest(key, [*names, *switches]))
        elif spec.kind is bool:
            if args:
                problems.append(f"--{name} is a switch and takes no value, got {_short_repr(' '.join(args))}")
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
                problems.append(f"--{name} must be {_describe(spec.kind)}, got {_short_repr(shown)}")
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


# ---------------------------------------------------------------------------------------------- training checks


#: Released step counts of the checkpoints softprompt knows by name: T5X continues from these.
CHECKPOINT_STEPS: tuple[tuple[str, int], ...] = (
    ("lm-adapt", 1_100_000),  # t5x: t5_1_1_lm100k_*/checkpoint_1100000 (what prompt tuning started from)
    ("t5-v1_1", 1_000_000),  # t5x: t5_1_1_*/checkpoint_1000000
)


def resolve_initial_step(cfg: TrainConfig) -> int:
    """The Adafactor step count a run starts from: --initial_step, else the released step of a known
    checkpoint (by name; see ``CHECKPOINT_STEPS``), else 0 (a random init or an unknown model)."""
    if cfg.initial_step is not None:
        return cfg.initial_step
    if cfg.random_init or cfg.optimizer != "adafactor":
        return 0
    name = Path(cfg.model_name_or_path.rstrip("/")).name.lower()
    return next((step for key, step in CHECKPOINT_STEPS if key in name), 0)


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is split: global = per_device x world_size x grad_accum."""

    global_batch: int
    per_device: int
    grad_accum: int
    world_size: int


def resolve_batch(cfg: TrainConfig, world_size: int) -> tuple[BatchPlan | None, list[str]]:
    """Work out the batch split from whichever of the three sizes were given."""
    g, b, a, w = cfg.global_batch_size, cfg.batch_size, cfg.grad_accum_steps, world_size
    if any(v is not None and v < 1 for v in (g, b, a)):
        return None, []  # check_numbers names them
    if b is not None and a is not None:
        if g is not None and g != b * w * a:
            return None, [f"global_batch_size {g} != batch_size {b} x {w} devices x grad_accum_steps {a}"]
        g = b * w * a
    elif b is not None:
        g = g if g is not None else b * w
        a, rem = divmod(g, b * w)
        if rem or a == 0:
            return None, [f"global_batch_size {g} is not divisible by batch_size {b} x {w} devices"]
    else:
        a = a if a is not None else 1
        g = g if g is not None else 32
        b, rem = divmod(g, w * a)
        if rem or b == 0:
            return None, [f"global_batch_size {g} is not divisible by {w} devices x grad_accum_steps {a}"]
    return BatchPlan(g, b, a, w), []


def validate(cfg: TrainConfig, world_size: int = 1) -> BatchPlan:
    """Check everything that can be checked before loading anything; raise one error listing all problems.

    Returns:
        The resolved batch plan.
    """
    plan, problems = check_config(cfg, world_size)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    assert plan is not None
    return plan


def _exists(value: str) -> bool:
    return value.startswith("hf:") or Path(value).exists()


def check_config(cfg: TrainConfig, world_size: int = 1) -> tuple[BatchPlan | None, list[str]]:
    """Every problem `validate` would refuse, without raising: the batch plan (None if impossible) and them."""
    problems: list[str] = check_numbers(cfg)
    task = None
    try:
        from softprompt.tasks.text.task import (
            task_from_flags,  # deferred: reads YAML presets, imports the data stack
        )

        task = task_from_flags(cfg)
    except ConfigError as err:
        problems.append(str(err))
    has_own_data = task is not None and bool(task.dataset)
    if cfg.dataset_name is None and cfg.train_file is None and not has_own_data:
        problems.append(
            "give --train_file (SQuAD JSON, MRQA jsonl, a task's JSONL/CSV/TSV, or hf:NAME) or --dataset_name"
        )
    for name in ("train_file", "validation_file", "prompt_init_file"):
        value = getattr(cfg, name)
        if (
            value is not None
            and (cfg.dataset_name is None or name == "prompt_init_file")
            and not _exists(value)
        ):
            problems.append(f"--{name} {value} does not exist")
    if cfg.prompt_tuning:
        if cfg.prompt_init == "text" and not cfg.prompt_init_text:
            problems.append("--prompt_init text needs --prompt_init_text")
        if cfg.prompt_init == "from_file" and not cfg.prompt_init_file:
            problems.append("--prompt_init from_file needs --prompt_init_file")
        task_labels = list(task.classes or ()) if task is not None else []
        if cfg.prompt_init == "class_label" and not cfg.prompt_init_labels and not task_labels:
            problems.append(
                "--prompt_init class_label needs --prompt_init_labels (e.g. --prompt_init_labels yes no) "
                "or a classification --task"
            )
        if (
            cfg.prompt_init == "class_label"
            and not cfg.prompt_init_labels
            and len(task_labels) > cfg.n_tokens
        ):
            problems.append(f"the task's {len(task_labels)} labels do not fit in --n_tokens {cfg.n_tokens}")
        if cfg.prompt_init_labels and cfg.prompt_init != "class_label":
            problems.append("--prompt_init_labels only applies to --prompt_init class_label")
        if len(cfg.prompt_init_labels) > cfg.n_tokens:
            problems.append(
                f"{len(cfg.prompt_init_labels)} --prompt_init_labels do not fit in --n_tokens {cfg.n_tokens}"
            )
    elif cfg.prompt_init_file or cfg.prompt_init_text or cfg.prompt_init_labels:
        problems.append(
            "--prompt_init_file/--prompt_init_text/--prompt_init_labels need --prompt_tuning (fine-tuning uses no prompt)"
        )
    if cfg.initial_step is not None and cfg.optimizer != "adafactor":
        problems.append(f"--initial_step only applies to --optimizer adafactor, not {cfg.optimizer}")
    if cfg.resume and cfg.overwrite_output_dir:
        problems.append("--resume and --overwrite_output_dir contradict each other; pick one")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        problems.append(f"--output_dir {out} is a file; give a directory")
    if not cfg.resume and not cfg.overwrite_output_dir and (out / CONFIG_FILE).exists():
        problems.append(
            f"{out} already holds a run; pass --resume to continue it or --overwrite_output_dir to start again"
        )
    no_run = not (out / LAST).exists() and not (out / CONFIG_FILE).exists()
    # With its data named, a run killed before it wrote its config simply starts from the beginning,
    # so a job script can pass --resume every time; `--output_dir DIR --resume` alone needs a run.
    if cfg.resume and no_run and cfg.train_file is None and cfg.dataset_name is None:
        problems.append(f"--resume: {out} holds no run to resume")
    plan, batch_problems = resolve_batch(cfg, world_size)
    problems += batch_problems
    return plan, problems


def _comparable(value: Any) -> Any:
    # config.yaml records paths as the run resolved them; compare what they point at.
    if isinstance(value, str) and value and not value.startswith("hf:") and os.path.exists(value):
        return os.path.realpath(value)
    return value


def resume_changes(saved: dict[str, Any], cfg: TrainConfig) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """What a resumed run changes against its saved config.yaml.

    Returns:
        The allowed changes (field -> (saved, new)), and one phrase per change `--resume` refuses.
    """
    allowed: dict[str, tuple[Any, Any]] = {}
    refused: list[str] = []
    for f in dataclasses.fields(cfg):
        if f.name not in saved or f.name in ("resume", "overwrite_output_dir", "output_dir"):
            continue
        old, new = saved[f.name], getattr(cfg, f.name)
        if _comparable(old) == _comparable(new):
            continue
        if f.name in RESUMABLE:
            allowed[f.name] = (old, new)
        else:
            refused.append(f"{f.name} ({old!r} -> {new!r})")
    return allowed, refused
