"""The metrics of non-SQuAD tasks on hand-computed cases, and T5's own test cases where T5 has them.

T5's numbers come from google-research/text-to-text-transfer-transformer t5/evaluation/metrics_test.py and
t5/data/postprocessors_test.py, rewritten from class ids to label strings.
"""

from __future__ import annotations

import pytest

from softprompt.config.choices import TaskMetric
from softprompt.tasks.metrics.text import (
    SCORERS,
    accuracy,
    invalid_predictions,
    macro_f1,
    multirc_scores,
    record_scores,
    score_texts,
    wsc_predicts_referent,
)
from softprompt.tasks.text.spec import TextExample

CB = ("entailment", "contradiction", "neutral")


def examples(labels: list[str], groups: list[str] | None = None) -> list[TextExample]:
    return [
        TextExample(
            id=str(i), inputs=f"x{i}", targets=(y,), label=y, group=None if groups is None else groups[i]
        )
        for i, y in enumerate(labels)
    ]


# ------------------------------------------------------------------------------------ accuracy, invalid


def test_accuracy_compares_the_prediction_as_it_is_and_counts_invalid_answers_wrong() -> None:
    # right: "yes" and "no"; wrong: "yes " (T5's string_label_to_class_id does not strip), "No" (case
    # counts) and "maybe" (no label): 2/5.
    predictions = ["yes", "yes ", "no", "No", "maybe"]
    labels = ["yes", "yes", "no", "no", "yes"]
    assert accuracy(predictions, labels) == 40.0
    # "yes ", "No" and "maybe" are no class string.
    assert invalid_predictions(predictions, ["yes", "no"]) == 3
    assert accuracy(["a", "b", "c"], ["a", "b", "c"]) == 100.0


# ------------------------------------------------------------------------------------------- macro-F1


def test_macro_f1_on_a_three_class_cb_case_with_an_invalid_prediction() -> None:
    labels = ["entailment", "entailment", "entailment", "contradiction", "contradiction", "neutral"]
    predictions = ["entailment", "entailment", "contradiction", "contradiction", "maybe", "entailment"]
    # entailment:    tp 2 (ex 0, 1), fp 1 (ex 5), fn 1 (ex 2)  -> P 2/3, R 2/3, F1 2/3
    # contradiction: tp 1 (ex 3),    fp 1 (ex 2), fn 1 (ex 4: "maybe" is no class, never a positive)
    #                                                          -> P 1/2, R 1/2, F1 1/2
    # neutral:       tp 0,           fp 0,        fn 1 (ex 5)  -> F1 0
    # macro-F1 = (2/3 + 1/2 + 0) / 3 = 7/18 = 38.888...%; accuracy = 3/6 = 50%
    assert macro_f1(predictions, labels, CB) == pytest.approx(100 * 7 / 18)
    scores = score_texts(TaskMetric.MACRO_F1, examples(labels), predictions, CB)
    assert list(scores) == ["score", "macro_f1", "accuracy", "invalid_predictions"]
    assert scores["macro_f1"] == pytest.approx(100 * 7 / 18)
    assert scores["accuracy"] == 50.0
    assert scores["score"] == pytest.approx((100 * 7 / 18 + 50) / 2)  # = 400/9
    assert scores["invalid_predictions"] == 1.0


def test_macro_f1_matches_t5s_own_test_and_averages_in_an_absent_class() -> None:
    # T5 metrics_test: mean_multiclass_f1(num_classes=3)(targets [0, 1, 1, 2], predictions [0, 0, 2, 2]) = 44.44.
    # class 0: tp 1, fp 1, fn 0 -> 2/3; class 1: tp 0 -> 0; class 2: tp 1, fp 1, fn 0 -> 2/3; mean 4/9.
    labels = [CB[0], CB[1], CB[1], CB[2]]
    predictions = [CB[0], CB[0], CB[2], CB[2]]
    assert macro_f1(predictions, labels, CB) == pytest.approx(44.44444444444444)
    # neutral has neither gold nor predicted examples: F1 0/0 -> 0 (sklearn's zero_division="warn"), and it
    # still counts in the mean: (1 + 1 + 0) / 3.
    assert macro_f1(["entailment", "contradiction"], ["entailment", "contradiction"], CB) == pytest.approx(
        200 / 3
    )


def test_macro_f1_agrees_with_sklearn_when_installed() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    labels = [
        "entailment",
        "entailment",
        "entailment",
        "contradiction",
        "contradiction",
        "neutral",
        "neutral",
    ]
    predictions = ["entailment", "neutral", "contradiction", "contradiction", "maybe", "entailment", "x"]
    ids = {c: i for i, c in enumerate(CB)}
    expected = metrics.fbeta_score(
        [ids[y] for y in labels],
        [ids.get(p, -1) for p in predictions],
        beta=1,
        labels=range(3),
        average="macro",
    )
    assert macro_f1(predictions, labels, CB) == pytest.approx(100 * expected)
    # MultiRC's F1a as T5's f1_score_with_invalid computes it: invalid ids become 1 - target, then binary F1.
    labels = ["True", "False", "True", "False", "True", "False"]
    predictions = ["True", "True", "x", "y", "False", "False"]
    targets = [int(y == "True") for y in labels]
    fixed = [
        ("False", "True").index(p) if p in ("False", "True") else 1 - t
        for p, t in zip(predictions, targets, strict=True)
    ]
    expected_f1 = metrics.f1_score(targets, fixed)
    assert multirc_scores(predictions, labels, list("aabbcc"))["f1a"] == pytest.approx(100 * expected_f1)


# -------------------------------------------------------------------------------------------- MultiRC


def test_multirc_two_questions_of_three_options() -> None:
    groups = ["q1", "q1", "q1", "q2", "q2", "q2"]
    labels = ["True", "False", "True", "True", "False", "False"]
    predictions = ["True", "False", "True", "False", "maybe", "False"]
    # q1 is all right. q2: option 1 says False for a True (fn); option 2 is invalid on a False label, so
    # T5's f1_score_with_invalid sets it to the opposite of its label, True (fp).
    # tp 2 (q1 options 1, 3), fp 1, fn 1 -> F1a = 2*2 / (2*2 + 1 + 1) = 4/6 = 66.67%
    # exact match per question: q1 1, q2 0 -> 50%; score = (66.67 + 50) / 2 = 58.33%
    scores = multirc_scores(predictions, labels, groups)
    assert scores == pytest.approx({"f1a": 200 / 3, "exact_match": 50.0})
    full = score_texts("multirc", examples(labels, groups), predictions)
    assert list(full) == ["score", "f1a", "exact_match", "invalid_predictions"]
    assert full["score"] == pytest.approx((200 / 3 + 50) / 2)
    assert full["invalid_predictions"] == 1.0


def test_multirc_invalid_on_a_true_option_is_a_false_negative_and_groups_may_interleave() -> None:
    # T5 metrics_test f1_score_with_invalid([0, 1, 1, 0], [0, 1, 2, 2]) = 50: the invalid answer on a True
    # option is a false negative, on a False option a false positive: tp 1, fp 1, fn 1 -> 2/4.
    labels = ["False", "True", "True", "False"]
    predictions = ["False", "True", "2", "2"]
    groups = ["a", "b", "a", "b"]  # options of a question need not be adjacent
    # a: "False" right, "2" wrong -> 0; b: "True" right, "2" wrong -> 0
    assert multirc_scores(predictions, labels, groups) == {"f1a": 50.0, "exact_match": 0.0}
    # T5 metrics_test multirc_f1_over_all_answers: targets [1, 1, 0], predictions [1, 0, 1] -> 50.
    # tp 1, fp 1, fn 1; question a ("True", "True" vs "True", "False") wrong, b wrong.
    f = multirc_scores(["True", "False", "True"], ["True", "True", "False"], ["a", "a", "b"])
    assert f == {"f1a": 50.0, "exact_match": 0.0}
    # no positive anywhere: F1a 0 (sklearn's zero_division), but every question is right.
    assert multirc_scores(["False", "False"], ["False", "False"], ["a", "b"]) == {
        "f1a": 0.0,
        "exact_match": 100.0,
    }


# --------------------------------------------------------------------------------------------- ReCoRD


def test_record_takes_the_best_gold_after_squad_normalisation() -> None:
    predictions = ["the Eiffel Tower!", "Barack Obama", "London"]
    golds = [["Tower", "Eiffel Tower"], ["Obama", "President Obama"], ["Paris"]]
    # 1: article, punctuation and case go: "eiffel tower" == "eiffel tower"          -> EM 1, F1 1
    # 2: vs "obama": 1 common token, P 1/2, R 1 -> F1 2/3; vs "president obama": P 1/2, R 1/2 -> 1/2
    #                                                                                -> EM 0, F1 2/3
    # 3: nothing shared                                                              -> EM 0, F1 0
    # EM = 1/3, F1 = (1 + 2/3 + 0) / 3 = 5/9
    assert record_scores(predictions, golds) == pytest.approx({"exact_match": 100 / 3, "f1": 500 / 9})
    # The same queries where the first query appears twice (T5 repeats a query once per answer):
    # deduplicate_metric keeps its first copy, so the wrong second answer does not count.
    rows = [
        TextExample("0", "q", ("Tower", "Eiffel Tower"), group="p0-q0"),
        TextExample("1", "q", ("Eiffel Tower", "Tower"), group="p0-q0"),
        TextExample("2", "q", ("Obama", "President Obama"), group="p0-q1"),
        TextExample("3", "q", ("Paris",), group="p1-q0"),
    ]
    scores = score_texts(TaskMetric.RECORD, rows, ["the Eiffel Tower!", "Paris", "Barack Obama", "London"])
    assert list(scores) == ["score", "f1", "exact_match"]
    assert scores == pytest.approx({"score": (500 / 9 + 100 / 3) / 2, "f1": 500 / 9, "exact_match": 100 / 3})


def test_record_refuses_a_query_without_gold_entities() -> None:
    with pytest.raises(ValueError, match="query 1 has no gold entities"):
        record_scores(["a", "b"], [["a"], []])


# ------------------------------------------------------------------------------------------------ WSC


@pytest.mark.parametrize(
    ("prediction", "referent", "expected"),
    [
        # T5's postprocessors_test.test_wsc_simple, each case:
        ("potato", "turnip", False),
        ("turnip", "turnip", True),
        ("the cat", "cat", True),  # determiner dropped
        ("Bob's hat", "Bob", False),  # apostrophe in one only
        ("Bob's hat", "Bob's hat", True),
        ("potato", "Potato", True),  # case ignored
        ("a potato", "my potato", True),  # determiners on both sides
        ("fuzzy bunny", "fuzzy hungry bunny", True),  # prediction words within the referent's
        ("", "cat", False),  # T5: -1, never right
        ("a this", "cat", False),  # only determiners: T5 -1
        # the brief's cases and the other directions:
        ("fuzzy bunny", "bunny", True),  # referent words within the prediction's
        ("Bob", "Bob's hat", False),
        ("Their dog", "those dog", True),
        ("the dog", "cat dog", True),  # {dog} within {cat, dog}
        ("big dog", "cat dog", False),  # neither set contains the other
    ],
)
def test_wsc_referent_rule_is_t5s(prediction: str, referent: str, expected: bool) -> None:
    assert wsc_predicts_referent(prediction, referent) is expected


def test_wsc_accuracy_compares_the_referent_decision_with_the_label() -> None:
    rows = [
        TextExample("0", "x", ("the bunny",), label="True"),
        TextExample("1", "x", ("Bob",), label="False"),
        TextExample("2", "x", ("cat",), label="False"),
        TextExample("3", "x", ("cat",), label="True"),
    ]
    predictions = ["fuzzy bunny", "Bob's hat", "", "dog"]
    # 0: names the referent, label True -> right; 1: does not (apostrophe), label False -> right;
    # 2: empty answer -> wrong although "does not name it" would equal False (T5's -1);
    # 3: "dog" is not "cat", label True -> wrong. 2/4.
    assert score_texts(TaskMetric.WSC, rows, predictions) == {"accuracy": 50.0, "invalid_predictions": 1.0}


def test_wsc_invalid_count_is_the_empty_answers_not_the_non_class_strings() -> None:
    # Issue 25 item 2: perfect referent answers were all counted invalid against "False"/"True".
    rows = [TextExample(str(i), "x", ("the cat",), label="True") for i in range(12)]
    perfect = ["the cat"] * 12
    for classes in (None, ["False", "True"]):
        scores = score_texts(TaskMetric.WSC, rows, perfect, classes=classes)
        assert scores == {"accuracy": 100.0, "invalid_predictions": 0.0}
    scores = score_texts(TaskMetric.WSC, rows, ["the cat"] * 10 + ["", "  "], classes=["False", "True"])
    assert scores == pytest.approx({"accuracy": 1000 / 12, "invalid_predictions": 2.0})


# --------------------------------------------------------------------------------- score_texts in general


def test_exact_match_accepts_any_target_and_classes_add_the_invalid_count() -> None:
    rows = [
        TextExample("0", "x", ("Paris", "paris")),
        TextExample("1", "x", ("Rome",)),
        TextExample("2", "x", ("a",)),
        TextExample("3", "x", ("Paris",)),
    ]
    # "paris" equals the second target; "rome" is not "Rome"; "a" right; "Paris " is not "Paris" (compared
    # as it is, as T5's sequence_accuracy does): 2/4.
    predictions = ["paris", "rome", "a", "Paris "]
    assert score_texts("exact_match", rows, predictions) == pytest.approx({"exact_match": 50.0})
    with_classes = score_texts("exact_match", rows, predictions, classes=["paris", "Rome"])
    assert list(with_classes) == ["exact_match", "invalid_predictions"]
    assert with_classes["invalid_predictions"] == 3.0  # "rome", "a" and "Paris "


def test_accuracy_uses_the_label_else_the_first_target() -> None:
    rows = [TextExample("0", "x", ("yes",)), TextExample("1", "x", ("ignored",), label="no")]
    scores = score_texts("accuracy", rows, ["yes", "yes"], classes=["yes", "no"])
    assert scores == {"accuracy": 50.0, "invalid_predictions": 0.0}


FIRST_KEY = {
    TaskMetric.EXACT_MATCH: "exact_match",
    TaskMetric.ACCURACY: "accuracy",
    TaskMetric.MACRO_F1: "score",
    TaskMetric.MULTIRC: "score",
    TaskMetric.RECORD: "score",
    TaskMetric.WSC: "accuracy",
}


def test_the_first_key_is_the_documented_selection_metric_for_every_task_metric() -> None:
    assert set(FIRST_KEY) == set(TaskMetric) - {TaskMetric.SQUAD}
    for metric, key in FIRST_KEY.items():
        if metric is TaskMetric.WSC:
            rows, predictions, classes = [TextExample("0", "x", ("cat",), label="True")], ["the cat"], None
        elif metric is TaskMetric.MULTIRC:
            rows, predictions, classes = examples(["True", "False"], ["q", "q"]), ["True", "True"], None
        else:
            rows, predictions, classes = examples(["yes", "no"]), ["yes", "yes"], ["yes", "no"]
        scores = score_texts(metric.value, rows, predictions, classes)
        assert next(iter(scores)) == key, metric
        assert all(0.0 <= v <= 100.0 for v in scores.values()), scores
        if key == "score":  # the mean of the two metrics that follow it
            a, b = list(scores.values())[1:3]
            assert scores["score"] == pytest.approx((a + b) / 2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: score_texts("squad", examples(["a"]), ["a"]), "softprompt.tasks.metrics.squad.squad_scores"),
        (lambda: score_texts("bleu", examples(["a"]), ["a"]), "unknown metric 'bleu'"),
        (lambda: score_texts("accuracy", examples(["a"]), ["a", "b"], ["a"]), "equally many"),
        (lambda: score_texts("accuracy", [], [], ["a"]), "no examples"),
        (lambda: score_texts("accuracy", examples(["a"]), ["a"]), "needs the task's class label strings"),
        (lambda: score_texts("macro_f1", examples(["a"]), ["a"]), "needs the task's class label strings"),
        (lambda: score_texts("accuracy", examples(["c"]), ["a"], ["a", "b"]), "not among the classes"),
        (lambda: score_texts("multirc", examples(["yes"]), ["True"]), "not among the classes"),
        (lambda: score_texts("multirc", examples(["True"]), ["True"], ["no", "yes"]), "MultiRC's classes"),
        (lambda: macro_f1(["a"], ["a"], ["a", "a"]), "each once"),
    ],
)
def test_bad_input_is_one_clear_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------ the scorer registry


def test_every_text_metric_has_a_scorer_and_squad_is_scored_elsewhere() -> None:
    assert set(SCORERS) == set(TaskMetric) - {TaskMetric.SQUAD}
    assert all(callable(scorer) for scorer in SCORERS.values())
    with pytest.raises(ValueError) as err:
        score_texts(TaskMetric.SQUAD, examples(["a"]), ["a"])
    assert str(err.value) == (
        "the squad metric is scored by softprompt.tasks.metrics.squad.squad_scores, not score_texts."
    )


def test_an_unknown_metric_names_the_known_ones() -> None:
    with pytest.raises(ValueError) as err:
        score_texts("bleu", examples(["a"]), ["a"])
    assert str(err.value) == f"unknown metric 'bleu'; choose one of {[m.value for m in TaskMetric]}."


def test_a_metric_without_a_registered_scorer_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(SCORERS, TaskMetric.RECORD)
    with pytest.raises(ValueError, match=r"the record metric has no scorer in .*SCORERS"):
        score_texts("record", examples(["a"]), ["a"])
