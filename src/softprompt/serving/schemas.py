"""`softprompt serve`'s request and response bodies, request limits and error answers.

Every error answers `{"error": "one sentence", "errors": [...field details, if any]}` (`ErrorResponse`,
written by `error_response`); `ApiError` raised in a route becomes such an answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Discriminator, Field, Tag, field_validator

Row = tuple[str, Any]  # (task, the example its prompt's task made of the input: `Task.request_parts`)
AnswerFn = Callable[[list[Row]], list[str]]


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

    @field_validator("question", "context")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        # A blank question is no question: answering it spends the model on nothing.
        if value is not None and not value.strip():
            raise ValueError("must hold some text, not only whitespace")
        return value

    @field_validator("fields")
    @classmethod
    def _finite(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # JSON's NaN/Infinity (Python's json reads them) would reach the model as the text "nan".
        stack: list[Any] = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError("must not hold NaN or Infinity; send numbers as finite values or text")
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        return value


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
    resident: bool = Field(
        default=True,
        description="In memory now; an evicted prompt (--max_resident_prompts) is read again when asked for.",
    )


class TasksResponse(BaseModel):
    """Every prompt this server answers for."""

    tasks: list[TaskInfo]


class LoadPromptRequest(BaseModel):
    """`POST /v1/prompts`: serve the prompt directory (or PEFT adapter) at `path` as task `name`."""

    name: str = Field(min_length=1, max_length=64, description="The task name requests will use.")
    path: str = Field(min_length=1, max_length=4096, description="A directory inside --prompt_root.")


class UnloadPromptResponse(BaseModel):
    """`DELETE /v1/prompts/{name}`: the prompt is no longer served."""

    unloaded: str


class HealthResponse(BaseModel):
    """Liveness plus the micro-batcher's counters."""

    status: Literal["ok"] = "ok"
    device: str
    precision: Literal["bf16", "fp32"] = Field(
        default="fp32", description="What the model computes in (`--precision`, auto resolved at start)."
    )
    n_tasks: int
    batches_run: int = Field(
        description="Merged batches handed to the model (continuous batching: admissions, one encoder pass each)."
    )
    max_batch_seen: int = Field(
        description="Most questions merged into one batch (continuous batching: most rows decoding at once)."
    )
    requests_answered: int
    rows_answered: int = Field(description="Questions answered (a request may hold several).")
    queue_depth: int = Field(description="Requests waiting for the model.")
    max_queue: int = Field(description="Most requests that may wait; more are refused with 503.")
    requests_rejected: int = Field(description="Requests refused with 503 because the queue was full.")
    requests_abandoned: int = Field(
        default=0, description="Requests whose client left before the answer; their rows were not decoded."
    )
    rows_dropped: int = Field(
        default=0, description="Rows of a running oversized request dropped when its client left."
    )


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


def error_response(
    status: int,
    message: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The `ErrorResponse` JSON body every error answers with, under `status`."""
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


def validation_response(exc: RequestValidationError) -> JSONResponse:
    """A 422 answer for a request body FastAPI could not validate: one sentence saying what to send."""
    errors = list(exc.errors())
    for e in errors:
        if e.get("type") == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", "malformed JSON")
            return error_response(422, f"the request body is not valid JSON ({reason}); send a JSON object")
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing" for e in errors):
        return error_response(
            422,
            'the request has no body; send {"task", "question", "context"} or {"inputs": [...]} as JSON',
        )
    if any(e.get("type") == "model_attributes_type" and _where(e.get("loc", ())) == "body" for e in errors):
        return error_response(
            422,
            'the request body must be a JSON object, {"task", "question", "context"} or {"inputs": [...]}, '
            "sent as Content-Type: application/json",
        )
    summary = "; ".join(f"{_where(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:5])
    details = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg"), "type": e.get("type")}
        for e in errors
    ]
    return error_response(422, f"invalid request: {summary}", details)
