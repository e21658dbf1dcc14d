"""Generated ids decode as T5 decodes them, and every SuperGLUE task scores them as T5 scores them.

T5 reads an answer as ``seqio.SentencePieceVocabulary.decode`` returns it: the ids up to the first EOS,
sentinels as ``<unk>``, through SentencePiece's ``DecodeIds``; `t5_text` does exactly that with the real
``sentencepiece`` package on the real T5 vocabulary. Its metrics then compare that string as it is
(``postprocessors.string_label_to_class_id``), so a trailing bare "▁" makes an answer no class, while a
leading one disappears in SentencePiece's decoding (but not in transformers').
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import sentencepiece
import torch

from conftest import TOKENIZER_DIR, need
from softprompt.inference.engine import decode_answers
from softprompt.tasks.squad.qa_task import SquadTask
from softprompt.tasks.squad.reader import QAExample
from softprompt.tasks.text.presets import load_task
from softprompt.tasks.text.spec import TextExample
from softprompt.tasks.text.text_task import TextTask

pytestmark = pytest.mark.shared

BARE, TRUE, PAD, EOS = 3, 10998, 0, 1  # "▁", "▁True", <pad>, </s> in T5's vocabulary


@pytest.fixture(scope="module")
def spm() -> sentencepiece.SentencePieceProcessor:
    """The real T5 SentencePiece model, as seqio loads it."""
    return sentencepiece.SentencePieceProcessor(model_file=str(need(TOKENIZER_DIR / "spiece.model")))


def t5_text(spm: sentencepiece.SentencePieceProcessor, ids: Sequence[int]) -> str:
    """seqio's ``SentencePieceVocabulary.decode``: up to the first EOS, sentinels as <unk>, ``DecodeIds``."""
    ids = list(ids)
    if EOS in ids:
        ids = ids[: ids.index(EOS)]
    return spm.decode_ids([spm.unk_id() if i >= spm.get_piece_size() else i for i in ids])


def generated(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Answers as `generate` returns them: the decoder start (pad), the answer, EOS, then padding."""
    width = max(len(r) for r in rows) + 2
    return torch.tensor([[PAD, *r, EOS] + [PAD] * (width - len(r) - 2) for r in rows])


def test_the_ids_are_the_bare_piece_and_true(tokenizer) -> None:
    assert tokenizer.convert_ids_to_tokens([BARE, TRUE]) == ["▁", "▁True"]


@pytest.mark.parametrize(
    ("answer", "text"),
    [
        ([BARE, TRUE], "True"),  # transformers alone: " True"
        ([TRUE, BARE], "True "),  # the old .strip(): "True"
        ([BARE, TRUE, BARE], "True "),
        ([BARE, BARE, TRUE], "True"),  # transformers alone: "  True"
        ([TRUE], "True"),
        ([BARE], ""),
        ([BARE, BARE], ""),  # transformers alone: " "
    ],
)
def test_bare_pieces_decode_to_sentencepieces_text(tokenizer, spm, answer: list[int], text: str) -> None:
    assert t5_text(spm, answer) == text  # what SentencePiece itself gives
    assert decode_answers(tokenizer, generated([answer])) == [text]


def test_random_answers_decode_to_sentencepieces_text(tokenizer, spm) -> None:
    # Every piece of the vocabulary but <unk> (id 2, dropped here, " ⁇ " in SentencePiece; see
    # decode_answers), with many bare "▁" at either end.
    rng = random.Random(25)
    rows = [
        [
            rng.choice((BARE, BARE, TRUE, rng.randrange(3, spm.get_piece_size())))
            for _ in range(rng.randint(0, 8))
        ]
        for _ in range(3000)
    ]
    texts = decode_answers(tokenizer, generated(rows))
    assert texts == [t5_text(spm, r) for r in rows]
    assert sum(t.endswith(" ") for t in texts) > 300  # the case the old .strip() lost is well covered
    assert sum(r[:1] == [BARE] for r in rows) > 300


def test_unk_is_the_one_id_decoded_unlike_sentencepiece(tokenizer, spm) -> None:
    assert t5_text(spm, [2, TRUE]) == " ⁇  True"
    assert decode_answers(tokenizer, generated([[2, TRUE]])) == ["True"]


# The four ways a gold answer comes out as ids, in the order the examples below take them.
SHAPES = {
    "none": lambda ids: ids,
    "leading": lambda ids: [BARE, *ids],
    "trailing": lambda ids: [*ids, BARE],
    "both": lambda ids: [BARE, *ids, BARE],
}


def _classified(name: str, labels: list[str]) -> list[TextExample]:
    return [TextExample(id=str(i), inputs="x", targets=(y,), label=y) for i, y in enumerate(labels)]


# Each task's examples, the gold answer of each, and T5's scores when example i's answer is generated in
# the i-th shape (none, leading, trailing, both): T5 reads "label", "label", "label ", "label ", so the
# first two are their class and the last two are no class (string_label_to_class_id: -1).
CASES = {
    # accuracy: 2 of 4 right, 2 invalid.
    **{
        name: (_classified(name, [a, b, a, b]), [a, b, a, b], {"accuracy": 50.0, "invalid_predictions": 2.0})
        for name, (a, b) in {
            "boolq": ("False", "True"),
            "copa": ("choice1", "choice2"),
            "rte": ("entailment", "not_entailment"),
            "wic": ("True", "False"),
        }.items()
    },
    # entailment: tp 1, fn 1 (invalid) -> 2/3; contradiction: tp 1 -> 1; neutral: tp 0 -> 0. Macro 5/9.
    "cb": (
        _classified("cb", ["entailment", "contradiction", "neutral", "entailment"]),
        ["entailment", "contradiction", "neutral", "entailment"],
        {"score": (500 / 9 + 50) / 2, "macro_f1": 500 / 9, "accuracy": 50.0, "invalid_predictions": 2.0},
    ),
    # Question a's options both right; question b's both invalid: on its True option a false negative,
    # on its False option a false positive (f1_score_with_invalid). F1a = 2/(2+1+1); EM 1 of 2 questions.
    "multirc": (
        [
            TextExample(id=str(i), inputs="x", targets=(y,), label=y, group=g)
            for i, (y, g) in enumerate([("True", "a"), ("False", "a"), ("True", "b"), ("False", "b")])
        ],
        ["True", "False", "True", "False"],
        {"score": 50.0, "f1a": 50.0, "exact_match": 50.0, "invalid_predictions": 2.0},
    ),
    # The SQuAD normalisation ignores surrounding whitespace: every shape is right.
    "record": (
        [
            TextExample(id=str(i), inputs="x", targets=golds, group=str(i))
            for i, golds in enumerate([("Barack Obama", "Obama"), ("Paris",), ("the U.N.",), ("Rome",)])
        ],
        ["Barack Obama", "Paris", "the U.N.", "Rome"],
        {"score": 100.0, "f1": 100.0, "exact_match": 100.0},
    ),
    # wsc_simple strips: every shape names the referent; the third label says it is not the referent.
    "wsc": (
        [
            TextExample(id=str(i), inputs="x", targets=(ref,), label=y)
            for i, (ref, y) in enumerate(
                [("the dog", "True"), ("Mary", "True"), ("his hat", "False"), ("Bob", "True")]
            )
        ],
        ["the dog", "Mary", "his hat", "Bob"],
        {"accuracy": 75.0, "invalid_predictions": 0.0},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_superglue_scores_answers_generated_as_ids_as_t5_does(tokenizer, spm, name: str) -> None:
    examples, golds, expected = CASES[name]
    rows = [
        shape(tokenizer(gold, add_special_tokens=False).input_ids)
        for gold, shape in zip(golds, SHAPES.values(), strict=True)
    ]
    answers = decode_answers(tokenizer, generated(rows))
    assert answers == [t5_text(spm, r) for r in rows]
    assert answers[2] == golds[2] + " " and answers[1] == golds[1]
    scores = TextTask(load_task(name)).score(examples, answers).scores()
    assert list(scores) == list(expected)
    assert scores == pytest.approx(expected)


def test_squad_answers_and_scores_ignore_a_trailing_bare_piece(tokenizer) -> None:
    # The official SQuAD normalisation ignores surrounding whitespace; the answers softprompt writes
    # stay the stripped ones, raw-text and padded (mapped back to "U.S. Army").
    question = QAExample(
        id="q1", question="Who?", context="The U.S. Army met in Paris.", answers=("U.S. Army",)
    )
    for style, gold, shown in (("none", "U.S. Army", "U.S. Army"), ("paper", "U . S . Army", "U.S. Army")):
        ids = [*tokenizer(gold, add_special_tokens=False).input_ids, BARE]
        (answer,) = decode_answers(tokenizer, generated([ids]))
        assert answer == gold + " "
        task = SquadTask(punctuation=style)
        result = task.score([question], [answer])
        assert result.predictions == {"q1": shown}
        assert result.metrics["exact_match"] == 100.0 and result.metrics["f1"] == 100.0
        assert task.answer_text(question, answer) == shown
        if style == "paper":
            assert result.generated == {"q1": gold} and result.metrics["t5_exact_match"] == 100.0
