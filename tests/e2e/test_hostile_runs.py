"""A run directory under faults and crafted files (issue 28 items 8 and 9).

Item 8: `metrics.jsonl` after `--resume` is the uninterrupted run's, record for record, except what the
README's reliability section lists (one more `start` record, and the timings). Item 9: a crafted
checkpoint (deeply nested or escaping manifest, no manifest and a truncated optimizer, a step that is
not its name, a garbled metrics line) is skipped, refused in one line, or falls back; never a traceback.

Runs go through `softprompt.cli.main` in-process on conftest's tiny random T5; a kill after checkpoint N
is reproduced exactly by a copy of the uninterrupted run cut back to checkpoint N: a killed run leaves
the same checkpoints, the same `last`, and a log with records after N (which a resume drops).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from softprompt.cli import main
from softprompt.io import rundir

MAX_STEPS = 12
# Records whose values are wall-clock measurements, and the records a resume adds by design.
TIMINGS = {"time", "examples_per_second", "train_seconds", "train_examples_per_second"}


def _train(model_dir: Path, data: tuple[Path, Path], out: Path, *extra: str) -> int:
    train, dev = data
    return main([
        "train", "--output_dir", str(out), "--prompt_tuning", "--model_name_or_path", str(model_dir),
        "--random_init", "--train_file", str(train), "--validation_file", str(dev), "--max_eval_samples", "4",
        "--max_source_length", "64", "--max_target_length", "8", "--n_tokens", "4", "--batch_size", "4",
        "--max_steps", str(MAX_STEPS), "--save_steps", "2", "--save_total_limit", "100", "--eval_steps", "4",
        "--logging_steps", "3", "--dropout", "0.1", "--report_to", "none", *extra,
    ])  # fmt: skip


def _records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] in ("start", "resume"):
            continue
        out.append({k: v for k, v in record.items() if k not in TIMINGS})
    return out


def _cut_back_to(reference: Path, out: Path, step: int, *, before_eval: bool = False) -> None:
    """`out`: the run as a kill right after checkpoint `step` leaves it (with `before_eval`: killed after
    the evaluation at `step` was logged but before the checkpoint learned of it)."""
    shutil.copytree(reference, out, symlinks=True)
    for d in rundir.checkpoints(out):
        if int(d.name.removeprefix("checkpoint-")) > step:
            shutil.rmtree(d)
    for name in ("best", "results.json"):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    (out / "last").unlink()
    (out / "last").symlink_to(rundir.checkpoint_name(step))
    if before_eval:
        checkpoint = out / rundir.checkpoint_name(step)
        state = json.loads((checkpoint / rundir.TRAINER_STATE).read_text())
        assert state["last_eval_step"] == step
        state["last_eval_step"] = step - 4
        (checkpoint / rundir.TRAINER_STATE).write_text(json.dumps(state))
        (checkpoint / rundir.MANIFEST).unlink()
        rundir.write_manifest(checkpoint)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, tuple[Path, Path]]:
    """The tiny model and data, and one uninterrupted run of them."""
    from conftest import SQUAD_DEV, SQUAD_TRAIN, config_only_t5, squad_subset

    root = tmp_path_factory.mktemp("hostile-runs")
    model = config_only_t5(root / "tiny")
    data = squad_subset(SQUAD_TRAIN, root / "train.json", 24), squad_subset(SQUAD_DEV, root / "dev.json", 4)
    assert _train(model, data, root / "reference") == 0
    return model, root / "reference", data


@pytest.mark.parametrize(
    ("step", "before_eval"),
    [(5 - 1, False), (10, False), (8, True), (MAX_STEPS, False)],
    ids=["mid-window", "non-logging-step", "between-eval-and-last", "finished"],
)
def test_the_log_after_resume_is_the_uninterrupted_runs(reference, tmp_path, step, before_eval) -> None:
    _, ref, _ = reference
    out = tmp_path / "run"
    _cut_back_to(ref, out, step, before_eval=before_eval)
    assert main(["train", "--output_dir", str(out), "--resume"]) == 0
    got, want = _records(out), _records(ref)
    # Steps 4 and 10 fall inside a 3-step loss window: the resumed window continues the saved one.
    assert [r["step"] for r in got if r["event"] == "train"] == [3, 6, 9, 12]
    assert got == want
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 2 and events.count("end") == 1


def test_a_garbled_metrics_line_is_dropped_on_resume(reference, tmp_path, capsys) -> None:
    _, ref, _ = reference
    out = tmp_path / "run"
    _cut_back_to(ref, out, 6)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"event": "train", "step": "abc"}\n[1, 2]\n{"event": "eval", "step": 1e400}\n')
    assert main(["train", "--output_dir", str(out), "--resume"]) == 0
    assert _records(out) == _records(ref)


def _checkpoint(out: Path, step: int) -> Path:
    return out / rundir.checkpoint_name(step)


def test_crafted_manifests_are_damaged_not_tracebacks(reference, tmp_path, capsys) -> None:
    _, ref, _ = reference
    out = tmp_path / "run"
    _cut_back_to(ref, out, 12)
    secret = tmp_path / "secret.txt"
    secret.write_text("x" * 1234)
    deep = _checkpoint(out, 12) / rundir.MANIFEST
    deep.write_text('{"files": ' + "[" * 100_000 + "]" * 100_000 + "}")
    escaping = _checkpoint(out, 10) / rundir.MANIFEST
    files = json.loads(escaping.read_text())["files"]
    files[os.path.relpath(secret, escaping.parent)] = {"size": 1, "sha256": "0" * 64}
    escaping.write_text(json.dumps({"format": 1, "files": files}))
    assert main(["verify", str(out)]) == 1
    table = capsys.readouterr().out
    assert "checkpoint-0000012 (last)  damaged     manifest.json is unreadable (RecursionError)" in table
    assert "checkpoint-0000010         damaged     manifest.json names a file outside the checkpoint" in table
    assert "1,234" not in table and "secret" not in table
    # --resume skips both and continues from checkpoint 8, to the same end as the uninterrupted run.
    assert main(["train", "--output_dir", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "skipped damaged checkpoint-0000012 (manifest.json is unreadable (RecursionError))" in err
    assert "resuming from checkpoint-0000008" in err
    assert _records(out) == _records(ref)


def test_an_unverified_checkpoint_that_does_not_load_falls_back(reference, tmp_path, capsys) -> None:
    _, ref, _ = reference
    out = tmp_path / "run"
    _cut_back_to(ref, out, 10)
    newest = _checkpoint(out, 10)
    (newest / rundir.MANIFEST).unlink()  # as written before manifests: trusted, but not verified
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert main(["train", "--output_dir", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "skipped checkpoint-0000010 (no manifest, and it does not load: " in err
    assert "resuming from checkpoint-0000008" in err
    assert _records(out) == _records(ref)


def test_a_step_that_is_not_the_checkpoints_own_is_refused(reference, tmp_path, capsys) -> None:
    _, ref, _ = reference
    out = tmp_path / "run"
    _cut_back_to(ref, out, 10)
    for d in rundir.checkpoints(out)[:-1]:
        shutil.rmtree(d)
    newest = _checkpoint(out, 10)
    state = json.loads((newest / rundir.TRAINER_STATE).read_text())
    state["step"] = 10**9
    (newest / rundir.TRAINER_STATE).write_text(json.dumps(state))
    (newest / rundir.MANIFEST).unlink()
    rundir.write_manifest(newest)
    assert main(["train", "--output_dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert err.endswith(
        "trainer_state.json is damaged (step is 1000000000 in checkpoint-0000010); resume from another checkpoint"
    )
