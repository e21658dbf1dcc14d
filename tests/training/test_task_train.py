"""Text tasks through `softprompt train` / `eval`: a classification task from CSV and JSONL, end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from softprompt.cli import main
from softprompt.tasks.metrics.text import score_texts
from softprompt.tasks.text.presets import load_task
from softprompt.tasks.text.spec import TaskSpec, TextExample

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


def test_a_prompt_keeps_its_task_for_eval_and_predict(tmp_path, tiny_model_dir, capsys):
    """A prompt trained on a text task carries the task: eval scores it with the task's metric without
    --task, equal to training's own evaluation, and predict --fields / --input_file answer alike."""
    rows = sentiment_rows(12, seed=2)
    train_jsonl = write_jsonl(tmp_path / "train.jsonl", rows)
    dev_csv = write_csv(tmp_path / "dev.csv", rows[:8])
    out = tmp_path / "prompt_run"
    rc = main(
        [
            "train", "--input_template", "sentiment review: {text}", "--label_field", "label",
            "--labels", "neg", "pos", "--metric", "accuracy", "--id_field", "id",
            "--train_file", str(train_jsonl), "--validation_file", str(dev_csv),
            "--model", str(tiny_model_dir), "--random_init", "--output_dir", str(out), "--prompt_tuning",
            "--prompt_init", "class_label", "--n_tokens", "4", "--batch_size", "4", "--max_steps", "2",
            "--eval_steps", "2", "--save_steps", "2", "--max_source_length", "32", "--max_target_length", "4",
            "--report_to", "none",
        ]
    )  # fmt: skip
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    config = json.loads((out / "best" / "prompt_config.json").read_text())
    assert config["task"]["input_template"] == "sentiment review: {text}"
    assert config["task"]["labels"] == ["neg", "pos"] and config["extra"]["prompt_init_labels"] == [
        "neg",
        "pos",
    ]
    capsys.readouterr()
    preds_file = tmp_path / "preds.json"
    argv = ["eval", "--model", str(tiny_model_dir), "--random_init", "--prompt", str(out / "best")]
    argv += ["--validation_file", str(dev_csv), "--max_target_length", "4", "--output", str(preds_file)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "custom" and report["metric"] == "accuracy" and report["n_examples"] == 8
    assert report["accuracy"] == results["accuracy"]
    assert report["invalid_predictions"] == results["invalid_predictions"]
    predictions = json.loads(preds_file.read_text())
    assert predictions == json.loads((out / "predictions_best.json").read_text())
    # Rank classification: every answer is a label, chosen by log-likelihood, and scored the same way.
    ranked_file = tmp_path / "ranked.json"
    assert main([*argv[:-2], "--classify", "rank", "--output", str(ranked_file)]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert ranked["classify"] == "rank" and ranked["invalid_predictions"] == 0
    ranked_answers = json.loads(ranked_file.read_text())
    assert set(ranked_answers.values()) <= {"neg", "pos"} and set(ranked_answers) == set(predictions)
    gold = {r["id"]: r["label"] for r in rows[:8]}
    assert ranked["accuracy"] == 100 * sum(ranked_answers[k] == gold[k] for k in gold) / 8
    # predict: the same answers from --fields (one row) and from --input_file (JSONL rows).
    predict = ["predict", "--model", str(tiny_model_dir), "--random_init", "--prompt", str(out / "best")]
    predict += ["--max_target_length", "4"]
    assert main([*predict, "--fields", json.dumps({"text": rows[0]["text"]})]) == 0
    assert capsys.readouterr().out.strip() == predictions[rows[0]["id"]]
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"id": r["id"], "text": r["text"]} for r in rows[:8]])
    assert main([*predict, "--input_file", str(inputs)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert {x["id"]: x["answer"] for x in lines} == predictions
    # predict --classify rank: the unlabelled rows get the labels eval's rank classification chose.
    assert main([*predict, "--input_file", str(inputs), "--classify", "rank"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert {x["id"]: x["answer"] for x in lines} == ranked_answers
    # ... and it refuses a task without label strings (SQuAD) in one line, before loading the model.
    qa_argv = ["predict", "--model", str(tiny_model_dir), "--random_init", "--classify", "rank"]
    assert main([*qa_argv, "--question", "q?", "--context", "c"]) != 0
    err = capsys.readouterr().err
    assert "--classify rank is for classification tasks" in err and "Traceback" not in err
    # A row without the template's field: one line naming the file, the row and the field.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "txt": "typo"}])
    assert main([*predict, "--input_file", str(bad)]) != 0
    err = capsys.readouterr().err
    assert f"{bad}: line 1: has no field 'text'" in err and "Traceback" not in err


@pytest.mark.parametrize("preset", ["multirc", "record"])
def test_superglue_presets_train_and_score_through_the_cli(tmp_path, tiny_model_dir, preset):
    """Official-layout JSONL records of MultiRC and ReCoRD go through train -> eval with their own metrics."""
    from test_layouts import MULTIRC, RECORD

    record = MULTIRC if preset == "multirc" else RECORD
    data = write_jsonl(tmp_path / "val.jsonl", [record])
    out = tmp_path / preset
    argv = ["train", "--task", preset, "--train_file", str(data), "--validation_file", str(data)]
    argv += ["--model", str(tiny_model_dir), "--random_init", "--output_dir", str(out), "--prompt_tuning"]
    argv += ["--n_tokens", "2", "--batch_size", "2", "--max_steps", "1", "--eval_steps", "1"]
    argv += ["--max_source_length", "64", "--max_target_length", "3", "--report_to", "none"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    keys = (
        ["score", "f1a", "exact_match", "invalid_predictions"]
        if preset == "multirc"
        else ["score", "f1", "exact_match"]
    )
    assert results["metric"] == preset and list(results["scores"]) == keys
    assert all(0 <= results["scores"][k] <= 100 for k in keys if k != "invalid_predictions")
    predictions = json.loads((out / "predictions_best.json").read_text())
    ids = [e.id for e in load_task(preset).examples_from_records([("line 1", record)], source="val.jsonl")]
    assert sorted(predictions) == sorted(ids)


def test_summary_progress_line_and_prompt_config_are_the_text_task_own(tmp_path, tiny_model_dir, capsys):
    """`train` sums a text task up by its own metric (not SQuAD's null EM/F1), and the progress line of
    the last step shows that step's dev score, the final evaluation's, not the one before it."""
    rows = sentiment_rows(8, seed=3)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "run"
    argv = ["train", "--input_template", "sentiment review: {text}", "--label_field", "label"]
    argv += [
        "--labels",
        "neg",
        "pos",
        "--id_field",
        "id",
        "--train_file",
        str(data),
        "--validation_file",
        str(data),
    ]
    argv += ["--model", str(tiny_model_dir), "--random_init", "--output_dir", str(out), "--prompt_tuning"]
    argv += [
        "--n_tokens",
        "2",
        "--batch_size",
        "4",
        "--max_steps",
        "3",
        "--eval_steps",
        "0",
        "--save_steps",
        "2",
    ]
    argv += ["--max_source_length", "32", "--max_target_length", "4", "--report_to", "none"]
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    results = json.loads((out / "results.json").read_text())
    assert summary["task"] == "custom" and summary["metric"] == "accuracy"
    assert summary["accuracy"] == results["accuracy"] and "invalid_predictions" in summary
    assert "exact_match" not in summary and "f1" not in summary
    assert summary["best_step"] == results["best_step"] and summary["steps"] == 3
    evals = {
        e["step"]: e
        for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if e["event"] == "eval"
    }
    assert sorted(evals) == [3]  # no scheduled evaluation: the final one only
    # A text task's prompt records its own template, not SQuAD's template and punctuation (item 7).
    config = json.loads((out / "best" / "prompt_config.json").read_text())
    assert config["input_template"] == "sentiment review: {text}" and config["punctuation"] == "none"
    assert results["punctuation"] == "none"
    lines = [line for line in captured.err.splitlines() if line.startswith("train: step 3/3 ")]
    assert len(lines) == 1 and f"dev_accuracy {evals[3]['accuracy']:.4g} " in lines[0], lines


def test_multirc_summary_names_its_own_scores(tmp_path, tiny_model_dir, capsys):
    """MultiRC's summary line carries f1a and its exact match, not SQuAD's F1 (null)."""
    from test_layouts import MULTIRC

    data = write_jsonl(tmp_path / "val.jsonl", [MULTIRC])
    argv = ["train", "--task", "multirc", "--train_file", str(data), "--validation_file", str(data)]
    argv += [
        "--model",
        str(tiny_model_dir),
        "--random_init",
        "--output_dir",
        str(tmp_path / "m"),
        "--prompt_tuning",
    ]
    argv += ["--n_tokens", "2", "--batch_size", "2", "--max_steps", "1", "--max_source_length", "64"]
    argv += ["--max_target_length", "3", "--report_to", "none"]
    capsys.readouterr()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    assert summary["metric"] == "multirc" and "f1" not in summary
    assert {k: summary[k] for k in results["scores"]} == results["scores"] and "f1a" in summary


def test_a_prompt_on_random_weights_records_their_seed_and_is_checked_against_it(
    tmp_path, tiny_model_dir, capsys
):
    """A prompt trained with --random_init --seed 7 records the seed; its card's predict command carries
    --random_init --seed 7 and runs; another seed is refused in one line, like another base model."""
    import shlex

    rows = sentiment_rows(8, seed=4)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "run"
    argv = ["train", "--input_template", "sentiment review: {text}", "--label_field", "label"]
    argv += ["--labels", "neg", "pos", "--train_file", str(data), "--validation_file", str(data)]
    argv += ["--model", str(tiny_model_dir), "--random_init", "--seed", "7", "--output_dir", str(out)]
    argv += ["--prompt_tuning", "--n_tokens", "2", "--batch_size", "4", "--max_steps", "1"]
    argv += ["--max_source_length", "32", "--max_target_length", "4", "--report_to", "none"]
    assert main(argv) == 0
    config = json.loads((out / "best" / "prompt_config.json").read_text())
    assert config["extra"]["random_init_seed"] == 7
    card = (out / "best" / "README.md").read_text()
    command = next(line for line in card.splitlines() if line.startswith("softprompt predict "))
    words = shlex.split(command)
    assert words[words.index("--random_init") + 1 : words.index("--random_init") + 3] == ["--seed", "7"]
    capsys.readouterr()
    assert main(words[1:]) == 0  # the card's own command, as written (an untrained answer may be empty)
    capsys.readouterr()
    other = [
        "predict",
        "--model",
        str(tiny_model_dir),
        "--random_init",
        "--seed",
        "8",
        "--prompt",
        str(out / "best"),
    ]
    assert main([*other, "--fields", json.dumps({"text": "a film"})]) != 0
    err = capsys.readouterr().err
    assert "was trained on random weights seeded 7, not 8 (pass --seed 7)" in err and "Traceback" not in err


def test_a_task_flag_other_than_the_prompt_own_is_warned_about(tmp_path, tiny_model_dir, capsys):
    """`--task boolq` on an RTE prompt is allowed, with a warning naming both; `--task rte` says nothing."""
    import torch

    from conftest import tiny_config
    from softprompt.io.checkpoint import PromptConfig, save_prompt

    d_model = tiny_config().d_model
    config = PromptConfig(
        base_model=str(tiny_model_dir), n_tokens=2, d_model=d_model, task=load_task("rte").to_dict()
    )
    prompt = save_prompt(tmp_path / "rte_prompt", torch.zeros(2, d_model), config)
    argv = [
        "predict",
        "--model",
        str(tiny_model_dir),
        "--random_init",
        "--prompt",
        str(prompt),
        "--max_target_length",
        "2",
    ]
    boolq = ["--task", "boolq", "--fields", json.dumps({"passage": "p", "question": "q"})]
    capsys.readouterr()
    assert main([*argv, *boolq]) == 0
    warning = f"softprompt: warning: the prompt in {prompt} was trained on rte, but the flags name boolq"
    assert warning in capsys.readouterr().err
    assert main([*argv, "--task", "rte", "--fields", json.dumps({"premise": "p", "hypothesis": "h"})]) == 0
    assert "warning" not in capsys.readouterr().err
