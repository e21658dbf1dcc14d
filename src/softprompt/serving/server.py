"""The HTTP app of `softprompt serve`: one frozen T5 answering for many soft prompts (the command that
loads the model and runs this app under uvicorn is `softprompt.commands.serve`).

Requests for different tasks that arrive within a few milliseconds of each other are gathered into
one mixed-prompt batch (`bank.PromptBank`), which is what makes prompt tuning cheap to serve: one
copy of the model, one forward pass, many tasks. The model runs on a single worker thread so the
event loop keeps accepting requests (and answering /health) while a batch is being decoded.

Endpoints: `POST /v1/answer`, `GET /v1/tasks`, `GET /health`, `GET /metrics` (Prometheus,
`serving.metrics`), `POST /v1/prompts` and `DELETE /v1/prompts/{name}` (with `--prompt_root`,
`serving.prompts`), and FastAPI's `/openapi.json` and `/docs`. Every error answers `{"error": "one sentence", "errors": [...field details, if any]}` with one
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
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from softprompt.data.records import BadRecord
from softprompt.errors import UserError
from softprompt.inference.bank import PromptBank, prompt_names
from softprompt.inference.continuous import ContinuousDecoder
from softprompt.io.checkpoint import load_prompt_config
from softprompt.io.rundir import BEST, CHECKPOINT_PREFIX, LAST
from softprompt.serving.batching import MicroBatcher, QueueFull
from softprompt.serving.continuous import ContinuousBatcher
from softprompt.serving.guard import BodyLimit, ClientGone, until_disconnected
from softprompt.serving.metrics import CONTENT_TYPE_LATEST, CountRequests, RequestClock, ServeMetrics, Timed
from softprompt.serving.prompts import PromptStore
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
    LoadPromptRequest,
    Row,
    TaskInfo,
    TasksResponse,
    UnloadPromptResponse,
    error_response,
    validation_response,
)
from softprompt.tasks.resolve import task_from_saved

ENDPOINTS = "POST /v1/answer, GET /v1/tasks, GET /health, GET /metrics, POST /v1/prompts"


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
    store: PromptStore | None = None,
    batching: str = "continuous",
    max_batch_tokens: int = 65536,
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
        answer: replaces `bank.answer` (rows -> answers, rows queued as given), e.g. to instrument it;
            implies static batching.
        batching: `continuous` (rows join and leave the running batch at every decoder step,
            `ContinuousBatcher`) or `static` (`MicroBatcher`); continuous falls back to static where the
            model does not decode with the lean T5 (`ContinuousDecoder.supported`).
        max_batch_tokens: continuous batching's bound on encoder positions decoding at once.
        store: the prompts known and resident, and where more may be loaded from (default: the bank's
            prompts, all resident, and no loading at run time).
        classify: ``rank``: the prompts whose task has label targets answer by rank classification
            (`PromptBank.ranked_classes`), the others greedily, in static batches; ``greedy``: every prompt generates.

    Returns:
        A FastAPI app; the micro-batcher starts with it and stops on shutdown.
    """
    limits = limits or Limits()
    store = store or PromptStore(bank)
    metrics = ServeMetrics()
    decoder = None
    if answer is None and batching == "continuous" and classify != "rank":  # ranking has no decoder steps
        decoder = ContinuousDecoder(bank, max_new_tokens=max_new_tokens, bf16=bf16, slots=max_batch_size)
    batcher: MicroBatcher | ContinuousBatcher
    if decoder is not None and decoder.supported:
        batcher = ContinuousBatcher(
            decoder,
            prepare=bank.prepare,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            max_new_tokens=max_new_tokens,
            metrics=metrics,
        )
    elif answer is not None:
        batcher = MicroBatcher(
            metrics.timed_answer(answer),
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
        )
    else:
        batcher = MicroBatcher(
            metrics.timed_answer(
                functools.partial(
                    bank.answer_prepared,
                    batch_size=max_batch_size,
                    max_new_tokens=max_new_tokens,
                    bf16=bf16,
                    classify=classify,
                )
            ),
            prepare=metrics.timed_prepare(bank.prepare),
            length=lambda timed: timed.row.length,
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
            await store.close()

    app = FastAPI(
        title="softprompt",
        summary="Extractive QA from one frozen T5 and many soft prompts (Lester et al., 2021).",
        lifespan=lifespan,
    )
    app.state.bank = bank
    app.state.batcher = batcher
    app.state.limits = limits
    app.state.store = store
    app.state.metrics = metrics
    app.state.precision = "bf16" if bf16 else "fp32"
    metrics.watch(lambda: batcher.queue_depth, lambda: len(store.resident))
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_body_bytes=limits.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: it sees BodyLimit's 413 too
    _add_routes(app, bank, batcher, limits, store)
    _add_prompt_routes(app, store)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Answer validation errors, `ApiError`s, unknown paths and wrong methods as `ErrorResponse`s."""

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc)

    @app.exception_handler(413)
    async def on_too_large(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(413, str(exc.detail))

    # FastAPI answers a body its JSON reader fails on other than by syntax (nesting past Python's
    # recursion limit, an integer past 4,300 digits, bytes that are not UTF-8) with 400 {"detail"};
    # it is malformed JSON like any other, so it gets the same 422 {"error"}.
    @app.exception_handler(400)
    async def on_unreadable_body(_: Request, exc: HTTPException) -> JSONResponse:
        cause = {
            RecursionError: "it nests too deeply",
            UnicodeDecodeError: "it is not UTF-8",
        }.get(
            type(exc.__cause__),
            "an integer in it is too long" if isinstance(exc.__cause__, ValueError) else "",
        )
        reason = f" ({cause})" if cause else ""
        return error_response(422, f"the request body is not valid JSON{reason}; send a JSON object")

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


class _RowReader:
    """Turns a request's inputs into the batcher's rows, refusing unknown tasks and oversized texts."""

    def __init__(self, bank: PromptBank, limits: Limits, store: PromptStore) -> None:
        self.bank = bank
        self.limits = limits
        self.store = store

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
        if item.task not in self.store:
            raise ApiError(
                422,
                f"{where}task: unknown task '{item.task}'; loaded tasks: {', '.join(self.store.names())}",
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


def _add_routes(
    app: FastAPI,
    bank: PromptBank,
    batcher: MicroBatcher | ContinuousBatcher,
    limits: Limits,
    store: PromptStore,
) -> None:
    """POST /v1/answer, GET /v1/tasks, GET /health and GET /metrics."""
    errors = {code: {"model": ErrorResponse} for code in (413, 422, 500, 503)}
    reader = _RowReader(bank, limits, store)

    @app.post("/v1/answer", responses=errors)
    async def answer_questions(body: AnswerRequest, request: Request) -> AnswerResponse | BatchAnswerResponse:
        """Answer `{"task", "question", "context"}`, or `{"inputs": [...]}` of such objects in order."""
        batched = isinstance(body, BatchAnswerRequest)
        inputs = body.inputs if isinstance(body, BatchAnswerRequest) else [body]
        if len(inputs) > limits.max_inputs:
            raise ApiError(
                413,
                f"the request holds {len(inputs)} inputs; this server accepts at most {limits.max_inputs}",
            )
        clock = RequestClock()
        for i, item in enumerate(inputs):  # unknown tasks first: nothing is loaded for a request refused
            if item.task not in store:
                reader.row(item, f"inputs[{i}]." if batched else "")
        # Its prompts stay resident (and their bank slots theirs) until the request is answered.
        pinned = await store.acquire([item.task for item in inputs])
        try:
            rows = [
                Timed(clock, reader.row(item, f"inputs[{i}]." if batched else ""))
                for i, item in enumerate(inputs)
            ]
            # A client that leaves cancels its rows: queued ones are dropped, never decoded for nobody.
            answers = await until_disconnected(request, batcher.submit(rows))
        except ClientGone:
            # Nginx's 499: nobody reads this answer; it only closes the request without a logged error.
            raise ApiError(499, "the client closed the request before its answer was ready") from None
        except QueueFull as e:
            raise ApiError(
                503,
                f"the server is overloaded ({e.depth} requests already wait for the model, --max_queue "
                f"{batcher.max_queue}); retry after {e.retry_after} s",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(500, f"the model failed on this batch ({type(e).__name__}: {e})") from e
        finally:
            store.release(pinned)
        return BatchAnswerResponse(answers=answers) if batched else AnswerResponse(answer=answers[0])

    @app.get("/v1/tasks")
    async def list_tasks() -> TasksResponse:
        """Every prompt served (loaded at start or since), with its checkpoint's metadata."""
        return TasksResponse(
            tasks=[TaskInfo(**{**i, "base_model": shown_model(i["base_model"])}) for i in store.describe()]
        )

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """The server's metrics in Prometheus's text format (`serving.metrics`)."""
        return Response(app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> HealthResponse:
        """Liveness and micro-batching counters."""
        s = batcher.stats
        return HealthResponse(
            device=str(bank.device),
            precision=app.state.precision,
            n_tasks=len(store.names()),
            batches_run=s.batches_run,
            max_batch_seen=s.max_batch_seen,
            requests_answered=s.requests_answered,
            rows_answered=s.rows_answered,
            queue_depth=batcher.queue_depth,
            max_queue=batcher.max_queue,
            requests_rejected=s.requests_rejected,
            requests_abandoned=s.requests_abandoned,
            rows_dropped=s.rows_dropped,
        )


def _add_prompt_routes(app: FastAPI, store: PromptStore) -> None:
    """POST /v1/prompts and DELETE /v1/prompts/{name}: 404 unless the server has a --prompt_root."""
    errors = {code: {"model": ErrorResponse} for code in (403, 404, 409, 422)}

    def enabled() -> None:
        if not store.enabled:
            raise ApiError(404, "loading prompts at run time is off; start the server with --prompt_root DIR")

    @app.post("/v1/prompts", status_code=201, responses=errors)
    async def load_prompt(body: LoadPromptRequest) -> TaskInfo:
        """Read the prompt directory (or PEFT adapter) at `path`, inside --prompt_root, and serve it as `name`."""
        enabled()
        info = await store.load(body.name, body.path)
        return TaskInfo(**{**info, "base_model": shown_model(info["base_model"])})

    @app.delete("/v1/prompts/{name}", responses=errors)
    async def unload_prompt(name: str) -> UnloadPromptResponse:
        """Stop serving `name`; requests already holding it are answered first."""
        enabled()
        store.unload(name)
        return UnloadPromptResponse(unloaded=name)


# ----------------------------------------------------------------------------------------------------
# The command


def shown_model(base_model: str) -> str:
    """A prompt's base model as `/v1/tasks` shows it: a Hub id as it is, a local directory by its folder
    name only (its absolute path says how the server's disk is laid out, which no client needs)."""
    path = Path(base_model)
    if path.is_absolute() or base_model.startswith((".", "~")) or path.exists():
        return path.name or base_model
    return base_model


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
