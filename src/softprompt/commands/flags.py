"""Every subcommand's flags (but train's: `softprompt.training.config.TrainConfig`).

Every subcommand is a dataclass of flags (its field docstrings are the `--help` text); `softprompt.cli`
maps subcommand names to them. Each is the command's own fields followed by the groups it shares with
others (`softprompt.config.groups`), and all of them go through `softprompt.config.parser.parse`:
`--config FILE` (YAML or JSON) fills the dataclass, flags override it, and every problem is reported
together in one line. The same thing has the same flag everywhere (`--model`, `--output_dir` for
directories a command writes, `--output` for files, `--eval_batch_size`, `--max_target_length`), with
the other common spelling as an alias.

Imports nothing heavy, so `--help` answers at once; the modules that run a subcommand import it
(downwards) to parse their own `python -m` entry points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from softprompt.config.choices import (
    BatchingName,
    EnsembleName,
    ExportFormatName,
    LeaderboardName,
    LogLevelName,
    PunctuationName,
    RankModeName,
)
from softprompt.config.fields import (
    Count,
    DataFile,
    GenerationBatch,
    InputPath,
    Model,
    OutputDir,
    OutputFile,
)
from softprompt.config.groups import BaseModelFlags, GenerationFlags, ModelFlags, PromptTextFlags, TaskFlags

Repeated = tyro.conf.UseAppendAction


@dataclass(kw_only=True)
class _EvalFlags:
    """eval's own flags; `EvalArgs` adds the shared groups after them."""

    model_name_or_path: Model
    """Hub id or directory of the T5 model (a fine-tuned run's best/ directory works too). Alias: --model_name_or_path."""
    output: Annotated[OutputFile | None, tyro.conf.arg(aliases=("--out",))] = None
    """Write the predictions as JSON: {id: answer} for the bare model or one prompt; with several prompts
    {prompt name: {id: answer}} (plus "ensemble" with --ensemble majority); - for stdout. Not written when not given."""
    validation_file: DataFile | None = None
    """The data to evaluate on: SQuAD v1.1 JSON, MRQA .jsonl(.gz), a text task's JSONL/CSV/TSV, or hf:NAME."""
    dataset_name: str | None = None
    """A Hugging Face dataset instead of a file (needs the internet): SQuAD columns, or rows of the --task."""
    dataset_config: str | None = None
    """The configuration of --dataset_name (e.g. rte); default: the task preset's."""
    split: str = "validation"
    """Split of --dataset_name."""
    classify: RankModeName = "greedy"
    """Classification tasks: greedy (generate; an answer that is no label is wrong) or rank (the label with the highest log-likelihood)."""
    skip_bad_examples: bool = False
    """Skip malformed questions (counted in the report as skipped_examples) instead of stopping at the first one."""
    prompt: Annotated[list[str], Repeated] = field(default_factory=list)
    """Prompt checkpoint directory; repeat the flag for several prompts (scored each, and as an ensemble)."""
    ensemble: EnsembleName = "none"
    """With several prompts: also score their majority vote (ties go to the prompt with the best dev F1)."""
    max_eval_samples: Count | None = None
    """Evaluate on only the first N questions."""


@dataclass(kw_only=True)
class EvalArgs(TaskFlags, BaseModelFlags, PromptTextFlags, GenerationFlags, ModelFlags, _EvalFlags):
    """Score a model, with or without prompts, on a task's dev data (SQuAD-shaped QA unless --task or the prompt says otherwise)."""


@dataclass(kw_only=True)
class _PredictFlags:
    """predict's own flags; `PredictArgs` adds the shared groups after them."""

    model_name_or_path: Model
    """Hub id or directory of the T5 model. Alias: --model_name_or_path."""
    output: Annotated[OutputFile | None, tyro.conf.arg(aliases=("--out",))] = None
    """Write answers here as JSONL instead of printing them (- for stdout)."""
    prompt: InputPath | None = None
    """Prompt checkpoint directory."""
    question: str | None = None
    """The question (with --context; not with --input_file)."""
    context: str | None = None
    """The passage that holds the answer (with --question)."""
    fields: str | None = None
    """One example of a text task as a JSON object of its fields, e.g. '{"premise": "...", "hypothesis": "..."}'."""
    input_file: InputPath | None = None
    """A JSONL file of {"question", "context"} lines (an "id" is kept if present); for a text task (--task, or the prompt's own) JSONL/CSV/TSV rows with the template's fields."""
    classify: RankModeName = "greedy"
    """Classification tasks: greedy (generate) or rank (the label with the highest log-likelihood; no labels needed in the input, e.g. a test split)."""
    submission: LeaderboardName = "none"
    """With --input_file, a SuperGLUE test file: superglue writes the leaderboard's file for the task (RTE.jsonl, BoolQ.jsonl, ...; one {"idx", "label"} line per record, labels as the leaderboard spells them) to --output (a directory gets the file by that name), else to stdout. Label tasks need --classify rank."""


@dataclass(kw_only=True)
class PredictArgs(TaskFlags, BaseModelFlags, PromptTextFlags, GenerationFlags, ModelFlags, _PredictFlags):
    """Answer questions with a model and an optional prompt."""

    eval_batch_size: GenerationBatch = 32


def predict_checks(args: PredictArgs) -> list[str]:
    """The combinations of predict's inputs that cannot go together, one phrase each."""
    if args.input_file is not None and (args.question is not None or args.context is not None):
        return ["give either --question/--context or --input_file, not both"]
    if args.fields is not None and (args.input_file is not None or args.question is not None):
        return ["give --fields alone, not with --question/--context or --input_file"]
    if args.input_file is None and (args.question is None) != (args.context is None):
        return ["--question and --context go together"]
    if args.submission != "none" and args.input_file is None:
        return [
            f"--submission {args.submission} answers a test file: give --input_file (the official test JSONL)"
        ]
    return []


@dataclass
class ScoreArgs:
    """The official SQuAD v1.1 evaluator: prints {"exact_match": ..., "f1": ...}. Also reads MRQA .jsonl(.gz)."""

    dataset_file: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="DATASET_FILE")]
    """The gold answers: SQuAD v1.1 data JSON, or an MRQA .jsonl(.gz) file (as `eval` reads)."""
    prediction_file: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="PREDICTION_FILE")]
    """Predictions JSON: {question id: answer}."""
    only_predicted: bool = False
    """Score only the questions the predictions file answers (a partial file), instead of counting every other one as 0."""


@dataclass(kw_only=True)
class _FormatFlags:
    """format's own flags; `FormatArgs` adds the task's flags after them."""

    output: OutputFile
    """The .jsonl file to write, one question a line; - writes to stdout."""
    data: Annotated[tyro.conf.Positional[str | None], tyro.conf.arg(metavar="DATA")] = None
    """SQuAD v1.1 JSON, MRQA .jsonl(.gz), or hf:NAME (or give --dataset_name instead)."""
    punctuation: PunctuationName = "paper"
    """paper (T5's squad preprocessor as the paper ran it), current (T5 since 2022-04), none (raw text)."""
    dataset_name: str | None = None
    """A Hugging Face dataset instead of DATA (needs the internet): SQuAD columns, or rows of the --task."""
    dataset_config: str | None = None
    """The configuration of --dataset_name (e.g. rte); default: the task preset's."""
    split: str = "validation"
    """Split of --dataset_name or hf:NAME."""
    skip_bad_examples: bool = False
    """Skip malformed questions (counted) instead of stopping at the first one."""
    max_samples: Count | None = None
    """Write only the first N questions."""


@dataclass(kw_only=True)
class FormatArgs(TaskFlags, _FormatFlags):
    """Write {id, inputs, targets} per example: the exact text the model is trained and evaluated on."""


def format_checks(args: FormatArgs) -> list[str]:
    """A phrase when format has no data to read, else nothing."""
    if not args.data and not args.dataset_name and not args.task:
        return ["give the data to format: a SQuAD JSON or MRQA jsonl file, hf:NAME, or --dataset_name"]
    return []


@dataclass
class ConvertArgs:
    """Write a model as a Hugging Face directory with safetensors weights and its tokenizer."""

    model: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="MODEL")]
    """Hub id (e.g. google/t5-v1_1-base; the Hub cache under HF_HUB_OFFLINE=1) or directory of the T5 model."""
    out_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="OUT_DIR")]
    """The directory to write (written to a temporary sibling, then renamed into place)."""
    overwrite: bool = False
    """Replace OUT_DIR if it already exists."""


@dataclass
class ExportArgs:
    """Write a prompt in another library's format: --to peft, a PEFT prompt-tuning adapter
    (adapter_config.json + adapter_model.safetensors) for PeftModel.from_pretrained(base_model, OUTPUT_DIR)."""

    prompt_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="PROMPT_DIR")]
    """Prompt checkpoint directory (or a PEFT adapter, to re-export it)."""
    output_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="OUTPUT_DIR")]
    """The directory to write (written to a temporary sibling, then renamed into place)."""
    to: ExportFormatName = "peft"
    """The format to write: peft (a seq2seq prompt-tuning adapter; the prompt goes to the encoder only)."""
    overwrite: bool = False
    """Replace OUTPUT_DIR if it already exists."""


@dataclass(kw_only=True)
class _ServeFlags:
    """serve's own flags; `ServeArgs` adds the shared groups after them."""

    model: Annotated[str, tyro.conf.arg(aliases=("--model_name_or_path",))]
    """Hub id or directory of the frozen T5 model the prompts were trained on. Alias: --model_name_or_path."""
    prompt: Annotated[list[str], Repeated] = field(default_factory=list)
    """A prompt as NAME=DIR (DIR alone is named after the task it recorded, else its run); repeat for several tasks."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 exposes the server to the network)."""
    port: int = 8000
    """TCP port in [0, 65535]; 0 picks a free one (printed at startup)."""
    max_batch_size: Annotated[int, tyro.conf.arg(aliases=("--eval_batch_size",))] = 32
    """Most questions merged into one model batch. Alias: --eval_batch_size."""
    max_wait_ms: float = 5.0
    """Longest a batch's first request waits for others on their way (a lone request does not wait)."""
    max_queue: int = 1024
    """Most requests waiting for the model; more are answered 503 with Retry-After at once (bounds memory)."""
    batching: BatchingName = "continuous"
    """continuous: requests join and leave the running batch at every decoder step (on a 2-core CPU with SQuAD's answer
    lengths 1.31x static's requests/s at 32 clients, see docs/performance.md); static: a batch runs until its longest
    answer ends. A model off the lean T5 path, and --classify rank, always run static."""
    max_batch_tokens: Count = 65536
    """Continuous batching: most encoder positions decoding at once (rows x longest input, prompt included);
    bounds the cross-attention caches' memory."""
    max_context_chars: Count = 20000
    """Longest context accepted, in characters (longer ones get 413)."""
    max_question_chars: Count = 2000
    """Longest question accepted, in characters."""
    max_inputs: Count = 256
    """Most questions in one request."""
    classify: RankModeName = "greedy"
    """rank: each prompt whose task has label strings as targets answers with its likeliest label (rank
    classification); the others (QA) still generate. greedy: every prompt generates."""
    log_level: LogLevelName = "info"
    """uvicorn's log level."""
    access_log: bool = False
    """Log every request."""
    read_timeout: float = 10.0
    """Seconds a client has to send a whole request (headers and body) from its first byte; slower connections are closed."""
    max_connections: Count = 1000
    """Most open connections; more are closed at once (kept below the open-file limit, ulimit -n, too)."""
    prompt_root: InputPath | None = None
    """Directory that POST /v1/prompts may load prompts from (paths resolve only inside it); without it, loading and unloading at run time answer 404."""
    max_resident_prompts: Count | None = None
    """Most prompts in memory at once; the least recently used is evicted and read again from disk when asked for (default: no bound)."""


@dataclass(kw_only=True)
class ServeArgs(BaseModelFlags, GenerationFlags, ModelFlags, _ServeFlags):
    """Serve many soft prompts on one frozen T5 over HTTP, micro-batching concurrent requests."""


def serve_checks(args: ServeArgs) -> list[str]:
    """serve's out-of-range port, batch and queue settings, one phrase each."""
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch_size < 1:
        problems.append(f"--max_batch_size must be >= 1, got {args.max_batch_size}")
    if not args.max_wait_ms >= 0:
        problems.append(f"--max_wait_ms must be >= 0, got {args.max_wait_ms}")
    if args.max_queue < 1:
        problems.append(f"--max_queue must be >= 1, got {args.max_queue}")
    if args.max_batch_tokens < 1:
        problems.append(f"--max_batch_tokens must be >= 1, got {args.max_batch_tokens}")
    if not args.read_timeout > 0:
        problems.append(f"--read_timeout must be > 0 seconds, got {args.read_timeout}")
    if args.prompt_root is not None and not Path(args.prompt_root).is_dir():
        problems.append(f"--prompt_root {args.prompt_root} is not a directory; create it or name another")
    return problems


@dataclass(kw_only=True)
class _InspectFlags:
    """inspect's own flags; `InspectArgs` adds the shared groups after them."""

    prompt_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="PROMPT_DIR")]
    """Prompt checkpoint directory (prompt.safetensors + prompt_config.json)."""
    model: Annotated[str | None, tyro.conf.arg(aliases=("--model_name_or_path",))] = None
    """Hub id or directory of the model whose vocabulary to search; default: the prompt's base_model."""
    top_k: Count = 5
    """Tokens shown per prompt position."""
    output: Annotated[OutputFile | None, tyro.conf.arg(aliases=("--json",))] = None
    """Also write the inspection as JSON to this file. Alias: --json."""


@dataclass(kw_only=True)
class InspectArgs(BaseModelFlags, ModelFlags, _InspectFlags):
    """Nearest vocabulary tokens (cosine similarity) and L2 norm of each vector of a soft prompt."""


@dataclass
class ReportArgs:
    """Learning curves (PNG + SVG) and Markdown tables comparing training runs."""

    run_dirs: Annotated[tyro.conf.Positional[list[str]], tyro.conf.arg(metavar="RUN_DIR [RUN_DIR ...]")]
    """Run directories written by `softprompt train` (each with results.json, metrics.jsonl, config.yaml)."""
    output_dir: Annotated[OutputDir, tyro.conf.arg(aliases=("--out",))] = "report"
    """Directory to write report.md and the figures into. Alias: --out."""


@dataclass
class VerifyArgs:
    """Check every checkpoint of a run directory against its manifest (each file's size and sha256)."""

    run_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="RUN_DIR")]
    """A run directory written by `softprompt train`."""
    output: Annotated[OutputFile | None, tyro.conf.arg(aliases=("--json",))] = None
    """Also write the verdicts as JSON to this file. Alias: --json."""


@dataclass
class DemoArgs:
    """An offline end-to-end demo: fine-tune a micro T5 on task A, then freeze it and prompt-tune it for
    task B; prints zero-shot, prompt-tuned and fine-tuned scores."""

    output_dir: OutputDir = "demo_run"
    """Where the runs and summary go."""
    seed: int = 0
    """Seeds the data, the weights and training."""
    quick: bool = False
    """A smaller, faster variant (used by the tests)."""
    threads: Count = 1
    """CPU threads for torch (the micro model is too small to gain from more, and on a busy machine extra
    threads cost far more than they give)."""
