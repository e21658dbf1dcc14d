"""Two checkouts of softprompt, A/B, in one alternating run: did a change cost speed?

    python bench/bench_ab.py --before /tmp/softprompt-old --after . --shape small --repeats 3

Refactors promise "no slower"; this measures it. Both trees run the softprompt side of
``bench/bench_train_eval.py`` (prompt tuning as ``softprompt train`` runs it, then greedy answers on the
trained prompt) on ONE random-weight model built once, each run in its own subprocess with that tree's
``src`` first on ``PYTHONPATH`` and that tree's own bench script. Runs alternate (before, after, after,
before, ...) so that drift in the machine's load hits both sides alike, and each side keeps its best run
(the least disturbed one). It prints train examples/s and eval questions/s of each side and after/before
ratios, and writes ``bench/results/ab-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_train_eval as bte  # noqa: E402  (the bench next to this file: shapes and the model builder)

METRICS = ("train_examples_per_second", "eval_questions_per_second", "peak_rss_mib")


def run_side(tree: Path, shape: bte.Shape, model_dir: Path, work: Path) -> dict[str, Any]:
    """The softprompt side of `tree`'s own bench_train_eval.py, with `tree/src` first on the path."""
    out = work / "side.json"
    cmd = [
        sys.executable,
        str(tree / "bench" / "bench_train_eval.py"),
        "--side",
        "softprompt",
        "--model-dir",
        str(model_dir),
        "--work",
        str(work),
        "--batch",
        str(shape.batch),
        "--steps",
        str(shape.steps),
        "--eval-questions",
        str(shape.eval_questions),
        "--eval-batch",
        str(shape.eval_batch),
        "--device",
        "cpu",
        "--warmup-steps",
        "0",
        "--side-output",
        str(out),
    ]
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"the side of {tree} failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    """Alternate the two trees' runs and print each side's best and the after/before ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="the checkout measured as the baseline")
    p.add_argument("--after", type=Path, required=True, help="the checkout measured against it")
    p.add_argument("--shape", choices=sorted(bte.SHAPES), default="small")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, alternating the order")
    args = p.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, tree in trees.items():
        if (
            not (tree / "src" / "softprompt").is_dir()
            or not (tree / "bench" / "bench_train_eval.py").is_file()
        ):
            raise SystemExit(f"--{name} {tree} is not a softprompt checkout (no src/softprompt, bench/)")
    shape = bte.SHAPES[args.shape]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        bte._build_model(shape, model_dir)
        for r in range(args.repeats):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for name in order:
                with tempfile.TemporaryDirectory(dir=tmp) as work:
                    result = run_side(trees[name], shape, model_dir, Path(work))
                runs[name].append({k: result[k] for k in METRICS})
                print(
                    f"round {r + 1} {name}: " + ", ".join(f"{k} {result[k]:.2f}" for k in METRICS), flush=True
                )
    best = {
        name: {
            "train_examples_per_second": max(x["train_examples_per_second"] for x in rs),
            "eval_questions_per_second": max(x["eval_questions_per_second"] for x in rs),
            "peak_rss_mib": min(x["peak_rss_mib"] for x in rs),
        }
        for name, rs in runs.items()
    }
    ratios = {k: best["after"][k] / best["before"][k] for k in METRICS}
    print(
        f"\nshape {args.shape}, batch {shape.batch}, {shape.steps} steps, {args.repeats} runs per side (best kept)"
    )
    for k in METRICS:
        print(
            f"{k:28s} before {best['before'][k]:9.2f}  after {best['after'][k]:9.2f}  after/before {ratios[k]:.3f}"
        )
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    bte.RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "timestamp": stamp,
        "machine": bte._machine(),
        "trees": {k: str(v) for k, v in trees.items()},
        "shape": args.shape,
        "runs": runs,
        "best": best,
        "ratios": ratios,
    }
    (bte.RESULTS / f"ab-{stamp}.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
