"""Shared fixtures: where ../shared lives, and tiny random T5 models built from a config."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

# Tiny models are dominated by per-op overhead, where a second thread only adds synchronisation;
# one thread also makes float reductions identical across processes (the DDP equivalence tests).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test touches the network: Hub ids resolve from a local cache or fail fast (subprocesses inherit this).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `--precision auto` (the default) picks bf16 on a CPU with native bf16 and fp32 elsewhere. The tests'
# numbers must not depend on which CPU runs them, so auto means fp32 here (tests/runtime/test_precision.py
# checks the detection itself); subprocesses inherit this.
os.environ.setdefault("SOFTPROMPT_NATIVE_BF16", "0")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SOFTPROMPT_SHARED", REPO.parent / "shared"))
SQUAD_DEV = SHARED / "data" / "squad" / "dev-v1.1.json"
SQUAD_TRAIN = SHARED / "data" / "squad" / "train-v1.1.json"
MRQA_RE = SHARED / "data" / "mrqa" / "RelationExtraction.jsonl"
METRIC_VECTORS = SHARED / "data" / "metric" / "squad_v1.1_vectors.jsonl"
TOKENIZER_DIR = SHARED / "models" / "t5-small-lm-adapt"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module, restored afterwards.

    On a small CPU box shared with other jobs, two intra-op threads spin-wait on each other and
    generation runs up to ~50x slower than with one. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment for a CPU-only subprocess run: one thread, unbuffered, no GPU.

    These runs compare results exactly across processes and use gloo for several ranks on one machine;
    on a GPU machine they would otherwise pick CUDA and NCCL (two ranks on one GPU, other kernels).
    tests/modeling/test_cuda.py covers the GPU paths.
    """
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": "",
        **extra,
    }


def need(path: Path) -> Path:
    """Skip the calling test with a clear reason when a file from ../shared is missing."""
    if not path.exists():
        pytest.skip(
            f"{path} is absent (../shared is not beside the repo; set SOFTPROMPT_SHARED to point at it)"
        )
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """The real T5 SentencePiece tokenizer from ../shared."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(need(TOKENIZER_DIR)))


def tiny_config(**overrides):
    """A T5 1.1-shaped config small enough to train in seconds on 2 CPU cores."""
    from transformers import T5Config

    kwargs = dict(
        vocab_size=32128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return T5Config(**kwargs)


def copy_tokenizer(directory: Path) -> Path:
    """Copy the real T5 tokenizer's files (../shared) into `directory`."""
    import shutil

    src = need(TOKENIZER_DIR)
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, directory / name)
    return directory


def config_only_t5(directory: Path) -> Path:
    """`directory` (made if missing) holding only tiny_config's config.json + tokenizer files, like
    ../shared/models/*: runs build its weights with random_init (HF's random init)."""
    directory.mkdir(parents=True, exist_ok=True)
    tiny_config().save_pretrained(directory)
    return copy_tokenizer(directory)


@pytest.fixture
def tiny_model_dir(tmp_path_factory) -> Path:
    """A directory holding only config.json + tokenizer files (`config_only_t5`): build with random_init."""
    return config_only_t5(tmp_path_factory.mktemp("tiny-t5"))


def squad_subset(src: Path, dest: Path, n: int, skip: int = 0) -> Path:
    """Write the questions skip..skip+n of a SQuAD file as a smaller SQuAD v1.1 file."""
    import json

    data = json.loads(need(src).read_text())
    out, seen = {"version": "1.1", "data": []}, 0
    for article in data["data"]:
        paragraphs = []
        for para in article["paragraphs"]:
            qas = []
            for qa in para["qas"]:
                if skip <= seen < skip + n:
                    qas.append(qa)
                seen += 1
            if qas:
                paragraphs.append({"context": para["context"], "qas": qas})
        if paragraphs:
            out["data"].append({"title": article["title"], "paragraphs": paragraphs})
        if seen >= skip + n:
            break
    dest.write_text(json.dumps(out))
    return dest


@pytest.fixture(scope="session")
def squad_small(tmp_path_factory) -> tuple[Path, Path]:
    """64 real SQuAD train questions and 24 real dev questions."""
    d = tmp_path_factory.mktemp("squad")
    return squad_subset(SQUAD_TRAIN, d / "train64.json", 64), squad_subset(SQUAD_DEV, d / "dev24.json", 24)


def save_tiny_t5(directory: Path) -> Path:
    """A tiny random T5 saved as safetensors + the real tokenizer, whose answers depend on the input.

    HF's random init makes a 2-layer T5 say the same word whatever it reads; tripling every weight
    matrix between the embeddings and the LM head makes its (still meaningless) answers input-specific.
    """
    from transformers import T5ForConditionalGeneration

    need(TOKENIZER_DIR)  # before the model is built: skip early where ../shared is absent
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(tiny_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(("shared", "lm_head", "encoder.embed", "decoder.embed")):
                p.mul_(3.0)
    model.save_pretrained(directory)
    return copy_tokenizer(directory)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's ranks, which run in sessions of their own), sorted."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return sorted(kids)


def process_alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, killed but not yet reaped by torchrun, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kill_ranks_at_first_checkpoint(argv: list[str], out: Path, log: Path) -> None:
    """Start a 2-rank torchrun job and SIGKILL both ranks (then torchrun) the moment `out/last` names its
    first checkpoint, checkpoint-0000002: that is while the ranks evaluate step 2 (generation takes far longer
    than the poll), so nothing records that evaluation and the resumed run must do it before any training."""
    with log.open("w") as f:
        proc = subprocess.Popen(argv, env=cpu_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not (out / "last").is_symlink():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 180 s"
                time.sleep(0.002)  # a poll interval: the checkpoint's appearance triggers the kill
            ranks = child_pids(proc.pid)
            assert len(ranks) == 2, ranks
            for pid in ranks:
                os.kill(pid, signal.SIGKILL)
            while any(
                process_alive(pid) for pid in ranks
            ):  # dead before anything reads their output directory
                time.sleep(0.01)
        finally:
            proc.kill()
            proc.wait()
    assert os.readlink(out / "last") == "checkpoint-0000002", log.read_text()[-3000:]
