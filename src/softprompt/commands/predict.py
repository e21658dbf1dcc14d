"""`softprompt predict`: answers for one request or a file of them, and `predict_answers`, which answers
request records with a loaded `PromptBank` for any task."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from softprompt.commands.flags import PredictArgs
from softprompt.commands.loading import load_bank, task_of
from softprompt.config.choices import Leaderboard, RankMode
from softprompt.data.records import BadRecord
from softprompt.errors import UserError
from softprompt.inference.bank import PromptBank, default_device
from softprompt.inference.options import GenerationOptions
from softprompt.io.atomic import STDOUT, write_output_text
from softprompt.runtime.distributed import DistEnv
from softprompt.runtime.precision import announce, with_precision
from softprompt.tasks.base import Submission, Task
from softprompt.tasks.resolve import task_from_saved
from softprompt.tasks.text.reader import read_records


def run(args: PredictArgs) -> int:
    """Print (or write) the answers of `run_predict`; return the exit code (0)."""
    run_predict(args)
    return 0


def run_predict(args: PredictArgs) -> list[str]:
    """`softprompt predict`: answers for one request (--question/--context, --fields) or a file of them.

    The task (--task, else the prompt's own, else SQuAD) reads each request: QA its question and
    context, a text task its template's fields. Requests are checked before the model loads.
    """
    args, precision = with_precision(args, default_device())
    prompts = [args.prompt] if args.prompt else []
    task = task_of(args, prompts)
    if args.classify == RankMode.RANK:
        task.rank_classes()  # refuses a task without label strings before the model loads
    submission = (
        None if args.submission == Leaderboard.NONE else task.submission(args.submission, args.classify)
    )
    records: list[Mapping[str, Any]] = []
    if args.input_file:
        records, examples = _file_examples(task, args.input_file, submission)
    else:
        examples = _flag_examples(task, args)
    bank = load_bank(args, prompts)
    announce(precision)  # once the input and the model have loaded: a refusal stays one line
    answers = predict_answers(
        bank,
        bank.names[0] if len(bank) else None,
        examples,
        task=task,
        batch_size=args.eval_batch_size,
        max_new_tokens=args.max_target_length,
        bf16=args.precision == "bf16",
        max_source_length=args.max_source_length,
        classify=args.classify,
    )
    if submission is not None:
        _write_submission(submission, records, answers, args.output)
        return answers
    lines = [
        json.dumps({**({"id": ex.id} if ex.id else {}), "answer": a})
        for ex, a in zip(examples, answers, strict=True)
    ]
    if args.output:
        write_output_text(args.output, "\n".join(lines) + "\n")
    elif args.input_file:
        for line in lines:
            print(line)
    else:
        print(answers[0])
    return answers


def _flag_examples(task: Task, args: PredictArgs) -> list[Any]:
    """The examples of the one request the flags give: --question/--context, or --fields."""
    fields = None
    if args.fields is not None:
        try:
            fields = json.loads(args.fields)
        except json.JSONDecodeError as e:
            raise UserError(
                f'--fields is not a JSON object ({e.msg}); write \'{{"field": "text"}}\''
            ) from None
        if not isinstance(fields, Mapping):
            raise UserError(
                f'--fields is a JSON {type(fields).__name__}, not an object; write \'{{"field": "text"}}\''
            )
    try:
        return task.request_parts(args.question, args.context, fields)
    except BadRecord as err:
        raise UserError(
            f"{err.reason}; give --question and --context (QA), --fields '{{...}}' (a text task), or "
            "--input_file with JSONL/CSV/TSV rows"
        ) from None


def _file_examples(
    task: Task, path: str, submission: Submission | None = None
) -> tuple[list[Mapping[str, Any]], list[Any]]:
    """The records of --input_file (JSONL/CSV/TSV) and the examples of every row; a row the task (or
    the leaderboard file, which names each answer by its record's idx) cannot read is one line naming it."""
    records: list[Mapping[str, Any]] = []
    examples: list[Any] = []
    for place, record in read_records(path):
        try:
            if isinstance(record, BadRecord):
                raise record
            if not isinstance(record, Mapping):
                raise BadRecord("bad_row", f"is a {type(record).__name__}, not an object with fields")
            examples.extend(task.request_examples(record))
            if submission is not None:
                submission.check(record)
        except BadRecord as err:
            raise UserError(f"{path}: {place}: {err.reason}; fix or remove it") from None
        records.append(record)
    if not examples:
        raise UserError(f"{path} holds no {task.example_noun}")
    return records, examples


def _write_submission(
    submission: Submission, records: Sequence[Mapping[str, Any]], answers: Sequence[str], output: str | None
) -> None:
    """The leaderboard file: to stdout (no --output, or -), into a directory under its own name, or to
    the file --output names."""
    text = "".join(json.dumps(line) + "\n" for line in submission.lines(records, answers))
    if output is None or output == STDOUT:
        sys.stdout.write(text)
        return
    path = Path(output) / submission.file_name if Path(output).is_dir() else Path(output)
    write_output_text(path, text)
    n = len(records)
    print(f"softprompt: wrote {path} ({n} test record{'s' if n != 1 else ''})", file=sys.stderr)


def predict_answers(
    bank: PromptBank,
    prompt_name: str | None,
    requests: Sequence[Any],
    *,
    task: Task | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    bf16: bool = False,
    max_source_length: int | None = None,
    classify: str = "greedy",
) -> list[str]:
    """Answer requests with the named prompt of the bank (or the bare model), as the user is shown them.

    Args:
        bank: the model and its prompts.
        prompt_name: the prompt to answer with; None for the bare model.
        requests: the task's examples, or request records (`{question, context}` for QA, a template's
            fields for a text task) that `Task.request_examples` turns into examples.
        task: the task that reads the requests (default: the prompt's own, else SQuAD on raw text).
        batch_size: rows per generation batch.
        max_new_tokens: the longest answer.
        bf16: generate under bf16 autocast.
        max_source_length: the input budget (default: the prompt's own setting, else 512).
        classify: ``greedy`` generates; ``rank`` answers with the likeliest of the task's label strings
            (`Task.rank_classes`), no gold label needed.

    Returns:
        One answer per example, mapped back as the task shows it (SQuAD on padded text: the context's
        own span).
    """
    entry = bank.entry(prompt_name) if prompt_name else None
    task = task or (entry.task if entry else task_from_saved(None))  # the bare model: QA on raw text
    if max_source_length is None:
        max_source_length = entry.config.max_source_length if entry else 512
    examples = [ex for r in requests for ex in (task.request_examples(r) if isinstance(r, Mapping) else [r])]
    features = task.tokenize(
        examples, bank.tokenizer, max_source_length=max_source_length, max_target_length=2
    )
    options = GenerationOptions(
        batch_size=batch_size, max_new_tokens=max_new_tokens, env=DistEnv(device=bank.device), bf16=bf16
    )
    if classify == RankMode.RANK:
        answers = bank.rank_answers(features, task.rank_classes(), prompt_name, options)
    else:
        answers = bank.generate_answers(features, prompt_name, options)
    return [task.answer_text(ex, a) for ex, a in zip(examples, answers, strict=True)]
