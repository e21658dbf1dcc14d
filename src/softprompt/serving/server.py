"""`softprompt serve`: one frozen T5 answering for many soft prompts over HTTP.

Requests for different tasks that arrive within a few milliseconds of each other are gathered into
one mixed-prompt batch (`bank.PromptBank`), which is what makes prompt tuning cheap to serve: one
copy of the model, one forward pass, many tasks. The model runs on a single worker thread so the
event loop keeps accepting requests (and answering /health) while a batch is being decoded.

Endpoints: `POST /v1/answer`, `GET /v1/tasks`, `GET /health`, and FastAPI's `/openapi.json` and
`/docs`. Every error answers `{"error": "one sentence", "errors": [...field details, if any]}` with one
status scheme: 413 for a request too large, 422 for any other request body the server cannot answer
(malformed JSON, missing or invalid fields, an unknown task), 404 and 405 for an unknown path or
method, 500 when the model fails, and 503 with a `Retry-After` header when the queue of requests waiting
for the model is full (`--max_queue`): an overloaded server says so at once instead of letting clients
time out, and its memory stays bounded however many requests arrive. 503 rather than 429 because the
limit is the server's capacity, not one client's request rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Discriminator, Field, Tag

from softprompt.data.records import BadRecord
from softprompt.errors import UserError
from softprompt.inference.bank import PromptBank, load_model_and_prompts
from softprompt.tasks.text.task import TaskSpec

Row = tuple[str, str, str | None]  # (task, question, context), or a text task's (task, model input, None)
ENDPOINTS = "POST /v1/answer, GET /v1/tasks, GET /health"
AnswerFn = Callable[[list[Row]], list[str]]


# ----------------------------------------------------------------------------------------------------
# Request and response bodies


class AnswerInput(BaseModel):
    """One question (QA tasks) or one example (text tasks: `fields`) for one task."""

    task: str = Field(min_length=1, description="Name of a loaded prompt (see GET /v1/tasks).")
    question: str | None = Field(default=None, min_length=1, description="The question (QA tasks).")
    context: str | None = Field(
        default=None, min_length=1, description="The passage that holds the answer (QA tasks)."
    )
    fields: dict[str, Any] | None = Field(
        default=None,
        description="A text task's fields, filled into the template its prompt was trained with "
        '(e.g. {"premise": "...", "hypothesis": "..."} for RTE).',
    )


class BatchAnswerRequest(BaseModel):
    """Several questions, for any mix of tasks, answered in order."""

    inputs: list[AnswerInput] = Field(min_length=1, description="The questions.")


def _body_kind(value: Any) -> str:
    # Choose the branch from the body's shape so that validation errors come from that branch only.
    if isinstance(value, dict):
        return "batch" if "inputs" in value else "single"
    return "batch" if isinstance(value, BatchAnswerRequest) else "single"


AnswerRequest = Annotated[
    Annotated[AnswerInput, Tag("single")] | Annotated[BatchAnswerRequest, Tag("batch")],
    Discriminator(_body_kind),
]


class AnswerResponse(BaseModel):
    """The answer to one question."""

    answer: str


class BatchAnswerResponse(BaseModel):
    """Answers in the order of the request's inputs."""

    answers: list[str]


class TaskInfo(BaseModel):
    """A loaded prompt and what its checkpoint says about it."""

    name: str
    n_tokens: int
    d_model: int
    base_model: str
    init: str
    input_template: str | None = Field(
        default=None, description="A text task's template: the fields a request's `fields` must hold."
    )
    labels: list[str] | None = Field(default=None, description="A classification task's label strings.")
    max_source_length: int
    punctuation: str = Field(description="Text format the prompt was trained with: paper, current or none.")
    dev_f1: float | None = Field(default=None, description="Dev F1 recorded at training time, if any.")
    dev_exact_match: float | None = Field(default=None, description="Dev EM recorded at training time.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Everything the checkpoint recorded.")


class TasksResponse(BaseModel):
    """Every prompt this server answers for."""

    tasks: list[TaskInfo]


class HealthResponse(BaseModel):
    """Liveness plus the micro-batcher's counters."""

    status: Literal["ok"] = "ok"
    device: str
    n_tasks: int
    batches_run: int = Field(description="Merged batches handed to the model.")
    max_batch_seen: int = Field(description="Most questions merged into one batch.")
    requests_answered: int
    rows_answered: int = Field(description="Questions answered (a request may hold several).")
    queue_depth: int = Field(description="Requests waiting for the model.")
    max_queue: int = Field(description="Most requests that may wait; more are refused with 503.")
    requests_rejected: int = Field(description="Requests refused with 503 because the queue was full.")


class ErrorResponse(BaseModel):
    """What went wrong, in one sentence, plus field-level details for validation errors."""

    error: str
    errors: list[dict[str, Any]] | None = None


class ApiError(Exception):
    """An error answered as `ErrorResponse` with the given HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# ----------------------------------------------------------------------------------------------------
# Micro-batching


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
    window_waits: int = 0
    """Batches whose first request waited for company (not on /health)."""


class QueueFull(Exception):
    """The batcher's queue holds `max_queue` requests already; retry after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"{depth} requests are already waiting for the model")
        self.depth = depth
        self.retry_after = retry_after


class MicroBatcher:
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
        if max_batch_size < 1:
            raise UserError(f"--max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise UserError(f"--max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise UserError(f"--max_queue must be >= 1, got {max_queue}")
        self._answer = answer
        self._prepare = prepare
        self._length = length
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._batch_seconds = 1.0  # running mean of a batch's time on the model, for Retry-After
        self._last_rows = 0  # rows of the last batch: how much company to expect
        self._waiting: list[_Pending] = []  # in arrival order
        self._preparing = 0  # accepted requests still being prepared
        self._arrived: asyncio.Event | None = None
        self._taken: list[_Pending] = []  # out of the queue, not answered yet
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._prepare_executor: ThreadPoolExecutor | None = None

    @property
    def queue_depth(self) -> int:
        """Requests accepted and not yet on the model (waiting, or being prepared)."""
        return len(self._waiting) + self._preparing

    def start(self) -> None:
        """Start the gathering task on the running event loop (idempotent)."""
        if self._task is not None and not self._task.done():
            return
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softprompt-model")
        if self._prepare is not None:
            self._prepare_executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="softprompt-prepare"
            )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="softprompt-batcher")

    async def stop(self) -> None:
        """Stop gathering and fail whatever still waits (the server is shutting down)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        waiting, self._taken, self._waiting = [*self._taken, *self._waiting], [], []
        for p in waiting:
            if not p.future.done():
                p.future.set_exception(RuntimeError("the server is shutting down"))
        for executor in (self._executor, self._prepare_executor):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._prepare_executor = None

    def retry_after(self) -> int:
        """Whole seconds until the waiting requests have likely been run (at least 1)."""
        batches_ahead = self.queue_depth / self.max_batch_size + 1
        return max(1, math.ceil(self._batch_seconds * batches_ahead))

    async def submit(self, rows: list[Row]) -> list[str]:
        """Prepare and queue rows, and wait for their answers (in row order).

        Raises:
            QueueFull: `max_queue` requests already wait; nothing was queued.
        """
        self.start()
        assert self._arrived is not None
        if self.queue_depth >= self.max_queue:
            self.stats.requests_rejected += 1
            raise QueueFull(self.queue_depth, self.retry_after())
        items: list[Any] = rows
        if self._prepare is not None:
            self._preparing += 1
            try:
                loop = asyncio.get_running_loop()
                items = await loop.run_in_executor(self._prepare_executor, self._prepare, rows)
            finally:
                self._preparing -= 1
                self._arrived.set()  # the window may be waiting for this request
        length = max(map(self._length, items)) if self._length is not None and items else 0
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Pending(rows=items, future=future, length=length))
        self._arrived.set()
        return await future

    def _rows_waiting(self) -> int:
        return sum(len(p.rows) for p in self._waiting)

    async def _next_arrival(self, timeout: float | None = None) -> bool:
        """Wait until a request arrives or finishes preparing; False on timeout."""
        assert self._arrived is not None
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _gather(self) -> list[_Pending]:
        while not self._waiting:
            await self._next_arrival()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        waited = False
        while self._rows_waiting() < self.max_batch_size and (
            self._preparing > 0 or self._rows_waiting() < self._last_rows
        ):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            waited = True
            if not await self._next_arrival(remaining):
                break
        self.stats.window_waits += waited
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

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A client that went away has a cancelled future; its rows are not worth decoding.
            batch = [p for p in await self._gather() if not p.future.done()]
            self._taken = batch
            if not batch:
                continue
            rows = [r for p in batch for r in p.rows]
            self._last_rows = len(rows)
            started = loop.time()
            try:
                answers = await loop.run_in_executor(self._executor, self._answer, rows)
            except Exception as e:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                self._taken = []
                continue
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (loop.time() - started)
            self.stats.batches_run += 1
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(rows))
            self.stats.rows_answered += len(rows)
            start = 0
            for p in batch:
                part = answers[start : start + len(p.rows)]
                start += len(p.rows)
                if not p.future.done():
                    self.stats.requests_answered += 1
                    p.future.set_result(part)
            self._taken = []


# ----------------------------------------------------------------------------------------------------
# The application


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_context_chars: int = 20000
    """Longest context accepted, in characters."""
    max_question_chars: int = 2000
    """Longest question accepted, in characters."""
    max_inputs: int = 256
    """Most questions in one request."""

    @property
    def max_body_bytes(self) -> int:
        # UTF-8 needs at most 4 bytes a character; the slack covers JSON syntax and task names.
        return self.max_inputs * (4 * (self.max_context_chars + self.max_question_chars) + 1024) + 65536


def _error(
    status: int,
    message: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content=ErrorResponse(error=message, errors=errors).model_dump(exclude_none=True),
        headers=headers,
    )


def _where(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "single", "batch")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    for e in errors:
        if e.get("type") == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", "malformed JSON")
            return _error(422, f"the request body is not valid JSON ({reason}); send a JSON object")
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing" for e in errors):
        return _error(
            422,
            'the request has no body; send {"task", "question", "context"} or {"inputs": [...]} as JSON',
        )
    if any(e.get("type") == "model_attributes_type" and _where(e.get("loc", ())) == "body" for e in errors):
        return _error(
            422,
            'the request body must be a JSON object, {"task", "question", "context"} or {"inputs": [...]}, '
            "sent as Content-Type: application/json",
        )
    summary = "; ".join(f"{_where(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:5])
    details = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg"), "type": e.get("type")}
        for e in errors
    ]
    return _error(422, f"invalid request: {summary}", details)


def create_app(
    bank: PromptBank,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_queue: int = 1024,
    max_new_tokens: int = 32,
    bf16: bool = False,
    limits: Limits | None = None,
    answer: AnswerFn | None = None,
) -> FastAPI:
    """The HTTP application over a prompt bank.

    Args:
        bank: the model and its prompts.
        max_batch_size: most questions per merged batch (also the model's batch size).
        max_wait_ms: the longest a batch's first request waits for others on their way (see `MicroBatcher`).
        max_queue: most requests waiting for the model; more are answered 503 with `Retry-After`.
        max_new_tokens: the longest answer in tokens (32, like `softprompt predict`).
        bf16: run the model under bf16 autocast.
        limits: request size limits.
        answer: replaces `bank.answer` (rows -> answers, rows queued as given), e.g. to instrument it.

    Returns:
        A FastAPI app; the micro-batcher starts with it and stops on shutdown.
    """
    limits = limits or Limits()
    if answer is not None:
        batcher = MicroBatcher(
            answer, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue
        )
    else:
        batcher = MicroBatcher(
            functools.partial(
                bank.answer_prepared, batch_size=max_batch_size, max_new_tokens=max_new_tokens, bf16=bf16
            ),
            prepare=bank.prepare,
            length=lambda row: row.length,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
        )
    tasks = [TaskInfo(**info) for info in bank.describe()]

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="softprompt",
        summary="Extractive QA from one frozen T5 and many soft prompts (Lester et al., 2021).",
        lifespan=lifespan,
    )
    app.state.bank = bank
    app.state.batcher = batcher
    app.state.limits = limits

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, headers=exc.headers)

    # Unknown paths and wrong methods answer in the same {"error": ...} shape as everything else.
    @app.exception_handler(404)
    async def on_not_found(request: Request, _: Exception) -> JSONResponse:
        return _error(404, f"no endpoint at {request.url.path}; this server has {ENDPOINTS} (and /docs)")

    @app.exception_handler(405)
    async def on_bad_method(request: Request, _: Exception) -> JSONResponse:
        return _error(
            405, f"{request.method} is not allowed on {request.url.path}; this server has {ENDPOINTS}"
        )

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable[[Request], Any]) -> Any:
        # Refuse an oversized body before reading it rather than after it is in memory.
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            return _error(
                413,
                f"the request body is {length} bytes; this server accepts at most {limits.max_body_bytes}",
            )
        # The body is JSON whatever the client called it: `curl -d '{...}'` sends a form content type.
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
        return await call_next(request)

    errors = {code: {"model": ErrorResponse} for code in (413, 422, 500, 503)}
    text_tasks = {
        name: TaskSpec.from_dict(bank.entry(name).config.task, where=f"prompt {name}")
        for name in bank.names
        if bank.entry(name).config.task
    }

    def _too_long(where: str, name: str, text: str, most: int, flag: str) -> None:
        if len(text) > most:
            raise ApiError(
                413,
                f"{where}{name} is {len(text)} characters long; this server accepts at most {most} ({flag})",
            )

    def _row(item: AnswerInput, where: str) -> Row:
        """One input as the batcher's row: QA as (task, question, context), a text task's fields filled in."""
        if item.task not in bank:
            raise ApiError(
                422, f"{where}task: unknown task '{item.task}'; loaded tasks: {', '.join(bank.names)}"
            )
        spec = text_tasks.get(item.task)
        if spec is None:
            missing = [n for n in ("question", "context") if getattr(item, n) is None]
            if missing:
                raise ApiError(
                    422,
                    f"invalid request: {where}{missing[0]}: Field required (task '{item.task}' answers "
                    "questions: send question and context)",
                )
            _too_long(where, "context", item.context, limits.max_context_chars, "--max_context_chars")
            _too_long(where, "question", item.question, limits.max_question_chars, "--max_question_chars")
            return (item.task, item.question, item.context)
        if item.fields is None:
            raise ApiError(
                422,
                f"{where}task '{item.task}' reads its fields: send fields for its template "
                f"{spec.input_template!r}",
            )
        try:
            texts = spec.input_texts(item.fields)
        except BadRecord as err:
            raise ApiError(
                422, f"{where}fields: {err.reason} (the template is {spec.input_template!r})"
            ) from None
        if len(texts) != 1:
            raise ApiError(422, f"{where}fields: make {len(texts)} inputs; send one example per input")
        text = texts[0][1]
        _too_long(
            where,
            "the filled template",
            text,
            limits.max_context_chars + limits.max_question_chars,
            "--max_context_chars",
        )
        return (item.task, text, None)

    @app.post("/v1/answer", responses=errors)
    async def answer_questions(body: AnswerRequest) -> AnswerResponse | BatchAnswerResponse:
        """Answer `{"task", "question", "context"}`, or `{"inputs": [...]}` of such objects in order."""
        batched = isinstance(body, BatchAnswerRequest)
        inputs = body.inputs if isinstance(body, BatchAnswerRequest) else [body]
        if len(inputs) > limits.max_inputs:
            raise ApiError(
                413,
                f"the request holds {len(inputs)} inputs; this server accepts at most {limits.max_inputs}",
            )
        rows = [_row(item, f"inputs[{i}]." if batched else "") for i, item in enumerate(inputs)]
        try:
            answers = await batcher.submit(rows)
        except QueueFull as e:
            raise ApiError(
                503,
                f"the server is overloaded ({e.depth} requests already wait for the model, --max_queue "
                f"{batcher.max_queue}); retry after {e.retry_after} s",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        except Exception as e:
            raise ApiError(500, f"the model failed on this batch ({type(e).__name__}: {e})") from e
        return BatchAnswerResponse(answers=answers) if batched else AnswerResponse(answer=answers[0])

    @app.get("/v1/tasks")
    async def list_tasks() -> TasksResponse:
        """Every loaded prompt with its checkpoint's metadata."""
        return TasksResponse(tasks=tasks)

    @app.get("/health")
    async def health() -> HealthResponse:
        """Liveness and micro-batching counters."""
        s = batcher.stats
        return HealthResponse(
            device=str(bank.device),
            n_tasks=len(bank),
            batches_run=s.batches_run,
            max_batch_seen=s.max_batch_seen,
            requests_answered=s.requests_answered,
            rows_answered=s.rows_answered,
            queue_depth=batcher.queue_depth,
            max_queue=batcher.max_queue,
            requests_rejected=s.requests_rejected,
        )

    return app


# ----------------------------------------------------------------------------------------------------
# The command


def parse_prompt_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """`NAME=DIR` (or a bare `DIR`, named after its folder) -> (name, dir) pairs.

    Raises:
        UserError: a spec has an empty name or directory, or two prompts share a name.
    """
    out: list[tuple[str, str]] = []
    for spec in specs:
        if "=" in spec and not Path(spec).is_dir():
            name, directory = spec.split("=", 1)
        else:
            directory = spec
            name = Path(spec.rstrip("/")).name
        if not name.strip() or not directory.strip():
            raise UserError(f"--prompt {spec!r}: write NAME=DIR, e.g. --prompt squad=runs/squad/best")
        if any(name == n for n, _ in out):
            raise UserError(f"two prompts are named '{name}'; give each --prompt NAME=DIR its own name")
        out.append((name, directory))
    return out


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free port chosen by the OS)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --host/--port"
        ) from None
    return sock


def main(argv: Sequence[str]) -> int:
    """`softprompt serve`: parse the flags, load the model and prompts, then serve until interrupted."""
    from softprompt.commands.flags import ServeArgs, serve_checks
    from softprompt.config.parser import parse

    return serve(parse(ServeArgs, argv, "softprompt serve", checks=serve_checks))


def serve(args: Any) -> int:
    """Load the model and prompts named by parsed `ServeArgs`, then serve until interrupted."""
    import uvicorn

    specs = parse_prompt_specs(args.prompt)
    if not specs:
        raise UserError("give at least one --prompt NAME=DIR to serve")
    bank = load_model_and_prompts(
        args.model,
        [d for _, d in specs],
        random_init=args.random_init,
        seed=args.seed,
        names=[n for n, _ in specs],
        bf16=args.precision == "bf16",
        allow_other=args.allow_other_base_model,
        fast_path=args.fast_path,
    )
    app = create_app(
        bank,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_new_tokens=args.max_target_length,
        bf16=args.precision == "bf16",
        limits=Limits(
            max_context_chars=args.max_context_chars,
            max_question_chars=args.max_question_chars,
            max_inputs=args.max_inputs,
        ),
    )
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"softprompt serve: {len(bank)} prompt(s) ({', '.join(bank.names)}) on {bank.device}; "
        f"listening on http://{shown}:{port}",
        flush=True,
    )
    config = uvicorn.Config(
        app, log_level=args.log_level, access_log=args.access_log, timeout_graceful_shutdown=5
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
