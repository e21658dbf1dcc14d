"""`softprompt report`: learning curves and tables comparing run directories."""

from __future__ import annotations

from pathlib import Path

from softprompt.commands.flags import ReportArgs
from softprompt.training.report import make_report


def run(args: ReportArgs) -> int:
    """Write the report of the run directories into --output_dir and say where; return 0."""
    path = make_report([Path(d) for d in args.run_dirs], Path(args.output_dir))
    print(f"wrote {path}")
    return 0
