"""`softprompt eval`: score each prompt (or the bare model), and optionally their majority ensemble."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from softprompt.commands.flags import EvalArgs
from softprompt.commands.loading import load_bank, task_of
from softprompt.data.records import (
    HF_PREFIX,
    QAExample,
    load_examples,
    load_hf_dataset,
    tokenize_examples,
)
from softprompt.errors import UserError
from softprompt.inference.bank import PromptBank
from softprompt.inference.engine import EvalResult
from softprompt.inference.ensemble import ensemble_eval
from softprompt.inference.options import GenerationOptions
from softprompt.io.atomic import atomic_write_json
from softprompt.runtime.distributed import DistEnv
from softprompt.tasks.text.task import TaskSpec, load_task_examples, tokenize_texts


def run(args: EvalArgs) -> int:
    """Print the report of `run_eval` as indented JSON; return the exit code (0)."""
    print(json.dumps(run_eval(args), indent=2))
    return 0


def _data(args: EvalArgs, stats: Counter | None = None) -> list[QAExample]:
    # --skip_bad_examples drops malformed questions, counted by kind in `stats`, instead of stopping.
    skip_bad = bool(getattr(args, "skip_bad_examples", False))
    if args.dataset_name:
        examples = load_hf_dataset(args.dataset_name, args.split, skip_bad=skip_bad, stats=stats)
    elif args.validation_file:
        examples = load_examples(args.validation_file, skip_bad=skip_bad, stats=stats)
    else:
        raise UserError("give --validation_file (SQuAD JSON or MRQA jsonl) or --dataset_name")
    return examples[: args.max_eval_samples] if args.max_eval_samples else examples


def run_eval(args: EvalArgs) -> dict[str, Any]:
    """`softprompt eval`: score each prompt (or the bare model), and optionally their majority ensemble.

    With `--output FILE`, FILE holds {id: answer} for the bare model or one prompt; with several
    prompts {"prompts": {name: {id: answer}}} plus "ensemble": {id: answer} under --ensemble majority.
    A text task (--task, the template flags, or the prompt's own task) is scored with its metric.
    """
    task = task_of(args, args.prompt)
    if task is not None:
        return _eval_texts(args, task)
    skipped: Counter = Counter()
    examples = _data(args, skipped)  # data first: a bad file is reported before minutes of model loading
    if args.ensemble == "majority" and len(args.prompt) < 2:
        raise UserError("--ensemble majority needs at least two --prompt directories")
    if args.classify == "rank":
        raise UserError("--classify rank is for classification tasks (--task with labels), not QA")
    bank = load_bank(args, args.prompt)
    first = bank.entry(0).config if len(bank) else None
    max_source = args.max_source_length or (first.max_source_length if first else 512)
    punctuation = args.punctuation or (first.punctuation if first else "none")
    features = tokenize_examples(
        examples,
        bank.tokenizer,
        max_source_length=max_source,
        max_target_length=32,
        punctuation=punctuation,
    )
    gen = _gen(args, bank)
    report: dict[str, Any] = {"n_examples": len(examples), "punctuation": punctuation}
    if skipped:
        report["skipped_examples"] = dict(skipped)
    predictions: dict[str, Any]
    if args.ensemble == "majority":
        report.update(ensemble_eval(bank, examples, features, gen, punctuation=punctuation))
        predictions = {"prompts": report.pop("prompt_predictions"), "ensemble": report.pop("predictions")}
    else:
        predictions = _score_each(
            bank, report, lambda name: bank.evaluate(examples, features, name, gen, punctuation=punctuation)
        )
    return _write_predictions(args, report, predictions)


def _eval_texts(args: EvalArgs, task: TaskSpec) -> dict[str, Any]:
    skipped: Counter = Counter()
    source = HF_PREFIX + args.dataset_name if args.dataset_name else args.validation_file
    if source is None and not task.dataset:
        raise UserError(f"give --validation_file (the {task.name} task's JSONL/CSV/TSV) or --dataset_name")
    examples = load_task_examples(
        task,
        source,
        split=args.split,
        config=args.dataset_config,
        skip_bad=bool(args.skip_bad_examples),
        stats=skipped,
    )
    examples = examples[: args.max_eval_samples] if args.max_eval_samples else examples
    if args.ensemble == "majority":
        raise UserError("--ensemble majority votes over QA answers; score a text task's prompts one by one")
    bank = load_bank(args, args.prompt)
    first = bank.entry(0).config if len(bank) else None
    features = tokenize_texts(
        examples,
        bank.tokenizer,
        max_source_length=args.max_source_length or (first.max_source_length if first else 512),
        max_target_length=args.max_target_length,
    )
    gen = _gen(args, bank)
    report: dict[str, Any] = {
        "n_examples": len(examples),
        "task": task.name,
        "metric": task.metric.value,
        "classify": args.classify,
    }
    if skipped:
        report["skipped_examples"] = dict(skipped)
    predictions = _score_each(
        bank,
        report,
        lambda name: bank.evaluate_task(task, examples, features, name, gen, classify=args.classify),
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
        atomic_write_json(args.output, predictions)
        report["predictions_file"] = args.output
    return report
