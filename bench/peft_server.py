"""The peer of `softprompt serve` in bench/bench_serve.py: prompt-tuned tasks served the way PEFT users do.

    python bench/peft_server.py --model DIR --adapter NAME=DIR [...] [--bf16] [--port 0]

One base `T5ForConditionalGeneration` and one `PeftModel` holding every task's prompt-tuning adapter
(`load_adapter`); each request switches to its task (`set_adapter`) and calls `generate` once, under a
lock because `set_adapter` changes the shared model (FastAPI runs `def` endpoints on a thread pool). This
is what a careful PEFT user builds: one copy of the weights instead of one model per task. The input is
written exactly as softprompt writes it (`textformat.format_input`, no punctuation padding) so both
servers see the same tokens and their answers can be compared.
"""

from __future__ import annotations

import argparse
import threading

import torch
import uvicorn
from fastapi import FastAPI
from peft import PeftModel
from pydantic import BaseModel
from transformers import AutoTokenizer, T5ForConditionalGeneration

from softprompt.serve import bind_socket
from softprompt.textformat import format_input


class AnswerInput(BaseModel):
    task: str
    question: str
    context: str


def build_app(model_dir: str, adapters: list[tuple[str, str]], bf16: bool, max_new_tokens: int) -> FastAPI:
    """The app: one base model, every adapter loaded into one PeftModel."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    (first, first_dir), *rest = adapters
    model = PeftModel.from_pretrained(base, first_dir, adapter_name=first)
    for name, directory in rest:
        model.load_adapter(directory, adapter_name=name)
    model.eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/answer")
    def answer(body: AnswerInput) -> dict[str, str]:
        enc = tokenizer(
            format_input(body.question, body.context), max_length=512, truncation=True, return_tensors="pt"
        )
        with lock, torch.inference_mode():
            model.set_adapter(body.task)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        return {"answer": tokenizer.decode(out[0], skip_special_tokens=True)}

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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapters = [tuple(a.split("=", 1)) for a in args.adapter]
    app = build_app(args.model, adapters, args.bf16, args.max_new_tokens)  # type: ignore[arg-type]
    sock = bind_socket("127.0.0.1", args.port)
    print(f"peft server: listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
