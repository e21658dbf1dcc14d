"""The `softprompt` command: one entry point, one subcommand per job.

Each subcommand is a dataclass of flags in `softprompt.commands.flags` (parsed by `config.parser.parse`) and one small
`cmd_*` function here, listed in `COMMANDS`.

This module imports nothing heavy, so `softprompt COMMAND --help` answers at once; each command
imports torch and transformers only after its flags parsed. User mistakes (`UserError`) end as one
line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from softprompt import __version__
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
from softprompt.config.parser import parse
from softprompt.errors import ConfigError, UserError

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


# ---------------------------------------------------------------------------------------------- train


def _train_checks(cfg: Any) -> list[str]:
    from softprompt.training.config import check_config

    return check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))[1]


def cmd_train(argv: Sequence[str]) -> int:
    from softprompt.config.parser import config_values, read_yaml_mapping
    from softprompt.training.config import TrainConfig

    # First pass: where the run lives. A resume's settings come from its saved config, so the
    # combinations are checked once those are in (second pass).
    cfg = parse(TrainConfig, argv, "softprompt train", checks=lambda c: [] if c.resume else _train_checks(c))
    from softprompt.io.rundir import CONFIG_FILE

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
    from softprompt.training.loop import Preempted, train

    try:
        results = train(cfg)
    except Preempted as e:
        print(f"softprompt: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({k: results[k] for k in ("exact_match", "f1", "best_step", "steps", "train_seconds")}))
    return 0


# ---------------------------------------------------------------------------------------------- eval, predict, score


def cmd_score(argv: Sequence[str]) -> int:
    from softprompt.tasks.metrics.squad import evaluate_file

    args = parse(ScoreArgs, argv, "softprompt score")
    print(json.dumps(evaluate_file(args.dataset_file, args.prediction_file)))
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    args = parse(EvalArgs, argv, "softprompt eval")
    _quiet_transformers()
    from softprompt.commands.eval_predict import run_eval

    print(json.dumps(run_eval(args), indent=2))
    return 0


def cmd_predict(argv: Sequence[str]) -> int:
    args = parse(PredictArgs, argv, "softprompt predict", checks=predict_checks)
    _quiet_transformers()
    from softprompt.commands.eval_predict import run_predict

    run_predict(args)
    return 0


# ---------------------------------------------------------------------------------------------- format


def cmd_format(argv: Sequence[str]) -> int:
    args = parse(FormatArgs, argv, "softprompt format", checks=format_checks)
    from softprompt.commands.format import write_formatted
    from softprompt.tasks.text.presets import task_from_flags

    task = task_from_flags(args)
    n, skipped = write_formatted(
        args.data,
        args.output,
        punctuation=args.punctuation,
        dataset_name=args.dataset_name,
        split=args.split,
        skip_bad_examples=args.skip_bad_examples,
        max_samples=args.max_samples,
        task=task,
        dataset_config=args.dataset_config,
    )
    noun = "questions" if task is None else "examples"
    print(f"wrote {n:,} {noun} to {args.output}" + (f"; skipped {dict(skipped)}" if skipped else ""))
    return 0


# ---------------------------------------------------------------------------------------------- convert


def cmd_convert(argv: Sequence[str]) -> int:
    args = parse(ConvertArgs, argv, "softprompt convert")
    _quiet_transformers()
    from softprompt.commands.convert import convert

    print(f"wrote {convert(args.model, args.out_dir, overwrite=args.overwrite)}")
    return 0


# ---------------------------------------------------------------------------------------------- export


def cmd_export(argv: Sequence[str]) -> int:
    args = parse(ExportArgs, argv, "softprompt export")
    from dataclasses import asdict

    from softprompt.io.atomic import atomic_dir
    from softprompt.io.checkpoint import load_prompt
    from softprompt.io.peft_format import write_adapter

    out = Path(args.output_dir)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or choose another OUTPUT_DIR")
    weight, config = load_prompt(args.prompt_dir)
    with atomic_dir(out) as tmp:
        write_adapter(tmp, weight, asdict(config))
    print(
        f"wrote {out} (PEFT prompt-tuning adapter, {weight.shape[0]} virtual tokens for {config.base_model})"
    )
    return 0


# ---------------------------------------------------------------------------------------------- serve


def cmd_serve(argv: Sequence[str]) -> int:
    args = parse(ServeArgs, argv, "softprompt serve", checks=serve_checks)
    _quiet_transformers()
    from softprompt.serving.server import serve

    return serve(args)


# ---------------------------------------------------------------------------------------------- inspect


def cmd_inspect(argv: Sequence[str]) -> int:
    args = parse(InspectArgs, argv, "softprompt inspect")
    _quiet_transformers()
    from softprompt.commands.inspect import inspect_prompt

    return inspect_prompt(args)


# ---------------------------------------------------------------------------------------------- report, demo


def cmd_report(argv: Sequence[str]) -> int:
    args = parse(ReportArgs, argv, "softprompt report")
    from softprompt.training.report import make_report

    path = make_report([Path(d) for d in args.run_dirs], Path(args.output_dir))
    print(f"wrote {path}")
    return 0


def cmd_verify(argv: Sequence[str]) -> int:
    """Print one line per checkpoint (ok, unverified or damaged); exit 1 when any is damaged."""
    args = parse(VerifyArgs, argv, "softprompt verify")
    from softprompt.io import rundir

    out = Path(args.run_dir)
    rows = rundir.verify_run(out)
    print(rundir.verify_table(out, rows))
    if args.output:
        from softprompt.io.atomic import atomic_write_json

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


def cmd_demo(argv: Sequence[str]) -> int:
    args = parse(DemoArgs, argv, "softprompt demo")
    from softprompt.commands.demo import run_parsed

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
    "export": cmd_export,
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
        from softprompt.config.fields import closest

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
