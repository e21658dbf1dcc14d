"""The prompts of a multi-prompt run: who they are, what differs between them, and the checks before anything loads.

A multi-prompt run trains K soft prompts on one frozen model (`softprompt.training.multi_setup`). Each
prompt is described by a `PromptSpec`: its name and the `TrainConfig` of the single-prompt run it must
equal (the run's config with the prompt's own settings put over it). `--num_prompts K` makes K specs of
the one task from seeds seed, seed + 1, ...; a config file's `prompts:` list names each prompt and
what differs (`PER_PROMPT`). Everything else (the model, steps, batch size per prompt, precision,
optimizer kind) is shared. Standard library only at import time, so `softprompt train --help` stays light.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.config.fields import closest
from softprompt.config.parser import config_values
from softprompt.errors import ConfigError
from softprompt.training.config import BatchPlan, TrainConfig, check_config

#: What a `prompts:` entry may set besides its name; every other setting is the run's, shared by all.
PER_PROMPT = frozenset(
    {
        "task",
        "input_template",
        "target_template",
        "label_field",
        "labels",
        "id_field",
        "metric",
        "train_file",
        "validation_file",
        "dataset_name",
        "dataset_config",
        "train_split",
        "validation_split",
        "max_train_samples",
        "max_eval_samples",
        "prompt_init",
        "prompt_init_labels",
        "prompt_init_text",
        "prompt_init_file",
        "n_tokens",
        "seed",
        "lr",
        "punctuation",
        "max_source_length",
        "max_target_length",
    }
)

# A prompt's name becomes a directory (best/<name>/), so it is one plain path component.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class PromptSpec:
    """One prompt of a multi-prompt run.

    Attributes:
        name: its name: the folder of its best checkpoint (`best/<name>/`) and its key in metrics.jsonl.
        cfg: the config of the single-prompt run this prompt equals (same seed, data, init, lr).
    """

    name: str
    cfg: TrainConfig


def is_multi(cfg: TrainConfig) -> bool:
    """Whether `cfg` asks for a multi-prompt run (`--num_prompts` or a `prompts:` list)."""
    return cfg.num_prompts is not None or bool(cfg.prompts)


def _single(cfg: TrainConfig, **values: Any) -> TrainConfig:
    return dataclasses.replace(cfg, num_prompts=None, prompts=[], **values)


def _entry(cfg: TrainConfig, i: int, entry: Any) -> tuple[PromptSpec | None, list[str]]:
    """One `prompts:` entry as a spec, or the problems that name it."""
    where = f"prompts[{i}]"
    if not isinstance(entry, dict):
        return None, [
            f"{where} must be a mapping with a name and the prompt's own settings, got {entry!r:.40}"
        ]
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return None, [
            f"{where} needs a name: letters, digits, '_', '.' or '-' (it names best/<name>/), got {name!r:.40}"
        ]
    where = f"prompts[{i}] '{name}'"
    rest = {str(k): v for k, v in entry.items() if k != "name"}
    problems = [
        f"{where}: '{k}' cannot differ per prompt" + closest(k, PER_PROMPT, "'{}'")
        for k in rest
        if k.replace("-", "_") not in PER_PROMPT
    ]
    if problems:
        return None, problems
    values, bad = config_values(rest, TrainConfig)
    if bad:
        return None, [f"{where}: {p}" for p in bad]
    return PromptSpec(name, _single(cfg, **values)), []


def spec_problems(cfg: TrainConfig) -> tuple[list[PromptSpec], list[str]]:
    """The prompts `cfg` asks for, and every problem with how they are given (not yet with their settings).

    Returns:
        The specs (empty for a single-prompt run), and one phrase per problem, each naming its entry.
    """
    if not is_multi(cfg):
        return [], []
    if cfg.num_prompts is not None and cfg.prompts:
        return [], [
            "--num_prompts and a prompts: list both name the prompts; give one (--num_prompts K trains K seeds "
            "of one task, prompts: lists each prompt's own settings)"
        ]
    problems: list[str] = []
    if not cfg.prompt_tuning:
        problems.append("a multi-prompt run trains prompts on a frozen model; pass --prompt_tuning")
    if cfg.num_prompts is not None:
        specs = [PromptSpec(f"prompt{i}", _single(cfg, seed=cfg.seed + i)) for i in range(cfg.num_prompts)]
        return specs, problems
    specs = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(cfg.prompts):
        spec, bad = _entry(cfg, i, entry)
        problems += bad
        if spec is None:
            continue
        if spec.name in seen:
            problems.append(
                f"prompts[{i}] '{spec.name}': the name is taken by prompts[{seen[spec.name]}]; give each prompt its own"
            )
            continue
        seen[spec.name] = i
        specs.append(spec)
    return specs, problems


def _model_width(model: str) -> int | None:
    """d_model from a local model directory's config.json (None for a Hub id or an unreadable file)."""
    try:
        return int(json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))["d_model"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _width_problems(specs: list[PromptSpec], model: str) -> list[str]:
    """Prompts started from files of another width than the model's (or than each other's)."""
    # Deferred: the checkpoint module imports torch, and `softprompt train --help` reads this module.
    from softprompt.errors import UserError
    from softprompt.io.checkpoint import load_prompt_config

    width, source = _model_width(model), f"the model {model}"
    problems = []
    for i, spec in enumerate(specs):
        c = spec.cfg
        if c.prompt_init != "from_file" or not c.prompt_init_file or not Path(c.prompt_init_file).exists():
            continue
        try:
            d_model = load_prompt_config(c.prompt_init_file).d_model
        except UserError as e:
            problems.append(f"prompts[{i}] '{spec.name}': {e}")
            continue
        if width is None:
            width, source = d_model, f"prompts[{i}] '{spec.name}'"
        elif d_model != width:
            problems.append(
                f"prompts[{i}] '{spec.name}': its prompt_init_file {c.prompt_init_file} is {d_model} wide, "
                f"{source} is {width}; every prompt of a run has the model's width"
            )
    return problems


def check_run(cfg: TrainConfig, world_size: int = 1) -> tuple[BatchPlan | None, list[str]]:
    """`check_config` for a single-prompt run; for a multi-prompt run, every prompt's single-prompt checks.

    A problem every prompt shares (the output directory, the batch size) is named once; one that only
    some prompts have names each of them (`prompts[1] 'rte': --train_file x.jsonl does not exist`).

    Returns:
        The batch plan (per prompt; None if impossible) and every problem.
    """
    specs, problems = spec_problems(cfg)
    if not is_multi(cfg):
        return check_config(cfg, world_size)
    if not specs:
        return None, problems
    checked = [check_config(spec.cfg, world_size) for spec in specs]
    everywhere = set.intersection(*(set(p) for _, p in checked))
    problems += [p for p in checked[0][1] if p in everywhere]
    for spec, (_, own) in zip(specs, checked, strict=True):
        where = next(
            (
                f"prompts[{i}] '{spec.name}'"
                for i, e in enumerate(cfg.prompts)
                if isinstance(e, dict) and e.get("name") == spec.name
            ),
            f"prompt '{spec.name}'",
        )
        problems += [f"{where}: {p}" for p in own if p not in everywhere]
    problems += _width_problems(specs, cfg.model_name_or_path)
    return checked[0][0], problems


def prompt_specs(cfg: TrainConfig, world_size: int = 1) -> tuple[list[PromptSpec], BatchPlan]:
    """The checked prompts of a multi-prompt run and its batch plan (per prompt).

    Raises:
        ConfigError: one line listing every problem, each naming its entry.
    """
    plan, problems = check_run(cfg, world_size)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(dict.fromkeys(problems)))
    assert plan is not None
    return spec_problems(cfg)[0], plan
