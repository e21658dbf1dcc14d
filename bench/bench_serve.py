"""`softprompt serve` against a PEFT server under load, in one command.

    python bench/bench_serve.py --levels 1 8 32 128 --questions 96 --update-docs

Builds one random-weight T5 from ``../shared/models/<shape>`` (published config, real tokenizer), K = 4
prompts of 100 vectors sampled from the first 5,000 vocabulary rows, saved both as softprompt prompts and
as PEFT prompt-tuning adapters with the same weights. Starts, on 127.0.0.1 only, ``softprompt serve``
with the K prompts and the peer (``bench/peft_server.py``: one base + ``PeftModel``, ``set_adapter`` and
one ``generate`` per request), both with the same precision and threads, then drives each with the same
closed-loop async httpx client at every concurrency level: each of C clients sends its next request as
soon as the last one is answered, over the first ``--questions`` SQuAD dev questions (question i asks
task i mod K). Every request has a timeout, every level a bounded request count.

Per level and server: requests/s, p50/p95/p99 latency, peak RSS of the server process (psutil, sampled,
plus the kernel's VmHWM), errors; and the fraction of answers equal between the two servers. Prints the
compute bound (encoder + ``--max-new-tokens`` decoder steps incl. the LM head at the measured bf16 matmul
rate), writes ``bench/results/serve-<timestamp>.json``, and with ``--update-docs`` the table into
``docs/performance.md`` and its plot (``docs/serve_load.png`` + ``.svg``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_eval import (
    REPO,
    RESULTS,
    SHARED,
    SQUAD_DEV,
    _first_questions,
    _load,
    _machine,
    eval_encoder_flops,
)

DOCS = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- bench:serve:begin -->", "<!-- bench:serve:end -->"
SHAPES = {"small": "t5-small-lm-adapt", "base": "t5-base-lm-adapt"}
N_TASKS, N_TOKENS, SEED = 4, 100, 0


# ------------------------------------------------------------------------------------------ bound


def decoder_flops(cfg: Any, enc_len: int, steps: int) -> float:
    """Matmul FLOPs of `steps` greedy decoder steps with a KV cache, for one question.

    Per step and layer: self-attention projections ``2 (4 d inner)``, cross-attention Q/O ``2 (2 d inner)``,
    gated FFN ``2 (3 d d_ff)``, attention products ``4 t inner`` (self, t = step) + ``4 L inner`` (cross);
    the cross K/V projections once, ``2 L (2 d inner)``; the LM head ``2 d V`` every step.
    """
    d, ff, inner, vocab = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv, cfg.vocab_size
    per_layer = 2 * enc_len * 2 * d * inner
    for t in range(1, steps + 1):
        per_layer += 2 * (4 * d * inner + 2 * d * inner + 3 * d * ff) + 4 * t * inner + 4 * enc_len * inner
    return cfg.num_decoder_layers * per_layer + steps * 2 * d * vocab


def matmul_rate(dtype_name: str, seconds: float = 2.0) -> float:
    """Best sustained GFLOP/s of square CPU products at 512/1024 through `F.linear`, the model's own op.

    Not bench_train_eval's `torch.matmul` at up to 4096: on CPUs without native bf16 (this one) bf16
    `matmul` runs ~10x slower than bf16 `linear` and one 4096 product takes minutes on one thread.
    """
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    best = 0.0
    for n in (512, 1024):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.nn.functional.linear(a, b)
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            torch.nn.functional.linear(a, b)
            k += 1
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0) / 1e9)
    return best


# ------------------------------------------------------------------------------------------ set-up


def build(shape: str, work: Path) -> tuple[Path, list[Path], list[Path], Any]:
    """The model directory, K softprompt prompt dirs and K PEFT adapter dirs with the same weights."""
    import shutil

    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from softprompt.checkpoint import PromptConfig, save_prompt
    from softprompt.model import load_t5

    src = SHARED / "models" / SHAPES[shape]
    model_dir = work / "model"
    model = load_t5(src, random_init=True, seed=SEED)
    model.save_pretrained(model_dir, safe_serialization=True)
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, model_dir / name)
    emb = model.get_input_embeddings().weight.detach()
    gen = torch.Generator().manual_seed(SEED)
    sp_dirs, peft_dirs = [], []
    peft_model = get_peft_model(
        model,
        PromptTuningConfig(
            task_type=TaskType.SEQ_2_SEQ_LM,
            num_virtual_tokens=N_TOKENS,
            base_model_name_or_path=str(model_dir),
        ),
    )
    for k in range(N_TASKS):
        weight = emb[torch.randint(0, 5000, (N_TOKENS,), generator=gen)].clone().float()
        config = PromptConfig(base_model=str(model_dir), n_tokens=N_TOKENS, d_model=model.config.d_model)
        sp_dirs.append(save_prompt(work / f"prompt-{k}", weight, config))
        with torch.no_grad():
            # Seq2seq PEFT holds P rows per transformer submodule; the encoder reads the first P.
            peft_model.prompt_encoder["default"].embedding.weight[:N_TOKENS].copy_(weight)
        peft_model.save_pretrained(work / f"adapter-{k}")
        peft_dirs.append(work / f"adapter-{k}")
    return model_dir, sp_dirs, peft_dirs, model.config


class Server:
    """A server subprocess on 127.0.0.1 whose RSS is sampled while it runs."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        import psutil

        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.ps = psutil.Process(self.proc.pid)
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()
        self.url = self._wait_up()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)
            except Exception:
                return

    def _wait_up(self, seconds: float = 300) -> str:
        import httpx

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log.read_text(errors="replace"))
            if found:
                with __import__("contextlib").suppress(httpx.TransportError):
                    if httpx.get(f"{found.group(1)}/health", timeout=5).status_code == 200:
                        return found.group(1)
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)
        self.stop()
        raise SystemExit(f"server did not come up in {seconds} s; see {self.log}")

    def peak_mib(self) -> float:
        """Peak RSS, MiB: the kernel's high-water mark where readable, else the sampled peak."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return max(int(line.split()[1]) * 1024, self.peak_rss) / 2**20
        except OSError:
            pass
        return self.peak_rss / 2**20

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------ load


async def drive(url: str, rows: list[dict[str, str]], clients: int, timeout: float) -> dict[str, Any]:
    """C closed-loop clients over `rows` (each row sent once); latencies, errors, answers by row index."""
    import httpx

    next_row, latencies, answers, errors = 0, [], [None] * len(rows), 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_row, errors
        while next_row < len(rows):
            i, next_row = next_row, next_row + 1
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/answer", json=rows[i])
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            if ok:
                answers[i] = r.json()["answer"]
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))]

    return {
        "clients": clients,
        "requests": len(rows),
        "seconds": wall,
        "rps": (len(rows) - errors) / wall,
        "p50": pct(50),
        "p95": pct(95),
        "p99": pct(99),
        "errors": errors,
        "answers": answers,
    }


# ------------------------------------------------------------------------------------------ report


def table(levels: list[dict[str, Any]], bound: float) -> str:
    lines = [
        "| clients | server | req/s | p50 s | p95 s | p99 s | peak RSS MiB | errors | answers equal | % of bound |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        for side in ("softprompt", "peft"):
            r = lv[side]
            lines.append(
                f"| {lv['clients']} | {side} | {r['rps']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} "
                f"| {r['peak_rss_mib']:.0f} | {r['errors']} | {lv['equal']:.0%} | {100 * r['rps'] / bound:.0f}% |"
            )
        sp, pf = lv["softprompt"], lv["peft"]
        lines.append(
            f"| {lv['clients']} | **ratio** | **{sp['rps'] / pf['rps']:.1f}x** | | | "
            f"**peft/softprompt {pf['p99'] / sp['p99']:.1f}x** | | | | |"
        )
    return "\n".join(lines)


def plot(levels: list[dict[str, Any]], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [lv["clients"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for side in ("softprompt", "peft"):
        a.plot(xs, [lv[side]["rps"] for lv in levels], marker="o", label=side)
        b.plot(xs, [lv[side]["p99"] for lv in levels], marker="o", label=side)
    for ax, title in ((a, "throughput (requests/s)"), (b, "p99 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in out:
        fig.savefig(p)
    plt.close(fig)
    return out


def update_docs(block_body: str) -> None:
    block = f"{BEGIN}\n{block_body}\n{END}"
    text = DOCS.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        text = before + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Serving under load (bench/bench_serve.py)\n\n" + block + "\n"
    tmp = DOCS.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(DOCS)


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--questions", type=int, default=96, help="SQuAD dev questions sent per level")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=32, help="softprompt serve --max_batch_size")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="softprompt serve --max_wait_ms")
    p.add_argument("--timeout", type=float, default=600, help="seconds a request may take")
    p.add_argument("--note", default="", help="a line printed under the table in the docs")
    p.add_argument("--update-docs", action="store_true", help="write the table into docs/performance.md")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rate = matmul_rate(args.precision)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    dev = _first_questions(SQUAD_DEV, args.questions)
    tasks = [f"task{k}" for k in range(N_TASKS)]
    rows = [
        {"task": tasks[i % N_TASKS], "question": r["question"], "context": r["context"]}
        for i, r in enumerate(dev)
    ]
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        model_dir, sp_dirs, peft_dirs, cfg = build(args.shape, work)
        from transformers import AutoTokenizer

        from softprompt.textformat import format_input

        tok = AutoTokenizer.from_pretrained(model_dir)
        src_lens = [len(tok(format_input(r["question"], r["context"])).input_ids) for r in rows]
        per_q = sum(
            eval_encoder_flops(cfg, N_TOKENS + n) + decoder_flops(cfg, N_TOKENS + n, args.max_new_tokens)
            for n in src_lens
        ) / len(rows)
        bound = rate * 1e9 / per_q
        print(
            f"compute bound: {bound:.1f} questions/s (encoder + {args.max_new_tokens} decoder steps incl. the "
            f"LM head, {per_q / 1e9:.2f} GFLOP/question, at {rate:.0f} GFLOP/s {args.precision} matmul)",
            flush=True,
        )
        sp_cmd = [sys.executable, "-m", "softprompt", "serve", "--model", str(model_dir)]
        for t, d in zip(tasks, sp_dirs, strict=True):
            sp_cmd += ["--prompt", f"{t}={d}"]
        sp_cmd += [
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--precision",
            args.precision,
            "--log_level",
            "warning",
        ]
        sp_cmd += ["--max_new_tokens", str(args.max_new_tokens), "--max_batch_size", str(args.max_batch_size)]
        sp_cmd += [
            "--max_wait_ms",
            str(args.max_wait_ms),
            "--max_queue",
            str(max(1024, 2 * max(args.levels))),
        ]
        peft_cmd = [sys.executable, str(REPO / "bench" / "peft_server.py"), "--model", str(model_dir)]
        for t, d in zip(tasks, peft_dirs, strict=True):
            peft_cmd += ["--adapter", f"{t}={d}"]
        peft_cmd += ["--threads", str(args.threads), "--max_new_tokens", str(args.max_new_tokens)]
        peft_cmd += ["--bf16"] if args.precision == "bf16" else []

        results: dict[str, list[dict[str, Any]]] = {}
        for side, cmd in (("softprompt", sp_cmd), ("peft", peft_cmd)):
            server = Server(cmd, env, work / f"{side}.log")
            try:
                asyncio.run(drive(server.url, rows[: min(4, len(rows))], 1, args.timeout))  # warm-up
                results[side] = []
                for c in args.levels:
                    r = asyncio.run(drive(server.url, rows, c, args.timeout))
                    r["peak_rss_mib"] = server.peak_mib()
                    print(
                        f"{side:>10} clients={c:<4} {r['rps']:.2f} req/s p50 {r['p50']:.2f} s "
                        f"p99 {r['p99']:.2f} s errors {r['errors']} peak RSS {r['peak_rss_mib']:.0f} MiB",
                        flush=True,
                    )
                    results[side].append(r)
            finally:
                server.stop()
    levels = []
    for sp, pf in zip(results["softprompt"], results["peft"], strict=True):
        equal = sum(a is not None and a == b for a, b in zip(sp["answers"], pf["answers"], strict=True))
        levels.append({"clients": sp["clients"], "softprompt": sp, "peft": pf, "equal": equal / len(rows)})
    text = table(levels, bound)
    print(text)

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {
        "timestamp": stamp,
        "command": "python bench/bench_serve.py " + " ".join(a for a in sys.argv[1:] if a != args.note),
        "machine": _machine(),
        "shape": SHAPES[args.shape],
        "precision": args.precision,
        "threads": args.threads,
        "bound_qps": bound,
        "matmul_gflops": rate,
        "load_before": load_before,
        "load_after": _load(),
        "levels": levels,
    }
    (RESULTS / f"serve-{stamp}.json").write_text(json.dumps(summary, indent=1))
    figs = plot(levels, REPO / "docs" / "serve_load") if args.update_docs else []
    print("wrote", ", ".join(str(f.relative_to(REPO)) for f in figs))
    if args.update_docs:
        m = summary["machine"]
        body = (
            f"Last run: {stamp} on {m['cpu']} ({m['cores']} cores), {args.threads} torch thread(s) per server, "
            f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; {SHAPES[args.shape]} shape, "
            f"random weights, {args.precision}, K = {N_TASKS} prompts of {N_TOKENS} tokens, {len(rows)} SQuAD "
            f"dev questions per level, answers up to {args.max_new_tokens} tokens.\n\n"
            f"Command: `{summary['command']}`\n\n"
            f"Compute bound: {bound:.1f} questions/s ({per_q / 1e9:.2f} GFLOP/question at {rate:.0f} GFLOP/s "
            f"{args.precision} matmul).\n\n{text}\n\n"
            f"![throughput and p99 latency against concurrency](serve_load.svg)\n\n"
            f"Load average before/after the run: {load_before:.1f} / {summary['load_after']:.1f}."
            + (f"\n\n{args.note}" if args.note else "")
        )
        update_docs(body)


if __name__ == "__main__":
    main()
