"""The Task seam: SQuAD and a text task answer the same questions, each with its own data, text and metric."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from softprompt.data.records import BadRecord
from softprompt.errors import ConfigError
from softprompt.io import rundir
from softprompt.tasks.base import EvalResult, Task
from softprompt.tasks.metrics.squad import squad_scores, squad_scores_padded
from softprompt.tasks.metrics.text import score_texts
from softprompt.tasks.resolve import resolve_task, task_from_saved
from softprompt.tasks.squad.qa_task import SquadTask
from softprompt.tasks.squad.reader import QAExample
from softprompt.tasks.squad.text import Punctuation, format_input, format_target
from softprompt.tasks.text.presets import load_task
from softprompt.tasks.text.text_task import TextTask

QA = [
    QAExample(
        id="q1", question="Where?", context="The U.S. Army met in Paris.", answers=("U.S. Army", "Paris")
    ),
    QAExample(id="q2", question="Who?", context="Ada wrote it, not Bob.", answers=("Ada",)),
]


def _flags(**kw: object) -> SimpleNamespace:
    names = ("task", "input_template", "target_template", "label_field", "id_field", "metric", "labels")
    return SimpleNamespace(**{**dict.fromkeys(names), **kw})


def test_every_task_kind_implements_the_whole_seam() -> None:
    for task in (SquadTask(), TextTask(load_task("rte"))):
        assert isinstance(task, Task)
        assert not getattr(type(task), "__abstractmethods__", None)


def test_squad_scores_are_the_official_ones_and_f1_selects() -> None:
    answers = ["the U.S. Army", "Bob"]
    result = SquadTask().score(QA, answers)
    expected = squad_scores(
        {"q1": answers[0], "q2": answers[1]}, {"q1": ["U.S. Army", "Paris"], "q2": ["Ada"]}
    )
    assert result.metrics == expected
    assert result.selection == "f1" and result.score == expected["f1"] == result.f1
    assert result.exact_match == expected["exact_match"] and result.t5_f1 is None
    assert result.predictions == {"q1": "the U.S. Army", "q2": "Bob"} and result.generated is None


def test_squad_on_padded_text_maps_answers_back_and_adds_t5s_scores() -> None:
    task = SquadTask(punctuation="paper")
    answers = ["U . S . Army", "Ada"]
    result = task.score(QA, answers)
    refs = {ex.id: list(ex.answers) for ex in QA}
    scores, raw = squad_scores_padded(
        {"q1": answers[0], "q2": answers[1]}, refs, {ex.id: ex.context for ex in QA}, "paper"
    )
    assert result.metrics == scores and list(result.metrics) == [
        "exact_match",
        "f1",
        "t5_exact_match",
        "t5_f1",
    ]
    assert result.predictions == raw == {"q1": "U.S. Army", "q2": "Ada"}
    assert result.generated == {"q1": "U . S . Army", "q2": "Ada"}
    assert result.exact_match == 100.0 and task.answer_text(QA[0], "U . S . Army") == "U.S. Army"
    # An answer that is no span of the context is shown as generated; raw text is never mapped.
    assert task.answer_text(QA[0], "Rome") == "Rome"
    assert SquadTask().answer_text(QA[0], "U . S . Army") == "U . S . Army"
    # Answers already in the context's own text are scored officially, without T5's pair.
    assert task.score_shown(QA, ["U.S. Army", "Ada"]) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_format_row_is_t5s_squad_text() -> None:
    row = SquadTask(punctuation="paper").format_row(QA[0])
    assert row == {
        "id": "q1",
        "inputs": format_input("Where?", "The U.S. Army met in Paris.", Punctuation.PAPER),
        "targets": format_target("U.S. Army", Punctuation.PAPER),
    }
    assert row["inputs"] == "question: Where ? context: The U . S . Army met in Paris . "


def test_squad_requests_need_a_question_and_a_context() -> None:
    (example,) = SquadTask().request_examples({"question": "Who?", "context": "Ada.", "id": 7})
    assert (example.id, example.question, example.context) == ("7", "Who?", "Ada.")
    for bad in ({"question": "Who?"}, {"question": "", "context": "x"}, {"question": 1, "context": "x"}):
        with pytest.raises(BadRecord, match="needs non-empty string fields 'question' and 'context'"):
            SquadTask().request_examples(bad)
    with pytest.raises(ConfigError, match="--classify rank is for classification tasks"):
        SquadTask().rank_classes()


def test_text_task_scores_with_its_metric_and_its_first_score_selects() -> None:
    task = TextTask(load_task("cb"))
    records = [
        {"premise": "p", "hypothesis": "h", "label": 0, "idx": 0},
        {"premise": "p", "hypothesis": "h", "label": 2, "idx": 1},
    ]
    examples = task.spec.examples_from_records(enumerate(records), source="test")
    result = task.score(examples, ["entailment", "nope"])
    expected = score_texts(task.spec.metric, examples, ["entailment", "nope"], task.spec.classes)
    assert result.metrics == expected and result.selection == next(iter(expected)) == "score"
    assert task.metric == "macro_f1" and task.classes == ("entailment", "contradiction", "neutral")
    assert task.rank_classes() == task.classes
    assert result.predictions == {examples[0].id: "entailment", examples[1].id: "nope"}
    assert task.to_dict() == task.spec.to_dict() and task.has_own_dataset
    assert task.results_fields({"score": 1.0})["scores"] == {"score": 1.0}
    assert task.dev_scores({"score": 1.0, "accuracy": 2.0}) == {"score": 1.0, "accuracy": 2.0}


def test_text_task_requests_fill_the_template(tmp_path: Path) -> None:
    task = TextTask(load_task("rte"))
    (example,) = task.request_examples({"premise": "A cat sat.", "hypothesis": "A cat exists."})
    assert example.inputs == "hypothesis: A cat exists. premise: A cat sat."
    with pytest.raises(BadRecord):
        task.request_examples({"premise": "only one field"})
    rows = tmp_path / "rte.jsonl"
    rows.write_text(json.dumps({"premise": "p", "hypothesis": "h", "label": 1, "idx": 3}) + "\n")
    stats: Counter[str] = Counter()
    (loaded,) = task.load(rows, stats=stats)
    assert task.format_row(loaded) == {
        "id": "3",
        "inputs": "hypothesis: h premise: p",
        "targets": "not_entailment",
    }


def test_resolve_task_picks_the_named_task_else_the_saved_one_else_squad() -> None:
    assert resolve_task(_flags(), punctuation="paper") == SquadTask(punctuation="paper")
    rte = resolve_task(_flags(task="rte"))
    assert isinstance(rte, TextTask) and rte.name == "rte" and rte.classes == ("entailment", "not_entailment")
    saved = rte.to_dict()
    assert resolve_task(_flags(), saved) == rte
    assert task_from_saved(saved, where="prompt p") == rte
    assert task_from_saved(None, punctuation="current") == SquadTask(punctuation="current")
    with pytest.raises(ConfigError, match="prompt p"):
        task_from_saved({"input_template": "{x}", "metric": "no-such-metric"}, where="prompt p")


def test_eval_result_reports_a_copy_in_order() -> None:
    result = EvalResult({"accuracy": 50.0, "invalid_predictions": 1.0}, "accuracy", {"a": "x"})
    scores = result.scores()
    scores["accuracy"] = 0.0
    assert result.score == 50.0 and result.f1 is None and result.exact_match is None


def test_the_best_step_keeps_every_score_selection_first(tmp_path: Path) -> None:
    state = rundir.TrainerState(step=9)
    state.record_best(9, {"exact_match": 70.0, "f1": 80.0, "t5_exact_match": 71.0, "t5_f1": 81.0}, "f1")
    assert list(state.best_scores) == ["f1", "exact_match", "t5_exact_match", "t5_f1"]
    assert state.best_score == 80.0 and (state.best_f1, state.best_em) == (80.0, 70.0)
    assert (state.best_t5_em, state.best_t5_f1) == (71.0, 81.0)
    state.record_best(10, {"score": 60.0, "accuracy": 55.0}, "score")
    assert state.best_score == 60.0 and state.best_f1 == -1.0 and state.best_t5_f1 is None
    # A checkpoint from before every task's scores were kept: its QA scores become best_scores.
    (tmp_path / rundir.TRAINER_STATE).write_text(
        json.dumps({"step": 5, "best_step": 4, "best_f1": 40.0, "best_em": 30.0})
    )
    old = rundir.read_trainer_state(tmp_path)
    assert old.best_scores == {"f1": 40.0, "exact_match": 30.0} and old.best_score == 40.0
