"""`softprompt export`: write a prompt checkpoint in another library's format (a PEFT prompt-tuning adapter)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from softprompt.commands.flags import ExportArgs
from softprompt.errors import UserError
from softprompt.io.atomic import atomic_dir, refuse_overlap
from softprompt.io.checkpoint import load_prompt
from softprompt.io.peft_format import write_adapter


def run(args: ExportArgs) -> int:
    """Write PROMPT_DIR as a PEFT adapter at OUTPUT_DIR (atomically) and say what was written.

    Returns:
        0.

    Raises:
        UserError: OUTPUT_DIR exists and --overwrite was not given, OUTPUT_DIR contains PROMPT_DIR or
            lies inside it, or the prompt cannot be read.
    """
    out = Path(args.output_dir)
    refuse_overlap(args.prompt_dir, out, "OUTPUT_DIR")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or choose another OUTPUT_DIR")
    weight, config = load_prompt(args.prompt_dir)
    with atomic_dir(out) as tmp:
        write_adapter(tmp, weight, asdict(config))
    print(
        f"wrote {out} (PEFT prompt-tuning adapter, {weight.shape[0]} virtual tokens for {config.base_model})"
    )
    return 0
