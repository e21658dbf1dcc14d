"""`softprompt demo`: the paper's claim, end to end, offline, in a few CPU minutes.

Nothing is downloaded and nothing outside the package is read. The demo

1. generates a seeded synthetic QA corpus (`softprompt.data.synthetic`) in SQuAD v1.1 format, for two tasks
   that share one input format: task A, a people directory where a bare name asks for the trade, and
   task B, where a bare name asks for the home town;
2. builds a word-level tokenizer over the generator's closed vocabulary and a micro T5 1.1 (gated-GELU)
   config, saved as a normal model directory (`micro-t5/`; its random weights come from the seed);
3. fine-tunes every weight on task A (`task_a_finetune/`);
4. freezes that model and trains only a new soft prompt for task B (`task_b_prompt/`);
5. fine-tunes the task-A model on task B as the upper-bound baseline (`task_b_finetune/`);
6. trains a second prompt for the same frozen model on task C, a classification task (which attribute a
   question asks for) read from CSV files through a task file (`data/task_c.yaml`), started from its
   class labels (the paper's section 3.2) and scored by accuracy;
7. scores everything, and the task-A model with no prompt (zero-shot), on held-out test sets and
   writes `summary.json` and `summary.md`.

Each phase goes through `softprompt.training.loop.train`, so each sub-directory is an ordinary run directory
(config.yaml, metrics.jsonl, best/, last, results.json) that `softprompt eval`, `predict` and `report`
accept.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from softprompt.errors import UserError
from softprompt.io.rundir import BEST, METRICS_FILE

__all__ = [
    "FULL",
    "QUICK",
    "DemoPlan",
    "build_micro_model_dir",
    "build_tokenizer",
    "main",
    "run_demo",
    "score",
    "score_task",
    "summary_markdown",
    "write_data",
    "write_task_c",
]

MODEL_DIR = "micro-t5"
DATA_DIR = "data"
PHASES = ("task_a_finetune", "task_b_prompt", "task_b_finetune", "task_c_prompt")
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


def _train_config(out: Path, plan: DemoPlan, seed: int, **overrides: Any) -> Any:
    from softprompt.training.config import TrainConfig

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
        # The demo's own word-level tokenizer is built from the raw synthetic text, and score() reads raw text.
        punctuation="none",
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
    from softprompt.inference.bank import load_model_and_prompts
    from softprompt.inference.options import GenerationOptions
    from softprompt.tasks.squad.reader import load_examples, tokenize_examples

    bank = load_model_and_prompts(str(model_dir), [prompt_dir] if prompt_dir is not None else [])
    examples = load_examples(data_file)
    features = tokenize_examples(
        examples, bank.tokenizer, max_source_length=MAX_SOURCE_LENGTH, max_target_length=MAX_TARGET_LENGTH
    )
    task = bank.names[0] if len(bank) else None
    result = bank.evaluate(
        examples, features, task, GenerationOptions(batch_size=100, max_new_tokens=MAX_TARGET_LENGTH)
    )
    return {"exact_match": result.exact_match, "f1": result.f1}


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


def score_task(
    model_dir: str | os.PathLike,
    task_file: str | os.PathLike,
    data_file: str | os.PathLike,
    prompt_dir: str | os.PathLike | None = None,
    classify: str = "greedy",
) -> dict[str, float]:
    """The task's scores of a saved model (and prompt) on a task's data file, as ``softprompt eval`` gives."""
    from softprompt.inference.bank import load_model_and_prompts
    from softprompt.inference.options import GenerationOptions
    from softprompt.tasks.text.features import tokenize_texts
    from softprompt.tasks.text.presets import load_task
    from softprompt.tasks.text.reader import load_task_examples

    task = load_task(task_file)
    bank = load_model_and_prompts(str(model_dir), [prompt_dir] if prompt_dir is not None else [])
    examples = load_task_examples(task, data_file)
    features = tokenize_texts(
        examples, bank.tokenizer, max_source_length=MAX_SOURCE_LENGTH, max_target_length=MAX_TARGET_LENGTH
    )
    name = bank.names[0] if len(bank) else None
    result = bank.evaluate_task(
        task,
        examples,
        features,
        name,
        GenerationOptions(batch_size=100, max_new_tokens=MAX_TARGET_LENGTH),
        classify=classify,
    )
    return result.scores()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trainable_parameters(run_dir: Path) -> int:
    """The trainable-parameter count the trainer logged at the start of a run."""
    for line in (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("event") == "start":
            return int(record["trainable_parameters"])
    raise RuntimeError(f"{run_dir / 'metrics.jsonl'} has no start record")


def _prepare_output_dir(out: Path) -> None:
    """Create ``out``, or reuse it if it holds an earlier demo; refuse any other non-empty directory."""
    marker = out / ".softprompt-demo"
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not marker.exists():
        # The demo overwrites its own sub-runs; it must never do that to someone's real run directory.
        raise UserError(
            f"--output_dir {out} is not empty and holds no earlier demo; choose another directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by `softprompt demo`; the demo may replace this directory's contents\n")
    for name in (SUMMARY_JSON, SUMMARY_MD):
        (out / name).unlink(missing_ok=True)


def run_demo(
    output_dir: str | os.PathLike,
    *,
    seed: int = 0,
    quick: bool = False,
    threads: int | None = 1,
    echo: bool = True,
) -> dict[str, Any]:
    """Run every phase of the demo and write ``summary.json`` and ``summary.md`` into ``output_dir``.

    Args:
        output_dir: The demo directory; created, or reused if it holds an earlier demo.
        seed: Seeds the data, the random model weights, the prompt init and the data order.
        quick: Run the smaller ``QUICK`` plan instead of ``FULL``.
        threads: torch CPU threads while the demo runs (restored afterwards); None keeps the current
            setting. One is the default because the micro model's matrices are too small to split: on a
            shared 2-core machine, two threads made the quick demo 8x slower (264 s against 33 s), as
            each thread spins waiting for the other.
        echo: Print each phase's headline and the final table.

    Returns:
        The content of ``summary.json``.
    """
    import torch

    previous_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        return _run_phases(Path(output_dir), seed=seed, quick=quick, echo=echo)
    finally:
        torch.set_num_threads(previous_threads)


def _run_phases(out: Path, *, seed: int, quick: bool, echo: bool) -> dict[str, Any]:
    from softprompt.training.loop import train

    plan = QUICK if quick else FULL
    _prepare_output_dir(out)
    say = print if echo else (lambda *a, **k: None)
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    files = write_data(out / DATA_DIR, plan, seed)
    model_dir = build_micro_model_dir(out / MODEL_DIR, plan)
    seconds["data_and_model"] = time.perf_counter() - t

    say(f"\n== 1/4 fine-tune a random micro T5 on task A ({plan.steps_a} steps)", flush=True)
    t = time.perf_counter()
    result_a = train(
        _train_config(
            out,
            plan,
            seed,
            output_dir=PHASES[0],
            model_name_or_path=str(model_dir),
            random_init=True,
            train_file=str(files["a_train"]),
            validation_file=str(files["a_dev"]),
            optimizer="adamw",
            lr=plan.lr_a,
            warmup_steps=plan.steps_a // 20,
            weight_decay=0.0,
            max_steps=plan.steps_a,
            # A randomly initialised model only improves, so scoring once at the end is enough.
            eval_steps=0,
        )
    )
    seconds[PHASES[0]] = time.perf_counter() - t
    base = out / PHASES[0] / BEST
    base_weights = base / "model.safetensors"
    digest_before = _sha256(base_weights)

    t = time.perf_counter()
    zero_shot = {"dev": score(base, files["b_dev"]), "test": score(base, files["b_test"])}
    seconds["zero_shot_eval"] = time.perf_counter() - t

    say(
        f"\n== 2/4 freeze it; train a {plan.n_tokens}-token soft prompt for task B ({plan.steps_prompt} steps)"
    )
    t = time.perf_counter()
    result_prompt = train(
        _train_config(
            out,
            plan,
            seed,
            output_dir=PHASES[1],
            model_name_or_path=str(base),
            train_file=str(files["b_train"]),
            validation_file=str(files["b_dev"]),
            prompt_tuning=True,
            n_tokens=plan.n_tokens,
            optimizer="adafactor",
            lr=plan.lr_prompt,
            max_steps=plan.steps_prompt,
            eval_steps=plan.eval_every_b,
        )
    )
    seconds[PHASES[1]] = time.perf_counter() - t
    frozen = _sha256(base_weights) == digest_before

    say(f"\n== 3/4 baseline: fine-tune every weight of the task-A model on task B ({plan.steps_b} steps)")
    t = time.perf_counter()
    result_finetune = train(
        _train_config(
            out,
            plan,
            seed,
            output_dir=PHASES[2],
            model_name_or_path=str(base),
            train_file=str(files["b_train"]),
            validation_file=str(files["b_dev"]),
            optimizer="adamw",
            lr=plan.lr_b,
            weight_decay=0.0,
            max_steps=plan.steps_b,
            eval_steps=plan.eval_every_b,
        )
    )
    seconds[PHASES[2]] = time.perf_counter() - t

    say(
        f"\n== 4/4 a classification task from CSV (task C, {plan.steps_c} steps): a prompt for the same frozen "
        "model, started from its class labels"
    )
    t = time.perf_counter()
    files.update(write_task_c(out / DATA_DIR, plan, seed))
    result_c = train(
        _train_config(
            out,
            plan,
            seed,
            output_dir=PHASES[3],
            model_name_or_path=str(base),
            task=str(files["c_task"]),
            train_file=str(files["c_train"]),
            validation_file=str(files["c_dev"]),
            prompt_tuning=True,
            prompt_init="class_label",
            n_tokens=plan.n_tokens,
            optimizer="adafactor",
            lr=plan.lr_prompt,
            max_steps=plan.steps_c,
            eval_steps=plan.steps_c // 2,
        )
    )
    task_c_zero_shot = score_task(base, files["c_task"], files["c_test"])
    task_c_test = score_task(base, files["c_task"], files["c_test"], prompt_dir=out / PHASES[3] / BEST)
    seconds[PHASES[3]] = time.perf_counter() - t
    frozen = frozen and _sha256(base_weights) == digest_before

    t = time.perf_counter()
    prompt_test = score(base, files["b_test"], prompt_dir=out / PHASES[1] / BEST)
    finetune_test = score(out / PHASES[2] / BEST, files["b_test"])
    seconds["test_eval"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started

    def dev(result: dict[str, Any]) -> dict[str, float]:
        return {"exact_match": result["exact_match"], "f1": result["f1"]}

    summary: dict[str, Any] = {
        "seed": seed,
        "quick": quick,
        "plan": asdict(plan),
        "task_a": {"run": PHASES[0], "dev": dev(result_a), "steps": result_a["steps"]},
        "task_b": {
            "zero_shot": {
                "run": PHASES[0],
                "trainable_parameters": 0,
                **zero_shot,
            },
            "prompt_tuning": {
                "run": PHASES[1],
                "trainable_parameters": _trainable_parameters(out / PHASES[1]),
                "dev": dev(result_prompt),
                "test": prompt_test,
                "best_step": result_prompt["best_step"],
            },
            "fine_tuning": {
                "run": PHASES[2],
                "trainable_parameters": _trainable_parameters(out / PHASES[2]),
                "dev": dev(result_finetune),
                "test": finetune_test,
                "best_step": result_finetune["best_step"],
            },
        },
        "task_c": {
            "run": PHASES[3],
            "task_file": str(files["c_task"].relative_to(out)),
            "zero_shot_test": task_c_zero_shot,
            "dev": {"accuracy": result_c["accuracy"]},
            "test": task_c_test,
            "best_step": result_c["best_step"],
        },
        "frozen_model_unchanged": frozen,
        "task_a_model_sha256": digest_before,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "torch_threads": _torch_threads(),
    }
    from softprompt.io.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out / SUMMARY_JSON, summary)
    table = summary_markdown(summary)
    atomic_write_text(out / SUMMARY_MD, table)
    say("\n" + table)
    if not frozen:
        # The whole point of the demo; a change here is a bug in the trainer, never a user mistake.
        raise RuntimeError(f"prompt tuning changed {base_weights}; the frozen model must stay untouched")
    return summary


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def summary_markdown(summary: dict[str, Any]) -> str:
    """The demo's result table (what ``summary.md`` holds)."""
    b = summary["task_b"]
    plan = summary["plan"]
    rows = [
        ("zero-shot: task-A model, no prompt", b["zero_shot"]),
        (f"prompt tuning: frozen task-A model + {plan['n_tokens']}-token prompt", b["prompt_tuning"]),
        ("fine-tuning: every weight of the task-A model", b["fine_tuning"]),
    ]
    a = summary["task_a"]["dev"]
    lines = [
        f"# softprompt demo ({'quick' if summary['quick'] else 'full'}, seed {summary['seed']})",
        "",
        "Task B: a bare name asks for the person's home town. The task-A model was trained to answer a bare",
        "name with the person's trade, so it must be told what task B wants: by a soft prompt, or by",
        "changing its weights.",
        "",
        "| task B | trained parameters | dev EM | dev F1 | test EM | test F1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, row in rows:
        lines.append(
            f"| {label} | {row['trainable_parameters']:,} | {row['dev']['exact_match']:.1f} | "
            f"{row['dev']['f1']:.1f} | {row['test']['exact_match']:.1f} | {row['test']['f1']:.1f} |"
        )
    c = summary.get("task_c")
    if c is not None:
        lines += [
            "",
            "Task C, a classification task read from CSV through a task file (`"
            + c["task_file"]
            + "`): which",
            "attribute a question asks for. A prompt for the same frozen model, started from its class labels:",
            f"test accuracy {c['test']['accuracy']:.1f} (zero-shot {c['zero_shot_test']['accuracy']:.1f}; "
            f"answers that are no label: {c['test']['invalid_predictions']:.0f} with the prompt, "
            f"{c['zero_shot_test']['invalid_predictions']:.0f} without).",
        ]
    frozen = "unchanged" if summary["frozen_model_unchanged"] else "CHANGED"
    lines += [
        "",
        f"Task-A model on task A dev: EM {a['exact_match']:.1f}, F1 {a['f1']:.1f}. "
        f"Its weights after prompt tuning: {frozen} (sha256 {summary['task_a_model_sha256'][:12]}).",
        "Dev picks each run's best checkpoint; test is held out. "
        f"Wall time {summary['seconds']['total']:.0f} s on {summary['torch_threads']} CPU thread(s).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """`softprompt demo [--output_dir DIR] [--seed N] [--quick] [--threads N]`."""
    from softprompt.commands.flags import DemoArgs
    from softprompt.config.parser import parse

    return run_parsed(parse(DemoArgs, argv, "softprompt demo"))


def run_parsed(args: Any) -> int:
    """Run the demo for parsed `DemoArgs` and say where its files are."""
    from transformers.utils import logging as hf_logging

    # transformers draws a bar for every tiny save and load; the trainer's own progress lines suffice.
    hf_logging.disable_progress_bar()
    run_demo(args.output_dir, seed=args.seed, quick=args.quick, threads=args.threads)
    print(f"runs, data and summary in {args.output_dir}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
