"""The learning-curve figures of `softprompt report`: train loss, dev F1, dev exact match and each run's
own dev score per run.

matplotlib is imported only when a figure is drawn, and never through pyplot.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from softprompt.training.report_runs import RunSummary

__all__ = ["FIGURES", "draw_figure", "render_figure"]

# Figure stem -> (y label, title). Both .png and .svg are written for each.
FIGURES: dict[str, tuple[str, str]] = {
    "loss": ("train loss", "Training loss"),
    "dev_f1": ("dev F1", "Dev F1"),
    "dev_em": ("dev exact match", "Dev exact match"),
    # Every run's own selection metric (SQuAD's F1, a text task's accuracy, MultiRC's f1a, ...).
    "dev_score": ("dev score (each run's own metric)", "Dev score"),
}


def _ema(values: Sequence[float], weight: float) -> list[float]:
    # Debiased exponential moving average, as TensorBoard's smoothing slider computes it, so
    # the first points are not dragged towards zero.
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def render_figure(stem: str, runs: Sequence[RunSummary]) -> dict[str, bytes]:
    """One learning curve as PNG and SVG bytes (`{"png": ..., "svg": ...}`), byte-identical for the same runs."""
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
                # A marker, so a run with a single logged step is a dot rather than a blank chart.
                marker = "o" if len(losses) == 1 else None
                ax.plot(steps, losses, color=color, linewidth=1.6, marker=marker, label=run.label)
        else:
            if stem == "dev_score":
                points, label = run.score_curve(), f"{run.label} ({run.score_label})"
            else:
                col = 2 if stem == "dev_f1" else 1
                points, label = [(p[0], p[col]) for p in run.evals], run.label
            if not points:
                continue
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                color=color,
                marker="o",
                markersize=3,
                linewidth=1.6,
                label=label,
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
