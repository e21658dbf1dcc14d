"""The training run's configuration: `TrainConfig`, its mode defaults, and the checks before a run starts.

`TrainConfig` is one dataclass whose field docstrings are also the `--help` text; `softprompt train`
reads it with `softprompt.config.parser.parse` (config file, then flags). Here are also what depends
on training: the batch split over devices, Adafactor's starting step, every combination `validate`
refuses before anything loads, and what `--resume` may change against a run's saved config.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro
import yaml

from softprompt.config.choices import (
    AttentionName,
    InitName,
    OptimizerName,
    PunctuationName,
    ReportToName,
)
from softprompt.config.fields import (
    Bound,
    Count,
    DataFile,
    InputPath,
    Model,
    NonNegative,
    OutputDir,
    check_numbers,
)
from softprompt.config.groups import GenerationFlags, ModelFlags, TaskFlags
from softprompt.config.parser import read_config_file
from softprompt.errors import ConfigError
from softprompt.io.rundir import CONFIG_FILE, LAST


@dataclass(kw_only=True)
class _TrainFlags:
    """train's own flags; `TrainConfig` adds the shared groups after them."""

    # --- where things are
    output_dir: OutputDir = "runs/softprompt"
    """Directory the run writes: config.yaml, metrics.jsonl, checkpoints, best/, last/, results.json."""
    model_name_or_path: Model = "google/t5-base-lm-adapt"
    """Hub id or local directory of the T5 model (config.json + tokenizer, and safetensors weights unless --random_init). Alias: --model_name_or_path."""
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
    n_tokens: Annotated[Count | None, tyro.conf.arg(aliases=("--prompt_length",))] = None
    """P, the number of prompt vectors (default 100, as the paper; with --prompt_init from_file, the file's prompt's length). Alias: --prompt_length."""
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

    # --- optimisation
    optimizer: OptimizerName = "adafactor"
    """adafactor (T5X semantics, weight decay not scaled by lr), adafactor_hf (transformers' Adafactor), adamw (alias: adam)."""
    lr: Annotated[Annotated[float, Bound(above=0)] | None, tyro.conf.arg(aliases=("--learning_rate",))] = None
    """Learning rate (alias: --learning_rate), constant for Adafactor. Default: 0.3 with --prompt_tuning (the paper), 5e-5 for full fine-tuning (the paper's best baseline; 1e-3 also reported)."""
    weight_decay: Annotated[float, Bound(low=0, below=1)] = 1e-5
    """Weight decay; our Adafactor applies p <- (1 - wd) p, unscaled by lr, as the paper's code did."""
    initial_step: NonNegative | None = None
    """adafactor only: the step count of the starting checkpoint, which T5X's Adafactor continues (decay 1 - (N+k)^-0.8 at update k). Default: 1,100,000 for *-lm-adapt models, 1,000,000 for t5-v1_1 ones (their released steps), else 0."""
    warmup_steps: NonNegative = 0
    """Linear warmup steps (adamw only; Adafactor runs at a constant lr)."""
    global_batch_size: Count | None = None
    """Examples per optimizer step over all devices and accumulation steps (the paper: 32). Default: derived, else 32."""
    batch_size: Annotated[Count | None, tyro.conf.arg(aliases=("--per_device_train_batch_size",))] = None
    """Examples per device per forward pass (alias: --per_device_train_batch_size). Default: global_batch_size / (devices x grad_accum_steps)."""
    grad_accum_steps: Annotated[Count | None, tyro.conf.arg(aliases=("--gradient_accumulation_steps",))] = (
        None
    )
    """Forward passes accumulated per optimizer step (alias: --gradient_accumulation_steps). Default: global_batch_size / (devices x batch_size), else 1."""
    epochs: Annotated[
        Annotated[float, Bound(above=0)] | None, tyro.conf.arg(aliases=("--num_train_epochs",))
    ] = None
    """Train for this many passes over the training data (the seed used 40). Alias: --num_train_epochs."""
    max_steps: Count | None = None
    """Train for this many optimizer steps; overrides --epochs. Default 30,000 (the paper) when neither is set."""
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
    eval_batch_size: Annotated[Count, tyro.conf.arg(aliases=("--per_device_eval_batch_size",))] = 64
    """Questions per device per generation batch. Alias: --per_device_eval_batch_size."""
    save_steps: NonNegative = 1000
    """Write a resumable checkpoint every N optimizer steps (and at the end)."""
    save_total_limit: Count = 2
    """Keep this many recent resumable checkpoints (best/ is kept separately)."""
    logging_steps: NonNegative = 50
    """Log train loss, lr and examples/s every N optimizer steps."""
    report_to: list[ReportToName] = field(default_factory=lambda: ["tensorboard"])
    """Where to log besides metrics.jsonl: tensorboard, wandb, none."""

    # --- hardware
    attn_implementation: AttentionName = "sdpa"
    """Attention kernel: PyTorch SDPA (T5's position bias as an additive mask) or transformers' eager code."""
    fsdp: bool = False
    """Shard the model with FSDP2 (fully_shard) across devices: for models that do not fit one device. With several prompts (--num_prompts, prompts:) every prompt is sharded by rows alike and best/<name>/ holds it gathered."""
    compile: bool = False
    """torch.compile the training step: a frozen model's lean forward and backward (on a GPU as CUDA graphs, one per length bucket: batches padded to 64 source / 8 target positions), else the whole model. Each new shape compiles first (minutes on a CPU), so it pays back in long GPU runs."""
    bf16_weights: bool = True
    """With --precision bf16 in prompt mode (not FSDP), store the frozen matmul weights in bf16 once (the numbers autocast computes, half the weight memory); off = fp32 weights cast by autocast every step."""
    resume: bool = False
    """Continue the run in --output_dir from its last checkpoint with its saved config; only the settings in RESUMABLE (max_steps, epochs, eval/save/logging steps, report_to, ...) may change."""
    overwrite_output_dir: bool = False
    """Start afresh even if --output_dir already holds a run (its checkpoints are replaced)."""

    # --- many prompts in one run (softprompt.training.prompts)
    num_prompts: Count | None = None
    """Train this many prompts of the one task in one run on one frozen model, prompt i from seed + i (the paper's ensemble); each gets best/promptI/. Not with a config file's prompts: list."""
    prompts: Annotated[list[dict[str, Any]], tyro.conf.Suppress] = field(default_factory=list)
    """Config file only: a list of prompts trained together, each a mapping with its name and what differs (task, data files, template, labels, init, n_tokens, seed, lr)."""


@dataclass(kw_only=True)
class TrainConfig(TaskFlags, GenerationFlags, ModelFlags, _TrainFlags):
    """Everything a training run needs. Defaults follow the paper (Lester et al., 2021). --config FILE
    (YAML or JSON, e.g. configs/prompt_base_adafactor_lr0.3.yaml) sets any of these flags; the flags given
    override it, and an empty value ("") unsets an optional one."""

    def to_dict(self) -> dict[str, Any]:
        """The config as plain values by field name (what config.yaml holds)."""
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
N_TOKENS = 100
"""P when neither --n_tokens nor a starting prompt says (the paper's 100)."""


def _starts_from_file(cfg: TrainConfig) -> bool:
    return bool(cfg.prompt_tuning and cfg.prompt_init == "from_file" and cfg.prompt_init_file)


def prompt_length(cfg: TrainConfig) -> int:
    """P: --n_tokens, else the starting prompt's own length (--prompt_init from_file), else 100.

    Raises:
        CheckpointError: The starting prompt's config cannot be read.
    """
    if cfg.n_tokens is not None:
        return cfg.n_tokens
    if _starts_from_file(cfg):
        # Deferred: the checkpoint module imports torch, and `softprompt train --help` reads this module.
        from softprompt.io.checkpoint import load_prompt_config

        return load_prompt_config(str(cfg.prompt_init_file)).n_tokens
    return N_TOKENS


def with_mode_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the settings whose default depends on the mode: lr is 0.3 for a prompt, 5e-5 for all weights;
    P is the starting prompt's length under --prompt_init from_file, else 100."""
    changes: dict[str, Any] = {}
    if cfg.lr is None:
        changes["lr"] = PROMPT_TUNING_LR if cfg.prompt_tuning else FINE_TUNING_LR
    if cfg.n_tokens is None:
        changes["n_tokens"] = prompt_length(cfg)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _length_problems(cfg: TrainConfig) -> tuple[int, list[str]]:
    """P as the run will have it, and the problem of an --n_tokens that the starting prompt contradicts."""
    if not (_starts_from_file(cfg) and Path(str(cfg.prompt_init_file)).exists()):
        return cfg.n_tokens or N_TOKENS, []
    from softprompt.errors import UserError

    try:
        from_file = prompt_length(dataclasses.replace(cfg, n_tokens=None))
    except UserError as err:
        return cfg.n_tokens or N_TOKENS, [str(err)]
    if cfg.n_tokens is not None and cfg.n_tokens != from_file:
        return cfg.n_tokens, [
            f"--n_tokens {cfg.n_tokens}, but the --prompt_init_file prompt {cfg.prompt_init_file} has "
            f"{from_file} tokens; drop --n_tokens to take the file's length"
        ]
    return from_file, []


def load_yaml_config(path: str | os.PathLike, cls: type = TrainConfig) -> Any:
    """Read a YAML config file into `cls`, listing every unknown key and wrong value at once."""
    values, problems = read_config_file(path, cls)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return cls(**values)


def save_yaml_config(cfg: Any, path: str | os.PathLike, header: str = "") -> None:
    """Write the fully resolved config (what `--config` reads back)."""
    # Deferred: the checkpoint module imports torch, and `softprompt train --help` loads this one.
    from softprompt.io.atomic import atomic_write_text

    atomic_write_text(path, header + yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


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
    task_labels: list[str] = []  # the task's label strings, and whether it names its own data set
    has_own_data = False
    try:
        # deferred: reads YAML presets, imports the data stack
        from softprompt.tasks.resolve import resolve_task

        task = resolve_task(cfg, punctuation=cfg.punctuation)
        task_labels, has_own_data = list(task.classes), task.has_own_dataset
    except ConfigError as err:
        problems.append(str(err))
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
        n_tokens, length_problems = _length_problems(cfg)
        problems += length_problems
        if cfg.prompt_init == "text" and not cfg.prompt_init_text:
            problems.append("--prompt_init text needs --prompt_init_text")
        if cfg.prompt_init == "from_file" and not cfg.prompt_init_file:
            problems.append("--prompt_init from_file needs --prompt_init_file")
        if cfg.prompt_init == "class_label" and not cfg.prompt_init_labels and not task_labels:
            problems.append(
                "--prompt_init class_label needs --prompt_init_labels (e.g. --prompt_init_labels yes no) "
                "or a classification --task"
            )
        if cfg.prompt_init == "class_label" and not cfg.prompt_init_labels and len(task_labels) > n_tokens:
            problems.append(f"the task's {len(task_labels)} labels do not fit in --n_tokens {n_tokens}")
        if cfg.prompt_init_labels and cfg.prompt_init != "class_label":
            problems.append("--prompt_init_labels only applies to --prompt_init class_label")
        if len(cfg.prompt_init_labels) > n_tokens:
            problems.append(
                f"{len(cfg.prompt_init_labels)} --prompt_init_labels do not fit in --n_tokens {n_tokens}"
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
