"""`GET /metrics` of `softprompt serve`: Prometheus's text format, from `prometheus_client`.

One `ServeMetrics` per app, each with its own registry (never the process-wide one), so that several
apps in one process (tests, a bench) count apart. What it measures:

* `softprompt_answer_requests_total{status}`: `POST /v1/answer` requests by HTTP status, counted by an
  ASGI middleware (`CountRequests`) outside every other, so refusals by size or validation count too;
  `softprompt_rejections_total{reason}`: those refused (`queue_full` 503, `too_large` 413, `invalid` 422).
* `softprompt_queue_depth`, `softprompt_running_rows`, `softprompt_prompts_resident`: gauges read when
  scraped (the batcher's queue, the rows on the model now, the bank's resident prompts).
* Histograms: `softprompt_batch_size_rows` (rows per model call), `softprompt_queue_wait_seconds` (a
  request's arrival to its first row on the model), `softprompt_time_to_first_answer_seconds` (arrival to
  the end of the model call that answered its first row) and `softprompt_request_seconds` (the whole
  answered request, body read to response).

A request's times travel with its rows: the route wraps each row in `Timed` with the request's
`RequestClock`, and `ServeMetrics.timed_prepare` and `.timed_answer` wrap the batcher's prepare and
answer functions, so the batcher itself needs no change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CONTENT_TYPE_LATEST", "CountRequests", "RequestClock", "ServeMetrics", "Timed"]

# Seconds: a tiny CPU model answers in milliseconds, a large model under load in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
REJECTED = {413: "too_large", 422: "invalid", 503: "queue_full"}


@dataclass
class RequestClock:
    """When one request arrived, first reached the model and first had an answer (`time.monotonic`)."""

    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_answer: float | None = None


@dataclass(frozen=True)
class Timed:
    """A row on its way through the batcher, with its request's clock."""

    clock: RequestClock
    row: Any


class ServeMetrics:
    """The metrics of one app, in a registry of its own (`render` writes them)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "softprompt_answer_requests", "POST /v1/answer requests, by HTTP status.", ["status"], registry=r
        )
        self.rejections = Counter(
            "softprompt_rejections",
            "POST /v1/answer requests refused: queue_full (503), too_large (413), invalid (422).",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge("softprompt_queue_depth", "Requests waiting for the model.", registry=r)
        self.running_rows = Gauge("softprompt_running_rows", "Rows on the model now.", registry=r)
        self.prompts_resident = Gauge(
            "softprompt_prompts_resident", "Prompts resident in the bank.", registry=r
        )
        self.batch_size = Histogram(
            "softprompt_batch_size_rows", "Rows per model call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "softprompt_queue_wait_seconds",
            "From a request's arrival to its first row on the model.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_answer = Histogram(
            "softprompt_time_to_first_answer_seconds",
            "From a request's arrival to the end of the model call that answered its first row.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "softprompt_request_seconds",
            "Answered POST /v1/answer requests, from arrival to response.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def watch(self, queue_depth: Callable[[], float], prompts_resident: Callable[[], float]) -> None:
        """Read the queue depth and the resident prompts from these functions at every scrape."""
        self.queue_depth.set_function(queue_depth)
        self.prompts_resident.set_function(prompts_resident)

    def render(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)

    def timed_prepare(
        self, prepare: Callable[[list[Any]], list[Any]]
    ) -> Callable[[list[Timed]], list[Timed]]:
        """`prepare` over `Timed` rows: each prepared row keeps its request's clock."""

        def run(items: list[Timed]) -> list[Timed]:
            prepared = prepare([t.row for t in items])
            return [Timed(t.clock, p) for t, p in zip(items, prepared, strict=True)]

        return run

    def timed_answer(self, answer: Callable[[list[Any]], list[str]]) -> Callable[[list[Timed]], list[str]]:
        """`answer` over `Timed` rows, observing batch size, queue wait and time to first answer.

        Called on the model thread; prometheus_client's metrics are thread-safe, and a clock is written
        only there (the route reads none of it).
        """

        def run(items: list[Timed]) -> list[str]:
            clocks = list({id(t.clock): t.clock for t in items}.values())
            now = time.monotonic()
            for c in clocks:
                if c.started is None:
                    c.started = now
                    self.queue_wait.observe(now - c.arrived)
            self.batch_size.observe(len(items))
            self.running_rows.inc(len(items))
            try:
                answers = answer([t.row for t in items])
            finally:
                self.running_rows.dec(len(items))
            now = time.monotonic()
            for c in clocks:
                if c.first_answer is None:
                    c.first_answer = now
                    self.first_answer.observe(now - c.arrived)
            return answers

        return run


class CountRequests:
    """ASGI middleware: every `POST /v1/answer` counted by the status it was answered with, and timed.

    Pure ASGI (not Starlette's `BaseHTTPMiddleware`), so a client's disconnect still reaches the route.
    """

    def __init__(self, app: Any, metrics: ServeMetrics, path: str = "/v1/answer") -> None:
        self.app = app
        self.metrics = metrics
        self.path = path

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Pass the request on, noting the status of its response."""
        if scope["type"] != "http" or scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # an exception that escapes every handler is answered 500 by the server

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(status=str(status)).inc()
            if status in REJECTED:
                self.metrics.rejections.labels(reason=REJECTED[status]).inc()
            elif status == 200:
                self.metrics.latency.observe(time.monotonic() - started)
