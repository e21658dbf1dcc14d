"""Where a prompt-tuning train step spends its time: softprompt's lean T5 against PEFT on transformers' T5.

    python bench/profile_train_step.py --shape small --batch 8 --precision fp32

Both sides get ONE random-weight T5 built from ``../shared/models/<shape>`` (its published config), the
same first ``batch`` SQuAD v1.1 train questions (softprompt's tokenization, padded to the batch's longest,
labels padded with -100), a 100-token prompt, the model's own dropout (0.1) in train mode, and run
forward, backward and an Adafactor step (the optimizer's share is tiny: one [100, d] parameter):

* softprompt: ``PromptedT5(t5, SoftPrompt)`` as the trainer runs it (the lean T5 path), in fp32, or in
  bf16 with the weights stored once in bf16 (``freeze_to``) under autocast, as ``--precision bf16`` trains.
* peer: PEFT ``get_peft_model(T5ForConditionalGeneration, PromptTuningConfig)`` (transformers' T5 with its
  default attention, SDPA), ``model(**batch).loss.backward()``, under ``torch.autocast`` in bf16.

Each side runs ``--warmup`` untimed steps, then ``--steps`` steps timed with the wall clock (the median
step is reported), then one more step under ``torch.profiler``, whose self CPU time per operator is summed
into categories (``CATEGORIES``): projections and FFN matmuls, attention matmuls, softmax, norms,
dropout, casts and copies, elementwise, the loss, and the rest. Time the profiler cannot see (numpy's
dropout-mask generation in a thread pool, Python) is the step's wall time minus the operators' sum.
Prints a table per side and the ratio; ``--json`` writes it all. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SOFTPROMPT_SHARED", REPO.parent / "shared"))
SQUAD_TRAIN = SHARED / "data" / "squad" / "train-v1.1.json"
MODELS = {"small": "t5-small-lm-adapt", "base": "t5-base-lm-adapt", "large": "t5-large-lm-adapt"}
N_TOKENS = 100

# Operator name (aten::...) -> category; the first matching substring wins, so order matters.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention matmul", ("bmm", "baddbmm", "scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("projection / FFN matmul", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")),
    ("softmax", ("softmax",)),
    ("norm", ("rsqrt", "vecdot", "rms_norm", "aten::pow", "aten::mean", "norm")),
    ("dropout", ("dropout", "bernoulli", "masked_fill", "native_dropout")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("cast / copy", ("aten::to", "_to_copy", "copy_", "clone", "contiguous", "aten::cat", "expand", "empty")),
    ("elementwise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "gelu", "relu", "tanh", "where")),
)


def categorise(name: str) -> str:
    """The category of one profiler operator name."""
    for category, keys in CATEGORIES:
        if any(k in name for k in keys):
            return category
    return "other ops"


def _batch(shape: str, batch: int) -> tuple[Path, dict[str, Any]]:
    """The model directory and one padded batch of the first `batch` SQuAD train questions."""
    from softprompt.data.batching import Collator
    from softprompt.modeling.model import load_tokenizer
    from softprompt.tasks.squad.reader import load_examples, tokenize_examples

    model_dir = SHARED / "models" / MODELS[shape]
    tokenizer = load_tokenizer(model_dir)
    feats = tokenize_examples(
        load_examples(SQUAD_TRAIN)[:batch], tokenizer, max_source_length=512, max_target_length=32
    )
    return model_dir, Collator(pad_token_id=tokenizer.pad_token_id)(feats)


def _softprompt_step(model_dir: Path, batch: dict[str, Any], precision: str) -> Any:
    import torch

    from softprompt.modeling.model import PromptedT5, load_t5
    from softprompt.modeling.optim import build_optimizer
    from softprompt.modeling.prompt import SoftPrompt

    t5 = load_t5(model_dir, random_init=True, seed=0)
    prompt = SoftPrompt(N_TOKENS, t5.config.d_model)
    model = PromptedT5(t5, prompt).train()
    if precision == "bf16":
        model.freeze_to(torch.bfloat16)
    opt, _ = build_optimizer("adafactor", model.trainable_parameters(), lr=0.3, weight_decay=1e-5)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    def step() -> None:
        loss = model(**inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _peft_step(model_dir: Path, batch: dict[str, Any], precision: str) -> Any:
    import contextlib

    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers.optimization import Adafactor

    from softprompt.modeling.model import load_t5

    t5 = load_t5(model_dir, random_init=True, seed=0)
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=N_TOKENS,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )
    model = get_peft_model(t5, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = Adafactor(params, lr=0.3, scale_parameter=False, relative_step=False, warmup_init=False)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step() -> None:
        with cast:
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _profile(step: Any, batch_size: int, median: float) -> dict[str, Any]:
    """One step under torch.profiler: self CPU time by category, scaled to the unprofiled median step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        profiled = time.perf_counter() - t0
    by_category: dict[str, float] = defaultdict(float)
    top: list[tuple[str, float]] = []
    for evt in prof.key_averages():
        self_s = evt.self_cpu_time_total / 1e6
        by_category[categorise(evt.key)] += self_s
        top.append((evt.key, self_s))
    ops = sum(by_category.values())
    # The profiler's own overhead inflates its step; scale the categories to the unprofiled median step.
    scale = median / profiled
    shares = {k: v * scale for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])}
    shares["not in an operator (numpy, Python)"] = max(0.0, median - ops * scale)
    return {
        "median_step_seconds": median,
        "examples_per_second": batch_size / median,
        "seconds_by_category": shares,
        "top_ops": [(k, s * scale) for k, s in sorted(top, key=lambda kv: -kv[1])[:12]],
    }


def profile_both(args: argparse.Namespace) -> dict[str, Any]:
    """Time both sides' train steps alternately in this process (a change in the machine's load hits both
    alike), then profile one step of each."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir, batch = _batch(args.shape, args.batch)
    steps = {"softprompt": _softprompt_step(model_dir, batch, args.precision)}
    if not args.no_peer:
        steps["peft"] = _peft_step(model_dir, batch, args.precision)
    seconds: dict[str, list[float]] = {side: [] for side in steps}
    for i in range(args.warmup + args.steps):
        for side, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= args.warmup:
                seconds[side].append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "source_length": int(batch["input_ids"].shape[1]) + N_TOKENS,
        "target_length": int(batch["labels"].shape[1]),
        "threads": torch.get_num_threads(),
    }
    for side, step in steps.items():
        out[side] = _profile(step, args.batch, statistics.median(seconds[side])) | {
            "step_seconds": seconds[side]
        }
    return out


def main(argv: list[str] | None = None) -> None:
    """Profile both sides (each in its own process unless --side), print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(MODELS), default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (the median is kept)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (default: torch's; 1 is steadier on a busy machine)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-peer", action="store_true", help="softprompt alone (to try a lever quickly)")
    args = p.parse_args(argv)
    results = profile_both(args)
    sp = results["softprompt"]
    pe = results.get("peft") or sp
    print(
        f"{args.shape}, batch {args.batch}, {args.precision}, {results['threads']} thread(s), encoder length "
        f"{results['source_length']}, target {results['target_length']}: softprompt "
        f"{sp['examples_per_second']:.2f} ex/s, peft {pe['examples_per_second']:.2f} ex/s, "
        f"ratio {sp['examples_per_second'] / pe['examples_per_second']:.2f}x\n"
    )
    cats = list(dict.fromkeys([*sp["seconds_by_category"], *pe["seconds_by_category"]]))
    print("| category | softprompt ms | peft ms |\n|---|---:|---:|")
    for c in cats:
        a = 1e3 * sp["seconds_by_category"].get(c, 0.0)
        b = 1e3 * pe["seconds_by_category"].get(c, 0.0)
        print(f"| {c} | {a:.0f} | {b:.0f} |")
    print(
        f"| **step** | **{1e3 * sp['median_step_seconds']:.0f}** | **{1e3 * pe['median_step_seconds']:.0f}** |"
    )
    for side in ("softprompt", "peft"):
        if side not in results:
            continue
        print(f"\n{side} top operators (ms):")
        for name, s in results[side]["top_ops"]:
            print(f"  {1e3 * s:8.1f}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
