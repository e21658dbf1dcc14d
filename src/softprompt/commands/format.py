"""`softprompt format`: write the exact text the model sees, one example a line, for users to inspect.

Each line is ``{"id", "inputs", "targets"}``, the same fields (and, for ``paper``/``current``, the same
strings) as T5's own ``squad`` preprocessor produces, so the file can be compared with T5's line by line.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from softprompt.commands.flags import FormatArgs
from softprompt.data.records import HF_PREFIX, QAExample, load_examples, load_hf_dataset
from softprompt.tasks.squad.text import Punctuation, format_input, format_target
from softprompt.tasks.text.task import TaskSpec, load_task_examples, task_from_flags

__all__ = ["format_lines", "run", "write_formatted"]


def run(args: FormatArgs) -> int:
    """Write the formatted lines of the data the flags name and say how many; return 0."""
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


def format_lines(examples: Iterable[QAExample], punctuation: Punctuation | str) -> Iterator[str]:
    """One JSON line ``{"id", "inputs", "targets"}`` per question (no trailing newline).

    Args:
        examples: The questions, in the order to write them.
        punctuation: ``paper``, ``current`` or ``none`` (see :class:`~softprompt.tasks.squad.text.Punctuation`).

    Yields:
        The lines; non-ASCII characters are written as themselves, as T5's files hold them.
    """
    style = Punctuation(punctuation)
    for ex in examples:
        row = {
            "id": ex.id,
            "inputs": format_input(ex.question, ex.context, style),
            "targets": format_target(ex.answers[0], style),
        }
        yield json.dumps(row, ensure_ascii=False)


def write_formatted(
    data: str | None,
    output: str | Path,
    *,
    punctuation: Punctuation | str = Punctuation.PAPER,
    dataset_name: str | None = None,
    split: str = "validation",
    skip_bad_examples: bool = False,
    max_samples: int | None = None,
    task: TaskSpec | None = None,
    dataset_config: str | None = None,
) -> tuple[int, Counter[str]]:
    """Load questions like ``train`` does and write their model text to ``output`` (atomically).

    Args:
        data: A SQuAD v1.1 JSON or MRQA ``.jsonl(.gz)`` file, or ``hf:NAME``; ignored with ``dataset_name``.
        output: The ``.jsonl`` file to write.
        punctuation: The text format.
        dataset_name: A Hugging Face dataset with SQuAD columns, instead of ``data``.
        split: The split of a Hugging Face dataset.
        skip_bad_examples: Drop malformed questions (counted) instead of stopping at the first.
        max_samples: Write only the first N questions.
        task: A text task (its templates make the lines); None for SQuAD-shaped QA.
        dataset_config: The configuration of a Hugging Face dataset (a text task's default: its own).

    Returns:
        The number of lines written, and the dropped questions by kind.
    """
    from softprompt.io.atomic import atomic_write_text

    stats: Counter[str] = Counter()
    if task is not None:
        source = HF_PREFIX + dataset_name if dataset_name else data
        texts = load_task_examples(
            task, source, split=split, config=dataset_config, skip_bad=skip_bad_examples, stats=stats
        )
        rows = [{"id": ex.id, "inputs": ex.inputs, "targets": ex.targets[0]} for ex in texts[:max_samples]]
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        atomic_write_text(output, "".join(line + "\n" for line in lines))
        return len(lines), stats
    if dataset_name:
        examples = load_hf_dataset(dataset_name, split, skip_bad=skip_bad_examples, stats=stats)
    else:
        if not data:
            raise ValueError("write_formatted needs data or dataset_name")
        examples = load_examples(data, split=split, skip_bad=skip_bad_examples, stats=stats)
    if max_samples is not None:
        examples = examples[:max_samples]
    lines = list(format_lines(examples, punctuation))
    atomic_write_text(output, "".join(line + "\n" for line in lines))
    return len(lines), stats
