"""Reliability: killed and preempted runs resume bit-identically, and hostile inputs are refused cleanly.

Runs that must survive a real SIGKILL/SIGTERM go through a `python -m softprompt train` subprocess; the
rest call `softprompt.cli.main` in-process (cheaper), which is exactly what the console script runs.
Every run uses the tiny random T5 from conftest, so the whole file takes a couple of minutes on 2 cores.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SQUAD_DEV, SQUAD_TRAIN, config_only_t5, cpu_env, squad_subset, tiny_config
from softprompt.cli import main
from softprompt.io.checkpoint import PromptConfig, load_prompt, save_prompt
from softprompt.modeling.model import PromptedT5

SRC = Path(__file__).resolve().parents[2] / "src" / "softprompt"
CHECKPOINT_FILES = {
    "trainer_state.json",
    "prompt.safetensors",
    "prompt_config.json",
    "optimizer.pt",
    "rng_rank0.safetensors",
}
MAX_STEPS = 12


# ------------------------------------------------------------------------------------------ helpers


def _env() -> dict[str, str]:
    # One thread per process: every run reduces floats in the same order, and the shared box stays usable.
    return cpu_env(MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@dataclass(frozen=True)
class Setup:
    """The tiny model and data every subprocess run uses, and the uninterrupted reference run."""

    model_dir: Path
    train_file: Path
    dev_file: Path
    reference: Path


def _train_argv(s: Setup, out: Path) -> list[str]:
    # 24 examples in batches of 4: 6 steps an epoch, so 12 steps cross an epoch boundary. Dropout 0.1
    # (T5 1.1's own rate; the tiny config has 0) makes every step draw random numbers, so only a
    # restored RNG state can reproduce the run.
    return [
        sys.executable, "-m", "softprompt", "train", "--output_dir", str(out), "--prompt_tuning",
        "--model_name_or_path", str(s.model_dir), "--random_init", "--train_file", str(s.train_file),
        "--validation_file", str(s.dev_file), "--max_source_length", "64", "--max_target_length", "8",
        "--n_tokens", "8", "--batch_size", "4", "--max_steps", str(MAX_STEPS), "--save_steps", "2",
        "--eval_steps", "4", "--logging_steps", "1", "--dropout", "0.1", "--report_to", "none",
    ]  # fmt: skip


def _resume_argv(out: Path) -> list[str]:
    """`--output_dir DIR --resume` alone: the CLI reads the rest from DIR/config.yaml."""
    return [sys.executable, "-m", "softprompt", "train", "--output_dir", str(out), "--resume"]


def _run_to_end(argv: list[str], log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run(argv, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]


def _kill_when(argv: list[str], out: Path, condition: Callable[[int], bool], log: Path) -> bool:
    """Start a run and SIGKILL it the moment `condition(pid)` holds; False if the run ended first."""
    with log.open("w") as f:
        proc = subprocess.Popen(argv, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        try:
            while proc.poll() is None:
                if condition(proc.pid):
                    proc.kill()
                    proc.wait()
                    return True
                assert time.monotonic() < deadline, "the run neither reached the kill point nor ended"
                # Poll slowly while Python starts, then fast enough to land inside a checkpoint write.
                time.sleep(0.0002 if (out / "config.yaml").exists() else 0.01)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return False


def _last_step(out: Path) -> int:
    """The step of the checkpoint `last` names, or -1 (no `last` yet, or it is being replaced)."""
    try:
        return int(os.readlink(out / "last").removeprefix("checkpoint-"))
    except (FileNotFoundError, ValueError):
        return -1


def _tmp_checkpoints(out: Path, pid: int | None = None) -> list[str]:
    """Unfinished checkpoint writes: `.tmp-checkpoint-<step>-<pid>` directories (of `pid` if given)."""
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return []
    return [n for n in names if n.startswith(".tmp-checkpoint-") and (pid is None or n.endswith(f"-{pid}"))]


def _assert_consistent(out: Path) -> None:
    """Every visible checkpoint is complete, and `last` names one of them (never a temporary)."""
    for d in out.glob("checkpoint-*"):
        assert {p.name for p in d.iterdir()} >= CHECKPOINT_FILES, f"{d.name} is incomplete"
        state = json.loads((d / "trainer_state.json").read_text())
        assert state["step"] == int(d.name.removeprefix("checkpoint-"))
    if (out / "last").is_symlink():
        target = os.readlink(out / "last")
        assert re.fullmatch(r"checkpoint-\d{7}", target), target
        assert {p.name for p in (out / target).iterdir()} >= CHECKPOINT_FILES
        assert load_file(str(out / "last" / "prompt.safetensors"))["prompt"].isfinite().all()
    if (out / "best").exists():
        assert {"prompt.safetensors", "prompt_config.json"} <= {p.name for p in (out / "best").iterdir()}


def _events(run: Path) -> list[dict]:
    """metrics.jsonl's records (a kill in mid-write may leave one partial line, which the log tolerates)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def _train_steps(run: Path) -> list[int]:
    return [e["step"] for e in _events(run) if e["event"] == "train"]


def _losses(run: Path) -> dict[int, float]:
    """Train loss by step; a step re-done after a resume keeps its latest record."""
    return {e["step"]: e["loss"] for e in _events(run) if e["event"] == "train"}


def _assert_same_run(run: Path, reference: Path) -> None:
    """The resumed run ended exactly where the uninterrupted one did, bit for bit."""
    for name in ("last", "best"):
        got = load_file(str(run / name / "prompt.safetensors"))["prompt"]
        want = load_file(str(reference / name / "prompt.safetensors"))["prompt"]
        assert torch.equal(got, want), f"{name}/prompt differs by {(got - want).abs().max().item()}"
    got, want = (json.loads((r / "results.json").read_text()) for r in (run, reference))
    for key in ("steps", "best_step", "exact_match", "f1", "skipped_nonfinite"):
        assert got[key] == want[key], key
    # Same data order, dropout masks and optimizer state at every step, not just the same end point.
    assert _losses(run) == _losses(reference)
    assert os.readlink(run / "last") == f"checkpoint-{MAX_STEPS:07d}"
    # save_total_limit 2: the same two newest checkpoints survive, beside best/.
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-0000010", "checkpoint-0000012"]
    assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".old-"))]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Setup:
    """Tiny model, 24 train and 4 dev questions, and one uninterrupted reference run (subprocess)."""
    root = tmp_path_factory.mktemp("reliability")
    s = Setup(
        model_dir=config_only_t5(root / "tiny-t5"),
        train_file=squad_subset(SQUAD_TRAIN, root / "train24.json", 24),
        dev_file=squad_subset(SQUAD_DEV, root / "dev4.json", 4),
        reference=root / "reference",
    )
    _run_to_end(_train_argv(s, s.reference), root / "reference.log")
    return s


# ------------------------------------------------------------------------------- crash safety


def test_sigkill_at_three_points_then_resume_is_bit_identical(tiny_run, tmp_path):
    out = tmp_path / "run"

    # 1. Before the first checkpoint: killed once step 1 is logged (the first save comes at step 2).
    assert _kill_when(
        _train_argv(tiny_run, out), out, lambda pid: bool(_train_steps(out)), tmp_path / "1.log"
    )
    assert not list(out.glob("checkpoint-*")) and not (out / "last").is_symlink()
    _assert_consistent(out)

    # 2. Mid-run: resumed (with the run's full flags plus --resume, as a job script would) from
    # scratch, and killed once `last` names a checkpoint past the first evaluation.
    argv = [*_train_argv(tiny_run, out), "--resume"]
    assert _kill_when(argv, out, lambda pid: _last_step(out) >= 4, tmp_path / "2.log")
    assert 4 <= _last_step(out) < MAX_STEPS and not (out / "results.json").exists()
    _assert_consistent(out)

    # 3. During a checkpoint write: killed as soon as the run's `.tmp-checkpoint-*` directory appears.
    # If the kill lands just after the rename, the run is resumed and caught at a later write.
    for attempt in range(4):
        before = _last_step(out)
        assert _kill_when(
            _resume_argv(out),
            out,
            lambda pid: bool(_tmp_checkpoints(out, pid)),
            tmp_path / f"3.{attempt}.log",
        ), "the run finished before a checkpoint write could be interrupted"
        stale = _tmp_checkpoints(out)
        if stale:
            break
    else:
        pytest.fail("no kill landed inside a checkpoint write")
    _assert_consistent(out)
    assert _last_step(out) >= before  # `last` still names the previous complete checkpoint

    # 4. Resume to the end: the stale temporary is cleared, never used, and the run matches.
    _run_to_end(_resume_argv(out), tmp_path / "4.log")
    assert not set(stale) & set(os.listdir(out))
    _assert_consistent(out)
    _assert_same_run(out, tiny_run.reference)
    # Steps redone after a kill are logged once: each resume dropped what came after its checkpoint.
    assert _train_steps(out) == list(range(1, MAX_STEPS + 1))


def test_sigterm_saves_a_checkpoint_exits_143_and_resume_is_bit_identical(tiny_run, tmp_path):
    out, log = tmp_path / "run", tmp_path / "term.log"

    with log.open("w") as f:
        proc = subprocess.Popen(_train_argv(tiny_run, out), env=_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None and len(_train_steps(out)) < 3:
                time.sleep(0.005)
            assert proc.poll() is None, "the run ended before it could be preempted"
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert rc == 128 + signal.SIGTERM == 143, text[-2000:]
    assert "Traceback" not in text
    stopped = re.fullmatch(
        r"softprompt: stopped by SIGTERM at step (\d+); continue with --resume", text.strip().splitlines()[-1]
    )
    assert stopped, text[-2000:]
    step = int(stopped.group(1))
    assert 3 <= step < MAX_STEPS and _last_step(out) == step and not (out / "results.json").exists()
    # metrics.jsonl says the run was stopped, by which signal, at which step.
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["signal"]) for e in events if e["event"] == "stop"] == [(step, "SIGTERM")]
    _assert_consistent(out)

    _run_to_end(_resume_argv(out), tmp_path / "resume.log")
    _assert_same_run(out, tiny_run.reference)


# ----------------------------------------------------------------------- in-process training


def _train_args(model_dir: Path, train_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--output_dir", str(out), "--prompt_tuning", "--model_name_or_path", str(model_dir),
        "--random_init", "--train_file", str(train_file), "--max_source_length", "64", "--n_tokens", "4",
        "--batch_size", "4", "--save_steps", "2", "--eval_steps", "0", "--logging_steps", "1",
        "--report_to", "none", *extra,
    ]  # fmt: skip


def _on_forward_call(monkeypatch, call: int, action: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make the `call`-th training forward (1-based; one per step here) return `action(loss)`."""
    original = PromptedT5.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        calls[0] += 1
        return action(loss) if calls[0] == call else loss

    monkeypatch.setattr(PromptedT5, "forward", forward)


def _one_error_line(err: str, command: str) -> str:
    """The single `softprompt CMD: error:` line of stderr (progress bars may precede it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"softprompt {command}: error: ") and err.strip().endswith(lines[0])
    return lines[0]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tiny_model_dir, squad_small, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    _on_forward_call(monkeypatch, 5, lambda loss: loss * float("nan"))
    rc = main(_train_args(tiny_model_dir, squad_small[0], out, "--max_steps", "8"))
    line = _one_error_line(capsys.readouterr().err, "train")
    assert rc == 3
    assert "the loss became nan at step 5" in line and str(out / "last") in line
    # The last good checkpoint (step 4) is complete and untouched; nothing of step 5 was written.
    assert (
        _last_step(out) == 4 and sorted(p.name for p in out.glob("checkpoint-*"))[-1] == "checkpoint-0000004"
    )
    assert not (out / "results.json").exists()
    _assert_consistent(out)
    weight, config = load_prompt(out / "last", expect_d_model=64)
    assert weight.isfinite().all() and config.extra["step"] == 4
    # ... and it resumes: the run then finishes normally.
    monkeypatch.undo()
    assert main(["train", "--output_dir", str(out), "--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 8


def test_skip_nonfinite_skips_and_counts_the_step(tiny_model_dir, squad_small, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _on_forward_call(monkeypatch, 3, lambda loss: loss * float("inf"))
    argv = _train_args(tiny_model_dir, squad_small[0], out, "--max_steps", "5", "--skip_nonfinite")
    assert main([*argv, "--save_steps", "1", "--save_total_limit", "10"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["skipped_nonfinite"] == 1 and results["steps"] == 5
    prompts = [
        load_file(str(out / f"checkpoint-{s:07d}" / "prompt.safetensors"))["prompt"] for s in (2, 3, 4)
    ]
    assert torch.equal(prompts[0], prompts[1])  # the skipped step 3 changed nothing...
    assert not torch.equal(prompts[1], prompts[2])  # ...while the steps around it trained
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["skipped_nonfinite"] for e in events if e["event"] == "train"] == [0, 0, 1, 1, 1]


def _steps_since_last_start(run: Path) -> list[int]:
    """The train steps the latest process of a run logged: where a resume really continued from."""
    events = _events(run)
    last_start = max(i for i, e in enumerate(events) if e["event"] == "start")
    return [e["step"] for e in events[last_start:] if e["event"] == "train"]


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals need the main thread"
)
def test_sigint_checkpoints_once_and_resume_survives_a_kill_between_renames(
    tiny_model_dir, squad_small, tmp_path, capsys, monkeypatch
):
    import softprompt.training.loop as train_module

    def args(out: Path) -> list[str]:
        return _train_args(tiny_model_dir, squad_small[0], out, "--max_steps", "6", "--dropout", "0.1")

    reference = tmp_path / "reference"
    assert main(args(reference)) == 0

    # Ctrl-C during step 4, a scheduled save step: that one checkpoint is the preemption checkpoint too.
    out = tmp_path / "run"
    saves: list[int] = []
    save = train_module.save_checkpoint
    monkeypatch.setattr(
        train_module, "save_checkpoint", lambda run: saves.append(run.state.step) or save(run)
    )

    def interrupt(loss: torch.Tensor) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGINT)
        return loss

    _on_forward_call(monkeypatch, 4, interrupt)
    capsys.readouterr()
    rc = main(args(out))
    err = capsys.readouterr().err
    assert rc == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "softprompt: stopped by SIGINT at step 4; continue with --resume"
    assert saves == [2, 4] and _last_step(out) == 4
    _assert_consistent(out)
    monkeypatch.undo()

    # A kill between the two renames of a same-step re-save leaves `last` dangling and the complete
    # copy aside as `.old-checkpoint-*`: the next start puts it back and continues from step 4.
    dangling = tmp_path / "dangling"
    shutil.copytree(out, dangling, symlinks=True)
    os.replace(out / "checkpoint-0000004", out / ".old-checkpoint-0000004-12345")
    assert not (out / "last").exists()
    assert main(["train", "--output_dir", str(out), "--resume"]) == 0
    assert _steps_since_last_start(out) == [5, 6]
    # Without that copy, the run continues from the newest complete checkpoint instead of from scratch.
    shutil.rmtree(dangling / "checkpoint-0000004")
    assert main(["train", "--output_dir", str(dangling), "--resume"]) == 0
    assert _steps_since_last_start(dangling) == [3, 4, 5, 6]
    want = load_file(str(reference / "last" / "prompt.safetensors"))["prompt"]
    for run in (out, dangling):
        assert torch.equal(load_file(str(run / "last" / "prompt.safetensors"))["prompt"], want)
        assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_stale_temporaries_are_removed_and_an_orphaned_old_copy_is_put_back(tmp_path):
    from softprompt.io.rundir import remove_stale_temporaries

    for name in (
        "checkpoint-0000002",
        ".tmp-checkpoint-0000004-77",
        ".old-checkpoint-0000002-77",
        ".old-best-1a2b",
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(name)
    (tmp_path / ".tmp-last-77").symlink_to("checkpoint-0000002")
    (tmp_path / ".results.json.x1y2.tmp").write_text("{")
    remove_stale_temporaries(tmp_path)
    # best/ was only in its `.old-` copy, so that copy is the one to keep; checkpoint-0000002 was whole.
    assert sorted(os.listdir(tmp_path)) == ["best", "checkpoint-0000002"]
    assert (tmp_path / "best" / "trainer_state.json").read_text() == ".old-best-1a2b"
    assert (tmp_path / "checkpoint-0000002" / "trainer_state.json").read_text() == "checkpoint-0000002"


# ---------------------------------------------------------------------------------- hostile data

GOOD_CONTEXT = "The sky over the harbour is very blue today."
GOOD_QA = {
    "id": "good-1",
    "question": "What colour is the sky?",
    "answers": [{"text": "blue", "answer_start": 32}],
}
BAD_PLACE = "data[0].paragraphs[1].qas[0]"


def _squad_with(context: str = "here and there", **qa_changes) -> dict:
    """A SQuAD v1.1 file: one good question, then in a second paragraph one question with `qa_changes`."""
    qa = {"id": "bad-1", "question": "Where?", "answers": [{"text": "here", "answer_start": 0}], **qa_changes}
    qa = {k: v for k, v in qa.items() if v is not ...}  # `...` deletes a key
    paragraphs = [{"context": GOOD_CONTEXT, "qas": [GOOD_QA]}, {"context": context, "qas": [qa]}]
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}


def _bytes(obj: dict) -> bytes:
    return json.dumps(obj).encode()


HUGE = 50 * 1024 * 1024
MRQA_HEADER = b'{"header": {"dataset": "x", "split": "dev"}}\n'
MRQA_GOOD = {"context": GOOD_CONTEXT, "qas": [{"qid": "m1", "question": "What colour?", "answers": ["blue"]}]}


def _mrqa_line(i: int) -> bytes:
    qa = {"qid": f"m{i}", "question": "What colour is the sky?", "answers": ["blue"]}
    return _bytes({"context": GOOD_CONTEXT, "qas": [qa]}) + b"\n"


# kind -> (file name, contents, what train/eval must say, what score must say or None if scoring ignores it)
HOSTILE: dict[str, tuple[str, Callable[[], bytes], str, str | None]] = {
    "malformed_json": (
        "d.json",
        lambda: b'{"version": "1.1", "data": [{"title": "t",',
        "line 1, column",
        "line 1, column",
    ),
    "wrong_schema": (
        "d.json",
        lambda: _bytes(_squad_with(id=["not", "a", "string"])),
        f"{BAD_PLACE}: 'id' must be",
        f"{BAD_PLACE}.id must be a string",
    ),
    "missing_answers": (
        "d.json",
        lambda: _bytes(_squad_with(answers=...)),
        f"{BAD_PLACE}",
        f"{BAD_PLACE} has no",
    ),
    "empty_answers": (
        "d.json",
        lambda: _bytes(_squad_with(answers=[])),
        f"{BAD_PLACE}",
        f"{BAD_PLACE}.answers is empty",
    ),
    "empty_question": ("d.json", lambda: _bytes(_squad_with(question="  ")), f"{BAD_PLACE}", None),
    "answer_not_in_context": (
        "d.json",
        lambda: _bytes(_squad_with(answers=[{"text": "nowhere", "answer_start": 0}])),
        f"{BAD_PLACE}",
        None,
    ),
    "empty_context": ("d.json", lambda: _bytes(_squad_with(context="")), f"{BAD_PLACE}", None),
    "not_utf8": (
        "d.json",
        lambda: _bytes(_squad_with()).replace(b"there", b"th\xffere"),
        "is not UTF-8",
        "UTF-8",
    ),
    "empty_file": ("d.json", lambda: b"", "is empty", "is empty"),
    "truncated_gz": (
        "d.json.gz",
        lambda: gzip.compress(_bytes(_squad_with()))[:-12],
        "truncated gzip",
        "truncated gzip",
    ),
    "truncated_jsonl_gz": (
        "d.jsonl.gz",
        lambda: gzip.compress(MRQA_HEADER + b"".join(_mrqa_line(i) for i in range(200)))[:-40],
        "truncated gzip",
        "truncated gzip",
    ),
    "huge_line": (
        "d.json",
        lambda: b'{"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "' + b"a" * HUGE,
        "line 1, column",
        "line 1, column",
    ),
    "huge_line_jsonl": (
        "d.jsonl",
        lambda: MRQA_HEADER + b'{"context": "' + b"a" * HUGE + b"\n",
        "line 2",
        "line 2",
    ),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_data_ends_in_one_error_line_naming_file_and_place(kind, tiny_model_dir, tmp_path, capsys):
    name, make, where, where_in_score = HOSTILE[kind]
    bad = tmp_path / name
    bad.write_bytes(make())
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps({"good-1": "blue"}))
    model = ["--model_name_or_path", str(tiny_model_dir), "--random_init"]
    out = tmp_path / "run"
    commands = {
        "train": ["train", "--output_dir", str(out), *model, "--train_file", str(bad), "--report_to", "none"],
        "eval": ["eval", *model, "--validation_file", str(bad)],
    }
    if where_in_score is not None:
        commands["score"] = ["score", str(bad), str(predictions)]
    for command, argv in commands.items():
        rc = main(argv)
        line = _one_error_line(capsys.readouterr().err, command)
        assert rc != 0, command
        assert f"error: {bad}: " in line, line
        assert (where_in_score if command == "score" else where) in line, line
        assert len(line) < 400  # a 50 MB line is never echoed
    assert not (out / "config.yaml").exists()  # refused before the run began: a rerun needs no --overwrite


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        (b'["blue"]', "the top level is a list"),
        (b'{"good-1": 3}', "is a number"),
        (b'{"good-1": "bl\xffue"}', "UTF-8"),
        (b'{"good-1": ', "is not valid JSON"),
        (b"", "is empty"),
    ],
)
def test_hostile_predictions_file_is_refused_by_score(contents, expected, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_bytes(_bytes(_squad_with()))
    predictions = tmp_path / "p.json"
    predictions.write_bytes(contents)
    assert main(["score", str(data), str(predictions)]) != 0
    line = _one_error_line(capsys.readouterr().err, "score")
    assert f"error: {predictions}: " in line and expected in line


def test_skip_bad_examples_skips_and_counts_each_kind(tiny_model_dir, squad_small, tmp_path, capsys):
    squad = json.loads(squad_small[0].read_text())
    bad_questions = [
        {"id": ["x"], "question": "q", "answers": [{"text": "here"}]},  # bad_schema
        {"id": "b2", "question": "q"},  # empty_answers (missing)
        {"id": "b3", "question": "q", "answers": []},  # empty_answers
        {"id": "b4", "question": " ", "answers": [{"text": "here"}]},  # empty_question
        {"id": "b5", "question": "q", "answers": [{"text": "nowhere"}]},  # answer_not_in_context
        {"id": "b1", "question": "q", "answers": [{"text": "here"}]},  # fine the first time...
        {"id": "b1", "question": "q", "answers": [{"text": "here"}]},  # ...then a duplicate_id
    ]
    squad["data"].append(
        {
            "title": "bad",
            "paragraphs": [
                {"context": "here and there", "qas": bad_questions},
                {"context": "", "qas": [{"id": "b6", "question": "q", "answers": [{"text": "x"}]}]},
            ],
        }
    )
    train_file = tmp_path / "mixed.json"
    train_file.write_text(json.dumps(squad))
    dev_file = tmp_path / "dev.jsonl"  # MRQA lines that are not JSON or not UTF-8 are skippable too
    dev_file.write_bytes(MRQA_HEADER + _bytes(MRQA_GOOD) + b"\n{not json\n" + b'{"context": "\xff"}\n')
    out = tmp_path / "run"
    argv = _train_args(
        tiny_model_dir, train_file, out, "--max_steps", "1", "--validation_file", str(dev_file)
    )
    assert main([*argv, "--skip_bad_examples"]) == 0
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["train_examples"] == 64 + 1 and start["eval_examples"] == 1
    assert start["skipped_examples"] == {
        "bad_schema": 1,
        "empty_answers": 2,
        "empty_question": 1,
        "answer_not_in_context": 1,
        "duplicate_id": 1,
        "empty_context": 1,
        "bad_json": 1,
        "bad_encoding": 1,
    }
    assert "skipped {" in capsys.readouterr().out
    # eval skips and counts the same way, reporting the counts beside the scores.
    argv = ["eval", "--model_name_or_path", str(tiny_model_dir), "--random_init", "--validation_file",
            str(train_file), "--skip_bad_examples", "--max_eval_samples", "2", "--max_new_tokens", "2"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_examples"] == 2 and report["skipped_examples"] == {
        "bad_schema": 1,
        "empty_answers": 2,
        "empty_question": 1,
        "answer_not_in_context": 1,
        "duplicate_id": 1,
        "empty_context": 1,
    }
    # Damage to a file as a whole is never skipped.
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(gzip.compress(train_file.read_bytes())[:-12])
    argv = _train_args(tiny_model_dir, broken, tmp_path / "run2", "--max_steps", "1", "--skip_bad_examples")
    assert main(argv) == 2
    assert "truncated gzip" in _one_error_line(capsys.readouterr().err, "train")


# ---------------------------------------------------------------------------------- safe loading


class _Payload:
    """Unpickling this creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_files_are_refused_and_never_run(tiny_model_dir, squad_small, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()  # the payload is live: unpickling it anywhere would create the marker
    payload = _Payload(marker)
    train_file, dev_file = squad_small

    # 1. A model directory whose only weights are a pickle.
    evil_model = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir, evil_model)
    torch.save({"shared.weight": payload}, evil_model / "pytorch_model.bin")
    # 2. A prompt directory whose only weights are a pickle.
    evil_prompt = tmp_path / "evil-prompt"
    evil_prompt.mkdir()
    (evil_prompt / "prompt_config.json").write_text(
        json.dumps({"base_model": "x", "n_tokens": 4, "d_model": 64})
    )
    torch.save({"prompt": payload}, evil_prompt / "prompt.bin")
    # 3. A real checkpoint whose optimizer state is replaced by a pickle that runs code...
    run = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, train_file, run, "--max_steps", "2")) == 0
    torch.save({"optimizer": payload, "scheduler": {}}, run / "last" / "optimizer.pt")
    # 4. ...and one that holds nothing but pickles.
    run2 = tmp_path / "run2"
    shutil.copytree(run, run2, symlinks=True)
    (run2 / "last" / "prompt.safetensors").unlink()
    torch.save({"prompt": payload}, run2 / "last" / "prompt.bin")
    capsys.readouterr()

    tiny = ["--model_name_or_path", str(tiny_model_dir), "--random_init"]
    cases = [
        (["eval", "--model_name_or_path", str(evil_model), "--validation_file", str(dev_file)], "pytorch_model.bin"),
        (
            ["train", "--output_dir", str(tmp_path / "x1"), "--model_name_or_path", str(evil_model),
             "--train_file", str(train_file), "--report_to", "none"],
            "pytorch_model.bin",
        ),
        (["eval", *tiny, "--prompt", str(evil_prompt), "--validation_file", str(dev_file)], "prompt.bin"),
        (
            ["train", "--output_dir", str(tmp_path / "x2"), *tiny, "--train_file", str(train_file), "--prompt_tuning",
             "--n_tokens", "4", "--prompt_init", "from_file", "--prompt_init_file", str(evil_prompt),
             "--report_to", "none"],
            "prompt.bin",
        ),
        (["train", "--output_dir", str(run), "--resume"], "optimizer.pt"),
        (["train", "--output_dir", str(run2), "--resume"], "prompt.bin"),
    ]  # fmt: skip
    for argv, file in cases:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err, argv[0])
        assert file in line and ("unpickle" in line or "refusing to load" in line), line
    assert not marker.exists()


def test_torch_load_is_weights_only_everywhere_and_nothing_unpickles():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            where = f"{path.name}:{node.lineno}"
            if (owner, node.func.attr) == ("torch", "load"):
                kw = {k.arg: k.value for k in node.keywords}
                assert (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                ), where
            assert (owner, node.func.attr) not in {("pickle", "load"), ("pickle", "loads")}, where


def test_a_prompt_for_another_model_is_refused_naming_both(tiny_model_dir, squad_small, tmp_path, capsys):
    from transformers import T5ForConditionalGeneration

    dev_file = squad_small[1]
    narrow = save_prompt(
        tmp_path / "narrow",
        torch.zeros(4, 32),
        PromptConfig("google/t5-base-lm-adapt", n_tokens=4, d_model=32),
    )
    tiny = ["--model_name_or_path", str(tiny_model_dir), "--random_init"]
    assert main(["eval", *tiny, "--prompt", str(narrow), "--validation_file", str(dev_file)]) == 2
    line = _one_error_line(capsys.readouterr().err, "eval")
    assert "is 32 wide but the model's d_model is 64" in line and "google/t5-base-lm-adapt" in line
    argv = ["train", "--output_dir", str(tmp_path / "run"), *tiny, "--train_file", str(squad_small[0]),
            "--prompt_tuning", "--n_tokens", "4", "--prompt_init", "from_file", "--prompt_init_file", str(narrow),
            "--report_to", "none"]  # fmt: skip
    assert main(argv) == 2
    assert "is 32 wide but the model's d_model is 64" in _one_error_line(capsys.readouterr().err, "train")

    # Same width, other base model: needs real (safetensors) weights, since --random_init skips the check.
    model_dir = tmp_path / "tiny-t5-weights"
    shutil.copytree(tiny_model_dir, model_dir)
    T5ForConditionalGeneration(tiny_config()).save_pretrained(model_dir, safe_serialization=True)
    other = save_prompt(
        tmp_path / "other",
        torch.zeros(4, 64),
        PromptConfig("google/t5-large-lm-adapt", n_tokens=4, d_model=64),
    )
    argv = [
        "eval",
        "--model_name_or_path",
        str(model_dir),
        "--prompt",
        str(other),
        "--validation_file",
        str(dev_file),
    ]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "eval")
    assert f"trained for google/t5-large-lm-adapt, not {model_dir}" in line
    # Training may start from another model's prompt (prompt transfer), but says so.
    argv = ["train", "--output_dir", str(tmp_path / "transfer"), "--model_name_or_path", str(model_dir),
            "--train_file", str(squad_small[0]), "--prompt_tuning", "--n_tokens", "4", "--prompt_init",
            "from_file", "--prompt_init_file", str(other), "--max_steps", "1", "--eval_steps", "0",
            "--save_steps", "0", "--report_to", "none"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert (
        f"warning: the initial prompt in {other} was trained for google/t5-large-lm-adapt, not {model_dir}"
        in err
    )


# --------------------------------------------------------------------------------- config errors


def _exit_code(argv: list[str]) -> int:
    """`softprompt ...`'s exit status: flag errors leave through SystemExit, like any parser's."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_config_errors_are_all_listed_at_once_before_any_work(tiny_model_dir, squad_small, tmp_path, capsys):
    train_file = str(squad_small[0])
    taken = tmp_path / "taken"  # holds another run
    taken.mkdir()
    (taken / "config.yaml").write_text("lr: 0.3\n")
    before = _snapshot(taken)

    # Bad flags, and impossible combinations of the good ones, in one message.
    argv = ["train", "--output_dir", str(taken), "--train_file", train_file, "--learning_rat", "3",
            "--lr", "fast", "--n_tokens", "1.5", "--optimizer", "sgd", "--prompt_init_file", str(tmp_path),
            "--global_batch_size", "10", "--batch_size", "4"]  # fmt: skip
    assert _exit_code(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    for part in (
        "unknown flag --learning_rat",
        "--lr must be a number, got 'fast'",
        "--n_tokens must be an integer, got '1.5'",
        "--optimizer must be one of",
        "need --prompt_tuning",
        "global_batch_size 10 is not divisible by batch_size 4",
        "already holds a run; pass --resume",
    ):
        assert part in line, part

    # A config file's unknown keys and wrong types, with the flags' problems.
    config = tmp_path / "c.yaml"
    config.write_text("n_tokenz: 5\nlr: fast\nprompt_tuning: 1\n")
    argv = ["train", "--config", str(config), "--output_dir", str(tmp_path / "new"), "--train_file", train_file,
            "--dropout", "2", "--warmup_steps", "ten"]  # fmt: skip
    assert _exit_code(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    for part in (
        f"{config}: unknown key 'n_tokenz'",
        f"{config}: 'lr' must be a number",
        f"{config}: 'prompt_tuning' must be true or false",
        "--warmup_steps must be an integer, got 'ten'",
        "--dropout must be in [0, 1)",
    ):
        assert part in line, part

    # Well-formed flags, impossible together: refused by validation before the run touches anything.
    argv = ["train", "--output_dir", str(taken), "--train_file", train_file, "--model_name_or_path",
            str(tiny_model_dir), "--random_init", "--prompt_init_file", str(tmp_path), "--global_batch_size", "10",
            "--batch_size", "4", "--lr", "nan", "--report_to", "none"]  # fmt: skip
    assert _exit_code(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    for part in ("need --prompt_tuning", "is not divisible", "--lr must be > 0", "already holds a run"):
        assert part in line, part
    fresh = tmp_path / "fresh"
    argv[2] = str(fresh)
    assert _exit_code(argv) == 2
    capsys.readouterr()
    assert _snapshot(taken) == before and not fresh.exists()


def test_resume_starts_afresh_when_a_run_was_killed_before_writing_its_config(
    tiny_model_dir, squad_small, tmp_path, capsys
):
    out = tmp_path / "run"  # all a run killed during setup leaves behind
    (out / ".tmp-checkpoint-0000002-999").mkdir(parents=True)
    assert main([*_train_args(tiny_model_dir, squad_small[0], out, "--max_steps", "2"), "--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    assert _last_step(out) == 2 and not (out / ".tmp-checkpoint-0000002-999").exists()
    # `--output_dir DIR --resume` alone has nothing to go on there.
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert _exit_code(["train", "--output_dir", str(empty), "--resume"]) == 2
    assert f"--resume: {empty} holds no run to resume" in _one_error_line(capsys.readouterr().err, "train")
