"""Where a base model's files come from, and how its weights are read without running code.

A model is named by a local directory or a Hub id (`google/t5-base-lm-adapt`). Weights are read from
safetensors whenever the model has them. The seed's own checkpoints (`google/t5-*-lm-adapt`,
`google/t5-v1_1-*`) publish only `pytorch_model.bin`: that file, and only that file (or the shards its
`pytorch_model.bin.index.json` names), is read with `torch.load(weights_only=True)`, PyTorch's
restricted unpickler, which builds tensors and plain containers and never runs code from the file.
Every other pickle (`.pt`, `.pkl`, `.ckpt`, ...) is refused.

A Hub id is resolved file by file with `huggingface_hub.hf_hub_download` at the `main` revision (from
the cache alone under `HF_HUB_OFFLINE=1`), and the model is then built from that local snapshot.
transformers never sees the Hub id, so it can neither ask the Hub's conversion service to convert
the weights (which opens a pull request on the model's repository) nor quietly take them from a
conversion pull request (`refs/pr/N`) instead of `main`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError
from transformers import AutoConfig, GenerationConfig, T5ForConditionalGeneration

from softprompt.errors import CheckpointError
from softprompt.io.checkpoint import PICKLE_SUFFIXES, torch_load_safe

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
"""The one pickle softprompt reads: a published base model's weights, through the restricted unpickler."""
PICKLE_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"

# `owner/name` or `name`, as the Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class ModelFiles:
    """A model's files on this machine.

    Attributes:
        name: the model as the user named it (Hub id or path).
        directory: the local directory holding `config.json` (the Hub cache's snapshot for a Hub id).
        weights: the weight files, in shard order.
        safetensors: whether `weights` are safetensors (else `pytorch_model.bin` shards).
    """

    name: str
    directory: Path
    weights: tuple[Path, ...]
    safetensors: bool


def is_hub_id(name_or_path: str | os.PathLike) -> bool:
    """Whether `name_or_path` names a Hub repository rather than a local directory."""
    text = str(name_or_path)
    return not Path(text).exists() and bool(_HUB_ID.match(text)) and not text.startswith(".")


def resolve_model_files(name_or_path: str | os.PathLike) -> ModelFiles:
    """Find a model's config and weights: safetensors first, else `pytorch_model.bin`.

    Args:
        name_or_path: a local directory, or a Hub id (downloaded to, or read from, the Hub cache).

    Returns:
        The files, all on local disk.

    Raises:
        CheckpointError: no such model, no weights, or only pickles other than `pytorch_model.bin`.
    """
    if Path(name_or_path).is_dir():
        return _resolve_local(str(name_or_path), Path(name_or_path))
    if is_hub_id(name_or_path):
        return _resolve_hub(str(name_or_path))
    raise CheckpointError(
        f"{name_or_path} is neither a directory nor a Hub id such as google/t5-base-lm-adapt"
    )


def _shards(index_file: Path, suffix: str) -> list[str]:
    """The shard file names an index lists, refusing names that leave the model's directory."""
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_file} is not a valid weight index ({e})") from None
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or not n.endswith(suffix)]
    if bad or not names:
        raise CheckpointError(
            f"{index_file} must list {suffix} shard files inside its directory, got {bad[:3]}"
        )
    return names


def _resolve_local(name: str, directory: Path) -> ModelFiles:
    if (directory / SAFE_WEIGHTS).is_file():
        return ModelFiles(name, directory, (directory / SAFE_WEIGHTS,), True)
    if (directory / SAFE_INDEX).is_file():
        shards = tuple(directory / n for n in _shards(directory / SAFE_INDEX, ".safetensors"))
        return ModelFiles(name, directory, shards, True)
    if (directory / PICKLE_WEIGHTS).is_file():
        return ModelFiles(name, directory, (directory / PICKLE_WEIGHTS,), False)
    if (directory / PICKLE_INDEX).is_file():
        shards = tuple(directory / n for n in _shards(directory / PICKLE_INDEX, ".bin"))
        return ModelFiles(name, directory, shards, False)
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights ({', '.join(pickles)}); softprompt reads model.safetensors, "
            f"or a published {PICKLE_WEIGHTS} through torch.load(weights_only=True), and never unpickles "
            "other files, so re-save the weights with safetensors (model.save_pretrained(dir))"
        )
    hint = (
        "add --random_init to build it with random weights from its config.json"
        if (directory / CONFIG).exists()
        else "give a Hugging Face model directory (config.json + model.safetensors)"
    )
    raise CheckpointError(f"{directory} holds no model weights ({SAFE_WEIGHTS} or {PICKLE_WEIGHTS}): {hint}")


def _hub_file(repo_id: str, filename: str) -> Path | None:
    """One file of the repository's `main` revision, downloaded or from the cache; None if it has none.

    Raises:
        CheckpointError: the repository is unknown, gated, unreachable, or not in the cache while
            offline (for `config.json`, which every model has).
    """
    try:
        return Path(hf_hub_download(repo_id, filename))
    except EntryNotFoundError as e:
        if filename != CONFIG:
            return None  # a 404 online, or a file the cache lacks offline: the caller tries the next one
        if hub_constants.is_offline_mode():
            raise CheckpointError(
                f"{repo_id} is not a local directory, and not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) "
                "while HF_HUB_OFFLINE=1: "
                f"download it once where the Hub is reachable (`hf download {repo_id}`) and point HF_HUB_CACHE "
                "at that cache, or give a local directory"
            ) from None
        if isinstance(e, LocalEntryNotFoundError):
            raise CheckpointError(
                f"{repo_id} is not a local directory, and not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) "
                "while the Hub cannot be reached: check your connection, or give a local directory"
            ) from None
        raise CheckpointError(f"{repo_id} has no {CONFIG}: it is not a transformers model") from None
    except (HFValidationError, OSError, ValueError) as e:  # unknown or gated repo, network errors
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"could not fetch {filename} of {repo_id} from the Hub ({first})") from None


def _resolve_hub(repo_id: str) -> ModelFiles:
    directory = _hub_file(repo_id, CONFIG).parent  # type: ignore[union-attr]  # raises when absent
    _hub_file(repo_id, GENERATION_CONFIG)  # into the snapshot, if the model has one
    for index, weights, suffix in (
        (SAFE_INDEX, SAFE_WEIGHTS, ".safetensors"),
        (PICKLE_INDEX, PICKLE_WEIGHTS, ".bin"),
    ):
        single = _hub_file(repo_id, weights)
        if single is not None:
            return ModelFiles(repo_id, single.parent, (single,), suffix == ".safetensors")
        index_file = _hub_file(repo_id, index)
        if index_file is not None:
            shards = []
            for shard in _shards(index_file, suffix):
                path = _hub_file(repo_id, shard)
                if path is None:
                    raise CheckpointError(
                        f"{repo_id}: {index} lists {shard}, which the repository does not have"
                    )
                shards.append(path)
            return ModelFiles(repo_id, index_file.parent, tuple(shards), suffix == ".safetensors")
    offline = " in the Hugging Face cache (HF_HUB_OFFLINE=1)" if hub_constants.is_offline_mode() else ""
    raise CheckpointError(
        f"{repo_id} has no {SAFE_WEIGHTS} or {PICKLE_WEIGHTS}{offline} ({directory}); "
        "download its weights, or give a local Hugging Face model directory"
    )


def model_file(name_or_path: str | os.PathLike, filename: str) -> Path | None:
    """One more file of a model (e.g. `spiece.model`) on local disk, or None if the model has none."""
    if Path(name_or_path).is_dir():
        path = Path(name_or_path) / filename
        return path if path.is_file() else None
    return _hub_file(str(name_or_path), filename)


def read_pickle_weights(files: ModelFiles) -> dict[str, torch.Tensor]:
    """Read `pytorch_model.bin` shards with `torch.load(weights_only=True)`, memory-mapped where possible.

    Raises:
        CheckpointError: a file holds anything but tensors and plain containers (it is not executed).
    """
    state: dict[str, torch.Tensor] = {}
    for path in files.weights:
        if path.name != PICKLE_WEIGHTS and not re.fullmatch(r"pytorch_model-\d+-of-\d+\.bin", path.name):
            raise CheckpointError(
                f"refusing to load {path}: only {PICKLE_WEIGHTS} (and its shards) is ever unpickled"
            )
        # mmap needs the zip format of torch >= 1.6; older files are read into memory.
        part = torch_load_safe(path, mmap=zipfile.is_zipfile(path))
        if not isinstance(part, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in part.items()
        ):
            raise CheckpointError(f"{path} is not a state dict of named tensors")
        state.update(part)
    return state


_pickle_notice_given = False
"""Whether this process has said that it read a `pytorch_model.bin` with torch.load(weights_only=True)."""


class _DropUntieNotice(logging.Filter):
    """transformers 5 builds every T5 with its LM head tied to the embedding, then unties it when the
    checkpoint holds a different `lm_head.weight` (T5 1.1), warning each time that the config is wrong.
    The config is right (`tie_word_embeddings: false`); softprompt checks the head itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "both are present in the checkpoints with different values" not in record.getMessage()


def load_pretrained_t5(
    files: ModelFiles, *, dtype: torch.dtype | None = None, attn_implementation: str = "sdpa"
) -> T5ForConditionalGeneration:
    """Build the model from `files.directory`'s config and load its weights, every key checked.

    Args:
        files: from `resolve_model_files`.
        dtype: load the weights in this dtype (default: as stored).
        attn_implementation: `sdpa` or `eager`.

    Returns:
        The model, in eval mode, with exactly the checkpoint's weights (an untied `lm_head` stays untied).
    """
    hf_logger = logging.getLogger("transformers.modeling_utils")
    notice = _DropUntieNotice()
    hf_logger.addFilter(notice)
    state = None
    try:
        if files.safetensors:
            # A local directory: transformers reads it without any Hub call.
            model, info = T5ForConditionalGeneration.from_pretrained(
                str(files.directory),
                use_safetensors=True,
                dtype=dtype,
                attn_implementation=attn_implementation,
                output_loading_info=True,
            )
        else:
            state = read_pickle_weights(files)
            config = AutoConfig.from_pretrained(str(files.directory))
            model, info = T5ForConditionalGeneration.from_pretrained(
                None,
                config=config,
                state_dict=state,
                dtype=dtype,
                attn_implementation=attn_implementation,
                output_loading_info=True,
            )
            if (files.directory / GENERATION_CONFIG).is_file():
                model.generation_config = GenerationConfig.from_pretrained(str(files.directory))
    except SafetensorError as e:
        # Safetensors are preferred over a pickle beside them, so a broken one is never skipped silently.
        names = ", ".join(p.name for p in files.weights)
        raise CheckpointError(
            f"could not load a T5 model from {files.name}: its safetensors weights ({names}) are damaged "
            f"({str(e).strip().splitlines()[0][:160]}); download them again, or delete them to use a "
            "pytorch_model.bin beside them"
        ) from None
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"could not load a T5 model from {files.name} ({str(e).strip().splitlines()[0][:160]})"
        ) from None
    finally:
        hf_logger.removeFilter(notice)
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        shown = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:3]))}" for k, v in problems.items())
        raise CheckpointError(f"the weights of {files.name} do not fit its config.json ({shown})")
    if state is not None and "lm_head.weight" in state:
        head = state["lm_head.weight"].to(model.lm_head.weight.dtype)
        if not torch.equal(model.lm_head.weight.detach(), head):
            raise CheckpointError(f"{files.name}: the loaded lm_head differs from the checkpoint's")
    global _pickle_notice_given
    if state is not None and not _pickle_notice_given and os.environ.get("RANK", "0") == "0":
        # Once per process: a command that loads the model again (train's final evaluation, the demo's
        # steps) has said it already; a safetensors load never gets here (state is None).
        _pickle_notice_given = True
        names = ", ".join(p.name for p in files.weights)
        print(
            f"softprompt: {files.name} has no safetensors weights; read {names} with torch.load(weights_only=True), "
            "which builds tensors and runs no code (`softprompt convert` writes a safetensors copy)",
            file=sys.stderr,
            flush=True,
        )
    return model.eval()
