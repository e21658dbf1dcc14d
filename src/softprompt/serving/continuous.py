"""Continuous batching for `softprompt serve`: requests join and leave the running batch at every decoder step.

`MicroBatcher` (`serving.batching`) runs a batch until its longest answer ends: a row that emitted EOS
keeps its slot, and a request that arrives meanwhile waits for the whole batch. `ContinuousBatcher`
schedules per decoder step instead (Orca's iteration-level scheduling): before each step it admits
waiting rows (one encoder pass, then they join the running decoder batch), and after it answers every
request whose rows have all finished, at once. Same queue bound (`QueueFull`, 503 + Retry-After), same
counters (`BatcherStats`), same interface to the app.

The step loop runs on the model thread: while the batch has rows it keeps stepping without returning to
the event loop, and hands the loop only the requests it answered (one `call_soon_threadsafe` per step
that finished some). A busy event loop (many clients, hostile ones included) therefore costs a request
one round trip, not one per decoder step. The loop only queues requests, answers them and marks those
whose client left; the shared queue is guarded by one lock, whose condition wakes the idle model thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from softprompt.errors import UserError
from softprompt.serving.batching import BatcherBase
from softprompt.serving.metrics import RequestClock, ServeMetrics, Timed
from softprompt.serving.schemas import Row


class StepDecoder(Protocol):
    """What the batcher drives on its model thread (`inference.continuous.ContinuousDecoder`)."""

    @property
    def rows(self) -> int:
        """Rows decoding now."""
        ...

    def tokens_with(self, joining: Sequence[Any]) -> int:
        """Encoder positions (rows x padded length) the running batch would hold with `joining` added."""
        ...

    def advance(
        self, joining: Sequence[tuple[Hashable, Any]] = (), leaving: Collection[Hashable] = ()
    ) -> list[tuple[Hashable, str]]:
        """Drop `leaving`, admit `joining`, run one decoder step; the (key, answer) of rows that ended."""
        ...

    def drop(self, leaving: Collection[Hashable]) -> None:
        """Drop the rows of these keys undecoded."""
        ...

    def clear(self) -> None:
        """Drop every row."""
        ...


@dataclass(eq=False)
class _Request:
    rows: list[Any]  # prepared rows
    future: asyncio.Future[list[str]]
    answers: list[str | None] = field(default_factory=list)
    admitted: int = 0  # rows handed to the decoder so far (a big request joins over several steps)
    running: set[Hashable] = field(default_factory=set)  # keys of its rows decoding now
    done: int = 0
    clock: RequestClock | None = None  # its times, for /metrics (rows submitted as `Timed`)
    left: bool = False  # its client left (set on the event loop, under the batcher's lock)


class ContinuousBatcher(BatcherBase):
    """Admits and retires requests' rows at every decoder step of one running batch, on the model thread.

    * Admission, before each step: waiting rows round robin over the waiting requests, oldest first, one
      row of each per round (a request of many rows joins over several steps, and a one-row request that
      came after it is not held back until all of them have), as long as the batch stays within
      `max_batch_size` rows and `max_batch_tokens` encoder positions (rows x padded encoder length: what
      the cross-attention caches hold); a row that does not fit stops admission, so no row overtakes
      one that waits before it in this order. One row always fits an empty batch.
    * Retirement, after each step: a row that emitted EOS or reached the token limit leaves the batch, and
      its request is answered as soon as its last row has.
    * The window: when the batch is empty and requests are still being prepared, the first step waits
      for them, at most `max_wait_ms`; a running batch never waits (newcomers join at the next step).
    * Abandoned requests: queued rows leave the queue at once; running rows are dropped before the next
      step (`rows_dropped`).
    * Bounded queue: at most `max_queue` requests wait or are being prepared (rows decoding are not
      counted); `submit` refuses more with `QueueFull`, holding nothing for them.
    * Threads: the steps, admission and retirement run on the model thread (`_step_loop`), which waits
      on a condition when the batch is empty; the event loop queues requests, marks abandoned ones and
      resolves the futures the model thread hands back. `_waiting` and `_Request.left` are shared, under
      `_lock`; `_running` and the decoder belong to the model thread.

    Args:
        decoder: the running batch, driven on one model thread.
        prepare: rows -> prepared rows (e.g. `PromptBank.prepare`), run on a thread of its own.
        max_batch_size: most rows decoding at once.
        max_batch_tokens: most encoder positions (rows x padded length) decoding at once.
        max_wait_ms: the longest an empty batch waits for requests still being prepared.
        max_queue: most requests waiting for the model.
        max_new_tokens: the longest answer, for Retry-After.
        metrics: where queue wait, time to first answer, admitted rows and running rows are observed
            (rows then arrive as `Timed`, each with its request's clock; `prepare` gets the bare rows).
    """

    def __init__(
        self,
        decoder: StepDecoder,
        *,
        prepare: Callable[[list[Row]], list[Any]],
        max_batch_size: int = 32,
        max_batch_tokens: int = 65536,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        max_new_tokens: int = 32,
        metrics: ServeMetrics | None = None,
    ) -> None:
        if max_batch_tokens < 1:
            raise UserError(f"--max_batch_tokens must be >= 1, got {max_batch_tokens}")
        super().__init__(
            prepare=prepare, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue
        )
        self.decoder = decoder
        self.metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_new_tokens = max_new_tokens
        self._step_seconds = 0.01  # running mean of one decoder step, for Retry-After
        self._running: list[_Request] = []  # with rows in the decoder (model thread only)
        self._serial = itertools.count()
        self._lock = threading.Lock()  # guards `_waiting`, `_Request.left` and `_stopping`
        self._wake = threading.Condition(self._lock)  # the idle model thread waits on it
        self._stopping = False

    def _unanswered(self) -> list[_Request]:
        running, self._running = self._running, []
        return running

    def retry_after(self) -> int:
        """Whole seconds until the waiting requests have likely been answered (at least 1)."""
        rounds = self.queue_depth / self.max_batch_size + 1
        return max(1, math.ceil(self._step_seconds * self.max_new_tokens * rounds))

    def _wake_scheduler(self) -> None:
        with self._wake:
            self._wake.notify_all()

    async def submit(self, rows: list[Row]) -> list[str]:
        """Prepare and queue rows, and wait for their answers (in row order).

        Raises:
            QueueFull: `max_queue` requests already wait; nothing was queued.
        """
        self._refuse_if_full()
        clock = rows[0].clock if rows and isinstance(rows[0], Timed) else None
        items = await self._prepared([r.row if isinstance(r, Timed) else r for r in rows])
        request = _Request(rows=items, future=asyncio.get_running_loop().create_future(), clock=clock)
        request.answers = [None] * len(items)
        if not items:
            return []
        with self._wake:
            self._waiting.append(request)
            self._wake.notify_all()
        try:
            return await request.future
        except asyncio.CancelledError:
            # The client left: its queued rows leave now; its running rows before the next step.
            with self._lock:
                request.left = True
                with contextlib.suppress(ValueError):
                    self._waiting.remove(request)
            self.stats.requests_abandoned += 1
            raise

    def _company_coming(self) -> bool:
        """Before the first step of an empty batch: requests are still being prepared and there is room."""
        return (
            self._preparing > 0 and sum(len(p.rows) - p.admitted for p in self._waiting) < self.max_batch_size
        )

    def _admit(self) -> list[tuple[Hashable, Any]]:
        """The waiting rows that join before the next step (see the class docstring); under `_lock`."""
        joining: list[tuple[Hashable, Any]] = []
        rows: list[Any] = []
        # Round robin over the waiting requests, oldest first, one row each per round: a request of many
        # rows joins over several steps without holding back a one-row request that came after it.
        while self._waiting:
            for request in list(self._waiting):
                row = request.rows[request.admitted]
                fits = self.decoder.rows + len(rows) < self.max_batch_size and (
                    self.decoder.tokens_with([*rows, row]) <= self.max_batch_tokens
                )
                if not fits and (self.decoder.rows or rows):
                    return joining
                if request.admitted == 0:
                    self._observe_start(request)
                key = (next(self._serial), request.admitted)
                joining.append((key, row))
                rows.append(row)
                request.running.add(key)
                if request not in self._running:
                    self._running.append(request)
                request.admitted += 1
                if request.admitted == len(request.rows):
                    self._waiting.remove(request)
        return joining

    def _observe_start(self, request: _Request) -> None:
        """A request's first row joins the batch: its queue wait ends."""
        if self.metrics is not None and request.clock is not None and request.clock.started is None:
            request.clock.started = time.monotonic()
            self.metrics.queue_wait.observe(request.clock.started - request.clock.arrived)

    def _observe_first_answer(self, request: _Request) -> None:
        """A request's first row finished."""
        if self.metrics is not None and request.clock is not None and request.clock.first_answer is None:
            request.clock.first_answer = time.monotonic()
            self.metrics.first_answer.observe(request.clock.first_answer - request.clock.arrived)

    def _abandoned(self) -> set[Hashable]:
        """Keys of running rows whose request's client left; those requests leave the running list (under
        `_lock`)."""
        leaving: set[Hashable] = set()
        for request in [r for r in self._running if r.left]:
            leaving |= request.running
            self.stats.rows_dropped += len(request.running)
            self._running.remove(request)
        return leaving

    def _finish(self, finished: list[tuple[Hashable, str]]) -> list[tuple[_Request, list[str]]]:
        """Record finished rows; the requests whose rows have all finished, with their answers, leave the
        running list."""
        owner = {key: r for r in self._running for key in r.running}
        for key, answer in finished:
            request = owner.get(key)
            if request is None:  # a row dropped in the same step it ended
                continue
            request.running.discard(key)
            request.answers[key[1]] = answer
            if request.done == 0:
                self._observe_first_answer(request)
            request.done += 1
            self.stats.rows_answered += 1
        answered = [r for r in self._running if r.done == len(r.rows)]
        self._running = [r for r in self._running if r.done < len(r.rows)]
        return [(r, [a or "" for a in r.answers]) for r in answered]

    def _answer(self, answered: list[tuple[_Request, list[str]]]) -> None:
        """On the event loop: resolve the futures of requests the model thread answered."""
        for request, answers in answered:
            if not request.future.done():  # not abandoned, nor failed by `stop` meanwhile
                self.stats.requests_answered += 1
                request.future.set_result(answers)

    @staticmethod
    def _reject(failed: list[_Request], error: Exception) -> None:
        """On the event loop: fail these requests' futures with the model's error."""
        for request in failed:
            if not request.future.done():
                request.future.set_exception(error)

    def _fail(self) -> list[_Request]:
        """The model failed: every request with rows in the batch leaves queue and batch (to be failed), and
        the batch starts over."""
        failed, self._running = self._running, []
        with self._lock:
            self._waiting = [r for r in self._waiting if all(r is not f for f in failed)]
        self.decoder.clear()
        return failed

    async def _run(self) -> None:
        """Run the step loop on the model thread until cancelled (`stop`), then wait for it to end (after at
        most the step it is in) and join the thread, so that none outlives the batcher."""
        loop = asyncio.get_running_loop()
        self._stopping = False
        steps = loop.run_in_executor(self._executor, self._step_loop, loop)
        try:
            await asyncio.shield(steps)
        finally:
            with self._wake:
                self._stopping = True
                self._wake.notify_all()
            await asyncio.wait([steps])
            # The step loop has returned, so its thread is idle: joining it is immediate.
            if self._executor is not None:
                self._executor.shutdown(wait=True)

    def _next_arrivals(self) -> bool:
        """On the model thread, before a step: wait while the batch and the queue are empty, and hold an empty
        batch's window; False once stopping."""
        with self._wake:
            self._wake.wait_for(lambda: self._stopping or bool(self._running or self._waiting))
            if not self._running and self.max_wait > 0 and self._company_coming():
                self.stats.window_waits += 1
                self._wake.wait_for(lambda: self._stopping or not self._company_coming(), self.max_wait)
            return not self._stopping

    def _step(self) -> tuple[list[tuple[Hashable, Any]], list[tuple[Hashable, str]]]:
        """On the model thread: drop the rows of clients that left, admit, run one decoder step; the rows
        that joined and the (key, answer) of those that ended."""
        with self._lock:
            leaving = self._abandoned()
        if leaving:  # first, so that admission sees the room they leave
            self.decoder.drop(leaving)
        with self._lock:
            joining = self._admit()
        if not joining and not self._running:
            return [], []
        return joining, self.decoder.advance(joining)

    def _step_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The model thread's loop: admit, step, retire, until `_stopping`; only answered and failed requests
        go back to the event loop (one callback per step that has any)."""
        # Rows a stopped batcher left in the decoder have no request any more.
        self.decoder.clear()
        while self._next_arrivals():
            started = time.monotonic()
            try:
                joining, finished = self._step()
            except Exception as e:
                loop.call_soon_threadsafe(self._reject, self._fail(), e)
                continue
            if not joining and not finished and not self._running:
                continue  # everything that waited was abandoned: no step ran
            self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.monotonic() - started)
            if joining:
                self.stats.batches_run += 1
                if self.metrics is not None:
                    self.metrics.batch_size.observe(len(joining))
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, self.decoder.rows + len(finished))
            answered = self._finish(finished)
            if answered:
                loop.call_soon_threadsafe(self._answer, answered)
            if self.metrics is not None:
                self.metrics.running_rows.set(self.decoder.rows)
