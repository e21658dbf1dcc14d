"""Data parallelism, sharded evaluation, FSDP and preemption on CPU with gloo, through torchrun;
and the one place collectives are called from."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from conftest import SQUAD_DEV, SQUAD_TRAIN, child_pids, cpu_env, kill_ranks_at_first_checkpoint, squad_subset

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "softprompt"


def _common(model_dir: Path, train_file: Path, dev_file: Path) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--random_init", "--train_file", str(train_file),
        "--validation_file", str(dev_file), "--dropout", "0", "--max_source_length", "64",
        "--report_to", "none", "--eval_steps", "0", "--save_steps", "0", "--n_tokens", "5",
        "--max_eval_samples", "15",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    # One thread per process: the same float reductions in every process, so results compare exactly.
    return cpu_env()


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc_per_node", str(nproc), "-m", "softprompt", "train", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _single(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "softprompt", "train", *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_accumulation_in_prompt_mode(tmp_path, tiny_model_dir, squad_small):
    common = _common(tiny_model_dir, *squad_small)
    two = _torchrun(
        [
            "--output_dir",
            str(tmp_path / "ddp"),
            "--prompt_tuning",
            "--batch_size",
            "2",
            "--max_steps",
            "5",
            *common,
        ]
    )
    _single(["--output_dir", str(tmp_path / "acc"), "--prompt_tuning", "--batch_size", "2", "--grad_accum_steps", "2", "--max_steps", "5", *common])  # fmt: skip
    assert "global batch 4 = 2 per device x 2 device(s) x 1 accumulation" in two.stdout
    # The results line comes once, from rank 0, not once per rank.
    assert sum(line.startswith('{"exact_match"') for line in two.stdout.splitlines()) == 1, two.stdout
    a = load_file(str(tmp_path / "ddp" / "last" / "prompt.safetensors"))["prompt"]
    b = load_file(str(tmp_path / "acc" / "last" / "prompt.safetensors"))["prompt"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    from softprompt.modeling.model import load_t5
    from softprompt.modeling.prompt import initial_prompt

    emb = load_t5(tiny_model_dir, random_init=True, seed=42).shared.weight
    assert (a - initial_prompt("sampled_vocab", 5, emb, seed=42)).abs().max() > 1e-2  # it trained
    # Sharded evaluation: 15 dev questions (odd) over 2 ranks, each scored once, same as 1 rank.
    pa = json.loads((tmp_path / "ddp" / "predictions_step5.json").read_text())
    pb = json.loads((tmp_path / "acc" / "predictions_step5.json").read_text())
    assert len(pa) == 15 and pa == pb
    ra = json.loads((tmp_path / "ddp" / "results.json").read_text())
    rb = json.loads((tmp_path / "acc" / "results.json").read_text())
    assert (ra["exact_match"], ra["f1"], ra["world_size"]) == (rb["exact_match"], rb["f1"], 2)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_accumulation_in_fine_tune_mode(tmp_path, tiny_model_dir, squad_small):
    common = [*_common(tiny_model_dir, *squad_small), "--optimizer", "adafactor", "--lr", "1e-3"]
    _torchrun(["--output_dir", str(tmp_path / "ddp"), "--batch_size", "2", "--max_steps", "5", *common])
    _single(["--output_dir", str(tmp_path / "acc"), "--batch_size", "2", "--grad_accum_steps", "2", "--max_steps", "5", *common])  # fmt: skip
    a = load_file(str(tmp_path / "ddp" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "acc" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    # and training did move the weights
    from softprompt.modeling.model import load_t5

    fresh = load_t5(tiny_model_dir, random_init=True, seed=42).state_dict()
    assert any(not torch.equal(a[k], fresh[k]) for k in a if k in fresh)


@pytest.mark.slow
def test_fsdp_prompt_tuning_resumes_bit_identical(tmp_path, tiny_model_dir, squad_small):
    common = [
        *_common(tiny_model_dir, *squad_small),
        "--fsdp",
        "--prompt_tuning",
        "--batch_size",
        "2",
        "--save_steps",
        "2",
    ]
    _torchrun(["--output_dir", str(tmp_path / "a"), "--max_steps", "3", *common])
    assert (tmp_path / "a" / "last" / "model_rank1.safetensors").exists()
    _torchrun(["--output_dir", str(tmp_path / "a"), "--resume", "--max_steps", "5", *common])
    _torchrun(["--output_dir", str(tmp_path / "b"), "--max_steps", "5", *common])
    a = load_file(str(tmp_path / "a" / "last" / "prompt.safetensors"))["prompt"]
    b = load_file(str(tmp_path / "b" / "last" / "prompt.safetensors"))["prompt"]
    assert torch.equal(a, b)
    state = json.loads((tmp_path / "a" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 5


@pytest.mark.slow
def test_fsdp_fine_tuning_exports_a_normal_hf_model(tmp_path, tiny_model_dir, squad_small):
    common = [*_common(tiny_model_dir, *squad_small), "--fsdp", "--batch_size", "2", "--lr", "1e-3"]
    _torchrun(["--output_dir", str(tmp_path / "ft"), "--max_steps", "2", "--eval_steps", "2", *common])
    from softprompt.modeling.model import load_t5

    best = load_t5(tmp_path / "ft" / "best")  # a plain HF directory, safetensors
    shard0 = load_file(str(tmp_path / "ft" / "last" / "model_rank0.safetensors"))
    full = best.state_dict()
    name = "model.encoder.block.0.layer.0.SelfAttention.q.weight"
    local = shard0[name]
    assert local.shape[0] == full[name.removeprefix("model.")].shape[0] // 2  # really sharded
    torch.testing.assert_close(local, full[name.removeprefix("model.")][: local.shape[0]])


# ------------------------------------------------------------------- one helper for every collective

# torch.distributed's collectives (c10d), which need a tensor on a device the group's backend serves.
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
    "all_to_all_single", "barrier", "monitored_barrier", "broadcast", "broadcast_object_list", "gather",
    "gather_object", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "all_reduce_coalesced",
}  # fmt: skip
HELPERS = {"_all_reduce", "gather_objects", "broadcast_object", "barrier"}


def _collective_calls(source: str) -> list[tuple[str, int, str]]:
    """(function, line, collective) for every c10d collective a module's source calls, by `dist.X(...)`,
    `torch.distributed.X(...)` or a name imported from torch.distributed."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"}
    direct: dict[str, str] = {}  # local name -> collective
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            direct |= {a.asname or a.name: a.name for a in node.names if a.name in COLLECTIVES}
    found = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in aliases:
                found.append((function, node.lineno, f.attr))
            elif isinstance(f, ast.Name) and f.id in direct:
                found.append((function, node.lineno, direct[f.id]))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def test_every_collective_goes_through_the_one_helper_in_distributed_py():
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 15
    outside = {
        f"{p.name}:{line} {name} in {fn}()"
        for p in modules
        if p.name != "distributed.py"
        for fn, line, name in _collective_calls(p.read_text())
    }
    assert not outside, f"collectives outside softprompt.runtime.distributed's helpers: {sorted(outside)}"
    inside = _collective_calls((SRC / "runtime" / "distributed.py").read_text())
    assert {name for _, _, name in inside} == {
        "all_reduce",
        "all_gather_object",
        "broadcast_object_list",
        "barrier",
    }
    assert {fn for fn, _, _ in inside} <= HELPERS, inside
    # The checker itself sees each spelling it must catch.
    probe = (
        "import torch.distributed as d\nfrom torch.distributed import broadcast as b\n"
        "def f(x):\n    d.all_reduce(x)\n    b(x, 0)\n    torch.distributed.barrier()\n"
    )
    assert [(fn, name) for fn, _, name in _collective_calls(probe)] == [
        ("f", "all_reduce"),
        ("f", "broadcast"),
        ("f", "barrier"),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_environment_joins_a_group_even_with_one_rank(monkeypatch, tmp_path):
    from softprompt.runtime import distributed as d

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(d.TRACE_ENV, str(tmp_path / "trace"))
    plain = d.init_distributed()  # a plain `softprompt` process: no group, every helper a no-op
    assert not plain.distributed and not torch.distributed.is_initialized()
    x = torch.tensor([3])
    assert d.all_reduce_sum(x, plain) is x and d.gather_objects("a", plain) == ["a"]
    assert not list(tmp_path.iterdir())

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    env = d.init_distributed()
    try:
        assert env.distributed and env.world_size == 1 and torch.distributed.is_initialized()
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        assert torch.distributed.get_backend() == backend
        # CPU inputs come back summed on the device the backend serves; the input is left alone.
        total = d.all_reduce_sum(x, env)
        assert total.device == env.device and total.tolist() == [3] and total is not x
        assert d.all_reduce_max(torch.tensor([15.0]), env).item() == 15.0
        assert d.gather_objects({"q": "a"}, env) == [{"q": "a"}]
        assert d.broadcast_object("tmp-dir", env) == "tmp-dir"
        d.barrier(env)
    finally:
        d.cleanup()
    assert not torch.distributed.is_initialized()
    assert (tmp_path / "trace.rank0").read_text().splitlines() == [
        f"init_process_group {backend} world_size=1 rank=0",
        "all_reduce_sum",
        "all_reduce_max",
        "gather_objects",
        "broadcast_object",
        "barrier",
        "destroy_process_group threads_left=0",  # left the group, its gloo threads stopped
    ]


def test_backward_runs_outside_autocast_and_the_token_count_is_exact(monkeypatch):
    """bf16 autocast wraps the forward only; the token count is summed as an integer."""
    from transformers import T5ForConditionalGeneration

    from conftest import tiny_config
    from softprompt.data.batching import Collator, Features
    from softprompt.modeling.model import PromptedT5
    from softprompt.modeling.prompt import SoftPrompt
    from softprompt.runtime.distributed import DistEnv
    from softprompt.training.loop import accumulate_gradients

    torch.manual_seed(0)
    model = PromptedT5(T5ForConditionalGeneration(tiny_config()), SoftPrompt(4, 64))
    feats = [Features(input_ids=[5 + i, 7, 1], labels=[9] * (i + 1) + [1], example_index=i) for i in range(4)]
    collate = Collator()
    seen: list[bool] = []
    backward = torch.Tensor.backward

    def recording_backward(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", recording_backward)
    forward_autocast: list[bool] = []
    model.register_forward_pre_hook(lambda *_: forward_autocast.append(torch.is_autocast_enabled("cpu")))
    loss, tokens = accumulate_gradients(model, [collate(feats[:2]), collate(feats[2:])], DistEnv(), True)
    assert forward_autocast == [True, True] and seen == [False, False]
    assert tokens == 2 + 3 + 4 + 5 and isinstance(tokens, float) and loss > 0
    assert model.prompt.weight.grad is not None and model.prompt.weight.grad.dtype == torch.float32


def test_fsdp_without_torchrun_is_one_clear_error(tmp_path, tiny_model_dir, squad_small, capsys):
    from softprompt.cli import main

    out = tmp_path / "run"
    rc = main(["train", *_common(tiny_model_dir, *squad_small), "--fsdp", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "launch with torchrun" in err[0] and "--fsdp" in err[0], err
    assert not torch.distributed.is_initialized() and not list(out.glob("checkpoint-*"))


# --------------------------------------------------------- train -> eval -> checkpoint -> SIGTERM -> resume

MAX_STEPS = 10


@pytest.fixture(scope="module")
def preempt_data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("preempt-data")
    return squad_subset(SQUAD_TRAIN, d / "train24.json", 24), squad_subset(SQUAD_DEV, d / "dev5.json", 5)


def _preempt_args(
    model_dir: Path, data: tuple[Path, Path], out: Path, *extra: str, max_steps: int = MAX_STEPS
) -> list[str]:
    # Dropout 0.1 draws random numbers every step, so only each rank's restored stream resumes exactly.
    return [
        "train", "--output_dir", str(out), "--prompt_tuning", "--model_name_or_path", str(model_dir),
        "--random_init", "--train_file", str(data[0]), "--validation_file", str(data[1]),
        "--max_source_length", "64", "--max_target_length", "8", "--n_tokens", "4", "--batch_size", "4",
        "--max_steps", str(max_steps), "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1",
        "--dropout", "0.1", "--report_to", "none", *extra,
    ]  # fmt: skip


def _torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc_per_node", str(nproc), "-m", "softprompt", *args,
    ]  # fmt: skip


def _preempt(
    cmd: list[str], out: Path, log: Path, env: dict[str, str], *, signal_workers: bool
) -> tuple[int, str]:
    """Start a torchrun job and SIGTERM it once its first checkpoint exists: the launcher itself (as
    a scheduler does; torchrun forwards the signal to every worker) or its workers directly.

    Returns:
        torchrun's exit code and its output (the workers' output included).
    """
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=f)
        try:
            deadline = time.monotonic() + 180
            while not (out / "last").is_symlink():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 180 s"
                time.sleep(0.005)
            targets = child_pids(proc.pid) if signal_workers else [proc.pid]
            assert targets and proc.poll() is None, (
                f"the job ended before it could be preempted: {log.read_text()[-3000:]}"
            )
            for pid in targets:
                os.kill(pid, signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, log.read_text()


def _stopped_at(text: str, ranks: int) -> int:
    steps = re.findall(r"^softprompt: stopped by SIGTERM at step (\d+); continue with --resume$", text, re.M)
    assert len(steps) == ranks and len(set(steps)) == 1, text[-5000:]  # every rank, at the same step
    step = int(steps[0])
    assert 2 <= step < MAX_STEPS, f"stopped at step {step}: the run was not preempted mid-way"
    return step


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {e["step"]: e["loss"] for e in map(json.loads, lines) if e["event"] == "train"}


def _trace_ops(trace: Path, rank: int) -> list[str]:
    return (trace.parent / f"{trace.name}.rank{rank}").read_text().splitlines()


def one_rank_preempt_and_resume(
    tmp: Path, model_dir: Path, data: tuple[Path, Path], env: Callable[..., dict[str, str]], backend: str
) -> tuple[Path, Path]:
    """A 1-rank torchrun job trains, evaluates, checkpoints, is SIGTERMed and resumed; a plain process
    runs the same job uninterrupted. Checks the torchrun job joined a `backend` group and ran every
    collective in it, and that the plain one joined none. Returns the two output directories.

    Shared with tests/modeling/test_cuda.py, which runs it with NCCL.
    """
    out, plain_out = tmp / "torchrun", tmp / "plain"
    trace = tmp / "trace"
    traced = env(SOFTPROMPT_TRACE_COLLECTIVES=str(trace))
    cmd = _torchrun_cmd(1, _preempt_args(model_dir, data, out))
    rc, text = _preempt(cmd, out, tmp / "torchrun.log", traced, signal_workers=True)
    step = _stopped_at(text, ranks=1)
    assert rc != 0 and re.search(r"exitcode\s*:\s*143\b", text), text[-3000:]  # the worker exited 128 + 15
    assert os.readlink(out / "last") == f"checkpoint-{step:07d}" and not (out / "results.json").exists()
    # The group was joined with one rank and every collective ran in it: train (token count), eval
    # (answers gathered), checkpoint (directory broadcast, barriers), the stop signal (max).
    ops = _trace_ops(trace, 0)
    assert ops[0] == f"init_process_group {backend} world_size=1 rank=0"
    # A preempted rank, too, leaves the group last (under gloo with none of its threads left).
    assert ops[-1] == "destroy_process_group threads_left=0", ops[-1]
    assert set(ops[1:-1]) == {
        "all_reduce_sum",
        "all_reduce_max",
        "gather_objects",
        "broadcast_object",
        "barrier",
    }
    assert ops.count("all_reduce_max") == step  # one stop-signal vote per step

    resume = _torchrun_cmd(1, ["train", "--output_dir", str(out), "--resume"])
    proc = subprocess.run(resume, env=traced, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _trace_ops(trace, 0).count(f"init_process_group {backend} world_size=1 rank=0") == 2

    # The reference: the same job uninterrupted in a plain process (this one, which torchrun did not start).
    from softprompt.cli import main

    plain_trace = tmp / "plain-trace"
    with mock.patch.dict(os.environ, {"SOFTPROMPT_TRACE_COLLECTIVES": str(plain_trace)}):
        assert main(_preempt_args(model_dir, data, plain_out)) == 0
    assert not list(tmp.glob("plain-trace*"))  # no group, so no collective ran
    assert sorted(_losses(out)) == list(range(1, MAX_STEPS + 1))
    got = json.loads((out / "results.json").read_text())
    assert (got["steps"], got["world_size"]) == (MAX_STEPS, 1)
    return out, plain_out


@pytest.mark.slow
def test_one_rank_torchrun_joins_the_group_and_preempts_and_resumes_like_a_plain_run(
    tmp_path, tiny_model_dir, preempt_data
):
    out, plain = one_rank_preempt_and_resume(tmp_path, tiny_model_dir, preempt_data, cpu_env, "gloo")
    # Rank 0 draws the seed's own dropout masks and DDP over one rank changes no gradient, so the
    # preempted-and-resumed torchrun job ends exactly where the uninterrupted plain process ends.
    for name in ("last", "best"):
        a = load_file(str(out / name / "prompt.safetensors"))["prompt"]
        b = load_file(str(plain / name / "prompt.safetensors"))["prompt"]
        assert torch.equal(a, b), name
    assert _losses(out) == _losses(plain)
    got, want = (json.loads((r / "results.json").read_text()) for r in (out, plain))
    assert (got["best_step"], got["exact_match"], got["f1"]) == (
        want["best_step"],
        want["exact_match"],
        want["f1"],
    )


@pytest.mark.slow
def test_two_ranks_preempted_through_torchrun_stop_together_and_resume(
    tmp_path, tiny_model_dir, preempt_data
):
    out = tmp_path / "run"
    trace = tmp_path / "trace"
    args = _preempt_args(tiny_model_dir, preempt_data, out)
    traced = cpu_env(SOFTPROMPT_TRACE_COLLECTIVES=str(trace))
    rc, text = _preempt(_torchrun_cmd(2, args), out, tmp_path / "run.log", traced, signal_workers=False)
    assert rc != 0
    step = _stopped_at(text, ranks=2)
    last = out / "last"
    assert os.readlink(last) == f"checkpoint-{step:07d}"
    assert json.loads((last / "trainer_state.json").read_text())["step"] == step
    # Each rank draws its own dropout masks: their saved generator states differ.
    rng = [load_file(str(last / f"rng_rank{r}.safetensors"))["torch_cpu"] for r in (0, 1)]
    assert not torch.equal(rng[0], rng[1])
    # Both ranks joined one 2-rank group and ran the very same collectives, in the same order.
    ops = [_trace_ops(trace, r) for r in (0, 1)]
    assert ops[0][0] == "init_process_group gloo world_size=2 rank=0"
    assert ops[1][0] == "init_process_group gloo world_size=2 rank=1"
    assert ops[0][1:] == ops[1][1:] and ops[0].count("all_reduce_max") == step
    # Stopped by the signal, each rank still left the group last with none of its gloo threads left.
    assert ops[0][-1] == "destroy_process_group threads_left=0", ops[0][-1]

    resume = subprocess.run(
        _torchrun_cmd(2, ["train", "--output_dir", str(out), "--resume"]),
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resume.returncode == 0, resume.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (results["steps"], results["world_size"]) == (MAX_STEPS, 2)
    assert sorted(_losses(out)) == list(range(1, MAX_STEPS + 1))
    # Sharded evaluation: all 5 dev questions (odd, so the shards differ in size) answered once.
    final = json.loads((out / f"predictions_step{MAX_STEPS}.json").read_text())
    assert len(final) == 5
    assert os.readlink(out / "last") == f"checkpoint-{MAX_STEPS:07d}"


@pytest.mark.slow
def test_fsdp_killed_during_an_evaluation_resumes_by_evaluating_first_bit_identically(
    tmp_path, tiny_model_dir, preempt_data
):
    """A single-prompt --fsdp job killed between a checkpoint and its evaluation: the resumed run evaluates
    before any training forward (under FSDP that pass gathers the root unit before its first forward has
    run), then trains on to where an uninterrupted run ends, bit for bit."""
    steps = 4

    def args(out: Path, *extra: str) -> list[str]:
        return _preempt_args(tiny_model_dir, preempt_data, out, "--fsdp", *extra, max_steps=steps)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    kill_ranks_at_first_checkpoint(_torchrun_cmd(2, args(killed)), killed, tmp_path / "killed.log")
    assert not (killed / "predictions_step2.json").exists()  # the kill came before the evaluation ended
    for out, extra in ((killed, ("--resume",)), (whole, ())):
        proc = subprocess.run(
            _torchrun_cmd(2, args(out, *extra)), env=cpu_env(), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    restart = max(i for i, r in enumerate(records) if r["event"] == "start")
    after = [(r["event"], r["step"]) for r in records[restart + 1 :]]
    assert after[:2] == [("eval", 2), ("train", 3)], after[:2]  # it evaluated step 2 first
    for name in ("last", "best"):
        got = load_file(str(killed / name / "prompt.safetensors"))["prompt"]
        assert torch.equal(got, load_file(str(whole / name / "prompt.safetensors"))["prompt"]), name
    a, b = (json.loads((r / "last" / "trainer_state.json").read_text()) for r in (killed, whole))
    keep = ("step", "epoch", "batch_in_epoch", "examples_seen", "best_step", "best_scores")
    assert {k: a[k] for k in keep} == {k: b[k] for k in keep} and a["step"] == steps
    # Every rank's shard of the prompt and of the optimizer state, and its RNG stream.
    for rank in (0, 1):
        for kind in ("model", "optimizer", "rng"):
            got = load_file(str(killed / "last" / f"{kind}_rank{rank}.safetensors"))
            want = load_file(str(whole / "last" / f"{kind}_rank{rank}.safetensors"))
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), (kind, rank)
    assert _losses(killed) == _losses(whole) and sorted(_losses(whole)) == list(range(1, steps + 1))
    preds = [json.loads((r / "predictions_step2.json").read_text()) for r in (killed, whole)]
    assert preds[0] == preds[1] and len(preds[0]) == 5


SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "dist_train.sh"


def test_dist_train_header_example_is_complete_and_bad_flags_are_one_line_before_any_rank(tmp_path):
    """The launch line in dist_train.sh's header parses as written (it names its data); a launch without
    data is refused once, in one line, with exit 2 and no torchrun traceback."""
    import shlex

    from softprompt.commands.train import parse_args

    header = [line[1:].strip() for line in SCRIPT.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(header) if line.startswith("scripts/dist_train.sh"))
    command = header[start]
    while command.endswith("\\"):
        start += 1
        command = command[:-1] + " " + header[start]
    words = shlex.split(command)[1:]
    words[words.index("--output_dir") + 1] = str(tmp_path / "run")
    cfg = parse_args(words)
    assert cfg.dataset_name == "squad" and cfg.lr == 0.3 and cfg.prompt_tuning
    env = {**_env(), "NPROC": "2"}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--output_dir", str(tmp_path / "run"), "--prompt_tuning"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "give --train_file" in lines[0] and "Traceback" not in proc.stderr + proc.stdout


def test_errors_and_results_are_told_by_rank_zero_only(monkeypatch, tmp_path, capsys):
    """Every torchrun rank meets the same bad input: rank 0 says it, the others only exit non-zero."""
    from softprompt.cli import main

    argv = ["verify", str(tmp_path / "nowhere")]
    for rank, told in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert main(argv) != 0
        assert bool(capsys.readouterr().err.strip()) is told
