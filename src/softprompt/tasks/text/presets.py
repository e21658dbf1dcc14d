"""Where a text task comes from: a preset (``--task rte``), a task YAML file, or the template flags.

Named presets live in ``configs/tasks/`` (installed with the package as ``softprompt/presets/tasks``);
a task YAML file of one's own or the flags ``--input_template`` / ``--target_template`` /
``--label_field`` / ``--labels`` / ``--metric`` define others. Each becomes a
softprompt.tasks.text.spec.TaskSpec, validated with every problem in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from softprompt.data.records import one_line
from softprompt.errors import ConfigError
from softprompt.tasks.text.spec import TaskSpec

__all__ = ["PRESETS_DIR", "load_task", "preset_names", "task_from_flags"]

#: Where ``--task NAME`` finds NAME.yaml: the repository's configs/tasks, installed with the package.
PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets" / "tasks"
_SOURCE_PRESETS = Path(__file__).resolve().parents[4] / "configs" / "tasks"


def _presets_dir() -> Path:
    return PRESETS_DIR if PRESETS_DIR.is_dir() else _SOURCE_PRESETS


def preset_names() -> list[str]:
    """The task presets shipped with softprompt (``configs/tasks/*.yaml``), sorted."""
    return sorted(p.stem for p in _presets_dir().glob("*.yaml"))


def _header(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(x for x in lines if x and not x.lower().startswith("launch:"))


def load_task(name_or_path: str | Path) -> TaskSpec:
    """The task a preset name (``rte``) or a task YAML file names.

    Raises:
        ConfigError: No such preset or file, or the YAML is not a valid task (every problem listed).
    """
    import yaml  # deferred: --help need not pay for it

    from softprompt.config.safe_yaml import YamlTooLarge, load_yaml

    text_path = Path(name_or_path)
    if text_path.suffix in (".yaml", ".yml") or text_path.exists():
        path = text_path
        if not path.is_file():
            raise ConfigError(
                f"task file {path} not found; give a task YAML file or one of {', '.join(preset_names())}"
            )
    else:
        path = _presets_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"--task {name_or_path!r} is neither a preset ({', '.join(preset_names())}) nor a YAML file"
            )
    text = path.read_text(encoding="utf-8")
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: is not valid YAML ({one_line(str(err))[:120]})") from None
    except YamlTooLarge as err:
        raise ConfigError(f"{path}: is refused: {err}; write the task's fields out plainly") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a task file holds a map of task fields (name, input_template, ...)")
    data = dict(data)
    data.setdefault("name", path.stem)
    data.setdefault("description", _header(text))
    spec = TaskSpec.from_dict(data, where=str(path))
    spec.source = str(path)
    return spec


# --------------------------------------------------------------------------------------------------------
# From flags

_OVERRIDES = ("input_template", "target_template", "label_field", "id_field", "metric")


def task_from_flags(flags: Any, saved: Mapping[str, Any] | None = None) -> TaskSpec | None:
    """The text task that ``--task`` and the template flags name, or None for SQuAD-shaped QA.

    Args:
        flags: An object with softprompt.config.groups.TaskFlags' fields (TrainConfig, EvalArgs, ...).
        saved: A task recorded with a prompt (its ``to_dict``), used when ``--task`` is not given.

    Raises:
        ConfigError: The preset or file is unknown, or the resulting task is invalid (every problem).
    """
    name = getattr(flags, "task", None)
    base: dict[str, Any] = load_task(name).to_dict() if name else dict(saved or {})
    overrides = {k: getattr(flags, k) for k in _OVERRIDES if getattr(flags, k, None) is not None}
    if getattr(flags, "labels", None):
        overrides["labels"] = list(flags.labels)
    if not base and not overrides:
        return None
    data = {**base, **overrides}
    where = f"--task {name}" if name else "the task flags"
    spec = TaskSpec.from_dict(data, where=where)
    return None if spec.is_qa else spec
