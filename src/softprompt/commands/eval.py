"""`softprompt eval`: score each prompt (or the bare model), and optionally their majority ensemble."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from softprompt.commands.flags import EvalArgs
from softprompt.commands.loading import load_bank, task_of
from softprompt.data.records import HF_PREFIX
from softprompt.errors import UserError
from softprompt.inference.bank import PromptBank, default_device
from softprompt.inference.ensemble import ensemble_eval
from softprompt.inference.options import GenerationOptions
from softprompt.io.atomic import write_output_json
from softprompt.runtime.distributed import DistEnv
from softprompt.runtime.precision import announce, with_precision
from softprompt.tasks.base import EvalResult, Task


def run(args: EvalArgs) -> int:
    """Print the report of `run_eval` as indented JSON; return the exit code (0)."""
    print(json.dumps(run_eval(args), indent=2))
    return 0


def _data(args: EvalArgs, task: Task, stats: Counter) -> list[Any]:
    """The task's examples of --validation_file, --dataset_name or (none given) its own data set."""
    source = HF_PREFIX + args.dataset_name if args.dataset_name else args.validation_file
    if source is None and not task.has_own_dataset:
        raise UserError(f"give --validation_file ({task.file_kinds}) or --dataset_name")
    # --skip_bad_examples drops malformed records, counted by kind in `stats`, instead of stopping.
    examples = task.load(
        source,
        split=args.split,
        config=args.dataset_config,
        skip_bad=bool(args.skip_bad_examples),
        stats=stats,
    )
    return examples[: args.max_eval_samples] if args.max_eval_samples else examples


def run_eval(args: EvalArgs) -> dict[str, Any]:
    """`softprompt eval`: score each prompt (or the bare model), and optionally their majority ensemble.

    The task is --task and the template flags, else the first prompt's own, else SQuAD; its metric
    scores the answers. With `--output FILE`, FILE holds {id: answer} for the bare model or one prompt;
    with several prompts {"prompts": {name: {id: answer}}} plus "ensemble": {id: answer} under
    --ensemble majority.
    """
    args, precision = with_precision(args, default_device())
    task = task_of(args, args.prompt)
    skipped: Counter = Counter()
    # Data first: a bad file is reported before minutes of model loading.
    examples = _data(args, task, skipped)
    source = HF_PREFIX + args.dataset_name if args.dataset_name else (args.validation_file or task.name)
    unscored = task.unscored_reason(examples, source)
    if unscored and not args.output:
        raise UserError(f"{unscored}; give --output FILE to write the predictions")
    if unscored and args.ensemble == "majority":
        raise UserError(
            f"{unscored}; --ensemble majority breaks ties by each prompt's score, so it needs labels"
        )
    if args.ensemble == "majority" and len(args.prompt) < 2:
        raise UserError("--ensemble majority needs at least two --prompt directories")
    if args.classify == "rank":
        task.rank_classes()  # refuses a task without label strings before the model loads
    bank = load_bank(args, args.prompt)
    announce(precision)  # once the input and the model have loaded: a refusal stays one line
    first = bank.entry(0).config if len(bank) else None
    features = task.tokenize(
        examples,
        bank.tokenizer,
        max_source_length=args.max_source_length or (first.max_source_length if first else 512),
        max_target_length=args.max_target_length,
    )
    gen = _gen(args, bank)
    report: dict[str, Any] = {
        "n_examples": len(examples),
        **task.eval_fields(),
        "classify": args.classify,
        "precision": args.precision,
    }
    if skipped:
        report["skipped_examples"] = dict(skipped)
    if unscored:
        report.update(scores=None, no_score=unscored)
    predictions: dict[str, Any]
    if args.ensemble == "majority":
        report.update(ensemble_eval(bank, task, examples, features, gen))
        predictions = {"prompts": report.pop("prompt_predictions"), "ensemble": report.pop("predictions")}
    else:
        predictions = _score_each(
            bank,
            report,
            lambda name: bank.evaluate(task, examples, features, name, gen, classify=args.classify),
        )
    return _write_predictions(args, report, predictions)


def _gen(args: EvalArgs, bank: PromptBank) -> GenerationOptions:
    return GenerationOptions(
        batch_size=args.eval_batch_size,
        max_new_tokens=args.max_target_length,
        env=DistEnv(device=bank.device),
        bf16=args.precision == "bf16",
        show_progress=True,
    )


def _score_each(
    bank: PromptBank, report: dict[str, Any], evaluate: Callable[[str | None], EvalResult]
) -> dict[str, Any]:
    """Score the bare model or each prompt into `report`; returns the predictions to write."""
    if len(bank) == 0:
        result = evaluate(None)
        report.update(result.scores())
        return result.predictions
    per_prompt, per_prompt_predictions = {}, {}
    for name in bank.names:
        result = evaluate(name)
        per_prompt[name] = result.scores()
        per_prompt_predictions[name] = result.predictions
    if len(per_prompt) == 1:
        report.update(next(iter(per_prompt.values())))
        return next(iter(per_prompt_predictions.values()))
    report["prompts"] = per_prompt
    return {"prompts": per_prompt_predictions}


def _write_predictions(args: EvalArgs, report: dict[str, Any], predictions: dict[str, Any]) -> dict[str, Any]:
    if args.output:
        write_output_json(args.output, predictions)
        report["predictions_file"] = args.output
    return report
