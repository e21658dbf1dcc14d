"""The run configuration: one dataclass whose field docstrings are also the `--help` text.

A YAML file (`--config`) sets the defaults and command-line flags override it. Validation collects
every problem and reports them together before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from softprompt.errors import ConfigError

Optimizer = Literal["adafactor", "adafactor_hf", "adamw", "adam"]
Precision = Literal["fp32", "bf16"]
Init = Literal["sampled_vocab", "uniform", "text", "from_file"]


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults follow the paper (Lester et al., 2021)."""

    # --- where things are
    output_dir: str = "runs/softprompt"
    """Directory the run writes: config.yaml, metrics.jsonl, checkpoints, best/, last/, results.json."""
    model_name_or_path: str = "google/t5-base-lm-adapt"
    """Hub id or local directory of the T5 model (config.json + tokenizer, and safetensors weights unless --random_init)."""
    random_init: bool = False
    """Build the model from its config with random weights instead of loading weights (tests, benchmarks, offline smoke runs)."""
    train_file: str | None = None
    """Training data: SQuAD v1.1 JSON or MRQA .jsonl(.gz). Ignored when --dataset_name is given."""
    validation_file: str | None = None
    """Dev data for evaluation and checkpoint selection: SQuAD v1.1 JSON or MRQA .jsonl(.gz)."""
    dataset_name: str | None = None
    """A Hugging Face dataset with SQuAD columns (e.g. 'squad'), used instead of the files; needs the internet."""
    train_split: str = "train"
    """Split of --dataset_name to train on."""
    validation_split: str = "validation"
    """Split of --dataset_name to evaluate on."""

    # --- method
    prompt_tuning: bool = False
    """Freeze the model and train only a soft prompt (the paper's method). Without it, every weight is fine-tuned."""
    n_tokens: int = 100
    """P, the number of prompt vectors (the paper uses 100)."""
    prompt_init: Init = "sampled_vocab"
    """Prompt init: sampled_vocab (first 5,000 vocabulary rows, the paper's best), uniform ([-0.5, 0.5]), text, from_file."""
    prompt_init_text: str | None = None
    """The string whose token embeddings start the prompt, with --prompt_init text."""
    prompt_init_file: str | None = None
    """A prompt checkpoint directory to start from, with --prompt_init from_file."""
    pad_punctuation: bool = False
    """Put spaces around punctuation in inputs and targets, as T5's SQuAD preprocessor does."""
    max_source_length: int = 512
    """Input text tokens kept (only the context is truncated); the prompt's P positions come on top."""
    max_target_length: int = 32
    """Answer tokens kept for training, and the most tokens generated at evaluation."""

    # --- optimisation
    optimizer: Optimizer = "adafactor"
    """adafactor (T5X semantics, weight decay not scaled by lr), adafactor_hf (transformers' Adafactor), adamw (alias: adam)."""
    lr: float = 0.3
    """Learning rate, constant for Adafactor (0.3 for prompts in the paper; 5e-5 or 1e-3 for fine-tuning)."""
    weight_decay: float = 1e-5
    """Weight decay; our Adafactor applies p <- (1 - wd) p, unscaled by lr, as the paper's code did."""
    warmup_steps: int = 0
    """Linear warmup steps (adamw only; Adafactor runs at a constant lr)."""
    global_batch_size: int | None = None
    """Examples per optimizer step over all devices and accumulation steps (the paper: 32). Default: derived, else 32."""
    batch_size: int | None = None
    """Examples per device per forward pass. Default: global_batch_size / (devices x grad_accum_steps)."""
    grad_accum_steps: int | None = None
    """Forward passes accumulated per optimizer step. Default: global_batch_size / (devices x batch_size), else 1."""
    epochs: float | None = None
    """Train for this many passes over the training data (the seed used 40)."""
    max_steps: int | None = None
    """Train for this many optimizer steps; overrides --epochs. Default 30,000 (the paper) when neither is set."""
    seed: int = 42
    """Seeds the prompt init, data order, dropout and random model weights."""
    dropout: float | None = None
    """Override the model's dropout rate (T5 1.1 ships 0.1; 0 makes runs exactly comparable across device counts)."""
    max_train_samples: int | None = None
    """Use only the first N training examples."""
    bucket_by_length: bool = True
    """Group examples of similar length into batches (same examples per epoch, less padding)."""
    skip_bad_examples: bool = False
    """Skip malformed examples (counted in the log) instead of stopping at the first one."""
    skip_nonfinite: bool = False
    """Skip an optimizer step whose loss is NaN or inf (counted) instead of stopping the run."""

    # --- evaluation, logging, checkpoints
    eval_steps: int = 1000
    """Evaluate on the dev set every N optimizer steps (and at the end); 0 evaluates only at the end."""
    max_eval_samples: int | None = None
    """Evaluate on only the first N dev questions."""
    eval_batch_size: int = 64
    """Questions per device per generation batch."""
    save_steps: int = 1000
    """Write a resumable checkpoint every N optimizer steps (and at the end)."""
    save_total_limit: int = 2
    """Keep this many recent resumable checkpoints (best/ is kept separately)."""
    logging_steps: int = 50
    """Log train loss, lr and examples/s every N optimizer steps."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where to log besides metrics.jsonl: tensorboard, wandb, none."""

    # --- hardware
    precision: Precision = "fp32"
    """fp32, or bf16 autocast (the prompt, master weights and optimizer state stay fp32)."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
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
    """Continue the run in --output_dir from its last checkpoint (same config)."""
    overwrite_output_dir: bool = False
    """Start afresh even if --output_dir already holds a run (its checkpoints are replaced)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation).replace("typing.", "")


def config_from_dict(values: dict[str, Any], source: str, cls: type = TrainConfig) -> Any:
    """Build a config from a mapping, listing every unknown key and wrong type at once.

    Args:
        values: key -> value, as read from YAML.
        source: where the values came from, for the error message.
        cls: the dataclass to build.
    """
    kwargs, problems = split_config_values(values, cls)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return cls(**kwargs)


def _short_repr(value: Any) -> str:
    # A config value may be anything a user pasted; an error message quotes only its start.
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def split_config_values(values: dict[str, Any], cls: type = TrainConfig) -> tuple[dict[str, Any], list[str]]:
    """Separate the usable values of a mapping from the bad ones, so every problem can be listed at once.

    Returns:
        The known, well-typed values (integers widened to floats where a number is expected), and one
        problem phrase per unknown key or wrongly typed value.
    """
    hints = typing.get_type_hints(cls)
    good: dict[str, Any] = {}
    problems = []
    for key, value in values.items():
        if key not in hints:
            problems.append(f"unknown key '{key}'")
        elif not _type_ok(value, hints[key]):
            problems.append(f"'{key}' must be {_describe(hints[key])}, got {_short_repr(value)}")
        elif hints[key] is float or (float in typing.get_args(hints[key]) and isinstance(value, int)):
            good[key] = float(value) if value is not None else None
        else:
            good[key] = value
    return good, problems


def _flag_value(args: list[str], annotation: Any, flag: str) -> tuple[Any, str | None]:
    """Convert a flag's value words like the CLI parser does; returns (value, problem or None)."""
    options = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else ()
    )
    if type(None) in options:
        if args == ["None"]:
            return None, None
        (annotation,) = [a for a in options if a is not type(None)] or [annotation]
    if typing.get_origin(annotation) is list:
        return list(args), None
    if len(args) != 1:
        return None, f"{flag} takes one value, got {len(args)}"
    word = args[0]
    if typing.get_origin(annotation) is Literal:
        if word in typing.get_args(annotation):
            return word, None
        return None, f"{flag} must be {_describe(annotation)}, got {_short_repr(word)}"
    for kind in (int, float):
        if annotation is kind:
            try:
                return kind(word), None
            except ValueError:
                return None, f"{flag} must be {_describe(kind)}, got {_short_repr(word)}"
    return word, None


def scan_flags(argv: list[str], cls: type = TrainConfig) -> tuple[dict[str, Any], list[str]]:
    """Read `--name value` flags as the CLI parser will, but list every bad flag instead of the first.

    Only what is certainly wrong is reported (unknown flags, values of the wrong type, choices not
    offered, a value given to a switch); anything subtler is left to the parser itself.

    Returns:
        The values that could be read, by field name, and one problem phrase per bad flag.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    problems: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if not word.startswith("--"):
            problems.append(f"unexpected argument {_short_repr(word)}")
            continue
        name, has_value, inline = word[2:].partition("=")
        args = [inline] if has_value else []
        while i < len(argv) and not argv[i].startswith("--"):
            args.append(argv[i])
            i += 1
        key = name.replace("-", "_")
        negated = key.startswith("no_") and hints.get(key[3:]) is bool
        key = key[3:] if negated else key
        if key not in hints:
            problems.append(f"unknown flag --{name}")
        elif hints[key] is bool:
            if args:
                problems.append(f"--{name} is a switch and takes no value, got {_short_repr(' '.join(args))}")
            else:
                values[key] = not negated
        else:
            value, problem = _flag_value(args, hints[key], f"--{name}")
            if problem is None:
                values[key] = value
            else:
                problems.append(problem)
    return values, problems


def load_yaml_config(path: str | os.PathLike, cls: type = TrainConfig) -> Any:
    """Read a YAML config file into `cls`, with one clear error for any problem."""
    return config_from_dict(read_yaml_mapping(path), str(path), cls)


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file's mapping of keys to values, with one clear error if it is not one."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path} is not valid YAML{at}; fix the syntax") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not a {type(raw).__name__}")
    return raw


def save_yaml_config(cfg: Any, path: str | os.PathLike, header: str = "") -> None:
    """Write the fully resolved config (what `--config` reads back)."""
    from softprompt.checkpoint import atomic_write_text

    atomic_write_text(path, header + yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


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
    problems = []
    for name, v in (("global_batch_size", g), ("batch_size", b), ("grad_accum_steps", a)):
        if v is not None and v < 1:
            problems.append(f"{name} must be >= 1, got {v}")
    if problems:
        return None, problems
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


def check_config(cfg: TrainConfig, world_size: int = 1) -> tuple[BatchPlan | None, list[str]]:
    """Every problem `validate` would refuse, without raising: the batch plan (None if impossible) and them."""
    problems: list[str] = []
    if cfg.dataset_name is None and cfg.train_file is None:
        problems.append("give --train_file (SQuAD JSON or MRQA jsonl) or --dataset_name")
    for name in ("train_file", "validation_file", "prompt_init_file"):
        value = getattr(cfg, name)
        if value is not None and cfg.dataset_name is None and not Path(value).exists():
            problems.append(f"--{name} {value} does not exist")
    if cfg.prompt_tuning:
        if cfg.prompt_init == "text" and not cfg.prompt_init_text:
            problems.append("--prompt_init text needs --prompt_init_text")
        if cfg.prompt_init == "from_file" and not cfg.prompt_init_file:
            problems.append("--prompt_init from_file needs --prompt_init_file")
        if cfg.n_tokens < 1:
            problems.append(f"--n_tokens must be >= 1, got {cfg.n_tokens}")
    elif cfg.prompt_init_file or cfg.prompt_init_text:
        problems.append(
            "--prompt_init_file/--prompt_init_text need --prompt_tuning (fine-tuning uses no prompt)"
        )
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):  # NaN fails every comparison
        problems.append(f"--lr must be > 0 and finite, got {cfg.lr}")
    if cfg.weight_decay < 0 or cfg.weight_decay >= 1:
        problems.append(f"--weight_decay must be in [0, 1), got {cfg.weight_decay}")
    if cfg.epochs is not None and cfg.epochs <= 0:
        problems.append(f"--epochs must be > 0, got {cfg.epochs}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        problems.append(f"--max_steps must be >= 1, got {cfg.max_steps}")
    for name in ("eval_steps", "save_steps", "logging_steps"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name} must be >= 0")
    for name in ("max_source_length", "max_target_length", "eval_batch_size", "save_total_limit"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name} must be >= 1")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            problems.append(f"--{name} must be >= 1")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        problems.append(f"--dropout must be in [0, 1), got {cfg.dropout}")
    bad_report = sorted(set(cfg.report_to) - {"tensorboard", "wandb", "none"})
    if bad_report:
        problems.append(f"--report_to takes tensorboard, wandb or none, not {', '.join(bad_report)}")
    if cfg.resume and cfg.overwrite_output_dir:
        problems.append("--resume and --overwrite_output_dir contradict each other; pick one")
    out = Path(cfg.output_dir)
    if not cfg.resume and not cfg.overwrite_output_dir and (out / "config.yaml").exists():
        problems.append(
            f"{out} already holds a run; pass --resume to continue it or --overwrite_output_dir to start again"
        )
    no_run = not (out / "last").exists() and not (out / "config.yaml").exists()
    # With its data named, a run killed before it wrote its config simply starts from the beginning,
    # so a job script can pass --resume every time; `--output_dir DIR --resume` alone needs a run.
    if cfg.resume and no_run and cfg.train_file is None and cfg.dataset_name is None:
        problems.append(f"--resume: {out} holds no run to resume")
    plan, batch_problems = resolve_batch(cfg, world_size)
    problems += batch_problems
    return plan, problems
