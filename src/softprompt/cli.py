"""The `softprompt` command: one entry point, one subcommand per job.

Every subcommand is a dataclass of flags (its field docstrings are the `--help` text) and one small
`cmd_*` function, listed in `COMMANDS`. All of them go through `parse`: `--config FILE` (YAML or
JSON) fills the dataclass, flags override it, `--flag value` and `--flag=value` both work, and every
problem (unknown flags with the closest valid spellings, unreadable values, numbers out of range) is
reported together in one line. The same thing has the same flag everywhere (`--model`, `--output_dir`
for directories a command writes, `--output` for files, `--eval_batch_size`, `--max_target_length`),
with the other common spelling as an alias.

This module imports nothing heavy, so `softprompt COMMAND --help` answers at once; each command
imports torch and transformers only after its flags parsed. User mistakes (`UserError`) end as one
line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import tyro

from softprompt import __version__
from softprompt.choices import EnsembleName, LogLevelName, PrecisionName, PunctuationName
from softprompt.config import (
    AnswerTokens,
    Count,
    DataFile,
    GenerationBatch,
    InputPath,
    Model,
    OutputDir,
    OutputFile,
    check_flags,
    check_numbers,
    expand_paths,
    field_specs,
    pop_config_flag,
    read_config_file,
)
from softprompt.errors import ConfigError, UserError

USAGE = f"""softprompt {__version__}: prompt tuning (Lester et al., 2021) and fine-tuning of T5 for question answering

usage: softprompt COMMAND [FLAGS]   (softprompt COMMAND --help for the flags)

commands:
  train     train a soft prompt (--prompt_tuning) or fine-tune the whole model
  eval      score a model (+ prompts, optionally an ensemble) on a data file: EM/F1 and predictions
  predict   answer --question/--context, or a JSONL file of {{question, context}} lines
  score     the official SQuAD v1.1 evaluator (also reads MRQA .jsonl): softprompt score DATA PREDICTIONS.json
  format    write the model's input/target text for each question: softprompt format DATA --output FILE.jsonl
  serve     an HTTP server answering for many prompts on one frozen model
  inspect   nearest vocabulary tokens of each prompt vector
  report    learning curves and tables comparing run directories
  verify    check every checkpoint of a run directory against its manifest: softprompt verify RUN_DIR
  demo      an offline end-to-end demo: fine-tune a micro T5, then prompt-tune it for a new task
  convert   write a model (Hub id or directory) as a safetensors Hugging Face directory: convert MODEL OUT_DIR

Every command takes --config FILE (YAML or JSON, keys = flag names); flags given with it override the file.
"""

Repeated = tyro.conf.UseAppendAction
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- parsing


def _refuse(prog: str, problems: list[str]) -> None:
    # The same exit as the parser's own refusals: one line, status 2.
    error = ConfigError("invalid configuration: " + "; ".join(problems))
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
        problems += flag_problems
        specs = field_specs(cls)
        given = {**values, **flag_values}
        problems += [
            f"--{specs[n].flag} is required" for n in required if not specs[n].positional and n not in given
        ]
        wanted = [n.upper() for n in required if specs[n].positional and n not in given]
        if len(words) < len(wanted):
            problems.append(f"give {' '.join(wanted)} (see {prog} --help)")
        if problems:
            # What did parse still gets its numbers and combinations checked: everything at once.
            partial = cls(**{**required, **values, **flag_values})
            problems += check_numbers(partial) + (checks(partial) if checks else [])
            _refuse(prog, list(dict.fromkeys(problems)))
    default = cls(**{**required, **values}) if values else None
    args = tyro.cli(cls, args=argv, prog=prog, default=default, use_underscores=True, description=cls.__doc__)
    args = expand_paths(args)
    problems = check_numbers(args) + (checks(args) if checks else [])
    if problems:
        # Well-formed flags whose values cannot work together: a UserError, reported by `main` in the
        # same one-line form, and returned as its exit status rather than raised.
        raise ConfigError("invalid configuration: " + "; ".join(dict.fromkeys(problems)))
    return args


def _quiet_transformers() -> None:
    # transformers' per-file progress bars would interleave with softprompt's own.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------- train


def _train_checks(cfg: Any) -> list[str]:
    from softprompt.config import check_config

    return check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))[1]


def cmd_train(argv: Sequence[str]) -> int:
    from softprompt.config import TrainConfig, config_values, read_yaml_mapping

    # First pass: where the run lives. A resume's settings come from its saved config, so the
    # combinations are checked once those are in (second pass).
    cfg = parse(TrainConfig, argv, "softprompt train", checks=lambda c: [] if c.resume else _train_checks(c))
    from softprompt.rundir import CONFIG_FILE

    saved_file = Path(cfg.output_dir) / CONFIG_FILE
    if cfg.resume:
        saved = None
        if saved_file.is_file():
            # A resumed run starts from its own saved settings; the config file and the flags given now
            # override them, and the trainer refuses the changes a resume cannot honour.
            saved, problems = config_values(read_yaml_mapping(saved_file), TrainConfig)
            if problems:
                raise ConfigError(f"{saved_file}: " + "; ".join(problems))
            saved.update(resume=True, overwrite_output_dir=False, output_dir=cfg.output_dir)
        cfg = parse(TrainConfig, argv, "softprompt train", defaults=saved, checks=_train_checks)
    _quiet_transformers()
    from softprompt.train import Preempted, train

    try:
        results = train(cfg)
    except Preempted as e:
        print(f"softprompt: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({k: results[k] for k in ("exact_match", "f1", "best_step", "steps", "train_seconds")}))
    return 0


# ---------------------------------------------------------------------------------------------- eval, predict, score


@dataclass
class EvalArgs:
    """Score a model, with or without prompts, on a QA data file."""

    model_name_or_path: Model
    """Hub id or directory of the T5 model (a fine-tuned run's best/ directory works too). Alias: --model_name_or_path."""
    validation_file: DataFile | None = None
    """SQuAD v1.1 JSON, MRQA .jsonl(.gz) or hf:NAME to evaluate on."""
    dataset_name: str | None = None
    """A Hugging Face dataset with SQuAD columns instead of a file (needs the internet)."""
    split: str = "validation"
    """Split of --dataset_name."""
    skip_bad_examples: bool = False
    """Skip malformed questions (counted in the report as skipped_examples) instead of stopping at the first one."""
    prompt: Annotated[list[str], Repeated] = field(default_factory=list)
    """Prompt checkpoint directory; repeat the flag for several prompts (scored each, and as an ensemble)."""
    ensemble: EnsembleName = "none"
    """With several prompts: also score their majority vote (ties go to the prompt with the best dev F1)."""
    random_init: bool = False
    """Build the model with random weights from its config (offline smoke tests)."""
    seed: int = 42
    """Seed for --random_init weights."""
    max_eval_samples: Count | None = None
    """Evaluate on only the first N questions."""
    eval_batch_size: GenerationBatch = 64
    """Questions per generation batch. Alias: --batch_size."""
    max_source_length: Count | None = None
    """Input text tokens kept; default: the prompt's own setting, else 512."""
    max_target_length: AnswerTokens = 32
    """Longest answer in tokens. Alias: --max_new_tokens."""
    punctuation: PunctuationName | None = None
    """Input text format: paper (T5's squad preprocessor as the paper ran it), current (T5 since 2022-04),
    none (raw text); default: the prompt's own setting, else none."""
    precision: PrecisionName = "fp32"
    """fp32 or bf16 autocast."""
    allow_other_base_model: bool = False
    """Use prompts trained for another base model anyway (a warning instead of an error)."""
    output: Annotated[OutputFile | None, tyro.conf.arg(aliases=("--out",))] = None
    """Write the predictions as JSON: {id: answer} for the bare model or one prompt; with several prompts
    {prompt name: {id: answer}} (plus "ensemble" with --ensemble majority). Not written when not given."""


@dataclass
class PredictArgs:
    """Answer questions with a model and an optional prompt."""

    model_name_or_path: Model
    """Hub id or directory of the T5 model. Alias: --model_name_or_path."""
    prompt: InputPath | None = None
    """Prompt checkpoint directory."""
    question: str | None = None
    """The question (with --context; not with --input_file)."""
    context: str | None = None
    """The passage that holds the answer (with --question)."""
    input_file: InputPath | None = None
    """A JSONL file of {"question", "context"} lines (an "id" is kept if present)."""
    output: Annotated[OutputFile | None, tyro.conf.arg(aliases=("--out",))] = None
    """Write answers here as JSONL instead of printing them."""
    random_init: bool = False
    """Build the model with random weights from its config (offline smoke tests)."""
    seed: int = 42
    """Seed for --random_init weights."""
    eval_batch_size: GenerationBatch = 32
    """Questions per generation batch. Alias: --batch_size."""
    max_source_length: Count | None = None
    """Input text tokens kept; default: the prompt's own setting, else 512."""
    max_target_length: AnswerTokens = 32
    """Longest answer in tokens. Alias: --max_new_tokens."""
    punctuation: PunctuationName | None = None
    """Input text format: paper (T5's squad preprocessor as the paper ran it), current (T5 since 2022-04),
    none (raw text); default: the prompt's own setting, else none."""
    precision: PrecisionName = "fp32"
    """fp32 or bf16 autocast."""
    allow_other_base_model: bool = False
    """Use a prompt trained for another base model anyway (a warning instead of an error)."""


def _predict_checks(args: PredictArgs) -> list[str]:
    if args.input_file is not None and (args.question is not None or args.context is not None):
        return ["give either --question/--context or --input_file, not both"]
    if args.input_file is None and (args.question is None) != (args.context is None):
        return ["--question and --context go together"]
    return []


@dataclass
class ScoreArgs:
    """The official SQuAD v1.1 evaluator: prints {"exact_match": ..., "f1": ...}. Also reads MRQA .jsonl(.gz)."""

    dataset_file: tyro.conf.Positional[str]
    """The gold answers: SQuAD v1.1 data JSON, or an MRQA .jsonl(.gz) file (as `eval` reads)."""
    prediction_file: tyro.conf.Positional[str]
    """Predictions JSON: {question id: answer}."""


def cmd_score(argv: Sequence[str]) -> int:
    from softprompt.metrics import evaluate_file

    args = parse(ScoreArgs, argv, "softprompt score")
    print(json.dumps(evaluate_file(args.dataset_file, args.prediction_file)))
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    args = parse(EvalArgs, argv, "softprompt eval")
    _quiet_transformers()
    from softprompt.inference import run_eval

    print(json.dumps(run_eval(args), indent=2))
    return 0


def cmd_predict(argv: Sequence[str]) -> int:
    args = parse(PredictArgs, argv, "softprompt predict", checks=_predict_checks)
    _quiet_transformers()
    from softprompt.inference import run_predict

    run_predict(args)
    return 0


# ---------------------------------------------------------------------------------------------- format


@dataclass
class FormatArgs:
    """Write {id, inputs, targets} per question: the exact text the model is trained and evaluated on."""

    output: OutputFile
    """The .jsonl file to write, one question a line."""
    data: Annotated[tyro.conf.Positional[str | None], tyro.conf.arg(metavar="DATA")] = None
    """SQuAD v1.1 JSON, MRQA .jsonl(.gz), or hf:NAME (or give --dataset_name instead)."""
    punctuation: PunctuationName = "paper"
    """paper (T5's squad preprocessor as the paper ran it), current (T5 since 2022-04), none (raw text)."""
    dataset_name: str | None = None
    """A Hugging Face dataset with SQuAD columns instead of DATA (needs the internet)."""
    split: str = "validation"
    """Split of --dataset_name or hf:NAME."""
    skip_bad_examples: bool = False
    """Skip malformed questions (counted) instead of stopping at the first one."""
    max_samples: Count | None = None
    """Write only the first N questions."""


def _format_checks(args: FormatArgs) -> list[str]:
    if not args.data and not args.dataset_name:
        return ["give the data to format: a SQuAD JSON or MRQA jsonl file, hf:NAME, or --dataset_name"]
    return []


def cmd_format(argv: Sequence[str]) -> int:
    args = parse(FormatArgs, argv, "softprompt format", checks=_format_checks)
    from softprompt.format_data import write_formatted

    n, skipped = write_formatted(
        args.data,
        args.output,
        punctuation=args.punctuation,
        dataset_name=args.dataset_name,
        split=args.split,
        skip_bad_examples=args.skip_bad_examples,
        max_samples=args.max_samples,
    )
    print(f"wrote {n:,} questions to {args.output}" + (f"; skipped {dict(skipped)}" if skipped else ""))
    return 0


# ---------------------------------------------------------------------------------------------- convert


@dataclass
class ConvertArgs:
    """Write a model as a Hugging Face directory with safetensors weights and its tokenizer."""

    model: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="MODEL")]
    """Hub id (e.g. google/t5-v1_1-base; the Hub cache under HF_HUB_OFFLINE=1) or directory of the T5 model."""
    out_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="OUT_DIR")]
    """The directory to write (written to a temporary sibling, then renamed into place)."""
    overwrite: bool = False
    """Replace OUT_DIR if it already exists."""


def cmd_convert(argv: Sequence[str]) -> int:
    args = parse(ConvertArgs, argv, "softprompt convert")
    _quiet_transformers()
    from softprompt.convert import convert

    print(f"wrote {convert(args.model, args.out_dir, overwrite=args.overwrite)}")
    return 0


# ---------------------------------------------------------------------------------------------- serve


@dataclass
class ServeArgs:
    """Serve many soft prompts on one frozen T5 over HTTP, micro-batching concurrent requests."""

    model: Annotated[str, tyro.conf.arg(aliases=("--model_name_or_path",))]
    """Hub id or directory of the frozen T5 model the prompts were trained on. Alias: --model_name_or_path."""
    prompt: Annotated[list[str], Repeated] = field(default_factory=list)
    """A prompt as NAME=DIR (DIR alone is named after the directory); repeat for several tasks."""
    random_init: bool = False
    """Build the model with random weights from its config (offline smoke tests)."""
    seed: int = 42
    """Seed for --random_init weights."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 exposes the server to the network)."""
    port: int = 8000
    """TCP port in [0, 65535]; 0 picks a free one (printed at startup)."""
    max_batch_size: Annotated[int, tyro.conf.arg(aliases=("--eval_batch_size",))] = 32
    """Most questions merged into one model batch. Alias: --eval_batch_size."""
    max_wait_ms: float = 5.0
    """How long a request waits for others to share its batch."""
    max_context_chars: Count = 20000
    """Longest context accepted, in characters (longer ones get 413)."""
    max_question_chars: Count = 2000
    """Longest question accepted, in characters."""
    max_inputs: Count = 256
    """Most questions in one request."""
    max_target_length: AnswerTokens = 32
    """Longest answer in tokens. Alias: --max_new_tokens."""
    precision: PrecisionName = "fp32"
    """fp32 or bf16 autocast."""
    allow_other_base_model: bool = False
    """Serve prompts trained for another base model anyway (a warning instead of an error)."""
    log_level: LogLevelName = "info"
    """uvicorn's log level."""
    access_log: bool = False
    """Log every request."""


def serve_checks(args: ServeArgs) -> list[str]:
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch_size < 1:
        problems.append(f"--max_batch_size must be >= 1, got {args.max_batch_size}")
    if not args.max_wait_ms >= 0:
        problems.append(f"--max_wait_ms must be >= 0, got {args.max_wait_ms}")
    return problems


def cmd_serve(argv: Sequence[str]) -> int:
    args = parse(ServeArgs, argv, "softprompt serve", checks=serve_checks)
    _quiet_transformers()
    from softprompt.serve import serve

    return serve(args)


# ---------------------------------------------------------------------------------------------- inspect


@dataclass
class InspectArgs:
    """Nearest vocabulary tokens (cosine similarity) and L2 norm of each vector of a soft prompt."""

    prompt_dir: tyro.conf.Positional[str]
    """Prompt checkpoint directory (prompt.safetensors + prompt_config.json)."""
    model: Annotated[str | None, tyro.conf.arg(aliases=("--model_name_or_path",))] = None
    """Hub id or directory of the model whose vocabulary to search; default: the prompt's base_model."""
    random_init: bool = False
    """Build the model with random weights from its config (offline smoke tests)."""
    seed: int = 42
    """Seed for --random_init weights."""
    top_k: Count = 5
    """Tokens shown per prompt position."""
    allow_other_base_model: bool = False
    """Inspect against another model's vocabulary anyway (a warning instead of an error)."""
    output: Annotated[OutputFile | None, tyro.conf.arg(aliases=("--json",))] = None
    """Also write the inspection as JSON to this file. Alias: --json."""


def cmd_inspect(argv: Sequence[str]) -> int:
    args = parse(InspectArgs, argv, "softprompt inspect")
    _quiet_transformers()
    from softprompt.inspect_prompt import inspect_prompt

    return inspect_prompt(args)


# ---------------------------------------------------------------------------------------------- report, demo


@dataclass
class ReportArgs:
    """Learning curves (PNG + SVG) and Markdown tables comparing training runs."""

    run_dirs: tyro.conf.Positional[list[str]]
    """Run directories written by `softprompt train` (each with results.json, metrics.jsonl, config.yaml)."""
    output_dir: Annotated[OutputDir, tyro.conf.arg(aliases=("--out",))] = "report"
    """Directory to write report.md and the figures into. Alias: --out."""


def cmd_report(argv: Sequence[str]) -> int:
    args = parse(ReportArgs, argv, "softprompt report")
    from softprompt.report import make_report

    path = make_report([Path(d) for d in args.run_dirs], Path(args.output_dir))
    print(f"wrote {path}")
    return 0


@dataclass
class VerifyArgs:
    """Check every checkpoint of a run directory against its manifest (each file's size and sha256)."""

    run_dir: tyro.conf.Positional[str]
    """A run directory written by `softprompt train`."""
    output: Annotated[OutputFile | None, tyro.conf.arg(aliases=("--json",))] = None
    """Also write the verdicts as JSON to this file. Alias: --json."""


def cmd_verify(argv: Sequence[str]) -> int:
    """Print one line per checkpoint (ok, unverified or damaged); exit 1 when any is damaged."""
    args = parse(VerifyArgs, argv, "softprompt verify")
    from softprompt import rundir

    out = Path(args.run_dir)
    rows = rundir.verify_run(out)
    print(rundir.verify_table(out, rows))
    if args.output:
        from softprompt.checkpoint import atomic_write_json

        atomic_write_json(args.output, {name: {"status": v.status, "detail": v.detail} for name, v in rows})
    damaged = [name for name, v in rows if not v.usable]
    if damaged:
        print(
            f"softprompt verify: damaged: {', '.join(damaged)}; `softprompt train --output_dir {out} --resume` "
            "continues from the newest checkpoint that verifies",
            file=sys.stderr,
        )
        return 1
    return 0


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


def cmd_demo(argv: Sequence[str]) -> int:
    args = parse(DemoArgs, argv, "softprompt demo")
    from softprompt.demo import run_parsed

    return run_parsed(args)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "score": cmd_score,
    "format": cmd_format,
    "serve": cmd_serve,
    "inspect": cmd_inspect,
    "report": cmd_report,
    "verify": cmd_verify,
    "demo": cmd_demo,
    "convert": cmd_convert,
}


def _silence_closed_stdout() -> None:
    # `softprompt train --help | head -1`: the reader went away. Point stdout at /dev/null so that
    # Python's final flush does not print a BrokenPipeError of its own.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_closed_stdout()
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run `softprompt COMMAND ...` and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except BrokenPipeError:
        _silence_closed_stdout()
        return 0
    except SystemExit:
        _flush_stdout()  # --help output meets a closed pipe here
        raise


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"softprompt {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        from softprompt.config import closest

        print(
            f"softprompt: error: unknown command '{argv[0]}'{closest(argv[0], COMMANDS, '{}')}; "
            f"choose one of {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    try:
        code = command(argv[1:])
        _flush_stdout()
        return code
    except UserError as e:
        # One line whatever the message quotes (a library's multi-line text, a path with a newline).
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"softprompt {argv[0]}: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"softprompt {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
