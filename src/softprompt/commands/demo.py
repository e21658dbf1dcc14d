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
accept. The plans, the micro model and the data files are built by `commands.demo_setup`; the table is
rendered by `commands.demo_summary`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from softprompt.commands.demo_setup import (
    DATA_DIR,
    FULL,
    MAX_SOURCE_LENGTH,
    MAX_TARGET_LENGTH,
    MODEL_DIR,
    QUICK,
    DemoPlan,
    build_micro_model_dir,
    write_data,
    write_task_c,
)
from softprompt.commands.demo_summary import summary_markdown
from softprompt.commands.flags import DemoArgs
from softprompt.errors import UserError
from softprompt.io.rundir import BEST, METRICS_FILE

__all__ = ["main", "run", "run_demo", "score"]

PHASES = ("task_a_finetune", "task_b_prompt", "task_b_finetune", "task_c_prompt")
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


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
        # bf16 cannot pay on a micro T5, and fp32 keeps the demo's numbers apart from whether this CPU
        # computes bf16 natively (the default, auto, would follow that).
        precision="fp32",
        seed=seed,
        # The demo's own word-level tokenizer is built from the raw synthetic text, and score() reads raw text.
        punctuation="none",
    )
    common.update(overrides)
    common["output_dir"] = str(out / common["output_dir"])
    return TrainConfig(**common)


def score(
    model_dir: str | os.PathLike,
    data_file: str | os.PathLike,
    prompt_dir: str | os.PathLike | None = None,
    *,
    task_file: str | os.PathLike | None = None,
    classify: str = "greedy",
) -> dict[str, float]:
    """The scores of a saved model, optionally driven by a saved prompt, on a data file, as ``softprompt
    eval`` gives them.

    Args:
        model_dir: A Hugging Face model directory (a fine-tuning run's best/).
        data_file: The task's data: SQuAD JSON for the QA tasks, the task file's rows for task C.
        prompt_dir: A prompt checkpoint (a prompt-tuning run's best/), or None for the bare model.
        task_file: A text task's YAML file; None: SQuAD-shaped QA on raw text.
        classify: Greedy generation, or rank classification over a text task's labels.

    Returns:
        The task's scores in percent (QA: ``{"exact_match": ..., "f1": ...}``).
    """
    from softprompt.inference.bank import load_model_and_prompts
    from softprompt.inference.options import GenerationOptions
    from softprompt.tasks.resolve import task_from_saved
    from softprompt.tasks.text.presets import load_task

    task = task_from_saved(load_task(task_file).to_dict() if task_file is not None else None)
    bank = load_model_and_prompts(str(model_dir), [prompt_dir] if prompt_dir is not None else [])
    examples = task.load(data_file)
    features = task.tokenize(
        examples, bank.tokenizer, max_source_length=MAX_SOURCE_LENGTH, max_target_length=MAX_TARGET_LENGTH
    )
    name = bank.names[0] if len(bank) else None
    gen = GenerationOptions(batch_size=100, max_new_tokens=MAX_TARGET_LENGTH)
    return bank.evaluate(task, examples, features, name, gen, classify=classify).scores()


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


@dataclass
class _DemoRun:
    """What the phases of one demo share: where and how it runs, and what the earlier phases produced."""

    out: Path
    plan: DemoPlan
    seed: int
    say: Callable[..., None]
    files: dict[str, Path] = field(default_factory=dict)
    """Data file by name (`a_train`, ..., `c_task`, `c_test`)."""
    model_dir: Path | None = None
    """The micro T5's directory (config and tokenizer; task A trains it from random weights)."""
    results: dict[str, Any] = field(default_factory=dict)
    """Each training phase's results (by phase name) and each held-out score (by what it scores)."""
    digest: str = ""
    """sha256 of the task-A model's weights once task A is trained."""
    frozen: bool = True
    """Whether the task-A model's weights still have that digest after each prompt run."""

    @property
    def base(self) -> Path:
        """The task-A model: the frozen model of the prompt runs and the start of the task-B fine-tuning."""
        return self.out / PHASES[0] / BEST

    def train(self, **overrides: Any) -> dict[str, Any]:
        """Train one phase (`output_dir` names it) with the demo's common settings; its results."""
        # Looked up at each call, so a test can watch the trainer through softprompt.training.loop.train.
        from softprompt.training.loop import train

        return train(_train_config(self.out, self.plan, self.seed, **overrides))

    def weights_unchanged(self) -> bool:
        """Whether the task-A model's weight file still has the digest taken after task A."""
        return _sha256(self.base / "model.safetensors") == self.digest


def _data_and_model(run: _DemoRun) -> None:
    run.files = write_data(run.out / DATA_DIR, run.plan, run.seed)
    run.model_dir = build_micro_model_dir(run.out / MODEL_DIR, run.plan)


def _task_a_finetune(run: _DemoRun) -> None:
    plan = run.plan
    run.say(f"\n== 1/4 fine-tune a random micro T5 on task A ({plan.steps_a} steps)", flush=True)
    run.results[PHASES[0]] = run.train(
        output_dir=PHASES[0],
        model_name_or_path=str(run.model_dir),
        random_init=True,
        train_file=str(run.files["a_train"]),
        validation_file=str(run.files["a_dev"]),
        optimizer="adamw",
        lr=plan.lr_a,
        warmup_steps=plan.steps_a // 20,
        weight_decay=0.0,
        max_steps=plan.steps_a,
        # A randomly initialised model only improves, so scoring once at the end is enough.
        eval_steps=0,
    )
    run.digest = _sha256(run.base / "model.safetensors")


def _zero_shot_eval(run: _DemoRun) -> None:
    run.results["zero_shot"] = {
        "dev": score(run.base, run.files["b_dev"]),
        "test": score(run.base, run.files["b_test"]),
    }


def _task_b_prompt(run: _DemoRun) -> None:
    plan = run.plan
    run.say(
        f"\n== 2/4 freeze it; train a {plan.n_tokens}-token soft prompt for task B ({plan.steps_prompt} steps)"
    )
    run.results[PHASES[1]] = run.train(
        output_dir=PHASES[1],
        model_name_or_path=str(run.base),
        train_file=str(run.files["b_train"]),
        validation_file=str(run.files["b_dev"]),
        prompt_tuning=True,
        n_tokens=plan.n_tokens,
        optimizer="adafactor",
        lr=plan.lr_prompt,
        max_steps=plan.steps_prompt,
        eval_steps=plan.eval_every_b,
    )
    run.frozen = run.weights_unchanged()


def _task_b_finetune(run: _DemoRun) -> None:
    plan = run.plan
    run.say(f"\n== 3/4 baseline: fine-tune every weight of the task-A model on task B ({plan.steps_b} steps)")
    run.results[PHASES[2]] = run.train(
        output_dir=PHASES[2],
        model_name_or_path=str(run.base),
        train_file=str(run.files["b_train"]),
        validation_file=str(run.files["b_dev"]),
        optimizer="adamw",
        lr=plan.lr_b,
        weight_decay=0.0,
        max_steps=plan.steps_b,
        eval_steps=plan.eval_every_b,
    )


def _task_c_prompt(run: _DemoRun) -> None:
    plan, files = run.plan, run.files
    run.say(
        f"\n== 4/4 a classification task from CSV (task C, {plan.steps_c} steps): a prompt for the same frozen "
        "model, started from its class labels"
    )
    files.update(write_task_c(run.out / DATA_DIR, plan, run.seed))
    run.results[PHASES[3]] = run.train(
        output_dir=PHASES[3],
        model_name_or_path=str(run.base),
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
    run.results["task_c_zero_shot"] = score(run.base, files["c_test"], task_file=files["c_task"])
    run.results["task_c_test"] = score(
        run.base, files["c_test"], prompt_dir=run.out / PHASES[3] / BEST, task_file=files["c_task"]
    )
    run.frozen = run.frozen and run.weights_unchanged()


def _test_eval(run: _DemoRun) -> None:
    run.results["prompt_test"] = score(run.base, run.files["b_test"], prompt_dir=run.out / PHASES[1] / BEST)
    run.results["finetune_test"] = score(run.out / PHASES[2] / BEST, run.files["b_test"])


# The demo's steps in order, each with the name its wall time is reported under in summary.json.
_STEPS: tuple[tuple[str, Callable[[_DemoRun], None]], ...] = (
    ("data_and_model", _data_and_model),
    (PHASES[0], _task_a_finetune),
    ("zero_shot_eval", _zero_shot_eval),
    (PHASES[1], _task_b_prompt),
    (PHASES[2], _task_b_finetune),
    (PHASES[3], _task_c_prompt),
    ("test_eval", _test_eval),
)


def _run_phases(out: Path, *, seed: int, quick: bool, echo: bool) -> dict[str, Any]:
    _prepare_output_dir(out)
    run = _DemoRun(out, QUICK if quick else FULL, seed, say=print if echo else (lambda *a, **k: None))
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    for name, step in _STEPS:
        t = time.perf_counter()
        step(run)
        seconds[name] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    summary = _summary(run, quick, seconds)
    from softprompt.io.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out / SUMMARY_JSON, summary)
    table = summary_markdown(summary)
    atomic_write_text(out / SUMMARY_MD, table)
    run.say("\n" + table)
    if not run.frozen:
        # The whole point of the demo; a change here is a bug in the trainer, never a user mistake.
        weights = run.base / "model.safetensors"
        raise RuntimeError(f"prompt tuning changed {weights}; the frozen model must stay untouched")
    return summary


def _summary(run: _DemoRun, quick: bool, seconds: dict[str, float]) -> dict[str, Any]:
    """What summary.json holds: the plan, every run's dev scores and held-out scores, and the timings."""
    out, r = run.out, run.results

    def dev(result: dict[str, Any]) -> dict[str, float]:
        return {"exact_match": result["exact_match"], "f1": result["f1"]}

    result_a, result_prompt, result_finetune, result_c = (r[phase] for phase in PHASES)
    return {
        "seed": run.seed,
        "quick": quick,
        "plan": asdict(run.plan),
        "task_a": {"run": PHASES[0], "dev": dev(result_a), "steps": result_a["steps"]},
        "task_b": {
            "zero_shot": {
                "run": PHASES[0],
                "trainable_parameters": 0,
                **r["zero_shot"],
            },
            "prompt_tuning": {
                "run": PHASES[1],
                "trainable_parameters": _trainable_parameters(out / PHASES[1]),
                "dev": dev(result_prompt),
                "test": r["prompt_test"],
                "best_step": result_prompt["best_step"],
            },
            "fine_tuning": {
                "run": PHASES[2],
                "trainable_parameters": _trainable_parameters(out / PHASES[2]),
                "dev": dev(result_finetune),
                "test": r["finetune_test"],
                "best_step": result_finetune["best_step"],
            },
        },
        "task_c": {
            "run": PHASES[3],
            "task_file": str(run.files["c_task"].relative_to(out)),
            "zero_shot_test": r["task_c_zero_shot"],
            "dev": {"accuracy": result_c["accuracy"]},
            "test": r["task_c_test"],
            "best_step": result_c["best_step"],
        },
        "frozen_model_unchanged": run.frozen,
        "task_a_model_sha256": run.digest,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "torch_threads": _torch_threads(),
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: Sequence[str]) -> int:
    """`softprompt demo [--output_dir DIR] [--seed N] [--quick] [--threads N]`."""
    from softprompt.config.parser import parse

    return run(parse(DemoArgs, argv, "softprompt demo"))


def run(args: DemoArgs) -> int:
    """Run the demo for parsed `DemoArgs` and say where its files are."""
    from transformers.utils import logging as hf_logging

    # transformers draws a bar for every tiny save and load; the trainer's own progress lines suffice.
    hf_logging.disable_progress_bar()
    run_demo(args.output_dir, seed=args.seed, quick=args.quick, threads=args.threads)
    print(f"runs, data and summary in {args.output_dir}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
