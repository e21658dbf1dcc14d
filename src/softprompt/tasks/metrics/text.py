"""The metrics of tasks beyond SQuAD, as T5's SuperGLUE tasks compute them; every score in percent.

Each function reproduces the metric T5 registers for the task (google-research/text-to-text-transfer-
transformer, ``t5/data/glue_utils.py`` SUPERGLUE_METRICS, ``t5/evaluation/metrics.py``,
``t5/data/postprocessors.py``). An answer that is none of the label strings is wrong, never a class, as
T5's ``string_label_to_class_id`` maps it to -1; how many there were is reported as
``invalid_predictions``, a count stored as a float so that every score is one ``dict[str, float]``.

Answers are compared as they are, never stripped: T5 compares the decoded string as it is, so an answer
decoded from a trailing bare "▁" (``"True "``) is no class. Only WSC's rule strips (T5's
``wsc_simple`` does), and ReCoRD's SQuAD normalisation ignores whitespace.

:func:`score_texts` returns the scores to report, and its FIRST key is the one that picks the best
checkpoint. The rule: the first key is SuperGLUE's score of the task. Where SuperGLUE scores a task by
two metrics it takes their unweighted mean, so ``macro_f1`` (CB: macro-F1 and accuracy), ``multirc``
(F1a and exact match) and ``record`` (F1 and exact match) lead with ``"score"``, that mean, followed by
the two metrics; every other metric leads with its one metric. SQuAD is scored by softprompt.tasks.metrics.squad.

:data:`SCORERS` holds one scoring function per metric; :func:`score_texts` checks what every metric
needs (a known metric, as many answers as examples, at least one) and calls the metric's scorer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from softprompt.config.choices import TaskMetric
from softprompt.tasks.metrics.squad import exact_match_score, f1_score, metric_max_over_ground_truths
from softprompt.tasks.text.spec import TextExample

__all__ = [
    "MULTIRC_CLASSES",
    "SCORERS",
    "TextScorer",
    "accuracy",
    "invalid_predictions",
    "macro_f1",
    "multirc_scores",
    "record_scores",
    "score_texts",
    "wsc_predicts_referent",
]

MULTIRC_CLASSES = ("False", "True")
"""T5's ``postprocessors.multirc`` label_classes: index 1, "True", is the positive class of F1a."""

# T5's postprocessors.wsc_simple: words ignored when comparing an answer with the referent.
_DETERMINERS = frozenset(
    {"a", "an", "few", "her", "his", "each", "every", "many", "much", "my", "our", "some", "that", "the"}
    | {"their", "these", "this", "those", "which", "whose", "your"}
)


def _check_lengths(what: str, *columns: Sequence[object]) -> None:
    if len({len(c) for c in columns}) != 1:
        raise ValueError(f"{what} needs equally many of each input, got lengths {[len(c) for c in columns]}.")
    if len(columns[0]) == 0:
        raise ValueError(f"{what} has no examples to score.")


def accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """The share of predictions equal to their label, in percent (T5's ``metrics.accuracy``).

    Args:
        predictions: Generated answers, compared as they are (``"True "`` is not ``"True"``).
        labels: The gold label strings, compared as given.

    Returns:
        The accuracy in [0, 100].
    """
    _check_lengths("accuracy", predictions, labels)
    return 100.0 * sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def invalid_predictions(predictions: Sequence[str], classes: Sequence[str]) -> int:
    """How many predictions, compared as they are, are none of the class strings (T5's -1 class id)."""
    valid = set(classes)
    return sum(p not in valid for p in predictions)


def macro_f1(predictions: Sequence[str], labels: Sequence[str], classes: Sequence[str]) -> float:
    """The unweighted mean over classes of each class's F1, in percent (T5's ``mean_multiclass_f1``).

    T5 calls ``sklearn.metrics.fbeta_score(beta=1, labels=range(num_classes), average="macro")`` on class
    ids, an answer that is no class being id -1: it adds a false negative to its gold class and a false
    positive to none. Per class F1 = 2tp / (2tp + fp + fn), which equals 2PR / (P + R) whenever tp > 0. A
    class with tp = 0 scores 0, also when it has neither gold nor predicted examples (0 / 0): T5 passes no
    ``zero_division``, and sklearn's default ``"warn"`` sets undefined precision, recall and F to 0 and
    still averages that class in.

    Args:
        predictions: Generated answers, compared as they are.
        labels: The gold label strings, each one of ``classes``.
        classes: The label strings, each class once.

    Returns:
        The macro-F1 in [0, 100].

    Raises:
        ValueError: On unequal lengths, no examples, no classes, or a gold label outside ``classes``.
    """
    _check_lengths("macro_f1", predictions, labels)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"macro_f1 needs the class label strings, each once; got {list(classes)}.")
    _check_labels(labels, classes)
    f1s = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return 100.0 * sum(f1s) / len(f1s)


def _check_labels(labels: Sequence[str], classes: Sequence[str]) -> None:
    unknown = sorted({y for y in labels} - set(classes))
    if unknown:
        raise ValueError(
            f"gold labels {unknown} are not among the classes {list(classes)}; fix the task's labels."
        )


def multirc_scores(
    predictions: Sequence[str], labels: Sequence[str], groups: Sequence[str]
) -> dict[str, float]:
    """MultiRC's F1 over all answer options and exact match per question, in percent.

    F1a is T5's ``multirc_f1_over_all_answers`` -> ``f1_score_with_invalid``: binary F1 with "True" the
    positive class over every answer option, where an answer that is neither "True" nor "False" is set to
    the opposite of its gold label (a false negative on a True option, a false positive on a False one);
    no positive at all scores 0 (sklearn's default). Exact match is ``mean_group_metric(all_match)``: a
    question group scores 1 when every one of its options is answered with its label (an invalid answer
    matches nothing), and the mean is over groups, not options.

    Args:
        predictions: Generated answers, compared as they are (T5's ``postprocessors.multirc``).
        labels: Each option's gold label, "True" or "False".
        groups: Each option's question, unique across the data set.

    Returns:
        ``{"f1a": ..., "exact_match": ...}``.

    Raises:
        ValueError: On unequal lengths, no examples, or a label other than "True"/"False".
    """
    _check_lengths("multirc_scores", predictions, labels, groups)
    _check_labels(labels, MULTIRC_CLASSES)
    answers = list(predictions)
    # f1_score_with_invalid: an invalid answer becomes the opposite of its label before binary F1.
    positive = [
        a == "True" if a in MULTIRC_CLASSES else y != "True" for a, y in zip(answers, labels, strict=True)
    ]
    tp = sum(p and y == "True" for p, y in zip(positive, labels, strict=True))
    fp = sum(p and y != "True" for p, y in zip(positive, labels, strict=True))
    fn = sum(not p and y == "True" for p, y in zip(positive, labels, strict=True))
    all_right: dict[str, bool] = {}
    for a, y, g in zip(answers, labels, groups, strict=True):
        all_right[g] = all_right.get(g, True) and a == y
    return {
        "f1a": 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        "exact_match": 100.0 * sum(all_right.values()) / len(all_right),
    }


def record_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """ReCoRD's exact match and F1: each the best over the query's gold entities, SQuAD-normalised.

    T5 scores ReCoRD with its ``squad`` metric (``qa_utils.normalize_squad``, then max over the golds),
    the official SQuAD v1.1 normalisation that softprompt.tasks.metrics.squad implements and this reuses.

    Args:
        predictions: One generated answer per query.
        golds: Each query's gold entities.

    Returns:
        ``{"exact_match": ..., "f1": ...}``.

    Raises:
        ValueError: On unequal lengths, no examples, or a query without gold entities (T5's max over an
            empty list fails the same way; only ReCoRD's unlabelled test split has such queries).
    """
    _check_lengths("record_scores", predictions, golds)
    for i, g in enumerate(golds):
        if not g:
            raise ValueError(f"ReCoRD query {i} has no gold entities; score only a split with answers.")
    em = sum(
        metric_max_over_ground_truths(exact_match_score, p, g)
        for p, g in zip(predictions, golds, strict=True)
    )
    f1 = sum(metric_max_over_ground_truths(f1_score, p, g) for p, g in zip(predictions, golds, strict=True))
    return {"exact_match": 100.0 * em / len(golds), "f1": 100.0 * f1 / len(golds)}


def _wsc_clean(s: str) -> str:
    # Split on single spaces, as T5 does (not on any whitespace).
    return " ".join(w for w in s.strip().lower().split(" ") if w not in _DETERMINERS)


def wsc_predicts_referent(prediction: str, referent: str) -> bool:
    """Whether an answer names the candidate referent, exactly as T5's ``postprocessors.wsc_simple``.

    Both are lower-cased and stripped of determiners. An apostrophe in one but not the other says no
    ("Bob" is not "Bob's hat"); otherwise either word set containing the other says yes ("fuzzy bunny"
    names "bunny"). An answer empty after cleaning returns False here; T5 (since commit 9bad27b,
    2022-03) maps it to -1 so it never matches a False label, and :func:`score_texts` counts it wrong.

    Args:
        prediction: The generated answer.
        referent: The candidate referent (the example's target).

    Returns:
        True when the answer names the referent.
    """
    answer, ref = _wsc_clean(prediction), _wsc_clean(referent)
    if not answer or ("'" in answer) != ("'" in ref):
        return False
    answer_words, ref_words = set(answer.split(" ")), set(ref.split(" "))
    return answer_words <= ref_words or ref_words <= answer_words


TextScorer = Callable[[Sequence[TextExample], Sequence[str], Sequence[str] | None], dict[str, float]]
"""A metric's scorer: ``(examples, predictions, classes) -> scores``, the selection score first.

:func:`score_texts` has checked that there are as many predictions as examples, and at least one.
"""


def _labels(examples: Sequence[TextExample]) -> list[str]:
    # An example's label where it has one, else its first target (a generation task scored by class).
    return [ex.targets[0] if ex.label is None else ex.label for ex in examples]


def _with_invalid(
    scores: dict[str, float], predictions: Sequence[str], classes: Sequence[str] | None
) -> dict[str, float]:
    # Where the task has class strings, how many answers are none of them closes the scores.
    if classes:
        scores["invalid_predictions"] = float(invalid_predictions(predictions, classes))
    return scores


def _needs_classes(metric: TaskMetric, classes: Sequence[str] | None) -> Sequence[str]:
    if not classes:
        raise ValueError(f"the {metric.value} metric needs the task's class label strings.")
    return classes


def _score_exact_match(
    examples: Sequence[TextExample], predictions: Sequence[str], classes: Sequence[str] | None
) -> dict[str, float]:
    """``exact_match``: {exact_match[, invalid_predictions]}, an answer equal to any target, both as they
    are (T5's ``sequence_accuracy`` compares ``p == t``)."""
    hits = sum(p in ex.targets for ex, p in zip(examples, predictions, strict=True))
    return _with_invalid({"exact_match": 100.0 * hits / len(examples)}, predictions, classes)


def _score_accuracy(
    examples: Sequence[TextExample], predictions: Sequence[str], classes: Sequence[str] | None
) -> dict[str, float]:
    """``accuracy``: {accuracy, invalid_predictions} against ``label``, else ``targets[0]``."""
    classes = _needs_classes(TaskMetric.ACCURACY, classes)
    labels = _labels(examples)
    _check_labels(labels, classes)
    return _with_invalid({"accuracy": accuracy(predictions, labels)}, predictions, classes)


def _score_macro_f1(
    examples: Sequence[TextExample], predictions: Sequence[str], classes: Sequence[str] | None
) -> dict[str, float]:
    """``macro_f1``: {score, macro_f1, accuracy, invalid_predictions}; score is the mean of the two."""
    classes = _needs_classes(TaskMetric.MACRO_F1, classes)
    labels = _labels(examples)
    f1, acc = macro_f1(predictions, labels, classes), accuracy(predictions, labels)
    return _with_invalid({"score": (f1 + acc) / 2, "macro_f1": f1, "accuracy": acc}, predictions, classes)


def _score_multirc(
    examples: Sequence[TextExample], predictions: Sequence[str], classes: Sequence[str] | None
) -> dict[str, float]:
    """``multirc``: {score, f1a, exact_match, invalid_predictions} over ``label`` and ``group``.

    An example without a group is its own question; the classes are always "False" and "True".
    """
    if classes is not None and set(classes) != set(MULTIRC_CLASSES):
        raise ValueError(f"MultiRC's classes are {list(MULTIRC_CLASSES)}, not {list(classes)}.")
    groups = [ex.id if ex.group is None else ex.group for ex in examples]
    m = multirc_scores(predictions, _labels(examples), groups)
    return _with_invalid({"score": (m["f1a"] + m["exact_match"]) / 2, **m}, predictions, MULTIRC_CLASSES)


def _score_record(
    examples: Sequence[TextExample], predictions: Sequence[str], classes: Sequence[str] | None
) -> dict[str, float]:
    """``record``: {score, f1, exact_match[, invalid_predictions]} over all ``targets``.

    Each ``group`` counts once (T5's ``deduplicate_metric``: the first example of a query stands for it).
    """
    kept: dict[object, tuple[str, Sequence[str]]] = {}  # the first example of a query stands for it
    for i, (ex, p) in enumerate(zip(examples, predictions, strict=True)):
        kept.setdefault(i if ex.group is None else ex.group, (p, ex.targets))
    r = record_scores([p for p, _ in kept.values()], [golds for _, golds in kept.values()])
    scores = {"score": (r["f1"] + r["exact_match"]) / 2, "f1": r["f1"], "exact_match": r["exact_match"]}
    return _with_invalid(scores, predictions, classes)


def _score_wsc(
    examples: Sequence[TextExample], predictions: Sequence[str], classes: Sequence[str] | None
) -> dict[str, float]:
    """``wsc``: {accuracy, invalid_predictions}, over labels "False" and "True".

    An answer is right when :func:`wsc_predicts_referent` against ``targets[0]`` equals
    ``label == "True"`` and the answer is not empty.
    """
    labels = _labels(examples)
    _check_labels(labels, ("False", "True"))
    right = sum(
        bool(_wsc_clean(p)) and wsc_predicts_referent(p, ex.targets[0]) == (y == "True")
        for ex, p, y in zip(examples, predictions, labels, strict=True)
    )
    # A WSC answer is a referent, not one of the class strings "False"/"True": the only answer that
    # cannot name a referent is an empty one, which T5's rule scores wrong (commit 9bad27b). So
    # invalid_predictions counts empty answers, whatever classes are given.
    return {
        "accuracy": 100.0 * right / len(examples),
        "invalid_predictions": float(sum(not _wsc_clean(p) for p in predictions)),
    }


SCORERS: dict[TaskMetric, TextScorer] = {
    TaskMetric.EXACT_MATCH: _score_exact_match,
    TaskMetric.ACCURACY: _score_accuracy,
    TaskMetric.MACRO_F1: _score_macro_f1,
    TaskMetric.MULTIRC: _score_multirc,
    TaskMetric.RECORD: _score_record,
    TaskMetric.WSC: _score_wsc,
}
"""The scorer of each text metric. A new metric: its member in softprompt.config.choices.TaskMetric, one
scorer function here, and its entry in this dict. ``squad`` has none: softprompt.tasks.metrics.squad
scores QA."""


def score_texts(
    metric: TaskMetric | str,
    examples: Sequence[TextExample],
    predictions: Sequence[str],
    classes: Sequence[str] | None = None,
) -> dict[str, float]:
    """The scores to report for a task's answers; the first key picks the best checkpoint.

    - ``exact_match``: {exact_match}, an answer equal to any target (both as they are, unstripped).
    - ``accuracy``: {accuracy, invalid_predictions} against ``label``, else ``targets[0]``.
    - ``macro_f1``: {score, macro_f1, accuracy, invalid_predictions}.
    - ``multirc``: {score, f1a, exact_match, invalid_predictions} over ``label`` and ``group`` (an
      example without a group is its own question).
    - ``record``: {score, f1, exact_match} over all ``targets``, each ``group`` counted once (T5's
      ``deduplicate_metric``: the first example of a query stands for it).
    - ``wsc``: {accuracy, invalid_predictions}; right when :func:`wsc_predicts_referent` against
      ``targets[0]`` equals ``label == "True"`` and the answer is not empty. Its answers are referents,
      not class strings, so ``invalid_predictions`` counts the empty answers only.

    ``score`` is the mean of the two metrics after it. ``invalid_predictions`` (a count) is added
    wherever ``classes`` are given, always for multirc, whose classes are "False" and "True", and always
    for wsc (empty answers).

    Args:
        metric: The task's metric; not ``squad`` (softprompt.tasks.metrics.squad scores QA).
        examples: The scored examples.
        predictions: One generated answer per example, in order.
        classes: The label strings of a classification task; required for accuracy and macro_f1.

    Returns:
        The scores in percent, in the order above.

    Raises:
        ValueError: On an unknown or squad metric, unequal lengths, no examples, missing classes, or
            labels the metric cannot use.
    """
    try:
        metric = TaskMetric(metric)
    except ValueError:
        raise ValueError(
            f"unknown metric {metric!r}; choose one of {[m.value for m in TaskMetric]}."
        ) from None
    if metric is TaskMetric.SQUAD:
        raise ValueError(
            "the squad metric is scored by softprompt.tasks.metrics.squad.squad_scores, not score_texts."
        )
    scorer = SCORERS.get(metric)
    if scorer is None:
        raise ValueError(f"the {metric.value} metric has no scorer in softprompt.tasks.metrics.text.SCORERS.")
    _check_lengths(f"the {metric.value} metric", examples, predictions)
    return scorer(examples, predictions, classes)
