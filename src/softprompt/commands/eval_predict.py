"""The `eval` and `predict` subcommands, built on the prompt bank (`softprompt.inference.bank`)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from softprompt.data.records import HF_PREFIX, BadRecord
from softprompt.errors import UserError
from softprompt.inference.bank import PromptBank, load_model_and_prompts
from softprompt.inference.engine import EvalResult
from softprompt.inference.ensemble import ensemble_eval
from softprompt.inference.inputs import context_spans, tokenize_questions
from softprompt.inference.options import GenerationOptions
from softprompt.io.atomic import atomic_write_json, atomic_write_text
from softprompt.io.checkpoint import load_prompt_config
from softprompt.runtime.distributed import DistEnv
from softprompt.tasks.squad.reader import QAExample, load_examples, load_hf_dataset, tokenize_examples
from softprompt.tasks.text.features import tokenize_texts
from softprompt.tasks.text.presets import task_from_flags
from softprompt.tasks.text.reader import load_task_examples, read_records
from softprompt.tasks.text.spec import TaskSpec, TextExample


def _data(args: Any, stats: Counter | None = None) -> list[QAExample]:
    # --skip_bad_examples drops malformed questions, counted by kind in `stats`, instead of stopping.
    skip_bad = bool(getattr(args, "skip_bad_examples", False))
    if args.dataset_name:
        examples = load_hf_dataset(args.dataset_name, args.split, skip_bad=skip_bad, stats=stats)
    elif args.validation_file:
        examples = load_examples(args.validation_file, skip_bad=skip_bad, stats=stats)
    else:
        raise UserError("give --validation_file (SQuAD JSON or MRQA jsonl) or --dataset_name")
    return examples[: args.max_eval_samples] if args.max_eval_samples else examples


def _task(args: Any, prompt_dirs: Sequence[str]) -> TaskSpec | None:
    """The text task of --task and the template flags, else the first prompt's own; None for QA."""
    saved = load_prompt_config(prompt_dirs[0]).task if prompt_dirs else None
    return task_from_flags(args, saved)


def run_eval(args: Any) -> dict[str, Any]:
    """`softprompt eval`: score each prompt (or the bare model), and optionally their majority ensemble.

    With `--output FILE`, FILE holds {id: answer} for the bare model or one prompt; with several
    prompts {"prompts": {name: {id: answer}}} plus "ensemble": {id: answer} under --ensemble majority.
    A text task (--task, the template flags, or the prompt's own task) is scored with its metric.
    """
    task = _task(args, args.prompt)
    if task is not None:
        return _eval_texts(args, task)
    skipped: Counter = Counter()
    examples = _data(args, skipped)  # data first: a bad file is reported before minutes of model loading
    if args.ensemble == "majority" and len(args.prompt) < 2:
        raise UserError("--ensemble majority needs at least two --prompt directories")
    if args.classify == "rank":
        raise UserError("--classify rank is for classification tasks (--task with labels), not QA")
    bank = _bank(args, args.prompt)
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


def _eval_texts(args: Any, task: TaskSpec) -> dict[str, Any]:
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
    bank = _bank(args, args.prompt)
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


def _bank(args: Any, prompt_dirs: Sequence[str]) -> PromptBank:
    return load_model_and_prompts(
        args.model_name_or_path,
        list(prompt_dirs),
        random_init=args.random_init,
        seed=args.seed,
        bf16=args.precision == "bf16",
        allow_other=args.allow_other_base_model,
        fast_path=args.fast_path,
    )


def _gen(args: Any, bank: PromptBank) -> GenerationOptions:
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


def _write_predictions(args: Any, report: dict[str, Any], predictions: dict[str, Any]) -> dict[str, Any]:
    if args.output:
        atomic_write_json(args.output, predictions)
        report["predictions_file"] = args.output
    return report


def run_predict(args: Any) -> list[str]:
    """`softprompt predict`: answers for one question or example, or a file of them."""
    task = _task(args, [args.prompt] if args.prompt else [])
    if task is not None:
        ids, texts = _text_inputs(args, task)
    elif args.fields is not None:
        raise UserError(
            "--fields is for text tasks (--task, or a prompt trained on one); give --question/--context"
        )
    elif args.input_file and (args.question is not None or args.context is not None):
        raise UserError("give either --question/--context or --input_file, not both")
    elif args.input_file:
        rows = _read_jsonl(Path(args.input_file))
        ids = [r.get("id") for r in rows]
    elif args.question is not None and args.context is not None:
        rows = [{"question": args.question, "context": args.context}]
        ids = [None]
    else:
        raise UserError(
            "give --question and --context, or --input_file with JSONL lines of {question, context}"
        )
    bank = _bank(args, [args.prompt] if args.prompt else [])
    name = bank.names[0] if len(bank) else None
    gen = dict(
        batch_size=args.eval_batch_size,
        max_new_tokens=args.max_target_length,
        bf16=args.precision == "bf16",
        max_source_length=args.max_source_length,
    )
    if task is not None:
        answers = predict_texts(bank, name, texts, **gen)
    else:
        answers = predict_answers(bank, name, rows, punctuation=args.punctuation, **gen)
    lines = [
        json.dumps({**({"id": i} if i is not None else {}), "answer": a})
        for i, a in zip(ids, answers, strict=True)
    ]
    if args.output:
        atomic_write_text(args.output, "\n".join(lines) + "\n")
    elif args.input_file:
        for line in lines:
            print(line)
    else:
        print(answers[0])
    return answers


def _text_inputs(args: Any, task: TaskSpec) -> tuple[list[str | None], list[str]]:
    """The ids and model inputs of --fields or --input_file for a text task (one line per problem)."""
    if args.question is not None or args.context is not None:
        raise UserError(f"the {task.name} task reads its template's fields: give --fields or --input_file")
    if args.fields is not None:
        try:
            records: Iterable[tuple[str, Any]] = [("--fields", json.loads(args.fields))]
        except json.JSONDecodeError as e:
            raise UserError(
                f'--fields is not a JSON object ({e.msg}); write \'{{"field": "text"}}\''
            ) from None
        source = "--fields"
    elif args.input_file:
        records, source = read_records(args.input_file), args.input_file
    else:
        raise UserError(
            f"give --fields '{{...}}' or --input_file (JSONL/CSV/TSV rows) for the {task.name} task"
        )
    ids: list[str | None] = []
    texts: list[str] = []
    for place, record in records:
        try:
            if isinstance(record, BadRecord):
                raise record
            for qid, text in task.input_texts(record):
                ids.append(qid)
                texts.append(text)
        except BadRecord as err:
            raise UserError(f"{source}: {place}: {err.reason}; fix or remove it") from None
    return ids, texts


def predict_texts(
    bank: PromptBank,
    prompt_name: str | None,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    bf16: bool = False,
    max_source_length: int | None = None,
) -> list[str]:
    """Answer a text task's model inputs with the named prompt of the bank (or the bare model).

    `max_source_length` defaults to the prompt's own setting, else 512.
    """
    config = bank.entry(prompt_name).config if prompt_name else None
    if max_source_length is None:
        max_source_length = config.max_source_length if config else 512
    examples = [TextExample(id=str(i), inputs=t, targets=("",)) for i, t in enumerate(texts)]
    features = tokenize_texts(
        examples, bank.tokenizer, max_source_length=max_source_length, max_target_length=2
    )
    return bank.generate_answers(
        features,
        prompt_name,
        GenerationOptions(
            batch_size=batch_size, max_new_tokens=max_new_tokens, env=DistEnv(device=bank.device), bf16=bf16
        ),
    )


def predict_answers(
    bank: PromptBank,
    prompt_name: str | None,
    rows: Sequence[dict[str, str]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    bf16: bool = False,
    max_source_length: int | None = None,
    punctuation: str | None = None,
) -> list[str]:
    """Answer `{question, context}` rows with the named prompt of the bank (or the bare model).

    `max_source_length` and `punctuation` default to the prompt's own settings, else 512 and raw text.
    """
    config = bank.entry(prompt_name).config if prompt_name else None
    if max_source_length is None:
        max_source_length = config.max_source_length if config else 512
    if punctuation is None:
        punctuation = config.punctuation if config else "none"
    features = tokenize_questions(
        bank.tokenizer,
        [(r["question"], r["context"]) for r in rows],
        max_source_length=max_source_length,
        punctuation=punctuation,
    )
    answers = bank.generate_answers(
        features,
        prompt_name,
        GenerationOptions(
            batch_size=batch_size, max_new_tokens=max_new_tokens, env=DistEnv(device=bank.device), bf16=bf16
        ),
    )
    return context_spans(answers, [r["context"] for r in rows], punctuation)


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path} line {n} is not valid JSON ({e.msg}); write one JSON object per line"
            ) from None
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) and row.get(k) for k in ("question", "context")
        ):
            raise UserError(f"{path} line {n} needs non-empty string fields 'question' and 'context'")
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no questions")
    return rows
