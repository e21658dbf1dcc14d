"""The `softprompt` command: one entry point, one subcommand per job.

Each subcommand is a dataclass of flags (`softprompt.commands.flags`, train's `TrainConfig`), parsed by
`config.parser.parse`, and a module `softprompt.commands.<name>` whose `run(args) -> int` does the work;
`COMMANDS` maps the names to them. This module only dispatches.

It imports nothing heavy, and a command's module is imported only after its flags parsed, so
`softprompt COMMAND --help` answers at once. User mistakes (`UserError`) end as one line on stderr and
a non-zero exit, never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from softprompt import __version__
from softprompt.commands import train as train_command
from softprompt.commands.flags import (
    ConvertArgs,
    DemoArgs,
    EvalArgs,
    ExportArgs,
    FormatArgs,
    InspectArgs,
    PredictArgs,
    ReportArgs,
    ScoreArgs,
    ServeArgs,
    VerifyArgs,
    format_checks,
    predict_checks,
    serve_checks,
)
from softprompt.config.parser import parse, reports
from softprompt.errors import UserError
from softprompt.training.config import TrainConfig

USAGE = f"""softprompt {__version__}: prompt tuning (Lester et al., 2021) and fine-tuning of T5 for
question answering (SQuAD) and any text-to-text task (--task: SuperGLUE presets, JSONL/CSV/TSV with templates)

usage: softprompt COMMAND [FLAGS]   (softprompt COMMAND --help for the flags)

commands:
  train     train a soft prompt (--prompt_tuning) or fine-tune the whole model
  eval      score a model (+ prompts, optionally an ensemble) on a data file: EM/F1 or the task's metric
  predict   answer --question/--context, a text task's --fields, or a file of them
  score     the official SQuAD v1.1 evaluator (also reads MRQA .jsonl): softprompt score DATA PREDICTIONS.json
  format    write the model's input/target text for each example: softprompt format DATA --output FILE.jsonl
  serve     an HTTP server answering for many prompts on one frozen model
  inspect   nearest vocabulary tokens of each prompt vector
  report    learning curves and tables comparing run directories
  verify    check every checkpoint of a run directory against its manifest: softprompt verify RUN_DIR
  demo      an offline end-to-end demo: fine-tune a micro T5, then prompt-tune it for a new task
  convert   write a model (Hub id or directory) as a safetensors Hugging Face directory: convert MODEL OUT_DIR
  export    write a prompt as a PEFT prompt-tuning adapter: export PROMPT_DIR --to peft OUTPUT_DIR

Every command takes --config FILE (YAML or JSON, keys = flag names); flags given with it override the file.
"""


def _quiet_transformers() -> None:
    # transformers' per-file progress bars would interleave with softprompt's own.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@dataclass(frozen=True)
class Command:
    """How `softprompt NAME` runs: parse the flags, then `softprompt.commands.NAME.run(args)`."""

    flags: type
    """The dataclass of the command's flags."""
    checks: Callable[[Any], list[str]] | None = None
    """The combinations of flags that cannot go together, checked with the parse (one phrase each)."""
    quiet_transformers: bool = False
    """Silence transformers' progress bars before the command runs (it loads models)."""
    parser: Callable[[Sequence[str]], Any] | None = None
    """A parse of the command's own instead of `config.parser.parse` of `flags` (train's resume)."""

    def parse_args(self, name: str, argv: Sequence[str]) -> Any:
        """The parsed flags of `softprompt NAME ARGV` (exits with --help or a usage error)."""
        if self.parser is not None:
            return self.parser(argv)
        return parse(self.flags, argv, f"softprompt {name}", checks=self.checks)


COMMANDS: dict[str, Command] = {
    "train": Command(TrainConfig, quiet_transformers=True, parser=train_command.parse_args),
    "eval": Command(EvalArgs, quiet_transformers=True),
    "predict": Command(PredictArgs, predict_checks, quiet_transformers=True),
    "score": Command(ScoreArgs),
    "format": Command(FormatArgs, format_checks),
    "serve": Command(ServeArgs, serve_checks, quiet_transformers=True),
    "inspect": Command(InspectArgs, quiet_transformers=True),
    "report": Command(ReportArgs),
    "verify": Command(VerifyArgs),
    "demo": Command(DemoArgs),
    "convert": Command(ConvertArgs, quiet_transformers=True),
    "export": Command(ExportArgs),
}


def run_command(name: str, argv: Sequence[str]) -> int:
    """Parse `softprompt NAME ARGV`'s flags, then run the command; its exit code."""
    command = COMMANDS[name]
    args = command.parse_args(name, argv)
    if command.quiet_transformers:
        _quiet_transformers()
    return importlib.import_module(f"softprompt.commands.{name}").run(args)


def check_command(name: str, argv: Sequence[str]) -> int:
    """Parse and check `softprompt NAME ARGV`'s flags without running the command (what
    `scripts/dist_train.sh` does once before it starts the ranks); 0, or the refusal's exit code after
    its one line."""
    try:
        COMMANDS[name].parse_args(name, argv)
    except UserError as e:
        print(f"softprompt {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return 0


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
    if argv[0] not in COMMANDS:
        from softprompt.config.fields import closest

        print(
            f"softprompt: error: unknown command '{argv[0]}'{closest(argv[0], COMMANDS, '{}')}; "
            f"choose one of {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    try:
        code = run_command(argv[0], argv[1:])
        _flush_stdout()
        return code
    except UserError as e:
        # One line whatever the message quotes (a library's multi-line text, a path with a newline).
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if reports():  # under torchrun, rank 0 says it for every rank
            print(f"softprompt {argv[0]}: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"softprompt {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
