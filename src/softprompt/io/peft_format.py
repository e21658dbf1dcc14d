"""Soft prompts as PEFT prompt-tuning adapters: the file format, both ways.

A PEFT prompt-tuning adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`
(one tensor `prompt_embeddings`, [num_virtual_tokens * num_transformer_submodules, token_dim]).

How PEFT uses it on T5 (`PeftModelForSeq2SeqLM`, PEFT >= 0.4, huggingface/peft#519): in both `forward`
and `generate`, prompt tuning prepends the first `num_virtual_tokens` rows to the encoder's input
embeddings and extends the attention mask with ones; the decoder gets no prompt. That is exactly
softprompt's prompt (the paper's, encoder side only). With `num_transformer_submodules` 2 (PEFT's
default for seq2seq) the table holds `num_virtual_tokens` more rows that prompt tuning never feeds to the
model, so those are dropped on import; softprompt exports with 1, which allocates none.

What PEFT cannot say about a prompt (its input template, text format, lengths, init) travels beside the
adapter in `softprompt_prompt_config.json`; an adapter trained with PEFT has none and gets the defaults
(override them with --punctuation / --max_source_length).

This module knows only the files: no PEFT import (it is not needed to read or write them), and no
softprompt module but `errors`, so `checkpoint.load_prompt` can read adapters where it reads prompts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from softprompt.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The softprompt settings PEFT has no field for (a `PromptConfig` as JSON).
SETTINGS = "softprompt_prompt_config.json"
WEIGHT_KEY = "prompt_embeddings"
TASK_TYPE = "SEQ_2_SEQ_LM"
PEFT_TYPE = "PROMPT_TUNING"


#: safetensors dtype names of floating-point tensors: a prompt holds vectors, never integers.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def read_prompt_tensor(path: Path, key: str, shape: tuple[int, int], advice: str) -> torch.Tensor:
    """The one tensor `key` of the safetensors file `path`, checked before and after it is read.

    The header is read first, so a tensor of the wrong shape (a 4,096-row table next to a config of 5
    tokens) is refused without loading it; then its values must be finite, since NaN or inf in a prompt
    makes every answer empty.

    Args:
        path: the safetensors file.
        key: the one tensor it must hold.
        shape: the shape its config promises.
        advice: what to do, for the error message.

    Returns:
        The tensor as float32.

    Raises:
        CheckpointError: unreadable, other or more tensors, another shape, an integer dtype, NaN or inf.
    """
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in keys}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); {advice}") from None
    found = ", ".join(f"{k!r} {s} {d}" for k, (s, d) in header.items()) or "nothing"
    if keys != [key] or header[key][0] != shape:
        raise CheckpointError(
            f"{path} must hold one tensor {key!r} of shape {shape} as its config says, found {found}; {advice}"
        )
    if header[key][1] not in FLOAT_DTYPES:
        raise CheckpointError(f"{path}: the tensor {key!r} is {header[key][1]}, not floating point; {advice}")
    try:
        tensor = load_file(str(path))[key]
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); {advice}") from None
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise CheckpointError(f"{path}: {bad} values of {key!r} are NaN or infinite; {advice}")
    return tensor.float()


def read_json_object(path: Path, what: str, advice: str) -> dict[str, Any]:
    """A JSON file that must hold an object, with every failure (deep nesting and huge integers too) one line.

    Raises:
        CheckpointError: names `path` and says `advice`.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable {what} ({e}); {advice}") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not a readable {what} (it nests too deeply); {advice}") from None
    except ValueError:  # an integer literal past Python's 4,300-digit limit
        raise CheckpointError(f"{path} is not a readable {what} (an integer is too long); {advice}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a readable {what} (not a JSON object); {advice}")
    return raw


def is_peft_adapter(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a PEFT adapter (of any kind: `read_config` refuses the wrong ones)."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def _refuse(directory: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{directory / ADAPTER_CONFIG}: {why}; softprompt reads only PEFT prompt-tuning adapters of "
        f"encoder-decoder models (peft_type {PEFT_TYPE}, task_type {TASK_TYPE}), whose prompt goes to the encoder"
    )


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The `PromptConfig` fields of a PEFT prompt-tuning adapter, refusing what softprompt cannot represent.

    Returns:
        base_model, n_tokens, d_model, and the saved softprompt settings (`SETTINGS`) when present;
        `extra["peft_num_transformer_submodules"]` records how many row blocks the weights hold.

    Raises:
        CheckpointError: not a prompt-tuning adapter (LoRA, prefix tuning, P-tuning, ...), not seq2seq,
            a prompt with trained modules besides it, or an unreadable config.
    """
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    raw = read_json_object(path, "PEFT adapter config", "save the adapter again")
    peft_type, task_type = raw.get("peft_type"), raw.get("task_type")
    if peft_type != PEFT_TYPE:
        what = {
            "PREFIX_TUNING": "prefix tuning puts key/value prefixes into every layer, encoder and decoder",
            "P_TUNING": "P-tuning computes its prompt with an encoder network",
            "MULTITASK_PROMPT_TUNING": "multitask prompt tuning also prompts the decoder",
        }.get(str(peft_type), "it changes model weights, not the input")
        raise _refuse(directory, f"it is a {peft_type} adapter ({what})")
    if task_type != TASK_TYPE:
        raise _refuse(directory, f"its task_type is {task_type}, not an encoder-decoder {TASK_TYPE} prompt")
    if raw.get("modules_to_save"):
        raise _refuse(
            directory, f"it also trains modules_to_save {raw['modules_to_save']}, which a prompt cannot hold"
        )
    n_tokens, d_model = raw.get("num_virtual_tokens"), raw.get("token_dim")
    submodules = raw.get("num_transformer_submodules") or 2  # PEFT's default for seq2seq when unset
    for name, value in (("num_virtual_tokens", n_tokens), ("token_dim", d_model)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{path}: {name} must be a positive integer, got {value!r}")
    if submodules not in (1, 2):
        raise CheckpointError(f"{path}: num_transformer_submodules must be 1 or 2, got {submodules!r}")
    fields: dict[str, Any] = {}
    settings = directory / SETTINGS
    if settings.is_file():
        fields.update(read_json_object(settings, "softprompt prompt config", "delete it to use the defaults"))
    extra = fields.get("extra") if isinstance(fields.get("extra"), dict) else {}
    if "extra" in fields and not isinstance(fields["extra"], dict):
        raise CheckpointError(
            f"{settings}: extra must be a JSON object, got {type(fields['extra']).__name__}"
        )
    extra = dict(extra)
    extra["peft_num_transformer_submodules"] = submodules
    base = raw.get("base_model_name_or_path") or fields.get("base_model") or "unknown"
    fields.update(base_model=base, n_tokens=n_tokens, d_model=d_model, extra=extra)
    fields.setdefault("init", "peft")
    return fields


def read_weight(directory: str | os.PathLike, n_tokens: int, d_model: int, submodules: int) -> torch.Tensor:
    """The encoder prompt of a PEFT prompt-tuning adapter.

    Returns:
        prompt: [P, H] float32, the first `n_tokens` rows of `prompt_embeddings` (the rows PEFT feeds
        to T5's encoder).
    """
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = Path(directory) / "adapter_model.bin"
        if pickled.exists():
            raise CheckpointError(
                f"{directory} has only {pickled.name}, a pickle; softprompt never unpickles files because they "
                "can run code, so re-save the adapter with save_pretrained(..., safe_serialization=True)"
            )
        raise CheckpointError(f"{directory} is a PEFT adapter without {ADAPTER_WEIGHTS}")
    expected = (n_tokens * submodules, d_model)
    advice = "its rows are num_virtual_tokens x num_transformer_submodules, its width token_dim"
    weight = read_prompt_tensor(path, WEIGHT_KEY, expected, advice)
    return weight[:n_tokens].contiguous()


def write_adapter(directory: str | os.PathLike, weight: torch.Tensor, settings: Mapping[str, Any]) -> None:
    """Write a prompt as a PEFT prompt-tuning adapter into an existing directory.

    `PeftModel.from_pretrained(base_model, directory)` then prepends it to the encoder's input as
    softprompt does (one row block: `num_transformer_submodules` 1, no decoder rows).

    Args:
        directory: where to write (the caller makes the write atomic).
        weight: prompt [P, H].
        settings: the prompt's `PromptConfig` as a dict (base_model names the adapter's base model).
    """
    directory = Path(directory)
    weight = weight.detach().to("cpu", torch.float32).contiguous()
    n_tokens, d_model = weight.shape
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": TASK_TYPE,
        "base_model_name_or_path": settings["base_model"],
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": n_tokens,
        "token_dim": d_model,
        "num_transformer_submodules": 1,
        "num_attention_heads": None,
        "num_layers": None,
        "modules_to_save": None,
        # The weights are stored; PEFT's init never runs on them (TEXT would need a tokenizer to load).
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    }
    save_file({WEIGHT_KEY: weight}, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / SETTINGS).write_text(json.dumps(dict(settings), indent=2) + "\n", encoding="utf-8")
