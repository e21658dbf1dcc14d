"""softprompt.tasks.text.presets: presets, task YAML files and the task flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from softprompt.config.groups import TaskFlags
from softprompt.errors import ConfigError
from softprompt.tasks.text.presets import load_task, preset_names, task_from_flags

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "tasks"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_task_files_and_presets(tmp_path):
    path = write(
        tmp_path / "mine.yaml",
        "# My task: reviews.\n# Launch: softprompt train --task mine.yaml\ninput_template: 'r: {text}'\n"
        "label_field: label\nlabels: [bad, good]\n",
    )
    spec = load_task(path)
    assert spec.name == "mine" and spec.description == "My task: reviews." and spec.classes == ("bad", "good")
    with pytest.raises(ConfigError, match="neither a preset"):
        load_task("no_such_task")
    with pytest.raises(ConfigError, match="not found"):
        load_task(tmp_path / "absent.yaml")
    broken = write(tmp_path / "broken.yaml", "input_template: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_task(broken)
    names = preset_names()
    assert "squad" in names
    assert load_task("squad").is_qa


def test_presets_are_the_repository_configs_tasks() -> None:
    # The presets directory is found relative to presets.py: a wrong depth would find none.
    assert preset_names() == sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert {"rte", "squad", "wsc"} <= set(preset_names())


def test_task_flags_override_a_preset_or_a_saved_task() -> None:
    spec = task_from_flags(TaskFlags(task="rte", input_template="rte: {premise}", metric="macro_f1"))
    assert spec is not None and spec.name == "rte" and spec.input_template == "rte: {premise}"
    assert spec.metric.value == "macro_f1" and spec.classes == load_task("rte").classes
    assert task_from_flags(TaskFlags()) is None  # no task at all: SQuAD-shaped QA
    assert task_from_flags(TaskFlags(task="squad")) is None
    saved = load_task("cb").to_dict()
    assert task_from_flags(TaskFlags(), saved) == load_task("cb")
    relabelled = task_from_flags(TaskFlags(labels=["a", "b", "c"]), saved)
    assert relabelled is not None and relabelled.classes == ("a", "b", "c")
    with pytest.raises(ConfigError, match=r"^--task rte: input_template: .*unbalanced brace"):
        task_from_flags(TaskFlags(task="rte", input_template="x {a"))
    with pytest.raises(ConfigError, match=r"^the task flags: metric accuracy needs labels"):
        task_from_flags(TaskFlags(input_template="{x}", target_template="{y}", metric="accuracy"))


def test_a_task_file_with_an_alias_bomb_is_refused_in_one_line(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = write(tmp_path / "bomb.yaml", "\n".join(lines) + "\ninput_template: *a8\nlabels: *a8\n")
    assert path.stat().st_size < 600
    with pytest.raises(ConfigError) as e:
        load_task(path)
    assert str(e.value) == (
        f"{path}: is refused: it expands to more than 1,000,000 values (YAML aliases repeated inside "
        "aliases?); write the task's fields out plainly"
    )
