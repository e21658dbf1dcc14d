"""The HTTP app of `softprompt serve`: one frozen T5 answering for many soft prompts (the command that
loads the model and runs this app under uvicorn is `softprompt.commands.serve`).

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

import contextlib
import functools
import json
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from softprompt.data.records import BadRecord
from softprompt.errors import UserError
from softprompt.inference.bank import PromptBank, prompt_names
from softprompt.io.checkpoint import load_prompt_config
from softprompt.io.rundir import BEST, CHECKPOINT_PREFIX, LAST
from softprompt.serving.batching import MicroBatcher, QueueFull
from softprompt.serving.schemas import (
    AnswerFn,
    AnswerInput,
    AnswerRequest,
    AnswerResponse,
    ApiError,
    BatchAnswerRequest,
    BatchAnswerResponse,
    ErrorResponse,
    HealthResponse,
    Limits,
    Row,
    TaskInfo,
    TasksResponse,
    error_response,
    validation_response,
)
from softprompt.tasks.resolve import task_from_saved

ENDPOINTS = "POST /v1/answer, GET /v1/tasks, GET /health"


# ----------------------------------------------------------------------------------------------------
# The application


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
    classify: str = "greedy",
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
        classify: ``rank``: the prompts whose task has label targets answer by rank classification
            (`PromptBank.ranked_classes`), the others greedily; ``greedy``: every prompt generates.

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
                bank.answer_prepared,
                batch_size=max_batch_size,
                max_new_tokens=max_new_tokens,
                bf16=bf16,
                classify=classify,
            ),
            prepare=bank.prepare,
            length=lambda row: row.length,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
        )

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
    _add_error_handlers(app)
    _add_body_limit(app, limits)
    _add_routes(app, bank, batcher, limits)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Answer validation errors, `ApiError`s, unknown paths and wrong methods as `ErrorResponse`s."""

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, headers=exc.headers)

    # Unknown paths and wrong methods answer in the same {"error": ...} shape as everything else.
    @app.exception_handler(404)
    async def on_not_found(request: Request, _: Exception) -> JSONResponse:
        return error_response(
            404, f"no endpoint at {request.url.path}; this server has {ENDPOINTS} (and /docs)"
        )

    @app.exception_handler(405)
    async def on_bad_method(request: Request, _: Exception) -> JSONResponse:
        return error_response(
            405, f"{request.method} is not allowed on {request.url.path}; this server has {ENDPOINTS}"
        )


def _add_body_limit(app: FastAPI, limits: Limits) -> None:
    """Refuse bodies over `limits.max_body_bytes` (413) and read every POST body as JSON."""

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable[[Request], Any]) -> Any:
        # Refuse an oversized body before reading it rather than after it is in memory.
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            return error_response(
                413,
                f"the request body is {length} bytes; this server accepts at most {limits.max_body_bytes}",
            )
        # The body is JSON whatever the client called it: `curl -d '{...}'` sends a form content type.
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
        return await call_next(request)


class _RowReader:
    """Turns a request's inputs into the batcher's rows, refusing unknown tasks and oversized texts."""

    def __init__(self, bank: PromptBank, limits: Limits) -> None:
        self.bank = bank
        self.limits = limits

    @staticmethod
    def _too_long(where: str, name: str, text: str, most: int, flag: str) -> None:
        if len(text) > most:
            raise ApiError(
                413,
                f"{where}{name} is {len(text)} characters long; this server accepts at most {most} ({flag})",
            )

    def row(self, item: AnswerInput, where: str) -> Row:
        """One input as the batcher's row: its task and the example its prompt's task reads from it (a
        question and context, or a text task's fields: `Task.request_parts`)."""
        bank, limits = self.bank, self.limits
        if item.task not in bank:
            raise ApiError(
                422, f"{where}task: unknown task '{item.task}'; loaded tasks: {', '.join(bank.names)}"
            )
        if item.context is not None:
            self._too_long(where, "context", item.context, limits.max_context_chars, "--max_context_chars")
        if item.question is not None:
            self._too_long(
                where, "question", item.question, limits.max_question_chars, "--max_question_chars"
            )
        if item.fields is not None:
            most = limits.max_context_chars + limits.max_question_chars
            self._too_long(where, "fields", json.dumps(item.fields), most, "--max_context_chars")
        try:
            examples = bank.entry(item.task).task.request_parts(item.question, item.context, item.fields)
        except BadRecord as err:
            raise ApiError(422, f"{where}{err.reason}") from None
        if len(examples) != 1:
            raise ApiError(422, f"{where}fields: make {len(examples)} inputs; send one example per input")
        return (item.task, examples[0])


def _add_routes(app: FastAPI, bank: PromptBank, batcher: MicroBatcher, limits: Limits) -> None:
    """POST /v1/answer, GET /v1/tasks and GET /health."""
    errors = {code: {"model": ErrorResponse} for code in (413, 422, 500, 503)}
    tasks = [TaskInfo(**info) for info in bank.describe()]
    reader = _RowReader(bank, limits)

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
        rows = [reader.row(item, f"inputs[{i}]." if batched else "") for i, item in enumerate(inputs)]
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


# ----------------------------------------------------------------------------------------------------
# The command


def parse_prompt_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """`NAME=DIR` (or a bare `DIR`) -> (name, dir) pairs.

    A bare `DIR` is named as `eval` tells prompts apart: after the task its prompt recorded (``rte``),
    else after its run (``runs/rte/best`` -> ``rte``), and only where bare prompts still share a name
    after more of their paths (`bare_prompt_names`).

    Raises:
        UserError: a spec has an empty name or directory, or two prompts share a name.
    """
    out: list[tuple[str | None, str]] = []
    for spec in specs:
        if "=" in spec and not Path(spec).is_dir():
            name, directory = spec.split("=", 1)
            if not name.strip() or not directory.strip():
                raise UserError(f"--prompt {spec!r}: write NAME=DIR, e.g. --prompt squad=runs/squad/best")
            if any(name == n for n, _ in out):
                raise UserError(f"two prompts are named '{name}'; give each --prompt NAME=DIR its own name")
            out.append((name, directory))
        else:
            if not spec.strip():
                raise UserError(f"--prompt {spec!r}: write NAME=DIR, e.g. --prompt squad=runs/squad/best")
            out.append((None, spec))
    given = [n for n, _ in out if n is not None]
    bare = iter(bare_prompt_names([d for n, d in out if n is None], taken=given))
    return [(n if n is not None else next(bare), d) for n, d in out]


def _run_name(directory: str) -> str:
    """The run a prompt directory belongs to (``runs/rte/best`` -> ``rte``), else its own folder's name."""
    path = Path(directory.rstrip("/") or directory).resolve()
    if path.name in (BEST, LAST) or path.name.startswith(CHECKPOINT_PREFIX):
        return path.parent.name or path.name
    return path.name


def _task_name(directory: str) -> str | None:
    """The name of the task a prompt recorded (``squad`` for QA); None when its config cannot be read
    (loading it reports why)."""
    try:
        config = load_prompt_config(directory)
        return task_from_saved(config.task, punctuation=config.punctuation).name
    except UserError:
        return None


def bare_prompt_names(directories: Sequence[str], taken: Sequence[str] = ()) -> list[str]:
    """Distinct names for prompts given without one: each one's recorded task, else (task names shared)
    its run's name, else (still shared) as much of its path as tells them apart.

    Raises:
        UserError: no such naming tells them apart from each other and from the names in `taken`.
    """
    if not directories:
        return []
    tasks = [_task_name(d) for d in directories]
    levels = [
        [t or _run_name(d) for t, d in zip(tasks, directories, strict=True)],
        [_run_name(d) for d in directories],
        prompt_names([str(d) for d in directories]),
    ]
    for names in levels:
        if len(set(names)) == len(names) and not set(names) & set(taken):
            return names
    clash = next(n for n in levels[-1] if levels[-1].count(n) > 1 or n in taken)
    raise UserError(f"two prompts are named '{clash}'; give each --prompt NAME=DIR its own name")


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
