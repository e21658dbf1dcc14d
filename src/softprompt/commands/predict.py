"""`softprompt predict`: answers for one question or example, or a file of them, and the functions
that answer with a loaded `PromptBank` (`predict_answers` for QA rows, `predict_texts` for a text task)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from softprompt.commands.flags import PredictArgs
from softprompt.commands.loading import load_bank, task_of
from softprompt.data.records import BadRecord
from softprompt.errors import UserError
from softprompt.inference.bank import PromptBank
from softprompt.inference.inputs import context_spans, tokenize_questions
from softprompt.inference.options import GenerationOptions
from softprompt.io.atomic import atomic_write_text
from softprompt.runtime.distributed import DistEnv
from softprompt.tasks.text.task import TaskSpec, TextExample, read_records, tokenize_texts


def run(args: PredictArgs) -> int:
    """Print (or write) the answers of `run_predict`; return the exit code (0)."""
    run_predict(args)
    return 0


def run_predict(args: PredictArgs) -> list[str]:
    """`softprompt predict`: answers for one question or example, or a file of them."""
    task = task_of(args, [args.prompt] if args.prompt else [])
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
    bank = load_bank(args, [args.prompt] if args.prompt else [])
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


def _text_inputs(args: PredictArgs, task: TaskSpec) -> tuple[list[str | None], list[str]]:
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
