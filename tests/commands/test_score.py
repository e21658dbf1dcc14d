"""`softprompt score` and its script twin `python -m softprompt.commands.score`: the official numbers, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import METRIC_VECTORS, SQUAD_DEV, need
from softprompt.commands.score import main
from softprompt.errors import DataError


@pytest.fixture(scope="module")
def vectors() -> list[dict]:
    with need(METRIC_VECTORS).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _official_means(rows: list[dict]) -> dict[str, float]:
    """The official mean: sum in order, divide by all questions, times 100."""
    em = sum(row["exact_match"] for row in rows)
    f1 = sum(row["f1"] for row in rows)
    return {"exact_match": 100.0 * em / len(rows), "f1": 100.0 * f1 / len(rows)}


def _dataset() -> dict:
    qas = [{"id": "a", "question": "?", "answers": [{"text": "The Cat", "answer_start": 0}]}]
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]}


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.mark.shared
def test_main_prints_official_json(vectors: list[dict], tmp_path: Path, capsys) -> None:
    pred_path = tmp_path / "p.json"
    pred_path.write_text(json.dumps({row["id"]: row["prediction"] for row in vectors}), encoding="utf-8")
    assert main([str(need(SQUAD_DEV)), str(pred_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["f1"] == pytest.approx(_official_means(vectors)["f1"], abs=1e-9, rel=0)


def test_main_reports_bad_input_on_one_line(tmp_path: Path, capsys) -> None:
    ds = _write(tmp_path / "ds.json", _dataset())
    assert main([str(ds), str(tmp_path / "missing.json")]) == DataError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.json" in err
    assert err.count("\n") == 1


def test_score_summarises_a_partial_prediction_file_and_can_score_only_its_questions(
    tmp_path: Path, capsys
) -> None:
    """`softprompt score` lists ten unanswered questions and counts the rest; --only_predicted scores the
    answered ones alone. The script twin keeps the official line per question."""
    from softprompt.cli import main as cli_main

    qas = [
        {"id": f"q{i}", "question": "?", "answers": [{"text": "cat", "answer_start": 0}]} for i in range(30)
    ]
    dataset = _write(
        tmp_path / "d.json",
        {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "cat", "qas": qas}]}]},
    )
    preds = _write(tmp_path / "p.json", {"q0": "cat", "q1": "dog"})
    assert cli_main(["score", str(dataset), str(preds)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"exact_match": 100 / 30, "f1": 100 / 30}
    lines = err.splitlines()
    assert lines[:10] == [f"Unanswered question q{i} will receive score 0." for i in range(2, 12)]
    assert lines[10:] == [
        "28 of 30 questions have no prediction and score 0 (18 not listed); --only_predicted scores the predicted questions only"
    ]
    assert cli_main(["score", str(dataset), str(preds), "--only_predicted"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"exact_match": 50.0, "f1": 50.0} and err == ""
    assert main([str(dataset), str(preds)]) == 0
    assert len(capsys.readouterr().err.splitlines()) == 28
