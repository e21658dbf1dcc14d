"""Turn finished training runs into learning-curve figures and a Markdown results report.

``make_report`` reads each run directory's ``config.yaml``, ``metrics.jsonl`` and
``results.json`` and writes, into one output folder:

* ``loss.png/.svg``, ``dev_f1.png/.svg``, ``dev_em.png/.svg``: one line per run;
* ``report.md``: a table of all runs, then comparison tables for runs that pair up: the same
  configuration but a different optimizer, a different learning rate, or prompt tuning vs
  full fine-tuning of the same model size (the tables the seed replication reported by hand).
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import softprompt
from softprompt.errors import UserError
from softprompt.io.atomic import atomic_write_bytes, atomic_write_text
from softprompt.io.rundir import BEST, CHECKPOINT_PREFIX, CONFIG_FILE, LAST, METRICS_FILE, RESULTS_FILE

__all__ = [
    "FIGURES",
    "IGNORED_CONFIG_KEYS",
    "RunSummary",
    "load_run",
    "make_report",
    "model_size",
]

REPORT_FILE = "report.md"

# Figure stem -> (y label, title). Both .png and .svg are written for each.
FIGURES: dict[str, tuple[str, str]] = {
    "loss": ("train loss", "Training loss"),
    "dev_f1": ("dev F1", "Dev F1"),
    "dev_em": ("dev exact match", "Dev exact match"),
}

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
_SIZE_RE = re.compile(r"(?:^|[-_/])(small|base|large|xl|xxl)(?=$|[-_/.])", re.IGNORECASE)


# --------------------------------------------------------------------------- reading runs


@dataclass
class RunSummary:
    """One finished training run, as read from its directory.

    Attributes:
        path: The run directory.
        label: Name used in tables and legends (the directory name, made unique).
        config: ``config.yaml`` (empty when the file is absent).
        results: ``results.json``.
        train: ``(step, loss)`` points from ``metrics.jsonl``.
        evals: ``(step, exact_match, f1)`` points from ``metrics.jsonl``.
        skipped_lines: ``metrics.jsonl`` lines that could not be parsed.
    """

    path: Path
    label: str
    config: dict[str, Any]
    results: dict[str, Any]
    train: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float, float]] = field(default_factory=list)
    skipped_lines: int = 0

    def _get(self, key: str, default: Any = None) -> Any:
        value = self.results.get(key)
        return self.config.get(key, default) if value is None else value

    @property
    def model(self) -> str:
        """The base model's name without any hub organisation or local folder."""
        return _model_basename(self._get("model_name_or_path", "?"))

    @property
    def mode(self) -> str:
        """``"prompt"`` or ``"finetune"``."""
        mode = self.results.get("mode")
        if mode in ("prompt", "finetune"):
            return str(mode)
        return "prompt" if _truthy(self.config.get("prompt_tuning")) else "finetune"

    @property
    def optimizer(self) -> str:
        """The optimizer's name."""
        return str(self._get("optimizer", "?"))

    @property
    def lr(self) -> float:
        """The peak learning rate (NaN when not recorded)."""
        return _as_float(self._get("lr"))

    @property
    def n_tokens(self) -> int | None:
        """Prompt length P for prompt tuning, None for fine-tuning."""
        value = self._get("n_tokens")
        return int(value) if self.mode == "prompt" and value is not None else None

    @property
    def scored(self) -> bool:
        """Whether the run was evaluated (a run trained without a dev set has no scores)."""
        return _is_number(self.results.get("f1"))

    @property
    def exact_match(self) -> float:
        """Best dev exact match (0..100); NaN for a run without a dev set."""
        return float(self.results["exact_match"]) if self.scored else math.nan

    @property
    def f1(self) -> float:
        """Best dev F1 (0..100); NaN for a run without a dev set."""
        return float(self.results["f1"]) if self.scored else math.nan

    @property
    def punctuation(self) -> str | None:
        """The text format (paper, current, none), or None for a run that does not record one."""
        value = self._get("punctuation")
        if value is None and isinstance(self.config.get("pad_punctuation"), bool):
            from softprompt.tasks.squad.text import LEGACY_PAD_PUNCTUATION

            value = LEGACY_PAD_PUNCTUATION[self.config["pad_punctuation"]]
        return None if value is None else str(value)

    @property
    def task_score(self) -> str:
        """A text task's selection score, e.g. ``rte accuracy 71.5``; "—" for QA runs and runs without one."""
        scores = self.results.get("scores")
        if not isinstance(scores, dict) or not scores:
            return "—"
        key, value = next(iter(scores.items()))
        if not _is_number(value):
            return "—"
        return f"{self.results.get('task', '?')} {key} {_fmt_score(float(value))}"

    def t5_score(self, key: str) -> float | None:
        """``t5_exact_match`` or ``t5_f1`` from results.json: T5's own scoring of padded text, if any."""
        value = self.results.get(key)
        return float(value) if _is_number(value) else None

    def effective_config(self) -> dict[str, Any]:
        """The config used to decide whether runs pair up, completed from ``results.json``."""
        eff = dict(self.config)
        for key in ("model_name_or_path", "optimizer", "lr", "n_tokens"):
            if key not in eff and key in self.results:
                eff[key] = self.results[key]
        eff["prompt_tuning"] = self.mode == "prompt"
        return eff


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _as_float(value: Any) -> float:
    # PyYAML reads "1e-5" (no dot) as a string, so numbers from config.yaml may be text.
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _model_basename(name: Any) -> str:
    path = Path(str(name).rstrip("/"))
    # A model fine-tuned by softprompt is referred to as RUN/best or RUN/checkpoint-N: name the run.
    if path.name in (BEST, LAST) or path.name.startswith(CHECKPOINT_PREFIX):
        return f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    return path.name or str(name)


def model_size(model_name_or_path: str) -> str:
    """The T5 size named in a model id or path, e.g. ``"base"`` for ``google/t5-v1_1-base``.

    Args:
        model_name_or_path: A hub id or local folder.

    Returns:
        One of ``small``, ``base``, ``large``, ``xl``, ``xxl``, or the model's base name when
        no size can be read from it (so only runs of the very same model pair up).
    """
    name = _model_basename(model_name_or_path)
    match = _SIZE_RE.search(name)
    return match.group(1).lower() if match else name


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} is missing; is {path.parent} a finished softprompt training run?") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys, found {type(data).__name__}")
    return data


def _drop_superseded(points: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Keep only the last run's points where a resumed run re-logged steps it had already done.

    A run resumed from a checkpoint at step 1000 after it had logged up to step 1200 appends
    steps 1000.. again; the older 1000..1200 points belong to a trajectory that was discarded.
    """
    kept: list[tuple[Any, ...]] = []
    for point in points:
        while kept and kept[-1][0] >= point[0]:
            kept.pop()
        kept.append(point)
    return kept


def _read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float, float]], int]:
    train: list[tuple[int, float]] = []
    evals: list[tuple[int, float, float]] = []
    skipped = 0
    if not path.exists():
        return train, evals, skipped
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A run killed in mid-write leaves one cut-off line; losing that single point
                # is better than refusing to report the whole run.
                skipped += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                skipped += 1
                continue
            event, step = record.get("event"), record["step"]
            if event == "train" and _is_number(record.get("loss")):
                train.append((step, float(record["loss"])))
            elif event == "eval" and _is_number(record.get("exact_match")) and _is_number(record.get("f1")):
                evals.append((step, float(record["exact_match"]), float(record["f1"])))
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} unreadable line(s)", stacklevel=3)
    return _drop_superseded(train), _drop_superseded(evals), skipped  # type: ignore[return-value]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_run(run_dir: Path, label: str | None = None) -> RunSummary:
    """Read one run directory.

    ``results.json`` is required; ``config.yaml`` and ``metrics.jsonl`` are used when present.

    Args:
        run_dir: The training run's output directory.
        label: Name for tables and legends; the directory name when None.

    Returns:
        The parsed run.

    Raises:
        UserError: The directory or ``results.json`` is missing, or a file is malformed; the
            message names the file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; pass the output_dir of a training run")
    results_path = run_dir / RESULTS_FILE
    results = _read_json_object(results_path)
    for key in ("exact_match", "f1"):
        # null: a finished run that had no dev set (reported without scores); absent or text: not a run.
        if key not in results or not (results[key] is None or _is_number(results[key])):
            raise UserError(
                f"{results_path} has no numeric {key!r}; was the run finished by softprompt train?"
            )
    config = _read_config(run_dir / CONFIG_FILE)
    train, evals, skipped = _read_metrics(run_dir / METRICS_FILE)
    return RunSummary(
        path=run_dir,
        label=label or run_dir.resolve().name,
        config=config,
        results=results,
        train=train,
        evals=evals,
        skipped_lines=skipped,
    )


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
        return _model_basename(value)
    if isinstance(value, str):
        number = _as_float(value)
        return value if math.isnan(number) else number
    if isinstance(value, list):
        return tuple(_normalise(key, v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _normalise(k, v)) for k, v in value.items()))
    if _is_number(value):
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


def _fmt_score(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.2f}"


def _fmt_delta(x: float) -> str:
    # Adding 0.0 turns a rounded -0.0 into 0.0 so a tie prints as +0.00, not -0.00.
    return f"{round(x, 2) + 0.0:+.2f}"


def _fmt_lr(x: float) -> str:
    return "?" if math.isnan(x) else f"{x:g}"


def _fmt_duration(seconds: Any) -> str:
    if not _is_number(seconds) or not math.isfinite(seconds):
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
        for i, run in enumerate(group):
            d_f1 = "—" if i == 0 else _fmt_delta(run.f1 - base.f1)
            d_em = "—" if i == 0 else _fmt_delta(run.exact_match - base.exact_match)
            rows.append([show(run), run.label, _fmt_score(run.f1), _fmt_score(run.exact_match), d_f1, d_em])
        lines += _table([column, "Run", "F1", "Exact Match", "Δ F1", "Δ EM"], rows)
        lines.append("")
    return lines


def _size_order(size: str) -> tuple[int, str]:
    return (_SIZES.index(size), size) if size in _SIZES else (len(_SIZES), size)


def _prompt_vs_finetune_section(runs: Sequence[RunSummary]) -> list[str]:
    by_size: dict[str, dict[str, list[RunSummary]]] = {}
    for run in runs:
        size = model_size(str(run._get("model_name_or_path", run.model)))
        by_size.setdefault(size, {}).setdefault(run.mode, []).append(run)
    rows = []
    for size in sorted(by_size, key=_size_order):
        modes = by_size[size]
        if "prompt" not in modes or "finetune" not in modes:
            continue
        # Several runs of one mode (an lr sweep, seeds): compare the best of each, as a paper would.
        ft = max(modes["finetune"], key=lambda r: (r.f1, r.exact_match))
        pt = max(modes["prompt"], key=lambda r: (r.f1, r.exact_match))
        rows.append(
            [
                size.capitalize() if size in _SIZES else size,
                ft.label,
                _fmt_score(ft.f1),
                pt.label,
                _fmt_score(pt.f1),
                _fmt_delta(pt.f1 - ft.f1),
                _fmt_delta(pt.exact_match - ft.exact_match),
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
    lines.append("Best dev score of each mode per model size; Delta = prompt F1 − fine-tune F1.")
    lines.append("")
    lines += _table(header, rows)
    lines.append("")
    return lines


# --------------------------------------------------------------------------- figures


def _ema(values: Sequence[float], weight: float) -> list[float]:
    # Debiased exponential moving average, as TensorBoard's smoothing slider computes it, so
    # the first points are not dragged towards zero.
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def _render_figure(stem: str, runs: Sequence[RunSummary]) -> dict[str, bytes]:
    from matplotlib import rc_context

    fig = draw_figure(stem, runs)
    out: dict[str, bytes] = {}
    # A fixed hash salt and no dates make the SVG byte-identical across runs of the report.
    with rc_context({"svg.hashsalt": "softprompt"}):
        for fmt, metadata in (("png", {"Software": None}), ("svg", {"Date": None})):
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=120, metadata=metadata)
            out[fmt] = buf.getvalue()
    return out


def draw_figure(stem: str, runs: Sequence[RunSummary]) -> Any:
    """The matplotlib Figure of one learning curve (`loss`, `dev_f1` or `dev_em`) over the runs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ylabel, title = FIGURES[stem]
    # Building the Figure directly (not through pyplot) leaves the caller's global backend and
    # figure registry alone, so the report can be made from a notebook or a training process.
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = 0
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        if stem == "loss":
            if not run.train:
                continue
            steps = [p[0] for p in run.train]
            losses = [p[1] for p in run.train]
            if len(losses) >= 20:
                ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _ema(losses, 0.9), color=color, linewidth=1.6, label=run.label)
            else:
                ax.plot(steps, losses, color=color, linewidth=1.6, label=run.label)
        else:
            if not run.evals:
                continue
            col = 2 if stem == "dev_f1" else 1
            ax.plot(
                [p[0] for p in run.evals],
                [p[col] for p in run.evals],
                color=color,
                marker="o",
                markersize=3,
                linewidth=1.6,
                label=run.label,
            )
        plotted += 1
    from matplotlib.ticker import MaxNLocator

    # Steps are whole numbers, also on a 3-step run; scores and losses are never negative, so an
    # all-zero F1 curve sits on the axis instead of in the middle of a [-0.05, 0.05] range.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if plotted:
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1.0))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if plotted:
        ax.legend(fontsize="small")
    else:
        kind = "train" if stem == "loss" else "eval"
        ax.text(
            0.5, 0.5, f"no {kind} records in metrics.jsonl", ha="center", va="center", transform=ax.transAxes
        )
    return fig


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
                _fmt_score(run.exact_match),
                _fmt_score(run.f1),
                *(
                    "—" if (s := run.t5_score(k)) is None else _fmt_score(s)
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
    runs = [load_run(Path(d), label) for d, label in zip(run_dirs, labels, strict=True)]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem in FIGURES:
        for fmt, data in _render_figure(stem, runs).items():
            atomic_write_bytes(out_dir / f"{stem}.{fmt}", data)
    report_path = out_dir / REPORT_FILE
    atomic_write_text(report_path, _render_markdown(runs))
    return report_path
