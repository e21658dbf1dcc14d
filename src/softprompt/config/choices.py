"""Every choice list of the command line and the config, defined once.

Each is a str Enum (what the code compares against) and a `Literal` of its values (what the parser
offers and `--help` lists), so the flag parser, config validation and the code that acts on a choice
never disagree. Kept free of heavy imports: `softprompt COMMAND --help` loads this module.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal


def values(choice: type[Enum]) -> tuple[str, ...]:
    """The spellings a user may write for an Enum of choices."""
    return tuple(m.value for m in choice)


def literal(choice: type[Enum]) -> Any:
    """`Literal[...]` of an Enum's values, for a dataclass field the parser reads."""
    return Literal[values(choice)]  # type: ignore[valid-type]


class PromptInit(str, Enum):
    """How the prompt vectors start."""

    SAMPLED_VOCAB = "sampled_vocab"
    """Rows sampled without replacement from the first 5,000 rows of the embedding table (the paper's best)."""
    UNIFORM = "uniform"
    """Uniform in [0, 0.5): the official config's default, flax.linen.initializers.uniform(scale=0.5)."""
    TEXT = "text"
    """Embeddings of the tokens of a given string, repeated until P vectors are filled."""
    FROM_FILE = "from_file"
    """A prompt saved earlier by softprompt."""
    CLASS_LABEL = "class_label"
    """Vector i starts as the embedding of class label i (the mean over its tokens), the rest as sampled_vocab
    (the paper's section 3.2)."""


class Punctuation(str, Enum):
    """How question, context and answer are written: which characters T5's ``_pad_punctuation`` pads."""

    PAPER = "paper"
    """T5 when the paper ran (commit f0b29894 and before): RE2 ``(\\W)``, every character that is not ASCII
    ``[0-9A-Za-z_]``, non-ASCII letters such as ``é`` included."""
    CURRENT = "current"
    """T5 since commit 9896475 (2022-04): RE2 ``([[:punct:]])``, ASCII punctuation only."""
    NONE = "none"
    """Raw text, ``question: {question} context: {context}`` and the answer as given (the seed replication)."""


class Optimizer(str, Enum):
    """The optimizers `--optimizer` offers (`adam` is an alias of `adamw`)."""

    ADAFACTOR = "adafactor"
    ADAFACTOR_HF = "adafactor_hf"
    ADAMW = "adamw"
    ADAM = "adam"


class ReportTo(str, Enum):
    """Where training logs besides metrics.jsonl."""

    TENSORBOARD = "tensorboard"
    WANDB = "wandb"
    NONE = "none"


class Precision(str, Enum):
    """Numeric precision of the forward pass."""

    AUTO = "auto"
    """bf16 where the hardware computes it natively (a GPU; a CPU with AVX512-BF16, AMX or Arm BF16), else fp32."""
    FP32 = "fp32"
    BF16 = "bf16"


class Attention(str, Enum):
    """Attention kernel."""

    SDPA = "sdpa"
    EAGER = "eager"


class Ensemble(str, Enum):
    """How `eval` combines several prompts."""

    NONE = "none"
    MAJORITY = "majority"


class ExportFormat(str, Enum):
    """The formats `softprompt export --to` writes a prompt in."""

    PEFT = "peft"
    """A PEFT prompt-tuning adapter (softprompt.io.peft_format)."""


class TaskMetric(str, Enum):
    """How a task's answers are scored (softprompt.tasks.metrics.text)."""

    SQUAD = "squad"
    """Official SQuAD v1.1 exact match and F1, max over the gold answers (QA tasks)."""
    EXACT_MATCH = "exact_match"
    """The share of answers equal to one of the targets after stripping surrounding whitespace."""
    ACCURACY = "accuracy"
    """The share of answers equal to the gold label string; answers that are no label count as wrong."""
    MACRO_F1 = "macro_f1"
    """Accuracy and the mean over classes of each class's F1 (T5's CB metrics)."""
    MULTIRC = "multirc"
    """F1 over all answer options (label True positive) and exact match per question (T5's MultiRC)."""
    RECORD = "record"
    """Max exact match and F1 over the gold entities, SQuAD-normalised (T5's ReCoRD)."""
    WSC = "wsc"
    """Accuracy of "the answer names the candidate referent" against the label (T5's wsc_simple)."""


class RankMode(str, Enum):
    """How a classification task's answer is chosen at evaluation."""

    GREEDY = "greedy"
    """Free greedy generation; an answer that is no label string counts as wrong."""
    RANK = "rank"
    """Rank classification: the label string with the highest summed log-likelihood."""


class Leaderboard(str, Enum):
    """The leaderboard file `softprompt predict --submission` writes from a test split's answers."""

    NONE = "none"
    """No leaderboard file: the answers as JSONL lines of {id, answer}."""
    SUPERGLUE = "superglue"
    """The SuperGLUE leaderboard's file for the task (RTE.jsonl, BoolQ.jsonl, ...): one line per test record,
    {idx, label} with the label as the leaderboard spells it."""


class Batching(str, Enum):
    """How `softprompt serve` batches generation requests."""

    CONTINUOUS = "continuous"
    """Rows join and leave the running batch at every decoder step (iteration-level scheduling)."""
    STATIC = "static"
    """A batch runs until its longest answer ends; requests arriving meanwhile wait for the next one."""


class LogLevel(str, Enum):
    """uvicorn's log levels."""

    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"


InitName = literal(PromptInit)
OptimizerName = literal(Optimizer)
ReportToName = literal(ReportTo)
PrecisionName = literal(Precision)
AttentionName = literal(Attention)
EnsembleName = literal(Ensemble)
LogLevelName = literal(LogLevel)
ExportFormatName = literal(ExportFormat)
PunctuationName = literal(Punctuation)
TaskMetricName = literal(TaskMetric)
RankModeName = literal(RankMode)
LeaderboardName = literal(Leaderboard)
BatchingName = literal(Batching)


#: What the old boolean ``pad_punctuation`` of saved configs and prompts means now. softprompt's old class
#: ``[^_\s\p{N}\p{L}\p{M}]`` matched neither T5 version; on the 2,067 SQuAD dev contexts it wrote the
#: paper's text for 1,811 and the current one's for 1,691 (it padded non-ASCII punctuation such as "–", as
#: ``paper`` does), so True reads as ``paper``, the nearer of the two.
LEGACY_PAD_PUNCTUATION: dict[bool, str] = {True: Punctuation.PAPER.value, False: Punctuation.NONE.value}
