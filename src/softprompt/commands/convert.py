"""`softprompt convert MODEL OUT_DIR`: a safetensors copy of a model that publishes only pickle weights.

What a cluster does once before an FSDP or multi-node job: every rank then reads safetensors
(memory-mapped, no unpickling at all) from one shared directory instead of each unpickling
`pytorch_model.bin`. The output is a normal Hugging Face model directory (`config.json`,
`generation_config.json`, `model.safetensors`, the tokenizer), written to a temporary sibling and
renamed into place, so an interrupted conversion leaves nothing half-written at OUT_DIR.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from softprompt.commands.flags import ConvertArgs
from softprompt.errors import UserError
from softprompt.io.atomic import atomic_dir, refuse_overlap
from softprompt.io.checkpoint import CONVERTED_FROM, model_fingerprint, save_t5
from softprompt.io.pretrained import model_file
from softprompt.modeling.model import load_t5, load_tokenizer


def run(args: ConvertArgs) -> int:
    """Convert MODEL into OUT_DIR and say where; return 0."""
    print(f"wrote {convert(args.model, args.out_dir, overwrite=args.overwrite)}")
    return 0


def convert(model: str, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `model` (Hub id or directory) as a Hugging Face directory with safetensors weights.

    The weights are read as `load_t5` reads them (safetensors, or a published `pytorch_model.bin`
    through `torch.load(weights_only=True)`) and written unchanged, in their stored dtype, with an
    untied `lm_head` kept as its own tensor.

    Args:
        model: a Hub id such as `google/t5-v1_1-base` (or its Hub cache offline), or a directory.
        out_dir: the directory to create.
        overwrite: replace `out_dir` if it already exists.

    Returns:
        `out_dir`.

    Raises:
        UserError: `out_dir` exists (without `overwrite`), or is, contains or lies inside the model's directory.
    """
    out = Path(out_dir)
    if Path(model).is_dir():
        refuse_overlap(model, out, "OUT_DIR")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose a new OUT_DIR or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose a new OUT_DIR")
    tokenizer = load_tokenizer(model)
    t5 = load_t5(model)
    fingerprint = model_fingerprint(model)
    spiece = model_file(model, "spiece.model")
    with atomic_dir(out) as tmp:
        save_t5(tmp, t5)
        tokenizer.save_pretrained(tmp)
        if spiece is not None and not (tmp / spiece.name).exists():
            shutil.copyfile(spiece, tmp / spiece.name)  # for readers of the SentencePiece model itself
        if fingerprint is not None:
            # Prompts trained on the source accept this copy: same tensors, re-encoded.
            record = {"model": str(model), "fingerprint": fingerprint}
            (tmp / CONVERTED_FROM).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out
