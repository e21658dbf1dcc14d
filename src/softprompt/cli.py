"""The `softprompt` command: one entry point, one subcommand per job.

Every subcommand's flags come from a dataclass whose field docstrings are the `--help` text.
User mistakes (`UserError`) end as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from softprompt import __version__
from softprompt.errors import ConfigError, UserError
from softprompt.textformat import PunctuationName

USAGE = f"""softprompt {__version__}: prompt tuning (Lester et al., 2021) and fine-tuning of T5 for question answering

usage: softprompt COMMAND [FLAGS]   (softprompt COMMAND --help for the flags)

commands:
  train     train a soft prompt (--prompt_tuning) or fine-tune the whole model
  eval      score a model (+ prompts, optionally an ensemble) on a data file: EM/F1 and predictions
  predict   answer --question/--context, or a JSONL file of {{question, context}} lines
  score     the official SQuAD v1.1 evaluator: softprompt score DATA.json PREDICTIONS.json
  format    write the model's input/target text for each question: softprompt format DATA --output FILE.jsonl
  serve     an HTTP server answering for many prompts on one frozen model
  inspect   nearest vocabulary tokens of each prompt vector
  report    learning curves and tables comparing run directories
  demo      an offline end-to-end demo: fine-tune a micro T5, then prompt-tune it for a new task
  convert   write a model (Hub id or directory) as a safetensors Hugging Face directory: convert MODEL OUT_DIR
"""

Repeated = tyro.conf.UseAppendAction
ModelArg = Annotated[str, tyro.conf.arg(aliases=("--model",))]


@dataclass
class EvalArgs:
    """Score a model, with or without prompts, on a QA data file."""

    model_name_or_path: ModelArg
    """Hub id or directory of the T5 model (a fine-tuned run's best/ directory works too)."""
    validation_file: str | None = None
    """SQuAD v1.1 JSON or MRQA .jsonl(.gz) to evaluate on."""
    dataset_name: str | None = None
    """A Hugging Face dataset with SQuAD columns instead of a file (needs the internet)."""
    split: str = "validation"
    """Split of --dataset_name."""
    skip_bad_examples: bool = False
    """Skip malformed questions (counted in the report as skipped_examples) instead of stopping at the first one."""
    prompt: Annotated[list[str], Repeated] = field(default_factory=list)
    """Prompt checkpoint directory; repeat the flag for several prompts (scored each, and as an ensemble)."""
    ensemble: Literal["none", "majority"] = "none"
    """With several prompts: also score their majority vote (ties go to the prompt with the best dev F1)."""
    random_init: bool = False
    """Build the model with random weights from its config (offline smoke tests)."""
    seed: int = 42
    """Seed for --random_init weights."""
    max_eval_samples: int | None = None
    """Evaluate on only the first N questions."""
    eval_batch_size: int = 64
    """Questions per generation batch."""
    max_source_length: int | None = None
    """Input text tokens kept; default: the prompt's own setting, else 512."""
    max_new_tokens: int = 32
    """Longest answer in tokens."""
    punctuation: PunctuationName | None = None
    """Input text format (paper, current, none); default: the prompt's own setting, else none."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32 or bf16 autocast."""
    output: str | None = None
    """Where to write predictions ({id: answer} JSON); default predictions.json beside nothing (not written)."""


@dataclass
class PredictArgs:
    """Answer questions with a model and an optional prompt."""

    model_name_or_path: ModelArg
    """Hub id or directory of the T5 model."""
    prompt: str | None = None
    """Prompt checkpoint directory."""
    question: str | None = None
    """The question (with --context)."""
    context: str | None = None
    """The passage that holds the answer (with --question)."""
    input_file: str | None = None
    """A JSONL file of {"question", "context"} lines (an "id" is kept if present)."""
    output: str | None = None
    """Write answers here as JSONL instead of printing them."""
    random_init: bool = False
    """Build the model with random weights from its config (offline smoke tests)."""
    seed: int = 42
    """Seed for --random_init weights."""
    batch_size: int = 32
    """Questions per generation batch."""
    max_new_tokens: int = 32
    """Longest answer in tokens."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32 or bf16 autocast."""


@dataclass
class ScoreArgs:
    """The official SQuAD v1.1 evaluator: prints {"exact_match": ..., "f1": ...}."""

    dataset_file: tyro.conf.Positional[str]
    """SQuAD v1.1 data JSON (the gold answers)."""
    prediction_file: tyro.conf.Positional[str]
    """Predictions JSON: {question id: answer}."""


@dataclass
class FormatArgs:
    """Write {id, inputs, targets} per question: the exact text the model is trained and evaluated on."""

    output: str
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
    max_samples: int | None = None
    """Write only the first N questions."""


def cmd_format(argv: Sequence[str]) -> int:
    from softprompt.format_data import write_formatted

    args = _parse(FormatArgs, argv, "softprompt format")
    if not args.data and not args.dataset_name:
        raise UserError(
            "give the data to format: a SQuAD JSON or MRQA jsonl file, hf:NAME, or --dataset_name"
        )
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


def _parse(cls: type, argv: Sequence[str], prog: str, default=None):
    return tyro.cli(
        cls, args=list(argv), prog=prog, default=default, use_underscores=True, description=cls.__doc__
    )


def _refuse_bad_train_flags(argv: list[str], base, problems: list[str]) -> None:
    """Exit with one line naming every bad flag or config key and every impossible combination.

    The flag parser stops at the first bad value; this lists them all at once, together with what
    `validate` says about the settings that did parse, before any work starts. Like the parser's own
    refusals it ends in SystemExit(2). With nothing wrong here it returns, and the parser and
    `validate` take over.
    """
    import dataclasses
    import os

    from softprompt.config import TrainConfig, check_config, scan_flags

    values, flag_problems = scan_flags(argv, TrainConfig)
    problems = problems + flag_problems
    if not problems:
        return
    cfg = dataclasses.replace(base if base is not None else TrainConfig(), **values)
    _, combination_problems = check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    error = ConfigError("invalid configuration: " + "; ".join(problems + combination_problems))
    print(f"softprompt train: error: {error}", file=sys.stderr)
    raise SystemExit(error.exit_code)


def cmd_train(argv: Sequence[str]) -> int:
    from softprompt.config import TrainConfig, load_yaml_config, read_yaml_mapping, split_config_values
    from softprompt.train import Preempted, train

    argv = list(argv)
    base = None
    problems: list[str] = []
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a YAML file path")
        values, yaml_problems = split_config_values(read_yaml_mapping(argv[i + 1]), TrainConfig)
        problems += [f"{argv[i + 1]}: {p}" for p in yaml_problems]
        base = TrainConfig(**values)
        del argv[i : i + 2]
    elif "--resume" in argv and "--output_dir" in argv:
        # Resuming from the output directory alone: its config.yaml holds the run's settings.
        i = argv.index("--output_dir")
        saved = Path(argv[i + 1]) / "config.yaml" if i + 1 < len(argv) else None
        if saved is not None and saved.exists():
            base = load_yaml_config(saved)
            base.resume = base.overwrite_output_dir = False
    if not {"-h", "--help"} & set(argv):
        _refuse_bad_train_flags(argv, base, problems)
    cfg = _parse(TrainConfig, argv, "softprompt train", default=base)
    try:
        results = train(cfg)
    except Preempted as e:
        print(f"softprompt: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({k: results[k] for k in ("exact_match", "f1", "best_step", "steps", "train_seconds")}))
    return 0


def cmd_score(argv: Sequence[str]) -> int:
    from softprompt.metrics import evaluate_squad_file

    args = _parse(ScoreArgs, argv, "softprompt score")
    print(json.dumps(evaluate_squad_file(args.dataset_file, args.prediction_file)))
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    from softprompt.inference import run_eval

    args = _parse(EvalArgs, argv, "softprompt eval")
    print(json.dumps(run_eval(args), indent=2))
    return 0


def cmd_predict(argv: Sequence[str]) -> int:
    from softprompt.inference import run_predict

    args = _parse(PredictArgs, argv, "softprompt predict")
    run_predict(args)
    return 0


def cmd_demo(argv: Sequence[str]) -> int:
    from softprompt.demo import main as demo_main

    return demo_main(argv)


def cmd_serve(argv: Sequence[str]) -> int:
    from softprompt.serve import main as serve_main

    return serve_main(argv)


def cmd_inspect(argv: Sequence[str]) -> int:
    from softprompt.inspect_prompt import main as inspect_main

    return inspect_main(argv)


@dataclass
class ReportArgs:
    """Learning curves (PNG + SVG) and Markdown tables comparing training runs."""

    run_dirs: tyro.conf.Positional[list[str]]
    """Run directories written by `softprompt train` (each with results.json, metrics.jsonl, config.yaml)."""
    out: str = "report"
    """Directory to write report.md and the figures into."""


def cmd_report(argv: Sequence[str]) -> int:
    from softprompt.report import make_report

    args = _parse(ReportArgs, argv, "softprompt report")
    path = make_report([Path(d) for d in args.run_dirs], Path(args.out))
    print(f"wrote {path}")
    return 0


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
    from softprompt.convert import convert

    args = _parse(ConvertArgs, argv, "softprompt convert")
    print(f"wrote {convert(args.model, args.out_dir, overwrite=args.overwrite)}")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "score": cmd_score,
    "format": cmd_format,
    "serve": cmd_serve,
    "inspect": cmd_inspect,
    "report": cmd_report,
    "demo": cmd_demo,
    "convert": cmd_convert,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run `softprompt COMMAND ...` and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"softprompt {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(
            f"softprompt: error: unknown command '{argv[0]}'; choose one of {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    try:
        # transformers' per-file progress bars would interleave with softprompt's own.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return command(argv[1:])
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
