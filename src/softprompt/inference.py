"""Load a model (+ prompts) for inference, and the `eval` / `predict` subcommands built on it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from softprompt.checkpoint import (
    PromptConfig,
    atomic_write_json,
    atomic_write_text,
    load_prompt,
    refuse_non_model,
)
from softprompt.data import QAExample, load_examples, load_hf_dataset, tokenize_examples
from softprompt.distributed import DistEnv
from softprompt.errors import UserError
from softprompt.evaluate import evaluate_examples, generate_answers
from softprompt.model import PromptedT5, load_t5, load_tokenizer
from softprompt.prompt import SoftPrompt
from softprompt.textformat import raw_answer


@dataclass
class Loaded:
    """A frozen model, its tokenizer, and the prompts loaded for it (name -> weight, config)."""

    model: PromptedT5
    tokenizer: Any
    prompts: dict[str, tuple[torch.Tensor, PromptConfig]]
    device: torch.device


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_model_and_prompts(
    model_name_or_path: str,
    prompt_dirs: Sequence[str] = (),
    *,
    random_init: bool = False,
    seed: int = 42,
    names: Sequence[str] | None = None,
    bf16: bool = False,
    allow_other: bool = False,
    fast_path: bool = True,
) -> Loaded:
    """Load a frozen T5 and any number of prompt checkpoints checked against it.

    Args:
        model_name_or_path: hub id or directory.
        prompt_dirs: prompt checkpoint directories.
        random_init: build the model with random weights from its config.
        seed: seed for random weights.
        names: names for the prompts (default: their directory names).
        bf16: store the frozen matmul weights in bf16 (`PromptedT5.freeze_to`), for bf16 runs.
        allow_other: warn instead of refusing prompts trained for another base model.
        fast_path: decode with softprompt's lean T5 (see `PromptedT5`); False runs transformers' modules.
    """
    refuse_non_model(model_name_or_path)
    device = default_device()
    tokenizer = load_tokenizer(model_name_or_path)
    t5 = load_t5(model_name_or_path, random_init=random_init, seed=seed)
    prompts: dict[str, tuple[torch.Tensor, PromptConfig]] = {}
    names = list(names) if names is not None else prompt_names(prompt_dirs)
    for name, directory in zip(names, prompt_dirs, strict=True):
        if name in prompts:
            raise UserError(f"two prompts are named '{name}'; give them distinct names")
        prompts[name] = load_prompt(
            directory,
            expect_d_model=t5.config.d_model,
            expect_base_model=None if random_init else model_name_or_path,
            allow_other=allow_other,
        )
    model = PromptedT5(t5, fast_path=fast_path).to(device).eval()
    if bf16:
        model.freeze_to(torch.bfloat16)
    return Loaded(model=model, tokenizer=tokenizer, prompts=prompts, device=device)


def prompt_names(prompt_dirs: Sequence[str]) -> list[str]:
    """Short, distinct names for prompt directories: the folder name, or more of the path when
    folder names clash (`runs/a/best` and `runs/b/best` become `a/best` and `b/best`)."""
    parts = [Path(p).resolve().parts for p in prompt_dirs]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in prompt_dirs]


def _with_prompt(loaded: Loaded, name: str | None) -> PromptedT5:
    """The frozen model driven by one of the loaded prompts (sharing the model's weights)."""
    if name is None:
        return loaded.model
    weight, _ = loaded.prompts[name]
    prompt = SoftPrompt(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        prompt.weight.copy_(weight)
    model = PromptedT5(loaded.model.model, prompt.to(loaded.device), fast_path=loaded.model.fast_path).eval()
    model.frozen_dtype = loaded.model.frozen_dtype  # the same (possibly bf16) weights
    return model


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
    loaded = load_model_and_prompts(
        args.model_name_or_path,
        args.prompt,
        random_init=args.random_init,
        seed=args.seed,
        bf16=args.precision == "bf16",
        allow_other=args.allow_other_base_model,
    )
    first = next(iter(loaded.prompts.values()), None)
    max_source = args.max_source_length or (first[1].max_source_length if first else 512)
    punctuation = args.punctuation or (first[1].punctuation if first else "none")
    features = tokenize_examples(
        examples,
        loaded.tokenizer,
        max_source_length=max_source,
        max_target_length=32,
        punctuation=punctuation,
    )
    gen = dict(
        batch_size=args.eval_batch_size,
        max_new_tokens=args.max_target_length,
        env=DistEnv(device=loaded.device),
        bf16=args.precision == "bf16",
        show_progress=True,
    )
    report: dict[str, Any] = {"n_examples": len(examples), "punctuation": punctuation}
    if skipped:
        report["skipped_examples"] = dict(skipped)
    predictions: dict[str, Any]
    if args.ensemble == "majority":
        from softprompt.bank import ensemble_eval

        report.update(ensemble_eval(loaded, examples, features, punctuation=punctuation, **gen))
        predictions = {"prompts": report.pop("prompt_predictions"), "ensemble": report.pop("predictions")}
    elif not loaded.prompts:
        result = evaluate_examples(
            loaded.model, loaded.tokenizer, examples, features, punctuation=punctuation, **gen
        )
        report.update(result.scores())
        predictions = result.predictions
    else:
        per_prompt, per_prompt_predictions = {}, {}
        for name in loaded.prompts:
            result = evaluate_examples(
                _with_prompt(loaded, name),
                loaded.tokenizer,
                examples,
                features,
                punctuation=punctuation,
                **gen,
            )
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
    loaded = load_model_and_prompts(
        args.model_name_or_path,
        [args.prompt] if args.prompt else [],
        random_init=args.random_init,
        seed=args.seed,
        bf16=args.precision == "bf16",
        allow_other=args.allow_other_base_model,
    )
    answers = predict_answers(
        loaded,
        next(iter(loaded.prompts), None),
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
    loaded: Loaded,
    prompt_name: str | None,
    rows: Sequence[dict[str, str]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    bf16: bool = False,
    max_source_length: int | None = None,
    punctuation: str | None = None,
) -> list[str]:
    """Answer `{question, context}` rows with the named prompt (or none).

    `max_source_length` and `punctuation` default to the prompt's own settings, else 512 and raw text.
    """
    config = loaded.prompts[prompt_name][1] if prompt_name else None
    if max_source_length is None:
        max_source_length = config.max_source_length if config else 512
    if punctuation is None:
        punctuation = config.punctuation if config else "none"
    examples = [
        QAExample(id=str(i), question=r["question"], context=r["context"], answers=("",))
        for i, r in enumerate(rows)
    ]
    features = tokenize_examples(
        examples,
        loaded.tokenizer,
        max_source_length=max_source_length,
        max_target_length=2,
        punctuation=punctuation,
    )
    answers = generate_answers(
        _with_prompt(loaded, prompt_name),
        loaded.tokenizer,
        features,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        env=DistEnv(device=loaded.device),
        bf16=bf16,
    )
    # A prompt trained on T5's padded text answers "U . S ."; give back the context's own "U.S.".
    spans = [raw_answer(a, r["context"], punctuation) for a, r in zip(answers, rows, strict=True)]
    return [a if s is None else s for a, s in zip(answers, spans, strict=True)]


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
