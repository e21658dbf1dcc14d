"""Micro-batching for `softprompt serve`: concurrent requests gathered into one batch for one model thread.

Requests for different tasks that arrive within a few milliseconds of each other become one mixed-prompt
batch (`MicroBatcher`); the model runs on a single worker thread, so the event loop keeps accepting
requests while a batch is decoded, and a bounded queue answers overload at once (`QueueFull`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from softprompt.errors import UserError
from softprompt.serving.schemas import AnswerFn, Row


@dataclass
class _Pending:
    rows: list[Any]  # as given to `submit`, or as `prepare` made them
    future: asyncio.Future[list[str]]
    length: int = 0  # the longest row's `length`, when the batcher has one


@dataclass
class BatcherStats:
    """Counters exposed on /health, so clients (and tests) can see that batching happens."""

    batches_run: int = 0
    max_batch_seen: int = 0
    requests_answered: int = 0
    rows_answered: int = 0
    requests_rejected: int = 0
    requests_abandoned: int = 0
    """Requests whose client left before their answer; their rows were dropped, not decoded."""
    rows_dropped: int = 0
    """Rows of abandoned requests dropped from a batch that was already running (oversized requests)."""
    window_waits: int = 0
    """Batches whose first request waited for company (not on /health)."""


class QueueFull(Exception):
    """The batcher's queue holds `max_queue` requests already; retry after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"{depth} requests are already waiting for the model")
        self.depth = depth
        self.retry_after = retry_after


class BatcherBase:
    """What both batchers share: the bounded queue, the prepare and model threads, start and stop.

    A subclass keeps its requests in `_waiting` (and any it took off the queue in `_unanswered`), forms
    its batches in `_run`, and learns of arrivals through `_wake_scheduler`.

    Args:
        prepare: rows -> prepared rows (e.g. `PromptBank.prepare`), run on a thread of its own; None
            queues rows as given.
        max_batch_size: most rows per batch.
        max_wait_ms: the longest a batch waits for company on its way.
        max_queue: most requests waiting for the model.
    """

    def __init__(
        self,
        *,
        prepare: Callable[[list[Row]], list[Any]] | None,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
    ) -> None:
        if max_batch_size < 1:
            raise UserError(f"--max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise UserError(f"--max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise UserError(f"--max_queue must be >= 1, got {max_queue}")
        self._prepare = prepare
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._waiting: list[Any] = []  # requests in arrival order, each with a `future`
        self._preparing = 0  # accepted requests still being prepared
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._prepare_executor: ThreadPoolExecutor | None = None

    @property
    def queue_depth(self) -> int:
        """Requests accepted and not yet on the model (waiting, or being prepared)."""
        return len(self._waiting) + self._preparing

    def retry_after(self) -> int:
        """Whole seconds until the waiting requests have likely been answered (at least 1)."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the scheduling task on the running event loop (idempotent)."""
        if self._task is not None and not self._task.done():
            return
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softprompt-model")
        if self._prepare is not None:
            self._prepare_executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="softprompt-prepare"
            )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="softprompt-batcher")

    async def _run(self) -> None:
        raise NotImplementedError

    def _unanswered(self) -> list[Any]:
        """Requests off the queue and not answered yet, which `stop` fails too; they are forgotten."""
        return []

    async def stop(self) -> None:
        """Stop scheduling and fail whatever still waits or runs (the server is shutting down)."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            # `asyncio.wait`, not `await task` under suppress(CancelledError): that would swallow the
            # cancellation of `stop` itself too (a shutdown deadline), returning while a step still runs.
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        pending, self._waiting = [*self._unanswered(), *self._waiting], []
        for p in pending:
            if not p.future.done():
                p.future.set_exception(RuntimeError("the server is shutting down"))
        for executor in (self._executor, self._prepare_executor):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._prepare_executor = None

    def _refuse_if_full(self) -> None:
        """Start if needed, and refuse a request at once when `max_queue` requests already wait.

        Raises:
            QueueFull: with the queue's depth and a Retry-After estimate; nothing is queued.
        """
        self.start()
        if self.queue_depth >= self.max_queue:
            self.stats.requests_rejected += 1
            raise QueueFull(self.queue_depth, self.retry_after())

    async def _prepared(self, rows: list[Any]) -> list[Any]:
        """`rows` through `prepare` on the prepare thread (as given without one); a window waiting for
        requests still being prepared learns that this one is done."""
        if self._prepare is None:
            return rows
        self._preparing += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._prepare_executor, self._prepare, rows)
        finally:
            self._preparing -= 1
            self._wake_scheduler()

    def _wake_scheduler(self) -> None:
        """Tell the scheduler that a request arrived or finished preparing (on the event loop)."""
        assert self._arrived is not None
        self._arrived.set()

    async def _next_arrival(self, timeout: float | None = None) -> bool:
        """Wait until a request arrives or finishes preparing; False on timeout."""
        assert self._arrived is not None
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _window(self, company_coming: Callable[[], bool]) -> None:
        """The batching window: wait for arrivals while `company_coming()` says more rows are on their way, at
        most `max_wait` in all; counted in `stats.window_waits`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        waited = False
        while company_coming():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            waited = True
            if not await self._next_arrival(remaining):
                break
        self.stats.window_waits += waited


class MicroBatcher(BatcherBase):
    """Gathers concurrent requests into one batch for a single model worker thread.

    A request is first prepared (`prepare`, e.g. tokenised, on a thread of its own, so that the model
    thread only runs the model), then waits. When the model is free, the batch is formed from what waits:

    * The window. A lone request does not wait: the batch runs at once unless company is on its way, that
      is while requests are still being prepared, or while fewer rows wait than the last batch held (the
      clients it answered are likely to send their next request now). Then it waits for them, at most
      `max_wait_ms`, and no longer once `max_batch_size` rows wait.
    * Batch formation. When everything waiting fits in `max_batch_size` rows, everything goes. Otherwise
      the oldest request (so none waits forever) is joined by the requests of the most similar lengths
      (`length`), growing the batch towards whichever neighbour in length adds the least padding; without
      `length`, by the oldest that fit. A request is never split, and one bigger than the cap runs alone.

    The batch runs in a one-thread executor, so the model is never entered twice at once and the event
    loop stays free. At most `max_queue` requests wait or are being prepared (the batch on the model is
    not counted); `submit` refuses more with `QueueFull` at once, holding nothing for them, so memory is
    bounded by `max_queue` requests plus one batch whatever the load.

    Args:
        answer: rows (prepared, if `prepare` is given) -> answers, called on the worker thread (e.g.
            `PromptBank.answer_prepared`).
        prepare: rows -> prepared rows, one per row (e.g. `PromptBank.prepare`); None queues rows as given.
        length: a prepared row's size for batch formation (e.g. `PreparedRow.length`); None: arrival order.
        max_batch_size: most questions per merged batch.
        max_wait_ms: the longest a batch's first request waits for company.
        max_queue: most requests waiting for the model.
    """

    def __init__(
        self,
        answer: AnswerFn,
        *,
        prepare: Callable[[list[Row]], list[Any]] | None = None,
        length: Callable[[Any], int] | None = None,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
    ) -> None:
        super().__init__(
            prepare=prepare, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue
        )
        self._answer = answer
        self._length = length
        self._batch_seconds = 1.0  # running mean of a batch's time on the model, for Retry-After
        self._last_rows = 0  # rows of the last batch: how much company to expect
        self._taken: list[_Pending] = []  # out of the queue, not answered yet

    def _unanswered(self) -> list[_Pending]:
        taken, self._taken = self._taken, []
        return taken

    def retry_after(self) -> int:
        """Whole seconds until the waiting requests have likely been run (at least 1)."""
        batches_ahead = self.queue_depth / self.max_batch_size + 1
        return max(1, math.ceil(self._batch_seconds * batches_ahead))

    async def submit(self, rows: list[Row]) -> list[str]:
        """Prepare and queue rows, and wait for their answers (in row order).

        Raises:
            QueueFull: `max_queue` requests already wait; nothing was queued.
        """
        self._refuse_if_full()
        assert self._arrived is not None
        items = await self._prepared(rows)
        length = max(map(self._length, items)) if self._length is not None and items else 0
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        pending = _Pending(rows=items, future=future, length=length)
        self._waiting.append(pending)
        self._wake_scheduler()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller gave up (its client left): its rows leave the queue now, not after decoding.
            with contextlib.suppress(ValueError):
                self._waiting.remove(pending)
            self.stats.requests_abandoned += 1
            raise

    def _rows_waiting(self) -> int:
        return sum(len(p.rows) for p in self._waiting)

    async def _gather(self) -> list[_Pending]:
        while not self._waiting:
            await self._next_arrival()
        await self._window(
            lambda: (
                self._rows_waiting() < self.max_batch_size
                and (self._preparing > 0 or self._rows_waiting() < self._last_rows)
            )
        )
        batch = self._select()
        chosen = {id(p) for p in batch}
        self._waiting = [p for p in self._waiting if id(p) not in chosen]
        return batch

    def _select(self) -> list[_Pending]:
        """The next batch from the waiting requests (see the class docstring)."""
        waiting, cap = self._waiting, self.max_batch_size
        if self._rows_waiting() <= cap:
            return list(waiting)
        oldest = waiting[0]
        if len(oldest.rows) >= cap:
            return [oldest]
        if self._length is None:
            batch, size = [], 0
            for p in waiting:
                if size + len(p.rows) <= cap:
                    batch.append(p)
                    size += len(p.rows)
            return batch
        # Grow a run of the length-sorted requests around the oldest, towards the cheaper neighbour.
        ranked = sorted(waiting, key=lambda p: p.length)
        lo = hi = next(i for i, p in enumerate(ranked) if p is oldest)
        size, longest, total = len(oldest.rows), oldest.length, len(oldest.rows) * oldest.length
        while True:
            options = []
            for j in (lo - 1, hi + 1):
                if 0 <= j < len(ranked) and size + len(ranked[j].rows) <= cap:
                    p = ranked[j]
                    rows, width = size + len(p.rows), max(longest, p.length)
                    options.append((rows * width - total - len(p.rows) * p.length, j))
            if not options:
                break
            _, j = min(options)
            p = ranked[j]
            lo, hi = min(lo, j), max(hi, j)
            size, longest, total = size + len(p.rows), max(longest, p.length), total + len(p.rows) * p.length
        chosen = {id(p) for p in ranked[lo : hi + 1]}
        return [p for p in waiting if id(p) in chosen]

    async def _answer_in_parts(self, batch: list[_Pending], rows: list[Any]) -> list[str]:
        """The batch's answers, run `max_batch_size` rows at a time on the model thread.

        Only a request bigger than the cap makes more than one part (`_select`). Between its parts, the
        requests that arrived meanwhile and fit in one batch run first (one big request must not hold
        the model for all its parts while a one-row request waits), and once its client has left, its
        remaining rows are dropped (answered "" for nobody): where dropping rows of a running batch pays.
        """
        loop = asyncio.get_running_loop()
        if len(rows) <= self.max_batch_size:
            return await loop.run_in_executor(self._executor, self._answer, rows)
        answers: list[str] = []
        for start in range(0, len(rows), self.max_batch_size):
            if all(p.future.done() for p in batch):
                self.stats.rows_dropped += len(rows) - start
                return answers + [""] * (len(rows) - start)
            if start:
                others = self._take_small()
                if others:
                    await self._run_batch(others)
            part = rows[start : start + self.max_batch_size]
            answers += await loop.run_in_executor(self._executor, self._answer, part)
        return answers

    def _take_small(self) -> list[_Pending]:
        """The waiting requests, oldest first, that fit in one batch together (none bigger than the cap)."""
        batch, size = [], 0
        for p in self._waiting:
            if not p.future.done() and size + len(p.rows) <= self.max_batch_size:
                batch.append(p)
                size += len(p.rows)
        chosen = {id(p) for p in batch}
        self._waiting = [p for p in self._waiting if id(p) not in chosen]
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        """Run one batch on the model and resolve its requests' futures (an exception fails them all)."""
        loop = asyncio.get_running_loop()
        self._taken = [*self._taken, *batch]
        rows = [r for p in batch for r in p.rows]
        self._last_rows = len(rows)
        started = loop.time()
        dropped_before = self.stats.rows_dropped
        try:
            answers = await self._answer_in_parts(batch, rows)
        except Exception as e:
            answers = e
        # Not on cancellation: `stop` fails what is still taken.
        self._taken = [p for p in self._taken if all(p is not q for q in batch)]
        if isinstance(answers, Exception):
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(answers)
            return
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (loop.time() - started)
        self.stats.batches_run += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(rows))
        self.stats.rows_answered += len(rows) - (self.stats.rows_dropped - dropped_before)
        start = 0
        for p in batch:
            part = answers[start : start + len(p.rows)]
            start += len(p.rows)
            if not p.future.done():
                self.stats.requests_answered += 1
                p.future.set_result(part)

    async def _run(self) -> None:
        while True:
            # A client that went away has a cancelled future; its rows are not worth decoding.
            batch = [p for p in await self._gather() if not p.future.done()]
            if batch:
                await self._run_batch(batch)
