"""The `eval` and `predict` subcommands, built on the prompt bank (`softprompt.bank`)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from softprompt.bank import (
    PromptBank,
    context_spans,
    ensemble_eval,
    load_model_and_prompts,
    tokenize_questions,
)
from softprompt.checkpoint import atomic_write_json, atomic_write_text
from softprompt.data import QAExample, load_examples, load_hf_dataset, tokenize_examples
from softprompt.distributed import DistEnv
from softprompt.errors import UserError


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


def run_eval(args: Any) -> dict[str, Any]:
    """`softprompt eval`: score each prompt (or the bare model), and optionally their majority ensemble.

    With `--output FILE`, FILE holds {id: answer} for the bare model or one prompt; with several
    prompts {"prompts": {name: {id: answer}}} plus "ensemble": {id: answer} under --ensemble majority.
    """
    skipped: Counter = Counter()
    examples = _data(args, skipped)  # data first: a bad file is reported before minutes of model loading
    if args.ensemble == "majority" and len(args.prompt) < 2:
        raise UserError("--ensemble majority needs at least two --prompt directories")
    bank = load_model_and_prompts(
        args.model_name_or_path,
        args.prompt,
        random_init=args.random_init,
        seed=args.seed,
        bf16=args.precision == "bf16",
        allow_other=args.allow_other_base_model,
        fast_path=args.fast_path,
    )
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
    gen = dict(
        batch_size=args.eval_batch_size,
        max_new_tokens=args.max_target_length,
        env=DistEnv(device=bank.device),
        bf16=args.precision == "bf16",
        show_progress=True,
    )
    report: dict[str, Any] = {"n_examples": len(examples), "punctuation": punctuation}
    if skipped:
        report["skipped_examples"] = dict(skipped)
    predictions: dict[str, Any]
    if args.ensemble == "majority":
        report.update(ensemble_eval(bank, examples, features, punctuation=punctuation, **gen))
        predictions = {"prompts": report.pop("prompt_predictions"), "ensemble": report.pop("predictions")}
    elif len(bank) == 0:
        result = bank.evaluate(examples, features, punctuation=punctuation, **gen)
        report.update(result.scores())
        predictions = result.predictions
    else:
        per_prompt, per_prompt_predictions = {}, {}
        for name in bank.names:
            result = bank.evaluate(examples, features, name, punctuation=punctuation, **gen)
            per_prompt[name] = result.scores()
            per_prompt_predictions[name] = result.predictions
        if len(per_prompt) == 1:
            report.update(next(iter(per_prompt.values())))
            predictions = next(iter(per_prompt_predictions.values()))
        else:
            report["prompts"] = per_prompt
            predictions = {"prompts": per_prompt_predictions}
    if args.output:
        atomic_write_json(args.output, predictions)
        report["predictions_file"] = args.output
    return report


def run_predict(args: Any) -> list[str]:
    """`softprompt predict`: answers for one question or a JSONL file of questions."""
    if args.input_file and (args.question is not None or args.context is not None):
        raise UserError("give either --question/--context or --input_file, not both")
    if args.input_file:
        rows = _read_jsonl(Path(args.input_file))
    elif args.question is not None and args.context is not None:
        rows = [{"question": args.question, "context": args.context}]
    else:
        raise UserError(
            "give --question and --context, or --input_file with JSONL lines of {question, context}"
        )
    bank = load_model_and_prompts(
        args.model_name_or_path,
        [args.prompt] if args.prompt else [],
        random_init=args.random_init,
        seed=args.seed,
        bf16=args.precision == "bf16",
        allow_other=args.allow_other_base_model,
        fast_path=args.fast_path,
    )
    answers = predict_answers(
        bank,
        bank.names[0] if len(bank) else None,
        rows,
        batch_size=args.eval_batch_size,
        max_new_tokens=args.max_target_length,
        bf16=args.precision == "bf16",
        max_source_length=args.max_source_length,
        punctuation=args.punctuation,
    )
    if args.output:
        lines = [
            json.dumps({**({"id": r["id"]} if "id" in r else {}), "answer": a})
            for r, a in zip(rows, answers, strict=True)
        ]
        atomic_write_text(args.output, "\n".join(lines) + "\n")
    elif args.input_file:
        for r, a in zip(rows, answers, strict=True):
            print(json.dumps({**({"id": r["id"]} if "id" in r else {}), "answer": a}))
    else:
        print(answers[0])
    return answers


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
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        env=DistEnv(device=bank.device),
        bf16=bf16,
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
