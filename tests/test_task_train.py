"""Text tasks through `softprompt train` / `eval`: a classification task from CSV and JSONL, end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from softprompt.cli import main
from softprompt.task import TaskSpec, TextExample
from softprompt.task_metrics import score_texts

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["film", "plot", "cast", "music", "ending", "story", "scenes", "acting"]


def sentiment_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Reviews whose label is the adjective they contain: learnable from one word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(["pos", "neg"])
        adjective = rng.choice(["great", "wonderful"] if label == "pos" else ["awful", "boring"])
        rows.append(
            {"id": f"r{seed}-{i}", "text": f"the {rng.choice(WORDS)} was {adjective}", "label": label}
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("id,text,label\n" + "".join(f"{r['id']},{r['text']},{r['label']}\n" for r in rows))
    return path


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TASK_YAML = """\
# Sentiment of short reviews (a test task).
# Launch: softprompt train --task sentiment.yaml --train_file train.csv --validation_file dev.jsonl
name: sentiment
input_template: "sentiment review: {text}"
label_field: label
labels: {pos: positive, neg: negative}
id_field: id
"""


def test_classification_from_csv_and_jsonl_trains_and_scores_accuracy(tmp_path, tiny_model_dir):
    train_rows = sentiment_rows(16, seed=1)
    train_csv = write_csv(tmp_path / "train.csv", train_rows)
    dev = write_jsonl(tmp_path / "dev.jsonl", train_rows)  # the same rows: fine-tuning must fit them
    task_file = tmp_path / "sentiment.yaml"
    task_file.write_text(TASK_YAML)
    out = tmp_path / "run"
    rc = main(
        [
            "train", "--task", str(task_file), "--train_file", str(train_csv), "--validation_file", str(dev),
            "--model", str(tiny_model_dir), "--random_init", "--output_dir", str(out), "--optimizer", "adamw",
            "--lr", "3e-3", "--batch_size", "8", "--max_steps", "60", "--eval_steps", "30", "--save_steps", "30",
            "--max_source_length", "32", "--max_target_length", "4", "--report_to", "none", "--dropout", "0",
        ]
    )  # fmt: skip
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "sentiment" and results["metric"] == "accuracy"
    assert list(results["scores"]) == ["accuracy", "invalid_predictions"]
    assert results["accuracy"] == 100.0 and results["invalid_predictions"] == 0
    assert results["exact_match"] is None and results["f1"] is None
    predictions = json.loads((out / "predictions_best.json").read_text())
    assert set(predictions) == {r["id"] for r in train_rows}
    # results.json's score is the metric of the saved predictions, recomputed here.
    spec = TaskSpec.from_dict(
        {"input_template": "{t}", "label_field": "l", "labels": ["positive", "negative"]}
    )
    gold = {"pos": "positive", "neg": "negative"}
    examples = [TextExample(r["id"], "", (gold[r["label"]],), gold[r["label"]]) for r in train_rows]
    recomputed = score_texts("accuracy", examples, [predictions[r["id"]] for r in train_rows], spec.classes)
    assert recomputed["accuracy"] == results["accuracy"]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [30, 60] and all("accuracy" in e for e in evals)
    assert results["best_step"] in (30, 60)
