"""Turn finished training runs into learning-curve figures and a Markdown results report.

``make_report`` reads each run directory's ``config.yaml``, ``metrics.jsonl`` and
``results.json`` and writes, into one output folder:

* ``loss.png/.svg``, ``dev_f1.png/.svg``, ``dev_em.png/.svg``, ``dev_score.png/.svg`` (each run's own
  metric: SQuAD's F1, a text task's accuracy, ...): one line per run;
* ``report.md``: a table of all runs, then comparison tables for runs that pair up: the same
  configuration but a different optimizer, a different learning rate, or prompt tuning vs
  full fine-tuning of the same model size (the tables the seed replication reported by hand).

The runs are read back by `softprompt.training.report_runs`, the figures drawn by
`softprompt.training.report_plots`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import softprompt
from softprompt.errors import UserError
from softprompt.io.atomic import atomic_write_bytes, atomic_write_text
from softprompt.training.report_plots import FIGURES, render_figure
from softprompt.training.report_runs import (
    RunSummary,
    as_float,
    fmt_score,
    is_number,
    load_runs,
    model_basename,
    model_size,
)

__all__ = ["IGNORED_CONFIG_KEYS", "make_report"]

REPORT_FILE = "report.md"

# Keys that say where or how a run was logged, not what was trained: two runs that differ only
# in these are the same experiment. Keys ending in these suffixes are file or folder paths.
IGNORED_CONFIG_KEYS = frozenset(
    {
        "output_dir",
        "seed",
        "run_name",
        "report_to",
        "resume",
        "resume_from",
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "log_every",
        "logging_steps",
        "save_every",
        "save_steps",
        "save_total_limit",
        "num_workers",
        "dataloader_num_workers",
        "config",
        "quiet",
        "verbose",
        "eval_steps",
        "eval_batch_size",
        "attn_implementation",
        "compile",
        "fsdp",
    }
)
# How the global batch is split over devices and accumulation; the optimizer sees the same batch.
_BATCH_SPLIT_KEYS = frozenset({"batch_size", "grad_accum_steps"})
_PATH_SUFFIXES = ("_dir", "_file", "_files", "_path")

# Ordered smallest first so the prompt-vs-fine-tune table reads like the paper's scaling plot.
_SIZES = ("small", "base", "large", "xl", "xxl")


def _unique_labels(run_dirs: Sequence[Path]) -> list[str]:
    # Two runs called ".../base/prompt" and ".../large/prompt" must stay apart in a legend. The
    # directories are distinct (make_report drops repeats), so some depth of their paths tells them apart.
    parts = [[p for p in Path(d).resolve().parts if p != "/"] for d in run_dirs]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(Path(d).resolve()) for d in run_dirs]


# --------------------------------------------------------------------------- pairing


def _normalise(key: str, value: Any) -> Any:
    if key == "model_name_or_path":
        # The same hub model may be referenced by id on one machine and by a local copy on another.
        return model_basename(value)
    if isinstance(value, str):
        number = as_float(value)
        return value if math.isnan(number) else number
    if isinstance(value, list):
        return tuple(_normalise(key, v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _normalise(k, v)) for k, v in value.items()))
    if is_number(value):
        return float(value)
    return value


def _ignored(key: str) -> bool:
    return key in IGNORED_CONFIG_KEYS or (key != "model_name_or_path" and key.endswith(_PATH_SUFFIXES))


def _pairing_key(run: RunSummary, varied: str) -> tuple[tuple[str, str], ...]:
    cfg = run.effective_config()
    # With a global batch size recorded, batch_size is per device: a 1-GPU and a 4-GPU run of
    # the same global batch are the same experiment.
    split = _BATCH_SPLIT_KEYS if cfg.get("global_batch_size") is not None else frozenset()
    return tuple(
        sorted(
            (k, repr(_normalise(k, v)))
            for k, v in cfg.items()
            if k != varied and k not in split and not _ignored(k)
        )
    )


def _groups_varying(
    runs: Sequence[RunSummary], varied: str, value: Callable[[RunSummary], Any]
) -> list[list[RunSummary]]:
    """Groups of runs whose configs agree on everything but ``varied`` and that span 2+ values of it."""
    groups: dict[tuple[tuple[str, str], ...], list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(_pairing_key(run, varied), []).append(run)
    return [
        sorted(group, key=lambda r: (value(r), r.label))
        for group in groups.values()
        if len({value(r) for r in group}) >= 2
    ]


# --------------------------------------------------------------------------- formatting


def _fmt_delta(x: float) -> str:
    # Adding 0.0 turns a rounded -0.0 into 0.0 so a tie prints as +0.00, not -0.00.
    return f"{round(x, 2) + 0.0:+.2f}"


def _fmt_lr(x: float) -> str:
    return "?" if math.isnan(x) else f"{x:g}"


def _fmt_duration(seconds: Any) -> str:
    if not is_number(seconds) or not math.isfinite(seconds):
        return "—"
    total = round(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _describe(run: RunSummary, leave_out: str) -> str:
    parts = [f"model `{run.model}`", "prompt tuning" if run.mode == "prompt" else "full fine-tuning"]
    if leave_out != "optimizer":
        parts.append(f"optimizer {run.optimizer}")
    if leave_out != "lr":
        parts.append(f"lr {_fmt_lr(run.lr)}")
    if run.n_tokens is not None:
        parts.append(f"P={run.n_tokens}")
    return ", ".join(parts)


def _comparison_section(
    title: str,
    column: str,
    groups: list[list[RunSummary]],
    varied: str,
    show: Callable[[RunSummary], str],
) -> list[str]:
    if not groups:
        return []
    lines = [f"## {title}", ""]
    for group in groups:
        base = group[0]
        lines.append(f"Same {_describe(base, varied)}; Δ is relative to the first row.")
        lines.append("")
        rows = []
        if any(run.score_name != "f1" or run.results.get("task") for run in group):
            # Text-task runs: their own selection score (the group shares its config, so its task).
            for i, run in enumerate(group):
                delta = "—" if i == 0 else _fmt_delta(run.score - base.score)
                rows.append([show(run), run.label, fmt_score(run.score), delta])
            lines += _table([column, "Run", f"Dev {base.score_label}", "Δ"], rows)
        else:
            for i, run in enumerate(group):
                d_f1 = "—" if i == 0 else _fmt_delta(run.f1 - base.f1)
                d_em = "—" if i == 0 else _fmt_delta(run.exact_match - base.exact_match)
                rows.append([show(run), run.label, fmt_score(run.f1), fmt_score(run.exact_match), d_f1, d_em])
            lines += _table([column, "Run", "F1", "Exact Match", "Δ F1", "Δ EM"], rows)
        lines.append("")
    return lines


def _size_order(size: str) -> tuple[int, str]:
    return (_SIZES.index(size), size) if size in _SIZES else (len(_SIZES), size)


def _prompt_vs_finetune_section(runs: Sequence[RunSummary]) -> list[str]:
    # Runs compare within one model size and one scored metric (SQuAD's F1, a text task's own score).
    by_size: dict[tuple[str, str], dict[str, list[RunSummary]]] = {}
    for run in runs:
        size = model_size(str(run._get("model_name_or_path", run.model)))
        by_size.setdefault((size, run.score_label), {}).setdefault(run.mode, []).append(run)
    rows = []
    for size, label in sorted(by_size, key=lambda k: (_size_order(k[0]), k[1] != "f1", k[1])):
        modes = by_size[size, label]
        if "prompt" not in modes or "finetune" not in modes:
            continue
        # Several runs of one mode (an lr sweep, seeds): compare the best of each, as a paper would.
        ft = max(modes["finetune"], key=lambda r: (r.score, r.exact_match))
        pt = max(modes["prompt"], key=lambda r: (r.score, r.exact_match))
        shown = size.capitalize() if size in _SIZES else size
        rows.append(
            [
                shown if label == "f1" else f"{shown} ({label})",
                ft.label,
                fmt_score(ft.score),
                pt.label,
                fmt_score(pt.score),
                _fmt_delta(pt.score - ft.score),
                "—" if label != "f1" else _fmt_delta(pt.exact_match - ft.exact_match),
            ]
        )
    if not rows:
        return []
    header = [
        "Model Size",
        "Finetune run",
        "Finetune F1",
        "Prompt run",
        "Prompt Tune F1",
        "Delta",
        "Delta EM",
    ]
    lines = ["## Prompt tuning vs fine-tuning", ""]
    lines.append(
        "Best dev score of each mode per model size; Delta = prompt score − fine-tune score "
        "(F1 for SQuAD, a text task's own score)."
    )
    lines.append("")
    lines += _table(header, rows)
    lines.append("")
    return lines


# --------------------------------------------------------------------------- the report


def _runs_table(runs: Sequence[RunSummary]) -> list[str]:
    header = [
        "Run",
        "Model",
        "Mode",
        "Optimizer",
        "LR",
        "P",
        "Text",
        "Steps",
        "Best step",
        "Dev EM",
        "Dev F1",
        "T5 EM",
        "T5 F1",
        "Task score",
        "Train time",
    ]
    # Only reports holding a text-task run get the column; QA-only tables keep their shape.
    tasks = any(run.task_score != "—" for run in runs)
    if not tasks:
        header.remove("Task score")
    rows = []
    for run in runs:
        rows.append(
            [
                run.label,
                run.model,
                run.mode,
                run.optimizer,
                _fmt_lr(run.lr),
                "—" if run.n_tokens is None else run.n_tokens,
                run.punctuation or "—",
                run._get("steps", run.config.get("max_steps", "—")),
                run.results.get("best_step", "—"),
                fmt_score(run.exact_match),
                fmt_score(run.f1),
                *(
                    "—" if (s := run.t5_score(k)) is None else fmt_score(s)
                    for k in ("t5_exact_match", "t5_f1")
                ),
                *([run.task_score] if tasks else []),
                _fmt_duration(run.results.get("train_seconds")),
            ]
        )
    return _table(header, rows)


def _render_markdown(runs: Sequence[RunSummary]) -> str:
    lines = ["# softprompt report", ""]
    lines.append(
        f"{len(runs)} run(s), best dev scores (SQuAD EM/F1, or a text task's own score, 0–100). "
        f"softprompt {softprompt.__version__}."
    )
    lines.append("")
    lines += ["## Runs", ""]
    lines += _runs_table(runs)
    lines.append("")
    lines += [
        "Dev EM/F1: the official SQuAD v1.1 metric on raw text; with T5's padded text (Text: paper or "
        "current) each answer is first mapped back to the context span it came from. T5 EM/F1: T5's own "
        "scoring, the generated text against padded gold answers (— when the text was not padded).",
        "",
    ]
    skipped = [r for r in runs if r.skipped_lines]
    if skipped:
        notes = ", ".join(f"{r.label} ({r.skipped_lines})" for r in skipped)
        lines += [f"Unreadable metrics.jsonl lines skipped: {notes}.", ""]

    if any(not r.scored for r in runs):
        unscored = ", ".join(r.label for r in runs if not r.scored)
        lines += [f"Trained without a dev set (no scores, left out of the comparisons): {unscored}.", ""]
    runs = [r for r in runs if r.scored]
    comparisons = _comparison_section(
        "Optimizer comparison",
        "Optimizer",
        _groups_varying(runs, "optimizer", lambda r: r.optimizer),
        "optimizer",
        lambda r: r.optimizer,
    )
    comparisons += _comparison_section(
        "Learning-rate comparison",
        "Learning Rate",
        _groups_varying([r for r in runs if not math.isnan(r.lr)], "lr", lambda r: r.lr),
        "lr",
        lambda r: _fmt_lr(r.lr),
    )
    comparisons += _prompt_vs_finetune_section(runs)
    if comparisons:
        lines += comparisons
    else:
        lines += [
            "## Comparisons",
            "",
            "No runs pair up: none differ only in optimizer, only in learning rate, or only in mode "
            "at the same model size.",
            "",
        ]

    lines += ["## Learning curves", ""]
    for stem, (_, title) in FIGURES.items():
        lines += [
            f"### {title}",
            "",
            f"![{title}]({stem}.png)",
            "",
            f"Vector version: [{stem}.svg]({stem}.svg)",
            "",
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def make_report(run_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Write learning curves and a Markdown comparison of training runs.

    Args:
        run_dirs: Training output directories, each with ``results.json`` (required),
            ``config.yaml`` and ``metrics.jsonl``.
        out_dir: Folder for ``report.md`` and the figures; created if needed.

    Returns:
        The path of ``report.md``.

    Raises:
        UserError: No run was given, or a run directory is missing or malformed; the message
            names the offending file.
    """
    if not run_dirs:
        raise UserError("softprompt report needs at least one run directory")
    # The same run named twice (`runs/a` and `runs/a/`) is one run, reported once.
    seen: set[Path] = set()
    unique = []
    for d in run_dirs:
        if Path(d).resolve() not in seen:
            seen.add(Path(d).resolve())
            unique.append(Path(d))
    run_dirs = unique
    labels = _unique_labels(run_dirs)
    # Read everything before writing anything, so a bad run leaves no half-updated report.
    runs = [run for d, label in zip(run_dirs, labels, strict=True) for run in load_runs(Path(d), label)]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem in FIGURES:
        for fmt, data in render_figure(stem, runs).items():
            atomic_write_bytes(out_dir / f"{stem}.{fmt}", data)
    report_path = out_dir / REPORT_FILE
    atomic_write_text(report_path, _render_markdown(runs))
    return report_path
