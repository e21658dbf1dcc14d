"""The official SQuAD v1.1 metric (exact match and token F1), re-implemented to match evaluate-v1.1.py.

Every function here reproduces the official script's numbers exactly, including its quirks: only ASCII
punctuation is stripped, articles are removed after punctuation, a pair of empty answers scores F1 = 0, and
unanswered questions count as 0 in the mean rather than being dropped.
"""

from __future__ import annotations

import json
import re
import string
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from softprompt.data.records import gunzip_bytes
from softprompt.errors import DataError

__all__ = [
    "EXPECTED_VERSION",
    "ExampleScore",
    "evaluate_squad_file",
    "exact_match_score",
    "f1_score",
    "load_squad_references",
    "metric_max_over_ground_truths",
    "normalize_answer",
    "per_example_scores",
    "squad_scores",
    "squad_scores_padded",
]

EXPECTED_VERSION = "1.1"

# A frozenset of the ASCII punctuation only: the official script uses string.punctuation, so curly quotes,
# dashes and other non-ASCII punctuation survive normalisation and must keep doing so here.
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class ExampleScore(NamedTuple):
    """Scores of one question: each is the best over its gold answers, in [0, 1]."""

    exact_match: float
    f1: float


def normalize_answer(s: str) -> str:
    """Normalise an answer exactly as the official SQuAD v1.1 evaluator does.

    The steps run in the official order: lower-case, drop ASCII punctuation, replace the articles
    "a", "an" and "the" by a space, then collapse runs of whitespace.

    Args:
        s: A predicted or gold answer.

    Returns:
        The normalised answer.
    """
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """Return 1.0 when the two answers are equal after normalisation, else 0.0.

    Args:
        prediction: The predicted answer.
        ground_truth: One gold answer.

    Returns:
        1.0 or 0.0.
    """
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Return the bag-of-tokens F1 between two normalised answers.

    As in the official script, the score is 0 whenever no token is shared, which includes the case
    where both answers normalise to the empty string.

    Args:
        prediction: The predicted answer.
        ground_truth: One gold answer.

    Returns:
        The F1 score in [0, 1].
    """
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    # Same operation order as the official script so that the floats agree to the last bit.
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def metric_max_over_ground_truths(
    metric_fn: Callable[[str, str], float], prediction: str, ground_truths: Sequence[str]
) -> float:
    """Score a prediction against each gold answer and keep the best.

    Args:
        metric_fn: ``exact_match_score``, ``f1_score`` or any function of (prediction, gold).
        prediction: The predicted answer.
        ground_truths: The gold answers; must not be empty.

    Returns:
        The highest score.

    Raises:
        ValueError: If ``ground_truths`` is empty (the official script fails there too).
    """
    if len(ground_truths) == 0:
        raise ValueError("metric_max_over_ground_truths needs at least one ground truth")
    return float(max(metric_fn(prediction, gt) for gt in ground_truths))


def _score_one(prediction: str, ground_truths: Sequence[str]) -> ExampleScore:
    return ExampleScore(
        exact_match=metric_max_over_ground_truths(exact_match_score, prediction, ground_truths),
        f1=metric_max_over_ground_truths(f1_score, prediction, ground_truths),
    )


def per_example_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, ExampleScore]:
    """Score every referenced question; questions without a prediction score 0.

    Args:
        predictions: Question id to predicted answer. Ids absent from ``references`` are ignored.
        references: Question id to its gold answers (at least one each).

    Returns:
        Question id to its scores, in the order of ``references``.

    Raises:
        ValueError: If a reference has no gold answers.
    """
    scores: dict[str, ExampleScore] = {}
    for qid, golds in references.items():
        if len(golds) == 0:
            raise ValueError(f"question {qid!r} has no gold answers to score against")
        scores[qid] = _score_one(predictions[qid], golds) if qid in predictions else ExampleScore(0.0, 0.0)
    return scores


def _mean_scores(
    items: Iterable[tuple[str, Sequence[str]]], predictions: Mapping[str, str], missing: list[str] | None
) -> dict[str, float]:
    # Sum in dataset order and divide once, like the official script, so the means agree bit for bit.
    exact_match = f1 = 0.0
    total = 0
    for qid, golds in items:
        total += 1
        if qid not in predictions:
            if missing is not None:
                missing.append(qid)
            continue
        score = _score_one(predictions[qid], golds)
        exact_match += score.exact_match
        f1 += score.f1
    if total == 0:
        raise ValueError("there are no questions to score")
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def squad_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    missing: list[str] | None = None,
) -> dict[str, float]:
    """Compute the SQuAD v1.1 exact match and F1, as percentages, over all references.

    Args:
        predictions: Question id to predicted answer. Ids absent from ``references`` are ignored.
        references: Question id to its gold answers (at least one each).
        missing: If given, the ids of references without a prediction are appended to it, in order;
            those questions score 0 and still count in the mean.

    Returns:
        ``{"exact_match": ..., "f1": ...}``, each in [0, 100].

    Raises:
        ValueError: If ``references`` is empty or a reference has no gold answers.
    """
    for qid, golds in references.items():
        if len(golds) == 0:
            raise ValueError(f"question {qid!r} has no gold answers to score against")
    return _mean_scores(references.items(), predictions, missing)


def squad_scores_padded(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    contexts: Mapping[str, str],
    punctuation: str,
) -> tuple[dict[str, float], dict[str, str]]:
    """Score answers generated in T5's padded text both ways: official on raw spans, and T5's own way.

    A model trained on padded text answers in padded form (``"U . S ."``), which the official evaluator
    would compare with the raw gold answer (``"U.S."``) and count wrong. So each answer is mapped back to
    the raw context span it was read from (:func:`softprompt.tasks.squad.text.raw_answer`); an answer found
    nowhere in its context is scored as generated. Those raw answers get the official metric:
    ``exact_match``/``f1``, comparable with raw-text runs and other papers. T5's ``squad`` task instead
    scores the generated text against the padded gold answers with the same normalisation
    (``t5.evaluation.metrics.squad``): ``t5_exact_match``/``t5_f1``. With ``none`` nothing is padded,
    and both pairs are the official scores of the answers as generated.

    Args:
        predictions: Question id to the generated answer.
        references: Question id to its raw gold answers.
        contexts: Question id to its raw context.
        punctuation: The text format the model saw: ``paper``, ``current`` or ``none``.

    Returns:
        ``{"exact_match", "f1", "t5_exact_match", "t5_f1"}`` in percent, and the raw answers (question id
        to the string the official scores were computed on), in the order of ``predictions``.
    """
    from softprompt.tasks.squad.text import padded_gold_answers, raw_answer

    raw: dict[str, str] = {}
    for qid, answer in predictions.items():
        span = raw_answer(answer, contexts[qid], punctuation) if qid in contexts else None
        raw[qid] = answer if span is None else span
    official = squad_scores(raw, references)
    t5 = squad_scores(
        predictions, {qid: padded_gold_answers(golds, punctuation) for qid, golds in references.items()}
    )
    scores = {**official, "t5_exact_match": t5["exact_match"], "t5_f1": t5["f1"]}
    return scores, raw


def _read_json(path: Path, what: str) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: the {what} file does not exist; check the path.") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a {what} file; pass the JSON file inside it.") from None
    except OSError as e:
        raise DataError(
            f"{path}: cannot read the {what} file ({e.strerror}); check its permissions."
        ) from None
    if raw[:2] == b"\x1f\x8b":  # gzip's magic number: read a compressed file rather than call it non-UTF-8
        try:
            raw = gunzip_bytes(path, raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(
                f"{path}: is a damaged or truncated gzip file ({type(e).__name__}); "
                f"compress the {what} file again."
            ) from None
    if not raw.strip():
        raise DataError(f"{path}: the {what} file is empty; give a JSON file.")
    try:
        # utf-8-sig so that a file saved with a byte-order mark is still accepted.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: byte {e.start} is not valid UTF-8; re-save the {what} file as UTF-8 JSON."
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: line {e.lineno}, column {e.colno} is not valid JSON ({e.msg}); fix the {what} file."
        ) from None


def _schema_error(path: Path, where: str, problem: str) -> DataError:
    return DataError(
        f"{path}: {where} {problem}; a SQuAD v1.1 dataset is "
        '{"version": "1.1", "data": [{"paragraphs": [{"qas": [{"id": str, "answers": [{"text": str}]}]}]}]}.'
    )


def _describe(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _expect(path: Path, where: str, value: Any, kind: type, name: str) -> Any:
    if not isinstance(value, kind):
        raise _schema_error(path, where, f"must be {name} but is {_describe(value)}")
    return value


def _load_dataset_items(path: Path, data: Any) -> tuple[Any, list[tuple[str, list[str]]]]:
    """Validate a SQuAD v1.1 dataset and flatten it to (id, gold answers) pairs in file order."""
    top = _expect(path, "the top level", data, dict, "an object")
    if "data" not in top:
        raise _schema_error(path, "the top level", 'has no "data" key')
    articles = _expect(path, '"data"', top["data"], list, "a list")
    items: list[tuple[str, list[str]]] = []
    for i, article in enumerate(articles):
        where = f"data[{i}]"
        _expect(path, where, article, dict, "an object")
        if "paragraphs" not in article:
            raise _schema_error(path, where, 'has no "paragraphs" key')
        paragraphs = _expect(path, f"{where}.paragraphs", article["paragraphs"], list, "a list")
        for j, paragraph in enumerate(paragraphs):
            pwhere = f"{where}.paragraphs[{j}]"
            _expect(path, pwhere, paragraph, dict, "an object")
            if "qas" not in paragraph:
                raise _schema_error(path, pwhere, 'has no "qas" key')
            qas = _expect(path, f"{pwhere}.qas", paragraph["qas"], list, "a list")
            for k, qa in enumerate(qas):
                qwhere = f"{pwhere}.qas[{k}]"
                _expect(path, qwhere, qa, dict, "an object")
                if "id" not in qa:
                    raise _schema_error(path, qwhere, 'has no "id" key')
                qid = _expect(path, f"{qwhere}.id", qa["id"], str, "a string")
                if "answers" not in qa:
                    raise _schema_error(path, qwhere, 'has no "answers" key')
                answers = _expect(path, f"{qwhere}.answers", qa["answers"], list, "a list")
                if not answers:
                    raise _schema_error(
                        path, f"{qwhere}.answers", "is empty, so the question cannot be scored"
                    )
                golds: list[str] = []
                for m, answer in enumerate(answers):
                    awhere = f"{qwhere}.answers[{m}]"
                    _expect(path, awhere, answer, dict, "an object")
                    if "text" not in answer:
                        raise _schema_error(path, awhere, 'has no "text" key')
                    golds.append(_expect(path, f"{awhere}.text", answer["text"], str, "a string"))
                items.append((qid, golds))
    if not items:
        raise _schema_error(path, '"data"', "holds no questions")
    return top.get("version"), items


def load_squad_references(dataset_path: str | Path) -> dict[str, list[str]]:
    """Read a SQuAD v1.1 dataset file into question id -> gold answer texts.

    Args:
        dataset_path: Path to e.g. ``dev-v1.1.json``.

    Returns:
        The references, in file order. A repeated id keeps its last occurrence.

    Raises:
        DataError: If the file is missing, not UTF-8 JSON, or not shaped like a SQuAD dataset.
    """
    path = Path(dataset_path)
    _, items = _load_dataset_items(path, _read_json(path, "dataset"))
    return dict(items)


def _load_predictions(path: Path) -> dict[str, str]:
    predictions = _read_json(path, "predictions")
    if not isinstance(predictions, dict):
        raise DataError(
            f"{path}: the top level is {_describe(predictions)}, but predictions must be one JSON object "
            'mapping question id to answer string, e.g. {"56be4db0acb8001400a502ec": "Denver Broncos"}.'
        )
    for qid, answer in predictions.items():
        if not isinstance(answer, str):
            raise DataError(
                f"{path}: the prediction for {qid!r} is {_describe(answer)}, but every prediction must be "
                "an answer string; write an empty string for a question with no answer."
            )
    return predictions


def _score_and_warn(
    items: Sequence[tuple[str, Sequence[str]]],
    predictions: Mapping[str, str],
    err: TextIO,
    *,
    only_predicted: bool,
    max_listed: int | None,
    where: Path,
) -> dict[str, float]:
    """The mean scores, with the official warning per unanswered question (at most `max_listed` of them,
    then a count), or over the predicted questions only."""
    if only_predicted:
        items = [(qid, golds) for qid, golds in items if qid in predictions]
        if not items:
            raise DataError(
                f"{where}: none of its questions has a prediction; check that the files belong together"
            )
    missing: list[str] = []
    result = _mean_scores(items, predictions, missing)
    for qid in missing if max_listed is None else missing[:max_listed]:
        print(f"Unanswered question {qid} will receive score 0.", file=err)
    if max_listed is not None and missing:
        print(
            f"{len(missing):,} of {len(items):,} questions have no prediction and score 0"
            + (f" ({len(missing) - max_listed:,} not listed)" if len(missing) > max_listed else "")
            + "; --only_predicted scores the predicted questions only",
            file=err,
        )
    return result


def evaluate_squad_file(
    dataset_path: str | Path,
    predictions_path: str | Path,
    *,
    stderr: TextIO | None = None,
    only_predicted: bool = False,
    max_listed: int | None = None,
) -> dict[str, float]:
    """Score a predictions file against a SQuAD v1.1 dataset file, like the official evaluate-v1.1.py.

    Every question in the dataset counts. For each question without a prediction the official warning
    ``Unanswered question {id} will receive score 0.`` goes to stderr, as does
    ``Evaluation expects v-1.1, but got dataset with v-{version}`` for a dataset of another version.

    Args:
        dataset_path: The dataset JSON (``data[*].paragraphs[*].qas[*]`` with ``id`` and ``answers[*].text``).
        predictions_path: A JSON object mapping question id to predicted answer string.
        stderr: Where the warnings go; ``sys.stderr`` when None (looked up at call time so capture works).
        only_predicted: Score only the questions that have a prediction (a partial predictions file).
        max_listed: List at most this many unanswered questions, then how many there are (None: list
            every one, as the official script does).

    Returns:
        ``{"exact_match": ..., "f1": ...}``, each in [0, 100].

    Raises:
        DataError: If either file is missing, not UTF-8 JSON, or does not have the expected shape.
    """
    err = sys.stderr if stderr is None else stderr
    dpath, ppath = Path(dataset_path), Path(predictions_path)
    version, items = _load_dataset_items(dpath, _read_json(dpath, "dataset"))
    if version != EXPECTED_VERSION:
        print(f"Evaluation expects v-{EXPECTED_VERSION}, but got dataset with v-{version}", file=err)
    predictions = _load_predictions(ppath)
    return _score_and_warn(
        items, predictions, err, only_predicted=only_predicted, max_listed=max_listed, where=ppath
    )


def evaluate_file(
    dataset_path: str | Path,
    predictions_path: str | Path,
    *,
    stderr: TextIO | None = None,
    only_predicted: bool = False,
    max_listed: int | None = None,
) -> dict[str, float]:
    """`evaluate_squad_file`, or the same metric over an MRQA .jsonl(.gz) file's questions (the options
    as there).

    `softprompt eval` scores MRQA files and writes their predictions keyed by MRQA `qid`; this reads
    them back the same way, so `score` agrees with `eval` on every file `eval` accepts.
    """
    name = str(dataset_path).lower()
    if not name.endswith((".jsonl", ".jsonl.gz")):
        return evaluate_squad_file(
            dataset_path,
            predictions_path,
            stderr=stderr,
            only_predicted=only_predicted,
            max_listed=max_listed,
        )
    from softprompt.tasks.squad.reader import load_examples

    err = sys.stderr if stderr is None else stderr
    examples = load_examples(dataset_path)
    predictions = _load_predictions(Path(predictions_path))
    items = [(e.id, list(e.answers)) for e in examples]
    return _score_and_warn(
        items,
        predictions,
        err,
        only_predicted=only_predicted,
        max_listed=max_listed,
        where=Path(predictions_path),
    )
