"""A multi-prompt run under `--fsdp` (issue 23: "DDP/FSDP shard every prompt's rows alike"), on CPU with
gloo through torchrun, 2 ranks, a tiny T5.

One `prompts:` config trains two prompts of odd lengths (5 and 3 vectors, so each rank's shard of a prompt
has another number of rows: FSDP pads the uneven ones), with their own seeds and lrs, dropout 0.1 (every
step draws random numbers). Four jobs serve every test: the run under FSDP, the same run under DDP, and the
FSDP run killed (SIGKILL) right after its first checkpoint and resumed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import (
    SQUAD_DEV,
    SQUAD_TRAIN,
    config_only_t5,
    cpu_env,
    kill_ranks_at_first_checkpoint,
    squad_subset,
)

MAX_STEPS = 6
NAMES = ("long", "short")
LENGTHS = {"long": 5, "short": 3}
# Wall-clock values, which no two runs share.
TIMINGS = {"time", "examples_per_second", "train_seconds", "train_examples_per_second"}


@dataclass(frozen=True)
class Runs:
    model: Path
    dev_file: Path
    fsdp: Path  # uninterrupted, --fsdp
    ddp: Path  # uninterrupted, DDP
    resumed: Path  # --fsdp, killed right after its first checkpoint, then --resume
    traces: Path  # the collective traces of the fsdp and ddp runs: <traces>/<run>.rank<R>


def _config(root: Path, model: Path, train: Path, dev: Path) -> Path:
    config = root / "two_prompts.yaml"
    prompts = [
        {"name": "long", "n_tokens": LENGTHS["long"], "seed": 42},
        {"name": "short", "n_tokens": LENGTHS["short"], "seed": 7, "lr": 0.1},
    ]
    config.write_text(
        yaml.safe_dump(
            {
                "prompt_tuning": True,
                "model_name_or_path": str(model),
                "random_init": True,
                "train_file": str(train),
                "validation_file": str(dev),
                "prompts": prompts,
            }
        )
    )
    return config


def _argv(config: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc_per_node", "2", "-m", "softprompt", "train", "--config", str(config),
        "--output_dir", str(out), "--max_source_length", "64", "--max_target_length", "8",
        "--batch_size", "4", "--max_steps", str(MAX_STEPS), "--save_steps", "2", "--eval_steps", "2",
        "--logging_steps", "1", "--save_total_limit", "10", "--dropout", "0.1", "--report_to", "none",
        *extra,
    ]  # fmt: skip


def _run(argv: list[str], log: Path, trace: Path | None = None) -> None:
    env = cpu_env(SOFTPROMPT_TRACE_COLLECTIVES=str(trace)) if trace else cpu_env()
    with log.open("w") as f:
        proc = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("multi-fsdp")
    # HF's random init, not conftest's `save_tiny_t5`: tripled weights make training chaotic (two runs a
    # float rounding apart after one step are 1e-4 apart after two), which would hide what is compared.
    model = config_only_t5(root / "tiny-t5")
    train = squad_subset(SQUAD_TRAIN, root / "train24.json", 24)
    dev = squad_subset(SQUAD_DEV, root / "dev5.json", 5)  # odd: the ranks' dev shards differ in size
    config = _config(root, model, train, dev)
    fsdp, ddp, resumed = root / "fsdp", root / "ddp", root / "resumed"
    traces = root / "traces"
    traces.mkdir()
    _run(_argv(config, fsdp, "--fsdp"), root / "fsdp.log", traces / "fsdp")
    # FSDP runs transformers' T5 modules (the lean T5 reads no sharded weights): so does the DDP run here.
    _run(_argv(config, ddp, "--no_fast_path"), root / "ddp.log", traces / "ddp")
    kill_ranks_at_first_checkpoint(_argv(config, resumed, "--fsdp"), resumed, root / "killed.log")
    assert not (resumed / "results.json").exists()
    _run(_argv(config, resumed, "--fsdp", "--resume"), root / "resumed.log")
    return Runs(model=model, dev_file=dev, fsdp=fsdp, ddp=ddp, resumed=resumed, traces=traces)


def _prompt(directory: Path) -> torch.Tensor:
    return load_file(str(directory / "prompt.safetensors"))["prompt"]


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without `start` records (a resume adds one) and timings."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] != "start":
            out.append({k: v for k, v in record.items() if k not in TIMINGS})
    return out


def _losses(run: Path) -> dict[tuple[int, str], float]:
    return {(r["step"], r["prompt"]): r["loss"] for r in _records(run) if r["event"] == "train"}


@pytest.mark.slow
def test_fsdp_prompts_equal_ddp_prompts_and_are_sharded_by_rows(runs):
    last = runs.fsdp / "last"
    for name in NAMES:
        got, want = _prompt(last / "prompts" / name), _prompt(runs.ddp / "last" / "prompts" / name)
        assert got.shape == (LENGTHS[name], 64)
        # The same rows, dropout masks and updates; only the order of float sums differs: FSDP's backward
        # runs the frozen blocks' matmuls on gathered weights, which BLAS reduces in another order, so a
        # prompt's gradient differs by a few ulps (measured: <= 4e-7 relative at step 1, the prompts 1 ulp
        # after it), and the Adafactor updates carry that to <= 1.1e-5 over 6 steps on values up to 4.5.
        # 5e-5 is 5x that, and 2000x below what the steps after the first checkpoint moved (> 0.1, below).
        torch.testing.assert_close(got, want, atol=5e-5, rtol=0, msg=name)
        torch.testing.assert_close(
            _prompt(runs.fsdp / "best" / name), _prompt(runs.ddp / "best" / name), atol=5e-5, rtol=0
        )
        first = _prompt(runs.fsdp / "checkpoint-0000002" / "prompts" / name)
        assert (got - first).abs().max() > 0.1  # it trained past the first checkpoint
    # The forward passes are the very same computation: every logged loss agrees to float rounding.
    fsdp_losses, ddp_losses = _losses(runs.fsdp), _losses(runs.ddp)
    assert sorted(fsdp_losses) == sorted(ddp_losses) and len(fsdp_losses) == 2 * MAX_STEPS
    for key, loss in fsdp_losses.items():
        assert loss == pytest.approx(ddp_losses[key], rel=1e-6), key
    # Each rank holds its own rows of every prompt (5 = 3 + 2, 3 = 2 + 1) and of their optimizer state,
    # and rank 0 the gathered prompts as ordinary prompt directories.
    shards = [load_file(str(last / f"model_rank{r}.safetensors")) for r in (0, 1)]
    assert {k: v.shape[0] for k, v in shards[0].items()} == {"prompts.0.weight": 3, "prompts.1.weight": 2}
    assert {k: v.shape[0] for k, v in shards[1].items()} == {"prompts.0.weight": 2, "prompts.1.weight": 1}
    for k, name in enumerate(NAMES):
        whole = torch.cat([shards[0][f"prompts.{k}.weight"], shards[1][f"prompts.{k}.weight"]])
        assert torch.equal(whole, _prompt(last / "prompts" / name))
    assert not (last / "optimizer.pt").exists() and (last / "optimizer_rank1.safetensors").is_file()
    groups = json.loads((last / "optimizer_groups.json").read_text())
    assert [g["lr"] for g in groups] == [0.3, 0.1]  # one group per prompt, each its own lr


@pytest.mark.slow
def test_every_rank_ends_its_process_group_threads_before_it_exits(runs):
    """The last thing each rank of a finished FSDP or DDP job does is leave the process group with none of
    the group's threads left (gloo's workers and transport thread): a gloo worker still alive at interpreter
    exit may free a collective's tensors there and abort the rank ("terminate called without an active
    exception") after a run that succeeded, which made torchrun report the job failed now and then."""
    for run in ("fsdp", "ddp"):
        for rank in (0, 1):
            trace = (runs.traces / f"{run}.rank{rank}").read_text().splitlines()
            assert trace[0].startswith("init_process_group gloo world_size=2"), (run, rank, trace[0])
            # Every collective came before it; the model and the mesh released the group, so it is gone.
            assert trace[-1] == "destroy_process_group threads_left=0", (run, rank, trace[-1])
            assert sum(line.startswith("destroy_process_group") for line in trace) == 1, (run, rank)


@pytest.mark.slow
def test_fsdp_killed_mid_run_resumes_bit_identically_for_every_prompt(runs):
    # The resumed run first evaluated step 2 (the kill came during that evaluation), before training on:
    # under FSDP that pass gathers the root unit before any training forward has.
    records = [json.loads(line) for line in (runs.resumed / "metrics.jsonl").read_text().splitlines()]
    restart = max(i for i, r in enumerate(records) if r["event"] == "start")
    after = [(r["event"], r["step"]) for r in records[restart + 1 :]]
    assert after[:2] == [("eval", 2), ("eval", 2)] and after[2] == ("train", 3), after[:3]
    for name in NAMES:
        assert torch.equal(
            _prompt(runs.resumed / "last" / "prompts" / name), _prompt(runs.fsdp / "last" / "prompts" / name)
        )
        assert torch.equal(_prompt(runs.resumed / "best" / name), _prompt(runs.fsdp / "best" / name))
        a = json.loads((runs.resumed / "last" / "prompts" / name / "trainer_state.json").read_text())
        b = json.loads((runs.fsdp / "last" / "prompts" / name / "trainer_state.json").read_text())
        keep = ("step", "epoch", "batch_in_epoch", "examples_seen", "best_step", "best_scores")
        assert {k: a[k] for k in keep} == {k: b[k] for k in keep}
    # Every rank's shards of the prompts and of the optimizer state, and its RNG stream.
    for rank in (0, 1):
        for kind in ("model", "optimizer", "rng"):
            got = load_file(str(runs.resumed / "last" / f"{kind}_rank{rank}.safetensors"))
            want = load_file(str(runs.fsdp / "last" / f"{kind}_rank{rank}.safetensors"))
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), (kind, rank)
    assert _losses(runs.resumed) == _losses(runs.fsdp)
    from softprompt.cli import main

    assert main(["verify", str(runs.resumed)]) == 0


@pytest.mark.slow
def test_fsdp_best_prompt_dirs_hold_the_gathered_prompt_and_load_with_eval(runs, tmp_path, one_thread):
    from softprompt.cli import main

    results = json.loads((runs.fsdp / "results.json").read_text())
    for k, name in enumerate(NAMES):
        best = runs.fsdp / "best" / name
        step = results["prompts"][name]["best_step"]
        assert step in (2, 4, 6)
        # best/<name>/ is the whole prompt of its step: both ranks' shards of it in that checkpoint.
        ckpt = runs.fsdp / f"checkpoint-{step:07d}"
        shards = [load_file(str(ckpt / f"model_rank{r}.safetensors"))[f"prompts.{k}.weight"] for r in (0, 1)]
        assert torch.equal(_prompt(best), torch.cat(shards))
        assert json.loads((best / "prompt_config.json").read_text())["n_tokens"] == LENGTHS[name]
        out = tmp_path / f"{name}.json"
        argv = ["eval", "--model", str(runs.model), "--random_init", "--prompt", str(best),
                "--validation_file", str(runs.dev_file), "--max_new_tokens", "8", "--output", str(out)]  # fmt: skip
        assert main(argv) == 0
        # The gathered prompt, evaluated alone, answers what the sharded run answered at its best step.
        run_answers = json.loads((runs.fsdp / f"predictions_best_{name}.json").read_text())
        assert json.loads(out.read_text()) == run_answers and len(run_answers) == 5


def test_fsdp_without_torchrun_is_one_line_for_a_multi_prompt_run(
    tmp_path, tiny_model_dir, squad_small, capsys
):
    from softprompt.cli import main

    argv = ["train", "--prompt_tuning", "--model_name_or_path", str(tiny_model_dir), "--random_init",
            "--train_file", str(squad_small[0]), "--num_prompts", "2", "--fsdp",
            "--output_dir", str(tmp_path / "run")]  # fmt: skip
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "launch with torchrun" in err[0], err
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything was written
