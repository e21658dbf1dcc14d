"""`softprompt serve` against PEFT servers under load, in one command.

    python bench/bench_serve.py --levels 1 8 32 128 --questions 96 --update-docs
    python bench/bench_serve.py --answers squad --levels 1 8 32 128 --questions 192 --rounds 2 --memory-tasks 0 --update-docs

Three servers, each in its own process: ``softprompt serve --batching continuous``, the same with
``--batching static``, and the PEFT peer. ``--answers fixed`` (the default): every answer runs
``--max-new-tokens`` tokens, as a random-weight T5 never emits EOS. ``--answers squad``: question i's
answer ends after n_i tokens, n_i the token count of its first SQuAD dev gold answer (real tokenizer), EOS
forced alike in all three servers (bench/answer_lengths.py; each server logs the lengths it generated and
the report counts those that differ from n_i). Levels run all servers in turn, ``--rounds`` times with the
order rotated (best kept), each run after waiting for ``--quiet``; every level is bounded by
``--level-timeout``.

Builds one random-weight T5 from ``../shared/models/<shape>`` (published config, real tokenizer; the pad
row of its embedding zeroed so that answers depend on the question, see `build`), prompts of 100 vectors
sampled from the first 5,000 vocabulary rows, saved both as softprompt prompts and as PEFT prompt-tuning
adapters with the same weights. Starts, on 127.0.0.1 only, ``softprompt serve`` with K = ``--tasks``
prompts (continuous and static batching) and the peer (``bench/peft_server.py --mode shared``: one base
+ ``PeftModel``, ``set_adapter`` and one ``generate`` per request), all with the same precision and threads, then drives each with the same
closed-loop async httpx client at every concurrency level: each of C clients sends its next request as
soon as the last one is answered, over the first ``--questions`` SQuAD dev questions (question i asks
task i mod K). Every request has a timeout, every level a fixed request count, so even 128 clients end.

At 1 client each request alternates with one direct in-process ``PromptedT5.generate`` call for the same
question (same model, prompt, precision and threads; batch of one, tokenised beforehand): what serving
adds to a lone user's latency. Then, unless ``--memory-tasks 0``, softprompt with 16 prompts and the
one-model-per-task peer (``--mode per-task``: 16 PeftModels, each with its own copy of the base) answer
the same questions at ``--memory-clients``, for peak RSS.

Per level and server: requests/s, p50/p95/p99 latency, peak RSS of the server process (psutil, sampled,
plus the kernel's VmHWM), errors; and the fraction of answers equal between the servers. Prints the
compute bound (encoder + each answer's decoder steps incl. the LM head at the measured matmul rate of
the chosen precision), the ratios and issue 17's targets (fixed) or issue 24's (squad) as met / missed,
writes ``bench/results/serve-<timestamp>.json``, and with ``--update-docs`` the report into its block of
``docs/performance.md`` and its plot (``docs/serve_load[_squad].png`` + ``.svg``). ``--precision auto`` (the
default) is bf16 only where the CPU computes bf16 natively.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_eval import (
    REPO,
    RESULTS,
    SHARED,
    SQUAD_DEV,
    _busy_fraction,
    _first_questions,
    _load,
    _machine,
    _wait_for_quiet,
    eval_encoder_flops,
)

DOCS = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- bench:serve:begin -->", "<!-- bench:serve:end -->"
SQUAD_BEGIN, SQUAD_END = "<!-- bench:serve-squad:begin -->", "<!-- bench:serve-squad:end -->"
# The servers of one run: softprompt with continuous batching, softprompt with static batching, PEFT.
SIDES = ("continuous", "static", "peft")
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


def build(shape: str, work: Path, n_tasks: int = N_TASKS) -> tuple[Path, list[Path], list[Path], Any]:
    """The model directory, K softprompt prompt dirs and K PEFT adapter dirs with the same weights.

    A random T5's residual stream is dominated by the embedding of the token it just read, so greedy
    decoding repeats the decoder start token (pad, row 0) and every answer decodes to "": an equality
    check between servers would prove nothing. Row 0 of the (tied) embedding is zeroed, so the first
    token comes from the encoder (it differs by question and prompt) and is then repeated to 32 tokens:
    answers are question-specific and every row still decodes the full `--max-new-tokens`.
    """
    import shutil

    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from softprompt.io.checkpoint import PromptConfig, save_prompt
    from softprompt.modeling.model import load_t5

    src = SHARED / "models" / SHAPES[shape]
    model_dir = work / "model"
    model = load_t5(src, random_init=True, seed=SEED)
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.decoder_start_token_id].zero_()
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
    for k in range(n_tasks):
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

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (all its threads, user + system)."""
        t = self.ps.cpu_times()
        return float(t.user + t.system)

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


async def drive(
    url: str,
    rows: list[dict[str, str]],
    clients: int,
    timeout: float,
    between: Callable[[int], float] | None = None,
) -> dict[str, Any]:
    """C closed-loop clients over `rows` (each row sent once); latencies, errors, answers by row index.

    `between(i)`, with one client only, runs after row i is answered and returns seconds it measured
    (the direct in-process call for the same row): alternating both halves of an A/B comparison keeps
    it fair on a machine whose load drifts.
    """
    import httpx

    next_row, latencies, answers, errors, direct = 0, [], [None] * len(rows), 0, []
    refused = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_row, errors, refused
        while next_row < len(rows):
            i, next_row = next_row, next_row + 1
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/answer", json=rows[i])
                ok = r.status_code == 200
                refused += r.status_code in (429, 503)
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            if ok:
                answers[i] = r.json()["answer"]
            else:
                errors += 1
            if between is not None:
                direct.append(between(i))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0 - sum(direct)
    out = {
        "clients": clients,
        "requests": len(rows),
        "seconds": wall,
        "rps": (len(rows) - errors) / wall,
        **percentiles(latencies),
        "mean": statistics.fmean(latencies),
        "errors": errors,
        "refused": refused,
        "answers": answers,
    }
    if direct:
        out["direct"] = {**percentiles(direct), "mean": statistics.fmean(direct)}
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 of `values` (nearest rank)."""
    lat = sorted(values)
    return {f"p{p}": lat[min(len(lat) - 1, int(p / 100 * len(lat)))] for p in (50, 95, 99)}


def direct_caller(
    model_dir: Path,
    sp_dirs: list[Path],
    tasks: list[str],
    rows: list[dict[str, str]],
    args: argparse.Namespace,
) -> Callable[[int], float]:
    """Row i -> seconds of one direct in-process `PromptedT5.generate` call for it, batch of one.

    The floor a lone user of `softprompt serve` is compared against: the same model, prompt, precision
    and threads, loaded as `serve` loads it, the input tokenised beforehand and the ids not decoded, so
    only the model call is timed (tokenising, HTTP, JSON and batching are what serve adds to it).
    """
    import torch

    from softprompt.data.batching import Collator
    from softprompt.inference.bank import load_model_and_prompts
    from softprompt.inference.engine import autocast

    bf16 = args.precision == "bf16"
    bank = load_model_and_prompts(str(model_dir), [str(d) for d in sp_dirs], names=tasks, bf16=bf16)
    collate = Collator(pad_token_id=bank.tokenizer.pad_token_id)
    # `prepare`, as serve tokenises (and so that answer_lengths, when installed, knows the rows).
    prepared = bank.prepare([(r["task"], r) for r in rows])

    def call(i: int) -> float:
        batch = collate([prepared[i].features])
        prompt, lengths = bank.stack(torch.tensor([prepared[i].task]))
        t0 = time.perf_counter()
        with autocast(bank.device, bf16):
            bank.model.generate(
                batch["input_ids"], batch["attention_mask"], args.max_new_tokens, prompt, lengths
            )
        return time.perf_counter() - t0

    call(0)  # warm-up, as the servers get theirs
    return call


# ------------------------------------------------------------------------------------------ report


def table(levels: list[dict[str, Any]], bound: float, sides: tuple[str, ...]) -> str:
    """Markdown: one line per level and server, then the ratios of the first server to each other one."""
    lines = [
        "| clients | server | req/s | p50 s | p95 s | p99 s | CPU ms/req | peak RSS MiB | errors | answers equal "
        "| % of bound |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        for side in sides:
            r = lv[side]
            lines.append(
                f"| {lv['clients']} | {side} | {r['rps']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} "
                f"| {r.get('cpu_ms', float('nan')):.1f} | {r['peak_rss_mib']:.0f} | {r['errors']} | {lv['equal']:.0%} | {100 * r['rps'] / bound:.0f}% |"
            )
        sp = lv[sides[0]]
        for other in sides[1:]:
            pf = lv[other]
            lines.append(
                f"| {lv['clients']} | **{sides[0]} / {other}** | **{sp['rps'] / pf['rps']:.1f}x** | "
                f"{pf['p50'] / sp['p50']:.1f}x lower | | **{pf['p99'] / sp['p99']:.1f}x lower** | "
                f"{pf.get('cpu_ms', float('nan')) / sp.get('cpu_ms', float('nan')):.2f}x less | "
                f"{sp['peak_rss_mib'] / pf['peak_rss_mib']:.2f}x | | | |"
            )
    return "\n".join(lines)


def _line(out: list[str], name: str, value: float, goal: float, fmt: str, higher: bool) -> None:
    met = value >= goal if higher else value <= goal
    out.append(
        f"- {name}: {fmt.format(value)} (target {'≥' if higher else '≤'} {fmt.format(goal)}): "
        f"**{'met' if met else 'missed'}**"
    )


def targets(levels: list[dict[str, Any]], memory: dict[str, Any] | None, bound: float) -> list[str]:
    """Issue 17's targets (32-token answers), each with the measured value and met / missed."""
    out: list[str] = []
    by_c = {lv["clients"]: lv for lv in levels}
    if 1 in by_c and "direct" in by_c[1]["continuous"]:
        sp = by_c[1]["continuous"]
        _line(
            out,
            "1 client: serve p50 / direct `generate` p50",
            sp["p50"] / sp["direct"]["p50"],
            1.10,
            "{:.3f}",
            False,
        )
    if 32 in by_c:
        sp, pf = by_c[32]["continuous"], by_c[32]["peft"]
        _line(out, "32 clients: throughput softprompt / peft", sp["rps"] / pf["rps"], 25, "{:.1f}x", True)
        _line(out, "32 clients: share of the compute bound", sp["rps"] / bound, 0.5, "{:.0%}", True)
        _line(out, "32 clients: p99 softprompt / peft", sp["p99"] / pf["p99"], 0.1, "{:.2f}", False)
        _line(
            out,
            "32 clients: peak RSS softprompt / peft, 4 tasks",
            sp["peak_rss_mib"] / pf["peak_rss_mib"],
            1.0,
            "{:.2f}",
            False,
        )
    if memory is not None:
        _line(
            out,
            f"{memory['tasks']} tasks: peak RSS softprompt / one-model-per-task peft",
            memory["ratio"],
            0.5,
            "{:.2f}",
            False,
        )
    return out


def squad_targets(levels: list[dict[str, Any]]) -> list[str]:
    """Issue 24's targets on the realistic-length workload, each measured value met / missed."""
    out: list[str] = []
    by_c = {lv["clients"]: lv for lv in levels}
    if 32 in by_c:
        lv = by_c[32]
        ratio = lv["continuous"]["rps"] / lv["static"]["rps"]
        _line(out, "32 clients: throughput continuous / static batching", ratio, 1.5, "{:.2f}x", True)
        _line(
            out,
            "32 clients: throughput continuous / peft",
            lv["continuous"]["rps"] / lv["peft"]["rps"],
            5,
            "{:.1f}x",
            True,
        )
        for lv in levels:  # the same ratio in server CPU per request, which other jobs' load moves less
            cpu = {side: lv[side].get("cpu_ms", float("nan")) for side in ("continuous", "static")}
            out.append(
                f"- {lv['clients']} clients, server CPU per request: continuous {cpu['continuous']:.1f} ms, "
                f"static {cpu['static']:.1f} ms (static / continuous {cpu['static'] / cpu['continuous']:.2f}x)"
            )
    return out


def failures(levels: list[dict[str, Any]], sides: tuple[str, ...]) -> str:
    """The line on requests lost or failed and answers equal between the servers."""
    errors = sum(lv[s]["errors"] for lv in levels for s in sides)
    return (
        f"- requests lost or failed at any level: {errors}; answers equal between all servers: "
        f"{min(lv['equal'] for lv in levels):.0%} at worst"
    )


def plot(levels: list[dict[str, Any]], stem: Path, sides: tuple[str, ...]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [lv["clients"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for side in sides:
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


def update_docs(block_body: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block between `begin` and `end` in docs/performance.md (append it if missing), atomically."""
    block = f"{begin}\n{block_body}\n{end}"
    text = DOCS.read_text(encoding="utf-8")
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Serving under load (bench/bench_serve.py)\n\n" + block + "\n"
    tmp = DOCS.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(DOCS)


# ------------------------------------------------------------------------------------------ main


def without_note(argv: list[str]) -> list[str]:
    """The command line as run, less `--note TEXT` (the note is printed under the table anyway)."""
    out, skip = [], False
    for a in argv:
        if skip or a.startswith("--note="):
            skip = False
            continue
        skip = a == "--note"
        if not skip:
            out.append(a)
    return out


def native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); without it bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def softprompt_cmd(
    model_dir: Path,
    tasks: list[str],
    dirs: list[Path],
    args: argparse.Namespace,
    batching: str = "continuous",
    lengths: tuple[Path, Path] | None = None,
) -> list[str]:
    """`softprompt serve`'s command; with `lengths` (targets file, log) through bench/answer_lengths.py."""
    cmd = [sys.executable, "-m", "softprompt"]
    if lengths is not None:
        cmd = [sys.executable, str(REPO / "bench" / "answer_lengths.py"), "--lengths", str(lengths[0])]
        cmd += ["--log", str(lengths[1])]
    cmd += ["serve", "--model", str(model_dir)]
    for t, d in zip(tasks, dirs, strict=True):
        cmd += ["--prompt", f"{t}={d}"]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--precision", args.precision, "--log_level", "warning"]
    cmd += ["--max_new_tokens", str(args.max_new_tokens), "--max_batch_size", str(args.max_batch_size)]
    cmd += ["--batching", batching]
    return [*cmd, "--max_wait_ms", str(args.max_wait_ms), "--max_queue", str(max(1024, 2 * max(args.levels)))]


def peft_cmd(
    model_dir: Path,
    tasks: list[str],
    dirs: list[Path],
    args: argparse.Namespace,
    mode: str,
    lengths: tuple[Path, Path] | None = None,
) -> list[str]:
    cmd = [sys.executable, str(REPO / "bench" / "peft_server.py"), "--model", str(model_dir), "--mode", mode]
    for t, d in zip(tasks, dirs, strict=True):
        cmd += ["--adapter", f"{t}={d}"]
    cmd += ["--threads", str(args.threads), "--max_new_tokens", str(args.max_new_tokens)]
    if lengths is not None:
        cmd += ["--lengths", str(lengths[0]), "--log", str(lengths[1])]
    return cmd + (["--bf16"] if args.precision == "bf16" else [])


def drive_level(
    url: str,
    rows: list[dict[str, str]],
    clients: int,
    args: argparse.Namespace,
    between: Callable[[int], float] | None = None,
) -> dict[str, Any]:
    """One level against one server, bounded: every request has `--timeout`, the level `--level-timeout`."""
    try:
        return asyncio.run(
            asyncio.wait_for(drive(url, rows, clients, args.timeout, between), args.level_timeout)
        )
    except TimeoutError:
        nan = float("nan")
        lost = {"requests": len(rows), "seconds": args.level_timeout, "rps": 0.0, "mean": nan, "refused": 0}
        return {
            "clients": clients,
            **lost,
            "p50": nan,
            "p95": nan,
            "p99": nan,
            "errors": len(rows),
            "answers": [None] * len(rows),
        }


def run_servers(
    servers: dict[str, tuple[list[str], Path]],
    env: dict[str, str],
    rows: list[dict[str, str]],
    args: argparse.Namespace,
    direct: tuple[str, Callable[[int], float]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Start every server (its own process), warm each up, then drive them level by level, alternating.

    At each level every server runs `--rounds` times, the order rotated each round (a change in the
    machine's load then favours no server), after waiting for `--quiet` if asked; the round with the
    most requests/s is kept for each. `direct` = (side, call): at 1 client that side's requests alternate
    with a direct in-process call for the same question. Every server stops at the end, whatever happens.
    """
    started: dict[str, Server] = {}
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in servers}
    try:
        for side, (cmd, log) in servers.items():
            started[side] = Server(cmd, env, log)
            drive_level(started[side].url, rows[: min(4, len(rows))], 1, args)  # warm-up
        names = list(servers)
        for c in args.levels:
            best: dict[str, dict[str, Any]] = {}
            for k in range(args.rounds):
                for side in names[k % len(names) :] + names[: k % len(names)]:
                    waited, busy = (
                        _wait_for_quiet(args.quiet, args.max_wait) if args.quiet < 1 else (0.0, -1.0)
                    )
                    between = direct[1] if direct is not None and direct[0] == side and c == 1 else None
                    cpu = started[side].cpu_seconds()
                    r = drive_level(started[side].url, rows, c, args, between)
                    # The server's own CPU time per answered request: on a machine shared with other jobs
                    # its wall-clock req/s moves with their load, its CPU cost per request far less.
                    answered = max(1, r["requests"] - r["errors"])
                    r["cpu_ms"] = 1e3 * (started[side].cpu_seconds() - cpu) / answered
                    r["waited_s"], r["busy_before"], r["round"] = waited, busy, k
                    print(
                        f"{side:>12} clients={c:<4} round {k} {r['rps']:.2f} req/s p50 {r['p50']:.3f} s "
                        f"p99 {r['p99']:.2f} s CPU {r['cpu_ms']:.1f} ms/req errors {r['errors']}"
                        + (
                            f" (others busy {busy:.0%} after {waited:.0f} s of waiting)"
                            if busy is not None
                            else ""
                        ),
                        flush=True,
                    )
                    if side not in best or r["rps"] > best[side]["rps"]:
                        best[side] = {**r, "cpu_ms": min(r["cpu_ms"], best.get(side, r)["cpu_ms"])}
                    else:
                        best[side]["cpu_ms"] = min(best[side]["cpu_ms"], r["cpu_ms"])
            for side in names:
                best[side]["peak_rss_mib"] = started[side].peak_mib()
                results[side].append(best[side])
    finally:
        for server in started.values():
            server.stop()
    return results


def squad_lengths(rows: list[dict[str, Any]], tok: Any, cap: int) -> list[int]:
    """Each question's answer length: the token count of its first gold answer, at most `cap`.

    A (question, context) pair asked twice in the file is one question to a server, so it keeps the
    length of its first occurrence.
    """
    first: dict[tuple[str, str], int] = {}
    for r in rows:
        n = min(cap, max(1, len(tok(r["answer"], add_special_tokens=False).input_ids)))
        first.setdefault((r["question"], r["context"]), n)
    return [first[(r["question"], r["context"])] for r in rows]


def check_lengths(logs: dict[str, Path], want: list[int]) -> dict[str, dict[str, int]]:
    """Per server: answers logged, and how many had another length than their question's target."""
    out = {}
    for side, log in logs.items():
        seen = (
            [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
            if log.exists()
            else []
        )
        wrong = sum(int(n) != want[int(i)] for i, n in seen)
        out[side] = {"answers": len(seen), "wrong": wrong}
    return out


def length_summary(want: list[int]) -> str:
    """The distribution of the target lengths in one phrase."""
    ranked = sorted(want)
    pick = {q: ranked[min(len(ranked) - 1, int(q / 100 * len(ranked)))] for q in (50, 90, 99)}
    return (
        f"mean {statistics.fmean(want):.1f} tokens, p50 {pick[50]}, p90 {pick[90]}, p99 {pick[99]}, "
        f"max {max(want)}"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--questions", type=int, default=96, help="SQuAD dev questions sent per level")
    p.add_argument("--tasks", type=int, default=N_TASKS, help="K prompts served at every level")
    p.add_argument(
        "--answers",
        choices=["fixed", "squad"],
        default="fixed",
        help="fixed: every answer runs --max-new-tokens tokens (random weights never emit EOS); squad: each "
        "question's answer ends after its first SQuAD gold answer's token count (bench/answer_lengths.py)",
    )
    p.add_argument(
        "--memory-tasks",
        type=int,
        default=16,
        help="then serve this many tasks from softprompt and from one PEFT model per task, at "
        "--memory-clients, and compare peak RSS (0 skips it)",
    )
    p.add_argument("--memory-clients", type=int, default=32)
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bf16 where the CPU has native bf16 (AVX512-BF16/AMX), else fp32 (emulated bf16 is "
        "~10x slower than fp32 and leaves every server compute-bound at one question at a time)",
    )
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=32, help="softprompt serve --max_batch_size")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="softprompt serve --max_wait_ms")
    p.add_argument("--timeout", type=float, default=600, help="seconds a request may take")
    p.add_argument("--level-timeout", type=float, default=1800, help="seconds one level may take per server")
    p.add_argument(
        "--rounds", type=int, default=1, help="runs per level and server, order rotated; best kept"
    )
    p.add_argument(
        "--quiet",
        type=float,
        default=1.0,
        help="before each run wait until other processes use under this fraction of the CPUs (1 = no wait)",
    )
    p.add_argument("--max-wait", type=float, default=120.0, help="longest wait for --quiet, seconds")
    p.add_argument("--note", default="", help="a line printed under the table in the docs")
    p.add_argument("--update-docs", action="store_true", help="write the table into docs/performance.md")
    args = p.parse_args()
    if args.precision == "auto":
        args.precision = "bf16" if native_bf16() else "fp32"
    return args


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    load_before, busy_before = _load(), _busy_fraction()
    rate = matmul_rate(args.precision)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    dev = _first_questions(SQUAD_DEV, args.questions)
    n_tasks = max(args.tasks, args.memory_tasks)
    tasks = [f"task{k}" for k in range(n_tasks)]
    rows = [
        {"task": tasks[i % args.tasks], "question": r["question"], "context": r["context"]}
        for i, r in enumerate(dev)
    ]
    squad = args.answers == "squad"
    memory, lengths_ok = None, None
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        model_dir, sp_dirs, peft_dirs, cfg = build(args.shape, work, n_tasks)
        from transformers import AutoTokenizer

        from softprompt.tasks.squad.text import format_input

        tok = AutoTokenizer.from_pretrained(model_dir)
        want = squad_lengths(dev, tok, args.max_new_tokens) if squad else [args.max_new_tokens] * len(rows)
        src_lens = [len(tok(format_input(r["question"], r["context"])).input_ids) for r in rows]
        # Decoder steps: the answer's tokens, plus the step that emits EOS unless the limit ends it first.
        steps = [min(n + 1, args.max_new_tokens) if squad else n for n in want]
        per_q = sum(
            eval_encoder_flops(cfg, N_TOKENS + n) + decoder_flops(cfg, N_TOKENS + n, s)
            for n, s in zip(src_lens, steps, strict=True)
        ) / len(rows)
        bound = rate * 1e9 / per_q
        print(
            f"compute bound: {bound:.1f} questions/s (encoder + {statistics.fmean(steps):.1f} decoder steps on "
            f"average incl. the LM head, {per_q / 1e9:.2f} GFLOP/question, at {rate:.0f} GFLOP/s "
            f"{args.precision} matmul)" + (f"; answer lengths {length_summary(want)}" if squad else ""),
            flush=True,
        )
        k = args.tasks
        target_file = work / "lengths.json"
        target_file.write_text(
            json.dumps(
                [
                    {"question": r["question"], "context": r["context"], "tokens": n}
                    for r, n in zip(dev, want, strict=True)
                ]
            )
        )
        logs = {side: work / f"{side}-lengths.log" for side in SIDES}
        lengths = {side: (target_file, logs[side]) if squad else None for side in SIDES}
        direct = None
        if 1 in args.levels:
            if squad:  # the direct call's answers end where the servers' do
                from answer_lengths import install

                install(target_file, work / "direct-lengths.log")
            direct = ("continuous", direct_caller(model_dir, sp_dirs[:k], tasks[:k], rows, args))
        servers = {
            side: (
                softprompt_cmd(model_dir, tasks[:k], sp_dirs[:k], args, side, lengths[side]),
                work / f"{side}.log",
            )
            for side in ("continuous", "static")
        }
        servers["peft"] = (
            peft_cmd(model_dir, tasks[:k], peft_dirs[:k], args, "shared", lengths["peft"]),
            work / "peft.log",
        )
        results = run_servers(servers, env, rows, args, direct)
        del direct  # its model is not needed any more
        if squad:
            lengths_ok = check_lengths(logs, want)
        if args.memory_tasks:
            memory = memory_run(model_dir, tasks, sp_dirs, peft_dirs, rows, env, args, work)
    levels = []
    for by_side in zip(*(results[s] for s in SIDES), strict=True):
        per = dict(zip(SIDES, by_side, strict=True))
        equal = sum(
            a is not None and all(a == per[s]["answers"][i] for s in SIDES[1:])
            for i, a in enumerate(per["continuous"]["answers"])
        )
        levels.append({"clients": by_side[0]["clients"], **per, "equal": equal / len(rows)})
    report(
        args, levels, memory, bound, rate, per_q, rows, want, steps, lengths_ok, (load_before, busy_before)
    )


def memory_run(
    model_dir: Path,
    tasks: list[str],
    sp_dirs: list[Path],
    peft_dirs: list[Path],
    rows: list[dict[str, str]],
    env: dict[str, str],
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    """softprompt with M prompts against one PEFT model per task at `--memory-clients`: peak RSS."""
    m = args.memory_tasks
    mem_rows = [{**r, "task": tasks[i % m]} for i, r in enumerate(rows)]
    one = argparse.Namespace(**{**vars(args), "levels": [args.memory_clients], "rounds": 1})
    servers = {
        "softprompt": (softprompt_cmd(model_dir, tasks[:m], sp_dirs[:m], args), work / "softprompt-mem.log"),
        "peft_per_task": (
            peft_cmd(model_dir, tasks[:m], peft_dirs[:m], args, "per-task"),
            work / "peft-mem.log",
        ),
    }
    out = {}
    for side, server in servers.items():  # one at a time: peak RSS is the question
        out[side] = run_servers({side: server}, env, mem_rows, one)[side][0]
    sp, pf = out["softprompt"], out["peft_per_task"]
    equal = sum(a is not None and a == b for a, b in zip(sp["answers"], pf["answers"], strict=True))
    return {
        "tasks": m,
        "clients": args.memory_clients,
        **out,
        "ratio": sp["peak_rss_mib"] / pf["peak_rss_mib"],
        "equal": equal / len(rows),
    }


def report(
    args: argparse.Namespace,
    levels: list[dict[str, Any]],
    memory: dict[str, Any] | None,
    bound: float,
    rate: float,
    per_q: float,
    rows: list[dict[str, str]],
    want: list[int],
    steps: list[int],
    lengths_ok: dict[str, dict[str, int]] | None,
    before: tuple[float, float],
) -> None:
    """Print the report, write bench/results/serve-*.json and, with --update-docs, docs/performance.md."""
    squad = args.answers == "squad"
    lines = [table(levels, bound, SIDES), ""]
    if levels and "direct" in levels[0]["continuous"]:
        sp = levels[0]["continuous"]
        d = sp["direct"]
        lines.append(
            f"1 client against one direct in-process `generate` call per question (same model, prompt, "
            f"precision, threads; alternated with the requests): serve p50 {sp['p50']:.3f} s / direct "
            f"{d['p50']:.3f} s = **{sp['p50'] / d['p50']:.3f}x**; mean {sp['mean']:.3f} / {d['mean']:.3f} s = "
            f"{sp['mean'] / d['mean']:.3f}x."
        )
    if lengths_ok is not None:
        lines.append(
            "\nAnswer lengths as drawn (each server's own count of the tokens it generated, per answer): "
            + "; ".join(f"{s} {v['answers'] - v['wrong']} of {v['answers']}" for s, v in lengths_ok.items())
            + "."
        )
    if memory is not None:
        sp, pf = memory["softprompt"], memory["peft_per_task"]
        lines.append(
            f"\n{memory['tasks']} tasks, {memory['clients']} clients: softprompt (one model) {sp['rps']:.2f} req/s, "
            f"p99 {sp['p99']:.2f} s, peak RSS {sp['peak_rss_mib']:.0f} MiB; PEFT with one model per task "
            f"{pf['rps']:.2f} req/s, p99 {pf['p99']:.2f} s, peak RSS {pf['peak_rss_mib']:.0f} MiB: "
            f"**{memory['ratio']:.2f}x** the memory; answers equal {memory['equal']:.0%}."
        )
    if squad:
        lines += ["", "Targets (issue 24):", *squad_targets(levels), failures(levels, SIDES)]
    else:
        lines += ["", "Targets (issue 17):", *targets(levels, memory, bound), failures(levels, SIDES)]
    text = "\n".join(lines)
    print(text)

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    load_before, busy_before = before
    summary = {
        "timestamp": stamp,
        "command": "python bench/bench_serve.py " + " ".join(without_note(sys.argv[1:])),
        "machine": _machine(),
        "shape": SHAPES[args.shape],
        "precision": args.precision,
        "native_bf16": native_bf16(),
        "threads": args.threads,
        "answers": args.answers,
        "answer_tokens": want,
        "decoder_steps": steps,
        "lengths_checked": lengths_ok,
        "bound_qps": bound,
        "matmul_gflops": rate,
        "load_before": load_before,
        "busy_before": busy_before,
        "load_after": _load(),
        "levels": levels,
        "memory": memory,
    }
    out = RESULTS / f"serve-{stamp}.json"
    out.write_text(json.dumps(summary, indent=1))
    stem = REPO / "docs" / ("serve_load_squad" if squad else "serve_load")
    figs = plot(levels, stem, SIDES) if args.update_docs else []
    print("wrote", ", ".join(str(f.relative_to(REPO)) for f in [out, *figs]))
    if not args.update_docs:
        return
    m = summary["machine"]
    answers = (
        f"answers ending after their first gold answer's token count ({length_summary(want)}; at most "
        f"{args.max_new_tokens})"
        if squad
        else f"answers of {args.max_new_tokens} tokens"
    )
    body = (
        f"Last run: {stamp} on {m['cpu']} ({m['cores']} cores, native bf16: "
        f"{'yes' if summary['native_bf16'] else 'no'}), {args.threads} torch thread(s) per server, "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; {SHAPES[args.shape]} shape, "
        f"random weights, {args.precision}, K = {args.tasks} prompts of {N_TOKENS} tokens, {len(rows)} SQuAD "
        f"dev questions per level, {answers}; {args.rounds} round(s) per level and server, order rotated, "
        f"best kept.\n\n"
        f"Command: `{summary['command']}`\n\n"
        f"Compute bound: {bound:.1f} questions/s ({per_q / 1e9:.2f} GFLOP/question at {rate:.0f} GFLOP/s "
        f"{args.precision} matmul).\n\n{text}\n\n"
        f"![throughput and p99 latency against concurrency]({stem.name}.svg)\n\n"
        f"Load average before/after the run: {load_before:.1f} / {summary['load_after']:.1f}; other processes "
        f"busy {busy_before:.0%} of the CPUs before it." + (f"\n\n{args.note}" if args.note else "")
    )
    update_docs(body, *((SQUAD_BEGIN, SQUAD_END) if squad else (BEGIN, END)))


if __name__ == "__main__":
    main()
