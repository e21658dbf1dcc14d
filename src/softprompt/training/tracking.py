"""Experiment tracking: the metrics log, TensorBoard/wandb scalars, and a progress display.

``metrics.jsonl`` is the source of truth for a run; ``softprompt report`` reads it back.
TensorBoard and wandb are optional mirrors of the same numbers. Everything here is a no-op
on non-main processes so that a multi-GPU run logs each step exactly once.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from softprompt.config.choices import ReportTo
from softprompt.config.choices import values as choice_values
from softprompt.errors import ConfigError
from softprompt.io.atomic import atomic_write_text
from softprompt.io.rundir import METRICS_FILE, TENSORBOARD_DIR

__all__ = ["METRICS_FILE", "REPORT_TO_CHOICES", "MetricsLogger", "Progress", "is_tty", "progress"]

REPORT_TO_CHOICES = choice_values(ReportTo)

# Keys that describe the record rather than measure the model; they are not plotted as scalars.
_NON_SCALAR_KEYS = frozenset({"event", "step", "time"})


def _plain(value: Any) -> Any:
    """Turn tensors and numpy scalars into Python numbers so json and TensorBoard accept them."""
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes)):
        try:
            return item()
        except (ValueError, RuntimeError):
            # A multi-element tensor has no .item(); fall through and let json complain clearly.
            return value
    return value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrite a metrics file without the records logged after `step` (and any torn line), atomically."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill in mid-write
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
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
    its last checkpoint, and the resumed run logs those steps again (TensorBoard likewise purges them).

    Args:
        output_dir: The run directory; ``metrics.jsonl`` and ``tensorboard/`` go inside it.
        report_to: Extra destinations, a subset of ``{"tensorboard", "wandb", "none"}``.
            ``metrics.jsonl`` is always written.
        is_main_process: Only the main process writes anything; others get a silent logger.
        run_config: The resolved run configuration, recorded in TensorBoard as text and as the
            wandb run config.
        resume_step: The step a resumed run restarts from; records after it are dropped first.

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
            _drop_records_after(self.metrics_path, resume_step)
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
        record.update({k: _plain(v) for k, v in values.items()})
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


# --------------------------------------------------------------------------- progress display


def is_tty(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default: ``sys.stderr``, where the bar is drawn) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:
        # isatty() on a closed stream raises; a closed stream is certainly not a terminal.
        return False


# Short display names, so a log line fits on one screen.
_POSTFIX_NAMES = {"examples_per_second": "ex/s", "learning_rate": "lr"}


def _format_value(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


def status_line(
    *,
    desc: str,
    unit: str,
    n: int,
    total: int | None,
    postfix: Mapping[str, Any],
    done: int,
    elapsed: float,
) -> str:
    """The plain-text progress line, e.g. ``train: step 120/3000 (4%) loss 1.234 2.00 step/s eta 0:24:00 elapsed 0:01:00``.

    Args:
        desc: the label in front ("" for none).
        unit: the name of one unit.
        n: units counted so far.
        total: units expected, or None for an open-ended count.
        postfix: the values shown after the counter (long names shortened, floats to 4 digits).
        done: units done by this process (the rate counts only these, so a resumed run doesn't
            claim the steps its predecessor did as instant).
        elapsed: seconds since this process started counting.
    """
    parts = [f"{desc}:"] if desc else []
    if total:
        parts.append(f"{unit} {n}/{total} ({100.0 * n / total:.0f}%)")
    else:
        parts.append(f"{unit} {n}")
    for key, value in postfix.items():
        parts.append(f"{_POSTFIX_NAMES.get(key, key)} {_format_value(value)}")
    if done > 0 and elapsed > 0:
        rate = done / elapsed
        # Slow steps (big models on one GPU) read better as seconds per step.
        parts.append(f"{rate:.2f} {unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{unit}")
        if total:
            parts.append(f"eta {_format_duration(max(0, total - n) / rate)}")
    parts.append(f"elapsed {_format_duration(elapsed)}")
    return " ".join(parts)


class LineSchedule:
    """When a redirected display prints its next plain line: every `interval_s` seconds, and each time
    another `every_percent` of the total is done.

    Args:
        total: units expected (None: no percent marks).
        interval_s: longest gap between lines.
        every_percent: percent step of the marks (<= 0: no marks).
        n: the count at the start.
        now: the clock at the start.
    """

    def __init__(
        self, total: int | None, interval_s: float, every_percent: float, n: int, now: float
    ) -> None:
        self.total = total
        self.interval_s = interval_s
        self.every_percent = every_percent
        self.last_time = now
        self.last_n = n
        self.last_mark = self.mark(n)

    def mark(self, n: int) -> int:
        """Index of the last ``every_percent`` boundary reached at count ``n``."""
        if not self.total or self.every_percent <= 0:
            return 0
        return int(100.0 * n / self.total // self.every_percent)

    def due(self, n: int, now: float) -> bool:
        """Whether a line is due at count `n`; passing a mark counts it as reported."""
        mark = self.mark(n)
        if now - self.last_time >= self.interval_s or mark > self.last_mark:
            self.last_mark = mark
            return True
        return False

    def printed(self, n: int, now: float) -> None:
        """Record that a line for count `n` was printed at `now`."""
        self.last_time = now
        self.last_n = n


def _tqdm_bar(total: int | None, desc: str, unit: str, initial: int, file: IO[str]) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc or None, unit=unit, initial=initial, file=file, dynamic_ncols=True)


def _length(iterable: Iterable[Any] | None) -> int | None:
    try:
        return len(iterable) if iterable is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None


class Progress:
    """A progress display that is a tqdm bar on a terminal and plain log lines elsewhere.

    On a terminal it shows step/total, rate and ETA with the postfix values (loss, ex/s,
    dev F1). When the output is redirected (a cluster job's log file), a redrawn bar would
    fill the file with carriage returns, so it prints a plain line such as
    ``train: step 120/3000 (4%) loss 1.234 ex/s 55.1 dev_f1 70.2 eta 0:10:00`` every
    ``log_interval_s`` seconds and at every ``log_every_percent`` of the total. When
    ``enabled`` is False (every rank but 0) it prints nothing at all.

    Args:
        iterable: Optional iterable to wrap; iterating advances the display by one per item.
        total: Number of units expected; taken from ``len(iterable)`` when not given.
        desc: A short label printed in front of the bar or line.
        enabled: False silences the display completely.
        unit: The name of one unit ("step", "batch", "example").
        initial: The count to start from, for a resumed run.
        log_interval_s: Longest gap between plain lines when not on a terminal.
        log_every_percent: Also print a plain line each time this much of the total is done.
        file: Where to write; ``sys.stderr`` at construction time when None.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        enabled: bool = True,
        unit: str = "step",
        initial: int = 0,
        log_interval_s: float = 30.0,
        log_every_percent: float = 10.0,
        file: IO[str] | None = None,
    ) -> None:
        self.iterable = iterable
        self.total = total if total is not None else _length(iterable)
        self.desc = desc
        self.enabled = enabled
        self.unit = unit
        self.n = initial
        self.postfix: dict[str, Any] = {}
        self._file = file if file is not None else sys.stderr
        self._initial = initial
        self._start = time.monotonic()
        self._schedule = LineSchedule(self.total, log_interval_s, log_every_percent, initial, self._start)
        self._closed = False
        self.mode = ("bar" if is_tty(self._file) else "lines") if enabled else "off"
        self._bar: Any = (
            _tqdm_bar(self.total, desc, unit, initial, self._file) if self.mode == "bar" else None
        )

    def set_postfix(self, **postfix: Any) -> None:
        """Update the values shown after the counter; they persist until replaced."""
        self.postfix.update(postfix)
        if self._bar is not None:
            shown = {_POSTFIX_NAMES.get(k, k): _format_value(v) for k, v in self.postfix.items()}
            self._bar.set_postfix(shown, refresh=False)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` units and optionally update postfix values (``loss=..., dev_f1=...``)."""
        if self._closed:
            return
        if postfix:
            self.set_postfix(**postfix)
        self.n += n
        if self.mode == "bar":
            self._bar.update(n)
        elif self.mode == "lines":
            now = time.monotonic()
            if self._schedule.due(self.n, now):
                self._emit_line(now)

    def line(self, now: float | None = None) -> str:
        """The plain-text status line for the current state."""
        now = time.monotonic() if now is None else now
        return status_line(
            desc=self.desc,
            unit=self.unit,
            n=self.n,
            total=self.total,
            postfix=self.postfix,
            done=self.n - self._initial,
            elapsed=now - self._start,
        )

    def _emit_line(self, now: float) -> None:
        print(self.line(now), file=self._file, flush=True)
        self._schedule.printed(self.n, now)

    def write(self, msg: str) -> None:
        """Print a message without breaking the bar; silent when disabled."""
        if self.mode == "bar":
            self._bar.write(msg, file=self._file)
        elif self.mode == "lines":
            print(msg, file=self._file, flush=True)

    def close(self) -> None:
        """Finish the display; in line mode, print a final line if progress went unreported."""
        if self._closed:
            return
        self._closed = True
        if self.mode == "bar":
            self._bar.close()
        elif self.mode == "lines" and self.n != self._schedule.last_n:
            self._emit_line(time.monotonic())

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this Progress wraps no iterable; call update() instead")
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def progress(
    iterable_or_total: Iterable[Any] | int | None,
    *,
    desc: str = "",
    enabled: bool = True,
    unit: str = "step",
    initial: int = 0,
    log_interval_s: float = 30.0,
    log_every_percent: float = 10.0,
    file: IO[str] | None = None,
) -> Progress:
    """Create a :class:`Progress` over an iterable or for a known number of units.

    Args:
        iterable_or_total: An iterable to wrap, an int total to drive with ``update()``, or
            None for an open-ended count.
        desc: A short label, e.g. ``"train"``.
        enabled: Pass ``rank == 0``; False prints nothing at all.
        unit: The name of one unit.
        initial: Starting count, for a resumed run.
        log_interval_s: Longest gap between plain lines when not on a terminal.
        log_every_percent: Also print a plain line at each such fraction of the total.
        file: Output stream; ``sys.stderr`` when None.

    Returns:
        The display; use it as a context manager so it is closed on errors too.
    """
    if isinstance(iterable_or_total, int) and not isinstance(iterable_or_total, bool):
        iterable, total = None, iterable_or_total
    else:
        iterable, total = iterable_or_total, None
    return Progress(
        iterable,
        total=total,
        desc=desc,
        enabled=enabled,
        unit=unit,
        initial=initial,
        log_interval_s=log_interval_s,
        log_every_percent=log_every_percent,
        file=file,
    )
