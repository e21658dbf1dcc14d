"""The demo's result table: `summary.md`, rendered from what `summary.json` holds."""

from __future__ import annotations

from typing import Any

__all__ = ["summary_markdown"]


def summary_markdown(summary: dict[str, Any]) -> str:
    """The demo's result table (what ``summary.md`` holds)."""
    b = summary["task_b"]
    plan = summary["plan"]
    rows = [
        ("zero-shot: task-A model, no prompt", b["zero_shot"]),
        (f"prompt tuning: frozen task-A model + {plan['n_tokens']}-token prompt", b["prompt_tuning"]),
        ("fine-tuning: every weight of the task-A model", b["fine_tuning"]),
    ]
    a = summary["task_a"]["dev"]
    lines = [
        f"# softprompt demo ({'quick' if summary['quick'] else 'full'}, seed {summary['seed']})",
        "",
        "Task B: a bare name asks for the person's home town. The task-A model was trained to answer a bare",
        "name with the person's trade, so it must be told what task B wants: by a soft prompt, or by",
        "changing its weights.",
        "",
        "| task B | trained parameters | dev EM | dev F1 | test EM | test F1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, row in rows:
        lines.append(
            f"| {label} | {row['trainable_parameters']:,} | {row['dev']['exact_match']:.1f} | "
            f"{row['dev']['f1']:.1f} | {row['test']['exact_match']:.1f} | {row['test']['f1']:.1f} |"
        )
    c = summary.get("task_c")
    if c is not None:
        lines += [
            "",
            "Task C, a classification task read from CSV through a task file (`"
            + c["task_file"]
            + "`): which",
            "attribute a question asks for. A prompt for the same frozen model, started from its class labels:",
            f"test accuracy {c['test']['accuracy']:.1f} (zero-shot {c['zero_shot_test']['accuracy']:.1f}; "
            f"answers that are no label: {c['test']['invalid_predictions']:.0f} with the prompt, "
            f"{c['zero_shot_test']['invalid_predictions']:.0f} without).",
        ]
    frozen = "unchanged" if summary["frozen_model_unchanged"] else "CHANGED"
    lines += [
        "",
        f"Task-A model on task A dev: EM {a['exact_match']:.1f}, F1 {a['f1']:.1f}. "
        f"Its weights after prompt tuning: {frozen} (sha256 {summary['task_a_model_sha256'][:12]}).",
        "Dev picks each run's best checkpoint; test is held out. "
        f"Wall time {summary['seconds']['total']:.0f} s on {summary['torch_threads']} CPU thread(s).",
        "",
    ]
    return "\n".join(lines)
