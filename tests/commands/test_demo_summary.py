"""The demo's result table: every number rounded as printed, the counts with separators, task C's line."""

from __future__ import annotations

from typing import Any

from softprompt.commands.demo_summary import summary_markdown


def _summary(**overrides: Any) -> dict[str, Any]:
    def row(params: int, dev: float, test: float) -> dict[str, Any]:
        return {
            "trainable_parameters": params,
            "dev": {"exact_match": dev, "f1": dev + 0.04},
            "test": {"exact_match": test, "f1": test + 0.06},
        }

    summary = {
        "seed": 3,
        "quick": True,
        "plan": {"n_tokens": 10},
        "task_a": {"dev": {"exact_match": 72.0, "f1": 72.25}},
        "task_b": {
            "zero_shot": row(0, 1.0, 0.5),
            "prompt_tuning": row(640, 98.5, 98.0),
            "fine_tuning": row(217984, 97.0, 96.5),
        },
        "task_c": {
            "task_file": "data/task_c.yaml",
            "test": {"accuracy": 100.0, "invalid_predictions": 0.0},
            "zero_shot_test": {"accuracy": 0.0, "invalid_predictions": 200.0},
        },
        "frozen_model_unchanged": True,
        "task_a_model_sha256": "8d1bdcafc743" + "0" * 52,
        "seconds": {"total": 28.2},
        "torch_threads": 1,
    }
    summary.update(overrides)
    return summary


def test_the_table_prints_each_run_rounded_to_one_decimal() -> None:
    text = summary_markdown(_summary())
    lines = text.splitlines()
    assert lines[0] == "# softprompt demo (quick, seed 3)"
    assert "| zero-shot: task-A model, no prompt | 0 | 1.0 | 1.0 | 0.5 | 0.6 |" in lines
    assert (
        "| prompt tuning: frozen task-A model + 10-token prompt | 640 | 98.5 | 98.5 | 98.0 | 98.1 |" in lines
    )
    assert "| fine-tuning: every weight of the task-A model | 217,984 | 97.0 | 97.0 | 96.5 | 96.6 |" in lines
    assert (
        "test accuracy 100.0 (zero-shot 0.0; answers that are no label: 0 with the prompt, 200 without)."
        in lines
    )
    assert (
        "Task-A model on task A dev: EM 72.0, F1 72.2. Its weights after prompt tuning: unchanged "
        "(sha256 8d1bdcafc743)." in lines
    )
    assert text.endswith("Wall time 28 s on 1 CPU thread(s).\n")


def test_a_changed_model_and_a_missing_task_c_show() -> None:
    summary = _summary(frozen_model_unchanged=False, quick=False)
    del summary["task_c"]
    text = summary_markdown(summary)
    assert text.startswith("# softprompt demo (full, seed 3)")
    assert "Its weights after prompt tuning: CHANGED" in text and "Task C" not in text
