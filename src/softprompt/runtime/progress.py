"""A progress display for long loops: a tqdm bar on a terminal, plain status lines otherwise.

Training (`softprompt.training.loop`) and inference (`softprompt.inference.engine`) both draw it; it
is a no-op where disabled (non-main ranks), so a multi-GPU job shows each step once.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import IO, Any

__all__ = ["LineSchedule", "Progress", "is_tty", "plain_value", "progress", "status_line"]


def plain_value(value: Any) -> Any:
    """Turn tensors and numpy scalars into Python numbers so json, TensorBoard and the display accept them."""
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes)):
        try:
            return item()
        except (ValueError, RuntimeError):
            # A multi-element tensor has no .item(); fall through and let json complain clearly.
            return value
    return value


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
    value = plain_value(value)
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
