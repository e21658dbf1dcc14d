"""`softprompt score`: the official SQuAD v1.1 evaluator (also reads MRQA .jsonl), and its script twin.

`python -m softprompt.commands.score DATASET PREDICTIONS` runs `main`, which reports bad input as the
official script's users expect (`error: ...`, no `softprompt score:` prefix).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from softprompt.commands.flags import ScoreArgs
from softprompt.config.parser import parse
from softprompt.errors import DataError
from softprompt.tasks.metrics.squad import evaluate_file

MAX_LISTED = 10


def run(args: ScoreArgs) -> int:
    """Print `{"exact_match": ..., "f1": ...}` of the predictions against the gold answers; return 0."""
    # softprompt's own command lists a few unanswered questions and counts the rest; the script twin
    # (`main`) lists every one, as the official script does.
    result = evaluate_file(
        args.dataset_file, args.prediction_file, only_predicted=args.only_predicted, max_listed=MAX_LISTED
    )
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line twin of the official script: ``python -m softprompt.commands.score DATASET PREDICTIONS``.

    The flags are `softprompt score`'s, parsed the same way.

    Args:
        argv: The arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The process exit status: 0 on success, the DataError exit code on bad input.
    """
    args = parse(
        ScoreArgs, list(sys.argv[1:] if argv is None else argv), "python -m softprompt.commands.score"
    )
    try:
        result = evaluate_file(args.dataset_file, args.prediction_file, only_predicted=args.only_predicted)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
