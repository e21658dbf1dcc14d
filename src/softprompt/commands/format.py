"""`softprompt format`: write the exact text the model sees, one example a line, for users to inspect.

Each line is ``{"id", "inputs", "targets"}`` (`Task.format_row`): for SQuAD the same fields (and, for
``paper``/``current``, the same strings) as T5's own ``squad`` preprocessor produces, so the file can be
compared with T5's line by line; for a text task its filled input template and first target.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from softprompt.commands.flags import FormatArgs
from softprompt.data.records import HF_PREFIX
from softprompt.io.atomic import STDOUT, write_output_text
from softprompt.tasks.base import Task
from softprompt.tasks.resolve import resolve_task

__all__ = ["run", "write_formatted"]


def run(args: FormatArgs) -> int:
    """Write the formatted lines of the data the flags name and say how many; return 0."""
    task = resolve_task(args, punctuation=args.punctuation)
    n, skipped = write_formatted(
        task,
        args.data,
        args.output,
        dataset_name=args.dataset_name,
        split=args.split,
        skip_bad_examples=args.skip_bad_examples,
        max_samples=args.max_samples,
        dataset_config=args.dataset_config,
    )
    noun = task.example_noun
    noun = noun[:-1] if n == 1 and noun.endswith("s") else noun  # "wrote 1 example"
    where = "stdout" if args.output == STDOUT else args.output
    # With --output -, stdout holds the lines themselves: the tally goes to stderr.
    print(
        f"wrote {n:,} {noun} to {where}" + (f"; skipped {dict(skipped)}" if skipped else ""),
        file=sys.stderr if args.output == STDOUT else sys.stdout,
    )
    return 0


def write_formatted(
    task: Task,
    data: str | None,
    output: str | Path,
    *,
    dataset_name: str | None = None,
    split: str = "validation",
    skip_bad_examples: bool = False,
    max_samples: int | None = None,
    dataset_config: str | None = None,
) -> tuple[int, Counter[str]]:
    """Load a task's examples like ``train`` does and write their model text to ``output`` (atomically).

    Args:
        task: The task (SQuAD in its punctuation, or a text task): it reads the data and writes the text.
        data: A data file of the task, or ``hf:NAME``; ignored with ``dataset_name``; None: the task's own
            data set.
        output: The ``.jsonl`` file to write (``-``: stdout); non-ASCII characters are written as themselves, as T5's
            files hold them.
        dataset_name: A Hugging Face dataset, instead of ``data``.
        split: The split of a Hugging Face dataset.
        skip_bad_examples: Drop malformed records (counted) instead of stopping at the first.
        max_samples: Write only the first N examples.
        dataset_config: The configuration of a Hugging Face dataset (a text task's default: its own).

    Returns:
        The number of lines written, and the dropped records by kind.
    """
    source = HF_PREFIX + dataset_name if dataset_name else data
    if source is None and not task.has_own_dataset:
        raise ValueError("write_formatted needs data or dataset_name")
    stats: Counter[str] = Counter()
    examples = task.load(source, split=split, config=dataset_config, skip_bad=skip_bad_examples, stats=stats)
    lines = [json.dumps(task.format_row(ex), ensure_ascii=False) for ex in examples[:max_samples]]
    write_output_text(output, "".join(line + "\n" for line in lines))
    return len(lines), stats
