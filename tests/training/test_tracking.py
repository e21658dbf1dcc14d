"""MetricsLogger (metrics.jsonl, TensorBoard, wandb guard) and the Progress display."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import softprompt.runtime.progress as progress_display
from softprompt.errors import ConfigError
from softprompt.runtime.progress import Progress, progress
from softprompt.training.tracking import MetricsLogger


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- MetricsLogger


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    losses = {10: 4.25, 20: 3.5, 30: 2.875}
    with MetricsLogger(tmp_path, ["tensorboard"], is_main_process=True, run_config={"lr": 0.3}) as logger:
        for step, loss in losses.items():
            logger.log("train", step, epoch=step / 100, loss=loss, lr=0.3, examples_per_second=55.5)
        logger.log("eval", 20, exact_match=58.0, f1=67.625)

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/epoch", "train/examples_per_second"} <= tags
    assert {"eval/exact_match", "eval/f1"} <= tags
    # Wall-clock time is TensorBoard's own field, not a metric to plot.
    assert "train/time" not in tags and "eval/time" not in tags

    loss_events = acc.Scalars("train/loss")
    assert [e.step for e in loss_events] == [10, 20, 30]
    assert [e.value for e in loss_events] == pytest.approx(list(losses.values()))
    f1 = acc.Scalars("eval/f1")
    assert [(e.step, e.value) for e in f1] == [(20, pytest.approx(67.625))]
    em = acc.Scalars("eval/exact_match")
    assert [(e.step, e.value) for e in em] == [(20, pytest.approx(58.0))]
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_jsonl_lines_parse_and_append_across_loggers(tmp_path: Path) -> None:
    first = MetricsLogger(tmp_path, ["none"], is_main_process=True)
    first.log("start", 0, world_size=1)
    first.log("train", 50, epoch=0.02, loss=3.25, lr=0.3, examples_per_second=120.0)
    first.close()
    # A resumed run opens the same file again and must continue it, not truncate it.
    second = MetricsLogger(tmp_path, ["none"], is_main_process=True)
    second.log("eval", 100, exact_match=41.5, f1=52.25, time=12.5)
    second.close()

    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["event"], r["step"]) for r in records] == [("start", 0), ("train", 50), ("eval", 100)]
    assert records[1]["loss"] == 3.25 and records[1]["examples_per_second"] == 120.0
    assert records[2]["f1"] == 52.25 and records[2]["time"] == 12.5
    assert all(isinstance(r["time"], float) for r in records)
    assert not (tmp_path / "tensorboard").exists()


def test_each_line_is_flushed_before_close(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, [], is_main_process=True)
    logger.log("train", 1, loss=2.0)
    # Read while the logger is still open: this is what a killed run leaves behind.
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 2.0
    logger.close()
    logger.close()  # idempotent


def test_partial_last_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "step": 10, "loss": 1.0}\n{"event": "train", "st', encoding="utf-8")
    with MetricsLogger(tmp_path, [], is_main_process=True) as logger:
        logger.log("train", 20, loss=0.5)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert lines[1] == '{"event": "train", "st'
    assert json.loads(lines[2])["loss"] == 0.5


def test_a_resumed_run_drops_the_records_after_its_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(tmp_path, ["tensorboard"], is_main_process=True) as logger:
        logger.log("start", 0)
        for step in range(1, 6):
            logger.log("train", step, loss=10.0 - step)
        logger.log("eval", 4, f1=40.0)
    with path.open("a", encoding="utf-8") as f:
        f.write('{"event": "train", "st')  # torn by the kill
    # The checkpoint was at step 3: steps 4-5 (and the eval at 4) are redone by the resumed run.
    with MetricsLogger(tmp_path, ["tensorboard"], is_main_process=True, resume_step=3) as logger:
        for step in range(4, 7):
            logger.log("train", step, loss=20.0 - step)
    records = read_jsonl(path)
    assert [(r["event"], r["step"]) for r in records] == [("start", 0)] + [("train", s) for s in range(1, 7)]
    assert [r["loss"] for r in records[1:]] == [9.0, 8.0, 7.0, 16.0, 15.0, 14.0]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 16.0), (5, 15.0), (6, 14.0)]


def test_tensor_values_become_numbers(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, [], is_main_process=True) as logger:
        logger.log("train", 3, loss=torch.tensor(1.25), grad_norm=torch.tensor(0.5, dtype=torch.float64))
    record = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert record["loss"] == 1.25 and record["grad_norm"] == 0.5


def test_non_main_process_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    logger = MetricsLogger(out, ["tensorboard"], is_main_process=False, run_config={"lr": 0.3})
    logger.log("train", 1, loss=1.0)
    logger.log("eval", 1, exact_match=1.0, f1=2.0)
    logger.close()
    assert not out.exists()


@pytest.mark.parametrize("main", [True, False])
def test_wandb_requested_but_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, main: bool) -> None:
    # None in sys.modules makes `import wandb` raise ImportError even where wandb is installed.
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError) as info:
        MetricsLogger(tmp_path / "run", ["wandb"], is_main_process=main)
    assert str(info.value) == "--report_to wandb needs the wandb package: pip install wandb"
    assert not (tmp_path / "run").exists()


def test_wandb_receives_prefixed_scalars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []

    class FakeRun:
        def log(self, data: dict[str, float], step: int) -> None:
            calls.append(("log", (data, step)))

        def finish(self) -> None:
            calls.append(("finish", None))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(tmp_path / "run7", ["wandb"], is_main_process=True, run_config={"lr": 0.3}) as logger:
        logger.log("train", 50, loss=2.5, lr=0.3, note="text is not a scalar")
        logger.log("eval", 100, exact_match=40.0, f1=50.5)
    assert calls[0][0] == "init" and calls[0][1]["config"] == {"lr": 0.3} and calls[0][1]["name"] == "run7"
    assert calls[1:] == [
        ("log", ({"train/loss": 2.5, "train/lr": 0.3}, 50)),
        ("log", ({"eval/exact_match": 40.0, "eval/f1": 50.5}, 100)),
        ("finish", None),
    ]


def test_unknown_destination_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mlflow"):
        MetricsLogger(tmp_path, ["tensorboard", "mlflow"], is_main_process=True)


def test_report_to_as_a_bare_string(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, "tensorboard", is_main_process=True)  # type: ignore[arg-type]
    logger.close()
    assert logger.report_to == ("tensorboard",)
    assert any((tmp_path / "tensorboard").iterdir())


# --------------------------------------------------------------------------- Progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress_display.time, "monotonic", fake)
    return fake


@pytest.mark.parametrize("tty", [True, False])
def test_disabled_progress_prints_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tty: bool
) -> None:
    monkeypatch.setattr(progress_display, "is_tty", lambda stream=None: tty)
    with progress(10, desc="train", enabled=False, log_interval_s=0) as bar:
        for _ in range(10):
            bar.update(1, loss=1.5)
        bar.write("evaluating")
    assert bar.mode == "off"
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_not_a_tty_prints_plain_lines_at_percent_marks(
    capsys: pytest.CaptureFixture[str], clock: FakeClock
) -> None:
    with progress(10, desc="train", enabled=True, log_interval_s=1e9, log_every_percent=50) as bar:
        for _ in range(10):
            clock.now += 2.0
            bar.update(1, loss=1.23456, examples_per_second=55.123, dev_f1=70.2)
    out, err = capsys.readouterr()
    assert bar.mode == "lines"
    assert out == ""
    assert "\r" not in err and "it/s" not in err and "█" not in err
    lines = err.splitlines()
    assert lines == [
        "train: step 5/10 (50%) loss 1.235 ex/s 55.12 dev_f1 70.2 2.00 s/step eta 0:00:10 elapsed 0:00:10",
        "train: step 10/10 (100%) loss 1.235 ex/s 55.12 dev_f1 70.2 2.00 s/step eta 0:00:00 elapsed 0:00:20",
    ]


def test_not_a_tty_prints_at_a_steady_interval(capsys: pytest.CaptureFixture[str], clock: FakeClock) -> None:
    bar = Progress(
        total=3000, desc="train", enabled=True, log_interval_s=10.0, log_every_percent=0, initial=100
    )
    for _ in range(9):
        clock.now += 4.0
        bar.update(1, loss=2.0)
    bar.write("eval at step 109: f1 70.0")
    clock.now += 1.0
    bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    # Lines every 10+ s (at 12, 24, 36 s), the message, then the unreported last step at close.
    assert [line.split(" loss")[0] for line in lines if line.startswith("train:")] == [
        "train: step 103/3000 (3%)",
        "train: step 106/3000 (4%)",
        "train: step 109/3000 (4%)",
        "train: step 110/3000 (4%)",
    ]
    assert len(lines) == 5 and lines[3] == "eval at step 109: f1 70.0"
    # The rate counts only steps done since the resume: 3 steps in 12 s.
    assert lines[0].endswith("4.00 s/step eta 3:13:08 elapsed 0:00:12")


def test_open_ended_count(capsys: pytest.CaptureFixture[str], clock: FakeClock) -> None:
    with progress(None, desc="", enabled=True, unit="batch", log_interval_s=0) as bar:
        clock.now += 1.0
        bar.update(3)
    assert capsys.readouterr().err.splitlines() == ["batch 3 3.00 batch/s elapsed 0:00:01"]


def test_wrapping_an_iterable(capsys: pytest.CaptureFixture[str]) -> None:
    items = list(
        progress(["a", "b", "c", "d"], desc="eval", enabled=True, unit="batch", log_every_percent=25)
    )
    assert items == ["a", "b", "c", "d"]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ")[2] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]


def test_tty_draws_a_tqdm_bar(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_display, "is_tty", lambda stream=None: True)
    with progress(5, desc="train", enabled=True) as bar:
        for _ in range(5):
            bar.update(1, loss=1.5, examples_per_second=32.0)
        bar.write("a message")
    assert bar.mode == "bar"
    err = capsys.readouterr().err
    assert "\r" in err and "5/5" in err and "loss=1.5" in err and "ex/s=32" in err
    assert "a message\n" in err


def test_is_tty_on_non_terminal_streams(tmp_path: Path) -> None:
    with open(tmp_path / "log.txt", "w") as f:
        assert progress_display.is_tty(f) is False
    f.close()
    assert progress_display.is_tty(f) is False  # closed stream: isatty() raises, we answer False
