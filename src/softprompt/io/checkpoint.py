"""The formats of softprompt's files: prompt checkpoints, tensors, the trainer's resumable tensors.

This module knows what is inside a file and how to write one atomically; `softprompt.io.rundir` owns the
run directory around them (file names, the lock, manifests, publishing and choosing checkpoints).
Every prompt softprompt writes goes through `write_prompt_files` (`save_prompt` wraps it in its own
directory). Every write goes to a temporary sibling, is fsynced, then renamed into place, so a run
killed at any moment leaves either the old file or the new one, never half of one; a failed write
raises `OSError` naming the file (safetensors' own error type is translated). Weights are read
from safetensors only; the trainer's small state file is read with `torch.load(weights_only=True)`.
The one other pickle softprompt reads is a published base model's `pytorch_model.bin`, also with
`weights_only=True` (softprompt.io.pretrained); every other pickle (`PICKLE_SUFFIXES`) is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import textwrap
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from softprompt import __version__
from softprompt.errors import CheckpointError
from softprompt.io import peft_format
from softprompt.io.atomic import atomic_dir, atomic_write_text
from softprompt.io.rundir import BEST, is_run_dir

PROMPT_WEIGHTS = "prompt.safetensors"
PROMPT_CONFIG = "prompt_config.json"
DEFAULT_TEMPLATE = "question: {question} context: {context}"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: The `PromptConfig.extra` key of a prompt trained on random weights (--random_init): the seed that built
#: them, which identifies that base model as a fingerprint identifies real weights.
RANDOM_INIT_SEED = "random_init_seed"


@dataclass
class PromptConfig:
    """What a prompt needs to be used again: the model it was trained for and how inputs were written."""

    base_model: str
    """Hub id or path of the frozen model the prompt was trained on."""
    n_tokens: int
    """P, the number of prompt vectors."""
    d_model: int
    """Width of each vector; must equal the model's d_model."""
    init: str = "sampled_vocab"
    """How the prompt was initialised."""
    input_template: str = DEFAULT_TEMPLATE
    """How a question and context were written as the model's input."""
    punctuation: str = "none"
    """The text format of inputs and targets: paper, current or none (see softprompt.tasks.squad.text.Punctuation)."""
    max_source_length: int = 512
    """Text tokens of input kept (the prompt comes on top)."""
    max_target_length: int = 32
    """Longest answer in tokens."""
    softprompt_version: str = __version__
    """The softprompt release that wrote the prompt."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (dev scores, step)."""
    task: dict[str, Any] | None = None
    """The text task the prompt was trained on (``Task.to_dict()`` in softprompt.tasks: templates, labels,
    metric); None for SQuAD-shaped QA. eval, predict and serve write inputs with it."""


def save_prompt(directory: str | os.PathLike, weight: torch.Tensor, config: PromptConfig) -> Path:
    """Save a prompt as its own checkpoint directory, atomically (see `write_prompt_files`).

    Returns:
        The checkpoint directory.
    """
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        write_prompt_files(tmp, weight, config)
    return directory


def write_prompt_files(directory: Path, weight: torch.Tensor, config: PromptConfig) -> None:
    """Write a prompt's two files into `directory`, a temporary directory its caller publishes:
    `prompt.safetensors` (one float32 tensor `prompt`, [P, H]) and `prompt_config.json`.

    Every prompt softprompt writes goes through here.
    """
    weight = weight.detach().to("cpu", torch.float32).contiguous()
    if tuple(weight.shape) != (config.n_tokens, config.d_model):
        raise ValueError(f"prompt shape {tuple(weight.shape)} != ({config.n_tokens}, {config.d_model})")
    save_tensors(directory / PROMPT_WEIGHTS, {"prompt": weight})
    atomic_write_text(directory / PROMPT_CONFIG, json.dumps(asdict(config), indent=2) + "\n")


def refuse_pickles(directory: Path, wanted: str) -> None:
    """Raise a clear error when `wanted` is missing, mentioning pickle files we will not load."""
    if (directory / wanted).exists():
        return
    pickles = (
        sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if directory.is_dir()
        else []
    )
    if pickles:
        raise CheckpointError(
            f"{directory} has no {wanted}, only pickle files ({', '.join(pickles)}); softprompt never unpickles "
            "files because they can run code, so re-save the weights with safetensors"
        )
    raise CheckpointError(f"{directory} is not a softprompt checkpoint: {wanted} is missing")


#: The largest number a prompt config may hold in a size field: far past any T5 (d_model 4,096, P 100s).
MAX_PROMPT_SIZE = 1 << 20
_SIZE_FIELDS = ("n_tokens", "d_model", "max_source_length", "max_target_length")
_TEXT_FIELDS = ("base_model", "init", "input_template", "softprompt_version")


def prompt_config_problems(raw: Mapping[str, Any]) -> list[str]:
    """Every field of a prompt config (as read from JSON) with the wrong type or out of range, one phrase each."""
    from softprompt.config.choices import Punctuation, values

    problems = []
    for name in _SIZE_FIELDS:
        if name in raw:
            v = raw[name]
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_PROMPT_SIZE:
                shown = repr(v)[:40] if not isinstance(v, int) or v.bit_length() < 64 else "a huge integer"
                problems.append(f"{name} must be an integer from 1 to {MAX_PROMPT_SIZE:,}, got {shown}")
    for name in _TEXT_FIELDS:
        if name in raw and not (isinstance(raw[name], str) and (raw[name] or name != "base_model")):
            problems.append(f"{name} must be a non-empty string, got {type(raw[name]).__name__}")
    if "punctuation" in raw and raw["punctuation"] not in values(Punctuation):
        shown = repr(raw["punctuation"])[:40]
        problems.append(f"punctuation must be one of {', '.join(values(Punctuation))}, got {shown}")
    if "extra" in raw and not isinstance(raw["extra"], dict):
        problems.append(f"extra must be a JSON object, got {type(raw['extra']).__name__}")
    if raw.get("task") is not None and not isinstance(raw["task"], dict):
        problems.append(
            f"task must be a JSON object (a text task's fields) or null, got {type(raw['task']).__name__}"
        )
    missing = [n for n in ("base_model", "n_tokens", "d_model") if n not in raw]
    if missing:
        problems.append(f"{', '.join(missing)} missing")
    return problems


def prompt_config_from(raw: Mapping[str, Any], where: Path) -> PromptConfig:
    """A `PromptConfig` from a JSON mapping, every field checked (`prompt_config_problems`).

    Raises:
        CheckpointError: one line naming `where` and every problem.
    """
    problems = prompt_config_problems(raw)
    if problems:
        raise CheckpointError(
            f"{where} is not a valid prompt config: {'; '.join(problems)}; re-save the prompt"
        )
    return PromptConfig(**{k: raw[k] for k in PromptConfig.__dataclass_fields__ if k in raw})


def load_prompt_config(directory: str | os.PathLike) -> PromptConfig:
    """Read `prompt_config.json` from a prompt checkpoint directory (or a PEFT prompt-tuning adapter's
    config, `softprompt.io.peft_format`), every field checked for its type and range.

    Raises:
        CheckpointError: one line naming the file and every bad field (deep nesting, huge numbers too).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"prompt checkpoint {directory} does not exist or is not a directory")
    if peft_format.is_peft_adapter(directory):
        fields = peft_format.read_config(directory)
        settings = directory / peft_format.SETTINGS
        where = settings if settings.is_file() else directory / peft_format.ADAPTER_CONFIG
        return prompt_config_from(fields, where)
    refuse_pickles(directory, PROMPT_CONFIG)
    path = directory / PROMPT_CONFIG
    raw = peft_format.read_json_object(path, "prompt config", "re-save the prompt")
    if "punctuation" not in raw and isinstance(raw.get("pad_punctuation"), bool):
        from softprompt.config.choices import LEGACY_PAD_PUNCTUATION

        # A prompt saved before the named formats: its boolean, read as the nearer T5 format.
        raw["punctuation"] = LEGACY_PAD_PUNCTUATION[raw["pad_punctuation"]]
    return prompt_config_from(raw, path)


def load_prompt(
    directory: str | os.PathLike,
    *,
    expect_d_model: int | None = None,
    expect_base_model: str | None = None,
    allow_other: bool = False,
    random_init_seed: int | None = None,
) -> tuple[torch.Tensor, PromptConfig]:
    """Load a prompt checkpoint, refusing anything but safetensors.

    Args:
        directory: a directory written by `save_prompt`, or a PEFT prompt-tuning adapter
            (`softprompt.io.peft_format`: its encoder prompt).
        expect_d_model: the width of the model it will drive; a mismatch is refused.
        expect_base_model: the model it will drive; a different model (by `same_model`) is refused.
        allow_other: warn instead of refusing a different base model.
        random_init_seed: the seed of the model's random weights (--random_init), None for real weights
            (those of `expect_base_model`); checked against what the prompt recorded
            (`random_weights_problem`) when either is given.

    Returns:
        prompt: [P, H] float32, and its `PromptConfig`.
    """
    directory = Path(directory)
    config = load_prompt_config(directory)
    if peft_format.is_peft_adapter(directory):
        submodules = config.extra["peft_num_transformer_submodules"]
        weight = peft_format.read_weight(directory, config.n_tokens, config.d_model, submodules)
    else:
        refuse_pickles(directory, PROMPT_WEIGHTS)
        weight = peft_format.read_prompt_tensor(
            directory / PROMPT_WEIGHTS, "prompt", (config.n_tokens, config.d_model), "re-save the prompt"
        )
    if expect_d_model is not None and weight.shape[1] != expect_d_model:
        raise CheckpointError(
            f"the prompt in {directory} is {weight.shape[1]} wide but the model's d_model is {expect_d_model}; "
            f"it was trained for {config.base_model}"
        )
    # Checked only where the caller names the model the prompt will drive (resume, export: nothing to check).
    checked = random_init_seed is not None or expect_base_model is not None
    problem = random_weights_problem(config, random_init_seed) if checked else None
    if (
        problem is None
        and expect_base_model is not None
        and not same_model(config.base_model, expect_base_model, config.extra.get("base_model_fingerprint"))
    ):
        problem = f"was trained for {config.base_model}, not {expect_base_model}"
    if problem is not None:
        message = f"the prompt in {directory} {problem}"
        if not allow_other:
            raise CheckpointError(
                f"{message} (their config or weights differ); load it with the model it was trained on, "
                "or pass --allow_other_base_model to use it anyway"
            )
        warn_other_model(message)
    return weight, config


def random_weights_problem(config: PromptConfig, random_init_seed: int | None) -> str | None:
    """Why a prompt does not fit a model's weights as random or real (None: it fits, or the prompt recorded
    nothing to tell): a prompt trained on random weights records their seed (`RANDOM_INIT_SEED`), one
    trained on real weights their fingerprint."""
    recorded = config.extra.get(RANDOM_INIT_SEED)
    if recorded is not None and random_init_seed is None:
        return f"was trained on random weights (--random_init --seed {recorded}), not on {config.base_model}'s own"
    if recorded is not None and recorded != random_init_seed:
        return f"was trained on random weights seeded {recorded}, not {random_init_seed} (pass --seed {recorded})"
    if recorded is None and random_init_seed is not None and config.extra.get("base_model_fingerprint"):
        return f"was trained on {config.base_model}'s own weights, not on random ones (drop --random_init)"
    return None


#: Written by `softprompt convert`: the model a directory was converted from and its fingerprint.
CONVERTED_FROM = "softprompt_converted_from.json"
# config.json keys that name a copy rather than describe the model.
_CONFIG_NOISE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")
_SAMPLE = 1 << 16


def _local_model_dir(name_or_path: str) -> Path | None:
    """The local folder of a model: the path itself, or a Hub id's snapshot in the local cache."""
    path = Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        return path
    try:
        from transformers.utils import cached_file

        found = cached_file(
            name_or_path,
            "config.json",
            local_files_only=True,  # never the network: a model not on this machine has no fingerprint
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except Exception:  # not a valid repo id: nothing local to fingerprint
        return None
    return Path(found).parent if isinstance(found, str) else None


def model_fingerprint(name_or_path: str) -> str | None:
    """A short hash of what identifies a model, independent of its folder's name.

    It covers the architecture in config.json and, for each weights file (safetensors, else
    pytorch_model*.bin), samples of its bytes at the start (a safetensors header: tensor names,
    shapes, dtypes, offsets), middle and end, so a renamed copy matches and another model in a folder
    of the same name does not. Reading it costs a few hundred KB even for T5-XXL. A Hub id is
    fingerprinted through its snapshot in the local Hub cache; None when the model is not on this machine.
    """
    import hashlib

    directory = _local_model_dir(name_or_path)
    if directory is None or not (directory / "config.json").is_file():
        return None
    # `softprompt convert` re-encodes the very same tensors (safetensors for a .bin, an explicit untied
    # head in config.json), which changes the bytes sampled below; it records the source's fingerprint.
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        recorded = json.loads((directory / CONVERTED_FROM).read_text(encoding="utf-8")).get("fingerprint")
        if isinstance(recorded, str) and recorded:
            return recorded
    digest = hashlib.sha256()
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in _CONFIG_NOISE}
    digest.update(json.dumps(config, sort_keys=True).encode())
    # Raw bytes only (a .bin is never unpickled here); many Hub checkpoints ship only pytorch_model.bin.
    weights = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    for file in weights:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for offset in (0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)):
                f.seek(offset)
                digest.update(f.read(_SAMPLE))
    return digest.hexdigest()[:16]


def same_model(a: str, b: str, fingerprint_a: str | None = None) -> bool:
    """Whether two model references name the same model, by what identifies it, not by folder names.

    Args:
        a: the model a checkpoint was made with (Hub id or path).
        b: the model it is about to be used with.
        fingerprint_a: `model_fingerprint(a)` as recorded when the checkpoint was made, if it was.

    A Hub id and a local copy match when their fingerprints do (the id through the local Hub cache);
    two references that cannot both be fingerprinted match only when they are the same string.
    """
    fb = model_fingerprint(b)
    if fingerprint_a is not None and fb is not None:
        return fingerprint_a == fb
    if a == b:
        return True
    fa = model_fingerprint(a)
    return fa is not None and fa == fb


T5_MODEL_TYPES = ("t5", "mt5")


def _looks_like_path(name: str) -> bool:
    """Whether a model name can only be a path: a Hub id is ``name`` or ``org/name``."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _config_model_type(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None  # unreadable: loading it says why
    return value if isinstance(value, str) else None


def refuse_non_t5(model_type: str | None, where: str | os.PathLike) -> None:
    """Refuse a model config of another architecture (BERT, GPT-2, ...) in one line.

    Raises:
        CheckpointError: `model_type` is set and is not a T5 type.
    """
    if model_type is not None and model_type not in T5_MODEL_TYPES:
        raise CheckpointError(
            f"{where} describes a {model_type} model, not T5; softprompt tunes T5 encoder-decoder models "
            "(e.g. google/t5-base-lm-adapt)"
        )


def refuse_non_model(name_or_path: str | os.PathLike, flag: str = "--model") -> None:
    """Refuse, with what to pass instead, a prompt checkpoint or a run directory given as the model.

    A Hub id, or a directory with config.json, passes; loading it may still fail later for other reasons.
    """
    path = Path(os.path.expanduser(str(name_or_path)))
    if not path.exists() and _looks_like_path(str(name_or_path)):
        # Not a Hub id either (org/name): a mistyped directory, which the Hub client would call a bad repo id.
        raise CheckpointError(
            f"{path}: no such directory; give a local model directory (config.json, tokenizer, weights) "
            "or a Hub id such as google/t5-base-lm-adapt"
        )
    if path.is_dir() and (path / "config.json").is_file():
        refuse_non_t5(_config_model_type(path / "config.json"), path / "config.json")
    if not path.is_dir() or (path / "config.json").is_file():
        return
    if (path / PROMPT_CONFIG).is_file():
        base = load_prompt_config(path).base_model
        raise CheckpointError(
            f"{path} is a prompt checkpoint, not a model; pass the model it was trained for and the prompt: "
            f"{flag} {base} --prompt {path}"
        )
    if peft_format.is_peft_adapter(path):
        raise CheckpointError(
            f"{path} is a PEFT adapter, not a model; pass its base model as {flag} "
            f"(and a prompt-tuning adapter as --prompt {path})"
        )
    if is_run_dir(path):
        raise CheckpointError(
            f"{path} is a training run directory, not a model; pass its best/ checkpoint: {flag} {path / BEST} "
            f"for a fine-tuned run, or --prompt {path / BEST} with its base model as {flag} for a prompt"
        )
    raise CheckpointError(
        f"{path} holds no config.json, so it is not a T5 model directory; give a Hub id or a directory "
        "written by save_pretrained"
    )


def warn_other_model(message: str) -> None:
    """The warning that replaces a refused base-model mismatch under --allow_other_base_model."""
    import sys

    print(
        f"softprompt: warning: {message}; going on because of --allow_other_base_model",
        file=sys.stderr,
        flush=True,
    )


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Save a flat dict of tensors as safetensors (contiguous CPU copies).

    Raises:
        OSError: the write failed (safetensors reports disk full and I/O errors as its own error type).
    """
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, with a clear error for anything else."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, FileNotFoundError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def torch_load_safe(path: Path, *, mmap: bool = False) -> Any:
    """`torch.load` restricted to tensors and plain containers: never executes code.

    Args:
        path: the file.
        mmap: map the tensors' storage from the file instead of reading it (zip-format files only).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    except Exception as e:  # weights_only refusals arrive as UnpicklingError/RuntimeError
        # torch's message runs over many lines and suggests weights_only=False; quote only the refusal.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        refusal = next((line for line in lines if line.startswith("WeightsUnpickler error:")), None)
        reason = (refusal or lines[0]).removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
        reason = textwrap.shorten(reason, 160, placeholder=" ...")  # whole words only
        if refusal is None and isinstance(
            e, RuntimeError | EOFError | OSError
        ):  # a truncated or garbled file
            raise CheckpointError(
                f"{path} is damaged: it is not a readable PyTorch state file ({reason})"
            ) from None
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor state file ({reason}); softprompt never "
            "unpickles code, so re-save it with tensors and plain containers only"
        ) from None


def save_t5(directory: Path, t5: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write a T5 as a Hugging Face model directory with safetensors weights.

    transformers 5 writes `tie_word_embeddings: true` for every T5 (it keeps an untied head untied
    because the weights differ, and records `scale_decoder_outputs: false`); transformers 4 would tie
    the head and rescale the decoder. So config.json says what the weights are: untied, for T5 1.1.
    """
    t5.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    if t5.get_output_embeddings().weight is not t5.get_input_embeddings().weight:
        path = Path(directory) / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config["tie_word_embeddings"] = False
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
