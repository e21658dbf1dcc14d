"""`softprompt demo`: the paper's claim, end to end, offline, in a few CPU minutes.

Nothing is downloaded and nothing outside the package is read. The demo

1. generates a seeded synthetic QA corpus (`softprompt.synthetic`) in SQuAD v1.1 format, for two tasks
   that share one input format: task A, a people directory where a bare name asks for the trade, and
   task B, where a bare name asks for the home town;
2. builds a word-level tokenizer over the generator's closed vocabulary and a micro T5 1.1 (gated-GELU)
   config, saved as a normal model directory (`micro-t5/`; its random weights come from the seed);
3. fine-tunes every weight on task A (`task_a_finetune/`);
4. freezes that model and trains only a new soft prompt for task B (`task_b_prompt/`);
5. fine-tunes the task-A model on task B as the upper-bound baseline (`task_b_finetune/`);
6. scores all three, and the task-A model with no prompt (zero-shot), on a held-out task B test set and
   writes `summary.json` and `summary.md`.

Each phase goes through `softprompt.train.train`, so each sub-directory is an ordinary run directory
(config.yaml, metrics.jsonl, best/, last, results.json) that `softprompt eval`, `predict` and `report`
accept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FULL", "QUICK", "DemoPlan", "build_micro_model_dir", "build_tokenizer", "main", "run_demo"]

MODEL_DIR = "micro-t5"
DATA_DIR = "data"
PHASES = ("task_a_finetune", "task_b_prompt", "task_b_finetune")
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


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
    eval_every_b: int
    """Evaluate the task B runs every this many steps to pick best/."""
    n_tokens: int = 10
    """P, the soft prompt's length."""
    batch: int = 32
    """Global batch size of every phase."""
    lr_a: float = 3e-3
    """AdamW peak rate for task A (linear warmup and decay): a randomly initialised micro model."""
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
    steps_a=900,
    steps_prompt=300,
    steps_b=200,
    eval_every_b=50,
)
QUICK = DemoPlan(
    train_a=3000,
    train_b=1000,
    dev=200,
    d_model=64,
    layers=2,
    steps_a=400,
    steps_prompt=150,
    steps_b=100,
    eval_every_b=50,
)

# T5's special ids, so the micro model behaves like the real ones (decoding starts from pad).
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
# Answers are one or two words; the inputs are short, so nothing is ever truncated.
MAX_SOURCE_LENGTH = 256
MAX_TARGET_LENGTH = 8


def build_tokenizer(directory: str | os.PathLike) -> Any:
    """Write a word-level tokenizer for the synthetic corpus into ``directory`` and return it.

    The generator draws every word from closed lists, so a vocabulary of exactly those words (about 300)
    covers the corpus with no unknown token: a honest tokenizer that keeps the embedding table, and so the
    model, tiny. Ids 0, 1, 2 are pad, EOS and unk, as in T5.

    Args:
        directory: Where ``tokenizer.json`` and ``tokenizer_config.json`` go.

    Returns:
        The tokenizer, a ``transformers`` fast tokenizer that ``AutoTokenizer`` loads back.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from softprompt.synthetic import vocabulary_words

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
    from softprompt.synthetic import generate_split, write_squad_json

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


def _train_config(out: Path, plan: DemoPlan, seed: int, **overrides: Any) -> Any:
    from softprompt.config import TrainConfig

    common: dict[str, Any] = dict(
        global_batch_size=plan.batch,
        max_source_length=MAX_SOURCE_LENGTH,
        max_target_length=MAX_TARGET_LENGTH,
        # The demo replaces its own earlier sub-runs; main() refuses directories that are not demos.
        overwrite_output_dir=True,
        report_to=["none"],
        logging_steps=25,
        save_steps=0,
        save_total_limit=1,
        eval_batch_size=100,
        dropout=0.0,
        seed=seed,
    )
    common.update(overrides)
    common["output_dir"] = str(out / common["output_dir"])
    return TrainConfig(**common)


def score(
    model_dir: str | os.PathLike, data_file: str | os.PathLike, prompt_dir: str | os.PathLike | None = None
) -> dict[str, float]:
    """EM/F1 of a saved model, optionally driven by a saved prompt, on a SQuAD file (greedy answers).

    Args:
        model_dir: A Hugging Face model directory (a fine-tuning run's best/).
        data_file: The questions.
        prompt_dir: A prompt checkpoint (a prompt-tuning run's best/), or None for the bare model.

    Returns:
        ``{"exact_match": ..., "f1": ...}`` in percent.
    """
    import torch

    from softprompt.checkpoint import load_prompt
    from softprompt.data import load_examples, tokenize_examples
    from softprompt.evaluate import evaluate_examples
    from softprompt.model import PromptedT5, load_t5, load_tokenizer
    from softprompt.prompt import SoftPrompt

    tokenizer = load_tokenizer(model_dir)
    t5 = load_t5(model_dir)
    prompt = None
    if prompt_dir is not None:
        weight, _ = load_prompt(prompt_dir, expect_d_model=t5.config.d_model)
        prompt = SoftPrompt(weight.shape[0], weight.shape[1])
        with torch.no_grad():
            prompt.weight.copy_(weight)
    model = PromptedT5(t5, prompt).eval()
    examples = load_examples(data_file)
    features = tokenize_examples(
        examples, tokenizer, max_source_length=MAX_SOURCE_LENGTH, max_target_length=MAX_TARGET_LENGTH
    )
    result = evaluate_examples(
        model, tokenizer, examples, features, batch_size=100, max_new_tokens=MAX_TARGET_LENGTH
    )
    return {"exact_match": result.exact_match, "f1": result.f1}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trainable(model_dir: Path, prompt_tokens: int | None) -> int:
    """Trained parameters of a phase: the prompt's P x d_model, or every weight of the model."""
    from safetensors import safe_open

    if prompt_tokens is not None:
        config = json.loads((model_dir / "config.json").read_text())
        return prompt_tokens * int(config["d_model"])
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        # Tied tensors are stored once, so this counts each weight once.
        return sum(int(f.get_slice(k).get_shape().numel()) if hasattr(f.get_slice(k).get_shape(), "numel")
                   else _prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
