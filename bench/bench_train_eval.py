"""softprompt vs PEFT prompt tuning, side by side, in one command.

    python bench/bench_train_eval.py --shapes small base

For every shape the bench builds ONE random-weight T5 from ``../shared/models/<shape>`` (the published
config and the real tokenizer), saves it with ``save_pretrained`` to a temporary directory, and runs each
side in its own subprocess (``--side softprompt`` / ``--side peft``) so peak RSS is measured separately.
Both sides train on the first N questions of SQuAD v1.1 train for the same number of optimizer steps
(N = steps x batch: one epoch, so both see exactly the same examples) and answer the first M dev
questions greedily (at most 32 new tokens) in batches of the same size.

* softprompt: ``softprompt.training.loop.train(TrainConfig(..., precision="bf16"))`` exactly as ``softprompt
  train`` runs it; train examples/s is the ``train_examples_per_second`` the run writes to results.json.
  Evaluation is ``softprompt.inference.engine.generate_answers(..., bf16=True)`` on the trained prompt, with the
  weights frozen to bf16 as ``softprompt eval --precision bf16`` does.
* peer: PEFT ``PromptTuningConfig(task_type=SEQ_2_SEQ_LM, num_virtual_tokens=100,
  prompt_tuning_init=SAMPLE_VOCAB)`` on ``T5ForConditionalGeneration`` (SDPA attention, transformers'
  default), trained by ``Seq2SeqTrainer`` with ``DataCollatorForSeq2Seq`` (dynamic padding, label pad -100),
  Adafactor at a constant lr of 0.3, ``bf16=True, use_cpu=True``. Its examples/s is timed by a
  ``TrainerCallback`` from ``on_train_begin`` to the last ``on_step_end`` (Trainer setup excluded).
  Evaluation is ``PeftModelForSeq2SeqLM.generate`` in dataset order under bf16 autocast, with the prompt
  softprompt trained copied in, so both sides decode the same tokens and stop at the same place (the
  answers' agreement is reported as a cross-check).

On a GPU (``--device cuda``, the default when one is visible) both sides train and answer there in bf16
(the peer with ``bf16=True``), peak memory is the GPU's (``torch.cuda.max_memory_allocated``), train
speed is taken over the steps after ``--warmup-steps`` (kernel selection and allocator warm-up are not
throughput). On either device ``--variants`` adds softprompt runs with one speed lever switched off
(``no-freeze``: fp32 weights under autocast instead of bf16 weights stored once by ``PromptedT5.freeze_to``,
i.e. ``TrainConfig(bf16_weights=False)``; ``no-lean``: transformers' T5 modules instead of the lean T5, i.e.
``TrainConfig(fast_path=False)`` and ``PromptedT5(..., fast_path=False)``), each reported against the same peer.

The parent also times a large ``torch.matmul`` loop in bf16 and fp32 and reports model-FLOPs utilisation
(MFU) of the prompt-tuning train step against those rates; see ``train_flops_per_example`` for the formula.
It prints a table, writes ``bench/results/<timestamp>-<shape>.json`` and ``bench/results/latest.json``,
and with ``--update-docs`` rewrites the results block of ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The environment as the user gave it, before softprompt is imported here: each side runs with exactly
# this, so nothing softprompt sets in its own process can leak into the peer's.
USER_ENV = dict(os.environ)
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SOFTPROMPT_SHARED", REPO.parent / "shared"))
SQUAD_TRAIN = SHARED / "data" / "squad" / "train-v1.1.json"
SQUAD_DEV = SHARED / "data" / "squad" / "dev-v1.1.json"
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs" / "performance.md"
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json")
DOCS_BEGIN = "<!-- bench:begin -->"
DOCS_END = "<!-- bench:end -->"
DOCS_BEGIN_GPU = "<!-- bench:gpu:begin -->"
DOCS_END_GPU = "<!-- bench:gpu:end -->"

N_TOKENS = 100  # prompt length P, as in the paper
MAX_SOURCE = 512
MAX_TARGET = 32
LR = 0.3
WEIGHT_DECAY = 1e-5
SEED = 42


@dataclass(frozen=True)
class Shape:
    """One model shape and its default workload."""

    model: str  # directory under ../shared/models
    batch: int  # global batch (32 in the paper; 8 at base shape on a CPU)
    steps: int  # optimizer steps (one epoch over steps x batch examples)
    eval_questions: int
    eval_batch: int


SHAPES = {
    "small": Shape("t5-small-lm-adapt", batch=32, steps=8, eval_questions=96, eval_batch=32),
    "base": Shape("t5-base-lm-adapt", batch=8, steps=8, eval_questions=48, eval_batch=16),
    "large": Shape("t5-large-lm-adapt", batch=4, steps=4, eval_questions=16, eval_batch=8),
}
# On a GPU every shape runs the paper's batch of 32, for long enough that the warm-up steps are few.
CUDA_SHAPES = {
    name: Shape(s.model, batch=32, steps=30, eval_questions=256, eval_batch=64) for name, s in SHAPES.items()
}
VARIANTS = ("default", "compile", "no-freeze", "no-lean", "no-lean+no-freeze")


# ------------------------------------------------------------------------------------------ FLOPs


def train_flops_per_example(cfg: Any, enc_len: int, dec_len: int) -> float:
    """Model FLOPs of one prompt-tuning train step for one example (forward + needed backward).

    Matmul FLOPs only (2 per multiply-add), counted on the example's real tokens (padding is waste,
    not work). ``enc_len`` = P + source tokens, ``dec_len`` = target tokens; inner = heads x d_kv.

    Forward, per encoder layer: ``2 L (4 d inner + 3 d d_ff)`` for the projections and gated FFN, plus
    ``4 L^2 inner`` for QK^T and AV. Per decoder layer: ``2 T (4 d inner + 3 d d_ff)`` (self-attention
    and FFN), ``2 T (2 d inner)`` + ``2 L (2 d inner)`` for cross-attention's Q/O and K/V projections,
    ``4 T^2 inner + 4 T L inner`` for the attention products. LM head ``2 T d V``.

    Backward: the model is frozen, so no weight gradients; only activation gradients back to the
    prompt. A linear layer's input gradient costs what its forward cost; an attention product's
    backward is two matmuls per forward matmul (2x). The first decoder layer's self-attention does not
    depend on the encoder, so its backward is skipped (autograd never runs it); everything else must run.
    So ``train = fwd_linear + fwd_attn + (fwd_linear - dec0_self_linear) + 2 (fwd_attn - dec0_self_attn)``.
    """
    d, ff, vocab = cfg.d_model, cfg.d_ff, cfg.vocab_size
    inner = cfg.num_heads * cfg.d_kv
    n_enc, n_dec = cfg.num_layers, cfg.num_decoder_layers
    big_l, t = enc_len, dec_len
    enc_lin = n_enc * 2 * big_l * (4 * d * inner + 3 * d * ff)
    enc_att = n_enc * 4 * big_l * big_l * inner
    dec_self_lin = 2 * t * 4 * d * inner
    dec_self_att = 4 * t * t * inner
    dec_lin = n_dec * (dec_self_lin + 2 * t * 3 * d * ff + 2 * t * 2 * d * inner + 2 * big_l * 2 * d * inner)
    dec_att = n_dec * (dec_self_att + 4 * t * big_l * inner)
    head = 2 * t * d * vocab
    fwd_lin = enc_lin + dec_lin + head
    fwd_att = enc_att + dec_att
    return fwd_lin + fwd_att + (fwd_lin - dec_self_lin) + 2 * (fwd_att - dec_self_att)


def eval_encoder_flops(cfg: Any, enc_len: int) -> float:
    """Model FLOPs of the encoder's forward for one question of ``enc_len`` = P + source tokens.

    The part of answering that no implementation can skip (every answer needs the whole encoder once),
    so the measured matmul rate over it bounds eval questions/s from above, whatever the decoder does.
    """
    d, ff, inner = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv
    return cfg.num_layers * (2 * enc_len * (4 * d * inner + 3 * d * ff) + 4 * enc_len * enc_len * inner)


def matmul_rate(dtype_name: str, seconds: float = 2.0, device: str = "cpu") -> float:
    """Best sustained GFLOP/s of a square ``torch.matmul`` loop over a few sizes, on random data.

    On a CPU with this process's threads (1024/2048/4096); on a GPU at 4096/8192, synchronising before
    the clock is read (the default fp32 matmul precision, i.e. no TF32, as the benchmarked code runs).
    """
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    sizes = (4096, 8192) if device == "cuda" else (1024, 2048, 4096)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for _ in range(3):
            torch.matmul(a, b)
        sync()
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / len(sizes):
            for _ in range(10 if device == "cuda" else 1):
                torch.matmul(a, b)
                k += 1
            sync()
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0) / 1e9)
    return best


# ------------------------------------------------------------------------------------------ helpers


def _peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_gpu_mib() -> float:
    """Peak GPU memory PyTorch allocated in this process since the last reset, MiB (0 without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def _reset_gpu_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _steady_rate(batch: int, step_seconds: list[float], warmup: int) -> float:
    """Examples per second over the steps after the first `warmup` (all of them if too few)."""
    steady = step_seconds[warmup:] if len(step_seconds) > warmup else step_seconds
    return batch * len(steady) / sum(steady)


def _load() -> float:
    return os.getloadavg()[0]


def _cpu_seconds() -> float:
    """CPU time this process has used so far (all threads, user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _busy_fraction(seconds: float = 2.0) -> float:
    """Fraction of the machine's CPU time spent busy over `seconds` (by others while we sleep)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return 0.0
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def _wait_for_quiet(threshold: float, max_wait: float) -> tuple[float, float]:
    """Sleep until other processes use under `threshold` of the CPUs (or `max_wait` s pass).

    Returns (seconds waited, the last busy fraction seen).
    """
    t0 = time.perf_counter()
    busy = _busy_fraction()
    while busy > threshold and time.perf_counter() - t0 < max_wait:
        busy = _busy_fraction(5.0)
    return time.perf_counter() - t0, busy


def _first_questions(path: Path, n: int) -> list[dict[str, Any]]:
    """The first n questions of a SQuAD v1.1 file as plain dicts, the way a user reads them."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rows = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows.append(
                    {
                        "id": qa["id"],
                        "question": qa["question"],
                        "context": paragraph["context"],
                        "answer": qa["answers"][0]["text"],
                    }
                )
                if len(rows) == n:
                    return rows
    return rows


# ------------------------------------------------------------------------------------------ sides


def side_softprompt(args: argparse.Namespace) -> dict[str, Any]:
    """Train with `softprompt.training.loop.train` as `softprompt train` does, then answer with generate_answers."""
    from softprompt.inference.bank import load_model_and_prompts
    from softprompt.inference.options import GenerationOptions
    from softprompt.tasks.squad.reader import load_examples, tokenize_examples
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train

    work = Path(args.work)
    out = work / "softprompt-run"
    # Variants switch off one speed lever each, to measure what it is worth; "compile" switches
    # --compile on (CUDA graphs of the lean step on a GPU; its compile time falls in the warm-up steps).
    levers_off = set(args.variant.split("+")) - {"default", "compile"}
    fast_path = "no-lean" not in levers_off  # off: transformers' T5 modules everywhere
    # off: fp32 weights under autocast instead of bf16 weights stored once
    freeze = "no-freeze" not in levers_off
    cfg = TrainConfig(
        output_dir=str(out),
        model_name_or_path=args.model_dir,
        train_file=str(SQUAD_TRAIN),
        prompt_tuning=True,
        n_tokens=N_TOKENS,
        prompt_init="sampled_vocab",
        max_source_length=MAX_SOURCE,
        max_target_length=MAX_TARGET,
        optimizer="adafactor",
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        global_batch_size=args.batch,
        batch_size=args.micro_batch or None,  # the rest by gradient accumulation, as the peer's below
        max_steps=args.steps,
        max_train_samples=args.batch * args.steps,
        seed=SEED,
        eval_steps=0,
        save_steps=0,
        logging_steps=1,
        report_to=["none"],
        precision=args.precision,
        overwrite_output_dir=True,
        fast_path=fast_path,
        bf16_weights=freeze,
        compile="compile" in args.variant.split("+"),
    )
    load0 = _load()
    _reset_gpu_peak()
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    results = train(cfg)
    train_cores = (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    train_peak = _peak_rss_mib()
    train_gpu_peak = _peak_gpu_mib()
    step_seconds = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "train":
            step_seconds.append(args.batch / rec["examples_per_second"])

    # as `softprompt eval --precision <p>` loads it: in bf16 the weights are stored once in bf16 unless the
    # variant says no
    bf16 = args.precision == "bf16"
    bank = load_model_and_prompts(
        args.model_dir, [out / "last"], bf16=bf16 and freeze, fast_path=fast_path, device=args.device
    )
    weight = bank.entry(0).weight.cpu()
    examples = load_examples(SQUAD_DEV)[: args.eval_questions]
    features = tokenize_examples(
        examples, bank.tokenizer, max_source_length=MAX_SOURCE, max_target_length=MAX_TARGET
    )
    if args.device == "cuda":  # one untimed batch: CUDA kernel loading and allocator growth are not speed
        bank.generate_answers(
            features[: args.eval_batch], 0, GenerationOptions(batch_size=args.eval_batch, bf16=bf16)
        )
    _reset_gpu_peak()
    t0 = time.perf_counter()
    answers = bank.generate_answers(
        features, 0, GenerationOptions(batch_size=args.eval_batch, max_new_tokens=MAX_TARGET, bf16=bf16)
    )
    eval_seconds = time.perf_counter() - t0
    if args.variant == "default":
        (work / "softprompt-prompt.json").write_text(json.dumps(weight.tolist()))
    return {
        "train_examples_per_second": _steady_rate(args.batch, step_seconds, args.warmup_steps),
        "train_examples_per_second_all_steps": results["train_examples_per_second"],
        "train_device": results["device"],
        "train_seconds": results["train_seconds"],
        "step_seconds": step_seconds,
        "train_peak_rss_mib": train_peak,
        "train_cores_used": train_cores,
        "eval_questions_per_second": len(features) / eval_seconds,
        "eval_seconds": eval_seconds,
        "answers": answers,
        "peak_rss_mib": _peak_rss_mib(),
        "train_peak_gpu_mib": train_gpu_peak,
        "eval_peak_gpu_mib": _peak_gpu_mib(),
        "load_before": load0,
        "load_after": _load(),
    }


def side_peft(args: argparse.Namespace) -> dict[str, Any]:
    """Train PEFT prompt tuning with Seq2SeqTrainer, then answer with the PEFT model's generate."""
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        T5ForConditionalGeneration,
        TrainerCallback,
    )

    work = Path(args.work)
    load0 = _load()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = T5ForConditionalGeneration.from_pretrained(args.model_dir)
    attn = model.config._attn_implementation
    peft_config = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=N_TOKENS,
        prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
    )
    model = get_peft_model(model, peft_config)

    rows = _first_questions(SQUAD_TRAIN, args.batch * args.steps)
    sources = [f"question: {r['question']} context: {r['context']}" for r in rows]
    enc = tokenizer(sources, max_length=MAX_SOURCE, truncation=True)
    targets = tokenizer(text_target=[r["answer"] for r in rows], max_length=MAX_TARGET, truncation=True)
    train_set = [
        {"input_ids": i, "attention_mask": m, "labels": lab}
        for i, m, lab in zip(enc["input_ids"], enc["attention_mask"], targets["input_ids"], strict=True)
    ]

    cuda = args.device == "cuda"

    class StepTimer(TrainerCallback):
        # On a GPU, synchronise only where the steady-state window starts and ends (the Trainer itself does
        # not wait for the GPU between steps, and the peer should not be slowed by the measurement).
        def __init__(self) -> None:
            self.marks: list[float] = []

        def _mark(self, sync: bool) -> None:
            if cuda and sync:
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.marks = []
            self._mark(True)

        def on_step_end(self, _args: Any, state: Any, *a: Any, **k: Any) -> None:
            self._mark(state.global_step in (args.warmup_steps, args.steps))

    timer = StepTimer()
    targs = Seq2SeqTrainingArguments(
        output_dir=str(work / "peft-run"),
        per_device_train_batch_size=args.micro_batch or args.batch,
        gradient_accumulation_steps=args.batch // (args.micro_batch or args.batch),
        max_steps=args.steps,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        optim="adafactor",
        lr_scheduler_type="constant",
        bf16=args.precision == "bf16",
        use_cpu=not cuda,
        seed=SEED,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=targs,
        train_dataset=train_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        callbacks=[timer],
    )
    _reset_gpu_peak()
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    trainer.train()
    train_cores = (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    train_peak = _peak_rss_mib()
    train_gpu_peak = _peak_gpu_mib()
    step_seconds = [b - a for a, b in zip(timer.marks, timer.marks[1:], strict=False)]
    train_seconds = timer.marks[-1] - timer.marks[0]

    # Evaluate with the prompt softprompt trained, so both sides decode the same tokens.
    shared_prompt = work / "softprompt-prompt.json"
    if shared_prompt.exists():
        weight = torch.tensor(json.loads(shared_prompt.read_text()))
        emb = model.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            emb[:N_TOKENS].copy_(weight)
    dev = _first_questions(SQUAD_DEV, args.eval_questions)
    dev_enc = tokenizer(
        [f"question: {r['question']} context: {r['context']}" for r in dev],
        max_length=MAX_SOURCE,
        truncation=True,
    )
    model.eval()
    answers: list[str] = []
    cast = (
        torch.autocast(args.device, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else torch.autocast(args.device, enabled=False)
    )

    def answer(i: int) -> list[str]:
        batch = tokenizer.pad(
            {
                "input_ids": dev_enc["input_ids"][i : i + args.eval_batch],
                "attention_mask": dev_enc["attention_mask"][i : i + args.eval_batch],
            },
            return_tensors="pt",
        )
        out = model.generate(
            input_ids=batch["input_ids"].to(args.device),
            attention_mask=batch["attention_mask"].to(args.device),
            max_new_tokens=MAX_TARGET,
        )
        return [a.strip() for a in tokenizer.batch_decode(out, skip_special_tokens=True)]

    with torch.no_grad(), cast:
        if cuda:  # one untimed batch on a GPU, as on the softprompt side
            answer(0)
        _reset_gpu_peak()
        t0 = time.perf_counter()
        for i in range(0, len(dev), args.eval_batch):
            answers += answer(i)
    eval_seconds = time.perf_counter() - t0
    return {
        "train_examples_per_second": _steady_rate(args.batch, step_seconds, args.warmup_steps),
        "train_examples_per_second_all_steps": args.batch * len(step_seconds) / train_seconds,
        "train_device": str(next(model.parameters()).device.type),
        "train_seconds": train_seconds,
        "step_seconds": step_seconds,
        "train_peak_rss_mib": train_peak,
        "train_cores_used": train_cores,
        "eval_questions_per_second": len(dev) / eval_seconds,
        "eval_seconds": eval_seconds,
        "answers": answers,
        "attn_implementation": attn,
        "peak_rss_mib": _peak_rss_mib(),
        "train_peak_gpu_mib": train_gpu_peak,
        "eval_peak_gpu_mib": _peak_gpu_mib(),
        "load_before": load0,
        "load_after": _load(),
    }


# ------------------------------------------------------------------------------------------ parent


def _machine() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    model_name = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
        flags = next((ln for ln in lscpu.splitlines() if ln.startswith("Flags:")), "")
    except (OSError, subprocess.CalledProcessError):
        flags = ""
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags.split()]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "gpu": gpu,
        "cpu": model_name,
        "cores": os.cpu_count(),
        "isa": isa,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def _build_model(shape: Shape, directory: Path) -> Any:
    """One random-weight T5 from the shared config, saved where both sides load it from."""
    from softprompt.modeling.model import load_t5

    src = SHARED / "models" / shape.model
    model = load_t5(src, random_init=True, seed=0)
    model.save_pretrained(directory, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, directory / name)
    return model.config


def _shape(name: str, args: argparse.Namespace) -> Shape:
    """The shape's workload on this device, with any command-line overrides applied."""
    base = (CUDA_SHAPES if args.device == "cuda" else SHAPES)[name]
    return Shape(
        base.model,
        batch=args.batch or base.batch,
        steps=args.steps or base.steps,
        eval_questions=args.eval_questions or base.eval_questions,
        eval_batch=args.eval_batch or base.eval_batch,
    )


def _run_side(
    side: str,
    shape: Shape,
    model_dir: Path,
    work: Path,
    args: argparse.Namespace,
    precision: str,
    variant: str = "default",
) -> dict[str, Any]:
    out = work / f"{side}-{variant}-{precision}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--side",
        side,
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
        "--precision",
        precision,
        "--device",
        args.device,
        "--warmup-steps",
        str(args.warmup_steps),
        "--micro-batch",
        str(args.micro_batch or 0),
        "--variant",
        variant,
        "--side-output",
        str(out),
    ]
    env = dict(USER_ENV, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    waited, busy = _wait_for_quiet(args.quiet, args.max_wait) if args.quiet < 1.0 else (0.0, _busy_fraction())
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        if variant != "default":  # an experimental variant failing must not lose the main comparison
            return {"failed": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1]}
        raise SystemExit(f"the {side} side failed (exit {proc.returncode})")
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - t0
    result["waited_for_quiet_seconds"] = waited
    result["others_busy_before"] = busy
    return result


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's result over repeated runs: the fastest train and eval, the largest peak RSS."""
    best = dict(max(runs, key=lambda r: r["train_examples_per_second"]))
    evals = max(runs, key=lambda r: r["eval_questions_per_second"])
    for key in ("eval_questions_per_second", "eval_seconds", "answers"):
        best[key] = evals[key]
    best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    best["train_peak_gpu_mib"] = max(r.get("train_peak_gpu_mib", 0.0) for r in runs)
    best["eval_peak_gpu_mib"] = max(r.get("eval_peak_gpu_mib", 0.0) for r in runs)
    keys = (
        "train_examples_per_second",
        "eval_questions_per_second",
        "peak_rss_mib",
        "train_cores_used",
        "others_busy_before",
    )
    best["runs"] = [{k: r[k] for k in keys} for r in runs]
    return best


def _token_counts(model_dir: Path, n_train: int, path: Path = SQUAD_TRAIN) -> list[tuple[int, int]]:
    """(P + source tokens, target tokens) of each of the first questions, from softprompt's tokenization."""
    from softprompt.modeling.model import load_tokenizer
    from softprompt.tasks.squad.reader import load_examples, tokenize_examples

    tokenizer = load_tokenizer(model_dir)
    feats = tokenize_examples(
        load_examples(path)[:n_train],
        tokenizer,
        max_source_length=MAX_SOURCE,
        max_target_length=MAX_TARGET,
    )
    return [(N_TOKENS + len(f.input_ids), len(f.labels)) for f in feats]


def bench_shape(
    name: str, precision: str, args: argparse.Namespace, rates: dict[str, float]
) -> dict[str, Any]:
    """Run both sides (and any softprompt variants) on one shape in one precision; compute ratios and MFU."""
    shape = _shape(name, args)
    variants = ["default", *(v for v in args.variants if v != "default")]
    with tempfile.TemporaryDirectory(prefix=f"spbench-{name}-") as tmp:
        work = Path(tmp)
        if args.keep_work:
            work = Path(args.keep_work) / name
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        model_dir = work / "model"
        print(f"[{name}] building {shape.model} with random weights ...", flush=True)
        config = _build_model(SHAPES[name], model_dir)
        counts = _token_counts(model_dir, shape.batch * shape.steps)
        dev_counts = _token_counts(model_dir, shape.eval_questions, SQUAD_DEV)
        labels = [_label(v) for v in variants] + ["peft"]
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
        failed: dict[str, str] = {}
        for rep in range(args.repeats):
            # softprompt first in the first round (the peer evaluates the prompt it trained); then the
            # order alternates so a change in the machine's load does not favour one side.
            order = [("softprompt", "default"), ("peft", "default")]
            order += [("softprompt", v) for v in variants[1:]]
            if rep % 2:
                order = order[1:2] + order[:1] + order[2:]
            for side, variant in order:
                label = "peft" if side == "peft" else _label(variant)
                if label in failed:
                    continue
                print(
                    f"[{name} {precision}] {label}: training {shape.steps} steps x {shape.batch}, "
                    "then answering ...",
                    flush=True,
                )
                r = _run_side(side, shape, model_dir, work, args, precision, variant)
                if "failed" in r:
                    failed[label] = r["failed"]
                    print(f"[{name} {precision}] {label}: FAILED ({r['failed']})", flush=True)
                    continue
                runs[label].append(r)
                print(
                    f"[{name} {precision}] {label}: {r['train_examples_per_second']:.2f} train ex/s, "
                    f"{r['eval_questions_per_second']:.2f} eval q/s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                    f"peak GPU {r['train_peak_gpu_mib']:.0f}/{r['eval_peak_gpu_mib']:.0f} MiB train/eval "
                    f"(training used {r['train_cores_used']:.2f} of {os.cpu_count()} cores; "
                    f"others busy {100 * r['others_busy_before']:.0f}% before)",
                    flush=True,
                )
        sides = {label: _best(rs) for label, rs in runs.items() if rs}
    flops_per_example = sum(train_flops_per_example(config, e, t) for e, t in counts) / len(counts)
    eval_flops = sum(eval_encoder_flops(config, e) for e, _ in dev_counts) / len(dev_counts)
    pe = sides["peft"]
    pe_answers = pe["answers"]
    sp_answers = sides["softprompt"]["answers"]
    agree = sum(a == b for a, b in zip(sp_answers, pe_answers, strict=True)) / max(1, len(sp_answers))
    result: dict[str, Any] = {
        "shape": name,
        "precision": precision,
        "model": shape.model,
        "device": args.device,
        "batch": shape.batch,
        "steps": shape.steps,
        "warmup_steps": args.warmup_steps,
        "train_examples": shape.batch * shape.steps,
        "eval_questions": shape.eval_questions,
        "eval_batch": shape.eval_batch,
        "mean_source_tokens": sum(e for e, _ in counts) / len(counts) - N_TOKENS,
        "mean_target_tokens": sum(t for _, t in counts) / len(counts),
        "train_gflop_per_example": flops_per_example / 1e9,
        "eval_encoder_gflop_per_question": eval_flops / 1e9,
        "eval_ceiling_questions_per_second": rates[precision] * 1e9 / eval_flops,
        "eval_ceiling_vs_peer": rates[precision] * 1e9 / eval_flops / pe["eval_questions_per_second"],
        "eval_answer_agreement": agree,
        "failed_variants": failed,
        "sides": list(sides),
        "ratios": {},
        "mfu": {},
    }
    for label, r in sides.items():
        answers = r.pop("answers")
        result[label] = r
        if label != "peft":
            result["ratios"][label] = {
                "train_examples_per_second": r["train_examples_per_second"] / pe["train_examples_per_second"],
                "eval_questions_per_second": r["eval_questions_per_second"] / pe["eval_questions_per_second"],
                "peak_rss": r["peak_rss_mib"] / pe["peak_rss_mib"],
                "train_peak_gpu": r["train_peak_gpu_mib"] / pe["train_peak_gpu_mib"]
                if pe["train_peak_gpu_mib"]
                else None,
                "answers_equal_to_default": sum(a == b for a, b in zip(answers, sp_answers, strict=True))
                / max(1, len(answers)),
            }
        achieved = flops_per_example * r["train_examples_per_second"] / 1e9
        result["mfu"][label] = {
            "achieved_gflops": achieved,
            "vs_bf16": achieved / rates["bf16"],
            "vs_fp32": achieved / rates["fp32"],
            "vs_own": achieved / rates[precision],
            "eval_encoder_vs_own": r["eval_questions_per_second"] * eval_flops / (rates[precision] * 1e9),
        }
    return result


def _default_precisions(device: str) -> list[str]:
    """bf16 and fp32 where bf16 is native (a GPU, a CPU with AVX512-BF16 or AMX); fp32 alone where emulated."""
    from softprompt.runtime.precision import native_bf16

    return ["bf16", "fp32"] if native_bf16(device) else ["fp32"]


def _label(variant: str) -> str:
    return "softprompt" if variant == "default" else f"softprompt[{variant}]"


def _table(results: list[dict[str, Any]], rates: dict[str, float]) -> str:
    gpu = any(r["device"] == "cuda" for r in results)
    mem = "peak GPU MiB (train)" if gpu else "peak RSS MiB"
    unit = "TFLOP/s" if gpu else "GFLOP/s"
    scale = 1e-3 if gpu else 1.0
    head = (
        f"| shape | precision | side | train ex/s | eval q/s | {mem} | train {unit} | MFU (own precision) |\n"
        "|---|---|---|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in results:
        for side in r["sides"]:
            s, m = r[side], r["mfu"][side]
            memory = s["train_peak_gpu_mib"] if gpu else s["peak_rss_mib"]
            lines.append(
                f"| {r['shape']} | {r['precision']} | {side} | {s['train_examples_per_second']:.2f} | "
                f"{s['eval_questions_per_second']:.2f} | {memory:.0f} | {scale * m['achieved_gflops']:.1f} | "
                f"{100 * m['vs_own']:.1f}% |"
            )
        for side, q in r["ratios"].items():
            memory_ratio = q["train_peak_gpu"] if gpu else q["peak_rss"]
            lines.append(
                f"| {r['shape']} | {r['precision']} | **{side} / peft** | **{q['train_examples_per_second']:.2f}x** | "
                f"**{q['eval_questions_per_second']:.2f}x** | **{memory_ratio or 0:.2f}x** | | |"
            )
    where = (
        "square torch.matmul on the GPU, 4096/8192" if gpu else "best of 1024/2048/4096 square torch.matmul"
    )
    foot = (
        f"\n\nMeasured matmul rates: bf16 {scale * rates['bf16']:.0f} {unit}, fp32 {scale * rates['fp32']:.0f} {unit} "
        f"({where})."
    )
    for r in results:
        warm = f", train speed over steps {r['warmup_steps'] + 1}-{r['steps']}" if r["warmup_steps"] else ""
        foot += (
            f"\n\n{r['shape']} {r['precision']}: {r['steps']} steps x {r['batch']} = {r['train_examples']} train questions "
            f"(mean {r['mean_source_tokens']:.0f} source + {r['mean_target_tokens']:.1f} target tokens, "
            f"{r['train_gflop_per_example']:.1f} GFLOP per example{warm}); {r['eval_questions']} dev questions in "
            f"batches of {r['eval_batch']}, answers identical on both sides: {100 * r['eval_answer_agreement']:.0f}%"
        )
        if not gpu:
            foot += (
                f"; cores used while training: softprompt {r['softprompt']['train_cores_used']:.2f}, "
                f"peft {r['peft']['train_cores_used']:.2f} (of {os.cpu_count()})"
            )
        foot += (
            f". Eval bound: the encoder alone is {r['eval_encoder_gflop_per_question']:.1f} GFLOP per question, "
            f"so at 100% of the {r['precision']} matmul rate no implementation answers more than "
            f"{r['eval_ceiling_questions_per_second']:.1f} q/s = {r['eval_ceiling_vs_peer']:.2f}x the peer "
            f"(encoder MFU: softprompt {100 * r['mfu']['softprompt']['eval_encoder_vs_own']:.0f}%, "
            f"peer {100 * r['mfu']['peft']['eval_encoder_vs_own']:.0f}%)."
        )
        for label, why in r["failed_variants"].items():
            foot += f" {label} failed: {why}."
        busy = min(r[side]["train_cores_used"] for side in ("softprompt", "peft"))
        if not gpu and busy < 0.7 * (os.cpu_count() or 1):
            foot += " **Other processes took CPU time during this run: its ratios are unreliable.**"
    return head + "\n".join(lines) + "\n" + foot


def _update_docs(table: str, summary: dict[str, Any], device: str) -> None:
    m = summary["machine"]
    begin, end = (DOCS_BEGIN, DOCS_END) if device == "cpu" else (DOCS_BEGIN_GPU, DOCS_END_GPU)
    where = (
        f"{m['gpu']} (host: {m['cpu']}, {m['cores']} cores)"
        if device == "cuda"
        else (
            f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, ISA {', '.join(m['isa']) or 'n/a'})"
        )
    )
    block = (
        f"{begin}\n"
        f"Last run: {summary['timestamp']} on {where}, torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}.\n\n"
        f"Command: `{summary['command']}`\n\n"
        f"{table}\n\n"
        f"Load average before/after the run: {summary['load_before']:.1f} / {summary['load_after']:.1f}.\n"
        f"{end}"
    )
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else "# Performance\n"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS.write_text(text, encoding="utf-8")


def parent(args: argparse.Namespace) -> None:
    """Run every requested shape, print the table, write the JSON results (and the docs block)."""
    import torch

    if not SQUAD_TRAIN.exists():
        raise SystemExit(f"{SQUAD_TRAIN} is missing; set SOFTPROMPT_SHARED to the shared folder")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    load_before = _load()
    print(f"measuring matmul rates on {args.device} ({torch.get_num_threads()} threads) ...", flush=True)
    rates = {"bf16": matmul_rate("bf16", device=args.device), "fp32": matmul_rate("fp32", device=args.device)}
    print(f"  bf16 {rates['bf16']:.0f} GFLOP/s, fp32 {rates['fp32']:.0f} GFLOP/s", flush=True)
    precisions = args.precisions or _default_precisions(args.device)
    results = [bench_shape(name, p, args, rates) for p in precisions for name in args.shapes]
    summary = {
        "timestamp": stamp,
        "command": "python bench/bench_train_eval.py " + " ".join(sys.argv[1:]),
        "machine": _machine(),
        "precisions": precisions,
        "matmul_gflops": rates,
        "load_before": load_before,
        "load_after": _load(),
        "shapes": results,
    }
    table = _table(results, rates)
    print("\n" + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "" if args.device == "cpu" else f"-{args.device}"
    for r in results:
        one = {k: v for k, v in summary.items() if k != "shapes"} | {"result": r}
        (RESULTS / f"{stamp}{tag}-{r['shape']}-{r['precision']}.json").write_text(
            json.dumps(one, indent=2) + "\n"
        )
    (RESULTS / f"latest{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.update_docs:
        _update_docs(table, summary, args.device)
        print(f"updated {DOCS.relative_to(REPO)}")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments; run one side (internal) or the whole benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["small", "base"])
    p.add_argument("--batch", type=int, default=None, help="global batch (default: per shape, 32 / 8)")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=0,
        help="examples per forward/backward on both sides, the global batch reached by gradient accumulation "
        "(default: the whole batch at once); for shapes whose batch does not fit in memory",
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: per shape)")
    p.add_argument(
        "--eval-questions", type=int, default=None, help="dev questions answered (default: per shape)"
    )
    p.add_argument("--eval-batch", type=int, default=None, help="questions per generation batch")
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=["bf16", "fp32"],
        default=None,
        help="precisions to measure, both sides in the same one (the peer with Trainer's bf16=True and "
        "generate under bf16 autocast, or everything in fp32); default: bf16 and fp32 where bf16 is native "
        "(a GPU, or a CPU with AVX512-BF16/AMX), fp32 alone elsewhere",
    )
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help=argparse.SUPPRESS)
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where both sides train and answer (auto: cuda when a GPU is visible, else cpu)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="train steps left out of the train speed on both sides (default: 0 on cpu, 3 on cuda)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=["default"],
        help="softprompt runs to measure against the same peer: default; no-freeze (fp32 weights under "
        "autocast instead of PromptedT5.freeze_to(bf16)); no-lean (transformers' T5 modules instead of the "
        "lean path); no-lean+no-freeze",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each side this many times, alternating the order, and keep each side's best "
        "(use 2+ on a shared machine)",
    )
    p.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        help="before each side, wait until other processes use less than this fraction of the CPUs "
        "(the machine may be shared; 1 disables waiting)",
    )
    p.add_argument("--max-wait", type=float, default=300.0, help="longest wait for --quiet, in seconds")
    p.add_argument(
        "--keep-work", metavar="DIR", help="keep each shape's model, runs and prompt under DIR/<shape>"
    )
    p.add_argument(
        "--update-docs", action="store_true", help="rewrite the results block of docs/performance.md"
    )
    p.add_argument("--side", choices=["softprompt", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--side-output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.micro_batch and args.batch and args.batch % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide --batch {args.batch}")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.warmup_steps is None:
        args.warmup_steps = 3 if args.device == "cuda" else 0
    if args.side:
        result = side_softprompt(args) if args.side == "softprompt" else side_peft(args)
        Path(args.side_output).write_text(json.dumps(result))
    else:
        parent(args)


if __name__ == "__main__":
    main()
