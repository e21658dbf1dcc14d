"""make_report: figures, the runs table and the optimizer / lr / prompt-vs-fine-tune comparisons."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from softprompt.errors import UserError
from softprompt.training.report import make_report
from softprompt.training.report_runs import load_run, model_size

# One fixture run has a cut-off metrics line on purpose; its warning is asserted where it matters.
pytestmark = pytest.mark.filterwarnings("ignore:.*unreadable line:UserWarning")

BASE_CONFIG: dict[str, Any] = {
    "model_name_or_path": "google/t5-base-lm-adapt",
    "prompt_tuning": True,
    "n_tokens": 100,
    "prompt_init": "sampled_vocab",
    "optimizer": "adafactor",
    "lr": 0.3,
    "weight_decay": 1e-5,
    "global_batch_size": 32,
    "batch_size": 32,
    "grad_accum_steps": 1,
    "max_steps": 3000,
    "epochs": None,
    "precision": "bf16",
    "eval_steps": 500,
    "report_to": ["tensorboard"],
}


def make_run(
    root: Path,
    name: str,
    *,
    em: float,
    f1: float,
    best_step: int = 2500,
    train_seconds: float = 2500.0,
    resumed: bool = False,
    **overrides: Any,
) -> Path:
    """A run directory shaped like the trainer's: config.yaml, metrics.jsonl, results.json."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {
        **BASE_CONFIG,
        "output_dir": str(run),
        "seed": abs(hash(name)) % 1000,
        # Paths differ between machines; they must not stop runs from pairing up.
        "train_file": f"/data/{name}/train-v1.1.json",
        "validation_file": f"/data/{name}/dev-v1.1.json",
        **overrides,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")

    steps = int(cfg["max_steps"])
    records: list[dict[str, Any]] = [{"event": "start", "step": 0, "world_size": 1, "time": 0.0}]
    for step in range(10, steps + 1, 10):
        # Better runs reach a lower loss, so the curves differ as they would for real.
        loss = (100.0 - f1) / 25.0 + 3.0 * math.exp(-step / 600) + 0.05 * math.sin(step)
        records.append(
            {
                "event": "train",
                "step": step,
                "epoch": step / 2700,
                "loss": loss,
                "lr": cfg["lr"],
                "examples_per_second": 55.0,
                "time": step * 0.8,
            }
        )
        if step % 500 == 0:
            scale = min(1.0, step / best_step)
            records.append(
                {
                    "event": "eval",
                    "step": step,
                    "exact_match": em * scale,
                    "f1": f1 * scale,
                    "time": step * 0.8,
                }
            )
    lines = [json.dumps(r) for r in records]
    if resumed:
        # Killed after logging step 1600 (mid-write), resumed from the step-1000 checkpoint:
        # the log holds steps 1010..1600 twice, the older copy from the abandoned trajectory.
        cut = next(i for i, r in enumerate(records) if r["step"] > 1600)
        restart = next(i for i, r in enumerate(records) if r["step"] > 1000)
        stale = [json.dumps({**r, "loss": 9.0}) if r["event"] == "train" else json.dumps(r) for r in records]
        lines = [*lines[:restart], *stale[restart:cut], '{"event": "train", "step": 16', *lines[restart:]]
    lines.append(json.dumps({"event": "end", "step": steps, "time": steps * 0.8}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    results = {
        "exact_match": em,
        "f1": f1,
        "best_step": best_step,
        "train_seconds": train_seconds,
        "train_examples_per_second": 55.0,
        "steps": steps,
        "model_name_or_path": cfg["model_name_or_path"],
        "mode": "prompt" if cfg["prompt_tuning"] else "finetune",
        "optimizer": cfg["optimizer"],
        "lr": cfg["lr"],
        "n_tokens": cfg["n_tokens"],
    }
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    root = tmp_path / "runs"
    return [
        make_run(root, "pt_af_03", em=78.61, f1=86.04, train_seconds=2500.0),
        make_run(root, "pt_af_1e3", em=58.03, f1=67.62, lr=0.001, resumed=True),
        # Same global batch split differently over devices: still the same experiment.
        make_run(
            root,
            "pt_adamw_1e3",
            em=50.41,
            f1=61.49,
            optimizer="adamw",
            lr=0.001,
            batch_size=16,
            grad_accum_steps=2,
        ),
        make_run(
            root,
            "ft_base",
            em=83.52,
            f1=90.63,
            model_name_or_path="google/t5-v1_1-base",
            prompt_tuning=False,
            lr=5e-5,
            best_step=3000,
            train_seconds=7384.4,
        ),
        # Differs from pt_af_03 in both P and lr: pairs with nothing.
        make_run(root, "pt_af_p20_lr01", em=70.0, f1=79.5, n_tokens=20, lr=0.1),
    ]


def section(markdown: str, title: str) -> list[str]:
    """The table rows (without header) of the section headed `## title`."""
    lines = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    table = [line for line in lines if line.startswith("|")]
    return table[2:]


def test_report_files_and_images(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = make_report(runs, out)
    assert report == out / "report.md"
    for stem in ("loss", "dev_f1", "dev_em"):
        image = imread(out / f"{stem}.png")
        height, width = image.shape[:2]
        assert height >= 300 and width >= 500
        # Curves in several colours on a white background: far from a blank image.
        colours = np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
        assert len(colours) > 50
        root = ET.parse(out / f"{stem}.svg").getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert len(list(root.iter())) > 100
        assert f"]({stem}.png)" in report.read_text() and f"]({stem}.svg)" in report.read_text()
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


def test_runs_table_has_exact_scores(runs: list[Path], tmp_path: Path) -> None:
    md = make_report(runs, tmp_path / "out").read_text(encoding="utf-8")
    rows = section(md, "Runs")
    assert len(rows) == 5
    assert (
        "| pt_af_03 | t5-base-lm-adapt | prompt | adafactor | 0.3 | 100 | — | 3000 | 2500 | 78.61 | 86.04 | — | — "
        "| 0:41:40 |" in rows
    )
    assert (
        "| ft_base | t5-v1_1-base | finetune | adafactor | 5e-05 | — | — | 3000 | 3000 | 83.52 | 90.63 | — | — "
        "| 2:03:04 |" in rows
    )
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        row = next(r for r in rows if r.startswith(f"| {run.name} |"))
        assert f"| {results['exact_match']:.2f} | {results['f1']:.2f} |" in row


def test_optimizer_comparison(runs: list[Path], tmp_path: Path) -> None:
    md = make_report(runs, tmp_path / "out").read_text(encoding="utf-8")
    rows = section(md, "Optimizer comparison")
    # adamw - adafactor at lr 1e-3: F1 61.49 - 67.62, EM 50.41 - 58.03.
    assert rows == [
        "| adafactor | pt_af_1e3 | 67.62 | 58.03 | — | — |",
        "| adamw | pt_adamw_1e3 | 61.49 | 50.41 | -6.13 | -7.62 |",
    ]


def test_learning_rate_comparison(runs: list[Path], tmp_path: Path) -> None:
    md = make_report(runs, tmp_path / "out").read_text(encoding="utf-8")
    rows = section(md, "Learning-rate comparison")
    # Only the two adafactor P=100 runs pair; pt_af_p20_lr01 also changes P.
    assert rows == [
        "| 0.001 | pt_af_1e3 | 67.62 | 58.03 | — | — |",
        "| 0.3 | pt_af_03 | 86.04 | 78.61 | +18.42 | +20.58 |",
    ]


def test_prompt_vs_finetune(runs: list[Path], tmp_path: Path) -> None:
    md = make_report(runs, tmp_path / "out").read_text(encoding="utf-8")
    rows = section(md, "Prompt tuning vs fine-tuning")
    # Best prompt run (86.04) against the fine-tuned base model (90.63): 86.04 - 90.63 = -4.59.
    assert rows == ["| Base | ft_base | 90.63 | pt_af_03 | 86.04 | -4.59 | -4.91 |"]


def test_resumed_run_keeps_only_the_surviving_trajectory(runs: list[Path]) -> None:
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        run = load_run(runs[1])
    steps = [s for s, _ in run.train]
    assert steps == list(range(10, 3001, 10))
    assert max(loss for _, loss in run.train) < 9.0, "points from the abandoned trajectory survived"
    assert [s for s, _, _ in run.evals] == [500, 1000, 1500, 2000, 2500, 3000]
    assert run.skipped_lines == 1


def test_report_is_deterministic(runs: list[Path], tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_report(runs, a)
    make_report(runs, b)
    for name in ("report.md", "loss.svg", "dev_f1.svg", "loss.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_single_run_has_no_comparisons(runs: list[Path], tmp_path: Path) -> None:
    md = make_report(runs[:1], tmp_path / "out").read_text(encoding="utf-8")
    assert "No runs pair up" in md
    assert "Optimizer comparison" not in md and "Delta" not in md


def test_run_without_metrics_still_reports(tmp_path: Path) -> None:
    run = make_run(tmp_path, "bare", em=10.0, f1=20.0)
    (run / "metrics.jsonl").unlink()
    out = tmp_path / "out"
    md = make_report([run], out).read_text(encoding="utf-8")
    assert "| 10.00 | 20.00 |" in md
    assert imread(out / "dev_f1.png").shape[0] >= 300


def test_duplicate_directory_names_get_distinct_labels(tmp_path: Path) -> None:
    a = make_run(tmp_path / "base", "prompt", em=1.0, f1=2.0)
    b = make_run(tmp_path / "large", "prompt", em=3.0, f1=4.0, model_name_or_path="google/t5-large-lm-adapt")
    rows = section(make_report([a, b], tmp_path / "out").read_text(encoding="utf-8"), "Runs")
    assert [r.split(" | ")[0] for r in rows] == ["| base/prompt", "| large/prompt"]


def test_missing_results_is_a_user_error(runs: list[Path], tmp_path: Path) -> None:
    (runs[2] / "results.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"pt_adamw_1e3/results\.json is missing"):
        make_report(runs, out)
    assert not (out / "report.md").exists()


def test_bad_json_is_a_user_error(runs: list[Path], tmp_path: Path) -> None:
    (runs[0] / "results.json").write_text('{"exact_match": 78.6, "f1": ', encoding="utf-8")
    with pytest.raises(UserError, match=r"pt_af_03/results\.json is not valid JSON"):
        make_report(runs, tmp_path / "out")


def test_results_without_scores_is_a_user_error(tmp_path: Path) -> None:
    run = make_run(tmp_path, "noscore", em=1.0, f1=2.0)
    (run / "results.json").write_text(json.dumps({"exact_match": 1.0}), encoding="utf-8")
    with pytest.raises(UserError, match=r"noscore/results\.json has no numeric 'f1'"):
        make_report([run], tmp_path / "out")


def test_bad_config_and_missing_directory(tmp_path: Path) -> None:
    run = make_run(tmp_path, "badcfg", em=1.0, f1=2.0)
    (run / "config.yaml").write_text("lr: [0.3\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"badcfg/config\.yaml is not valid YAML"):
        make_report([run], tmp_path / "out")
    with pytest.raises(UserError, match="nowhere is not a directory"):
        make_report([tmp_path / "nowhere"], tmp_path / "out")
    with pytest.raises(UserError, match="at least one run"):
        make_report([], tmp_path / "out")


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("google/t5-base-lm-adapt", "base"),
        ("google/t5-v1_1-base", "base"),
        ("../shared/models/t5-xxl-lm-adapt", "xxl"),
        ("t5-small", "small"),
        ("google/t5-v1_1-xl/", "xl"),
        ("my-custom-model", "my-custom-model"),
    ],
)
def test_model_size(name: str, size: str) -> None:
    assert model_size(name) == size


def test_runs_table_shows_text_format_and_t5_scores(tmp_path: Path) -> None:
    """A padded-text run shows its format and T5's own scores beside the official ones; an older run's
    boolean pad_punctuation reads as its nearer named format."""
    padded = make_run(tmp_path, "paper", em=80.0, f1=88.0, punctuation="paper")
    results = json.loads((padded / "results.json").read_text())
    results.update(punctuation="paper", t5_exact_match=81.25, t5_f1=88.5)
    (padded / "results.json").write_text(json.dumps(results), encoding="utf-8")
    legacy = make_run(tmp_path, "legacy", em=70.0, f1=75.0, pad_punctuation=True)
    rows = section(make_report([padded, legacy], tmp_path / "out").read_text(encoding="utf-8"), "Runs")
    row = next(r for r in rows if r.startswith("| paper |"))
    assert "| 100 | paper | 3000 | 2500 | 80.00 | 88.00 | 81.25 | 88.50 |" in row
    row = next(r for r in rows if r.startswith("| legacy |"))
    assert "| 100 | paper | 3000 | 2500 | 70.00 | 75.00 | — | — |" in row


def test_finished_run_without_dev_set_is_reported_without_scores(tmp_path: Path) -> None:
    scored = make_run(tmp_path, "with_dev", em=10.0, f1=20.0)
    no_dev = make_run(tmp_path, "no_dev", em=0.0, f1=0.0, optimizer="adamw")
    results = json.loads((no_dev / "results.json").read_text())
    (no_dev / "results.json").write_text(
        json.dumps({**results, "exact_match": None, "f1": None, "best_step": None})
    )
    md = make_report([scored, no_dev], tmp_path / "out").read_text(encoding="utf-8")
    rows = section(md, "Runs")
    assert rows[1].startswith("| no_dev |") and "| — | — |" in rows[1]
    assert "Trained without a dev set (no scores, left out of the comparisons): no_dev." in md
    assert "## Optimizer comparison" not in md  # nothing to compare a score with


def test_short_runs_get_integer_step_ticks_and_zero_scores_a_non_negative_axis(tmp_path: Path) -> None:
    from softprompt.training.report_plots import draw_figure

    run = make_run(tmp_path, "short", em=0.0, f1=0.0, max_steps=3)
    evals = [{"event": "eval", "step": s, "exact_match": 0.0, "f1": 0.0} for s in (1, 2, 3)]
    trains = [{"event": "train", "step": s, "loss": 2.0 - s / 10} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in trains + evals) + "\n")
    loaded = load_run(run)
    for stem in ("loss", "dev_f1", "dev_em"):
        ax = draw_figure(stem, [loaded]).axes[0]
        ax.figure.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (stem, ticks)
        low, high = ax.get_ylim()
        assert low == 0 and high >= 1.0, (stem, low, high)


def test_labels_have_no_doubled_slash_and_a_repeated_run_counts_once(tmp_path: Path) -> None:
    from softprompt.training.report import _unique_labels

    assert _unique_labels([Path("/a"), Path("/b/a")]) == ["a", "b/a"]
    assert not any("//" in label for label in _unique_labels([Path("/x"), Path("/y/x")]))
    run = make_run(tmp_path, "twice", em=1.0, f1=2.0)
    md = make_report([run, Path(f"{run}/"), tmp_path / "." / "twice"], tmp_path / "out").read_text()
    rows = section(md, "Runs")
    assert len(rows) == 1 and rows[0].startswith("| twice |")
    assert "(1)" not in md and "1 run(s)" in md


def test_a_text_task_run_shows_its_own_score(tmp_path: Path) -> None:
    run = make_run(tmp_path, "rte", em=1.0, f1=2.0)
    results = json.loads((run / "results.json").read_text())
    scores = {"accuracy": 71.5, "invalid_predictions": 3.0}
    results.update(exact_match=None, f1=None, task="rte", metric="accuracy", scores=scores, **scores)
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    qa = make_run(tmp_path, "qa", em=10.0, f1=20.0)
    rows = section(make_report([run, qa], tmp_path / "out").read_text(encoding="utf-8"), "Runs")
    assert "| rte accuracy 71.50 |" in rows[0] and "| — | — |" in rows[0]  # no EM/F1 of its own
    assert "| 10.00 | 20.00 |" in rows[1] and "accuracy" not in rows[1]


def _as_text_task_run(run: Path, task: str, metric: str, accuracies: list[float]) -> None:
    """Rewrite a fixture run as a text-task run: accuracy evaluations and no EM/F1, as the trainer writes."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = iter(accuracies)
    lines = []
    for r in records:
        if r.get("event") == "eval":
            r = {"event": "eval", "step": r["step"], metric: next(evals), "invalid_predictions": 0.0}
        lines.append(json.dumps(r))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    results = json.loads((run / "results.json").read_text())
    scores = {metric: max(accuracies), "invalid_predictions": 0.0}
    results.update(exact_match=None, f1=None, task=task, metric=metric, scores=scores, **scores)
    (run / "results.json").write_text(json.dumps(results))


def test_text_task_runs_have_their_own_curves_and_comparisons(tmp_path: Path) -> None:
    """A text-task run is scored (not "trained without a dev set"): its accuracy evaluations make its
    curve in dev_score, and runs differing only in optimizer compare on that accuracy."""
    from softprompt.training.report_plots import draw_figure

    curves = {"a": [50.0, 60.0, 70.0, 75.0, 80.0, 81.0], "b": [40.0, 45.0, 55.0, 60.0, 62.0, 64.5]}
    af = make_run(tmp_path, "task_c_af", em=0.0, f1=0.0, task="rte")
    aw = make_run(tmp_path, "task_c_aw", em=0.0, f1=0.0, task="rte", optimizer="adamw")
    _as_text_task_run(af, "rte", "accuracy", curves["a"])
    _as_text_task_run(aw, "rte", "accuracy", curves["b"])
    qa = make_run(tmp_path, "qa", em=10.0, f1=20.0)
    out = tmp_path / "out"
    md = make_report([af, aw, qa], out).read_text(encoding="utf-8")
    assert "Trained without a dev set" not in md
    rows = section(md, "Optimizer comparison")
    assert "| Optimizer | Run | Dev rte accuracy | Δ |" in md
    assert rows == ["| adafactor | task_c_af | 81.00 | — |", "| adamw | task_c_aw | 64.50 | -16.50 |"]
    assert (out / "dev_score.png").is_file() and "](dev_score.png)" in md
    runs = [load_run(af), load_run(aw), load_run(qa)]
    ax = draw_figure("dev_score", runs).axes[0]
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert (
        lines["task_c_af (rte accuracy)"] == curves["a"] and lines["task_c_aw (rte accuracy)"] == curves["b"]
    )
    assert lines["qa (f1)"] == [p[2] for p in runs[2].evals] and len(lines["qa (f1)"]) == 6


def test_a_one_step_loss_curve_is_drawn_with_a_marker(tmp_path: Path) -> None:
    from softprompt.training.report_plots import draw_figure

    run = make_run(tmp_path, "one", em=1.0, f1=2.0, max_steps=10)
    (run / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 10, "loss": 2.0}) + "\n")
    (line,) = draw_figure("loss", [load_run(run)]).axes[0].get_lines()
    assert line.get_marker() == "o" and list(line.get_ydata()) == [2.0]


def test_a_multi_prompt_run_is_one_row_and_one_curve_per_prompt(tmp_path: Path) -> None:
    """A `--num_prompts` run's results.json holds each prompt's results under its name, and its
    metrics.jsonl each prompt's records under `prompt`: the report shows every prompt as a run of its own."""
    run = tmp_path / "multi"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({**BASE_CONFIG, "num_prompts": 2}), encoding="utf-8")
    scores = {"prompt0": (61.25, 70.5), "prompt1": (55.0, 66.75)}
    records: list[dict[str, Any]] = [{"event": "start", "step": 0, "time": 0.0}]
    for step in (10, 20):
        for k, (name, (em, f1)) in enumerate(scores.items()):
            records.append({"event": "train", "step": step, "prompt": name, "loss": 3.0 - step / 10 - k})
            records.append({"event": "eval", "step": step, "prompt": name, "exact_match": em, "f1": f1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    prompts = {
        name: {"exact_match": em, "f1": f1, "best_step": 20, "steps": 20, "mode": "prompt", "lr": 0.3}
        for name, (em, f1) in scores.items()
    }
    results = {"steps": 20, "train_seconds": 12.0, "num_prompts": 2, "prompts": prompts}
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    md = make_report([run], tmp_path / "out").read_text(encoding="utf-8")
    rows = section(md, "Runs")
    assert len(rows) == 2
    for name, (em, f1) in scores.items():
        row = next(r for r in rows if r.startswith(f"| multi/{name} |"))
        assert f"| {em:.2f} | {f1:.2f} |" in row
    # Each prompt's own curve: prompt1's losses, not both prompts' interleaved.
    from softprompt.training.report_runs import load_runs

    one = load_runs(run)[1]
    assert one.label == "multi/prompt1" and one.train == [(10, 1.0), (20, 0.0)]
    assert one.evals == [(10, 55.0, 66.75), (20, 55.0, 66.75)]
