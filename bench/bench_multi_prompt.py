"""Many prompts, one run, against one run per prompt: K = 4 prompts at batch 8 each, t5-small shape.

One multi-prompt run (`--num_prompts`-style, each prompt its own SQuAD slice) against the four
single-prompt runs one after another, same steps, same invocation. Each side runs in its own
subprocess, so its peak RSS is its own; wall time counts the whole side (model loads included) and
the training time alone (results.json's train_seconds). Prints a JSON summary and a Markdown table.

    python bench/bench_multi_prompt.py --steps 6 [--prompts 4 --batch 8 --max_source_length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SOFTPROMPT_SHARED", REPO.parent / "shared"))
SQUAD_TRAIN = SHARED / "data" / "squad" / "train-v1.1.json"
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json")


def _squad_slice(dest: Path, skip: int, n: int) -> Path:
    """Questions skip..skip+n of SQuAD train as a SQuAD v1.1 file: each prompt its own data."""
    data = json.loads(SQUAD_TRAIN.read_text(encoding="utf-8"))
    out: dict[str, Any] = {"version": "1.1", "data": []}
    seen = 0
    for article in data["data"]:
        paragraphs = []
        for para in article["paragraphs"]:
            qas = [qa for i, qa in enumerate(para["qas"], start=seen) if skip <= i < skip + n]
            seen += len(para["qas"])
            if qas:
                paragraphs.append({"context": para["context"], "qas": qas})
        if paragraphs:
            out["data"].append({"title": article["title"], "paragraphs": paragraphs})
        if seen >= skip + n:
            break
    dest.write_text(json.dumps(out), encoding="utf-8")
    return dest


def _config(args: argparse.Namespace, out: Path, **kw: Any) -> Any:
    from softprompt.training.config import TrainConfig

    values: dict[str, Any] = dict(
        output_dir=str(out),
        model_name_or_path=args.model_dir,
        prompt_tuning=True,
        global_batch_size=args.batch,
        max_steps=args.steps,
        eval_steps=0,
        save_steps=0,
        dropout=0.0,
        max_source_length=args.max_source_length,
        logging_steps=args.steps,
        report_to=["none"],
        n_tokens=100,
    )
    values.update(kw)
    return TrainConfig(**values)


def side(args: argparse.Namespace) -> dict[str, Any]:
    """Run one side in this process and report its times and peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    files = args.files.split(",")
    work = Path(args.work)
    t0 = time.perf_counter()
    train_seconds = 0.0
    if args.side == "multi":
        from softprompt.training.multi_loop import train_multi

        prompts = [{"name": f"p{i}", "train_file": f, "seed": 42 + i} for i, f in enumerate(files)]
        results = train_multi(_config(args, work / "multi", prompts=prompts))
        train_seconds = results["train_seconds"]
    else:
        from softprompt.training.loop import train

        for i, f in enumerate(files):
            results = train(_config(args, work / f"single{i}", train_file=f, seed=42 + i))
            train_seconds += results["train_seconds"]
    wall = time.perf_counter() - t0
    examples = args.steps * args.batch * len(files)
    return {
        "side": args.side,
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "examples": examples,
        "examples_per_second": examples / train_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _run_side(name: str, args: argparse.Namespace, files: list[Path], work: Path) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--side", name, "--model_dir", args.model_dir, "--work", str(work),
        "--files", ",".join(map(str, files)), "--steps", str(args.steps), "--batch", str(args.batch),
        "--max_source_length", str(args.max_source_length), "--threads", str(args.threads),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the {name} side failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
        "unknown",
    )


def parent(args: argparse.Namespace) -> None:
    """Build the model and data, run both sides, print the ratios."""
    from softprompt.modeling.model import load_t5

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "t5-small"
        src = SHARED / "models" / "t5-small-lm-adapt"
        load_t5(src, random_init=True, seed=0).save_pretrained(model_dir, safe_serialization=True)
        for name in TOKENIZER_FILES:
            shutil.copy(src / name, model_dir / name)
        args.model_dir = str(model_dir)
        n = args.steps * args.batch
        files = [_squad_slice(work / f"train{i}.json", i * n, n) for i in range(args.prompts)]
        single = _run_side("single", args, files, work)
        multi = _run_side("multi", args, files, work)
    summary = {
        "cpu": _lscpu_model(),
        "threads": args.threads,
        "prompts": args.prompts,
        "batch_per_prompt": args.batch,
        "steps": args.steps,
        "single": single,
        "multi": multi,
        "wall_ratio": multi["wall_seconds"] / single["wall_seconds"],
        "train_time_ratio": multi["train_seconds"] / single["train_seconds"],
        "examples_per_second_ratio": multi["examples_per_second"] / single["examples_per_second"],
        "peak_rss_ratio": multi["peak_rss_mib"] / single["peak_rss_mib"],
    }
    print(json.dumps(summary, indent=2))
    print(
        "\n| side | wall s | train s | examples/s | peak RSS MiB |\n|---|---|---|---|---|\n"
        + "".join(
            f"| {s['side']} | {s['wall_seconds']:.1f} | {s['train_seconds']:.1f} | {s['examples_per_second']:.1f} | "
            f"{s['peak_rss_mib']:.0f} |\n"
            for s in (single, multi)
        )
        + f"| multi / single | {summary['wall_ratio']:.2f} | {summary['train_time_ratio']:.2f} | "
        f"{summary['examples_per_second_ratio']:.2f} | {summary['peak_rss_ratio']:.2f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--max_source_length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--side", choices=["single", "multi"], default=None)
    p.add_argument("--model_dir", default="")
    p.add_argument("--work", default="")
    p.add_argument("--files", default="")
    args = p.parse_args()
    if args.side is None:
        parent(args)
    else:
        print(json.dumps(side(args)))


if __name__ == "__main__":
    main()
