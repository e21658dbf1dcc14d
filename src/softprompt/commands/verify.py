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
    if damaged:
        print(
            f"softprompt verify: damaged: {', '.join(damaged)}; `softprompt train --output_dir {out} --resume` "
            "continues from the newest checkpoint that verifies",
            file=sys.stderr,
        )
        return 1
    return 0
