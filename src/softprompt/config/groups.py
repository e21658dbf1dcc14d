"""Flag groups that several subcommands share, each field and its `--help` text written once.

A subcommand's flags are one dataclass built from its own fields and the groups it takes, e.g.
`class ServeArgs(BaseModelFlags, GenerationFlags, ModelFlags, _ServeFlags)`. A dataclass lists its bases'
fields from the last base to the first, so the command's own fields (output and model among them)
come first in `--help`, then the groups. Every class is keyword-only, so a command may give a group's
field another default by naming it again (`eval_batch_size: GenerationBatch = 32`); the `--help`
text is still the group's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from softprompt.config.choices import PrecisionName, PunctuationName, TaskMetricName
from softprompt.config.fields import AnswerTokens, Count, GenerationBatch


@dataclass(kw_only=True)
class ModelFlags:
    """How the model is built when there are no weights to load: train, eval, predict, serve, inspect."""

    random_init: bool = False
    """Build the model from its config with random weights instead of loading weights (tests, benchmarks, offline smoke runs)."""
    seed: int = 42
    """Seeds the random weights of --random_init; train's also seeds the prompt init, data order and dropout."""


@dataclass(kw_only=True)
class GenerationFlags:
    """How the model runs and how long its answers get: train, eval, predict, serve."""

    max_target_length: AnswerTokens = 32
    """Longest answer in tokens: train keeps this much of each target, and generation stops there. Alias: --max_new_tokens."""
    precision: PrecisionName = "auto"
    """auto (bf16 where the GPU or CPU computes bf16 natively, else fp32; the start line says which and why), fp32, or bf16 autocast (in train the prompt, master weights and optimizer state stay fp32)."""
    fast_path: bool = True
    """Use softprompt's lean T5 kernels for frozen models on CPU/CUDA; off = transformers' modules (the same results up to float rounding, slower)."""


@dataclass(kw_only=True)
class PromptTextFlags:
    """How eval and predict write a prompt's input text: the prompt's own settings unless given."""

    eval_batch_size: GenerationBatch = 64
    """Questions per generation batch. Alias: --batch_size."""
    max_source_length: Count | None = None
    """Input text tokens kept; default: the prompt's own setting, else 512."""
    punctuation: PunctuationName | None = None
    """Input text format: paper (T5's squad preprocessor as the paper ran it), current (T5 since 2022-04),
    none (raw text); default: the prompt's own setting, else none."""


@dataclass(kw_only=True)
class BaseModelFlags:
    """Whether a prompt may meet a model it was not trained on: eval, predict, serve, inspect."""

    allow_other_base_model: bool = False
    """Use prompts trained for another base model anyway (a warning instead of an error)."""


@dataclass(kw_only=True)
class TaskFlags:
    """The task's flags, shared by train, eval, predict and format (softprompt.tasks.text.presets reads them)."""

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
