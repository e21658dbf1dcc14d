"""Continuous against static batching in process: where the model thread's time goes (issue 24).

    python bench/profile_continuous.py --clients 8 32 --questions 192 --min-join 1 4

The model work of ``bench_serve.py --answers squad`` without HTTP, tokenising or a second process, so
that the scheduler and the decoder's cache handling can be compared on a shared machine in one run:
the same random-weight t5-small-shaped model, K = 4 prompts of 100 tokens, the first ``--questions``
SQuAD dev questions, each answer forced to end after its first gold answer's token count
(bench/answer_lengths.py installs the same steering the servers run under). C closed-loop clients are
simulated: a client's next question is queued as soon as its last one is answered.

* static: ``PromptBank.answer_prepared`` on the oldest ``--max-batch-size`` waiting questions, as
  ``softprompt serve --batching static`` runs a batch (it decodes until the batch's longest answer ends).
* continuous, per ``--min-join`` J: ``ContinuousDecoder.advance`` per decoder step; waiting questions join
  when at least J wait, or the running batch is empty, or they fill its free slots (J = 1 is what
  ``ContinuousBatcher`` does; larger J are the alternatives measured in docs/performance.md). This drives
  the decoder directly, so it measures the model's work, not the batcher's scheduling.

Times are CPU seconds of this process (one torch thread), not wall time: on a machine shared with other
jobs the wall time of the same work moved by 40% between runs, its CPU time far less. Prints questions per
CPU second per mode, the encoder's and the decoder steps' share of the continuous model time,
the mean rows per admission and per step, and the time of one join and one leave at a full batch.
Run it under another ``PYTHONPATH`` (e.g. an older checkout's ``src``) to compare decoders.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import build, squad_lengths
from bench_train_eval import SQUAD_DEV, _first_questions, _load


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    p.add_argument("--questions", type=int, default=192)
    p.add_argument("--min-join", type=int, nargs="+", default=[1, 4])
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--rounds", type=int, default=1, help="runs per mode, alternated; best kept")
    return p.parse_args()


class Timer:
    """Seconds spent in wrapped callables, by name."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

    def wrap(self, owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.process_time()
            try:
                return inner(*a, **k)
            finally:
                self.seconds[label] += time.process_time() - t0
                self.calls[label] += 1

        setattr(owner, name, timed)


def run_static(bank: Any, prepared: list[Any], clients: int, args: argparse.Namespace) -> float:
    """Seconds for every question, C clients, batches of the oldest waiting questions."""
    waiting = collections.deque(range(min(clients, len(prepared))))
    sent, answered = len(waiting), 0
    t0 = time.process_time()
    while answered < len(prepared):
        batch = [waiting.popleft() for _ in range(min(args.max_batch_size, len(waiting)))]
        bank.answer_prepared([prepared[i] for i in batch], max_new_tokens=args.max_new_tokens, bf16=args.bf16)
        answered += len(batch)
        for _ in batch:
            if sent < len(prepared):
                waiting.append(sent)
                sent += 1
    return time.process_time() - t0


def run_continuous(
    decoder: Any, prepared: list[Any], clients: int, min_join: int, args: argparse.Namespace
) -> tuple[float, list[int], list[int]]:
    """Seconds for every question, C clients; the rows of each admission and the rows of each step."""
    waiting = collections.deque(range(min(clients, len(prepared))))
    sent, answered = len(waiting), 0
    joins, steps = [], []
    t0 = time.process_time()
    while answered < len(prepared):
        free = args.max_batch_size - decoder.rows
        joining = []
        if waiting and (len(waiting) >= min(min_join, free) or decoder.rows == 0):
            joining = [(i, prepared[i]) for i in (waiting.popleft() for _ in range(min(free, len(waiting))))]
            joins.append(len(joining))
        steps.append(decoder.rows + len(joining))
        for _ in decoder.advance(joining):
            answered += 1
            if sent < len(prepared):
                waiting.append(sent)
                sent += 1
    return time.process_time() - t0, joins, steps


def join_leave_cost(decoder: Any, prepared: list[Any], rows: int) -> tuple[float, float]:
    """Seconds of one admission of one row into rows - 1, and of dropping one row of `rows` (no step)."""
    decoder.clear()
    decoder.advance(list(enumerate(prepared[: rows - 1])))
    stream = decoder._stream  # a profile looks inside
    t0 = time.process_time()
    stream.drop([0])
    leave = time.process_time() - t0
    t0 = time.process_time()
    decoder._admit([(10_000, prepared[rows])])
    join = time.process_time() - t0
    decoder.clear()
    return join, leave


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(1)
    args.bf16 = args.precision == "bf16"
    from softprompt.inference.bank import load_model_and_prompts
    from softprompt.inference.continuous import ContinuousDecoder
    from softprompt.modeling import lean_greedy, lean_stream

    dev = _first_questions(SQUAD_DEV, args.questions)
    tasks = [f"task{k}" for k in range(4)]
    rows = [
        {"task": tasks[i % 4], "question": r["question"], "context": r["context"]} for i, r in enumerate(dev)
    ]
    with tempfile.TemporaryDirectory(prefix="profile-continuous-") as tmp:
        work = Path(tmp)
        model_dir, sp_dirs, _, _ = build("small", work)
        from transformers import AutoTokenizer

        want = squad_lengths(dev, AutoTokenizer.from_pretrained(model_dir), args.max_new_tokens)
        target = work / "lengths.json"
        target.write_text(
            json.dumps(
                [
                    {"question": r["question"], "context": r["context"], "tokens": n}
                    for r, n in zip(dev, want, strict=True)
                ]
            )
        )
        from answer_lengths import install

        install(target, work / "log")
        bank = load_model_and_prompts(str(model_dir), [str(d) for d in sp_dirs], names=tasks, bf16=args.bf16)
        prepared = bank.prepare([(r["task"], r) for r in rows])
        kw = (
            {"slots": args.max_batch_size}
            if "slots" in inspect.signature(ContinuousDecoder).parameters
            else {}
        )
        decoder = ContinuousDecoder(bank, max_new_tokens=args.max_new_tokens, bf16=args.bf16, **kw)
        timer = Timer()
        timer.wrap(lean_stream, "encoder_output", "encoder")
        timer.wrap(lean_greedy, "encoder_output", "encoder (static)")
        timer.wrap(lean_stream, "step_logits", "decoder step")
        timer.wrap(lean_greedy, "step_logits", "decoder step (static)")
        print(
            f"load average before: {_load():.2f}; answer lengths mean {statistics.fmean(want):.1f}",
            flush=True,
        )
        run_static(bank, prepared[:8], 8, args)  # warm-up
        best: dict[tuple[int, str], float] = {}
        for _ in range(args.rounds):
            for c in args.clients:
                timer.seconds.clear()
                timer.calls.clear()
                secs = run_static(bank, prepared, c, args)
                if secs < best.get((c, "static"), 1e9):
                    best[(c, "static")] = secs
                    enc, dec = timer.seconds["encoder (static)"], timer.seconds["decoder step (static)"]
                    print(
                        f"  {c} clients static: {secs:.2f} s; encoder {enc:.2f} s, decoder steps {dec:.2f} s "
                        f"({timer.calls['decoder step (static)']}), rest {secs - enc - dec:.2f} s",
                        flush=True,
                    )
                for j in args.min_join:
                    timer.seconds.clear()
                    timer.calls.clear()
                    secs, joins, steps = run_continuous(decoder, prepared, c, j, args)
                    key = (c, f"continuous J={j}")
                    if secs < best.get(key, 1e9):
                        best[key] = secs
                        print(
                            f"  {c} clients J={j}: {secs:.2f} s; encoder {timer.seconds['encoder']:.2f} s, "
                            f"decoder steps {timer.seconds['decoder step']:.2f} s ({timer.calls['decoder step']}), "
                            f"rest {secs - timer.seconds['encoder'] - timer.seconds['decoder step']:.2f} s; "
                            f"{len(joins)} admissions of {statistics.fmean(joins):.1f} rows, "
                            f"{statistics.fmean(steps):.1f} rows per step",
                            flush=True,
                        )
        for (c, mode), secs in sorted(best.items()):
            ratio = best[(c, "static")] / secs
            print(f"{c:>3} clients {mode:<16} {len(prepared) / secs:6.2f} q/CPU s  ({ratio:.2f}x static)")
        join, leave = join_leave_cost(decoder, prepared, args.max_batch_size)
        print(
            f"one join into {args.max_batch_size - 1} rows: {join * 1e3:.1f} ms; one leave: {leave * 1e3:.1f} ms"
        )
        print(f"load average after: {_load():.2f}")


if __name__ == "__main__":
    main()
