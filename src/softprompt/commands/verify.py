"""`softprompt verify`: check every checkpoint of a run directory against its manifest."""

from __future__ import annotations

import sys
from pathlib import Path

from softprompt.commands.flags import VerifyArgs
from softprompt.io import rundir
from softprompt.io.atomic import write_output_json


def run(args: VerifyArgs) -> int:
    """Print one line per checkpoint (ok, unverified or damaged); exit 1 when any is damaged.

    With --output, the verdicts are also written as JSON: {checkpoint: {"status", "detail"}}.
    """
    out = Path(args.run_dir)
    rows = rundir.verify_run(out)
    print(rundir.verify_table(out, rows))
    if args.output:
        write_output_json(args.output, {name: {"status": v.status, "detail": v.detail} for name, v in rows})
    damaged = [name for name, v in rows if not v.usable]
    checkpoints = [name for name in damaged if name != rundir.BEST]
    if checkpoints:
        print(
            f"softprompt verify: damaged: {', '.join(checkpoints)}; `softprompt train --output_dir {out} --resume` "
            "continues from the newest checkpoint that verifies",
            file=sys.stderr,
        )
    if rundir.BEST in damaged:
        # --resume rewrites best/ only when a later evaluation beats it, so it does not repair it.
        print(
            f"softprompt verify: damaged: {rundir.BEST}; --resume does not rewrite it: restore {out / rundir.BEST} "
            f"from a copy, or use {out / rundir.LAST} (the newest checkpoint) instead",
            file=sys.stderr,
        )
    return 1 if damaged else 0
