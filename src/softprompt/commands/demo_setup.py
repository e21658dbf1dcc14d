"""What the demo builds before it trains: its sizes (`DemoPlan`: `FULL`, `QUICK`), a micro T5 with a
word-level tokenizer over the synthetic corpus's closed vocabulary, and the seeded data files of tasks A,
B (SQuAD v1.1 JSON) and C (CSV files and a task file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DATA_DIR",
    "FULL",
    "MAX_SOURCE_LENGTH",
    "MAX_TARGET_LENGTH",
    "MODEL_DIR",
    "QUICK",
    "TASK_C_YAML",
    "DemoPlan",
    "build_micro_model_dir",
    "build_tokenizer",
    "write_data",
    "write_task_c",
]

MODEL_DIR = "micro-t5"
DATA_DIR = "data"
# Task C, a classification task read from CSV through a task file, as a user's own task would be.
TASK_C_YAML = """\
# Task C of the softprompt demo: which attribute does a directory question ask for?
# Launch: softprompt train --task data/task_c.yaml --train_file data/task_c_train.csv --prompt_tuning ...
name: task_c
input_template: "question: {question} context: {options}"
label_field: attribute
labels: [town, trade, year, instrument]
id_field: id
metric: accuracy
"""


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and schedules of one demo variant."""

    train_a: int
    """Task A training questions."""
    train_b: int
    """Task B training questions (shared by the prompt and the fine-tuned baseline)."""
    dev: int
    """Questions in each dev set (checkpoint selection) and in the task B test set (the table)."""
    d_model: int
    """Width of the micro T5."""
    layers: int
    """Encoder layers, and as many decoder layers."""
    steps_a: int
    """Fine-tuning steps on task A."""
    steps_prompt: int
    """Prompt-tuning steps on task B."""
    steps_b: int
    """Fine-tuning steps on task B (the baseline)."""
    steps_c: int
    """Prompt-tuning steps on task C (classification)."""
    train_c: int
    """Task C training rows."""
    eval_every_b: int
    """Evaluate the task B runs every this many steps to pick best/."""
    n_tokens: int = 10
    """P, the soft prompt's length."""
    batch: int = 32
    """Global batch size of every phase."""
    lr_a: float = 5e-3
    """AdamW peak rate for task A (linear warmup and decay); 3e-3 learnt slower, 7e-3 and up unstably."""
    lr_prompt: float = 0.3
    """Adafactor rate for the prompt: the paper's."""
    lr_b: float = 1e-3
    """AdamW peak rate for fine-tuning the task-A model on task B."""


FULL = DemoPlan(
    train_a=6000,
    train_b=2000,
    dev=300,
    d_model=64,
    layers=2,
    steps_a=800,
    steps_prompt=200,
    steps_b=150,
    eval_every_b=50,
    steps_c=100,
    train_c=1000,
)
QUICK = DemoPlan(
    train_a=3000,
    train_b=1000,
    dev=200,
    d_model=64,
    layers=2,
    steps_a=500,
    steps_prompt=150,
    steps_b=100,
    eval_every_b=50,
    steps_c=60,
    train_c=600,
)

# T5's special ids, so the micro model behaves like the real ones (decoding starts from pad).
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
# Answers are single words and inputs under 100 tokens, so nothing is ever truncated.
MAX_SOURCE_LENGTH = 256
MAX_TARGET_LENGTH = 8


def build_tokenizer(directory: str | os.PathLike) -> Any:
    """Write a word-level tokenizer for the synthetic corpus into ``directory`` and return it.

    The generator draws every word from closed lists, so a vocabulary of exactly those words (about 300)
    covers the corpus with no unknown token: an honest tokenizer that keeps the embedding table, and so the
    model, tiny. Ids 0, 1, 2 are pad, EOS and unk, as in T5.

    Args:
        directory: Where ``tokenizer.json`` and ``tokenizer_config.json`` go.

    Returns:
        The tokenizer, a ``transformers`` fast tokenizer that ``AutoTokenizer`` loads back.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from softprompt.data.synthetic import vocabulary_words

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for word in vocabulary_words():
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Splitting punctuation from words keeps "Osterby." and "Osterby" one token, so answers match spans.
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_micro_model_dir(directory: str | os.PathLike, plan: DemoPlan) -> Path:
    """Write a micro T5 1.1 model directory: config.json and the tokenizer, no weights.

    Like the model directories in ../shared, it is meant for ``--random_init``: the trainer builds the
    weights from the config and the seed.

    Args:
        directory: The directory to create.
        plan: Gives the width and depth.

    Returns:
        The directory.
    """
    from transformers import T5Config

    directory = Path(directory)
    tokenizer = build_tokenizer(directory)
    T5Config(
        vocab_size=len(tokenizer),
        d_model=plan.d_model,
        d_kv=plan.d_model // 4,
        d_ff=2 * plan.d_model,
        num_layers=plan.layers,
        num_decoder_layers=plan.layers,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    ).save_pretrained(directory)
    return directory


def write_data(directory: str | os.PathLike, plan: DemoPlan, seed: int) -> dict[str, Path]:
    """Generate the five data files (task A train/dev, task B train/dev/test) as SQuAD v1.1 JSON.

    Returns:
        Split name (``a_train``, ``a_dev``, ``b_train``, ``b_dev``, ``b_test``) -> file.
    """
    from softprompt.data.synthetic import generate_split, write_squad_json

    sizes = {
        ("a", "train"): plan.train_a,
        ("a", "dev"): plan.dev,
        ("b", "train"): plan.train_b,
        ("b", "dev"): plan.dev,
        ("b", "test"): plan.dev,
    }
    return {
        f"{task}_{split}": write_squad_json(
            generate_split(task, split, n, seed), Path(directory) / f"task_{task}_{split}.json"
        )
        for (task, split), n in sizes.items()
    }


def write_task_c(directory: str | os.PathLike, plan: DemoPlan, seed: int) -> dict[str, Path]:
    """Task C's task file and its train/dev/test CSV files (``c_task``, ``c_train``, ``c_dev``, ``c_test``)."""
    import csv

    from softprompt.data.synthetic import generate_intents

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {"c_task": directory / "task_c.yaml"}
    files["c_task"].write_text(TASK_C_YAML, encoding="utf-8")
    for split, n in (("train", plan.train_c), ("dev", plan.dev), ("test", plan.dev)):
        path = files[f"c_{split}"] = directory / f"task_c_{split}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "question", "options", "attribute"])
            writer.writeheader()
            writer.writerows(generate_intents(split, n, seed))
    return files
