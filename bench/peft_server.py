"""The peer of `softprompt serve` in bench/bench_serve.py: prompt-tuned tasks served the way PEFT users do.

    python bench/peft_server.py --model DIR --adapter NAME=DIR [...] [--bf16] [--mode shared|per-task]

Two ways PEFT users serve K prompt-tuned tasks, one `generate` call per request either way:

* `--mode shared` (default): one base `T5ForConditionalGeneration` and one `PeftModel` holding every
  task's adapter (`load_adapter`); each request switches to its task (`set_adapter`) and generates under
  one lock, because `set_adapter` changes the shared model (FastAPI runs `def` endpoints on a thread
  pool). One copy of the weights: what a careful PEFT user builds.
* `--mode per-task`: K `PeftModel`s, each wrapping its own copy of the base model (`from_pretrained` once
  per task), each behind its own lock, so requests for different tasks may run at once on different
  threads. What the straightforward "one model per task" deployment does; it holds K copies of the weights.

The input is written exactly as softprompt writes it (`textformat.format_input`, no punctuation padding)
so both servers see the same tokens and their answers can be compared. With ``--lengths F --log L``
(bench_serve's realistic-length mode) each bench question's answer is forced to its target length by
`answer_lengths.EosAfter`, as softprompt serve's are (see bench/answer_lengths.py).
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from peft import PeftModel
from pydantic import BaseModel
from transformers import AutoTokenizer, LogitsProcessorList, T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from answer_lengths import EosAfter, Log, answer_tokens, read_lengths
from softprompt.serving.server import bind_socket
from softprompt.tasks.squad.text import format_input


class AnswerInput(BaseModel):
    task: str
    question: str
    context: str


def build_app(
    model_dir: str,
    adapters: list[tuple[str, str]],
    bf16: bool,
    max_new_tokens: int,
    mode: str = "shared",
    lengths: Path | None = None,
    log: Path | None = None,
) -> FastAPI:
    """The app: one base model with every adapter (`shared`), or one base copy per adapter (`per-task`).

    With `lengths` (and `log`), bench questions end at their target lengths and each answer's token count
    is logged (bench/answer_lengths.py).
    """
    targets, index_of = read_lengths(lengths) if lengths is not None else ({}, {})
    out = Log(log) if log is not None else None
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # task -> (model, lock, adapter to switch to, or None when the model holds only that task's adapter)
    served: dict[str, tuple[PeftModel, threading.Lock, str | None]] = {}
    if mode == "shared":
        base = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
        (first, first_dir), *rest = adapters
        model = PeftModel.from_pretrained(base, first_dir, adapter_name=first)
        for name, directory in rest:
            model.load_adapter(directory, adapter_name=name)
        model.eval()
        lock = threading.Lock()
        served = {name: (model, lock, name) for name, _ in adapters}
    elif mode == "per-task":
        for name, directory in adapters:
            base = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
            served[name] = (PeftModel.from_pretrained(base, directory).eval(), threading.Lock(), None)
    else:
        raise SystemExit(f"--mode must be shared or per-task, got {mode!r}")
    app = FastAPI()

    @app.post("/v1/answer")
    def answer(body: AnswerInput) -> dict[str, str]:
        model, lock, adapter = served[body.task]
        enc = tokenizer(
            format_input(body.question, body.context), max_length=512, truncation=True, return_tensors="pt"
        )
        key = (body.question, body.context)
        eos = tokenizer.eos_token_id
        steer = LogitsProcessorList([EosAfter(targets[key], eos)] if key in targets else [])
        with lock, torch.inference_mode():
            if adapter is not None:
                model.set_adapter(adapter)
            ids = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, logits_processor=steer
            )
        if out is not None and key in index_of:
            out.write(index_of[key], answer_tokens(ids[0].tolist(), eos))
        return {"answer": tokenizer.decode(ids[0], skip_special_tokens=True)}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", action="append", required=True, help="NAME=DIR, repeated")
    parser.add_argument("--bf16", action="store_true", help="load the weights in bf16")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--mode", choices=["shared", "per-task"], default="shared", help="see the module docstring"
    )
    parser.add_argument("--lengths", type=Path, help="bench answer lengths (bench/answer_lengths.py)")
    parser.add_argument("--log", type=Path, help="index<TAB>tokens per answered bench question")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapters = [tuple(a.split("=", 1)) for a in args.adapter]
    app = build_app(
        args.model,
        adapters,  # type: ignore[arg-type]
        args.bf16,
        args.max_new_tokens,
        args.mode,
        args.lengths,
        args.log,
    )
    sock = bind_socket("127.0.0.1", args.port)
    print(
        f"peft server ({args.mode}, {len(adapters)} tasks): listening on http://127.0.0.1:{sock.getsockname()[1]}",
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
