"""Checkpoints a cluster can trust (issue 18): one writer per run directory, verified checkpoints that
`--resume` falls back over, `softprompt verify`, and disk-full/I/O errors that end in one line.

Training runs in-process through `softprompt.cli.main` on the tiny random T5 from conftest; only the
first of two competing trainers is a subprocess (it must be SIGKILLed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import config_only_t5, cpu_env
from softprompt.cli import main
from softprompt.io import rundir

CHECKPOINT_FILES = [
    "trainer_state.json",
    "prompt.safetensors",
    "prompt_config.json",
    "optimizer.pt",
    "rng_rank0.safetensors",
    "README.md",
    "manifest.json",
]


def _args(model_dir: Path, train_file: Path, out: Path, *extra: str) -> list[str]:
    # Dropout 0.1 makes every step draw random numbers: only a restored RNG state reproduces the run.
    return [
        "train", "--output_dir", str(out), "--prompt_tuning", "--model_name_or_path", str(model_dir),
        "--random_init", "--train_file", str(train_file), "--max_source_length", "64", "--n_tokens", "4",
        "--batch_size", "4", "--max_steps", "6", "--save_steps", "2", "--eval_steps", "0",
        "--logging_steps", "1", "--dropout", "0.1", "--report_to", "none", *extra,
    ]  # fmt: skip


def _exit(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _error_line(err: str, command: str = "train") -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"softprompt {command}: error: ")
    return lines[0]


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / rundir.METRICS_FILE).read_text().splitlines() if line.strip()]


def _losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in _events(run) if e["event"] == "train"}


def _steps_since_last_start(run: Path) -> list[int]:
    events = _events(run)
    start = max(i for i, e in enumerate(events) if e["event"] == "start")
    return [e["step"] for e in events[start:] if e["event"] == "train"]


def _last_prompt(run: Path) -> torch.Tensor:
    return load_file(str(run / rundir.LAST / "prompt.safetensors"))["prompt"]


def _assert_same_end(run: Path, reference: Path) -> None:
    assert torch.equal(_last_prompt(run), _last_prompt(reference))
    assert _losses(run) == _losses(reference)
    assert os.readlink(run / rundir.LAST) == rundir.checkpoint_name(6)
    assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".old-"))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """conftest's tiny model directory, once for the module."""
    return config_only_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="module")
def reference(tiny, squad_small, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run: checkpoints 4 and 6 survive (save_total_limit 2)."""
    out = tmp_path_factory.mktemp("rundir") / "reference"
    assert main(_args(tiny, squad_small[0], out)) == 0
    assert [p.name for p in rundir.checkpoints(out)] == [rundir.checkpoint_name(4), rundir.checkpoint_name(6)]
    return out


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # garble: same size, different bytes in the middle
        middle = len(data) // 2
        path.write_bytes(
            data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 16]) + data[middle + 16 :]
        )


# ------------------------------------------------------------------------------------------ one writer


def test_the_lock_names_its_holder_and_is_freed_on_release(tmp_path):
    held = rundir.lock(tmp_path / "run")
    with pytest.raises(rundir.RunDirBusy) as refused:
        rundir.lock(tmp_path / "run")
    assert f"PID {os.getpid()}" in str(refused.value) and "started" in str(refused.value)
    held.release()
    rundir.lock(tmp_path / "run").release()


def test_a_second_trainer_is_refused_while_the_first_runs_and_succeeds_after_it_is_killed(
    tiny_model_dir, squad_small, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = _args(tiny_model_dir, squad_small[0], out, "--max_steps", "100000")
    first = subprocess.Popen(
        [sys.executable, "-m", "softprompt", *argv],
        env=cpu_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / rundir.LAST).exists():
            assert first.poll() is None, "the first trainer ended early"
            assert time.monotonic() < deadline, "the first trainer wrote no checkpoint"
            time.sleep(0.05)
        logged = len(_events(out))
        capsys.readouterr()
        # The same command again (a requeued job whose old copy still runs): refused, the first untouched.
        assert _exit(["train", "--output_dir", str(out), "--resume"]) == 2
        line = _error_line(capsys.readouterr().err)
        assert f"being written by another training run (PID {first.pid} on " in line and "started 20" in line
        assert first.poll() is None and len(_events(out)) >= logged
        # Read-only commands need no lock.
        assert _exit(["verify", str(out)]) == 0
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 leaves no stale lock: the kernel released it.
    step = int(os.readlink(out / rundir.LAST).removeprefix(rundir.CHECKPOINT_PREFIX))
    capsys.readouterr()
    assert _exit(["train", "--output_dir", str(out), "--resume", "--max_steps", str(step + 2)]) == 0
    assert _steps_since_last_start(out) == [step + 1, step + 2]


# ------------------------------------------------------------------------------------------ verification


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("prompt.safetensors", "truncate"),
        ("optimizer.pt", "truncate"),
        ("rng_rank0.safetensors", "garble"),
        ("trainer_state.json", "garble"),
        ("prompt_config.json", "truncate"),
        ("README.md", "garble"),
        ("manifest.json", "garble"),
    ],
)
def test_resume_falls_back_over_a_damaged_newest_checkpoint_and_ends_bit_identical(
    reference, tmp_path, capsys, name, how
):
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    newest = run / rundir.checkpoint_name(6)
    assert set(CHECKPOINT_FILES) <= {p.name for p in newest.iterdir()}
    _damage(newest / name, how)
    capsys.readouterr()
    assert main(["train", "--output_dir", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"skipped damaged {rundir.checkpoint_name(6)} (" in err
    assert f"resuming from {rundir.checkpoint_name(4)}" in err
    assert _steps_since_last_start(run) == [5, 6]
    _assert_same_end(run, reference)
    assert rundir.verify_checkpoint(newest).status == "ok"  # re-saved whole


def test_resume_with_no_checkpoint_that_verifies_is_one_line(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    for directory in rundir.checkpoints(run):
        _damage(directory / "prompt.safetensors", "garble")
    capsys.readouterr()
    assert _exit(["train", "--output_dir", str(run), "--resume"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"no checkpoint in {run} verifies, and softprompt is refusing to load a damaged one: " in line
    assert f"{rundir.checkpoint_name(6)} (prompt.safetensors does not match" in line
    assert f"{rundir.checkpoint_name(4)} (prompt.safetensors" in line


@pytest.mark.parametrize(
    "name",
    [
        "trainer_state.json",
        "prompt.safetensors",
        "prompt_config.json",
        "optimizer.pt",
        "rng_rank0.safetensors",
    ],
)
def test_a_garbled_file_in_an_unverified_checkpoint_is_one_line_naming_it(reference, tmp_path, capsys, name):
    """Checkpoints without a manifest (an older softprompt) load unverified; one that does not load is
    skipped for the one before it (issue 28 item 9), and when none loads, the damage is one line."""
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    for directory in rundir.checkpoints(run):
        (directory / rundir.MANIFEST).unlink()
    newest, older = run / rundir.checkpoint_name(6), run / rundir.checkpoint_name(4)
    assert rundir.verify_checkpoint(newest).status == "unverified"
    _damage(newest / name, "truncate")
    _damage(older / name, "truncate")
    capsys.readouterr()
    assert _exit(["train", "--output_dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"skipped {newest.name} (no manifest, and it does not load: " in err and str(newest / name) in err
    assert str(older / name) in _error_line(err)


def test_a_garbled_config_yaml_is_one_line_naming_it(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    (run / rundir.CONFIG_FILE).write_text("model_name_or_path: [unclosed\n  - {")
    capsys.readouterr()
    assert _exit(["train", "--output_dir", str(run), "--resume"]) == 2
    assert str(run / rundir.CONFIG_FILE) in _error_line(capsys.readouterr().err)


def test_verify_flags_exactly_the_damaged_checkpoint(reference, tmp_path, capsys):
    capsys.readouterr()
    assert main(["verify", str(reference)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["checkpoint", "status", "detail"]
    assert table[1].split()[:2] == [rundir.checkpoint_name(4), "ok"]
    assert table[2].split()[:3] == [rundir.checkpoint_name(6), "(last)", "ok"]

    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    _damage(run / rundir.checkpoint_name(4) / "optimizer.pt", "garble")
    report = tmp_path / "verify.json"
    assert main(["verify", str(run), "--json", str(report)]) == 1
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "damaged" in rows[rundir.checkpoint_name(4)] and "optimizer.pt does not match its sha256" in out
    assert " ok " in rows[rundir.checkpoint_name(6)]
    assert err.strip() == (
        f"softprompt verify: damaged: {rundir.checkpoint_name(4)}; `softprompt train --output_dir {run} --resume` "
        "continues from the newest checkpoint that verifies"
    )
    verdicts = json.loads(report.read_text())
    assert {k: v["status"] for k, v in verdicts.items()} == {
        rundir.checkpoint_name(4): "damaged",
        rundir.checkpoint_name(6): "ok",
    }
    assert _exit(["verify", str(tmp_path / "nothing")]) == 2


# ------------------------------------------------------------------------------------------ disk full


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if shutil.which("mount") is None:
        return False
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return proc.returncode == 0


def _fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def test_a_disk_that_fills_mid_checkpoint_ends_in_one_line_and_resume_is_bit_identical(
    tiny, squad_small, reference, tmp_path, capsys, monkeypatch
):
    from safetensors import SafetensorError

    import softprompt.training.loop as train_module

    mount = tmp_path / "disk"
    real_disk = _mount_tmpfs(mount, "16m")
    try:
        out = mount / "run"
        save = train_module.save_checkpoint
        filler: list[Path] = []

        def fill_then_save(run):
            if run.state.step == 4:
                if real_disk:  # a real filesystem, really full
                    filler.append(_fill(mount))
                else:  # no tmpfs here (not root): the disk-full error at safetensors' write call

                    def full(*args, **kwargs):
                        raise SafetensorError(
                            "Error while serializing: I/O error: No space left on device (os error 28)"
                        )

                    monkeypatch.setattr("softprompt.io.checkpoint.save_file", full)
            return save(run)

        monkeypatch.setattr(train_module, "save_checkpoint", fill_then_save)
        capsys.readouterr()
        assert _exit(_args(tiny, squad_small[0], out)) == 74
        line = _error_line(capsys.readouterr().err)
        assert (
            f"cannot write {out / rundir.checkpoint_name(4)}" not in line
        )  # it names the file, not the target
        assert f"cannot write {out}/.tmp-{rundir.checkpoint_name(4)}-" in line
        assert "No space left on device [ENOSPC]" in line
        assert f"the last complete checkpoint is {out / rundir.checkpoint_name(2)}" in line
        assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]
        assert os.readlink(out / rundir.LAST) == rundir.checkpoint_name(2)
        assert rundir.verify_checkpoint(out / rundir.checkpoint_name(2)).status == "ok"
        assert not (out / rundir.checkpoint_name(4)).exists()

        monkeypatch.undo()
        for f in filler:
            f.unlink()
        assert main(["train", "--output_dir", str(out), "--resume"]) == 0
        assert _steps_since_last_start(out) == [3, 4, 5, 6]
        _assert_same_end(out, reference)
    finally:
        if real_disk:
            subprocess.run(["umount", str(mount)], check=False)


def test_a_disk_full_while_writing_predictions_names_the_file_and_resume_is_bit_identical(
    tiny, squad_small, tmp_path, capsys, monkeypatch
):
    import softprompt.training.loop as train_module

    mount = tmp_path / "disk"
    if not _mount_tmpfs(mount, "16m"):
        pytest.skip("mounting a tmpfs needs root; the checkpoint test injects the error instead")
    try:
        evaluated = ["--validation_file", str(squad_small[1]), "--max_eval_samples", "4", "--eval_steps", "4"]
        reference = tmp_path / "reference"
        assert main(_args(tiny, squad_small[0], reference, *evaluated)) == 0
        out = mount / "run"
        save = train_module.save_checkpoint
        filler: list[Path] = []

        def save_then_fill(run):
            saved = save(run)
            if run.state.step == 4:  # step 4's checkpoint is complete; its evaluation comes next
                filler.append(_fill(mount))
            return saved

        monkeypatch.setattr(train_module, "save_checkpoint", save_then_fill)
        capsys.readouterr()
        assert _exit(_args(tiny, squad_small[0], out, *evaluated)) == 74
        line = _error_line(capsys.readouterr().err)
        assert f"cannot write {out / rundir.predictions_file(4)}: No space left on device [ENOSPC]" in line
        assert f"the last complete checkpoint is {out / rundir.checkpoint_name(4)}" in line
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [rundir.LOCK_FILE]
        monkeypatch.undo()
        filler[0].unlink()
        assert main(["train", "--output_dir", str(out), "--resume"]) == 0
        assert _steps_since_last_start(out) == [5, 6]
        _assert_same_end(out, reference)
        assert (
            json.loads((out / rundir.RESULTS_FILE).read_text())["f1"]
            == json.loads((reference / rundir.RESULTS_FILE).read_text())["f1"]
        )
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------------------------------------------------------------------ units


@pytest.mark.parametrize(
    "bad", ['{"step": "7"}', '{"best_f1": null}', '{"step": true}', "[1]", '{"python_rng": 3}', "{"]
)
def test_a_trainer_state_of_the_wrong_shape_is_refused_naming_the_file(tmp_path, bad):
    rundir.write_trainer_state(tmp_path, rundir.TrainerState(step=7, best_t5_f1=0.5))
    assert rundir.read_trainer_state(tmp_path) == rundir.TrainerState(step=7, best_t5_f1=0.5)
    (tmp_path / rundir.TRAINER_STATE).write_text(bad)
    with pytest.raises(rundir.CheckpointError, match=f"{tmp_path / rundir.TRAINER_STATE} is damaged"):
        rundir.read_trainer_state(tmp_path)


def test_amend_replaces_files_as_one_step_and_never_writes_through_the_links(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    tmp = rundir.new_checkpoint_dir(out, 2)
    (tmp / "weights.bin").write_bytes(b"w" * 100)
    rundir.write_trainer_state(tmp, rundir.TrainerState(step=2))
    ckpt = rundir.publish_checkpoint(tmp, out, 2, keep=2)
    assert rundir.verify_checkpoint(ckpt).status == "ok" and os.readlink(out / rundir.LAST) == ckpt.name
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    with pytest.raises(RuntimeError), rundir.amend(out / rundir.LAST) as copy:
        rundir.write_trainer_state(copy, rundir.TrainerState(step=2, best_f1=9.0))
        raise RuntimeError("killed mid-amend")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # untouched, copy removed
    assert sorted(p.name for p in out.iterdir()) == [ckpt.name, rundir.LAST]
    with rundir.amend(out / rundir.LAST) as copy:
        rundir.write_trainer_state(copy, rundir.TrainerState(step=2, best_f1=9.0))
    assert rundir.read_trainer_state(out / rundir.LAST).best_f1 == 9.0
    assert rundir.verify_checkpoint(ckpt).status == "ok"
    assert (ckpt / "weights.bin").read_bytes() == b"w" * 100


def test_verify_does_not_send_a_damaged_best_to_resume(reference, tmp_path, capsys):
    """A finished run whose best/ is damaged: --resume would not rewrite it, so verify says what will."""
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    # The reference run has no dev set; a best/ is a verified checkpoint like the others.
    shutil.copytree(run / rundir.checkpoint_name(4), run / rundir.BEST)
    _damage(run / rundir.BEST / "prompt.safetensors", "garble")
    capsys.readouterr()
    assert main(["verify", str(run)]) == 1
    out, err = capsys.readouterr()
    assert "damaged" in next(line for line in out.splitlines() if line.startswith(rundir.BEST))
    assert err.strip() == (
        f"softprompt verify: damaged: {rundir.BEST}; --resume does not rewrite it: restore {run / rundir.BEST} "
        f"from a copy, or use {run / rundir.LAST} (the newest checkpoint) instead"
    )
