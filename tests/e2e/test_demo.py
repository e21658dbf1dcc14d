"""The offline demo: the synthetic corpus and a whole (quick) demo run (the tokenizer: tests/commands/test_demo_setup.py).

The full demo (`softprompt demo`, about 2 minutes on 2 CPU cores) is documented to give, on task B's
held-out test set: zero-shot EM < 20, prompt-tuned EM >= 60, with the frozen task-A model unchanged.
`test_full_demo_meets_its_targets` checks that when SOFTPROMPT_FULL_DEMO=1; the quick variant runs always.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from softprompt.data.synthetic import (
    ATTRIBUTES,
    DEFAULT_ATTRIBUTE,
    TASK_B_ATTRIBUTE,
    TOWNS,
    TRADES,
    generate_split,
    write_squad_json,
)
from softprompt.tasks.squad.reader import load_squad_json

RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json")


def _questions(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(p["context"], qa) for article in data["data"] for p in article["paragraphs"] for qa in p["qas"]]


# ------------------------------------------------------------------------------------------ generator


def test_generator_is_seeded(tmp_path: Path) -> None:
    first = write_squad_json(generate_split("a", "train", 300, seed=3), tmp_path / "one.json")
    again = write_squad_json(generate_split("a", "train", 300, seed=3), tmp_path / "two.json")
    other = write_squad_json(generate_split("a", "train", 300, seed=4), tmp_path / "three.json")
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    # Splits are independent streams: a dev set never repeats the training contexts.
    train_contexts = {c for c, _ in _questions(generate_split("b", "train", 300, seed=3))}
    dev_contexts = {c for c, _ in _questions(generate_split("b", "dev", 300, seed=3))}
    assert not train_contexts & dev_contexts


@pytest.mark.parametrize("task", ["a", "b"])
@pytest.mark.parametrize("n_people", [(1, 1), (2, 4)])
def test_every_answer_is_a_span_of_its_context(tmp_path: Path, task: str, n_people: tuple[int, int]) -> None:
    data = generate_split(task, "dev", 250, seed=0, n_people=n_people)
    questions = _questions(data)
    assert len(questions) == 250
    assert len({qa["id"] for _, qa in questions}) == 250
    for context, qa in questions:
        (answer,) = qa["answers"]
        start = answer["answer_start"]
        assert context[start : start + len(answer["text"])] == answer["text"], qa
        # Unambiguous: the answer occurs exactly once, so any span finder agrees with answer_start.
        assert context.count(answer["text"]) == 1, (context, answer)
    # The project's own SQuAD loader reads the file without complaint.
    examples = load_squad_json(write_squad_json(data, tmp_path / "data.json"))
    assert len(examples) == 250


def test_no_answer_value_hides_inside_another_word() -> None:
    from softprompt.data.synthetic import VALUES, vocabulary_words

    words = vocabulary_words()
    clashes = [(v, w) for values in VALUES.values() for v in values for w in words if v != w and v in w]
    assert not clashes


def test_task_b_reuses_task_a_bare_name_format_with_another_attribute() -> None:
    a = _questions(generate_split("a", "train", 1000, seed=0))
    bare = [qa for _, qa in a if "?" not in qa["question"]]
    # About a fifth of task A is bare names, all answered with the trade.
    assert 0.1 < len(bare) / len(a) < 0.3
    assert all(qa["answers"][0]["text"] in TRADES for qa in bare)
    worded = [qa for _, qa in a if "?" in qa["question"]]
    assert {qa["answers"][0]["text"] in TOWNS for qa in worded} == {True, False}
    b = _questions(generate_split("b", "train", 300, seed=0))
    assert all("?" not in qa["question"] for _, qa in b)
    assert all(qa["answers"][0]["text"] in TOWNS for _, qa in b)
    assert DEFAULT_ATTRIBUTE != TASK_B_ATTRIBUTE and TASK_B_ATTRIBUTE in ATTRIBUTES


def test_generator_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="task"):
        generate_split("c", "train", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_questions"):
        generate_split("a", "train", 0)
    with pytest.raises(ValueError, match="task_b_attribute"):
        generate_split("b", "train", 10, task_b_attribute=DEFAULT_ATTRIBUTE)


# ------------------------------------------------------------------------------------------ the demo


def _run_watching_the_frozen_model(
    monkeypatch: pytest.MonkeyPatch, output_dir: Path, **kwargs: Any
) -> tuple[dict[str, Any], list[tuple[bytes, bytes]]]:
    """Run the demo, recording the frozen model's weight file before and after each prompt-tuning run."""
    import softprompt.training.loop
    from softprompt.commands.demo import run_demo

    real_train = softprompt.training.loop.train
    seen: list[tuple[bytes, bytes]] = []

    def watched(cfg: Any) -> dict[str, Any]:
        if not cfg.prompt_tuning:
            return real_train(cfg)
        weights = Path(cfg.model_name_or_path) / "model.safetensors"
        before = weights.read_bytes()
        result = real_train(cfg)
        seen.append((before, weights.read_bytes()))
        return result

    monkeypatch.setattr(softprompt.training.loop, "train", watched)
    return run_demo(output_dir, echo=False, **kwargs), seen


def _check_layout(out: Path, summary: dict[str, Any]) -> None:
    for phase in ("task_a_finetune", "task_b_prompt", "task_b_finetune", "task_c_prompt"):
        for name in RUN_FILES:
            assert (out / phase / name).is_file(), f"{phase}/{name}"
        assert (out / phase / "best").is_dir()
        assert (out / phase / "last").exists()
    # Fine-tuned runs save a Hugging Face model directory; the prompt run saves only the prompt.
    for phase in ("task_a_finetune", "task_b_finetune"):
        best = out / phase / "best"
        assert (best / "model.safetensors").is_file() and (best / "tokenizer.json").is_file()
    assert (out / "task_b_prompt" / "best" / "prompt.safetensors").is_file()
    assert not (out / "task_b_prompt" / "best" / "model.safetensors").exists()
    assert (out / "summary.md").read_text().count("\n|") >= 4
    assert json.loads((out / "summary.json").read_text()) == summary
    b = summary["task_b"]
    for row in ("zero_shot", "prompt_tuning", "fine_tuning"):
        for split in ("dev", "test"):
            for metric in ("exact_match", "f1"):
                assert 0.0 <= b[row][split][metric] <= 100.0
    assert (
        b["prompt_tuning"]["trainable_parameters"] == summary["plan"]["n_tokens"] * summary["plan"]["d_model"]
    )
    assert b["fine_tuning"]["trainable_parameters"] > 100 * b["prompt_tuning"]["trainable_parameters"]
    assert summary["frozen_model_unchanged"] is True


@pytest.mark.slow
def test_quick_demo_prompt_tuning_beats_zero_shot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo"
    summary, frozen = _run_watching_the_frozen_model(monkeypatch, out, quick=True, seed=0)
    _check_layout(out, summary)
    # Two prompts (task B, task C) trained on the one frozen model; neither changed a byte of it.
    assert len(frozen) == 2 and all(x == y for x, y in frozen), "prompt tuning changed the frozen model"
    c = summary["task_c"]
    assert c["test"]["accuracy"] >= c["zero_shot_test"]["accuracy"] + 40
    config = json.loads((out / "task_c_prompt" / "best" / "prompt_config.json").read_text())
    assert config["init"] == "class_label" and config["task"]["labels"] == [
        "town",
        "trade",
        "year",
        "instrument",
    ]
    assert config["extra"]["prompt_init_labels"] == ["town", "trade", "year", "instrument"]
    b = summary["task_b"]
    assert b["zero_shot"]["test"]["exact_match"] < 20
    assert b["prompt_tuning"]["test"]["exact_match"] >= b["zero_shot"]["test"]["exact_match"] + 30
    assert b["fine_tuning"]["test"]["exact_match"] >= 60
    # Same seed, same place: the demo replaces its own earlier run instead of refusing.
    assert (out / ".softprompt-demo").is_file()
    # The report of the demo's prompt runs: task C is scored by its accuracy curve, not "without a dev set".
    from softprompt.cli import main
    from softprompt.training.report_plots import draw_figure
    from softprompt.training.report_runs import load_run

    report = tmp_path / "report"
    assert (
        main(["report", str(out / "task_c_prompt"), str(out / "task_b_prompt"), "--output_dir", str(report)])
        == 0
    )
    assert "Trained without a dev set" not in (report / "report.md").read_text()
    evals = [json.loads(line) for line in (out / "task_c_prompt" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [e["accuracy"] for e in evals if e["event"] == "eval"]
    lines = {
        line.get_label(): list(line.get_ydata())
        for line in draw_figure("dev_score", [load_run(out / "task_c_prompt")]).axes[0].get_lines()
    }
    assert accuracy and lines == {"task_c_prompt (task_c accuracy)": accuracy}


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SOFTPROMPT_FULL_DEMO") != "1", reason="set SOFTPROMPT_FULL_DEMO=1 (~2 min)"
)
def test_full_demo_meets_its_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo"
    summary, frozen = _run_watching_the_frozen_model(monkeypatch, out, seed=0)
    _check_layout(out, summary)
    assert len(frozen) == 2 and all(x == y for x, y in frozen)
    assert summary["task_c"]["test"]["accuracy"] >= 80
    b = summary["task_b"]
    assert b["zero_shot"]["test"]["exact_match"] < 20
    assert b["prompt_tuning"]["test"]["exact_match"] >= 60
    assert summary["seconds"]["total"] < 300


def test_demo_refuses_a_directory_that_is_not_a_demo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from softprompt.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--output_dir", str(tmp_path)]) != 0
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert main(["demo", "--output_dir", str(tmp_path / "x"), "--threads", "0"]) != 0
