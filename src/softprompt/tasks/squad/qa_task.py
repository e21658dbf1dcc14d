"""SQuAD-shaped extractive QA as a `Task`: SQuAD v1.1 / MRQA records, T5's `squad` text, official EM/F1."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.data.batching import Features
from softprompt.data.records import BadRecord
from softprompt.tasks.base import EvalResult, Task, TaskCard
from softprompt.tasks.metrics.squad import squad_scores, squad_scores_padded
from softprompt.tasks.squad.reader import QAExample, load_examples, tokenize_examples
from softprompt.tasks.squad.text import Punctuation, format_input, format_target, raw_answer

__all__ = ["SquadTask"]


@dataclass(frozen=True)
class SquadTask(Task):
    """Extractive QA on SQuAD-shaped records (`QAExample`), scored with the official SQuAD v1.1 EM/F1.

    Attributes:
        punctuation: The text format: ``none`` (raw text), or T5's padded ``paper``/``current`` text, whose
            answers are mapped back to the context's own spans before the official scores (T5's own
            scores of the padded text are reported beside them).
    """

    punctuation: str = Punctuation.NONE.value
    name: str = "squad"

    @property
    def metric(self) -> str:
        """F1 chooses the best checkpoint, as the paper's dev-set selection did."""
        return "f1"

    @property
    def file_kinds(self) -> str:
        """The QA files `load` reads."""
        return "SQuAD JSON or MRQA jsonl"

    @property
    def example_noun(self) -> str:
        """A QA example is a question."""
        return "questions"

    def text_format(self) -> dict[str, str]:
        """SQuAD's text format (its input template is the prompt config's default)."""
        return {"punctuation": self.punctuation}

    def eval_fields(self) -> dict[str, Any]:
        """The text format the questions were given in."""
        return {"punctuation": self.punctuation}

    def card(self, facts: Mapping[str, Any]) -> TaskCard:
        """Official EM/F1 (and T5's own scores where the run recorded them) and a question to answer."""
        t5 = (("t5_exact_match", "exact match, T5's scoring"), ("t5_f1", "F1, T5's scoring"))
        return TaskCard(
            tag="squad",
            subject="extractive question answering",
            title_on="SQuAD",
            scores=(
                ("exact match", facts.get("exact_match")),
                ("F1", facts.get("f1")),
                *((label, facts[key]) for key, label in t5 if facts.get(key) is not None),
            ),
            score_note=(
                "Scores are SQuAD v1.1 exact match and F1 (0–100) on the validation file, "
                "at the step with the best dev F1. With T5's padded input text (paper or current), answers "
                "are mapped back to the context span they came from before the official metric; T5's "
                "scoring compares the generated text with padded gold answers instead."
            ),
            predict_args=(
                "--question",
                "Who wrote Hamlet?",
                "--context",
                "Hamlet is a tragedy written by William Shakespeare.",
            ),
        )

    def dev_scores(self, best: Mapping[str, float]) -> dict[str, float]:
        """Dev F1 and EM (official), -1 before any evaluation."""
        return {"f1": best.get("f1", -1.0), "exact_match": best.get("exact_match", -1.0)}

    def load(
        self,
        source: str | Path | None,
        *,
        split: str = "train",
        config: str | None = None,
        for_training: bool = False,
        skip_bad: bool = False,
        stats: Counter[str] | None = None,
    ) -> list[QAExample]:
        """Questions from SQuAD v1.1 JSON, MRQA jsonl or ``hf:NAME`` (`load_examples`); none without a
        source (SQuAD names no data set of its own)."""
        if source is None:
            return []
        return load_examples(source, split=split, skip_bad=skip_bad, stats=stats)

    def tokenize(
        self,
        examples: Sequence[QAExample],
        tokenizer: Any,
        *,
        max_source_length: int,
        max_target_length: int,
        for_training: bool = False,
    ) -> list[Features]:
        """`tokenize_examples` in this task's text format: one feature per question, its first answer
        the target."""
        if not examples:
            return []
        return tokenize_examples(
            examples,
            tokenizer,
            max_source_length=max_source_length,
            max_target_length=max_target_length,
            punctuation=self.punctuation,
        )

    def format_row(self, example: QAExample) -> dict[str, str]:
        """T5's `squad` preprocessor's row: ``question: … context: …`` and the first answer."""
        style = Punctuation(self.punctuation)
        return {
            "id": example.id,
            "inputs": format_input(example.question, example.context, style),
            "targets": format_target(example.answers[0], style),
        }

    def score(self, examples: Sequence[QAExample], answers: Sequence[str]) -> EvalResult:
        """The official SQuAD v1.1 EM/F1 (max over gold answers); on padded text, of the answers mapped
        back to raw context spans, with T5's own scores of the padded text beside them
        (`squad_scores_padded`).

        Answers are stripped first: the decoded text keeps a space the model generated at its end, which
        neither the official normalisation nor T5's ``squad`` metric sees, so the scores are the same and
        the predictions (and an ensemble's vote over them) stay the answers softprompt always wrote."""
        predictions = {ex.id: a.strip() for ex, a in zip(examples, answers, strict=True)}
        references = _references(examples)
        if self.punctuation == Punctuation.NONE:
            return EvalResult(squad_scores(predictions, references), "f1", predictions)
        contexts = {ex.id: ex.context for ex in examples}
        scores, raw = squad_scores_padded(predictions, references, contexts, self.punctuation)
        return EvalResult(scores, "f1", raw, generated=predictions)

    def score_shown(self, examples: Sequence[QAExample], answers: Sequence[str]) -> dict[str, float]:
        """The official EM/F1 of answers already in the context's own text (no mapping back, no T5 scores)."""
        return squad_scores(
            {ex.id: a for ex, a in zip(examples, answers, strict=True)}, _references(examples)
        )

    def request_examples(self, record: Mapping[str, Any]) -> list[QAExample]:
        """One question from a request's ``question`` and ``context`` (and optional ``id``).

        Raises:
            BadRecord: ``question`` or ``context`` is missing, empty or not a string.
        """
        fields = [record.get(k) for k in ("question", "context")]
        if not all(isinstance(v, str) and v for v in fields):
            raise BadRecord("bad_schema", "needs non-empty string fields 'question' and 'context'")
        qid = record.get("id")
        return [
            QAExample(
                id="" if qid is None else str(qid), question=fields[0], context=fields[1], answers=("",)
            )
        ]

    def request_parts(
        self, question: str | None, context: str | None, fields: Mapping[str, Any] | None
    ) -> list[QAExample]:
        """One question from a request's question and context (its fields are not read).

        Raises:
            BadRecord: The question or the context is missing.
        """
        for name, value in (("question", question), ("context", context)):
            if value is None:
                raise BadRecord(
                    "missing_field",
                    f"{name}: Field required (this task answers questions: send question and context)",
                )
        return self.request_examples({"question": question, "context": context})

    def answer_text(self, example: QAExample, generated: str) -> str:
        """On padded text, the context's own span the answer was read from ("U.S.", not "U . S ."); the
        answer as generated where it maps to no span, and always on raw text; stripped, as `score`
        strips it."""
        generated = generated.strip()
        if self.punctuation == Punctuation.NONE:
            return generated
        span = raw_answer(generated, example.context, self.punctuation)
        return generated if span is None else span


def _references(examples: Sequence[QAExample]) -> dict[str, list[str]]:
    """Question id to its gold answers."""
    return {ex.id: list(ex.answers) for ex in examples}
