"""Experiment tracking: the metrics log and its TensorBoard/wandb scalars.

The progress display lives in `softprompt.runtime.progress`.

``metrics.jsonl`` is the source of truth for a run; ``softprompt report`` reads it back.
TensorBoard and wandb are optional mirrors of the same numbers. Everything here is a no-op
on non-main processes so that a multi-GPU run logs each step exactly once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from softprompt.config.choices import ReportTo
from softprompt.config.choices import values as choice_values
from softprompt.errors import ConfigError
from softprompt.io.atomic import atomic_write_text
from softprompt.io.rundir import METRICS_FILE, TENSORBOARD_DIR
from softprompt.runtime.progress import plain_value

__all__ = ["METRICS_FILE", "REPORT_TO_CHOICES", "MetricsLogger"]

REPORT_TO_CHOICES = choice_values(ReportTo)

# Keys that describe the record rather than measure the model; they are not plotted as scalars.
_NON_SCALAR_KEYS = frozenset({"event", "step", "time"})


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _drop_records_after(path: Path, step: int, redo: Collection[str] = ()) -> None:
    """Rewrite a metrics file without the records logged after `step` (and any torn line), atomically.

    A line that is not a JSON object with an integer step (torn by a kill, or edited) is dropped too:
    no reader could place it, and the resumed run logs its step again.
    """
    kept = []
    redo = frozenset(redo)
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line torn by a kill in mid-write
        at = record.get("step", 0) if isinstance(record, dict) else None
        placed = isinstance(at, int) and not isinstance(at, bool)
        if placed and (at < step or (at == step and record.get("event") not in redo)):
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def _validate_report_to(report_to: Sequence[str]) -> tuple[str, ...]:
    if isinstance(report_to, str):
        # A bare string would otherwise be iterated character by character.
        report_to = [report_to]
    chosen = tuple(dict.fromkeys(str(r).strip().lower() for r in report_to))
    unknown = [r for r in chosen if r not in REPORT_TO_CHOICES]
    if unknown:
        raise ConfigError(f"--report_to got {', '.join(unknown)}; choose from {', '.join(REPORT_TO_CHOICES)}")
    # "none" next to a real destination is read as the real one, as config validation accepts it.
    return tuple(r for r in chosen if r != "none")


class MetricsLogger:
    """Appends metric records to ``metrics.jsonl`` and mirrors them to TensorBoard and wandb.

    Each call to :meth:`log` writes one JSON line and flushes it, so a run that is killed keeps
    everything logged so far; the file is opened in append mode so a resumed run continues it. A run
    resumed from step N first drops the records after step N: the interrupted run logged them after
    its last checkpoint, and the resumed run logs those steps again (TensorBoard likewise purges them),
    and the records at step N of the events it logs again there (`redo`: an evaluation the checkpoint
    was written before, a finished run's final evaluation and end), so no record appears twice.

    Args:
        output_dir: The run directory; ``metrics.jsonl`` and ``tensorboard/`` go inside it.
        report_to: Extra destinations, a subset of ``{"tensorboard", "wandb", "none"}``.
            ``metrics.jsonl`` is always written.
        is_main_process: Only the main process writes anything; others get a silent logger.
        run_config: The resolved run configuration, recorded in TensorBoard as text and as the
            wandb run config.
        resume_step: The step a resumed run restarts from; records after it are dropped first.
        redo: The events the resumed run logs again at ``resume_step``; their records there are dropped.

    Raises:
        ConfigError: ``report_to`` names an unknown destination, or asks for wandb when the
            ``wandb`` package is not installed.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        report_to: Sequence[str] = (),
        is_main_process: bool = True,
        run_config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        redo: Collection[str] = (),
    ) -> None:
        self.output_dir = Path(output_dir)
        self.report_to = _validate_report_to(report_to)
        self.is_main_process = is_main_process
        self.metrics_path = self.output_dir / METRICS_FILE
        self._file: IO[str] | None = None
        self._writer: Any = None
        self._wandb: Any = None
        self._wandb_run: Any = None
        self._closed = False

        if "wandb" in self.report_to:
            # Checked on every rank so that all processes fail together with the same message,
            # instead of rank 0 dying while the others wait for it in a collective.
            try:
                import wandb
            except ImportError as exc:
                raise ConfigError("--report_to wandb needs the wandb package: pip install wandb") from exc
            self._wandb = wandb

        if not is_main_process:
            return

        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.metrics_path.exists():
            _drop_records_after(self.metrics_path, resume_step, redo)
        needs_newline = self.metrics_path.exists() and _ends_without_newline(self.metrics_path)
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - lives until close()
        if needs_newline:
            # A kill in mid-write leaves a partial last line; start on a fresh line so only that
            # record is lost rather than the first record of the resumed run as well.
            self._file.write("\n")
            self._file.flush()

        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                log_dir=str(self.output_dir / TENSORBOARD_DIR),
                flush_secs=30,
                purge_step=None if resume_step is None else resume_step + 1,
            )
            if run_config:
                self._writer.add_text("config", _config_markdown(run_config), global_step=0)

        if self._wandb is not None:
            self._wandb_run = self._wandb.init(
                project=os.environ.get("WANDB_PROJECT", "softprompt"),
                name=self.output_dir.name,
                dir=str(self.output_dir),
                config=dict(run_config or {}),
            )

    def log(self, event: str, step: int, **values: Any) -> None:
        """Record one event.

        Args:
            event: ``"train"``, ``"eval"``, ``"start"``, ``"end"`` or any other label; it becomes
                the record's ``event`` field and the scalar prefix (``train/loss``).
            step: The optimizer step the values belong to.
            **values: JSON-serialisable values; numbers (including 0-d tensors) also become
                TensorBoard/wandb scalars. ``time`` defaults to the current Unix time.
        """
        if not self.is_main_process or self._closed:
            return
        record: dict[str, Any] = {"event": event, "step": int(step)}
        record.update({k: plain_value(v) for k, v in values.items()})
        record.setdefault("time", time.time())
        assert self._file is not None
        # NaN/Infinity are kept (Python's json reads them back) because a diverged loss is
        # exactly the kind of thing the log must not hide.
        try:
            self._file.write(json.dumps(record) + "\n")
            # A flush hands the line to the OS, which survives the process being killed; fsync
            # per line would only add safety against power loss at a real cost per step.
            self._file.flush()
        except OSError as e:  # disk full, EIO: name the file (the trainer reports it in one line)
            raise OSError(e.errno, e.strerror, str(self.metrics_path)) from e

        scalars = {
            key: float(value)
            for key, value in record.items()
            if key not in _NON_SCALAR_KEYS and _is_scalar(value)
        }
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(f"{event}/{key}", value, global_step=int(step))
            if event != "train":
                # Eval points are rare and precious; don't leave them in the buffer for 30 s.
                self._writer.flush()
        if self._wandb_run is not None and scalars:
            self._wandb_run.log({f"{event}/{key}": value for key, value in scalars.items()}, step=int(step))

    def close(self) -> None:
        """Flush and close every destination. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _ends_without_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _config_markdown(config: Mapping[str, Any]) -> str:
    # TensorBoard renders text summaries as Markdown; a table reads better than a dict repr.
    rows = "\n".join(f"| {key} | {_escape_cell(value)} |" for key, value in sorted(config.items()))
    return "| key | value |\n|---|---|\n" + rows


def _escape_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
