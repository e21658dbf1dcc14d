"""The demo's builders: the word-level tokenizer over the synthetic corpus, the micro model, the data files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from softprompt.data.synthetic import corpus_texts, generate_split


def _questions(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(p["context"], qa) for article in data["data"] for p in article["paragraphs"] for qa in p["qas"]]


def test_tokenizer_covers_the_corpus_exactly(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from softprompt.commands.demo_setup import build_tokenizer

    build_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))  # loads back like any model's tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) < 400
    texts = [t for task in ("a", "b") for t in corpus_texts(generate_split(task, "train", 400, seed=5))]
    texts += ["question:", "context:"]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    answers = [qa["answers"][0]["text"] for _, qa in _questions(generate_split("a", "dev", 200, seed=5))]
    decoded = tokenizer.batch_decode(tokenizer(answers, add_special_tokens=False)["input_ids"])
    assert decoded == answers
